//! The journal: what each task of a state dir did, kept so that a later process can resume,
//! report status, or tear down.
//!
//! On disk, a state dir holds:
//! - `journal.json`: a snapshot of every record, replaced atomically (temp file, fsync,
//!   rename) when a run opens and closes the journal;
//! - `journal.log`: records appended during a run, one JSON object a line; the last line for
//!   an id wins. A torn last line (the machine died mid-write) is ignored on load;
//! - `lock`: held with `flock` for the whole run, and naming its holder.
//!
//! Group commit: records queue up in memory and go to the file in one `write`, either at
//! once when they must be on file before the caller goes on (a task about to start a
//! process: a `kill -9` right after the fork must not leave a journal that never heard of
//! it), or within [`SYNC_EVERY`] from a background thread, which also calls `fsync` at most
//! that often. A `write` reaches the kernel at once, so a `kill -9` of prl-flow loses only
//! what was still queued (never a start); a crash of the machine can lose the last moments.
//! Thousands of tasks mean a handful of fsyncs, not thousands.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::event::{Event, Outcome, Subscriber};
use crate::graph::Graph;
use crate::task::Handle;

/// The longest time a record written to the log may wait for its fsync.
pub const SYNC_EVERY: Duration = Duration::from_millis(50);

const SNAPSHOT: &str = "journal.json";
const LOG: &str = "journal.log";
const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("state dir `{dir}` is in use by another run: {holder}")]
    Locked { dir: PathBuf, holder: String },
    #[error("cannot use state dir `{dir}`: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the journal `{path}` is damaged: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// A task's state as recorded in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Started, not finished (or the run that started it died).
    Running,
    Done,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
    /// Stopped by teardown.
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::TimedOut => "timed-out",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
            Status::Stopped => "stopped",
        }
    }
}

impl From<Outcome> for Status {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done => Status::Done,
            Outcome::Failed => Status::Failed,
            Outcome::TimedOut => Status::TimedOut,
            Outcome::Cancelled => Status::Cancelled,
            Outcome::Skipped => Status::Skipped,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub status: Status,
    pub fingerprint: String,
    pub kind: String,
    #[serde(default)]
    pub service: bool,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<Handle>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
    /// Order of starting within the state dir: teardown goes in reverse.
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub attempts: u32,
    /// Milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The snapshot as written: borrows the records instead of cloning them.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    records: &'a BTreeMap<String, Record>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    records: BTreeMap<String, Record>,
}

/// Reads the records of a state dir without locking it (for `status`, `logs`, and the
/// decisions of a resume). A missing journal reads as empty.
pub fn load(dir: &Path) -> Result<BTreeMap<String, Record>, JournalError> {
    let io = |source| JournalError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut records = BTreeMap::new();
    let snap = dir.join(SNAPSHOT);
    match File::open(&snap) {
        Ok(mut f) => {
            let mut text = String::new();
            f.read_to_string(&mut text).map_err(io)?;
            let s: Snapshot = serde_json::from_str(&text).map_err(|e| JournalError::Corrupt {
                path: snap.clone(),
                message: e.to_string(),
            })?;
            records = s.records;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    match File::open(dir.join(LOG)) {
        Ok(f) => {
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io)?;
                // A line that does not parse can only be a torn last write.
                if let Ok(r) = serde_json::from_str::<Record>(&line) {
                    records.insert(r.id.clone(), r);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    Ok(records)
}

/// Writes `bytes` to `path` so that readers see the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, File)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    Ok((tmp, f))
}

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
    fn settle_kept(&self, id: &str) {
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

    /// A subscriber that records a run of `graph` in this journal.
    pub fn recorder(self: &Arc<Self>, graph: &Graph) -> Arc<dyn Subscriber> {
        let info = graph
            .tasks()
            .iter()
            .map(|t| Record {
                id: t.id().to_string(),
                status: Status::Running,
                fingerprint: t.fingerprint(),
                kind: t.kind().to_string(),
                service: t.is_service(),
                needs: t.needs().to_vec(),
                handle: None,
                meta: t.meta(),
                seq: 0,
                attempts: 0,
                started_ms: None,
                finished_ms: None,
                exit_code: None,
                error: None,
            })
            .collect();
        Arc::new(Recorder {
            journal: self.clone(),
            info,
        })
    }

    fn take_seq(&self) -> u64 {
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

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
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

fn lock(dir: &Path, holder: &str) -> Result<nix::fcntl::Flock<File>, JournalError> {
    let path = dir.join(LOCK);
    let io = |source| JournalError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut f) => {
            let text = format!("{holder} (pid {})\n", std::process::id());
            f.set_len(0).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            Ok(f)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
            Err(JournalError::Locked {
                dir: dir.to_path_buf(),
                holder,
            })
        }
        Err((_, e)) => Err(io(std::io::Error::from(e))),
    }
}

/// Records a run's events in the journal.
struct Recorder {
    journal: Arc<Journal>,
    info: Vec<Record>,
}

impl Subscriber for Recorder {
    fn on_event(&self, event: &Event) {
        match event {
            Event::Planned { decisions } => {
                // Work a killed run left in flight that has since finished is kept: record
                // it as done.
                for (id, d) in decisions.iter() {
                    if *d == crate::event::Decision::Keep {
                        self.journal.settle_kept(id);
                    }
                }
            }
            Event::Started {
                index,
                attempt,
                adopted,
                ..
            } => {
                let mut r = self.info[*index].clone();
                if *adopted {
                    if let Some(old) = self.journal.get(&r.id) {
                        r = Record {
                            status: Status::Running,
                            ..old
                        };
                    }
                } else {
                    r.seq = self.journal.take_seq();
                    r.attempts = *attempt;
                    r.started_ms = Some(now_ms());
                }
                // On file before the task can start a process.
                self.journal.put_now(r);
            }
            Event::Spawned { id, handle, .. } => {
                // On file at once: `down` and `status` from another shell must see it.
                self.journal
                    .update_now(id, |r| r.handle = Some(handle.clone()));
            }
            Event::Finished {
                index,
                id,
                outcome,
                handle,
                error,
                ..
            } => {
                if *outcome == Outcome::Skipped {
                    // Nothing ran: keep an earlier record (a resume may still use it).
                    if self.journal.get(id).is_none() {
                        let mut r = self.info[*index].clone();
                        r.status = Status::Skipped;
                        self.journal.put(r);
                    }
                    return;
                }
                self.journal.update(id, |r| {
                    r.status = (*outcome).into();
                    r.finished_ms = Some(now_ms());
                    if let Some(h) = handle {
                        r.handle = Some(h.clone());
                    }
                    r.exit_code = error.as_ref().and_then(|e| e.exit_code);
                    r.error = error.as_ref().map(|e| e.message.clone());
                    if let Some(h) = error.as_ref().and_then(|e| e.handle.clone()) {
                        r.handle = Some(h);
                    }
                });
            }
            Event::Undone { id, error, .. } => {
                self.journal.update(id, |r| {
                    // A service that failed, timed out or was cancelled keeps saying so
                    // (`status`, and `--resume --explain`); only one that was up, and was
                    // really stopped, is `stopped` (one that could not be stopped may still
                    // run: `down` must try again).
                    if error.is_none() && matches!(r.status, Status::Done | Status::Running) {
                        r.status = Status::Stopped;
                    }
                    if let Some(e) = error {
                        r.error = Some(e.clone());
                    }
                });
            }
            Event::RunFinished { .. } | Event::Cancelling | Event::Aborting { .. } => {
                self.journal.flush();
            }
            _ => {}
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
