//! Talking to a host: the OpenSSH client, one master connection per host, scripts on stdin.
//!
//! Every remote operation is one `ssh HOST sh -s` session whose script arrives on stdin, so
//! the remote command line is a fixed `sh -s` whatever the user's login shell is, and every
//! value in the script (paths, argv, env, file contents) is quoted with `shlex`. The script
//! answers in lines starting with `PRLFLOW `; anything else on stdout (a chatty `.bashrc`) is
//! ignored.
//!
//! Sessions are multiplexed over one master connection per host (`ControlMaster`). The first
//! session to a host opens it (`ControlMaster auto`: ssh connects, puts the master in the
//! background and runs the session through it), so reaching a host costs one connection, as
//! with plain `ssh`; a per-host lock holds other sessions back until the master's socket
//! exists, so that tasks starting together do not each open a connection. `allocate` opens
//! the masters up front instead (`ssh -f -N`: connect and authenticate, run nothing), to
//! find an unreachable host before anything starts elsewhere. The master outlives prl-flow
//! for `ControlPersist`, so `status`, `logs` and `down` from another shell reuse it.
//! Its socket lives in a local directory, named by a hash of how the host is reached, so two
//! state dirs using the same host share the connection and two ssh configs never do.
//!
//! sshd refuses more than `MaxSessions` (10) sessions on one connection. Short operations
//! (spawn, status, stop, log reads) share one semaphore and long-lived watches (waiting for a
//! process to end) another, sized together to stay under that limit.
//!
//! Options prl-flow always sets: `BatchMode yes` (no prompt can ever block a run),
//! `StrictHostKeyChecking yes` (or `accept-new`, only when the recipe says so), the control
//! socket, `ConnectTimeout` and `ServerAliveInterval` (a cut link is noticed, not waited on
//! forever). Everything else (`ProxyJump`, keys, agents, users) comes from the user's
//! `~/.ssh/config` as with any `ssh` they type.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::config::{self, HostSpec, SshConfig};

/// The prefix of every line a remote script says to prl-flow.
pub const MARK: &str = "PRLFLOW ";

/// How to reach one host. Kept in every process handle, so that a later prl-flow (`status`,
/// `down`, `logs`) reaches the same host the same way, through the same master.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conn {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Settings::is_default")]
    pub ssh: Settings,
}

/// The recipe's ssh settings; defaults are left out of handles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_new_host_keys: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_alive_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_persist_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
}

impl Settings {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }

    pub fn from_config(c: &SshConfig) -> Self {
        let secs = |d: Duration, default: Duration| (d != default).then_some(d.as_secs());
        Self {
            config: c.ssh_config.clone(),
            options: c.options.clone(),
            accept_new_host_keys: c.accept_new_host_keys,
            control_dir: c.control_dir.clone(),
            connect_timeout_s: secs(c.connect_timeout, config::DEFAULT_CONNECT_TIMEOUT),
            server_alive_s: secs(c.server_alive_interval, config::DEFAULT_SERVER_ALIVE),
            control_persist_s: secs(c.control_persist, config::DEFAULT_CONTROL_PERSIST),
            max_sessions: (c.max_sessions != config::DEFAULT_MAX_SESSIONS)
                .then_some(c.max_sessions),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout_s
            .map_or(config::DEFAULT_CONNECT_TIMEOUT, Duration::from_secs)
    }

    fn server_alive(&self) -> Duration {
        self.server_alive_s
            .map_or(config::DEFAULT_SERVER_ALIVE, Duration::from_secs)
    }

    fn control_persist(&self) -> Duration {
        self.control_persist_s
            .map_or(config::DEFAULT_CONTROL_PERSIST, Duration::from_secs)
    }

    /// How long a silent, broken connection can take to be noticed: a connect, or three
    /// missed keep-alives.
    pub fn dead_after(&self) -> Duration {
        self.connect_timeout().max(self.server_alive() * 3) + Duration::from_secs(2)
    }
}

