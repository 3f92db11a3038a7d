//! Tests of the open journal: its log, its snapshot, its slots and its change lines.

use super::*;

fn rec(id: &str, status: Status) -> Record {
    crate::testing::record(id, status, "f")
}

#[test]
fn log_replays_over_snapshot_and_ignores_a_torn_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let j = Journal::open(dir.path(), false, "test").expect("open");
        j.put(rec("a", Status::Running));
        j.put(rec("a", Status::Done));
        j.put(rec("b", Status::Failed));
        j.flush();
        // Simulate a crash: the log is left as it is, no snapshot is written.
        std::mem::forget(j);
    }
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(LOG))
        .expect("log");
    f.write_all(b"{\"id\":\"c\",\"sta").expect("write");
    // The forgotten journal still holds the lock in this process; flock is per open
    // file description, so load (which does not lock) still reads.
    let r = load(dir.path()).expect("load");
    assert_eq!(r["a"].status, Status::Done);
    assert_eq!(r["b"].status, Status::Failed);
    assert!(!r.contains_key("c"));
}

/// A handle and an end are short lines that name the record they change; replayed over
/// the record put before them (in the log, or kept in the snapshot), they leave it as it
/// was in memory, and `null` clears an earlier error.
#[test]
fn changes_are_short_lines_that_replay_over_their_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let j = Journal::open(dir.path(), false, "t").expect("open");
        let mut kept = rec("kept", Status::Failed);
        kept.error = Some("it failed".into());
        kept.exit_code = Some(3);
        j.put(kept);
        j.close().expect("close");
    }
    let j = Journal::open(dir.path(), true, "t").expect("reopen");
    let a = j.put_slot(rec("a", Status::Running));
    let h = serde_json::json!({"backend": "local", "version": 1, "payload": {"pid": 7}});
    // A handle its task finds again without it waits for the next write.
    j.set_handle_at(Some(a), "a", h.clone(), false);
    let log = || std::fs::read_to_string(dir.path().join(LOG)).expect("log");
    assert!(!log().contains("\"set\""), "{}", log());
    j.set_handle_at(Some(a), "a", h.clone(), true);
    assert_eq!(log().matches("\"handle\"").count(), 2, "{}", log());
    j.finish_at(Some(a), "a", Status::Failed, None, Some(2), Some("exit 2"));
    j.finish_at(None, "kept", Status::Done, Some(h.clone()), None, None);
    j.finish_at(None, "nobody", Status::Done, None, None, None);
    j.flush();
    let log = log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 5, "{log}");
    assert!(lines[1].starts_with("{\"set\":\"a\",\"handle\":"), "{log}");
    assert!(!lines[3].contains("fingerprint"), "{log}");
    let in_memory = j.records();
    std::mem::forget(j);
    let replayed = load(dir.path()).expect("load");
    assert_eq!(replayed, in_memory);
    assert_eq!(replayed["a"].handle, Some(h.clone()));
    assert_eq!(replayed["a"].exit_code, Some(2));
    assert_eq!(replayed["kept"].status, Status::Done);
    assert_eq!(replayed["kept"].error, None);
    assert_eq!(replayed["kept"].exit_code, None);
    assert_eq!(replayed["kept"].handle, Some(h));
    // A change of a task with no record before it is damage, named by its line.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(LOG))
        .expect("log");
    f.write_all(b"{\"set\":\"ghost\",\"status\":\"done\"}\n")
        .expect("write");
    match load(dir.path()) {
        Err(JournalError::Corrupt { message, .. }) => {
            assert!(
                message.contains("line 6") && message.contains("`ghost`"),
                "{message}"
            );
        }
        other => panic!("expected damage, got {other:?}"),
    }
}

#[test]
fn a_slot_reaches_its_record_until_a_reset_and_the_snapshot_stays_in_id_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path(), false, "t").expect("open");
    let b = j.put_slot(rec("b", Status::Running));
    let a = j.put_slot(rec("a", Status::Running));
    // Put again, a record keeps its slot.
    assert_eq!(j.put_slot(rec("b", Status::Running)), b);
    j.update_at(Some(b), "b", |r| r.status = Status::Done);
    j.update_at(Some(a), "a", |r| r.status = Status::Failed);
    assert_eq!(j.get("b").map(|r| r.status), Some(Status::Done));
    assert_eq!(j.get("a").map(|r| r.status), Some(Status::Failed));
    // A slot given for another id never changes that other record.
    j.update_at(Some(a), "b", |r| r.status = Status::Skipped);
    assert_eq!(j.get("a").map(|r| r.status), Some(Status::Failed));
    assert_eq!(j.get("b").map(|r| r.status), Some(Status::Skipped));
    // After a reset the old slots hold other records, or none.
    j.reset();
    let c = j.put_slot(rec("c", Status::Running));
    assert_eq!(c, 0);
    j.update_at(Some(b), "b", |r| r.status = Status::Done);
    j.update_at(Some(a), "a", |r| r.status = Status::Done);
    assert_eq!(j.get("c").map(|r| r.status), Some(Status::Running));
    assert!(!j.contains("a") && !j.contains("b"));
    j.put(rec("b", Status::Done));
    j.put(rec("a", Status::Done));
    j.close().expect("close");
    let text = std::fs::read_to_string(dir.path().join(SNAPSHOT)).expect("snapshot");
    // One record a line.
    let at = |id: &str| text.find(&format!("\n\"{id}\":{{\"id\"")).expect(id);
    assert!(at("a") < at("b") && at("b") < at("c"), "{text}");
}

