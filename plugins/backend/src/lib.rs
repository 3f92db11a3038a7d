//! The backend plugin API: where and how a task's process runs.
//!
//! A backend turns node names of a plan (`node0`, `node1`, ...) into machines, and runs
//! processes on them. Every operation takes and returns plain data, so that the same calls
//! can cross a process boundary (a site plugin speaking JSON lines) as easily as a function
//! call:
//!
//! - [`Backend::allocate`] gets nodes and says their addresses; [`Backend::release`] gives
//!   them back.
//! - [`Backend::spawn`] starts a process on a node (argv, env, files to place, a log) and
//!   returns a [`ProcHandle`]: the backend's name and its own data, which the journal keeps
//!   as JSON, so a later prl-flow can check, stop or wait for the process
//!   ([`Backend::status`], [`Backend::stop`], [`Backend::wait`]). Reattaching is no more
//!   than using a recorded handle again. Only the backend named opens a handle's payload
//!   ([`ProcHandle::open`]); others ask it ([`Backend::describe`]).
//! - A handle must identify its process for good: a pid alone is not enough (pids are
//!   reused), so backends record what makes it unique (start time, job and step ids).
//! - [`Backend::check`] checks the configuration against a plan before anything starts,
//!   [`Backend::preflight`] that the plan's programs exist on the allocated nodes, and
//!   [`Backend::teardown`] takes down what a journal records (a scheduler can batch it).
//!
//! This crate holds only the trait, its data types and small helpers every backend shares
//! ([`ConfigError`], log reading). It must not know any particular backend, recipes, plans
//! or the journal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

mod config_error;
mod handle;
mod logs;
pub mod preflight;
pub mod shell;
pub mod table;
mod teardown;

pub use config_error::ConfigError;
pub use handle::ProcHandle;
pub use logs::{
    last_lines, read_from, since_last_mark, start_line, tail_bytes, tail_lines, LOG_MARK,
};
pub use teardown::{teardown_each, Held, Recorded, Stopped};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct BackendError {
    pub message: String,
}

impl BackendError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// A process to start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpawnSpec {
    /// The task it belongs to (for names and messages).
    pub task: String,
    /// The node to run on; `None` is the machine prl-flow runs on.
    pub node: Option<String>,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Files to write into the run dir before starting: relative path → content.
    pub files: BTreeMap<String, String>,
    /// The task's own directory (created): its files are placed there, and a backend keeps
    /// there what it leaves for [`Backend::recover`] (pid, exit status). The process starts
    /// in it unless `cwd` names another directory.
    pub run_dir: PathBuf,
    /// Where the process starts, when not in `run_dir`: an absolute path, on the node's host
    /// for a task with a node. It must exist; it is not created. `None`: the run dir. Absent
    /// from the JSON when `None`, so peers that predate it see what they always saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
    /// A service keeps running; a one-shot's exit status is what matters.
    pub service: bool,
    /// Names this start exactly: when its attempt began (ms since the epoch), the value the
    /// journal records as the task's `started_ms`. A backend writes it beside what it leaves
    /// for [`Backend::recover`], so a later prl-flow tells this attempt's process from an
    /// earlier one's without trusting file times. 0: not known.
    #[serde(default)]
    pub attempt: u64,
}

impl SpawnSpec {
    /// The directory the process starts in: `cwd`, else the run dir.
    pub fn start_dir(&self) -> &Path {
        self.cwd.as_deref().unwrap_or(&self.run_dir)
    }
}

/// A port that something already listens on, and who, where the backend can tell
/// (`pid 4242 (python3)`, `a process of another user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortHolder {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

/// A program a plan runs on a node, for [`Backend::preflight`]: the first word of a task's
/// command as the task would execute it (a name looked up on the node's `PATH`, or a path).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Program {
    /// The node; `None` is the machine prl-flow runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub program: String,
}

/// A program [`Backend::preflight`] did not find where it will run, and why (`not found on
/// PATH`, `not executable`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Missing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub program: String,
    pub why: String,
}

