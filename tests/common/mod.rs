//! Shared helpers for the integration tests: they run the real `prl-flow` binary against
//! real processes.
//!
//! Every test takes a [`Sandbox`]: its own temp dir, used as the working directory of every
//! command it runs and as `$WORK` in their environment (fixtures write their marker files
//! there). A sandbox cleans up after itself even when the test panics: the prl-flow runs it
//! started in the background are killed (each [`Running`] kills its child when dropped),
//! then for every state dir the sandbox knows of, `prl-flow down --state-dir DIR` stops what
//! the journal records, and whatever is still alive of a recorded process group is killed.
//!
//! Waiting is always on a condition (a marker file, the journal, a process) with a deadline,
//! never a bare sleep: [`wait_until`] and [`wait_for`]. Commands run with a watchdog deadline
//! too, so a hang fails the test instead of the suite.
//!
//! Tests run in parallel: take ports from the OS ([`free_port`]), never a fixed one, and pass
//! `--state-dir` inside the sandbox.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The longest any one command may take before the test fails as hung.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// The default deadline for [`wait_until`] in tests.
pub const WAIT: Duration = Duration::from_secs(30);
/// How often a condition is looked at.
const POLL: Duration = Duration::from_millis(10);

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prl-flow"))
}

/// `tests/fixtures/workflows/NAME`.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/workflows")
        .join(name)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it), claimed for the life
/// of this test process ([`try_claim`]): no other test process gets it while this one runs.
pub fn free_port() -> u16 {
    claim_port()
}

/// A port the OS says is free now, not claimed.
fn os_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// Waits until `cond` holds, polling; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()))
}

