//! A running plugin process: the four tasks around it (writer, reader, stderr reader,
//! watcher), requests multiplexed by id with their time limits, and how its death is told.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prl_flow_backend::BackendError;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::Timeouts;
use crate::protocol::{self, Answer, Hello, RemoteError};

/// Lines of the plugin's stderr kept for error messages.
const STDERR_LINES: usize = 20;
/// Longest stderr line kept (a plugin may dump a blob).
const STDERR_LINE_MAX: usize = 500;
/// Longest answer line read; anything longer is nonsense (a log is read in chunks).
const ANSWER_MAX: u64 = 64 << 20;
/// How long a plugin gets to exit once its stdin is closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A running plugin process and its handshake.
pub(super) struct Conn {
    shared: Arc<Shared>,
    pub(super) lines: mpsc::UnboundedSender<String>,
    pub(super) hello: Hello,
    pub(super) overrides: BTreeMap<String, Duration>,
    /// Dropped with the connection: tells the watcher to end the process.
    pub(super) _end: oneshot::Sender<()>,
}

/// A request that failed.
pub(super) struct Failure {
    pub(super) error: BackendError,
    /// No answer came (the plugin died, wrote nonsense, or did not answer in time), so
    /// whatever the request asked for may or may not have happened.
    pub(super) lost: bool,
}

/// What the connection's tasks share.
struct Shared {
    name: String,
    path: PathBuf,
    state: Mutex<Inner>,
    stderr: Mutex<VecDeque<String>>,
    stderr_closed: watch::Sender<bool>,
    /// How the process ended, once it has.
    exited: watch::Sender<Option<String>>,
    /// Asks the watcher to kill the process (it wrote nonsense).
    kill: Notify,
}

struct Inner {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Pending {
    reply: oneshot::Sender<Reply>,
}

enum Reply {
    Answer(Answer),
    Dead(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data: still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn alive(&self) -> bool {
        lock(&self.state).dead.is_none()
    }

    /// The last lines of the plugin's stderr, indented for a message, and where it is.
    fn context(&self) -> String {
        let tail = lock(&self.stderr);
        let mut s = format!("\n  plugin: {}", self.path.display());
        if tail.is_empty() {
            s.push_str("\n  it wrote nothing to stderr");
        } else {
            s.push_str("\n  last lines of its stderr:");
            for l in tail.iter() {
                s.push_str("\n    ");
                s.push_str(l);
            }
        }
        s
    }

    /// The error of a request that got no answer. A reason's first line says what
    /// happened; further lines (the offending line, a help) follow the headline.
    fn death(&self, reason: &str, method: &str) -> BackendError {
        let (headline, more) = reason.split_once('\n').unwrap_or((reason, ""));
        let sep = if more.is_empty() { "" } else { "\n" };
        BackendError::new(format!(
            "plugin `{}` {headline} before answering `{method}`{sep}{more}{}",
            self.name,
            self.context()
        ))
    }

    /// Marks the connection dead and fails everything pending.
    fn die(&self, reason: String) {
        let pending: Vec<Pending> = {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                st.dead = Some(reason.clone());
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        for p in pending {
            let _ = p.reply.send(Reply::Dead(reason.clone()));
        }
    }

    /// Hands an answer to its caller. `Err` if the id was never asked for: the plugin
    /// is confused.
    fn deliver(&self, id: u64, answer: Answer) -> Result<(), String> {
        let mut st = lock(&self.state);
        match st.pending.remove(&id) {
            Some(p) => {
                drop(st);
                // The caller may have given up (a time limit, a dropped `wait`): fine.
                let _ = p.reply.send(Reply::Answer(answer));
                Ok(())
            }
            None if id >= 1 && id <= st.next_id => Ok(()), // a late answer nobody waits for
            None => Err(format!("answered request {id}, which was never sent")),
        }
    }

    async fn wait_for<T: Clone>(
        rx: &mut watch::Receiver<T>,
        ok: impl Fn(&T) -> bool,
        limit: Duration,
    ) {
        let _ = tokio::time::timeout(limit, rx.wait_for(|v| ok(v))).await;
    }

    /// Called by the reader when stdout ends or carries nonsense: learns how the process
    /// ended (briefly waiting for it and for the rest of its stderr), then fails
    /// everything pending.
    async fn ended(&self, nonsense: Option<String>) {
        if nonsense.is_some() {
            self.kill.notify_one();
        }
        let mut exited = self.exited.subscribe();
        Self::wait_for(&mut exited, Option::is_some, EXIT_GRACE).await;
        let mut closed = self.stderr_closed.subscribe();
        Self::wait_for(&mut closed, |c| *c, Duration::from_millis(500)).await;
        let how = exited.borrow().clone();
        let reason = match (nonsense, how) {
            (Some(why), _) => why,
            (None, Some(how)) => how,
            (None, None) => "closed its stdout".into(),
        };
        self.die(reason);
    }
}

/// Removes a request from the pending table when its caller stops waiting.
struct Abandon<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        lock(&self.shared.state).pending.remove(&self.id);
    }
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(name) => format!("was killed by {name}"),
                Err(_) => format!("was killed by signal {sig}"),
            },
            (None, None) => "ended".into(),
        },
        Err(e) => format!("ended, and its exit status is unknown ({e})"),
    }
}

