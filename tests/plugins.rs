//! Site plugins, end to end: the conformance scenario against the built-in local backend
//! and the example plugin (`examples/plugins/prl-flow-backend-wrapped`); broken plugins
//! (one that dies, hangs, talks nonsense or speaks another protocol) fail with a message
//! naming the plugin, in bounded time; and a small deployment (allocate, a service on
//! node1, a client on node0) runs through the plugin on the engine.
//!
//! Every test bounds itself ([`bounded`]) so a hang fails it instead of stalling the suite,
//! and what a test starts is stopped by a `Drop` guard. Ports come from the OS.
//!
//! The tests at the end run the real binary (`--backend wrapped`, `--site`,
//! `prl-flow plugins`, `prl-flow plugin test`).

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prl_flow::actions::Action;
use prl_flow::plan::{Command, Plan, Probe, Readiness, TaskSpec};
use prl_flow::session;
use prl_flow_backend::{Allocation, Backend, ProcHandle, ProcState};
use prl_flow_engine::{Cancel, Event, Subscriber};
use prl_flow_local::LocalBackend;
use prl_flow_plugin::{conformance, PluginBackend, Scenario, Step, Timeouts};
use serde_json::{json, Value};

/// The `allocate` task's id and kind.
const ALLOCATE: &str = prl_flow::actions::Action::Allocate.name();

/// The longest any test here may take before it counts as hung.
const LIMIT: Duration = Duration::from_secs(90);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {LIMIT:?}: a hang"),
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins")
}

fn wrapped() -> PathBuf {
    examples().join("prl-flow-backend-wrapped")
}

async fn run_conformance(
    make: &(dyn Fn() -> Result<Arc<dyn Backend>, String> + Send + Sync),
) -> prl_flow_plugin::ConformanceSummary {
    let mut lines = Vec::new();
    let summary = bounded(
        "the conformance scenario",
        conformance(make, &Scenario::default(), &mut |s: &Step| {
            lines.push(s.line())
        }),
    )
    .await;
    assert!(
        summary.ok(),
        "conformance failed:\n{}\n{}",
        lines.join("\n"),
        summary.line()
    );
    summary
}

#[tokio::test]
async fn the_local_backend_passes_conformance() {
    let make = || Ok(Arc::new(LocalBackend::new()) as Arc<dyn Backend>);
    run_conformance(&make).await;
}

#[tokio::test]
async fn the_example_plugin_passes_conformance() {
    let make = || Ok(Arc::new(PluginBackend::new("wrapped", wrapped())) as Arc<dyn Backend>);
    run_conformance(&make).await;
}

#[tokio::test]
async fn a_plugin_without_the_optional_methods_passes_conformance() {
    // The example plugin, announcing nothing optional: prl-flow polls `status` instead of
    // `wait`, and reads logs from the file the handle names.
    let dir = tempfile::tempdir().expect("tempdir");
    let source = std::fs::read_to_string(wrapped()).expect("read the example plugin");
    let plain = source.replace(
        "CAPABILITIES = [\"allocation_alive\", \"wait\", \"log_tail\", \"read_log\", \"recover\"]",
        "CAPABILITIES = []",
    );
    assert_ne!(
        plain, source,
        "the example plugin's capabilities line moved"
    );
    let exe = script(dir.path(), "prl-flow-backend-plain", &plain);
    let make = move || Ok(Arc::new(PluginBackend::new("plain", exe.clone())) as Arc<dyn Backend>);
    run_conformance(&make).await;
}

#[tokio::test]
async fn a_failing_step_is_reported_and_the_rest_skipped() {
    // The example plugin, with an allocation that is dead at once.
    let dir = tempfile::tempdir().expect("tempdir");
    let source = std::fs::read_to_string(wrapped()).expect("read the example plugin");
    let broken = source.replace(
        "    param(params, \"allocation\")\n    return True",
        "    param(params, \"allocation\")\n    return False",
    );
    assert_ne!(
        broken, source,
        "the example plugin's allocation_alive moved"
    );
    let exe = script(dir.path(), "prl-flow-backend-forgetful", &broken);
    let make =
        move || Ok(Arc::new(PluginBackend::new("forgetful", exe.clone())) as Arc<dyn Backend>);
    let mut seen = Vec::new();
    let summary = bounded(
        "the conformance scenario",
        conformance(&make, &Scenario::default(), &mut |s: &Step| {
            seen.push(s.outcome)
        }),
    )
    .await;
    use prl_flow_plugin::StepOutcome::{Failed, Ok as Passed, Skipped};
    assert_eq!(seen[..3], [Passed, Failed, Skipped]);
    assert_eq!(seen.len(), prl_flow_plugin::conformance::STEPS.len());
    assert!(!summary.ok());
    assert!(summary.steps[1]
        .detail
        .contains("says no right after `allocate`"));
    assert_eq!(
        summary.line(),
        "failed: 1 of 10 steps passed; `allocation is alive` failed"
    );
}

