//! The allocation: the holder batch job, submitted (or adopted), waited for until it runs or
//! SLURM says it never will, its nodes read back; whether a recorded one still runs; and
//! its release.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prl_flow_backend::{last_lines, Allocation, BackendError};
use sha2::{Digest, Sha256};

use crate::handles::{alloc_handle, read_job_file, seal, AllocHandle};
use crate::slurm::{self, JobInfo};
use crate::templates::HolderVars;
use crate::{
    write_atomic, AddressMode, SlurmBackend, AGENT_SUBDIR, CLUSTER_FILE, HOLDER_SCRIPT, JOB_FILE,
    STATE_SUBDIR,
};

/// How long the agent may take to say it is alive once the job runs.
const AGENT_WAIT: Duration = Duration::from_secs(30);

impl SlurmBackend {
    pub(crate) fn state_dir(&self) -> Result<&Path, BackendError> {
        self.state_dir.as_deref().ok_or_else(|| {
            BackendError::new("this slurm backend was made from a handle: it cannot allocate")
        })
    }

    pub(crate) fn job_file(&self) -> Result<PathBuf, BackendError> {
        Ok(self.state_dir()?.join(STATE_SUBDIR).join(JOB_FILE))
    }

    /// `<state dir>/slurm/agent/`: where the allocation's agent takes requests.
    pub(crate) fn agent_dir(&self) -> Result<PathBuf, BackendError> {
        Ok(self.state_dir()?.join(STATE_SUBDIR).join(AGENT_SUBDIR))
    }

    /// The program the agent runs as: the configured one, else this one.
    fn agent_program(&self) -> Result<PathBuf, BackendError> {
        match &self.config.agent {
            Some(p) => Ok(std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            None => std::env::current_exe().map_err(|e| {
                BackendError::new(format!(
                    "cannot tell which program this is, to run it as the allocation's agent ({e}); set `[backend] agent`"
                ))
            }),
        }
    }

    /// The deployment's name for messages and the job name: the state dir's name.
    pub(crate) fn deployment(&self) -> String {
        self.state_dir
            .as_deref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "deployment".into())
    }

    /// Submits the holder job, or adopts the one an interrupted earlier attempt submitted
    /// for the same request. Returns the job id.
    pub(crate) async fn submit(&self, nodes: usize) -> Result<String, BackendError> {
        let state = self.state_dir()?;
        let dir = state.join(STATE_SUBDIR);
        std::fs::create_dir_all(&dir)?;
        let c = &self.config;
        let deployment = self.deployment();
        let agent_dir = self.agent_dir()?;
        let agent_program = self.agent_program()?;
        let agent_dir_s = agent_dir.to_string_lossy().into_owned();
        let agent_program_s = agent_program.to_string_lossy().into_owned();
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
                agent_program: &agent_program_s,
                agent_dir: &agent_dir_s,
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
        let path = dir.join(HOLDER_SCRIPT);
        // A job of an earlier attempt whose id never reached the job file (killed between
        // `sbatch` and the write): its request is unknown, so it is cancelled, never kept
        // beside the new one.
        let strays = self.cluster.jobs_of_script(&path).await?;
        if !strays.is_empty() {
            tracing::info!(
                "cancelling job(s) {} that this state dir submitted earlier",
                strays.join(", ")
            );
            self.cluster.scancel(&strays, None).await?;
        }
        std::fs::write(&path, &script)?;
        // A new job, a new agent: nothing of an earlier job's requests is for it.
        let _ = std::fs::remove_dir_all(&agent_dir);
        std::fs::create_dir_all(agent_dir.join(crate::agent::INBOX))?;
        std::fs::create_dir_all(agent_dir.join(crate::agent::WORK))?;
        // Where the job goes, on file before it exists: `down` finds it with no recipe.
        let cluster = serde_json::to_vec(&self.cluster)
            .map_err(|e| BackendError::new(format!("cannot write the cluster file: {e}")))?;
        write_atomic(&dir.join(CLUSTER_FILE), &cluster)?;
        let job = self.cluster.sbatch(&args, &path).await?;
        // The id goes on file before any waiting: see above.
        write_atomic(&job_file, format!("{job} {digest}\n").as_bytes())?;
        Ok(job)
    }

    /// Waits until the job runs; fails at once when SLURM will never start it.
    pub(crate) async fn wait_running(
        &self,
        job: &str,
        nodes: usize,
    ) -> Result<JobInfo, BackendError> {
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

    /// Waits until the allocation's agent says it is alive; fails at once, with the holder
    /// script's words, when it exits (a prl-flow the nodes cannot run).
    async fn wait_agent(&self, job: &str) -> Result<(), BackendError> {
        let dir = self.agent_dir()?;
        let log = self.state_dir()?.join(STATE_SUBDIR).join("holder.log");
        let began = Instant::now();
        loop {
            if crate::agent::heartbeat(&dir).is_some_and(|(_, _, age)| age < AGENT_WAIT) {
                return Ok(());
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("the agent exited") || began.elapsed() > AGENT_WAIT {
                return Err(BackendError::new(format!(
                    "the allocation's agent (`{} slurm-agent`) did not start on the first node of job {job}; the job was cancelled. Set `[backend] agent` to a prl-flow the nodes can run. The holder's log ends with:\n{}",
                    self.agent_program()?.display(),
                    last_lines(&text, 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn allocate_job(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        if let Some(why) = self.ended.lock().ok().and_then(|e| e.clone()) {
            return Err(BackendError::new(why));
        }
        let job = self.submit(nodes.len()).await?;
        let info = self.wait_running(&job, nodes.len()).await?;
        if let Err(e) = self.wait_agent(&job).await {
            let _ = self.cluster.scancel(std::slice::from_ref(&job), None).await;
            return Err(e);
        }
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
            handle: seal(&handle)?,
        })
    }

    pub(crate) async fn job_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
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

    pub(crate) async fn release_job(&self, allocation: &Allocation) -> Result<(), BackendError> {
        let Some(a) = alloc_handle(&allocation.handle) else {
            return Ok(());
        };
        if a.slurm.job(&a.job).await?.is_some_and(|i| i.is_present()) {
            let agent_dir = self.agent_dir().ok();
            if let Some(e) = crate::cancel::cancel_job(
                &a.slurm,
                &a.job,
                &[],
                true,
                Duration::from_secs(10),
                agent_dir.as_deref(),
            )
            .await
            {
                return Err(BackendError::new(format!("releasing job {}: {e}", a.job)));
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
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
