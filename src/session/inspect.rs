//! Looking at a deployment from its journal alone: each task's recorded state with a live
//! check of its process ([`Session::status`]), what a resume would do
//! ([`Session::resume_decisions`]), a task's log ([`Session::logs`]), the state of a whole
//! deployment ([`Overall`]) and every state dir under a directory ([`Session::list`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// The state of a deployment or workflow as a whole, from its tasks' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overall {
    /// Every service that should run is up.
    Up,
    /// Some of them are up, not all.
    PartlyUp,
    /// None runs (stopped, or dead).
    Down,
    /// A task failed or timed out.
    Failed,
    /// A workflow without services whose tasks are all done.
    Done,
}

impl Overall {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::PartlyUp => "partly up",
            Self::Down => "down",
            Self::Failed => "failed",
            Self::Done => "done",
        }
    }

    /// The same rows `status` shows, summed up: a failed task makes it `failed`; else the
    /// services that should run decide (all up, some, none); else `done` when every task is.
    pub fn of(rows: &[TaskRow]) -> Self {
        if rows
            .iter()
            .any(|r| matches!(r.record.status, Status::Failed | Status::TimedOut))
        {
            return Self::Failed;
        }
        let should_run: Vec<&TaskRow> = rows
            .iter()
            .filter(|r| {
                r.record.service
                    && !is_allocation(&r.record)
                    && matches!(r.record.status, Status::Done | Status::Running)
            })
            .collect();
        if !should_run.is_empty() {
            let up = should_run.iter().filter(|r| r.live == Liveness::Up).count();
            return match up {
                0 => Self::Down,
                n if n == should_run.len() => Self::Up,
                _ => Self::PartlyUp,
            };
        }
        let all_done = rows
            .iter()
            .all(|r| matches!(r.record.status, Status::Done | Status::Skipped));
        if all_done && !rows.iter().any(|r| r.record.service) && !rows.is_empty() {
            Self::Done
        } else {
            Self::Down
        }
    }
}

/// One state dir of [`Session::list`].
#[derive(Debug, Clone)]
pub struct Listed {
    pub dir: PathBuf,
    /// The file it belongs to, when a run recorded one.
    pub file: Option<PathBuf>,
    /// Its state, or why it could not be read.
    pub state: std::result::Result<Overall, String>,
    /// Where it answers, when a run brought it up.
    pub endpoint: Option<String>,
}

impl Session {
    /// Every state dir under `root` (`.prl-flow/`) with a journal, by name, each with its
    /// file, its state (as [`Overall::of`] its status) and its endpoint.
    pub async fn list(&self, root: &Path) -> Vec<Listed> {
        let dirs = super::state_dirs(root);
        let mut out = Vec::new();
        for dir in dirs {
            let identity = super::identity::read(&dir);
            let state = match self.status(&dir).await {
                Ok(rows) => Ok(Overall::of(&rows)),
                Err(Error::Usage(m) | Error::Failed(m)) => Err(m
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ")
                    .into()),
                Err(_) => Err("cannot be read".into()),
            };
            out.push(Listed {
                dir,
                file: identity.as_ref().map(|i| i.file.clone()),
                endpoint: identity.and_then(|i| i.endpoint),
                state,
            });
        }
        out
    }

