//! One host's runtime side: its master connection, the session limits, and running a script
//! (a short one for its answer, or a long session read line by line).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::{create_private_dir, default_control_dir, explain_ssh_failure, Conn, SshError, MARK};
use crate::config;

/// The runtime side of one host: its master connection and session limits.
pub struct Link {
    pub conn: Conn,
    pub label: String,
    control_path: PathBuf,
    /// The socket at `control_path` is a master: this link opened it, or `ssh -O check`
    /// said so. Until then a file there is only a file.
    verified: AtomicBool,
    /// The control directory passed its checks.
    dir_checked: AtomicBool,
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
pub struct SshSession {
    pub child: Child,
    pub stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    pub _permit: OwnedSemaphorePermit,
    /// Held while this session is opening the host's master: released at its first line
    /// (the session runs, so the master is up) or at its end.
    opening: Option<OwnedMutexGuard<()>>,
}

impl SshSession {
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
            verified: AtomicBool::new(false),
            dir_checked: AtomicBool::new(false),
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
            self.verified.store(true, Ordering::SeqCst);
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
    /// a moment ago, or if the control directory is not private. A socket this link did not
    /// open counts as a master only once `ssh -O check` says so; anything else there is
    /// removed (the directory is ours alone) and a master opened in its place.
    async fn first_use(&self) -> Result<Option<OwnedMutexGuard<()>>, SshError> {
        self.check_dir()?;
        if self.verified.load(Ordering::SeqCst) && self.control_path.exists() {
            return Ok(None);
        }
        let guard = self.master.clone().lock_owned().await;
        if self.control_path.exists() {
            if self.verified.load(Ordering::SeqCst) || self.master_answers().await {
                self.verified.store(true, Ordering::SeqCst);
                return Ok(None);
            }
            tracing::debug!(
                "{}: `{}` is not a live master; removing it",
                self.label,
                self.control_path.display()
            );
            let _ = std::fs::remove_file(&self.control_path);
        }
        self.verified.store(false, Ordering::SeqCst);
        if let Ok(u) = self.unreachable.lock() {
            if let Some((when, e)) = u.as_ref() {
                if when.elapsed() < Duration::from_secs(2) {
                    return Err(e.clone());
                }
            }
        }
        Ok(Some(guard))
    }

    /// Makes (or checks, once) the directory of the control socket.
    fn check_dir(&self) -> Result<(), SshError> {
        if self.dir_checked.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(dir) = self.control_path.parent() {
            create_private_dir(dir).map_err(|message| SshError {
                host: self.label.clone(),
                message,
                help: Some(
                    "remove it, or set `control_dir` under `[backend]` to a directory only you can write".into(),
                ),
                transport: false,
            })?;
        }
        self.dir_checked.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Does a master answer on the control socket (`ssh -O check`)?
    async fn master_answers(&self) -> bool {
        let mut cmd = self.command(&["-O", "check"], None);
        matches!(
            tokio::time::timeout(Duration::from_secs(5), cmd.output()).await,
            Ok(Ok(o)) if o.status.success()
        )
    }

    /// Where this host's master socket lives.
    pub fn control_path(&self) -> &std::path::Path {
        &self.control_path
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
                            // The socket this session's ssh made.
                            self.verified.store(true, Ordering::SeqCst);
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
    pub async fn open(&self, script: &str) -> Result<Option<SshSession>, SshError> {
        let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let opening = self.first_use().await?;
        let mut child = self.start(script).await?;
        let Some(stdout) = child.stdout.take() else {
            return Err(self.io(std::io::Error::other("no stdout")));
        };
        Ok(Some(SshSession {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Settings;

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
