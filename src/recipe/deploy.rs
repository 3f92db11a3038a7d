//! From the recipe as written to the deployment: every rule checked, every derived value
//! (node roles, replica groups, DP ranks, ports, connector configs, router layout) computed
//! once, here, in plain functions without I/O.
//!
//! The layout, in short (docs/recipes.md has the reasons):
//! - nodes are `node0..node{N-1}`: a multi-node deployment's replicas in order; for P/D the
//!   prefill nodes first, then the decode nodes;
//! - a *replica* (an engine replica, or a prefill or decode replica) is one data-parallel
//!   group over `k` consecutive nodes, `dp / k` ranks on each. Its first node runs the API
//!   server and the DP coordinator; the others run `--headless` and join it;
//! - one process per node: vLLM places its local ranks on the GPUs it sees;
//! - one router for the deployment on `node0`, or, for P/D with as many prefill as decode
//!   replicas (more than one), one router per prefill+decode pair on the pair's first node.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use serde_json::json;

use super::schema::{Extra, Recipe, F};
use crate::diag::{Problem, Problems};
use crate::plan::host_ref;

pub const DEFAULT_LAUNCHER: &[&str] = &["vllm", "serve"];
pub const DEFAULT_ROUTER_LAUNCHER: &[&str] = &["vllm-router"];
pub const DEFAULT_GPUS_PER_NODE: u32 = 8;
pub const DEFAULT_ROUTER_PORT: u16 = 8000;
pub const DEFAULT_BACKEND_PORT: u16 = 8100;
pub const DEFAULT_ROUTER_METRICS_PORT: u16 = 29000;
pub const DEFAULT_DP_RPC_PORT: u16 = 29550;
pub const DEFAULT_NIXL_PORT: u16 = 5600;
pub const DEFAULT_MOONCAKE_MASTER_PORT: u16 = 50051;
pub const DEFAULT_MOONCAKE_METRICS_PORT: u16 = 9003;
pub const DEFAULT_MOONCAKE_METADATA_PORT: u16 = 8080;
pub const DEFAULT_MOONCAKE_CLIENT_PORT: u16 = 50052;
/// Bounds that keep a mistyped count from planning a deployment no machine could hold.
pub const MAX_NODES: usize = 100_000;
pub const MAX_GPUS_PER_NODE: u32 = 1024;
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The router is started once its engines are healthy, so it should find them at once;
/// this bounds its own wait (`--worker-startup-timeout-secs`).
pub const ROUTER_STARTUP_SECS: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    SingleNode,
    MultiNode,
    /// `multi_node` with expert parallelism: each replica one DP group over its nodes.
    WideEp,
    Disaggregated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Engine,
    Prefill,
    Decode,
}

impl Role {
    /// The task kind (and id prefix) of its engines.
    pub fn kind(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One replica: a data-parallel group over consecutive nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub role: Role,
    pub replica: usize,
    pub nodes: Vec<usize>,
}

/// Splits `count` nodes starting at `first` into `replicas` groups of equal size.
pub fn split(role: Role, first: usize, count: usize, replicas: usize) -> Vec<Group> {
    let per = count / replicas.max(1);
    (0..replicas)
        .map(|r| Group {
            role,
            replica: r,
            nodes: (first + r * per..first + (r + 1) * per).collect(),
        })
        .collect()
}

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// `http://${host:nodeK}:PORT`
pub fn url(node: usize, port: u16) -> String {
    format!("http://{}:{port}", host_ref(&node_name(node)))
}

#[derive(Debug, Clone, PartialEq)]
pub enum OffloadKind {
    Native,
    Mooncake,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Offload {
    pub kind: OffloadKind,
    pub cpu_bytes: u64,
    pub disk: Option<String>,
}

/// Where the Mooncake store runs and how it is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Mooncake {
    /// The node of the master and the metadata server.
    pub node: usize,
    pub master_port: u16,
    pub metrics_port: u16,
    pub metadata_port: u16,
    pub client_port: u16,
    pub protocol: String,
    pub device_name: String,
}

impl Mooncake {
    pub fn master_address(&self) -> String {
        format!("{}:{}", host_ref(&node_name(self.node)), self.master_port)
    }
    pub fn metadata_url(&self) -> String {
        format!("{}/metadata", url(self.node, self.metadata_port))
    }
}

/// One engine process: a node of a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    pub id: String,
    pub role: Role,
    pub replica: usize,
    pub node: usize,
    /// The replica's first node (API server, DP coordinator).
    pub head: usize,
    pub headless: bool,
    /// Nodes in the replica.
    pub group_nodes: usize,
    pub port: u16,
    pub dp_size: u32,
    pub dp_local: u32,
    pub dp_start_rank: u32,
    pub rpc_port: u16,
    /// First NIXL side-channel port (P/D), and how many it uses from there.
    pub nixl_port: Option<(u16, u16)>,
    pub kv_transfer_config: Option<String>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    /// `router` when there is one, `router[g]` when there are several.
    pub id: String,
    /// The suffix shared by its `register` and `health-probe` tasks (`""` or `[g]`).
    pub suffix: String,
    pub node: usize,
    pub port: u16,
    pub metrics_port: u16,
    pub pd: bool,
    pub workers: Vec<String>,
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    /// The engine tasks it needs (all of its replicas' nodes).
    pub engines: Vec<String>,
}

