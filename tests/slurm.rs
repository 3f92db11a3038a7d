//! The slurm backend against a real SLURM: a slurmctld and four slurmd started on this
//! machine by `tests/support/slurm/cluster.sh` (256 on loopback addresses for the scale test
//! at the end, `at_256_nodes_the_login_node_holds_nothing_and_steps_follow_groups`).
//!
//! **One cluster per test, one test at a time.** Each test starts its own cluster (well
//! under a second) and a [`TestCluster`] guard stops it when the test ends, passing or not:
//! every job is cancelled, the daemons and whatever still runs in the nodes' network
//! namespaces are killed by pid, the namespaces and the bridge removed. The daemons get free
//! ports, the names a tag and the nodes a /24 of their own, each claimed for the life of the
//! test process (`common::claim_port`, `netns::claim_tag`, `netns::free_subnet`: a locked
//! file per value in a directory all test processes share), so two test processes (two
//! checkouts, two sessions) never meet; inside this binary the tests take
//! turns ([`serial`]) because a deployment's services use fixed ports on the node addresses
//! and there are two cores to share.
//!
//! **Why network namespaces.** Every node is a namespace with its own address on a private
//! bridge (slurmd runs in it, and so does every step it starts). Distinct loopback
//! addresses would separate TCP ports, but `mooncake_client` also binds an abstract Unix
//! socket named after its port, and four clients in one namespace clash where four machines
//! would not. When namespaces cannot be made the cluster falls back to loopback addresses
//! and the Mooncake tests are skipped, loudly.
//!
//! **What needs what.** Every test needs `slurm-wlm` and `munge` (else all are skipped with a
//! loud message). The deployment tests also need the router (`PRL_FLOW_ROUTER`, or the venv
//! `./dev` installs) and Mooncake (`PRL_FLOW_MOONCAKE`: the bin dir of a venv with
//! `mooncake-transfer-engine-non-cuda==0.3.13.post1`, default
//! `~/.cache/prl-flow/mooncake-0.3.13.post1/bin`). Mooncake runs with protocol `tcp`.
//!
//! Tests through the `prl-flow` binary are at the end. The benchmark of docs/benchmarks.md ("SLURM bring-up") is
//! `bench_bring_up_against_a_sequential_sbatch_script`.

mod common;
#[path = "support/netns.rs"]
mod netns;

use netns::free_subnet;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prl_flow::actions::Action;
use prl_flow::plan::{Command as Cmd, Plan, Probe, Readiness, TaskSpec};
use prl_flow::recipe::{load, Launcher, Options};
use prl_flow::session::{self, DownReport, RunSettings, Session};
use prl_flow_backend::{Backend, ProcHandle, ProcState, SpawnSpec};
use prl_flow_engine::{Decision, Record, Report, Status};
use prl_flow_slurm::SlurmBackend;
use serde_json::{json, Value};

/// The `allocate` task's id and kind.
const ALLOCATE: &str = prl_flow::actions::Action::Allocate.name();

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/slurm/cluster.sh"
);
const RECIPE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/disaggregated.toml");
/// The env var that turns [`driver`] into a `prl-flow run` of its own (see there).
const DRIVER_ENV: &str = "PRL_FLOW_SLURM_TEST_DRIVER";
/// The prl-flow program the allocation's agent runs as (the tests drive the backend from a
/// test binary, which cannot be the agent).
const AGENT: &str = env!("CARGO_BIN_EXE_prl-flow");

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tests of this binary take turns (see the module doc).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

fn have_slurm() -> bool {
    let found = |p: &str| {
        [
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/usr/local/sbin",
            "/usr/local/bin",
        ]
        .iter()
        .any(|d| Path::new(d).join(p).exists())
    };
    common::prerequisite(
        found("slurmctld") && found("slurmd") && found("munged") && found("srun"),
        "SLURM (slurmctld, slurmd, munged, srun; the slurm backend is NOT tested)",
        "apt-get install -y slurm-wlm munge, or run `./dev test`",
    )
}

/// A private cluster; stopped on drop.
struct TestCluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    /// (SLURM node name, address), in order.
    nodes: Vec<(String, String)>,
    netns: bool,
}

impl TestCluster {
    /// 4 nodes (`gpus` fake GPUs each); `None` (after a loud message) without SLURM.
    fn up(gpus: u32) -> Option<TestCluster> {
        if !have_slurm() {
            return None;
        }
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let net = free_subnet(50, std::process::id(), k);
        let c = Self::start(4, gpus, &net, None)?;
        if !c.netns {
            common::prerequisite(
                false,
                "network namespaces (the nodes share one; Mooncake tests are SKIPPED)",
                "run as root with iproute2 installed, in a container with CAP_NET_ADMIN",
            );
        }
        Some(c)
    }

    /// `nodes` nodes on loopback addresses of a /16 of their own (`127.A.*`): a big cluster
    /// without namespaces (no Mooncake on it), for the scale test.
    fn big(nodes: usize) -> Option<TestCluster> {
        if !have_slurm() {
            return None;
        }
        let net = common::claim_first("net", (200..=254).map(|a| format!("127.{a}")), |_| true);
        Self::start(nodes, 0, &net, Some(false))
    }

    fn start(nodes: usize, gpus: u32, net: &str, netns: Option<bool>) -> Option<TestCluster> {
        // Claimed for the life of this process: no other test process gets them meanwhile.
        let tag = netns::claim_tag();
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<String> = (0..nodes)
            .map(|_| common::claim_port().to_string())
            .collect();
        let mut cmd = Command::new("bash");
        cmd.arg(SCRIPT)
            .arg("start")
            .arg(dir.path())
            .env("SLURM_NODES", nodes.to_string())
            .env("SLURM_TAG", &tag)
            .env("SLURM_NET", net)
            .env("SLURM_CTLD_PORT", common::claim_port().to_string())
            .env("SLURMD_PORTS", ports.join(","))
            .env("SLURM_GPUS", gpus.to_string())
            .env_remove("SLURM_CONF");
        if let Some(n) = netns {
            cmd.env("SLURM_NETNS", if n { "1" } else { "0" });
        }
        let out = cmd.output().expect("run cluster.sh");
        // Build the guard first: a failed start is cleaned up too.
        let mut c = TestCluster {
            conf: dir.path().join("slurm.conf"),
            dir,
            nodes: Vec::new(),
            netns: false,
        };
        assert!(
            out.status.success(),
            "cluster.sh start failed:\n{}\n--- slurmctld log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(c.dir.path().join("log/slurmctld.log")).unwrap_or_default()
        );
        let nodes = std::fs::read_to_string(c.dir.path().join("nodes")).expect("nodes file");
        for l in nodes.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            c.nodes.push((w[0].to_string(), w[1].to_string()));
            c.netns = w[2] != "-";
        }
        Some(c)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A SLURM client command against this cluster; its stdout.
    fn slurm(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Running steps: (step id, name, node).
    fn steps(&self) -> Vec<(String, String, String)> {
        // squeue's step format has no node list field (`%N` is the job's): ask scontrol.
        let ids: Vec<String> = self
            .slurm("squeue", &["-h", "-s", "-o", "%i|%j"])
            .lines()
            .filter_map(|l| l.split_once('|'))
            .filter(|(id, _)| !id.ends_with(".batch") && !id.ends_with(".extern"))
            .map(|(id, name)| format!("{id}|{name}"))
            .collect();
        ids.iter()
            .map(|l| {
                let (id, name) = l.split_once('|').expect("split");
                let show = self.slurm("scontrol", &["show", "step", id]);
                let node = show
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("NodeList="))
                    .unwrap_or("")
                    .to_string();
                (id.to_string(), name.to_string(), node)
            })
            .collect()
    }

