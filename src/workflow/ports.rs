//! The ports a workflow service is checked on: free before its start, held by its own
//! process once its probe passes.

use std::collections::BTreeMap;

use super::TaskEntry;
use crate::diag::{Problem, Problems};
use crate::plan::{Probe, Readiness};

/// The ports a service listens on, each with the field that says so: its `ports` as
/// written, or else the port its `http` or `tcp` probe reaches on its own node. Each must
/// be free before the start and, once the probe passes, held by the service's own process
/// (where the backend can tell): another process's answer does not make it ready.
/// `ports = []` turns both checks off (a port that a process outside the service's process
/// group holds for it, as a container runtime's proxy does).
pub(super) fn own_ports(
    e: &TaskEntry,
    id: &str,
    ready: Option<&Readiness>,
    problems: &mut Problems,
) -> (Vec<u16>, BTreeMap<u16, String>) {
    if let Some(ports) = &e.ports {
        if !e.service {
            problems.push(
                Problem::new(format!("task `{id}` has `ports` but is not a service"))
                    .at(Some(ports.span()))
                    .help("add `service = true`, or drop `ports`"),
            );
        }
        if ports.get_ref().contains(&0) {
            problems.push(
                Problem::new(format!("`ports` of task `{id}`: 0 is not a port"))
                    .at(Some(ports.span()))
                    .label("a port is 1 to 65535"),
            );
        }
        let field = format!("`ports` of task `{id}`");
        let list = ports.get_ref().clone();
        let fields = list.iter().map(|p| (*p, field.clone())).collect();
        return (list, fields);
    }
    let Some(r) = ready.filter(|_| e.service) else {
        return (Vec::new(), BTreeMap::new());
    };
    let node = e.node.as_ref().map(|n| n.get_ref().as_str());
    match probed_own_port(&r.probe, node) {
        Some((port, field)) => (
            vec![port],
            [(port, format!("`{field}` of task `{id}`"))].into(),
        ),
        None => (Vec::new(), BTreeMap::new()),
    }
}

/// The port a probe reaches when it reaches the task's own node, and the probe's field: a
/// loopback or unspecified address (or `localhost`) for a task without a `node` (it runs
/// here), `${host:NODE}` of its own node otherwise. A probe of another host says nothing
/// of who listens there.
fn probed_own_port(probe: &Probe, node: Option<&str>) -> Option<(u16, &'static str)> {
    const OWN: &str = "own-node.invalid";
    let field = match probe {
        Probe::Http { .. } => "ready.http",
        Probe::Tcp { .. } => "ready.tcp",
        Probe::Log { .. } => return None,
    };
    let (host, port) = probe.endpoint(|t| {
        crate::plan::resolve_hosts(t, &|n| {
            Some(
                if Some(n) == node {
                    OWN
                } else {
                    "other-node.invalid"
                }
                .to_string(),
            )
        })
    })?;
    let own = match node {
        Some(_) => host == OWN,
        None => {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
        }
    };
    own.then_some((port, field))
}

#[cfg(test)]
mod tests {
    use super::probed_own_port;
    use crate::plan::Probe;

    fn http(url: &str) -> Probe {
        Probe::Http { url: url.into() }
    }

    #[test]
    fn a_probe_of_the_tasks_own_node_gives_its_port() {
        let tcp = |addr: &str| Probe::Tcp { addr: addr.into() };
        // No node: the task runs here.
        assert_eq!(
            probed_own_port(&http("http://127.0.0.1:8000/health"), None),
            Some((8000, "ready.http"))
        );
        assert_eq!(
            probed_own_port(&http("http://localhost/"), None),
            Some((80, "ready.http"))
        );
        assert_eq!(
            probed_own_port(&http("https://[::1]/"), None),
            Some((443, "ready.http"))
        );
        assert_eq!(
            probed_own_port(&tcp("0.0.0.0:9000"), None),
            Some((9000, "ready.tcp"))
        );
        assert_eq!(probed_own_port(&http("http://10.0.0.5:8000/"), None), None);
        assert_eq!(probed_own_port(&http("http://example.com/"), None), None);
        // A node: only its own address.
        let n1 = Some("node1");
        assert_eq!(
            probed_own_port(&http("http://${host:node1}:8000/"), n1),
            Some((8000, "ready.http"))
        );
        assert_eq!(
            probed_own_port(&tcp("${host:node1}:7000"), n1),
            Some((7000, "ready.tcp"))
        );
        assert_eq!(probed_own_port(&tcp("${host:node0}:7000"), n1), None);
        assert_eq!(probed_own_port(&tcp("127.0.0.1:7000"), n1), None);
        assert_eq!(
            probed_own_port(&Probe::Log { regex: "up".into() }, None),
            None
        );
    }
}
