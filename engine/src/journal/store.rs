//! The journal on disk: reading a state dir's snapshot and log, writing the snapshot's
//! format, and the lock that keeps a state dir to one run.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use super::{JournalError, LOCK, LOG, SNAPSHOT};
use crate::record::{Handle, Record, Status};

/// The snapshot as written: borrows the records instead of cloning them, and writes them
/// in the order of their ids (as a `BTreeMap` would), whatever order they are kept in.
pub(super) struct SnapshotRef<'a> {
    pub(super) records: &'a IndexMap<String, Record>,
}

impl SnapshotRef<'_> {
    /// Writes the snapshot as compact JSON, one record a line: `{"version":1,"records":{`,
    /// then `"ID":{...}` lines, then `}}`.
    pub(super) fn write(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut sorted: Vec<(&String, &Record)> = self.records.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        w.write_all(b"{\"version\":1,\"records\":{")?;
        let mut buf = Vec::with_capacity(1024);
        for (i, (id, r)) in sorted.into_iter().enumerate() {
            buf.clear();
            buf.extend_from_slice(if i == 0 { b"\n" } else { b",\n" });
            serde_json::to_writer(&mut buf, id)?;
            buf.push(b':');
            serde_json::to_writer(&mut buf, r)?;
            w.write_all(&buf)?;
        }
        w.write_all(b"\n}}\n")
    }

    pub(super) fn to_vec(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let _ = self.write(&mut bytes);
        bytes
    }
}

/// A line of the log that changes some fields of a record put before it (or kept in the
/// snapshot): `{"set":"ID",...}`, the fields a task's handle or end sets. Much shorter than
/// the whole record, which is written when the task starts.
#[derive(Serialize)]
pub(super) struct SetRef<'a> {
    pub(super) set: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) handle: Option<&'a Handle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) finished_ms: Option<u64>,
    /// `null` clears the field; absent leaves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) exit_code: Option<Option<i32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<Option<&'a str>>,
}

/// [`SetRef`] as read back.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Set {
    set: String,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    handle: Option<Handle>,
    #[serde(default)]
    finished_ms: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    exit_code: Option<Option<i32>>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Option<String>>,
}

/// A field that is there, `null` or not: `Some` (absent is `None`, by `default`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl Set {
    fn apply(self, r: &mut Record) {
        if let Some(s) = self.status {
            r.status = s;
        }
        if self.handle.is_some() {
            r.handle = self.handle;
        }
        if self.finished_ms.is_some() {
            r.finished_ms = self.finished_ms;
        }
        if let Some(c) = self.exit_code {
            r.exit_code = c;
        }
        if let Some(e) = self.error {
            r.error = e;
        }
    }
}

/// The start of a [`SetRef`] line, which tells it from a whole record's.
const SET: &[u8] = b"{\"set\":";

#[derive(Deserialize)]
pub(super) struct Snapshot {
    pub(super) version: u32,
    pub(super) records: BTreeMap<String, Record>,
}

/// Reads the records of a state dir without locking it (for `status`, `logs`, and the
/// decisions of a resume). A missing journal reads as empty. A snapshot that does not parse,
/// or a line of the log that does not (other than a torn last one: the machine died
/// mid-write), is an error naming the file and the line: [`JournalError::Corrupt`].
pub fn load(dir: &Path) -> Result<BTreeMap<String, Record>, JournalError> {
    let s = salvage(dir)?;
    match s.damage.first() {
        None => Ok(s.records),
        Some(first) => Err(JournalError::Corrupt {
            path: first.path.clone(),
            message: s
                .damage
                .iter()
                .map(|d| d.what.clone())
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// One part of a journal that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// `journal.json` or `journal.log` of the state dir.
    pub path: PathBuf,
    /// What is wrong there (`line 3: not a record (...)`), for people.
    pub what: String,
}

/// What could be read of a journal, and what could not.
#[derive(Debug, Clone, Default)]
pub struct Salvaged {
    pub records: BTreeMap<String, Record>,
    /// Empty when the journal is whole.
    pub damage: Vec<Damage>,
}

/// Reads whatever can be read of a state dir's journal, even a damaged one: the snapshot if
/// it parses, then every line of the log that parses (the last line of an id wins). What
/// could not be read is listed, the snapshot as a whole and each line of the log by its
/// number; a torn last line of the log (no newline after it) is not damage. `Err` only when
/// the files cannot be read at all.
pub fn salvage(dir: &Path) -> Result<Salvaged, JournalError> {
    let io = |source| JournalError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut out = Salvaged::default();
    let snap = dir.join(SNAPSHOT);
    if let Some(bytes) = read_if_there(&snap).map_err(io)? {
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| format!("not UTF-8 text ({e})"))
            .and_then(|t| serde_json::from_str::<Snapshot>(t).map_err(|e| e.to_string()));
        match parsed {
            Ok(s) if s.version == 1 => out.records = s.records,
            Ok(s) => out.damage.push(Damage {
                path: snap.clone(),
                what: format!(
                    "version {} of the snapshot's format; this prl-flow reads version 1",
                    s.version
                ),
            }),
            Err(what) => out.damage.push(Damage {
                path: snap.clone(),
                what,
            }),
        }
    }
    let log = dir.join(LOG);
    if let Some(bytes) = read_if_there(&log).map_err(io)? {
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // After the last newline: empty, or a torn last write.
        let torn = lines.pop().unwrap_or_default();
        for (i, line) in lines.iter().enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Err(e) = take_line(line, &mut out.records) {
                out.damage.push(Damage {
                    path: log.clone(),
                    what: format!("line {}: {e}", i + 1),
                });
            }
        }
        let _ = take_line(torn, &mut out.records);
    }
    Ok(out)
}

/// Puts the record of a log line in `records`, or applies the change it makes.
fn take_line(line: &[u8], records: &mut BTreeMap<String, Record>) -> Result<(), String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8 text ({e})"))?;
    if line.starts_with(SET) {
        let set: Set = serde_json::from_str(text).map_err(|e| format!("not a change ({e})"))?;
        let r = records
            .get_mut(&set.set)
            .ok_or_else(|| format!("a change of `{}`, which has no record before it", set.set))?;
        set.apply(r);
        return Ok(());
    }
    let r: Record = serde_json::from_str(text).map_err(|e| format!("not a record ({e})"))?;
    records.insert(r.id.clone(), r);
    Ok(())
}

