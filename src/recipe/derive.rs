//! From the checked settings to the [`Deployment`]: engine processes (DP ranks, ports, KV
//! connector, env), routers and the Mooncake store, each computed once by a small function
//! without I/O. Nothing here reports a problem: [`super::validate`] has checked every rule
//! first, and a port base that would run past 65535 yields only the ports that fit (the
//! validation says so).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::deployment::{
    node_name, url, Deployment, EngineProcess, Mooncake, Offload, OffloadKind, Replica,
    ReplicaRole, Router, Shape, MOONCAKE_CONFIG_FILE,
};
use super::schema::VllmExtra;
use crate::plan::host_ref;

/// What the derivation starts from: the recipe's values, checked, each default filled in.
#[derive(Debug, Clone)]
pub struct DeploymentSettings<'a> {
    pub shape: Shape,
    pub backend: &'a str,
    pub model: String,
    pub launcher: Vec<String>,
    pub router_launcher: Vec<String>,
    pub replicas: Vec<Replica>,
    pub gpus_per_node: u32,
    pub tp: u32,
    pub dp: u32,
    pub expert_parallel: bool,
    pub dbo: bool,
    pub eplb: bool,
    pub return_routed_experts: bool,
    pub prefix_caching: Option<bool>,
    pub router_policy: String,
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
    pub backend: u16,
    pub router: u16,
    /// The first router's; the others count up from it.
    pub router_metrics: u16,
    pub dp_rpc: u16,
    /// The first NIXL side-channel port of a node; its ranks count up from it.
    pub nixl: u16,
}

/// The deployment the settings describe.
pub fn deployment(s: &DeploymentSettings<'_>) -> Deployment {
    let nodes = s
        .replicas
        .iter()
        .flat_map(|r| r.nodes.iter())
        .max()
        .map_or(1, |m| m + 1);
    Deployment {
        shape: s.shape,
        backend: s.backend.to_string(),
        model: s.model.clone(),
        served_model_name: served_name(s.vllm_extra).unwrap_or_else(|| s.model.clone()),
        launcher: s.launcher.clone(),
        router_launcher: s.router_launcher.clone(),
        nodes,
        gpus_per_node: s.gpus_per_node,
        tp: s.tp,
        dp: s.dp,
        expert_parallel: s.expert_parallel,
        dbo: s.dbo,
        eplb: s.eplb,
        return_routed_experts: s.return_routed_experts,
        prefix_caching: s.prefix_caching,
        router_policy: s.router_policy.clone(),
        ready_timeout: s.ready_timeout,
        probe_interval: s.probe_interval,
        offload: s.offload.clone(),
        mooncake: s.mooncake.clone(),
        replicas: s.replicas.clone(),
        engines: s
            .replicas
            .iter()
            .flat_map(|r| engine_processes(s, r))
            .collect(),
        routers: routers(s),
        extra_args: s
            .vllm_extra
            .iter()
            .flat_map(|x| x.args.iter().cloned())
            .collect(),
    }
}

/// Splits `count` nodes starting at `first` into `replicas` replicas of equal size.
pub fn split(role: ReplicaRole, first: usize, count: usize, replicas: usize) -> Vec<Replica> {
    let per = count / replicas.max(1);
    (0..replicas)
        .map(|r| Replica {
            role,
            index: r,
            nodes: (first + r * per..first + (r + 1) * per).collect(),
        })
        .collect()
}

/// How many NIXL side-channel ports a node of a replica of `nodes` nodes uses: one per
/// GPU of its ranks.
pub fn nixl_port_count(dp: u32, tp: u32, nodes: usize) -> u16 {
    let local = dp / nodes as u32;
    (local * tp).min(u32::from(u16::MAX)) as u16
}

/// The ports from `base` on, `count` of them, as far as they fit under 65536.
pub fn port_run(base: u16, count: u16) -> impl Iterator<Item = u16> {
    (0..count).map_while(move |off| base.checked_add(off))
}

/// One engine process per node of the replica.
fn engine_processes(s: &DeploymentSettings<'_>, r: &Replica) -> Vec<EngineProcess> {
    let k = r.nodes.len();
    let local = s.dp / k as u32;
    let kv = kv_transfer_config(r.role, s.offload.as_ref()).map(|v| v.to_string());
    let nixl =
        (r.role != ReplicaRole::Engine).then(|| (s.ports.nixl, nixl_port_count(s.dp, s.tp, k)));
    r.nodes
        .iter()
        .enumerate()
        .map(|(i, &node)| {
            let headless = i > 0;
            let mut ports = Vec::new();
            if !headless {
                ports.push(s.ports.backend);
                if k > 1 {
                    ports.push(s.ports.dp_rpc);
                }
            }
            if let Some((base, count)) = nixl {
                ports.extend(port_run(base, count));
            }
            EngineProcess {
                id: r.engine_id(node),
                role: r.role,
                replica: r.index,
                node,
                head: r.nodes[0],
                headless,
                replica_nodes: k,
                port: s.ports.backend,
                dp_size: s.dp,
                dp_local: local,
                dp_start_rank: i as u32 * local,
                rpc_port: s.ports.dp_rpc,
                nixl_port: nixl,
                kv_transfer_config: kv.clone(),
                env: engine_env(s, r.role, node, nixl.map(|(base, _)| base)),
                ports,
            }
        })
        .collect()
}

