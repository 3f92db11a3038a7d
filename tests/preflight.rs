//! The preflight on this machine: right after `allocate`, before any task starts, the plan's
//! programs must be on the node's `PATH` and its services' ports free. A problem fails the
//! run (exit 1) with one line per problem naming the node, the program or port and the fix,
//! and nothing of the plan is started: no task has a run dir, a log or a process.
//!
//! The ssh and SLURM backends' preflight is checked in `ssh.rs` and `slurm.rs`.

mod common;

use std::path::Path;

use common::{free_port_block, mock_engine, processes_under, records, Out, Sandbox};

/// The `allocate` task's id.
const ALLOCATE: &str = prl_flow::actions::Action::Allocate.name();

/// A single-node recipe on the local backend with this engine launcher and router program.
fn recipe(sb: &Sandbox, launcher: &str, router: &str, base: u16) -> String {
    let text = format!(
        r#"[inference]
model = "Qwen/Qwen3-0.6B"
launcher = ["{launcher}"]

[inference.parallel]
tp = 1
dp = 1

[inference.deployment]
type = "single_node"
gpus_per_node = 1
router_port = {router_port}
backend_port = {backend_port}
router_metrics_port = {metrics_port}
router_launcher = ["{router}"]

[backend]
type = "local"
"#,
        router_port = base,
        backend_port = base + 1,
        metrics_port = base + 2,
    );
    sb.write("recipe.toml", &text);
    "recipe.toml".into()
}

/// Nothing of the plan started: `allocate` failed, every other task was skipped or never
/// recorded, no task has a run dir or log, and no process runs under the state dir.
fn nothing_started(sb: &Sandbox, out: &Out) {
    let st = sb.join("st");
    for (id, r) in records(&st) {
        let status = r.get("status").and_then(|s| s.as_str()).unwrap_or("");
        if id == ALLOCATE {
            assert_eq!(status, "failed", "{out:?}");
        } else {
            assert_eq!(status, "skipped", "`{id}` was not skipped\n{out:?}");
        }
    }
    let entries = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    assert_eq!(entries(&st.join("run")), 0, "a run dir was made\n{out:?}");
    assert_eq!(entries(&st.join("logs")), 0, "a log was written\n{out:?}");
    assert!(processes_under(&st).is_empty(), "a process started");
}

#[test]
fn a_launcher_that_does_not_exist_fails_the_run_before_anything_starts() {
    let sb = Sandbox::new();
    let base = free_port_block(3);
    let file = recipe(&sb, "prl-flow-no-such-engine", "sh", base);
    let out = sb.run(&["run", &file, "--state-dir", "st"]);
    out.expect_code(1);
    let err = &out.stderr;
    assert!(
        err.contains("node0 (127.0.0.1): `prl-flow-no-such-engine` is not on PATH"),
        "{err}"
    );
    assert!(err.contains("`engine[0].rank[0]` runs it"), "{err}");
    assert!(err.contains("--engine mock"), "{err}");
    assert!(err.contains("`[inference] launcher`"), "{err}");
    // `sh`, the router's program here, is there: only the missing one is named.
    assert!(!err.contains("`sh`"), "{err}");
    nothing_started(&sb, &out);
}

#[test]
fn a_taken_port_fails_the_run_before_anything_starts_naming_its_field() {
    let sb = Sandbox::new();
    let base = free_port_block(3);
    let file = recipe(&sb, &mock_engine(), "sh", base);
    let _held = std::net::TcpListener::bind(("127.0.0.1", base)).expect("hold the router port");
    let out = sb.run(&["run", &file, "--state-dir", "st"]);
    out.expect_code(1);
    let err = &out.stderr;
    assert!(
        err.contains(&format!("node0 (127.0.0.1): port {base} is already in use")),
        "{err}"
    );
    assert!(err.contains("`router` binds it"), "{err}");
    assert!(
        err.contains(&format!(
            "(set by [inference.deployment] router_port), held by pid {} (",
            std::process::id()
        )),
        "{err}"
    );
    nothing_started(&sb, &out);
}

#[test]
fn a_shipped_recipe_without_vllm_and_without_engine_mock_fails_at_once_with_the_hint() {
    // Only the system's directories on PATH: no vLLM there (prl-flow adds the router's).
    let path = "/usr/bin:/bin";
    if std::env::split_paths(path).any(|d| d.join("vllm").exists()) {
        eprintln!("SKIPPED: vllm is installed in /usr/bin or /bin");
        return;
    }
    let sb = Sandbox::new();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/local/single_node.toml");
    let mut cmd = sb.cmd(&["run", &file.to_string_lossy(), "--state-dir", "st"]);
    cmd.env("PATH", path);
    let out = common::output_within(cmd, common::COMMAND_DEADLINE);
    out.expect_code(1);
    let err = &out.stderr;
    assert!(
        err.contains("node0 (127.0.0.1): `vllm` is not on PATH"),
        "{err}"
    );
    assert!(err.contains("run with `--engine mock`"), "{err}");
    nothing_started(&sb, &out);
}

/// A resume that keeps the allocation checks the programs of what it will start, before it
/// stops or starts anything: a changed launcher that does not exist fails it at once, and
/// the running engine and router are left as they are.
#[test]
fn a_resume_to_a_launcher_that_does_not_exist_fails_before_it_stops_anything() {
    let Some(router) = common::router_or_skip() else {
        return;
    };
    let sb = Sandbox::new();
    let base = free_port_block(3);
    let router = router.to_string_lossy().into_owned();
    let file = recipe(&sb, &mock_engine(), &router, base);
    sb.run(&["run", &file, "--state-dir", "st"]).expect_code(0);
    let st = sb.join("st");
    let engine = common::pid_of(&st, "engine[0].rank[0]").expect("engine pid");
    let router_pid = common::pid_of(&st, "router").expect("router pid");

    recipe(&sb, "prl-flow-no-such-engine", &router, base);
    let out = sb.run(&["run", &file, "--state-dir", "st", "--resume"]);
    out.expect_code(1);
    let err = &out.stderr;
    assert!(
        err.contains("node0 (127.0.0.1): `prl-flow-no-such-engine` is not on PATH"),
        "{err}"
    );
    assert!(err.contains("nothing was started or stopped"), "{err}");
    assert!(err.contains("--engine mock"), "{err}");
    // Nothing was stopped or started: the same engine and router, still running.
    assert_eq!(common::pid_of(&st, "engine[0].rank[0]"), Some(engine));
    assert_eq!(common::pid_of(&st, "router"), Some(router_pid));
    assert!(common::alive(engine) && common::alive(router_pid));
    sb.run(&["down", &file, "--state-dir", "st"]).expect_code(0);
}
