//! The scheduler: runs a sealed graph, each task the moment its dependencies are done.
//!
//! # How it works
//!
//! First, [`decide`] says for every task whether it runs, is kept from an earlier run, or is
//! adopted (an earlier, killed run left it in flight). It walks the graph in topological
//! order, so a task re-runs whenever something it needs re-runs. Only services recorded as
//! done and tasks recorded as running are `check`ed, all at once.
//!
//! Then [`run`] keeps, like cargo's `DependencyQueue`, a count of unfinished dependencies per
//! task. Tasks at zero wait in a ready queue; at most `jobs` run at a time, as futures polled
//! by the scheduler's own task (no thread hop per task). When one finishes, its dependents'
//! counts drop and those at zero become ready. There are no levels and no barriers.
//!
//! Two ways a run stops early, kept apart (moon's *abort* and *cancel*):
//! - **abort**: a task failed and `keep_going` is off. Nothing new starts; one-shots already
//!   running finish; services still waiting to be ready are told to stop.
//! - **cancel**: a signal arrived. Nothing new starts, and every running task is told to stop.
//!
//! Telling a task to stop fires its [`Cancel`]; the scheduler then goes on awaiting the task,
//! which forwards the signal to its process and returns when the process is gone. A future
//! is never simply dropped while its child runs. Timeouts work the same way.
//!
//! A run that fails or is cancelled then undoes, in reverse order, the services it started
//! itself, unless `keep` is set. Services kept from an earlier run are left alone.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};

use crate::event::{Decision, Event, Outcome, Reason, Sink, Summary};
use crate::graph::Graph;
use crate::journal::{Record, Status};
use crate::task::{Cancel, CancelSource, Check, Done, Handle, Task, TaskContext, TaskError};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// At most this many tasks at once (at least 1).
    pub jobs: usize,
    /// After a failure, go on with everything that does not depend on it.
    pub keep_going: bool,
    /// On failure or cancel, leave the services this run started running.
    pub keep: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            jobs: 8,
            keep_going: false,
            keep: false,
        }
    }
}

