//! A remote backend with the local one beside it: tasks without a node run on this machine.
//!
//! A plan may hold tasks that run where prl-flow runs (`node: None`: a probe, a small
//! helper) next to tasks on the nodes of a cluster. [`WithLocal`] routes once, for every
//! remote backend: a spawn (or recover) without a node and every call with a local handle
//! (`handle.backend == "local"`) go to [`LocalBackend`]; everything else, allocations
//! included, goes to the remote backend, which never sees a local task.

use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    Allocation, Backend, BackendError, ConfigError, Listener, Missing, PortHolder, ProcHandle,
    ProcState, Program, Recorded, SpawnSpec, Stopped,
};

use crate::{LocalBackend, NAME};

/// Is this the handle of a process the local backend started?
fn is_local(handle: &ProcHandle) -> bool {
    handle.is(NAME)
}

/// `remote` for the nodes of a plan, the local backend for what has none. Derefs to the
/// remote backend, so its own methods stay at hand.
pub struct WithLocal<B> {
    remote: B,
    local: LocalBackend,
}

impl<B> WithLocal<B> {
    pub fn new(remote: B) -> Self {
        Self {
            remote,
            local: LocalBackend::new(),
        }
    }

    pub fn remote(&self) -> &B {
        &self.remote
    }

    pub fn local(&self) -> &LocalBackend {
        &self.local
    }
}

impl<B> Deref for WithLocal<B> {
    type Target = B;

    fn deref(&self) -> &B {
        &self.remote
    }
}

#[async_trait]
impl<B: Backend> Backend for WithLocal<B> {
    fn name(&self) -> &str {
        self.remote.name()
    }

    async fn check(&self, nodes: &[String]) -> Result<(), Vec<ConfigError>> {
        self.remote.check(nodes).await
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        self.remote.allocate(nodes).await
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        self.remote.allocation_alive(allocation).await
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError> {
        self.remote.release(allocation).await
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        match spec.node {
            None => self.local.spawn(spec).await,
            Some(_) => self.remote.spawn(spec).await,
        }
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if is_local(handle) {
            return self.local.status(handle).await;
        }
        self.remote.status(handle).await
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if is_local(handle) {
            return self.local.wait(handle).await;
        }
        self.remote.wait(handle).await
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        if is_local(handle) {
            return self.local.stop(handle, grace).await;
        }
        self.remote.stop(handle, grace).await
    }

    async fn stop_found(&self, handle: &ProcHandle, grace: Duration) -> Result<bool, BackendError> {
        if is_local(handle) {
            return self.local.stop_found(handle, grace).await;
        }
        self.remote.stop_found(handle, grace).await
    }

    /// The local items to the local backend, the rest to the remote one (which batches them
    /// as it can); local ones first.
    async fn teardown(
        &self,
        items: &[Recorded],
        grace: Duration,
        state_dir: Option<&Path>,
    ) -> Vec<Stopped> {
        let (local, remote): (Vec<Recorded>, Vec<Recorded>) = items
            .iter()
            .cloned()
            .partition(|r| is_local(r.held.handle()));
        let mut out = self.local.teardown(&local, grace, state_dir).await;
        out.extend(self.remote.teardown(&remote, grace, state_dir).await);
        out
    }

    async fn ports_taken(
        &self,
        node: Option<&str>,
        address: &str,
        ports: &[u16],
    ) -> Result<Option<Vec<PortHolder>>, BackendError> {
        match node {
            None => self.local.ports_taken(node, address, ports).await,
            Some(_) => self.remote.ports_taken(node, address, ports).await,
        }
    }

    /// The programs of tasks without a node to the local backend, the rest to the remote
    /// one; what either can tell.
    async fn preflight(&self, programs: &[Program]) -> Result<Option<Vec<Missing>>, BackendError> {
        let (local, remote): (Vec<Program>, Vec<Program>) =
            programs.iter().cloned().partition(|p| p.node.is_none());
        let mine = match local.is_empty() {
            true => Some(Vec::new()),
            false => self.local.preflight(&local).await?,
        };
        let theirs = match remote.is_empty() {
            true => Some(Vec::new()),
            false => self.remote.preflight(&remote).await?,
        };
        Ok(match (mine, theirs) {
            (None, None) => None,
            (a, b) => Some(a.into_iter().chain(b).flatten().collect()),
        })
    }

    async fn listener(
        &self,
        handle: &ProcHandle,
        address: &str,
        port: u16,
    ) -> Result<Listener, BackendError> {
        if is_local(handle) {
            return self.local.listener(handle, address, port).await;
        }
        self.remote.listener(handle, address, port).await
    }

    fn describe(&self, handle: &ProcHandle) -> String {
        if is_local(handle) {
            return self.local.describe(handle);
        }
        self.remote.describe(handle)
    }

    fn log_location(&self, handle: &ProcHandle) -> Option<String> {
        if is_local(handle) {
            return self.local.log_location(handle);
        }
        self.remote.log_location(handle)
    }

    fn finds_unrecorded(&self, spec: &SpawnSpec) -> bool {
        match spec.node {
            None => self.local.finds_unrecorded(spec),
            Some(_) => self.remote.finds_unrecorded(spec),
        }
    }

    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        match spec.node {
            None => self.local.recover(spec).await,
            Some(_) => self.remote.recover(spec).await,
        }
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        if is_local(handle) {
            return self.local.log_tail(handle, lines).await;
        }
        self.remote.log_tail(handle, lines).await
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        if is_local(handle) {
            return self.local.read_log(handle, offset).await;
        }
        self.remote.read_log(handle, offset).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use prl_flow_backend::Held;

    use super::*;

    /// A remote backend that starts nothing and remembers what it was asked.
    #[derive(Default)]
    struct Remote {
        calls: Mutex<Vec<String>>,
    }

    impl Remote {
        fn note(&self, call: String) {
            self.calls.lock().expect("lock").push(call);
        }
    }

    #[async_trait]
    impl Backend for Remote {
        fn name(&self) -> &str {
            "remote"
        }
        async fn check(&self, nodes: &[String]) -> Result<(), Vec<ConfigError>> {
            Err(vec![ConfigError::new(
                "hosts",
                format!("{} nodes", nodes.len()),
            )])
        }
        async fn allocate(&self, _: &[String]) -> Result<Allocation, BackendError> {
            Ok(Allocation {
                hosts: Default::default(),
                handle: ProcHandle::new("remote", 1, &serde_json::json!({}))?,
            })
        }
        async fn release(&self, _: &Allocation) -> Result<(), BackendError> {
            Ok(())
        }
        async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
            self.note(format!("spawn {}", spec.task));
            ProcHandle::new("remote", 1, &serde_json::json!({ "task": spec.task }))
        }
        async fn status(&self, _: &ProcHandle) -> Result<ProcState, BackendError> {
            self.note("status".into());
            Ok(ProcState::Running)
        }
        async fn wait(&self, _: &ProcHandle) -> Result<ProcState, BackendError> {
            Ok(ProcState::Gone)
        }
        async fn stop(&self, _: &ProcHandle, _: Duration) -> Result<(), BackendError> {
            Err(BackendError::new("stop one by one"))
        }
        async fn teardown(
            &self,
            items: &[Recorded],
            _: Duration,
            _: Option<&Path>,
        ) -> Vec<Stopped> {
            self.note(format!("teardown {}", items.len()));
            items
                .iter()
                .map(|r| Stopped {
                    id: r.id.clone(),
                    was_running: false,
                    error: None,
                })
                .collect()
        }
        async fn log_tail(&self, _: &ProcHandle, _: usize) -> Result<String, BackendError> {
            Ok("remote log".into())
        }
        async fn read_log(&self, _: &ProcHandle, o: u64) -> Result<(String, u64), BackendError> {
            Ok((String::new(), o))
        }
    }