// ---- broken plugins ---------------------------------------------------------------------

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write the plugin");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// A Python plugin that shakes hands properly (with `hello`, a dict to answer with) and
/// then does `otherwise` for every other request (`r` is the request).
fn python_plugin(dir: &Path, name: &str, hello: &str, otherwise: &str) -> PathBuf {
    let body = format!(
        r#"#!/usr/bin/env python3
import json, sys, time
def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    r = json.loads(line)
    if r["method"] == "hello":
        say({{"id": r["id"], "result": {hello}}})
        continue
{otherwise}
"#,
        otherwise = otherwise
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    script(dir, name, &body)
}

const GOOD_HELLO: &str = r#"{"protocol": 1, "name": "broken", "capabilities": []}"#;

/// The error of the first request to a plugin (a `status` after the handshake), and how long
/// it took.
async fn first_error(exe: &Path, timeouts: Timeouts) -> (String, Duration) {
    let b = PluginBackend::new("broken", exe).with_timeouts(timeouts);
    let began = Instant::now();
    let h = ProcHandle::new("broken", 1, &json!({"pid": 1})).expect("handle");
    let r = bounded("a request to a broken plugin", b.status(&h)).await;
    match r {
        Ok(s) => panic!("a broken plugin answered {s:?}"),
        Err(e) => (e.message, began.elapsed()),
    }
}

#[tokio::test]
async fn a_plugin_that_crashes_at_hello_is_named_with_its_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = script(
        dir.path(),
        "crash",
        "#!/bin/sh\necho 'site scheduler is not configured' >&2\nexit 3\n",
    );
    let (e, _) = first_error(&exe, Timeouts::default()).await;
    assert!(
        e.contains("plugin `broken` exited with status 3 before answering `hello`"),
        "{e}"
    );
    assert!(e.contains("site scheduler is not configured"), "{e}");
    assert!(e.contains(&exe.display().to_string()), "{e}");
}

#[tokio::test]
async fn a_plugin_that_hangs_at_hello_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = script(
        dir.path(),
        "mute",
        "#!/bin/sh\necho 'thinking' >&2\nexec sleep 600\n",
    );
    let (e, took) = first_error(&exe, Timeouts::all(Duration::from_secs(3))).await;
    assert!(
        e.contains("plugin `broken` did not answer `hello` within 3s"),
        "{e}"
    );
    assert!(e.contains("thinking"), "{e}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[tokio::test]
async fn a_plugin_that_hangs_on_a_request_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "hang",
        GOOD_HELLO,
        "time.sleep(0)  # never answers",
    );
    // A slow start (a loaded machine) must not count: the handshake gets the usual time.
    let timeouts = Timeouts {
        hello: Timeouts::default().hello,
        ..Timeouts::all(Duration::from_secs(1))
    };
    let (e, took) = first_error(&exe, timeouts).await;
    assert!(
        e.contains("plugin `broken` did not answer `status` within 1s"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[tokio::test]
async fn a_plugin_that_answers_nonsense_is_quoted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "nonsense",
        GOOD_HELLO,
        "print('status: all good, I think', flush=True)",
    );
    let (e, _) = first_error(&exe, Timeouts::default()).await;
    assert!(
        e.contains("plugin `broken` wrote a line that is not JSON"),
        "{e}"
    );
    assert!(e.contains("status: all good, I think"), "{e}");
    assert!(e.contains("before answering `status`"), "{e}");
}

#[tokio::test]
async fn a_plugin_that_answers_an_unknown_shape_is_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "shape",
        GOOD_HELLO,
        r#"say({"id": r["id"], "result": "fine"})"#,
    );
    let (e, _) = first_error(&exe, Timeouts::default()).await;
    assert!(e.contains("plugin `broken` answered `status` with"), "{e}");
    assert!(e.contains("not a process state"), "{e}");
}

#[tokio::test]
async fn a_plugin_of_another_protocol_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "v2",
        r#"{"protocol": 2, "name": "broken"}"#,
        "pass",
    );
    let (e, _) = first_error(&exe, Timeouts::default()).await;
    assert!(e.contains("plugin `broken` speaks protocol 2"), "{e}");
    assert!(e.contains("this prl-flow speaks protocol 1"), "{e}");
}