    /// Jobs SLURM still runs or will run.
    fn jobs(&self) -> Vec<String> {
        self.slurm("squeue", &["-h", "-o", "%i %T"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// How many tasks the running steps carry, together: a task started twice counts twice.
    fn live_tasks(&self) -> usize {
        self.steps()
            .iter()
            .map(|(id, _, _)| {
                let show = self.slurm("scontrol", &["show", "step", id]);
                show.split_whitespace()
                    .find_map(|w| w.strip_prefix("Tasks="))
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or_else(|| panic!("no task count for step {id}: {show}"))
            })
            .sum()
    }

    /// A `bin_dir` whose SLURM commands log each call to `calls.log`, then run the real one.
    fn counting_bin_dir(&self) -> PathBuf {
        let bin = self.dir().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        for tool in ["sbatch", "srun", "squeue", "scancel", "scontrol"] {
            let real = ["/usr/bin", "/usr/local/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(tool));
            let path = bin.join(tool);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho \"{tool} $*\" >> '{}'\nexec '{}' \"$@\"\n",
                    self.dir().join("calls.log").display(),
                    real.display()
                ),
            )
            .expect("write");
            let _ = Command::new("chmod").arg("+x").arg(&path).status();
        }
        bin
    }

    fn calls(&self, tool: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{tool} ")))
            .map(String::from)
            .collect()
    }

    /// The `[backend]` table of a test: the cluster's SLURM_CONF and what the steps need on
    /// PATH (Mooncake's venv), over the recipe's own fields.
    fn config(&self, recipe: &Value, extra: Value) -> Value {
        let mut c = recipe.as_object().cloned().unwrap_or_default();
        c.insert("slurm_conf".into(), json!(self.conf));
        c.insert("agent".into(), json!(AGENT));
        c.insert("poll".into(), json!("200ms"));
        if let Some(bin) = mooncake_bin() {
            let dir = shlex::try_quote(&bin.to_string_lossy())
                .expect("quote")
                .into_owned();
            c.insert(
                "prologue".into(),
                json!(format!("export PATH={dir}:\"$PATH\"")),
            );
        }
        if let Value::Object(m) = extra {
            c.extend(m);
        }
        Value::Object(c)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(self.dir.path())
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!("cluster.sh stop: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

/// The bin dir of the Mooncake venv, if installed.
fn mooncake_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PRL_FLOW_MOONCAKE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let p = home.join("prl-flow/mooncake-0.3.13.post1/bin");
    p.join("mooncake_master").exists().then_some(p)
}

/// Router and Mooncake, or a loud skip.
fn deployment_prerequisites(c: &TestCluster) -> Option<PathBuf> {
    let router = common::router_or_skip()?;
    if !common::prerequisite(
        mooncake_bin().is_some(),
        "Mooncake (mooncake_master)",
        "run `./dev test`, or pip install mooncake-transfer-engine-non-cuda==0.3.13.post1 into ~/.cache/prl-flow/mooncake-0.3.13.post1, or set PRL_FLOW_MOONCAKE to its bin dir",
    ) {
        return None;
    }
    if !c.netns {
        return None;
    }
    Some(router)
}

/// recipes/disaggregated.toml as these tests run it: Mooncake over TCP (no RDMA here), a
/// 64 MiB segment per node instead of 100 GiB, two GPUs a node (one rank of tp 2); `pairs`: two
/// P/D units of one prefill and one decode node instead of one unit of two-node replicas.
fn recipe_text(pairs: bool) -> String {
    let text = std::fs::read_to_string(RECIPE).expect("recipe");
    // Two GPUs a node: one rank of tp 2 on each, so four engines on four nodes.
    let text = text
        .replace("protocol = \"rdma\"", "protocol = \"tcp\"")
        .replace("num_bytes = 107374182400", "num_bytes = 67108864")
        .replace("gpus_per_node = 8", "gpus_per_node = 2");
    if pairs {
        // Two P/D units of one prefill and one decode node, a router each.
        let two = text
            .replace("num_prefill_nodes = 2 ", "num_prefill_nodes = 1 ")
            .replace("num_decode_nodes = 2 ", "num_decode_nodes = 1 ")
            .replace("num_replicas = 1 ", "num_replicas = 2 ");
        assert_ne!(two, text, "the recipe's counts moved");
        two
    } else {
        text
    }
}

/// The recipe without its `[inference.kv_cache_offload]` table (and so without the
/// Mooncake store's tasks).
fn without_offload(text: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skip = line.trim() == "[inference.kv_cache_offload]";
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_ne!(out, text, "the recipe has no offload table");
    out
}

fn plan_of(text: &str, router: &Path) -> Plan {
    let opts = Options {
        launcher: Launcher::Mock {
            argv_prefix: vec![common::mock_engine()],
        },
        router: Some(vec![router.to_string_lossy().into_owned()]),
        ..Default::default()
    };
    load(
        "disaggregated.toml",
        Arc::new(text.to_string()),
        "disaggregated",
        &opts,
    )
    .unwrap_or_else(|p| panic!("the test recipe does not plan:\n{}", p.render(false)))
}

/// `prl-flow run [--resume]`, through the session API the CLI uses. Returns the report and
/// the decisions.
async fn run_plan(
    plan: &Plan,
    backend: Arc<dyn Backend>,
    dir: &Path,
    resume: bool,
) -> (Report, BTreeMap<String, Decision>) {
    let settings = RunSettings {
        jobs: Some(256),
        resume,
        holder: "tests/slurm.rs".into(),
        ..RunSettings::default()
    };
    let prepared = session::run::prepare(plan, backend, dir, &settings)
        .await
        .expect("prepare the run");
    let named = prepared.named_decisions();
    let ran = prepared
        .execute(Vec::new(), prl_flow_engine::Cancel::never())
        .await
        .expect("run");
    (ran.report, named)
}

/// `prl-flow down` for a SLURM deployment, through the session API the CLI uses
/// (docs/slurm.md, "Status, stop, down"): everything the journal records, one `scancel` per
/// job.
async fn down(dir: &Path) -> DownReport {
    Session::default()
        .down(dir, &mut |_| {})
        .await
        .expect("down")
}

fn errors(r: &Report) -> String {
    r.errors
        .iter()
        .flatten()
        .map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

fn records(dir: &Path) -> BTreeMap<String, Record> {
    prl_flow_engine::journal::load(dir).expect("journal")
}

/// The process handle a record keeps.
fn proc_handle(r: &Record) -> ProcHandle {
    ProcHandle::try_from(r.handle.as_ref().expect("handle")).expect("a process handle")
}

/// Task id → its step id, from the journal.
fn step_ids(dir: &Path) -> BTreeMap<String, String> {
    records(dir)
        .into_values()
        .filter_map(|r| {
            let step = r.handle?.get("payload")?.get("step")?.as_str()?.to_string();
            Some((r.id, step))
        })
        .collect()
}

fn handle_field(dir: &Path, id: &str, field: &str) -> String {
    records(dir)
        .get(id)
        .and_then(|r| {
            let payload = r.handle.as_ref()?.get("payload")?;
            payload.get(field)?.as_str().map(String::from)
        })
        .unwrap_or_else(|| panic!("no `{field}` in the handle of `{id}`"))
}

async fn http_get(url: &str) -> Option<u16> {
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    c.get(url).send().await.ok().map(|r| r.status().as_u16())
}

async fn eventually<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task's role, as the backend groups tasks into steps: its id up to the first `[` or `.`.
fn role(id: &str) -> &str {
    id.split(['[', '.']).next().unwrap_or(id)
}

/// The roles of the plan's tasks that run a command (one step each when they start
/// together).
fn roles(plan: &Plan) -> BTreeSet<String> {
    plan.tasks
        .iter()
        .filter(|t| !matches!(t.command, Cmd::Builtin { .. }))
        .map(|t| role(&t.id).to_string())
        .collect()
}

/// Step names that run more than once.
fn duplicates(steps: &[(String, String, String)]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    steps
        .iter()
        .filter(|(_, n, _)| !seen.insert(n.clone()))
        .map(|(_, n, _)| n.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_recipe_comes_up_on_four_nodes_and_down_leaves_nothing() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    let plan = plan_of(&recipe_text(false), &router);
    let state = cluster.dir().join("state");
    let bin = cluster.counting_bin_dir();
    let config = cluster.config(&plan.backend_config, json!({ "bin_dir": bin }));
    let backend = Arc::new(SlurmBackend::from_config(&config, &state).expect("config"));

    let began = Instant::now();
    let (report, _) = run_plan(&plan, backend.clone(), &state, false).await;
    assert!(report.ok(), "the run failed:\n{}", errors(&report));
    eprintln!("up in {:.1} s", began.elapsed().as_secs_f64());

    // One job; steps that never mix roles, fewer steps than tasks (the Mooncake clients
    // start together and share one), every task with a command running once, each where
    // the plan put it. (The engines of a role need each its own node's store client, whose
    // probes may pass a probe interval apart: they may get a step each.)
    assert_eq!(cluster.jobs().len(), 1, "{:?}", cluster.jobs());
    let steps = cluster.steps();
    let commands = plan
        .tasks
        .iter()
        .filter(|t| !matches!(t.command, Cmd::Builtin { .. }))
        .count();
    let mut roles_of_step: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, step) in step_ids(&state) {
        roles_of_step
            .entry(step)
            .or_default()
            .insert(role(&id).to_string());
    }
    assert!(
        roles_of_step.values().all(|r| r.len() == 1),
        "a step mixes roles: {roles_of_step:?}"
    );
    assert_eq!(
        roles_of_step
            .values()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>(),
        roles(&plan),
        "{roles_of_step:?}"
    );
    assert!(steps.len() < commands, "{steps:?}");
    assert_eq!(steps.len(), roles_of_step.len(), "{steps:?}");
    assert_eq!(cluster.live_tasks(), commands, "{steps:?}");
    assert!(duplicates(&steps).is_empty(), "{steps:?}");
    let node_of = |id: &str| handle_field(&state, id, "host");
    let prefill = node_of("prefill[0].rank[0]");
    let decode = node_of("decode[0].rank[0]");
    assert_ne!(
        prefill, decode,
        "prefill and decode must run on distinct nodes"
    );
    let engines: BTreeSet<String> = [
        "prefill[0].rank[0]",
        "prefill[0].rank[1]",
        "decode[0].rank[0]",
        "decode[0].rank[1]",
    ]
    .iter()
    .map(|id| node_of(id))
    .collect();
    assert_eq!(engines.len(), 4, "each engine on its own node: {engines:?}");
    // Every step carries tasks of the journal, each on one of the step's nodes.
    let recorded = step_ids(&state);
    for (id, name, nodes) in &steps {
        let hosts = cluster.slurm("scontrol", &["show", "hostnames", nodes]);
        let tasks: Vec<&String> = recorded
            .iter()
            .filter(|(_, s)| *s == id)
            .map(|(t, _)| t)
            .collect();
        assert!(
            !tasks.is_empty(),
            "step {id} `{name}` is not in the journal"
        );
        for t in tasks {
            let host = handle_field(&state, t, "host");
            assert!(
                hosts.lines().any(|h| h == host),
                "{t} on {host}, step {id} on {nodes}"
            );
        }
    }
    // Mooncake: the master on the head node, a client on every node, each engine with its
    // own MOONCAKE_CONFIG_PATH pointing at them over TCP.
    assert_eq!(node_of("mooncake-master"), cluster.nodes[0].0);
    assert_eq!(node_of("metadata-server"), cluster.nodes[0].0);
    for k in 0..4 {
        assert_eq!(
            node_of(&format!("mooncake-client.node[{k}]")),
            cluster.nodes[k].0
        );
    }
    let master = &cluster.nodes[0].1;
    let health = http_get(&format!("http://{master}:9003/health")).await;
    assert_eq!(health, Some(200));
    for id in ["prefill[0].rank[0]", "decode[0].rank[1]"] {
        let path = handle_field(&state, id, "run_dir");
        let conf: Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(&path).join("mooncake.json"))
                .expect("mooncake.json"),
        )
        .expect("json");
        assert_eq!(conf["protocol"], "tcp");
        assert_eq!(conf["master_server_address"], format!("{master}:50051"));
    }
    // The router answers through the deployment.
    let endpoint = plan
        .endpoint
        .clone()
        .expect("endpoint")
        .replace("${host:node0}", master);
    assert_eq!(http_get(&format!("{endpoint}/readiness")).await, Some(200));

    // A later process sees it all from the journal alone.
    let later =
        SlurmBackend::from_handle(&proc_handle(&records(&state)["router"])).expect("from handle");
    for r in records(&state)
        .values()
        .filter(|r| r.service && r.kind != ALLOCATE)
    {
        let st = later.status(&proc_handle(r)).await.expect("status");
        assert_eq!(st, ProcState::Running, "{}", r.id);
    }

    // down: one scancel for the whole deployment, and nothing left in squeue.
    let before = cluster.calls("scancel").len();
    let report = down(&state).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(report.stopped >= commands, "{report:?}");
    let scancels = cluster.calls("scancel");
    assert!(
        scancels.len() <= before + 1,
        "down must cancel per job, not per step: {:?}",
        &scancels[before..]
    );
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
    assert!(cluster.steps().is_empty());
    assert!(records(&state)
        .values()
        .filter(|r| r.service)
        .all(|r| r.status == Status::Stopped));
}

// One thread, as `prl-flow run`'s runtime: spawns started together reach the step
// launcher before its timer can run, so they share a step whatever the machine's load.
#[tokio::test]
async fn a_step_cancelled_with_scancel_shows_in_status_and_resume_restarts_only_it() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    // Without the Mooncake store: every engine then needs only the allocation, so the
    // engine spawns all four at once and the two decode ranks go into one step. (With it,
    // each engine waits for its own node's store client, whose probes may answer a probe
    // interval apart: then the decode ranks arrive apart and may get a step each.)
    let plan = plan_of(&without_offload(&recipe_text(true)), &router);
    let state = cluster.dir().join("state");
    let config = cluster.config(&plan.backend_config, json!({}));
    let (report, _) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        false,
    )
    .await;
    assert!(report.ok(), "the run failed:\n{}", errors(&report));
    let before = step_ids(&state);

    // An admin (or the OOM killer's SLURM) cancels one engine step: the decode ranks'.
    let step = before["decode[1].rank[0]"].clone();
    let victims: BTreeSet<String> = before
        .iter()
        .filter(|(_, s)| **s == step)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        victims.len() > 1,
        "the decode ranks share a step: {before:?}"
    );
    cluster.slurm("scancel", &[&step]);
    eventually("the step to end", Duration::from_secs(30), || async {
        (!cluster.steps().iter().any(|(id, _, _)| *id == step)).then_some(())
    })
    .await;

