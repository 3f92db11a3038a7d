//! Running a plan: open the state dir's journal (one run at a time), find what an earlier
//! run left, decide per task whether it runs, is kept or is adopted, then run the graph with
//! the journal recording every event.
//!
//! It is two steps so that a caller can show the decisions before anything starts:
//! [`Session::prepare`] (or [`prepare`] with a backend of the caller's choosing) returns a
//! [`Prepared`] run; [`Prepared::execute`] runs it with the caller's subscribers (progress
//! output) and cancel token (signals), and closes the journal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prl_flow_backend::{Backend, Held, ProcHandle, ProcState, Recorded, SpawnSpec};
use prl_flow_engine::{
    decide, Cancel, Decision, Graph, Journal, Record, Report, RunOptions, Sink, Status, Subscriber,
};

use super::{
    default_state_dir, is_allocation, journal_error, Error, Live, Loaded, Result, Session,
};
use crate::actions::Action;
use crate::exec::{build_graph, Exec};
use crate::plan::Plan;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunSettings {
    /// The state dir; default `.prl-flow/<name>`.
    pub state_dir: Option<PathBuf>,
    /// At most this many tasks at once (default: CPUs + 2 for workflows, 256 for
    /// deployments).
    pub jobs: Option<usize>,
    /// After a failure, go on with everything that does not depend on it.
    pub keep_going: bool,
    /// On failure or cancel, leave the services this run started running.
    pub keep: bool,
    /// Keep what an earlier run did that is still valid; run the rest.
    pub resume: bool,
    /// Who holds the state dir's lock, for another prl-flow's message.
    pub holder: String,
    /// Tasks a resume leaves as they are even when dead (services the healer gave up on):
    /// kept, and left out of their router's registration.
    pub hold: std::collections::BTreeSet<String>,
}

/// A run ready to start: the graph, the journal, and what each task will do.
pub struct Prepared {
    pub exec: Arc<Exec>,
    pub graph: Graph,
    pub decisions: Vec<Decision>,
    pub dir: PathBuf,
    journal: Arc<Journal>,
    previous: Option<BTreeMap<String, Record>>,
    options: RunOptions,
    hold_lock: bool,
}

/// A run that ended.
pub struct Ran {
    pub report: Report,
    pub exec: Arc<Exec>,
    pub dir: PathBuf,
    /// The state dir's lock, still held after the journal closed when the caller asked
    /// ([`Prepared::hold_lock`]), for writing beside it; released when dropped.
    pub lock: Option<nix::fcntl::Flock<std::fs::File>>,
    /// What the run used and no longer needs: its graph, its journal with every record, the
    /// decisions and the records of the run before it.
    _spent: Spent,
}

/// The parts of a [`Prepared`] that nothing reads once it ran: freed with the [`Ran`] that
/// holds them, unless a caller about to exit leaves them to the exit ([`Ran::leave`]).
struct Spent {
    _graph: Graph,
    _journal: Arc<Journal>,
    _decisions: Vec<Decision>,
    _previous: Option<BTreeMap<String, Record>>,
}

impl Ran {
    /// Ends this value without freeing what the run used, for a caller that exits right
    /// after: the many small allocations of a large run (its tasks, its records) take longer
    /// to free one by one (about 20 ms at 10,000 tasks) than the exit takes to drop them all.
    /// The state dir's lock is released first, as a drop would.
    pub fn leave(mut self) {
        drop(self.lock.take());
        std::mem::forget(self);
    }
}

impl Session {
    /// Prepares a run of a loaded file on the backend the registry gives its plan.
    pub async fn prepare(&self, loaded: &Loaded, settings: &RunSettings) -> Result<Prepared> {
        let dir = settings
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&loaded.plan.name));
        let backend = self
            .registry()
            .for_plan(&loaded.plan, &dir)
            .map_err(Error::Usage)?;
        prepare(&loaded.plan, backend, &dir, settings)
            .await
            .map_err(|e| match e {
                PrepareError::Graph(g) => loaded.graph_problems(g),
                PrepareError::Session(s) => s,
            })
    }
}

