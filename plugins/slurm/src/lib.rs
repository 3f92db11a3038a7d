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
//! **The agent** (`agent.rs`): the holder script runs `prl-flow slurm-agent DIR` on the
//! allocation's first node (and starts it again should it exit). It starts every step, so
//! no `srun` lives on the machine `prl-flow run` was typed on: the submitting side writes a
//! request (an `srun` command line) into the agent's inbox in the state dir, which both sides
//! see on the shared file system, and the agent runs it in a process group of its own. A
//! logout, a reboot or a `kill -9` of every prl-flow on the submitting machine leaves the
//! deployment serving; an agent that dies loses nothing either (the steps are SLURM's; the
//! next agent adopts their `srun`s).
//!
//! **Tasks share steps** (`launch.rs`, template `slurm/srun.argv.j2`): spawns that arrive
//! together are collected for a moment, and the tasks of one role (`decode` of
//! `decode[1].rank[0]`) with the same program go into one step: `srun --jobid=J --overlap
//! --nodelist=HOSTS -N n -n t --ntasks-per-node=k ... sh -c DISPATCHER LIST`. One step, one
//! `srun` and one step-creation RPC per role instead of one per node. The dispatcher
//! (`wrapper.rs`) finds its task in the list by node and local task id, takes the task's
//! command and environment from the `.task` file in its run dir (written by the submitting
//! side, mode 0600, removed before the command starts: no value is ever on a command line),
//! sends its output to the task's log, writes `JOB.STEP NODE PID ATTEMPT` to
//! `RUN_DIR/slurm-step` (so the step id is known the moment the task runs, and a prl-flow
//! killed right after requesting it finds it again: see [`Backend::recover`]), runs the
//! site's prologue, and runs the command, leaving its exit status in `RUN_DIR/exit-status`
//! when it ends (so one task of a step can end while the others run). [`Backend::spawn`]
//! returns when the step file names the step; the handle records job, step, node, the
//! step's number of tasks and the cluster's `SLURM_CONF`. A task started again alone (a
//! restart) is a step of its own.

//! **The preflight** ([`Backend::preflight`], `preflight.rs`): right after the allocation,
//! one step across its nodes (`srun --overlap --ntasks-per-node=1`) runs the prologue and
//! looks each node's programs up on its `PATH`, so a missing `vllm` fails the run before
//! any step of the plan starts.
//!
//! **A step's life is tied to its `srun`**: SLURM cancels a step whose `srun` is killed.
//! That is why the agent, not the submitting prl-flow, runs them.
//!
//! **Checking** ([`Backend::status`]): `squeue -s -j J` lists the running steps of the job.
//! One answer serves every step of the job for a moment (a few hundred ms, single-flight),
//! so a resume checking a thousand steps asks slurmctld a handful of times, not a thousand.
//! A task whose step is listed runs unless its dispatcher wrote its exit status; a step that
//! is not listed has ended: the exit status file says how, else the task is gone.
//!
//! **Stopping** ([`Backend::stop`]): a task alone in its step: `scancel --signal=TERM J.S`,
//! the grace period, then `--signal=KILL`. One task of a shared step: a short step on its
//! node signals the task's command (TERM to the dispatcher's children, then KILL to all its
//! descendants), and the dispatcher records the exit. [`Backend::release`]: `scancel J`, which ends every step with the job
//! (SLURM sends SIGTERM, then SIGKILL after its `KillWait`). All `scancel` calls go through
//! slurmctld (`--ctld`). [`Backend::teardown`] takes down what a journal records with one
//! `scancel` per job, never one per step, and cancels a job whole when its allocation is
//! among the records. With the state dir, it also cancels the jobs that state dir
//! submitted but never recorded: the one its job file names, and any job of this user whose
//! command is the state dir's holder script (prl-flow was killed between `sbatch` and
//! writing the job id down).
//!
//! **Resume.** [`Backend::allocation_alive`] asks whether the recorded job still runs. If it
//! has ended (time limit, preemption, an admin's `scancel`), every step ended with it, and
//! a resume cannot bring them back: the backend remembers that, and the `allocate` it is
//! then asked for fails with a message that says so and asks for a fresh run, instead of
//! quietly making a second allocation behind the journal's back. Steps that still run are
//! kept or adopted (a service that became ready while nobody watched is kept, not started
//! again); steps that are gone are started again in the same allocation.
//!
//! **Tasks without a node** run on this machine, through the local backend beside this one
//! ([`WithLocal`], which every constructor returns); their handles are named `local`.
//!
//! This crate knows SLURM and the backend API; it must not know recipes, plans or the
//! journal's format beyond the handles it wrote itself.