/// Kills the plugin and whatever it started in its own process group (a helper, a
/// connection it keeps), then reaps it. The group is signalled while the plugin is not yet
/// reaped, so its id cannot name anyone else's group. (A process the plugin started in a
/// session of its own, a service, is not touched.)
async fn kill_group(group: Option<i32>, child: &mut tokio::process::Child) {
    if let Some(pgid) = group {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill().await;
}

fn start_error(name: &str, path: &Path, e: &std::io::Error) -> BackendError {
    let help = match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "\n  help: `{}` or its interpreter (the `#!` line) does not exist",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!(
                "\n  help: make it executable: `chmod +x {}`",
                path.display()
            )
        }
        _ => String::new(),
    };
    BackendError::new(format!(
        "cannot start plugin `{name}` (`{}`): {e}{help}",
        path.display()
    ))
}

impl Conn {
    /// Is the plugin process still there to answer?
    pub(super) fn alive(&self) -> bool {
        self.shared.alive()
    }

    pub(super) async fn start(
        name: &str,
        path: &Path,
        config: &Value,
        timeouts: &Timeouts,
    ) -> Result<Self, BackendError> {
        let mut child = tokio::process::Command::new(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| start_error(name, path, &e))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(BackendError::new(format!(
                "cannot start plugin `{name}`: its pipes were not set up"
            )));
        };
        let shared = Arc::new(Shared {
            name: name.to_string(),
            path: path.to_path_buf(),
            state: Mutex::new(Inner {
                next_id: 0,
                pending: HashMap::new(),
                dead: None,
            }),
            stderr: Mutex::new(VecDeque::new()),
            stderr_closed: watch::channel(false).0,
            exited: watch::channel(None).0,
            kill: Notify::new(),
        });
        tracing::debug!(plugin = name, path = %path.display(), pid = child.id(), "started plugin");

