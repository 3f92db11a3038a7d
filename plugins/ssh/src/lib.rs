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
//! `accept_new_host_keys = true`. The masters' sockets live in a directory only the user can
//! write (checked before each use), and a socket counts as a master only once `ssh -O check`
//! says so.
//!
//! docs/ssh.md lists what this backend guarantees and the test that checks each.
//!
//! **Remote layout.** Each state dir has a remote base dir on every host,
//! `<remote_dir>/<state dir name>-<hash>` (`remote_dir` defaults to `.prl-flow/remote` under
//! the remote home; the hash is of this machine's name and the state dir's absolute path, so
//! two state dirs never share one). In it, `run/<task>/` is the task's run dir (the rendered
//! files are uploaded there, inside the spawn script, and the pid and exit-status files are
//! kept there) and `logs/<task>.log` its log. The command starts in the run dir, or in the
//! spawn spec's `cwd`, an absolute path on the host that must exist there.
//!
//! **Processes** ([`script`]). A spawn is one ssh session running a script that places the
//! files and starts the command detached with `setsid`, in a session and process group of
//! its own, stdout and stderr appended to the log, and answers with the pid, start time and
//! the host's boot id. A one-shot's session then stays open and waits for it, so its end is
//! known at once; if the session breaks, the one-shot goes on, and its wrapper leaves its
//! exit status in a file for whoever looks next. Status, stop (SIGTERM to the group, a grace
//! period, SIGKILL; also when the group's leader has ended and left others behind) and
//! waiting are small scripts of their own, keyed by that identity, so a later prl-flow
//! reattaches from the journal alone. The spawn script also keeps that identity and the
//! spawn's attempt in the run dir's `.proc`, where `recover` finds a start whose answer
//! never reached the journal (the allocation's handle names the hosts and the remote base). Environment values reach the host inside the spawn
//! script, on stdin, and the process through a file only the user can read: never through a
//! command line.
//!
//! **Ports** ([`script::ports`]). Before a start, the task's ports are looked up in the
//! host's `/proc/net/tcp*`; a probe that passes counts only when a process of the service's
//! group holds the listening socket. Each is one ssh round trip. The preflight, after
//! `allocate`, looks every program a host runs up on its `PATH` in one round trip per host
//! ([`script::preflight`]).
//!
//! **Handles** are JSON the journal keeps (`handle.rs` shows one), enough for
//! [`SshBackend::from_handles`] (what `status`, `down` and `logs` use, with no recipe at
//! hand) to reach the host exactly as the run did.
//!
//! **Failures.** An unreachable host fails its tasks with the host named and ssh's own
//! message. A connection that drops does not touch remote processes (they are in sessions
//! of their own); `--resume` once the host is back finds them by their identity and keeps
//! them.
//!
//! A task without a node runs on this machine: every constructor returns the backend inside
//! [`WithLocal`], which sends such tasks (and their handles) to the local backend, so this
//! one only ever sees hosts. This crate must not know recipes, plans or the journal beyond
//! the handles it writes itself.

pub mod config;
mod handle;
pub mod hosts;
mod process;
pub mod script;
mod spawn;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    last_lines, Allocation, Backend, BackendError, Listener, Missing, PortHolder, ProcHandle,
    ProcState, Program, SpawnSpec,
};
use prl_flow_local::WithLocal;
use tokio::sync::watch;

pub use config::SshConfig;
use handle::{parse, state_key, wrap, AllocHandle, Watch, NAME};
pub use hosts::HostSpec;
pub use prl_flow_backend::ConfigError;
use transport::{Conn, Link, Links, Settings};

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
}

/// How long a short remote operation may take once connected.
pub(crate) const OP_LIMIT: Duration = Duration::from_secs(30);
/// How often to ask when no long session is free.
pub(crate) const POLL: Duration = Duration::from_millis(500);

impl SshBackend {
    /// The backend for a recipe's `[backend]` table (as JSON) and its state dir, with the
    /// local backend beside it for tasks without a node. Relative paths in the table are
    /// taken from the current directory; [`SshBackend::configure`] says where from and
    /// keeps every problem apart.
    pub fn from_config(
        config: &serde_json::Value,
        state_dir: &Path,
    ) -> Result<WithLocal<Self>, String> {
        Self::configure(config, None, state_dir).map_err(|errs| ConfigError::join(&errs))
    }

