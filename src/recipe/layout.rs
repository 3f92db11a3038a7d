//! A deployment's arithmetic for people: how many nodes, units, replicas and ranks, and per
//! node which engine process holds which ranks, GPUs and ports. `plan` prints it and
//! `validate` prints its summary, so a node count never surprises anyone.

use super::deployment::{node_name, Deployment, LoadBalancing, ReplicaRole, Shape};
use crate::diag::count;
use crate::plan::{Layout, NodeLayout, ProcessLayout};

/// The layout of a derived deployment.
pub fn of(dep: &Deployment) -> Layout {
    let mut nodes: Vec<NodeLayout> = (0..dep.nodes)
        .map(|n| NodeLayout {
            node: node_name(n),
            processes: Vec::new(),
        })
        .collect();
    for e in &dep.engines {
        let gpus = match &e.gpus {
            Some(g) => g.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            None => "all".to_string(),
        };
        if let Some(n) = nodes.get_mut(e.node) {
            n.processes.push(ProcessLayout {
                task: e.id.clone(),
                ranks: e.ranks(),
                gpus,
                ports: e.ports.clone(),
            });
        }
    }
    for r in &dep.routers {
        if let Some(n) = nodes.get_mut(r.node) {
            n.processes.push(ProcessLayout {
                task: r.id.clone(),
                ranks: "-".into(),
                gpus: "-".into(),
                ports: vec![r.port, r.metrics_port],
            });
        }
    }
    Layout {
        summary: summary(dep),
        nodes,
    }
}

/// `8 nodes: 2 units × (2 prefill + 2 decode nodes); …`
pub fn summary(dep: &Deployment) -> String {
    let of_role = |role| dep.replicas.iter().filter(move |r| r.role == role);
    let side = |role: ReplicaRole| -> Option<String> {
        let rs: Vec<_> = of_role(role).filter(|r| r.unit == 0).collect();
        let first = rs.first()?;
        let nodes: usize = rs.iter().map(|r| r.nodes.len()).sum();
        Some(format!(
            "{} {} ({} of {}, {} of tp {} per node)",
            role.kind(),
            count(nodes, "node"),
            count(rs.len(), "replica"),
            count(first.nodes.len(), "node"),
            count(first.dp_local() as usize, "rank"),
            dep.tp
        ))
    };
    let shape = match dep.shape {
        Shape::Disaggregated => format!(
            "{} × ({} + {})",
            count(dep.units, "P/D unit"),
            side(ReplicaRole::Prefill).unwrap_or_default(),
            side(ReplicaRole::Decode).unwrap_or_default()
        ),
        _ => side(ReplicaRole::Engine).unwrap_or_default(),
    };
    let processes = match dep.engines.len() {
        1 => "1 engine process".to_string(),
        n => format!("{n} engine processes"),
    };
    let grouped = dep
        .engines
        .iter()
        .any(|e| matches!(e.dp, super::deployment::DpPart::Rank { .. }));
    let balancing = match (dep.load_balancing, grouped) {
        (LoadBalancing::External, true) => {
            "one API server per rank, the ranks of a replica one DP group"
        }
        (LoadBalancing::External, false) => "one API server per rank, each an engine of its own",
        (LoadBalancing::Internal, _) => "one process per node, vLLM balances its ranks",
    };
    format!(
        "{}: {shape}; {processes}, {balancing}; {}",
        count(dep.nodes, "node"),
        count(dep.routers.len(), "router")
    )
}