    #[tokio::test]
    async fn what_has_no_node_runs_here_and_the_rest_remotely() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = WithLocal::new(Remote::default());
        assert_eq!(b.name(), "remote");
        assert_eq!(
            b.check(&["node0".into()]).await.expect_err("remote")[0].message,
            "1 nodes"
        );
        let here = SpawnSpec {
            task: "here".into(),
            argv: vec!["sleep".into(), "30".into()],
            run_dir: dir.path().join("run"),
            log: dir.path().join("here.log"),
            service: true,
            ..Default::default()
        };
        let there = SpawnSpec {
            task: "there".into(),
            node: Some("node0".into()),
            ..here.clone()
        };
        let local = b.spawn(&here).await.expect("local spawn");
        let remote = b.spawn(&there).await.expect("remote spawn");
        assert!(is_local(&local) && !is_local(&remote));
        assert_eq!(b.status(&local).await.expect("status"), ProcState::Running);
        assert!(
            b.describe(&local).starts_with("pid "),
            "{}",
            b.describe(&local)
        );
        assert_eq!(b.describe(&remote), "");
        assert_eq!(b.log_tail(&remote, 3).await.expect("log"), "remote log");
        let item = |id: &str, h: &ProcHandle| Recorded {
            id: id.into(),
            held: Held::Process(h.clone()),
        };
        let alloc = b.allocate(&[]).await.expect("an allocation");
        let done = b
            .teardown(
                &[
                    item("there", &remote),
                    item("here", &local),
                    Recorded {
                        id: "nodes".into(),
                        held: Held::Allocation(alloc),
                    },
                ],
                Duration::from_secs(2),
                None,
            )
            .await;
        assert!(done.iter().all(|s| s.error.is_none()), "{done:?}");
        let ids: Vec<(&str, bool)> = done
            .iter()
            .map(|s| (s.id.as_str(), s.was_running))
            .collect();
        assert_eq!(ids, [("here", true), ("there", false), ("nodes", false)]);
        assert_ne!(b.status(&local).await.expect("status"), ProcState::Running);
        let calls = b.calls.lock().expect("lock").clone();
        assert_eq!(calls, ["spawn there", "teardown 2"]);
    }
}
