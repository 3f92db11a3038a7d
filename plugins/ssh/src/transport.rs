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
//! state dirs using the same host share the connection and two ssh configs never do. That
//! directory must be the user's alone (checked as OpenSSH checks its own files, refused
//! otherwise), and a socket there counts as a master only once `ssh -O check` says so: a
//! socket someone else placed would receive every session.
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, HostSpec, SshConfig};

mod link;

pub use link::{Link, Reply, SshSession};

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

/// Where master sockets live unless the recipe says `control_dir`:
/// `$XDG_RUNTIME_DIR/prl-flow-ssh`, else `~/.ssh/prl-flow`; both are under a directory only
/// the user can write, unlike a name in `/tmp` that anyone could take first.
pub fn default_control_dir() -> PathBuf {
    control_dir_for(
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}

fn control_dir_for(runtime: Option<&std::ffi::OsStr>, home: Option<&std::ffi::OsStr>) -> PathBuf {
    match (runtime, home) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("prl-flow-ssh"),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".ssh").join("prl-flow"),
        // No home at all: a name in /tmp, which the checks below refuse if anyone else
        // made it first.
        _ => PathBuf::from(format!("/tmp/prl-flow-ssh-{}", effective_uid())),
    }
}

/// The user this process runs as (the owner of its `/proc/self`).
fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Makes the control socket directory (mode 0700) unless it exists, then checks it as
/// OpenSSH checks its own files: a directory, not a symbolic link, owned by this user and
/// writable by nobody else. Anyone else able to write there could put a socket of theirs
/// where ssh sends our sessions. The error names the path and what is wrong.
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                format!(
                    "cannot make the control socket directory `{}`: {e}",
                    dir.display()
                )
            })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make `{}` private: {e}", dir.display()))?;
    }
    check_private_dir(dir)
}

/// What is wrong with `dir` as a control socket directory, if anything.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let refuse = |what: String| {
        Err(format!(
            "the control socket directory `{}` is not safe: {what}",
            dir.display()
        ))
    };
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => return refuse(format!("cannot read it: {e}")),
    };
    if m.file_type().is_symlink() {
        return refuse("it is a symbolic link".into());
    }
    if !m.is_dir() {
        return refuse("it is not a directory".into());
    }
    let uid = effective_uid();
    if m.uid() != uid {
        return refuse(format!(
            "it is owned by uid {}, not by this user (uid {uid})",
            m.uid()
        ));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return refuse(format!(
            "it is writable by its group or by others (mode {mode:04o})"
        ));
    }
    Ok(())
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
    fn the_default_control_dir_is_where_only_the_user_writes() {
        let os = |s: &str| std::ffi::OsString::from(s);
        assert_eq!(
            control_dir_for(Some(&os("/run/user/7")), Some(&os("/home/u"))),
            PathBuf::from("/run/user/7/prl-flow-ssh")
        );
        assert_eq!(
            control_dir_for(None, Some(&os("/home/u"))),
            PathBuf::from("/home/u/.ssh/prl-flow")
        );
        assert_eq!(
            control_dir_for(Some(&os("")), Some(&os("/home/u"))),
            PathBuf::from("/home/u/.ssh/prl-flow")
        );
        assert!(control_dir_for(None, None).starts_with("/tmp"));
    }

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
}