fn read_if_there(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match File::open(path) {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// How long a lock whose holder has died may still be held: a process the holder was
/// starting when it was killed keeps the lock's file open until its `exec` closes it (a few
/// ms, more on a loaded machine).
const DEAD_HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the state dir's lock (`flock` of `DIR/lock`, naming `holder`) without opening the
/// journal: for a command that only reads the state dir but must not race a run. Released
/// when the returned file is dropped.
pub fn lock(dir: &Path, holder: &str) -> Result<nix::fcntl::Flock<File>, JournalError> {
    let path = dir.join(LOCK);
    let io = |source| JournalError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let deadline = std::time::Instant::now() + DEAD_HOLDER_GRACE;
    loop {
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
                return Ok(f);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "unknown".into());
                if holder_pid(&holder).is_some_and(|pid| !alive(pid))
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                return Err(JournalError::Locked {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err((_, e)) => return Err(io(std::io::Error::from(e))),
        }
    }
}

/// The pid in a lock file's `HOLDER (pid N)`.
fn holder_pid(text: &str) -> Option<i32> {
    let rest = &text[text.rfind("(pid ")? + 5..];
    rest.strip_suffix(')')?.parse().ok()
}

/// Whether a process of that pid runs (a zombie does not: it has released its files).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .and_then(|rest| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder killed while it started a process: the process holds the lock's file until
    /// its `exec`. The lock is taken once it lets go, not refused as "in use".
    #[test]
    fn a_lock_held_after_its_holder_died_is_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let dead = child.id();
        child.wait().expect("wait");
        let held = lock(dir.path(), "prl-flow run wf.toml").expect("lock");
        std::fs::write(
            dir.path().join(LOCK),
            format!("prl-flow run wf.toml (pid {dead})\n"),
        )
        .expect("holder");
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
        });
        lock(dir.path(), "prl-flow run wf.toml --resume").expect("taken once released");
        release.join().expect("join");
        // A live holder is refused at once.
        let _mine = lock(dir.path(), "me").expect("lock");
        let other = std::thread::spawn({
            let d = dir.path().to_path_buf();
            move || lock(&d, "other").map(|_| ())
        });
        assert!(matches!(
            other.join().expect("join"),
            Err(JournalError::Locked { .. })
        ));
    }

    fn line(id: &str) -> String {
        let r = crate::testing::record(id, crate::record::Status::Done, "f");
        serde_json::to_string(&r).expect("json") + "\n"
    }

    fn state(log: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(SNAPSHOT),
            "{\"version\":1,\"records\":{}}\n",
        )
        .expect("snapshot");
        std::fs::write(dir.path().join(LOG), log).expect("log");
        dir
    }

    #[test]
    fn a_corrupt_line_in_the_middle_is_named_by_its_number_and_a_torn_last_one_is_not() {
        let mut log = line("a").into_bytes();
        log.extend(b"{\"id\":\"b\",\"sta\n");
        log.extend(b"\xff\xfe\n");
        log.extend(line("c").as_bytes());
        log.extend(b"{\"id\":\"d\",\"sta");
        let dir = state(&log);
        match load(dir.path()) {
            Err(JournalError::Corrupt { path, message }) => {
                assert!(path.ends_with(LOG), "{path:?}");
                assert!(message.contains("line 2: not a record"), "{message}");
                assert!(message.contains("line 3: not UTF-8"), "{message}");
                assert!(!message.contains("line 5"), "{message}");
            }
            other => panic!("expected a damaged journal, got {other:?}"),
        }
        let s = salvage(dir.path()).expect("salvage");
        assert_eq!(s.records.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(s.damage.len(), 2);
    }

    #[test]
    fn a_torn_last_line_alone_is_no_damage() {
        let mut log = line("a").into_bytes();
        log.extend(b"{\"id\":\"b\",\"sta");
        let dir = state(&log);
        let r = load(dir.path()).expect("load");
        assert_eq!(r.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn a_truncated_or_non_utf8_snapshot_is_damaged() {
        for bytes in [&b"{\"version\":1,\"reco"[..], &b"\xff{}"[..]] {
            let dir = state(b"");
            std::fs::write(dir.path().join(SNAPSHOT), bytes).expect("snapshot");
            match load(dir.path()) {
                Err(JournalError::Corrupt { path, .. }) => assert!(path.ends_with(SNAPSHOT)),
                other => panic!("expected a damaged journal, got {other:?}"),
            }
        }
    }
}