impl Conn {
    pub fn new(h: &HostSpec, settings: &Settings) -> Self {
        Self {
            host: h.host.clone(),
            user: h.user.clone(),
            port: h.port,
            ssh: settings.clone(),
        }
    }
}

impl fmt::Display for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = HostSpec {
            host: self.host.clone(),
            user: self.user.clone(),
            port: self.port,
            address: None,
        };
        write!(f, "{spec}")
    }
}

/// An ssh failure, naming the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshError {
    pub host: String,
    pub message: String,
    pub help: Option<String>,
    /// The connection could not be made or was lost (as opposed to a remote command that
    /// failed): worth one more try after reconnecting.
    pub transport: bool,
}

impl fmt::Display for SshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host `{}`: {}", self.host, self.message)?;
        if let Some(h) = &self.help {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

impl From<SshError> for prl_flow_backend::BackendError {
    fn from(e: SshError) -> Self {
        Self::new(e.to_string())
    }
}

/// What ssh said on stderr, as one line for people, with a hint for the usual causes.
pub fn explain_ssh_failure(host: &str, stderr: &str, accept_new: bool) -> SshError {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Warning: Permanently added") && !l.starts_with("@@@")
        })
        .collect();
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    let help = if has("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        Some(format!(
            "the host's key is not the one in known_hosts: if the host was reinstalled, check its new key and remove the old one (`ssh-keygen -R {host}`)"
        ))
    } else if has("Host key verification failed") || has("host key is known") {
        Some(if accept_new {
            "check the host's key in known_hosts".to_string()
        } else {
            format!(
                "its host key is not known: check the key and add it (`ssh-keyscan {host} >> ~/.ssh/known_hosts`, then compare fingerprints), or set `accept_new_host_keys = true` under `[backend]` to accept keys of new hosts"
            )
        })
    } else if has("Permission denied") {
        Some("prl-flow runs ssh in batch mode and cannot ask for a password: load a key into ssh-agent, or set `IdentityFile` in ~/.ssh/config (or `options` under `[backend]`)".into())
    } else if has("Could not resolve hostname") {
        Some("check the host name, or give an address".into())
    } else {
        None
    };
    let message = match lines.len() {
        0 => "ssh failed without saying why (exit status 255)".to_string(),
        _ => {
            let picked: Vec<&str> = lines.iter().rev().take(3).rev().copied().collect();
            picked.join("; ")
        }
    };
    SshError {
        host: host.to_string(),
        message,
        help,
        transport: true,
    }
}

/// The runtime side of one host: its master connection and session limits.
pub struct Link {
    pub conn: Conn,
    pub label: String,
    control_path: PathBuf,
    master: Arc<tokio::sync::Mutex<()>>,
    ops: Arc<Semaphore>,
    watchers: Arc<Semaphore>,
    /// The last failure to connect, so that twenty tasks on a dead host do not each wait
    /// out a connect timeout in turn.
    unreachable: Mutex<Option<(Instant, SshError)>>,
}

/// Lines a script said, and its stderr.
#[derive(Debug, Default)]
pub struct Reply {
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Reply {
    /// The first line `PRLFLOW <word> ...`, as its words after `<word>`.
    pub fn get(&self, word: &str) -> Option<Vec<&str>> {
        self.lines.iter().find_map(|l| {
            let mut it = l.split(' ');
            (it.next() == Some(word)).then(|| it.collect())
        })
    }
}

/// A long session: the child and its stdout, line by line.
pub struct Session {
    pub child: Child,
    pub stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    pub _permit: OwnedSemaphorePermit,
    /// Held while this session is opening the host's master: released at its first line
    /// (the session runs, so the master is up) or at its end.
    opening: Option<OwnedMutexGuard<()>>,
}

impl Session {
    /// The next `PRLFLOW` line, without the mark; `None` at the end of output.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            let line = self.stdout.next_line().await;
            self.opening = None;
            let line = line.ok()??;
            if let Some(at) = line.find(MARK) {
                return Some(line[at + MARK.len()..].to_string());
            }
        }
    }

    /// Waits for the session to end; an error if ssh itself failed.
    pub async fn finish(mut self, link: &Link) -> Result<(), SshError> {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err).await;
        }
        match self.child.wait().await {
            Ok(s) if s.code() == Some(255) => {
                let e = link.lost(&err);
                if self.opening.take().is_some() {
                    link.remember(&e);
                }
                Err(e)
            }
            _ => Ok(()),
        }
    }
}

