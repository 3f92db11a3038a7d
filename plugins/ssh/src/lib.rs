//! The ssh backend: nodes are hosts reached with the OpenSSH client.
//!
//! # How it works
//!
//! A recipe lists hosts under `[backend]` (or names a site file that does; see [`config`]);
//! `node0` is the first host, `node1` the second, and a recipe needing more nodes than there
//! are hosts is refused at validation, with both numbers.
//!
//! **Transport** ([`transport`]). prl-flow runs the system's `ssh`, so `~/.ssh/config`,
//! agents, `ProxyJump` and keys work as they do for the user. Each host gets one master
//! connection (`ControlMaster`), opened by `allocate` (or the first task that needs it) and
//! shared by every session to that host, also by later prl-flow commands. `BatchMode` is
//! always on and host keys are always checked; accepting new keys is the recipe's explicit
//! `accept_new_host_keys = true`.
//!
//! **Remote layout.** Each state dir has a remote base dir on every host,
//! `<remote_dir>/<state dir name>-<hash>` (`remote_dir` defaults to `.prl-flow/remote` under
//! the remote home; the hash is of this machine's name and the state dir's absolute path, so
//! two state dirs never share one). In it, `run/<task>/` is the task's working dir (the
//! rendered files are uploaded there, inside the spawn script) and `logs/<task>.log` its log.
//!
//! **Processes** ([`script`]). A spawn is one ssh session running a script that places the
//! files and starts the command detached with `setsid`, in a session and process group of
//! its own, stdout and stderr appended to the log, and answers with the pid, start time and
//! the host's boot id. A one-shot's session then stays open and waits for it, so its end is
//! known at once; if the session breaks, the one-shot goes on, and its wrapper leaves its
//! exit status in a file for whoever looks next. Status, stop (SIGTERM to the group, a grace
//! period, SIGKILL) and waiting are small scripts of their own, keyed by that identity, so a
//! later prl-flow reattaches from the journal alone.
//!
//! **Handles** are JSON the journal keeps:
//!
//! ```json
//! { "backend": "ssh", "host": "10.0.0.12", "user": "root", "port": 22, "node": "node1",
//!   "pid": 4242, "start": 1234567, "boot_id": "6c1e...", "service": true,
//!   "run_dir": "/root/.prl-flow/remote/multi_node-1a2b3c4d/run/engine1",
//!   "log": "/root/.prl-flow/remote/multi_node-1a2b3c4d/logs/engine1.log",
//!   "status_file": "/root/.prl-flow/remote/multi_node-1a2b3c4d/run/engine1/exit-status",
//!   "ssh": { "config": "/etc/prl-flow/ssh_config" } }
//! ```
//!
//! `ssh` holds the recipe's non-default ssh settings, so [`SshBackend::from_handles`] (what
//! `status`, `down` and `logs` use, with no recipe at hand) reaches the host exactly as the
//! run did.
//!
//! **Failures.** An unreachable host fails its tasks with the host named and ssh's own
//! message. A connection that drops does not touch remote processes (they are in sessions
//! of their own); `--resume` once the host is back finds them by their identity and keeps
//! them. A task without a node runs on this machine, through the local backend.

pub mod config;
pub mod script;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    last_lines, Allocation, Backend, BackendError, ProcHandle, ProcState, SpawnSpec,
};
use prl_flow_local::LocalBackend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use config::{validate, ConfigError, HostSpec, SshConfig};
use transport::{Conn, Link, Links, Settings, SshError};

/// A process on a host, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Handle {
    backend: String,
    #[serde(flatten)]
    conn: Conn,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    pid: i32,
    /// Start time in clock ticks since boot; 0 if the process ended before it was read.
    start: u64,
    boot_id: String,
    service: bool,
    run_dir: String,
    log: String,
    status_file: String,
}

impl Handle {
    fn proc(&self) -> script::Proc<'_> {
        script::Proc {
            pid: self.pid,
            start: self.start,
            boot: &self.boot_id,
            status_file: &self.status_file,
        }
    }

    fn key(&self) -> (String, i32, u64) {
        (self.conn.to_string(), self.pid, self.start)
    }
}