    // `status` in another process: the step's tasks are down, everything else up.
    let h = proc_handle(&records(&state)["decode[1].rank[0]"]);
    let later = SlurmBackend::from_handle(&h).expect("from handle");
    for v in &victims {
        let h = proc_handle(&records(&state)[v]);
        assert_eq!(
            later.status(&h).await.expect("status"),
            ProcState::Gone,
            "{v}"
        );
    }
    for r in records(&state)
        .values()
        .filter(|r| r.service && r.kind != ALLOCATE && !victims.contains(&r.id))
    {
        assert_eq!(
            later.status(&proc_handle(r)).await.expect("status"),
            ProcState::Running,
            "{}",
            r.id
        );
    }

    // --resume: the cancelled step's tasks start again in the same allocation; of the others
    // only their dependents (their pairs' routers and what follows them) run again.
    let (report, decisions) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        true,
    )
    .await;
    assert!(report.ok(), "the resume failed:\n{}", errors(&report));
    let rerun: BTreeSet<&str> = decisions
        .iter()
        .filter(|(_, d)| matches!(d, Decision::Run(_)))
        .map(|(id, _)| id.as_str())
        .collect();
    let units: BTreeSet<&str> = victims
        .iter()
        .filter_map(|v| {
            v.split_once('[')
                .and_then(|(_, r)| r.split_once(']'))
                .map(|(u, _)| u)
        })
        .collect();
    let mut expected: BTreeSet<String> = victims.clone();
    for u in &units {
        for t in ["router", "register", "health-probe"] {
            expected.insert(format!("{t}[{u}]"));
        }
    }
    assert_eq!(
        rerun,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "{decisions:?}"
    );
    let after = step_ids(&state);
    for (id, s) in &before {
        if victims.contains(id) || id.starts_with("router[") {
            assert_ne!(&after[id], s, "{id} was started again");
        } else {
            assert_eq!(&after[id], s, "{id} must keep its step");
        }
    }
    let steps = cluster.steps();
    assert!(duplicates(&steps).is_empty(), "{steps:?}");
    assert_eq!(cluster.jobs().len(), 1);
    assert!(down(&state).await.failures.is_empty());
    assert!(cluster.jobs().is_empty());
}

/// Not a test of its own: the `prl-flow run` that
/// [`kill_9_mid_run_then_resume_adopts_what_became_ready_and_starts_nothing_twice`] kills.
/// It runs only as that test's child process, with [`DRIVER_ENV`] naming a JSON file:
/// `{ "recipe": TEXT, "router": PATH, "state": DIR, "config": {...} }`, or with
/// `"small": PORT` instead of recipe and router, [`small_plan`] on two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: run as the child process of the kill -9 tests"]
async fn driver() {
    let Some(file) = std::env::var_os(DRIVER_ENV) else {
        return;
    };
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(file).expect("driver args")).expect("json");
    let plan = match args["small"].as_u64() {
        Some(port) => small_plan(2, port as u16, "true"),
        None => plan_of(
            args["recipe"].as_str().expect("recipe"),
            Path::new(args["router"].as_str().expect("router")),
        ),
    };
    let state = PathBuf::from(args["state"].as_str().expect("state"));
    let backend = SlurmBackend::from_config(&args["config"], &state).expect("config");
    let (report, _) = run_plan(&plan, Arc::new(backend), &state, false).await;
    std::process::exit(if report.ok() { 0 } else { 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_resume_adopts_what_became_ready_and_starts_nothing_twice() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    let text = recipe_text(false);
    let plan = plan_of(&text, &router);
    let state = cluster.dir().join("state");
    let config = cluster.config(&plan.backend_config, json!({}));
    let args = cluster.dir().join("driver.json");
    std::fs::write(
        &args,
        json!({ "recipe": text, "router": router, "state": state, "config": config }).to_string(),
    )
    .expect("write");
    // Engines take 4 s to "load the model": the kill lands while they start.
    let mut child = spawn_driver(
        &cluster.dir().join("driver.log"),
        &args,
        &[("PRL_MOCK_STARTUP_DELAY", "4s")],
    );
    let engines = ["prefill[0].rank[0]", "decode[0].rank[0]"];
    eventually(
        "the engines' steps to start",
        Duration::from_secs(60),
        || async {
            let r = records(&state);
            engines
                .iter()
                .all(|id| {
                    r.get(*id)
                        .is_some_and(|r| r.status == Status::Running && r.handle.is_some())
                })
                .then_some(())
        },
    )
    .await;
    // kill -9: no teardown, no last journal write.
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let at_kill = step_ids(&state);
    let running_at_kill: Vec<String> = records(&state)
        .values()
        .filter(|r| r.status == Status::Running)
        .map(|r| r.id.clone())
        .collect();
    assert!(!running_at_kill.is_empty());

    // The steps go on without any prl-flow, and the engines become ready unwatched.
    for (k, id) in [(0, engines[0]), (2, engines[1])] {
        let url = format!("http://{}:8100/health", cluster.nodes[k].1);
        eventually(
            &format!("{id} to become ready"),
            Duration::from_secs(60),
            || async { (http_get(&url).await == Some(200)).then_some(()) },
        )
        .await;
    }

    let (report, decisions) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        true,
    )
    .await;
    assert!(report.ok(), "the resume failed:\n{}", errors(&report));
    // What was ready is kept, what was starting is adopted: none of it starts again.
    let after = step_ids(&state);
    for (id, step) in &at_kill {
        assert_eq!(
            &after[id],
            step,
            "{id} was started a second time ({:?})",
            decisions.get(id)
        );
    }
    for id in engines {
        assert!(
            matches!(decisions[id], Decision::Keep | Decision::Adopt),
            "{id}: {:?}",
            decisions[id]
        );
    }
    let steps = cluster.steps();
    assert!(
        duplicates(&steps).is_empty(),
        "a task runs twice: {steps:?}"
    );
    let commands = plan
        .tasks
        .iter()
        .filter(|t| !matches!(t.command, Cmd::Builtin { .. }))
        .count();
    assert_eq!(
        cluster.live_tasks(),
        commands,
        "a task runs twice: {steps:?}"
    );
    assert_eq!(cluster.jobs().len(), 1);
    assert!(down(&state).await.failures.is_empty());
    assert!(cluster.jobs().is_empty());
}

// ---------------------------------------------------------------------------------------
// Small plans: no router, no Mooncake.

fn task(id: &str, needs: &[&str], node: Option<&str>, command: Cmd, service: bool) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        kind: if id == ALLOCATE {
            Action::Allocate.name().into()
        } else {
            "custom".into()
        },
        needs: needs.iter().map(|s| s.to_string()).collect(),
        node: node.map(String::from),
        command,
        service,
        ..Default::default()
    }
}

fn shell(script: &str) -> Cmd {
    Cmd::Shell {
        script: script.into(),
    }
}

