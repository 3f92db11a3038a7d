//! Property tests of the scheduler and of resume, on random DAGs.
//!
//! A DAG here is `n` tasks `t0..t{n-1}` where each edge goes from a lower to a higher index
//! (task `j` needs some tasks `i < j`), so it is acyclic by construction. The tasks are
//! added to the builder in a random order, so nothing may rely on insertion order matching
//! dependency order. Expected results are computed from the edge lists directly, not with the
//! engine's own graph walks.
//!
//! Some tasks sleep a millisecond or two so that runs interleave; the case counts are kept
//! modest so that the suite stays fast on a small machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prl_flow_engine::testing::{Behaviour, FakeTask, Trace};
use prl_flow_engine::{
    decide, journal, run, Cancel, Decision, Graph, GraphBuilder, Journal, Outcome, Reason, Record,
    Report, RunOptions, Sink, Status,
};
use proptest::prelude::*;
use proptest::sample::Index;

#[derive(Debug, Clone)]
struct Dag {
    /// `deps[j]`: the tasks `j` needs, all `< j`, sorted and unique.
    deps: Vec<Vec<usize>>,
    /// The order in which the tasks are added to the builder.
    order: Vec<usize>,
    /// Per task: sleep this many milliseconds (0: return at once).
    sleep_ms: Vec<u8>,
}

impl Dag {
    fn n(&self) -> usize {
        self.deps.len()
    }

    /// Every task reachable from `root` through dependents, `root` excluded.
    fn descendants(&self, root: usize) -> Vec<bool> {
        let mut reach = vec![false; self.n()];
        // Edges go from lower to higher index: one forward pass suffices.
        for j in root + 1..self.n() {
            reach[j] = self.deps[j].iter().any(|&d| d == root || reach[d]);
        }
        reach
    }
}

fn id(i: usize) -> String {
    format!("t{i}")
}

fn dag(max_n: usize) -> impl Strategy<Value = Dag> {
    (1..=max_n)
        .prop_flat_map(|n| {
            (
                prop::collection::vec(prop::collection::vec(any::<Index>(), 0..=3), n),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
                // About one task in four sleeps 1 or 2 ms.
                prop::collection::vec(prop_oneof![6 => Just(0u8), 1 => 1u8..=2], n),
            )
        })
        .prop_map(|(raw, order, sleep_ms)| {
            let deps = raw
                .iter()
                .enumerate()
                .map(|(j, picks)| {
                    if j == 0 {
                        return Vec::new();
                    }
                    let mut d: Vec<usize> = picks.iter().map(|p| p.index(j)).collect();
                    d.sort_unstable();
                    d.dedup();
                    d
                })
                .collect();
            Dag {
                deps,
                order,
                sleep_ms,
            }
        })
}

fn jobs() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=4, Just(8), Just(64)]
}

struct Built {
    graph: Graph,
    /// By task index (not insertion position).
    tasks: Vec<Arc<FakeTask>>,
    trace: Trace,
}

