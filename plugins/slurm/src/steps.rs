//! Tasks as job steps: starting one with `srun` (and knowing it once its wrapper names it),
//! checking steps with one `squeue` per job for many callers, waiting, stopping one step,
//! and finding a step whose handle never reached the journal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prl_flow_backend::{BackendError, ProcHandle, ProcState, SpawnSpec, LOG_MARK};
use tokio::sync::{oneshot, watch};

use crate::handles::{
    ended_state, parse_step, read_job_file, read_step_file, seal, step_file_attempt, step_name,
    StepHandle,
};
use crate::slurm::Cluster;
use crate::templates::SrunVars;
use crate::wrapper::wrap;
use crate::{ExitWatch, SlurmBackend, FAST_POLL, STATUS_FILE, STEP_FILE};

/// Running steps of a job, as one `squeue` answered, and when it was asked.
pub(crate) struct StepTable {
    asked: Instant,
    steps: Arc<BTreeMap<String, String>>,
}

impl SlurmBackend {
    pub(crate) fn child(&self, step: &str) -> Option<ExitWatch> {
        self.children.lock().ok()?.get(step).cloned()
    }

    pub(crate) fn started_at(&self, step: &str) -> Option<Instant> {
        self.started.lock().ok()?.get(step).copied()
    }

    /// The running steps of `job`, from an answer asked for no earlier than `not_before`
    /// and younger than half a poll interval. One query at a time: callers that arrive
    /// while one runs get its answer.
    async fn steps_of(
        &self,
        cluster: &Cluster,
        job: &str,
        not_before: Option<Instant>,
    ) -> Result<Arc<BTreeMap<String, String>>, BackendError> {
        let ttl = self.config.poll / 2;
        let key = (cluster.clone(), job.to_string());
        let mut tables = self.tables.lock().await;
        if let Some(t) = tables.get(&key) {
            if not_before.map_or(true, |nb| t.asked >= nb) && t.asked.elapsed() < ttl {
                return Ok(t.steps.clone());
            }
        }
        let asked = Instant::now();
        let steps = Arc::new(cluster.steps(&[job.to_string()]).await?);
        tables.insert(
            key,
            StepTable {
                asked,
                steps: steps.clone(),
            },
        );
        Ok(steps)
    }

    /// How a step stands. `fresh`: from a `squeue` asked now, not a cached answer.
    pub(crate) async fn step_state(
        &self,
        h: &StepHandle,
        fresh: bool,
    ) -> Result<ProcState, BackendError> {
        if let Some(rx) = self.child(&h.step) {
            let ended = rx.borrow().clone();
            return Ok(match ended {
                Some(srun) => ended_state(h, Some(srun)),
                None => ProcState::Running,
            });
        }
        let not_before = if fresh {
            Some(Instant::now())
        } else {
            self.started_at(&h.step)
        };
        let steps = self.steps_of(&h.slurm, &h.job, not_before).await?;
        if steps.contains_key(&h.step) {
            Ok(ProcState::Running)
        } else {
            Ok(ended_state(h, None))
        }
    }

