//! Handing tasks to the allocation's agent, many tasks to one step.
//!
//! Spawns that arrive together (the engine starts every task whose dependencies are ready
//! at once: the ranks of a replica, the Mooncake clients) are collected for a moment
//! ([`QUIET`] after the last arrival, [`MAX_WAIT`] at most) and launched as few steps as the
//! tasks allow: tasks of the same role (`decode` of `decode[1].rank[0]`) with the same
//! program and kind (service or one-shot) go into one step,
//! split only where nodes carry different numbers of them (`--ntasks-per-node` is one number
//! per step). A step of many tasks is one `srun` and one step-creation RPC to slurmctld,
//! instead of one per node. Each task picks its own command, environment and log from the
//! step's task list (see `wrapper.rs`), so readiness, logs, status and restarts stay per
//! task. A task started again alone (a restart) is a group of one: a step of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prl_flow_backend::BackendError;
use tokio::sync::oneshot;

use crate::agent::{now_ms, Request, INBOX, WORK};
use crate::handles::{step_name, AllocHandle};
use crate::templates::{SrunVars, Templates};
use crate::wrapper::{dispatcher, task_list};
use crate::write_atomic;

/// How long a batch waits for one more spawn before it is launched.
pub(crate) const QUIET: Duration = Duration::from_millis(30);
/// How long a batch waits at most.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(300);

/// Written in a task's run dir once its step is requested: `ATTEMPT REQUEST TASKS STEP_NAME`,
/// so a later prl-flow knows the step may still start, and by which name SLURM lists it
/// (see `recover_step`).
pub(crate) const REQUEST_FILE: &str = "slurm-request";

/// One task waiting for its step.
pub(crate) struct Queued {
    pub(crate) task: String,
    pub(crate) host: String,
    pub(crate) run_dir: PathBuf,
    pub(crate) attempt: u64,
    pub(crate) program: String,
    pub(crate) service: bool,
    reply: Option<oneshot::Sender<Result<Posted, BackendError>>>,
}

impl Queued {
    pub(crate) fn new(spec: &prl_flow_backend::SpawnSpec, host: &str) -> Self {
        Self {
            task: spec.task.clone(),
            host: host.to_string(),
            run_dir: spec.run_dir.clone(),
            attempt: spec.attempt,
            program: spec.argv.first().cloned().unwrap_or_default(),
            service: spec.service,
            reply: None,
        }
    }
}

/// The request a task's step went out with.
#[derive(Debug, Clone)]
pub(crate) struct Posted {
    /// The agent's exit file of the request's `srun`.
    pub(crate) exit_file: PathBuf,
    /// Where that `srun`'s own output goes.
    pub(crate) out: PathBuf,
    /// How many tasks the step has.
    pub(crate) tasks: usize,
}

/// What a batch needs to be launched, fixed for the backend's life.
pub(crate) struct LaunchConfig {
    pub(crate) templates: Arc<Templates>,
    pub(crate) shell: String,
    pub(crate) prologue: Option<String>,
    pub(crate) srun_args: Vec<String>,
}

#[derive(Default)]
struct Batch {
    items: Vec<Queued>,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Collects spawns into batches and posts each batch's steps to the agent.
pub(crate) struct Launcher {
    config: Arc<LaunchConfig>,
    batch: Arc<Mutex<Batch>>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Launcher {
    pub(crate) fn new(config: LaunchConfig) -> Self {
        Self {
            config: Arc::new(config),
            batch: Arc::new(Mutex::new(Batch::default())),
        }
    }

    /// Queues a task (its task file is written) and returns once its step was requested.
    pub(crate) async fn launch(
        &self,
        alloc: &AllocHandle,
        agent_dir: &Path,
        task: Queued,
    ) -> Result<Posted, BackendError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut b = self
                .batch
                .lock()
                .map_err(|_| BackendError::new("the launcher's lock is poisoned"))?;
            let now = Instant::now();
            b.items.push(Queued {
                reply: Some(tx),
                ..task
            });
            b.last = Some(now);
            b.first.get_or_insert(now);
            b.items.len() == 1
        };
        if lead {
            // The batch is launched by a task of its own: a spawn that is cancelled (an
            // interrupted run) must not strand the others of its batch.
            let batch = self.batch.clone();
            let config = self.config.clone();
            let alloc = alloc.clone();
            let agent_dir = agent_dir.to_path_buf();
            tokio::spawn(async move {
                let items = loop {
                    tokio::time::sleep(QUIET).await;
                    let Ok(mut b) = batch.lock() else { return };
                    let quiet = b.last.is_some_and(|l| l.elapsed() >= QUIET);
                    let long = b.first.is_some_and(|f| f.elapsed() >= MAX_WAIT);
                    if quiet || long {
                        let items = std::mem::take(&mut b.items);
                        b.first = None;
                        b.last = None;
                        break items;
                    }
                };
                post_batch(&config, &alloc, &agent_dir, items);
            });
        }
        rx.await.map_err(|_| {
            BackendError::new("the step launcher went away before the step was requested")
        })?
    }
}

