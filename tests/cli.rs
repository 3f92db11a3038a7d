//! The command line's own promises, through the real binary: which file a state dir belongs
//! to, `ls`, the JSON formats for scripts (checked against the schemas in `docs/schemas/`),
//! the event stream, `logs` of every task, shell completions and the help's examples.
//!
//! Every test works in its own [`Sandbox`] and leaves nothing running (see
//! `tests/common/mod.rs`).

mod common;

use std::path::{Path, PathBuf};

use common::{alive, assert_matches_schema, pid_of, wait_until, Sandbox, WAIT};
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

// ---------------------------------------------------------------------------------------
// 2. JSON for scripts, checked against the schemas in docs/schemas/

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[test]
fn status_ls_and_validate_json_match_their_schemas() {
    let sb = Sandbox::new();
    sb.write("job.toml", &service_workflow("j"));
    sb.run(&["run", "job.toml", "--state-dir", "st"])
        .expect_code(0);

    let up = sb.run(&[
        "status",
        "job.toml",
        "--state-dir",
        "st",
        "--format",
        "json",
    ]);
    up.expect_code(0);
    let v = parse(&up.stdout);
    assert_matches_schema("status.schema.json", &v);
    assert_eq!(v["state"], "up");
    assert_eq!(v["file"], Value::String(canonical(&sb, "job.toml")));
    assert_eq!(v["tasks"][0]["id"], "j-server");
    assert_eq!(v["tasks"][0]["live"], "up");
    assert_eq!(v["tasks"][1]["status"], "done");

    let server = pid_of(&sb.join("st"), "j-server").expect("the service's pid");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the service");
    wait_until("the service to be gone", WAIT, || !alive(server));
    let down = sb.run(&["status", "--state-dir", "st", "--format", "json"]);
    down.expect_code(1);
    let v = parse(&down.stdout);
    assert_matches_schema("status.schema.json", &v);
    assert_eq!(v["state"], "down");
    assert_eq!(v["tasks"][0]["live"], "down");

    // ls, with a dir under .prl-flow/ as well.
    sb.track_state_dir(".prl-flow/other");
    sb.write("other.toml", "[[task]]\nid = \"t\"\nrun = 'true'\n");
    sb.run(&["run", "other.toml"]).expect_code(0);
    let ls = sb.run(&["ls", "--format", "json"]);
    ls.expect_code(0);
    let v = parse(&ls.stdout);
    assert_matches_schema("ls.schema.json", &v);
    assert_eq!(v[0]["state"], "done");

    // validate: a valid file, every bad fixture, a file that is not there.
    let ok = sb.run(&["validate", "job.toml", "--format", "json"]);
    ok.expect_code(0);
    let v = parse(&ok.stdout);
    assert_matches_schema("validate.schema.json", &v);
    assert_eq!(v["valid"], true);
    assert_eq!(v["plan"]["services"], 1);
    let bad: Vec<PathBuf> = std::fs::read_dir(common::fixture_path(""))
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("bad_"))
        })
        .collect();
    assert!(bad.len() >= 5, "{bad:?}");
    for file in bad {
        let f = file.display().to_string();
        let out = sb.run(&["validate", &f, "--format", "json"]);
        out.expect_code(2);
        let v = parse(&out.stdout);
        assert_matches_schema("validate.schema.json", &v);
        assert_eq!(v["valid"], false);
        let p = &v["problems"][0];
        assert!(p["line"].as_u64().is_some_and(|l| l >= 1), "{f}: {v:#}");
        assert!(p["column"].as_u64().is_some_and(|c| c >= 1), "{f}: {v:#}");
        assert!(
            p["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{f}: {v:#}"
        );
    }
    let typo = common::fixture_path("bad_unknown_dependency.toml");
    let out = sb.run(&["validate", &typo.display().to_string(), "--format", "json"]);
    let v = parse(&out.stdout);
    assert_eq!(v["problems"][0]["line"], 8);
    assert_eq!(v["problems"][0]["column"], 10);
    assert_eq!(v["problems"][0]["help"], "did you mean `compile`?");
    let missing = sb.run(&["validate", "nosuch.toml", "--format", "json"]);
    missing.expect_code(2);
    let v = parse(&missing.stdout);
    assert_matches_schema("validate.schema.json", &v);
    assert!(v["problems"][0]["line"].is_null());
}