/// Waits until `f` returns `Some`, polling; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// What a finished command left.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Panics, showing both streams, unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to its end, with a watchdog: past `deadline` it is killed and the test fails.
pub fn output_within(mut cmd: Command, deadline: Duration) -> Out {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let status = wait_child(&mut child, deadline).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{shown} did not finish within {deadline:?}");
    });
    Out {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A temp dir to run prl-flow in, which stops everything it started when dropped.
pub struct Sandbox {
    dir: tempfile::TempDir,
    /// State dirs to tear down at the end.
    state_dirs: Mutex<Vec<PathBuf>>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("prl-flow-test-")
            .tempdir()
            .expect("create a temp dir");
        Self {
            dir,
            state_dirs: Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: impl AsRef<Path>, text: &str) {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dirs");
        }
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Copies `tests/fixtures/workflows/NAME` to `dest` in the sandbox, replacing each
    /// `@KEY@` of `vars` with its value.
    pub fn fixture(&self, name: &str, dest: &str, vars: &[(&str, &str)]) {
        let path = fixture_path(name);
        let mut text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()));
        for (k, v) in vars {
            text = text.replace(&format!("@{k}@"), v);
        }
        self.write(dest, &text);
    }

    /// Remembers a state dir (relative to the sandbox) for the teardown at the end.
    pub fn track_state_dir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        if let Ok(mut v) = self.state_dirs.lock() {
            if !v.contains(&p) {
                v.push(p.clone());
            }
        }
        p
    }

    /// `prl-flow ARGS` in the sandbox: cwd is the sandbox, `$WORK` names it, no colour.
    /// A `--state-dir DIR` among the args is tracked for teardown.
    pub fn cmd(&self, args: &[&str]) -> Command {
        if let Some(i) = args.iter().position(|a| *a == "--state-dir") {
            if let Some(d) = args.get(i + 1) {
                self.track_state_dir(d);
            }
        }
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.path())
            .env("WORK", self.path())
            .env("NO_COLOR", "1")
            .env_remove("PRL_FLOW_LOG")
            .env_remove("RUST_LOG");
        c
    }

    /// Runs `prl-flow ARGS` to its end (with the watchdog deadline).
    pub fn run(&self, args: &[&str]) -> Out {
        output_within(self.cmd(args), COMMAND_DEADLINE)
    }

    /// Starts `prl-flow ARGS` in the background; its stdout and stderr go to files
    /// `NAME.stdout` and `NAME.stderr` in the sandbox, so a test can wait on what it says.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Running {
        let stdout = self.join(format!("{name}.stdout"));
        let stderr = self.join(format!("{name}.stderr"));
        let mut c = self.cmd(args);
        c.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let child = c.spawn().expect("start prl-flow");
        Running {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// The lines of a file in the sandbox (none if it does not exist).
    pub fn lines(&self, rel: impl AsRef<Path>) -> Vec<String> {
        std::fs::read_to_string(self.join(rel))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many lines of a file in the sandbox are exactly `line`.
    pub fn count(&self, rel: impl AsRef<Path>, line: &str) -> usize {
        self.lines(rel).iter().filter(|l| *l == line).count()
    }

    /// Insta settings for output produced in this sandbox: the sandbox path, clock times,
    /// durations and pids are replaced by placeholders.
    pub fn settings(&self) -> insta::Settings {
        let mut s = insta::Settings::clone_current();
        for p in [
            self.path().to_path_buf(),
            self.path().canonicalize().unwrap_or_default(),
        ] {
            let p = p.to_string_lossy().into_owned();
            if !p.is_empty() {
                s.add_filter(&regex::escape(&p), "[SANDBOX]");
            }
        }
        for (re, with) in output_filters() {
            s.add_filter(re, with);
        }
        s
    }
}

/// Filters for what changes from run to run: clock times, measured durations (`(24ms)`,
/// `in 1m3s`; a duration written in a file, like `timeout = "500ms"`, stays), pids.
pub fn output_filters() -> Vec<(&'static str, &'static str)> {
    vec![
        (r"\b\d{2}:\d{2}:\d{2}\.\d{3}\b", "[TIME]"),
        (r"\((\d+h)?(\d+m)?\d+(ms|s)\)", "([DURATION])"),
        (
            r"\b(done|kept) in (\d+h)?(\d+m)?\d+(ms|s)\b",
            "$1 in [DURATION]",
        ),
        (r"\bpid \d+\b", "pid [PID]"),
    ]
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let dirs = self
            .state_dirs
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        for dir in dirs.iter().rev() {
            if !dir.join("journal.json").exists() {
                continue;
            }
            // `down` stops what the journal records (services, one-shots left running).
            let mut c = Command::new(bin());
            c.args(["-q", "down", "--state-dir"])
                .arg(dir)
                .current_dir(self.path());
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Ok(mut child) = c.spawn() {
                if wait_child(&mut child, Duration::from_secs(30)).is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            // Whatever is still alive of a recorded process group goes now.
            for pid in recorded_pids(dir) {
                if proc_matches(pid.0, pid.1) {
                    let _ = killpg(Pid::from_raw(pid.0), Signal::SIGKILL);
                }
            }
        }
    }
}

/// A prl-flow started in the background. Dropping it kills it (SIGKILL) if it still runs.
pub struct Running {
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("signal prl-flow");
    }

    /// Whether it still runs (not yet exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// What it has written to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for it to exit (failing the test past `deadline`).
    pub fn wait(&mut self, deadline: Duration) -> Out {
        let mut c = self
            .child
            .take()
            .expect("the process was already waited for");
        let status = wait_child(&mut c, deadline).unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "prl-flow did not exit within {deadline:?}\n--- stderr\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        });
        Out {
            code: status.code(),
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The journal records of a state dir, as JSON: the snapshot, then the log replayed over it
/// (the last line of an id wins; a torn line is skipped), as prl-flow reads it.
pub fn records(state_dir: &Path) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(state_dir.join("journal.json")) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            if let Some(m) = v.get("records").and_then(Value::as_object) {
                for (k, r) in m {
                    out.insert(k.clone(), r.clone());
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string(state_dir.join("journal.log")) {
        for line in text.lines() {
            let Ok(Value::Object(mut r)) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            // A change (`{"set":ID,...}`) sets its fields of the record put before it
            // (`null` clears one).
            if let Some(Value::String(id)) = r.remove("set") {
                if let Some(Value::Object(rec)) = out.get_mut(&id) {
                    for (k, v) in r {
                        if v.is_null() {
                            rec.remove(&k);
                        } else {
                            rec.insert(k, v);
                        }
                    }
                }
            } else if let Some(id) = r.get("id").and_then(Value::as_str) {
                out.insert(id.to_string(), Value::Object(r));
            }
        }
    }
    out
}

/// A record's status (`done`, `running`, ...), if the task has a record.
pub fn status_of(state_dir: &Path, id: &str) -> Option<String> {
    records(state_dir)
        .get(id)?
        .get("status")?
        .as_str()
        .map(str::to_string)
}

/// The pid in a task's recorded handle, if it has one.
pub fn pid_of(state_dir: &Path, id: &str) -> Option<i32> {
    records(state_dir)
        .get(id)?
        .get("handle")?
        .get("payload")?
        .get("pid")?
        .as_i64()
        .map(|p| p as i32)
}

/// `(pid, start time)` of every recorded local process handle.
fn recorded_pids(state_dir: &Path) -> Vec<(i32, u64)> {
    records(state_dir)
        .values()
        .filter_map(|r| {
            let h = r.get("handle")?.get("payload")?;
            Some((h.get("pid")?.as_i64()? as i32, h.get("start")?.as_u64()?))
        })
        .collect()
}

/// `(state letter, process group, start time)` from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let pgrp = f.get(2)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, pgrp, start))
}

/// Whether `pid` is a live process (a zombie is not: it has ended, only its parent has not
/// collected it yet).
pub fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((s, _, _)) if s != 'Z' && s != 'X')
}

/// Whether `pid` is alive and is still the process that started at `start`.
fn proc_matches(pid: i32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((s, _, st)) if s != 'Z' && s != 'X' && st == start)
}

