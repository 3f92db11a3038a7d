//! The deployment model: what a checked recipe becomes before anything is rendered. Nodes,
//! replicas and their roles, one [`EngineProcess`] per node of a replica (with its DP
//! ranks, ports, KV connector and env), the routers, the Mooncake store. Plain data with
//! the defaults and bounds it is built with; [`super::derive`] builds it and
//! [`super::render`] turns it into task specs.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Its number among the replicas of its role.
    pub index: usize,
    pub nodes: Vec<usize>,
}

impl Replica {
    /// The task id of its engine on `node`: `prefill[0].node[1]`.
    pub fn engine_id(&self, node: usize) -> String {
        format!("{}[{}].node[{node}]", self.role.kind(), self.index)
    }
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

/// One engine process: a node of a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineProcess {
    pub id: String,
    pub role: ReplicaRole,
    pub replica: usize,
    pub node: usize,
    /// The replica's first node (API server, DP coordinator).
    pub head: usize,
    pub headless: bool,
    /// Nodes in the replica.
    pub replica_nodes: usize,
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
    pub replicas: Vec<Replica>,
    pub engines: Vec<EngineProcess>,
    pub routers: Vec<Router>,
    pub extra_args: Vec<String>,
}