/// What became of each task, and the counts.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: Summary,
    /// Per task index: `None` if kept from an earlier run.
    pub outcomes: Vec<Option<Outcome>>,
    /// Per task index: the last error, if it failed.
    pub errors: Vec<Option<TaskError>>,
    pub cancelled: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.summary.ok() && !self.cancelled
    }
}

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
        let upstream = graph
            .deps(i)
            .iter()
            .find(|&&d| matches!(out[d], Decision::Run(_)))
            .map(|&d| graph.task(d).id().to_string());
        out[i] = match rec {
            None => Decision::Run(Reason::NeverRan),
            Some(r) => match r.status {
                Status::Failed | Status::TimedOut => Decision::Run(Reason::Failed),
                Status::Cancelled => Decision::Run(Reason::Interrupted),
                Status::Skipped => Decision::Run(Reason::NeverRan),
                Status::Stopped => Decision::Run(Reason::NoLongerAlive("stopped".into())),
                _ if r.fingerprint != task.fingerprint() => Decision::Run(Reason::Changed),
                _ if upstream.is_some() => {
                    Decision::Run(Reason::UpstreamReRan(upstream.unwrap_or_default()))
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Finished,
}

type TaskFuture = Pin<Box<dyn Future<Output = Finish> + Send>>;

struct Finish {
    index: usize,
    outcome: Outcome,
    done: Option<Done>,
    error: Option<TaskError>,
    duration: Duration,
}

/// Runs `graph`. `decisions` comes from [`decide`]; `previous` gives the handles of earlier
/// results that a re-run must undo first. `cancel` is fired on Ctrl-C or SIGTERM.
pub async fn run(
    graph: &Graph,
    decisions: &[Decision],
    previous: Option<&BTreeMap<String, Record>>,
    options: &RunOptions,
    sink: Sink,
    cancel: Cancel,
) -> Report {
    let started = Instant::now();
    let n = graph.len();
    let ids: Vec<Arc<str>> = graph.tasks().iter().map(|t| Arc::from(t.id())).collect();
    sink.emit(&Event::Planned {
        decisions: Arc::new(
            graph
                .topo()
                .iter()
                .map(|&i| (ids[i].clone(), decisions[i].clone()))
                .collect(),
        ),
    });

    let mut state = vec![State::Waiting; n];
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut errors: Vec<Option<TaskError>> = vec![None; n];
    let mut handles: Vec<Option<Handle>> = vec![None; n];
    let mut remaining: Vec<usize> = vec![0; n];
    let mut summary = Summary::default();
    let mut ready: VecDeque<usize> = VecDeque::new();

    for &i in graph.topo() {
        if decisions[i] == Decision::Keep {
            state[i] = State::Finished;
            summary.kept += 1;
        }
    }
    for &i in graph.topo() {
        if state[i] == State::Finished {
            continue;
        }
        remaining[i] = graph
            .deps(i)
            .iter()
            .filter(|&&d| state[d] != State::Finished)
            .count();
        if remaining[i] == 0 {
            ready.push_back(i);
        }
    }

    let abort = CancelSource::new();
    let mut aborted = false;
    let mut cancelled = false;
    let mut finish_order: Vec<usize> = Vec::new();
    let mut in_flight: FuturesUnordered<TaskFuture> = FuturesUnordered::new();
    let jobs = options.jobs.max(1);
    let mut cancel_wait: Pin<Box<dyn Future<Output = ()> + Send>> = {
        let c = cancel.clone();
        Box::pin(async move { c.cancelled().await })
    };

    loop {
        if !cancelled && cancel.is_cancelled() {
            cancelled = true;
            sink.emit(&Event::Cancelling);
        }
        if !aborted && !cancelled {
            while in_flight.len() < jobs {
                let Some(i) = ready.pop_front() else { break };
                state[i] = State::Running;
                tracing::debug!(task = %ids[i], decision = %decisions[i], "starting");
                let prior = previous
                    .and_then(|p| p.get(graph.task(i).id()))
                    .and_then(|r| r.handle.clone());
                in_flight.push(start(
                    graph.task(i).clone(),
                    i,
                    ids[i].clone(),
                    decisions[i] == Decision::Adopt,
                    prior,
                    sink.clone(),
                    cancel.clone(),
                    abort.token(),
                ));
            }
        }
        if in_flight.is_empty() {
            break;
        }
        let fin = tokio::select! {
            biased;
            Some(f) = in_flight.next() => f,
            () = &mut cancel_wait, if !cancelled => continue,
        };
        let i = fin.index;
        tracing::debug!(task = %ids[i], outcome = fin.outcome.as_str(), took = ?fin.duration, "finished");
        state[i] = State::Finished;
        outcomes[i] = Some(fin.outcome);
        let handle = fin.done.as_ref().and_then(|d| d.handle.clone());
        handles[i] = handle
            .clone()
            .or_else(|| fin.error.as_ref().and_then(|e| e.handle.clone()));
        sink.emit(&Event::Finished {
            index: i,
            id: ids[i].clone(),
            outcome: fin.outcome,
            duration: fin.duration,
            handle,
            error: fin.error.clone(),
        });
        errors[i] = fin.error;
        match fin.outcome {
            Outcome::Done => {
                summary.done += 1;
                finish_order.push(i);
                for &d in graph.dependents(i) {
                    remaining[d] -= 1;
                    if remaining[d] == 0 && state[d] == State::Waiting {
                        ready.push_back(d);
                    }
                }
            }
            other => {
                match other {
                    Outcome::Failed => summary.failed += 1,
                    Outcome::TimedOut => summary.timed_out += 1,
                    _ => summary.cancelled += 1,
                }
                if handles[i].is_some() {
                    finish_order.push(i);
                }
                // Whatever needs this task can never run.
                for d in graph.descendants(graph.dependents(i)) {
                    if state[d] == State::Waiting {
                        state[d] = State::Finished;
                        outcomes[d] = Some(Outcome::Skipped);
                        summary.skipped += 1;
                        sink.emit(&Event::Finished {
                            index: d,
                            id: ids[d].clone(),
                            outcome: Outcome::Skipped,
                            duration: Duration::ZERO,
                            handle: None,
                            error: None,
                        });
                    }
                }
                ready.retain(|&r| state[r] == State::Waiting);
                if !options.keep_going && !aborted && !cancelled {
                    aborted = true;
                    abort.fire();
                    sink.emit(&Event::Aborting { id: ids[i].clone() });
                }
            }
        }
    }

    // Anything that never got to start.
    for &i in graph.topo() {
        if state[i] == State::Waiting {
            outcomes[i] = Some(Outcome::Skipped);
            summary.skipped += 1;
            sink.emit(&Event::Finished {
                index: i,
                id: ids[i].clone(),
                outcome: Outcome::Skipped,
                duration: Duration::ZERO,
                handle: None,
                error: None,
            });
        }
    }

    let failed = !summary.ok() || cancelled;
    if failed && !options.keep {
        for &i in finish_order.iter().rev() {
            let task = graph.task(i);
            if !task.is_service() {
                continue;
            }
            if let Some(h) = handles[i].take() {
                let error = task.undo(&h).await.err().map(|e| e.message);
                sink.emit(&Event::Undone {
                    index: i,
                    id: ids[i].clone(),
                    error,
                });
            }
        }
    }

    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    sink.emit(&Event::RunFinished {
        summary: summary.clone(),
    });
    Report {
        summary,
        outcomes,
        errors,
        cancelled,
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    task: Arc<dyn Task>,
    index: usize,
    id: Arc<str>,
    adopt: bool,
    prior: Option<Handle>,
    sink: Sink,
    cancel: Cancel,
    abort: Cancel,
) -> TaskFuture {
    Box::pin(async move {
        let began = Instant::now();
        let policy = task.policy();
        let service = task.is_service();
        // A re-run replaces what an earlier run left behind: stop that first.
        if !adopt {
            if let Some(h) = &prior {
                let _ = task.undo(h).await;
            }
        }
        let mut attempt = 1;
        loop {
            sink.emit(&Event::Started {
                index,
                id: id.clone(),
                attempt,
                adopted: adopt && attempt == 1,
            });
            let stop = CancelSource::new();
            let cx = TaskContext {
                index,
                id: id.clone(),
                attempt,
                cancel: stop.token(),
                sink: sink.clone(),
            };
            let (result, why) = {
                let work = async {
                    match (&prior, adopt && attempt == 1) {
                        (Some(h), true) => task.adopt(h, &cx).await,
                        _ => task.run(&cx).await,
                    }
                };
                tokio::pin!(work);
                let deadline = async {
                    match policy.timeout {
                        Some(t) => tokio::time::sleep(t).await,
                        None => std::future::pending().await,
                    }
                };
                let aborted = async {
                    if service {
                        abort.cancelled().await
                    } else {
                        std::future::pending().await
                    }
                };
                tokio::select! {
                    r = &mut work => (r, None),
                    () = deadline => { stop.fire(); (work.await, Some(Outcome::TimedOut)) }
                    () = cancel.cancelled() => { stop.fire(); (work.await, Some(Outcome::Cancelled)) }
                    () = aborted => { stop.fire(); (work.await, Some(Outcome::Cancelled)) }
                }
            };
            let (outcome, done, error) = match (result, why) {
                // Work that finished although it was told to stop did finish.
                (Ok(d), _) => (Outcome::Done, Some(d), None),
                (Err(e), None) => (Outcome::Failed, None, Some(e)),
                (Err(e), Some(Outcome::TimedOut)) => (
                    Outcome::TimedOut,
                    None,
                    Some(TaskError {
                        message: format!("{} ({})", timeout_message(policy.timeout), e.message),
                        ..e
                    }),
                ),
                (Err(e), Some(o)) => (o, None, Some(e)),
            };
            let retry = matches!(outcome, Outcome::Failed | Outcome::TimedOut)
                && attempt <= policy.retries
                && !cancel.is_cancelled()
                && !(service && abort.is_cancelled());
            if !retry {
                return Finish {
                    index,
                    outcome,
                    done,
                    error,
                    duration: began.elapsed(),
                };
            }
            let delay = policy.backoff.saturating_mul(1u32 << (attempt - 1).min(16));
            sink.emit(&Event::Retrying {
                index,
                id: id.clone(),
                attempt,
                error: error.map(|e| e.message).unwrap_or_default(),
                delay,
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => {
                    return Finish {
                        index,
                        outcome: Outcome::Cancelled,
                        done: None,
                        error: Some(TaskError::new("cancelled while waiting to retry")),
                        duration: began.elapsed(),
                    };
                }
            }
            attempt += 1;
        }
    })
}

fn timeout_message(t: Option<Duration>) -> String {
    match t {
        Some(t) => format!("timed out after {}", fmt_duration(t)),
        None => "timed out".into(),
    }
}

/// `90s` → `1m30s`; whole seconds, or milliseconds below a second.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::GraphBuilder;
    use crate::task::Policy;
    use crate::testing::{Behaviour, FakeTask, Trace};
    use std::sync::atomic::Ordering;

    struct Setup {
        tasks: Vec<Arc<FakeTask>>,
        graph: Graph,
        trace: Trace,
    }

    fn setup(specs: Vec<FakeTask>) -> Setup {
        let trace: Trace = Default::default();
        let tasks: Vec<Arc<FakeTask>> = specs
            .into_iter()
            .map(|t| Arc::new(t.trace(&trace)))
            .collect();
        let mut b = GraphBuilder::new();
        for t in &tasks {
            b.add(t.clone());
        }
        Setup {
            graph: b.seal().map_err(|e| format!("{e:?}")).expect("valid graph"),
            tasks,
            trace,
        }
    }

    async fn go(s: &Setup, opts: RunOptions) -> Report {
        let d = decide(&s.graph, None).await;
        run(&s.graph, &d, None, &opts, Sink::none(), Cancel::never()).await
    }

    fn pos(trace: &Trace, what: &str) -> Option<usize> {
        trace.lock().expect("trace").iter().position(|e| e == what)
    }

    #[tokio::test]
    async fn runs_in_dependency_order() {
        let s = setup(vec![
            FakeTask::new("c", &["a", "b"]),
            FakeTask::new("a", &[]),
            FakeTask::new("b", &["a"]),
        ]);
        let r = go(&s, RunOptions::default()).await;
        assert!(r.ok());
        assert_eq!(r.summary.done, 3);
        assert!(pos(&s.trace, "end:a") < pos(&s.trace, "start:b"));
        assert!(pos(&s.trace, "end:b") < pos(&s.trace, "start:c"));
    }

    #[tokio::test]
    async fn starts_a_task_when_its_own_deps_finish_not_by_level() {
        // slow and fast are both roots; after_fast needs only fast, so it must start
        // before slow ends.
        let s = setup(vec![
            FakeTask::new("slow", &[]).behaviour(Behaviour::Sleep(Duration::from_millis(300))),
            FakeTask::new("fast", &[]),
            FakeTask::new("after_fast", &["fast"]),
        ]);
        go(&s, RunOptions::default()).await;
        assert!(pos(&s.trace, "start:after_fast") < pos(&s.trace, "end:slow"));
    }

    #[tokio::test]
    async fn jobs_bounds_concurrency() {
        let s = setup(
            (0..6)
                .map(|i| {
                    FakeTask::new(&format!("t{i}"), &[])
                        .behaviour(Behaviour::Sleep(Duration::from_millis(20)))
                })
                .collect(),
        );
        go(
            &s,
            RunOptions {
                jobs: 2,
                ..Default::default()
            },
        )
        .await;
        let trace = s.trace.lock().expect("trace").clone();
        let mut running = 0i32;
        let mut max = 0;
        for e in &trace {
            if e.starts_with("start:") {
                running += 1;
            } else if e.starts_with("end:") {
                running -= 1;
            }
            max = max.max(running);
        }
        assert_eq!(max, 2, "{trace:?}");
    }

    #[tokio::test]
    async fn failure_aborts_new_starts_but_lets_running_oneshots_finish() {
        let s = setup(vec![
            FakeTask::new("bad", &[]).behaviour(Behaviour::Fail),
            FakeTask::new("slow", &[]).behaviour(Behaviour::Sleep(Duration::from_millis(100))),
            FakeTask::new("after_bad", &["bad"]),
            FakeTask::new("after_slow", &["slow"]),
        ]);
        let r = go(
            &s,
            RunOptions {
                jobs: 4,
                ..Default::default()
            },
        )
        .await;
        assert!(!r.ok());
        assert_eq!(r.outcomes[0], Some(Outcome::Failed));
        assert_eq!(r.outcomes[1], Some(Outcome::Done));
        assert_eq!(r.outcomes[2], Some(Outcome::Skipped));
        assert_eq!(r.outcomes[3], Some(Outcome::Skipped));
    }

    #[tokio::test]
    async fn keep_going_runs_everything_not_downstream_of_the_failure() {
        let s = setup(vec![
            FakeTask::new("bad", &[]).behaviour(Behaviour::Fail),
            FakeTask::new("slow", &[]).behaviour(Behaviour::Sleep(Duration::from_millis(50))),
            FakeTask::new("after_bad", &["bad"]),
            FakeTask::new("after_slow", &["slow"]),
        ]);
        let r = go(
            &s,
            RunOptions {
                keep_going: true,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(r.outcomes[2], Some(Outcome::Skipped));
        assert_eq!(r.outcomes[3], Some(Outcome::Done));
    }

    #[tokio::test]
    async fn failed_run_undoes_its_services_in_reverse_unless_keep() {
        for keep in [false, true] {
            let s = setup(vec![
                FakeTask::new("db", &[]).service(),
                FakeTask::new("web", &["db"]).service(),
                FakeTask::new("bad", &["web"]).behaviour(Behaviour::Fail),
            ]);
            let r = go(
                &s,
                RunOptions {
                    keep,
                    ..Default::default()
                },
            )
            .await;
            assert!(!r.ok());
            let undos: Vec<u32> = s
                .tasks
                .iter()
                .map(|t| t.undos.load(Ordering::SeqCst))
                .collect();
            if keep {
                assert_eq!(undos, [0, 0, 0]);
            } else {
                assert_eq!(undos, [1, 1, 0]);
                assert!(pos(&s.trace, "undo:web") < pos(&s.trace, "undo:db"));
            }
        }
    }

    #[tokio::test]
    async fn retries_with_backoff_then_succeeds() {
        let s = setup(vec![FakeTask::new("flaky", &[])
            .behaviour(Behaviour::FailTimes(2))
            .policy(Policy {
                retries: 2,
                backoff: Duration::from_millis(1),
                timeout: None,
            })]);
        let r = go(&s, RunOptions::default()).await;
        assert!(r.ok());
        assert_eq!(s.tasks[0].runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let s = setup(vec![FakeTask::new("flaky", &[])
            .behaviour(Behaviour::FailTimes(5))
            .policy(Policy {
                retries: 1,
                backoff: Duration::from_millis(1),
                timeout: None,
            })]);
        let r = go(&s, RunOptions::default()).await;
        assert_eq!(r.outcomes[0], Some(Outcome::Failed));
        assert_eq!(s.tasks[0].runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn timeout_stops_the_task_and_says_so() {
        let s = setup(vec![FakeTask::new("stuck", &[])
            .behaviour(Behaviour::Hang)
            .policy(Policy {
                timeout: Some(Duration::from_millis(50)),
                ..Default::default()
            })]);
        let r = go(&s, RunOptions::default()).await;
        assert_eq!(r.outcomes[0], Some(Outcome::TimedOut));
        let msg = r.errors[0].as_ref().expect("error").message.clone();
        assert!(msg.starts_with("timed out after 50ms"), "{msg}");
        assert!(
            pos(&s.trace, "end:stuck").is_some(),
            "the task saw its cancel"
        );
    }

    #[tokio::test]
    async fn cancel_stops_running_tasks_and_starts_nothing_new() {
        let s = setup(vec![
            FakeTask::new("svc", &[]).service(),
            FakeTask::new("long", &["svc"]).behaviour(Behaviour::Hang),
            FakeTask::new("after", &["long"]),
        ]);
        let src = CancelSource::new();
        let token = src.token();
        let d = decide(&s.graph, None).await;
        let fire = async {
            // Fire once `long` has started.
            while pos(&s.trace, "start:long").is_none() {
                tokio::task::yield_now().await;
            }
            src.fire();
        };
        let opts = RunOptions::default();
        let (r, ()) = tokio::join!(run(&s.graph, &d, None, &opts, Sink::none(), token), fire);
        assert!(r.cancelled);
        assert_eq!(r.outcomes[1], Some(Outcome::Cancelled));
        assert_eq!(r.outcomes[2], Some(Outcome::Skipped));
        assert_eq!(
            s.tasks[0].undos.load(Ordering::SeqCst),
            1,
            "the service is stopped"
        );
    }

    #[tokio::test]
    async fn abort_stops_services_still_waiting_to_be_ready() {
        let s = setup(vec![
            FakeTask::new("bad", &[]).behaviour(Behaviour::Fail),
            FakeTask::new("svc", &[])
                .service()
                .behaviour(Behaviour::Hang),
        ]);
        let r = go(&s, RunOptions::default()).await;
        assert_eq!(r.outcomes[1], Some(Outcome::Cancelled));
    }

    use crate::testing::record;

    #[tokio::test]
    async fn resume_decisions_say_why() {
        let s = setup(vec![
            FakeTask::new("ok", &[]),
            FakeTask::new("changed", &[]).fingerprint("2"),
            FakeTask::new("down", &["ok"])
                .service()
                .check(Check::Invalid("process 12 is gone".into())),
            FakeTask::new("failed", &[]),
            FakeTask::new("child", &["failed"]),
            FakeTask::new("new", &[]),
            FakeTask::new("inflight", &[]).check(Check::InFlight),
        ]);
        let prev: BTreeMap<String, Record> = [
            record("ok", Status::Done, "1"),
            record("changed", Status::Done, "1"),
            record("down", Status::Done, "1"),
            record("failed", Status::Failed, "1"),
            record("child", Status::Done, "1"),
            record("inflight", Status::Running, "1"),
        ]
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
        let d = decide(&s.graph, Some(&prev)).await;
        assert_eq!(d[0], Decision::Keep);
        assert_eq!(d[1], Decision::Run(Reason::Changed));
        assert_eq!(
            d[2],
            Decision::Run(Reason::NoLongerAlive("process 12 is gone".into()))
        );
        assert_eq!(d[3], Decision::Run(Reason::Failed));
        assert_eq!(d[4], Decision::Run(Reason::UpstreamReRan("failed".into())));
        assert_eq!(d[5], Decision::Run(Reason::NeverRan));
        assert_eq!(d[6], Decision::Adopt);
        let r = run(
            &s.graph,
            &d,
            Some(&prev),
            &RunOptions::default(),
            Sink::none(),
            Cancel::never(),
        )
        .await;
        assert!(r.ok());
        assert_eq!(r.summary.kept, 1);
        assert_eq!(s.tasks[0].runs.load(Ordering::SeqCst), 0);
        assert_eq!(s.tasks[4].runs.load(Ordering::SeqCst), 1);
    }
}
