//! The engine [`Task`] of one [`TaskSpec`]: its command through the backend (`spawn`, then
//! `wait` for a one-shot or the readiness probe for a service), or a built-in action run in
//! prl-flow itself; its `recover`, `check` and `undo` for a resume, `status` and `down`.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::time::Instant;

use async_trait::async_trait;
use prl_flow_backend::{ProcHandle, ProcState, SpawnSpec};
use prl_flow_engine::{
    Check, Done, EdgeRule, Handle, Policy, Record, Task, TaskContext, TaskError,
};

use super::ports::Foreign;
use super::{Exec, LOG_LINES};
use crate::actions::Perform;
use crate::plan::{Command, Edge, TaskSpec};

/// `err`, or, when the stop that went with it failed, `err` saying that its process may
/// still run (and the run's summary names it).
fn unless_stopped(err: TaskError, stop: Result<(), prl_flow_backend::BackendError>) -> TaskError {
    match stop {
        Ok(()) => err,
        Err(e) => err.still_running(e),
    }
}

/// One task spec of the plan, as the engine runs it.
pub struct SpecTask {
    pub(super) spec: TaskSpec,
    /// Made when first asked for: a graph built only to be checked or drawn needs none (a
    /// hash of the whole serialized spec is most of that work), and a run asks for all of
    /// them before it starts ([`prepare`](crate::session::run::prepare)).
    fingerprint: OnceLock<String>,
    pub(super) exec: Arc<Exec>,
}

impl SpecTask {
    pub fn new(spec: TaskSpec, exec: Arc<Exec>) -> Self {
        Self {
            fingerprint: OnceLock::new(),
            spec,
            exec,
        }
    }

