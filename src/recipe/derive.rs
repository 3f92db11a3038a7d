//! From the checked settings to the [`Deployment`]: engine processes (DP ranks, GPUs, ports,
//! KV connector, env), routers and the Mooncake store, each computed once by a small function
//! without I/O. Nothing here reports a problem: [`super::validate`] has checked every rule
//! first, and a port base that would run past 65535 yields only the ports that fit (the
//! validation says so).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;

use super::deployment::{
    node_name, url, Deployment, DpPart, EngineProcess, LoadBalancing, Mooncake, Offload,
    OffloadKind, Replica, ReplicaRole, Router, Shape, DEFAULT_GPU_MEMORY_UTILIZATION,
    MOONCAKE_CONFIG_FILE,
};
use super::extra::VllmExtra;
use crate::plan::host_ref;

/// What the derivation starts from: the recipe's values, checked, each default filled in.
#[derive(Debug, Clone)]
pub struct DeploymentSettings<'a> {
    pub shape: Shape,
    pub backend: &'a str,
    pub model: String,
    pub launcher: Vec<String>,
    pub router_launcher: Vec<String>,
    /// Each with its own `dp` (filled in where the recipe leaves it to the shape).
    pub replicas: Vec<Replica>,
    pub units: usize,
    pub gpus_per_node: u32,
    pub tp: u32,
    pub load_balancing: LoadBalancing,
    pub expert_parallel: bool,
    pub dbo: bool,
    pub eplb: bool,
    pub return_routed_experts: bool,
    pub prefix_caching: Option<bool>,
    pub router_policy: String,
    pub router_bind: Option<String>,
    pub router_log_level: String,
    pub restart: crate::plan::RestartPolicy,
    pub ready_timeout: Duration,
    pub probe_interval: Duration,
    pub ports: PortBases,
    pub offload: Option<Offload>,
    pub mooncake: Option<Mooncake>,
    /// `[inference.deployment] env`, then `prefill_env` and `decode_env`.
    pub env: Vec<(String, String)>,
    pub prefill_env: Vec<(String, String)>,
    pub decode_env: Vec<(String, String)>,
    pub vllm_extra: &'a [VllmExtra],
}

/// The ports of `[inference.deployment]`, defaults filled in.
#[derive(Debug, Clone, Copy)]
pub struct PortBases {
    /// Rank `s` of a node listens on `backend + s`.
    pub backend: u16,
    pub router: u16,
    /// The first router's; the others count up from it.
    pub router_metrics: u16,
    pub dp_rpc: u16,
    /// The first NIXL side-channel port of a node; its ranks count up from it.
    pub nixl: u16,
}

/// Decode engines capture CUDA graphs for decode batches only, as prime-rl runs them.
pub const DECODE_COMPILATION_CONFIG: &str = r#"{"cudagraph_mode":"FULL_DECODE_ONLY"}"#;

/// The deployment the settings describe.
pub fn deployment(s: &DeploymentSettings<'_>) -> Deployment {
    let nodes = s
        .replicas
        .iter()
        .flat_map(|r| r.nodes.iter())
        .max()
        .map_or(1, |m| m + 1);
    let sets_extra = |dest: &str| s.vllm_extra.iter().any(|x| x.dest == dest);
    let engines: Vec<EngineProcess> = s
        .replicas
        .iter()
        .flat_map(|r| engine_processes(s, r))
        .collect();
    Deployment {
        shape: s.shape,
        backend: s.backend.to_string(),
        model: s.model.clone(),
        served_model_name: served_name(s.vllm_extra).unwrap_or_else(|| s.model.clone()),
        launcher: s.launcher.clone(),
        router_launcher: s.router_launcher.clone(),
        nodes,
        units: s.units,
        gpus_per_node: s.gpus_per_node,
        tp: s.tp,
        load_balancing: s.load_balancing,
        expert_parallel: s.expert_parallel,
        dbo: s.dbo,
        eplb: s.eplb,
        return_routed_experts: s.return_routed_experts,
        prefix_caching: s.prefix_caching,
        router_policy: s.router_policy.clone(),
        router_log_level: s.router_log_level.clone(),
        ready_timeout: s.ready_timeout,
        probe_interval: s.probe_interval,
        offload: s.offload.clone(),
        mooncake: s.mooncake.clone(),
        replicas: s.replicas.clone(),
        routers: routers(s, &engines),
        engines,
        extra_args: s
            .vllm_extra
            .iter()
            .flat_map(|x| x.args.iter().cloned())
            .collect(),
        gpu_memory_utilization: (!sets_extra("gpu_memory_utilization"))
            .then(|| DEFAULT_GPU_MEMORY_UTILIZATION.to_string()),
        restart: s.restart.clone(),
    }
}

