//! Executing a plan: each [`TaskSpec`] becomes an engine [`Task`] bound to a backend.
//!
//! A spec's command runs through the backend (`spawn`, then `wait` for a one-shot or the
//! readiness probe for a service). A built-in action (a value of [`Action`]) runs in
//! prl-flow itself, through its [`Perform`] implementation; this module knows no action's
//! work.
//!
//! Node addresses are not known when a plan is made (a SLURM allocation names them). Specs
//! carry `${host:nodeK}` placeholders; [`Exec::hosts`] fills them in at the last moment,
//! from the `allocate` task's result, or on resume from its journal record. Before
//! `allocate` is done, [`preflight`] checks the nodes for the plan's programs and ports.

mod ports;
pub mod preflight;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use prl_flow_backend::{Backend, ProcHandle, ProcState, SpawnSpec};
use prl_flow_engine::{
    Check, Done, EdgeRule, GraphBuilder, GraphError, Handle, Origin, Policy, Record, Task,
    TaskContext, TaskError,
};

use crate::actions::{Action, Context, Perform};
use crate::plan::{resolve_hosts, Command, Edge, Plan, Probe, Readiness, TaskSpec};
use ports::Foreign;

/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a log quoted in a failure message.
pub const LOG_LINES: usize = 15;

/// What every task of one run shares.
pub struct Exec {
    pub backend: Arc<dyn Backend>,
    pub state_dir: PathBuf,
    pub nodes: Vec<String>,
    hosts: RwLock<BTreeMap<String, String>>,
    /// The tasks this run starts again (not kept, not adopted): a registration re-announces
    /// their processes to a router that stayed up.
    rerun: RwLock<std::collections::BTreeSet<String>>,
    /// Tasks left down on purpose (the healer gave up on them): not registered.
    held: RwLock<std::collections::BTreeSet<String>>,
    http: reqwest::Client,
    pub grace: Duration,
    /// What the plan's tasks need of their nodes, checked once they are allocated.
    preflight: OnceLock<preflight::Preflight>,
    /// On a resume, the tasks it will start: the preflight covers their programs alone.
    resume_scope: OnceLock<std::collections::BTreeSet<String>>,
}

impl Exec {
    pub fn new(backend: Arc<dyn Backend>, state_dir: &Path, nodes: Vec<String>) -> Self {
        Self {
            backend,
            // Processes start in their own run dirs: every path handed to them is absolute.
            state_dir: std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()),
            nodes,
            hosts: RwLock::new(BTreeMap::new()),
            rerun: RwLock::default(),
            held: RwLock::default(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
            grace: STOP_GRACE,
            preflight: OnceLock::new(),
            resume_scope: OnceLock::new(),
        }
    }