    fn action(&self) -> Option<&'static dyn Perform> {
        match &self.spec.command {
            Command::Builtin { action, .. } => Some(action.perform()),
            _ => None,
        }
    }

    pub(super) fn where_(&self) -> String {
        match &self.spec.node {
            Some(n) => {
                let addr = self.exec.resolve(&crate::plan::host_ref(n));
                if addr.starts_with("${") {
                    format!(" on {n}")
                } else {
                    format!(" on {n} ({addr})")
                }
            }
            None => String::new(),
        }
    }

    /// The spawn of this task for the attempt that started at `attempt` (ms since the
    /// epoch, as the journal records it).
    fn spawn_spec(&self, attempt: u64) -> SpawnSpec {
        let ex = &self.exec;
        let argv = match &self.spec.command {
            Command::Argv { argv } => argv.iter().map(|a| ex.resolve(a)).collect(),
            Command::Shell { script } => vec!["sh".into(), "-c".into(), ex.resolve(script)],
            Command::Builtin { .. } => Vec::new(),
        };
        SpawnSpec {
            task: self.spec.id.clone(),
            node: self.spec.node.clone(),
            argv,
            env: self
                .spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), ex.resolve(v)))
                .collect(),
            files: self
                .spec
                .files
                .iter()
                .map(|f| (f.path.clone(), ex.resolve(&f.content)))
                .collect(),
            run_dir: ex.run_dir(&self.spec.id),
            cwd: self.spec.dir.as_ref().map(PathBuf::from),
            log: ex.log_path(&self.spec.id),
            service: self.spec.service,
            attempt,
        }
    }

    async fn failure(&self, handle: &ProcHandle, what: String) -> TaskError {
        let tail = self.exec.backend.log_tail(handle, LOG_LINES).await;
        let log = self
            .exec
            .backend
            .log_location(handle)
            .unwrap_or_else(|| self.exec.log_path(&self.spec.id).display().to_string());
        let mut msg = format!("`{}`{} {what}", self.spec.id, self.where_());
        let tail = match tail {
            Ok(t) => t,
            Err(e) => {
                msg.push_str(&format!("\n  its log ({log}) could not be read: {e}"));
                return TaskError::new(msg);
            }
        };
        if tail.trim().is_empty() {
            msg.push_str(&format!("\n  its log ({log}) is empty"));
        } else {
            msg.push_str(&format!("\n  last lines of {log}:"));
            for l in tail.lines() {
                msg.push_str("\n    ");
                msg.push_str(l);
            }
        }
        TaskError::new(msg)
    }

    /// Waits until the service answers its probe; fails at once if it exits first.
    async fn wait_ready(&self, handle: &ProcHandle, cx: &TaskContext) -> Result<(), TaskError> {
        let Some(ready) = &self.spec.ready else {
            return Ok(());
        };
        let began = Instant::now();
        let log = self.exec.log_path(&self.spec.id);
        let exit = self.exec.backend.wait(handle);
        tokio::pin!(exit);
        loop {
            let probe = self
                .exec
                .probe_once(Some(handle), &ready.probe, ready.timeout, &log);
            let outcome = tokio::select! {
                r = probe => Some(r),
                st = &mut exit => {
                    let how = match st {
                        Ok(ProcState::Exited(Some(c))) => format!("exited with status {c}"),
                        Ok(ProcState::Exited(None)) => "was killed by a signal".to_string(),
                        Ok(_) => "is gone".to_string(),
                        Err(e) => format!("could not be watched: {e}"),
                    };
                    // What its leader left behind in its group goes with it: a retry must
                    // not run beside it, and no later record would name it.
                    let stop = self.exec.backend.stop(handle, self.exec.grace).await;
                    let e = self.failure(handle, format!("{how} before it was ready")).await;
                    return Err(unless_stopped(e, stop));
                }
                () = cx.cancel.cancelled() => None,
            };
            let last = match outcome {
                Some(Ok(())) => match self.listener_is_ours(handle, &ready.probe).await {
                    Ok(()) => {
                        tracing::debug!(task = %self.spec.id, waited = ?began.elapsed(), "ready");
                        return Ok(());
                    }
                    Err(Foreign::NobodyYet(why)) => why,
                    Err(Foreign::Other(why)) => {
                        let stop = self.exec.backend.stop(handle, self.exec.grace).await;
                        return Err(unless_stopped(self.failure(handle, why).await, stop));
                    }
                },
                Some(Err(e)) => {
                    tracing::trace!(task = %self.spec.id, probe = %e, "not ready");
                    e
                }
                None => {
                    return Err(self
                        .stopped(handle, "stopped while waiting to be ready")
                        .await)
                }
            };
            let waited = began.elapsed();
            if let Some(limit) = ready.ready_timeout {
                if waited >= limit {
                    let stop = self.exec.backend.stop(handle, self.exec.grace).await;
                    let e = self
                        .failure(
                            handle,
                            format!(
                                "was not ready after {} (last probe: {last})",
                                crate::plan::format_duration(limit)
                            ),
                        )
                        .await;
                    return Err(unless_stopped(e, stop));
                }
            }
            if waited >= ready.start_period {
                cx.output(format!("not ready yet: {last}"));
            }
            tokio::select! {
                () = tokio::time::sleep(ready.interval) => {}
                () = cx.cancel.cancelled() => {
                    return Err(self.stopped(handle, "stopped while waiting to be ready").await);
                }
            }
        }
    }

    async fn stopped(&self, handle: &ProcHandle, why: &str) -> TaskError {
        let stop = self.exec.backend.stop(handle, self.exec.grace).await;
        unless_stopped(
            TaskError::new(format!("`{}`{} {why}", self.spec.id, self.where_())),
            stop,
        )
    }

    /// Waits for a one-shot to end; stops it if the task is cancelled. `recorded`: the
    /// handle for its `Done`, unless the journal has it already (`TaskContext::started`).
    async fn wait_exit(
        &self,
        handle: &ProcHandle,
        recorded: Option<Handle>,
        cx: &TaskContext,
    ) -> Result<Done, TaskError> {
        let state = tokio::select! {
            s = self.exec.backend.wait(handle) => s,
            () = cx.cancel.cancelled() => {
                let stop = self.exec.backend.stop(handle, self.exec.grace).await;
                let e = TaskError::new(format!("`{}` was stopped", self.spec.id));
                return Err(unless_stopped(e, stop).with_handle(Some(handle.clone().into())));
            }
        };
        match state {
            Ok(ProcState::Exited(Some(0))) => Ok(Done { handle: recorded }),
            Ok(ProcState::Exited(code)) => {
                let what = match code {
                    Some(c) => format!("exited with status {c}"),
                    None => "was killed by a signal".into(),
                };
                Err(self.failure(handle, what).await.with_exit_code(code))
            }
            Ok(_) => Err(self
                .failure(handle, "ended without an exit status".into())
                .await),
            Err(e) => Err(TaskError::new(format!("`{}`: {e}", self.spec.id))),
        }
    }
}