/// allocate → a one-shot and a service (an HTTP server on node1), on `nodes` nodes.
fn small_plan(nodes: usize, port: u16, oneshot: &str) -> Plan {
    let allocate = task(
        ALLOCATE,
        &[],
        None,
        Cmd::Builtin {
            action: Action::Allocate,
            args: json!({ "nodes": nodes }),
        },
        false,
    );
    let check = task("check", &[ALLOCATE], Some("node0"), shell(oneshot), false);
    let mut server = task(
        "server",
        &[ALLOCATE],
        Some("node1"),
        Cmd::Argv {
            argv: vec![
                "python3".into(),
                "-m".into(),
                "http.server".into(),
                port.to_string(),
                "--bind".into(),
                "${host:node1}".into(),
            ],
        },
        true,
    );
    server.ready = Some(Readiness {
        probe: Probe::Tcp {
            addr: format!("${{host:node1}}:{port}"),
        },
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(1),
        start_period: Duration::ZERO,
        ready_timeout: Some(Duration::from_secs(60)),
    });
    Plan {
        name: "small".into(),
        backend: "slurm".into(),
        nodes: (0..nodes).map(|k| format!("node{k}")).collect(),
        tasks: vec![allocate, check, server],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_carry_the_site_options_and_outlive_the_backend_that_started_them() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(2) else {
        return;
    };
    let state = cluster.dir().join("state");
    let out = cluster.dir().join("env.txt");
    let oneshot = format!(
        "echo \"gpus=$CUDA_VISIBLE_DEVICES site=$SITE_VAR node=$SLURMD_NODENAME\" > '{}'; exit 0",
        out.display()
    );
    let plan = small_plan(2, 8765, &oneshot);
    let config = json!({
        "slurm_conf": cluster.conf, "agent": AGENT,
        "partition": "gpu",
        "time": "10:00",
        "gpus_per_node": 2,
        "exclusive": true,
        "sbatch_lines": ["#SBATCH --comment=prl-flow-test"],
        "prologue": "SITE_VAR=from-prologue; export SITE_VAR",
        "job_name": "pf-site-test",
        "poll": "200ms",
    });
    let backend = Arc::new(SlurmBackend::from_config(&config, &state).expect("config"));
    let (report, _) = run_plan(&plan, backend.clone(), &state, false).await;
    assert!(report.ok(), "{}", errors(&report));

    // The job got the site's options.
    let job = records(&state)[ALLOCATE]
        .handle
        .as_ref()
        .and_then(|h| h["handle"]["payload"]["job"].as_str().map(String::from))
        .expect("job id");
    let show = cluster.slurm("scontrol", &["show", "job", &job]);
    for needle in [
        "JobName=pf-site-test",
        "Partition=gpu",
        "TimeLimit=00:10:00",
        "Comment=prl-flow-test",
        "OverSubscribe=NO",
        "TresPerNode=gres:gpu:2",
    ] {
        assert!(show.contains(needle), "`{needle}` not in:\n{show}");
    }
    // The step: GPUs from SLURM, the prologue's environment, its node.
    let text = std::fs::read_to_string(&out).expect("the one-shot wrote its env");
    assert_eq!(
        text.trim(),
        format!("gpus=0,1 site=from-prologue node={}", cluster.nodes[0].0)
    );

    // A backend made from the handle alone (a later `status`) sees the service, stops it,
    // and reads its log.
    let h = proc_handle(&records(&state)["server"]);
    let later = SlurmBackend::from_handle(&h).expect("from handle");
    assert_eq!(later.status(&h).await.expect("status"), ProcState::Running);

    // A prl-flow killed between starting a step and recording it: a fresh backend finds
    // the step again, before it has checked the allocation (`run --resume` recovers first),
    // from the step file, or without it by the step's name in the state dir's job.
    let exec = prl_flow::exec::Exec::new(Arc::new(SlurmBackend::for_handles()), &state, Vec::new());
    let spec = SpawnSpec {
        task: "server".into(),
        node: Some("node1".into()),
        run_dir: exec.run_dir("server"),
        log: exec.log_path("server"),
        service: true,
        attempt: records(&state)["server"].started_ms.expect("started"),
        ..Default::default()
    };
    let step_file = exec.run_dir("server").join("slurm-step");
    let hidden = exec.run_dir("server").join("hidden");
    for round in ["by its file", "by its name"] {
        let fresh = SlurmBackend::from_config(&config, &state).expect("config");
        let found = fresh
            .recover(&spec)
            .await
            .expect("recover")
            .unwrap_or_else(|| panic!("not found {round}"));
        assert_eq!(
            (&found.payload["step"], &found.payload["host"]),
            (&h.payload["step"], &h.payload["host"]),
            "{round}"
        );
        assert_eq!(
            fresh.status(&found).await.expect("status"),
            ProcState::Running
        );
        if round == "by its file" {
            std::fs::rename(&step_file, &hidden).expect("hide the step file");
        }
    }
    std::fs::rename(&hidden, &step_file).expect("restore");
    // An older step file is an earlier attempt's.
    let fresh = SlurmBackend::from_config(&config, &state).expect("config");
    let later_attempt = prl_flow_engine::journal::now_ms() + 60_000;
    let other = SpawnSpec {
        task: "other".into(),
        attempt: later_attempt,
        ..spec.clone()
    };
    assert!(fresh.recover(&other).await.expect("recover").is_none());
    let url = format!("http://{}:8765/", cluster.nodes[1].1);
    assert_eq!(http_get(&url).await, Some(200));
    // The server logs a request once it has answered it.
    eventually(
        "the request in the log",
        Duration::from_secs(10),
        || async {
            let log = later.read_log(&h, 0).await.expect("log").0;
            log.contains("GET / HTTP").then_some(())
        },
    )
    .await;
    // A grace far longer than the step needs: a stop that has to fall back to SIGKILL
    // would take all of it.
    let began = Instant::now();
    later.stop(&h, Duration::from_secs(60)).await.expect("stop");
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "SIGTERM should do: {:?}",
        began.elapsed()
    );
    assert_ne!(later.status(&h).await.expect("status"), ProcState::Running);
    later
        .stop(&h, Duration::from_secs(5))
        .await
        .expect("stopping a stopped step is fine");
    // The one-shot's exit status outlives its srun.
    let c = proc_handle(&records(&state)["check"]);
    assert_eq!(
        later.status(&c).await.expect("status"),
        ProcState::Exited(Some(0))
    );

    let report = down(&state).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_nodes_than_the_partition_has_fails_with_slurms_reason() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let state = cluster.dir().join("state");
    // `small` has two nodes; the plan needs four.
    let plan = small_plan(4, 8766, "true");
    let config = json!({ "slurm_conf": cluster.conf, "agent": AGENT, "partition": "small" });
    let began = Instant::now();
    let (report, _) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        false,
    )
    .await;
    assert!(!report.ok());
    let e = errors(&report);
    assert!(
        e.contains("the plan needs 4 nodes and partition `small` has 2")
            && e.contains("pending with reason `Partition"),
        "{e}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "it must fail, not hang: {:?}",
        began.elapsed()
    );
    assert!(
        cluster.jobs().is_empty(),
        "the hopeless job is cancelled: {:?}",
        cluster.jobs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_refuses_once_the_allocation_has_ended() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let state = cluster.dir().join("state");
    let plan = small_plan(2, 8767, "true");
    let config = json!({ "slurm_conf": cluster.conf, "agent": AGENT, "poll": "200ms" });
    let (report, _) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        false,
    )
    .await;
    assert!(report.ok(), "{}", errors(&report));
    let job = records(&state)[ALLOCATE]
        .handle
        .as_ref()
        .and_then(|h| h["handle"]["payload"]["job"].as_str().map(String::from))
        .expect("job");

    // The allocation ends behind prl-flow's back (a time limit, an admin).
    cluster.slurm("scancel", &[&job]);
    eventually("the job to end", Duration::from_secs(60), || async {
        cluster.jobs().is_empty().then_some(())
    })
    .await;

    let (report, decisions) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        true,
    )
    .await;
    assert!(!report.ok());
    assert!(matches!(decisions[ALLOCATE], Decision::Run(_)));
    let e = errors(&report);
    assert!(
        e.contains("has ended") && e.contains(&format!("job {job}")) && e.contains("fresh run"),
        "{e}"
    );
    assert!(
        cluster.jobs().is_empty(),
        "no second allocation behind the journal's back: {:?}",
        cluster.jobs()
    );

    // A fresh run is fine.
    let (report, _) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        false,
    )
    .await;
    assert!(report.ok(), "{}", errors(&report));
    assert!(down(&state).await.failures.is_empty());
    assert!(cluster.jobs().is_empty());
}

// ---------------------------------------------------------------------------------------
// A run killed with its job queued or unrecorded; a step whose leader has exited.

/// A `prl-flow run` of [`small_plan`] in a process of its own ([`driver`]), to be killed.
fn small_driver(cluster: &TestCluster, state: &Path, port: u16, config: &Value) -> Child {
    let args = cluster.dir().join(format!("driver-{port}.json"));
    std::fs::write(
        &args,
        json!({ "small": port, "state": state, "config": config }).to_string(),
    )
    .expect("write");
    let log = cluster.dir().join(format!("driver-{port}.log"));
    Child(spawn_driver(&log, &args, &[]))
}

/// This test binary again, running only the ignored `driver` test with the arguments file `args` (through
/// [`DRIVER_ENV`]) and `env`, its output in `log`: a run of its own that a test may kill.
fn spawn_driver(log: &Path, args: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let log = std::fs::File::create(log).expect("log");
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "driver",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DRIVER_ENV, args)
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("driver")
}

/// A child process killed (`kill -9`) and reaped on drop, if still there.
struct Child(std::process::Child);

impl Child {
    fn kill_9(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill_9();
        }
    }
}

/// A job that takes every node whole, so that the next one waits in the queue.
fn blocker(cluster: &TestCluster) -> String {
    let job = cluster
        .slurm(
            "sbatch",
            &[
                "--parsable",
                "--exclusive",
                "-N4",
                "--output=/dev/null",
                "--wrap=sleep 100000",
            ],
        )
        .trim()
        .to_string();
    assert!(!job.is_empty(), "the blocker job was not submitted");
    common::wait_until("the blocker to run", Duration::from_secs(30), || {
        job_state(cluster, &job) == "RUNNING"
    });
    job
}

fn job_state(cluster: &TestCluster, job: &str) -> String {
    cluster
        .slurm("squeue", &["-h", "-j", job, "-o", "%T"])
        .trim()
        .to_string()
}

