//! Looking at a deployment from its journal alone: each task's recorded state with a live
//! check of its process ([`Session::status`]), what a resume would do
//! ([`Session::resume_decisions`]), and a task's log ([`Session::logs`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prl_flow_backend::ProcState;
use prl_flow_engine::{decide, Decision, Record, Status};

use super::{is_allocation, read_records, Error, Loaded, Result, Session};
use crate::exec::{build_graph, Exec};

/// What a live check of a task found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its process runs.
    Up,
    /// A service that should run does not.
    Down,
    /// Nothing to check (no process, a one-shot that ended, an allocation).
    NotApplicable,
    /// The backend could not say (a plugin that died, hung or wrote nonsense): the detail
    /// says why.
    Unknown,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::NotApplicable => "-",
            Self::Unknown => "?",
        }
    }
}

/// One task of `status`.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub record: Record,
    pub live: Liveness,
    pub detail: String,
}

impl Session {
    /// Every task the journal of `dir` records, in the order they started, each checked live.
    pub async fn status(&self, dir: &Path) -> Result<Vec<TaskRow>> {
        let records = read_records(dir)?;
        let mut rows: Vec<&Record> = records.values().collect();
        rows.sort_by_key(|r| (r.started_ms.is_none(), r.seq, r.id.clone()));
        let backend = self
            .registry()
            .for_records(rows.iter().copied())
            .map_err(Error::Usage)?;
        let exec = Exec::new(backend, dir, Vec::new());
        exec.prime(&records);
        let mut out = Vec::new();
        for r in rows {
            let (live, detail) = liveness(&exec, r).await;
            let detail = detail
                .or_else(|| {
                    r.error
                        .as_ref()
                        .map(|e| e.lines().next().unwrap_or("").to_string())
                })
                .unwrap_or_default();
            out.push(TaskRow {
                record: r.clone(),
                live,
                detail,
            });
        }
        Ok(out)
    }

    /// What `run --resume` of `loaded` would do now with the journal of `dir`, per task in
    /// the order it would run: (id, decision).
    pub async fn resume_decisions(
        &self,
        loaded: &Loaded,
        dir: &Path,
    ) -> Result<Vec<(String, Decision)>> {
        let records = read_records(dir)?;
        let backend = self
            .registry()
            .for_records(records.values())
            .map_err(Error::Usage)?;
        let exec = Arc::new(Exec::new(backend, dir, loaded.plan.nodes.clone()));
        exec.prime(&records);
        let graph = build_graph(&loaded.plan, &exec).map_err(|e| loaded.graph_problems(e))?;
        let d = decide(&graph, Some(&records)).await;
        Ok(graph
            .topo()
            .iter()
            .map(|&i| (graph.task(i).id().to_string(), d[i].clone()))
            .collect())
    }

    /// Writes a task's log to `out` (and, with `follow`, what is appended, until the task
    /// ends or `stop` resolves).
    pub async fn logs(
        &self,
        dir: &Path,
        task: &str,
        follow: bool,
        out: &mut (dyn FnMut(&str) + Send),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let records = read_records(dir)?;
        let Some(r) = records.get(task) else {
            return Err(unknown_task(task, dir, &records));
        };
        let Some(h) = &r.handle else {
            return Err(Error::Usage(format!(
                "error: task `{}` has no log: it never started a process (status: {})",
                r.id,
                r.status.as_str()
            )));
        };
        let backend = self.registry().for_record(r).map_err(Error::Usage)?;
        let failed = |e: prl_flow_backend::BackendError| Error::Failed(format!("error: {e}"));
        let h = &prl_flow_backend::ProcHandle::try_from(h).map_err(failed)?;
        let (text, mut offset) = backend.read_log(h, 0).await.map_err(failed)?;
        out(&text);
        if !follow {
            return Ok(());
        }
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = &mut stop => return Ok(()),
            }
            let (more, next) = backend.read_log(h, offset).await.map_err(failed)?;
            out(&more);
            offset = next;
            if !matches!(backend.status(h).await, Ok(ProcState::Running)) {
                let (rest, _) = backend.read_log(h, offset).await.unwrap_or_default();
                out(&rest);
                return Ok(());
            }
        }
    }
}

fn unknown_task(task: &str, dir: &Path, records: &BTreeMap<String, Record>) -> Error {
    let ids: Vec<&str> = records.keys().map(String::as_str).collect();
    let hint = match crate::diag::did_you_mean(task, ids.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("tasks: {}", ids.join(", ")),
    };
    Error::Usage(format!(
        "error: no task `{task}` in `{}`\n  help: {hint}",
        dir.display()
    ))
}

/// (up / down / -, a detail) for a record.
async fn liveness(exec: &Exec, r: &Record) -> (Liveness, Option<String>) {
    // An allocation is no process; a record without a (readable) handle has none to check.
    let Some(h) = super::proc_handle(r).filter(|_| !is_allocation(r)) else {
        return (Liveness::NotApplicable, None);
    };
    let state = exec.backend.status(&h).await;
    let on = r
        .meta
        .get("node")
        .and_then(|n| n.as_str())
        .map(|n| format!(" on {n}"))
        .unwrap_or_default();
    let should_run = r.service && matches!(r.status, Status::Done | Status::Running);
    match state {
        Ok(ProcState::Running) => {
            // A process says its pid; a SLURM job step its step id.
            let pid = exec.backend.describe(&h);
            if !r.service {
                return (Liveness::Up, Some(format!("running, {pid}{on}")));
            }
            match crate::exec::recorded_readiness(&r.meta) {
                Some(ready) => {
                    let log = exec.log_path(&r.id);
                    match exec.probe_once(&ready.probe, ready.timeout, &log).await {
                        Ok(()) => (Liveness::Up, Some(format!("ready, {pid}{on}"))),
                        Err(e) => (Liveness::Up, Some(format!("not ready: {e}"))),
                    }
                }
                None => (Liveness::Up, Some(format!("{pid}{on}"))),
            }
        }
        Ok(ProcState::Exited(code)) if should_run => (
            Liveness::Down,
            Some(match code {
                Some(c) => format!("exited with status {c}"),
                None => "killed by a signal".into(),
            }),
        ),
        Ok(ProcState::Gone) if should_run => (Liveness::Down, Some("the process is gone".into())),
        Ok(ProcState::Exited(Some(c))) if !r.service => {
            (Liveness::NotApplicable, Some(format!("exit {c}")))
        }
        Err(e) => (
            Liveness::Unknown,
            Some(e.message.lines().next().unwrap_or_default().to_string()),
        ),
        _ => (Liveness::NotApplicable, None),
    }
}
