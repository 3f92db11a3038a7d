//! Taking a deployment down: every process the journal records as possibly running is
//! stopped, last started first, and allocations are released. The backends come from the
//! records' handles, so `down` needs neither the recipe nor the site file, and works from
//! another shell or machine; a bring-up still under way there is aborted first
//! ([`abort`]). [`Session::heal`] stays with a deployment that is up and takes
//! it down when asked.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use prl_flow_backend::{Backend, Held, Recorded};
use prl_flow_engine::{Journal, JournalError, Record, Status};

use super::abort;
use super::run::recover_missing;
use super::salvage;
use super::{is_allocation, journal_error, Error, Result, Session};
use crate::exec::STOP_GRACE;

/// What `down` did.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    /// Processes that were running and were stopped.
    pub stopped: usize,
    /// What could not be stopped or released: `id: why`.
    pub failures: Vec<String>,
}

/// How [`Session::heal`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// `down` was run elsewhere: everything is stopped already.
    StoppedElsewhere,
    /// The stop signal came.
    Signalled,
}

/// Backends of allocations recorded as running with no handle.
fn unrecorded_backends(journal: &Journal) -> BTreeSet<String> {
    journal
        .records()
        .values()
        .filter(|r| r.status == Status::Running && r.handle.is_none() && is_allocation(r))
        .filter_map(|r| r.meta.get("backend")?.as_str().map(String::from))
        .collect()
}

impl Session {
    /// Stops every process the journal of `dir` records as possibly running, last started
    /// first, and releases allocations. `on_stop` hears each task stopped. A run that still
    /// holds `dir` is aborted first ([`Session::down_aborting`]).
    pub async fn down(
        &self,
        dir: &Path,
        on_stop: &mut (dyn FnMut(&str) + Send),
    ) -> Result<DownReport> {
        self.down_aborting(dir, &mut |_| {}, on_stop).await
    }

    /// [`Session::down`], which first aborts a prl-flow run that holds `dir` (a bring-up
    /// under way): it signals that run, as Ctrl-C would, and waits for its teardown.
    /// `on_abort` hears the run (`prl-flow run FILE (pid N)`) before the wait.
    pub async fn down_aborting(
        &self,
        dir: &Path,
        on_abort: &mut (dyn FnMut(&str) + Send),
        on_stop: &mut (dyn FnMut(&str) + Send),
    ) -> Result<DownReport> {
        super::has_journal(dir)?;
        // A damaged journal does not stop `down`: what can still be read of it is taken
        // down, then whatever the run dirs say still runs (see `salvage`).
        let mut request = None;
        let (journal, damage) = loop {
            match Journal::open_salvaged(dir, "prl-flow down") {
                Err(JournalError::Locked { holder, .. }) if request.is_none() => {
                    request = Some(abort::abort_run(dir, &holder, on_abort).await?);
                }
                other => break other.map_err(journal_error)?,
            }
        };
        let mut all = journal.records();
        let first = self
            .registry()
            .for_records(all.values())
            .map_err(Error::Usage)?;
        recover_missing(first, &journal, &mut all).await;
        let mut records: Vec<Record> = all.into_values().collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let mut report = DownReport::default();

        // Per backend (for a plugin: one plugin process), in the order their last records
        // started, everything it started in one call: a backend that can stop many things
        // at once does (SLURM: one `scancel` per job, the allocation with it).
        let mut groups: Vec<(String, Arc<dyn Backend>, Vec<Recorded>)> = Vec::new();
        for r in records {
            let Some(h) = &r.handle else { continue };
            // A one-shot that ran to its end has ended; one that failed, timed out or was
            // cancelled was stopped then, unless that stop failed: it is looked at again.
            if r.status == Status::Stopped || (!r.service && r.status == Status::Done) {
                continue;
            }
            let held = match Held::from_json(h) {
                Ok(held) => held,
                Err(e) => {
                    report.failures.push(format!("{}: {e}", r.id));
                    continue;
                }
            };
            let name = held.handle().backend.clone();
            let item = Recorded {
                id: r.id.clone(),
                held,
            };
            match groups.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, items)) => items.push(item),
                None => {
                    let backend = self.registry().for_record(&r).map_err(Error::Usage)?;
                    groups.push((name, backend, vec![item]));
                }
            }
        }
        // A backend whose allocation was in flight (no handle yet) may have started
        // something its state dir knows of (a queued SLURM job): its teardown looks there.
        for name in unrecorded_backends(&journal) {
            if !groups.iter().any(|(n, _, _)| *n == name) {
                let backend = self
                    .registry()
                    .for_handles(&name, None)
                    .map_err(Error::Usage)?;
                groups.push((name, backend, Vec::new()));
            }
        }
        for (_, backend, items) in groups {
            for s in backend.teardown(&items, STOP_GRACE, Some(dir)).await {
                let record = journal.get(&s.id);
                let process = record.as_ref().is_some_and(|r| !is_allocation(r));
                if s.was_running && process {
                    report.stopped += 1;
                }
                // A one-shot that had ended keeps its record's word on how.
                let ended_one_shot = record
                    .as_ref()
                    .is_some_and(|r| !r.service && r.status != Status::Running);
                match s.error {
                    None if ended_one_shot && !s.was_running => {}
                    None => {
                        journal.update(&s.id, |rec| rec.status = Status::Stopped);
                        if s.was_running && process {
                            on_stop(&s.id);
                        }
                    }
                    Some(e) => report.failures.push(format!("{}: {e}", s.id)),
                }
            }
        }
        if !damage.is_empty() {
            salvage::stop_unrecorded(self, dir, &mut report, on_stop).await;
            report.failures.push(salvage::damage_note(dir, &damage));
        }
        journal.close().map_err(journal_error)?;
        Ok(report)
    }
}
