//! The journal's snapshot is rewritten only when it would change: a no-op resume of many
//! tasks must not pay for serialising and fsyncing every record twice. What is on file must
//! be the same either way.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use prl_flow_engine::journal::load;
use prl_flow_engine::{Journal, Record, Status};

fn rec(id: &str, status: Status) -> Record {
    prl_flow_engine::testing::record(id, status, "f")
}

/// The snapshot file's inode: `write_atomic` renames a new file over it, so a rewrite
/// changes it.
fn snapshot_inode(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("journal.json"))
        .expect("snapshot")
        .ino()
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("journal.log"))
        .expect("log")
        .len()
}

fn closed_journal(dir: &Path) {
    let j = Journal::open(dir, false, "test").expect("open");
    j.put(rec("a", Status::Done));
    j.put(rec("b", Status::Failed));
    j.close().expect("close");
}

#[test]
fn a_no_op_reopen_leaves_the_snapshot_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    closed_journal(dir.path());
    let before = load(dir.path()).expect("load");
    let bytes = std::fs::read(dir.path().join("journal.json")).expect("read");
    let inode = snapshot_inode(dir.path());

    let j = Journal::open(dir.path(), true, "test").expect("reopen");
    assert_eq!(j.records(), before);
    j.flush();
    j.close().expect("close");

    assert_eq!(
        snapshot_inode(dir.path()),
        inode,
        "the snapshot was rewritten"
    );
    assert_eq!(
        std::fs::read(dir.path().join("journal.json")).expect("read"),
        bytes
    );
    assert_eq!(log_len(dir.path()), 0);
    assert_eq!(load(dir.path()).expect("load"), before);
}

#[test]
fn a_change_after_a_no_op_open_is_written_at_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    closed_journal(dir.path());
    let j = Journal::open(dir.path(), true, "test").expect("reopen");
    j.update("b", |r| r.status = Status::Done);
    j.close().expect("close");
    assert_eq!(
        log_len(dir.path()),
        0,
        "close folds the log into the snapshot"
    );
    let r = load(dir.path()).expect("load");
    assert_eq!(r["a"].status, Status::Done);
    assert_eq!(r["b"].status, Status::Done);
}

#[test]
fn a_log_left_by_a_killed_run_is_folded_in_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    closed_journal(dir.path());
    // A run killed before its close leaves records only in the log.
    let mut line = serde_json::to_vec(&rec("c", Status::Running)).expect("json");
    line.push(b'\n');
    std::fs::write(dir.path().join("journal.log"), line).expect("write log");
    let inode = snapshot_inode(dir.path());

    let j = Journal::open(dir.path(), true, "test").expect("reopen");
    assert_eq!(j.records().len(), 3);
    assert_ne!(
        snapshot_inode(dir.path()),
        inode,
        "the log must be folded in"
    );
    assert_eq!(log_len(dir.path()), 0);
    j.close().expect("close");
    let r = load(dir.path()).expect("load");
    assert_eq!(r["c"].status, Status::Running);
    assert_eq!(r.len(), 3);
}

#[test]
fn a_fresh_open_of_an_old_state_dir_forgets_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    closed_journal(dir.path());
    let j = Journal::open(dir.path(), false, "test").expect("fresh");
    assert!(j.records().is_empty());
    j.close().expect("close");
    assert!(load(dir.path()).expect("load").is_empty());
}

#[test]
fn a_reset_after_a_no_op_open_empties_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    closed_journal(dir.path());
    let j = Journal::open(dir.path(), true, "test").expect("reopen");
    j.reset();
    j.close().expect("close");
    assert!(load(dir.path()).expect("load").is_empty());

    // And a run after the reset records afresh.
    let j = Journal::open(dir.path(), true, "test").expect("reopen");
    j.reset();
    j.put(rec("z", Status::Done));
    j.close().expect("close");
    let r = load(dir.path()).expect("load");
    assert_eq!(r.len(), 1);
    assert_eq!(r["z"].status, Status::Done);
}