/// Who listens on a service's port, as [`Backend::listener`] finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "listener", content = "holder")]
pub enum Listener {
    /// The service's own process, or another process of its group.
    Ours,
    /// Another process: the one that answers is not ours (who, where the backend can tell).
    Other(String),
    /// Nothing listens on the port.
    Nobody,
    /// The backend cannot tell.
    Unknown,
}

/// Nodes given to a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Node name → address (hostname or IP) that services bind and clients reach.
    pub hosts: BTreeMap<String, String>,
    /// What the backend needs to release it later.
    pub handle: ProcHandle,
}

/// The state of a process, as far as the backend can tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "code")]
pub enum ProcState {
    Running,
    /// It exited with this code (`None`: killed by a signal).
    Exited(Option<i32>),
    /// It is gone and nothing says how it ended.
    Gone,
}

/// The name of [`Backend::allocate`] wherever it is written as text: the site-plugin
/// protocol's method, and the deployment task (a built-in action) that calls it.
pub const ALLOCATE: &str = "allocate";

#[async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &str;

    /// Checks the backend's configuration against a plan of these nodes, before anything
    /// starts: every problem at once, each naming its `[backend]` field (e.g. more nodes
    /// than the ssh backend has hosts). The default finds nothing wrong.
    async fn check(&self, _nodes: &[String]) -> Result<(), Vec<ConfigError>> {
        Ok(())
    }

    /// Gets the nodes named (in order) and says their addresses.
    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError>;

    /// Is an allocation recorded earlier still there?
    async fn allocation_alive(&self, _allocation: &Allocation) -> Result<bool, BackendError> {
        Ok(true)
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError>;

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError>;

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError>;

    /// Resolves when the process has ended (never before), with how it ended.
    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError>;

    /// Signals the process group, waits up to `grace`, then kills it. Stopping a process
    /// that is already gone is not an error.
    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError>;

    /// Stops as [`Backend::stop`] does, and says whether anything of the process was running
    /// (for `down`'s count). The default asks [`Backend::status`] first; a backend that can
    /// see what a process left behind (a group whose leader died) counts that too.
    async fn stop_found(&self, handle: &ProcHandle, grace: Duration) -> Result<bool, BackendError> {
        let was_running = matches!(self.status(handle).await, Ok(ProcState::Running));
        self.stop(handle, grace).await.map(|()| was_running)
    }

    /// Takes down what a journal records (`items`, last started first): stops each process
    /// as [`Backend::stop`] would and releases each allocation, and says how each went. The
    /// default does one item after the other, in order ([`teardown_each`]); a backend that
    /// can take down many with one call (SLURM: one `scancel` per job) does so, and with
    /// `state_dir` also takes down what that state dir started but never recorded.
    async fn teardown(
        &self,
        items: &[Recorded],
        grace: Duration,
        _state_dir: Option<&Path>,
    ) -> Vec<Stopped> {
        teardown_each(self, items, grace).await
    }

    /// Which of `ports` something already listens on where a service about to start on `node`
    /// (`None`: this machine) would bind them (`address`), each with who holds it where the
    /// backend can tell. `None`: this backend cannot tell, and the start goes ahead.
    async fn ports_taken(
        &self,
        _node: Option<&str>,
        _address: &str,
        _ports: &[u16],
    ) -> Result<Option<Vec<PortHolder>>, BackendError> {
        Ok(None)
    }

    /// Before anything starts (after the allocation): which of `programs` cannot be found
    /// where they will run, resolved as a task's command would be (the node's `PATH`, after
    /// whatever the backend runs before every command, such as a site's prologue). One
    /// call covers every node, so a backend can batch it (one round trip per host, one
    /// step across an allocation). `None`: this backend cannot tell, and the run goes ahead.
    async fn preflight(&self, _programs: &[Program]) -> Result<Option<Vec<Missing>>, BackendError> {
        Ok(None)
    }

    /// Who listens on `address:port` for the service that `handle` names: its own process
    /// (or one of its group), someone else, or nobody. A readiness probe that passed counts
    /// only when the answer is not [`Listener::Other`].
    async fn listener(
        &self,
        _handle: &ProcHandle,
        _address: &str,
        _port: u16,
    ) -> Result<Listener, BackendError> {
        Ok(Listener::Unknown)
    }

    /// A backend that models its processes instead of running them (`sim`) answers a
    /// readiness probe of the process `handle` names itself, and nothing reaches the
    /// network: `Some(Ok)` ready, `Some(Err(why))` not yet. `None` (the default): probe for
    /// real.
    async fn answer_probe(&self, _handle: &ProcHandle) -> Option<Result<(), String>> {
        None
    }

    /// The same for a built-in action's call to a service (`register`, `health-probe` to
    /// the router at `url`). `None` (the default): the call goes out.
    async fn answer_call(&self, _action: &str, _url: &str) -> Option<Result<(), String>> {
        None
    }

    /// What the backend has to tell once a run ends (`sim`: the bring-up timeline in
    /// virtual time), printed after the run. `None` (the default): nothing.
    fn report(&self) -> Option<String> {
        None
    }

    /// A few words on a running process for `status` (`pid 4242`, `step 12.3`); empty when
    /// the backend has none.
    fn describe(&self, _handle: &ProcHandle) -> String {
        String::new()
    }

    /// Where the process's log is, for messages, when it is not the spawn's `log` on this
    /// machine (`host:path` of a log kept on a remote host); `None`: it is that file.
    fn log_location(&self, _handle: &ProcHandle) -> Option<String> {
        None
    }

    /// Whether [`Backend::recover`] finds whatever the spawn of `spec` started from the spawn
    /// alone, exactly (its attempt), so that the handle may reach the journal with the next
    /// batch of records rather than with a write of its own: a `kill -9` in between leaves a
    /// start with no handle, which `recover` makes good. `false` unless the backend is sure.
    fn finds_unrecorded(&self, _spec: &SpawnSpec) -> bool {
        false
    }

    /// Finds the process that the spawn of `spec` (its attempt: [`SpawnSpec::attempt`])
    /// started, when its handle never reached the journal (prl-flow was killed between the
    /// fork and the journal write). `None`: that attempt started nothing.
    async fn recover(&self, _spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        Ok(None)
    }

    /// The last `lines` lines of the process's log.
    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError>;

    /// The whole log, or from a byte offset: (text, new offset). For `logs -f`.
    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError>;
}

