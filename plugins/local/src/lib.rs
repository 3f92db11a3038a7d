//! The local backend: every node is this machine, reached at its own loopback address.
//!
//! `node0` is 127.0.0.1, `node1` 127.0.0.2, and so on (Linux routes all of 127.0.0.0/8 to
//! loopback), so a recipe keeps its real ports even with several "nodes" on one machine.
//!
//! Processes:
//! - each starts in its own process group, so a Ctrl-C at the terminal reaches prl-flow
//!   alone, which then decides what to stop; stopping signals the whole group (SIGTERM, a
//!   grace period, SIGKILL);
//! - each starts in its spawn spec's `cwd` when it names one, else in its run dir, which is
//!   made only when the process starts there, is a service or is given files;
//! - stdout and stderr go to the task's log file;
//! - a handle records the pid *and* the process's start time from `/proc/PID/stat`, so a
//!   reused pid is never taken for ours;
//! - the process writes its pid, and the attempt it belongs to (the spawn spec's `attempt`),
//!   to its proc file before anything else (a service's `RUN_DIR/pid`, a one-shot's
//!   `RUN_DIR.pid`), so a prl-flow killed between the fork and its journal write can still
//!   find it, and a later one tells it from an earlier attempt's exactly (file times are too
//!   coarse for that: a file's mtime can read a few ms *before* the moment the journal
//!   recorded as the attempt's start). A service also writes its start time and session; a
//!   one-shot, whose shell costs count in a DAG of thousands, writes only `PID ATTEMPT`:
//!   whatever holds that pid later is ours only if it is that attempt's shell (its command
//!   line names the attempt and the proc file) or a program it `exec`d (which inherits the
//!   attempt the shell exported, [`ATTEMPT_ENV`]);
//! - a one-shot runs under a tiny `sh` trap that appends its exit status to its proc file
//!   when it ends. If prl-flow is killed while a one-shot runs, the one-shot goes on; the
//!   next `--resume` reads the file (or sees it still running and waits) instead of running
//!   it a second time;
//! - the children are reaped by whoever asks about them first after they end (`wait` wakes
//!   on each `SIGCHLD`): no task, channel or pidfd per child.
//!
//! [`WithLocal`] puts this backend beside a remote one: what has no node (a task that runs
//! where prl-flow runs) goes here, the rest to the remote backend.
//!
//! This crate must not know recipes, plans, the journal, or any other backend.

mod handle;
pub mod path;
pub mod procfs;
pub mod slice;
mod with_local;
mod wrapper;

use handle::{read_status, Handle};
pub use with_local::WithLocal;
pub use wrapper::PidFile;
use wrapper::{is_attempt, needs_run_dir, proc_file, wrap};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prl_flow_backend::{
    Allocation, Backend, BackendError, Listener, Missing, PortHolder, ProcHandle, ProcState,
    Program, SpawnSpec,
};

/// The backend's name, in its handles.
const NAME: &str = "local";

/// The environment variable that names a one-shot's attempt: `ATTEMPT TASK`, exported by
/// its wrapper shell for what it runs. A pid file of a one-shot holds no start time;
/// [`LocalBackend::recover`] takes the process at its pid for the attempt's only if it is
/// the attempt's shell, or carries this variable (the shell `exec`d a program).
pub const ATTEMPT_ENV: &str = "PRL_FLOW_ATTEMPT";

/// How often to look at a process that is not our child.
const POLL: Duration = Duration::from_millis(20);

/// A child this process started: its start time (a handle of another process that got
/// the same pid later is not its), and how it ended once it was reaped.
struct Child {
    start: u64,
    ended: Option<ProcState>,
}

#[derive(Default)]
pub struct LocalBackend {
    /// The children this process started, by pid. Each is reaped by whoever first asks
    /// after it ended (`wait`, `status`, `stop`): no task, channel or pidfd per child.
    children: Mutex<HashMap<i32, Child>>,
    /// Whether a child's start time read off the clock matched `/proc` (checked once).
    clock_agrees: std::sync::OnceLock<bool>,
    /// The directory of run dirs that was last made sure of, for one-shots that need no run
    /// dir but keep their proc file there.
    run_parent: Mutex<Option<PathBuf>>,
}

/// This process's session id.
fn own_sid() -> i32 {
    static SID: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *SID.get_or_init(|| nix::unistd::getsid(None).map_or(0, |s| s.as_raw()))
}

