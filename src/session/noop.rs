//! The no-op resume's shortcut. After a run that left every task of a plain workflow done,
//! `run` records in `up-to-date.json` beside the journal what that state depends on: the
//! file (as named, and its SHA-256), the options, this prl-flow's version, the directories
//! its tasks start in, and the journal on file (size, time, inode of `journal.json`; an
//! empty `journal.log`). A `run --resume` that finds all of it unchanged, under the state
//! dir's lock, has nothing to do: it says so without parsing the file, building the graph or
//! opening the journal. Anything else takes the full path, which removes the stamp as soon
//! as it holds the lock ([`forget`]), before anything can change.
//!
//! Not stamped: deployments and services (their processes are checked live on every
//! resume), a run on another backend than `local`, a site file or templates in use.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use prl_flow_engine::Summary;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::options::{Chosen, Remembered};
use super::Loaded;
use crate::registry::builtins::LOCAL;

/// The stamp beside the journal.
pub const STAMP: &str = "up-to-date.json";

/// What `up-to-date.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    version: String,
    /// The file as named, made absolute without resolving links (start dirs come from it).
    file: PathBuf,
    sha256: String,
    options: Remembered,
    /// Each start dir as written, made absolute, with the directory it led to.
    start_dirs: Vec<(PathBuf, String)>,
    journal: OnFile,
    tasks: usize,
}

/// The journal as a closed run left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct OnFile {
    len: u64,
    mtime_ns: i64,
    ino: u64,
}

impl OnFile {
    /// `journal.json`'s identity, when `journal.log` is empty (nothing appended since).
    fn of(dir: &Path) -> Option<Self> {
        let log = std::fs::metadata(dir.join("journal.log")).map_or(0, |m| m.len());
        if log != 0 {
            return None;
        }
        let m = std::fs::metadata(dir.join("journal.json")).ok()?;
        Some(Self {
            len: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ino: m.ino(),
        })
    }
}

/// A resume found to have nothing to do: how many tasks it keeps. The state dir stays
/// locked while this is held.
pub struct UpToDate {
    pub tasks: usize,
    _lock: nix::fcntl::Flock<File>,
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a site file may be read (`--site`, or `PRL_FLOW_SITE`): then the shortcut is off.
fn site_in_use(chosen: &Chosen) -> bool {
    chosen.site.is_some() || std::env::var_os(crate::site::SITE_ENV).is_some_and(|v| !v.is_empty())
}

/// The options a run with `chosen` records when no site file or templates are read.
fn plain(chosen: &Chosen) -> Option<Remembered> {
    (!site_in_use(chosen) && chosen.templates.is_none()).then(|| Remembered {
        options: chosen.clone(),
        ..Remembered::default()
    })
}

/// Removes the stamp: a run is about to change the state dir (it holds the lock).
pub fn forget(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(STAMP));
}

/// Records that every task of `loaded` is done, after a run that ended ok and closed its
/// journal; the caller still holds the state dir's lock. Does nothing unless the plan can
/// take the shortcut (see the module's text).
pub fn record(dir: &Path, loaded: &Loaded, chosen: &Chosen, summary: &Summary) {
    let plan = &loaded.plan;
    let simple = plan.backend == LOCAL
        && plan.nodes.is_empty()
        && plan.tasks.iter().all(|t| !t.service && t.node.is_none())
        && summary.ok()
        && summary.done + summary.kept == plan.tasks.len();
    let (Some(options), true) = (plain(chosen), simple) else {
        return;
    };
    let (Ok(file), Some(journal)) = (std::path::absolute(&loaded.path), OnFile::of(dir)) else {
        return;
    };
    let mut start_dirs = Vec::new();
    for (written, led) in &loaded.start_dirs {
        let Ok(w) = std::path::absolute(written) else {
            return;
        };
        start_dirs.push((w, led.clone()));
    }
    let stamp = Stamp {
        version: env!("CARGO_PKG_VERSION").to_string(),
        file,
        sha256: sha256(loaded.source.as_bytes()),
        options,
        start_dirs,
        journal,
        tasks: plan.tasks.len(),
    };
    if let Ok(mut bytes) = serde_json::to_vec_pretty(&stamp) {
        bytes.push(b'\n');
        let _ = prl_flow_engine::fs::write_atomic(&dir.join(STAMP), &bytes);
    }
}

/// A resume of `file` with `chosen` in `dir` that has nothing to do, if the stamp says so
/// and everything it names is unchanged; `None` sends the resume down the full path.
pub fn check(dir: &Path, file: &Path, chosen: &Chosen, holder: &str) -> Option<UpToDate> {
    let options = plain(chosen)?;
    let text = std::fs::read(dir.join(STAMP)).ok()?;
    let stamp: Stamp = serde_json::from_slice(&text).ok()?;
    if stamp.version != env!("CARGO_PKG_VERSION")
        || stamp.options != options
        || stamp.file != std::path::absolute(file).ok()?
    {
        return None;
    }
    // The file a state dir belongs to: a refusal is the full path's to word.
    if super::identity::read(dir)?.file != super::identity::canonical(file) {
        return None;
    }
    // Another run may hold the state dir: the full path says so, or waits for a dead one.
    let lock = prl_flow_engine::journal::lock(dir, holder).ok()?;
    if OnFile::of(dir)? != stamp.journal {
        return None;
    }
    if sha256(&std::fs::read(file).ok()?) != stamp.sha256 {
        return None;
    }
    for (written, led) in &stamp.start_dirs {
        let now = std::fs::canonicalize(written).ok()?;
        if now.to_str() != Some(led.as_str()) || !now.is_dir() {
            return None;
        }
    }
    Some(UpToDate {
        tasks: stamp.tasks,
        _lock: lock,
    })
}