/// Builds the graph of `dag`; `failing` names the task that fails, if any.
fn build(dag: &Dag, failing: Option<usize>) -> Built {
    let trace: Trace = Default::default();
    let tasks: Vec<Arc<FakeTask>> = (0..dag.n())
        .map(|i| {
            let needs: Vec<String> = dag.deps[i].iter().map(|&d| id(d)).collect();
            let needs: Vec<&str> = needs.iter().map(String::as_str).collect();
            let behaviour = if failing == Some(i) {
                Behaviour::Fail
            } else if dag.sleep_ms[i] > 0 {
                Behaviour::Sleep(Duration::from_millis(u64::from(dag.sleep_ms[i])))
            } else {
                Behaviour::Succeed
            };
            Arc::new(
                FakeTask::new(&id(i), &needs)
                    .behaviour(behaviour)
                    .trace(&trace),
            )
        })
        .collect();
    let mut b = GraphBuilder::with_capacity(dag.n());
    for &i in &dag.order {
        b.add(tasks[i].clone());
    }
    let graph = b
        .seal()
        .map_err(|e| format!("{e:?}"))
        .expect("a DAG built from lower to higher index seals");
    Built {
        graph,
        tasks,
        trace,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The report's outcome of task `i` (reports are by graph index).
fn outcome(b: &Built, r: &Report, i: usize) -> Option<Outcome> {
    let g = b.graph.index_of(&id(i)).expect("known id");
    r.outcomes[g]
}

fn runs(b: &Built, i: usize) -> u32 {
    b.tasks[i].runs.load(Ordering::SeqCst)
}

fn trace(b: &Built) -> Vec<String> {
    b.trace.lock().expect("trace").clone()
}

fn position(trace: &[String], what: &str) -> Option<usize> {
    trace.iter().position(|e| e == what)
}

async fn fresh_run(b: &Built, options: &RunOptions, sink: Sink) -> Report {
    let decisions = decide(&b.graph, None).await;
    run(&b.graph, &decisions, None, options, sink, Cancel::never()).await
}

/// Opens a journal in `dir`, runs with it as the only subscriber, and closes it.
async fn journaled_run(
    b: &Built,
    dir: &Path,
    keep: bool,
    previous: Option<&BTreeMap<String, Record>>,
    options: &RunOptions,
) -> (Vec<Decision>, Report) {
    let journal = Arc::new(Journal::open(dir, keep, "prop test").expect("open journal"));
    let decisions = decide(&b.graph, previous).await;
    let sink = Sink::new(vec![journal.recorder(&b.graph)]);
    let report = run(
        &b.graph,
        &decisions,
        previous,
        options,
        sink,
        Cancel::never(),
    )
    .await;
    match Arc::try_unwrap(journal) {
        Ok(j) => j.close().expect("close journal"),
        Err(_) => panic!("the run kept a reference to the journal"),
    }
    (decisions, report)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// (a) Every task runs exactly once, and only after all its dependencies ended; never
    /// more than `jobs` at once.
    #[test]
    fn every_task_runs_once_after_its_deps(dag in dag(60), jobs in jobs()) {
        let b = build(&dag, None);
        let options = RunOptions { jobs, ..RunOptions::default() };
        let r = runtime().block_on(fresh_run(&b, &options, Sink::none()));
        prop_assert!(r.ok(), "{:?}", r.summary);
        prop_assert_eq!(r.summary.done, dag.n());
        let t = trace(&b);
        for i in 0..dag.n() {
            prop_assert_eq!(runs(&b, i), 1, "t{} ran {} times", i, runs(&b, i));
            prop_assert_eq!(outcome(&b, &r, i), Some(Outcome::Done));
            let start = position(&t, &format!("start:t{i}")).expect("started");
            for &d in &dag.deps[i] {
                let end = position(&t, &format!("end:t{d}")).expect("ended");
                prop_assert!(end < start, "t{} started before its dependency t{} ended: {:?}", i, d, t);
            }
        }
        let mut running = 0usize;
        let mut most = 0usize;
        for e in &t {
            if e.starts_with("start:") {
                running += 1;
                most = most.max(running);
            } else if e.starts_with("end:") {
                running -= 1;
            }
        }
        prop_assert!(most <= jobs, "{} tasks at once with jobs = {}", most, jobs);
    }

    /// (b) With `keep_going`, one failing task skips exactly its descendants and everything
    /// else is done.
    #[test]
    fn keep_going_skips_exactly_the_descendants(
        dag in dag(60), failing in any::<Index>(), jobs in jobs(),
    ) {
        let f = failing.index(dag.n());
        let b = build(&dag, Some(f));
        let options = RunOptions { jobs, keep_going: true, ..RunOptions::default() };
        let r = runtime().block_on(fresh_run(&b, &options, Sink::none()));
        let below = dag.descendants(f);
        for (i, &below_f) in below.iter().enumerate() {
            let want = if i == f {
                Outcome::Failed
            } else if below_f {
                Outcome::Skipped
            } else {
                Outcome::Done
            };
            prop_assert_eq!(outcome(&b, &r, i), Some(want), "t{} (t{} fails)", i, f);
            prop_assert_eq!(runs(&b, i), u32::from(want != Outcome::Skipped), "runs of t{}", i);
        }
        let skipped = below.iter().filter(|&&x| x).count();
        prop_assert_eq!(r.summary.failed, 1);
        prop_assert_eq!(r.summary.skipped, skipped);
        prop_assert_eq!(r.summary.done, dag.n() - 1 - skipped);
    }

    /// (b) Without `keep_going`, the failing task is failed, none of its descendants runs,
    /// and what did run had all its dependencies done. With one job at a time, nothing
    /// starts once the failure is known.
    #[test]
    fn failure_without_keep_going_aborts(
        dag in dag(60), failing in any::<Index>(), jobs in jobs(),
    ) {
        let f = failing.index(dag.n());
        let b = build(&dag, Some(f));
        let options = RunOptions { jobs, ..RunOptions::default() };
        let r = runtime().block_on(fresh_run(&b, &options, Sink::none()));
        prop_assert!(!r.ok());
        prop_assert_eq!(outcome(&b, &r, f), Some(Outcome::Failed));
        let below = dag.descendants(f);
        for (i, &below_f) in below.iter().enumerate() {
            let o = outcome(&b, &r, i);
            if below_f {
                prop_assert_eq!(runs(&b, i), 0, "t{} runs although t{} failed", i, f);
                prop_assert_eq!(o, Some(Outcome::Skipped));
            } else if i != f {
                prop_assert!(matches!(o, Some(Outcome::Done | Outcome::Skipped)), "t{}: {:?}", i, o);
                prop_assert_eq!(runs(&b, i), u32::from(o == Some(Outcome::Done)));
                if o == Some(Outcome::Done) {
                    for &d in &dag.deps[i] {
                        prop_assert_eq!(outcome(&b, &r, d), Some(Outcome::Done));
                    }
                }
            }
        }
        prop_assert_eq!(r.summary.failed, 1);
        prop_assert_eq!(r.summary.done + r.summary.failed + r.summary.skipped, dag.n());
        if jobs == 1 {
            let t = trace(&b);
            let end = position(&t, &format!("end:t{f}")).expect("the failing task ended");
            let late: Vec<&String> = t[end..].iter().filter(|e| e.starts_with("start:")).collect();
            prop_assert!(late.is_empty(), "started after the failure: {:?}", late);
        }
    }

}

// Each case opens and closes a journal twice, with real fsyncs: fewer cases.
proptest! {
    #![proptest_config(config(32))]

    /// (c) Resume: after a run where one task failed, a resumed run with that task fixed
    /// runs exactly what was not done (the failed task, its descendants, whatever never
    /// started), says why, and ends with everything done.
    #[test]
    fn resume_runs_exactly_what_was_not_done(
        dag in dag(60), failing in any::<Index>(), jobs in jobs(),
    ) {
        let f = failing.index(dag.n());
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();

        let first = build(&dag, Some(f));
        let options = RunOptions { jobs, ..RunOptions::default() };
        let (_, r1) = rt.block_on(journaled_run(&first, dir.path(), false, None, &options));
        prop_assert!(!r1.ok());
        let records = journal::load(dir.path()).expect("load journal");
        let mut done_before = vec![false; dag.n()];
        for (i, done) in done_before.iter_mut().enumerate() {
            let o = outcome(&first, &r1, i).expect("every task has an outcome");
            let rec = records.get(&id(i));
            prop_assert!(rec.is_some(), "no record of t{}", i);
            let status = rec.map(|r| r.status);
            prop_assert_eq!(status, Some(Status::from(o)), "record of t{}", i);
            *done = o == Outcome::Done;
        }

        // The same graph, the failing task fixed (same ids, same fingerprints).
        let second = build(&dag, None);
        let (decisions, r2) = rt.block_on(journaled_run(
            &second, dir.path(), true, Some(&records), &options,
        ));
        prop_assert!(r2.ok(), "{:?}", r2.summary);
        let kept = done_before.iter().filter(|&&d| d).count();
        prop_assert_eq!(r2.summary.kept, kept);
        prop_assert_eq!(r2.summary.done, dag.n() - kept);
        for i in 0..dag.n() {
            let g = second.graph.index_of(&id(i)).expect("known id");
            let decision = &decisions[g];
            if done_before[i] {
                prop_assert_eq!(decision, &Decision::Keep, "t{}", i);
                prop_assert_eq!(runs(&second, i), 0, "t{} was done but ran again", i);
                prop_assert_eq!(r2.outcomes[g], None);
                continue;
            }
            prop_assert_eq!(runs(&second, i), 1, "t{} was not done and must run once", i);
            prop_assert_eq!(r2.outcomes[g], Some(Outcome::Done));
            let Decision::Run(reason) = decision else {
                return Err(TestCaseError::fail(format!("t{i} must run, decided {decision:?}")));
            };
            let words = reason.to_string();
            if i == f {
                prop_assert_eq!(reason, &Reason::Failed);
                prop_assert_eq!(words.as_str(), "failed");
            } else {
                match reason {
                    Reason::NeverRan => prop_assert_eq!(words.as_str(), "never ran"),
                    Reason::UpstreamReRan(up) => {
                        prop_assert!(words.starts_with("upstream re-ran"), "{}", words);
                        let u: usize = up.trim_start_matches('t').parse().expect("an id");
                        prop_assert!(dag.deps[i].contains(&u), "t{} is not a dependency of t{}", u, i);
                        prop_assert!(!done_before[u], "upstream t{} was done", u);
                    }
                    other => {
                        return Err(TestCaseError::fail(format!("t{i}: unexpected reason {other:?}")));
                    }
                }
            }
        }
        let after = journal::load(dir.path()).expect("load journal");
        for i in 0..dag.n() {
            prop_assert_eq!(after.get(&id(i)).map(|r| r.status), Some(Status::Done), "t{}", i);
        }
    }
}
