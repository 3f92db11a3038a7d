//! Executing a plan: each [`TaskSpec`](crate::plan::TaskSpec) becomes an engine
//! [`Task`](prl_flow_engine::Task) bound to a backend.
//!
//! A spec's command runs through the backend (`spawn`, then `wait` for a one-shot or the
//! readiness probe for a service). A built-in action (a value of [`Action`]) runs in prl-flow
//! itself, through its [`Perform`](crate::actions::Perform) implementation; this module knows
//! no action's work.
//!
//! Node addresses are not known when a plan is made (a SLURM allocation names them). Specs
//! carry `${host:nodeK}` placeholders; `Exec::hosts` fills them in at the last moment,
//! from the `allocate` task's result, or on resume from its journal record. Before
//! `allocate` is done, [`preflight`] checks the nodes for the plan's programs and ports.

mod ports;
pub mod preflight;
mod task;

pub use task::SpecTask;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{Backend, ProcHandle};
use prl_flow_engine::{GraphBuilder, GraphError, Record};

use crate::actions::{Action, Context};
use crate::plan::{resolve_hosts, Plan, Probe, Readiness};

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
        let mut name = file_name(id);
        name.push_str(".log");
        self.state_dir.join("logs").join(name)
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
                // The log where the process writes it (on its host, for a remote backend),
                // and only this attempt's lines: a restarted service's log still holds
                // what the attempt before it printed, its ready line too.
                let text = match handle {
                    Some(h) => self
                        .backend
                        .read_log(h, 0)
                        .await
                        .map(|(text, _)| text)
                        .map_err(|e| format!("cannot read the log: {e}"))?,
                    None => std::fs::read_to_string(log).unwrap_or_default(),
                };
                let ours = prl_flow_backend::since_last_mark(&text);
                if ours.lines().any(|l| re.is_match(l)) {
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
        b.add_with_origin(
            Arc::new(SpecTask::new(spec.clone(), exec.clone())),
            spec.origin(),
        );
    }
    b.seal()
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