#[tokio::test]
async fn a_plugin_that_dies_during_a_request_is_named_and_restarted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "dies",
        GOOD_HELLO,
        "sys.stderr.write('lost the scheduler connection\\n'); sys.exit(139)",
    );
    let b = PluginBackend::new("broken", &exe);
    for _ in 0..2 {
        // The second call starts the plugin again (and it dies again).
        let h = ProcHandle::new("broken", 1, &json!({})).expect("handle");
        let e = match bounded("status", b.status(&h)).await {
            Ok(s) => panic!("a dying plugin answered {s:?}"),
            Err(e) => e.message,
        };
        assert!(
            e.contains("plugin `broken` exited with status 139 before answering `status`"),
            "{e}"
        );
        assert!(e.contains("lost the scheduler connection"), "{e}");
    }
}

#[tokio::test]
async fn a_plugin_error_is_passed_on_with_its_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "refuses",
        GOOD_HELLO,
        r#"say({"id": r["id"], "error": {"code": "failed", "message": "no such job 42"}})"#,
    );
    let (e, _) = first_error(&exe, Timeouts::default()).await;
    assert_eq!(e, "plugin `broken` could not `status`: no such job 42");
}

#[tokio::test]
async fn concurrent_requests_are_matched_by_id() {
    // Answers arrive in reverse order of the requests: each caller still gets its own.
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = python_plugin(
        dir.path(),
        "reverse",
        GOOD_HELLO,
        r#"held = globals().setdefault("held", [])
held.append(r)
if len(held) == 3:
    for q in reversed(held):
        say({"id": q["id"], "result": {"state": "exited", "code": q["params"]["handle"]["n"]}})"#,
    );
    let b = PluginBackend::new("broken", &exe);
    let [h1, h2, h3] =
        [1, 2, 3].map(|n| ProcHandle::new("broken", 1, &json!({ "n": n })).expect("handle"));
    let (x, y, z) = bounded("three requests", async {
        tokio::join!(b.status(&h1), b.status(&h2), b.status(&h3))
    })
    .await;
    assert_eq!(x, Ok(ProcState::Exited(Some(1))));
    assert_eq!(y, Ok(ProcState::Exited(Some(2))));
    assert_eq!(z, Ok(ProcState::Exited(Some(3))));
}

// ---- a deployment through the plugin, on the engine ---------------------------------------

/// Kills the process groups of recorded handles (if still the same processes) on drop.
#[derive(Default, Clone)]
struct Started(Arc<Mutex<Vec<(String, Value)>>>);

impl Started {
    fn handle(&self, id: &str) -> Option<Value> {
        let list = self.0.lock().expect("lock");
        list.iter()
            .rev()
            .find(|(i, _)| i == id)
            .map(|(_, h)| h.clone())
    }
}

impl Subscriber for Started {
    fn on_event(&self, event: &Event) {
        let (id, handle) = match event {
            Event::Spawned { id, handle, .. } => (id, handle),
            Event::Finished {
                id,
                handle: Some(handle),
                ..
            } => (id, handle),
            _ => return,
        };
        if let Ok(mut list) = self.0.lock() {
            list.push((id.to_string(), handle.clone()));
        }
    }
}

fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Drop for Started {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) > 1 {
            return;
        }
        let Ok(list) = self.0.lock() else { return };
        for (_, h) in list.iter() {
            let (Some(pid), Some(start)) = (
                h["payload"].get("pid").and_then(Value::as_i64),
                h["payload"].get("start").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let pid = pid as i32;
            if start_time(pid) == Some(start) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// `(pid, start time)` in a handle of the local backend or the example plugin (its payload
/// keeps both).
fn pid_in(handle: &Value) -> Option<(i32, u64)> {
    let p = &handle["payload"];
    Some((p.get("pid")?.as_i64()? as i32, p.get("start")?.as_u64()?))
}

/// Teardown as the OS sees it, not as the backend says: the service's port on `addr`
/// refuses connections, and its process has ended (`kill(pid, 0)` fails with ESRCH, or
/// only a zombie is left for its parent to collect, or the pid is another process now).
/// Waits a little: the process may take a moment to be reaped after its `stop` returned.
#[track_caller]
fn assert_gone(what: &str, addr: &str, port: u16, (pid, start): (i32, u64)) {
    use nix::errno::Errno;
    let ended = || match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => true,
        _ => !common::alive(pid) || start_time(pid) != Some(start),
    };
    common::wait_until(
        &format!("{what} (pid {pid}) to be gone"),
        Duration::from_secs(10),
        ended,
    );
    assert!(
        std::net::TcpStream::connect((addr, port)).is_err(),
        "{what}: {addr}:{port} still accepts connections"
    );
}

/// A port claimed for this test (no other test of any process gets it) that is free on
/// `addr` now.
fn free_port(addr: &str) -> u16 {
    loop {
        let port = common::claim_port();
        if std::net::TcpListener::bind((addr, port)).is_ok() {
            return port;
        }
    }
}

fn task(id: &str, needs: &[&str], node: Option<&str>, command: Command) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        kind: "custom".into(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
        node: node.map(String::from),
        command,
        timeout: Some(Duration::from_secs(60)),
        ..TaskSpec::default()
    }
}

