//! A remote backend with the local one beside it: tasks without a node run on this machine.
//!
//! A plan may hold tasks that run where prl-flow runs (`node: None`: a probe, a small
//! helper) next to tasks on the nodes of a cluster. [`WithLocal`] routes once, for every
//! remote backend: a spawn (or recover) without a node and every call with a local handle
//! (`"backend": "local"`) go to [`LocalBackend`]; everything else, allocations included,
//! goes to the remote backend, which never sees a local task.

use std::ops::Deref;
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    Allocation, Backend, BackendError, ConfigError, ProcHandle, ProcState, SpawnSpec,
};

use crate::LocalBackend;

/// Is this the handle of a process the local backend started?
pub fn is_local_handle(handle: &ProcHandle) -> bool {
    handle.get("backend").and_then(|b| b.as_str()) == Some("local")
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
        if is_local_handle(handle) {
            return self.local.status(handle).await;
        }
        self.remote.status(handle).await
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if is_local_handle(handle) {
            return self.local.wait(handle).await;
        }
        self.remote.wait(handle).await
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        if is_local_handle(handle) {
            return self.local.stop(handle, grace).await;
        }
        self.remote.stop(handle, grace).await
    }

    async fn stop_many(
        &self,
        handles: &[ProcHandle],
        grace: Duration,
    ) -> Vec<Result<(), BackendError>> {
        let (local, remote): (Vec<_>, Vec<_>) = handles
            .iter()
            .cloned()
            .enumerate()
            .partition(|(_, h)| is_local_handle(h));
        let split = |v: Vec<(usize, ProcHandle)>| -> (Vec<usize>, Vec<ProcHandle>) {
            v.into_iter().unzip()
        };
        let ((local_at, local), (remote_at, remote)) = (split(local), split(remote));
        let (local_done, remote_done) = tokio::join!(
            self.local.stop_many(&local, grace),
            self.remote.stop_many(&remote, grace)
        );
        let mut out: Vec<Option<Result<(), BackendError>>> = vec![None; handles.len()];
        for (at, r) in local_at
            .into_iter()
            .zip(local_done)
            .chain(remote_at.into_iter().zip(remote_done))
        {
            out[at] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BackendError::new("the backend gave no answer"))))
            .collect()
    }

    async fn recover(
        &self,
        spec: &SpawnSpec,
        since_ms: u64,
    ) -> Result<Option<ProcHandle>, BackendError> {
        match spec.node {
            None => self.local.recover(spec, since_ms).await,
            Some(_) => self.remote.recover(spec, since_ms).await,
        }
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        if is_local_handle(handle) {
            return self.local.log_tail(handle, lines).await;
        }
        self.remote.log_tail(handle, lines).await
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        if is_local_handle(handle) {
            return self.local.read_log(handle, offset).await;
        }
        self.remote.read_log(handle, offset).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

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
            Ok(Allocation::default())
        }
        async fn release(&self, _: &Allocation) -> Result<(), BackendError> {
            Ok(())
        }
        async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
            self.note(format!("spawn {}", spec.task));
            Ok(serde_json::json!({ "backend": "remote", "task": spec.task }))
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
        async fn stop_many(
            &self,
            handles: &[ProcHandle],
            _: Duration,
        ) -> Vec<Result<(), BackendError>> {
            self.note(format!("stop_many {}", handles.len()));
            handles.iter().map(|_| Ok(())).collect()
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
        assert!(is_local_handle(&local) && !is_local_handle(&remote));
        assert_eq!(b.status(&local).await.expect("status"), ProcState::Running);
        assert_eq!(b.log_tail(&remote, 3).await.expect("log"), "remote log");
        let done = b
            .stop_many(
                &[remote.clone(), local.clone(), remote],
                Duration::from_secs(2),
            )
            .await;
        assert!(done.iter().all(Result::is_ok), "{done:?}");
        assert_ne!(b.status(&local).await.expect("status"), ProcState::Running);
        let calls = b.calls.lock().expect("lock").clone();
        assert_eq!(calls, ["spawn there", "stop_many 2"]);
    }
}
