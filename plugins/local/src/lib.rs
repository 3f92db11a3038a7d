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
//!   the moment the journal recorded as the attempt's start);
//! - a one-shot runs under a tiny `sh` trap that writes its exit status to a file when it
//!   ends. If prl-flow is killed while a one-shot runs, the one-shot goes on; the next
//!   `--resume` reads the file (or sees it still running and waits) instead of running it
//!   a second time.
//!
//! [`WithLocal`] puts this backend beside a remote one: what has no node (a task that runs
//! where prl-flow runs) goes here, the rest to the remote backend.
//!
//! This crate must not know recipes, plans, the journal, or any other backend.

mod procfs;
mod with_local;

pub use with_local::WithLocal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prl_flow_backend::{
    Allocation, Backend, BackendError, Listener, PortHolder, ProcHandle, ProcState, SpawnSpec,
    LOG_MARK,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The backend's name, in its handles.
const NAME: &str = "local";

const PID_FILE: &str = "pid";

const STATUS_FILE: &str = "exit-status";

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

    fn child(&self, h: &Handle) -> Option<ExitWatch> {
        match self.children.lock().ok()?.get(&h.pid) {
            Some((start, rx)) if *start == h.start => Some(rx.clone()),
            _ => None,
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
        if let Some(cwd) = &spec.cwd {
            if !cwd.is_dir() {
                return Err(BackendError::new(format!(
                    "task `{}` is to start in `{}`, which is not a directory",
                    spec.task,
                    cwd.display()
                )));
            }
        }
        let log = prl_flow_backend::prepare_run_dir(spec)?;
        let log_err = log.try_clone()?;
        {
            use std::io::Write as _;
            let mut l = &log;
            let _ = writeln!(l, "{LOG_MARK}`{}` starts ──", spec.task);
        }

        // The child writes its own pid before anything else, so that a prl-flow killed
        // between the fork and its journal write can still find it (see `recover`).
        let pid_file = spec.run_dir.join(PID_FILE);
        let _ = std::fs::remove_file(&pid_file);
        let status_file = (!spec.service).then(|| spec.run_dir.join(STATUS_FILE));
        if let Some(f) = &status_file {
            let _ = std::fs::remove_file(f);
        }
        let argv = wrap(&spec.argv, &spec.run_dir, spec.service, spec.attempt);
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(&spec.env)
            .current_dir(spec.start_dir())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| BackendError::new(format!("cannot start `{}`: {e}", spec.argv[0])))?;
        let pid = child
            .id()
            .ok_or_else(|| BackendError::new("the process ended before it had a pid"))?
            as i32;
        let st = procfs::stat(pid);
        let (tx, rx) = watch::channel(None);
        if let Ok(mut m) = self.children.lock() {
            m.insert(pid, (st.map_or(0, |s| s.start), rx));
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
            start: st.map_or(0, |s| s.start),
            sid: st.map(|s| s.sid),
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
        // Every process of the attempt's group, whether or not its leader still lives: a
        // crashed server's workers must not be left holding their GPUs and ports.
        let signal_all = |sig| {
            let left = h.members();
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid), sig);
            }
            left
        };
        if signal_all(Signal::SIGTERM).is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            if h.members().is_empty() {
                return Ok(());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = signal_all(Signal::SIGKILL);
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
        // The process wrote its own start time: whatever holds the pid now is ours only if
        // it started then (never the start time of whoever holds a reused pid).
        let h = Handle {
            pid: f.pid,
            start: f.start,
            node: spec.node.clone(),
            log: spec.log.clone(),
            status_file: (!spec.service).then(|| spec.run_dir.join(STATUS_FILE)),
            sid: Some(f.sid),
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

/// What a process writes to `RUN_DIR/pid` first thing: `PID ATTEMPT START SID`.
struct PidFile {
    pid: i32,
    attempt: u64,
    /// Its start time in clock ticks since boot, as `/proc/PID/stat` says.
    start: u64,
    sid: i32,
}

impl PidFile {
    fn parse(text: &str) -> Option<Self> {
        let mut w = text.split_whitespace();
        Some(Self {
            pid: w.next()?.parse().ok()?,
            attempt: w.next()?.parse().ok()?,
            start: w.next()?.parse().ok()?,
            sid: w.next()?.parse().ok()?,
        })
    }
}

/// Runs `argv` under `sh`, which first writes its pid, `attempt`, start time and session to
/// `RUN_DIR/pid` (fields 22 and 6 of `/proc/$$/stat`, read by the shell itself: `sh`'s
/// command name holds no space, so the fields split plainly). A one-shot also
/// leaves its exit status in `RUN_DIR/exit-status` when it ends (not when it is killed: then
/// there is no status, which is the truth); a service `exec`s, keeping the pid.
fn wrap(argv: &[String], run_dir: &Path, service: bool, attempt: u64) -> Vec<String> {
    let pid = format!(
        "_prl_flow_pid() {{ echo \"$1 $2 ${{24}} ${{8}}\"; }}; read -r _s < /proc/$$/stat; \
         _prl_flow_pid $$ {attempt} $_s > \"$0/{PID_FILE}\""
    );
    let run_dir = run_dir.to_string_lossy().into_owned();
    let script = match (service, argv) {
        (true, _) => format!("{pid}; exec \"$@\""),
        // A shell command line: one shell, with the trap in front.
        (false, [sh, c, script]) if sh == "sh" && c == "-c" => {
            format!("{pid}; trap 'echo $? > \"$0/{STATUS_FILE}\"' EXIT\n{script}")
        }
        (false, _) => format!("{pid}; trap 'echo $? > \"$0/{STATUS_FILE}\"' EXIT; \"$@\""),
    };
    let mut v = vec!["sh".to_string(), "-c".to_string(), script, run_dir];
    match (service, argv) {
        (false, [sh, c, _]) if sh == "sh" && c == "-c" => {}
        _ => v.extend(argv.iter().cloned()),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use prl_flow_backend::{Held, Recorded};

    fn spec(dir: &Path, argv: &[&str], service: bool) -> SpawnSpec {
        SpawnSpec {
            task: "t".into(),
            node: None,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            files: [("conf/a.json".to_string(), "{}".to_string())].into(),
            run_dir: dir.join("run"),
            cwd: None,
            log: dir.join("t.log"),
            service,
            attempt: 1_700_000_000_123,
        }
    }

    #[test]
    fn addresses_are_loopback() {
        assert_eq!(LocalBackend::address(0), "127.0.0.1");
        assert_eq!(LocalBackend::address(1), "127.0.0.2");
        assert_eq!(LocalBackend::address(255), "127.0.1.0");
    }

    #[tokio::test]
    async fn oneshot_exit_status_is_recorded_and_readable_without_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new();
        let h = b
            .spawn(&spec(dir.path(), &["sh", "-c", "echo hi; exit 3"], false))
            .await
            .expect("spawn");
        assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(3)));
        assert!(dir.path().join("run/conf/a.json").exists());
        assert_eq!(b.log_tail(&h, 5).await.expect("log"), "hi");
        // Another backend instance (a later prl-flow) reads the status file.
        let later = LocalBackend::new();
        assert_eq!(
            later.status(&h).await.expect("status"),
            ProcState::Exited(Some(3))
        );
    }

    #[tokio::test]
    async fn a_process_starts_in_its_cwd_and_leaves_its_files_in_the_run_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("work dir");
        let b = LocalBackend::new();
        let mut s = spec(dir.path(), &["sh", "-c", "pwd > out; exit 4"], false);
        s.cwd = Some(work.clone());
        let h = b.spawn(&s).await.expect("spawn");
        assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(4)));
        let out = std::fs::read_to_string(work.join("out")).expect("out");
        assert_eq!(Path::new(out.trim()), work);
        for kept in ["pid", "exit-status", "conf/a.json"] {
            assert!(dir.path().join("run").join(kept).exists(), "{kept}");
        }
        assert!(!dir.path().join("run/out").exists());
        s.cwd = Some(dir.path().join("missing"));
        let e = b.spawn(&s).await.expect_err("no such dir");
        assert!(e.message.contains("not a directory"), "{e}");
    }

    #[tokio::test]
    async fn a_handle_with_a_childs_pid_but_another_start_time_is_not_that_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new();
        let h = b
            .spawn(&spec(dir.path(), &["sleep", "30"], true))
            .await
            .expect("spawn");
        let mut other: Handle = h.open(NAME).expect("handle");
        other.start += 1;
        let other = LocalBackend::wrap(&other).expect("handle");
        // The same backend knows the child by pid; a later process with that pid is not it.
        assert_eq!(b.status(&other).await.expect("status"), ProcState::Gone);
        assert_eq!(b.status(&h).await.expect("status"), ProcState::Running);
        b.stop(&h, Duration::from_secs(2)).await.expect("stop");
    }

    #[tokio::test]
    async fn service_stops_with_its_group_and_pid_reuse_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new();
        let h = b
            .spawn(&spec(
                dir.path(),
                &["sh", "-c", "sleep 30 & sleep 30; wait"],
                true,
            ))
            .await
            .expect("spawn");
        assert_eq!(b.status(&h).await.expect("status"), ProcState::Running);
        b.stop(&h, Duration::from_secs(2)).await.expect("stop");
        assert_ne!(b.status(&h).await.expect("status"), ProcState::Running);
        // A handle with the right pid but another start time is not ours.
        let mut fake: Handle = h.open(NAME).expect("handle");
        fake.pid = std::process::id() as i32;
        fake.start += 1;
        let fake = LocalBackend::wrap(&fake).expect("handle");
        assert_eq!(
            LocalBackend::new().status(&fake).await.expect("status"),
            ProcState::Gone
        );
    }

    async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A server whose leader died and left a worker: the worker is still ours, is reported,
    /// and is stopped.
    #[tokio::test]
    async fn stop_reaches_the_group_after_its_leader_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new();
        let s = spec(dir.path(), &["sh", "-c", "sleep 4031 & exit 0"], true);
        let h = b.spawn(&s).await.expect("spawn");
        assert_ne!(b.wait(&h).await.expect("wait"), ProcState::Running);
        let p: Handle = h.open(NAME).expect("handle");
        wait_until("the worker runs", || !p.members().is_empty()).await;
        let worker = p.members()[0];
        assert_ne!(worker, p.pid);
        let items = [Recorded {
            id: "t".into(),
            held: Held::Process(h.clone()),
        }];
        let out = b.teardown(&items, Duration::from_secs(2), None).await;
        assert!(out[0].was_running, "{out:?}");
        assert_eq!(out[0].error, None);
        assert!(procfs::stat(worker).is_none_or(|s| s.is_dead()));
        assert!(p.members().is_empty());
    }

    /// A pid file whose pid now belongs to a stranger (here: this test process): the stranger
    /// is never taken for the attempt's process, nor signalled.
    #[tokio::test]
    async fn a_reused_pid_is_never_adopted_nor_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = spec(dir.path(), &["sleep", "30"], true);
        std::fs::create_dir_all(&s.run_dir).expect("run dir");
        let me = std::process::id();
        // The attempt's process started at tick 1, in this session, and is long gone.
        let sid = procfs::stat(me as i32).expect("stat").sid;
        let line = format!("{me} {} 1 {sid}\n", s.attempt);
        std::fs::write(s.run_dir.join(PID_FILE), line).expect("pid");
        let b = LocalBackend::new();
        let h = b.recover(&s).await.expect("recover").expect("a handle");
        assert_eq!(b.status(&h).await, Ok(ProcState::Gone));
        b.stop(&h, Duration::from_millis(100)).await.expect("stop");
        assert!(procfs::stat(me as i32).is_some_and(|s| !s.is_dead()));
    }

    /// A port held by someone else is reported with its holder, before a start and as the
    /// answer to "whose listener is this"; our own process's listener is ours.
    #[tokio::test]
    async fn ports_are_told_free_taken_ours_or_someone_elses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new();
        let stranger = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken = stranger.local_addr().expect("addr").port();
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let found = b
            .ports_taken(None, "127.0.0.1", &[taken, free])
            .await
            .expect("ports")
            .expect("the local backend can tell");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].port, taken);
        let me = format!("pid {}", std::process::id());
        assert!(found[0].holder.as_deref().is_some_and(|h| h.contains(&me)));

        let script = format!(
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{free}))\ns.listen()\ntime.sleep(60)"
        );
        let h = b
            .spawn(&spec(dir.path(), &["python3", "-c", &script], true))
            .await
            .expect("spawn");
        assert_eq!(
            b.listener(&h, "127.0.0.1", taken).await,
            Ok(Listener::Other(procfs::describe_holders(
                &procfs::listening(taken, None)
            )))
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match b.listener(&h, "127.0.0.1", free).await.expect("listener") {
                Listener::Ours => break,
                Listener::Nobody => {}
                other => panic!("{other:?}"),
            }
            assert!(std::time::Instant::now() < deadline, "never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b.stop(&h, Duration::from_secs(2)).await.expect("stop");
        drop(stranger);
    }

    /// A prl-flow killed between a spawn and its journal write: the record says when the
    /// attempt started, and the process's pid file must be found by that, exactly, even when
    /// the file's time reads earlier than the record (coarse file-system clocks do that).
    #[tokio::test]
    async fn recover_finds_its_attempt_by_its_token_whatever_the_file_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::new();
        let s = spec(dir.path(), &["sleep", "30"], true);
        let h = b.spawn(&s).await.expect("spawn");
        let pid_file = s.run_dir.join(PID_FILE);
        // The child writes it first thing; wait for that, not for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&pid_file).map_or(true, |t| !t.ends_with('\n')) {
            assert!(std::time::Instant::now() < deadline, "no pid file");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let f = std::fs::File::options()
            .write(true)
            .open(&pid_file)
            .expect("pid file");
        let when = std::time::UNIX_EPOCH + Duration::from_millis(s.attempt - 5);
        f.set_modified(when).expect("set mtime");
        drop(f);

        let found = b
            .recover(&s)
            .await
            .expect("recover")
            .expect("this attempt's process is found");
        assert_eq!(
            found.open::<Handle>("local").expect("local").pid,
            h.open::<Handle>("local").expect("local").pid
        );
        assert_eq!(b.status(&found).await, Ok(ProcState::Running));
        // An attempt that started later never got to its spawn: this process is not its.
        let later = SpawnSpec {
            attempt: s.attempt + 1,
            ..s.clone()
        };
        assert_eq!(b.recover(&later).await, Ok(None));
        b.stop(&h, Duration::from_secs(5)).await.expect("stop");
    }

    #[tokio::test]
    async fn a_handle_of_another_backend_is_refused() {
        let other = ProcHandle::new("ssh", ProcHandle::VERSION, &serde_json::json!({ "pid": 1 }))
            .expect("handle");
        let e = LocalBackend::new()
            .status(&other)
            .await
            .expect_err("not ours");
        assert_eq!(
            e.message,
            "backend `local` cannot use a handle of backend `ssh`"
        );
        assert_eq!(LocalBackend::new().describe(&other), "");
    }
}