impl LocalBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The loopback address of the `i`th node.
    pub fn address(i: usize) -> String {
        let i = i + 1;
        format!("127.0.{}.{}", (i >> 8) & 0xff, i & 0xff)
    }

    /// Makes sure the directory that holds the run dir of `spec` exists (the one-shot's proc
    /// file goes there): made once, not looked at on every spawn.
    fn run_parent(&self, spec: &SpawnSpec) -> Result<(), BackendError> {
        let Some(parent) = spec.run_dir.parent() else {
            return Ok(());
        };
        let mut made = self
            .run_parent
            .lock()
            .map_err(|_| BackendError::new("the run dirs' directory lock is poisoned"))?;
        if made.as_deref() != Some(parent) {
            std::fs::create_dir_all(parent).map_err(|e| {
                BackendError::new(format!("cannot make `{}`: {e}", parent.display()))
            })?;
            *made = Some(parent.to_path_buf());
        }
        Ok(())
    }

    fn parse(handle: &ProcHandle) -> Result<Handle, BackendError> {
        handle.open(NAME)
    }

    fn wrap(h: &Handle) -> Result<ProcHandle, BackendError> {
        match h.payload() {
            Some(payload) => Ok(ProcHandle {
                backend: NAME.into(),
                version: ProcHandle::VERSION,
                payload,
            }),
            // A path that is not UTF-8: the serializer says so.
            None => ProcHandle::new(NAME, ProcHandle::VERSION, h),
        }
    }

    /// The start time and session of child `pid`, spawned between the clock readings
    /// `before` and `after` ([`procfs::boot_ticks`]). When both fall in one clock tick, the
    /// child's start time is that tick, and its session is this process's (a child gets a
    /// group of its own, not a session): no read of its `/proc/PID/stat`, which also slows
    /// the child's `exec`, under way at this moment. Else, and until one such reading has been
    /// checked against `/proc` in this process, `/proc` says.
    fn start_of(&self, pid: i32, before: Option<u64>, after: Option<u64>) -> (u64, Option<i32>) {
        let tick = before.filter(|&b| Some(b) == after);
        if let (Some(tick), Some(&true)) = (tick, self.clock_agrees.get()) {
            return (tick, Some(own_sid()));
        }
        let st = procfs::stat(pid);
        if let (Some(tick), Some(st)) = (tick, st) {
            let _ = self
                .clock_agrees
                .set(st.start == tick && st.sid == own_sid());
        }
        (st.map_or(0, |s| s.start), st.map(|s| s.sid))
    }

    /// For a child of this process: `Some(None)` while it runs, `Some(Some(how))` once it
    /// ended (reaped now, if it had not been). `None`: not a child of ours.
    fn reap(&self, h: &Handle) -> Option<Option<ProcState>> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let mut children = self.children.lock().ok()?;
        let child = children.get_mut(&h.pid).filter(|c| c.start == h.start)?;
        if child.ended.is_none() {
            child.ended = match waitpid(Pid::from_raw(h.pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => Some(ProcState::Exited(Some(code))),
                Ok(WaitStatus::Signaled(..)) => Some(ProcState::Exited(None)),
                Ok(_) | Err(nix::errno::Errno::EINTR) => None,
                // Reaped by someone else, or not a child after all.
                Err(_) => Some(ProcState::Gone),
            };
        }
        Some(child.ended.clone())
    }

    /// Waits until a child of this process ends, woken by each `SIGCHLD` (the stream is
    /// made before the first look, so an end in between is not missed). `None`: not a
    /// child of ours.
    async fn wait_child(&self, h: &Handle) -> Option<ProcState> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child()).ok();
        loop {
            if let Some(state) = self.reap(h)? {
                return Some(state);
            }
            match &mut sigchld {
                Some(s) => {
                    s.recv().await;
                }
                // No signal driver in this runtime: look again a little later.
                None => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Signals every process of the attempt's group: SIGTERM, then SIGKILL after `grace`,
    /// until none is left. A process that joins the group meanwhile (forked after a look
    /// at `/proc`) gets its SIGTERM at the next look, not only the SIGKILL at the end.
    async fn stop_group(&self, h: &Handle, grace: Duration) -> Result<(), BackendError> {
        // Every process of the attempt's group, whether or not its leader still lives: a
        // crashed server's workers must not be left holding their GPUs and ports.
        let mut termed = std::collections::HashSet::new();
        let mut term_new = || {
            let left = h.members();
            for pid in &left {
                if termed.insert(*pid) {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
                    // A stopped process (SIGSTOP, a debugger's) acts on its SIGTERM only
                    // once it runs again.
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGCONT);
                }
            }
            left
        };
        if term_new().is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            if term_new().is_empty() {
                return Ok(());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = h.members();
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BackendError::new(format!(
                    "processes {left:?} of group {} did not end after SIGKILL",
                    h.pid
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn state_of(&self, h: &Handle) -> ProcState {
        if let Some(ended) = self.reap(h) {
            return ended.unwrap_or(ProcState::Running);
        }
        match procfs::stat(h.pid) {
            Some(st) if st.start == h.start && !st.is_dead() => ProcState::Running,
            _ => match h.status_file.as_deref().and_then(|f| read_status(f, h.pid)) {
                Some(code) => ProcState::Exited(Some(code)),
                None => ProcState::Gone,
            },
        }
    }
}

/// `/dev/null` for a child's stdin: opened once, a copy of its descriptor per spawn (no
/// path lookup per spawn).
fn dev_null() -> Result<std::fs::File, BackendError> {
    static NULL: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    let null = match NULL.get() {
        Some(f) => f,
        None => {
            let f = std::fs::File::open("/dev/null")?;
            NULL.get_or_init(|| f)
        }
    };
    Ok(null.try_clone()?)
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn describe(&self, handle: &ProcHandle) -> String {
        Self::parse(handle)
            .map(|h| format!("pid {}", h.pid))
            .unwrap_or_default()
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        Ok(Allocation {
            hosts: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), Self::address(i)))
                .collect(),
            handle: ProcHandle::new(NAME, ProcHandle::VERSION, &serde_json::json!({}))?,
        })
    }

    async fn release(&self, _allocation: &Allocation) -> Result<(), BackendError> {
        Ok(())
    }

    /// Anything of the group counts: a leader that died may leave workers.
    async fn stop_found(&self, handle: &ProcHandle, grace: Duration) -> Result<bool, BackendError> {
        let h = Self::parse(handle)?;
        let found = !h.members().is_empty();
        self.stop(handle, grace).await.map(|()| found)
    }

    async fn ports_taken(
        &self,
        _node: Option<&str>,
        address: &str,
        ports: &[u16],
    ) -> Result<Option<Vec<PortHolder>>, BackendError> {
        let ip: std::net::IpAddr = address
            .parse()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let taken = ports
            .iter()
            .filter(|&&port| {
                matches!(
                    std::net::TcpListener::bind((ip, port)),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
                )
            })
            .map(|&port| PortHolder {
                port,
                holder: Some(procfs::describe_holders(&procfs::listening(
                    port,
                    Some(ip).filter(|ip| !ip.is_unspecified()),
                ))),
            })
            .collect();
        Ok(Some(taken))
    }

    /// Looks each program up on this machine's `PATH`: the one every process started here
    /// inherits.
    async fn preflight(&self, programs: &[Program]) -> Result<Option<Vec<Missing>>, BackendError> {
        let path = std::env::var_os("PATH");
        Ok(Some(
            programs
                .iter()
                .filter_map(|p| {
                    let why = path::find_program(&p.program, path.as_deref()).err()?;
                    Some(Missing {
                        node: p.node.clone(),
                        program: p.program.clone(),
                        why,
                    })
                })
                .collect(),
        ))
    }

    async fn listener(
        &self,
        handle: &ProcHandle,
        address: &str,
        port: u16,
    ) -> Result<Listener, BackendError> {
        let h = Self::parse(handle)?;
        let inodes = procfs::listening(port, address.parse().ok());
        if inodes.is_empty() {
            return Ok(Listener::Nobody);
        }
        if !procfs::holders(&inodes, h.members()).is_empty() {
            return Ok(Listener::Ours);
        }
        Ok(Listener::Other(procfs::describe_holders(&inodes)))
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        if spec.argv.is_empty() {
            return Err(BackendError::new(format!(
                "task `{}` has an empty command",
                spec.task
            )));
        }
        let (log, fresh) = if needs_run_dir(spec) {
            let made = prl_flow_backend::prepare_run_dir(spec)?;
            (made.log, made.fresh)
        } else {
            self.run_parent(spec)?;
            (prl_flow_backend::open_log(spec)?, true)
        };
        let log_err = log.try_clone()?;
        {
            use std::io::Write as _;
            let mut l = &log;
            let mut line = prl_flow_backend::start_line(&spec.task);
            line.push('\n');
            let _ = l.write_all(line.as_bytes());
        }

        // The child writes its own pid before anything else, so that a prl-flow killed
        // between the fork and its journal write can still find it (see `recover`). A
        // service's earlier attempt's file goes first (a run dir made just now has none); a
        // one-shot's shell rewrites its file, and whatever it holds until then names
        // another process ([`read_status`]).
        let status_file = (!spec.service).then(|| proc_file(spec));
        if spec.service && !fresh {
            let _ = std::fs::remove_file(proc_file(spec));
        }
        let argv = wrap(spec)?;
        use std::os::unix::process::CommandExt as _;
        let mut cmd = std::process::Command::new(&argv[0]);
        // No variable of prl-flow's own here: a spawn that changes no variable hands the
        // child this process's environment as it is, where any change makes the standard
        // library copy the whole of it first (a one-shot's shell exports its attempt).
        cmd.args(&argv[1..]).envs(&spec.env);
        cmd.current_dir(spec.start_dir())
            .stdin(dev_null()?)
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        // Held across the spawn: a reap elsewhere (another thread of the runtime) finds the
        // child in the table as soon as it can have ended.
        let mut children = self
            .children
            .lock()
            .map_err(|_| BackendError::new("the table of children is poisoned"))?;
        let before = procfs::boot_ticks();
        let child = cmd.spawn().map_err(|e| match &spec.cwd {
            // The start dir is not looked at before each spawn; a spawn that fails says why.
            Some(cwd) if !cwd.is_dir() => BackendError::new(format!(
                "task `{}` is to start in `{}`, which is not a directory",
                spec.task,
                cwd.display()
            )),
            _ => BackendError::new(format!("cannot start `{}`: {e}", spec.argv[0])),
        })?;
        let pid = child.id() as i32;
        let (start, sid) = self.start_of(pid, before, procfs::boot_ticks());
        children.insert(pid, Child { start, ended: None });
        drop(children);
        let h = Handle {
            pid,
            node: spec.node.clone(),
            log: spec.log.clone(),
            status_file,
            start,
            sid,
        };
        Self::wrap(&h)
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        Ok(self.state_of(&Self::parse(handle)?))
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let h = Self::parse(handle)?;
        if let Some(state) = self.wait_child(&h).await {
            return Ok(state);
        }
        loop {
            match self.state_of(&h) {
                ProcState::Running => tokio::time::sleep(POLL).await,
                other => return Ok(other),
            }
        }
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        let h = Self::parse(handle)?;
        self.stop_group(&h, grace).await?;
        // A child of ours that ended is a zombie until reaped: reap it (briefly waiting for
        // its end), so that `status` does not still say running.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.wait_child(&h)).await;
        Ok(())
    }

    /// Every process writes its pid and attempt to its proc file before anything else.
    fn finds_unrecorded(&self, _spec: &SpawnSpec) -> bool {
        true
    }

    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        let pid_file = proc_file(spec);
        let Some(f) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| PidFile::parse(&t))
        else {
            return Ok(None);
        };
        // Another attempt's file (an earlier one, if this attempt never got to start).
        if f.attempt != spec.attempt {
            return Ok(None);
        }
        // A service wrote its own start time: whatever holds the pid now is ours only if it
        // started then (never the start time of whoever holds a reused pid). A one-shot
        // wrote none: what holds the pid is ours only if it is the attempt's shell or what
        // that shell `exec`d, and then `/proc` gives its start time; else no process is
        // ours (start time 0 and no session match nothing) and its exit-status file says
        // how it ended.
        let (start, sid) = match (f.start, f.sid) {
            (Some(start), Some(sid)) => (start, Some(sid)),
            _ => match procfs::stat(f.pid) {
                Some(st) if is_attempt(f.pid, spec) => (st.start, Some(st.sid)),
                _ => (0, None),
            },
        };
        let h = Handle {
            pid: f.pid,
            start,
            node: spec.node.clone(),
            log: spec.log.clone(),
            status_file: (!spec.service).then(|| proc_file(spec)),
            sid,
        };
        Self::wrap(&h).map(Some)
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        let h = Self::parse(handle)?;
        prl_flow_backend::tail_lines(&h.log, lines)
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        let h = Self::parse(handle)?;
        prl_flow_backend::read_from(&h.log, offset)
    }
}

#[cfg(test)]
mod tests;