/// The job id the state dir's job file names, once it names one.
fn job_file(state: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state.join("slurm/job")).ok()?;
    text.split_whitespace().next().map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_its_job_is_queued_is_cancelled_by_down_and_adopted_by_resume() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let blocker = blocker(&cluster);
    let bin = cluster.counting_bin_dir();
    let config =
        json!({ "slurm_conf": cluster.conf, "agent": AGENT, "poll": "200ms", "bin_dir": bin });

    // Killed while the job waits; then `down`: the job leaves the queue.
    let cl = &cluster;
    let queued = |state: &Path| {
        let state = state.to_path_buf();
        move || job_file(&state).filter(|j| job_state(cl, j) == "PENDING")
    };
    let state = cluster.dir().join("state-down");
    let mut run = small_driver(&cluster, &state, 8771, &config);
    let job = common::wait_for("the job to queue", Duration::from_secs(60), queued(&state));
    run.kill_9();
    assert_eq!(job_state(&cluster, &job), "PENDING", "still queued");
    let report = down(&state).await;
    assert!(report.failures.is_empty(), "{report:?}");
    let left = cluster.jobs();
    assert!(
        !left
            .iter()
            .any(|l| l.split_whitespace().next() == Some(job.as_str())),
        "down left the queued job {job}: {left:?}"
    );

    // Killed while the job waits; then `run --resume`: it adopts the queued job, submits
    // none, and comes up once the job runs.
    let state = cluster.dir().join("state-resume");
    let mut run = small_driver(&cluster, &state, 8772, &config);
    let job = common::wait_for("the job to queue", Duration::from_secs(60), queued(&state));
    run.kill_9();
    let submitted = cluster.calls("sbatch").len();
    let plan = small_plan(2, 8772, "true");
    let backend = Arc::new(SlurmBackend::from_config(&config, &state).expect("config"));
    let resume = tokio::spawn({
        let state = state.clone();
        async move { run_plan(&plan, backend, &state, true).await }
    });
    cluster.slurm("scancel", &[&blocker]);
    let (report, _) = resume.await.expect("resume");
    assert!(report.ok(), "{}", errors(&report));
    assert_eq!(
        cluster.calls("sbatch").len(),
        submitted,
        "the resume submitted a job: {:?}",
        cluster.calls("sbatch")
    );
    let recorded = records(&state)[ALLOCATE]
        .handle
        .as_ref()
        .and_then(|h| h["handle"]["payload"]["job"].as_str().map(String::from))
        .expect("job id");
    assert_eq!(recorded, job, "the resume runs in the queued job");
    common::wait_until("the blocker to end", Duration::from_secs(60), || {
        cluster.jobs().len() == 1
    });
    assert_eq!(
        cluster.jobs(),
        [format!("{job} RUNNING")],
        "one job of ours, the adopted one"
    );
    assert!(down(&state).await.failures.is_empty());
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_cancels_a_job_submitted_but_never_written_down() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    // A bin dir whose `sbatch` submits, notes the id, and kills prl-flow (its parent) before
    // the id reaches the job file or the journal.
    let bin = cluster.counting_bin_dir();
    let noted = cluster.dir().join("submitted");
    let real = ["/usr/bin/sbatch", "/usr/local/bin/sbatch"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sbatch");
    std::fs::write(
        bin.join("sbatch"),
        format!(
            "#!/bin/sh\nout=$('{real}' \"$@\")\necho \"$out\" > '{}'\nkill -9 $PPID\necho \"$out\"\n",
            noted.display()
        ),
    )
    .expect("write");
    let config =
        json!({ "slurm_conf": cluster.conf, "agent": AGENT, "poll": "200ms", "bin_dir": bin });
    let state = cluster.dir().join("state");
    let mut run = small_driver(&cluster, &state, 8773, &config);
    let job = common::wait_for("the submission", Duration::from_secs(60), || {
        let id = std::fs::read_to_string(&noted).ok()?;
        let id = id.trim().split(';').next()?.to_string();
        (!id.is_empty()).then_some(id)
    });
    common::wait_until("prl-flow to be killed", Duration::from_secs(30), || {
        matches!(run.0.try_wait(), Ok(Some(_)))
    });
    run.kill_9();
    // The gap: SLURM has the job, nothing of prl-flow names it.
    assert!(job_file(&state).is_none(), "the job file was written");
    assert!(records(&state)
        .get(ALLOCATE)
        .map_or(true, |r| r.handle.is_none()));
    assert!(
        !job_state(&cluster, &job).is_empty(),
        "the job is in the queue"
    );

    let report = down(&state).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(
        cluster.jobs().is_empty(),
        "down left the unrecorded job {job}: {:?}",
        cluster.jobs()
    );
}

/// Pids of processes whose command line has `needle`.
fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
        })
        .filter(|pid| {
            // A zombie has ended; only its parent has not looked yet.
            !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_ends_every_process_of_a_step_whose_leader_has_exited() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let state = cluster.dir().join("state");
    // The service's leader starts a child that stays, then exits when the test says so
    // (it reads a FIFO the test opens and closes). The child's argument is unique to this
    // test process, so `ps` finds it and nothing else.
    let token = 4_000_000 + common::claim_port() as u32;
    let fifo = cluster.dir().join("go");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let mut plan = small_plan(2, 8774, "true");
    plan.tasks.push(task(
        "leftover",
        &[ALLOCATE],
        Some("node0"),
        shell(&format!(
            "sleep {token} & read _ < '{}'; exit 0",
            fifo.display()
        )),
        true,
    ));
    let config = json!({ "slurm_conf": cluster.conf, "agent": AGENT, "poll": "200ms" });
    let (report, _) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        false,
    )
    .await;
    assert!(report.ok(), "{}", errors(&report));
    let needle = format!("sleep {token}");
    common::wait_until("the child to start", Duration::from_secs(30), || {
        !pids_with(&needle).is_empty()
    });
    let leader: u32 = {
        let f = std::fs::read_to_string(
            Path::new(&handle_field(&state, "leftover", "run_dir")).join("slurm-step"),
        )
        .expect("step file");
        f.split_whitespace()
            .nth(2)
            .expect("pid")
            .parse()
            .expect("pid")
    };
    // The leader exits; its child stays behind it.
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the FIFO"),
    );
    common::wait_until("the leader to exit", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{leader}")).exists()
            || std::fs::read_to_string(format!("/proc/{leader}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    });

    let report = down(&state).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(
        pids_with(&needle).is_empty(),
        "a process of the step outlived down: {:?}",
        pids_with(&needle)
    );
    assert!(cluster.steps().is_empty(), "{:?}", cluster.steps());
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

// ---------------------------------------------------------------------------------------
// Claims (tests/common, tests/support/netns.rs): what two test processes must not share.

const CLAIM_ENV: &str = "PRL_FLOW_TEST_CLAIM_KIND";

/// Not a test of its own: the other process of
/// [`claims_are_unique_within_and_across_test_processes`]. Claims five values of the kind
/// [`CLAIM_ENV`] names, prints them, and holds them until its stdin closes.
#[test]
#[ignore = "a helper: run as the child process of the claims test"]
fn claim_holder() {
    let Some(kind) = std::env::var_os(CLAIM_ENV) else {
        return;
    };
    let kind = kind.to_string_lossy().into_owned();
    let got: Vec<String> = (0..5)
        .map(|_| common::claim_first(&kind, (0..20).map(|i| i.to_string()), |_| true))
        .collect();
    // Straight to the pipe: the test harness may capture `println!`.
    let mut out = std::io::stdout();
    std::io::Write::write_all(&mut out, format!("claimed {}\n", got.join(" ")).as_bytes())
        .expect("write");
    std::io::Write::flush(&mut out).expect("flush");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
}

#[test]
fn claims_are_unique_within_and_across_test_processes() {
    use std::io::BufRead;
    // Within this process.
    let ports: BTreeSet<u16> = (0..40).map(|_| common::claim_port()).collect();
    assert_eq!(ports.len(), 40);
    let tags: BTreeSet<String> = (0..5).map(|_| netns::claim_tag()).collect();
    assert_eq!(tags.len(), 5);
    assert!(tags.iter().all(|t| t.len() == 5), "{tags:?}");

    // Across two processes: the other holds five of twenty values; this one gets the rest.
    let kind = format!("selftest-{}", std::process::id());
    let mut other = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "claim_holder",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLAIM_ENV, &kind)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the other process");
    let mut lines = std::io::BufReader::new(other.stdout.take().expect("stdout")).lines();
    let theirs: BTreeSet<String> = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split_once("claimed ").map(|(_, v)| v.to_string()))
        .expect("the other process's claims")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(theirs.len(), 5, "{theirs:?}");
    let ours: BTreeSet<String> = (0..15)
        .map(|_| common::claim_first(&kind, (0..20).map(|i| i.to_string()), |_| true))
        .collect();
    assert_eq!(ours.len(), 15);
    assert!(ours.is_disjoint(&theirs), "{ours:?} {theirs:?}");
    // A claim ends with its process.
    drop(other.stdin.take());
    let _ = other.wait();
    for v in &theirs {
        assert!(common::try_claim(&kind, v), "{v} still taken");
    }
    let dir = std::env::temp_dir().join("prl-flow-test-claims");
    for v in 0..20 {
        let _ = std::fs::remove_file(dir.join(format!("{kind}-{v}")));
    }
}

// ---------------------------------------------------------------------------------------
// Through the binary (the registry builds the slurm backend; `down` goes through its
// `teardown`, one scancel per job).

/// The test recipe with this cluster's `[backend]` fields.
fn cli_recipe(cluster: &TestCluster, pairs: bool) -> PathBuf {
    let mut text = recipe_text(pairs);
    let prologue = mooncake_bin()
        .map(|b| format!("export PATH={}:\\\"$PATH\\\"", b.display()))
        .unwrap_or_default();
    text.push_str(&format!(
        "slurm_conf = \"{}\"\nprologue = \"{prologue}\"\npoll = \"200ms\"\nbin_dir = \"{}\"\n",
        cluster.conf.display(),
        cluster.counting_bin_dir().display()
    ));
    let path = cluster.dir().join(if pairs {
        "pairs.toml"
    } else {
        "disaggregated.toml"
    });
    std::fs::write(&path, text).expect("write recipe");
    path
}

fn prl(cluster: &TestCluster, router: &Path, args: &[&str]) -> common::Out {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prl-flow"));
    c.args(args)
        .arg("--state-dir")
        .arg(cluster.dir().join("state"))
        .env("PRL_FLOW_ROUTER", router)
        .current_dir(cluster.dir());
    common::output_within(c, Duration::from_secs(180))
}

#[test]
fn cli_disaggregated_run_kill_resume_scancel_status_down() {
    let _turn = SERIAL.blocking_lock();
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    let recipe = cli_recipe(&cluster, true);
    let f = recipe.to_str().expect("path");
    let r = router.to_str().expect("path");
    let state = cluster.dir().join("state");

    // kill -9 mid-run (engines take 4 s), then --resume: no step twice.
    let mut child = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args([
            "run",
            f,
            "--engine",
            "mock",
            "--router",
            r,
            "--no-progress",
            "--state-dir",
        ])
        .arg(&state)
        .env("PRL_MOCK_STARTUP_DELAY", "4s")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    common::wait_until("engines started", Duration::from_secs(60), || {
        prl_flow_engine::journal::load(&state).is_ok_and(|r| {
            r.get("decode[1].rank[0]")
                .is_some_and(|r| r.handle.is_some())
        })
    });
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // What runs at the kill, as SLURM and the journal see it.
    let live_at_kill = cluster.steps();
    let recorded_at_kill = step_ids(&state);
    assert!(!live_at_kill.is_empty());
    prl(
        &cluster,
        &router,
        &["run", f, "--engine", "mock", "--router", r, "--resume"],
    )
    .expect_code(0);
    let steps = cluster.steps();
    assert!(duplicates(&steps).is_empty(), "{steps:?}");
    // No step was started a second time: every step that ran at the kill still runs, under
    // the same id (a restart that cancelled the old step first would leave one of each name
    // too, with a new id), and the journal keeps the ids it had.
    for (id, name, _) in &live_at_kill {
        assert!(
            steps.iter().any(|(i, n, _)| i == id && n == name),
            "step {id} ({name}) was replaced or ended by the resume: {steps:?}"
        );
    }
    let recorded = step_ids(&state);
    for (task, step) in &recorded_at_kill {
        assert_eq!(&recorded[task], step, "{task} was started a second time");
    }

    // scancel an engine step (the decode ranks'): status says so (exit 1), --resume
    // restarts its tasks and keeps the others.
    let step = step_ids(&state)["decode[1].rank[0]"].clone();
    cluster.slurm("scancel", &[&step]);
    common::wait_until("the step to end", Duration::from_secs(30), || {
        !cluster.steps().iter().any(|(id, _, _)| *id == step)
    });
    let st = prl(&cluster, &router, &["status", f]);
    assert_eq!(st.code, Some(1), "{}{}", st.stdout, st.stderr);
    assert!(
        st.stdout
            .lines()
            .any(|l| l.starts_with("decode[1].rank[0]") && l.contains("down")),
        "{}",
        st.stdout
    );
    let out = prl(
        &cluster,
        &router,
        &[
            "run",
            f,
            "--engine",
            "mock",
            "--router",
            r,
            "--resume",
            "--explain",
        ],
    );
    out.expect_code(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("run") && l.contains("decode[1].rank[0]")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("keep") && l.contains("prefill[0].rank[0]")),
        "{}",
        out.stdout
    );
    prl(&cluster, &router, &["status", f]).expect_code(0);

    // down: nothing left in squeue, and one scancel for it all.
    let before = cluster.calls("scancel").len();
    prl(&cluster, &router, &["down", f]).expect_code(0);
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
    let scancels = cluster.calls("scancel");
    assert_eq!(
        scancels.len(),
        before + 1,
        "down must cancel per job, not per step: {:?}",
        &scancels[before..]
    );
}

