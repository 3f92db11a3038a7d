//! The local backend: every node is this machine, reached at its own loopback address.
//!
//! `node0` is 127.0.0.1, `node1` 127.0.0.2, and so on (Linux routes all of 127.0.0.0/8 to
//! loopback), so a recipe keeps its real ports even with several "nodes" on one machine.
//!
//! Processes:
//! - each starts in its own process group, so a Ctrl-C at the terminal reaches prl-flow
//!   alone, which then decides what to stop; stopping signals the whole group (SIGTERM, a
//!   grace period, SIGKILL);
//! - each starts in its spawn spec's `cwd` when it names one, else in its run dir; the
//!   files below stay in the run dir either way;
//! - stdout and stderr go to the task's log file;
//! - a handle records the pid *and* the process's start time from `/proc/PID/stat`, so a
//!   reused pid is never taken for ours;
//! - the process writes its pid, and the attempt it belongs to (the spawn spec's `attempt`),
//!   to `RUN_DIR/pid` before anything else, so a prl-flow killed between the fork and its
//!   journal write can still find it, and a later one tells it from an earlier attempt's
//!   exactly (file times are too coarse for that: a file's mtime can read a few ms *before*
//!   the moment the journal recorded as the attempt's start). A service also writes its
//!   start time and session; a one-shot, whose shell costs count in a DAG of thousands,
//!   writes only `PID ATTEMPT`: whatever holds that pid later is ours only if it is that
//!   attempt's shell (its command line names the attempt and the run dir) or a program it
//!   `exec`d (which inherits the attempt the shell exported, [`ATTEMPT_ENV`]);
//! - a one-shot runs under a tiny `sh` trap that writes its exit status to a file when it
//!   ends. If prl-flow is killed while a one-shot runs, the one-shot goes on; the next
//!   `--resume` reads the file (or sees it still running and waits) instead of running it
//!   a second time.
//!
//! [`WithLocal`] puts this backend beside a remote one: what has no node (a task that runs
//! where prl-flow runs) goes here, the rest to the remote backend.
//!
//! This crate must not know recipes, plans, the journal, or any other backend.

pub mod path;
pub mod procfs;
mod with_local;
mod wrapper;

pub use with_local::WithLocal;
use wrapper::{is_attempt, wrap, PidFile, PID_FILE, STATUS_FILE};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prl_flow_backend::{
    Allocation, Backend, BackendError, Listener, Missing, PortHolder, ProcHandle, ProcState,
    Program, SpawnSpec, LOG_MARK,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The backend's name, in its handles.
const NAME: &str = "local";

/// The environment variable that names a one-shot's attempt: `ATTEMPT TASK`, exported by
/// its wrapper shell for what it runs. A pid file of a one-shot holds no start time;
/// [`LocalBackend::recover`] takes the process at its pid for the attempt's only if it is
/// the attempt's shell, or carries this variable (the shell `exec`d a program).
pub const ATTEMPT_ENV: &str = "PRL_FLOW_ATTEMPT";

/// How often to look at a process that is not our child.
const POLL: Duration = Duration::from_millis(20);

/// The payload of a local process's [`ProcHandle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Handle {
    pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    start: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    log: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status_file: Option<PathBuf>,
    /// The session the process started in (absent in older handles): what is left of its
    /// group after its leader died is ours only in that session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<i32>,
}

/// Resolves to how a child ended, once it has.
type ExitWatch = watch::Receiver<Option<ProcState>>;

#[derive(Default)]
pub struct LocalBackend {
    /// Exit states of the children this process started, by pid, with their start times: a
    /// handle of another process that got the same pid later is not theirs.
    children: Mutex<HashMap<i32, (u64, ExitWatch)>>,
    /// Whether a child's start time read off the clock matched `/proc` (checked once).
    clock_agrees: std::sync::OnceLock<bool>,
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

    fn parse(handle: &ProcHandle) -> Result<Handle, BackendError> {
        handle.open(NAME)
    }