/// A control socket path must fit in `sun_path` (108 bytes with the final NUL).
const MAX_SOCKET_PATH: usize = 100;

impl Link {
    pub fn new(conn: Conn) -> Result<Self, SshError> {
        let label = conn.to_string();
        let dir = match &conn.ssh.control_dir {
            Some(d) => d.clone(),
            None => default_control_dir(),
        };
        // The socket is named by everything that decides where and how ssh connects.
        let mut h = Sha256::new();
        h.update(
            serde_json::to_vec(&(
                &conn.host,
                &conn.user,
                &conn.port,
                &conn.ssh.config,
                &conn.ssh.options,
            ))
            .unwrap_or_default(),
        );
        let name: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let control_path = dir.join(name);
        if control_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SshError {
                host: label,
                message: format!("the control socket path `{}` is too long for a unix socket", control_path.display()),
                help: Some("set `control_dir` under `[backend]` to a short directory, e.g. `/tmp/prl-flow-ssh`".into()),
                transport: false,
            });
        }
        let max = conn
            .ssh
            .max_sessions
            .unwrap_or(config::DEFAULT_MAX_SESSIONS)
            .max(2);
        // Keep one session free for other prl-flow commands (`status`, `logs`) sharing the
        // master.
        let usable = (max - 1).max(2);
        let watchers = usable / 2;
        Ok(Self {
            label,
            control_path,
            master: Arc::new(tokio::sync::Mutex::new(())),
            ops: Arc::new(Semaphore::new(usable - watchers)),
            watchers: Arc::new(Semaphore::new(watchers)),
            unreachable: Mutex::new(None),
            conn,
        })
    }

    /// Options common to every ssh invocation for this host. The user's own `options`
    /// come first: for ssh the first value of an option wins.
    fn args(&self) -> Vec<String> {
        let s = &self.conn.ssh;
        let mut a: Vec<String> = Vec::new();
        if let Some(f) = &s.config {
            a.push("-F".into());
            a.push(f.to_string_lossy().into_owned());
        }
        for (k, v) in &s.options {
            a.push("-o".into());
            a.push(format!("{k}={v}"));
        }
        let strict = if s.accept_new_host_keys {
            "accept-new"
        } else {
            "yes"
        };
        for o in [
            "BatchMode=yes".to_string(),
            format!("StrictHostKeyChecking={strict}"),
            format!("ControlPath={}", self.control_path.display()),
            format!("ConnectTimeout={}", s.connect_timeout().as_secs()),
            format!("ServerAliveInterval={}", s.server_alive().as_secs()),
            "ServerAliveCountMax=3".to_string(),
            "LogLevel=ERROR".to_string(),
        ] {
            a.push("-o".into());
            a.push(o);
        }
        if let Some(u) = &self.conn.user {
            a.push("-l".into());
            a.push(u.clone());
        }
        if let Some(p) = self.conn.port {
            a.push("-p".into());
            a.push(p.to_string());
        }
        a
    }

    fn command(&self, extra: &[&str], remote: Option<&str>) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.args())
            .args(extra)
            .arg("--")
            .arg(&self.conn.host);
        if let Some(r) = remote {
            c.arg(r);
        }
        c.kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn persist(&self) -> String {
        format!(
            "ControlPersist={}",
            self.conn.ssh.control_persist().as_secs()
        )
    }

    fn lost(&self, stderr: &str) -> SshError {
        let mut e = explain_ssh_failure(&self.label, stderr, self.conn.ssh.accept_new_host_keys);
        if stderr.trim().is_empty() {
            e.message = "the connection was lost (ssh exited with status 255)".into();
        }
        e
    }

    /// Opens the master connection unless one is up. Fails with ssh's own words when the
    /// host cannot be reached or refuses us.
    pub async fn connect(&self) -> Result<(), SshError> {
        if self.control_path.exists() {
            return Ok(());
        }
        let Some(_guard) = self.first_use().await? else {
            return Ok(());
        };
        let persist = self.persist();
        let mut cmd = self.command(
            &["-o", "ControlMaster=auto", "-o", &persist, "-f", "-N"],
            None,
        );
        // ssh -f forks the master away once authenticated; its stdio go to /dev/null then,
        // so reading our pipes to the end does not wait for the master.
        let limit = self.conn.ssh.connect_timeout() + Duration::from_secs(10);
        let out = match tokio::time::timeout(limit, async { cmd.output().await }).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(SshError {
                    host: self.label.clone(),
                    message: format!("cannot run `ssh`: {e}"),
                    help: Some("install the OpenSSH client (`openssh-client`)".into()),
                    transport: false,
                })
            }
            Err(_) => {
                let e = SshError {
                    host: self.label.clone(),
                    message: format!("no connection after {}s", limit.as_secs()),
                    help: None,
                    transport: true,
                };
                self.remember(&e);
                return Err(e);
            }
        };
        if out.status.success() {
            if let Ok(mut u) = self.unreachable.lock() {
                *u = None;
            }
            return Ok(());
        }
        let e = explain_ssh_failure(
            &self.label,
            &String::from_utf8_lossy(&out.stderr),
            self.conn.ssh.accept_new_host_keys,
        );
        self.remember(&e);
        Err(e)
    }

    /// Before a session: `None` when the master is up; else the host's lock, for the caller
    /// to hold until the master it opens is up. Fails at once if the host failed to connect
    /// a moment ago.
    async fn first_use(&self) -> Result<Option<OwnedMutexGuard<()>>, SshError> {
        if self.control_path.exists() {
            return Ok(None);
        }
        let guard = self.master.clone().lock_owned().await;
        if self.control_path.exists() {
            return Ok(None);
        }
        if let Ok(u) = self.unreachable.lock() {
            if let Some((when, e)) = u.as_ref() {
                if when.elapsed() < Duration::from_secs(2) {
                    return Err(e.clone());
                }
            }
        }
        if let Some(dir) = self.control_path.parent() {
            create_private_dir(dir).map_err(|e| SshError {
                host: self.label.clone(),
                message: format!(
                    "cannot make the control socket directory `{}`: {e}",
                    dir.display()
                ),
                help: None,
                transport: false,
            })?;
        }
        Ok(Some(guard))
    }

    fn remember(&self, e: &SshError) {
        if let Ok(mut u) = self.unreachable.lock() {
            *u = Some((Instant::now(), e.clone()));
        }
    }

    /// Runs `script` with `sh -s` on the host and collects what it said. Waits at most
    /// `limit` once connected.
    pub async fn run(&self, script: &str, limit: Duration) -> Result<Reply, SshError> {
        let (stdout, stderr) = self.run_raw_with_stderr(script, limit).await?;
        Ok(Reply {
            lines: marked_lines(&stdout),
            stderr,
        })
    }

    /// Like [`Link::run`], but the whole of stdout (for log reads).
    pub async fn run_raw(&self, script: &str, limit: Duration) -> Result<String, SshError> {
        Ok(self.run_raw_with_stderr(script, limit).await?.0)
    }

    async fn run_raw_with_stderr(
        &self,
        script: &str,
        limit: Duration,
    ) -> Result<(String, String), SshError> {
        let _permit = self
            .ops
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.closed())?;
        let mut tries = 0;
        loop {
            let mut opening = self.first_use().await?;
            let started = self.start(script).await?;
            let output = started.wait_with_output();
            tokio::pin!(output);
            let deadline = tokio::time::sleep(limit + self.conn.ssh.connect_timeout());
            tokio::pin!(deadline);
            let out = loop {
                tokio::select! {
                    o = &mut output => break o,
                    () = &mut deadline => {
                        return Err(SshError {
                            host: self.label.clone(),
                            message: format!("no answer in {}s", limit.as_secs()),
                            help: Some("the host or its link may be down".into()),
                            transport: true,
                        })
                    }
                    // While this session opens the master, let the others in once it is up.
                    () = tokio::time::sleep(Duration::from_millis(10)), if opening.is_some() => {
                        if self.control_path.exists() {
                            opening = None;
                        }
                    }
                }
            };
            let out = out.map_err(|e| self.io(e))?;
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.code() == Some(255) && opening.is_some() {
                let e = self.lost(&stderr);
                self.remember(&e);
                return Err(e);
            }
            if out.status.code() == Some(255) {
                // More sessions than sshd allows on one connection (another prl-flow shares
                // it): wait a little and ask again.
                if stderr.contains("open refused") && tries < 20 {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                    continue;
                }
                return Err(self.lost(&stderr));
            }
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let said_error = stdout.lines().find_map(|l| {
                l.find("PRLFLOW error ")
                    .map(|at| l[at + "PRLFLOW error ".len()..].to_string())
            });
            if let Some(msg) = said_error {
                return Err(SshError {
                    host: self.label.clone(),
                    message: msg,
                    help: None,
                    transport: false,
                });
            }
            if !out.status.success() {
                return Err(SshError {
                    host: self.label.clone(),
                    message: format!(
                        "the remote shell failed (exit status {}): {}",
                        out.status.code().unwrap_or(-1),
                        stderr.trim()
                    ),
                    help: Some(
                        "prl-flow needs a POSIX `sh`, `setsid` and Linux `/proc` on the host"
                            .into(),
                    ),
                    transport: false,
                });
            }
            return Ok((stdout, stderr));
        }
    }

    /// Starts `script` for a long session (a watch), if a watcher slot is free.
    pub async fn open(&self, script: &str) -> Result<Option<Session>, SshError> {
        let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let opening = self.first_use().await?;
        let mut child = self.start(script).await?;
        let Some(stdout) = child.stdout.take() else {
            return Err(self.io(std::io::Error::other("no stdout")));
        };
        Ok(Some(Session {
            child,
            stdout: BufReader::new(stdout).lines(),
            _permit: permit,
            opening,
        }))
    }

    /// Spawns `ssh HOST sh -s` and feeds it the script.
    async fn start(&self, script: &str) -> Result<Child, SshError> {
        let persist = self.persist();
        let mut cmd = self.command(
            &["-T", "-o", "ControlMaster=auto", "-o", &persist],
            Some("sh -s"),
        );
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| self.io(e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A broken pipe here means ssh failed early: its exit status says why.
            let _ = stdin.write_all(script.as_bytes()).await;
            let _ = stdin.shutdown().await;
        }
        Ok(child)
    }

    /// Closes the master connection (sessions still open end with it).
    pub async fn disconnect(&self) {
        if !self.control_path.exists() {
            return;
        }
        let mut cmd = self.command(&["-O", "exit"], None);
        let _ = tokio::time::timeout(Duration::from_secs(5), cmd.output()).await;
    }

    /// The host's address as ssh resolves it (`HostName` in ssh config, or the name).
    pub async fn resolve(&self) -> String {
        let mut cmd = self.command(&["-G"], None);
        if let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(5), cmd.output()).await {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(h) = text.lines().find_map(|l| l.strip_prefix("hostname ")) {
                return h.trim().to_string();
            }
        }
        self.conn.host.clone()
    }

    fn io(&self, e: std::io::Error) -> SshError {
        SshError {
            host: self.label.clone(),
            message: format!("cannot run `ssh`: {e}"),
            help: Some("install the OpenSSH client (`openssh-client`)".into()),
            transport: false,
        }
    }

    fn closed(&self) -> SshError {
        SshError {
            host: self.label.clone(),
            message: "the backend is shutting down".into(),
            help: None,
            transport: false,
        }
    }
}