/// Splits `count` nodes starting at `first` into `replicas` replicas of equal size, each
/// running `dp` ranks; `index_base` numbers them on from earlier units.
pub fn split(
    role: ReplicaRole,
    unit: usize,
    index_base: usize,
    first: usize,
    count: usize,
    replicas: usize,
    dp: u32,
) -> Vec<Replica> {
    let per = count / replicas.max(1);
    (0..replicas)
        .map(|r| Replica {
            role,
            index: index_base + r,
            unit,
            nodes: (first + r * per..first + (r + 1) * per).collect(),
            dp,
        })
        .collect()
}

/// How many NIXL side-channel ports one engine process of `ranks` local ranks binds: one
/// per engine core, each at `VLLM_NIXL_SIDE_CHANNEL_PORT` plus its global DP rank (vLLM's
/// NixlConnector; the mock engine binds the same).
pub fn nixl_port_count(ranks: u32) -> u16 {
    ranks.min(u32::from(u16::MAX)) as u16
}

/// The ports from `base` on, `count` of them, as far as they fit under 65536.
pub fn port_run(base: u16, count: u16) -> impl Iterator<Item = u16> {
    (0..count).map_while(move |off| base.checked_add(off))
}

/// `base + off`, when it fits.
fn port_at(base: u16, off: u32) -> Option<u16> {
    u16::try_from(u32::from(base) + off).ok()
}

/// The engine processes of a replica: one per rank (external balancing) or one per node.
fn engine_processes(s: &DeploymentSettings<'_>, r: &Replica) -> Vec<EngineProcess> {
    let k = r.nodes.len();
    let local = r.dp_local();
    let pd = r.role != ReplicaRole::Engine;
    let kv = kv_transfer_config(r.role, s.offload.as_ref()).map(|v| v.to_string());
    let compilation = (r.role == ReplicaRole::Decode
        && !s.vllm_extra.iter().any(|x| x.dest == "compilation_config"))
    .then(|| DECODE_COMPILATION_CONFIG.to_string());
    let mut out = Vec::new();
    for (i, &node) in r.nodes.iter().enumerate() {
        let i = i as u32;
        let mut add = |id: String, slot: u32, headless: bool, port: u16, dp: DpPart| {
            let gpus = match s.load_balancing {
                LoadBalancing::External => Some((slot * s.tp..(slot + 1) * s.tp).collect()),
                LoadBalancing::Internal => None,
            };
            // `VLLM_NIXL_SIDE_CHANNEL_PORT` (prime-rl: `base + slot`) and the ports vLLM
            // binds from it: one per engine core, at the variable plus its global DP rank.
            let (nixl_env, nixl) = match (pd, s.load_balancing, dp) {
                (false, ..) => (None, None),
                (true, LoadBalancing::External, _) => {
                    let rank = match dp {
                        DpPart::Rank { rank, .. } => rank,
                        _ => 0,
                    };
                    let env = port_at(s.ports.nixl, slot);
                    let bound = env.and_then(|b| port_at(b, rank));
                    (env, bound.map(|b| (b, nixl_port_count(1))))
                }
                (true, LoadBalancing::Internal, _) => {
                    let start = match dp {
                        DpPart::Node { start, .. } => start,
                        _ => 0,
                    };
                    let bound = port_at(s.ports.nixl, start);
                    (
                        Some(s.ports.nixl),
                        bound.map(|b| (b, nixl_port_count(local))),
                    )
                }
            };
            let mut e = EngineProcess {
                id,
                role: r.role,
                replica: r.index,
                node,
                slot,
                head: r.nodes[0],
                headless,
                port,
                dp,
                rpc_port: s.ports.dp_rpc,
                env: engine_env(s, r.role, node, nixl_env, gpus.as_deref()),
                gpus,
                nixl_port: nixl,
                kv_transfer_config: kv.clone(),
                compilation_config: compilation.clone(),
                ports: Vec::new(),
            };
            if !headless {
                e.ports.push(port);
            }
            if e.coordinator() {
                e.ports.push(s.ports.dp_rpc);
            }
            if let Some((base, count)) = nixl {
                e.ports.extend(port_run(base, count));
            }
            out.push(e);
        };
        match s.load_balancing {
            LoadBalancing::External => {
                for slot in 0..local {
                    // Validation has reported a port past 65535.
                    let Some(port) = port_at(s.ports.backend, slot) else {
                        continue;
                    };
                    let rank = i * local + slot;
                    let dp = if s.expert_parallel && r.dp > 1 {
                        DpPart::Rank { size: r.dp, rank }
                    } else {
                        DpPart::Alone
                    };
                    let id = format!("{}[{}].rank[{rank}]", r.role.kind(), r.index);
                    add(id, slot, false, port, dp);
                }
            }
            LoadBalancing::Internal => {
                let dp = DpPart::Node {
                    size: r.dp,
                    local,
                    start: i * local,
                    spans_nodes: k > 1,
                };
                let id = format!("{}[{}].node[{node}]", r.role.kind(), r.index);
                add(id, 0, i > 0, s.ports.backend, dp);
            }
        }
    }
    out
}