/// Why a run could not be prepared.
#[derive(Debug)]
pub enum PrepareError {
    /// The plan's graph is not sound (duplicates, unknown needs, cycles).
    Graph(Vec<prl_flow_engine::GraphError>),
    Session(Error),
}

/// Prepares a run of `plan` on `backend` with its state in `dir`.
pub async fn prepare(
    plan: &Plan,
    backend: Arc<dyn Backend>,
    dir: &Path,
    settings: &RunSettings,
) -> std::result::Result<Prepared, PrepareError> {
    let exec = Arc::new(Exec::new(backend.clone(), dir, plan.nodes.clone()));
    let graph = build_graph(plan, &exec).map_err(PrepareError::Graph)?;
    // Every task's fingerprint now, while nothing runs, rather than each at its start.
    for task in graph.tasks() {
        task.fingerprint();
    }
    let holder = if settings.holder.is_empty() {
        format!("prl-flow run {}", plan.name)
    } else {
        settings.holder.clone()
    };
    let journal =
        Journal::open(dir, true, &holder).map_err(|e| PrepareError::Session(journal_error(e)))?;
    // From here on the state dir may change: a no-op resume must take the full path.
    super::noop::forget(dir);
    let mut previous = journal.records();
    recover_missing(backend.clone(), &journal, &mut previous).await;
    if !settings.resume {
        let mut live = live_work(backend.as_ref(), &previous).await;
        if live.is_empty() {
            live = stop_leftovers(backend.as_ref(), &previous).await;
        }
        if !live.is_empty() {
            return Err(PrepareError::Session(Error::LiveServices {
                dir: dir.to_path_buf(),
                ids: live,
            }));
        }
        journal.reset();
    } else {
        for id in prl_flow_engine::recover_handles(&graph, &mut previous).await {
            if let Some(h) = previous.get(&id).and_then(|r| r.handle.clone()) {
                journal.update(&id, |r| r.handle = Some(h));
            }
        }
    }
    // Nothing has started yet: a journal that cannot be written is bad input, not a run.
    if let Some(why) = journal.failure() {
        return Err(PrepareError::Session(Error::Usage(format!(
            "error: {why}\n  help: nothing was started; make room in `{}` or pass another `--state-dir`",
            dir.display()
        ))));
    }
    exec.prime(&previous);
    let previous = settings.resume.then_some(previous);
    let mut decisions = decide(&graph, previous.as_ref()).await;
    if previous.is_some() {
        for (t, d) in graph.tasks().iter().zip(decisions.iter_mut()) {
            if settings.hold.contains(t.id()) {
                *d = Decision::Keep;
            }
        }
        exec.set_held(settings.hold.iter().cloned());
        exec.set_reruns(
            graph
                .tasks()
                .iter()
                .zip(&decisions)
                .filter(|(_, d)| matches!(d, Decision::Run(_)))
                .map(|(t, _)| t.id().to_string()),
        );
    }
    if settings.resume {
        let starting = graph.tasks().iter().zip(&decisions);
        exec.set_resume_scope(
            starting
                .filter(|(_, d)| matches!(d, Decision::Run(_)))
                .map(|(t, _)| t.id().to_string())
                .collect(),
        );
    }
    let is_deployment = !plan.nodes.is_empty();
    let options = RunOptions {
        jobs: settings.jobs.unwrap_or(if is_deployment {
            256
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                + 2
        }),
        keep_going: settings.keep_going,
        keep: settings.keep,
    };
    Ok(Prepared {
        exec,
        graph,
        decisions,
        dir: dir.to_path_buf(),
        journal: Arc::new(journal),
        previous,
        options,
        hold_lock: false,
    })
}

impl Prepared {
    /// The journal, e.g. to flush it from a signal handler before exiting at once.
    pub fn journal(&self) -> Arc<Journal> {
        self.journal.clone()
    }