/// A run dir made ready for a process: its log, open for appending.
pub struct RunDir {
    pub log: std::fs::File,
    /// The run dir did not exist before: no file of an earlier attempt is in it.
    pub fresh: bool,
}

/// For a process started on a file system this machine sees: creates the run dir, places
/// the spec's files in it, and opens the log for appending (its directory created too).
///
/// The common case costs one `mkdir` and one `open`: a parent is created only when the
/// first try says it is missing.
pub fn prepare_run_dir(spec: &SpawnSpec) -> Result<RunDir, BackendError> {
    use std::io::ErrorKind;
    let fresh = match std::fs::create_dir(&spec.run_dir) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::AlreadyExists && spec.run_dir.is_dir() => false,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(&spec.run_dir)?;
            true
        }
        Err(e) => return Err(e.into()),
    };
    for (rel, content) in &spec.files {
        let path = spec.run_dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
    }
    Ok(RunDir {
        log: open_log(spec)?,
        fresh,
    })
}

/// Opens the log of `spec` for appending, creating it (and its directory) if need be.
pub fn open_log(spec: &SpawnSpec) -> Result<std::fs::File, BackendError> {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match spec.log.parent() {
            Some(parent) => std::fs::create_dir_all(parent).and_then(|()| open()),
            None => Err(e),
        },
        other => other,
    }
    .map_err(|e| BackendError::new(format!("cannot open log `{}`: {e}", spec.log.display())))
}