/// What the session that started a one-shot knows of its end.
#[derive(Debug, Clone, PartialEq)]
enum Watch {
    Pending,
    Ended(ProcState),
    /// The session broke before the process ended: ask the host.
    Lost,
}

/// The `handle` of an ssh [`Allocation`]: how each node's host is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AllocHandle {
    backend: String,
    nodes: BTreeMap<String, Conn>,
}

pub struct SshBackend {
    /// `None` for a backend rebuilt from handles alone (`status`, `down`, `logs`).
    config: Option<SshConfig>,
    settings: Settings,
    /// The remote base dir of this state dir (relative to the remote home unless absolute).
    remote_base: String,
    links: Links,
    /// Node → how its host is reached, learned from `allocate` or a recorded allocation.
    nodes: Mutex<BTreeMap<String, Conn>>,
    watches: Mutex<HashMap<(String, i32, u64), watch::Receiver<Watch>>>,
    /// Tasks without a node run here.
    local: LocalBackend,
}

/// How long a short remote operation may take once connected.
const OP_LIMIT: Duration = Duration::from_secs(30);
/// How often to ask when no long session is free.
const POLL: Duration = Duration::from_millis(500);

impl SshBackend {
    /// The backend for a recipe's `[backend]` table (as JSON) and its state dir. Relative
    /// paths in the table are taken from the current directory; [`SshBackend::new`] takes
    /// a checked [`SshConfig`] instead.
    pub fn from_config(config: &serde_json::Value, state_dir: &Path) -> Result<Self, String> {
        let c = SshConfig::from_value(config, None).map_err(|errs| {
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        Ok(Self::new(c, state_dir))
    }

    pub fn new(config: SshConfig, state_dir: &Path) -> Self {
        let settings = Settings::from_config(&config);
        let remote_base = format!(
            "{}/{}",
            config.remote_dir.trim_end_matches('/'),
            state_key(state_dir)
        );
        Self {
            config: Some(config),
            settings,
            remote_base,
            links: Links::default(),
            nodes: Mutex::new(BTreeMap::new()),
            watches: Mutex::new(HashMap::new()),
            local: LocalBackend::new(),
        }
    }

    /// A backend that can only look after processes recorded in handles (status, stop,
    /// logs, release): for `status`, `down` and `logs`, which have the journal but no recipe.
    pub fn from_handles() -> Self {
        Self {
            config: None,
            settings: Settings::default(),
            remote_base: String::new(),
            links: Links::default(),
            nodes: Mutex::new(BTreeMap::new()),
            watches: Mutex::new(HashMap::new()),
            local: LocalBackend::new(),
        }
    }

    /// The remote base dir of this state dir.
    pub fn remote_base(&self) -> &str {
        &self.remote_base
    }

    /// Closes every master connection this backend opened or used.
    pub async fn disconnect_all(&self) {
        for l in self.links.all() {
            l.disconnect().await;
        }
    }

    fn parse(handle: &ProcHandle) -> Result<Handle, BackendError> {
        serde_json::from_value(handle.clone())
            .map_err(|e| BackendError::new(format!("not an ssh process handle ({e}): {handle}")))
    }

    fn is_local(handle: &ProcHandle) -> bool {
        handle.get("backend").and_then(|b| b.as_str()) == Some("local")
    }

    fn link(&self, conn: &Conn) -> Result<Arc<Link>, BackendError> {
        self.links.get(conn).map_err(BackendError::from)
    }

    /// The host of a node: as allocated, else `nodeK` is the K-th host, else a host of that
    /// name.
    fn conn_for(&self, node: &str) -> Result<Conn, BackendError> {
        if let Some(c) = self.nodes.lock().ok().and_then(|m| m.get(node).cloned()) {
            return Ok(c);
        }
        let Some(config) = &self.config else {
            return Err(BackendError::new(format!(
                "no host is known for node `{node}`: this ssh backend was made from a journal, not a recipe"
            )));
        };
        let by_index = node
            .strip_prefix("node")
            .and_then(|k| k.parse::<usize>().ok())
            .and_then(|k| config.hosts.get(k));
        let by_name = || config.hosts.iter().find(|h| h.host == node);
        match by_index.or_else(by_name) {
            Some(h) => Ok(Conn::new(h, &self.settings)),
            None => Err(BackendError::new(format!(
                "node `{node}` has no host: `[backend] hosts` lists {} ({})",
                config.hosts.len(),
                config
                    .hosts
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn watch_of(&self, h: &Handle) -> Option<watch::Receiver<Watch>> {
        self.watches.lock().ok()?.get(&h.key()).cloned()
    }

    async fn state(&self, h: &Handle) -> Result<ProcState, BackendError> {
        if let Some(rx) = self.watch_of(h) {
            if let Watch::Ended(s) = &*rx.borrow() {
                return Ok(s.clone());
            }
        }
        let link = self.link(&h.conn)?;
        let reply = link.run(&script::status(&h.proc())?, OP_LIMIT).await?;
        reply
            .get("state")
            .and_then(|w| script::parse_state(&w))
            .ok_or_else(|| {
                BackendError::new(format!(
                    "host `{}`: no state in the answer: {:?}",
                    link.label, reply.lines
                ))
            })
    }

    /// Waits on the host for the process to end, over one long session; falls back to
    /// asking every [`POLL`] when no session is free. A lost connection is tried once more
    /// (the master is reopened); a host that stays unreachable is an error.
    async fn wait_remote(&self, h: &Handle) -> Result<ProcState, BackendError> {
        let link = self.link(&h.conn)?;
        loop {
            match link.open(&script::wait(&h.proc())?).await? {
                Some(mut session) => {
                    let mut end = None;
                    while let Some(line) = session.next().await {
                        if let Some(rest) = line.strip_prefix("state ") {
                            end = script::parse_state(&rest.split(' ').collect::<Vec<_>>());
                            break;
                        }
                    }
                    if let Some(s) = end {
                        return Ok(s);
                    }
                    if let Err(e) = session.finish(&link).await {
                        tracing::debug!("wait on {}: {e}", link.label);
                    }
                    // The session broke: is the host there, and the process still running?
                    match self.state(h).await? {
                        ProcState::Running => continue,
                        other => return Ok(other),
                    }
                }
                None => loop {
                    match self.state(h).await? {
                        ProcState::Running => tokio::time::sleep(POLL).await,
                        other => return Ok(other),
                    }
                },
            }
        }
    }

    /// Starts a watched one-shot: the spawn session stays open and reports its end.
    async fn spawn_watched(
        &self,
        link: &Arc<Link>,
        text: &str,
    ) -> Result<Option<Vec<String>>, SshError> {
        let Some(mut session) = link.open(text).await? else {
            return Ok(None);
        };
        let limit = link.conn.ssh.dead_after() + OP_LIMIT;
        let first = tokio::time::timeout(limit, async {
            loop {
                match session.next().await {
                    Some(l) if l.starts_with("spawned ") || l.starts_with("error ") => {
                        return Some(l)
                    }
                    Some(_) => continue,
                    None => return None,
                }
            }
        })
        .await
        .unwrap_or(None);
        let Some(first) = first else {
            let lost = session.finish(link).await.err();
            return Err(lost.unwrap_or_else(|| SshError {
                host: link.label.clone(),
                message: "the spawn script ended without an answer".into(),
                help: Some(
                    "prl-flow needs a POSIX `sh`, `setsid` and Linux `/proc` on the host".into(),
                ),
                transport: false,
            }));
        };
        if let Some(msg) = first.strip_prefix("error ") {
            let _ = session.child.wait().await;
            return Err(SshError {
                host: link.label.clone(),
                message: msg.to_string(),
                help: None,
                transport: false,
            });
        }
        let words: Vec<String> = first.split(' ').skip(1).map(String::from).collect();
        let (tx, rx) = watch::channel(Watch::Pending);
        let key = parse_spawned(&words).map(|(pid, start, ..)| (link.label.clone(), pid, start));
        if let (Some(key), Ok(mut m)) = (key, self.watches.lock()) {
            m.insert(key, rx);
        }
        tokio::spawn(async move {
            let mut end = Watch::Lost;
            while let Some(line) = session.next().await {
                if let Some(rest) = line.strip_prefix("state ") {
                    if let Some(s) = script::parse_state(&rest.split(' ').collect::<Vec<_>>()) {
                        end = Watch::Ended(s);
                    }
                    break;
                }
            }
            let _ = session.child.wait().await;
            let _ = tx.send(end);
        });
        Ok(Some(words))
    }
}

/// `PID START BOOT BASE...` of a `spawned` answer.
fn parse_spawned(words: &[String]) -> Option<(i32, u64, String, String)> {
    let pid = words.first()?.parse().ok()?;
    let start = words.get(1)?.parse().ok()?;
    let boot = words.get(2)?.clone();
    let base = words.get(3..)?.join(" ");
    (!base.is_empty()).then_some((pid, start, boot, base))
}

/// `<state dir name>-<hash of this machine and the state dir's absolute path>`.
fn state_key(state_dir: &Path) -> String {
    let abs = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut h = Sha256::new();
    h.update(machine.trim().as_bytes());
    h.update([0]);
    h.update(abs.to_string_lossy().as_bytes());
    let hash: String = h.finalize()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name: String = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}-{hash}")
}

/// The last component of a local path, as a remote file name.
fn last_name(p: &Path, what: &str) -> Result<String, BackendError> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.contains('\n'))
        .ok_or_else(|| BackendError::new(format!("the {what} `{}` has no file name", p.display())))
}

fn check_spec(spec: &SpawnSpec) -> Result<(), BackendError> {
    if spec.argv.is_empty() {
        return Err(BackendError::new(format!(
            "task `{}` has an empty command",
            spec.task
        )));
    }
    if spec.argv[0].contains('=') && !spec.env.is_empty() {
        return Err(BackendError::new(format!(
            "task `{}`: a program name with `=` (`{}`) cannot be started with environment variables",
            spec.task, spec.argv[0]
        )));
    }
    for k in spec.env.keys() {
        if k.is_empty() || k.contains('=') {
            return Err(BackendError::new(format!(
                "task `{}`: `{k}` is not an environment variable name",
                spec.task
            )));
        }
    }
    for rel in spec.files.keys() {
        let p = Path::new(rel);
        let ok = !rel.is_empty()
            && !rel.contains('\n')
            && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(BackendError::new(format!(
                "task `{}`: the file `{rel}` must be a relative path inside the run dir",
                spec.task
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for SshBackend {
    fn name(&self) -> &str {
        "ssh"
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        let Some(config) = &self.config else {
            return Err(BackendError::new(
                "this ssh backend was made from a journal and has no hosts to allocate",
            ));
        };
        config
            .check_nodes(nodes.len())
            .map_err(|e| BackendError::new(e.to_string()))?;
        // Connect to every host at once; report every host that fails, not just the first.
        let jobs = nodes
            .iter()
            .zip(&config.hosts)
            .map(|(node, spec)| async move {
                let conn = Conn::new(spec, &self.settings);
                let link = self.link(&conn)?;
                let (connected, address) = tokio::join!(link.connect(), async {
                    // An address needs no lookup; a name may be an alias in ssh config.
                    match &spec.address {
                        Some(a) => a.clone(),
                        None if spec.host.parse::<std::net::IpAddr>().is_ok() => spec.host.clone(),
                        None => link.resolve().await,
                    }
                });
                connected.map_err(|e| BackendError::new(format!("{node}: {e}")))?;
                Ok::<_, BackendError>((node.clone(), conn, address))
            });
        let results = futures::future::join_all(jobs).await;
        let mut hosts = BTreeMap::new();
        let mut conns = BTreeMap::new();
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok((node, conn, address)) => {
                    hosts.insert(node.clone(), address);
                    conns.insert(node, conn);
                }
                Err(e) => failures.push(e.message),
            }
        }
        if !failures.is_empty() {
            return Err(BackendError::new(format!(
                "cannot reach {} of {} hosts:\n  {}",
                failures.len(),
                nodes.len(),
                failures.join("\n  ")
            )));
        }
        if let Ok(mut m) = self.nodes.lock() {
            m.extend(conns.clone());
        }
        let handle = AllocHandle {
            backend: "ssh".into(),
            nodes: conns,
        };
        Ok(Allocation {
            hosts,
            handle: serde_json::to_value(handle).map_err(|e| BackendError::new(e.to_string()))?,
        })
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        let Ok(recorded) = serde_json::from_value::<AllocHandle>(allocation.handle.clone()) else {
            return Ok(false);
        };
        // Hosts are not lent and taken back: the allocation holds as long as the recipe
        // still maps each node to the same host, reached the same way.
        if self.config.is_some() {
            for (node, conn) in &recorded.nodes {
                if &self.conn_for(node)? != conn {
                    return Ok(false);
                }
            }
        }
        if let Ok(mut m) = self.nodes.lock() {
            m.extend(recorded.nodes);
        }
        Ok(true)
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError> {
        let Ok(recorded) = serde_json::from_value::<AllocHandle>(allocation.handle.clone()) else {
            return Ok(());
        };
        for conn in recorded.nodes.values() {
            self.link(conn)?.disconnect().await;
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        let Some(node) = &spec.node else {
            return self.local.spawn(spec).await;
        };
        check_spec(spec)?;
        let conn = self.conn_for(node)?;
        let link = self.link(&conn)?;
        let name = last_name(&spec.run_dir, "run dir")?;
        let log_name = last_name(&spec.log, "log")?;
        let start = |watch: bool| {
            script::spawn(&script::Start {
                base: &self.remote_base,
                name: &name,
                log_name: &log_name,
                argv: &spec.argv,
                env: &spec.env,
                files: &spec.files,
                service: spec.service,
                watch,
            })
        };
        let mut words = None;
        if !spec.service {
            words = self.spawn_watched(&link, &start(true)?).await?;
        }
        let words = match words {
            Some(w) => w,
            None => {
                let reply = link
                    .run(&start(false)?, link.conn.ssh.dead_after() + OP_LIMIT)
                    .await?;
                reply
                    .get("spawned")
                    .map(|w| w.iter().map(|s| s.to_string()).collect())
                    .ok_or_else(|| {
                        BackendError::new(format!(
                            "host `{}`: the spawn script did not answer",
                            link.label
                        ))
                    })?
            }
        };
        let (pid, start, boot_id, base) = parse_spawned(&words).ok_or_else(|| {
            BackendError::new(format!(
                "host `{}`: cannot read the spawn answer `{}`",
                link.label,
                words.join(" ")
            ))
        })?;
        let run_dir = format!("{base}/run/{name}");
        let h = Handle {
            backend: "ssh".into(),
            conn,
            node: Some(node.clone()),
            pid,
            start,
            boot_id,
            service: spec.service,
            status_file: format!("{run_dir}/exit-status"),
            log: format!("{base}/logs/{log_name}"),
            run_dir,
        };
        serde_json::to_value(h).map_err(|e| BackendError::new(e.to_string()))
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if Self::is_local(handle) {
            return self.local.status(handle).await;
        }
        self.state(&Self::parse(handle)?).await
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if Self::is_local(handle) {
            return self.local.wait(handle).await;
        }
        let h = Self::parse(handle)?;
        if let Some(mut rx) = self.watch_of(&h) {
            let end = rx
                .wait_for(|w| *w != Watch::Pending)
                .await
                .map(|w| w.clone())
                .unwrap_or(Watch::Lost);
            if let Watch::Ended(s) = end {
                return Ok(s);
            }
        }
        self.wait_remote(&h).await
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        if Self::is_local(handle) {
            return self.local.stop(handle, grace).await;
        }
        let h = Self::parse(handle)?;
        if let Some(rx) = self.watch_of(&h) {
            if matches!(&*rx.borrow(), Watch::Ended(_)) {
                return Ok(());
            }
        }
        let link = self.link(&h.conn)?;
        let limit = grace + Duration::from_secs(10) + OP_LIMIT;
        let reply = link.run(&script::stop(&h.proc(), grace)?, limit).await?;
        match reply.get("stopped").as_deref() {
            Some(["stuck"]) => Err(BackendError::new(format!(
                "host `{}`: process group {} did not end after SIGKILL",
                link.label, h.pid
            ))),
            Some(_) => Ok(()),
            None => Err(BackendError::new(format!(
                "host `{}`: the stop script did not answer",
                link.label
            ))),
        }
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        if Self::is_local(handle) {
            return self.local.log_tail(handle, lines).await;
        }
        let h = Self::parse(handle)?;
        let link = self.link(&h.conn)?;
        let reply = link
            .run_raw(&script::tail_log(&h.log, 64 * 1024)?, OP_LIMIT)
            .await?;
        let (_, body) = script::split_log(&reply).unwrap_or_default();
        Ok(last_lines(body, lines))
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        if Self::is_local(handle) {
            return self.local.read_log(handle, offset).await;
        }
        let h = Self::parse(handle)?;
        let link = self.link(&h.conn)?;
        let reply = link
            .run_raw(&script::read_log(&h.log, offset)?, OP_LIMIT)
            .await?;
        let Some((words, body)) = script::split_log(&reply) else {
            return Err(BackendError::new(format!(
                "host `{}`: the log read did not answer",
                link.label
            )));
        };
        let from: u64 = words.first().and_then(|w| w.parse().ok()).unwrap_or(0);
        Ok((body.to_string(), from + body.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keys_differ_by_path_and_read_well() {
        let a = state_key(Path::new("/tmp/a/.prl-flow/multi_node"));
        let b = state_key(Path::new("/tmp/b/.prl-flow/multi_node"));
        assert!(a.starts_with("multi_node-") && b.starts_with("multi_node-"));
        assert_ne!(a, b);
        assert_eq!(a, state_key(Path::new("/tmp/a/.prl-flow/multi_node")));
    }

    #[test]
    fn nodes_map_to_hosts_in_order() {
        let b = SshBackend::from_config(
            &serde_json::json!({ "hosts": ["h0", "root@h1:2222"] }),
            Path::new("/tmp/s"),
        )
        .expect("config");
        assert_eq!(
            b.conn_for("node1").expect("node1").to_string(),
            "root@h1:2222"
        );
        assert_eq!(b.conn_for("h0").expect("by name").host, "h0");
        let e = b.conn_for("node2").expect_err("no third host");
        assert!(e.message.contains("lists 2"), "{e}");
        assert!(SshBackend::from_handles().conn_for("node0").is_err());
    }

    #[test]
    fn handles_round_trip_and_keep_defaults_out() {
        let h = Handle {
            backend: "ssh".into(),
            conn: Conn {
                host: "10.0.0.2".into(),
                user: Some("root".into()),
                port: Some(22),
                ssh: Settings::default(),
            },
            node: Some("node0".into()),
            pid: 42,
            start: 7,
            boot_id: "b".into(),
            service: true,
            run_dir: "/r/run/t".into(),
            log: "/r/logs/t.log".into(),
            status_file: "/r/run/t/exit-status".into(),
        };
        let v = serde_json::to_value(&h).expect("json");
        assert_eq!(v["host"], "10.0.0.2");
        assert_eq!(v["user"], "root");
        assert!(v.get("ssh").is_none(), "{v}");
        assert_eq!(SshBackend::parse(&v).expect("parse"), h);
    }

    #[test]
    fn bad_specs_are_refused_before_anything_runs() {
        let mut s = SpawnSpec {
            task: "t".into(),
            node: Some("node0".into()),
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert!(check_spec(&s).is_ok());
        s.files.insert("../escape".into(), String::new());
        assert!(check_spec(&s).is_err());
        s.files.clear();
        s.env.insert("A=B".into(), String::new());
        assert!(check_spec(&s).is_err());
    }
}
