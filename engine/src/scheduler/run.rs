//! The run loop: a count of unfinished dependencies per task, a ready queue, at most `jobs`
//! attempts in flight, and the abort, cancel and undo rules.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;

use super::attempt::{start, TaskFuture};
use super::{Report, RunOptions};
use crate::event::{Decision, Event, Outcome, Sink, Summary};
use crate::graph::Graph;
use crate::record::{Handle, Record, TaskError};
use crate::task::{Cancel, CancelSource};

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Finished,
}

/// Runs `graph`. `decisions` comes from [`decide`](crate::decide); `previous` gives the
/// handles of earlier results that a re-run must undo first. `cancel` is fired on Ctrl-C or
/// SIGTERM.
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
    // What tasks hear as their cancel: the caller's, or a broken subscriber (the journal).
    let halt = CancelSource::new();
    let mut aborted = false;
    let mut cancelled = false;
    let mut broken: Option<String> = None;
    let mut finish_order: Vec<usize> = Vec::new();
    let mut in_flight: FuturesUnordered<TaskFuture> = FuturesUnordered::new();
    // A task that has finished already, taken in before more start.
    let mut next: Option<super::attempt::Finish> = None;
    let jobs = options.jobs.max(1);
    let mut cancel_wait: Pin<Box<dyn Future<Output = ()> + Send>> = {
        let c = cancel.clone();
        Box::pin(async move { c.cancelled().await })
    };
    let mut broken_wait: Pin<Box<dyn Future<Output = ()> + Send>> = {
        let s = sink.clone();
        Box::pin(async move { s.on_broken().await })
    };

    loop {
        if !cancelled && cancel.is_cancelled() {
            cancelled = true;
            halt.fire();
            sink.emit(&Event::Cancelling);
        }
        note_broken(&sink, &mut broken, &halt);
        // Start more only once every finished task is taken in (`next`), so that a batch of
        // starts is as large as can be: its `Started` events are committed at once.
        if next.is_none() && !aborted && !cancelled && broken.is_none() {
            while in_flight.len() < jobs {
                let Some(i) = ready.pop_front() else { break };
                state[i] = State::Running;
                tracing::debug!(task = %ids[i], decision = %decisions[i], "starting");
                let prior = previous
                    .and_then(|p| p.get(graph.task(i).id()))
                    .and_then(|r| r.handle.clone());
                in_flight.push(start(
                    &**graph.task(i),
                    i,
                    ids[i].clone(),
                    decisions[i] == Decision::Adopt,
                    prior,
                    sink.clone(),
                    halt.token(),
                    abort.token(),
                    options.keep,
                ));
            }
            // Before any of the batch runs: their starts are on file (or the journal is
            // broken, and each of them sees that before doing anything).
            sink.commit();
        }
        let fin = match next.take() {
            Some(f) => f,
            None if in_flight.is_empty() => break,
            None => tokio::select! {
                biased;
                Some(f) = in_flight.next() => f,
                () = &mut cancel_wait, if !cancelled => continue,
                () = &mut broken_wait, if broken.is_none() => continue,
            },
        };
        // Its start may be what broke the journal: then that, not its failure, stops the run.
        note_broken(&sink, &mut broken, &halt);
        let i = fin.index;
        if fin.left {
            // Left loading (`keep`): no end is recorded; its record keeps its handle.
            state[i] = State::Finished;
            summary.left += 1;
            sink.emit(&Event::Output {
                id: ids[i].clone(),
                line: "left running while it loads (--keep); a resume adopts it".into(),
            });
            continue;
        }
        tracing::debug!(task = %ids[i], outcome = fin.outcome.as_str(), took = ?fin.duration, "finished");
        state[i] = State::Finished;
        outcomes[i] = Some(fin.outcome);
        let handle = fin.done.as_ref().and_then(|d| d.handle.clone());
        // Only a service is undone at teardown: a one-shot's handle goes to the journal
        // alone, not also into this table for the rest of the run.
        if graph.task(i).is_service() {
            handles[i] = handle
                .clone()
                .or_else(|| fin.error.as_ref().and_then(|e| e.handle.clone()));
        }
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
                    // A kept dependent (its edge from this task keeps it) waits for nothing.
                    if state[d] != State::Waiting {
                        continue;
                    }
                    remaining[d] -= 1;
                    if remaining[d] == 0 {
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
                if !options.keep_going && !aborted && !cancelled && broken.is_none() {
                    aborted = true;
                    abort.fire();
                    sink.emit(&Event::Aborting { id: ids[i].clone() });
                }
            }
        }
        next = in_flight.next().now_or_never().flatten();
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

    // A broken journal may not hold these services' handles: `--keep` would leave them
    // where no later prl-flow finds them, so they are stopped whatever `keep` says.
    let failed = !summary.ok() || cancelled || broken.is_some();
    let mut unstopped = Vec::new();
    if failed && (!options.keep || broken.is_some()) {
        for &i in finish_order.iter().rev() {
            let task = graph.task(i);
            if !task.is_service() {
                continue;
            }
            if let Some(h) = handles[i].take() {
                let error = task.undo(&h).await.err().map(|e| e.message);
                if let Some(why) = &error {
                    unstopped.push((ids[i].to_string(), why.clone()));
                }
                sink.emit(&Event::Undone {
                    index: i,
                    id: ids[i].clone(),
                    error,
                });
            }
        }
    }

    // What a task itself could not stop (a one-shot cancelled or timed out, a service
    // that failed while loading) may still run too.
    for (i, e) in errors.iter().enumerate() {
        if let Some(e) = e.as_ref().filter(|e| e.still_running) {
            if !unstopped.iter().any(|(id, _)| **id == *ids[i]) {
                unstopped.push((ids[i].to_string(), e.message.clone()));
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
        broken,
        unstopped,
    }
}

/// Once a subscriber is broken, nothing more may start, and what runs must stop: a later
/// prl-flow could not rely on the journal to find it.
fn note_broken(sink: &Sink, broken: &mut Option<String>, halt: &CancelSource) {
    if broken.is_none() {
        if let Some(why) = sink.broken() {
            tracing::debug!(%why, "a subscriber is broken: stopping the run");
            *broken = Some(why);
            halt.fire();
        }
    }
}
