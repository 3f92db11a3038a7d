//! The CLI on plain workflow files, end to end: the real `prl-flow` binary, real processes,
//! real signals. Fixtures are in `tests/fixtures/workflows/`; each task of a fixture that
//! matters appends its id to `$WORK/marks` (and, in `thirty.toml`, to `$WORK/starts` first), so
//! a test can count how often it ran, and how often it started.
//!
//! Every test works in its own [`Sandbox`] (a temp dir as cwd, `--state-dir` inside it), waits
//! on conditions with deadlines, and leaves nothing running (see `tests/common/mod.rs`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    alive, group_members, have, pid_of, records, status_of, wait_for, wait_gone, wait_until,
    Sandbox, COMMAND_DEADLINE, WAIT,
};
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------
// 1. graph

#[test]
fn graph_renders_a_diamond_and_a_service_in_every_format() {
    let sb = Sandbox::new();
    sb.fixture("diamond.toml", "diamond.toml", &[]);
    for format in ["ascii", "dot", "mermaid", "json"] {
        let out = sb.run(&["graph", "diamond.toml", "--format", format]);
        out.expect_code(0);
        sb.settings()
            .bind(|| insta::assert_snapshot!(format!("graph_{format}"), out.stdout));
    }
    // Without --format: ascii.
    let plain = sb.run(&["graph", "diamond.toml"]);
    plain.expect_code(0);
    let ascii = sb.run(&["graph", "diamond.toml", "--format", "ascii"]);
    assert_eq!(plain.stdout, ascii.stdout);
    // The JSON is JSON, with every task once.
    let json = sb.run(&["graph", "diamond.toml", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("graph json parses");
    let ids: Vec<&str> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, ["fetch", "left", "right", "server", "report"]);
    assert!(
        !sb.join(".prl-flow").exists(),
        "`graph` must not create a state dir"
    );
}

#[test]
fn graph_dot_is_accepted_by_graphviz() {
    if !common::prerequisite(
        have("dot", &["-V"]),
        "graphviz `dot` (the DOT output is NOT checked against graphviz)",
        "apt-get install graphviz, or run `./dev test`",
    ) {
        return;
    }
    let sb = Sandbox::new();
    sb.fixture("diamond.toml", "diamond.toml", &[]);
    let graph = sb.run(&["graph", "diamond.toml", "--format", "dot"]);
    graph.expect_code(0);
    sb.write("graph.dot", &graph.stdout);
    let mut dot = std::process::Command::new("dot");
    dot.args(["-Tsvg", "graph.dot"]).current_dir(sb.path());
    let svg = common::output_within(dot, COMMAND_DEADLINE);
    assert_eq!(svg.code, Some(0), "dot rejected the graph:\n{}", svg.stderr);
    assert!(svg.stdout.contains("<svg"), "{}", svg.stdout);
    for id in ["fetch", "left", "right", "server", "report"] {
        assert!(svg.stdout.contains(id), "`{id}` is not in the SVG");
    }
}

// ---------------------------------------------------------------------------------------
// 2. bad input

/// Bad input that only the whole graph shows: (fixture, what the message must say).
const GRAPH_ERRORS: &[(&str, &[&str])] = &[
    (
        "bad_duplicate_id.toml",
        &[
            "bad_duplicate_id.toml:10:1",
            "task id `build` is declared twice",
        ],
    ),
    (
        "bad_unknown_dependency.toml",
        &[
            "bad_unknown_dependency.toml:8:10",
            "task `test` needs `compiel`, which is not a task",
            "did you mean `compile`?",
        ],
    ),
    ("bad_cycle.toml", &["the tasks form a cycle: x → y → z → x"]),
];

#[test]
fn plan_and_graph_check_the_graph_as_a_run_does() {
    let sb = Sandbox::new();
    for (fixture, says) in GRAPH_ERRORS {
        sb.fixture(fixture, fixture, &[]);
        for command in ["plan", "graph"] {
            let out = sb.run(&[command, fixture]);
            out.expect_code(2);
            assert!(out.stdout.is_empty(), "{command} {fixture}: {}", out.stdout);
            for s in *says {
                assert!(
                    out.stderr.contains(s),
                    "{command} {fixture}: no `{s}` in:\n{}",
                    out.stderr
                );
            }
        }
    }
}

#[test]
fn bad_input_exits_2_starts_nothing_and_says_where() {
    // (fixture, what the message must say), after the graph's own errors
    let cases: &[(&str, &[&str])] = &[
        (
            "bad_unknown_field.toml",
            &[
                "bad_unknown_field.toml:4:1",
                "unknown field `retires`",
                "did you mean `retries`?",
            ],
        ),
        (
            "bad_duration.toml",
            &[
                "bad_duration.toml:4:11",
                "`timeout` of task `slow`",
                "`soon` is not a duration",
            ],
        ),
        (
            "bad_run_and_argv.toml",
            &[
                "bad_run_and_argv.toml:3:7",
                "task `both` has both `run` and `argv`",
            ],
        ),
        (
            "bad_ready_without_service.toml",
            &[
                "bad_ready_without_service.toml:4:9",
                "task `probe` has `ready` but is not a service",
                "service = true",
            ],
        ),
    ];
    let sb = Sandbox::new();
    for (fixture, says) in GRAPH_ERRORS.iter().chain(cases) {
        sb.fixture(fixture, fixture, &[]);
        let out = sb.run(&["run", fixture, "--state-dir", "st"]);
        out.expect_code(2);
        assert!(
            out.stdout.is_empty(),
            "{fixture}: stdout is for results: {}",
            out.stdout
        );
        for s in *says {
            assert!(
                out.stderr.contains(s),
                "{fixture}: no `{s}` in:\n{}",
                out.stderr
            );
        }
        assert!(
            out.stderr.contains("nothing was started"),
            "{fixture}: {}",
            out.stderr
        );
        // Every process's log and run dir live in the state dir, which a run creates before
        // it starts anything: no state dir, nothing started.
        assert!(
            !sb.join("st").exists(),
            "{fixture}: the state dir was created"
        );
        assert!(
            !sb.join(".prl-flow").exists(),
            "{fixture}: `.prl-flow` was created"
        );
        let name = fixture.trim_end_matches(".toml");
        sb.settings()
            .bind(|| insta::assert_snapshot!(format!("{name}_stderr"), out.stderr));
        // `validate` says the same, and exits 2 too.
        let v = sb.run(&["validate", fixture]);
        v.expect_code(2);
        assert_eq!(
            v.stderr, out.stderr,
            "{fixture}: `validate` and `run` disagree"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. a failing task, then a resume after the fix

#[test]
fn failing_task_names_its_log_and_resume_reruns_only_it_and_what_follows() {
    let sb = Sandbox::new();
    let run = |extra: &[&str]| {
        let mut args = vec!["-q", "run", "pipeline.toml", "--state-dir", "st"];
        args.extend_from_slice(extra);
        sb.run(&args)
    };
    // A first version that passes: every task once.
    sb.fixture("pipeline_v1.toml", "pipeline.toml", &[]);
    run(&[]).expect_code(0);

    // `compile` breaks, and a task `test` after it is new.
    sb.fixture("pipeline_v2_broken.toml", "pipeline.toml", &[]);
    let failed = run(&["--resume"]);
    failed.expect_code(1);
    for s in [
        "error: task `compile` failed: `compile` exited with status 2",
        "last lines of",
        "compile.log",
        "main.c:3:5: error: use of undeclared identifier 'x'",
        "1 error generated.",
        "`prl-flow run pipeline.toml --state-dir st --resume`",
    ] {
        assert!(failed.stderr.contains(s), "no `{s}` in:\n{}", failed.stderr);
    }
    sb.settings()
        .bind(|| insta::assert_snapshot!("failing_task_stderr", failed.stderr));
    assert_eq!(
        status_of(&sb.join("st"), "compile").as_deref(),
        Some("failed")
    );

    // Fixed: the resume says why each task runs or is kept, and runs only those.
    sb.fixture("pipeline_v3_fixed.toml", "pipeline.toml", &[]);
    let fixed = run(&["--resume", "--explain"]);
    fixed.expect_code(0);
    let explain: Vec<&str> = fixed.stdout.lines().collect();
    let line = |id: &str| {
        explain
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .copied()
            .unwrap_or_else(|| panic!("`{id}` is not explained:\n{}", fixed.stdout))
    };
    assert!(line("setup").starts_with("keep"), "{}", fixed.stdout);
    assert!(line("lint").starts_with("keep"), "{}", fixed.stdout);
    assert!(line("compile").starts_with("run") && line("compile").ends_with("failed"));
    assert!(line("test").starts_with("run") && line("test").ends_with("never ran"));
    assert!(
        line("package").starts_with("run")
            && line("package").ends_with("upstream re-ran (`compile`)"),
        "{}",
        fixed.stdout
    );
    sb.settings()
        .bind(|| insta::assert_snapshot!("resume_explain_after_fix", fixed.stdout));

    // Counted over the three runs: v1 ran everything, v2 ran `compile` (which failed), the
    // fixed resume ran `compile`, `test` and `package`.
    for (id, times) in [
        ("setup", 1),
        ("lint", 1),
        ("compile", 3),
        ("test", 1),
        ("package", 2),
    ] {
        assert_eq!(
            sb.count("marks", id),
            times,
            "`{id}` ran {} times",
            sb.count("marks", id)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. kill -9 of prl-flow, then --resume

/// Ids of tasks that were spawned but whose handle never reached the journal: a `kill -9`
/// landed between the two. See `kill_9_right_after_a_spawn_does_not_run_the_task_twice`.
fn spawned_without_handle(st: &Path) -> Vec<String> {
    records(st)
        .into_iter()
        .filter(|(id, r)| {
            r["status"] == "running"
                && r.get("handle").is_none()
                && st.join("run").join(format!("{id}.pid")).exists()
        })
        .map(|(id, _)| id)
        .collect()
}

/// Whether a `kill -9` now would find the journal consistent: every task spawned so far has
/// its handle recorded, and no spawn is about to happen, because what runs are only tasks of
/// `thirty.toml` that sleep (even ids) and started less than 100 ms ago (they sleep 200 ms).
fn thirty_is_quiet(st: &Path) -> bool {
    let recs = records(st);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let spawned_are_recorded = std::fs::read_dir(st.join("run"))
        .map(|rd| {
            rd.flatten().all(|e| {
                // A one-shot's pid file, or the run dir of a task given files.
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".pid").unwrap_or(&name);
                recs.get(id).is_some_and(|r| r.get("handle").is_some())
            })
        })
        .unwrap_or(false);
    let running: Vec<(&String, &serde_json::Value)> = recs
        .iter()
        .filter(|(_, r)| r["status"] == "running")
        .collect();
    let settled = running.iter().all(|(id, r)| {
        let sleeps = id[1..].parse::<u32>().is_ok_and(|i| i % 2 == 0);
        let started = r["started_ms"].as_u64().unwrap_or(0);
        r.get("handle").is_some() && sleeps && now.saturating_sub(started) < 100
    });
    spawned_are_recorded && !running.is_empty() && settled
}

/// What `kill_thirty_mid_run` saw at the kill.
struct Killed {
    /// Tasks done (a line in `marks`).
    done: usize,
    marked: std::collections::BTreeSet<String>,
    /// Tasks whose process had begun (a line in `starts`): each had a process of its own,
    /// so the resume must keep or adopt it, never start it again.
    started: std::collections::BTreeSet<String>,
    /// `(id, pid)` of the tasks `running` with a recorded handle.
    running_pids: Vec<(String, i32)>,
}

/// Starts `thirty.toml` and kills prl-flow with SIGKILL once at least `at` of its 30 tasks
/// are done (by the marker file) and, if `quiet`, the journal is consistent. Returns what was
/// seen at the kill, or `None` if the run ended first.
fn kill_thirty_mid_run(sb: &Sandbox, at: usize, quiet: bool) -> Option<Killed> {
    sb.fixture("thirty.toml", "thirty.toml", &[]);
    let st = sb.join("st");
    let mut run = sb.spawn(
        "first",
        &["run", "thirty.toml", "--state-dir", "st", "-j", "4"],
    );
    let now = wait_for(&format!("{at} tasks of 30 to be done"), WAIT, || {
        let n = sb.lines("marks").len();
        if n >= 30 {
            return Some(false);
        }
        (n >= at && (!quiet || thirty_is_quiet(&st))).then_some(true)
    });
    run.kill9();
    // Read `marks` before `starts`: a task that ends in between is then counted as started
    // and not done, never the other way round.
    let marked: std::collections::BTreeSet<String> = sb.lines("marks").into_iter().collect();
    let done = marked.len();
    let started = sb.lines("starts").into_iter().collect();
    let running_pids = records(&st)
        .into_iter()
        .filter(|(_, r)| r["status"] == "running")
        .filter_map(|(id, r)| Some((id, r["handle"]["payload"]["pid"].as_i64()? as i32)))
        .collect();
    (now && done < 30).then_some(Killed {
        done,
        marked,
        started,
        running_pids,
    })
}

/// Runs `run --resume --explain` on a killed `thirty.toml` and checks that nothing started
/// twice: each task has exactly one line in `starts` and one in `marks` (a task started
/// again after its first process was stopped leaves two starts and one mark), every task
/// whose process had begun at the kill is kept or adopted by the explain output, and the
/// journal keeps the process each adopted task had at the kill. Returns the explain output.
fn resume_thirty_and_check_each_started_once(sb: &Sandbox, killed: &Killed) -> String {
    let out = sb.run(&[
        "run",
        "thirty.toml",
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    out.expect_code(0);
    let decisions: std::collections::BTreeMap<String, String> = out
        .stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (what, id) = (words.next()?, words.next()?);
            Some((id.to_string(), what.to_string()))
        })
        .collect();
    let starts = sb.lines("starts");
    for i in 0..30 {
        let id = format!("t{i:02}");
        let n = sb.count("starts", &id);
        assert_eq!(
            n,
            1,
            "`{id}` started {n} times; starts:\n{}\nexplain:\n{}",
            starts.join(" "),
            out.stdout
        );
    }
    for id in &killed.started {
        let what = decisions.get(id).map(String::as_str);
        assert!(
            matches!(what, Some("keep" | "adopt")),
            "`{id}` had begun at the kill ({} done) but the resume says {what:?}:\n{}",
            killed.done,
            out.stdout
        );
    }
    let st = sb.join("st");
    for (id, pid) in &killed.running_pids {
        if decisions.get(id).map(String::as_str) == Some("adopt") {
            assert_eq!(
                pid_of(&st, id),
                Some(*pid),
                "the journal keeps `{id}`'s adopted process, not a new one"
            );
        }
    }
    assert_each_of_thirty_once(sb);
    out.stdout
}

fn assert_each_of_thirty_once(sb: &Sandbox) {
    let marks = sb.lines("marks");
    for i in 0..30 {
        let id = format!("t{i:02}");
        let n = sb.count("marks", &id);
        assert_eq!(n, 1, "`{id}` ran {n} times; marks:\n{}", marks.join(" "));
    }
    assert_eq!(marks.len(), 30, "{marks:?}");
}

/// Guards: a resume after `kill -9` never starts a task a second time, and adopts the tasks
/// in flight. The kill waits for a moment when sleeping tasks are in flight (so there is
/// something to adopt); a kill that lands between a spawn and its journal record all the
/// same is checked like any other. Only a run that ends before the kill starts over.
#[test]
fn kill_9_mid_run_then_resume_runs_nothing_twice() {
    for attempt in 1..=5 {
        let sb = Sandbox::new();
        let Some(killed) = kill_thirty_mid_run(&sb, 8, true) else {
            eprintln!("note: attempt {attempt}: the run ended before it could be killed");
            continue;
        };
        let in_flight: Vec<&String> = killed.started.difference(&killed.marked).collect();
        let out = resume_thirty_and_check_each_started_once(&sb, &killed);
        let kept = out.lines().filter(|l| l.starts_with("keep")).count();
        let adopted = out.lines().filter(|l| l.starts_with("adopt")).count();
        assert!(
            (1..30).contains(&kept),
            "{} were done at the kill:\n{out}",
            killed.done
        );
        assert!(
            !killed.running_pids.is_empty() && adopted >= 1,
            "the sleeping tasks in flight ({in_flight:?}) are adopted:\n{out}"
        );
        return;
    }
    panic!("no attempt in five could kill the run before it ended");
}

/// Guards: a `kill -9` between the journaled start of a task and its handle's record (a
/// `running` record without a handle) does not make the resume start the task again: the
/// child's pid file, naming its attempt, is recovered. The test kills at arbitrary points,
/// up to 40 times, checks every resume it makes, and stops at the first kill that hits the
/// window (`tests/local_deploy.rs` builds that window on purpose).
#[test]
fn kill_9_right_after_a_spawn_does_not_run_the_task_twice() {
    for attempt in 0..40 {
        let sb = Sandbox::new();
        let st = sb.join("st");
        let Some(killed) = kill_thirty_mid_run(&sb, 3 + attempt % 24, false) else {
            continue;
        };
        let racy = !spawned_without_handle(&st).is_empty();
        if !racy && attempt % 8 != 0 {
            continue;
        }
        resume_thirty_and_check_each_started_once(&sb, &killed);
        if racy {
            return;
        }
    }
    eprintln!("note: no kill landed between a spawn and its journal record in 40 tries");
}

#[test]
fn kill_9_with_a_long_oneshot_in_flight_adopts_it_instead_of_rerunning_it() {
    let sb = Sandbox::new();
    sb.fixture("adopt.toml", "adopt.toml", &[]);
    let st = sb.join("st");
    let mut first = sb.spawn("first", &["run", "adopt.toml", "--state-dir", "st"]);
    // Kill when `long` runs (its handle recorded) and nothing else can start: `side` is
    // done and `finish` waits for `long`.
    let long_pid = wait_for("`long` in flight and `side` done", WAIT, || {
        let recs = records(&st);
        let long = recs.get("long")?;
        let side_done = recs.get("side")?["status"] == "done";
        (long["status"] == "running" && side_done && sb.count("marks", "long-start") == 1)
            .then(|| long["handle"]["payload"]["pid"].as_i64())
            .flatten()
            .map(|p| p as i32)
    });
    first.kill9();
    assert!(
        alive(long_pid),
        "the one-shot must outlive a `kill -9` of prl-flow"
    );

    let mut resume = sb.spawn(
        "resume",
        &[
            "run",
            "adopt.toml",
            "--state-dir",
            "st",
            "--resume",
            "--explain",
        ],
    );
    wait_until("the resume to adopt `long`", WAIT, || {
        resume.stderr_text().contains("adopt  long")
    });
    // While the resume waits for it, `long` has started once, and `finish` not at all.
    assert_eq!(sb.count("marks", "long-start"), 1);
    assert_eq!(sb.count("marks", "finish"), 0);
    sb.write("gate", "");
    let out = resume.wait(COMMAND_DEADLINE);
    out.expect_code(0);
    for (id, times) in [
        ("prepare", 1),
        ("long-start", 1),
        ("long", 1),
        ("side", 1),
        ("finish", 1),
    ] {
        assert_eq!(
            sb.count("marks", id),
            times,
            "`{id}`: {:?}",
            sb.lines("marks")
        );
    }
    assert_eq!(
        pid_of(&st, "long"),
        Some(long_pid),
        "the journal keeps the adopted process, not a new one"
    );
    sb.settings()
        .bind(|| insta::assert_snapshot!("adopt_explain", out.stdout));
}

// ---------------------------------------------------------------------------------------
// 5. Ctrl-C and SIGTERM

/// Starts `signals.toml` and waits until its service is ready and the long one-shot runs.
/// Returns (prl-flow, service pid, one-shot pid).
fn start_signals(sb: &Sandbox, extra: &[&str]) -> (common::Running, i32, i32) {
    sb.fixture("signals.toml", "signals.toml", &[]);
    let st = sb.join("st");
    let mut args = vec!["run", "signals.toml", "--state-dir", "st"];
    args.extend_from_slice(extra);
    let run = sb.spawn("run", &args);
    let (server, long) = wait_for("the service up and `long` running", WAIT, || {
        if sb.count("marks", "long-start") == 0 {
            return None;
        }
        Some((pid_of(&st, "server")?, pid_of(&st, "long")?))
    });
    assert!(alive(server) && alive(long));
    // Each runs in its own process group, with a child (`sleep`) in it.
    wait_until(
        "the service's child `sleep` to be in its group",
        WAIT,
        || group_members(server).len() >= 2,
    );
    (run, server, long)
}

fn signal_stops_everything_it_started(sig: Signal) {
    let sb = Sandbox::new();
    let (mut run, server, long) = start_signals(&sb, &[]);
    run.signal(sig);
    let out = run.wait(COMMAND_DEADLINE);
    assert_eq!(out.code, Some(130), "{sig}:\n{}", out.stderr);
    assert_one_cancelled_line(&out.stderr, &format!("cancelled by {sig} after "));
    // prl-flow waited for its processes before exiting: the group leaders are gone now.
    assert!(!alive(server), "{sig}: the service outlived prl-flow");
    assert!(!alive(long), "{sig}: the one-shot outlived prl-flow");
    wait_gone("the service's group", server);
    wait_gone("the one-shot's group", long);
    let st = sb.join("st");
    assert_eq!(status_of(&st, "server").as_deref(), Some("stopped"));
    assert_eq!(status_of(&st, "long").as_deref(), Some("cancelled"));
}

/// A cancelled run ends with one summary line starting with `head`: no `error:` per task,
/// no help to fix a cause.
#[track_caller]
fn assert_one_cancelled_line(stderr: &str, head: &str) {
    let summary: Vec<&str> = stderr.lines().filter(|l| l.starts_with(head)).collect();
    assert_eq!(summary.len(), 1, "no one `{head}` line in:\n{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(!stderr.contains("help: fix the cause"), "{stderr}");
}

#[test]
fn ctrl_c_stops_the_service_and_the_oneshot_and_exits_130() {
    signal_stops_everything_it_started(Signal::SIGINT);
}

#[test]
fn sigterm_stops_the_service_and_the_oneshot_and_exits_130() {
    signal_stops_everything_it_started(Signal::SIGTERM);
}

#[test]
fn ctrl_c_with_keep_leaves_the_service_up_until_down() {
    let sb = Sandbox::new();
    let (mut run, server, long) = start_signals(&sb, &["--keep"]);
    run.signal(Signal::SIGINT);
    let out = run.wait(COMMAND_DEADLINE);
    assert_eq!(out.code, Some(130), "{}", out.stderr);
    assert_one_cancelled_line(&out.stderr, "cancelled by SIGINT after ");
    assert!(out.stderr.contains("--keep"), "{}", out.stderr);
    // The one-shot is stopped all the same; the service is left.
    wait_gone("the one-shot's group", long);
    assert!(alive(server), "--keep: the service must stay up");
    assert_eq!(group_members(server).len(), 2);

    let down = sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    assert!(down.stderr.contains("stopped server"), "{}", down.stderr);
    wait_gone("the service's group", server);
}

/// `orphan.toml` run in `sb`: its service `server` leaves a process of its group behind
/// (`sleep SECONDS`) and ends. Returns the leader's pid, once it has ended, and the
/// worker's, still running.
fn orphaned_worker(sb: &Sandbox, seconds: u32) -> (i32, i32) {
    sb.write(
        "orphan.toml",
        &format!(
            "[[task]]\nid = \"server\"\nservice = true\n\
             run = \"sleep {seconds} & echo $! > worker.pid; exec sleep 0.2\"\n"
        ),
    );
    sb.run(&["run", "orphan.toml", "--state-dir", "st"])
        .expect_code(0);
    let leader = pid_of(&sb.join("st"), "server").expect("the service's pid is recorded");
    let worker_pid = sb.join("worker.pid");
    let worker: i32 = wait_for("the worker's pid", WAIT, || {
        std::fs::read_to_string(&worker_pid)
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    wait_until("the leader to end", WAIT, || !alive(leader));
    assert!(alive(worker), "the worker must outlive its leader");
    std::fs::remove_file(&worker_pid).expect("rm");
    (leader, worker)
}

/// A service whose leader died and left a process of its group behind (a crashed server's
/// workers that still hold their GPUs): `down` finds it, says so, and stops it.
#[test]
fn down_stops_what_is_left_of_a_group_whose_leader_died() {
    let sb = Sandbox::new();
    let (leader, worker) = orphaned_worker(&sb, 4031);
    assert_eq!(group_members(leader), [worker]);

    let down = sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    assert!(down.stderr.contains("stopped server"), "{}", down.stderr);
    assert!(down.stderr.contains("1 process stopped"), "{}", down.stderr);
    wait_gone("the service's group", leader);
    assert!(!alive(worker), "the worker still runs after down");
}

/// A fresh run forgets the earlier run's journal: what is left of a service whose leader
/// died is stopped first, or no later `down` could find it.
#[test]
fn a_fresh_run_stops_what_is_left_of_a_group_whose_leader_died() {
    let sb = Sandbox::new();
    let (_, worker) = orphaned_worker(&sb, 4032);

    sb.run(&["run", "orphan.toml", "--state-dir", "st"])
        .expect_code(0);
    assert!(
        !alive(worker),
        "the earlier run's worker still runs, and no journal names it"
    );
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
}

// ---------------------------------------------------------------------------------------
// 6. live services: refuse a fresh run, status, resume after a death, logs, down

#[test]
fn live_service_status_resume_logs_and_down() {
    if !common::prerequisite(
        have("python3", &["--version"]),
        "python3 (the live HTTP service of this test)",
        "apt-get install python3, or run `./dev test`",
    ) {
        return;
    }
    let sb = Sandbox::new();
    let port = common::free_port().to_string();
    sb.fixture("live.toml", "live.toml", &[("PORT", &port)]);
    let st = sb.join("st");
    let up = sb.run(&["run", "live.toml", "--state-dir", "st"]);
    up.expect_code(0);
    assert!(up.stderr.contains("services keep running"), "{}", up.stderr);
    let server = pid_of(&st, "server").expect("the service's pid is recorded");
    assert!(alive(server));

    // A fresh run while the service lives is refused, with the way out.
    let again = sb.run(&["run", "live.toml", "--state-dir", "st"]);
    again.expect_code(2);
    for s in [
        "work from an earlier run that still runs or may: server",
        "`prl-flow run live.toml --state-dir st --resume`",
        "`prl-flow down live.toml --state-dir st`",
    ] {
        assert!(again.stderr.contains(s), "no `{s}` in:\n{}", again.stderr);
    }
    assert_eq!(
        sb.count("marks", "server"),
        1,
        "the refused run started something"
    );
    assert_eq!(pid_of(&st, "server"), Some(server));

    let status = sb.run(&["status", "--state-dir", "st"]);
    status.expect_code(0);
    let row = |out: &common::Out, id: &str| {
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no row for `{id}`:\n{}", out.stdout))
    };
    let server_row = row(&status, "server");
    assert!(server_row.contains(" up "), "{server_row}");
    assert!(
        server_row.contains(&format!("ready, pid {server}")),
        "{server_row}"
    );
    sb.settings()
        .bind(|| insta::assert_snapshot!("status_service_up", status.stdout));

    // The service dies.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server), Signal::SIGKILL)
        .expect("kill the service");
    wait_until("the killed service to be gone", WAIT, || !alive(server));
    let status = sb.run(&["status", "--state-dir", "st"]);
    status.expect_code(1);
    assert!(
        row(&status, "server").contains(" down "),
        "{}",
        status.stdout
    );
    sb.settings()
        .bind(|| insta::assert_snapshot!("status_service_down", status.stdout));

    // The resume restarts it and what needs it, and keeps the rest.
    let resume = sb.run(&[
        "run",
        "live.toml",
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    resume.expect_code(0);
    sb.settings()
        .bind(|| insta::assert_snapshot!("resume_explain_dead_service", resume.stdout));
    for (id, times) in [("server", 2), ("client", 2), ("other", 1)] {
        assert_eq!(
            sb.count("marks", id),
            times,
            "`{id}`: {:?}",
            sb.lines("marks")
        );
    }
    let server2 = pid_of(&st, "server").expect("the new service's pid");
    assert_ne!(server2, server);
    assert!(alive(server2));

    // Logs: the service's own output (the readiness probe's requests).
    let logs = sb.run(&["logs", "server", "--state-dir", "st"]);
    logs.expect_code(0);
    assert!(
        logs.stdout.contains("\"GET / HTTP/1.1\" 200"),
        "{}",
        logs.stdout
    );
    let near = sb.run(&["logs", "sever", "--state-dir", "st"]);
    near.expect_code(2);
    assert!(
        near.stderr.contains("did you mean `server`?"),
        "{}",
        near.stderr
    );
    let unknown = sb.run(&["logs", "nosuch", "--state-dir", "st"]);
    unknown.expect_code(2);
    assert!(unknown.stdout.is_empty());
    sb.settings()
        .bind(|| insta::assert_snapshot!("logs_unknown_task", unknown.stderr));

    // Down: nothing is left.
    let down = sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    assert!(down.stderr.contains("stopped server"), "{}", down.stderr);
    assert!(!alive(server2), "`down` returned with the service alive");
    wait_gone("the service's group", server2);
    let status = sb.run(&["status", "--state-dir", "st"]);
    status.expect_code(0);
    assert!(
        row(&status, "server").contains("stopped"),
        "{}",
        status.stdout
    );
}

// ---------------------------------------------------------------------------------------
// 7. the state dir's lock

#[test]
fn second_run_on_a_busy_state_dir_exits_2_naming_the_holder() {
    let sb = Sandbox::new();
    sb.fixture("lock.toml", "lock.toml", &[]);
    let st = sb.join("st");
    let mut first = sb.spawn("first", &["run", "lock.toml", "--state-dir", "st"]);
    let waiting = wait_for(
        "the service to be started and waiting for readiness",
        WAIT,
        || {
            let pid = pid_of(&st, "waiting")?;
            let log = std::fs::read_to_string(st.join("logs/waiting.log")).unwrap_or_default();
            log.contains("booting").then_some(pid)
        },
    );

    let second = sb.run(&["run", "lock.toml", "--state-dir", "st", "--resume"]);
    second.expect_code(2);
    let holder = format!(
        "in use by another prl-flow: prl-flow run lock.toml (pid {})",
        first.pid()
    );
    assert!(
        second.stderr.contains(&holder),
        "no `{holder}` in:\n{}",
        second.stderr
    );
    let log = std::fs::read_to_string(st.join("logs/waiting.log")).unwrap_or_default();
    assert_eq!(
        log.matches("booting").count(),
        1,
        "the refused run started the service"
    );
    assert!(first.is_running(), "the first run must go on");
    assert_eq!(pid_of(&st, "waiting"), Some(waiting));

    first.signal(Signal::SIGTERM);
    let out = first.wait(COMMAND_DEADLINE);
    assert_eq!(out.code, Some(130), "{}", out.stderr);
    wait_gone("the service", waiting);
}

/// `down` from a second shell while a run holds the state dir aborts that run: the run
/// stops what it started and exits 130 saying who aborted it, then `down` finishes.
#[test]
fn down_during_a_run_aborts_it_and_both_exit_with_nothing_left() {
    let sb = Sandbox::new();
    sb.fixture("signals.toml", "signals.toml", &[]);
    let st = sb.join("st");
    let mut run = sb.spawn("run", &["run", "signals.toml", "--state-dir", "st"]);
    let (server, long) = wait_for("the service up and `long` running", WAIT, || {
        if sb.count("marks", "long-start") == 0 {
            return None;
        }
        Some((pid_of(&st, "server")?, pid_of(&st, "long")?))
    });
    let down = sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    let holder = format!(
        "down: aborting prl-flow run signals.toml (pid {})",
        run.pid()
    );
    assert!(
        down.stderr.contains(&holder),
        "no `{holder}` in:\n{}",
        down.stderr
    );
    let out = run.wait(COMMAND_DEADLINE);
    assert_eq!(out.code, Some(130), "{}", out.stderr);
    assert_one_cancelled_line(&out.stderr, "cancelled by `prl-flow down` (pid ");
    wait_gone("the service's group", server);
    wait_gone("the one-shot's group", long);
    assert_nothing_runs(&sb);
    assert_eq!(status_of(&st, "server").as_deref(), Some("stopped"));
    assert!(
        !st.join("aborted-by").exists(),
        "`down` left its note behind"
    );
}

/// A service that loads until `$WORK/go` exists, and a one-shot that fails once, as soon as
/// the service has begun to load.
const KEEP_LOADING: &str = r#"
[[task]]
id = "loading"
service = true
run = 'echo booting; touch "$WORK/booted"; while [ ! -f "$WORK/go" ]; do sleep 0.05; done; echo ready; exec sleep 300'
ready = { log = "^ready$", interval = "20ms" }

[[task]]
id = "flaky"
run = 'while [ ! -f "$WORK/booted" ]; do sleep 0.02; done; [ -f "$WORK/failed-once" ] && exit 0; touch "$WORK/failed-once"; exit 3'
"#;

/// `--keep`: a service still loading when another task fails is left running and recorded
/// as running; a resume adopts it (the same process, started once) instead of restarting it.
#[test]
fn keep_leaves_a_loading_service_running_and_a_resume_adopts_it() {
    let sb = Sandbox::new();
    sb.write("keep.toml", KEEP_LOADING);
    let st = sb.join("st");
    let out = sb.run(&["run", "keep.toml", "--state-dir", "st", "--keep"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("1 service left loading (--keep)"),
        "{}",
        out.stderr
    );
    let pid = pid_of(&st, "loading").expect("the loading service's pid is recorded");
    assert!(alive(pid), "--keep: the loading service was stopped");
    assert_eq!(status_of(&st, "loading").as_deref(), Some("running"));

    let mut resume = sb.spawn(
        "resume",
        &[
            "run",
            "keep.toml",
            "--state-dir",
            "st",
            "--resume",
            "--explain",
        ],
    );
    wait_until("the resume to adopt the service", WAIT, || {
        resume
            .stdout_text()
            .lines()
            .any(|l| l.starts_with("adopt") && l.contains("loading"))
    });
    sb.write("go", "");
    resume.wait(COMMAND_DEADLINE).expect_code(0);
    assert_eq!(
        pid_of(&st, "loading"),
        Some(pid),
        "the service was restarted"
    );
    let log = std::fs::read_to_string(st.join("logs/loading.log")).unwrap_or_default();
    assert_eq!(log.matches("booting").count(), 1, "started twice:\n{log}");
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
    wait_gone("the service", pid);
}

/// `down` does not signal a process that is not a prl-flow, even one that holds the lock.
#[test]
fn down_leaves_a_lock_holder_that_is_not_prl_flow_alone() {
    let sb = Sandbox::new();
    sb.write("one.toml", "[[task]]\nid = \"one\"\nrun = \"true\"\n");
    sb.run(&["run", "one.toml", "--state-dir", "st"])
        .expect_code(0);
    let lock = sb.join("st/lock");
    std::fs::write(&lock, "prl-flow run one.toml (pid 1)\n").expect("lock text");
    // `flock` holds the lock, then writes its own pid where a prl-flow's would be.
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sh", "-c"])
        .arg(format!(
            "echo \"prl-flow run one.toml (pid $$)\" > {}; touch {}; exec sleep 300",
            lock.display(),
            sb.join("held").display()
        ))
        .spawn()
        .expect("flock");
    wait_until("the lock held", WAIT, || sb.join("held").exists());
    let down = sb.run(&["down", "--state-dir", "st"]);
    let still = holder.try_wait().expect("try_wait").is_none();
    let _ = holder.kill();
    let _ = holder.wait();
    down.expect_code(2);
    assert!(down.stderr.contains("is not a prl-flow"), "{}", down.stderr);
    assert!(still, "`down` signalled a process that is not a prl-flow");
}

// ---------------------------------------------------------------------------------------
// 8. readiness, timeouts, retries

#[test]
fn service_that_exits_before_ready_fails_at_once_with_its_log() {
    let sb = Sandbox::new();
    let port = common::free_port().to_string();
    sb.fixture("ready_crash.toml", "ready_crash.toml", &[("PORT", &port)]);
    let began = Instant::now();
    let out = sb.run(&["run", "ready_crash.toml", "--state-dir", "st"]);
    let took = began.elapsed();
    out.expect_code(1);
    // Its ready_timeout is 60s: failing "at once" is failing well before that.
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}: it waited for the timeout"
    );
    for s in [
        "`engine` exited with status 7 before it was ready",
        "loading model",
        "fatal: no GPU found",
    ] {
        assert!(out.stderr.contains(s), "no `{s}` in:\n{}", out.stderr);
    }
    assert_eq!(
        sb.count("marks", "client"),
        0,
        "a task after a failed service ran"
    );
    assert_eq!(
        status_of(&sb.join("st"), "engine").as_deref(),
        Some("failed")
    );
    assert_eq!(
        status_of(&sb.join("st"), "client").as_deref(),
        Some("skipped")
    );
    // A resume says it failed (not merely that it was stopped), and fails the same way.
    let again = sb.run(&[
        "run",
        "ready_crash.toml",
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    again.expect_code(1);
    assert!(
        again
            .stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["run", "engine", "failed"]),
        "{}",
        again.stdout
    );
}

/// A service whose leader exits before it is ready leaves nothing of its process group
/// behind, even when a retry follows (whose record would no longer name the first attempt).
#[test]
fn a_service_that_exits_before_ready_leaves_nothing_of_its_group_across_retries() {
    let sb = Sandbox::new();
    let port = common::free_port();
    sb.write(
        "w.toml",
        &format!(
            r#"
[[task]]
id = "svc"
service = true
retries = 1
backoff = "10ms"
run = 'sleep 300 & echo "left $!" >> "$WORK/left"; exit 1'
ready = {{ tcp = "127.0.0.1:{port}", interval = "20ms", ready_timeout = "60s" }}
"#
        ),
    );
    let out = sb.run(&["run", "w.toml", "--state-dir", "st"]);
    out.expect_code(1);
    assert!(
        out.stderr
            .contains("`svc` exited with status 1 before it was ready"),
        "{}",
        out.stderr
    );
    let left = sb.lines("left");
    assert_eq!(left.len(), 2, "two attempts: {left:?}");
    for l in &left {
        let pid: i32 = l.trim_start_matches("left ").parse().expect("pid");
        wait_gone("what an attempt left in its group", pid);
    }
    assert_nothing_runs(&sb);
}

/// A service that was ready and hangs (alive, no longer answering) is not "up": `status`
/// says so and exits 1. `down` stops it although it is stopped (SIGSTOP): a SIGCONT follows
/// every SIGTERM.
#[test]
fn a_hung_service_is_not_up_and_down_stops_it() {
    let sb = Sandbox::new();
    let port = common::free_port();
    sb.write(
        "w.toml",
        &format!(
            r#"
[[task]]
id = "web"
service = true
run = 'exec python3 -m http.server {port} --bind 127.0.0.1'
ready = {{ http = "http://127.0.0.1:{port}/", interval = "50ms", timeout = "300ms" }}
"#
        ),
    );
    sb.run(&["run", "w.toml", "--state-dir", "st"])
        .expect_code(0);
    let pid = pid_of(&sb.join("st"), "web").expect("web's pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).expect("stop web");
    let status = sb.run(&["status", "--state-dir", "st"]);
    status.expect_code(1);
    assert!(
        status.stdout.contains("is no longer ready"),
        "{}",
        status.stdout
    );
    let down = sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    assert!(down.stderr.contains("stopped web"), "{}", down.stderr);
    wait_gone("the hung service", pid);
    assert_nothing_runs(&sb);
}

#[test]
fn service_that_never_becomes_ready_fails_at_its_ready_timeout_and_is_stopped() {
    let sb = Sandbox::new();
    let port = common::free_port().to_string();
    sb.fixture("ready_never.toml", "ready_never.toml", &[("PORT", &port)]);
    let out = sb.run(&["run", "ready_never.toml", "--state-dir", "st"]);
    out.expect_code(1);
    let says = format!("`engine` was not ready after 3s (last probe: tcp 127.0.0.1:{port}");
    assert!(
        out.stderr.contains(&says),
        "no `{says}` in:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("loading weights"), "{}", out.stderr);
    let pid = pid_of(&sb.join("st"), "engine").expect("engine's pid");
    assert!(!alive(pid), "the service that was never ready still runs");
    wait_gone("the unready service", pid);
}

/// A workflow service whose probe reaches its own node on `port`, ready within 3 s.
fn probed_service(port: u16, ports: &str) -> String {
    format!(
        r#"
[[task]]
id = "svc"
service = true
run = 'exec sleep 300'
ready = {{ tcp = "127.0.0.1:{port}", interval = "20ms", ready_timeout = "3s" }}
{ports}
"#
    )
}

/// A workflow service's probe counts only when its own process answers: the port its probe
/// reaches on its node must be free before the start and held by the service once the
/// probe passes; `ports = []` turns both checks off.
#[test]
fn a_workflow_probe_answered_by_another_process_does_not_make_a_service_ready() {
    let me = format!("pid {}", std::process::id());
    // Taken before the start: nothing starts.
    let sb = Sandbox::new();
    let stranger = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = stranger.local_addr().expect("addr").port();
    sb.write("w.toml", &probed_service(port, ""));
    let out = sb.run(&["run", "w.toml", "--state-dir", "st"]);
    out.expect_code(1);
    let want =
        format!("port {port} is already in use (set by `ready.tcp` of task `svc`), held by {me}");
    assert!(
        out.stderr.contains(&want),
        "no `{want}` in:\n{}",
        out.stderr
    );
    assert_eq!(pid_of(&sb.join("st"), "svc"), None, "svc was started");
    assert_nothing_runs(&sb);

    // Taken after the start, while the service loads: the probe passes, the run fails
    // naming who answered, ours is stopped and the stranger left alone.
    let sb = Sandbox::new();
    let port = common::free_port();
    sb.write("w.toml", &probed_service(port, ""));
    let mut run = sb.spawn(
        "run",
        &["--no-progress", "run", "w.toml", "--state-dir", "st"],
    );
    wait_until("svc to start", WAIT, || {
        pid_of(&sb.join("st"), "svc").is_some()
    });
    let late = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let out = run.wait(COMMAND_DEADLINE);
    out.expect_code(1);
    let want = format!("`svc` is not what answers on port {port}: {me}");
    assert!(
        out.stderr.contains(&want),
        "no `{want}` in:\n{}",
        out.stderr
    );
    assert_eq!(status_of(&sb.join("st"), "svc").as_deref(), Some("failed"));
    assert_nothing_runs(&sb);
    drop(late);

    // `ports = []`: the port is not the service's to check, and the probe's answer counts.
    let sb = Sandbox::new();
    sb.write("w.toml", &probed_service(port, "ports = []"));
    let _held = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    sb.run(&["run", "w.toml", "--state-dir", "st"])
        .expect_code(0);
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
    assert_nothing_runs(&sb);
    drop(stranger);
}

/// A log probe reads the attempt's own lines: a service started again whose new process
/// never prints its ready line is not ready because the old one printed it.
#[test]
fn a_restarted_service_is_not_ready_on_its_previous_attempts_log_line() {
    let sb = Sandbox::new();
    sb.write(
        "s.toml",
        r#"
[[task]]
id = "s"
service = true
run = 'if [ -e "$WORK/again" ]; then echo "second attempt"; else touch "$WORK/again"; echo up; fi; exec sleep 300'
ready = { log = "^up$", interval = "20ms", ready_timeout = "2s" }
"#,
    );
    sb.run(&["run", "s.toml", "--state-dir", "st"])
        .expect_code(0);
    let first = pid_of(&sb.join("st"), "s").expect("s's pid");
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).expect("kill s");
    wait_gone("the first attempt", first);
    let out = sb.run(&["run", "s.toml", "--state-dir", "st", "--resume"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("`s` was not ready after 2s"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("second attempt"), "{}", out.stderr);
    let second = pid_of(&sb.join("st"), "s").expect("s's second pid");
    assert_ne!(second, first);
    wait_gone("the unready second attempt", second);
    assert_nothing_runs(&sb);
}

#[test]
fn task_over_its_timeout_is_stopped() {
    let sb = Sandbox::new();
    sb.fixture("timeout.toml", "timeout.toml", &[]);
    let out = sb.run(&["run", "timeout.toml", "--state-dir", "st"]);
    out.expect_code(1);
    assert!(out.stderr.contains("timed out after 3s"), "{}", out.stderr);
    let st = sb.join("st");
    assert_eq!(status_of(&st, "slow").as_deref(), Some("timed-out"));
    assert_eq!(sb.count("marks", "slow-start"), 1);
    let pid = pid_of(&st, "slow").expect("slow's pid");
    assert!(!alive(pid), "the timed-out task still runs");
    wait_gone("the timed-out task", pid);
}

#[test]
fn retries_rerun_a_flaky_task_until_it_passes() {
    let sb = Sandbox::new();
    sb.fixture("flaky.toml", "flaky.toml", &[]);
    let out = sb.run(&["run", "flaky.toml", "--state-dir", "st"]);
    out.expect_code(0);
    assert_eq!(sb.count("marks", "flaky"), 2, "{:?}", sb.lines("marks"));
    assert_eq!(sb.count("marks", "after"), 1);
    assert!(out.stderr.contains("retry  flaky"), "{}", out.stderr);
    assert!(
        out.stderr.contains("start  flaky (attempt 2)"),
        "{}",
        out.stderr
    );
    let recs = records(&sb.join("st"));
    assert_eq!(recs["flaky"]["attempts"], 2);
    assert_eq!(recs["flaky"]["status"], "done");
}

// ---------------------------------------------------------------------------------------
// 9. help

#[test]
fn help_of_every_subcommand_shows_an_example() {
    let sb = Sandbox::new();
    for sub in [
        "", "run", "graph", "plan", "validate", "status", "down", "logs",
    ] {
        let mut args: Vec<&str> = Vec::new();
        if !sub.is_empty() {
            args.push(sub);
        }
        args.push("--help");
        let out = sb.run(&args);
        out.expect_code(0);
        assert!(
            out.stdout.contains("Example"),
            "`prl-flow {sub} --help` shows no example:\n{}",
            out.stdout
        );
        assert!(out.stdout.contains("prl-flow"), "{}", out.stdout);
    }
}

// ---------------------------------------------------------------------------------------
// 10. what the docs promise: teardown order, attach, logs -f, status -v, timeouts,
//     start_period, retries of a service

/// Three services in a chain; each notes in `$WORK/stops` when SIGTERM reaches it, and is
/// ready once its trap is set (a service stopped before that would die without a note).
const CHAIN: &str = r#"
[[task]]
id = "a"
service = true
run = 'trap "echo a >> \"$WORK/stops\"; exit 0" TERM; echo armed; while :; do sleep 0.05; done'
ready = { log = "^armed$", interval = "20ms" }

[[task]]
id = "b"
service = true
needs = ["a"]
run = 'trap "echo b >> \"$WORK/stops\"; exit 0" TERM; echo armed; while :; do sleep 0.05; done'
ready = { log = "^armed$", interval = "20ms" }

[[task]]
id = "c"
service = true
needs = ["b"]
run = 'trap "echo c >> \"$WORK/stops\"; exit 0" TERM; echo armed; while :; do sleep 0.05; done'
ready = { log = "^armed$", interval = "20ms" }
"#;

fn chain() -> Sandbox {
    let sb = Sandbox::new();
    sb.write("chain.toml", CHAIN);
    sb
}

#[track_caller]
fn assert_nothing_runs(sb: &Sandbox) {
    let left = common::processes_under(sb.path());
    assert!(left.is_empty(), "processes left running:\n{left:#?}");
}

#[test]
fn down_stops_services_last_started_first() {
    let sb = chain();
    sb.run(&["run", "chain.toml", "--state-dir", "st"])
        .expect_code(0);
    let down = sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    // Each service heard its SIGTERM only once the one after it had ended.
    assert_eq!(sb.lines("stops"), ["c", "b", "a"]);
    let at = |id: &str| {
        down.stderr
            .find(&format!("stopped {id}"))
            .unwrap_or_else(|| panic!("`{id}` not stopped:\n{}", down.stderr))
    };
    assert!(at("c") < at("b") && at("b") < at("a"), "{}", down.stderr);
    assert_nothing_runs(&sb);
}

/// `run chain.toml --attach` in the background, once it says it is attached.
fn attached(sb: &Sandbox) -> common::Running {
    let run = sb.spawn(
        "attach",
        &[
            "--no-progress",
            "run",
            "chain.toml",
            "--state-dir",
            "st",
            "--attach",
        ],
    );
    wait_until("attached", WAIT, || run.stderr_text().contains("attached:"));
    run
}

/// `run --attach` (what `./dev demo` runs) says when a service dies, and Ctrl-C stops
/// everything.
#[test]
fn attach_restarts_a_dead_service_and_ctrl_c_leaves_nothing() {
    let sb = chain();
    let mut run = attached(&sb);
    let b = pid_of(&sb.join("st"), "b").expect("b's pid");
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(b), Signal::SIGKILL).expect("kill b");
    wait_until("the death of `b` reported and `b` restarted", WAIT, || {
        let e = run.stderr_text();
        e.contains("heal: `b` is down") && e.contains("heal: restarted `b`")
    });
    let again = pid_of(&sb.join("st"), "b").expect("b's new pid");
    assert_ne!(again, b);
    assert!(alive(again));
    run.signal(Signal::SIGINT);
    let out = run.wait(COMMAND_DEADLINE);
    out.expect_code(0);
    assert!(
        out.stderr.contains("stopping the deployment"),
        "{}",
        out.stderr
    );
    // `c` needs `b`, so the restart replaced it too (its old process stopped first); then
    // Ctrl-C stops the new `c`, the restarted `b` and `a`.
    assert_eq!(sb.lines("stops"), ["c", "c", "b", "a"]);
    assert_nothing_runs(&sb);
}

/// A restart that fails leaves the service down, and the healer tries again (within the
/// budget) rather than forgetting it.
#[test]
fn attach_tries_again_after_a_failed_restart() {
    let sb = Sandbox::new();
    sb.write(
        "chain.toml",
        &CHAIN.replacen(
            "run = 'trap \"echo b",
            "run = '[ -f \"$WORK/broken\" ] && exit 3; trap \"echo b",
            1,
        ),
    );
    let text = std::fs::read_to_string(sb.join("chain.toml")).expect("read");
    assert!(text.contains("broken"), "{text}");
    let mut run = attached(&sb);
    sb.write("broken", "");
    let b = pid_of(&sb.join("st"), "b").expect("b's pid");
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(b), Signal::SIGKILL).expect("kill b");
    wait_until("the restart of `b` to fail", WAIT, || {
        run.stderr_text().contains("heal: the restart failed")
    });
    assert!(!run.stderr_text().contains("heal: restarted `b`"));
    std::fs::remove_file(sb.join("broken")).expect("rm");
    wait_until("`b` restarted after all", WAIT, || {
        run.stderr_text().contains("heal: restarted `b`")
    });
    let again = pid_of(&sb.join("st"), "b").expect("b's new pid");
    assert!(alive(again));
    run.signal(Signal::SIGINT);
    run.wait(COMMAND_DEADLINE).expect_code(0);
    assert_nothing_runs(&sb);
}

/// `run chain.toml --attach` in `sb`, then `down` from elsewhere: the attached run ends by
/// itself, saying why, and nothing is left. Returns what the attached run printed.
fn down_elsewhere_ends_the_attached_run(sb: &Sandbox) -> String {
    let mut run = attached(sb);
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
    let out = run.wait(COMMAND_DEADLINE);
    out.expect_code(0);
    assert!(
        out.stderr
            .contains("the deployment was stopped by `prl-flow down`"),
        "{}",
        out.stderr
    );
    assert_nothing_runs(sb);
    out.stderr
}

/// `run --attach` ends by itself when `down` runs elsewhere.
#[test]
fn attach_ends_when_down_runs_elsewhere() {
    down_elsewhere_ends_the_attached_run(&chain());
}

/// `down` elsewhere takes a while (each service takes 0.3 s to end): the attached run sees
/// the first services end while `down` still runs, and must not bring them back once `down`
/// is done.
#[test]
fn attach_does_not_restart_what_a_slow_down_elsewhere_stopped() {
    let sb = Sandbox::new();
    sb.write(
        "chain.toml",
        &CHAIN.replace("trap \"echo", "trap \"sleep 0.3; echo"),
    );
    let stderr = down_elsewhere_ends_the_attached_run(&sb);
    assert!(!stderr.contains("heal: restarted"), "{stderr}");
    assert_eq!(sb.lines("stops"), ["c", "b", "a"]);
}

/// `logs -f` prints what a task appends, as it comes, and ends when the task ends.
#[test]
fn logs_follow_prints_what_is_appended_and_ends_with_the_task() {
    let sb = Sandbox::new();
    sb.write(
        "talk.toml",
        r#"
[[task]]
id = "talker"
service = true
run = 'echo first-line; while [ ! -f "$WORK/go" ]; do sleep 0.05; done; echo second-line; while :; do sleep 0.05; done'
"#,
    );
    sb.run(&["run", "talk.toml", "--state-dir", "st"])
        .expect_code(0);
    let mut follow = sb.spawn("follow", &["logs", "talker", "-f", "--state-dir", "st"]);
    wait_until("the first line followed", WAIT, || {
        follow.stdout_text().contains("first-line")
    });
    assert!(!follow.stdout_text().contains("second-line"));
    sb.write("go", "");
    wait_until("the appended line followed", WAIT, || {
        follow.stdout_text().contains("second-line")
    });
    assert!(follow.is_running(), "`logs -f` ended while the task runs");
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
    let out = follow.wait(COMMAND_DEADLINE);
    out.expect_code(0);
}

/// `status -v` shows a dead service as down and says what a resume would do about it and
/// what follows it.
#[test]
fn status_verbose_shows_a_dead_service_and_what_a_resume_would_do() {
    let sb = chain();
    sb.run(&["run", "chain.toml", "--state-dir", "st"])
        .expect_code(0);
    let b = pid_of(&sb.join("st"), "b").expect("b's pid");
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(b), Signal::SIGKILL).expect("kill b");
    wait_gone("b", b);
    let out = sb.run(&["status", "chain.toml", "--state-dir", "st", "-v"]);
    out.expect_code(1);
    let row = |id: &str| {
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for `{id}`:\n{}", out.stdout))
            .to_string()
    };
    assert!(row("a").contains(" up"), "{}", out.stdout);
    assert!(row("b").contains(" down"), "{}", out.stdout);
    let plan = out
        .stdout
        .split("what `run --resume` would do:")
        .nth(1)
        .unwrap_or_else(|| panic!("no resume plan:\n{}", out.stdout));
    let says = |word: &str, id: &str, why: &str| {
        plan.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&word) && w.get(1) == Some(&id) && l.contains(why)
        })
    };
    assert!(says("keep", "a", ""), "{plan}");
    assert!(says("run", "b", "no longer alive"), "{plan}");
    assert!(says("run", "c", "upstream re-ran"), "{plan}");
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
    assert_nothing_runs(&sb);
}

/// A service whose probe never passes, with a long `ready_timeout` and a short `timeout`:
/// `timeout` covers readiness, so the attempt ends at `timeout` and its process is stopped.
#[test]
fn timeout_covers_readiness() {
    let sb = Sandbox::new();
    let port = common::free_port();
    sb.write(
        "slow.toml",
        &format!(
            r#"
[[task]]
id = "slow"
service = true
run = 'exec sleep 1000'
timeout = "1s"
ready = {{ tcp = "127.0.0.1:{port}", ready_timeout = "1h" }}
"#
        ),
    );
    let out = sb.run(&["run", "slow.toml", "--state-dir", "st"]);
    out.expect_code(1);
    assert!(out.stderr.contains("timed out after 1s"), "{}", out.stderr);
    assert_eq!(
        status_of(&sb.join("st"), "slow").as_deref(),
        Some("timed-out")
    );
    assert_nothing_runs(&sb);
}

/// Probe failures within `start_period` are expected and not reported; after it they are.
#[test]
fn start_period_hides_the_probe_failures_it_expects() {
    let sb = Sandbox::new();
    let port = common::free_port();
    let service = |id: &str, period: &str| {
        format!(
            r#"
[[task]]
id = "{id}"
service = true
run = 'exec sleep 1000'
ready = {{ tcp = "127.0.0.1:{port}", interval = "50ms", start_period = "{period}", ready_timeout = "1s" }}
"#
        )
    };
    sb.write(
        "two.toml",
        &format!("{}{}", service("patient", "1h"), service("eager", "0s")),
    );
    let out = sb.run(&[
        "--no-progress",
        "run",
        "two.toml",
        "--state-dir",
        "st",
        "--keep-going",
    ]);
    out.expect_code(1);
    assert!(
        out.stderr.contains(&format!(
            "wait   eager: not ready yet: tcp 127.0.0.1:{port}"
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("wait   patient"), "{}", out.stderr);
    assert_nothing_runs(&sb);
}

/// A retried service stops its previous attempt before the next one starts: two attempts
/// never run at once (each notes whether the one before it still ran).
#[test]
fn a_retried_service_stops_its_previous_attempt_first() {
    let sb = Sandbox::new();
    let port = common::free_port();
    sb.write(
        "retry.toml",
        &format!(
            r#"
[[task]]
id = "svc"
service = true
retries = 2
backoff = "10ms"
timeout = "3s"
run = '''
if [ -f "$WORK/pids" ]; then
  last=$(tail -n 1 "$WORK/pids")
  state=$(cut -d" " -f3 "/proc/$last/stat" 2>/dev/null)
  if [ -n "$state" ] && [ "$state" != Z ]; then echo "$last" >> "$WORK/overlap"; fi
fi
echo $$ >> "$WORK/pids"
exec sleep 1000
'''
ready = {{ tcp = "127.0.0.1:{port}" }}
"#
        ),
    );
    let out = sb.run(&["run", "retry.toml", "--state-dir", "st"]);
    out.expect_code(1);
    let pids = sb.lines("pids");
    assert_eq!(pids.len(), 3, "three attempts: {pids:?}\n{}", out.stderr);
    assert_eq!(
        sb.lines("overlap"),
        Vec::<String>::new(),
        "attempts overlapped"
    );
    for p in &pids {
        assert!(!alive(p.parse().expect("pid")), "attempt {p} still runs");
    }
    assert_nothing_runs(&sb);
}

// ---------------------------------------------------------------------------------------
// Where a workflow's tasks run: the workflow file's directory, or their `dir`

/// A workflow in `proj/`, run from the sandbox: `build` reads and writes relative paths in
/// `proj/`, `deeper` runs in `proj/sub` (its `dir`).
const IN_A_DIR: &str = r#"
[[task]]
id = "build"
run = "cat input.txt > output.txt"

[[task]]
id = "deeper"
dir = "sub"
run = "pwd > where.txt"
needs = ["build"]
"#;

#[test]
fn tasks_run_in_the_workflows_directory_or_their_dir_and_keep_their_files_in_the_state_dir() {
    let sb = Sandbox::new();
    sb.write("proj/wf.toml", IN_A_DIR);
    sb.write("proj/input.txt", "from the input\n");
    std::fs::create_dir(sb.join("proj/sub")).expect("proj/sub");
    sb.run(&["run", "proj/wf.toml", "--state-dir", "st"])
        .expect_code(0);
    let read = |rel: &str| std::fs::read_to_string(sb.join(rel)).unwrap_or_default();
    assert_eq!(read("proj/output.txt"), "from the input\n");
    let sub = std::fs::canonicalize(sb.join("proj/sub")).expect("canonical");
    assert_eq!(Path::new(read("proj/sub/where.txt").trim()), sub);
    assert!(!sb.join("output.txt").exists() && !sb.join("st/run/build/output.txt").exists());
    // Each task's pid and exit status stay in its pid file under the state dir; a task that
    // starts elsewhere and is given no files has no run dir.
    for id in ["build", "deeper"] {
        let proc_file = read(&format!("st/run/{id}.pid"));
        assert_eq!(proc_file.lines().nth(1), Some("0"), "{id}: {proc_file:?}");
        assert_eq!(proc_file.lines().count(), 2, "{id}: {proc_file:?}");
        assert!(!sb.join("st/run").join(id).exists(), "{id}: a run dir");
    }
    // Nothing changed: a resume from another directory keeps both.
    let st = sb.join("st").display().to_string();
    let mut again = sb.cmd(&[
        "run",
        "../wf.toml",
        "--state-dir",
        &st,
        "--resume",
        "--explain",
    ]);
    again.current_dir(sb.join("proj/sub"));
    let out = common::output_within(again, COMMAND_DEADLINE);
    out.expect_code(0);
    assert_eq!(decision(&out.stdout, "build"), "keep", "{}", out.stdout);
    assert_eq!(decision(&out.stdout, "deeper"), "keep", "{}", out.stdout);
}

/// What `--explain` says it does with task `id` (`keep`, `run`, `adopt`).
fn decision(explained: &str, id: &str) -> String {
    explained
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let what = w.next()?;
            (w.next()? == id).then(|| what.to_string())
        })
        .unwrap_or_default()
}

#[test]
fn a_changed_dir_runs_the_task_again() {
    let sb = Sandbox::new();
    sb.write("proj/wf.toml", IN_A_DIR);
    sb.write("proj/input.txt", "x\n");
    std::fs::create_dir_all(sb.join("proj/sub")).expect("proj/sub");
    std::fs::create_dir_all(sb.join("proj/other")).expect("proj/other");
    sb.run(&["run", "proj/wf.toml", "--state-dir", "st"])
        .expect_code(0);
    sb.write(
        "proj/wf.toml",
        &IN_A_DIR.replace("dir = \"sub\"", "dir = \"other\""),
    );
    let out = sb.run(&[
        "run",
        "proj/wf.toml",
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    out.expect_code(0);
    assert_eq!(decision(&out.stdout, "build"), "keep", "{}", out.stdout);
    assert_eq!(decision(&out.stdout, "deeper"), "run", "{}", out.stdout);
    assert!(sb.join("proj/other/where.txt").is_file());
}

#[test]
fn a_dir_that_does_not_exist_is_refused_at_its_place() {
    let sb = Sandbox::new();
    sb.write(
        "proj/wf.toml",
        "[[task]]\nid = \"a\"\nrun = 'echo a >> \"$WORK/marks\"'\n\n[[task]]\nid = \"b\"\ndir = \"nowhere\"\nrun = \"true\"\n",
    );
    for args in [
        &["validate", "proj/wf.toml"][..],
        &["run", "proj/wf.toml", "--state-dir", "st"],
    ] {
        let out = sb.run(args);
        out.expect_code(2);
        assert!(out.stderr.contains("proj/wf.toml:7:7"), "{}", out.stderr);
        assert!(out.stderr.contains("no such directory"), "{}", out.stderr);
        assert!(out.stderr.contains("nowhere"), "{}", out.stderr);
    }
    assert_eq!(sb.count("marks", "a"), 0, "nothing runs");
}

#[test]
fn kill_9_then_resume_adopts_a_one_shot_running_in_the_workflows_directory() {
    let sb = Sandbox::new();
    sb.write(
        "proj/wf.toml",
        "[[task]]\nid = \"long\"\n\
         run = 'echo started >> \"$WORK/marks\"; while [ ! -e gate ]; do sleep 0.05; done; echo done > result'\n",
    );
    let st = sb.join("st");
    let mut first = sb.spawn("first", &["run", "proj/wf.toml", "--state-dir", "st"]);
    let pid = wait_for("`long` in flight", WAIT, || {
        let recs = records(&st);
        let long = recs.get("long")?;
        (long["status"] == "running" && sb.count("marks", "started") == 1)
            .then(|| long["handle"]["payload"]["pid"].as_i64())
            .flatten()
            .map(|p| p as i32)
    });
    first.kill9();
    assert!(
        alive(pid),
        "the one-shot must outlive a `kill -9` of prl-flow"
    );
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("its cwd");
    assert_eq!(cwd, std::fs::canonicalize(sb.join("proj")).expect("proj"));
    assert!(sb.join("st/run/long.pid").is_file());

    let mut resume = sb.spawn(
        "resume",
        &[
            "run",
            "proj/wf.toml",
            "--state-dir",
            "st",
            "--resume",
            "--explain",
        ],
    );
    wait_until("the resume to adopt `long`", WAIT, || {
        resume.stderr_text().contains("adopt  long")
    });
    sb.write("proj/gate", "");
    resume.wait(COMMAND_DEADLINE).expect_code(0);
    assert_eq!(sb.count("marks", "started"), 1, "`long` ran twice");
    assert_eq!(
        pid_of(&st, "long"),
        Some(pid),
        "the adopted process is kept"
    );
    assert!(sb.join("proj/result").is_file());
    let proc_file = std::fs::read_to_string(st.join("run/long.pid")).expect("pid file");
    assert_eq!(proc_file.lines().nth(1), Some("0"), "{proc_file:?}");
}

// ---------------------------------------------------------------------------------------
// A no-op resume: told from the stamp beside the journal while nothing changed

/// Every file under a state dir but its lock (which each command takes), with its inode,
/// time and size: what a command that writes nothing leaves as it was.
fn state_files(st: &Path) -> std::collections::BTreeMap<std::path::PathBuf, (u64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, out: &mut std::collections::BTreeMap<std::path::PathBuf, (u64, i64, u64)>) {
        for e in std::fs::read_dir(dir).expect("read state dir").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            if m.is_dir() {
                walk(&p, out);
            }
            if p.file_name() != Some(std::ffi::OsStr::new("lock")) {
                let t = m.mtime() * 1_000_000_000 + m.mtime_nsec();
                out.insert(p, (m.ino(), t, m.len()));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(st, &mut out);
    out
}

const ABC: &str = r#"
[[task]]
id = "a"
run = 'echo a >> marks'

[[task]]
id = "b"
run = 'echo b >> marks'
needs = ["a"]

[[task]]
id = "c"
run = 'echo c >> marks'
"#;

#[test]
fn a_noop_resume_writes_nothing_and_any_change_takes_the_full_path() {
    let sb = Sandbox::new();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "flow.toml", "--state-dir", "st", "--no-progress"];
        args.extend_from_slice(extra);
        sb.run(&args)
    };
    sb.write("flow.toml", ABC);
    run(&[]).expect_code(0);
    let st = sb.join("st");
    assert!(
        st.join("up-to-date.json").is_file(),
        "no stamp after a run that ended ok"
    );

    // Nothing changed: every task kept, and not one file of the state dir rewritten (no
    // task's run dir or log, not the journal, the options or the owner).
    let before = state_files(&st);
    let noop = run(&["--resume"]);
    noop.expect_code(0);
    assert!(
        noop.stderr.contains("ok: 0 tasks done, 3 kept"),
        "{}",
        noop.stderr
    );
    assert_eq!(state_files(&st), before, "a no-op resume rewrote files");
    assert_eq!(sb.lines("marks").len(), 3);

    // The same size, another command: `b` runs again, and what needs it would too.
    sb.write("flow.toml", &ABC.replace("echo b >>", "echo  b>>"));
    let changed = run(&["--resume"]);
    changed.expect_code(0);
    assert_eq!(sb.count("marks", "b"), 2, "{}", changed.stderr);
    assert_eq!(sb.count("marks", "a"), 1);
    assert_eq!(sb.count("marks", "c"), 1);

    // Another text with the same tasks (a comment): the full path, which runs nothing and
    // writes its options again; then the stamp holds again.
    sb.write(
        "flow.toml",
        &format!("# a comment\n{}", ABC.replace("echo b >>", "echo  b>>")),
    );
    let before = state_files(&st);
    let comment = run(&["--resume"]);
    comment.expect_code(0);
    assert_ne!(
        state_files(&st).get(&st.join("options.json")),
        before.get(&st.join("options.json")),
        "a changed file took the shortcut"
    );
    assert_eq!(sb.lines("marks").len(), 4);
    let before = state_files(&st);
    run(&["--resume"]).expect_code(0);
    assert_eq!(state_files(&st), before);

    // `--explain` explains each task: the full path.
    let explained = run(&["--resume", "--explain"]);
    explained.expect_code(0);
    assert!(explained.stdout.contains("keep"), "{}", explained.stdout);
}

#[test]
fn a_resume_after_a_killed_run_takes_the_full_path_even_with_the_old_file_back() {
    let sb = Sandbox::new();
    sb.write("flow.toml", ABC);
    let args = ["run", "flow.toml", "--state-dir", "st", "--no-progress"];
    sb.run(&args).expect_code(0);
    let st = sb.join("st");
    assert!(st.join("up-to-date.json").is_file());

    // A new task that waits for `go`; the resume that starts it is killed.
    let waits = format!(
        "{ABC}\n[[task]]\nid = \"d\"\nrun = 'echo d >> starts; while [ ! -e go ]; do sleep 0.02; done; echo d >> marks'\n"
    );
    sb.write("flow.toml", &waits);
    let mut resume = sb.spawn("killed", &[&args[..], &["--resume"]].concat());
    wait_until("`d` to start", WAIT, || sb.count("starts", "d") == 1);
    resume.kill9();
    assert!(
        !st.join("up-to-date.json").exists(),
        "the stamp outlived a run that changed the state dir"
    );

    // The file as it was when the stamp was made: still the full path (the journal changed).
    sb.write("flow.toml", ABC);
    let before = state_files(&st);
    let back = sb.run(&[&args[..], &["--resume"]].concat());
    back.expect_code(0);
    assert_ne!(
        state_files(&st).get(&st.join("journal.json")),
        before.get(&st.join("journal.json")),
        "the resume after a kill took the shortcut:\n{}",
        back.stderr
    );
    std::fs::write(sb.join("go"), "").expect("write go");
    wait_until("`d` to end", WAIT, || sb.count("marks", "d") == 1);
    assert_eq!(sb.lines("marks").len(), 4);
}
