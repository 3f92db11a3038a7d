//! Tasks as job steps: starting one through the allocation's agent (and knowing it once
//! its dispatcher names it), checking steps with one `squeue` per job for many callers,
//! waiting, stopping one task (a step of its own with `scancel`, one task of a shared step by
//! signalling its command on its node), and finding a step whose handle never reached the
//! journal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prl_flow_backend::{BackendError, ProcHandle, ProcState, SpawnSpec, LOG_MARK};

use crate::handles::{
    ended_state, parse_step, read_job_file, read_status, read_step_file, seal, step_file_of,
    step_name, StepHandle,
};
use crate::launch::{read_request_file, Posted, Queued};
use crate::slurm::Cluster;
use crate::wrapper::write_task_file;
use crate::{SlurmBackend, FAST_POLL, STATUS_FILE, STEP_FILE};

/// How long a request may wait for an agent that does not beat before the spawn fails.
const AGENT_SILENCE: Duration = Duration::from_secs(30);

/// Running steps of a job, as one `squeue` answered, and when it was asked.
pub(crate) struct StepTable {
    asked: Instant,
    steps: Arc<BTreeMap<String, String>>,
}

impl SlurmBackend {
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

    /// How a task stands. `fresh`: from a `squeue` asked now, not a cached answer. A task
    /// whose step runs has ended when its dispatcher wrote its exit status (the step goes on
    /// while other tasks of it run).
    pub(crate) async fn step_state(
        &self,
        h: &StepHandle,
        fresh: bool,
    ) -> Result<ProcState, BackendError> {
        let not_before = if fresh {
            Some(Instant::now())
        } else {
            self.started_at(&h.step)
        };
        let steps = self.steps_of(&h.slurm, &h.job, not_before).await?;
        if steps.contains_key(&h.step) {
            match h.status_file.as_deref().and_then(read_status) {
                Some(code) => Ok(ProcState::Exited(Some(code))),
                None => Ok(ProcState::Running),
            }
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

        let log = prl_flow_backend::prepare_run_dir(spec)?.log;
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
        let status_file = spec.run_dir.join(STATUS_FILE);
        for f in [&step_file, &status_file] {
            let _ = std::fs::remove_file(f);
        }
        write_task_file(spec)?;
        // The task file holds the environment: it never outlives this spawn. The dispatcher
        // removes it when the task starts; a spawn that fails or is cancelled before then
        // removes it here (and a step that starts later finds no task to run).
        let _task_file = RemoveOnDrop(spec.run_dir.join(crate::wrapper::TASK_FILE));
        let agent_dir = self.agent_dir()?;
        let posted = self
            .launcher
            .launch(&alloc, &agent_dir, Queued::new(spec, &host))
            .await?;

        // The step is ours once its dispatcher names it (with this attempt).
        let began = Instant::now();
        let step = loop {
            if let Some(f) = step_file_of(&step_file, spec.attempt) {
                break f.step;
            }
            if posted.exit_file.exists() {
                // A one-shot may have come and gone between two looks.
                match step_file_of(&step_file, spec.attempt) {
                    Some(f) => break f.step,
                    None => return Err(self.never_started(spec, &alloc.job, &host, &posted)),
                }
            }
            if began.elapsed() > self.config.step_timeout {
                return Err(BackendError::new(format!(
                    "the step did not start within {} (job {}, node {host}; `[backend] step_timeout`){}: {}",
                    humantime::format_duration(self.config.step_timeout),
                    alloc.job,
                    agent_note(&agent_dir),
                    log_tail_of(&posted.out, 5).replace('\n', "; ")
                )));
            }
            if began.elapsed() > AGENT_SILENCE
                && crate::agent::heartbeat(&agent_dir)
                    .map_or(true, |(_, _, age)| age > AGENT_SILENCE)
            {
                return Err(BackendError::new(format!(
                    "the allocation's agent is not running (job {}){}: see {}",
                    alloc.job,
                    agent_note(&agent_dir),
                    alloc
                        .log
                        .as_deref()
                        .map(|l| l.display().to_string())
                        .unwrap_or_else(|| "the holder job's log".into())
                )));
            }
            tokio::time::sleep(FAST_POLL).await;
        };
        let job = step.split('.').next().unwrap_or(&alloc.job).to_string();
        if let Ok(mut s) = self.started.lock() {
            s.insert(step.clone(), Instant::now());
        }
        let h = StepHandle {
            job,
            step,
            node: Some(node.clone()),
            host,
            name: step_name(&spec.task),
            service: spec.service,
            log: spec.log.clone(),
            run_dir: spec.run_dir.clone(),
            status_file: Some(status_file),
            slurm: alloc.slurm.clone(),
            tasks: posted.tasks,
        };
        seal(&h)
    }

    pub(crate) async fn wait_step(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let h = parse_step(handle)?;
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
        if h.tasks > 1 {
            return self.stop_task_of_step(&h, grace).await;
        }
        // The step is signalled whatever its first look says: its leader may be gone while
        // other processes of the step still run (an engine's workers), and SLURM's signal
        // reaches every process of the step. Signalling a step that has ended is harmless.
        let was = self.step_state(&h, true).await?;
        if !self.signal_step(&h, "TERM").await? {
            return Ok(());
        }
        if was == ProcState::Running {
            tracing::info!("step {} (`{}`) was running: signalled", h.step, h.name);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !self.step_listed(&h).await? {
                return Ok(());
            }
        }
        if !self.signal_step(&h, "KILL").await? {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.step_listed(&h).await? {
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

    /// Sends `signal` to the step: `Ok(true)` once sent, `Ok(false)` when it could not be
    /// because the step has ended. `scancel --quiet` of a step that has ended fails without
    /// a word, so SLURM's listing decides which a failure was.
    async fn signal_step(&self, h: &StepHandle, signal: &str) -> Result<bool, BackendError> {
        match h
            .slurm
            .scancel(std::slice::from_ref(&h.step), Some(signal))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if self.step_listed(h).await? => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// Whether the step is still listed by a `squeue` asked now.
    async fn step_listed(&self, h: &StepHandle) -> Result<bool, BackendError> {
        Ok(self
            .steps_of(&h.slurm, &h.job, Some(Instant::now()))
            .await?
            .contains_key(&h.step))
    }

    /// Stops one task of a step that carries others: its command (the dispatcher's
    /// children) gets SIGTERM on its node, then, after `grace`, it and everything it
    /// started get SIGKILL; the dispatcher writes the exit status. Each signal is a short
    /// step of its own (`kill` on the node).
    async fn stop_task_of_step(&self, h: &StepHandle, grace: Duration) -> Result<(), BackendError> {
        let ended = |h: &StepHandle| h.status_file.as_deref().and_then(read_status).is_some();
        if ended(h) || !self.step_listed(h).await? {
            return Ok(());
        }
        // The file may be a later attempt's by now: only this step's dispatcher is signalled.
        let pid = read_step_file(&h.run_dir.join(STEP_FILE))
            .filter(|f| f.step == h.step)
            .and_then(|f| f.pid);
        let Some(pid) = pid else {
            return Err(BackendError::new(format!(
                "task `{}` of step {}: its step file names no process of that step",
                h.name, h.step
            )));
        };
        self.signal_task(h, pid, "TERM").await?;
        tracing::info!("task `{}` of step {} signalled", h.name, h.step);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if ended(h) || !self.step_listed(h).await? {
                return Ok(());
            }
        }
        self.signal_task(h, pid, "KILL").await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ended(h) && self.step_listed(h).await? {
            if Instant::now() > deadline {
                return Err(BackendError::new(format!(
                    "task `{}` of step {} did not end after SIGKILL",
                    h.name, h.step
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Sends `signal` to the command of the task whose dispatcher is `pid` on the task's
    /// node: TERM to its children (the command), KILL to all its descendants.
    async fn signal_task(
        &self,
        h: &StepHandle,
        pid: u32,
        signal: &str,
    ) -> Result<(), BackendError> {
        const SCRIPT: &str = r#"sig=$1 top=$2
tree() { for c in $(pgrep -P "$1"); do echo "$c"; tree "$c"; done; }
if [ "$sig" = TERM ]; then pids=$(pgrep -P "$top"); else pids=$(tree "$top"); fi
[ -z "$pids" ] || kill -"$sig" $pids 2>/dev/null
exit 0"#;
        let args: Vec<String> = [
            format!("--jobid={}", h.job),
            "--overlap".into(),
            format!("--nodelist={}", h.host),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            format!("--job-name=pf-signal:{}", h.name.trim_start_matches("pf:")),
            "--input=none".into(),
            "sh".into(),
            "-c".into(),
            SCRIPT.into(),
            "prl-flow-signal".into(),
            signal.into(),
            pid.to_string(),
        ]
        .into_iter()
        .collect();
        let (ok, _, err) = h.slurm.output("srun", &args).await?;
        if !ok {
            return Err(BackendError::new(format!(
                "cannot signal task `{}` of step {} on {}: {}",
                h.name,
                h.step,
                h.host,
                err.trim()
            )));
        }
        Ok(())
    }

    /// Why a task's step never started: the `srun`'s own words, and the task's log.
    fn never_started(
        &self,
        spec: &SpawnSpec,
        job: &str,
        host: &str,
        posted: &Posted,
    ) -> BackendError {
        let how = std::fs::read_to_string(&posted.exit_file).unwrap_or_default();
        let how = match how.trim() {
            "lost" => {
                "was lost by the allocation's agent (it restarted while taking it)".to_string()
            }
            "gone" => "ended unseen".to_string(),
            s if s.starts_with("signal") => format!("was killed ({s})"),
            s => format!("exited with status {s}"),
        };
        let mut words = log_tail_of(&posted.out, 5);
        if words.trim().is_empty() {
            words = log_tail_of(&spec.log, 5);
        }
        BackendError::new(format!(
            "srun {how} before the step started (job {job}, node {host}): {}",
            words.replace('\n', "; ")
        ))
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
        let request = read_request_file(&spec.run_dir).filter(|r| r.attempt == spec.attempt);
        let tasks = request.as_ref().map_or(1, |r| r.tasks);
        let read_own = || step_file_of(&step_file, spec.attempt).map(|f| (f.step, f.node));
        // The dispatcher's file, if this attempt wrote it (it names its attempt; another is
        // an earlier attempt's). A step requested for this attempt whose task has not
        // started yet (its task file is still there) may still start: it is waited for,
        // never started twice.
        let mut from_file = read_own();
        if from_file.is_none() {
            if let (Some(r), Ok(agent_dir)) = (&request, self.agent_dir()) {
                let exit = agent_dir
                    .join(crate::agent::WORK)
                    .join(format!("{}.exit", r.id));
                let task_file = spec.run_dir.join(crate::wrapper::TASK_FILE);
                let began = Instant::now();
                while from_file.is_none()
                    && task_file.exists()
                    && !exit.exists()
                    && began.elapsed() < self.config.step_timeout
                {
                    tokio::time::sleep(FAST_POLL).await;
                    from_file = read_own();
                }
                from_file = from_file.or_else(read_own);
            }
        }
        let name = request.as_ref().map_or(name, |r| r.step_name.clone());
        // Else a step of ours by name that runs in the allocation (a step of this task
        // alone whose dispatcher had not written the file yet).
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
            name: step_name(&spec.task),
            service: spec.service,
            log: spec.log.clone(),
            run_dir: spec.run_dir.clone(),
            status_file: Some(spec.run_dir.join(STATUS_FILE)),
            slurm: cluster,
            tasks,
        };
        seal(&h).map(Some)
    }
}

/// Removes a file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the agent stands, for a message: `; the agent (pid P on H) last beat N s ago`.
fn agent_note(agent_dir: &Path) -> String {
    match crate::agent::heartbeat(agent_dir) {
        Some((pid, host, age)) => format!(
            "; the allocation's agent (pid {pid} on {host}) last said it was alive {} s ago",
            age.as_secs()
        ),
        None => "; the allocation's agent never said it was alive".into(),
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
