//! An open journal: the records in memory, the log they are appended to, and the
//! background thread that writes and fsyncs it (group commit).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use super::store::{load, lock, to_json, Snapshot, SnapshotRef};
use super::{JournalError, LOG, SNAPSHOT, SYNC_EVERY};
use crate::fs::write_atomic;
use crate::record::{now_ms, Record, Status};

/// What the journal holds while open: the records, and lines not yet written.
struct Inner {
    records: BTreeMap<String, Record>,
    log: File,
    /// Lines waiting for the next write.
    buf: Vec<u8>,
    /// Written since the last fsync.
    unsynced: bool,
    next_seq: u64,
    /// The first write error, reported at close.
    error: Option<String>,
    /// The records differ from the snapshot on file (so close must rewrite it).
    changed: bool,
}

impl Inner {
    fn queue(&mut self, r: &Record) {
        self.changed = true;
        if serde_json::to_writer(&mut self.buf, r).is_ok() {
            self.buf.push(b'\n');
        }
    }
    fn write(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Err(e) = self.log.write_all(&self.buf) {
            self.error.get_or_insert_with(|| e.to_string());
        }
        self.buf.clear();
        self.unsynced = true;
    }
}

/// An open journal: holds the state dir's lock. Records are written under a mutex by the
/// thread that makes them; a background thread writes what is queued and fsyncs at most
/// every [`SYNC_EVERY`].
pub struct Journal {
    dir: PathBuf,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    syncer: Option<std::thread::JoinHandle<()>>,
    _lock: nix::fcntl::Flock<File>,
}

impl Journal {
    /// Locks `dir` (creating it) and opens its journal. With `keep` the earlier records
    /// stay (resume); without, the journal starts empty.
    pub fn open(dir: &Path, keep: bool, holder: &str) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock(dir, holder)?;
        // A run that closed its journal left everything in the snapshot and an empty log:
        // then the snapshot on file already holds exactly what `load` returns, and writing
        // it again (the costly part of a no-op resume of many tasks) can be skipped.
        let log_empty = std::fs::metadata(dir.join(LOG)).map_or(true, |m| m.len() == 0);
        let current = keep && log_empty && dir.join(SNAPSHOT).is_file();
        let records = if keep { load(dir)? } else { BTreeMap::new() };
        let next_seq = records.values().map(|r| r.seq + 1).max().unwrap_or(0);
        if !current {
            let snapshot = SnapshotRef {
                version: 1,
                records: &records,
            };
            write_atomic(&dir.join(SNAPSHOT), &to_json(&snapshot)).map_err(io)?;
        }
        // The snapshot now holds everything: start the log empty, in append mode so that
        // every write lands at its end (also after a reset truncates it).
        File::create(dir.join(LOG)).map_err(io)?;
        let log = OpenOptions::new()
            .append(true)
            .open(dir.join(LOG))
            .map_err(io)?;
        let inner = Arc::new(Mutex::new(Inner {
            records,
            log,
            buf: Vec::with_capacity(64 * 1024),
            unsynced: false,
            next_seq,
            error: None,
            changed: false,
        }));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let syncer = {
            let inner = inner.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("journal".into())
                .spawn(move || sync_loop(&inner, &stop))
                .map_err(io)?
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            inner,
            stop,
            syncer: Some(syncer),
            _lock: lock,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The records as they stand now.
    pub fn records(&self) -> BTreeMap<String, Record> {
        self.inner().records.clone()
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        self.inner().records.get(id).cloned()
    }

    /// Records `record` (it replaces the earlier one of its id). It reaches the file with
    /// the next write, within [`SYNC_EVERY`].
    pub fn put(&self, record: Record) {
        let mut g = self.inner();
        g.queue(&record);
        g.records.insert(record.id.clone(), record);
    }

    /// Records `record` and writes it (with everything queued before it) at once: for what
    /// must be on file before the caller goes on, such as a task about to start a process.
    pub fn put_now(&self, record: Record) {
        let mut g = self.inner();
        g.queue(&record);
        g.records.insert(record.id.clone(), record);
        g.write();
    }

    /// Changes a record in place, if it exists.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Record)) {
        let mut g = self.inner();
        let Some(r) = g.records.get_mut(id) else {
            return;
        };
        f(r);
        let r = r.clone();
        g.queue(&r);
    }

