//! Before a run: what happens to each task (runs, kept, adopted), and the handles a killed
//! run never recorded.

use std::collections::BTreeMap;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::event::{Decision, Reason};
use crate::graph::Graph;
use crate::record::{Record, Status};
use crate::task::{Check, EdgeRule};

/// Decides, per task, whether it runs, is kept or adopted. `previous` is `None` for a fresh
/// run (everything runs).
pub async fn decide(graph: &Graph, previous: Option<&BTreeMap<String, Record>>) -> Vec<Decision> {
    let n = graph.len();
    let Some(previous) = previous else {
        return vec![Decision::Run(Reason::Fresh); n];
    };
    // Check, all at once, every task whose record could be kept.
    let mut checks: Vec<Option<Check>> = vec![None; n];
    {
        let mut pending = FuturesUnordered::new();
        for i in 0..n {
            let task = graph.task(i);
            if let Some(r) = previous.get(task.id()) {
                // A one-shot that is done stays done; a service must still be alive, and
                // work left running must be looked at.
                let worth = match r.status {
                    Status::Done => task.is_service(),
                    Status::Running => true,
                    _ => false,
                };
                if worth && r.fingerprint == task.fingerprint() {
                    let task = task.clone();
                    let handle = r.handle.clone();
                    pending.push(async move { (i, task.check(handle.as_ref()).await) });
                }
            }
            while pending.len() >= 64 {
                if let Some((i, c)) = pending.next().await {
                    checks[i] = Some(c);
                }
            }
        }
        while let Some((i, c)) = pending.next().await {
            checks[i] = Some(c);
        }
    }
    let mut out: Vec<Decision> = vec![Decision::Keep; n];
    for &i in graph.topo() {
        let task = graph.task(i);
        let rec = previous.get(task.id());
        // The first need that re-runs along an edge that carries the re-run here.
        let upstream = graph.deps(i).iter().find_map(|&d| {
            if !matches!(out[d], Decision::Run(_)) {
                return None;
            }
            let up = graph.task(d).id().to_string();
            match task.on_rerun_of(&up) {
                EdgeRule::Rerun(None) => Some(Reason::UpstreamReRan(up)),
                EdgeRule::Rerun(Some(why)) => Some(Reason::UpstreamReRanBecause(up, why)),
                EdgeRule::Keep => None,
            }
        });
        out[i] = match rec {
            None => Decision::Run(Reason::NeverRan),
            Some(r) => match r.status {
                Status::Failed | Status::TimedOut => Decision::Run(Reason::Failed),
                Status::Cancelled => Decision::Run(Reason::Interrupted),
                Status::Skipped => Decision::Run(Reason::NeverRan),
                Status::Stopped => Decision::Run(Reason::NoLongerAlive("stopped".into())),
                _ if r.fingerprint != task.fingerprint() => Decision::Run(Reason::Changed),
                _ if upstream.is_some() => {
                    Decision::Run(upstream.unwrap_or(Reason::UpstreamReRan(String::new())))
                }
                Status::Done => match checks[i].take() {
                    Some(Check::Invalid(why)) => Decision::Run(Reason::NoLongerAlive(why)),
                    _ => Decision::Keep,
                },
                Status::Running => match checks[i].take() {
                    Some(Check::Valid) => Decision::Keep,
                    Some(Check::InFlight) => Decision::Adopt,
                    _ => Decision::Run(Reason::Interrupted),
                },
            },
        };
    }
    out
}

/// Fills in the handles of tasks recorded as running without one (a run killed between
/// starting a process and recording it), so that [`decide`] can check and adopt them instead
/// of starting them a second time. Returns the ids it found something for.
pub async fn recover_handles(graph: &Graph, records: &mut BTreeMap<String, Record>) -> Vec<String> {
    let mut found = Vec::new();
    for task in graph.tasks() {
        let Some(r) = records.get_mut(task.id()) else {
            continue;
        };
        if r.status == Status::Running && r.handle.is_none() && r.fingerprint == task.fingerprint()
        {
            if let Some(h) = task.recover(r).await {
                r.handle = Some(h);
                found.push(r.id.clone());
            }
        }
    }
    found
}