pub mod agent;
mod allocation;
mod cancel;
pub mod config;
mod handles;
mod launch;
mod preflight;
pub mod slurm;
mod steps;
pub mod templates;
mod wrapper;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prl_flow_backend::{
    Allocation, Backend, BackendError, Missing, ProcHandle, ProcState, Program, Recorded,
    SpawnSpec, Stopped,
};
pub(crate) use prl_flow_engine::fs::write_atomic;
use prl_flow_local::WithLocal;

pub use config::{AddressMode, SlurmConfig};
pub use handles::step_name;
use handles::{alloc_handle, parse_step, AllocHandle, NAME};
pub use prl_flow_backend::ConfigError;
pub use slurm::{Cluster, JobInfo};
use steps::StepTable;
use templates::Templates;

/// Written by a step's wrapper when it starts: `JOB.STEP NODE PID`.
const STEP_FILE: &str = "slurm-step";
/// Written by a one-shot's wrapper when it ends: its exit status.
const STATUS_FILE: &str = "exit-status";
/// `<state dir>/slurm/`: the holder script, and the id of the job it was submitted as.
const STATE_SUBDIR: &str = "slurm";
const JOB_FILE: &str = "job";
/// `<state dir>/slurm/cluster.json`: how to reach the cluster the holder job goes to,
/// written before it is submitted (a later `down` needs no recipe to find the job).
const CLUSTER_FILE: &str = "cluster.json";
/// `<state dir>/slurm/holder.sbatch`: the holder script. SLURM keeps its path as the job's
/// command, so a job this state dir submitted is found by it even when its id was lost.
const HOLDER_SCRIPT: &str = "holder.sbatch";
/// `<state dir>/slurm/agent/`: the allocation's agent's inbox and records (`agent.rs`).
const AGENT_SUBDIR: &str = "agent";
/// How often a starting step's file, or a stopping step, is looked at.
const FAST_POLL: Duration = Duration::from_millis(20);
/// How long `release` and `down` wait for SLURM to end what they cancelled: its own
/// `KillWait` (30 s by default) and some.
const END_WAIT: Duration = Duration::from_secs(120);

pub struct SlurmBackend {
    config: SlurmConfig,
    cluster: Cluster,
    state_dir: Option<PathBuf>,
    templates: Arc<Templates>,
    /// Collects spawns into steps for the agent.
    launcher: launch::Launcher,
    /// The allocation this process allocated or found alive: where spawns go.
    alloc: Mutex<Option<AllocHandle>>,
    /// Set when a recorded allocation was found ended: why a resume cannot go on.
    ended: Mutex<Option<String>>,
    /// When this process saw each step start: an older `squeue` answer cannot know it.
    started: Mutex<HashMap<String, Instant>>,
    tables: tokio::sync::Mutex<HashMap<(Cluster, String), StepTable>>,
}

impl SlurmBackend {
    /// The backend of a run, with the local backend beside it: `config` is the recipe's
    /// `[backend]` table (with the site's defaults merged in), as JSON; `state_dir` the
    /// run's state dir.
    pub fn from_config(
        config: &serde_json::Value,
        state_dir: &Path,
    ) -> Result<WithLocal<Self>, String> {
        let config = SlurmConfig::parse(config).map_err(|errors| ConfigError::join(&errors))?;
        let templates = Templates::load(config.templates.as_deref())?;
        Ok(Self::for_run(config, templates, state_dir))
    }

    /// Like [`SlurmBackend::from_config`], with every problem of the table apart, each
    /// naming its field (templates that do not load are a problem of `templates`).
    pub fn configure(
        config: &serde_json::Value,
        state_dir: &Path,
    ) -> Result<WithLocal<Self>, Vec<ConfigError>> {
        let config = SlurmConfig::parse(config)?;
        let templates = Templates::load(config.templates.as_deref())
            .map_err(|e| vec![ConfigError::new("templates", e)])?;
        Ok(Self::for_run(config, templates, state_dir))
    }

    fn for_run(config: SlurmConfig, templates: Templates, state_dir: &Path) -> WithLocal<Self> {
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
        WithLocal::new(Self::new(config, cluster, Some(state_dir), templates))
    }