/// An engine's env: what prime-rl sets for every engine (and for P/D), then the recipe's
/// `env` and its role's, then what the launcher manages.
fn engine_env(
    s: &DeploymentSettings<'_>,
    role: ReplicaRole,
    node: usize,
    nixl_base: Option<u16>,
    gpus: Option<&[u32]>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = default_env(role, s.ready_timeout)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let role_env = match role {
        ReplicaRole::Engine => &[][..],
        ReplicaRole::Prefill => &s.prefill_env[..],
        ReplicaRole::Decode => &s.decode_env[..],
    };
    env.extend(s.env.iter().cloned());
    env.extend(role_env.iter().cloned());
    if let Some(gpus) = gpus {
        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
        env.insert("CUDA_VISIBLE_DEVICES".into(), list.join(","));
    }
    if let Some(base) = nixl_base {
        env.insert(
            "VLLM_NIXL_SIDE_CHANNEL_HOST".into(),
            host_ref(&node_name(node)),
        );
        env.insert("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), base.to_string());
    }
    if let Some(o) = s
        .offload
        .as_ref()
        .filter(|o| o.kind == OffloadKind::Mooncake)
    {
        env.insert("MOONCAKE_CONFIG_PATH".into(), MOONCAKE_CONFIG_FILE.into());
        env.insert("PYTHONHASHSEED".into(), "0".into());
        if let Some(disk) = &o.disk {
            env.insert("MOONCAKE_OFFLOAD_FSDIR".into(), disk.clone());
            env.insert("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH".into(), disk.clone());
            env.insert("MOONCAKE_OFFLOAD_ENABLE_EVICTION".into(), "true".into());
        }
    }
    env
}

/// The environment every engine of `role` starts with, before the recipe's own tables (which
/// override any of it). prime-rl's launcher sets the same; docs/recipes.md gives each
/// reason. Cache directories are relative to the engine's run dir: private to the
/// deployment, never a guessable shared path.
pub fn default_env(role: ReplicaRole, ready_timeout: Duration) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string()),
        ("PYTHONUNBUFFERED", "1".to_string()),
        ("OMP_NUM_THREADS", "1".to_string()),
        ("TRITON_CACHE_DIR", "cache/triton".to_string()),
        ("VLLM_CACHE_ROOT", "cache/vllm".to_string()),
        (
            "VLLM_ENGINE_READY_TIMEOUT_S",
            ready_timeout.as_secs().max(1).to_string(),
        ),
    ];
    if role != ReplicaRole::Engine {
        env.extend([
            ("VLLM_WORKER_MULTIPROC_METHOD", "spawn".to_string()),
            (
                "PYTORCH_CUDA_ALLOC_CONF",
                "expandable_segments:False".to_string(),
            ),
            ("UCX_TLS", "all".to_string()),
            ("UCX_NET_DEVICES", "all".to_string()),
        ]);
    }
    env
}

/// The `--kv-transfer-config` of an engine of `role`, as JSON. NIXL is `kv_both` on both
/// sides with one handshake thread, as prime-rl configures it.
pub fn kv_transfer_config(
    role: ReplicaRole,
    offload: Option<&Offload>,
) -> Option<serde_json::Value> {
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
        OffloadKind::Mooncake => json!({
            "kv_connector": "MooncakeStoreConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {},
        }),
    });
    if role == ReplicaRole::Engine {
        return offload_connector;
    }
    let nixl = json!({
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": { "num_threads": 1 },
    });
    Some(match offload_connector {
        None => nixl,
        Some(off) => json!({
            "kv_connector": "MultiConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": { "connectors": [nixl, off] },
        }),
    })
}

/// Which replicas each router serves, and the node it runs on: one router per P/D unit on
/// the unit's first node, else one for all replicas on `node0`.
pub fn router_sets(replicas: &[Replica]) -> Vec<(usize, Vec<&Replica>)> {
    let mut sets: Vec<(usize, Vec<&Replica>)> = Vec::new();
    // Each unit's set, by unit: in the order the units first appear.
    let mut of_unit: HashMap<usize, usize> = HashMap::new();
    for r in replicas {
        match of_unit.get(&r.unit) {
            Some(&i) => {
                let (node, rs) = &mut sets[i];
                *node = (*node).min(r.nodes[0]);
                rs.push(r);
            }
            None => {
                of_unit.insert(r.unit, sets.len());
                sets.push((r.nodes[0], vec![r]));
            }
        }
    }
    if sets.is_empty() {
        sets.push((0, Vec::new()));
    }
    sets
}