#[tokio::test]
async fn a_deployment_runs_through_the_example_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port("127.0.0.2");
    let url = format!("http://${{host:node1}}:{port}/");
    let mut allocate = task(
        ALLOCATE,
        &[],
        None,
        Command::Builtin {
            action: Action::Allocate,
            args: Value::Null,
        },
    );
    allocate.kind = Action::Allocate.name().into();
    let mut server = task(
        "server",
        &[ALLOCATE],
        Some("node1"),
        Command::Argv {
            argv: [
                "python3",
                "-u",
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "${host:node1}",
            ]
            .map(String::from)
            .to_vec(),
        },
    );
    server.service = true;
    server.ready = Some(Readiness::new(Probe::Http { url: url.clone() }));
    let client = task(
        "client",
        &["server"],
        Some("node0"),
        Command::Shell {
            script: format!(
                "python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1])' {url} && echo \"wrapped=$SITE_WRAPPED via=$VIA_WRAPPER\" > out.txt"
            ),
        },
    );
    let plan = Plan {
        name: "through-plugin".into(),
        backend: "wrapped".into(),
        nodes: vec!["node0".into(), "node1".into()],
        tasks: vec![allocate, server, client],
        ..Plan::default()
    };

    // The site's wrapper: `env VIA_WRAPPER=yes` in front of every command.
    let config = json!({ "wrapper": ["env", "VIA_WRAPPER=yes"] });
    let backend: Arc<dyn Backend> =
        Arc::new(PluginBackend::new("wrapped", wrapped()).with_config(config.clone()));
    let started = Started::default();
    let prepared = session::run::prepare(
        &plan,
        backend.clone(),
        dir.path(),
        &session::RunSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("the plan does not make a run: {e:?}"));
    let report = bounded(
        "the run",
        prepared.execute(vec![Arc::new(started.clone())], Cancel::never()),
    )
    .await
    .expect("the run")
    .report;
    let errors: Vec<String> = report
        .errors
        .iter()
        .flatten()
        .map(|e| e.message.clone())
        .collect();
    assert!(report.ok(), "the run failed: {errors:#?}");

    let out = std::fs::read_to_string(dir.path().join("run/client/out.txt"))
        .expect("the client's output");
    assert_eq!(out.trim(), "wrapped=1 via=yes");

    // A later prl-flow (`status`, `down`): a new plugin process finds the service by its
    // recorded handle, stops it, and releases the nodes.
    drop(backend);
    let later = PluginBackend::new("wrapped", wrapped()).with_config(config);
    let h = started.handle("server").expect("the server's handle");
    assert_eq!(h["backend"], "wrapped");
    let h = ProcHandle::try_from(&h).expect("a handle");
    assert_eq!(
        bounded("status", later.status(&h)).await,
        Ok(ProcState::Running)
    );
    bounded("stop", later.stop(&h, Duration::from_secs(5)))
        .await
        .expect("stop");
    assert_ne!(
        bounded("status", later.status(&h)).await,
        Ok(ProcState::Running)
    );
    // Guards the plugin's `stop`: the server is gone as the OS sees it, not only by `status`.
    let server = started.handle("server").expect("the server's handle");
    let server = pid_in(&server).expect("a pid and start time in the server's handle");
    assert_gone("the server", "127.0.0.2", port, server);
    let a: Allocation = serde_json::from_value(started.handle(ALLOCATE).expect("the allocation"))
        .expect("an allocation");
    assert_eq!(
        a.hosts,
        BTreeMap::from([
            ("node0".to_string(), "127.0.0.1".to_string()),
            ("node1".to_string(), "127.0.0.2".to_string())
        ])
    );
    assert_eq!(a.handle.backend, "wrapped");
    bounded("release", later.release(&a))
        .await
        .expect("release");
}

