//! Keeping a deployment healthy once it is up (`run --attach`, `watch`): every probe
//! interval, each service the journal records as up is checked through its backend. One
//! that died is taken out of its router at once (`remove_worker`), then restarted after a
//! backoff by a resume of the same file, which keeps everything else and re-registers the
//! new process (the router's `register` task). A service that dies more often than its
//! budget allows within the window is reported once and left down: later resumes hold it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prl_flow_backend::{Backend, ProcState};
use prl_flow_engine::{journal, Record, Status, Subscriber};
use serde_json::Value;

use super::down::WatchEnd;
use super::load::Loaded;
use super::run::RunSettings;
use super::{is_allocation, proc_handle, Session};
use crate::actions::Action;
use crate::plan::{Command, Plan, RestartPolicy};

/// What the healer saw or did, for people and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealEvent {
    /// A service recorded as up is not running.
    Down(String),
    /// Taken out of its router until it is back.
    Detached { task: String, router: String },
    /// Restarting these after `wait`.
    Restarting { tasks: Vec<String>, wait: Duration },
    /// Back, ready and registered again.
    Restarted(Vec<String>),
    /// The restart did not bring them back (the next death counts against the budget).
    RestartFailed(String),
    /// Died more than the budget allows: reported once and left down.
    GaveUp {
        task: String,
        deaths: usize,
        policy: RestartPolicy,
    },
}

impl std::fmt::Display for HealEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealEvent::Down(t) => write!(f, "`{t}` is down"),
            HealEvent::Detached { task, router } => {
                write!(f, "`{task}` taken out of {router} until it is back")
            }
            HealEvent::Restarting { tasks, wait } => write!(
                f,
                "restarting {} in {}",
                tasks
                    .iter()
                    .map(|t| format!("`{t}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::plan::format_duration(*wait)
            ),
            HealEvent::Restarted(tasks) => write!(
                f,
                "restarted {}",
                tasks
                    .iter()
                    .map(|t| format!("`{t}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            HealEvent::RestartFailed(why) => write!(f, "the restart failed: {why}"),
            HealEvent::GaveUp {
                task,
                deaths,
                policy,
            } => write!(
                f,
                "`{task}` died {deaths} times within {}: more than its restart budget ({} restarts); left down. \
                 Fix the cause, then `prl-flow run FILE --resume`",
                crate::plan::format_duration(policy.window),
                policy.budget
            ),
        }
    }
}

/// The routers that list each engine task (regular mode), from the plan's `register`
/// tasks: engine → [(router URL, worker URL)], both with node placeholders.
fn registrations(plan: &Plan) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for t in &plan.tasks {
        let Command::Builtin {
            action: Action::Register,
            args,
        } = &t.command
        else {
            continue;
        };
        if args.get("mode").and_then(Value::as_str) == Some("pd") {
            continue;
        }
        let Some(router) = args.get("router").and_then(Value::as_str) else {
            continue;
        };
        for (url, task) in args
            .get("worker_tasks")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if let Some(task) = task.as_str() {
                out.entry(task.to_string())
                    .or_default()
                    .push((router.to_string(), url.clone()));
            }
        }
    }
    out
}

/// How often to look: the shortest readiness interval of the plan's services.
fn interval_of(plan: &Plan) -> Duration {
    plan.tasks
        .iter()
        .filter_map(|t| t.ready.as_ref().map(|r| r.interval))
        .min()
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(100))
}

/// Services recorded as up whose process is not running, and those in `retrying` (whose
/// restart by this healer failed): they are still down, and each look counts against the
/// restart budget. A service that had failed before the healer began is not its to restart.
async fn dead_services(
    backend: &dyn Backend,
    records: &BTreeMap<String, Record>,
    retrying: &BTreeSet<String>,
) -> Vec<String> {
    let mut dead = Vec::new();
    for r in records.values() {
        if !r.service || is_allocation(r) {
            continue;
        }
        match r.status {
            Status::Failed | Status::TimedOut if retrying.contains(&r.id) => {
                dead.push(r.id.clone())
            }
            Status::Done => {
                if let Some(h) = proc_handle(r) {
                    if !matches!(backend.status(&h).await, Ok(ProcState::Running)) {
                        dead.push(r.id.clone());
                    }
                }
            }
            _ => {}
        }
    }
    dead
}

