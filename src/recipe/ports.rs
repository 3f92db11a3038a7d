//! The ports of a deployment, checked: a run of ports counted up from a base (NIXL side
//! channels, router metrics) must stay under 65536, and no two services may want one port
//! on one node. Each problem points at the recipe field that chose the port.

use std::collections::BTreeMap;
use std::ops::Range;

use super::deployment::{node_name, Deployment, LoadBalancing, ReplicaRole};
use super::derive::{nixl_port_count, port_run, router_sets, DeploymentSettings};
use super::schema::{DeploymentSection, OffloadSection, F};
use crate::diag::{Problem, Problems};

/// Runs of ports that would go past 65535 (derivation keeps only the ports that fit).
pub fn check_ranges(s: &DeploymentSettings<'_>, d: &DeploymentSection, p: &mut Problems) {
    let external = s.load_balancing == LoadBalancing::External;
    let mut runs: Vec<(&str, u16, u16, &F<u16>)> = Vec::new();
    for r in &s.replicas {
        let local = nixl_port_count(r.dp_local());
        if external {
            runs.push(("backend_port", s.ports.backend, local, &d.backend_port));
        }
        if r.role != ReplicaRole::Engine {
            // Rank `R` in slot `s` binds `nixl_side_channel_port + s + R` (vLLM adds the
            // global rank); internal balancing binds from `+ R` on.
            let reach = if external {
                u32::from(local) + r.dp
            } else {
                r.dp.max(1)
            };
            let count = reach.min(u32::from(u16::MAX)) as u16;
            runs.push((
                "nixl_side_channel_port",
                s.ports.nixl,
                count,
                &d.nixl_side_channel_port,
            ));
        }
    }
    runs.sort_by_key(|&(f, base, count, _)| (f, base, count));
    runs.dedup_by_key(|r| (r.0, r.1, r.2));
    for (field, base, count, f) in runs {
        if port_run(base, count).count() == usize::from(count) {
            continue;
        }
        p.push(
            Problem::new(format!(
                "the ports from `{field}` {base} on run past 65535 ({count} of them, one per rank)"
            ))
            .at(Some(f.span_or(&d.span)))
            .help(format!("pick a lower `{field}`")),
        );
    }
    let metrics_base = s.ports.router_metrics;
    let routers = router_sets(&s.replicas).len();
    let first_past = (0..routers).find(|&i| {
        u16::try_from(i)
            .ok()
            .and_then(|i| metrics_base.checked_add(i))
            .is_none()
    });
    if let Some(i) = first_past {
        p.push(
            Problem::new(format!(
                "the routers' metrics ports from {metrics_base} run past 65535 ({} routers)",
                i + 1
            ))
            .at(Some(d.router_metrics_port.span_or(&d.span)))
            .help("pick a lower `router_metrics_port`"),
        );
    }
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

/// Every port of the deployment, service by service in plan order: engines, routers,
/// the Mooncake store.
pub fn port_uses(
    dep: &Deployment,
    d: &DeploymentSection,
    offload: Option<&OffloadSection>,
) -> Vec<PortUse> {
    let mut uses = Vec::new();
    let mut add = |node, port, task: &str, field, f: &F<u16>, table: &Range<usize>| {
        uses.push(PortUse {
            node,
            port,
            task: task.to_string(),
            field,
            span: f.span_or(table),
        })
    };
    for e in &dep.engines {
        if !e.headless {
            add(
                e.node,
                e.port,
                &e.id,
                "backend_port",
                &d.backend_port,
                &d.span,
            );
            if e.coordinator() {
                let f = &d.data_parallel_rpc_port;
                add(
                    e.node,
                    e.rpc_port,
                    &e.id,
                    "data_parallel_rpc_port",
                    f,
                    &d.span,
                );
            }
        }
        if let Some((base, count)) = e.nixl_port {
            let f = &d.nixl_side_channel_port;
            for port in port_run(base, count) {
                add(e.node, port, &e.id, "nixl_side_channel_port", f, &d.span);
            }
        }
    }
    for r in &dep.routers {
        add(
            r.node,
            r.port,
            &r.id,
            "router_port",
            &d.router_port,
            &d.span,
        );
        let f = &d.router_metrics_port;
        add(
            r.node,
            r.metrics_port,
            &r.id,
            "router_metrics_port",
            f,
            &d.span,
        );
    }
    if let (Some(m), Some(raw)) = (&dep.mooncake, offload) {
        let at = &raw.span;
        add(
            m.node,
            m.master_port,
            "mooncake-master",
            "master_port",
            &raw.master_port,
            at,
        );
        let f = &raw.master_metrics_port;
        add(
            m.node,
            m.metrics_port,
            "mooncake-master",
            "master_metrics_port",
            f,
            at,
        );
        let f = &raw.metadata_port;
        add(
            m.node,
            m.metadata_port,
            "metadata-server",
            "metadata_port",
            f,
            at,
        );
        for node in 0..dep.nodes {
            let task = format!("mooncake-client.node[{node}]");
            add(
                node,
                m.client_port,
                &task,
                "client_port",
                &raw.client_port,
                at,
            );
        }
    }
    uses
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

/// Reports every port wanted twice on a node, at the later one's field.
pub fn check_clashes(
    dep: &Deployment,
    d: &DeploymentSection,
    offload: Option<&OffloadSection>,
    p: &mut Problems,
) {
    let uses = port_uses(dep, d, offload);
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
