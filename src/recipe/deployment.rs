//! The deployment model: what a checked recipe becomes before anything is rendered. Nodes,
//! replicas and their roles, the engine processes (with their DP ranks, GPUs, ports, KV
//! connector and env), the routers, the Mooncake store. Plain data with the defaults and
//! bounds it is built with; [`super::derive`] builds it and [`super::render`] turns it into
//! task specs.
//!
//! The layout, in short (docs/recipes.md has the reasons):
//! - nodes are `node0..node{N-1}`: a multi-node deployment's replicas in order; for P/D,
//!   unit after unit, each unit's prefill nodes first, then its decode nodes;
//! - a *replica* (an engine replica, or a prefill or decode replica) spans `k` consecutive
//!   nodes and runs `dp` ranks, `dp / k` on each node, each rank on `tp` GPUs;
//! - by default (`load_balancing = "external"`, as prime-rl launches) every rank is a
//!   `vllm serve` of its own: rank `s` of a node listens on `backend_port + s` and sees GPUs
//!   `s·tp .. s·tp+tp-1`. With expert parallelism the ranks of a replica form one DP group
//!   (`--data-parallel-rank`); without it each rank is an engine of its own. The router lists
//!   every rank;
//! - with `load_balancing = "internal"`, one process per node runs the node's ranks and vLLM
//!   balances among them; the replica's first node runs the API server, the others
//!   `--headless`; the router lists one URL per replica;
//! - one router on `node0`, or for P/D one router per unit on the unit's first node.

use std::collections::BTreeMap;
use std::time::Duration;

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
/// The router's log level unless the recipe says otherwise: prime-rl's choice.
pub const DEFAULT_ROUTER_LOG_LEVEL: &str = "debug";
/// What prime-rl passes to every engine (`--gpu-memory-utilization`), unless `vllm_extra`
/// sets it; vLLM 0.33's own default is 0.92.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: &str = "0.9";
/// The file (in an engine's run dir) holding its node's Mooncake config.
pub const MOONCAKE_CONFIG_FILE: &str = "mooncake.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    SingleNode,
    MultiNode,
    /// `multi_node` with expert parallelism: each replica one DP group over its nodes.
    WideEp,
    Disaggregated,
}

/// What a replica's engines do: everything, or one side of a P/D pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaRole {
    Engine,
    Prefill,
    Decode,
}

impl ReplicaRole {
    /// The task kind (and id prefix) of its engines.
    pub fn kind(self) -> &'static str {
        match self {
            ReplicaRole::Engine => "engine",
            ReplicaRole::Prefill => "prefill",
            ReplicaRole::Decode => "decode",
        }
    }
}

/// One replica: a data-parallel group over consecutive nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub role: ReplicaRole,
    /// Its number among the replicas of its role (over all P/D units).
    pub index: usize,
    /// The P/D unit it belongs to (0 outside P/D).
    pub unit: usize,
    pub nodes: Vec<usize>,
    /// Its data-parallel ranks, over all of its nodes.
    pub dp: u32,
}

impl Replica {
    /// Ranks on each of its nodes.
    pub fn dp_local(&self) -> u32 {
        self.dp / self.nodes.len().max(1) as u32
    }
}

/// How a replica's ranks are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancing {
    /// One API server per rank, the router picks the rank (prime-rl's layout).
    External,
    /// One process per node; vLLM balances among a replica's ranks.
    Internal,
}

/// An engine process's part in data parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpPart {
    /// An engine of its own (a dense model's rank): no data-parallel flags.
    Alone,
    /// One rank of a DP group of `size`, with its own API server (`--data-parallel-rank`).
    Rank { size: u32, rank: u32 },
    /// A node's `local` ranks of a DP group of `size`, starting at `start` (internal
    /// balancing); `spans_nodes` when the group has other nodes.
    Node {
        size: u32,
        local: u32,
        start: u32,
        spans_nodes: bool,
    },
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

/// KV cache offload, as the engines are configured for it.
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

/// One engine process: a rank of a replica (external balancing) or a node of it.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineProcess {
    pub id: String,
    pub role: ReplicaRole,
    pub replica: usize,
    pub node: usize,
    /// Its place among the engine processes of its node (0 for a node's only process).
    pub slot: u32,
    /// The replica's first node (API server, DP coordinator).
    pub head: usize,
    pub headless: bool,
    pub port: u16,
    pub dp: DpPart,
    pub rpc_port: u16,
    /// The GPUs it sees (`CUDA_VISIBLE_DEVICES`); `None`: all of the node's.
    pub gpus: Option<Vec<u32>>,
    /// The first NIXL side-channel port it binds (P/D), and how many from there.
    pub nixl_port: Option<(u16, u16)>,
    pub kv_transfer_config: Option<String>,
    /// `--compilation-config` (decode engines).
    pub compilation_config: Option<String>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<u16>,
}

impl EngineProcess {
    /// Whether it hosts its DP group's coordinator (the others reach it on the RPC port).
    pub fn coordinator(&self) -> bool {
        match self.dp {
            DpPart::Rank { rank, size } => rank == 0 && size > 1,
            DpPart::Node { spans_nodes, .. } => spans_nodes && !self.headless,
            DpPart::Alone => false,
        }
    }

    /// Its global data-parallel rank(s), for people: `3`, `8-15`, or `-` for an engine of
    /// its own.
    pub fn ranks(&self) -> String {
        match self.dp {
            DpPart::Alone => "-".into(),
            DpPart::Rank { rank, .. } => rank.to_string(),
            DpPart::Node { local, start, .. } if local > 1 => {
                format!("{start}-{}", start + local - 1)
            }
            DpPart::Node { start, .. } => start.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    /// `router` when there is one, `router[u]` when there are several (one per P/D unit).
    pub id: String,
    /// The suffix shared by its `register` and `health-probe` tasks (`""` or `[g]`).
    pub suffix: String,
    pub node: usize,
    /// The address it binds (`--host`); `None`: its node's address.
    pub bind: Option<String>,
    pub port: u16,
    pub metrics_port: u16,
    pub pd: bool,
    pub workers: Vec<String>,
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    /// The engine tasks it needs (every process of its replicas).
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
    /// P/D units (1 outside P/D).
    pub units: usize,
    pub gpus_per_node: u32,
    pub tp: u32,
    pub load_balancing: LoadBalancing,
    pub expert_parallel: bool,
    pub dbo: bool,
    pub eplb: bool,
    pub return_routed_experts: bool,
    /// `Some(true)` is forced by offload; `None` leaves vLLM's default.
    pub prefix_caching: Option<bool>,
    pub router_policy: String,
    pub router_log_level: String,
    pub ready_timeout: Duration,
    pub probe_interval: Duration,
    pub offload: Option<Offload>,
    pub mooncake: Option<Mooncake>,
    pub replicas: Vec<Replica>,
    pub engines: Vec<EngineProcess>,
    pub routers: Vec<Router>,
    pub extra_args: Vec<String>,
    /// `--gpu-memory-utilization`, when `vllm_extra` leaves it to the launcher.
    pub gpu_memory_utilization: Option<String>,
    /// How `run --attach` and `watch` restart a service that dies.
    pub restart: crate::plan::RestartPolicy,
}