/// Whether every service the journal records as started is stopped: `down` ran elsewhere.
fn all_stopped(records: &BTreeMap<String, Record>) -> bool {
    let mut services = records
        .values()
        .filter(|r| r.service && !is_allocation(r) && r.handle.is_some())
        .peekable();
    services.peek().is_some() && services.all(|r| r.status == Status::Stopped)
}

impl Session {
    /// Keeps the deployment of `loaded` (state in `dir`) healthy until `stop` fires or
    /// `down` stops it from elsewhere. `subs` makes the subscribers of each restart run
    /// (progress lines); `on` hears every [`HealEvent`].
    #[allow(clippy::too_many_arguments)]
    pub async fn heal(
        &self,
        loaded: &Loaded,
        dir: &Path,
        backend: &dyn Backend,
        policy: &RestartPolicy,
        subs: &(dyn Fn() -> Vec<Arc<dyn Subscriber>> + Send + Sync),
        on: &mut (dyn FnMut(HealEvent) + Send),
        stop: impl Future<Output = ()>,
    ) -> WatchEnd {
        let plan = &loaded.plan;
        let every = interval_of(plan);
        let routed = registrations(plan);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let mut deaths: BTreeMap<String, VecDeque<Instant>> = BTreeMap::new();
        let mut given_up: BTreeSet<String> = BTreeSet::new();
        // Services whose restart by this healer failed: looked at again, within the budget.
        let mut retrying: BTreeSet<String> = BTreeSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return WatchEnd::Signalled,
                () = tokio::time::sleep(every) => {}
            }
            let Ok(records) = journal::load(dir) else {
                continue;
            };
            if all_stopped(&records) {
                return WatchEnd::StoppedElsewhere;
            }
            let dead: Vec<String> = dead_services(backend, &records, &retrying)
                .await
                .into_iter()
                .filter(|id| !given_up.contains(id))
                .collect();
            if dead.is_empty() {
                continue;
            }
            // Out of the router at once: it must not send requests to a dead worker.
            let hosts = records
                .values()
                .filter(|r| is_allocation(r))
                .find_map(|r| {
                    r.handle
                        .as_ref()
                        .and_then(crate::actions::allocate::recorded_hosts)
                })
                .unwrap_or_default();
            let resolve = |t: &str| crate::plan::resolve_hosts(t, &|n| hosts.get(n).cloned());
            let now = Instant::now();
            let mut wait = Duration::ZERO;
            let mut restart = Vec::new();
            for id in &dead {
                on(HealEvent::Down(id.clone()));
                for (router, worker) in routed.get(id).into_iter().flatten() {
                    let router = resolve(router);
                    let worker = resolve(worker);
                    let url = format!("{router}/remove_worker");
                    if http
                        .post(&url)
                        .query(&[("url", worker.as_str())])
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                    {
                        on(HealEvent::Detached {
                            task: id.clone(),
                            router,
                        });
                    }
                }
                let seen = deaths.entry(id.clone()).or_default();
                seen.push_back(now);
                while seen
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > policy.window)
                {
                    seen.pop_front();
                }
                if seen.len() > policy.budget as usize {
                    given_up.insert(id.clone());
                    on(HealEvent::GaveUp {
                        task: id.clone(),
                        deaths: seen.len(),
                        policy: policy.clone(),
                    });
                    continue;
                }
                let exp = (seen.len().saturating_sub(1)).min(16) as u32;
                wait = wait.max(
                    policy
                        .backoff
                        .saturating_mul(2u32.saturating_pow(exp))
                        .min(policy.max_backoff),
                );
                restart.push(id.clone());
            }
            if restart.is_empty() {
                continue;
            }
            on(HealEvent::Restarting {
                tasks: restart.clone(),
                wait,
            });
            tokio::select! {
                () = &mut stop => return WatchEnd::Signalled,
                () = tokio::time::sleep(wait) => {}
            }
            // A `down` elsewhere (whose stops may be what looked like deaths) is not undone:
            // what it stopped is not restarted, and once all is stopped the watch ends.
            if let Ok(now) = journal::load(dir) {
                if all_stopped(&now) {
                    return WatchEnd::StoppedElsewhere;
                }
                restart.retain(|id| !now.get(id).is_some_and(|r| r.status == Status::Stopped));
                if restart.is_empty() {
                    continue;
                }
            }
            let settings = RunSettings {
                state_dir: Some(dir.to_path_buf()),
                resume: true,
                // A restart that fails leaves everything else as it is.
                keep: true,
                hold: given_up.clone(),
                holder: format!("prl-flow (restarting {})", restart.join(", ")),
                ..RunSettings::default()
            };
            let prepared = match self.prepare(loaded, &settings).await {
                Ok(p) => p,
                Err(e) => {
                    on(HealEvent::RestartFailed(error_text(&e)));
                    retrying.extend(restart);
                    continue;
                }
            };
            match prepared
                .execute(subs(), prl_flow_engine::Cancel::never())
                .await
            {
                Ok(ran) if ran.report.ok() => {
                    for id in &restart {
                        retrying.remove(id);
                    }
                    on(HealEvent::Restarted(restart))
                }
                Ok(ran) => {
                    retrying.extend(restart.iter().cloned());
                    let why: Vec<String> = ran
                        .report
                        .errors
                        .iter()
                        .flatten()
                        .map(|e| e.message.clone())
                        .collect();
                    on(HealEvent::RestartFailed(why.join("; ")))
                }
                Err(e) => {
                    retrying.extend(restart.iter().cloned());
                    on(HealEvent::RestartFailed(error_text(&e)))
                }
            }
        }
    }
}

