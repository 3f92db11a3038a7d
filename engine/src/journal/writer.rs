//! An open journal: the records in memory, the log they are appended to, and the
//! background thread that writes and fsyncs it (group commit).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use indexmap::IndexMap;

use super::store::{load, lock, salvage, Damage, SetRef, SnapshotRef};
use super::{JournalError, LOG, SNAPSHOT, SYNC_EVERY};
use crate::fs::{write_atomic, write_atomic_with};
use crate::record::{now_ms, Handle, Record, Status};

/// What the journal holds while open: the records, and lines not yet written.
struct Inner {
    /// By id, in the order they were first put: a record keeps its place (its slot) until
    /// the journal is reset, so a recorder can reach it again without a lookup by id.
    records: IndexMap<String, Record>,
    log: File,
    /// Lines waiting for the next write.
    buf: Vec<u8>,
    /// Written since the last fsync.
    unsynced: bool,
    next_seq: u64,
    /// The first write error. From then on nothing more is appended (a torn line must stay
    /// the last one), the run stops at once, and close reports it.
    error: Option<String>,
    /// Set with `error`, for a check without the lock.
    failed: Arc<AtomicBool>,
    /// The records differ from the snapshot on file (so close must rewrite it).
    changed: bool,
}

/// Appends `v` (a whole record, or a change of one) to `buf` as one line.
fn line(buf: &mut Vec<u8>, v: &impl serde::Serialize) {
    if serde_json::to_writer(&mut *buf, v).is_ok() {
        buf.push(b'\n');
    }
}

impl Inner {
    fn queue(&mut self, r: &Record) {
        self.changed = true;
        line(&mut self.buf, r);
    }
    /// Queues `record` and keeps it: in place of the earlier record of its id, which keeps
    /// its slot, or at the end. Returns the slot.
    fn put(&mut self, record: Record) -> usize {
        self.queue(&record);
        self.records.insert_full(record.id.clone(), record).0
    }
    fn write(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self.error.is_none() {
            if let Err(e) = self.log.write_all(&self.buf) {
                self.fail(format!("{LOG}: {e}"));
            }
            self.unsynced = true;
        }
        self.buf.clear();
    }
    /// Keeps the first error.
    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
            self.failed.store(true, Ordering::SeqCst);
        }
    }
}

/// An open journal: holds the state dir's lock. Records are written under a mutex by the
/// thread that makes them; a background thread writes what is queued and fsyncs at most
/// every [`SYNC_EVERY`].
pub struct Journal {
    dir: PathBuf,
    inner: Arc<Mutex<Inner>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    /// The background thread; `None` once closed.
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    failed: Arc<AtomicBool>,
    /// The state dir's lock, held until close.
    lock: Mutex<Option<nix::fcntl::Flock<File>>>,
}

impl Journal {
    /// Locks `dir` (creating it) and opens its journal. With `keep` the earlier records
    /// stay (resume); without, the journal starts empty.
    pub fn open(dir: &Path, keep: bool, holder: &str) -> Result<Self, JournalError> {
        Self::open_as(dir, if keep { Keep::All } else { Keep::Nothing }, holder).map(|(j, _)| j)
    }

    /// Locks `dir` and opens its journal even if it is damaged: with what can still be read
    /// of it ([`salvage`]), and the parts that could not, which are kept beside it as
    /// `journal.json.damaged` and `journal.log.damaged` before the journal is written whole
    /// again. For taking down what a damaged journal still names.
    pub fn open_salvaged(dir: &Path, holder: &str) -> Result<(Self, Vec<Damage>), JournalError> {
        Self::open_as(dir, Keep::Salvage, holder)
    }

