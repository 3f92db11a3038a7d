//! The journal: what each task of a state dir did, kept so that a later process can resume,
//! report status, or tear down.
//!
//! On disk, a state dir holds:
//! - `journal.json`: a snapshot of every record (one a line), replaced atomically (temp
//!   file, fsync, rename) when a run opens and closes the journal;
//! - `journal.log`: records appended during a run, one JSON object a line: a task's whole
//!   record when it starts, then short changes of it (`{"set":"ID",...}`: its handle, its
//!   end); the last word for an id wins. A torn last line (the machine died mid-write) is
//!   ignored on load; any other line that does not parse, or a change of an id with no
//!   record before it, makes the journal damaged ([`load`] names its line number), and
//!   [`salvage`] reads what is left of a damaged one;
//! - `lock`: held with `flock` for the whole run, and naming its holder.
//!
//! Group commit: records queue up in memory and go to the file in one `write`, either at
//! once when they must be on file before the caller goes on (a task about to start a
//! process: a `kill -9` right after the fork must not leave a journal that never heard of
//! it), or within [`SYNC_EVERY`] from a background thread, which also calls `fsync` at most
//! that often. The starts of a batch of tasks are one such write: the scheduler
//! [commits](crate::Subscriber::commit) them after the batch and before any of its tasks
//! runs. A `write` reaches the kernel at once, so a `kill -9` of prl-flow loses only
//! what was still queued: never a start, nor a handle that only the journal knows (written
//! at once); a handle whose task finds its process again from the start alone (a local
//! process, by its pid file) goes with the next batch, and a later update such as a task's
//! end, which the next command learns again from the process (see docs/architecture.md). A
//! crash of the machine can lose the last moments.
//!
//! A write that fails makes the journal *failed* ([`Journal::failure`]): nothing more is
//! appended, and a run stops at once (the journal's recorder is then
//! [broken](crate::Subscriber::broken)).
//! Thousands of tasks mean a handful of fsyncs, not thousands.

mod recorder;
mod store;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use crate::record::{now_ms, Record, Status};
pub use store::{load, lock, salvage, Damage, Salvaged};
pub use writer::Journal;

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
    #[error("cannot write the journal of state dir `{dir}`: {message}")]
    Write { dir: PathBuf, message: String },
}