// ---- the binary (after the CLI calls `prl_flow::site`) ------------------------------------

/// Runs `prl-flow down` in its dir on drop, so a failed test leaves nothing running.
struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// `prl-flow` in the test's dir, with its `bin/` (plugins a test writes) and the
    /// example plugin first on `PATH`.
    fn std_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_prl-flow"));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin(), examples()];
        dirs.extend(std::env::split_paths(&path));
        c.current_dir(self.dir.path())
            .env("PATH", std::env::join_paths(dirs).expect("PATH"))
            .env_remove("PRL_FLOW_SITE");
        c
    }

    fn cmd(&self) -> assert_cmd::Command {
        let mut c = assert_cmd::Command::from_std(self.std_cmd());
        c.timeout(LIMIT);
        c
    }

    /// Where a test puts plugins of its own (first on `PATH`).
    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// Writes an executable plugin `prl-flow-backend-NAME` into [`Self::bin`].
    fn plugin(&self, name: &str, body: &str) -> PathBuf {
        std::fs::create_dir_all(self.bin()).expect("bin dir");
        script(&self.bin(), &format!("prl-flow-backend-{name}"), body)
    }

    /// `(pid, start time)` of the `server` task of `wf.toml`, from its journal.
    fn server(&self) -> (i32, u64) {
        self.service_of("server", "wrapped")
    }

    /// `(pid, start time)` of service `id` of `wf.toml`, which `backend` started, from its
    /// journal.
    fn service_of(&self, id: &str, backend: &str) -> (i32, u64) {
        let st = self.dir.path().join(".prl-flow/wf");
        let recs = common::records(&st);
        let h = &recs.get(id).expect("a record of the service")["handle"];
        assert_eq!(h["backend"], backend, "{h}");
        let server = pid_in(h).expect("a pid and start time in the server's handle");
        assert!(common::alive(server.0), "the server runs before `down`");
        server
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.cmd().arg("down").output();
    }
}

fn workflow(port: u16) -> String {
    format!(
        r#"
[[task]]
id = "server"
argv = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
service = true
ready = {{ http = "http://127.0.0.1:{port}/", interval = "100ms" }}
timeout = "60s"

[[task]]
id = "hello"
needs = ["server"]
run = "echo wrapped=$SITE_WRAPPED"
timeout = "60s"
"#
    )
}

#[test]

fn cli_runs_a_workflow_through_the_plugin_and_tears_it_down() {
    let cli = Cli::new();
    let port = free_port("127.0.0.1");
    cli.write("wf.toml", &workflow(port));
    cli.cmd()
        .args(["run", "wf.toml", "--backend", "wrapped"])
        .assert()
        .success();
    let log =
        std::fs::read_to_string(cli.dir.path().join(".prl-flow/wf/logs/hello.log")).expect("log");
    assert_eq!(log.trim(), "wrapped=1");
    let status = cli.cmd().arg("status").output().expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success() && text.contains("ready"), "{text}");
    let server = cli.server();
    cli.cmd().arg("down").assert().success();
    // Guards `down` through the plugin: checked by the OS, not by the exit code.
    assert_gone("the server", "127.0.0.1", port, server);
}

#[test]

fn cli_takes_the_backend_from_a_site_file() {
    let cli = Cli::new();
    let port = free_port("127.0.0.1");
    cli.write("wf.toml", &workflow(port));
    let site = cli.write(
        "site.toml",
        &format!(
            "name = \"test\"\n[backend]\ntype = \"wrapped\"\nplugin = \"{}\"\n",
            wrapped().display()
        ),
    );
    // From the environment, with the plugin named by the site file (not found on PATH).
    cli.cmd()
        .env("PRL_FLOW_SITE", &site)
        .env("PATH", "/usr/bin:/bin")
        .args(["run", "wf.toml"])
        .assert()
        .success();
    let log =
        std::fs::read_to_string(cli.dir.path().join(".prl-flow/wf/logs/hello.log")).expect("log");
    assert_eq!(log.trim(), "wrapped=1");
    let server = cli.server();
    cli.cmd()
        .args(["down", "--site"])
        .arg(&site)
        .assert()
        .success();
    // Guards `down --site`: the backend named by the site file stops the server, as the OS
    // sees it.
    assert_gone("the server", "127.0.0.1", port, server);
}

#[test]