    /// Notes which tasks this run starts again (from the resume's decisions).
    pub fn set_reruns(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut r) = self.rerun.write() {
            *r = ids.into_iter().collect();
        }
    }

    /// Notes which tasks are left down on purpose.
    pub fn set_held(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut h) = self.held.write() {
            *h = ids.into_iter().collect();
        }
    }

    pub fn set_hosts(&self, hosts: BTreeMap<String, String>) {
        if let Ok(mut h) = self.hosts.write() {
            *h = hosts;
        }
    }

    /// Learns node addresses from an `allocate` record of an earlier run.
    pub fn prime(&self, records: &BTreeMap<String, Record>) {
        for r in records.values() {
            if Action::of_kind(&r.kind) == Some(Action::Allocate) {
                if let Some(hosts) = r
                    .handle
                    .as_ref()
                    .and_then(crate::actions::allocate::recorded_hosts)
                {
                    self.set_hosts(hosts);
                }
            }
        }
    }

    /// Narrows the preflight for a resume: the programs of the tasks it will start
    /// (`starting`) and no ports, which a task about to be kept, adopted or restarted may
    /// hold itself. A fresh run checks every task, ports too.
    pub fn set_resume_scope(&self, starting: std::collections::BTreeSet<String>) {
        let _ = self.resume_scope.set(starting);
    }

    /// The preflight with the addresses known so far (a resume's come from the journal), for
    /// a resume that keeps the allocation. `Err`: the message.
    pub async fn preflight_resume(&self) -> Result<(), String> {
        let hosts = self.hosts.read().map(|h| h.clone()).unwrap_or_default();
        self.run_preflight(&hosts, "nothing was started or stopped")
            .await
    }

    async fn run_preflight(
        &self,
        hosts: &BTreeMap<String, String>,
        after: &str,
    ) -> Result<(), String> {
        let Some(p) = self.preflight.get() else {
            return Ok(());
        };
        let backend = self.backend.as_ref();
        match self.resume_scope.get() {
            Some(ids) => p.only(ids).check(backend, hosts, false).await,
            None => p.check(backend, hosts, true).await,
        }
        .map_err(|e| preflight::message(&e, after))
    }

    pub fn resolve(&self, text: &str) -> String {
        // Looked up under the lock: a copy of 10,000 addresses per string would dominate.
        let hosts = self.hosts.read().ok();
        resolve_hosts(text, &|n| hosts.as_ref().and_then(|h| h.get(n).cloned()))
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{}.log", file_name(id)))
    }

    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("run").join(file_name(id))
    }

    /// One probe of the process `handle` names, with its own time limit. `Err` says why it
    /// is not ready. A backend that models its processes answers it without the network.
    pub async fn probe_once(
        &self,
        handle: Option<&ProcHandle>,
        probe: &Probe,
        limit: Duration,
        log: &Path,
    ) -> Result<(), String> {
        if let Some(answer) = match handle {
            Some(h) => self.backend.answer_probe(h).await,
            None => None,
        } {
            return answer;
        }
        match probe {
            Probe::Http { url } => {
                let url = self.resolve(url);
                match self.http.get(&url).timeout(limit).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("GET {url} answered {}", r.status())),
                    Err(e) => Err(format!("GET {url}: {}", short_error(&e))),
                }
            }
            Probe::Tcp { addr } => {
                let addr = self.resolve(addr);
                match tokio::time::timeout(limit, tokio::net::TcpStream::connect(&addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("tcp {addr}: {e}")),
                    Err(_) => Err(format!(
                        "tcp {addr}: no answer in {}",
                        crate::plan::format_duration(limit)
                    )),
                }
            }
            Probe::Log { regex } => {
                let re = regex::Regex::new(regex).map_err(|e| e.to_string())?;
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if text.lines().any(|l| re.is_match(l)) {
                    Ok(())
                } else {
                    Err(format!("no line of the log matches /{regex}/ yet"))
                }
            }
        }
    }
}

fn short_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused".into()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s = inner.to_string();
            src = inner.source();
        }
        s
    }
}

/// A task id as a file name: `/` and white space would break paths.
pub fn file_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c == '/' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Builds the engine graph of a plan. Errors carry the spans of the source file.
pub fn build_graph(
    plan: &Plan,
    exec: &Arc<Exec>,
) -> Result<prl_flow_engine::Graph, Vec<GraphError>> {
    let _ = exec.preflight.set(preflight::Preflight::of(plan));
    let mut b = GraphBuilder::with_capacity(plan.tasks.len());
    for spec in &plan.tasks {
        let origin = Origin {
            span: spec.span.clone(),
            need_spans: spec.need_spans.clone(),
        };
        b.add_with_origin(Arc::new(SpecTask::new(spec.clone(), exec.clone())), origin);
    }
    b.seal()
}

pub struct SpecTask {
    spec: TaskSpec,
    fingerprint: String,
    exec: Arc<Exec>,
}