/// The live processes of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(
            |&pid| matches!(proc_stat(pid), Some((s, g, _)) if g == pgid && s != 'Z' && s != 'X'),
        )
        .collect()
}

/// Waits until neither `pid` nor anything of its process group is alive.
#[track_caller]
pub fn wait_gone(what: &str, pid: i32) {
    wait_until(
        &format!("{what} (pid {pid}) and its process group to be gone"),
        Duration::from_secs(15),
        || !alive(pid) && group_members(pid).is_empty(),
    );
}

/// Whether `program --version`-style `args` runs and exits 0 (for optional tools).
pub fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Deployments on this machine (tests/local_deploy.rs): fixtures in other directories,
// blocks of free ports, the router, the processes under a state dir, plain HTTP.

/// `tests/fixtures/DIR/NAME`.
pub fn fixture_path_in(dir: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
        .join(name)
}

impl Sandbox {
    /// Like [`Sandbox::fixture`], from `tests/fixtures/DIR/`. Panics if a `@KEY@` placeholder
    /// is left unreplaced: a fixture half filled in would fail in a confusing way later.
    pub fn fixture_from(&self, dir: &str, name: &str, dest: &str, vars: &[(&str, &str)]) {
        let path = fixture_path_in(dir, name);
        let mut text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()));
        for (k, v) in vars {
            text = text.replace(&format!("@{k}@"), v);
        }
        let left = regex::Regex::new(r"@[A-Z][A-Z0-9_]*@").expect("placeholder regex");
        if let Some(m) = left.find(&text) {
            panic!(
                "fixture {}: `{}` was not replaced",
                path.display(),
                m.as_str()
            );
        }
        self.write(dest, &text);
    }
}