#[async_trait]
impl Task for SpecTask {
    fn id(&self) -> &str {
        &self.spec.id
    }
    fn needs(&self) -> &[String] {
        &self.spec.needs
    }
    fn kind(&self) -> &str {
        &self.spec.kind
    }
    fn is_service(&self) -> bool {
        // An allocation is held like a service: released on teardown.
        self.spec.service || self.action().is_some_and(|a| a.held())
    }
    fn fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| self.spec.fingerprint())
            .clone()
    }
    fn on_rerun_of(&self, upstream: &str) -> EdgeRule {
        match self.spec.edges.get(upstream) {
            None => EdgeRule::Rerun(None),
            Some(Edge::Restart(why)) => EdgeRule::Rerun(Some(why.clone())),
            Some(Edge::Reregister | Edge::Nothing) => EdgeRule::Keep,
        }
    }
    fn policy(&self) -> Policy {
        Policy {
            timeout: self.spec.timeout,
            retries: self.spec.retries,
            backoff: self.spec.backoff.unwrap_or(Policy::default().backoff),
        }
    }
    /// What `status`, `down` and a resume read of a record besides its handle: the node,
    /// the readiness probe, and an allocation's backend. Only what the task has: a one-shot
    /// of a workflow keeps an empty map, which costs no allocation per record.
    fn meta(&self) -> serde_json::Value {
        let mut meta = serde_json::Map::new();
        if let Some(node) = &self.spec.node {
            meta.insert("node".into(), node.clone().into());
        }
        if let Some(ready) = &self.spec.ready {
            meta.insert(
                "ready".into(),
                serde_json::to_value(ready).unwrap_or_default(),
            );
        }
        // An allocation in flight has no handle yet: `down` learns its backend from here.
        if self.action().is_some_and(|a| a.held()) {
            meta.insert("backend".into(), self.exec.backend.name().into());
        }
        meta.into()
    }

    async fn run(&self, cx: &TaskContext) -> Result<Done, TaskError> {
        if let Command::Builtin { action, args } = &self.spec.command {
            let perform = action.perform();
            // An action holds no process of its own: on cancel it returns at once, and
            // undoes what it may have begun.
            let handle = tokio::select! {
                r = perform.run(self.exec.as_ref(), args) => r?,
                () = cx.cancel.cancelled() => {
                    perform.abandoned(self.exec.as_ref()).await;
                    return Err(TaskError::new(format!("`{}` was stopped", self.spec.id)));
                }
            };
            return Ok(Done { handle });
        }
        self.ports_free().await?;
        let spec = self.spawn_spec(cx.started_ms);
        tracing::debug!(task = %self.spec.id, node = ?spec.node, argv = ?spec.argv, "spawning");
        let handle = self.exec.backend.spawn(&spec).await.map_err(|e| {
            TaskError::new(format!(
                "`{}`{} could not start: {e}",
                self.spec.id,
                self.where_()
            ))
        })?;
        // Recorded now; a one-shot's end then adds nothing to it (no second copy).
        if self.exec.backend.finds_unrecorded(&spec) {
            cx.started_findable(handle.clone().into());
        } else {
            cx.started(handle.clone().into());
        }
        if self.spec.service {
            match self.wait_ready(&handle, cx).await {
                Ok(()) => Ok(Done {
                    handle: Some(handle.into()),
                }),
                Err(e) => Err(e.with_handle(Some(handle.into()))),
            }
        } else {
            self.wait_exit(&handle, None, cx).await
        }
    }

    async fn check(&self, handle: Option<&Handle>) -> Check {
        if let Some(action) = self.action() {
            return action.check(self.exec.as_ref(), handle).await;
        }
        let Some(handle) = handle else {
            return Check::Invalid("nothing was recorded".into());
        };
        let handle = match ProcHandle::try_from(handle) {
            Ok(h) => h,
            Err(e) => return Check::Invalid(e.to_string()),
        };
        let state = match self.exec.backend.status(&handle).await {
            Ok(s) => s,
            Err(e) => return Check::Invalid(e.to_string()),
        };
        match (self.spec.service, state) {
            (true, ProcState::Running) => match &self.spec.ready {
                None => Check::Valid,
                Some(r) => {
                    let log = self.exec.log_path(&self.spec.id);
                    match self
                        .exec
                        .probe_once(Some(&handle), &r.probe, r.timeout, &log)
                        .await
                    {
                        Ok(()) => match self.listener_is_ours(&handle, &r.probe).await {
                            Ok(()) => Check::Valid,
                            Err(Foreign::Other(why)) => Check::Invalid(why),
                            Err(Foreign::NobodyYet(_)) => Check::InFlight,
                        },
                        // Alive but not (yet) ready: an earlier run left it starting up.
                        Err(_) => Check::InFlight,
                    }
                }
            },
            (false, ProcState::Running) => Check::InFlight,
            (false, ProcState::Exited(Some(0))) => Check::Valid,
            (_, ProcState::Exited(Some(c))) => Check::Invalid(format!("exited with status {c}")),
            (_, ProcState::Exited(None)) => Check::Invalid("killed by a signal".into()),
            (_, ProcState::Gone) => Check::Invalid("the process is gone".into()),
        }
    }

    async fn recover(&self, record: &Record) -> Option<Handle> {
        if self.action().is_some() {
            return None;
        }
        self.exec
            .backend
            .recover(&self.spawn_spec(record.started_ms.unwrap_or(0)))
            .await
            .ok()
            .flatten()
            .map(Into::into)
    }

    async fn adopt(&self, handle: &Handle, cx: &TaskContext) -> Result<Done, TaskError> {
        let h = ProcHandle::try_from(handle).map_err(|e| TaskError::new(e.to_string()))?;
        if self.spec.service {
            self.wait_ready(&h, cx).await?;
            Ok(Done {
                handle: Some(handle.clone()),
            })
        } else {
            self.wait_exit(&h, Some(handle.clone()), cx).await
        }
    }

    async fn undo(&self, handle: &Handle) -> Result<(), TaskError> {
        if let Some(action) = self.action() {
            return action.undo(self.exec.as_ref(), handle).await;
        }
        let handle = ProcHandle::try_from(handle).map_err(|e| TaskError::new(e.to_string()))?;
        self.exec
            .backend
            .stop(&handle, self.exec.grace)
            .await
            .map_err(|e| TaskError::new(e.to_string()))
    }
}
