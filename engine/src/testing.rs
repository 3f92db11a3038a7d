//! Test doubles: an in-memory task for tests of the scheduler, which does what it is told
//! and writes down when it ran, and a builder of journal records. Compiled only for the
//! engine's own tests and with the `testing` feature, never into a normal build.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::record::{Handle, Record, Status, TaskError};
use crate::task::{Check, Done, EdgeRule, Policy, Task, TaskContext};

/// What a [`FakeTask`] does when run.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Succeed,
    Fail,
    /// Fails this many times, then succeeds.
    FailTimes(u32),
    /// Takes this long (and stops early when cancelled, with an error).
    Sleep(Duration),
    /// Never finishes until cancelled.
    Hang,
}

/// A shared record of what ran: `"start:id"` and `"end:id"` entries, in order.
pub type Trace = Arc<Mutex<Vec<String>>>;

pub struct FakeTask {
    pub id: String,
    pub needs: Vec<String>,
    pub behaviour: Behaviour,
    pub service: bool,
    pub fingerprint: String,
    pub policy: Policy,
    pub check: Check,
    /// Needs whose re-run does not re-run it, and needs whose re-run does, with a why.
    pub keep_on: Vec<String>,
    pub rerun_why: Option<(String, String)>,
    pub trace: Option<Trace>,
    pub runs: AtomicU32,
    pub undos: AtomicU32,
    /// Its `undo` fails (a host that does not answer).
    pub undo_fails: bool,
}

impl FakeTask {
    pub fn new(id: &str, needs: &[&str]) -> Self {
        Self {
            id: id.to_string(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            behaviour: Behaviour::Succeed,
            service: false,
            fingerprint: "1".into(),
            policy: Policy::default(),
            check: Check::Valid,
            keep_on: Vec::new(),
            rerun_why: None,
            trace: None,
            runs: AtomicU32::new(0),
            undos: AtomicU32::new(0),
            undo_fails: false,
        }
    }
    /// Its `undo` fails.
    pub fn undo_fails(mut self) -> Self {
        self.undo_fails = true;
        self
    }
    pub fn behaviour(mut self, b: Behaviour) -> Self {
        self.behaviour = b;
        self
    }
    pub fn service(mut self) -> Self {
        self.service = true;
        self
    }
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }
    pub fn check(mut self, c: Check) -> Self {
        self.check = c;
        self
    }
    /// A re-run of `upstream` leaves it be ([`EdgeRule::Keep`]).
    pub fn keep_on(mut self, upstream: &str) -> Self {
        self.keep_on.push(upstream.into());
        self
    }

    /// A re-run of `upstream` re-runs it, for `why`.
    pub fn rerun_on(mut self, upstream: &str, why: &str) -> Self {
        self.rerun_why = Some((upstream.into(), why.into()));
        self
    }

    pub fn fingerprint(mut self, f: &str) -> Self {
        self.fingerprint = f.into();
        self
    }
    pub fn trace(mut self, t: &Trace) -> Self {
        self.trace = Some(t.clone());
        self
    }
    pub fn arc(self) -> Arc<dyn Task> {
        Arc::new(self)
    }
    fn note(&self, what: &str) {
        if let Some(t) = &self.trace {
            if let Ok(mut t) = t.lock() {
                t.push(format!("{what}:{}", self.id));
            }
        }
    }
}

#[async_trait]
impl Task for FakeTask {
    fn id(&self) -> &str {
        &self.id
    }
    fn needs(&self) -> &[String] {
        &self.needs
    }
    fn is_service(&self) -> bool {
        self.service
    }
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
    fn on_rerun_of(&self, upstream: &str) -> EdgeRule {
        if self.keep_on.iter().any(|u| u == upstream) {
            return EdgeRule::Keep;
        }
        match &self.rerun_why {
            Some((u, why)) if u == upstream => EdgeRule::Rerun(Some(why.clone())),
            _ => EdgeRule::Rerun(None),
        }
    }
    fn policy(&self) -> Policy {
        self.policy
    }
    async fn run(&self, cx: &TaskContext) -> Result<Done, TaskError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.note("start");
        let handle = self.service.then(|| serde_json::json!({ "fake": self.id }));
        if let Some(h) = &handle {
            cx.started(h.clone());
        }
        let result = match &self.behaviour {
            Behaviour::Succeed => Ok(()),
            Behaviour::Fail => Err(TaskError::new(format!("{} failed", self.id))),
            Behaviour::FailTimes(k) if n <= *k => {
                Err(TaskError::new(format!("{} failed (try {n})", self.id)))
            }
            Behaviour::FailTimes(_) => Ok(()),
            Behaviour::Sleep(d) => {
                tokio::select! {
                    () = tokio::time::sleep(*d) => Ok(()),
                    () = cx.cancel.cancelled() => Err(TaskError::new("stopped")),
                }
            }
            Behaviour::Hang => {
                cx.cancel.cancelled().await;
                Err(TaskError::new("stopped"))
            }
        };
        self.note("end");
        result.map(|()| Done { handle })
    }
    async fn check(&self, _handle: Option<&Handle>) -> Check {
        self.check.clone()
    }
    async fn adopt(&self, _handle: &Handle, _cx: &TaskContext) -> Result<Done, TaskError> {
        self.note("adopt");
        Ok(Done::default())
    }
    async fn undo(&self, _handle: &Handle) -> Result<(), TaskError> {
        self.undos.fetch_add(1, Ordering::SeqCst);
        self.note("undo");
        if self.undo_fails {
            return Err(TaskError::new(format!("cannot reach {}", self.id)));
        }
        Ok(())
    }
}

/// A journal record of a one-shot with the given status and fingerprint, the rest empty.
pub fn record(id: &str, status: Status, fingerprint: &str) -> Record {
    Record {
        id: id.into(),
        status,
        fingerprint: fingerprint.into(),
        kind: "oneshot".into(),
        service: false,
        needs: vec![],
        handle: None,
        meta: serde_json::Value::Null,
        seq: 0,
        attempts: 1,
        started_ms: None,
        finished_ms: None,
        exit_code: None,
        error: None,
    }
}