    fn wrap(h: &Handle) -> Result<ProcHandle, BackendError> {
        ProcHandle::new(NAME, ProcHandle::VERSION, h)
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

    fn child(&self, h: &Handle) -> Option<ExitWatch> {
        match self.children.lock().ok()?.get(&h.pid) {
            Some((start, rx)) if *start == h.start => Some(rx.clone()),
            _ => None,
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
        if let Some(rx) = self.child(h) {
            if let Some(s) = rx.borrow().clone() {
                return s;
            }
            return ProcState::Running;
        }
        match procfs::stat(h.pid) {
            Some(st) if st.start == h.start && !st.is_dead() => ProcState::Running,
            _ => match h.status_file.as_deref().and_then(read_status) {
                Some(code) => ProcState::Exited(Some(code)),
                None => ProcState::Gone,
            },
        }
    }
}

impl Handle {
    /// The live processes of the attempt's group, leader or not: the leader may have died
    /// and left workers behind (a crashed server's engine workers).
    ///
    /// What keeps strangers out: while the leader lives, the group is ours only if the
    /// leader's start time is the recorded one. Linux hands out no pid that is still a group
    /// id, so while any member lives nobody else can have made a group of that id; once the
    /// leader is gone, a member counts only if it started after the leader and in the
    /// leader's session. (A group of that id made by another process of the same session,
    /// after every process of ours ended and the pid came round again, would pass: that is
    /// the one case this cannot tell.)
    fn members(&self) -> Vec<i32> {
        let group = procfs::group(self.pid);
        match group.iter().find(|(pid, _)| *pid == self.pid) {
            Some((_, leader)) if leader.start != self.start => Vec::new(),
            Some(_) => group.into_iter().map(|(pid, _)| pid).collect(),
            None => group
                .into_iter()
                .filter(|(_, s)| s.start >= self.start && self.sid.is_some_and(|sid| s.sid == sid))
                .map(|(pid, _)| pid)
                .collect(),
        }
    }
}

fn read_status(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
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
        let run_dir = prl_flow_backend::prepare_run_dir(spec)?;
        let log = run_dir.log;
        let log_err = log.try_clone()?;
        {
            use std::io::Write as _;
            let mut l = &log;
            let _ = l.write_all(format!("{LOG_MARK}`{}` starts ──\n", spec.task).as_bytes());
        }

        // The child writes its own pid before anything else, so that a prl-flow killed
        // between the fork and its journal write can still find it (see `recover`).
        // An earlier attempt's files go first (a run dir made just now has none).
        let status_file = (!spec.service).then(|| spec.run_dir.join(STATUS_FILE));
        if !run_dir.fresh {
            let _ = std::fs::remove_file(spec.run_dir.join(PID_FILE));
            if let Some(f) = &status_file {
                let _ = std::fs::remove_file(f);
            }
        }
        let argv = wrap(spec)?;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        // No variable of prl-flow's own here: a spawn that changes no variable hands the
        // child this process's environment as it is, where any change makes the standard
        // library copy the whole of it first (a one-shot's shell exports its attempt).
        cmd.args(&argv[1..]).envs(&spec.env);
        cmd.current_dir(spec.start_dir())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false);
        let before = procfs::boot_ticks();
        let mut child = cmd.spawn().map_err(|e| match &spec.cwd {
            // The start dir is not looked at before each spawn; a spawn that fails says why.
            Some(cwd) if !cwd.is_dir() => BackendError::new(format!(
                "task `{}` is to start in `{}`, which is not a directory",
                spec.task,
                cwd.display()
            )),
            _ => BackendError::new(format!("cannot start `{}`: {e}", spec.argv[0])),
        })?;
        let pid = child
            .id()
            .ok_or_else(|| BackendError::new("the process ended before it had a pid"))?
            as i32;
        let (start, sid) = self.start_of(pid, before, procfs::boot_ticks());
        let (tx, rx) = watch::channel(None);
        if let Ok(mut m) = self.children.lock() {
            m.insert(pid, (start, rx));
        }
        tokio::spawn(async move {
            let state = match child.wait().await {
                Ok(s) => ProcState::Exited(s.code()),
                Err(_) => ProcState::Gone,
            };
            let _ = tx.send(Some(state));
        });
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
        if let Some(mut rx) = self.child(&h) {
            let s = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| BackendError::new("lost track of the process"))?;
            return Ok(s.clone().unwrap_or(ProcState::Gone));
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
        // A child of ours is seen to end by its waiter task; until that task has run, the
        // process is a zombie and `status` would still say running. Wait for it, briefly.
        if let Some(mut rx) = self.child(&h) {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        }
        Ok(())
    }

    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        let pid_file = spec.run_dir.join(PID_FILE);
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
            status_file: (!spec.service).then(|| spec.run_dir.join(STATUS_FILE)),
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