/// `watch` on SLURM: an engine step cancelled by an admin is restarted as a new step inside
/// the allocation (its P/D router with it), and the deployment serves again.
#[test]
fn watch_restarts_a_cancelled_engine_step_inside_the_allocation() {
    let _turn = SERIAL.blocking_lock();
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    let recipe = cli_recipe(&cluster, true);
    let f = recipe.to_str().expect("path");
    let r = router.to_str().expect("path");
    let state = cluster.dir().join("state");
    prl(
        &cluster,
        &router,
        &["run", f, "--engine", "mock", "--router", r],
    )
    .expect_code(0);
    let err = cluster.dir().join("watch.stderr");
    let mut watch = Child(
        Command::new(env!("CARGO_BIN_EXE_prl-flow"))
            .args(["watch", f, "--state-dir"])
            .arg(&state)
            .env("PRL_FLOW_ROUTER", &router)
            .current_dir(cluster.dir())
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("watch"),
    );
    let jobs = cluster.jobs();
    let victim = "decode[1].rank[0]";
    let step = step_ids(&state)[victim].clone();
    cluster.slurm("scancel", &[&step]);
    let heal_log = || std::fs::read_to_string(state.join("logs/heal.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let restarted = || {
        heal_log()
            .lines()
            .any(|l| l.contains("restarted `") && l.contains(&format!("`{victim}`")))
    };
    while !restarted() {
        assert!(
            Instant::now() < deadline,
            "`{victim}` was not restarted in 120 s; heal log:\n{}\nwatch:\n{}",
            heal_log(),
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = step_ids(&state)[victim].clone();
    assert_ne!(again, step, "a new step");
    assert!(cluster.steps().iter().any(|(id, _, _)| *id == again));
    assert_eq!(cluster.jobs(), jobs, "inside the same allocation");
    prl(&cluster, &router, &["status", f]).expect_code(0);
    let _ = Command::new("kill")
        .args(["-INT", &watch.0.id().to_string()])
        .status();
    let _ = watch.0.wait();
    prl(&cluster, &router, &["down", f]).expect_code(0);
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

#[test]
fn cli_more_nodes_than_the_partition_fails_with_slurms_reason() {
    let _turn = SERIAL.blocking_lock();
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    let recipe = cli_recipe(&cluster, false);
    let text = std::fs::read_to_string(&recipe)
        .expect("read")
        .replace("partition = \"gpu\"", "partition = \"small\"");
    std::fs::write(&recipe, text).expect("write");
    let began = Instant::now();
    let out = prl(
        &cluster,
        &router,
        &["run", recipe.to_str().expect("path"), "--engine", "mock"],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("partition `small` has 2"),
        "{}",
        out.stderr
    );
    assert!(began.elapsed() < Duration::from_secs(30));
    assert!(cluster.jobs().is_empty());
}

/// The preflight is one step across the allocation, after the site's prologue: a launcher
/// on no node fails the run at once, naming each node and the fix, before any step of the
/// plan starts, and the job is cancelled; a router that only the prologue puts on PATH is
/// found.
#[test]
fn cli_a_launcher_missing_on_the_nodes_fails_in_one_step_and_releases_the_job() {
    let _turn = SERIAL.blocking_lock();
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    let only_prologue = cluster.dir().join("only-prologue");
    std::fs::create_dir_all(&only_prologue).expect("mkdir");
    std::os::unix::fs::symlink(&router, only_prologue.join("prl-flow-test-router")).expect("link");
    let recipe = cli_recipe(&cluster, false);
    let text = std::fs::read_to_string(&recipe).expect("read");
    let text = text
        .replace(
            "launcher = [\"vllm\", \"serve\"]",
            "launcher = [\"prl-flow-test-engine\", \"serve\"]",
        )
        .replace(
            "[inference.deployment]\n",
            "[inference.deployment]\nrouter_launcher = [\"prl-flow-test-router\"]\n",
        )
        .replace(
            "prologue = \"",
            &format!(
                "prologue = \"export PATH={}:$PATH; ",
                only_prologue.display()
            ),
        );
    assert!(text.contains("prl-flow-test-engine") && text.contains("only-prologue"));
    std::fs::write(&recipe, text).expect("write");
    let out = prl(&cluster, &router, &["run", recipe.to_str().expect("path")]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    for k in 0..4 {
        let want = format!("node{k} (",);
        assert!(out.stderr.contains(&want), "no `{want}` in {}", out.stderr);
    }
    assert!(
        out.stderr
            .contains("`prl-flow-test-engine` is not on PATH (after `[backend] prologue`)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--engine mock"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("prl-flow-test-router"),
        "{}",
        out.stderr
    );
    // One srun: the preflight's; no step of the plan; the job is gone.
    let sruns = cluster.calls("srun");
    assert_eq!(sruns.len(), 1, "{sruns:?}");
    assert!(sruns[0].contains("--job-name=pf:preflight"), "{sruns:?}");
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
    let run_dirs = std::fs::read_dir(cluster.dir().join("state/run"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(run_dirs, 0);
}

// ---------------------------------------------------------------------------------------
// Benchmark (docs/benchmarks.md, "SLURM bring-up"):
//
//   cargo test --release --test slurm -- --ignored --nocapture bench_
//
// The same deployment (the disaggregated recipe: Mooncake master, metadata server, four
// clients, four engines, the router) brought up in turns on the same cluster, in the same
// run: by prl-flow, and by a prime-rl-style single sbatch script that starts the same
// processes one after another, each with `srun --overlap ... &` in the job and a polling
// probe before the next. Both make one job. Time is from the start of `run` (or `sbatch`)
// to the router answering a completion. `BENCH_ROUNDS` (default 3) rounds; `BENCH_POLL_MS`
// (default 1000, the recipe's default on SLURM) is the polling interval of both.

/// The sequential script: one job, steps started in plan order, each waited for by the
/// plan's own probe (curl, or bash's /dev/tcp), polled every `poll`. As a hand-written
/// script must, it starts the headless ranks of an engine group (they have no probe) before
/// it waits for the group's head, which is ready only once they have joined: a wait comes
/// just before the next task that has a probe of its own.
fn sequential_script(
    plan: &Plan,
    hosts: &BTreeMap<String, String>,
    run_dir: &Path,
    poll: &str,
    prologue: &str,
) -> String {
    let resolve = |s: &str| prl_flow::plan::resolve_hosts(s, &|n| hosts.get(n).cloned());
    let mut s = format!("#!/bin/bash\n#SBATCH --nodes={}\n#SBATCH --ntasks-per-node=1\nset -e\n{prologue}\ncd '{}'\n", plan.nodes.len(), run_dir.display());
    s.push_str("wait_for() { until eval \"$1\" >/dev/null 2>&1; do sleep ");
    s.push_str(poll);
    s.push_str(
        "; done; }\nmapfile -t NODES < <(scontrol show hostnames \"$SLURM_JOB_NODELIST\")\n",
    );
    let mut pending_wait = String::new();
    for t in &plan.tasks {
        let Some(node) = &t.node else { continue };
        let idx: usize = node.trim_start_matches("node").parse().expect("node index");
        if t.ready.is_some() {
            s.push_str(&std::mem::take(&mut pending_wait));
        }
        let argv: Vec<String> = match &t.command {
            Cmd::Argv { argv } => argv.iter().map(|a| resolve(a)).collect(),
            Cmd::Shell { script } => vec!["sh".into(), "-c".into(), resolve(script)],
            Cmd::Builtin { .. } => continue,
        };
        let dir = run_dir.join(prl_flow::exec::file_name(&t.id));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in &t.files {
            std::fs::write(dir.join(&f.path), resolve(&f.content)).expect("write file");
        }
        let env: Vec<String> = t
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", shlex::try_quote(&resolve(v)).expect("quote")))
            .collect();
        s.push_str(&format!(
            "(cd '{}' && env {} srun --overlap -w \"${{NODES[{idx}]}}\" -N1 -n1 {} > '{}.log' 2>&1) &\n",
            dir.display(),
            env.join(" "),
            shlex::try_join(argv.iter().map(String::as_str)).expect("quote"),
            dir.display()
        ));
        if let Some(r) = &t.ready {
            let probe = match &r.probe {
                Probe::Http { url } => format!("curl -fs -o /dev/null '{}'", resolve(url)),
                Probe::Tcp { addr } => {
                    let a = resolve(addr);
                    let (h, p) = a.rsplit_once(':').expect("host:port");
                    format!("exec 3<>/dev/tcp/{h}/{p}")
                }
                Probe::Log { regex } => format!("grep -qE '{regex}' '{}.log'", dir.display()),
            };
            pending_wait = format!("wait_for \"{}\"\n", probe.replace('"', "\\\""));
        }
    }
    s.push_str(&pending_wait);
    s.push_str("touch \"$PWD/UP\"\nsleep infinity\n");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test slurm -- --ignored --nocapture bench_"]
async fn bench_bring_up_against_a_sequential_sbatch_script() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let Some(router) = deployment_prerequisites(&cluster) else {
        return;
    };
    // Both poll at the same interval: the recipe's probes (`probe_interval`, 1 s on SLURM
    // by default) and the script's loops. `BENCH_POLL_MS` sets both.
    let poll_ms: u64 = std::env::var("BENCH_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let text = recipe_text(false).replace(
        "[inference.deployment]\n",
        &format!("[inference.deployment]\nprobe_interval = \"{poll_ms}ms\"\n"),
    );
    let plan = plan_of(&text, &router);
    let poll = format!("{}", poll_ms as f64 / 1000.0);
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let hosts: BTreeMap<String, String> = plan
        .nodes
        .iter()
        .zip(&cluster.nodes)
        .map(|(n, (_, a))| (n.clone(), a.clone()))
        .collect();
    let endpoint = plan
        .endpoint
        .clone()
        .expect("endpoint")
        .replace("${host:node0}", &cluster.nodes[0].1);
    let completion = json!({ "model": "Qwen/Qwen3-30B-A3B", "prompt": "hi", "max_tokens": 4 });
    let complete = |url: String| {
        let body = completion.clone();
        async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .ok()?;
            let r = c
                .post(format!("{url}/v1/completions"))
                .header("x-session-id", "bench")
                .json(&body)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        }
    };
    for round in 0..rounds {
        // prl-flow: `run` returns once the health probe has made a completion.
        let state = cluster.dir().join(format!("state{round}"));
        let config = cluster.config(&plan.backend_config, json!({}));
        let began = Instant::now();
        let (report, _) = run_plan(
            &plan,
            Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
            &state,
            false,
        )
        .await;
        assert!(report.ok(), "{}", errors(&report));
        complete(endpoint.clone())
            .await
            .expect("a completion through the router");
        ours.push(began.elapsed());
        down(&state).await;
        eventually("the job to end", Duration::from_secs(60), || async {
            cluster.jobs().is_empty().then_some(())
        })
        .await;

        // The sequential script, same processes, 1 s polling as hand-written scripts do.
        let run_dir = cluster.dir().join(format!("seq{round}"));
        std::fs::create_dir_all(&run_dir).expect("mkdir");
        let prologue = mooncake_bin()
            .map(|b| format!("export PATH={}:\"$PATH\"", b.display()))
            .unwrap_or_default();
        // The nodes of a 4-node job on a 4-node cluster are all of them, in order.
        let script = sequential_script(&plan, &hosts, &run_dir, &poll, &prologue);
        let path = run_dir.join("bringup.sbatch");
        std::fs::write(&path, script).expect("write");
        let began = Instant::now();
        let out = Command::new("sbatch")
            .arg("--parsable")
            .arg(format!("--output={}/job.log", run_dir.display()))
            .arg(&path)
            .env("SLURM_CONF", &cluster.conf)
            .output()
            .expect("sbatch");
        let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(180);
        while complete(endpoint.clone()).await.is_none() {
            if Instant::now() > deadline {
                let logs: Vec<String> = std::fs::read_dir(&run_dir)
                    .expect("run dir")
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                    .map(|e| {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!(
                            "--- {}\n{}",
                            e.path().display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "the sequential script's deployment did not answer in 180 s:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        theirs.push(began.elapsed());
        cluster.slurm("scancel", &[&job]);
        eventually("the job to end", Duration::from_secs(60), || async {
            cluster.jobs().is_empty().then_some(())
        })
        .await;
    }
    let med = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let s = |d: &Duration| format!("{:.2}", d.as_secs_f64());
    eprintln!("\nSLURM bring-up, disaggregated recipe (mock engines, Mooncake tcp), {rounds} rounds, 1 job each, probes every {poll_ms} ms:");
    eprintln!(
        "  prl-flow              {} s (median; rounds: {})",
        s(&med(ours.clone())),
        ours.iter().map(s).collect::<Vec<_>>().join(", ")
    );
    eprintln!(
        "  sequential sbatch     {} s (median; rounds: {})",
        s(&med(theirs.clone())),
        theirs.iter().map(s).collect::<Vec<_>>().join(", ")
    );
}

// ---------------------------------------------------------------------------------------
// Where a step starts

/// A task with a node and a `dir` starts its step there (a path on the node; the test
/// cluster's nodes share this machine's files); its step and exit-status files stay in its
/// run dir under the state dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_starts_in_its_tasks_dir_and_keeps_its_files_in_the_run_dir() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let state = cluster.dir().join("state");
    let work = cluster.dir().join("work dir");
    std::fs::create_dir_all(&work).expect("work dir");
    let mut plan = small_plan(1, 8775, "true");
    plan.tasks.retain(|t| t.id != "server");
    let check = plan
        .tasks
        .iter_mut()
        .find(|t| t.id == "check")
        .expect("check");
    check.command = shell("pwd >out");
    check.dir = Some(work.display().to_string());
    let config = json!({ "slurm_conf": cluster.conf, "agent": AGENT, "poll": "200ms" });
    let (report, _) = run_plan(
        &plan,
        Arc::new(SlurmBackend::from_config(&config, &state).expect("config")),
        &state,
        false,
    )
    .await;
    assert!(report.ok(), "{}", errors(&report));
    let out = std::fs::read_to_string(work.join("out")).expect("the step's output");
    assert_eq!(Path::new(out.trim()), work);
    let run_dir = state.join("run").join("check");
    assert_eq!(
        std::fs::read_to_string(run_dir.join("exit-status")).expect("exit status"),
        "0\n"
    );
    assert!(run_dir.join("slurm-step").exists() && !run_dir.join("out").exists());
    down(&state).await;
}

/// Tasks spawned together share a step; one of them stops alone (the others run on, the step
/// stays) and starts again as a step of its own, inside the allocation.
// One thread, as `prl-flow run`'s runtime: spawns started together reach the step
// launcher before its timer can run, so they share a step whatever the machine's load.
#[tokio::test]
async fn one_task_of_a_shared_step_stops_and_starts_again_alone() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let state = cluster.dir().join("state");
    let config = json!({ "slurm_conf": cluster.conf, "agent": AGENT, "poll": "200ms" });
    let backend = SlurmBackend::from_config(&config, &state).expect("config");
    let nodes: Vec<String> = (0..2).map(|k| format!("node{k}")).collect();
    let alloc = backend.allocate(&nodes).await.expect("allocate");
    let base = prl_flow_engine::journal::now_ms();
    let secret = format!("hf_secret{base}");
    let spec = |i: usize, attempt: u64| SpawnSpec {
        task: format!("svc[{i}]"),
        node: Some(format!("node{}", i % 2)),
        argv: [
            "sh",
            "-c",
            "echo \"token of ${#HF_TOKEN} chars\"; trap 'exit 0' TERM; while :; do sleep 0.2; done",
        ]
        .map(String::from)
        .to_vec(),
        env: [("HF_TOKEN".to_string(), secret.clone())].into(),
        run_dir: state.join("run").join(format!("svc{i}")),
        log: state.join("logs").join(format!("svc{i}.log")),
        service: true,
        attempt,
        ..Default::default()
    };
    // Two a node: one step (nodes with different numbers of tasks would make two).
    let specs = [0, 1, 2, 3].map(|i| spec(i, base + i as u64));
    let (a, b, c, d) = tokio::join!(
        backend.spawn(&specs[0]),
        backend.spawn(&specs[1]),
        backend.spawn(&specs[2]),
        backend.spawn(&specs[3]),
    );
    let handles = [a, b, c, d].map(|h| h.expect("spawn"));
    let step = handles[0].payload["step"].clone();
    for h in &handles {
        assert_eq!(h.payload["step"], step, "one step for the four: {h}");
        assert_eq!(h.payload["tasks"], 4, "{h}");
        assert_eq!(backend.status(h).await.expect("status"), ProcState::Running);
    }
    assert_eq!(cluster.steps().len(), 1, "{:?}", cluster.steps());
    // Each task got its env (its log says so), and no file holds the value: the task files
    // that carried it are gone.
    // (The step's task may still be on its way to the command when its spawn returns.)
    let said = format!("token of {} chars", secret.len());
    eventually(
        "svc3 to log its token's length",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(state.join("logs/svc3.log"))
                .is_ok_and(|log| log.contains(&said))
                .then_some(())
        },
    )
    .await;
    let holders = files_containing(cluster.dir(), &secret);
    assert!(holders.is_empty(), "the secret is in {holders:?}");

    backend
        .stop(&handles[1], Duration::from_secs(5))
        .await
        .expect("stop one task");
    assert!(
        matches!(
            backend.status(&handles[1]).await.expect("status"),
            ProcState::Exited(_)
        ),
        "the stopped task has ended"
    );
    for h in [&handles[0], &handles[2], &handles[3]] {
        assert_eq!(
            backend.status(h).await.expect("status"),
            ProcState::Running,
            "{h}"
        );
    }
    assert_eq!(cluster.steps().len(), 1, "the step goes on");

    let again = backend
        .spawn(&spec(1, base + 10))
        .await
        .expect("start it again");
    assert_ne!(again.payload["step"], step, "a step of its own");
    assert!(again.payload.get("tasks").is_none(), "alone: {again}");
    assert_eq!(
        backend.status(&again).await.expect("status"),
        ProcState::Running
    );
    assert_eq!(cluster.steps().len(), 2);
    assert_eq!(
        cluster.live_tasks(),
        5,
        "four in the shared step (one ended), one alone"
    );
    backend.release(&alloc).await.expect("release");
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

/// An agent program the nodes cannot run fails the allocation at once, saying what to set,
/// and the job is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_the_nodes_cannot_run_fails_the_allocation_at_once() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::up(0) else {
        return;
    };
    let state = cluster.dir().join("state");
    let missing = cluster.dir().join("no such dir/prl-flow");
    let config = json!({ "slurm_conf": cluster.conf, "agent": missing, "poll": "200ms" });
    let backend = SlurmBackend::from_config(&config, &state).expect("config");
    let err = backend
        .allocate(&["node0".to_string()])
        .await
        .expect_err("no agent, no allocation");
    assert!(
        err.message.contains("[backend] agent") && err.message.contains("did not start"),
        "{}",
        err.message
    );
    // The holder's words name the program that could not run.
    assert!(err.message.contains("no such dir"), "{}", err.message);
    eventually(
        "the job to be cancelled",
        Duration::from_secs(30),
        || async { cluster.jobs().is_empty().then_some(()) },
    )
    .await;
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                todo.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                out.push(p);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// At scale: 256 nodes.

/// A process of this machine, as `/proc` shows it.
struct Proc {
    pid: u32,
    comm: String,
    cmdline: String,
    /// Whether it runs under a slurmd (on a node), not on the submitting machine.
    on_node: bool,
}

/// Every process whose environment names this cluster's config (what prl-flow and SLURM
/// started for it), without SLURM's own daemons.
fn processes_of(cluster: &TestCluster) -> Vec<Proc> {
    let conf = format!("SLURM_CONF={}", cluster.conf.display());
    let read = |pid: &str, f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
    let parent = |pid: &str| -> Option<String> {
        let stat = String::from_utf8_lossy(&read(pid, "stat")).into_owned();
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)
            .map(String::from)
    };
    let comm = |pid: &str| {
        String::from_utf8_lossy(&read(pid, "comm"))
            .trim()
            .to_string()
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
    {
        let pid = e.file_name().to_string_lossy().into_owned();
        let Ok(n) = pid.parse::<u32>() else { continue };
        let env = read(&pid, "environ");
        if !env.split(|b| *b == 0).any(|v| v == conf.as_bytes()) {
            continue;
        }
        let c = comm(&pid);
        if matches!(
            c.as_str(),
            "slurmd" | "slurmctld" | "slurmscriptd" | "slurmstepd" | "munged"
        ) {
            continue;
        }
        let mut on_node = false;
        let mut p = parent(&pid);
        while let Some(pp) = p.filter(|pp| pp != "0" && pp != "1") {
            if matches!(comm(&pp).as_str(), "slurmstepd" | "slurmd") {
                on_node = true;
                break;
            }
            p = parent(&pp);
        }
        let cmdline = String::from_utf8_lossy(&read(&pid, "cmdline")).replace('\0', " ");
        out.push(Proc {
            pid: n,
            comm: c,
            cmdline,
            on_node,
        });
    }
    out
}

/// Completions through the router at `url`, each with a session id of its own (so the
/// consistent hash spreads them over the workers): how many were answered with 200.
async fn completions(url: &str, model: &str, n: usize) -> usize {
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut ok = 0;
    for i in 0..n {
        let r = c
            .post(format!("{url}/v1/completions"))
            .header("X-Session-ID", format!("s{i}"))
            .json(&json!({ "model": model, "prompt": "hi", "max_tokens": 4 }))
            .send()
            .await;
        if r.is_ok_and(|r| r.status().as_u16() == 200) {
            ok += 1;
        }
    }
    ok
}

fn prl_long(
    cluster: &TestCluster,
    state: &Path,
    router: &Path,
    args: &[&str],
) -> (common::Out, f64) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prl-flow"));
    c.args(args)
        .arg("--state-dir")
        .arg(state)
        .arg("--no-progress")
        .env("PRL_FLOW_ROUTER", router)
        .current_dir(cluster.dir());
    let began = Instant::now();
    let out = common::output_within(c, Duration::from_secs(600));
    (out, began.elapsed().as_secs_f64())
}

/// A scale recipe on this cluster: `deployment` is the `[inference.deployment]` body.
fn scale_recipe(
    cluster: &TestCluster,
    name: &str,
    model: &str,
    parallel: &str,
    deployment: &str,
) -> PathBuf {
    let text = format!(
        "name = \"{name}\"\n[inference]\nmodel = \"{model}\"\n[inference.parallel]\n{parallel}\n\
         [inference.deployment]\n{deployment}\ngpus_per_node = 1\nrouter_port = 8000\nbackend_port = 8100\n\
         [backend]\ntype = \"slurm\"\nslurm_conf = \"{}\"\npoll = \"500ms\"\n",
        cluster.conf.display()
    );
    let path = cluster.dir().join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("recipe");
    path
}

/// One bring-up at scale, as a user runs it: `run` (returns with everything up), then what
/// the submitting machine holds, the steps, completions, `kill -9` of the agent and of every
/// prl-flow process, completions again, a resume that keeps every step, and `down`.
async fn scale_round(cluster: &TestCluster, router: &Path, recipe: &Path, model: &str) {
    let f = recipe.to_str().expect("path");
    let r = router.to_str().expect("path");
    let state = recipe.with_extension("state");
    let (out, took) = prl_long(
        cluster,
        &state,
        router,
        &["run", f, "--engine", "mock", "--router", r],
    );
    out.expect_code(0);
    let plan_tasks = records(&state)
        .values()
        .filter(|r| {
            r.handle.as_ref().is_some_and(|h| h["backend"] == "slurm") && r.kind != ALLOCATE
        })
        .count();
    let steps = cluster.steps();
    let procs = processes_of(cluster);
    let here: Vec<&Proc> = procs.iter().filter(|p| !p.on_node).collect();
    let sruns = procs.iter().filter(|p| p.comm == "srun").count();
    eprintln!(
        "{f}: up in {took:.1} s; {plan_tasks} tasks in {} steps; {sruns} srun processes; {} of ours on the submitting machine",
        steps.len(),
        here.len()
    );
    assert!(
        here.is_empty(),
        "nothing of the deployment on the submitting machine: {:?}",
        here.iter().map(|p| (p.pid, &p.cmdline)).collect::<Vec<_>>()
    );
    // A step per role: the engines of all replicas share one or two.
    assert!(
        steps.len() <= 4,
        "steps grow with groups, not nodes: {steps:?}"
    );
    // An srun is two processes (it forks a helper).
    assert!(
        sruns <= 2 * steps.len(),
        "one srun per step, on the agent's node"
    );
    assert_eq!(cluster.live_tasks(), plan_tasks, "every task once");

    let url = format!("http://{}:8000", cluster.nodes[0].1);
    assert_eq!(
        completions(&url, model, 8).await,
        8,
        "completions through the router"
    );

    // kill -9 of every prl-flow process (the agent on the first node; nothing else of ours
    // runs): the deployment goes on serving, and the holder starts another agent.
    let agent_dir = state.join("slurm/agent");
    let beat = || std::fs::read_to_string(agent_dir.join("heartbeat")).unwrap_or_default();
    let old_pid = beat().split_whitespace().next().unwrap_or("").to_string();
    let killed: Vec<u32> = processes_of(cluster)
        .iter()
        .filter(|p| p.cmdline.contains("prl-flow ") || p.cmdline.contains("/prl-flow "))
        .map(|p| p.pid)
        .collect();
    assert!(!killed.is_empty(), "the agent runs");
    for pid in &killed {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert_eq!(
        completions(&url, model, 8).await,
        8,
        "serving without any prl-flow"
    );
    common::wait_until("a new agent", Duration::from_secs(60), || {
        let pid = beat().split_whitespace().next().unwrap_or("").to_string();
        !pid.is_empty() && pid != old_pid
    });

    // Resume: every step kept, nothing started again.
    let before = step_ids(&state);
    let (out, took) = prl_long(
        cluster,
        &state,
        router,
        &["run", f, "--engine", "mock", "--router", r, "--resume"],
    );
    out.expect_code(0);
    assert_eq!(step_ids(&state), before, "the resume kept every step");
    let (st, st_took) = prl_long(cluster, &state, router, &["status", f]);
    st.expect_code(0);

    let (out, down_took) = prl_long(cluster, &state, router, &["down", f]);
    out.expect_code(0);
    eprintln!("{f}: resume {took:.2} s, status {st_took:.2} s, down {down_took:.2} s");
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
    assert!(cluster.steps().is_empty());
    let left: Vec<String> = processes_of(cluster)
        .into_iter()
        .map(|p| p.cmdline)
        .collect();
    assert!(left.is_empty(), "down left {left:?}");
}

/// 256 nodes: a multi_node deployment of 256 engines and a disaggregated one of 64 nodes,
/// through the real router, each killed (every prl-flow process), resumed and taken down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_256_nodes_the_login_node_holds_nothing_and_steps_follow_groups() {
    let _turn = serial().await;
    let Some(cluster) = TestCluster::big(256) else {
        return;
    };
    let Some(router) = common::router_or_skip() else {
        return;
    };
    let mn = scale_recipe(
        &cluster,
        "scale-mn",
        "Qwen/Qwen3-0.6B",
        "tp = 1\ndp = 1",
        "type = \"multi_node\"\nnum_nodes = 256",
    );
    scale_round(&cluster, &router, &mn, "Qwen/Qwen3-0.6B").await;
    let pd = scale_recipe(
        &cluster,
        "scale-pd",
        "Qwen/Qwen3-30B-A3B",
        "tp = 1",
        "type = \"disaggregated\"\nnum_prefill_nodes = 32\nnum_decode_nodes = 32",
    );
    scale_round(&cluster, &router, &pd, "Qwen/Qwen3-30B-A3B").await;
}