/// Splits a batch into steps and posts each to the agent; answers every task.
fn post_batch(config: &LaunchConfig, alloc: &AllocHandle, agent_dir: &Path, items: Vec<Queued>) {
    // Same role, program and kind: one group, in arrival order.
    let mut groups: Vec<((String, String, bool), Vec<Queued>)> = Vec::new();
    for q in items {
        let key = (role(&q.task).to_string(), q.program.clone(), q.service);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(q),
            None => groups.push((key, vec![q])),
        }
    }
    for ((_, _, service), tasks) in groups {
        // Per node, in arrival order; nodes with the same number of tasks share a step.
        let mut by_host: BTreeMap<String, Vec<Queued>> = BTreeMap::new();
        for q in tasks {
            by_host.entry(q.host.clone()).or_default().push(q);
        }
        let mut by_count: BTreeMap<usize, Vec<(String, Vec<Queued>)>> = BTreeMap::new();
        for (host, qs) in by_host {
            by_count.entry(qs.len()).or_default().push((host, qs));
        }
        for (per_node, hosts) in by_count {
            let mut hosts = hosts;
            let result = post_step(config, alloc, agent_dir, service, per_node, &hosts);
            for (_, qs) in hosts.iter_mut() {
                for q in qs.iter_mut() {
                    if let Some(tx) = q.reply.take() {
                        let _ = tx.send(result.clone());
                    }
                }
            }
        }
    }
}

/// A task's role: its id up to the first `[` or `.` (`decode` of `decode[1].rank[0]`,
/// `mooncake-client` of `mooncake-client.node[3]`). Tasks of one role started together
/// share a step; a step never mixes roles, so cancelling one (an admin's `scancel`) takes
/// down one kind of service.
fn role(task: &str) -> &str {
    task.split(['[', '.']).next().unwrap_or(task)
}