impl SpecTask {
    pub fn new(spec: TaskSpec, exec: Arc<Exec>) -> Self {
        Self {
            fingerprint: spec.fingerprint(),
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

    fn where_(&self) -> String {
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
        let tail = self
            .exec
            .backend
            .log_tail(handle, LOG_LINES)
            .await
            .unwrap_or_default();
        let log = self.exec.log_path(&self.spec.id);
        let mut msg = format!("`{}`{} {what}", self.spec.id, self.where_());
        if tail.trim().is_empty() {
            msg.push_str(&format!("\n  its log ({}) is empty", log.display()));
        } else {
            msg.push_str(&format!("\n  last lines of {}:", log.display()));
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
                    return Err(self.failure(handle, format!("{how} before it was ready")).await);
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
                        let _ = self.exec.backend.stop(handle, self.exec.grace).await;
                        return Err(self.failure(handle, why).await);
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
                    let _ = self.exec.backend.stop(handle, self.exec.grace).await;
                    return Err(self
                        .failure(
                            handle,
                            format!(
                                "was not ready after {} (last probe: {last})",
                                crate::plan::format_duration(limit)
                            ),
                        )
                        .await);
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
        let _ = self.exec.backend.stop(handle, self.exec.grace).await;
        TaskError::new(format!("`{}`{} {why}", self.spec.id, self.where_()))
    }

    /// Waits for a one-shot to end; stops it if the task is cancelled.
    async fn wait_exit(&self, handle: &ProcHandle, cx: &TaskContext) -> Result<Done, TaskError> {
        let state = tokio::select! {
            s = self.exec.backend.wait(handle) => s,
            () = cx.cancel.cancelled() => {
                let _ = self.exec.backend.stop(handle, self.exec.grace).await;
                return Err(TaskError::new(format!("`{}` was stopped", self.spec.id))
                    .with_handle(Some(handle.clone().into())));
            }
        };
        match state {
            Ok(ProcState::Exited(Some(0))) => Ok(Done {
                handle: Some(handle.clone().into()),
            }),
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
        self.fingerprint.clone()
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
    fn meta(&self) -> serde_json::Value {
        let mut meta = serde_json::json!({
            "node": self.spec.node,
            "log": self.exec.log_path(&self.spec.id),
            "ready": self.spec.ready,
        });
        // An allocation in flight has no handle yet: `down` learns its backend from here.
        if self.action().is_some_and(|a| a.held()) {
            meta["backend"] = self.exec.backend.name().into();
        }
        meta
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
        cx.started(handle.clone().into());
        if self.spec.service {
            match self.wait_ready(&handle, cx).await {
                Ok(()) => Ok(Done {
                    handle: Some(handle.into()),
                }),
                Err(e) => Err(e.with_handle(Some(handle.into()))),
            }
        } else {
            self.wait_exit(&handle, cx).await
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
            self.wait_exit(&h, cx).await
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

/// The readiness recorded in a journal record's meta, if any.
pub fn recorded_readiness(meta: &serde_json::Value) -> Option<Readiness> {
    serde_json::from_value(meta.get("ready")?.clone()).ok()
}

#[async_trait]
impl Context for Exec {
    fn resolve(&self, text: &str) -> String {
        Exec::resolve(self, text)
    }
    fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
    fn nodes(&self) -> &[String] {
        &self.nodes
    }
    fn set_hosts(&self, hosts: BTreeMap<String, String>) {
        Exec::set_hosts(self, hosts)
    }
    fn reruns(&self, task: &str) -> bool {
        self.rerun.read().is_ok_and(|r| r.contains(task))
    }
    fn held(&self, task: &str) -> bool {
        self.held.read().is_ok_and(|h| h.contains(task))
    }
    fn state_dir(&self) -> Option<&Path> {
        Some(&self.state_dir)
    }
    async fn preflight(&self, hosts: &BTreeMap<String, String>) -> Result<(), String> {
        self.run_preflight(hosts, "the nodes were released").await
    }
}
