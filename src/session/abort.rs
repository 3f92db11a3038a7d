//! Aborting a run from elsewhere. `down` on a state dir that a bring-up still holds signals
//! that prl-flow, once it is sure the lock's holder is a prl-flow holding this very state
//! dir, waits for its teardown, then takes down whatever is left. The run learns who asked
//! from a note in the state dir, so it can say so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Error, Result};

/// The note `down` leaves in the state dir before it signals the run: who asks.
const REQUEST: &str = "aborted-by";
/// The journal's lock file in a state dir.
const LOCK: &str = "lock";
/// How long a signalled run may take to stop what it started before a second signal makes
/// it exit at once (its journal still records what runs; `down` then stops that).
const TEARDOWN_WAIT: Duration = Duration::from_secs(120);
/// How long a run may take to exit after the second signal.
const EXIT_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Who asked to abort the run of `dir` (`` `prl-flow down` (pid N) ``), if a `down` that
/// still runs did. The run reads it when its signal comes.
pub fn abort_requester(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(REQUEST)).ok()?;
    let text = text.trim();
    let pid = holder_pid(text)?;
    Path::new(&format!("/proc/{pid}"))
        .exists()
        .then(|| text.to_string())
}

/// The pid in a lock file's `HOLDER (pid N)`.
fn holder_pid(text: &str) -> Option<i32> {
    let rest = &text[text.rfind("(pid ")? + 5..];
    rest.strip_suffix(')')?.parse().ok()
}

/// Whether process `pid` has `lock` open: a pid reused by an unrelated process does not.
fn holds(pid: i32, lock: &Path) -> bool {
    let Ok(want) = lock.canonicalize() else {
        return false;
    };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| e.ok())
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == want))
}

/// Whether process `pid` runs a prl-flow program.
fn is_prl_flow(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("prl-flow"))
}

/// Removes the note when dropped, however `down` ends.
pub(crate) struct Request(PathBuf);

impl Drop for Request {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn in_use(dir: &Path, holder: &str, why: &str) -> Error {
    Error::Usage(format!(
        "error: the state dir `{}` is in use by another prl-flow: {holder}\n  {why}",
        dir.display()
    ))
}

/// Aborts the run holding `dir`'s lock (`holder`: the lock file's text): checks that it is a
/// prl-flow `run` with this state dir's lock open, signals it (SIGTERM, as Ctrl-C would),
/// and waits until it has stopped what it started and let go of the state dir. Another
/// `down` holding it is waited for, not signalled. `on_abort` hears the holder before the
/// wait. Returns the note to remove once `down` is done.
pub(crate) async fn abort_run(
    dir: &Path,
    holder: &str,
    on_abort: &mut (dyn FnMut(&str) + Send),
) -> Result<Option<Request>> {
    let lock = dir.join(LOCK);
    let Some(pid) = holder_pid(holder) else {
        return Err(in_use(
            dir,
            holder,
            "help: the lock names no pid; wait for it to finish, or use another `--state-dir`",
        ));
    };
    if !holds(pid, &lock) {
        // It let go since: the caller tries again.
        return Ok(None);
    }
    if !is_prl_flow(pid) {
        return Err(in_use(
            dir,
            holder,
            "help: the process holding it is not a prl-flow; it was left alone",
        ));
    }
    let request = if holder.starts_with("prl-flow run") {
        let note = dir.join(REQUEST);
        let me = format!("`prl-flow down` (pid {})\n", std::process::id());
        std::fs::write(&note, me)
            .map_err(|e| Error::Failed(format!("error: cannot write `{}`: {e}", note.display())))?;
        let request = Request(note);
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .map_err(|e| Error::Failed(format!("error: cannot signal {holder}: {e}")))?;
        on_abort(holder);
        Some(request)
    } else {
        // Another `down` (or a tool) holds it: its teardown is under way.
        on_abort(holder);
        None
    };
    let mut deadline = Instant::now() + TEARDOWN_WAIT;
    let mut hurried = false;
    while holds(pid, &lock) {
        if Instant::now() > deadline {
            if hurried || request.is_none() {
                return Err(in_use(
                    dir,
                    holder,
                    "help: it did not let go of the state dir; try `down` again once it has ended",
                ));
            }
            // The second signal: the run exits at once, its journal naming what still runs.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            hurried = true;
            deadline = Instant::now() + EXIT_WAIT;
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(request)
}