/// An engine's env: the recipe's `env`, its role's, then what the launcher sets.
fn engine_env(
    s: &DeploymentSettings<'_>,
    role: ReplicaRole,
    node: usize,
    nixl_base: Option<u16>,
) -> BTreeMap<String, String> {
    let role_env = match role {
        ReplicaRole::Engine => &[][..],
        ReplicaRole::Prefill => &s.prefill_env[..],
        ReplicaRole::Decode => &s.decode_env[..],
    };
    let mut env: BTreeMap<String, String> = s.env.iter().cloned().collect();
    env.extend(role_env.iter().cloned());
    if let Some(base) = nixl_base {
        env.insert(
            "VLLM_NIXL_SIDE_CHANNEL_HOST".into(),
            host_ref(&node_name(node)),
        );
        env.insert("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), base.to_string());
    }
    if s.offload
        .as_ref()
        .is_some_and(|o| o.kind == OffloadKind::Mooncake)
    {
        env.insert("MOONCAKE_CONFIG_PATH".into(), MOONCAKE_CONFIG_FILE.into());
        env.insert("PYTHONHASHSEED".into(), "0".into());
    }
    env
}

/// The `--kv-transfer-config` of an engine of `role`, as JSON.
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
        OffloadKind::Mooncake => json!({ "kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both" }),
    });
    let nixl_role = match role {
        ReplicaRole::Engine => return offload_connector,
        ReplicaRole::Prefill => "kv_producer",
        ReplicaRole::Decode => "kv_consumer",
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

/// Which replicas each router serves, and the node it runs on: all of them from `node0`,
/// or, for P/D with as many prefill as decode replicas (more than one), one pair each.
pub fn router_sets(shape: Shape, replicas: &[Replica]) -> Vec<(usize, Vec<&Replica>)> {
    if shape == Shape::Disaggregated {
        let of = |role| replicas.iter().filter(move |r: &&Replica| r.role == role);
        let prefill: Vec<&Replica> = of(ReplicaRole::Prefill).collect();
        let decode: Vec<&Replica> = of(ReplicaRole::Decode).collect();
        if prefill.len() == decode.len() && prefill.len() > 1 {
            return prefill
                .iter()
                .zip(&decode)
                .map(|(p, d)| (p.nodes[0], vec![*p, *d]))
                .collect();
        }
    }
    vec![(0, replicas.iter().collect())]
}

/// The routers, each with its workers; those whose metrics port would run past 65535 are
/// left out.
fn routers(s: &DeploymentSettings<'_>) -> Vec<Router> {
    let sets = router_sets(s.shape, &s.replicas);
    let several = sets.len() > 1;
    let pd = s.shape == Shape::Disaggregated;
    let head_url = |r: &Replica| url(r.nodes[0], s.ports.backend);
    let heads = |rs: &[&Replica], role| -> Vec<String> {
        rs.iter()
            .filter(|r| r.role == role)
            .map(|r| head_url(r))
            .collect()
    };
    let base = s.ports.router_metrics;
    let metrics_ports = (0..=u16::MAX).map_while(|i| base.checked_add(i));
    sets.into_iter()
        .zip(metrics_ports)
        .enumerate()
        .map(|(i, ((node, rs), metrics_port))| {
            let suffix = if several {
                format!("[{i}]")
            } else {
                String::new()
            };
            Router {
                id: format!("router{suffix}"),
                suffix,
                node,
                port: s.ports.router,
                metrics_port,
                pd,
                workers: if pd {
                    Vec::new()
                } else {
                    rs.iter().map(|r| head_url(r)).collect()
                },
                prefill: heads(&rs, ReplicaRole::Prefill),
                decode: heads(&rs, ReplicaRole::Decode),
                engines: rs
                    .iter()
                    .flat_map(|r| r.nodes.iter().map(|&n| r.engine_id(n)))
                    .collect(),
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
        let r = split(ReplicaRole::Decode, 2, 4, 2);
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
        assert_eq!(p["kv_role"], "kv_producer");
        let d = kv_transfer_config(ReplicaRole::Decode, Some(&native)).expect("multi");
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
            kv_transfer_config(ReplicaRole::Engine, Some(&mc)).expect("mc")["kv_connector"],
            "MooncakeStoreConnector"
        );
    }

    #[test]
    fn ports_stop_at_65535() {
        assert_eq!(port_run(65534, 3).collect::<Vec<_>>(), [65534, 65535]);
        assert_eq!(nixl_port_count(4, 2, 2), 4);
    }
}