    /// Makes [`Prepared::execute`] keep the state dir's lock past the journal's close, in
    /// [`Ran::lock`], until the caller drops it.
    pub fn hold_lock(&mut self) {
        self.hold_lock = true;
    }

    /// Each task's id with what it will do.
    pub fn named_decisions(&self) -> BTreeMap<String, Decision> {
        self.graph
            .tasks()
            .iter()
            .zip(&self.decisions)
            .map(|(t, d)| (t.id().to_string(), d.clone()))
            .collect()
    }

    /// Runs the graph; the journal records every event, `subscribers` see them too.
    pub async fn execute(
        self,
        subscribers: Vec<Arc<dyn Subscriber>>,
        cancel: Cancel,
    ) -> Result<Ran> {
        if let Err(why) = self.preflight_resume().await {
            let _ = self.journal.close();
            return Err(Error::Failed(format!("error: {why}")));
        }
        let mut subs: Vec<Arc<dyn Subscriber>> = vec![self.journal.recorder(&self.graph)];
        subs.extend(subscribers);
        let report = prl_flow_engine::run(
            &self.graph,
            &self.decisions,
            self.previous.as_ref(),
            &self.options,
            Sink::new(subs),
            cancel,
        )
        .await;
        // Closed here, whoever else holds the journal (a signal handler): its errors are
        // this run's, and must not wait for a drop that may never come.
        let lock = if self.hold_lock {
            self.journal.keep_lock()
        } else {
            None
        };
        let closed = self.journal.close();
        if let Some(why) = &report.broken {
            return Err(Error::Failed(broken_run(&self.dir, why)));
        }
        closed.map_err(journal_error)?;
        Ok(Ran {
            report,
            exec: self.exec,
            dir: self.dir,
            lock,
            _spent: Spent {
                _graph: self.graph,
                _journal: self.journal,
                _decisions: self.decisions,
                _previous: self.previous,
            },
        })
    }
}

impl Prepared {
    /// A resume that keeps the allocation skips `allocate`'s preflight: the programs of the
    /// tasks it will start are checked here instead, before anything starts.
    async fn preflight_resume(&self) -> std::result::Result<(), String> {
        let decisions = self.named_decisions();
        let allocation_kept = self.graph.tasks().iter().any(|t| {
            Action::of_kind(t.kind()) == Some(Action::Allocate)
                && !matches!(decisions.get(t.id()), Some(Decision::Run(_)))
        });
        if self.previous.is_none() || !allocation_kept {
            return Ok(());
        }
        self.exec.preflight_resume().await
    }
}

/// The message of a run stopped because its journal could not be written.
fn broken_run(dir: &Path, why: &str) -> String {
    format!(
        "error: the run stopped: {why}\n  \
         a start is recorded before it is made, so nothing unrecorded was started; nothing \
         more was started, and everything this run had started was stopped\n  \
         help: make room in `{}` (or pass another `--state-dir`), then run again",
        dir.display()
    )
}

/// What to ask the backend's `recover` for a record of a start without a handle (`None`
/// for any other record): the attempt's run dir and log, as its spawn had them. Such a
/// record is left `running` when prl-flow was killed between a start and its record, and
/// ended (failed, timed out, cancelled) when the backend's answer to the start was lost.
pub(crate) fn recovery_spec(paths: &Exec, r: &Record) -> Option<SpawnSpec> {
    let started = matches!(
        r.status,
        Status::Running | Status::Failed | Status::TimedOut | Status::Cancelled
    ) && r.started_ms.is_some();
    if !started || r.handle.is_some() || Action::of_kind(&r.kind).is_some() {
        return None;
    }
    Some(SpawnSpec {
        task: r.id.clone(),
        node: r
            .meta
            .get("node")
            .and_then(|n| n.as_str())
            .map(String::from),
        run_dir: paths.run_dir(&r.id),
        log: paths.log_path(&r.id),
        service: r.service,
        attempt: r.started_ms.unwrap_or(0),
        ..Default::default()
    })
}

