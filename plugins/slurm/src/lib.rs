//! The SLURM backend: one allocation per deployment, every task a job step in it.
//!
//! # How it works
//!
//! **The allocation** (the plan's `allocate` task, [`Backend::allocate`]) is a *holder batch
//! job*: `sbatch` of a script (template `slurm/holder.sbatch.j2`) whose `#SBATCH` header
//! carries the site's options (partition, account, qos, time, constraint, GPUs, exclusive,
//! extra lines) and whose body only sleeps. Why a batch job rather than
//! `salloc --no-shell`: `sbatch` answers with the job id at once, even while the job
//! pends, so the id is on file (`<state dir>/slurm/job`) before any waiting starts and a
//! prl-flow killed during a long queue wait leaves a job that the next run adopts (or
//! `down` cancels) instead of a stray one; while it pends, `squeue` says why, and a job
//! that can never start (more nodes than its partition has, `BadConstraints`, a per-job
//! QOS limit, ...) fails the allocation at once with SLURM's reason instead of hanging; and a
//! site's existing `#SBATCH` lines go in verbatim. Once the job runs, its node list
//! (`scontrol show hostnames`) gives the plan's nodes in order (`node0` is the first), and
//! `scontrol show node` their addresses (`NodeAddr`, or the node names with
//! `address = "hostname"`), which fill the plan's `${host:nodeK}` placeholders.
//!
//! **Tasks are job steps** (template `slurm/srun.argv.j2`):
//! `srun --jobid=J --overlap --nodelist=HOST -N1 -n1 --cpus-per-task=C --job-name=pf:TASK
//! --chdir=RUN_DIR --output=LOG --open-mode=append sh -c WRAPPER RUN_DIR ARGV...`.
//! `--overlap` lets the steps share the allocation's CPUs and GPUs (without it the second
//! step on a node would queue behind the first); `--output` makes slurmstepd write the log on
//! the node, so it keeps flowing whatever happens to the `srun` process. The wrapper first
//! writes `JOB.STEP NODE PID` to `RUN_DIR/slurm-step` (so the step id is known the moment
//! the step runs, and a prl-flow killed right after starting it finds it again: see
//! [`Backend::recover`]), then runs the site's prologue (module loads, a venv), then
//! `exec`s the command (a service) or runs it under a trap that leaves its exit status in
//! `RUN_DIR/exit-status` (a one-shot: with no accounting database that is the only record
//! of how it ended once its `srun` is gone). [`Backend::spawn`] returns when the step
//! file names the step; the handle records job, step, node and the cluster's `SLURM_CONF`.
//!
//! **A step's life is tied to its `srun`**: SLURM cancels a step whose `srun` is killed.
//! So each `srun` starts in a process group of its own with its output in files, and
//! nothing of prl-flow stops it: when prl-flow exits (or is killed with `kill -9`) the
//! `srun` processes go on, and so do the steps. That is what lets `run` return with the
//! deployment up, and `--resume` reattach.
//!
//! **Checking** ([`Backend::status`]): `squeue -s -j J` lists the running steps of the job.
//! One answer serves every step of the job for a moment (a few hundred ms, single-flight),
//! so a resume checking a thousand steps asks slurmctld a handful of times, not a thousand.
//! A step that is not listed has ended: its exit status file (one-shots) says how, else it
//! is gone. For a step started by this process, the exit of its `srun` says it first.
//!
//! **Stopping** ([`Backend::stop`]): `scancel --signal=TERM J.S`, the grace period, then
//! `--signal=KILL`. [`Backend::release`]: `scancel J`, which ends every step with the job
//! (SLURM sends SIGTERM, then SIGKILL after its `KillWait`). All `scancel` calls go through
//! slurmctld (`--ctld`). [`SlurmBackend::down`] is what `prl-flow down` uses: one `scancel`
//! per job for everything the journal records, never one per step.
//!
//! **Resume.** [`Backend::allocation_alive`] asks whether the recorded job still runs. If it
//! has ended (time limit, preemption, an admin's `scancel`), every step ended with it, and
//! a resume cannot bring them back: the backend remembers that, and the `allocate` it is
//! then asked for fails with a message that says so and asks for a fresh run, instead of
//! quietly making a second allocation behind the journal's back. Steps that still run are
//! kept or adopted (a service that became ready while nobody watched is kept, not started
//! again); steps that are gone are started again in the same allocation.
//!
//! **Tasks without a node** run on this machine, through the local backend; their handles
//! say `"backend": "local"`.

