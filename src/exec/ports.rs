//! A task's ports as its node sees them: free before its start, and, once its probe
//! passes, held by its own process. Another deployment on the same ports must neither be
//! started over nor make this one look ready.

use prl_flow_backend::{Listener, ProcHandle};

use super::SpecTask;
use crate::plan::Probe;
use prl_flow_engine::TaskError;

impl SpecTask {
    /// The port a probe reaches, when it is one this task says it listens on: only then can
    /// the answer be checked against the process that was started.
    fn probed_port(&self, probe: &Probe) -> Option<(String, u16)> {
        let (host, port) = probe.endpoint(|t| self.exec.resolve(t))?;
        self.spec.ports.contains(&port).then_some((host, port))
    }

    /// A probe that passed counts only if the process that answers is ours (where the
    /// backend can tell): another deployment on the same port must not make this one ready.
    pub(super) async fn listener_is_ours(
        &self,
        handle: &ProcHandle,
        probe: &Probe,
    ) -> Result<(), Foreign> {
        let Some((host, port)) = self.probed_port(probe) else {
            return Ok(());
        };
        match self.exec.backend.listener(handle, &host, port).await {
            Ok(Listener::Other(who)) => Err(Foreign::Other(format!(
                "is not what answers on port {port}: {who} holds it{}",
                self.port_field(port)
            ))),
            Ok(Listener::Nobody) => Err(Foreign::NobodyYet(format!(
                "the probe passed, but nothing listens on port {port} now"
            ))),
            Ok(Listener::Ours | Listener::Unknown) | Err(_) => Ok(()),
        }
    }

    /// ` (set by FIELD)`, when the recipe says which field chose `port`.
    fn port_field(&self, port: u16) -> String {
        self.spec
            .port_fields
            .get(&port)
            .map(|f| format!(" (set by {f})"))
            .unwrap_or_default()
    }

    /// Before a start: every port the task listens on must be free on its node, where the
    /// backend can tell. A taken port fails the task at once, naming it, the field that set
    /// it and who holds it.
    pub(super) async fn ports_free(&self) -> Result<(), TaskError> {
        if self.spec.ports.is_empty() {
            return Ok(());
        }
        let node = self.spec.node.as_deref();
        let address = match node {
            Some(n) => self.exec.resolve(&crate::plan::host_ref(n)),
            None => "0.0.0.0".to_string(),
        };
        let taken = match self
            .exec
            .backend
            .ports_taken(node, &address, &self.spec.ports)
            .await
        {
            Ok(Some(t)) if !t.is_empty() => t,
            _ => return Ok(()),
        };
        let mut msg = format!("`{}`{} cannot start:", self.spec.id, self.where_());
        for t in &taken {
            msg.push_str(&format!(
                "\n  port {} is already in use{}",
                t.port,
                self.port_field(t.port)
            ));
            if let Some(h) = &t.holder {
                msg.push_str(&format!(", held by {h}"));
            }
        }
        msg.push_str("\n  help: stop what holds it, or choose another port in the recipe");
        Err(TaskError::new(msg))
    }
}

/// Why a probe that passed does not make a service ready.
pub(super) enum Foreign {
    /// Someone else's process answers on the service's port.
    Other(String),
    /// Nothing listens there now (the answer came and went): probe again.
    NobodyYet(String),
}