/// Fills in the handles of records of a start without one from what the backend finds of
/// that attempt ([`recovery_spec`]: its run dir, or a plugin asked by the attempt's id), and
/// records them, so that nothing started is invisible to a fresh run's check for live
/// services, to `down`, or to `status`.
pub(crate) async fn recover_missing(
    backend: Arc<dyn Backend>,
    journal: &Journal,
    records: &mut BTreeMap<String, Record>,
) {
    let paths = Exec::new(backend.clone(), journal.dir(), Vec::new());
    for r in records.values_mut() {
        let Some(spec) = recovery_spec(&paths, r) else {
            continue;
        };
        if let Ok(Some(h)) = backend.recover(&spec).await {
            r.handle = Some(h.clone().into());
            journal.update_now(&r.id, |rec| rec.handle = Some(h.into()));
        }
    }
}

/// Stops what is left of the earlier run's services whose leaders have ended (a crashed
/// server's workers), which a fresh run would otherwise forget with the journal: one
/// teardown, last started first, as `down` does (on SLURM, one `scancel` per job). What
/// could not be stopped, by id with why, for the refusal.
async fn stop_leftovers(backend: &dyn Backend, records: &BTreeMap<String, Record>) -> Vec<Live> {
    let mut services: Vec<&Record> = records
        .values()
        .filter(|r| r.service && r.status != Status::Stopped && !is_allocation(r))
        .collect();
    services.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let items: Vec<Recorded> = services
        .into_iter()
        .filter_map(|r| {
            Some(Recorded {
                id: r.id.clone(),
                held: Held::Process(super::proc_handle(r)?),
            })
        })
        .collect();
    if items.is_empty() {
        return Vec::new();
    }
    backend
        .teardown(&items, crate::exec::STOP_GRACE, None)
        .await
        .into_iter()
        .filter_map(|s| {
            let why = s.error?;
            Some(Live {
                entry: format!(
                    "{} (its backend could not stop what is left of it: {why})",
                    s.id
                ),
                unsure: true,
            })
        })
        .collect()
}

/// How many records [`live_work`] asks the backend about at once: each ask of a remote
/// backend is a round trip, and a state dir may hold many failed one-shots.
const LIVE_ASKS: usize = 16;

