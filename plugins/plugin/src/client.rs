//! The client side of the protocol: a [`Backend`] whose every call is a request to a plugin
//! process.
//!
//! # Theory of operation
//!
//! One plugin process serves one prl-flow process. It is started lazily, on the first call,
//! and kept for the run; the first request is the `hello` handshake. Four tasks surround
//! the process:
//!
//! - a **writer** owns its stdin and writes request lines from a channel, so callers never
//!   contend for the pipe;
//! - a **reader** owns its stdout and hands each answer to the caller waiting for that id
//!   (a oneshot channel in the `pending` table): requests are multiplexed, and a long `wait`
//!   does not hold up a `status`;
//! - a **stderr reader** keeps the last lines the plugin wrote there (quoted in errors) and
//!   passes each to `tracing`;
//! - a **watcher** owns the child and learns how it ended; dropping the connection closes
//!   stdin (a plugin exits at end of input), then kills it if it lingers.
//!
//! Nothing here waits without a bound except `wait` itself (a process may rightly run for
//! days; callers race it against other things). Every other request has a time limit. When
//! the plugin dies, or writes a line that is not an answer, the reader marks the connection
//! dead and fails every pending request with a message naming the plugin, saying how it
//! ended and quoting its stderr; a line of nonsense also kills the process, since nothing
//! it says after that can be trusted. The next call starts a fresh process.
//!
//! The plugin runs in its own process group, so a Ctrl-C at the terminal reaches prl-flow
//! alone, which still needs the plugin to stop what it started; killing it kills that group,
//! so helpers it started go with it.
//!
//! A lost answer (the plugin died, wrote nonsense, or did not answer in time) is told from
//! an error answer. Two calls act on it: a lost `spawn` asks the plugin (a new process if
//! that one died) to `recover` the spawn by its id, the task and the attempt, and goes on
//! with the process found; a `wait` goes on watching with a new plugin process, since the
//! processes outlive the plugin.
//!
//! A plugin's handles are its own JSON objects. prl-flow wraps each in a [`ProcHandle`]
//! named after the plugin (the name it was found by), whose payload is the plugin's object
//! plus the plugin's path (`plugin`), so that `status` or `down` in a later process find it
//! again ([`plugin_path`]). A plugin without the log methods gets a `log` key too (the spawn
//! spec's log path, if it set none) that prl-flow reads itself. A handle goes back to the
//! plugin as it went on the wire before: the payload with `backend` set to the plugin's name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    Allocation, Backend, BackendError, ProcHandle, ProcState, SpawnSpec, ALLOCATE,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::protocol::{self, Hello, LogChunk};

mod conn;

use conn::{Conn, Failure};

/// How often `wait` asks for `status` when the plugin cannot `wait` itself.
const POLL: Duration = Duration::from_millis(200);

/// How many times in a row `wait` starts a plugin again that died under it, before it
/// gives up (a wait that lasted a while before the plugin died does not count).
const WAIT_RESTARTS: u32 = 3;

/// An allocation as it crosses the wire: the handle is the plugin's own object.
#[derive(Debug, Serialize, Deserialize)]
struct WireAllocation {
    hosts: BTreeMap<String, String>,
    handle: Value,
}

/// The executable of the plugin that made a handle, as the handle records it (`None`: not
/// a plugin's handle).
pub fn plugin_path(handle: &ProcHandle) -> Option<PathBuf> {
    handle
        .payload
        .get("plugin")
        .and_then(Value::as_str)
        .map(PathBuf::from)
}

/// Request time limits. `wait` has none; `stop` gets its grace period on top of
/// `request`. A plugin may replace any of them in its `hello` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub hello: Duration,
    pub request: Duration,
    /// A scheduler may queue an allocation for a while.
    pub allocate: Duration,
    /// Starting a process may mean pulling a container image.
    pub spawn: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            hello: Duration::from_secs(10),
            request: Duration::from_secs(30),
            allocate: Duration::from_secs(600),
            spawn: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    /// The same limit for everything (tests of broken plugins).
    pub fn all(limit: Duration) -> Self {
        Self {
            hello: limit,
            request: limit,
            allocate: limit,
            spawn: limit,
        }
    }
}