fn cli_lists_plugins_and_tests_them() {
    let cli = Cli::new();
    let out = cli.cmd().arg("plugins").output().expect("plugins");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("local") && text.contains("built-in"),
        "{text}"
    );
    assert!(
        text.contains("wrapped") && text.contains("`wrapped` 1.0, protocol 1"),
        "{text}"
    );
    for name in ["wrapped", "local"] {
        let out = cli
            .cmd()
            .args(["plugin", "test", name])
            .output()
            .expect("plugin test");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {text}");
        assert!(text.contains("passed: all 10 steps"), "{text}");
    }
}

#[test]

fn cli_names_what_is_available_for_an_unknown_backend() {
    let cli = Cli::new();
    cli.write("wf.toml", "[[task]]\nid = \"a\"\nrun = \"true\"\n");
    let out = cli
        .cmd()
        .args(["run", "wf.toml", "--backend", "wraped"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no backend `wraped`") && err.contains("did you mean `wrapped`?"),
        "{err}"
    );
}

// ---- the plugin process, as the OS sees it ------------------------------------------------

/// What a test plugin wrote of itself: `(its pid, its process group, a child's pid)`.
fn plugin_pids(file: &Path) -> (i32, i32, i32) {
    let text = std::fs::read_to_string(file).expect("the plugin's pid file");
    let v: Vec<i32> = text
        .split_whitespace()
        .map(|w| w.parse().expect("a pid"))
        .collect();
    (v[0], v[1], v[2])
}

/// Python lines that start a child in the plugin's own process group (a helper a plugin
/// might keep) and write `PID PGID CHILD` to `file`.
fn with_child(file: &Path) -> String {
    format!(
        r#"import os, subprocess
kid = subprocess.Popen(["sleep", "600"])
with open("{f}.tmp", "w") as f:
    f.write(f"{{os.getpid()}} {{os.getpgid(0)}} {{kid.pid}}")
os.replace("{f}.tmp", "{f}")"#,
        f = file.display()
    )
}

/// The plugin and its child are gone (waited for off the runtime, which must keep running
/// the client's tasks), and the plugin led a process group other than the test's.
async fn assert_plugin_gone((pid, pgid, kid): (i32, i32, i32)) {
    assert_eq!(pgid, pid, "the plugin leads its own process group");
    assert_ne!(
        pgid,
        nix::unistd::getpgrp().as_raw(),
        "the plugin must not share prl-flow's process group (a Ctrl-C would reach it)"
    );
    tokio::task::spawn_blocking(move || {
        common::wait_gone("the plugin", pid);
        common::wait_until(
            &format!("the plugin's child (pid {kid}) to be gone"),
            Duration::from_secs(15),
            || !common::alive(kid),
        );
    })
    .await
    .expect("waiting for the plugin to be gone");
}

#[tokio::test]
async fn a_plugin_that_writes_nonsense_is_killed_with_its_children() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    let exe = python_plugin(
        dir.path(),
        "nonsense",
        GOOD_HELLO,
        &format!(
            "{}\nprint('status: all good, I think', flush=True)\ntime.sleep(600)",
            with_child(&pids)
        ),
    );
    let (e, _) = first_error(&exe, Timeouts::default()).await;
    assert!(e.contains("wrote a line that is not JSON"), "{e}");
    assert_plugin_gone(plugin_pids(&pids)).await;
}

#[tokio::test]
async fn a_plugin_that_lingers_after_end_of_input_is_killed_with_its_children() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    let body = format!(
        r#"#!/usr/bin/env python3
import json, sys, time
{child}
for line in sys.stdin:
    r = json.loads(line)
    result = {hello} if r["method"] == "hello" else {{"state": "running"}}
    sys.stdout.write(json.dumps({{"id": r["id"], "result": result}}) + "\n"); sys.stdout.flush()
# End of input: a plugin should exit now. This one lingers.
time.sleep(600)
"#,
        child = with_child(&pids),
        hello = GOOD_HELLO
    );
    let exe = script(dir.path(), "lingers", &body);
    let b = PluginBackend::new("broken", &exe);
    let h = ProcHandle::new("broken", 1, &json!({"pid": 1})).expect("handle");
    assert_eq!(
        bounded("status", b.status(&h)).await,
        Ok(ProcState::Running)
    );
    let who = plugin_pids(&pids);
    assert!(common::alive(who.0) && common::alive(who.2));
    // Closes its stdin; past the grace period it is killed, with its process group.
    b.shutdown().await;
    assert_plugin_gone(who).await;
}