/// The `event` and `task` of each JSON line, checking each line against the schema.
fn events_of(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| {
            let v = parse(l);
            assert_matches_schema("events.schema.json", &v);
            (
                v["event"].as_str().unwrap_or("").to_string(),
                v["task"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn ev(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(e, t)| (e.to_string(), t.to_string()))
        .collect()
}

#[test]
fn run_events_jsonl_follow_the_run_and_match_the_schema() {
    let sb = Sandbox::new();
    sb.fixture("flaky.toml", "flaky.toml", &[]);
    let out = sb.run(&[
        "run",
        "flaky.toml",
        "--state-dir",
        "st1",
        "--events",
        "jsonl",
    ]);
    out.expect_code(0);
    assert_eq!(
        events_of(&out.stdout),
        ev(&[
            ("planned", ""),
            ("started", "flaky"),
            ("retried", "flaky"),
            ("started", "flaky"),
            ("done", "flaky"),
            ("started", "after"),
            ("done", "after"),
            ("finished", ""),
        ])
    );
    let last = parse(out.stdout.lines().last().expect("a last line"));
    assert_eq!(last["ok"], true);
    assert_eq!(last["summary"]["done"], 2);

    // A service that gets ready, a one-shot that fails, the service stopped for it, and
    // what was never run; into a file this time, with stdout for people.
    sb.write(
        "fails.toml",
        &format!(
            "{}\n[[task]]\nid = \"boom\"\nrun = 'echo nope >&2; exit 3'\nneeds = [\"f-server\"]\n\n[[task]]\nid = \"never\"\nrun = 'true'\nneeds = [\"boom\"]\n",
            service_workflow("f")
        ),
    );
    let out = sb.run(&[
        "run",
        "fails.toml",
        "--state-dir",
        "st2",
        "--events",
        "jsonl",
        "--events-file",
        "events.jsonl",
    ]);
    out.expect_code(1);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let text = std::fs::read_to_string(sb.join("events.jsonl")).expect("the events file");
    let got = events_of(&text);
    for want in [
        ("started", "f-server"),
        ("ready", "f-server"),
        ("failed", "boom"),
        ("aborting", "boom"),
        ("skipped", "never"),
        ("stopped", "f-server"),
        ("finished", ""),
    ] {
        assert!(
            got.contains(&(want.0.to_string(), want.1.to_string())),
            "no {want:?} in {got:?}"
        );
    }
    let failed = text
        .lines()
        .map(parse)
        .find(|v| v["event"] == "failed")
        .expect("a failed event");
    assert_eq!(failed["outcome"], "failed");
    assert!(
        failed["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{failed}"
    );
    assert_eq!(got.last().map(|(e, _)| e.as_str()), Some("finished"));
}

// ---------------------------------------------------------------------------------------
// 3. logs [FILE] [TASK], completions, help

const TWO_TALKERS: &str = r#"
[[task]]
id = "alpha"
run = 'echo a1; while [ ! -e "$WORK/go" ]; do sleep 0.02; done; echo a2'

[[task]]
id = "beta-long-name"
run = 'echo b1; while [ ! -e "$WORK/go" ]; do sleep 0.02; done; echo b2'
"#;

#[test]
fn logs_takes_file_and_task_and_follows_every_task_with_prefixes() {
    let sb = Sandbox::new();
    sb.write("talk.toml", TWO_TALKERS);
    sb.track_state_dir(".prl-flow/talk");
    let mut run = sb.spawn("run", &["run", "talk.toml"]);
    let log = |id: &str| {
        std::fs::read_to_string(sb.join(format!(".prl-flow/talk/logs/{id}.log")))
            .unwrap_or_default()
    };
    wait_until("both tasks to say their first line", WAIT, || {
        log("alpha").contains("a1") && log("beta-long-name").contains("b1")
    });

    // Follow every task, from another process.
    let mut follow = sb.spawn("follow", &["logs", "talk.toml", "-f"]);
    wait_until("`logs -f` to show both first lines", WAIT, || {
        let t = follow.stdout_text();
        t.contains("alpha          | a1") && t.contains("beta-long-name | b1")
    });
    sb.write("go", "");
    let out = follow.wait(common::COMMAND_DEADLINE);
    out.expect_code(0);
    for s in [
        "alpha          | a1\n",
        "alpha          | a2\n",
        "beta-long-name | b1\n",
        "beta-long-name | b2\n",
    ] {
        assert!(out.stdout.contains(s), "no `{s}` in:\n{}", out.stdout);
    }
    assert!(
        out.stdout.lines().all(|l| l.contains(" | ")),
        "{}",
        out.stdout
    );
    run.wait(common::COMMAND_DEADLINE).expect_code(0);

    // FILE TASK; a lone TASK (the only state dir here); the hidden `--file`; FILE alone.
    for args in [
        vec!["logs", "talk.toml", "alpha"],
        vec!["logs", "alpha"],
        vec!["logs", "--file", "talk.toml", "alpha"],
    ] {
        let out = sb.run(&args);
        out.expect_code(0);
        assert!(
            out.stdout.contains("a1\n") && out.stdout.contains("a2\n"),
            "{args:?}: {}",
            out.stdout
        );
        assert!(!out.stdout.contains("b1"), "{args:?}: {}", out.stdout);
        assert!(!out.stdout.contains(" | "), "{args:?}: {}", out.stdout);
    }
    for args in [vec!["logs", "talk.toml"], vec!["logs"]] {
        let out = sb.run(&args);
        out.expect_code(0);
        assert!(
            out.stdout.contains("beta-long-name | b2\n")
                && out.stdout.contains("alpha          | a2\n"),
            "{args:?}: {}",
            out.stdout
        );
    }
}

#[test]
fn completions_load_in_bash_and_name_the_subcommands() {
    let sb = Sandbox::new();
    let out = sb.run(&["completions", "bash"]);
    out.expect_code(0);
    for s in ["prl-flow", "ls", "completions", "--events"] {
        assert!(out.stdout.contains(s), "no `{s}` in the bash script");
    }
    sb.write("complete.bash", &out.stdout);
    if common::prerequisite(
        common::have("bash", &["--version"]),
        "bash (to load the completion script)",
        "apt-get install bash",
    ) {
        let loaded = std::process::Command::new("bash")
            .arg("-c")
            .arg("source ./complete.bash && complete -p prl-flow")
            .current_dir(sb.path())
            .output()
            .expect("run bash");
        assert!(
            loaded.status.success(),
            "{}",
            String::from_utf8_lossy(&loaded.stderr)
        );
        assert!(String::from_utf8_lossy(&loaded.stdout).contains("prl-flow"));
    }
    for shell in ["zsh", "fish"] {
        let out = sb.run(&["completions", shell]);
        out.expect_code(0);
        assert!(out.stdout.contains("prl-flow"), "{shell}");
    }
    sb.run(&["completions", "nosuch"]).expect_code(2);
}

#[test]
fn help_of_every_subcommand_shows_an_example_the_new_ones_too() {
    let sb = Sandbox::new();
    for sub in [
        vec![],
        vec!["run"],
        vec!["graph"],
        vec!["plan"],
        vec!["validate"],
        vec!["status"],
        vec!["down"],
        vec!["logs"],
        vec!["ls"],
        vec!["completions"],
        vec!["plugins"],
        vec!["plugin", "test"],
    ] {
        let mut args = sub.clone();
        args.push("--help");
        let out = sb.run(&args);
        out.expect_code(0);
        assert!(
            out.stdout.contains("Example") && out.stdout.contains("prl-flow"),
            "`prl-flow {}` shows no example:\n{}",
            sub.join(" "),
            out.stdout
        );
    }
    // Each new flag is shown with an example of its use.
    for (sub, flag) in [
        ("run", "--events jsonl"),
        ("status", "--format json"),
        ("validate", "--format json"),
        ("ls", "--format json"),
        ("completions", "completions bash"),
        ("logs", "-f"),
    ] {
        let out = sb.run(&[sub, "--help"]);
        let examples = out.stdout.split("Example").nth(1).unwrap_or("");
        assert!(
            examples.contains(flag),
            "`prl-flow {sub} --help` has no example with `{flag}`:\n{}",
            out.stdout
        );
    }
}

/// `validate` prints the node count of a P/D deployment with units (text and JSON), and
/// `plan` opens with the per-node layout.
#[test]
fn validate_and_plan_say_the_node_count_and_layout() {
    let sb = Sandbox::new();
    sb.write(
        "pd.toml",
        "[inference]\nmodel = \"m\"\n[inference.parallel]\ntp = 2\n[inference.deployment]\ntype = \"disaggregated\"\ngpus_per_node = 4\nnum_replicas = 3\nprefill_nodes_per_replica = 1\nnum_prefill_replicas = 2\nnum_decode_nodes = 2\n[backend]\ntype = \"slurm\"\n",
    );
    let out = sb.run(&["validate", "pd.toml"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains("on 12 nodes")
            && out
                .stdout
                .contains("layout: 12 nodes: 3 P/D units × (prefill 2 nodes"),
        "{}",
        out.stdout
    );
    let json = sb.run(&["validate", "pd.toml", "--format", "json"]);
    let v = parse(&json.stdout);
    assert_matches_schema("validate.schema.json", &v);
    assert_eq!(v["plan"]["nodes"], 12);
    let plan = sb.run(&["plan", "pd.toml"]);
    plan.expect_code(0);
    assert!(
        plan.stdout.contains("  node11:\n    decode[2].rank[2]"),
        "{}",
        plan.stdout
    );
    let plan = sb.run(&["plan", "pd.toml", "--format", "json"]);
    let v = parse(&plan.stdout);
    assert_eq!(v["layout"]["nodes"][11]["processes"][1]["gpus"], "2,3");
}