/// A backend served by a plugin executable. Cheap to create: the process starts on the
/// first call.
pub struct PluginBackend {
    name: String,
    path: PathBuf,
    config: Value,
    timeouts: Timeouts,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl PluginBackend {
    /// The plugin at `path`, known to prl-flow as `name` (the name handles carry).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            config: Value::Null,
            timeouts: Timeouts::default(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The recipe's `[backend]` table (with the site's defaults), sent with `hello`.
    pub fn with_config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the plugin if it is not running, and says what it said of itself.
    pub async fn handshake(&self) -> Result<Hello, BackendError> {
        Ok(self.conn().await?.hello.clone())
    }

    /// Ends the plugin process (it gets end of input, then is killed if it lingers). The
    /// next call starts a new one.
    pub async fn shutdown(&self) {
        self.conn.lock().await.take();
    }

    async fn conn(&self) -> Result<Arc<Conn>, BackendError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.alive() {
                return Ok(c.clone());
            }
            tracing::warn!(plugin = %self.name, "the plugin process ended; starting it again");
        }
        // Drop a dead connection before starting its successor.
        *slot = None;
        let c = Arc::new(Conn::start(&self.name, &self.path, &self.config, &self.timeouts).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn call(&self, method: &'static str, params: Value) -> Result<Value, BackendError> {
        self.send(method, params).await.map_err(|f| f.error)
    }

    /// [`Self::call`], telling a lost answer from an error answer. A plugin that cannot be
    /// started at all is an error answer: asking again will not help.
    async fn send(&self, method: &'static str, params: Value) -> Result<Value, Failure> {
        let conn = self
            .conn()
            .await
            .map_err(|error| Failure { error, lost: false })?;
        let limit = conn.limit(method, &self.timeouts);
        conn.send(method, &params, limit).await
    }

    /// A spawn spec as it goes on the wire.
    fn spec_json(&self, spec: &SpawnSpec) -> Result<Value, BackendError> {
        // Not `json!` with the spec itself: that panics on a path that is not UTF-8.
        serde_json::to_value(spec).map_err(|e| {
            BackendError::new(format!(
                "task `{}` cannot be sent to plugin `{}`: {e}",
                spec.task, self.name
            ))
        })
    }

    /// One `wait` (or, without it, `status` polled until the process is no longer running).
    async fn wait_once(&self, handle: &ProcHandle) -> Result<ProcState, Failure> {
        let bad = |error| Failure { error, lost: false };
        let params = json!({ "handle": self.untag(handle).map_err(bad)? });
        if self.can("wait").await.map_err(bad)? {
            let v = self.send("wait", params).await?;
            return protocol::parse_state(&v).map_err(|e| bad(self.bad_answer("wait", e)));
        }
        loop {
            let v = self.send("status", params.clone()).await?;
            match protocol::parse_state(&v).map_err(|e| bad(self.bad_answer("status", e)))? {
                ProcState::Running => tokio::time::sleep(POLL).await,
                other => return Ok(other),
            }
        }
    }

    /// Wraps what the plugin returned into a handle named after the plugin, with the keys
    /// that belong to prl-flow set.
    fn tag(&self, handle: Value, log: Option<&Path>) -> Result<ProcHandle, BackendError> {
        let mut obj = match handle {
            Value::Object(o) => o,
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(BackendError::new(format!(
                    "plugin `{}` returned the handle {other}; a handle must be a JSON object",
                    self.name
                )))
            }
        };
        obj.remove("backend");
        // The plugin's own path, so that `status` and `down` find it from the journal alone,
        // without the site file or recipe that named it.
        if let Some(p) = self.path.to_str() {
            obj.insert("plugin".into(), Value::from(p));
        }
        // (A log path that is not UTF-8 cannot go into JSON; the log methods then say so.)
        if let Some(log) = log.and_then(Path::to_str) {
            obj.entry("log").or_insert_with(|| Value::from(log));
        }
        ProcHandle::new(self.name.clone(), ProcHandle::VERSION, &obj)
    }

    /// A handle as the plugin gets it: the payload, with `backend` set to the plugin's name.
    fn untag(&self, handle: &ProcHandle) -> Result<Value, BackendError> {
        let mut obj: serde_json::Map<String, Value> = handle.open(&self.name)?;
        obj.insert("backend".into(), Value::String(self.name.clone()));
        Ok(Value::Object(obj))
    }

    /// An allocation as the plugin gets it.
    fn wire_allocation(&self, allocation: &Allocation) -> Result<WireAllocation, BackendError> {
        Ok(WireAllocation {
            hosts: allocation.hosts.clone(),
            handle: self.untag(&allocation.handle)?,
        })
    }