/// One step: its task list, its request (`srun` of the dispatcher over the list), and the
/// request file in each task's run dir.
fn post_step(
    config: &LaunchConfig,
    alloc: &AllocHandle,
    agent_dir: &Path,
    service: bool,
    per_node: usize,
    hosts: &[(String, Vec<Queued>)],
) -> Result<Posted, BackendError> {
    let tasks = hosts.len() * per_node;
    let id = format!(
        "{}-{}-{}",
        now_ms(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let work = agent_dir.join(WORK);
    let list = work.join(format!("{id}.list"));
    let out = work.join(format!("{id}.out"));
    let text = task_list(hosts.iter().flat_map(|(h, qs)| {
        qs.iter()
            .enumerate()
            .map(move |(i, q)| (h.as_str(), i, q.run_dir.as_path()))
    }));
    std::fs::create_dir_all(&work)?;
    write_atomic(&list, text.as_bytes())?;
    let first = &hosts[0].1[0].task;
    let name = if tasks == 1 {
        step_name(first)
    } else {
        format!("{}+{}", step_name(first), tasks - 1)
    };
    let host_list: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
    let cpus = alloc.cpus_per_node.max(1) as usize;
    let agent_dir_s = agent_dir.to_string_lossy().into_owned();
    let out_s = out.to_string_lossy().into_owned();
    let mut argv = config
        .templates
        .srun(&SrunVars {
            job_id: &alloc.job,
            host: &host_list.join(","),
            nodes: hosts.len(),
            ntasks: tasks,
            ntasks_per_node: per_node,
            step_name: &name,
            run_dir: &agent_dir_s,
            log: &out_s,
            cpus_per_task: (cpus / per_node).max(1) as u32,
            overcommit: per_node > cpus,
            service,
            srun_args: &config.srun_args,
        })
        .map_err(BackendError::new)?;
    argv[0] = alloc.slurm.program(&argv[0]).to_string_lossy().into_owned();
    argv.extend(dispatcher(&config.shell, config.prologue.as_deref()));
    argv.push(list.to_string_lossy().into_owned());
    let mut env = BTreeMap::new();
    if let Some(conf) = &alloc.slurm.conf {
        env.insert(
            "SLURM_CONF".to_string(),
            conf.to_string_lossy().into_owned(),
        );
    }
    tracing::debug!(
        "step {name} ({tasks} task(s) on {} node(s)): {}",
        hosts.len(),
        shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default()
    );
    for (_, qs) in hosts {
        for q in qs {
            write_atomic(
                &q.run_dir.join(REQUEST_FILE),
                format!("{} {id} {tasks} {name}\n", q.attempt).as_bytes(),
            )?;
        }
    }
    let req = Request {
        argv,
        env,
        out: out.clone(),
    };
    let bytes = serde_json::to_vec(&req)
        .map_err(|e| BackendError::new(format!("cannot write a step request: {e}")))?;
    std::fs::create_dir_all(agent_dir.join(INBOX))?;
    write_atomic(&agent_dir.join(INBOX).join(format!("{id}.json")), &bytes)?;
    Ok(Posted {
        exit_file: work.join(format!("{id}.exit")),
        out,
        tasks,
    })
}

/// A task's request file.
pub(crate) struct RequestFile {
    pub(crate) attempt: u64,
    pub(crate) id: String,
    pub(crate) tasks: usize,
    pub(crate) step_name: String,
}

pub(crate) fn read_request_file(run_dir: &Path) -> Option<RequestFile> {
    let text = std::fs::read_to_string(run_dir.join(REQUEST_FILE)).ok()?;
    let mut w = text.split_whitespace();
    Some(RequestFile {
        attempt: w.next()?.parse().ok()?,
        id: w.next()?.to_string(),
        tasks: w.next()?.parse().ok()?,
        step_name: w.next()?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::Cluster;

    fn queued(
        task: &str,
        host: &str,
        dir: &Path,
    ) -> (Queued, oneshot::Receiver<Result<Posted, BackendError>>) {
        let (tx, rx) = oneshot::channel();
        let run_dir = dir.join("run").join(task);
        std::fs::create_dir_all(&run_dir).expect("run dir");
        (
            Queued {
                task: task.into(),
                host: host.into(),
                run_dir,
                attempt: 5,
                program: "vllm".into(),
                service: true,
                reply: Some(tx),
            },
            rx,
        )
    }

    /// A batch becomes one step per role and per number of tasks a node carries, each a
    /// request in the agent's inbox, with a task list naming every task's node and slot.
    #[test]
    fn a_batch_becomes_one_step_per_role_and_shape() {
        assert_eq!(role("decode[1].rank[0]"), "decode");
        assert_eq!(role("mooncake-client.node[3]"), "mooncake-client");
        assert_eq!(role("router"), "router");
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("agent");
        let alloc = AllocHandle {
            job: "12".into(),
            nodes: BTreeMap::new(),
            cpus_per_node: 4,
            log: None,
            slurm: Cluster::default(),
        };
        let config = LaunchConfig {
            templates: Arc::new(Templates::load(None).expect("templates")),
            shell: "sh".into(),
            prologue: None,
            srun_args: Vec::new(),
        };
        let mut replies = Vec::new();
        let mut items = Vec::new();
        for (task, host) in [
            ("engine[0].rank[0]", "n1"),
            ("engine[0].rank[1]", "n1"),
            ("engine[1].rank[0]", "n2"),
            ("engine[1].rank[1]", "n2"),
            ("engine[2].rank[0]", "n3"),
            ("mooncake-client.node[0]", "n1"),
        ] {
            let (q, rx) = queued(task, host, dir.path());
            items.push(q);
            replies.push((task, rx));
        }
        post_batch(&config, &alloc, &agent, items);
        let posted: BTreeMap<&str, Posted> = replies
            .into_iter()
            .map(|(t, mut rx)| (t, rx.try_recv().expect("answered").expect("posted")))
            .collect();
        // Two engine shapes (two ranks on n1 and n2, one on n3) and the client: three steps.
        let mut inbox: Vec<String> = std::fs::read_dir(agent.join(INBOX))
            .expect("inbox")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        inbox.sort();
        assert_eq!(inbox.len(), 3, "{inbox:?}");
        assert_eq!(posted["engine[0].rank[0]"].tasks, 4);
        assert_eq!(
            posted["engine[0].rank[0]"].exit_file,
            posted["engine[1].rank[1]"].exit_file
        );
        assert_eq!(posted["engine[2].rank[0]"].tasks, 1);
        assert_eq!(posted["mooncake-client.node[0]"].tasks, 1);
        let id = posted["engine[0].rank[0]"]
            .exit_file
            .file_stem()
            .expect("id")
            .to_string_lossy()
            .into_owned();
        let list =
            std::fs::read_to_string(agent.join(WORK).join(format!("{id}.list"))).expect("list");
        let run = dir.path().join("run");
        assert_eq!(
            list,
            format!(
                "n1 0 {r}/engine[0].rank[0]\nn1 1 {r}/engine[0].rank[1]\nn2 0 {r}/engine[1].rank[0]\nn2 1 {r}/engine[1].rank[1]\n",
                r = run.display()
            )
        );
        let req: Request = serde_json::from_slice(
            &std::fs::read(agent.join(INBOX).join(format!("{id}.json"))).expect("request"),
        )
        .expect("json");
        for flag in [
            "--nodelist=n1,n2",
            "--nodes=2",
            "--ntasks=4",
            "--ntasks-per-node=2",
            "--cpus-per-task=2",
            "--job-name=pf:engine_0_.rank_0_+3",
        ] {
            assert!(
                req.argv.iter().any(|a| a == flag),
                "{flag} not in {:?}",
                req.argv
            );
        }
        let r = read_request_file(&run.join("engine[1].rank[1]")).expect("request file");
        assert_eq!((r.attempt, r.id.as_str(), r.tasks), (5, id.as_str(), 4));
        assert_eq!(r.step_name, "pf:engine_0_.rank_0_+3");
    }
}