/// The routers, each with its workers (the URL of every engine process of its replicas
/// that serves HTTP); those whose metrics port would run past 65535 are left out.
fn routers(s: &DeploymentSettings<'_>, engines: &[EngineProcess]) -> Vec<Router> {
    let sets = router_sets(&s.replicas);
    let several = sets.len() > 1;
    let pd = s.shape == Shape::Disaggregated;
    let base = s.ports.router_metrics;
    let metrics_ports = (0..=u16::MAX).map_while(|i| base.checked_add(i));
    // The engines of each replica, by role and number, in the engines' order: a router's are
    // gathered from its replicas, not picked out of every engine of the deployment.
    let mut of_replica: HashMap<(ReplicaRole, usize), Vec<usize>> = HashMap::new();
    for (i, e) in engines.iter().enumerate() {
        of_replica.entry((e.role, e.replica)).or_default().push(i);
    }
    sets.into_iter()
        .zip(metrics_ports)
        .enumerate()
        .map(|(i, ((node, rs), metrics_port))| {
            let suffix = if several {
                format!("[{i}]")
            } else {
                String::new()
            };
            let mut mine: Vec<usize> = rs
                .iter()
                .filter_map(|r| of_replica.get(&(r.role, r.index)))
                .flatten()
                .copied()
                .collect();
            // In the engines' order, each once (a replica may be listed twice).
            mine.sort_unstable();
            mine.dedup();
            let mine: Vec<&EngineProcess> = mine.into_iter().map(|i| &engines[i]).collect();
            let urls = |role: Option<ReplicaRole>| -> Vec<String> {
                mine.iter()
                    .filter(|e| !e.headless && role.map_or(true, |r| r == e.role))
                    .map(|e| url(e.node, e.port))
                    .collect()
            };
            Router {
                id: format!("router{suffix}"),
                suffix,
                node,
                bind: s.router_bind.clone(),
                port: s.ports.router,
                metrics_port,
                pd,
                workers: if pd { Vec::new() } else { urls(None) },
                prefill: urls(Some(ReplicaRole::Prefill)),
                decode: urls(Some(ReplicaRole::Decode)),
                engines: mine.iter().map(|e| e.id.clone()).collect(),
            }
        })
        .collect()
}

/// The model name clients use: `served_model_name`'s first value, if given.
fn served_name(extra: &[VllmExtra]) -> Option<String> {
    let x = extra.iter().find(|x| x.dest == "served_model_name")?;
    match &x.value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => a.first().and_then(|v| v.as_str()).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_makes_equal_consecutive_replicas() {
        let r = split(ReplicaRole::Decode, 0, 0, 2, 4, 2, 4);
        assert_eq!(r[0].nodes, [2, 3]);
        assert_eq!(r[1].nodes, [4, 5]);
        assert_eq!(r[1].index, 1);
    }

    #[test]
    fn connectors_per_role_and_offload() {
        assert_eq!(kv_transfer_config(ReplicaRole::Engine, None), None);
        let native = Offload {
            kind: OffloadKind::Native,
            cpu_bytes: 10,
            disk: None,
        };
        assert_eq!(
            kv_transfer_config(ReplicaRole::Engine, Some(&native)).map(|v| v.to_string()),
            Some(r#"{"kv_connector":"OffloadingConnector","kv_connector_extra_config":{"cpu_bytes_to_use":10},"kv_role":"kv_both"}"#.to_string())
        );
        let tiered = Offload {
            disk: Some("/d".into()),
            ..native.clone()
        };
        let v = kv_transfer_config(ReplicaRole::Engine, Some(&tiered)).expect("config");
        assert_eq!(
            v["kv_connector_extra_config"]["spec_name"],
            "TieringOffloadingSpec"
        );
        assert_eq!(
            v["kv_connector_extra_config"]["secondary_tiers"][0]["type"],
            "fs"
        );
        let p = kv_transfer_config(ReplicaRole::Prefill, None).expect("nixl");
        assert_eq!(p["kv_role"], "kv_both");
        assert_eq!(p["kv_connector_extra_config"]["num_threads"], 1);
        let d = kv_transfer_config(ReplicaRole::Decode, Some(&native)).expect("multi");
        assert_eq!(d["kv_connector"], "MultiConnector");
        assert_eq!(
            d["kv_connector_extra_config"]["connectors"][0]["kv_role"],
            "kv_both"
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
            kv_transfer_config(ReplicaRole::Engine, Some(&mc)).expect("mc")["kv_connector"],
            "MooncakeStoreConnector"
        );
    }

    #[test]
    fn ports_stop_at_65535() {
        assert_eq!(port_run(65534, 3).collect::<Vec<_>>(), [65534, 65535]);
        assert_eq!(nixl_port_count(4), 4);
    }
}