    /// Like [`Journal::update`], and writes at once.
    pub fn update_now(&self, id: &str, f: impl FnOnce(&mut Record)) {
        let mut g = self.inner();
        let Some(r) = g.records.get_mut(id) else {
            return;
        };
        f(r);
        let r = r.clone();
        g.queue(&r);
        g.write();
    }

    /// Forgets every record (a fresh run): the snapshot and the log are emptied.
    pub fn reset(&self) {
        let mut g = self.inner();
        if g.records.is_empty() {
            return;
        }
        g.records.clear();
        g.buf.clear();
        g.changed = true;
        let cleared = g.log.set_len(0).and_then(|()| {
            write_atomic(
                &self.dir.join(SNAPSHOT),
                &to_json(&Snapshot {
                    version: 1,
                    records: BTreeMap::new(),
                }),
            )
        });
        if let Err(e) = cleared {
            g.error.get_or_insert_with(|| e.to_string());
        }
    }

    /// A kept task recorded as running finished while no prl-flow watched: mark it done.
    pub(super) fn settle_kept(&self, id: &str) {
        let mut g = self.inner();
        let r = match g.records.get_mut(id) {
            Some(r) if r.status == Status::Running => {
                r.status = Status::Done;
                r.finished_ms = Some(now_ms());
                r.clone()
            }
            _ => return,
        };
        g.queue(&r);
    }

    /// Writes everything queued and waits until it is on disk.
    pub fn flush(&self) {
        let mut g = self.inner();
        g.write();
        if g.unsynced {
            if let Err(e) = g.log.sync_data() {
                g.error.get_or_insert_with(|| e.to_string());
            }
            g.unsynced = false;
        }
    }

    pub(super) fn take_seq(&self) -> u64 {
        let mut g = self.inner();
        let v = g.next_seq;
        g.next_seq += 1;
        v
    }

    /// Writes everything, replaces the snapshot atomically and empties the log.
    pub fn close(mut self) -> Result<(), JournalError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), JournalError> {
        let Some(syncer) = self.syncer.take() else {
            return Ok(());
        };
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let _ = syncer.join();
        let dir = self.dir.clone();
        let io = |source| JournalError::Io {
            dir: dir.clone(),
            source,
        };
        let mut g = self.inner();
        g.write();
        // Nothing changed since open (a no-op resume): the snapshot on file is current.
        if g.changed {
            let snapshot = SnapshotRef {
                version: 1,
                records: &g.records,
            };
            write_atomic(&self.dir.join(SNAPSHOT), &to_json(&snapshot)).map_err(io)?;
            g.changed = false;
        }
        g.log.set_len(0).map_err(io)?;
        match g.error.take() {
            Some(e) => Err(JournalError::Io {
                dir: self.dir.clone(),
                source: std::io::Error::other(e),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Every [`SYNC_EVERY`]: write what is queued, and fsync what was written, outside the lock
/// (on a duplicate of the file descriptor) so that writers never wait for the disk.
fn sync_loop(inner: &Mutex<Inner>, stop: &(Mutex<bool>, Condvar)) {
    let (lock, cv) = stop;
    loop {
        {
            let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (stopped, _) = cv
                .wait_timeout(stopped, SYNC_EVERY)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        let file = {
            let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
            g.write();
            if !g.unsynced {
                continue;
            }
            g.unsynced = false;
            g.log.try_clone()
        };
        if let Ok(f) = file {
            let _ = f.sync_data();
        }
    }
}

#[cfg(test)]
mod tests {
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
}