    /// A backend for what a journal recorded (`status`, `logs`, `down`, with no recipe at
    /// hand): every handle says how to reach its cluster. It cannot allocate.
    pub fn for_handles() -> WithLocal<Self> {
        let cluster = Cluster {
            conf: std::env::var_os("SLURM_CONF").map(PathBuf::from),
            bin_dir: None,
        };
        // The built-in templates always load; a failure here would be a build defect.
        let templates = Templates::load(None).unwrap_or_else(|_| Templates::empty());
        WithLocal::new(Self::new(SlurmConfig::default(), cluster, None, templates))
    }

    /// Like [`SlurmBackend::for_handles`], checking that `handle` is one of this backend's
    /// (a step, an allocation, or a local process it ran).
    pub fn from_handle(handle: &ProcHandle) -> Result<WithLocal<Self>, String> {
        let cluster = if let Ok(s) = parse_step(handle) {
            s.slurm
        } else if let Some(a) = alloc_handle(handle) {
            a.slurm
        } else if handle.is("local") {
            Cluster::default()
        } else {
            return Err(format!("not a handle of the slurm backend: {handle}"));
        };
        let templates = Templates::load(None)?;
        Ok(WithLocal::new(Self::new(
            SlurmConfig::default(),
            cluster,
            None,
            templates,
        )))
    }

    fn new(
        config: SlurmConfig,
        cluster: Cluster,
        state_dir: Option<PathBuf>,
        templates: Templates,
    ) -> Self {
        let templates = Arc::new(templates);
        let launcher = launch::Launcher::new(launch::LaunchConfig {
            templates: templates.clone(),
            shell: config.shell.clone(),
            prologue: config.prologue.clone(),
            srun_args: config.srun_args.clone(),
        });
        Self {
            config,
            cluster,
            state_dir,
            templates,
            launcher,
            alloc: Mutex::new(None),
            ended: Mutex::new(None),
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
}

#[async_trait]
impl Backend for SlurmBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn describe(&self, handle: &ProcHandle) -> String {
        parse_step(handle)
            .map(|h| format!("step {}", h.step))
            .unwrap_or_default()
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        self.allocate_job(nodes).await
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        self.job_alive(allocation).await
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError> {
        self.release_job(allocation).await
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        self.spawn_step(spec).await
    }

    /// One step across the allocation (see `preflight.rs`).
    async fn preflight(&self, programs: &[Program]) -> Result<Option<Vec<Missing>>, BackendError> {
        self.preflight_step(programs).await
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        self.step_state(&parse_step(handle)?, false).await
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        self.wait_step(handle).await
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        self.stop_step(handle, grace).await
    }

    /// One `scancel` per job for all of it among `items` (see `cancel.rs`).
    async fn teardown(
        &self,
        items: &[Recorded],
        grace: Duration,
        state_dir: Option<&Path>,
    ) -> Vec<Stopped> {
        self.cancel_jobs(items, grace, state_dir).await
    }

    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        self.recover_step(spec).await
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        let h = parse_step(handle)?;
        prl_flow_backend::tail_lines(&h.log, lines)
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        let h = parse_step(handle)?;
        prl_flow_backend::read_from(&h.log, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_recognised_and_a_backend_is_made_from_one() {
        let step = handles::seal(&serde_json::json!({
            "job": "12", "step": "12.3", "node": "node1", "host": "n2",
            "name": "pf:x", "service": true, "log": "/l", "run_dir": "/r",
            "slurm": { "conf": "/etc/slurm/x.conf" },
        }))
        .expect("handle");
        let b = SlurmBackend::from_handle(&step).expect("from a step handle");
        assert_eq!(
            b.cluster.conf.as_deref(),
            Some(Path::new("/etc/slurm/x.conf"))
        );
        assert_eq!(b.describe(&step), "step 12.3");
        let alloc = handles::seal(
            &serde_json::json!({ "job": "12", "nodes": { "node0": "n1" }, "cpus_per_node": 4 }),
        )
        .expect("handle");
        assert!(alloc_handle(&alloc).is_some());
        assert!(alloc_handle(&step).is_none());
        assert!(SlurmBackend::from_handle(&alloc).is_ok());
        let local = ProcHandle::new("local", 1, &serde_json::json!({ "pid": 1, "start": 2 }))
            .expect("handle");
        assert!(SlurmBackend::from_handle(&local).is_ok());
        let ssh = ProcHandle::new("ssh", 1, &serde_json::json!({})).expect("handle");
        assert!(SlurmBackend::from_handle(&ssh).is_err());
        assert_eq!(
            parse_step(&ssh).expect_err("not ours").message,
            "backend `slurm` cannot use a handle of backend `ssh`"
        );
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