    fn open_as(dir: &Path, keep: Keep, holder: &str) -> Result<(Self, Vec<Damage>), JournalError> {
        let io = |source| JournalError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock(dir, holder)?;
        remove_stale_temps(dir);
        // A run that closed its journal left everything in the snapshot and an empty log:
        // then the snapshot on file already holds exactly what `load` returns, and writing
        // it again (the costly part of a no-op resume of many tasks) can be skipped.
        let log_empty = std::fs::metadata(dir.join(LOG)).map_or(true, |m| m.len() == 0);
        let mut current = keep != Keep::Nothing && log_empty && dir.join(SNAPSHOT).is_file();
        let (records, damage) = match keep {
            Keep::Nothing => (BTreeMap::new(), Vec::new()),
            Keep::All => (load(dir)?, Vec::new()),
            Keep::Salvage => {
                let s = salvage(dir)?;
                for d in &s.damage {
                    let mut keep_as = d.path.clone().into_os_string();
                    keep_as.push(".damaged");
                    std::fs::copy(&d.path, &keep_as).map_err(io)?;
                    current = false;
                }
                (s.records, s.damage)
            }
        };
        let records: IndexMap<String, Record> = records.into_iter().collect();
        let next_seq = records.values().map(|r| r.seq + 1).max().unwrap_or(0);
        if !current {
            let snapshot = SnapshotRef { records: &records };
            write_atomic_with(&dir.join(SNAPSHOT), |w| snapshot.write(w)).map_err(io)?;
        }
        // The snapshot now holds everything: start the log empty, in append mode so that
        // every write lands at its end (also after a reset truncates it).
        File::create(dir.join(LOG)).map_err(io)?;
        let log = OpenOptions::new()
            .append(true)
            .open(dir.join(LOG))
            .map_err(io)?;
        let failed = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Mutex::new(Inner {
            records,
            log,
            buf: Vec::with_capacity(64 * 1024),
            unsynced: false,
            next_seq,
            error: None,
            failed: failed.clone(),
            changed: false,
        }));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let syncer = {
            let inner = inner.clone();
            let stop = stop.clone();
            spawn_without_signals("journal", move || sync_loop(&inner, &stop)).map_err(io)?
        };
        let journal = Self {
            dir: dir.to_path_buf(),
            inner,
            stop,
            syncer: Mutex::new(Some(syncer)),
            failed,
            lock: Mutex::new(Some(lock)),
        };
        Ok((journal, damage))
    }

    /// Takes the state dir's lock out of the journal: [`Journal::close`] then leaves it held,
    /// by the caller, until the returned file is dropped (to write beside the closed journal
    /// before another run may open it). `None` once closed.
    pub fn keep_lock(&self) -> Option<nix::fcntl::Flock<File>> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why the journal can no longer be written, once it cannot (the first error): from
    /// then on nothing more reaches its log, and a run must stop.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        self.inner().error.clone().map(|e| {
            format!(
                "the journal of state dir `{}` cannot be written: {e}",
                self.dir.display()
            )
        })
    }

    /// The records as they stand now.
    pub fn records(&self) -> BTreeMap<String, Record> {
        let g = self.inner();
        g.records
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        self.inner().records.get(id).cloned()
    }

    /// Whether a record of `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.inner().records.contains_key(id)
    }

    /// Writes what is queued at once (one `write` for all of it): for records that must be
    /// on file before the caller goes on.
    pub fn write_queued(&self) {
        self.inner().write();
    }

    /// Records `record` (it replaces the earlier one of its id). It reaches the file with
    /// the next write, within [`SYNC_EVERY`].
    pub fn put(&self, record: Record) {
        self.put_slot(record);
    }

    /// Like [`Journal::put`], and says where the record is kept: its slot, for
    /// [`Journal::update_at`], [`Journal::set_handle_at`] and [`Journal::finish_at`].
    pub fn put_slot(&self, record: Record) -> usize {
        self.inner().put(record)
    }

    /// Changes a record in place, if it exists.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Record)) {
        self.change(None, id, f, false);
    }

    /// Like [`Journal::update`], and writes at once.
    pub fn update_now(&self, id: &str, f: impl FnOnce(&mut Record)) {
        self.change(None, id, f, true);
    }

    /// Like [`Journal::update`], with the record's slot if [`Journal::put_slot`] gave one:
    /// then no lookup by id. A slot that no longer holds `id` (the journal was reset since)
    /// is looked up by id instead.
    pub fn update_at(&self, slot: Option<usize>, id: &str, f: impl FnOnce(&mut Record)) {
        self.change(slot, id, f, false);
    }

    fn change(&self, slot: Option<usize>, id: &str, f: impl FnOnce(&mut Record), now: bool) {
        let mut g = self.inner();
        let g = &mut *g;
        let Some(r) = Self::find(&mut g.records, slot, id) else {
            return;
        };
        f(r);
        g.changed = true;
        line(&mut g.buf, r);
        if now {
            g.write();
        }
    }

    /// Sets the handle of the record of `id` (at `slot`, as [`Journal::update_at`] finds
    /// it): a short line, written at once if `now`, else with the next write.
    pub fn set_handle_at(&self, slot: Option<usize>, id: &str, handle: Handle, now: bool) {
        let mut g = self.inner();
        let g = &mut *g;
        let Some(r) = Self::find(&mut g.records, slot, id) else {
            return;
        };
        let handle = &*r.handle.insert(handle);
        g.changed = true;
        line(
            &mut g.buf,
            &SetRef {
                set: id,
                status: None,
                handle: Some(handle),
                finished_ms: None,
                exit_code: None,
                error: None,
            },
        );
        if now {
            g.write();
        }
    }

    /// Records the end of the task of `id`: its status, when, its exit code and error, and
    /// a handle if it brings one (else the record keeps the one it has). Queued as a short
    /// line, as [`Journal::update_at`] queues.
    pub fn finish_at(
        &self,
        slot: Option<usize>,
        id: &str,
        status: Status,
        handle: Option<Handle>,
        exit_code: Option<i32>,
        error: Option<&str>,
    ) {
        let mut g = self.inner();
        let g = &mut *g;
        let Some(r) = Self::find(&mut g.records, slot, id) else {
            return;
        };
        let finished_ms = now_ms();
        r.status = status;
        r.finished_ms = Some(finished_ms);
        r.exit_code = exit_code;
        r.error = error.map(str::to_string);
        let handle = handle.map(|h| &*r.handle.insert(h));
        g.changed = true;
        line(
            &mut g.buf,
            &SetRef {
                set: id,
                status: Some(status),
                handle,
                finished_ms: Some(finished_ms),
                exit_code: Some(exit_code),
                error: Some(error),
            },
        );
    }

    /// The record of `id`: at `slot` if it still holds `id`, else looked up by id.
    fn find<'r>(
        records: &'r mut IndexMap<String, Record>,
        slot: Option<usize>,
        id: &str,
    ) -> Option<&'r mut Record> {
        let at = slot
            .filter(|&i| records.get_index(i).is_some_and(|(k, _)| k == id))
            .or_else(|| records.get_index_of(id))?;
        records.get_index_mut(at).map(|(_, r)| r)
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
                &SnapshotRef {
                    records: &IndexMap::new(),
                }
                .to_vec(),
            )
        });
        if let Err(e) = cleared {
            g.fail(format!("{SNAPSHOT}: {e}"));
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
                g.fail(format!("{LOG}: {e}"));
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

    /// Writes everything, replaces the snapshot atomically and empties the log. Any write
    /// error of the journal's life is reported here (if no earlier one, this close's own).
    /// The state dir's lock is released. Closing twice does nothing the second time; a
    /// journal that is dropped unclosed is closed then, its error lost: close it.
    pub fn close(&self) -> Result<(), JournalError> {
        let Some(syncer) = self.syncer.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let _ = syncer.join();
        let mut g = self.inner();
        g.write();
        // Nothing changed since open (a no-op resume): the snapshot on file is current.
        // Even after a write error the snapshot is tried: it holds every record in memory,
        // and the log is emptied only once it is on file.
        let mut closed = Ok(());
        if g.changed {
            let snapshot = SnapshotRef {
                records: &g.records,
            };
            // With every append on file, only the snapshot is missing: nothing is lost.
            let log_whole = g.error.is_none();
            // Streamed: 100,000 records would be tens of MB of JSON in memory.
            let path = self.dir.join(SNAPSHOT);
            closed = write_atomic_with(&path, |w| snapshot.write(w)).map_err(|e| {
                if log_whole {
                    format!(
                        "{SNAPSHOT}: {e} (every record is on file in {LOG}: `status`, \
                         `run --resume` and `down` work, and the snapshot is written again \
                         when there is room)"
                    )
                } else {
                    format!("{SNAPSHOT}: {e}")
                }
            });
        }
        if closed.is_ok() {
            g.changed = false;
            closed = g.log.set_len(0).map_err(|e| format!("{LOG}: {e}"));
        }
        if let Err(e) = closed {
            g.fail(e);
        }
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()).take());
        match g.error.clone() {
            Some(message) => Err(JournalError::Write {
                dir: self.dir.clone(),
                message,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// How much of the journal on file an open keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    All,
    Salvage,
}

/// Temp files of [`write_atomic`] that a killed prl-flow left (the lock is held: no one else
/// writes them now).
fn remove_stale_temps(dir: &Path) {
    let prefix = format!(".{SNAPSHOT}.tmp");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
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
            if let Err(e) = f.sync_data() {
                let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
                g.fail(format!("{LOG}: {e}"));
            }
        }
    }
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;

/// Starts a thread in which the signals a process gets from outside (`SIGCHLD`, `SIGINT`,
/// `SIGTERM`...) are blocked from its first instruction, so that the kernel hands them to a
/// thread that waits for them: a `SIGCHLD` that landed here would wake this thread, which
/// would then have to wake the runtime's thread in turn, a second wake-up between a child's
/// exit and the next start. The signals of a fault in the thread's own code stay unblocked.
/// (A new thread inherits the mask of the one that starts it: blocked around the spawn.)
fn spawn_without_signals<F>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::all();
    for fault in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGFPE,
        Signal::SIGILL,
        Signal::SIGTRAP,
        Signal::SIGSYS,
        Signal::SIGABRT,
    ] {
        set.remove(fault);
    }
    let mut before = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut before)).is_ok();
    let thread = std::thread::Builder::new().name(name.into()).spawn(f);
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    }
    thread
}