/// What an earlier run left that still runs, by id: services alive, one-shots still in
/// flight (a killed run's; a fresh run would start them a second time while they run), and
/// what the backend cannot say of. The records are asked about [`LIVE_ASKS`] at once, and
/// named in their order.
async fn live_work(backend: &dyn Backend, records: &BTreeMap<String, Record>) -> Vec<Live> {
    let asked: Vec<(&Record, ProcHandle)> = records
        .values()
        .filter(|r| {
            // What failed, timed out or was cancelled is stopped then, but a stop that could
            // not reach it leaves it recorded so; a one-shot that ran to its end has ended.
            let may_run = r.status != Status::Stopped && (r.service || r.status != Status::Done);
            may_run && !is_allocation(r)
        })
        .filter_map(|r| Some((r, super::proc_handle(r)?)))
        .collect();
    let mut live = Vec::new();
    for some in asked.chunks(LIVE_ASKS) {
        let states = futures::future::join_all(some.iter().map(|(_, h)| backend.status(h))).await;
        for ((r, _), state) in some.iter().zip(states) {
            // A backend that cannot tell (a host that does not answer) is no proof that
            // nothing runs: a fresh run would forget what may still be there.
            match state {
                Ok(ProcState::Running) => live.push(Live {
                    entry: if r.service {
                        r.id.clone()
                    } else {
                        format!("{} (a one-shot, still running)", r.id)
                    },
                    unsure: false,
                }),
                Ok(_) => {}
                Err(e) => live.push(Live {
                    entry: format!(
                        "{} (its backend could not tell whether it still runs: {})",
                        r.id, e.message
                    ),
                    unsure: true,
                }),
            }
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Command, TaskSpec};
    use prl_flow_backend::{Allocation, BackendError};
    use std::time::Duration;

    /// A run left to the exit ([`Ran::leave`]) still gives the state dir's lock back: what
    /// it holds is not freed, but another run in this process may take the state dir.
    #[tokio::test]
    async fn a_run_left_to_the_exit_releases_the_state_dirs_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = Plan {
            name: "leave".into(),
            tasks: vec![TaskSpec {
                id: "a".into(),
                kind: "custom".into(),
                command: Command::Shell {
                    script: "true".into(),
                },
                ..TaskSpec::default()
            }],
            ..Plan::default()
        };
        let backend: Arc<dyn Backend> = Arc::new(prl_flow_local::LocalBackend::new());
        let mut prepared = prepare(&plan, backend, dir.path(), &RunSettings::default())
            .await
            .unwrap_or_else(|e| panic!("no run: {e:?}"));
        prepared.hold_lock();
        let ran = prepared
            .execute(Vec::new(), Cancel::never())
            .await
            .unwrap_or_else(|e| panic!("the run: {e:?}"));
        assert!(ran.report.ok(), "{:#?}", ran.report.errors);
        assert!(ran.lock.is_some(), "the lock is held after the run");
        assert!(
            prl_flow_engine::journal::lock(dir.path(), "other").is_err(),
            "held: another cannot take it"
        );
        ran.leave();
        prl_flow_engine::journal::lock(dir.path(), "other").expect("released by leave");
    }

    /// A backend whose every `status` waits until two are asked at once.
    struct Together(tokio::sync::Barrier);

    #[async_trait::async_trait]
    impl Backend for Together {
        fn name(&self) -> &str {
            "together"
        }
        async fn allocate(&self, _: &[String]) -> std::result::Result<Allocation, BackendError> {
            Err(BackendError::new("no"))
        }
        async fn release(&self, _: &Allocation) -> std::result::Result<(), BackendError> {
            Ok(())
        }
        async fn spawn(&self, _: &SpawnSpec) -> std::result::Result<ProcHandle, BackendError> {
            Err(BackendError::new("no"))
        }
        async fn status(&self, h: &ProcHandle) -> std::result::Result<ProcState, BackendError> {
            self.0.wait().await;
            match h.open::<String>("together")?.as_str() {
                "a" => Ok(ProcState::Running),
                _ => Err(BackendError::new("no answer")),
            }
        }
        async fn wait(&self, _: &ProcHandle) -> std::result::Result<ProcState, BackendError> {
            Ok(ProcState::Gone)
        }
        async fn stop(&self, _: &ProcHandle, _: Duration) -> std::result::Result<(), BackendError> {
            Ok(())
        }
        async fn log_tail(
            &self,
            _: &ProcHandle,
            _: usize,
        ) -> std::result::Result<String, BackendError> {
            Ok(String::new())
        }
        async fn read_log(
            &self,
            _: &ProcHandle,
            o: u64,
        ) -> std::result::Result<(String, u64), BackendError> {
            Ok((String::new(), o))
        }
    }

    /// The failed one-shots of an earlier run are asked about together, not one round trip
    /// after the other, and named in their order with what their backend said.
    #[tokio::test]
    async fn a_fresh_run_asks_about_an_earlier_runs_work_together() {
        let mut records = BTreeMap::new();
        for id in ["a", "b"] {
            let mut r = prl_flow_engine::testing::record(id, Status::Failed, "f");
            let h = ProcHandle::new("together", ProcHandle::VERSION, &id).expect("handle");
            r.handle = Some(h.into());
            records.insert(id.to_string(), r);
        }
        let backend = Together(tokio::sync::Barrier::new(2));
        let live = tokio::time::timeout(Duration::from_secs(30), live_work(&backend, &records))
            .await
            .expect("the two were asked at once: asked one after the other, neither answers");
        assert_eq!(
            live,
            vec![
                Live {
                    entry: "a (a one-shot, still running)".into(),
                    unsure: false,
                },
                Live {
                    entry: "b (its backend could not tell whether it still runs: no answer)".into(),
                    unsure: true,
                },
            ]
        );
    }
}