#[test]
fn second_open_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _j = Journal::open(dir.path(), false, "prl-flow run wf.toml").expect("open");
    match Journal::open(dir.path(), true, "other") {
        Err(JournalError::Locked { holder, .. }) => {
            assert!(holder.contains("prl-flow run wf.toml"), "{holder}");
        }
        other => panic!("expected a lock error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_snapshot_that_cannot_be_written_says_the_log_holds_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path(), false, "t").expect("open");
    j.put(rec("a", Status::Done));
    // The snapshot's place is taken (a full disk fails the same call): its rename fails.
    let snapshot = dir.path().join(SNAPSHOT);
    let _ = std::fs::remove_file(&snapshot);
    std::fs::create_dir_all(snapshot.join("in-the-way")).expect("dir");
    let err = j
        .close()
        .expect_err("the snapshot cannot be written")
        .to_string();
    assert!(
        err.contains("every record is on file in journal.log"),
        "{err}"
    );
    std::fs::remove_dir_all(&snapshot).expect("clear");
    let r = load(dir.path()).expect("load");
    assert_eq!(r["a"].status, Status::Done);
}

#[test]
fn close_writes_a_snapshot_and_empties_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path(), false, "t").expect("open");
    j.put(rec("a", Status::Done));
    j.close().expect("close");
    assert_eq!(
        std::fs::metadata(dir.path().join(LOG)).expect("log").len(),
        0
    );
    let r = load(dir.path()).expect("load");
    assert_eq!(r["a"].status, Status::Done);
    let j = Journal::open(dir.path(), true, "t").expect("reopen");
    assert_eq!(j.records().len(), 1);
    drop(j);
    let j = Journal::open(dir.path(), false, "t").expect("fresh");
    assert!(j.records().is_empty());
}

/// The journal's thread leaves a child's `SIGCHLD` (and `SIGINT`, `SIGTERM`) to the thread
/// that waits for it, and keeps the signals of its own faults; the thread that opened the
/// journal keeps its own mask.
#[test]
fn the_journal_thread_leaves_outside_signals_to_the_waiting_thread() {
    fn blocked(status: &str) -> u64 {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .expect("SigBlk");
        u64::from_str_radix(hex.trim(), 16).expect("hex")
    }
    let bit = |sig: i32| 1u64 << (sig - 1);
    let own_before = blocked(&std::fs::read_to_string("/proc/thread-self/status").expect("status"));
    let dir = tempfile::tempdir().expect("tempdir");
    let j = Journal::open(dir.path(), false, "test").expect("open");
    let own_after = blocked(&std::fs::read_to_string("/proc/thread-self/status").expect("status"));
    assert_eq!(
        own_before, own_after,
        "the opening thread's mask is its own again"
    );
    // The thread names itself once it runs: looked for until it has.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut journal_threads = 0;
    while journal_threads == 0 && std::time::Instant::now() < deadline {
        journal_threads = check_journal_threads(blocked, bit);
        std::thread::yield_now();
    }
    assert!(journal_threads >= 1, "the open journal has its thread");
    j.close().expect("close");
}

/// Checks the mask of every thread named `journal` in this process; how many there are.
fn check_journal_threads(blocked: fn(&str) -> u64, bit: impl Fn(i32) -> u64) -> usize {
    let mut journal_threads = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
        let Ok(task) = task.map(|t| t.path()) else {
            continue;
        };
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != "journal" {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let mask = blocked(&status);
        journal_threads += 1;
        for sig in [libc_sig::CHLD, libc_sig::INT, libc_sig::TERM] {
            assert_ne!(
                mask & bit(sig),
                0,
                "signal {sig} blocked in {}",
                task.display()
            );
        }
        assert_eq!(mask & bit(libc_sig::SEGV), 0, "SIGSEGV left to the thread");
    }
    journal_threads
}

/// Signal numbers on Linux.
mod libc_sig {
    pub const INT: i32 = 2;
    pub const SEGV: i32 = 11;
    pub const TERM: i32 = 15;
    pub const CHLD: i32 = 17;
}
