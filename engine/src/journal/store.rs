//! The journal on disk: reading a state dir's snapshot and log, writing the snapshot's
//! format, and the lock that keeps a state dir to one run.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{JournalError, LOCK, LOG, SNAPSHOT};
use crate::record::Record;

/// The snapshot as written: borrows the records instead of cloning them.
#[derive(Serialize)]
pub(super) struct SnapshotRef<'a> {
    pub(super) version: u32,
    pub(super) records: &'a BTreeMap<String, Record>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Snapshot {
    pub(super) version: u32,
    pub(super) records: BTreeMap<String, Record>,
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

pub(super) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

pub(super) fn lock(dir: &Path, holder: &str) -> Result<nix::fcntl::Flock<File>, JournalError> {
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