/// Ports handed out by [`free_port_block`] in this test process, never handed out twice.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// The first of `len` consecutive ports, all free on every local address (each was bound on
/// 0.0.0.0 a moment ago, which fails if anything listens on any address with that port), and
/// none handed out before by this test process or claimed by another ([`try_claim`]). The OS picks the first; the rest are tried,
/// and the whole block is picked again until every port of it binds. For recipes that derive
/// ports by offsets from a base (`router_metrics_port + g`, NIXL side channels from
/// `nixl_side_channel_port`).
pub fn free_port_block(len: u16) -> u16 {
    let len = len.max(1);
    for _ in 0..200 {
        let Ok(first) = std::net::TcpListener::bind("0.0.0.0:0") else {
            continue;
        };
        let Ok(base) = first.local_addr().map(|a| a.port()) else {
            continue;
        };
        if base.checked_add(len - 1).is_none() {
            continue;
        }
        let mut held = vec![first];
        let all_bind = (1..len).all(
            |i| match std::net::TcpListener::bind(("0.0.0.0", base + i)) {
                Ok(l) => {
                    held.push(l);
                    true
                }
                Err(_) => false,
            },
        );
        if !all_bind {
            continue;
        }
        let mut given = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if (base..base + len).any(|p| given.contains(&p)) {
            continue;
        }
        // Claimed across test processes too (a claim is never given back: the block may be
        // half claimed when another process holds a later port of it).
        if !(base..base + len).all(|p| try_claim("port", &p.to_string())) {
            continue;
        }
        given.extend(base..base + len);
        return base;
    }
    panic!("found no block of {len} free ports in 200 tries");
}

/// The mock engine's program, built beside `prl-flow` by `cargo build --workspace`.
pub fn mock_engine() -> String {
    std::path::Path::new(env!("CARGO_BIN_EXE_prl-flow"))
        .with_file_name("prl-flow-mock-engine")
        .to_string_lossy()
        .into_owned()
}

/// The `vllm-router` program the tests use, as prl-flow finds it: `PRL_FLOW_ROUTER` (set by
/// `./dev test`) if it names a program that exists, else the venv `./dev` installs, else
/// `vllm-router` on `PATH`. `None` when there is none.
pub fn router_program() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PRL_FLOW_ROUTER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let venv = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|cache| {
            cache.join(format!(
                "prl-flow/router-{}/bin/vllm-router",
                prl_flow::tools::ROUTER_VERSION
            ))
        });
    let path = std::env::var_os("PATH").unwrap_or_default();
    venv.into_iter()
        .chain(std::env::split_paths(&path).map(|d| d.join("vllm-router")))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------
// What a test needs from the machine: skipped loudly, or failed under the switch.

/// The switch that turns every missing prerequisite (the router, sshd, network namespaces,
/// Mooncake, SLURM) from a loud skip into a failure. `./dev test`, and so CI, set it to `1`.
pub const REQUIRE_ALL: &str = "PRL_FLOW_TEST_REQUIRE_ALL";

/// Whether [`REQUIRE_ALL`] is on (set, and neither empty nor `0`).
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The one check of a prerequisite. `found` says whether `what` is there; when it is not,
/// with [`REQUIRE_ALL`] on the test fails, naming `what` and `how` to get it; otherwise it
/// prints a loud `SKIPPED` line saying what goes untested (shown even when the harness
/// captures output), and returns false (the caller returns, or leaves out the part that
/// needs it).
#[track_caller]
pub fn prerequisite(found: bool, what: &str, how: &str) -> bool {
    if found {
        return true;
    }
    if require_all() {
        panic!(
            "missing: {what}; {REQUIRE_ALL} is set, so this test may not skip. To get it: {how}"
        );
    }
    // Straight to the stderr of the test binary, past the harness's capture of passing
    // tests' output: a skip is seen in a plain `cargo test` too.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!! SKIPPED, missing: {what}. To get it: {how}. ({REQUIRE_ALL}=1 makes this a failure)\n"
    );
    false
}

/// How to get the router, for [`prerequisite`].
pub const ROUTER_HOW: &str = "run `./dev test`, which installs vllm-router 0.1.17 into \
     ~/.cache/prl-flow/router-0.1.17, or set PRL_FLOW_ROUTER to the program";

/// The router, or `None` after the [`prerequisite`] check said why.
#[track_caller]
pub fn router_or_skip() -> Option<PathBuf> {
    let found = router_program();
    let what = match std::env::var_os("PRL_FLOW_ROUTER").filter(|p| !p.is_empty()) {
        Some(p) if found.is_none() => format!(
            "vllm-router (PRL_FLOW_ROUTER names `{}`, which does not exist)",
            Path::new(&p).display()
        ),
        _ => "vllm-router".to_string(),
    };
    if prerequisite(found.is_some(), &what, ROUTER_HOW) {
        found
    } else {
        None
    }
}

