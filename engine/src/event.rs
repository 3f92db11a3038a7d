//! Events: how the engine tells the world what happens. It never prints.
//!
//! Subscribers are called synchronously, in order, from the scheduler's own task, so they must
//! be quick (hand heavy work to a thread or channel). The journal writer, the progress bars and
//! the plain log are all subscribers.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::record::Outcome;
use crate::record::{Handle, TaskError};

/// Why a task runs this time, or why it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "decision", content = "detail")]
pub enum Decision {
    /// Recorded as done, unchanged and still valid.
    Keep,
    /// Left in flight by an earlier run and still going: wait for it, don't start it again.
    Adopt,
    Run(Reason),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "detail")]
pub enum Reason {
    /// Not resuming: everything runs.
    Fresh,
    NeverRan,
    Failed,
    /// Started by a run that ended before the task finished.
    Interrupted,
    Changed,
    /// Changed, and the detail names why: an option or a file that differs from the last
    /// run's (`--engine: mock → real`).
    ChangedBy(String),
    /// A task it needs re-runs (named).
    UpstreamReRan(String),
    /// A task it needs re-runs (named), and why that edge restarts it (where another task
    /// could have carried the change instead).
    UpstreamReRanBecause(String, String),
    /// Recorded as done, but its check failed (the detail says how).
    NoLongerAlive(String),
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Keep => f.write_str("kept: done, unchanged and still valid"),
            Decision::Adopt => f.write_str("adopted: still in flight from the last run"),
            Decision::Run(r) => write!(f, "runs: {r}"),
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Fresh => f.write_str("fresh run"),
            Reason::NeverRan => f.write_str("never ran"),
            Reason::Failed => f.write_str("failed"),
            Reason::Interrupted => f.write_str("interrupted"),
            Reason::Changed => f.write_str("changed"),
            Reason::ChangedBy(why) => write!(f, "changed ({why})"),
            Reason::UpstreamReRan(up) => write!(f, "upstream re-ran (`{up}`)"),
            Reason::UpstreamReRanBecause(up, why) => write!(f, "upstream re-ran (`{up}`): {why}"),
            Reason::NoLongerAlive(why) => write!(f, "no longer alive ({why})"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The run begins: what will happen to each task, in topological order.
    Planned {
        decisions: Arc<Vec<(Arc<str>, Decision)>>,
    },
    Started {
        index: usize,
        id: Arc<str>,
        attempt: u32,
        adopted: bool,
        /// When the attempt started (ms since the epoch): the journal records this very
        /// value, and a task can hand it to what it starts to name the attempt exactly.
        at_ms: u64,
    },
    /// A process exists now; its handle is known before the task is done.
    Spawned {
        index: usize,
        id: Arc<str>,
        handle: Handle,
        /// What started it finds it again from the start alone, should the handle be lost
        /// ([`TaskContext::started_findable`](crate::TaskContext::started_findable)): the
        /// journal writes the handle with its next batch, not at once.
        findable: bool,
    },
    Output {
        id: Arc<str>,
        line: String,
    },
    Retrying {
        index: usize,
        id: Arc<str>,
        attempt: u32,
        error: String,
        delay: Duration,
    },
    Finished {
        index: usize,
        id: Arc<str>,
        outcome: Outcome,
        duration: Duration,
        handle: Option<Handle>,
        error: Option<TaskError>,
    },
    /// A task stopped by teardown (its `undo` ran).
    Undone {
        index: usize,
        id: Arc<str>,
        error: Option<String>,
    },
    /// A task failed and `keep_going` is off: nothing new starts.
    Aborting {
        id: Arc<str>,
    },
    /// A signal arrived.
    Cancelling,
    RunFinished {
        summary: Summary,
    },
}

/// Counts at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub done: usize,
    pub kept: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub cancelled: usize,
    pub skipped: usize,
    /// Services still loading when a failure aborted a run with `keep`: left running,
    /// recorded as running, for a resume to adopt.
    #[serde(default)]
    pub left: usize,
    pub elapsed_ms: u64,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed == 0
            && self.timed_out == 0
            && self.cancelled == 0
            && self.skipped == 0
            && self.left == 0
    }
}

pub trait Subscriber: Send + Sync {
    fn on_event(&self, event: &Event);
    /// A subscriber that must hear every event to keep its promise (the journal: a start it
    /// could not record must not be made) says here, once it can no longer, why. The run
    /// then starts nothing more and stops what it started. Called after every event, so it
    /// must be cheap.
    fn broken(&self) -> Option<String> {
        None
    }
    /// Makes what the events so far promised durable enough to act on: the journal writes
    /// the records it queued. The scheduler calls it after the `Started` events of a batch
    /// of tasks and before any of those tasks runs, so that a batch costs one write.
    fn commit(&self) {}
}

impl<F: Fn(&Event) + Send + Sync> Subscriber for F {
    fn on_event(&self, event: &Event) {
        self(event)
    }
}

/// The subscribers of one run, cheap to clone into every task's context.
#[derive(Clone)]
pub struct Sink {
    subscribers: Arc<[Arc<dyn Subscriber>]>,
    /// Set once a subscriber is [broken](Subscriber::broken).
    broken: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Sink {
    pub fn new(subscribers: Vec<Arc<dyn Subscriber>>) -> Self {
        Self {
            subscribers: subscribers.into(),
            broken: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
    pub fn none() -> Self {
        Self::new(Vec::new())
    }
    pub fn emit(&self, event: &Event) {
        for s in self.subscribers.iter() {
            s.on_event(event);
            if s.broken().is_some() {
                self.broken.send_replace(true);
            }
        }
    }
    /// [Commits](Subscriber::commit) every subscriber; then [`Sink::broken`] says whether
    /// one failed to.
    pub fn commit(&self) {
        for s in self.subscribers.iter() {
            s.commit();
            if s.broken().is_some() {
                self.broken.send_replace(true);
            }
        }
    }
    /// Why a subscriber can no longer keep its promise, if one cannot (the first one's).
    pub fn broken(&self) -> Option<String> {
        self.subscribers.iter().find_map(|s| s.broken())
    }
    /// Resolves once a subscriber is broken (after the event that broke it).
    pub async fn on_broken(&self) {
        let mut rx = self.broken.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = rx.wait_for(|b| *b).await;
    }
}
