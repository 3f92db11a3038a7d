//! The command line's own promises, through the real binary: which file a state dir belongs
//! to, `ls`, the JSON formats for scripts (checked against the schemas in `docs/schemas/`),
//! the event stream, `logs` of every task, shell completions and the help's examples.
//!
//! Every test works in its own [`Sandbox`] and leaves nothing running (see
//! `tests/common/mod.rs`).

mod common;

use std::path::{Path, PathBuf};

use common::{alive, pid_of, wait_until, Sandbox, WAIT};
use serde_json::Value;

/// A workflow with one service (ready once it says `up`) named `{tag}-server`, and a
/// one-shot after it; each appends its id to `$WORK/marks` when it starts.
fn service_workflow(tag: &str) -> String {
    format!(
        r#"[[task]]
id = "{tag}-server"
run = 'echo {tag}-server >> "$WORK/marks"; echo up; exec sleep 300'
service = true
ready = {{ log = "^up$", interval = "20ms" }}

[[task]]
id = "{tag}-client"
run = 'echo {tag}-client >> "$WORK/marks"'
needs = ["{tag}-server"]
"#
    )
}

/// The state dirs under the sandbox's `.prl-flow/`, by name; each is tracked for teardown.
fn state_dirs(sb: &Sandbox) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(sb.join(".prl-flow"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    for d in &dirs {
        sb.track_state_dir(d);
    }
    dirs
}

fn owner(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("owner.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["file"].as_str().map(str::to_string)
}

fn canonical(sb: &Sandbox, rel: &str) -> String {
    sb.join(rel)
        .canonicalize()
        .expect("canonical path")
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// 1. state identity and `ls`

#[test]
fn two_files_with_one_name_keep_apart_and_a_state_dir_of_another_file_is_refused() {
    let sb = Sandbox::new();
    sb.write("a/job.toml", &service_workflow("a"));
    sb.write("b/job.toml", &service_workflow("b"));
    sb.track_state_dir(".prl-flow/job");

    // Before anything ran, `ls` says so.
    let ls = sb.run(&["ls"]);
    ls.expect_code(0);
    assert!(ls.stdout.contains("no deployments"), "{}", ls.stdout);

    let a = sb.run(&["run", "a/job.toml"]);
    a.expect_code(0);
    let plain = sb.join(".prl-flow/job");
    assert_eq!(owner(&plain), Some(canonical(&sb, "a/job.toml")));
    let a_server = pid_of(&plain, "a-server").expect("a's service pid");

    // b has not run: its status is not a's.
    let st = sb.run(&["status", "b/job.toml"]);
    st.expect_code(2);
    assert!(!st.stdout.contains("a-server"), "{}", st.stdout);
    assert!(st.stderr.contains("nothing has run there"), "{}", st.stderr);

    // b runs beside a, in a state dir of its own, and says where.
    let b = sb.run(&["run", "b/job.toml"]);
    b.expect_code(0);
    let dirs = state_dirs(&sb);
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let hashed = dirs
        .iter()
        .find(|d| *d != &plain)
        .expect("b's state dir")
        .clone();
    let hashed_name = hashed
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    assert!(
        regex::Regex::new("^job-[0-9a-f]{8}$")
            .expect("regex")
            .is_match(&hashed_name),
        "{hashed_name}"
    );
    assert_eq!(owner(&hashed), Some(canonical(&sb, "b/job.toml")));
    for s in [
        "note: `.prl-flow/job` belongs to",
        "a/job.toml",
        &format!("the state of `b/job.toml` is in `.prl-flow/{hashed_name}`"),
    ] {
        assert!(b.stderr.contains(s), "no `{s}` in:\n{}", b.stderr);
    }
    assert!(
        b.stderr
            .contains("stop them with `prl-flow down b/job.toml`"),
        "{}",
        b.stderr
    );
    let b_server = pid_of(&hashed, "b-server").expect("b's service pid");

    // Each file's status is its own.
    let st = sb.run(&["status", "a/job.toml"]);
    st.expect_code(0);
    assert!(st.stdout.contains("a-server") && !st.stdout.contains("b-server"));
    let st = sb.run(&["status", "b/job.toml"]);
    st.expect_code(0);
    assert!(st.stdout.contains("b-server") && !st.stdout.contains("a-server"));

    // Into a's state dir, every command naming b is refused, naming both files.
    let into_a = [
        vec!["run", "b/job.toml", "--state-dir", ".prl-flow/job"],
        vec![
            "run",
            "b/job.toml",
            "--state-dir",
            ".prl-flow/job",
            "--resume",
        ],
        vec!["status", "b/job.toml", "--state-dir", ".prl-flow/job"],
        vec!["down", "b/job.toml", "--state-dir", ".prl-flow/job"],
    ];
    for args in into_a {
        let out = sb.run(&args);
        out.expect_code(2);
        for s in [
            "belongs to",
            &canonical(&sb, "a/job.toml"),
            &canonical(&sb, "b/job.toml"),
            "--state-dir DIR",
            "name = ",
        ] {
            assert!(
                out.stderr.contains(s),
                "`{}`: no `{s}` in:\n{}",
                args.join(" "),
                out.stderr
            );
        }
    }
    assert_eq!(sb.count("marks", "b-server"), 1, "a refused run started b");
    assert_eq!(sb.count("marks", "a-server"), 1);
    assert!(alive(a_server), "a refused `down` stopped a's service");
    assert_eq!(owner(&plain), Some(canonical(&sb, "a/job.toml")));

    // Given only the state dir, commands work as before.
    sb.run(&["status", "--state-dir", ".prl-flow/job"])
        .expect_code(0);

    // `ls` lists both, with their files, states and (for workflows) no endpoint.
    let ls = sb.run(&["ls"]);
    ls.expect_code(0);
    let line = |name: &str| {
        ls.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{}", ls.stdout))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("job"), ["job", "a/job.toml", "up", "-"]);
    assert_eq!(
        line(&hashed_name),
        [hashed_name.as_str(), "b/job.toml", "up", "-"]
    );

    // b goes down (by its file: the same rule finds its dir); `ls` says so, in JSON too.
    sb.run(&["down", "b/job.toml"]).expect_code(0);
    wait_until("b's service to end", WAIT, || !alive(b_server));
    assert!(alive(a_server));
    let ls = sb.run(&["ls", "--format", "json"]);
    ls.expect_code(0);
    let v: Value = serde_json::from_str(&ls.stdout).expect("ls json");
    let states: Vec<(&str, &str)> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or(""),
                d["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(states, [("job", "up"), (hashed_name.as_str(), "down")]);
    assert_eq!(v[1]["file"], Value::String(canonical(&sb, "b/job.toml")));

    // Its state stays where it was, even once a's dir is gone.
    sb.run(&["down", "a/job.toml"]).expect_code(0);
    std::fs::remove_dir_all(&plain).expect("remove a's state dir");
    let again = sb.run(&["run", "b/job.toml", "--resume"]);
    again.expect_code(0);
    assert!(!plain.exists(), "b moved to the plain state dir");
    assert_eq!(sb.count("marks", "b-server"), 2);
    sb.run(&["down", "b/job.toml"]).expect_code(0);
}

#[test]
fn ls_says_partly_up_and_failed() {
    let sb = Sandbox::new();
    sb.write(
        "pair.toml",
        &format!("{}\n{}", service_workflow("x"), {
            // A second service, independent of the first.
            service_workflow("y")
        }),
    );
    sb.write("broken.toml", "[[task]]\nid = \"boom\"\nrun = 'exit 3'\n");
    sb.track_state_dir(".prl-flow/pair");
    sb.track_state_dir(".prl-flow/broken");
    sb.run(&["run", "pair.toml"]).expect_code(0);
    sb.run(&["run", "broken.toml"]).expect_code(1);
    let y = pid_of(&sb.join(".prl-flow/pair"), "y-server").expect("y's pid");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(y),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill y");
    wait_until("y to be gone", WAIT, || !alive(y));
    let ls = sb.run(&["ls", "--format", "json"]);
    ls.expect_code(0);
    let v: Value = serde_json::from_str(&ls.stdout).expect("ls json");
    let states: Vec<(String, String)> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|d| (d["name"].to_string(), d["state"].to_string()))
        .collect();
    assert_eq!(
        states,
        [
            ("\"broken\"".to_string(), "\"failed\"".to_string()),
            ("\"pair\"".to_string(), "\"partly up\"".to_string())
        ]
    );
    let text = sb.run(&["ls"]);
    assert!(text.stdout.contains("partly up"), "{}", text.stdout);
}
