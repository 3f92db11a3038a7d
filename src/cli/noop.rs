//! `run --resume` with nothing to do ([`session::noop`]): the same closing lines as the
//! full path, without loading the file; and, after a run that left everything done, the
//! stamp that lets the next resume say so.

use std::path::Path;
use std::time::Instant;

use prl_flow_engine::Summary;

use super::args::{Cli, RunArgs};
use super::{progress, show};
use crate::session::options::Resolved;
use crate::session::{self, Loaded, Ran};

/// The exit code of a resume that the stamp in `dir` shows has nothing to do, or `None`
/// when it must take the full path: an option that shows or explains each task, a changed
/// file, option, start dir or journal, or no stamp at all.
pub fn shortcut(cli: &Cli, a: &RunArgs, dir: &Path, last: &Resolved) -> Option<i32> {
    let plain = a.resume
        && !a.explain
        && a.events.is_none()
        && !a.attach
        && a.seed.is_none()
        && cli.verbose == 0;
    if !plain {
        return None;
    }
    let t0 = Instant::now();
    let holder = format!("prl-flow run {}", a.file.file.display());
    let up = session::noop::check(dir, &a.file.file, &last.chosen, &holder)?;
    if !cli.quiet {
        eprintln!(
            "{} plan: {}, {} kept from the last run",
            progress::clock(),
            crate::diag::count(up.tasks, "task"),
            up.tasks
        );
    }
    let summary = Summary {
        kept: up.tasks,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        ..Summary::default()
    };
    eprintln!("{}", show::ok_line(&summary));
    Some(0)
}

/// After a run that ended ok: the stamp for the next resume (if the plan can take the
/// shortcut), written while the run still holds the state dir; then the lock is let go.
pub fn record(ran: &mut Ran, loaded: &Loaded, resolved: &Resolved) {
    if ran.lock.is_some() && !ran.report.cancelled {
        session::noop::record(&ran.dir, loaded, &resolved.chosen, &ran.report.summary);
    }
    ran.lock = None;
}