fn marked_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.find(MARK).map(|at| l[at + MARK.len()..].to_string()))
        .collect()
}

/// `$XDG_RUNTIME_DIR/prl-flow-ssh`, else `/tmp/prl-flow-ssh-UID`: short, private, local.
pub fn default_control_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("prl-flow-ssh"),
        _ => {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0);
            PathBuf::from(format!("/tmp/prl-flow-ssh-{uid}"))
        }
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The links of one backend, one per way of reaching a host.
#[derive(Default)]
pub struct Links {
    map: Mutex<HashMap<Conn, Arc<Link>>>,
}

impl Links {
    pub fn get(&self, conn: &Conn) -> Result<Arc<Link>, SshError> {
        let mut map = self.map.lock().map_err(|_| SshError {
            host: conn.to_string(),
            message: "internal lock poisoned".into(),
            help: None,
            transport: false,
        })?;
        if let Some(l) = map.get(conn) {
            return Ok(l.clone());
        }
        let link = Arc::new(Link::new(conn.clone())?);
        map.insert(conn.clone(), link.clone());
        Ok(link)
    }

    pub fn all(&self) -> Vec<Arc<Link>> {
        self.map
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_errors_are_explained() {
        let e = explain_ssh_failure(
            "10.0.0.2",
            "No ED25519 host key is known for 10.0.0.2 and you have requested strict checking.\r\nHost key verification failed.\r\n",
            false,
        );
        assert!(e.message.contains("Host key verification failed"), "{e}");
        assert!(
            e.help
                .as_deref()
                .is_some_and(|h| h.contains("accept_new_host_keys")),
            "{e}"
        );
        let e = explain_ssh_failure(
            "h",
            "ssh: connect to host h port 22: Connection timed out\r\n",
            false,
        );
        assert_eq!(
            e.to_string(),
            "host `h`: ssh: connect to host h port 22: Connection timed out"
        );
        let e = explain_ssh_failure("h", "root@h: Permission denied (publickey).\n", false);
        assert!(e.help.as_deref().is_some_and(|h| h.contains("ssh-agent")));
    }

    #[test]
    fn arguments_put_the_users_options_first_and_quote_nothing_by_hand() {
        let mut s = Settings {
            control_dir: Some("/tmp/x".into()),
            ..Default::default()
        };
        s.options.insert("ProxyJump".into(), "bastion".into());
        let link = Link::new(Conn {
            host: "gpu1".into(),
            user: Some("me".into()),
            port: Some(2222),
            ssh: s,
        })
        .expect("link");
        let a = link.args();
        let pj = a
            .iter()
            .position(|x| x == "ProxyJump=bastion")
            .expect("user option");
        let bm = a
            .iter()
            .position(|x| x == "BatchMode=yes")
            .expect("batch mode");
        assert!(pj < bm);
        assert!(a.contains(&"StrictHostKeyChecking=yes".to_string()));
        assert!(
            a.windows(2).any(|w| w == ["-l", "me"]) && a.windows(2).any(|w| w == ["-p", "2222"])
        );
        assert!(link.control_path.starts_with("/tmp/x"));
        let long = Conn {
            host: "h".into(),
            user: None,
            port: None,
            ssh: Settings {
                control_dir: Some(PathBuf::from("/tmp").join("x".repeat(120))),
                ..Default::default()
            },
        };
        assert!(Link::new(long).is_err());
    }

    #[test]
    fn only_marked_lines_count() {
        let l = marked_lines(
            "welcome to the cluster\nPRLFLOW spawned 1 2 b /x\n..PRLFLOW state running\n",
        );
        assert_eq!(l, ["spawned 1 2 b /x", "state running"]);
    }
}