        let (lines, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut stdin = stdin;
            while let Some(mut line) = rx.recv().await {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    // The plugin is gone; the reader tells everyone why.
                    break;
                }
            }
            // Dropping stdin here closes it: the plugin's cue to exit.
        });

        let sh = shared.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut reader)
                    .take(1 << 20)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end();
                tracing::info!(plugin = %sh.name, "{line}");
                let mut kept: String = line.chars().take(STDERR_LINE_MAX).collect();
                if kept.len() < line.len() {
                    kept.push_str(" [...]");
                }
                let mut tail = lock(&sh.stderr);
                if tail.len() == STDERR_LINES {
                    tail.pop_front();
                }
                tail.push_back(kept);
            }
            sh.stderr_closed.send_replace(true);
        });

        let (end, end_rx) = oneshot::channel::<()>();
        let sh = shared.clone();
        // The plugin leads its own process group (`process_group(0)`): its pid is the group's.
        let group = child.id().and_then(|p| i32::try_from(p).ok());
        tokio::spawn(async move {
            let how = tokio::select! {
                st = child.wait() => describe_exit(st),
                _ = end_rx => {
                    // The connection was dropped and stdin closed: give it a moment.
                    match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                        Ok(st) => describe_exit(st),
                        Err(_) => {
                            kill_group(group, &mut child).await;
                            "was killed by prl-flow (it did not exit at end of input)".into()
                        }
                    }
                }
                () = sh.kill.notified() => {
                    kill_group(group, &mut child).await;
                    "was killed by prl-flow".into()
                }
            };
            tracing::debug!(plugin = %sh.name, "plugin {how}");
            sh.exited.send_replace(Some(how));
        });

        let sh = shared.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            let nonsense = loop {
                buf.clear();
                match (&mut reader)
                    .take(ANSWER_MAX)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) => break None,
                    Err(e) => break Some(format!("could not be read ({e})")),
                    Ok(_) => {}
                }
                if buf.last() != Some(&b'\n') && buf.len() as u64 >= ANSWER_MAX {
                    break Some(format!("wrote a line longer than {} MiB", ANSWER_MAX >> 20));
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim();
                if line.is_empty() {
                    continue;
                }
                let outcome =
                    protocol::parse_answer(line).and_then(|(id, answer)| sh.deliver(id, answer));
                if let Err(why) = outcome {
                    break Some(format!(
                        "wrote a line that {why}\n  the line: {}\n  help: a plugin writes only answers to stdout, one JSON object per line; logs go to stderr",
                        quote(line)
                    ));
                }
            };
            sh.ended(nonsense).await;
        });

        let mut conn = Conn {
            shared,
            lines,
            hello: Hello {
                protocol: protocol::PROTOCOL,
                name: name.to_string(),
                capabilities: Vec::new(),
                timeouts: BTreeMap::new(),
                extra: BTreeMap::new(),
            },
            overrides: BTreeMap::new(),
            _end: end,
        };
        let answer = conn
            .request(
                "hello",
                &protocol::hello_params(name, config),
                Some(timeouts.hello),
            )
            .await
            .map_err(|e| {
                BackendError::new(format!(
                    "{e}\n  help: the handshake failed; see docs/plugins.md"
                ))
            })?;
        let hello = protocol::parse_hello(&answer).map_err(|why| {
            BackendError::new(format!("plugin `{name}` {why}{}", conn.shared.context()))
        })?;
        if hello.name != name {
            tracing::debug!(plugin = name, "the plugin calls itself `{}`", hello.name);
        }
        conn.overrides = hello.timeout_overrides();
        conn.hello = hello;
        Ok(conn)
    }

    /// The time limit of one request (`None`: no limit).
    pub(super) fn limit(&self, method: &str, t: &Timeouts) -> Option<Duration> {
        if method == "wait" {
            return None;
        }
        if let Some(d) = self.overrides.get(method) {
            return Some(*d);
        }
        Some(match method {
            "hello" => t.hello,
            prl_flow_backend::ALLOCATE => t.allocate,
            "spawn" => t.spawn,
            _ => t.request,
        })
    }

    pub(super) async fn request(
        &self,
        method: &'static str,
        params: &Value,
        limit: Option<Duration>,
    ) -> Result<Value, BackendError> {
        self.send(method, params, limit).await.map_err(|f| f.error)
    }

    /// A request, telling a lost answer (the plugin died, wrote nonsense or did not answer
    /// in time) from an answer that is an error.
    pub(super) async fn send(
        &self,
        method: &'static str,
        params: &Value,
        limit: Option<Duration>,
    ) -> Result<Value, Failure> {
        let lost = |error| Failure { error, lost: true };
        let sh = &self.shared;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = lock(&sh.state);
            if let Some(reason) = &st.dead {
                return Err(lost(sh.death(reason, method)));
            }
            st.next_id += 1;
            let id = st.next_id;
            st.pending.insert(id, Pending { reply: tx });
            id
        };
        let _abandon = Abandon { shared: sh, id };
        let line =
            serde_json::to_string(&protocol::Request { id, method, params }).map_err(|e| {
                Failure {
                    error: BackendError::new(format!("cannot write a `{method}` request: {e}")),
                    lost: false,
                }
            })?;
        // If the writer is gone, the reader is about to say why: wait for that answer.
        let _ = self.lines.send(line);
        let reply = match limit {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(lost(BackendError::new(format!(
                        "plugin `{}` did not answer `{method}` within {}{}\n  help: a plugin answers every request; one that handles requests one at a time must not announce `wait` (see docs/plugins.md)",
                        sh.name,
                        fmt_secs(limit),
                        sh.context()
                    ))))
                }
            },
        };
        match reply {
            Ok(Reply::Answer(Answer::Result(v))) => Ok(v),
            Ok(Reply::Answer(Answer::Error(e))) => Err(Failure {
                error: remote_error(&sh.name, method, e),
                lost: false,
            }),
            Ok(Reply::Dead(reason)) => Err(lost(sh.death(&reason, method))),
            Err(_) => {
                let reason = lock(&sh.state)
                    .dead
                    .clone()
                    .unwrap_or_else(|| "went away".into());
                Err(lost(sh.death(&reason, method)))
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Anyone still waiting (a `wait` on another task) learns why at once.
        self.shared.die("was shut down by prl-flow".into());
    }
}

fn remote_error(name: &str, method: &str, e: RemoteError) -> BackendError {
    let mut msg = format!("plugin `{name}` could not `{method}`: {}", e.message);
    match e.code.as_str() {
        "failed" => {}
        "unknown-method" => msg.push_str(" (it does not implement this method)"),
        code => msg.push_str(&format!(" [{code}]")),
    }
    BackendError::new(msg)
}

/// A line of the plugin's, shortened for a message.
fn quote(line: &str) -> String {
    const MAX: usize = 200;
    if line.chars().count() <= MAX {
        line.to_string()
    } else {
        let head: String = line.chars().take(MAX).collect();
        format!("{head} [...]")
    }
}

fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