pub mod config;
pub mod slurm;
pub mod templates;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prl_flow_backend::{
    last_lines, since_last_mark, Allocation, Backend, BackendError, ProcHandle, ProcState,
    SpawnSpec, LOG_MARK,
};
use prl_flow_engine::fs::write_atomic;
use prl_flow_local::LocalBackend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

pub use config::{AddressMode, ConfigError, SlurmConfig};
pub use slurm::{Cluster, JobInfo};
use templates::{HolderVars, SrunVars, Templates};

/// Written by a step's wrapper when it starts: `JOB.STEP NODE PID`.
const STEP_FILE: &str = "slurm-step";
/// Written by a one-shot's wrapper when it ends: its exit status.
const STATUS_FILE: &str = "exit-status";
/// `<state dir>/slurm/`: the holder script, and the id of the job it was submitted as.
const STATE_SUBDIR: &str = "slurm";
const JOB_FILE: &str = "job";
/// How often a starting step's file, or a stopping step, is looked at.
const FAST_POLL: Duration = Duration::from_millis(20);
/// How long `release` and `down` wait for SLURM to end what they cancelled: its own
/// `KillWait` (30 s by default) and some.
const END_WAIT: Duration = Duration::from_secs(120);

/// The handle of a job step, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StepHandle {
    backend: String,
    job: String,
    /// `JOB.STEP`, as scancel and squeue write it.
    step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    /// SLURM's name of the node.
    host: String,
    /// The step's name (`pf:<task>`).
    name: String,
    service: bool,
    log: PathBuf,
    run_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status_file: Option<PathBuf>,
    #[serde(default)]
    slurm: Cluster,
}

/// `Allocation::handle` of a SLURM allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AllocHandle {
    backend: String,
    job: String,
    /// Plan node (`node0`) → SLURM's node name.
    nodes: BTreeMap<String, String>,
    /// CPUs the job has on each node (what each step may use).
    cpus_per_node: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log: Option<PathBuf>,
    #[serde(default)]
    slurm: Cluster,
}

/// Running steps of a job, as one `squeue` answered, and when it was asked.
struct StepTable {
    asked: Instant,
    steps: Arc<BTreeMap<String, String>>,
}

type ExitWatch = watch::Receiver<Option<ProcState>>;

pub struct SlurmBackend {
    config: SlurmConfig,
    cluster: Cluster,
    state_dir: Option<PathBuf>,
    templates: Templates,
    local: LocalBackend,
    /// The allocation this process allocated or found alive: where spawns go.
    alloc: Mutex<Option<AllocHandle>>,
    /// Set when a recorded allocation was found ended: why a resume cannot go on.
    ended: Mutex<Option<String>>,
    /// Exit watches of the `srun`s this process started, by step id.
    children: Mutex<HashMap<String, ExitWatch>>,
    /// When this process saw each step start: an older `squeue` answer cannot know it.
    started: Mutex<HashMap<String, Instant>>,
    tables: tokio::sync::Mutex<HashMap<(Cluster, String), StepTable>>,
}

/// What [`SlurmBackend::down`] did with one journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownOutcome {
    /// The record's task id.
    pub id: String,
    /// Its step (or job) was running when `down` began.
    pub was_running: bool,
    /// `None`: it is not running any more.
    pub error: Option<String>,
}

impl SlurmBackend {
    /// The backend of a run: `config` is the recipe's `[backend]` table (with the site's
    /// defaults merged in), as JSON; `state_dir` the run's state dir.
    pub fn from_config(config: &serde_json::Value, state_dir: &Path) -> Result<Self, String> {
        let config = SlurmConfig::parse(config).map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        let templates = Templates::load(config.templates.as_deref())?;
        let conf = config
            .slurm_conf
            .clone()
            .or_else(|| std::env::var_os("SLURM_CONF").map(PathBuf::from))
            .map(|p| std::path::absolute(&p).unwrap_or(p));
        let cluster = Cluster {
            conf,
            bin_dir: config.bin_dir.clone(),
        };
        let state_dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        Ok(Self::new(config, cluster, Some(state_dir), templates))
    }

    /// A backend for what a journal recorded (`status`, `logs`, `down`, with no recipe at
    /// hand): every handle says how to reach its cluster. It cannot allocate.
    pub fn for_handles() -> Self {
        let cluster = Cluster {
            conf: std::env::var_os("SLURM_CONF").map(PathBuf::from),
            bin_dir: None,
        };
        // The built-in templates always load; a failure here would be a build defect.
        let templates = Templates::load(None).unwrap_or_else(|_| Templates::empty());
        Self::new(SlurmConfig::default(), cluster, None, templates)
    }