/// A session error as one line.
fn error_text(e: &super::Error) -> String {
    match e {
        super::Error::Usage(m) | super::Error::Failed(m) => m.lines().next().unwrap_or("").into(),
        super::Error::Problems(p) => p.render(false),
        super::Error::LiveServices { ids, .. } => {
            format!("still running: {}", super::Live::joined(ids))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(id: &str, status: Status) -> (String, Record) {
        let mut r = prl_flow_engine::testing::record(id, status, "1");
        r.service = true;
        (id.to_string(), r)
    }

    /// A service that had failed before the healer began (a failed run, torn down) is not
    /// restarted: `watch` must not bring back a deployment that is down. One whose restart
    /// by this healer failed is looked at again.
    #[tokio::test]
    async fn only_a_failed_restart_of_its_own_counts_as_dead() {
        let backend = prl_flow_local::LocalBackend::new();
        let records: BTreeMap<String, Record> = [
            service("failed-before", Status::Failed),
            service("restart-failed", Status::Failed),
            service("stopped", Status::Stopped),
        ]
        .into_iter()
        .collect();
        let retrying: BTreeSet<String> = ["restart-failed".to_string()].into();
        assert_eq!(
            dead_services(&backend, &records, &retrying).await,
            ["restart-failed"]
        );
        assert!(dead_services(&backend, &records, &BTreeSet::new())
            .await
            .is_empty());
    }

    /// "Stopped elsewhere" needs something stopped: a journal whose services have no
    /// handle (a restart that failed before its spawn) is not a `down`.
    #[test]
    fn all_stopped_needs_a_stopped_service() {
        let mut records: BTreeMap<String, Record> =
            [service("web", Status::Failed)].into_iter().collect();
        assert!(!all_stopped(&records));
        let web = records.get_mut("web").expect("web");
        web.status = Status::Stopped;
        web.handle = Some(serde_json::json!({}));
        assert!(all_stopped(&records));
    }
}
