//! The session API: everything a user does with a deployment or workflow — load and check
//! it, plan it, run or resume it, see its status, read its logs, take it down — as library
//! calls. The command line is one caller (it parses arguments and prints what these return);
//! the tests are others. Nothing here prints, and nothing is global: a [`Session`] holds the
//! one thing an invocation shares, the site (and through it the backend registry).
//!
//! - [`Session::load`] turns a file into a [`Loaded`] plan (a recipe or a workflow), with the
//!   backend decided once, from the flags, the site file and the recipe.
//! - [`Session::prepare`] opens the state dir and decides what runs; [`Prepared::execute`]
//!   runs it ([`run`]).
//! - [`Session::status`], [`Session::down`] and [`Session::logs`] work from the journal
//!   alone ([`inspect`], [`down`]); [`Session::list`] finds every state dir under
//!   `.prl-flow/`; [`Session::heal`] keeps a deployment that is up healthy ([`heal`]).
//! - [`abort`]: `down` aborting a run that still holds the state dir.
//! - [`identity`]: which file a state dir belongs to, and a file's default state dir.
//! - [`options`]: the options a run was given, remembered for a resume and for hints.
//! - [`noop`]: a resume with nothing to do, told from a stamp without loading anything.

pub mod abort;
pub mod down;
pub mod heal;
pub mod identity;
pub mod inspect;
pub mod load;
pub mod noop;
pub mod options;
pub mod run;
mod salvage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prl_flow_engine::{journal, JournalError, Record};

use crate::diag::Problems;
use crate::registry::Registry;
use crate::site::Site;

pub use down::DownReport;
pub use inspect::{Listed, Liveness, Overall, TaskRow};
pub use load::{LoadOptions, Loaded};
pub use run::{Prepared, Ran, RunSettings};

/// Why a session call could not do what was asked.
#[derive(Debug)]
pub enum Error {
    /// Bad input (a file, a flag, a state dir): a message with its help. Exit code 2.
    Usage(String),
    /// Problems in a file, each with its place. Exit code 2.
    Problems(Problems),
    /// The state dir still has work of an earlier run that may still run: live services,
    /// or one-shots still in flight (a fresh run would start them twice). Exit code 2.
    LiveServices { dir: PathBuf, ids: Vec<Live> },
    /// Something was tried and failed: a message. Exit code 1.
    Failed(String),
}

/// An entry of [`Error::LiveServices`]: work of an earlier run that still runs, or may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// How the refusal names it: its id, with what is known of it.
    pub entry: String,
    /// Its backend could not say whether it still runs, or could not stop what is left of
    /// it (a host that does not answer): the refusal says how to go on without that host.
    pub unsure: bool,
}

impl Live {
    /// The entries' names, for one line.
    pub fn joined(live: &[Live]) -> String {
        live.iter()
            .map(|l| l.entry.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What one invocation shares: the site file (if any) and the backends it makes known.
#[derive(Default)]
pub struct Session {
    registry: Registry,
}

impl Session {
    pub fn new(site: Option<Site>) -> Self {
        Self {
            registry: Registry::new(site),
        }
    }

    /// The session of a site file named by `flag` (`--site`) or else by `PRL_FLOW_SITE`.
    pub fn from_site_flag(flag: Option<&Path>) -> Result<Self> {
        Ok(Self::new(crate::site::load(flag).map_err(Error::Problems)?))
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn site(&self) -> Option<&Site> {
        self.registry.site()
    }
}

/// Is this the record of an allocation (held like a service, but no process)?
pub fn is_allocation(r: &Record) -> bool {
    crate::actions::Action::of_kind(&r.kind) == Some(crate::actions::Action::Allocate)
}

/// The process handle a record keeps (`None`: none, or not a process's).
pub(crate) fn proc_handle(r: &Record) -> Option<prl_flow_backend::ProcHandle> {
    r.handle
        .as_ref()
        .and_then(|h| prl_flow_backend::ProcHandle::try_from(h).ok())
}

pub use crate::plan::default_state_dir;

pub(crate) fn journal_error(e: JournalError) -> Error {
    match e {
        JournalError::Locked { dir, holder } => Error::Usage(format!(
            "error: the state dir `{}` is in use by another prl-flow: {holder}\n  help: wait for it to finish, or use another `--state-dir`",
            dir.display()
        )),
        JournalError::Corrupt { ref path, .. } => {
            let dir = path.parent().unwrap_or(Path::new("."));
            Error::Usage(format!(
                "error: {e}\n  help: `prl-flow down --state-dir {}` stops everything it can still \
                 find (what the journal still holds, the run dirs' pid files, a SLURM job), keeps \
                 the damaged files as `*.damaged` and makes the journal whole again",
                dir.display()
            ))
        }
        // Written during or after a run: something may have been done.
        e @ JournalError::Write { .. } => Error::Failed(format!("error: {e}")),
        other => Error::Usage(format!("error: {other}")),
    }
}

/// An error unless `dir` has a journal (something has run there).
pub(crate) fn has_journal(dir: &Path) -> Result<()> {
    if dir.join("journal.json").exists() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "error: `{}` has no journal: nothing has run there",
        dir.display()
    )))
}

/// The records of the journal in `dir`; an error when nothing has run there, or when the
/// journal is damaged (the message says how to recover).
pub fn read_records(dir: &Path) -> Result<BTreeMap<String, Record>> {
    has_journal(dir)?;
    journal::load(dir).map_err(journal_error)
}

/// The state dirs under `root` (`.prl-flow/`): those with a journal, in name order.
pub fn state_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("journal.json").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The only state dir under `.prl-flow/` (for `status`, `down`, `logs` without a file).
pub fn only_state_dir() -> Result<PathBuf> {
    let mut dirs = state_dirs(Path::new(".prl-flow"));
    match dirs.len() {
        1 => Ok(dirs.remove(0)),
        0 => Err(Error::Usage(
            "error: no state dir here (`.prl-flow/` has none)\n  help: name the recipe or workflow (`prl-flow status FILE`) or `--state-dir DIR`".into(),
        )),
        _ => Err(Error::Usage(format!(
            "error: `.prl-flow/` holds several state dirs: {}\n  help: name the recipe or workflow, or pass `--state-dir DIR`",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}