// ---- a plugin failing under a deployment (the binary) -------------------------------------

/// The example plugin, with its `answer` made to do `instead` for `method` (Python, at the
/// indentation of the `elif` chain's bodies).
fn example_with(method: &str, instead: &str) -> String {
    let source = std::fs::read_to_string(wrapped()).expect("read the example plugin");
    let anchor = "        elif method in METHODS:\n";
    let body: String = instead
        .lines()
        .map(|l| format!("            {l}\n"))
        .collect();
    let changed = source.replacen(
        anchor,
        &format!("        elif method == \"{method}\":\n{body}{anchor}"),
        1,
    );
    assert_ne!(changed, source, "the example plugin's `answer` moved");
    changed
}

/// A service that writes a start mark (`starts.ID`, one line per start) and then serves.
fn marked_service(cli: &Cli, id: &str, port: u16, before: &str) -> String {
    let mark = cli.dir.path().join(format!("starts.{id}"));
    format!(
        r#"
[[task]]
id = "{id}"
run = "echo start >> {mark}; {before} exec python3 -m http.server {port} --bind 127.0.0.1"
service = true
ready = {{ http = "http://127.0.0.1:{port}/", interval = "100ms" }}
timeout = "60s"
"#,
        mark = mark.display()
    )
}

fn starts(cli: &Cli, id: &str) -> usize {
    std::fs::read_to_string(cli.dir.path().join(format!("starts.{id}")))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn cli_a_lost_spawn_answer_is_recovered_by_its_spawn_id() {
    // The plugin starts the process, records it, and then answers `spawn` with garbage
    // (and is killed for it). Asked by the spawn's id, a fresh plugin process finds the
    // process: the run goes on with it, `down` stops it, a resume starts nothing again.
    let cli = Cli::new();
    cli.plugin(
        "lossy",
        &example_with(
            "spawn",
            "METHODS[method](request.get(\"params\"))\nwith stdout_lock:\n    sys.stdout.write(\"spawned it, I think\\n\"); sys.stdout.flush()\nreturn",
        ),
    );
    let port = free_port("127.0.0.1");
    cli.write("wf.toml", &marked_service(&cli, "server", port, ""));
    let run = cli
        .cmd()
        .args(["run", "wf.toml", "--backend", "lossy"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert_eq!(starts(&cli, "server"), 1, "{err}");
    let server = cli.service_of("server", "lossy");

    let resume = cli
        .cmd()
        .args(["run", "wf.toml", "--backend", "lossy", "--resume"])
        .output()
        .expect("resume");
    let err = String::from_utf8_lossy(&resume.stderr);
    assert!(resume.status.success(), "{err}");
    assert_eq!(
        starts(&cli, "server"),
        1,
        "a resume started it again: {err}"
    );
    assert!(common::alive(server.0), "the resume stopped the server");

    cli.cmd().arg("down").assert().success();
    assert_gone("the server", "127.0.0.1", port, server);
}

#[test]
fn cli_status_shows_a_failing_plugin_and_exits_non_zero() {
    let cli = Cli::new();
    let good = std::fs::read_to_string(wrapped()).expect("read the example plugin");
    let exe = cli.plugin("flaky", &good);
    let port = free_port("127.0.0.1");
    cli.write("wf.toml", &marked_service(&cli, "server", port, ""));
    cli.cmd()
        .args(["run", "wf.toml", "--backend", "flaky"])
        .assert()
        .success();
    let server = cli.service_of("server", "flaky");

    // The handle names the plugin's path: `status` runs whatever is there now.
    let hello =
        r#"{"protocol": 1, "name": "flaky", "capabilities": [], "timeouts": {"status": 1}}"#;
    let broken = [
        (
            "print('all good, I think', flush=True)",
            "wrote a line that is not JSON",
        ),
        (
            "sys.exit(3)",
            "exited with status 3 before answering `status`",
        ),
        (
            "time.sleep(0)  # never answers",
            "did not answer `status` within 1s",
        ),
    ];
    for (otherwise, said) in broken {
        python_plugin(&cli.bin(), "prl-flow-backend-flaky", hello, otherwise);
        let out = cli.cmd().arg("status").output().expect("status");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_ne!(out.status.code(), Some(0), "{said}: {text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("server "))
            .unwrap_or_else(|| panic!("no row of `server`: {text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.get(3), Some(&"?"), "{row}");
        assert!(row.contains(said), "{said}: {row}");
    }

    std::fs::write(&exe, &good).expect("restore the plugin");
    let out = cli.cmd().arg("status").output().expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("ready"), "{text}");
    cli.cmd().arg("down").assert().success();
    assert_gone("the server", "127.0.0.1", port, server);
}

/// Kills a background prl-flow (and reaps it) when dropped.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cli_a_plugin_killed_mid_bring_up_is_restarted_and_the_run_goes_on() {
    let cli = Cli::new();
    // The example plugin behind a wrapper that writes its pid (`exec` keeps it).
    let pids = cli.dir.path().join("plugin-pids");
    cli.plugin(
        "mid",
        &format!(
            "#!/bin/sh\necho $$ >> '{}'\nexec '{}' \"$@\"\n",
            pids.display(),
            wrapped().display()
        ),
    );
    // Two services that hold back from serving until `go` exists: the plugin dies while
    // prl-flow waits for them to be ready.
    let go = cli.dir.path().join("go");
    let hold = format!("while [ ! -e {} ]; do sleep 0.05; done;", go.display());
    let (p1, p2) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    cli.write(
        "wf.toml",
        &(marked_service(&cli, "one", p1, &hold) + &marked_service(&cli, "two", p2, &hold)),
    );
    let stderr = cli.dir.path().join("run.stderr");
    let mut run = cli.std_cmd();
    run.args(["run", "wf.toml", "--backend", "mid"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    let mut run = Background(run.spawn().expect("start prl-flow"));

    // Both spawned and recorded: what is in flight now is the wait for their readiness.
    let st = cli.dir.path().join(".prl-flow/wf");
    common::wait_until("both services to be started and recorded", LIMIT, || {
        let recs = common::records(&st);
        ["one", "two"].iter().all(|id| {
            recs.get(*id)
                .is_some_and(|r| r["handle"].is_object() && r["status"] == "running")
        })
    });
    let plugin: i32 = std::fs::read_to_string(&pids)
        .expect("the plugin's pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(plugin),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the plugin");
    common::wait_until("the plugin to die", LIMIT, || !common::alive(plugin));
    std::fs::write(&go, "").expect("let the services serve");

    let status = common::wait_for("the run to end", LIMIT, || {
        run.0.try_wait().expect("prl-flow's status")
    });
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(status.success(), "{err}");
    assert_eq!(
        (starts(&cli, "one"), starts(&cli, "two")),
        (1, 1),
        "a service started twice: {err}"
    );
    let (one, two) = (cli.service_of("one", "mid"), cli.service_of("two", "mid"));
    cli.cmd().arg("down").assert().success();
    assert_gone("service one", "127.0.0.1", p1, one);
    assert_gone("service two", "127.0.0.1", p2, two);
}

// ---------------------------------------------------------------------------------------
// Where a plugin's process starts

/// A task's `dir` reaches a plugin as the spawn spec's `cwd`: the example plugin starts the
/// process there and keeps its exit status in the run dir.
#[tokio::test]
async fn a_plugin_starts_a_task_in_its_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work dir");
    std::fs::create_dir(&work).expect("work dir");
    let mut allocate = task(
        ALLOCATE,
        &[],
        None,
        Command::Builtin {
            action: Action::Allocate,
            args: Value::Null,
        },
    );
    allocate.kind = Action::Allocate.name().into();
    let mut here = task(
        "here",
        &[ALLOCATE],
        Some("node0"),
        Command::Shell {
            script: "pwd > out".into(),
        },
    );
    here.dir = Some(work.display().to_string());
    let plan = Plan {
        name: "cwd-through-plugin".into(),
        backend: "wrapped".into(),
        nodes: vec!["node0".into()],
        tasks: vec![allocate, here],
        ..Plan::default()
    };
    let backend: Arc<dyn Backend> = Arc::new(PluginBackend::new("wrapped", wrapped()));
    let prepared =
        session::run::prepare(&plan, backend, dir.path(), &session::RunSettings::default())
            .await
            .unwrap_or_else(|e| panic!("the plan does not make a run: {e:?}"));
    let report = bounded("the run", prepared.execute(Vec::new(), Cancel::never()))
        .await
        .expect("the run")
        .report;
    assert!(report.ok(), "the run failed: {:#?}", report.errors);
    let out = std::fs::read_to_string(work.join("out")).expect("the task's output");
    assert_eq!(Path::new(out.trim()), work);
    let run_dir = dir.path().join("run/here");
    assert_eq!(
        std::fs::read_to_string(run_dir.join("exit-status")).expect("exit status"),
        "0\n"
    );
    assert!(!run_dir.join("out").exists());
}
