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
//! Group commit: a writer thread takes updates from a channel, writes whatever has queued up
//! in one `write`, and calls `fsync` at most every [`SYNC_EVERY`]. A `write` reaches the
//! kernel at once, so a `kill -9` of prl-flow loses nothing; only a crash of the machine can
//! lose the last moments. Thousands of tasks mean a handful of fsyncs, not thousands.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

enum Msg {
    Put(Box<Record>),
    /// Start the log afresh (its records were dropped).
    Reset,
    Flush(mpsc::Sender<()>),
}

/// An open journal: holds the state dir's lock and a writer thread.
pub struct Journal {
    dir: PathBuf,
    tx: mpsc::Sender<Msg>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    records: Arc<Mutex<BTreeMap<String, Record>>>,
    next_seq: Arc<Mutex<u64>>,
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
        let records = if keep { load(dir)? } else { BTreeMap::new() };
        let next_seq = records.values().map(|r| r.seq + 1).max().unwrap_or(0);
        let snapshot = Snapshot {
            version: 1,
            records: records.clone(),
        };
        write_atomic(&dir.join(SNAPSHOT), &to_json(&snapshot)).map_err(io)?;
        // The snapshot now holds everything: start the log empty, in append mode so that
        // every write lands at its end (also after a reset truncates it).
        File::create(dir.join(LOG)).map_err(io)?;
        let log = OpenOptions::new()
            .append(true)
            .open(dir.join(LOG))
            .map_err(io)?;
        let records = Arc::new(Mutex::new(records));
        let (tx, rx) = mpsc::channel();
        let writer = {
            let snap = dir.join(SNAPSHOT);
            std::thread::Builder::new()
                .name("journal".into())
                .spawn(move || writer_loop(rx, log, snap))
                .map_err(io)?
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            tx,
            writer: Some(writer),
            records,
            next_seq: Arc::new(Mutex::new(next_seq)),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The records as they stand now.
    pub fn records(&self) -> BTreeMap<String, Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        self.records.lock().ok()?.get(id).cloned()
    }

    /// Writes a record (it replaces the earlier one of its id).
    pub fn put(&self, record: Record) {
        if let Ok(mut m) = self.records.lock() {
            m.insert(record.id.clone(), record.clone());
        }
        let _ = self.tx.send(Msg::Put(Box::new(record)));
    }

    /// Changes a record in place, if it exists.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Record)) {
        let rec = {
            let Ok(mut m) = self.records.lock() else {
                return;
            };
            let Some(r) = m.get_mut(id) else { return };
            f(r);
            r.clone()
        };
        let _ = self.tx.send(Msg::Put(Box::new(rec)));
    }

    /// Forgets every record (a fresh run): the snapshot and the log are emptied.
    pub fn reset(&self) {
        let ids: Vec<String> = match self.records.lock() {
            Ok(mut m) => {
                let ids = m.keys().cloned().collect();
                m.clear();
                ids
            }
            Err(_) => return,
        };
        if !ids.is_empty() {
            let _ = self.tx.send(Msg::Reset);
        }
    }

    /// A kept task recorded as running finished while no prl-flow watched: mark it done.
    fn settle_kept(&self, id: &str) {
        let rec = {
            let Ok(mut m) = self.records.lock() else {
                return;
            };
            match m.get_mut(id) {
                Some(r) if r.status == Status::Running => {
                    r.status = Status::Done;
                    r.finished_ms = Some(now_ms());
                    r.clone()
                }
                _ => return,
            }
        };
        let _ = self.tx.send(Msg::Put(Box::new(rec)));
    }

    /// Waits until everything written so far is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
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
        let mut s = self.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        let v = *s;
        *s += 1;
        v
    }

    /// Flushes, writes the snapshot atomically and empties the log.
    pub fn close(mut self) -> Result<(), JournalError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            dir: self.dir.clone(),
            source,
        };
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let (tx, _) = mpsc::channel();
        let _ = std::mem::replace(&mut self.tx, tx);
        let _ = writer.join();
        let snapshot = Snapshot {
            version: 1,
            records: self.records(),
        };
        write_atomic(&self.dir.join(SNAPSHOT), &to_json(&snapshot)).map_err(io)?;
        File::create(self.dir.join(LOG)).map_err(io)?;
        Ok(())
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

fn writer_loop(
    rx: mpsc::Receiver<Msg>,
    mut log: File,
    snapshot_path: PathBuf,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut last_sync = Instant::now();
    let mut dirty = false;
    loop {
        // Block for the first message, or until a pending fsync is due.
        let first = if dirty {
            let wait = SYNC_EVERY.saturating_sub(last_sync.elapsed());
            match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        };
        let mut acks = Vec::new();
        let mut batch: Vec<Box<Record>> = Vec::new();
        let mut reset = false;
        let mut take = |m: Msg| match m {
            Msg::Put(r) => batch.push(r),
            Msg::Flush(ack) => acks.push(ack),
            Msg::Reset => {
                batch.clear();
                reset = true;
            }
        };
        if let Some(m) = first {
            take(m);
        }
        while let Ok(m) = rx.try_recv() {
            take(m);
        }
        if reset {
            // The snapshot is rewritten empty at close; until then the log must not replay
            // records of the earlier run over it.
            log.set_len(0)?;
            write_atomic(&snapshot_path, b"{\"version\":1,\"records\":{}}\n")?;
            dirty = true;
        }
        if !batch.is_empty() {
            // Keep only the last update of each id in this batch.
            let mut last: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
            for (i, r) in batch.iter().enumerate() {
                last.insert(r.id.as_str(), i);
            }
            buf.clear();
            for (i, r) in batch.iter().enumerate() {
                if last.get(r.id.as_str()) == Some(&i) {
                    serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
                    buf.push(b'\n');
                }
            }
            log.write_all(&buf)?;
            dirty = true;
        }
        if dirty && (!acks.is_empty() || last_sync.elapsed() >= SYNC_EVERY) {
            log.sync_data()?;
            last_sync = Instant::now();
            dirty = false;
        }
        for a in acks {
            let _ = a.send(());
        }
    }
    if dirty {
        log.sync_data()?;
    }
    Ok(())
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
                let old = self.journal.get(&r.id);
                if *adopted {
                    if let Some(old) = old {
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
                self.journal.put(r);
            }
            Event::Spawned { id, handle, .. } => {
                self.journal.update(id, |r| r.handle = Some(handle.clone()));
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
                    r.status = Status::Stopped;
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
        Record {
            id: id.into(),
            status,
            fingerprint: "f".into(),
            kind: "oneshot".into(),
            service: false,
            needs: vec![],
            handle: None,
            meta: serde_json::Value::Null,
            seq: 0,
            attempts: 1,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            error: None,
        }
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
