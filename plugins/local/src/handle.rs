//! The payload of a local process's handle, what `/proc` says of its group, and what its
//! proc file says of its end.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::procfs;

/// The payload of a local process's [`ProcHandle`](prl_flow_backend::ProcHandle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Handle {
    pub(crate) pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub(crate) start: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<String>,
    pub(crate) log: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status_file: Option<PathBuf>,
    /// The session the process started in (absent in older handles): what is left of its
    /// group after its leader died is ours only in that session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sid: Option<i32>,
}

impl Handle {
    /// The payload of its [`ProcHandle`](prl_flow_backend::ProcHandle), as serializing it
    /// gives, built in place (one per spawn). `None` for a path that is not UTF-8.
    pub(crate) fn payload(&self) -> Option<serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("pid".into(), self.pid.into());
        m.insert("start".into(), self.start.into());
        if let Some(node) = &self.node {
            m.insert("node".into(), node.clone().into());
        }
        m.insert("log".into(), self.log.to_str()?.into());
        if let Some(f) = &self.status_file {
            m.insert("status_file".into(), f.to_str()?.into());
        }
        if let Some(sid) = self.sid {
            m.insert("sid".into(), sid.into());
        }
        Some(m.into())
    }

    /// The live processes of the attempt's group, leader or not: the leader may have died
    /// and left workers behind (a crashed server's engine workers).
    ///
    /// What keeps strangers out: while the leader lives, the group is ours only if the
    /// leader's start time is the recorded one. Linux hands out no pid that is still a group
    /// id, so while any member lives nobody else can have made a group of that id; once the
    /// leader is gone, a member counts only if it started after the leader and in the
    /// leader's session. (A group of that id made by another process of the same session,
    /// after every process of ours ended and the pid came round again, would pass: that is
    /// the one case this cannot tell.)
    pub(crate) fn members(&self) -> Vec<i32> {
        let group = procfs::group(self.pid);
        match group.iter().find(|(pid, _)| *pid == self.pid) {
            Some((_, leader)) if leader.start != self.start => Vec::new(),
            Some(_) => group.into_iter().map(|(pid, _)| pid).collect(),
            None => group
                .into_iter()
                .filter(|(_, s)| s.start >= self.start && self.sid.is_some_and(|sid| s.sid == sid))
                .map(|(pid, _)| pid)
                .collect(),
        }
    }
}

/// How the one-shot `pid` ended, from its proc file: `PID ATTEMPT` and, once it ended, its
/// exit status on the next line. A file that names another pid (a later attempt that had
/// not yet rewritten it) says nothing of `pid`. An `exit-status` file of an earlier
/// version of this backend holds the status alone.
pub(crate) fn read_status(path: &Path, pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let first = lines.next()?.trim();
    match first.split_once(' ') {
        Some((p, _)) if p.parse() == Ok(pid) => lines.next()?.trim().parse().ok(),
        Some(_) => None,
        None => first.parse().ok(),
    }
}