impl Router {
    pub fn url(&self) -> String {
        url(self.node, self.port)
    }
}

/// The checked, derived deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    pub shape: Shape,
    pub backend: String,
    pub model: String,
    pub served_model_name: String,
    pub launcher: Vec<String>,
    pub router_launcher: Vec<String>,
    pub nodes: usize,
    pub gpus_per_node: u32,
    pub tp: u32,
    pub dp: u32,
    pub expert_parallel: bool,
    pub dbo: bool,
    pub eplb: bool,
    pub return_routed_experts: bool,
    /// `Some(true)` is forced by offload; `None` leaves vLLM's default.
    pub prefix_caching: Option<bool>,
    pub router_policy: String,
    pub ready_timeout: Duration,
    pub probe_interval: Duration,
    pub offload: Option<Offload>,
    pub mooncake: Option<Mooncake>,
    pub groups: Vec<Group>,
    pub engines: Vec<Engine>,
    pub routers: Vec<Router>,
    pub extra_args: Vec<String>,
}

/// The environment variables the launcher sets or that would contradict what it sets.
pub fn managed_env(name: &str, disaggregated: bool, mooncake: bool) -> Option<&'static str> {
    match name {
        "CUDA_VISIBLE_DEVICES" => Some("GPU visibility belongs to the backend (SLURM sets it for each step) and vLLM places each local rank on the GPUs it sees"),
        "VLLM_NIXL_SIDE_CHANNEL_HOST" | "VLLM_NIXL_SIDE_CHANNEL_PORT" => Some("the launcher sets the NIXL side channel per node; change the port with `[inference.deployment] nixl_side_channel_port`"),
        "MOONCAKE_CONFIG_PATH" => Some("the launcher writes each node's Mooncake config and points at it"),
        "VLLM_DP_RANK" | "VLLM_DP_RANK_LOCAL" | "VLLM_DP_SIZE" | "VLLM_DP_MASTER_IP" | "VLLM_DP_MASTER_PORT" => Some("the launcher lays out data parallelism from `[inference.parallel]`"),
        "VLLM_ALL2ALL_BACKEND" if disaggregated => Some("a disaggregated deployment sets the all2all backend per role; only a template override (`engine.argv.j2`) changes it"),
        "PYTHONHASHSEED" if mooncake => Some("Mooncake offload pins `PYTHONHASHSEED=0` so that every node hashes KV blocks alike"),
        _ => None,
    }
}

/// The `vllm serve` options the launcher sets, with where to set them instead.
pub fn managed_dest(dest: &str, disaggregated: bool) -> Option<&'static str> {
    match dest {
        "model" => Some("set `inference.model`"),
        "host" | "port" | "uds" | "grpc_port" | "data_parallel_supervisor_port" => {
            Some("addresses and ports are set per node; the engine port is `[inference.deployment] backend_port`")
        }
        "tensor_parallel_size" => Some("set `[inference.parallel] tp`"),
        "data_parallel_size" => Some("set `[inference.parallel] dp`"),
        "data_parallel_rpc_port" => Some("set `[inference.deployment] data_parallel_rpc_port`"),
        "data_parallel_rank" | "data_parallel_start_rank" | "data_parallel_size_local"
        | "data_parallel_address" | "data_parallel_hybrid_lb" | "data_parallel_external_lb"
        | "data_parallel_multi_port_external_lb" | "headless" => {
            Some("the launcher lays out data parallelism per node from `tp`, `dp` and the node counts")
        }
        "pipeline_parallel_size" | "nnodes" | "node_rank" | "master_addr" | "master_port" => {
            Some("recipes place engines by `tp` and `dp`; pipeline parallelism and tensor parallelism across nodes are not supported")
        }
        "device_ids" => Some("GPU visibility belongs to the backend and the launcher"),
        "kv_transfer_config" | "kv_offloading_size" | "kv_offloading_backend" => Some(
            "the launcher writes the KV connector config: use `[inference.kv_cache_offload]` and the deployment type",
        ),
        "enable_expert_parallel" => Some("set `inference.enable_expert_parallel`"),
        "enable_dbo" => Some("set `inference.enable_dbo`"),
        "enable_eplb" => Some("set `inference.enable_eplb`"),
        "enable_return_routed_experts" => Some("set `inference.enable_return_routed_experts`"),
        "enable_prefix_caching" => Some("set `inference.enable_prefix_caching`"),
        "config" => Some("a `--config` file could set what the launcher manages; write its keys in `vllm_extra`"),
        "all2all_backend" if disaggregated => Some(
            "a disaggregated deployment sets it per role (prefill `deepep_high_throughput`, decode `deepep_low_latency`); only a template override (`engine.argv.j2`) changes it",
        ),
        _ => None,
    }
}