    pub(crate) async fn spawn_step(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        let Some(node) = &spec.node else {
            return Err(no_node(spec));
        };
        if spec.argv.is_empty() {
            return Err(BackendError::new(format!(
                "task `{}` has an empty command",
                spec.task
            )));
        }
        let alloc = self.current_alloc().ok_or_else(|| {
            BackendError::new(
                "no SLURM allocation is known to this run: the `allocate` task must run first",
            )
        })?;
        let host = alloc.nodes.get(node).cloned().ok_or_else(|| {
            BackendError::new(format!(
                "node `{node}` is not part of the allocation (job {}: {})",
                alloc.job,
                alloc.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;

        let log = prl_flow_backend::prepare_run_dir(spec)?;
        {
            use std::io::Write as _;
            let mut l = &log;
            let _ = writeln!(
                l,
                "{LOG_MARK}`{}` starts as a step of job {} on {host} ──",
                spec.task, alloc.job
            );
        }
        let step_file = spec.run_dir.join(STEP_FILE);
        let _ = std::fs::remove_file(&step_file);
        let status_file = (!spec.service).then(|| spec.run_dir.join(STATUS_FILE));
        if let Some(f) = &status_file {
            let _ = std::fs::remove_file(f);
        }

        let name = step_name(&spec.task);
        let run_dir = spec.run_dir.to_string_lossy().into_owned();
        let log_path = spec.log.to_string_lossy().into_owned();
        let mut argv = self
            .templates
            .srun(&SrunVars {
                job_id: &alloc.job,
                host: &host,
                step_name: &name,
                run_dir: &run_dir,
                log: &log_path,
                cpus_per_task: alloc.cpus_per_node,
                service: spec.service,
                srun_args: &self.config.srun_args,
            })
            .map_err(BackendError::new)?;
        argv.extend(wrap(
            &self.config.shell,
            self.config.prologue.as_deref(),
            &spec.argv,
            &spec.run_dir,
            spec.cwd.as_deref(),
            spec.service,
            spec.attempt,
        ));
        tracing::debug!(
            "{}: {}",
            spec.task,
            shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default()
        );
        // The GPU slice goes under another name; the wrapper applies it after SLURM's own.
        let env = spec.env.iter().map(|(k, v)| match k.as_str() {
            "CUDA_VISIBLE_DEVICES" => (crate::wrapper::GPU_SLICE_VAR, v.as_str()),
            k => (k, v.as_str()),
        });
        let mut cmd = alloc.slurm.command(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env)
            .current_dir(&spec.run_dir)
            // srun's own messages (`srun: error: ...`) go to the task's log too.
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C at prl-flow's terminal is prl-flow's to
            // handle, and the step must outlive prl-flow.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| BackendError::new(format!("cannot start `{}`: {e}", argv[0])))?;
        let (tx, mut exit) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                // Only a sent kill: the sender is dropped (an `Err` here) once the step runs.
                Ok(()) = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let state = match status {
                Ok(s) => ProcState::Exited(s.code()),
                Err(_) => ProcState::Gone,
            };
            let _ = tx.send(Some(state));
        });

        // The step is ours once its wrapper names it.
        let began = Instant::now();
        let step = loop {
            if let Some((step, _)) = read_step_file(&step_file) {
                break step;
            }
            let ended = exit.borrow_and_update().clone();
            if let Some(state) = ended {
                // A one-shot may have come and gone between two looks.
                if let Some((step, _)) = read_step_file(&step_file) {
                    break step;
                }
                let how = match state {
                    ProcState::Exited(Some(c)) => format!("exited with status {c}"),
                    _ => "was killed".into(),
                };
                return Err(BackendError::new(format!(
                    "srun {how} before the step started (job {}, node {host}): {}",
                    alloc.job,
                    log_tail_of(&spec.log, 5).replace('\n', "; ")
                )));
            }
            if began.elapsed() > self.config.step_timeout {
                let _ = kill_tx.send(());
                return Err(BackendError::new(format!(
                    "the step did not start within {} (job {}, node {host}; `[backend] step_timeout`): {}",
                    humantime::format_duration(self.config.step_timeout),
                    alloc.job,
                    log_tail_of(&spec.log, 5).replace('\n', "; ")
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(FAST_POLL) => {}
                _ = exit.changed() => {}
            }
        };
        let job = step.split('.').next().unwrap_or(&alloc.job).to_string();
        if let Ok(mut c) = self.children.lock() {
            c.insert(step.clone(), exit);
        }
        if let Ok(mut s) = self.started.lock() {
            s.insert(step.clone(), Instant::now());
        }
        let h = StepHandle {
            job,
            step,
            node: Some(node.clone()),
            host,
            name,
            service: spec.service,
            log: spec.log.clone(),
            run_dir: spec.run_dir.clone(),
            status_file,
            slurm: alloc.slurm.clone(),
        };
        seal(&h)
    }

    pub(crate) async fn wait_step(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let h = parse_step(handle)?;
        if let Some(mut rx) = self.child(&h.step) {
            let srun = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| BackendError::new("lost track of srun"))?
                .clone();
            return Ok(ended_state(&h, srun));
        }
        loop {
            match self.step_state(&h, false).await? {
                ProcState::Running => tokio::time::sleep(self.config.poll).await,
                other => return Ok(other),
            }
        }
    }

    pub(crate) async fn stop_step(
        &self,
        handle: &ProcHandle,
        grace: Duration,
    ) -> Result<(), BackendError> {
        let h = parse_step(handle)?;
        // The step is signalled whatever its first look says: its leader may be gone while
        // other processes of the step still run (an engine's workers), and SLURM's signal
        // reaches every process of the step. Signalling a step that has ended is harmless.
        let was = self.step_state(&h, true).await?;
        h.slurm
            .scancel(std::slice::from_ref(&h.step), Some("TERM"))
            .await?;
        if was == ProcState::Running {
            tracing::info!("step {} (`{}`) was running: signalled", h.step, h.name);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.step_state(&h, true).await? != ProcState::Running {
                return Ok(());
            }
        }
        h.slurm
            .scancel(std::slice::from_ref(&h.step), Some("KILL"))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.step_state(&h, true).await? == ProcState::Running {
            if Instant::now() > deadline {
                return Err(BackendError::new(format!(
                    "step {} did not end after SIGKILL",
                    h.step
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    pub(crate) async fn recover_step(
        &self,
        spec: &SpawnSpec,
    ) -> Result<Option<ProcHandle>, BackendError> {
        let Some(node) = &spec.node else {
            return Err(no_node(spec));
        };
        // `run --resume` recovers before it checks anything, so the allocation may not be
        // known yet: the step file names job and node, the state dir's job file the job.
        let alloc = self.current_alloc();
        let cluster = alloc
            .as_ref()
            .map(|a| a.slurm.clone())
            .unwrap_or_else(|| self.cluster.clone());
        let name = step_name(&spec.task);
        let step_file = spec.run_dir.join(STEP_FILE);
        // The wrapper's file, if this attempt wrote it (it names its attempt; another is an
        // earlier attempt's).
        let from_file = (step_file_attempt(&step_file) == Some(spec.attempt))
            .then(|| read_step_file(&step_file))
            .flatten();
        // Else a step of ours by name that runs in the allocation (its wrapper had not
        // written the file yet).
        let found = match from_file {
            Some(f) => Some(f),
            None => {
                let job = alloc.as_ref().map(|a| a.job.clone()).or_else(|| {
                    self.job_file()
                        .ok()
                        .and_then(|f| read_job_file(&f))
                        .map(|(j, _)| j)
                });
                let Some(job) = job else {
                    return Ok(None);
                };
                let steps = cluster.steps(std::slice::from_ref(&job)).await?;
                let host = alloc.as_ref().and_then(|a| a.nodes.get(node).cloned());
                steps
                    .iter()
                    .find(|(_, n)| **n == name)
                    .map(|(id, _)| (id.clone(), host.unwrap_or_default()))
            }
        };
        let Some((step, host)) = found else {
            return Ok(None);
        };
        let host = match alloc.as_ref().and_then(|a| a.nodes.get(node)) {
            Some(h) => h.clone(),
            None if host.is_empty() => cluster.step_node(&step).await.unwrap_or_default(),
            None => host,
        };
        let h = StepHandle {
            job: step.split('.').next().unwrap_or_default().to_string(),
            step,
            node: Some(node.clone()),
            host,
            name,
            service: spec.service,
            log: spec.log.clone(),
            run_dir: spec.run_dir.clone(),
            status_file: (!spec.service).then(|| spec.run_dir.join(STATUS_FILE)),
            slurm: cluster,
        };
        seal(&h).map(Some)
    }
}

pub(crate) fn log_tail_of(path: &Path, lines: usize) -> String {
    prl_flow_backend::tail_lines(path, lines).unwrap_or_default()
}

/// A task without a node is not SLURM's: it runs here, beside the allocation.
fn no_node(spec: &SpawnSpec) -> BackendError {
    BackendError::new(format!(
        "task `{}` has no node: the slurm backend runs tasks as job steps on nodes",
        spec.task
    ))
}
