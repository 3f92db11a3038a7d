//! The scheduler's tests, on in-memory tasks.
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::event::{Decision, Reason, Sink};
use crate::graph::{Graph, GraphBuilder};
use crate::record::{Record, Status};
use crate::task::{Cancel, CancelSource, Check, Policy};
use crate::testing::{record, Behaviour, FakeTask, Trace};

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

/// A resume with `decisions` over the records `prev`, with the default options.
async fn resume(s: &Setup, decisions: &[Decision], prev: &BTreeMap<String, Record>) -> Report {
    run(
        &s.graph,
        decisions,
        Some(prev),
        &RunOptions::default(),
        Sink::none(),
        Cancel::never(),
    )
    .await
}

fn find(trace: &Trace, what: &str) -> Option<usize> {
    trace.lock().expect("trace").iter().position(|e| e == what)
}

/// Where `what` is in the trace, for comparing the order of events. Panics if it is not
/// there: `Option`s compared with `<` would call a missing event (`None`) earlier than any
/// other, and the comparison would pass.
fn pos(trace: &Trace, what: &str) -> usize {
    find(trace, what).unwrap_or_else(|| {
        let trace = trace.lock().expect("trace");
        panic!("`{what}` is not in the trace {trace:?}")
    })
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
    let r = go(&s, RunOptions::default()).await;
    assert!(r.ok());
    assert_eq!(r.outcomes, [Some(Outcome::Done); 3]);
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
    let r = go(
        &s,
        RunOptions {
            jobs: 2,
            ..Default::default()
        },
    )
    .await;
    assert!(r.ok());
    assert_eq!(r.summary.done, 6);
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
        assert_eq!(
            r.outcomes,
            [
                Some(Outcome::Done),
                Some(Outcome::Done),
                Some(Outcome::Failed)
            ]
        );
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
        find(&s.trace, "end:stuck").is_some(),
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
        while find(&s.trace, "start:long").is_none() {
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

/// Per-edge rules: a router kept across an engine's re-run while its registration re-runs;
/// a router whose edge says it must restart, with the reason.
#[tokio::test]
async fn an_edge_says_whether_a_rerun_upstream_reruns_downstream() {
    let s = setup(vec![
        FakeTask::new("engine", &[])
            .check(Check::Invalid("gone".into()))
            .service(),
        FakeTask::new("router", &["engine"])
            .service()
            .keep_on("engine"),
        FakeTask::new("register", &["router", "engine"]),
        FakeTask::new("pd-router", &["engine"])
            .service()
            .rerun_on("engine", "P/D lists are fixed"),
        FakeTask::new("after", &["router"]),
    ]);
    let prev: BTreeMap<String, Record> = ["engine", "router", "register", "pd-router", "after"]
        .into_iter()
        .map(|id| record(id, Status::Done, "1"))
        .map(|r| (r.id.clone(), r))
        .collect();
    let d = decide(&s.graph, Some(&prev)).await;
    assert_eq!(d[0], Decision::Run(Reason::NoLongerAlive("gone".into())));
    assert_eq!(d[1], Decision::Keep, "the router stays");
    assert_eq!(d[2], Decision::Run(Reason::UpstreamReRan("engine".into())));
    assert_eq!(
        d[3],
        Decision::Run(Reason::UpstreamReRanBecause(
            "engine".into(),
            "P/D lists are fixed".into()
        ))
    );
    assert_eq!(d[4], Decision::Keep, "nothing reaches past a kept task");
    // And the run: the engine and what its edges re-run run; the kept ones wait for nothing.
    let r = resume(&s, &d, &prev).await;
    assert!(r.ok());
    let runs: Vec<u32> = s
        .tasks
        .iter()
        .map(|t| t.runs.load(Ordering::SeqCst))
        .collect();
    assert_eq!(runs, [1, 0, 1, 1, 0]);
}

/// With `keep`, a service still waiting to be ready when another task fails is left as it
/// is: not told to stop, not undone, not finished (its record stays running), and counted.
#[tokio::test]
async fn abort_with_keep_leaves_services_still_waiting_to_be_ready() {
    let s = setup(vec![
        FakeTask::new("bad", &[]).behaviour(Behaviour::Fail),
        FakeTask::new("svc", &[])
            .service()
            .behaviour(Behaviour::Hang),
        FakeTask::new("after", &["svc"]),
    ]);
    let r = go(
        &s,
        RunOptions {
            keep: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.outcomes[1], None, "{:?}", r.outcomes);
    assert_eq!(r.outcomes[2], Some(Outcome::Skipped));
    assert_eq!(r.summary.left, 1);
    assert!(!r.ok());
    assert_eq!(s.tasks[1].undos.load(Ordering::SeqCst), 0);
    assert!(find(&s.trace, "end:svc").is_none(), "{:?}", s.trace);
}

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
    let r = resume(&s, &d, &prev).await;
    assert!(r.ok());
    assert_eq!(r.summary.kept, 1);
    assert_eq!(s.tasks[0].runs.load(Ordering::SeqCst), 0);
    assert_eq!(s.tasks[4].runs.load(Ordering::SeqCst), 1);
}

/// A subscriber that can no longer keep its promise from the `Started` of `at` on, as a
/// journal that cannot be written.
struct BreaksAt {
    at: &'static str,
    broken: std::sync::Mutex<Option<String>>,
}

impl crate::event::Subscriber for BreaksAt {
    fn on_event(&self, event: &crate::event::Event) {
        if let crate::event::Event::Started { id, .. } = event {
            if &**id == self.at {
                *self.broken.lock().expect("lock") = Some("disk full".into());
            }
        }
    }
    fn broken(&self) -> Option<String> {
        self.broken.lock().expect("lock").clone()
    }
}

#[tokio::test]
async fn a_broken_subscriber_stops_the_run_before_the_unrecorded_start() {
    let s = setup(vec![
        FakeTask::new("svc", &[]).service(),
        FakeTask::new("a", &["svc"]).behaviour(Behaviour::Hang),
        FakeTask::new("b", &["svc"]),
        FakeTask::new("c", &["b"]),
    ]);
    let sink = Sink::new(vec![Arc::new(BreaksAt {
        at: "b",
        broken: Default::default(),
    })]);
    let d = decide(&s.graph, None).await;
    // `keep` would leave services running: not when the journal cannot find them later.
    let opts = RunOptions {
        keep: true,
        ..RunOptions::default()
    };
    let r = run(&s.graph, &d, None, &opts, sink, Cancel::never()).await;
    assert_eq!(r.broken.as_deref(), Some("disk full"));
    assert!(!r.ok());
    assert_eq!(
        s.tasks[2].runs.load(Ordering::SeqCst),
        0,
        "b's start was not recorded"
    );
    assert_eq!(
        s.tasks[3].runs.load(Ordering::SeqCst),
        0,
        "nothing starts after"
    );
    assert_eq!(r.outcomes[3], Some(Outcome::Skipped));
    // `a` (running, or never started) ended: the run did not hang on it.
    assert_ne!(r.outcomes[1], Some(Outcome::Done));
    assert_eq!(
        s.tasks[0].undos.load(Ordering::SeqCst),
        1,
        "svc was stopped"
    );
}

/// Notes in the tasks' trace each start it hears of and each commit.
struct Committer {
    trace: Trace,
}

impl crate::event::Subscriber for Committer {
    fn on_event(&self, event: &crate::event::Event) {
        if let crate::event::Event::Started { id, attempt, .. } = event {
            self.trace
                .lock()
                .expect("trace")
                .push(format!("started:{id}#{attempt}"));
        }
    }
    fn commit(&self) {
        self.trace.lock().expect("trace").push("commit".into());
    }
}

#[tokio::test]
async fn every_start_is_committed_before_its_task_runs() {
    let s = setup(vec![
        FakeTask::new("a", &[]),
        FakeTask::new("b", &[]),
        FakeTask::new("c", &["a", "b"]),
        // Retried once: the second attempt's start is committed too.
        FakeTask::new("d", &["a"])
            .behaviour(Behaviour::FailTimes(1))
            .policy(Policy {
                retries: 1,
                ..Policy::default()
            }),
        FakeTask::new("e", &["c", "d"]),
    ]);
    let sink = Sink::new(vec![Arc::new(Committer {
        trace: s.trace.clone(),
    })]);
    let d = decide(&s.graph, None).await;
    let r = run(
        &s.graph,
        &d,
        None,
        &RunOptions::default(),
        sink,
        Cancel::never(),
    )
    .await;
    assert!(r.ok(), "{:?}", r.summary);
    let trace = s.trace.lock().expect("trace").clone();
    // Each run of a task (`start:ID`, noted by the task itself) comes after its start was
    // announced and after a commit that followed that announcement.
    let mut runs = 0;
    for (at, e) in trace.iter().enumerate() {
        let Some(id) = e.strip_prefix("start:") else {
            continue;
        };
        runs += 1;
        let n = trace[..at].iter().filter(|x| *x == e).count() + 1;
        let started = trace[..at]
            .iter()
            .rposition(|x| *x == format!("started:{id}#{n}"))
            .unwrap_or_else(|| panic!("run {n} of `{id}` was never announced: {trace:?}"));
        assert!(
            trace[started..at].iter().any(|x| x == "commit"),
            "run {n} of `{id}` began before its start was committed: {trace:?}"
        );
    }
    assert_eq!(runs, 6, "{trace:?}");
}

/// A re-run first stops what the earlier run left; when that stop fails, what it left may
/// still run, and the task is not started a second time beside it.
#[tokio::test]
async fn a_rerun_whose_leftover_cannot_be_stopped_starts_nothing_beside_it() {
    let s = setup(vec![
        FakeTask::new("engine", &[])
            .check(Check::Invalid("no longer ready".into()))
            .service()
            .undo_fails(),
        FakeTask::new("after", &["engine"]),
    ]);
    let mut engine = record("engine", Status::Done, "1");
    engine.service = true;
    engine.handle = Some(serde_json::json!({ "fake": "engine" }));
    let prev: BTreeMap<String, Record> = [(engine.id.clone(), engine)].into_iter().collect();
    let d = decide(&s.graph, Some(&prev)).await;
    let r = resume(&s, &d, &prev).await;
    assert_eq!(s.tasks[0].undos.load(Ordering::SeqCst), 1);
    assert_eq!(
        s.tasks[0].runs.load(Ordering::SeqCst),
        0,
        "started beside it"
    );
    assert_eq!(r.outcomes[0], Some(Outcome::Failed));
    let why = &r.errors[0].as_ref().expect("an error").message;
    assert!(
        why.contains("could not be stopped") && why.contains("cannot reach engine"),
        "{why}"
    );
}

/// A failed run's teardown that cannot stop a service says so in the report, which the
/// command line turns into what is left running.
#[tokio::test]
async fn a_service_the_teardown_cannot_stop_is_in_the_report() {
    let s = setup(vec![
        FakeTask::new("db", &[]).service().undo_fails(),
        FakeTask::new("web", &["db"]).service(),
        FakeTask::new("bad", &["web"]).behaviour(Behaviour::Fail),
    ]);
    let r = go(&s, RunOptions::default()).await;
    assert!(!r.ok());
    assert_eq!(
        r.unstopped,
        [("db".to_string(), "cannot reach db".to_string())]
    );
    assert_eq!(s.tasks[1].undos.load(Ordering::SeqCst), 1);
}
