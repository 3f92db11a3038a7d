//! `down` on a damaged journal: what the journal no longer names may still run. The run dirs
//! of the state dir are looked at for a local process's proc file (a service's `RUN_DIR/pid`,
//! a one-shot's `RUN_DIR.pid`, whose first words are `PID ATTEMPT`; the local backend's
//! processes write it before anything else, and the backend's `recover` checks the rest),
//! and every other built-in backend is asked to take
//! down what the state dir started (SLURM: the job its job file names). What cannot be known
//! is said, with how to recover.

use std::path::Path;

use prl_flow_backend::{ProcState, SpawnSpec};
use prl_flow_engine::journal::Damage;
use prl_flow_local::PidFile;

use super::{DownReport, Session};
use crate::exec::{Exec, STOP_GRACE};
use crate::registry::builtins::{BUILTINS, LOCAL};

/// Stops the local processes whose proc files lie in the run dirs of `dir` and that still
/// run (after the records' teardown, only those the damaged part named), and cancels a
/// SLURM job the state dir submitted.
pub(super) async fn stop_unrecorded(
    session: &Session,
    dir: &Path,
    report: &mut DownReport,
    on_stop: &mut (dyn FnMut(&str) + Send),
) {
    if let Ok(local) = session.registry().for_handles(LOCAL, None) {
        // The paths as the run made them (absolute: a one-shot's shell is told its proc
        // file's absolute path), as `recovery_spec` has them.
        let paths = Exec::new(local.clone(), dir, Vec::new());
        let run = paths.state_dir.join("run");
        let mut entries: Vec<_> = std::fs::read_dir(&run)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for entry in entries {
            let Some(file) = entry.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            // A one-shot's proc file beside its run dir, or a service's in it.
            let (name, run_dir, proc_file, service) = match file.strip_suffix(".pid") {
                Some(name) => (name.to_string(), paths.run_dir(name), entry.clone(), false),
                None => (file.clone(), entry.clone(), entry.join("pid"), true),
            };
            let Some(attempt) = std::fs::read_to_string(&proc_file)
                .ok()
                .and_then(|t| PidFile::parse(&t))
                .map(|p| p.attempt)
            else {
                continue;
            };
            // A pid can be reused: the pid file holds the start time the process read of
            // itself, and `recover` takes the pid for ours only while it has that start time.
            // (Its working directory says nothing: a workflow's task starts in the
            // workflow's directory, not in its run dir.)
            let spec = SpawnSpec {
                task: name.clone(),
                run_dir: run_dir.clone(),
                log: paths.log_path(&name),
                attempt,
                service,
                ..SpawnSpec::default()
            };
            let Ok(Some(h)) = local.recover(&spec).await else {
                continue;
            };
            if !matches!(local.status(&h).await, Ok(ProcState::Running)) {
                continue;
            }
            match local.stop(&h, STOP_GRACE).await {
                Ok(()) => {
                    report.stopped += 1;
                    on_stop(&name);
                }
                Err(e) => report.failures.push(format!("{name}: {e}")),
            }
        }
    }
    // What the state dir started on other backends, whatever the journal says (SLURM: the
    // job of its job file).
    for name in BUILTINS.iter().filter(|n| **n != LOCAL) {
        let Ok(backend) = session.registry().for_handles(name, None) else {
            continue;
        };
        for s in backend.teardown(&[], STOP_GRACE, Some(dir)).await {
            if let Some(e) = s.error {
                report.failures.push(format!("{}: {e}", s.id));
            }
        }
    }
}

/// What `down` says of a damaged journal: what was wrong, what it did, how to go on.
pub(super) fn damage_note(dir: &Path, damage: &[Damage]) -> String {
    let what: Vec<String> = damage
        .iter()
        .map(|d| format!("`{}` {}", d.path.display(), d.what))
        .collect();
    format!(
        "the journal was damaged: {}\n  \
         what could still be read of it was taken down, and so was every process found by \
         the pid files of its run dirs and any SLURM job of its job file; what only the \
         damaged part named (a process on another host, a plugin's handle) could not be \
         looked at\n  \
         help: the damaged files are kept beside the journal as `*.damaged`, and the journal \
         is whole again: `prl-flow status` and `run` work; to start afresh, remove `{}`",
        what.join("; "),
        dir.display()
    )
}
