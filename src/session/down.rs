//! Taking a deployment down: every process the journal records as possibly running is
//! stopped, last started first, and allocations are released. The backends come from the
//! records' handles, so `down` needs neither the recipe nor the site file, and works from
//! another shell or machine. [`Session::watch`] stays with a deployment that is up and takes
//! it down when asked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prl_flow_backend::{Backend, BackendError, ProcHandle, ProcState};
use prl_flow_engine::{journal, Journal, Record, Status};

use super::run::recover_missing;
use super::{is_allocation, journal_error, Error, Result, Session};
use crate::exec::STOP_GRACE;
use crate::registry::Registry;

/// What `down` did.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    /// Processes that were running and were stopped.
    pub stopped: usize,
    /// What could not be stopped or released: `id: why`.
    pub failures: Vec<String>,
}

/// How [`Session::watch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// `down` was run elsewhere: everything is stopped already.
    StoppedElsewhere,
    /// The stop signal came.
    Signalled,
}

impl Session {
    /// Stops every process the journal of `dir` records as possibly running, last started
    /// first, and releases allocations. `on_stop` hears each task stopped.
    pub async fn down(
        &self,
        dir: &Path,
        on_stop: &mut (dyn FnMut(&str) + Send),
    ) -> Result<DownReport> {
        super::read_records(dir)?;
        let journal = Journal::open(dir, true, "prl-flow down").map_err(journal_error)?;
        let mut all = journal.records();
        let first = self
            .registry()
            .for_records(all.values())
            .map_err(Error::Usage)?;
        recover_missing(first.as_ref(), &journal, &mut all).await;
        let mut records: Vec<Record> = all.into_values().collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let mut report = DownReport::default();
        // SLURM: everything of a job in one `scancel` (one call per step overloads slurmctld
        // on a big deployment), the allocation with it.
        let (slurm, records): (Vec<Record>, Vec<Record>) = records
            .into_iter()
            .partition(|r| Registry::backend_name(r).as_deref() == Some("slurm"));
        let slurm: Vec<(String, serde_json::Value)> = slurm
            .into_iter()
            .filter(|r| r.status != Status::Stopped && (r.service || r.status == Status::Running))
            .filter_map(|r| Some((r.id.clone(), r.handle.clone()?)))
            .collect();
        if !slurm.is_empty() {
            let backend = prl_flow_slurm::SlurmBackend::for_handles();
            for o in backend.down(Some(dir), &slurm, STOP_GRACE).await {
                let process = journal.get(&o.id).is_some_and(|r| !is_allocation(&r));
                match o.error {
                    None => {
                        journal.update(&o.id, |rec| rec.status = Status::Stopped);
                        if o.was_running && process {
                            report.stopped += 1;
                            on_stop(&o.id);
                        }
                    }
                    Some(e) => report.failures.push(format!("{}: {e}", o.id)),
                }
            }
        }
        // One backend (for a plugin: one plugin process) per name, not per record.
        let mut backends: BTreeMap<String, Arc<dyn Backend>> = BTreeMap::new();
        for r in records {
            let Some(h) = &r.handle else { continue };
            if r.status == Status::Stopped || !(r.service || r.status == Status::Running) {
                continue;
            }
            let name = Registry::backend_name(&r).unwrap_or_else(|| "local".into());
            let backend = match backends.get(&name) {
                Some(b) => b.clone(),
                None => {
                    let b = self.registry().for_record(&r).map_err(Error::Usage)?;
                    backends.insert(name, b.clone());
                    b
                }
            };
            let result = if is_allocation(&r) {
                match serde_json::from_value(h.clone()) {
                    Ok(alloc) => backend.release(&alloc).await,
                    Err(e) => Err(BackendError::new(e.to_string())),
                }
            } else {
                match ProcHandle::try_from(h) {
                    Err(e) => Err(e),
                    Ok(h) => {
                        let was_running =
                            matches!(backend.status(&h).await, Ok(ProcState::Running));
                        let res = backend.stop(&h, STOP_GRACE).await;
                        if was_running && res.is_ok() {
                            on_stop(&r.id);
                        }
                        if was_running {
                            report.stopped += 1;
                        }
                        res
                    }
                }
            };
            match result {
                Ok(()) => journal.update(&r.id, |rec| rec.status = Status::Stopped),
                Err(e) => report.failures.push(format!("{}: {e}", r.id)),
            }
        }
        journal.close().map_err(journal_error)?;
        Ok(report)
    }

    /// Stays with a deployment that is up: `on_down` hears each service that dies (once).
    /// Ends when `down` stopped the deployment from elsewhere, or when `stop` resolves (the
    /// caller then takes it down).
    pub async fn watch(
        &self,
        dir: &Path,
        backend: &dyn Backend,
        on_down: &mut (dyn FnMut(&str) + Send),
        stop: impl std::future::Future<Output = ()>,
    ) -> WatchEnd {
        let mut reported: BTreeSet<String> = BTreeSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return WatchEnd::Signalled,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Ok(records) = journal::load(dir) else {
                continue;
            };
            let services: Vec<&Record> = records
                .values()
                .filter(|r| r.service && !is_allocation(r) && r.handle.is_some())
                .collect();
            if !services.is_empty() && services.iter().all(|r| r.status == Status::Stopped) {
                return WatchEnd::StoppedElsewhere;
            }
            for r in services {
                if r.status != Status::Done || reported.contains(&r.id) {
                    continue;
                }
                if let Some(h) = super::proc_handle(r) {
                    if !matches!(backend.status(&h).await, Ok(ProcState::Running)) {
                        on_down(&r.id);
                        reported.insert(r.id.clone());
                    }
                }
            }
        }
    }
}
