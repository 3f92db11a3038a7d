//! Following a remote process: its state, waiting for its end over a long session, a
//! one-shot whose spawn session stays open to report how it ended, and stopping its group.

use std::sync::Arc;
use std::time::Duration;

use prl_flow_backend::{BackendError, ProcState};
use tokio::sync::watch;

use crate::handle::{parse_spawned, Handle, Watch};
use crate::script;
use crate::transport::{Link, SshError};
use crate::{SshBackend, OP_LIMIT, POLL};

impl SshBackend {
    pub(crate) fn watch_of(&self, h: &Handle) -> Option<watch::Receiver<Watch>> {
        self.watches.lock().ok()?.get(&h.key()).cloned()
    }

    pub(crate) async fn state(&self, h: &Handle) -> Result<ProcState, BackendError> {
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

    /// Stops the process group of `h` on its host, whether or not its leader still runs, and
    /// says what it found running there (`PID COMM` each); empty when nothing was.
    pub(crate) async fn stop_group(
        &self,
        h: &Handle,
        grace: Duration,
    ) -> Result<Vec<String>, BackendError> {
        let link = self.link(&h.conn)?;
        let limit = grace + Duration::from_secs(10) + OP_LIMIT;
        let reply = link.run(&script::stop(&h.proc(), grace)?, limit).await?;
        let found: Vec<String> = reply
            .lines
            .iter()
            .filter_map(|l| l.strip_prefix("found "))
            .map(String::from)
            .collect();
        let leader = format!("{} ", h.pid);
        if !found.is_empty() && !found.iter().any(|f| f.starts_with(&leader)) {
            tracing::warn!(
                "host `{}`: process {} had ended, but its group still ran: {}; stopped",
                link.label,
                h.pid,
                found.join(", ")
            );
        }
        match reply.get("stopped").as_deref() {
            Some(["stuck", ..]) => Err(BackendError::new(format!(
                "host `{}`: process group {} did not end after SIGKILL (still running: {})",
                link.label,
                h.pid,
                found.join(", ")
            ))),
            Some(_) => Ok(found),
            None => Err(BackendError::new(format!(
                "host `{}`: the stop script did not answer",
                link.label
            ))),
        }
    }

    /// Waits on the host for the process to end, over one long session; falls back to
    /// asking every [`POLL`] when no session is free. A lost connection is tried once more
    /// (the master is reopened); a host that stays unreachable is an error.
    pub(crate) async fn wait_remote(&self, h: &Handle) -> Result<ProcState, BackendError> {
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
    pub(crate) async fn spawn_watched(
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