/// The `--kv-transfer-config` of an engine of `role`, as JSON.
pub fn kv_transfer_config(role: Role, offload: Option<&Offload>) -> Option<serde_json::Value> {
    let offload_connector = offload.map(|o| match o.kind {
        OffloadKind::Native => {
            let extra = match &o.disk {
                None => json!({ "cpu_bytes_to_use": o.cpu_bytes }),
                Some(path) => json!({
                    "spec_name": "TieringOffloadingSpec",
                    "cpu_bytes_to_use": o.cpu_bytes,
                    "secondary_tiers": [{ "type": "fs", "root_dir": path }],
                }),
            };
            json!({ "kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra })
        }
        OffloadKind::Mooncake => json!({ "kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both" }),
    });
    let nixl_role = match role {
        Role::Engine => return offload_connector,
        Role::Prefill => "kv_producer",
        Role::Decode => "kv_consumer",
    };
    let nixl = json!({ "kv_connector": "NixlConnector", "kv_role": nixl_role });
    Some(match offload_connector {
        None => nixl,
        Some(off) => json!({
            "kv_connector": "MultiConnector",
            "kv_role": nixl_role,
            "kv_connector_extra_config": { "connectors": [nixl, off] },
        }),
    })
}

/// A port a service listens on, with the recipe field that chose it.
#[derive(Debug, Clone)]
pub struct PortUse {
    pub node: usize,
    pub port: u16,
    pub task: String,
    pub field: &'static str,
    pub span: Range<usize>,
}

/// Pairs of services that want one port on one node (each clash once, later one second).
pub fn port_clashes(uses: &[PortUse]) -> Vec<(&PortUse, &PortUse)> {
    let mut seen: BTreeMap<(usize, u16), &PortUse> = BTreeMap::new();
    let mut out = Vec::new();
    for u in uses {
        match seen.get(&(u.node, u.port)) {
            Some(first) => out.push((*first, u)),
            None => {
                seen.insert((u.node, u.port), u);
            }
        }
    }
    out
}

/// Checks everything and derives the deployment; `None` when anything is wrong (the
/// problems are in `p`).
pub fn derive(recipe: &Recipe, backend: &str, p: &mut Problems) -> Option<Deployment> {
    let inf = recipe.inference.as_ref()?;
    let before = p.len();
    let d = &inf.deployment;
    let par = &inf.parallel;

    let shape_name = d.kind.or("single_node".to_string());
    let ep = inf.enable_expert_parallel.or(false);
    let shape = match (shape_name.as_deref(), ep) {
        (Some("single_node"), _) => Some(Shape::SingleNode),
        (Some("multi_node"), Some(true)) => Some(Shape::WideEp),
        (Some("multi_node"), _) => Some(Shape::MultiNode),
        (Some("disaggregated"), _) => Some(Shape::Disaggregated),
        _ => None,
    };
    let disaggregated = shape == Some(Shape::Disaggregated);
    let gpus = d.gpus_per_node.or(DEFAULT_GPUS_PER_NODE);
    let tp = par.tp.or(1);
    let dp = par.dp.or(1);

    // A bound on the size, so that a typo (`num_nodes = 1000000000`) is a message rather
    // than an exhausted machine.
    let planned: u64 = match shape {
        Some(Shape::MultiNode | Shape::WideEp) => d.num_nodes.or(0).map_or(0, u64::from),
        Some(Shape::Disaggregated) => {
            d.num_prefill_nodes.or(0).map_or(0, u64::from)
                + d.num_decode_nodes.or(0).map_or(0, u64::from)
        }
        _ => 1,
    };
    let too_big = planned > MAX_NODES as u64;
    if too_big {
        p.push(
            Problem::new(format!(
                "the deployment would use {planned} nodes; prl-flow plans at most {MAX_NODES}"
            ))
            .at(Some(d.kind.span_or(&d.span)))
            .label("too many nodes")
            .help("check the node counts of `[inference.deployment]`"),
        );
    }

    // Replica groups: each a DP group over its nodes.
    let groups: Option<Vec<Group>> = match shape {
        _ if too_big => None,
        Some(Shape::SingleNode) => Some(split(Role::Engine, 0, 1, 1)),
        Some(s @ (Shape::MultiNode | Shape::WideEp)) => {
            let n = d.num_nodes.or(0).filter(|&n| n > 0);
            let default_r = if s == Shape::WideEp { Some(1) } else { n };
            let r = match &d.num_replicas {
                F::Absent => default_r,
                other => other.or(1),
            };
            match (n, r) {
                (Some(n), Some(r)) if n % r != 0 => {
                    p.push(
                        Problem::new(format!(
                            "`num_replicas` ({r}) must divide `num_nodes` ({n}): every replica spans the same number of nodes"
                        ))
                        .at(Some(d.num_replicas.span_or(&d.span)))
                        .label("does not divide num_nodes")
                        .help(format!("pick a divisor of {n}: {}", divisors(n))),
                    );
                    None
                }
                (Some(n), Some(r)) => Some(split(Role::Engine, 0, n as usize, r as usize)),
                _ => None,
            }
        }
        Some(Shape::Disaggregated) => {
            let mut out = Some(Vec::new());
            let mut first = 0usize;
            for (role, nodes_f, reps_f, nodes_key, reps_key) in [
                (
                    Role::Prefill,
                    &d.num_prefill_nodes,
                    &d.num_prefill_replicas,
                    "num_prefill_nodes",
                    "num_prefill_replicas",
                ),
                (
                    Role::Decode,
                    &d.num_decode_nodes,
                    &d.num_decode_replicas,
                    "num_decode_nodes",
                    "num_decode_replicas",
                ),
            ] {
                let n = nodes_f.or(0).filter(|&n| n > 0);
                let r = reps_f.or(1);
                match (n, r) {
                    (Some(n), Some(r)) if n % r != 0 => {
                        p.push(
                            Problem::new(format!(
                                "`{reps_key}` ({r}) must divide `{nodes_key}` ({n}): every replica spans the same number of nodes"
                            ))
                            .at(Some(reps_f.span_or(&d.span)))
                            .label(format!("does not divide {nodes_key}"))
                            .help(format!("pick a divisor of {n}: {}", divisors(n))),
                        );
                        out = None;
                    }
                    (Some(n), Some(r)) => {
                        if let Some(o) = out.as_mut() {
                            o.extend(split(role, first, n as usize, r as usize));
                        }
                        first += n as usize;
                    }
                    _ => out = None,
                }
            }
            out
        }
        None => None,
    };

    if gpus.is_some_and(|g| g > MAX_GPUS_PER_NODE) {
        p.push(
            Problem::new(format!("`gpus_per_node` is more than {MAX_GPUS_PER_NODE}"))
                .at(Some(d.gpus_per_node.span_or(&d.span)))
                .label("too many GPUs")
                .help("write the number of GPUs of one node, e.g. `gpus_per_node = 8`"),
        );
    }

    // GPUs: each node of a replica hosts dp / k ranks of tp GPUs. (In u64: the counts
    // are anything a user wrote.)
    if let (Some(groups), Some(tp), Some(dp), Some(gpus)) = (
        &groups,
        tp.map(u64::from),
        dp.map(u64::from),
        gpus.map(u64::from),
    ) {
        let mut sizes: Vec<(Role, usize)> =
            groups.iter().map(|g| (g.role, g.nodes.len())).collect();
        sizes.dedup();
        for (role, k) in sizes {
            let k32 = k as u64;
            let side = match role {
                Role::Engine => String::new(),
                r => format!(" ({} side)", r.kind()),
            };
            if dp % k32 != 0 {
                p.push(
                    Problem::new(format!(
                        "`dp` ({dp}) cannot be spread evenly over the {k} nodes of each replica{side}"
                    ))
                    .at(Some(par.dp.span_or(&par.span)))
                    .label(format!("not a multiple of {k}"))
                    .help(format!("make `dp` a multiple of {k}, e.g. `dp = {}`", k32 * (dp / k32).max(1))),
                );
                continue;
            }
            let local = dp / k32;
            if local * tp > gpus {
                p.push(
                    Problem::new(format!(
                        "`tp × dp` does not fit a node{side}: {local} rank(s) × tp {tp} = {} GPUs per node, and `gpus_per_node` is {gpus}",
                        local * tp
                    ))
                    .at(Some(par.dp.span_or(&par.tp.span_or(&par.span))))
                    .label("too many GPUs per node")
                    .help(if k == 1 {
                        format!("make `tp × dp` at most {gpus}, or raise `gpus_per_node`")
                    } else {
                        format!("make `tp × dp / {k}` at most {gpus} (dp counts the ranks of a whole replica), or use more nodes per replica")
                    }),
                );
            }
            if shape == Some(Shape::WideEp) {
                if gpus % tp != 0 {
                    p.push(
                        Problem::new(format!(
                            "wide-EP needs `gpus_per_node` ({gpus}) to be a multiple of `tp` ({tp})"
                        ))
                        .at(Some(par.tp.span_or(&par.span)))
                        .label("does not divide gpus_per_node")
                        .help("pick a `tp` that divides `gpus_per_node` (often `tp = 1` with expert parallelism)"),
                    );
                } else if dp * tp != k32 * gpus {
                    p.push(
                        Problem::new(format!(
                            "wide-EP uses every GPU of its nodes: `dp × tp` must be {} ({k} node(s) per replica × {gpus} GPUs), not {}",
                            k32 * gpus,
                            dp * tp
                        ))
                        .at(Some(par.dp.span_or(&par.span)))
                        .label("does not fill the replica")
                        .help(format!("set `dp = {}`", k32 * gpus / tp)),
                    );
                }
            }
        }
    }

    // Offload.
    let offload = check_offload(inf, backend, p);
    if inf.enable_return_routed_experts.or(false) == Some(true) && inf.offload.is_some() {
        p.push(
            Problem::new("`enable_return_routed_experts` cannot be combined with `kv_cache_offload`: routed experts are not kept with offloaded KV blocks, so a replayed prefix would come back without them")
                .at(Some(inf.enable_return_routed_experts.span_or(&inf.span)))
                .label("router replay")
                .help("drop `[inference.kv_cache_offload]`, or set `enable_return_routed_experts = false`"),
        );
    }
    if inf.enable_eplb.or(false) == Some(true) && ep == Some(false) {
        p.push(
            Problem::new("`enable_eplb` balances experts across expert-parallel ranks, and `enable_expert_parallel` is off")
                .at(Some(inf.enable_eplb.span_or(&inf.span)))
                .label("needs expert parallelism")
                .help("set `enable_expert_parallel = true`, or drop `enable_eplb`"),
        );
    }

    // What the launcher manages.
    let mooncake_on = offload
        .as_ref()
        .is_some_and(|o| o.kind == OffloadKind::Mooncake);
    for (table, vars) in [
        ("env", &d.env),
        ("prefill_env", &d.prefill_env),
        ("decode_env", &d.decode_env),
    ] {
        for (k, _) in vars {
            if let Some(why) = managed_env(&k.v, disaggregated, mooncake_on) {
                p.push(
                    Problem::new(format!(
                        "`inference.deployment.{table}` may not set `{}`: the launcher manages it",
                        k.v
                    ))
                    .at(Some(k.span.clone()))
                    .label("managed by the launcher")
                    .help(why),
                );
            }
        }
    }
    for x in &inf.vllm_extra {
        if let Some(why) = managed_dest(&x.dest, disaggregated) {
            p.push(
                Problem::new(format!(
                    "`inference.vllm_extra.{}` sets what the launcher manages",
                    x.key.v
                ))
                .at(Some(x.key.span.clone()))
                .label("managed by the launcher")
                .help(why),
            );
        }
    }

    // Launchers, names, timings.
    let backend_port = d.backend_port.or(DEFAULT_BACKEND_PORT);
    let router_port = d.router_port.or(DEFAULT_ROUTER_PORT);
    let metrics_port = d.router_metrics_port.or(DEFAULT_ROUTER_METRICS_PORT);
    let rpc_port = d.data_parallel_rpc_port.or(DEFAULT_DP_RPC_PORT);
    let nixl_port = d.nixl_side_channel_port.or(DEFAULT_NIXL_PORT);
    let interval_default = if backend == "local" {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };

    if p.len() > before {
        return None;
    }
    let (Some(shape), Some(groups), Some(gpus), Some(tp), Some(dp)) = (shape, groups, gpus, tp, dp)
    else {
        return None;
    };
    let (
        Some(backend_port),
        Some(router_port),
        Some(metrics_port),
        Some(rpc_port),
        Some(nixl_port),
    ) = (backend_port, router_port, metrics_port, rpc_port, nixl_port)
    else {
        return None;
    };
    let model = inf.model.get()?.v.clone();
    let launcher = inf.launcher.or(to_strings(DEFAULT_LAUNCHER))?;
    let router_launcher = d.router_launcher.or(to_strings(DEFAULT_ROUTER_LAUNCHER))?;
    let ready_timeout = d.ready_timeout.or(DEFAULT_READY_TIMEOUT)?;
    let probe_interval = d.probe_interval.or(interval_default)?;
    let router_policy = d.router_policy.or("consistent_hash".to_string())?;
    let prefix_caching = match (
        inf.enable_prefix_caching.or(false)?,
        &inf.enable_prefix_caching,
        &offload,
    ) {
        (_, _, Some(_)) => Some(true),
        (v, F::Set(_), None) => Some(v),
        _ => None,
    };
    let nodes = groups
        .iter()
        .flat_map(|g| g.nodes.iter())
        .max()
        .map_or(1, |m| m + 1);

    // Engines.
    let user_env: Vec<(String, String)> = d
        .env
        .iter()
        .map(|(k, v)| (k.v.clone(), v.v.clone()))
        .collect();
    let mut engines = Vec::new();
    let mut uses: Vec<PortUse> = Vec::new();
    let span_of = |f: &F<u16>| f.span_or(&d.span);
    for g in &groups {
        let k = g.nodes.len();
        let local = dp / k as u32;
        let kv = kv_transfer_config(g.role, offload.as_ref()).map(|v| v.to_string());
        let role_env = match g.role {
            Role::Engine => &[][..],
            Role::Prefill => &d.prefill_env[..],
            Role::Decode => &d.decode_env[..],
        };
        for (i, &node) in g.nodes.iter().enumerate() {
            let id = format!("{}[{}].node[{node}]", g.role.kind(), g.replica);
            let headless = i > 0;
            let mut env: BTreeMap<String, String> = user_env.iter().cloned().collect();
            for (k, v) in role_env {
                env.insert(k.v.clone(), v.v.clone());
            }
            let mut ports = Vec::new();
            if !headless {
                ports.push(backend_port);
                uses.push(PortUse {
                    node,
                    port: backend_port,
                    task: id.clone(),
                    field: "backend_port",
                    span: span_of(&d.backend_port),
                });
                if k > 1 {
                    ports.push(rpc_port);
                    uses.push(PortUse {
                        node,
                        port: rpc_port,
                        task: id.clone(),
                        field: "data_parallel_rpc_port",
                        span: span_of(&d.data_parallel_rpc_port),
                    });
                }
            }
            let nixl = (g.role != Role::Engine).then(|| {
                let count = (local * tp).min(u32::from(u16::MAX)) as u16;
                (nixl_port, count)
            });
            if let Some((base, count)) = nixl {
                env.insert(
                    "VLLM_NIXL_SIDE_CHANNEL_HOST".into(),
                    host_ref(&node_name(node)),
                );
                env.insert("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), base.to_string());
                for off in 0..count {
                    match base.checked_add(off) {
                        Some(port) => {
                            ports.push(port);
                            uses.push(PortUse {
                                node,
                                port,
                                task: id.clone(),
                                field: "nixl_side_channel_port",
                                span: span_of(&d.nixl_side_channel_port),
                            });
                        }
                        None => {
                            p.push(
                                Problem::new(format!(
                                    "the NIXL side-channel ports from {base} run past 65535 ({count} ranks per node)"
                                ))
                                .at(Some(span_of(&d.nixl_side_channel_port)))
                                .help("pick a lower `nixl_side_channel_port`"),
                            );
                            break;
                        }
                    }
                }
            }
            if mooncake_on {
                env.insert("MOONCAKE_CONFIG_PATH".into(), MOONCAKE_CONFIG_FILE.into());
                env.insert("PYTHONHASHSEED".into(), "0".into());
            }
            engines.push(Engine {
                id,
                role: g.role,
                replica: g.replica,
                node,
                head: g.nodes[0],
                headless,
                group_nodes: k,
                port: backend_port,
                dp_size: dp,
                dp_local: local,
                dp_start_rank: i as u32 * local,
                rpc_port,
                nixl_port: nixl,
                kv_transfer_config: kv.clone(),
                env,
                ports,
            });
        }
    }

    // Routers.
    let routers = layout_routers(
        shape,
        &groups,
        router_port,
        metrics_port,
        backend_port,
        p,
        &d.router_metrics_port.span_or(&d.span),
    );
    for r in &routers {
        uses.push(PortUse {
            node: r.node,
            port: r.port,
            task: r.id.clone(),
            field: "router_port",
            span: span_of(&d.router_port),
        });
        uses.push(PortUse {
            node: r.node,
            port: r.metrics_port,
            task: r.id.clone(),
            field: "router_metrics_port",
            span: span_of(&d.router_metrics_port),
        });
    }

    // Mooncake.
    let mooncake = match (&offload, &inf.offload) {
        (Some(o), Some(raw)) if o.kind == OffloadKind::Mooncake => {
            let m = Mooncake {
                node: 0,
                master_port: raw.master_port.or(DEFAULT_MOONCAKE_MASTER_PORT)?,
                metrics_port: raw.master_metrics_port.or(DEFAULT_MOONCAKE_METRICS_PORT)?,
                metadata_port: raw.metadata_port.or(DEFAULT_MOONCAKE_METADATA_PORT)?,
                client_port: raw.client_port.or(DEFAULT_MOONCAKE_CLIENT_PORT)?,
                protocol: raw.protocol.or("rdma".to_string())?,
                device_name: raw.device_name.or(String::new())?,
            };
            let at = |f: &F<u16>| f.span_or(&raw.span);
            uses.push(PortUse {
                node: m.node,
                port: m.master_port,
                task: "mooncake-master".into(),
                field: "master_port",
                span: at(&raw.master_port),
            });
            uses.push(PortUse {
                node: m.node,
                port: m.metrics_port,
                task: "mooncake-master".into(),
                field: "master_metrics_port",
                span: at(&raw.master_metrics_port),
            });
            uses.push(PortUse {
                node: m.node,
                port: m.metadata_port,
                task: "metadata-server".into(),
                field: "metadata_port",
                span: at(&raw.metadata_port),
            });
            for node in 0..nodes {
                uses.push(PortUse {
                    node,
                    port: m.client_port,
                    task: format!("mooncake-client.node[{node}]"),
                    field: "client_port",
                    span: at(&raw.client_port),
                });
            }
            Some(m)
        }
        _ => None,
    };

    for (a, b) in port_clashes(&uses) {
        p.push(
            Problem::new(format!(
                "port {} is taken twice on `{}`: by `{}` (`{}`) and by `{}` (`{}`)",
                b.port,
                node_name(b.node),
                a.task,
                a.field,
                b.task,
                b.field
            ))
            .at(Some(b.span.clone()))
            .label("clashes with another service on this node")
            .help(format!(
                "give `{}` and `{}` different ports",
                a.field, b.field
            )),
        );
    }
    if p.len() > before {
        return None;
    }

    let served_model_name = served_name(&inf.vllm_extra).unwrap_or_else(|| model.clone());
    Some(Deployment {
        shape,
        backend: backend.to_string(),
        model,
        served_model_name,
        launcher,
        router_launcher,
        nodes,
        gpus_per_node: gpus,
        tp,
        dp,
        expert_parallel: ep.unwrap_or(false),
        dbo: inf.enable_dbo.or(false).unwrap_or(false),
        eplb: inf.enable_eplb.or(false).unwrap_or(false),
        return_routed_experts: inf.enable_return_routed_experts.or(false).unwrap_or(false),
        prefix_caching,
        router_policy,
        ready_timeout,
        probe_interval,
        offload,
        mooncake,
        groups,
        engines,
        routers,
        extra_args: inf
            .vllm_extra
            .iter()
            .flat_map(|x| x.args.iter().cloned())
            .collect(),
    })
}

/// The file (in an engine's run dir) holding its node's Mooncake config.
pub const MOONCAKE_CONFIG_FILE: &str = "mooncake.json";

fn to_strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn divisors(n: u32) -> String {
    (1..=n)
        .filter(|d| n % d == 0)
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The model name clients use: `served_model_name`'s first value, if given.
fn served_name(extra: &[Extra]) -> Option<String> {
    let x = extra.iter().find(|x| x.dest == "served_model_name")?;
    match &x.value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => a.first().and_then(|v| v.as_str()).map(str::to_string),
        _ => None,
    }
}

fn check_offload(
    inf: &super::schema::Inference,
    backend: &str,
    p: &mut Problems,
) -> Option<Offload> {
    let raw = inf.offload.as_ref()?;
    let kind = match raw.kind.get().map(|k| k.v.as_str()) {
        Some("native") => OffloadKind::Native,
        Some("mooncake") => OffloadKind::Mooncake,
        _ => return None,
    };
    let mut ok = true;
    if !raw.has_cpu {
        ok = false;
        p.push(
            Problem::new("`kv_cache_offload` has no `cpu` tier: both vLLM's offload and Mooncake stage KV blocks through CPU memory, and a disk tier sits under it")
                .at(Some(raw.disk_path.span_or(&raw.span)))
                .label("disk only")
                .help("add a CPU tier, e.g. `cpu = { num_bytes = 107374182400 }`"),
        );
    }
    if kind == OffloadKind::Mooncake && backend != "slurm" {
        ok = false;
        p.push(
            Problem::new(format!(
                "Mooncake offload runs on the `slurm` backend only (its store needs RDMA between allocated nodes), and this recipe's backend is `{backend}`"
            ))
            .at(Some(raw.kind.span_or(&raw.span)))
            .label("mooncake")
            .help("use `type = \"native\"` (vLLM's own CPU offload) here, or `[backend] type = \"slurm\"`"),
        );
    }
    if inf.enable_prefix_caching.or(true) == Some(false) {
        ok = false;
        p.push(
            Problem::new("KV offload turns prefix caching on (offloaded blocks are found again by their prefix), and `enable_prefix_caching` is false")
                .at(Some(inf.enable_prefix_caching.span_or(&inf.span)))
                .label("contradicts kv_cache_offload")
                .help("drop `enable_prefix_caching = false`, or drop `[inference.kv_cache_offload]`"),
        );
    }
    let cpu_bytes = raw.cpu_bytes.get().map(|b| b.v);
    let disk = match &raw.disk_path {
        F::Set(s) => Some(s.v.clone()),
        F::Bad => {
            ok = false;
            None
        }
        F::Absent => None,
    };
    match (ok, cpu_bytes) {
        (true, Some(cpu_bytes)) => Some(Offload {
            kind,
            cpu_bytes,
            disk,
        }),
        _ => None,
    }
}

fn layout_routers(
    shape: Shape,
    groups: &[Group],
    port: u16,
    metrics_base: u16,
    backend_port: u16,
    p: &mut Problems,
    metrics_span: &Range<usize>,
) -> Vec<Router> {
    let head_url = |g: &Group| url(g.nodes[0], backend_port);
    let engine_ids = |g: &Group| -> Vec<String> {
        g.nodes
            .iter()
            .map(|n| format!("{}[{}].node[{n}]", g.role.kind(), g.replica))
            .collect()
    };
    // (node, prefill groups, decode groups / workers)
    let mut sets: Vec<(usize, Vec<&Group>)> = Vec::new();
    if shape == Shape::Disaggregated {
        let prefill: Vec<&Group> = groups.iter().filter(|g| g.role == Role::Prefill).collect();
        let decode: Vec<&Group> = groups.iter().filter(|g| g.role == Role::Decode).collect();
        if prefill.len() == decode.len() && prefill.len() > 1 {
            for (pg, dg) in prefill.iter().zip(&decode) {
                sets.push((pg.nodes[0], vec![*pg, *dg]));
            }
        } else {
            sets.push((0, groups.iter().collect()));
        }
    } else {
        sets.push((0, groups.iter().collect()));
    }
    let several = sets.len() > 1;
    let mut out = Vec::with_capacity(sets.len());
    for (i, (node, gs)) in sets.into_iter().enumerate() {
        let suffix = if several {
            format!("[{i}]")
        } else {
            String::new()
        };
        let Some(metrics_port) = u16::try_from(i)
            .ok()
            .and_then(|i| metrics_base.checked_add(i))
        else {
            p.push(
                Problem::new(format!(
                    "the routers' metrics ports from {metrics_base} run past 65535 ({} routers)",
                    i + 1
                ))
                .at(Some(metrics_span.clone()))
                .help("pick a lower `router_metrics_port`"),
            );
            break;
        };
        let pd = shape == Shape::Disaggregated;
        out.push(Router {
            id: format!("router{suffix}"),
            suffix,
            node,
            port,
            metrics_port,
            pd,
            workers: if pd {
                Vec::new()
            } else {
                gs.iter().map(|g| head_url(g)).collect()
            },
            prefill: gs
                .iter()
                .filter(|g| g.role == Role::Prefill)
                .map(|g| head_url(g))
                .collect(),
            decode: gs
                .iter()
                .filter(|g| g.role == Role::Decode)
                .map(|g| head_url(g))
                .collect(),
            engines: gs.iter().flat_map(|g| engine_ids(g)).collect(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_makes_equal_consecutive_groups() {
        let g = split(Role::Decode, 2, 4, 2);
        assert_eq!(g[0].nodes, [2, 3]);
        assert_eq!(g[1].nodes, [4, 5]);
        assert_eq!(g[1].replica, 1);
    }

    #[test]
    fn connectors_per_role_and_offload() {
        assert_eq!(kv_transfer_config(Role::Engine, None), None);
        let native = Offload {
            kind: OffloadKind::Native,
            cpu_bytes: 10,
            disk: None,
        };
        assert_eq!(
            kv_transfer_config(Role::Engine, Some(&native)).map(|v| v.to_string()),
            Some(r#"{"kv_connector":"OffloadingConnector","kv_connector_extra_config":{"cpu_bytes_to_use":10},"kv_role":"kv_both"}"#.to_string())
        );
        let tiered = Offload {
            disk: Some("/d".into()),
            ..native.clone()
        };
        let v = kv_transfer_config(Role::Engine, Some(&tiered)).expect("config");
        assert_eq!(
            v["kv_connector_extra_config"]["spec_name"],
            "TieringOffloadingSpec"
        );
        assert_eq!(
            v["kv_connector_extra_config"]["secondary_tiers"][0]["type"],
            "fs"
        );
        let p = kv_transfer_config(Role::Prefill, None).expect("nixl");
        assert_eq!(p["kv_role"], "kv_producer");
        let d = kv_transfer_config(Role::Decode, Some(&native)).expect("multi");
        assert_eq!(d["kv_connector"], "MultiConnector");
        assert_eq!(
            d["kv_connector_extra_config"]["connectors"][0]["kv_role"],
            "kv_consumer"
        );
        assert_eq!(
            d["kv_connector_extra_config"]["connectors"][1]["kv_connector"],
            "OffloadingConnector"
        );
        let mc = Offload {
            kind: OffloadKind::Mooncake,
            cpu_bytes: 1,
            disk: None,
        };
        assert_eq!(
            kv_transfer_config(Role::Engine, Some(&mc)).expect("mc")["kv_connector"],
            "MooncakeStoreConnector"
        );
    }

    #[test]
    fn clashes_are_per_node() {
        let u = |node, port, task: &str| PortUse {
            node,
            port,
            task: task.into(),
            field: "f",
            span: 0..0,
        };
        let uses = vec![u(0, 1, "a"), u(1, 1, "b"), u(0, 1, "c"), u(0, 2, "d")];
        let c = port_clashes(&uses);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].0.task.as_str(), c[0].1.task.as_str()), ("a", "c"));
    }

    #[test]
    fn managed_names_say_where_to_go() {
        assert!(managed_dest("tensor_parallel_size", false).is_some_and(|h| h.contains("tp")));
        assert!(managed_dest("all2all_backend", false).is_none());
        assert!(managed_dest("all2all_backend", true).is_some());
        assert!(managed_env("CUDA_VISIBLE_DEVICES", false, false).is_some());
        assert!(managed_env("PRL_MOCK_DELAY", true, true).is_none());
    }
}