    /// Like [`SshBackend::from_config`], with relative paths of the table taken from
    /// `base_dir` (the recipe's directory) when given, and every problem of the table
    /// returned, each naming its field.
    pub fn configure(
        config: &serde_json::Value,
        base_dir: Option<&Path>,
        state_dir: &Path,
    ) -> Result<WithLocal<Self>, Vec<ConfigError>> {
        Ok(Self::new(
            SshConfig::from_value(config, base_dir)?,
            state_dir,
        ))
    }

    /// The backend for a checked [`SshConfig`], with the local backend beside it.
    pub fn new(config: SshConfig, state_dir: &Path) -> WithLocal<Self> {
        let settings = Settings::from_config(&config);
        let remote_base = format!(
            "{}/{}",
            config.remote_dir.trim_end_matches('/'),
            state_key(state_dir)
        );
        WithLocal::new(Self {
            config: Some(config),
            settings,
            remote_base,
            links: Links::default(),
            nodes: Mutex::new(BTreeMap::new()),
            watches: Mutex::new(HashMap::new()),
        })
    }

    /// A backend that can only look after processes recorded in handles (status, stop,
    /// logs, release): for `status`, `down` and `logs`, which have the journal but no recipe.
    pub fn from_handles() -> WithLocal<Self> {
        WithLocal::new(Self::unconfigured())
    }