/// A live process, as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
    pub cwd: PathBuf,
}

/// Every live process whose working directory is inside `dir`. The local backend starts each
/// task's process in its run dir (`STATE_DIR/run/TASK`), and children inherit it, so this is
/// everything a state dir's runs started and that still runs, whoever its parent is now.
pub fn processes_under(dir: &Path) -> Vec<Proc> {
    let mut roots = vec![dir.to_path_buf()];
    if let Ok(c) = dir.canonicalize() {
        roots.push(c);
    }
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<Proc> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid))
        .filter_map(|pid| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            if !roots.iter().any(|r| cwd.starts_with(r)) {
                return None;
            }
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            Some(Proc { pid, cmdline, cwd })
        })
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

/// One HTTP request to a local service, answered within 30 s: `(status, body)`, or `Err`
/// saying why there was no answer. Blocking (it runs its own small runtime), for tests.
pub fn http(method: &str, url: &str, body: Option<&Value>) -> Result<(u16, String), String> {
    http_with(method, url, body, &[])
}

/// [`http`] with request headers.
pub fn http_with(
    method: &str,
    url: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = client.request(m, url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        Ok((status, text))
    })
}

/// The worker URLs the router at `router` lists (`GET /list_workers`), without a trailing
/// `/`, sorted.
#[track_caller]
pub fn router_workers(router: &str) -> Vec<String> {
    let url = format!("{router}/list_workers");
    let (status, text) = http("GET", &url, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "GET {url}: {text}");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut urls: Vec<String> = v["urls"]
        .as_array()
        .unwrap_or_else(|| panic!("no `urls` in {text}"))
        .iter()
        .filter_map(|u| u.as_str().map(|s| s.trim_end_matches('/').to_string()))
        .collect();
    urls.sort();
    urls
}

// ---------------------------------------------------------------------------------------
// Claims: values that two test processes running at once must never share (a port, a tag
// that names network interfaces, a subnet). A value is claimed by an exclusive `flock` on a
// file of its own in a directory every test process shares (`$TMPDIR/prl-flow-test-claims`);
// the lock is held for the life of the process and released by the OS when it ends, even on
// `kill -9`, so a crashed run leaves nothing taken. A claim excludes a second claim of the
// same value from this process too (a lock belongs to the open file, not the process).

/// The open claim files of this process: their locks last as long as it does.
static CLAIMS: Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = Mutex::new(Vec::new());

/// Claims `kind`-`value` for the life of this process; `false` when another claim (of any
/// process) holds it.
pub fn try_claim(kind: &str, value: &str) -> bool {
    let dir = std::env::temp_dir().join("prl-flow-test-claims");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{kind}-{value}")))
    else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            CLAIMS.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
            true
        }
        Err(_) => false,
    }
}

/// The first of `candidates` that [`try_claim`] gets and `usable` accepts; panics when none.
pub fn claim_first(
    kind: &str,
    candidates: impl IntoIterator<Item = String>,
    mut usable: impl FnMut(&str) -> bool,
) -> String {
    candidates
        .into_iter()
        .find(|v| usable(v) && try_claim(kind, v))
        .unwrap_or_else(|| panic!("no free `{kind}` value left to claim"))
}

/// A TCP port free now and claimed for the life of this process: no other test process
/// that claims its ports can get the same one while this one runs.
pub fn claim_port() -> u16 {
    for _ in 0..1000 {
        let port = os_port();
        if try_claim("port", &port.to_string()) {
            return port;
        }
    }
    panic!("no free port could be claimed");
}

/// Panics unless `doc` matches `docs/schemas/NAME`, listing every mismatch.
#[track_caller]
pub fn assert_matches_schema(name: &str, doc: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schemas")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read the schema");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "does not match {name}:\n{}\n--- document\n{doc:#}",
        errors.join("\n")
    );
}
