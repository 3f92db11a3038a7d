//! Starting a process on a host, and finding one whose start prl-flow did not write down.

use prl_flow_backend::{BackendError, ProcHandle, SpawnSpec};

use crate::handle::{check_spec, last_name, parse_spawned, wrap, Handle};
use crate::transport::Conn;
use crate::{script, SshBackend, OP_LIMIT};

impl SshBackend {
    /// Starts `spec` on its node's host: one session running the spawn script (and, for a
    /// one-shot, staying open to say how it ended).
    pub(crate) async fn spawn_on_host(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        let Some(node) = &spec.node else {
            return Err(BackendError::new(format!(
                "task `{}` has no node: the ssh backend runs tasks on hosts",
                spec.task
            )));
        };
        check_spec(spec)?;
        let conn = self.conn_for(node)?;
        let link = self.link(&conn)?;
        let name = last_name(&spec.run_dir, "run dir")?;
        let log_name = last_name(&spec.log, "log")?;
        let cwd = spec.cwd.as_ref().map(|c| c.to_string_lossy().into_owned());
        let start = |watch: bool| {
            script::spawn(&script::Start {
                task: &spec.task,
                base: &self.remote_base,
                name: &name,
                log_name: &log_name,
                argv: &spec.argv,
                env: &spec.env,
                files: &spec.files,
                cwd: cwd.as_deref(),
                service: spec.service,
                watch,
                attempt: spec.attempt,
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
        let label = link.label.clone();
        spawned(conn, spec, (&name, &log_name), &words).unwrap_or_else(|| {
            Err(BackendError::new(format!(
                "host `{label}`: cannot read the spawn answer `{}`",
                words.join(" ")
            )))
        })
    }

    /// The process the spawn of `spec`'s attempt started, from its run dir's `.proc` on the
    /// node's host, when prl-flow was killed before the spawn's answer was written down.
    /// Nothing when the host or the remote base dir is unknown (a backend made from a
    /// journal without an allocation handle that names them).
    pub(crate) async fn recover_on_host(
        &self,
        spec: &SpawnSpec,
    ) -> Result<Option<ProcHandle>, BackendError> {
        let Some(node) = &spec.node else {
            return Ok(None);
        };
        if self.remote_base.is_empty() {
            return Ok(None);
        }
        let Ok(conn) = self.conn_for(node) else {
            return Ok(None);
        };
        let link = self.link(&conn)?;
        let name = last_name(&spec.run_dir, "run dir")?;
        let log_name = last_name(&spec.log, "log")?;
        let script = script::recover(&self.remote_base, &name, spec.attempt)?;
        let reply = link.run(&script, OP_LIMIT).await?;
        let Some(words) = reply.get("spawned") else {
            return Ok(None);
        };
        let words: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        spawned(conn, spec, (&name, &log_name), &words).transpose()
    }
}

/// The handle of what the spawn of `spec` started on the host of `conn`, from the words of
/// a `spawned PID START BOOT BASE` answer (`names`: the run dir's and the log's, as the
/// scripts had them); `None` when they cannot be read.
fn spawned(
    conn: Conn,
    spec: &SpawnSpec,
    (name, log_name): (&str, &str),
    words: &[String],
) -> Option<Result<ProcHandle, BackendError>> {
    let (pid, start, boot_id, base) = parse_spawned(words)?;
    let run_dir = format!("{base}/run/{name}");
    Some(wrap(&Handle {
        conn,
        node: spec.node.clone(),
        pid,
        start,
        boot_id,
        service: spec.service,
        status_file: format!("{run_dir}/exit-status"),
        log: format!("{base}/logs/{log_name}"),
        run_dir,
    }))
}
