//! What the engine knows of a task: an id, what it needs, a fingerprint, a policy, and four
//! async operations.
//!
//! - `run` does the work. A one-shot returns when its work is done; a service returns when it
//!   is *ready* and leaves its process running. Either may return a [`Handle`]: opaque JSON
//!   the journal keeps so that a later process can check or stop what this one started.
//! - `check` answers, on resume, whether a result recorded earlier still holds (a service is
//!   still alive and ready; an interrupted one-shot finished on its own or still runs).
//! - `adopt` waits for work that an earlier, killed run left in flight instead of starting it
//!   a second time.
//! - `undo` stops what `run` started.
//!
//! Cancellation is cooperative: the scheduler fires the context's [`Cancel`] and then keeps
//! awaiting the task, which forwards the signal to its process and returns once it is gone.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::event::{Event, Sink};
use crate::record::Record;
pub use crate::record::{Handle, TaskError};

/// How often and how long a task may try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The whole attempt, readiness included; `None` waits for ever.
    pub timeout: Option<Duration>,
    /// Extra attempts after a failure (0 = one attempt).
    pub retries: u32,
    /// The pause before the first retry; doubled for each further one.
    pub backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: None,
            retries: 0,
            backoff: Duration::from_millis(500),
        }
    }
}

/// A finished attempt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub handle: Option<Handle>,
}

/// What a re-run of a task this one needs means for it, on resume ([`Task::on_rerun_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeRule {
    /// It runs again too (the default: "everything downstream of a re-run re-runs"), and
    /// why, when the reason is worth telling.
    Rerun(Option<String>),
    /// It is kept: another task carries the change (a registration), or it does not
    /// depend on the upstream's process at all.
    Keep,
}

/// The answer of [`Task::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The recorded result still holds.
    Valid,
    /// Work an earlier run started is still in flight; [`Task::adopt`] can wait for it.
    InFlight,
    /// The result no longer holds, and why (`no longer alive`, `exited with status 1`...).
    Invalid(String),
}

/// A one-way, cloneable cancel signal.
#[derive(Clone)]
pub struct Cancel {
    rx: watch::Receiver<bool>,
}

/// The side that fires a [`Cancel`].
pub struct CancelSource {
    tx: watch::Sender<bool>,
}

impl CancelSource {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }
    pub fn token(&self) -> Cancel {
        Cancel {
            rx: self.tx.subscribe(),
        }
    }
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
}

impl Default for CancelSource {
    fn default() -> Self {
        Self::new()
    }
}

impl Cancel {
    /// A token that never fires.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        Self { rx }
    }
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }
    /// Resolves once the token fires (never, if its source is dropped unfired).
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What a running task may use: its attempt number, the cancel signal, and the event sink.
#[derive(Clone)]
pub struct TaskContext {
    pub index: usize,
    pub id: Arc<str>,
    pub attempt: u32,
    /// When this attempt started (ms since the epoch), as the journal records it.
    pub started_ms: u64,
    pub cancel: Cancel,
    pub(crate) sink: Sink,
}

impl TaskContext {
    /// Reports one line of the task's output (for progress displays; logs go to files).
    pub fn output(&self, line: impl Into<String>) {
        self.sink.emit(&Event::Output {
            id: self.id.clone(),
            line: line.into(),
        });
    }
    /// Records a handle as soon as a process exists, before the task is done, so that a
    /// run killed now still knows what it started: written at once.
    pub fn started(&self, handle: Handle) {
        self.spawned(handle, false);
    }

    /// Like [`TaskContext::started`], for a process that the task finds again from its start
    /// alone (its `recover`, by the attempt): the handle goes to the journal with the next
    /// batch of records (within [`SYNC_EVERY`](crate::journal::SYNC_EVERY)) instead of with
    /// a write of its own.
    pub fn started_findable(&self, handle: Handle) {
        self.spawned(handle, true);
    }

    fn spawned(&self, handle: Handle, findable: bool) {
        self.sink.emit(&Event::Spawned {
            index: self.index,
            id: self.id.clone(),
            handle,
            findable,
        });
    }
    /// For tests and tools that drive a task outside a run.
    pub fn detached(id: &str) -> Self {
        Self {
            index: 0,
            id: id.into(),
            attempt: 1,
            started_ms: crate::record::now_ms(),
            cancel: Cancel::never(),
            sink: Sink::none(),
        }
    }
}

#[async_trait]
pub trait Task: Send + Sync + 'static {
    fn id(&self) -> &str;
    fn needs(&self) -> &[String];
    /// A short word for displays (`oneshot`, `service`, `engine`...).
    fn kind(&self) -> &str {
        if self.is_service() {
            "service"
        } else {
            "oneshot"
        }
    }
    /// A service keeps running after `run` returns.
    fn is_service(&self) -> bool {
        false
    }
    /// A hash of everything that would change what the task does.
    fn fingerprint(&self) -> String;
    /// On resume, what a re-run of `upstream` (one of its needs) means for it.
    fn on_rerun_of(&self, _upstream: &str) -> EdgeRule {
        EdgeRule::Rerun(None)
    }
    fn policy(&self) -> Policy {
        Policy::default()
    }
    /// Data about the task worth keeping in the journal beside its handle (what to probe,
    /// where its log is), so `status` and `down` work without the task definitions.
    fn meta(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    async fn run(&self, cx: &TaskContext) -> Result<Done, TaskError>;
    async fn check(&self, _handle: Option<&Handle>) -> Check {
        Check::Valid
    }
    /// Finds what an attempt recorded as started left behind when its handle never reached
    /// the journal (the run was killed between starting a process and recording it).
    async fn recover(&self, _record: &Record) -> Option<Handle> {
        None
    }
    async fn adopt(&self, _handle: &Handle, _cx: &TaskContext) -> Result<Done, TaskError> {
        Err(TaskError::new("cannot adopt work left in flight"))
    }
    async fn undo(&self, _handle: &Handle) -> Result<(), TaskError> {
        Ok(())
    }
}
