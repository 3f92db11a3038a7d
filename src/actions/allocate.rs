//! `allocate`: the plan's nodes from the backend. Its handle is the [`Allocation`] (node
//! addresses and the backend's own handle), so a resume learns the addresses from the
//! journal and a teardown releases the nodes. Before it is done, the preflight checks the
//! nodes (programs there, ports free); a problem releases them and fails the task.

use async_trait::async_trait;
use prl_flow_backend::Allocation;
use prl_flow_engine::{Check, Handle, TaskError};
use serde_json::Value;

use super::{Context, Perform};

pub struct Allocate;

#[async_trait]
impl Perform for Allocate {
    async fn run(&self, cx: &dyn Context, _args: &Value) -> Result<Option<Handle>, TaskError> {
        let nodes = cx.nodes();
        let a = cx
            .backend()
            .allocate(nodes)
            .await
            .map_err(|e| TaskError::new(format!("allocating {} nodes: {e}", nodes.len())))?;
        cx.set_hosts(a.hosts.clone());
        // Before any task starts: a missing program or a taken port fails here, in seconds,
        // and gives the nodes back.
        if let Err(problems) = cx.preflight(&a.hosts).await {
            let released = match cx.backend().release(&a).await {
                Ok(()) => String::new(),
                Err(e) => format!("\n  releasing the nodes failed too: {e}"),
            };
            return Err(TaskError::new(format!("{problems}{released}")));
        }
        let handle = serde_json::to_value(&a).map_err(|e| TaskError::new(e.to_string()))?;
        Ok(Some(handle))
    }

    fn held(&self) -> bool {
        true
    }

    /// Cut short while the backend allocated (a job still queued): the backend takes down
    /// what the state dir says it started.
    async fn abandoned(&self, cx: &dyn Context) {
        let _ = cx
            .backend()
            .teardown(&[], std::time::Duration::from_secs(10), cx.state_dir())
            .await;
    }

    async fn check(&self, cx: &dyn Context, handle: Option<&Handle>) -> Check {
        let Some(handle) = handle else {
            return Check::Invalid("nothing was recorded".into());
        };
        let Ok(a) = serde_json::from_value::<Allocation>(handle.clone()) else {
            return Check::Invalid("the recorded allocation is unreadable".into());
        };
        match cx.backend().allocation_alive(&a).await {
            Ok(true) => {
                cx.set_hosts(a.hosts);
                Check::Valid
            }
            Ok(false) => Check::Invalid("the allocation has ended".into()),
            Err(e) => Check::Invalid(e.to_string()),
        }
    }

    async fn undo(&self, cx: &dyn Context, handle: &Handle) -> Result<(), TaskError> {
        let a: Allocation = serde_json::from_value(handle.clone())
            .map_err(|e| TaskError::new(format!("unreadable allocation: {e}")))?;
        cx.backend()
            .release(&a)
            .await
            .map_err(|e| TaskError::new(e.to_string()))
    }
}

/// The node addresses an `allocate` record of an earlier run learned.
pub fn recorded_hosts(handle: &Handle) -> Option<std::collections::BTreeMap<String, String>> {
    serde_json::from_value::<Allocation>(handle.clone())
        .ok()
        .map(|a| a.hosts)
}