    /// Every task the journal of `dir` records, in the order they started, each checked live.
    pub async fn status(&self, dir: &Path) -> Result<Vec<TaskRow>> {
        let (records, exec) = self.records_found(dir).await?;
        let mut rows: Vec<&Record> = records.values().collect();
        rows.sort_by_key(|r| (r.started_ms.is_none(), r.seq, r.id.clone()));
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

    /// The records of `dir`, with the handle of each start that is not on file (prl-flow
    /// was killed in between, or the journal has not yet written it) found as `down` and
    /// `run` find it, without writing it down: the commands that only read see what runs.
    async fn records_found(&self, dir: &Path) -> Result<(BTreeMap<String, Record>, Exec)> {
        let mut records = read_records(dir)?;
        let backend = self
            .registry()
            .for_records(records.values())
            .map_err(Error::Usage)?;
        let exec = Exec::new(backend, dir, Vec::new());
        exec.prime(&records);
        for r in records.values_mut() {
            if let Some(spec) = super::run::recovery_spec(&exec, r) {
                if let Ok(Some(h)) = exec.backend.recover(&spec).await {
                    r.handle = Some(h.into());
                }
            }
        }
        Ok((records, exec))
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
        let (records, _) = self.records_found(dir).await?;
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

impl Session {
    /// Writes every task's log to `out`, each line prefixed by `TASK | ` (ids padded to one
    /// width): the tasks in the order they started, each log whole; with `follow`, then what
    /// any of them appends, line by line as it comes, until none runs or `stop` resolves.
    pub async fn logs_all(
        &self,
        dir: &Path,
        follow: bool,
        out: &mut (dyn FnMut(&str) + Send),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let (records, _) = self.records_found(dir).await?;
        let mut with_log: Vec<&Record> = records
            .values()
            .filter(|r| r.handle.is_some() && !is_allocation(r))
            .collect();
        with_log.sort_by_key(|r| (r.started_ms.is_none(), r.seq, r.id.clone()));
        if with_log.is_empty() {
            return Err(Error::Usage(format!(
                "error: no task in `{}` has a log: none started a process",
                dir.display()
            )));
        }
        let width = with_log.iter().map(|r| r.id.len()).max().unwrap_or(0);
        let failed = |e: prl_flow_backend::BackendError| Error::Failed(format!("error: {e}"));
        let mut tails = Vec::new();
        for r in with_log {
            let backend = self.registry().for_record(r).map_err(Error::Usage)?;
            let Some(h) = super::proc_handle(r) else {
                continue;
            };
            tails.push(Tail {
                prefix: format!("{:<width$} | ", r.id),
                backend,
                handle: h,
                offset: 0,
                partial: String::new(),
            });
        }
        for t in &mut tails {
            let (text, next) = t.backend.read_log(&t.handle, 0).await.map_err(failed)?;
            t.offset = next;
            t.push(&text, out);
            if !follow {
                t.flush(out);
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::pin!(stop);
        loop {
            let mut running = 0;
            for t in &mut tails {
                let (more, next) = t
                    .backend
                    .read_log(&t.handle, t.offset)
                    .await
                    .map_err(failed)?;
                t.offset = next;
                t.push(&more, out);
                if matches!(t.backend.status(&t.handle).await, Ok(ProcState::Running)) {
                    running += 1;
                } else {
                    // Ended: what it wrote last, then its unfinished line.
                    let (rest, next) = t
                        .backend
                        .read_log(&t.handle, t.offset)
                        .await
                        .unwrap_or_default();
                    t.offset = t.offset.max(next);
                    t.push(&rest, out);
                    t.flush(out);
                }
            }
            if running == 0 {
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = &mut stop => {
                    for t in &mut tails {
                        t.flush(out);
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// One task's log being read for [`Session::logs_all`]: whole lines are written with the
/// task's prefix; a line not yet ended waits for the rest.
struct Tail {
    prefix: String,
    backend: Arc<dyn prl_flow_backend::Backend>,
    handle: prl_flow_backend::ProcHandle,
    offset: u64,
    partial: String,
}

impl Tail {
    fn push(&mut self, text: &str, out: &mut (dyn FnMut(&str) + Send)) {
        self.partial.push_str(text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            out(&format!("{}{line}", self.prefix));
        }
    }

    fn flush(&mut self, out: &mut (dyn FnMut(&str) + Send)) {
        if !self.partial.is_empty() {
            out(&format!(
                "{}{}\n",
                self.prefix,
                std::mem::take(&mut self.partial)
            ));
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
                    match exec
                        .probe_once(Some(&h), &ready.probe, ready.timeout, &log)
                        .await
                    {
                        Ok(()) => (Liveness::Up, Some(format!("ready, {pid}{on}"))),
                        // It was ready once: a service that is no longer ready (hung, or
                        // a router that lost its workers) is not up.
                        Err(e) if r.status == Status::Done => (
                            Liveness::Down,
                            Some(format!("runs ({pid}{on}) but is no longer ready: {e}")),
                        ),
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