    /// Like [`SlurmBackend::for_handles`], checking that `handle` is one of this backend's
    /// (a step, an allocation, or a local process it ran).
    pub fn from_handle(handle: &ProcHandle) -> Result<Self, String> {
        let cluster = if let Ok(s) = serde_json::from_value::<StepHandle>(handle.clone()) {
            s.slurm
        } else if let Some(a) = alloc_handle(handle) {
            a.slurm
        } else if handle.get("backend").and_then(|b| b.as_str()) == Some("local") {
            Cluster::default()
        } else {
            return Err(format!("not a handle of the slurm backend: {handle}"));
        };
        let templates = Templates::load(None)?;
        Ok(Self::new(SlurmConfig::default(), cluster, None, templates))
    }

    fn new(
        config: SlurmConfig,
        cluster: Cluster,
        state_dir: Option<PathBuf>,
        templates: Templates,
    ) -> Self {
        Self {
            config,
            cluster,
            state_dir,
            templates,
            local: LocalBackend::new(),
            alloc: Mutex::new(None),
            ended: Mutex::new(None),
            children: Mutex::new(HashMap::new()),
            started: Mutex::new(HashMap::new()),
            tables: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &SlurmConfig {
        &self.config
    }

    fn current_alloc(&self) -> Option<AllocHandle> {
        self.alloc.lock().ok().and_then(|a| a.clone())
    }

    fn set_alloc(&self, a: Option<AllocHandle>) {
        if let Ok(mut slot) = self.alloc.lock() {
            *slot = a;
        }
    }

    fn child(&self, step: &str) -> Option<ExitWatch> {
        self.children.lock().ok()?.get(step).cloned()
    }

    fn started_at(&self, step: &str) -> Option<Instant> {
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
    async fn step_state(&self, h: &StepHandle, fresh: bool) -> Result<ProcState, BackendError> {
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

    fn state_dir(&self) -> Result<&Path, BackendError> {
        self.state_dir.as_deref().ok_or_else(|| {
            BackendError::new("this slurm backend was made from a handle: it cannot allocate")
        })
    }

    fn job_file(&self) -> Result<PathBuf, BackendError> {
        Ok(self.state_dir()?.join(STATE_SUBDIR).join(JOB_FILE))
    }

    /// The deployment's name for messages and the job name: the state dir's name.
    fn deployment(&self) -> String {
        self.state_dir
            .as_deref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "deployment".into())
    }

    /// Submits the holder job, or adopts the one an interrupted earlier attempt submitted
    /// for the same request. Returns the job id.
    async fn submit(&self, nodes: usize) -> Result<String, BackendError> {
        let state = self.state_dir()?;
        let dir = state.join(STATE_SUBDIR);
        std::fs::create_dir_all(&dir)?;
        let c = &self.config;
        let deployment = self.deployment();
        let script = self
            .templates
            .holder(&HolderVars {
                deployment: &deployment,
                nodes,
                partition: c.partition.as_deref().unwrap_or(""),
                account: c.account.as_deref().unwrap_or(""),
                qos: c.qos.as_deref().unwrap_or(""),
                time: c.time.as_deref().unwrap_or(""),
                constraint: c.constraint.as_deref().unwrap_or(""),
                gpus_per_node: c.gpus_per_node.unwrap_or(0),
                exclusive: c.exclusive,
                sbatch_lines: &c.sbatch_lines,
            })
            .map_err(BackendError::new)?;
        let job_name = c
            .job_name
            .clone()
            .unwrap_or_else(|| format!("prl-flow-{deployment}"));
        let log = dir.join("holder.log");
        let args = vec![
            format!("--nodes={nodes}"),
            format!("--job-name={job_name}"),
            format!("--output={}", log.display()),
            "--open-mode=append".to_string(),
            format!("--chdir={}", state.display()),
        ];
        let digest =
            hex(&Sha256::digest(format!("{args:?}\n{script}").as_bytes()))[..16].to_string();
        let job_file = self.job_file()?;
        // A job this state dir submitted whose id never reached the journal (prl-flow was
        // killed while it pended): the same request is adopted, another one cancelled.
        if let Some((old, old_digest)) = read_job_file(&job_file) {
            if let Some(info) = self.cluster.job(&old).await? {
                if (info.is_alive() || info.is_pending()) && old_digest == digest {
                    tracing::info!("adopting job {old}, submitted earlier for this state dir");
                    return Ok(old);
                }
                if info.is_alive() || info.is_pending() {
                    self.cluster
                        .scancel(std::slice::from_ref(&old), None)
                        .await?;
                }
            }
        }
        let path = dir.join("holder.sbatch");
        std::fs::write(&path, &script)?;
        let job = self.cluster.sbatch(&args, &path).await?;
        // The id goes on file before any waiting: see above.
        write_atomic(&job_file, format!("{job} {digest}\n").as_bytes())?;
        Ok(job)
    }

    /// Waits until the job runs; fails at once when SLURM will never start it.
    async fn wait_running(&self, job: &str, nodes: usize) -> Result<JobInfo, BackendError> {
        let began = Instant::now();
        let mut pause = Duration::from_millis(25);
        let mut last_reason = String::new();
        loop {
            let Some(info) = self.cluster.job(job).await? else {
                return Err(BackendError::new(format!(
                    "SLURM job {job} (the allocation) vanished before it ran"
                )));
            };
            if info.is_alive() {
                return Ok(info);
            }
            if info.is_pending() {
                // More nodes than the partition has: SLURM says `PartitionConfig` (or
                // `PartitionNodeLimit`), which also covers passing states; the count is sure.
                if let Some(total) = self.cluster.partition_nodes(&info.partition).await {
                    if (total as usize) < nodes {
                        let _ = self.cluster.scancel(&[job.to_string()], None).await;
                        return Err(BackendError::new(format!(
                            "SLURM will not start the allocation (job {job}): the plan needs {nodes} nodes and partition `{}` has {total} (pending with reason `{}`); the job was cancelled",
                            info.partition, info.reason,
                        )));
                    }
                }
                if let Some(why) = slurm::hopeless(&info.reason) {
                    let _ = self.cluster.scancel(&[job.to_string()], None).await;
                    return Err(BackendError::new(format!(
                        "SLURM will not start the allocation (job {job}, {nodes} node{} in partition `{}`): pending with reason `{}`: {why}; the job was cancelled",
                        if nodes == 1 { "" } else { "s" },
                        info.partition,
                        info.reason,
                    )));
                }
                if let Some(limit) = self.config.pending_timeout {
                    if began.elapsed() > limit {
                        let _ = self.cluster.scancel(&[job.to_string()], None).await;
                        return Err(BackendError::new(format!(
                            "the allocation (job {job}) was still pending after {} (reason `{}`); it was cancelled (`[backend] pending_timeout`)",
                            humantime::format_duration(limit),
                            info.reason
                        )));
                    }
                }
                if info.reason != last_reason {
                    tracing::info!("job {job} pends: {}", info.reason);
                    last_reason = info.reason.clone();
                }
            } else {
                let tail = self
                    .state_dir
                    .as_deref()
                    .map(|d| d.join(STATE_SUBDIR).join("holder.log"))
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|t| last_lines(&t, 5))
                    .unwrap_or_default();
                return Err(BackendError::new(format!(
                    "the allocation (job {job}) ended before it ran: {} (reason `{}`){}",
                    info.state,
                    info.reason,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("; its log ends with:\n{tail}")
                    }
                )));
            }
            tokio::time::sleep(pause).await;
            // Quick at first (a free cluster starts a job in well under a second, and every
            // task waits for it), then gentle on the controller during a long queue wait.
            let cap = if began.elapsed() < Duration::from_secs(10) {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            };
            pause = (pause * 2).min(cap);
        }
    }

    /// Cancels what a journal records, one `scancel` per job: the records' handles (steps,
    /// allocations, and local processes) by task id. A job whose allocation is among them is
    /// cancelled whole (SLURM ends its steps: SIGTERM, then SIGKILL after `KillWait`);
    /// otherwise its recorded steps get one `scancel --signal=TERM` together, `grace`, and
    /// one `--signal=KILL` for those still there. With `state_dir`, a job this state dir
    /// submitted but never recorded (prl-flow was killed while it pended) is cancelled too.
    /// Waits until SLURM no longer runs any of it.
    pub async fn down(
        &self,
        state_dir: Option<&Path>,
        records: &[(String, ProcHandle)],
        grace: Duration,
    ) -> Vec<DownOutcome> {
        let mut out = Vec::new();
        #[derive(Default)]
        struct Group {
            allocs: Vec<String>,
            steps: Vec<(String, StepHandle)>,
        }
        let mut groups: BTreeMap<(String, String), (Cluster, Group)> = BTreeMap::new();
        for (id, h) in records {
            if let Ok(s) = serde_json::from_value::<StepHandle>(h.clone()) {
                let key = (format!("{:?}", s.slurm), s.job.clone());
                let entry = groups
                    .entry(key)
                    .or_insert_with(|| (s.slurm.clone(), Group::default()));
                entry.1.steps.push((id.clone(), s));
            } else if let Some(a) = alloc_handle(h) {
                let key = (format!("{:?}", a.slurm), a.job.clone());
                let entry = groups
                    .entry(key)
                    .or_insert_with(|| (a.slurm.clone(), Group::default()));
                entry.1.allocs.push(id.clone());
            } else if h.get("backend").and_then(|b| b.as_str()) == Some("local") {
                let was_running = matches!(self.local.status(h).await, Ok(ProcState::Running));
                let error = self.local.stop(h, grace).await.err().map(|e| e.message);
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running,
                    error,
                });
            } else if allocation_backend(h).as_deref() == Some("local") {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: false,
                    error: None,
                });
            } else {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: false,
                    error: Some(format!("not a handle of the slurm backend: {h}")),
                });
            }
        }
        if let Some(job) =
            state_dir.and_then(|d| read_job_file(&d.join(STATE_SUBDIR).join(JOB_FILE)))
        {
            let key = (format!("{:?}", self.cluster), job.0.clone());
            if let std::collections::btree_map::Entry::Vacant(slot) = groups.entry(key) {
                if let Ok(Some(info)) = self.cluster.job(&job.0).await {
                    if info.is_pending() || info.is_alive() {
                        slot.insert((
                            self.cluster.clone(),
                            Group {
                                allocs: vec![format!("(job {} of this state dir)", job.0)],
                                steps: Vec::new(),
                            },
                        ));
                    }
                }
            }
        }

        for ((_, job), (cluster, group)) in groups {
            // What ran when `down` began, for the report; a failed query is no reason not to
            // cancel (cancelling what has ended is harmless), only not to claim it ran.
            let job_alive =
                matches!(cluster.job(&job).await, Ok(Some(i)) if i.is_alive() || i.is_pending());
            let running = cluster
                .steps(std::slice::from_ref(&job))
                .await
                .unwrap_or_default();
            let mut error;
            if !group.allocs.is_empty() {
                error = cluster
                    .scancel(std::slice::from_ref(&job), None)
                    .await
                    .err()
                    .map(|e| e.message);
            } else {
                let ours: Vec<String> = group.steps.iter().map(|(_, s)| s.step.clone()).collect();
                error = cluster
                    .scancel(&ours, Some("TERM"))
                    .await
                    .err()
                    .map(|e| e.message);
                let deadline = Instant::now() + grace;
                let mut left = ours;
                loop {
                    match cluster.steps(std::slice::from_ref(&job)).await {
                        Ok(now) => left.retain(|s| now.contains_key(s)),
                        Err(e) => error = Some(e.message),
                    }
                    if left.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if !left.is_empty() {
                    error = cluster
                        .scancel(&left, Some("KILL"))
                        .await
                        .err()
                        .map(|e| e.message);
                }
            }
            // Wait until SLURM shows none of it; an unanswered query counts as "still there".
            let deadline = Instant::now() + grace + END_WAIT;
            let ours: Vec<String> = group.steps.iter().map(|(_, s)| s.step.clone()).collect();
            let mut still = String::new();
            loop {
                let steps_left: Vec<String> = match cluster.steps(std::slice::from_ref(&job)).await
                {
                    Ok(steps) => ours
                        .iter()
                        .filter(|s| steps.contains_key(*s))
                        .cloned()
                        .collect(),
                    Err(e) => vec![e.message],
                };
                let job_left = !group.allocs.is_empty()
                    && !matches!(cluster.job(&job).await, Ok(i) if !i.as_ref().is_some_and(|i| i.is_alive() || i.is_pending() || i.state == "COMPLETING"));
                if !job_left && steps_left.is_empty() {
                    still.clear();
                    break;
                }
                if Instant::now() > deadline {
                    still = if job_left {
                        format!("job {job} may still run (SLURM did not confirm its end)")
                    } else {
                        format!("steps may still run: {}", steps_left.join(", "))
                    };
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let error = error.or_else(|| (!still.is_empty()).then(|| still.clone()));
            for id in &group.allocs {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: job_alive,
                    error: error.clone(),
                });
            }
            for (id, s) in &group.steps {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: running.contains_key(&s.step),
                    error: error.clone(),
                });
            }
            if let Some(d) = state_dir {
                let f = d.join(STATE_SUBDIR).join(JOB_FILE);
                if error.is_none() && read_job_file(&f).is_some_and(|(j, _)| j == job) {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
        out
    }
}

