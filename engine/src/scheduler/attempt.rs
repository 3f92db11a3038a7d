//! One task's turn in a run: its attempts, with the timeout, cancel and abort signals, the
//! retries and their backoff.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fmt_duration;
use crate::event::{Event, Outcome, Sink};
use crate::record::{Handle, TaskError};
use crate::task::{Cancel, CancelSource, Done, Task, TaskContext};

/// A task's turn, borrowing the task from the graph for the run (no reference count to
/// touch per start).
pub(super) type TaskFuture<'g> = Pin<Box<dyn Future<Output = Finish> + Send + 'g>>;

pub(super) struct Finish {
    pub(super) index: usize,
    pub(super) outcome: Outcome,
    pub(super) done: Option<Done>,
    pub(super) error: Option<TaskError>,
    pub(super) duration: Duration,
    /// A service still loading, left running on abort (`keep`): not finished, its record
    /// stays `running` with its handle, for a resume to adopt.
    pub(super) left: bool,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn start<'g>(
    task: &'g dyn Task,
    index: usize,
    id: Arc<str>,
    adopt: bool,
    prior: Option<Handle>,
    sink: Sink,
    cancel: Cancel,
    abort: Cancel,
    keep: bool,
) -> TaskFuture<'g> {
    // The first attempt's start is announced now, before the future runs, so that the
    // scheduler commits the starts of a whole batch at once (one journal write) before
    // any of them runs. Not when an earlier run's leftover must be stopped first: its
    // record must keep naming it until then.
    let first_at = (adopt || prior.is_none()).then(|| {
        let at_ms = crate::record::now_ms();
        sink.emit(&Event::Started {
            index,
            id: id.clone(),
            attempt: 1,
            adopted: adopt,
            at_ms,
        });
        at_ms
    });
    Box::pin(async move {
        let began = Instant::now();
        let policy = task.policy();
        let service = task.is_service();
        // A re-run replaces what an earlier run left behind: stop that first. What cannot
        // be stopped may still run, so nothing is started beside it; its record (not
        // started again) keeps naming it.
        if !adopt {
            if let Some(h) = &prior {
                if let Err(e) = task.undo(h).await {
                    return Finish {
                        index,
                        outcome: Outcome::Failed,
                        done: None,
                        error: Some(TaskError::new(format!(
                            "what an earlier run started of `{id}` could not be stopped, so \
                             nothing was started beside it: {}",
                            e.message
                        ))),
                        duration: began.elapsed(),
                        left: false,
                    };
                }
            }
        }
        let mut attempt = 1;
        loop {
            let at_ms = match first_at {
                Some(at_ms) if attempt == 1 => at_ms,
                _ => {
                    let at_ms = crate::record::now_ms();
                    sink.emit(&Event::Started {
                        index,
                        id: id.clone(),
                        attempt,
                        adopted: adopt && attempt == 1,
                        at_ms,
                    });
                    sink.commit();
                    at_ms
                }
            };
            // The start could not be recorded (the journal cannot be written): it is not
            // made, since no later prl-flow could find what it would start.
            if let Some(why) = sink.broken() {
                return Finish {
                    index,
                    outcome: Outcome::Cancelled,
                    done: None,
                    error: Some(TaskError::new(format!("`{id}` was not started: {why}"))),
                    duration: began.elapsed(),
                    left: false,
                };
            }
            let stop = CancelSource::new();
            let cx = TaskContext {
                index,
                id: id.clone(),
                attempt,
                started_ms: at_ms,
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
                // `biased`: no random draw per poll, and the work's own end comes first.
                tokio::select! {
                    biased;
                    r = &mut work => (r, None),
                    () = deadline => { stop.fire(); (work.await, Some(Outcome::TimedOut)) }
                    () = cancel.cancelled() => { stop.fire(); (work.await, Some(Outcome::Cancelled)) }
                    () = aborted => {
                        // `keep`: a loading service stays, unless the journal may not
                        // hold its handle.
                        if keep && sink.broken().is_none() {
                            return Finish {
                                index,
                                outcome: Outcome::Cancelled,
                                done: None,
                                error: None,
                                duration: began.elapsed(),
                                left: true,
                            };
                        }
                        stop.fire();
                        (work.await, Some(Outcome::Cancelled))
                    }
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
                    left: false,
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
                        left: false,
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
