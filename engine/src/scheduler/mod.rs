//! The scheduler: runs a sealed graph, each task the moment its dependencies are done.
//!
//! # How it works
//!
//! First, [`decide`] says for every task whether it runs, is kept from an earlier run, or is
//! adopted (an earlier, killed run left it in flight). It walks the graph in topological
//! order, so a task re-runs whenever something it needs re-runs. Only services recorded as
//! done and tasks recorded as running are `check`ed, all at once.
//!
//! Then [`run`] keeps, like cargo's `DependencyQueue`, a count of unfinished dependencies per
//! task. Tasks at zero wait in a ready queue; at most `jobs` run at a time, as futures polled
//! by the scheduler's own task (no thread hop per task). When one finishes, its dependents'
//! counts drop and those at zero become ready. There are no levels and no barriers.
//!
//! Two ways a run stops early, kept apart (moon's *abort* and *cancel*):
//! - **abort**: a task failed and `keep_going` is off. Nothing new starts; one-shots already
//!   running finish; services still waiting to be ready are told to stop, or, with `keep`,
//!   left running as they are (their records stay `running`, so a resume adopts them).
//! - **cancel**: a signal arrived. Nothing new starts, and every running task is told to stop.
//!
//! Telling a task to stop fires its [`Cancel`](crate::Cancel); the scheduler then goes on
//! awaiting the task, which forwards the signal to its process and returns when the process is
//! gone. A future is never simply dropped while its child runs. Timeouts work the same way.
//!
//! A third way: a subscriber that must hear every event is [broken](crate::Subscriber::broken)
//! (the journal cannot be written). Then the run acts as if cancelled: nothing new starts (a
//! task whose start was not recorded is not started), every running task is told to stop.
//!
//! A run that fails or is cancelled then undoes, in reverse order, the services it started
//! itself, unless `keep` is set (a broken journal overrides `keep`). Services kept from an
//! earlier run are left alone.

mod attempt;
mod decide;
mod run;
#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::event::{Outcome, Summary};
use crate::record::TaskError;

pub use decide::{decide, recover_handles};
pub use run::run;

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// At most this many tasks at once (at least 1).
    pub jobs: usize,
    /// After a failure, go on with everything that does not depend on it.
    pub keep_going: bool,
    /// On failure or cancel, leave the services this run started running.
    pub keep: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            jobs: 8,
            keep_going: false,
            keep: false,
        }
    }
}

/// What became of each task, and the counts.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: Summary,
    /// Per task index: `None` if kept from an earlier run, or left loading (`keep`).
    pub outcomes: Vec<Option<Outcome>>,
    /// Per task index: the last error, if it failed.
    pub errors: Vec<Option<TaskError>>,
    pub cancelled: bool,
    /// The run stopped because a subscriber could not keep up its promise (the journal
    /// could not be written), and why.
    pub broken: Option<String>,
    /// What could not be stopped, `(id, why)`: services the teardown of a failed or
    /// cancelled run could not stop, and tasks whose own stop failed (a one-shot cancelled
    /// or timed out, a service that failed while loading). They may still run; their
    /// records keep their handles.
    pub unstopped: Vec<(String, String)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.summary.ok() && !self.cancelled && self.broken.is_none()
    }
}

/// `90s` → `1m30s`; whole seconds, or milliseconds below a second.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}
