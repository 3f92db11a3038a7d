//! The journal's promises, through the binary against real processes: a journal that cannot
//! be written stops the run (on a real full file system), a fresh run refuses while a
//! killed run's one-shot still runs, `down` takes down what a damaged journal still names,
//! and a task end lost to `kill -9` is learnt again by `--resume`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{alive, pid_of, processes_under, records, status_of, wait_until, Sandbox, WAIT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A small tmpfs mounted at a dir of the sandbox; on drop, whatever still runs in it is
/// killed and it is unmounted.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    /// `None` (after the prerequisite check said why) when mounting is not permitted here.
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        common::prerequisite(
            ok,
            "permission to mount a tmpfs (a real full file system for the journal)",
            "run the tests as root, as `./dev test` does",
        )
        .then(|| Self {
            at: at.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for p in processes_under(&self.at) {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Services that each run a `sleep` in the state dir, all after `fill`, which fills the file
/// system the state dir is on.
fn full_disk_workflow(services: usize) -> String {
    let mut wf = String::from(
        "[[task]]\nid = \"fill\"\ndir = \"st\"\nrun = \"cat /dev/zero > filler 2>/dev/null; true\"\n",
    );
    for i in 0..services {
        wf.push_str(&format!(
            "\n[[task]]\nid = \"s{i:02}\"\ndir = \"st\"\nargv = [\"sleep\", \"3600\"]\nservice = true\nneeds = [\"fill\"]\n"
        ));
    }
    wf
}

#[test]
fn a_journal_that_cannot_be_written_stops_the_run_and_leaves_nothing_running() {
    let sb = Sandbox::new();
    let st = sb.track_state_dir("st");
    let Some(_fs) = Tmpfs::mount(&st, "1m") else {
        return;
    };
    sb.write("wf.toml", &full_disk_workflow(20));
    let out = sb.run(&["run", "wf.toml", "--state-dir", "st"]);
    out.expect_code(1);
    let err = &out.stderr;
    assert!(err.contains("cannot be written"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("state dir `st`"), "{err}");
    // The failure came mid-run: something had started.
    assert!(sb.join("st/run/fill.pid").is_file(), "{err}");
    // Nothing the run started runs, as the OS sees it.
    let left = processes_under(&st);
    assert!(left.is_empty(), "still running: {left:?}\n{err}");
    // Every start that was made is in the journal (its start was written first).
    let recorded = records(&st);
    for e in std::fs::read_dir(st.join("run"))
        .expect("run dirs")
        .flatten()
    {
        // A service's run dir, or a one-shot's proc file beside its own.
        let name = e.file_name().to_string_lossy().into_owned();
        let id = name.strip_suffix(".pid").unwrap_or(&name);
        assert!(
            recorded.contains_key(id),
            "`{id}` started but the journal never heard of it\n{err}"
        );
    }
    let temps: Vec<_> = std::fs::read_dir(&st)
        .expect("state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");
}

/// `wf.toml`'s one-shot `once` (it runs until `$WORK/release` exists) started by a run that
/// is then killed with `kill -9`: the state dir `st` and the one-shot's pid, still running.
fn one_shot_of_a_killed_run(sb: &Sandbox) -> (PathBuf, i32) {
    let st = sb.track_state_dir("st");
    sb.write(
        "wf.toml",
        "[[task]]\nid = \"once\"\ntimeout = \"20s\"\n\
         run = \"echo started >> \\\"$WORK/marks\\\"; while [ ! -e \\\"$WORK/release\\\" ]; do sleep 0.05; done\"\n",
    );
    let mut first = sb.spawn("first", &["run", "wf.toml", "--state-dir", "st"]);
    let pid = common::wait_for("the one-shot's handle in the journal", WAIT, || {
        pid_of(&st, "once")
    });
    wait_until("the one-shot's start mark", WAIT, || {
        sb.count("marks", "started") == 1
    });
    first.kill9();
    (st, pid)
}

#[test]
fn a_fresh_run_refuses_while_a_killed_runs_one_shot_still_runs() {
    let sb = Sandbox::new();
    let (_, pid) = one_shot_of_a_killed_run(&sb);

    let out = sb.run(&["run", "wf.toml", "--state-dir", "st"]);
    out.expect_code(2);
    assert!(out.stderr.contains("once"), "{}", out.stderr);
    assert!(out.stderr.contains("--resume"), "{}", out.stderr);
    assert!(out.stderr.contains("prl-flow down"), "{}", out.stderr);
    assert_eq!(sb.count("marks", "started"), 1, "the one-shot ran twice");
    assert!(alive(pid), "the refusal must leave the one-shot alone");

    // `down`, as the message says, stops it; then a fresh run may start it again.
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
    assert!(!alive(pid) && common::group_members(pid).is_empty());
    sb.write("release", "");
    sb.run(&["run", "wf.toml", "--state-dir", "st"])
        .expect_code(0);
    assert_eq!(sb.count("marks", "started"), 2);
}

/// A one-shot recorded as cancelled whose stop did not reach it (its host did not answer,
/// say) may still run: a fresh run is refused over it, and `down` stops it.
#[test]
fn a_one_shot_recorded_cancelled_that_still_runs_is_not_forgotten() {
    let sb = Sandbox::new();
    let (st, pid) = one_shot_of_a_killed_run(&sb);
    // What a run whose stop failed leaves: the record says cancelled, the process runs.
    let journal = prl_flow_engine::Journal::open(&st, true, "test").expect("journal");
    journal.update("once", |r| r.status = prl_flow_engine::Status::Cancelled);
    journal.close().expect("close");
    assert!(alive(pid));

    let out = sb.run(&["run", "wf.toml", "--state-dir", "st"]);
    out.expect_code(2);
    assert!(out.stderr.contains("once"), "{}", out.stderr);
    assert_eq!(sb.count("marks", "started"), 1, "the one-shot ran twice");
    let out = sb.run(&["down", "--state-dir", "st"]);
    out.expect_code(0);
    assert!(
        !alive(pid) && common::group_members(pid).is_empty(),
        "down left the one-shot running: {}",
        out.stderr
    );
}

/// A workflow whose service `web` keeps running after the run, and the state dir it ran in.
fn live_service(sb: &Sandbox) -> (PathBuf, i32) {
    let st = sb.track_state_dir("st");
    sb.write(
        "wf.toml",
        "[[task]]\nid = \"web\"\nargv = [\"sleep\", \"3600\"]\nservice = true\n",
    );
    sb.run(&["run", "wf.toml", "--state-dir", "st"])
        .expect_code(0);
    let pid = pid_of(&st, "web").expect("web's pid");
    assert!(alive(pid));
    (st, pid)
}

/// `status`, `run` and `run --resume` refuse a damaged journal, naming it and the way out.
fn refused_as_damaged(sb: &Sandbox, what: &str) {
    for args in [
        &["status", "--state-dir", "st"][..],
        &["run", "wf.toml", "--state-dir", "st"],
        &["run", "wf.toml", "--state-dir", "st", "--resume"],
    ] {
        let out = sb.run(args);
        out.expect_code(2);
        assert!(out.stderr.contains("damaged"), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(what), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("prl-flow down --state-dir"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// `down` on a damaged journal stops the service, says what it could not know and how to
/// go on, and leaves a journal that works again.
fn down_recovers(sb: &Sandbox, st: &Path, pid: i32, damaged_file: &str) {
    let out = sb.run(&["down", "--state-dir", "st"]);
    out.expect_code(1);
    assert!(!alive(pid), "web still runs\n{}", out.stderr);
    let left = processes_under(sb.path());
    assert!(left.is_empty(), "still running: {left:?}\n{}", out.stderr);
    assert!(out.stderr.contains("stopped web"), "{}", out.stderr);
    assert!(out.stderr.contains("damaged"), "{}", out.stderr);
    assert!(out.stderr.contains("remove"), "{}", out.stderr);
    assert!(st.join(format!("{damaged_file}.damaged")).is_file());
    sb.run(&["status", "--state-dir", "st"]).expect_code(0);
    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
}

/// A one-shot keeps its proc file beside its run dir (`run/ID.pid`): `down` on a journal
/// that no longer names it finds it there, and stops it.
#[test]
fn down_finds_a_one_shot_that_a_damaged_journal_no_longer_names_by_its_proc_file() {
    let sb = Sandbox::new();
    let (st, pid) = one_shot_of_a_killed_run(&sb);
    assert!(st.join("run/once.pid").is_file());
    assert!(
        !st.join("run/once").exists(),
        "a workflow one-shot needs no run dir"
    );
    // The killed run's records are in the log: make its only line unreadable.
    std::fs::write(st.join("journal.log"), b"\xff not a record\n").expect("damage");
    let out = sb.run(&["down", "--state-dir", "st"]);
    out.expect_code(1);
    assert!(out.stderr.contains("damaged"), "{}", out.stderr);
    assert!(out.stderr.contains("stopped once"), "{}", out.stderr);
    assert!(!alive(pid) && common::group_members(pid).is_empty());
}

#[test]
fn down_stops_what_a_truncated_snapshot_no_longer_names() {
    let sb = Sandbox::new();
    let (st, pid) = live_service(&sb);
    let snap = st.join("journal.json");
    let text = std::fs::read(&snap).expect("snapshot");
    std::fs::write(&snap, &text[..text.len() / 2]).expect("truncate");
    refused_as_damaged(&sb, "journal.json");
    down_recovers(&sb, &st, pid, "journal.json");
}

#[test]
fn a_corrupt_line_in_the_middle_of_the_log_is_named_and_down_still_stops_everything() {
    let sb = Sandbox::new();
    let (st, pid) = live_service(&sb);
    // A log as a killed run leaves it (the snapshot empty, the records in the log), with a
    // line that is not UTF-8 before them.
    let snap = st.join("journal.json");
    let whole: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&snap).expect("snapshot")).expect("json");
    let mut log = b"\xff\xfe not a record\n".to_vec();
    for r in whole["records"].as_object().expect("records").values() {
        log.extend(serde_json::to_vec(r).expect("json"));
        log.push(b'\n');
    }
    std::fs::write(st.join("journal.log"), log).expect("log");
    std::fs::write(&snap, "{\"version\":1,\"records\":{}}\n").expect("snapshot");
    refused_as_damaged(&sb, "line 1");
    down_recovers(&sb, &st, pid, "journal.log");
}

#[test]
fn resume_learns_a_one_shots_end_lost_to_kill_9_from_its_exit_status() {
    let sb = Sandbox::new();
    let st = sb.track_state_dir("st");
    sb.write(
        "wf.toml",
        "[[task]]\nid = \"once\"\nrun = \"echo once >> \\\"$WORK/marks\\\"\"\n\n\
         [[task]]\nid = \"after\"\nrun = \"echo after >> \\\"$WORK/marks\\\"\"\nneeds = [\"once\"]\n",
    );
    sb.run(&["run", "wf.toml", "--state-dir", "st"])
        .expect_code(0);
    // What a `kill -9` right after `once` ended leaves: its start and handle are on file (they
    // are written at once), its end was still queued and is lost, and nothing after it
    // started (a start would have written the queue first).
    let snap = st.join("journal.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&snap).expect("snapshot")).expect("json");
    let recs = j["records"].as_object_mut().expect("records");
    recs.remove("after");
    let once = recs
        .get_mut("once")
        .expect("once")
        .as_object_mut()
        .expect("obj");
    once.insert("status".into(), "running".into());
    once.remove("finished_ms");
    std::fs::write(&snap, serde_json::to_vec(&j).expect("json")).expect("write");
    assert_eq!(status_of(&st, "once").as_deref(), Some("running"));

    let out = sb.run(&[
        "run",
        "wf.toml",
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    out.expect_code(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("keep") && l.contains("once")),
        "{}",
        out.stdout
    );
    assert_eq!(sb.count("marks", "once"), 1, "`once` ran a second time");
    assert_eq!(sb.count("marks", "after"), 2);
    assert_eq!(status_of(&st, "once").as_deref(), Some("done"));
}
