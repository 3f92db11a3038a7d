//! What the journal keeps of a remote process, and where a state dir's files live on a host.
//!
//! A [`Handle`] names the host (as reached), the process's identity there (pid, start
//! time, boot id) and its files; an [`AllocHandle`] maps nodes to hosts. Both are JSON in
//! the journal, so their shape does not change. Also here: the remote base dir's name and
//! the checks a spawn spec passes before any script is written.
//!
//! The payload of a process's handle:
//!
//! ```json
//! { "host": "10.0.0.12", "user": "root", "port": 22, "node": "node1",
//!   "pid": 4242, "start": 1234567, "boot_id": "6c1e...", "service": true,
//!   "run_dir": "/root/.prl-flow/remote/multi_node-1a2b3c4d/run/engine1",
//!   "log": "/root/.prl-flow/remote/multi_node-1a2b3c4d/logs/engine1.log",
//!   "status_file": "/root/.prl-flow/remote/multi_node-1a2b3c4d/run/engine1/exit-status",
//!   "ssh": { "config": "/etc/prl-flow/ssh_config" } }
//! ```
//!
//! `ssh` holds the recipe's non-default ssh settings, so a later prl-flow reaches the host
//! exactly as the run did.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use prl_flow_backend::{BackendError, ProcHandle, ProcState, SpawnSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::script;
use crate::transport::Conn;

/// The backend's name, in its handles.
pub(crate) const NAME: &str = "ssh";

/// A process on a host: the payload of its [`ProcHandle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Handle {
    #[serde(flatten)]
    pub(crate) conn: Conn,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<String>,
    pub(crate) pid: i32,
    /// Start time in clock ticks since boot; 0 if the process ended before it was read.
    pub(crate) start: u64,
    pub(crate) boot_id: String,
    pub(crate) service: bool,
    pub(crate) run_dir: String,
    pub(crate) log: String,
    pub(crate) status_file: String,
}

impl Handle {
    pub(crate) fn proc(&self) -> script::Proc<'_> {
        script::Proc {
            pid: self.pid,
            start: self.start,
            boot: &self.boot_id,
            status_file: &self.status_file,
        }
    }

    pub(crate) fn key(&self) -> (String, i32, u64) {
        (self.conn.to_string(), self.pid, self.start)
    }
}

/// What the session that started a one-shot knows of its end.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Watch {
    Pending,
    Ended(ProcState),
    /// The session broke before the process ended: ask the host.
    Lost,
}

/// The payload of an ssh [`Allocation`]'s handle: how each node's host is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AllocHandle {
    pub(crate) nodes: BTreeMap<String, Conn>,
    /// The remote base dir of the state dir (absent in older handles): with the nodes, what
    /// a backend made from this handle needs to find a start that no handle names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) base: Option<String>,
}

/// Reads a handle from the journal.
pub(crate) fn parse(handle: &ProcHandle) -> Result<Handle, BackendError> {
    handle.open(NAME)
}

/// Wraps a process's or an allocation's data into this backend's handle.
pub(crate) fn wrap(payload: &impl Serialize) -> Result<ProcHandle, BackendError> {
    ProcHandle::new(NAME, ProcHandle::VERSION, payload)
}

/// `PID START BOOT BASE...` of a `spawned` answer.
pub(crate) fn parse_spawned(words: &[String]) -> Option<(i32, u64, String, String)> {
    let pid = words.first()?.parse().ok()?;
    let start = words.get(1)?.parse().ok()?;
    let boot = words.get(2)?.clone();
    let base = words.get(3..)?.join(" ");
    (!base.is_empty()).then_some((pid, start, boot, base))
}

/// `<state dir name>-<hash of this machine and the state dir's absolute path>`.
pub(crate) fn state_key(state_dir: &Path) -> String {
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
pub(crate) fn last_name(p: &Path, what: &str) -> Result<String, BackendError> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && !n.contains('\n'))
        .ok_or_else(|| BackendError::new(format!("the {what} `{}` has no file name", p.display())))
}

pub(crate) fn check_spec(spec: &SpawnSpec) -> Result<(), BackendError> {
    if spec.argv.is_empty() {
        return Err(BackendError::new(format!(
            "task `{}` has an empty command",
            spec.task
        )));
    }
    for k in spec.env.keys() {
        if !script::is_env_name(k) {
            return Err(BackendError::new(format!(
                "task `{}`: `{k}` cannot be set on a host: names of environment variables there are letters, digits and `_`, not starting with a digit",
                spec.task
            )));
        }
    }
    if let Some(cwd) = &spec.cwd {
        let usable = cwd.is_absolute() && matches!(cwd.to_str(), Some(c) if !c.contains('\n'));
        if !usable {
            return Err(BackendError::new(format!(
                "task `{}`: the directory to start in, `{}`, must be an absolute path on the host",
                spec.task,
                cwd.display()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Settings;

    #[test]
    fn state_keys_differ_by_path_and_read_well() {
        let a = state_key(Path::new("/tmp/a/.prl-flow/multi_node"));
        let b = state_key(Path::new("/tmp/b/.prl-flow/multi_node"));
        assert!(a.starts_with("multi_node-") && b.starts_with("multi_node-"));
        assert_ne!(a, b);
        assert_eq!(a, state_key(Path::new("/tmp/a/.prl-flow/multi_node")));
    }

    #[test]
    fn handles_round_trip_and_keep_defaults_out() {
        let h = Handle {
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
        let v = wrap(&h).expect("handle");
        assert_eq!(v.backend, "ssh");
        assert_eq!(v.payload["host"], "10.0.0.2");
        assert_eq!(v.payload["user"], "root");
        assert!(v.payload.get("ssh").is_none(), "{v}");
        assert_eq!(parse(&v).expect("parse"), h);
        let local = ProcHandle::new("local", 1, &serde_json::json!({ "pid": 42 })).expect("h");
        assert_eq!(
            parse(&local).expect_err("not ours").message,
            "backend `ssh` cannot use a handle of backend `local`"
        );
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
        s.cwd = Some("relative".into());
        assert!(check_spec(&s).is_err());
        s.cwd = Some("/srv/project".into());
        assert!(check_spec(&s).is_ok());
        s.cwd = None;
        s.env.insert("A=B".into(), String::new());
        assert!(check_spec(&s).is_err());
        s.env.clear();
        s.env.insert("ODD NAME".into(), String::new());
        assert!(check_spec(&s).is_err());
        s.env.clear();
        s.env.insert("HF_TOKEN".into(), "it's $x".into());
        assert!(check_spec(&s).is_ok());
    }
}