    fn unconfigured() -> Self {
        Self {
            config: None,
            settings: Settings::default(),
            remote_base: String::new(),
            links: Links::default(),
            nodes: Mutex::new(BTreeMap::new()),
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// A backend for what a journal records, primed from one of its handles: an
    /// allocation's gives the nodes' hosts and the remote base dir, so that `recover` can
    /// find a start whose handle never reached the journal.
    pub fn from_handle(handle: &ProcHandle) -> WithLocal<Self> {
        let mut b = Self::unconfigured();
        if let Ok(a) = handle.open::<AllocHandle>(NAME) {
            b.remote_base = a.base.unwrap_or_default();
            b.nodes = Mutex::new(a.nodes);
        }
        WithLocal::new(b)
    }

    /// Runs a port script on the host of `link` and reads its answer.
    async fn sockets(
        &self,
        link: &Link,
        text: &str,
    ) -> Result<script::ports::Sockets, BackendError> {
        let reply = link.run(text, OP_LIMIT).await?;
        script::ports::Sockets::read(&reply.lines).ok_or_else(|| {
            BackendError::new(format!(
                "host `{}`: the port check did not finish: {}",
                link.label,
                reply.stderr.trim()
            ))
        })
    }

    /// The remote base dir of this state dir.
    pub fn remote_base(&self) -> &str {
        &self.remote_base
    }

    /// Where the master socket of `node`'s host lives (in the control directory).
    pub fn control_path(&self, node: &str) -> Result<std::path::PathBuf, BackendError> {
        Ok(self
            .link(&self.conn_for(node)?)?
            .control_path()
            .to_path_buf())
    }

    /// Closes every master connection this backend opened or used.
    pub async fn disconnect_all(&self) {
        for l in self.links.all() {
            l.disconnect().await;
        }
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
}

#[async_trait]
impl Backend for SshBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn describe(&self, handle: &ProcHandle) -> String {
        parse(handle)
            .map(|h| format!("pid {}", h.pid))
            .unwrap_or_default()
    }

    fn log_location(&self, handle: &ProcHandle) -> Option<String> {
        parse(handle)
            .ok()
            .map(|h| format!("{}:{}", h.conn.host, h.log))
    }

    /// A host for every node of the plan.
    async fn check(&self, nodes: &[String]) -> Result<(), Vec<ConfigError>> {
        match &self.config {
            Some(c) => c.check_nodes(nodes.len()).map_err(|e| vec![e]),
            None => Ok(()),
        }
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
        Ok(Allocation {
            hosts,
            handle: wrap(&AllocHandle {
                nodes: conns,
                base: Some(self.remote_base.clone()),
            })?,
        })
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        let Ok(recorded) = allocation.handle.open::<AllocHandle>(NAME) else {
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
        let Ok(recorded) = allocation.handle.open::<AllocHandle>(NAME) else {
            return Ok(());
        };
        for conn in recorded.nodes.values() {
            self.link(conn)?.disconnect().await;
        }
        Ok(())
    }

    /// Reads the host's `/proc`, in one ssh round trip.
    async fn ports_taken(
        &self,
        node: Option<&str>,
        address: &str,
        ports: &[u16],
    ) -> Result<Option<Vec<PortHolder>>, BackendError> {
        let Some(node) = node else {
            return Ok(None);
        };
        if ports.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let link = self.link(&self.conn_for(node)?)?;
        let sockets = self
            .sockets(&link, &script::ports::ports_taken(ports)?)
            .await?;
        Ok(Some(sockets.taken(address, ports)))
    }

    /// Looks every program of a host up in one ssh round trip, over its master connection,
    /// all hosts at once.
    async fn preflight(&self, programs: &[Program]) -> Result<Option<Vec<Missing>>, BackendError> {
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in programs {
            if let Some(n) = &p.node {
                by_node
                    .entry(n.clone())
                    .or_default()
                    .push(p.program.clone());
            }
        }
        let jobs = by_node.into_iter().map(|(node, progs)| async move {
            let link = self.link(&self.conn_for(&node)?)?;
            let reply = link
                .run(&script::preflight::programs(&progs)?, OP_LIMIT)
                .await?;
            let missing = script::preflight::read(&reply.lines, &progs).ok_or_else(|| {
                BackendError::new(format!(
                    "host `{}`: the check of the programs did not finish: {}",
                    link.label,
                    reply.stderr.trim()
                ))
            })?;
            Ok::<_, BackendError>(missing.into_iter().map(move |(program, why)| Missing {
                node: Some(node.clone()),
                program,
                why,
            }))
        });
        let mut out = Vec::new();
        for r in futures::future::join_all(jobs).await {
            out.extend(r?);
        }
        Ok(Some(out))
    }

    /// Reads the host's `/proc`, in one ssh round trip: the listener is ours when a process
    /// of the service's group holds it (found as `stop` finds the group).
    async fn listener(
        &self,
        handle: &ProcHandle,
        address: &str,
        port: u16,
    ) -> Result<Listener, BackendError> {
        let h = parse(handle)?;
        let link = self.link(&h.conn)?;
        let sockets = self
            .sockets(&link, &script::ports::listener(&h.proc(), port)?)
            .await?;
        Ok(sockets.listener(address, port))
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        self.spawn_on_host(spec).await
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        self.state(&parse(handle)?).await
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let h = parse(handle)?;
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

    /// Signals the whole process group, also when its leader has ended (a crashed server
    /// whose workers still run), and logs what it found still running.
    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        let h = parse(handle)?;
        self.stop_group(&h, grace).await.map(|_| ())
    }

    /// A process counts as running when anything of its group was (the leader or what it
    /// left behind).
    async fn stop_found(&self, handle: &ProcHandle, grace: Duration) -> Result<bool, BackendError> {
        let h = parse(handle)?;
        self.stop_group(&h, grace)
            .await
            .map(|found| !found.is_empty())
    }

    /// See `SshBackend::recover_on_host`.
    async fn recover(&self, spec: &SpawnSpec) -> Result<Option<ProcHandle>, BackendError> {
        self.recover_on_host(spec).await
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        let h = parse(handle)?;
        let link = self.link(&h.conn)?;
        let reply = link
            .run_raw(&script::tail_log(&h.log, 64 * 1024)?, OP_LIMIT)
            .await?;
        let (_, body) = script::split_log(&reply).unwrap_or_default();
        Ok(last_lines(prl_flow_backend::since_last_mark(body), lines))
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        let h = parse(handle)?;
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

    #[tokio::test]
    async fn the_check_wants_a_host_for_every_node() {
        let b = SshBackend::from_config(
            &serde_json::json!({ "hosts": ["h0", "h1"] }),
            Path::new("/tmp/s"),
        )
        .expect("config");
        let nodes = |n: usize| (0..n).map(|i| format!("node{i}")).collect::<Vec<_>>();
        assert!(b.check(&nodes(2)).await.is_ok());
        let errs = b
            .check(&nodes(3))
            .await
            .expect_err("three nodes, two hosts");
        assert_eq!(errs[0].field, "hosts");
        assert!(SshBackend::from_handles().check(&nodes(3)).await.is_ok());
    }
}