/// Whether a handle from a journal is this backend's: a step, or an allocation.
pub fn is_slurm_handle(handle: &ProcHandle) -> bool {
    handle.get("backend").and_then(|b| b.as_str()) == Some("slurm")
        || allocation_backend(handle).as_deref() == Some("slurm")
}

/// The backend named inside an allocation record (`{"hosts": ..., "handle": {"backend": ..}}`).
fn allocation_backend(handle: &ProcHandle) -> Option<String> {
    handle
        .get("handle")?
        .get("backend")?
        .as_str()
        .map(String::from)
}

fn alloc_handle(h: &ProcHandle) -> Option<AllocHandle> {
    // An `Allocation` record, or its inner handle.
    let inner = h
        .get("handle")
        .filter(|_| h.get("hosts").is_some())
        .unwrap_or(h);
    serde_json::from_value::<AllocHandle>(inner.clone())
        .ok()
        .filter(|a| a.backend == "slurm")
}

fn parse_step(h: &ProcHandle) -> Result<StepHandle, BackendError> {
    serde_json::from_value(h.clone())
        .map_err(|e| BackendError::new(format!("not a slurm step handle ({e}): {h}")))
}

fn is_local(h: &ProcHandle) -> bool {
    h.get("backend").and_then(|b| b.as_str()) == Some("local")
}