    fn bad_answer(&self, method: &str, why: impl std::fmt::Display) -> BackendError {
        BackendError::new(format!(
            "plugin `{}` answered `{method}` with {why}",
            self.name
        ))
    }

    async fn can(&self, method: &str) -> Result<bool, BackendError> {
        Ok(self.conn().await?.hello.can(method))
    }

    /// The log file a handle names, for plugins that do not serve logs themselves.
    fn log_of(&self, handle: &ProcHandle) -> Result<PathBuf, BackendError> {
        handle
            .open::<Value>(&self.name)?
            .get("log")
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| {
                BackendError::new(format!(
                    "plugin `{}` does not serve logs (`log_tail`, `read_log`) and its handle names no `log` file",
                    self.name
                ))
            })
    }
}

#[async_trait]
impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    /// What the plugin's handle says of its process: a pid, else a step id.
    fn describe(&self, handle: &ProcHandle) -> String {
        let Ok(h) = handle.open::<Value>(&self.name) else {
            return String::new();
        };
        if let Some(pid) = h.get("pid").and_then(Value::as_i64) {
            return format!("pid {pid}");
        }
        h.get("step")
            .and_then(Value::as_str)
            .map(|s| format!("step {s}"))
            .unwrap_or_default()
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        let v = self.call(ALLOCATE, json!({ "nodes": nodes })).await?;
        let a: WireAllocation = serde_json::from_value(v.clone())
            .map_err(|e| self.bad_answer(ALLOCATE, format_args!("{v}, not an allocation ({e})")))?;
        if let Some(n) = nodes.iter().find(|n| match a.hosts.get(*n) {
            Some(h) => h.trim().is_empty(),
            None => true,
        }) {
            return Err(self.bad_answer(ALLOCATE, format_args!("no address for node `{n}`: {v}")));
        }
        Ok(Allocation {
            handle: self.tag(a.handle, None)?,
            hosts: a.hosts,
        })
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        if !self.can("allocation_alive").await? {
            return Ok(true);
        }
        let v = self
            .call(
                "allocation_alive",
                json!({ "allocation": self.wire_allocation(allocation)? }),
            )
            .await?;
        v.as_bool().ok_or_else(|| {
            self.bad_answer("allocation_alive", format_args!("{v}, not true or false"))
        })
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError> {
        let allocation = self.wire_allocation(allocation)?;
        self.call("release", json!({ "allocation": allocation }))
            .await
            .map(drop)
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        let conn = self.conn().await?;
        let params = json!({ "spec": self.spec_json(spec)? });
        let sent = conn
            .send("spawn", &params, conn.limit("spawn", &self.timeouts))
            .await;
        let serves_logs = conn.hello.can("log_tail") && conn.hello.can("read_log");
        drop(conn);
        let lost = match sent {
            Ok(v) => return self.tag(v, (!serves_logs).then_some(spec.log.as_path())),
            Err(f) if f.lost && spec.attempt != 0 => f.error,
            Err(f) => return Err(f.error),
        };
        // The plugin may have started the process before its answer was lost: ask it (a
        // fresh process, if that one died) about this spawn by its id, the task and the
        // attempt, so that the process is not left running unknown to prl-flow.
        match self.recover(spec).await {
            Ok(Some(h)) => {
                tracing::warn!(
                    plugin = %self.name, task = %spec.task,
                    "the answer to `spawn` was lost, and the plugin found the process it started: {lost}"
                );
                Ok(h)
            }
            Ok(None) => Err(lost),
            Err(e) => Err(BackendError::new(format!(
                "{lost}\n  asking it about that spawn failed too: {e}\n  help: `prl-flow down` and `run --resume` ask again"
            ))),
        }
    }

    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        let conn = self.conn().await?;
        if !conn.hello.can("recover") {
            return Ok(None);
        }
        let params = json!({ "spec": self.spec_json(spec)? });
        let v = conn
            .request("recover", &params, conn.limit("recover", &self.timeouts))
            .await?;
        if v.is_null() {
            return Ok(None);
        }
        let serves_logs = conn.hello.can("log_tail") && conn.hello.can("read_log");
        self.tag(v, (!serves_logs).then_some(spec.log.as_path()))
            .map(Some)
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let v = self
            .call("status", json!({ "handle": self.untag(handle)? }))
            .await?;
        protocol::parse_state(&v).map_err(|e| self.bad_answer("status", e))
    }

    /// Waits through the plugin's death: the process it watched does not end with it (a
    /// plugin's processes outlive it), so a new plugin process goes on watching it by its
    /// handle, as a later prl-flow would.
    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let mut restarts = 0;
        loop {
            let began = std::time::Instant::now();
            match self.wait_once(handle).await {
                Ok(state) => return Ok(state),
                Err(f) if f.lost && restarts < WAIT_RESTARTS => {
                    if began.elapsed() > Duration::from_secs(10) {
                        restarts = 0;
                    }
                    restarts += 1;
                    tracing::warn!(plugin = %self.name, "{}; watching on with a new plugin process", f.error);
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        let conn = self.conn().await?;
        let params = json!({ "handle": self.untag(handle)?, "grace_ms": grace.as_millis() as u64 });
        let limit = conn.limit("stop", &self.timeouts).map(|l| l + grace);
        conn.request("stop", &params, limit).await.map(drop)
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        if !self.can("log_tail").await? {
            return prl_flow_backend::tail_lines(&self.log_of(handle)?, lines);
        }
        let v = self
            .call(
                "log_tail",
                json!({ "handle": self.untag(handle)?, "lines": lines }),
            )
            .await?;
        match v {
            Value::String(s) => Ok(s),
            other => Err(self.bad_answer("log_tail", format_args!("{other}, not a string"))),
        }
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        if !self.can("read_log").await? {
            return prl_flow_backend::read_from(&self.log_of(handle)?, offset);
        }
        let v = self
            .call(
                "read_log",
                json!({ "handle": self.untag(handle)?, "offset": offset }),
            )
            .await?;
        let chunk: LogChunk = serde_json::from_value(v.clone()).map_err(|e| {
            self.bad_answer(
                "read_log",
                format_args!("{v}, not {{\"text\", \"offset\"}} ({e})"),
            )
        })?;
        Ok((chunk.text, chunk.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[tokio::test]
    async fn a_plugin_that_dies_at_hello_is_named_with_its_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = script(
            dir.path(),
            "p",
            "#!/bin/sh\necho 'no scheduler here' >&2\nexit 7\n",
        );
        let b =
            PluginBackend::new("dies", &p).with_timeouts(Timeouts::all(Duration::from_secs(20)));
        let h = ProcHandle::new("dies", ProcHandle::VERSION, &json!({})).expect("handle");
        let e = match b.status(&h).await {
            Ok(s) => panic!("status of a dead plugin: {s:?}"),
            Err(e) => e.message,
        };
        assert!(
            e.contains("plugin `dies` exited with status 7 before answering `hello`"),
            "{e}"
        );
        assert!(e.contains("no scheduler here"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_executable_says_where() {
        let b = PluginBackend::new("nowhere", "/nonexistent/prl-flow-backend-nowhere");
        let e = match b.handshake().await {
            Ok(h) => panic!("handshake with nothing: {h:?}"),
            Err(e) => e.message,
        };
        assert!(e.contains("cannot start plugin `nowhere`"), "{e}");
    }

    #[test]
    fn handles_get_the_backend_name() {
        let b = PluginBackend::new("site", "/x");
        let h = b
            .tag(json!({"pid": 1, "backend": "other"}), Some(Path::new("/l")))
            .expect("tag");
        assert_eq!(h.backend, "site");
        assert_eq!(h.payload, json!({"pid": 1, "plugin": "/x", "log": "/l"}));
        assert_eq!(plugin_path(&h), Some(PathBuf::from("/x")));
        assert_eq!(b.describe(&h), "pid 1");
        // The plugin gets back what it got before the envelope.
        assert_eq!(
            b.untag(&h).expect("untag"),
            json!({"pid": 1, "backend": "site", "plugin": "/x", "log": "/l"})
        );
        let empty = b.tag(Value::Null, None).expect("tag");
        assert_eq!(empty.payload, json!({"plugin": "/x"}));
        assert_eq!(
            b.untag(&empty).expect("untag"),
            json!({"backend": "site", "plugin": "/x"})
        );
        assert!(b.tag(json!(3), None).is_err());
        let other = PluginBackend::new("other", "/y")
            .tag(json!({"pid": 2}), None)
            .expect("tag");
        assert!(b.untag(&other).is_err());
        assert_eq!(b.describe(&other), "");
    }
}
