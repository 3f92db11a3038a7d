//! The local backend: every node is this machine, reached at its own loopback address.
//!
//! `node0` is 127.0.0.1, `node1` 127.0.0.2, and so on (Linux routes all of 127.0.0.0/8 to
//! loopback), so a recipe keeps its real ports even with several "nodes" on one machine.
//!
//! Processes:
//! - each starts in its own process group, so a Ctrl-C at the terminal reaches prl-flow
//!   alone, which then decides what to stop; stopping signals the whole group (SIGTERM, a
//!   grace period, SIGKILL);
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

mod with_local;

pub use with_local::WithLocal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use prl_flow_backend::{
    Allocation, Backend, BackendError, ProcHandle, ProcState, SpawnSpec, LOG_MARK,
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
        match proc_start(h.pid) {
            Some((start, state)) if start == h.start && state != 'Z' && state != 'X' => {
                ProcState::Running
            }
            _ => match h.status_file.as_deref().and_then(read_status) {
                Some(code) => ProcState::Exited(Some(code)),
                None => ProcState::Gone,
            },
        }
    }
}

/// `(start time, state letter)` of a live pid, from `/proc/PID/stat`.
fn proc_start(pid: i32) -> Option<(u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall is index 19 after the state (field 3).
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
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

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        if spec.argv.is_empty() {
            return Err(BackendError::new(format!(
                "task `{}` has an empty command",
                spec.task
            )));
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
            .current_dir(&spec.run_dir)
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
        let start = proc_start(pid).map(|(s, _)| s).unwrap_or(0);
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
            start,
            node: spec.node.clone(),
            log: spec.log.clone(),
            status_file,
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
        if self.state_of(&h) != ProcState::Running {
            return Ok(());
        }
        let group = Pid::from_raw(h.pid);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.state_of(&h) != ProcState::Running {
                // The leader is gone; make sure nothing of its group lingers.
                let _ = killpg(group, Signal::SIGKILL);
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        let _ = killpg(group, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.state_of(&h) == ProcState::Running {
            if Instant::now() > deadline {
                return Err(BackendError::new(format!(
                    "process {} did not end after SIGKILL",
                    h.pid
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        let pid_file = spec.run_dir.join(PID_FILE);
        let Some((pid, attempt)) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| parse_pid_file(&t))
        else {
            return Ok(None);
        };
        // Another attempt's file (an earlier one, if this attempt never got to start).
        if attempt != spec.attempt {
            return Ok(None);
        }
        let h = Handle {
            pid,
            // A dead process has no start time to read; 0 never matches a live one.
            start: proc_start(pid).map(|(s, _)| s).unwrap_or(0),
            node: spec.node.clone(),
            log: spec.log.clone(),
            status_file: (!spec.service).then(|| spec.run_dir.join(STATUS_FILE)),
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

/// `PID ATTEMPT`, as the wrapper writes it.
fn parse_pid_file(text: &str) -> Option<(i32, u64)> {
    let mut w = text.split_whitespace();
    let pid = w.next()?.parse().ok()?;
    let attempt = w.next()?.parse().ok()?;
    Some((pid, attempt))
}

/// Runs `argv` under `sh`, which first writes its pid and `attempt` to `RUN_DIR/pid`. A one-shot also
/// leaves its exit status in `RUN_DIR/exit-status` when it ends (not when it is killed: then
/// there is no status, which is the truth); a service `exec`s, keeping the pid.
fn wrap(argv: &[String], run_dir: &Path, service: bool, attempt: u64) -> Vec<String> {
    let pid = format!("echo \"$$ {attempt}\" > \"$0/{PID_FILE}\"");
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

    fn spec(dir: &Path, argv: &[&str], service: bool) -> SpawnSpec {
        SpawnSpec {
            task: "t".into(),
            node: None,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            files: [("conf/a.json".to_string(), "{}".to_string())].into(),
            run_dir: dir.join("run"),
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