/// How a step ended that is no longer running: its exit status file if it left one, else
/// the exit status of its `srun` (when this process started it), else gone.
fn ended_state(h: &StepHandle, srun: Option<ProcState>) -> ProcState {
    if let Some(code) = h.status_file.as_deref().and_then(read_status) {
        return ProcState::Exited(Some(code));
    }
    match srun {
        Some(s @ ProcState::Exited(_)) => s,
        _ => ProcState::Gone,
    }
}

fn read_status(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `<job> <digest>` of the job file.
fn read_job_file(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut w = text.split_whitespace();
    Some((w.next()?.to_string(), w.next().unwrap_or("").to_string()))
}

/// The step file: (`JOB.STEP`, node).
fn read_step_file(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut w = text.split_whitespace();
    let step = w.next()?.to_string();
    let (job, s) = step.split_once('.')?;
    if job.is_empty() || s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((step, w.next().unwrap_or("").to_string()))
}

/// A step's name: `pf:` and the task id, with what SLURM or a shell might mangle replaced.
pub fn step_name(task: &str) -> String {
    let clean: String = task
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("pf:{clean}")
}

/// The wrapper a step runs: `SHELL -c SCRIPT RUN_DIR ARGV...` (the run dir is `$0`, so no
/// path is ever quoted into the script).
fn wrap(
    shell: &str,
    prologue: Option<&str>,
    argv: &[String],
    run_dir: &Path,
    service: bool,
) -> Vec<String> {
    let mut script = format!(
        "printf '%s %s %s\\n' \"$SLURM_JOB_ID.$SLURM_STEP_ID\" \"${{SLURMD_NODENAME:-}}\" \"$$\" > \"$0/{STEP_FILE}.tmp\" && mv -f \"$0/{STEP_FILE}.tmp\" \"$0/{STEP_FILE}\"\n"
    );
    if !service {
        script.push_str(&format!("trap 'echo $? > \"$0/{STATUS_FILE}\"' EXIT\n"));
    }
    if let Some(p) = prologue {
        // A group, not a subshell: `source venv/bin/activate` must reach the command.
        script.push_str(&format!(
            "{{\n{p}\n}} || {{ s=$?; echo \"prl-flow: the step prologue failed with status $s\" >&2; exit $s; }}\n"
        ));
    }
    script.push_str(if service { "exec \"$@\"\n" } else { "\"$@\"\n" });
    let mut v = vec![
        shell.to_string(),
        "-c".to_string(),
        script,
        run_dir.to_string_lossy().into_owned(),
    ];
    v.extend(argv.iter().cloned());
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tail_bytes(path: &Path, max: u64) -> Result<String, BackendError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e.into()),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn log_tail_of(path: &Path, lines: usize) -> String {
    tail_bytes(path, 64 * 1024)
        .map(|t| last_lines(since_last_mark(&t), lines))
        .unwrap_or_default()
}

#[async_trait]
impl Backend for SlurmBackend {
    fn name(&self) -> &str {
        "slurm"
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        if let Some(why) = self.ended.lock().ok().and_then(|e| e.clone()) {
            return Err(BackendError::new(why));
        }
        let job = self.submit(nodes.len()).await?;
        let info = self.wait_running(&job, nodes.len()).await?;
        let names = self.cluster.hostnames(&info.nodelist).await?;
        if names.len() < nodes.len() {
            let _ = self.cluster.scancel(std::slice::from_ref(&job), None).await;
            return Err(BackendError::new(format!(
                "job {job} got {} nodes ({}), the plan needs {}",
                names.len(),
                info.nodelist,
                nodes.len()
            )));
        }
        let addrs = match self.config.address {
            AddressMode::NodeAddr => self.cluster.node_addrs(&info.nodelist).await?,
            AddressMode::Hostname => BTreeMap::new(),
        };
        let mut hosts = BTreeMap::new();
        let mut map = BTreeMap::new();
        for (node, name) in nodes.iter().zip(&names) {
            hosts.insert(
                node.clone(),
                addrs.get(name).cloned().unwrap_or_else(|| name.clone()),
            );
            map.insert(node.clone(), name.clone());
        }
        let handle = AllocHandle {
            backend: "slurm".into(),
            job: job.clone(),
            nodes: map,
            cpus_per_node: (info.cpus / info.nodes.max(1)).max(1),
            log: self
                .state_dir
                .as_deref()
                .map(|d| d.join(STATE_SUBDIR).join("holder.log")),
            slurm: self.cluster.clone(),
        };
        self.set_alloc(Some(handle.clone()));
        tracing::info!("allocation: job {job} on {}", info.nodelist);
        Ok(Allocation {
            hosts,
            handle: serde_json::to_value(handle).map_err(|e| BackendError::new(e.to_string()))?,
        })
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        let Some(a) = alloc_handle(&allocation.handle) else {
            return Err(BackendError::new(format!(
                "not a slurm allocation: {}",
                allocation.handle
            )));
        };
        match a.slurm.job(&a.job).await? {
            Some(info) if info.is_alive() => {
                self.set_alloc(Some(a));
                Ok(true)
            }
            other => {
                let how = match other {
                    Some(i) => format!("is {}", i.state),
                    None => "is no longer known to SLURM".into(),
                };
                let why = format!(
                    "the SLURM allocation of this deployment has ended (job {} {how}: a time limit, preemption, a node failure or a scancel), and every job step ended with it; a resume cannot bring them back. Start a fresh run (`prl-flow run` without `--resume`)",
                    a.job
                );
                if let Ok(mut e) = self.ended.lock() {
                    *e = Some(why);
                }
                Ok(false)
            }
        }
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError> {
        let Some(a) = alloc_handle(&allocation.handle) else {
            return Ok(());
        };
        let alive = |i: &Option<JobInfo>| {
            i.as_ref()
                .is_some_and(|i| i.is_alive() || i.is_pending() || i.state == "COMPLETING")
        };
        if alive(&a.slurm.job(&a.job).await?) {
            a.slurm.scancel(std::slice::from_ref(&a.job), None).await?;
            let deadline = Instant::now() + END_WAIT;
            while alive(&a.slurm.job(&a.job).await?) {
                if Instant::now() > deadline {
                    return Err(BackendError::new(format!(
                        "job {} did not end within {} s of its scancel",
                        a.job,
                        END_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if self.current_alloc().is_some_and(|c| c.job == a.job) {
            self.set_alloc(None);
        }
        if let Ok(f) = self.job_file() {
            if read_job_file(&f).is_some_and(|(j, _)| j == a.job) {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        let Some(node) = &spec.node else {
            return self.local.spawn(spec).await;
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
            spec.service,
        ));
        tracing::debug!(
            "{}: {}",
            spec.task,
            shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default()
        );
        let mut cmd = alloc.slurm.command(&argv[0]);
        cmd.args(&argv[1..])
            .envs(&spec.env)
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
            backend: "slurm".into(),
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
        serde_json::to_value(h).map_err(|e| BackendError::new(e.to_string()))
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if is_local(handle) {
            return self.local.status(handle).await;
        }
        self.step_state(&parse_step(handle)?, false).await
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if is_local(handle) {
            return self.local.wait(handle).await;
        }
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

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        if is_local(handle) {
            return self.local.stop(handle, grace).await;
        }
        let h = parse_step(handle)?;
        if self.step_state(&h, true).await? != ProcState::Running {
            return Ok(());
        }
        h.slurm
            .scancel(std::slice::from_ref(&h.step), Some("TERM"))
            .await?;
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

    async fn recover(
        &self,
        spec: &SpawnSpec,
        since_ms: u64,
    ) -> Result<Option<ProcHandle>, BackendError> {
        let Some(node) = &spec.node else {
            return self.local.recover(spec, since_ms).await;
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
        // The wrapper's file, if this attempt wrote it (an older one is an earlier attempt's).
        let from_file = std::fs::metadata(&step_file)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .filter(|written| written + 1 >= since_ms)
            .and_then(|_| read_step_file(&step_file));
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
            backend: "slurm".into(),
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
        serde_json::to_value(h)
            .map(Some)
            .map_err(|e| BackendError::new(e.to_string()))
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        if is_local(handle) {
            return self.local.log_tail(handle, lines).await;
        }
        let h = parse_step(handle)?;
        let text = tail_bytes(&h.log, 64 * 1024)?;
        Ok(last_lines(since_last_mark(&text), lines))
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        if is_local(handle) {
            return self.local.read_log(handle, offset).await;
        }
        let h = parse_step(handle)?;
        prl_flow_local::read_from(&h.log, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_survive_slurm_and_shells() {
        assert_eq!(step_name("prefill[0].node[1]"), "pf:prefill_0_.node_1_");
        assert_eq!(
            step_name("mooncake-client.node[3]"),
            "pf:mooncake-client.node_3_"
        );
        assert_eq!(step_name("a b/c"), "pf:a_b_c");
    }

    #[test]
    fn step_files_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join(STEP_FILE);
        std::fs::write(&f, "12.3 n2 4242\n").expect("write");
        assert_eq!(read_step_file(&f), Some(("12.3".into(), "n2".into())));
        std::fs::write(&f, "12. n2 1\n").expect("write");
        assert_eq!(read_step_file(&f), None);
        std::fs::write(&f, "12.batch n2 1\n").expect("write");
        assert_eq!(read_step_file(&f), None);
    }

    #[test]
    fn the_wrapper_names_its_step_then_runs_the_prologue_then_the_command() {
        let run = Path::new("/r");
        let argv = vec!["echo".to_string(), "a b".to_string()];
        let w = wrap("sh", Some("module load cuda"), &argv, run, false);
        assert_eq!(&w[..2], ["sh", "-c"]);
        assert_eq!(&w[3..], ["/r", "echo", "a b"]);
        let s = &w[2];
        let (step, trap, prologue, run_it) = (
            s.find(STEP_FILE).expect("step file"),
            s.find("trap").expect("trap"),
            s.find("module load cuda").expect("prologue"),
            s.rfind("\"$@\"").expect("command"),
        );
        assert!(step < trap && trap < prologue && prologue < run_it, "{s}");
        assert!(!s.contains("exec \"$@\""), "a one-shot is waited for: {s}");
        let svc = wrap("sh", None, &argv, run, true);
        assert!(
            svc[2].ends_with("exec \"$@\"\n") && !svc[2].contains("trap"),
            "{}",
            svc[2]
        );
    }

    #[tokio::test]
    async fn the_wrapper_runs_under_sh() {
        // Without SLURM: the step file then holds `.` fields; the rest works the same.
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            "echo \"$GREETING\"; exit 3".to_string(),
        ];
        let w = wrap(
            "sh",
            Some("GREETING=hello; export GREETING"),
            &argv,
            dir.path(),
            false,
        );
        let out = tokio::process::Command::new(&w[0])
            .args(&w[1..])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
        assert_eq!(read_status(&dir.path().join(STATUS_FILE)), Some(3));
        assert!(dir.path().join(STEP_FILE).exists());

        let failing = wrap("sh", Some("false"), &argv, dir.path(), true);
        let out = tokio::process::Command::new(&failing[0])
            .args(&failing[1..])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("prologue failed"));
    }

    #[test]
    fn handles_are_recognised_and_a_backend_is_made_from_one() {
        let step = serde_json::json!({
            "backend": "slurm", "job": "12", "step": "12.3", "node": "node1", "host": "n2",
            "name": "pf:x", "service": true, "log": "/l", "run_dir": "/r",
            "slurm": { "conf": "/etc/slurm/x.conf" },
        });
        assert!(is_slurm_handle(&step));
        let b = SlurmBackend::from_handle(&step).expect("from a step handle");
        assert_eq!(
            b.cluster.conf.as_deref(),
            Some(Path::new("/etc/slurm/x.conf"))
        );
        let alloc = serde_json::json!({
            "hosts": { "node0": "10.0.0.1" },
            "handle": { "backend": "slurm", "job": "12", "nodes": { "node0": "n1" }, "cpus_per_node": 4 },
        });
        assert!(is_slurm_handle(&alloc));
        assert!(alloc_handle(&alloc).is_some());
        assert!(SlurmBackend::from_handle(&alloc).is_ok());
        let local = serde_json::json!({ "backend": "local", "pid": 1, "start": 2, "log": "/l" });
        assert!(!is_slurm_handle(&local));
        assert!(SlurmBackend::from_handle(&serde_json::json!({ "backend": "ssh" })).is_err());
    }

    #[test]
    fn from_config_reports_every_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = SlurmBackend::from_config(
            &serde_json::json!({ "partiton": "gpu", "time": 4 }),
            dir.path(),
        )
        .err()
        .expect("invalid");
        assert!(
            err.contains("partiton") && err.contains("`[backend] time`"),
            "{err}"
        );
    }
}
