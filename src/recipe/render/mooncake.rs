//! The Mooncake store's tasks: its master and metadata server on the head node, a client on
//! every node, and what an engine's Mooncake connector is given.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::{readiness, TaskTemplates};
use crate::diag::Problems;
use crate::plan::{host_ref, Command, Probe, TaskSpec};
use crate::recipe::deployment::{node_name, url, Deployment, Mooncake};
use crate::recipe::kinds::ALLOCATE;

#[derive(Serialize)]
pub(super) struct MooncakeCtx<'a> {
    host: String,
    rpc_port: u16,
    metrics_port: u16,
    port: u16,
    master_address: String,
    metadata_url: String,
    protocol: &'a str,
    device_name: &'a str,
    segment_bytes: u64,
    disk: Option<&'a str>,
}

pub(super) fn mooncake_ctx<'a>(
    dep: &'a Deployment,
    m: &'a Mooncake,
    node: usize,
) -> MooncakeCtx<'a> {
    let offload = dep.offload.as_ref();
    MooncakeCtx {
        host: host_ref(&node_name(node)),
        rpc_port: m.master_port,
        metrics_port: m.metrics_port,
        port: if node == m.node {
            m.metadata_port
        } else {
            m.client_port
        },
        master_address: m.master_address(),
        metadata_url: m.metadata_url(),
        protocol: &m.protocol,
        device_name: &m.device_name,
        segment_bytes: offload.map_or(0, |o| o.cpu_bytes),
        disk: offload.and_then(|o| o.disk.as_deref()),
    }
}

/// The store takes a second or so to come up; these bounds are generous.
const STORE_START: Duration = Duration::from_secs(30);
const STORE_READY: Duration = Duration::from_secs(120);

pub(super) fn mooncake_tasks(
    dep: &Deployment,
    m: &Mooncake,
    t: &TaskTemplates,
    p: &mut Problems,
    out: &mut Vec<TaskSpec>,
) {
    let head = node_name(m.node);
    let mut render = |name: &str, ctx: &MooncakeCtx<'_>| match t.argv(name, ctx) {
        Ok(a) => Some(a),
        Err(e) => {
            p.push(t.problem(name, &e));
            None
        }
    };
    let ctx = mooncake_ctx(dep, m, m.node);
    if let Some(argv) = render("mooncake_master.argv.j2", &ctx) {
        out.push(TaskSpec {
            id: "mooncake-master".into(),
            kind: "mooncake-master".into(),
            needs: vec![ALLOCATE.into()],
            node: Some(head.clone()),
            command: Command::Argv { argv },
            ports: vec![m.master_port, m.metrics_port],
            service: true,
            ready: Some(readiness(
                Probe::Http {
                    url: format!("{}/health", url(m.node, m.metrics_port)),
                },
                dep.probe_interval,
                STORE_START,
                STORE_READY,
            )),
            ..TaskSpec::default()
        });
    }
    if let Some(argv) = render("metadata_server.argv.j2", &ctx) {
        let mut env = BTreeMap::new();
        // It refuses a non-loopback address without a token; the cluster network is trusted.
        env.insert(
            "MC_METADATA_HTTP_ALLOW_INSECURE".to_string(),
            "1".to_string(),
        );
        out.push(TaskSpec {
            id: "metadata-server".into(),
            kind: "metadata-server".into(),
            needs: vec![ALLOCATE.into(), "mooncake-master".into()],
            node: Some(head.clone()),
            command: Command::Argv { argv },
            env,
            ports: vec![m.metadata_port],
            service: true,
            // The standalone server has no /health; an open port means it is up.
            ready: Some(readiness(
                Probe::Tcp {
                    addr: format!("{}:{}", host_ref(&head), m.metadata_port),
                },
                dep.probe_interval,
                STORE_START,
                STORE_READY,
            )),
            ..TaskSpec::default()
        });
    }
    for node in 0..dep.nodes {
        let mut ctx = mooncake_ctx(dep, m, node);
        ctx.port = m.client_port;
        let Some(argv) = render("mooncake_client.argv.j2", &ctx) else {
            continue;
        };
        let mut env = BTreeMap::new();
        if let Some(disk) = ctx.disk {
            env.insert(
                "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH".to_string(),
                disk.to_string(),
            );
        }
        out.push(TaskSpec {
            id: format!("mooncake-client.node[{node}]"),
            kind: "mooncake-client".into(),
            needs: vec![
                ALLOCATE.into(),
                "mooncake-master".into(),
                "metadata-server".into(),
            ],
            node: Some(node_name(node)),
            command: Command::Argv { argv },
            env,
            ports: vec![m.client_port],
            service: true,
            ready: Some(readiness(
                Probe::Tcp {
                    addr: format!("{}:{}", host_ref(&node_name(node)), m.client_port),
                },
                dep.probe_interval,
                STORE_START,
                STORE_READY,
            )),
            ..TaskSpec::default()
        });
    }
}
