//! The client side of the protocol: a [`Backend`] whose every call is a request to a plugin
//! process.
//!
//! # Theory of operation
//!
//! One plugin process serves one prl-flow process. It is started lazily, on the first call,
//! and kept for the run; the first request is the `hello` handshake. Four tasks surround
//! the process:
//!
//! - a **writer** owns its stdin and writes request lines from a channel, so callers never
//!   contend for the pipe;
//! - a **reader** owns its stdout and hands each answer to the caller waiting for that id
//!   (a oneshot channel in the `pending` table): requests are multiplexed, and a long `wait`
//!   does not hold up a `status`;
//! - a **stderr reader** keeps the last lines the plugin wrote there (quoted in errors) and
//!   passes each to `tracing`;
//! - a **watcher** owns the child and learns how it ended; dropping the connection closes
//!   stdin (a plugin exits at end of input), then kills it if it lingers.
//!
//! Nothing here waits without a bound except `wait` itself (a process may rightly run for
//! days; callers race it against other things). Every other request has a time limit. When
//! the plugin dies, or writes a line that is not an answer, the reader marks the connection
//! dead and fails every pending request with a message naming the plugin, saying how it
//! ended and quoting its stderr; a line of nonsense also kills the process, since nothing
//! it says after that can be trusted. The next call starts a fresh process.
//!
//! The plugin runs in its own process group, so a Ctrl-C at the terminal reaches prl-flow
//! alone, which still needs the plugin to stop what it started.
//!
//! Handles are the plugin's JSON objects with one key that belongs to prl-flow: `backend`,
//! set to the name the plugin was found by, so that `status` or `down` in a later process
//! find it again. A plugin without the log methods gets a `log` key too (the spawn spec's
//! log path, if it set none) that prl-flow reads itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    last_lines, Allocation, Backend, BackendError, ProcHandle, ProcState, SpawnSpec,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::protocol::{self, Answer, Hello, LogChunk, RemoteError};

/// Lines of the plugin's stderr kept for error messages.
const STDERR_LINES: usize = 20;
/// Longest stderr line kept (a plugin may dump a blob).
const STDERR_LINE_MAX: usize = 500;
/// Longest answer line read; anything longer is nonsense (a log is read in chunks).
const ANSWER_MAX: u64 = 64 << 20;
/// How often `wait` asks for `status` when the plugin cannot `wait` itself.
const POLL: Duration = Duration::from_millis(200);
/// How long a plugin gets to exit once its stdin is closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Request time limits. `wait` has none; `stop` gets its grace period on top of
/// `request`. A plugin may replace any of them in its `hello` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub hello: Duration,
    pub request: Duration,
    /// A scheduler may queue an allocation for a while.
    pub allocate: Duration,
    /// Starting a process may mean pulling a container image.
    pub spawn: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            hello: Duration::from_secs(10),
            request: Duration::from_secs(30),
            allocate: Duration::from_secs(600),
            spawn: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    /// The same limit for everything (tests of broken plugins).
    pub fn all(limit: Duration) -> Self {
        Self {
            hello: limit,
            request: limit,
            allocate: limit,
            spawn: limit,
        }
    }
}

/// A backend served by a plugin executable. Cheap to create: the process starts on the
/// first call.
pub struct PluginBackend {
    name: String,
    path: PathBuf,
    config: Value,
    timeouts: Timeouts,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl PluginBackend {
    /// The plugin at `path`, known to prl-flow as `name` (the name handles carry).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            config: Value::Null,
            timeouts: Timeouts::default(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The recipe's `[backend]` table (with the site's defaults), sent with `hello`.
    pub fn with_config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the plugin if it is not running, and says what it said of itself.
    pub async fn handshake(&self) -> Result<Hello, BackendError> {
        Ok(self.conn().await?.hello.clone())
    }

    /// Ends the plugin process (it gets end of input, then is killed if it lingers). The
    /// next call starts a new one.
    pub async fn shutdown(&self) {
        self.conn.lock().await.take();
    }

    async fn conn(&self) -> Result<Arc<Conn>, BackendError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.shared.alive() {
                return Ok(c.clone());
            }
            tracing::warn!(plugin = %self.name, "the plugin process ended; starting it again");
        }
        // Drop a dead connection before starting its successor.
        *slot = None;
        let c = Arc::new(Conn::start(&self.name, &self.path, &self.config, &self.timeouts).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn call(&self, method: &'static str, params: Value) -> Result<Value, BackendError> {
        let conn = self.conn().await?;
        let limit = conn.limit(method, &self.timeouts);
        conn.request(method, &params, limit).await
    }

    /// Sets the keys of a handle that belong to prl-flow.
    fn tag(&self, handle: Value, log: Option<&Path>) -> Result<Value, BackendError> {
        let mut obj = match handle {
            Value::Object(o) => o,
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(BackendError::new(format!(
                    "plugin `{}` returned the handle {other}; a handle must be a JSON object",
                    self.name
                )))
            }
        };
        obj.insert("backend".into(), Value::String(self.name.clone()));
        // The plugin's own path, so that `status` and `down` find it from the journal alone,
        // without the site file or recipe that named it.
        if let Some(p) = self.path.to_str() {
            obj.insert("plugin".into(), Value::from(p));
        }
        // (A log path that is not UTF-8 cannot go into JSON; the log methods then say so.)
        if let Some(log) = log.and_then(Path::to_str) {
            obj.entry("log").or_insert_with(|| Value::from(log));
        }
        Ok(Value::Object(obj))
    }

    fn bad_answer(&self, method: &str, why: impl std::fmt::Display) -> BackendError {
        BackendError::new(format!(
            "plugin `{}` answered `{method}` with {why}",
            self.name
        ))
    }

    async fn can(&self, method: &str) -> Result<bool, BackendError> {
        Ok(self.conn().await?.hello.can(method))
    }

    /// The log file a handle names, for plugins that do not serve logs themselves.
    fn log_of(&self, handle: &ProcHandle) -> Result<PathBuf, BackendError> {
        handle
            .get("log")
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| {
                BackendError::new(format!(
                    "plugin `{}` does not serve logs (`log_tail`, `read_log`) and its handle names no `log` file",
                    self.name
                ))
            })
    }
}

#[async_trait]
impl Backend for PluginBackend {
    fn name(&self) -> &str {
        &self.name
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        let v = self.call("allocate", json!({ "nodes": nodes })).await?;
        let mut a: Allocation = serde_json::from_value(v.clone()).map_err(|e| {
            self.bad_answer("allocate", format_args!("{v}, not an allocation ({e})"))
        })?;
        if let Some(n) = nodes.iter().find(|n| match a.hosts.get(*n) {
            Some(h) => h.trim().is_empty(),
            None => true,
        }) {
            return Err(self.bad_answer("allocate", format_args!("no address for node `{n}`: {v}")));
        }
        a.handle = self.tag(a.handle, None)?;
        Ok(a)
    }

    async fn allocation_alive(&self, allocation: &Allocation) -> Result<bool, BackendError> {
        if !self.can("allocation_alive").await? {
            return Ok(true);
        }
        let v = self
            .call("allocation_alive", json!({ "allocation": allocation }))
            .await?;
        v.as_bool().ok_or_else(|| {
            self.bad_answer("allocation_alive", format_args!("{v}, not true or false"))
        })
    }

    async fn release(&self, allocation: &Allocation) -> Result<(), BackendError> {
        self.call("release", json!({ "allocation": allocation }))
            .await
            .map(drop)
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        // Not `json!` with the spec itself: that panics on a path that is not UTF-8.
        let spec_json = serde_json::to_value(spec).map_err(|e| {
            BackendError::new(format!(
                "task `{}` cannot be sent to plugin `{}`: {e}",
                spec.task, self.name
            ))
        })?;
        let conn = self.conn().await?;
        let params = json!({ "spec": spec_json });
        let v = conn
            .request("spawn", &params, conn.limit("spawn", &self.timeouts))
            .await?;
        let serves_logs = conn.hello.can("log_tail") && conn.hello.can("read_log");
        self.tag(v, (!serves_logs).then_some(spec.log.as_path()))
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let v = self.call("status", json!({ "handle": handle })).await?;
        protocol::parse_state(&v).map_err(|e| self.bad_answer("status", e))
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        if self.can("wait").await? {
            let v = self.call("wait", json!({ "handle": handle })).await?;
            return protocol::parse_state(&v).map_err(|e| self.bad_answer("wait", e));
        }
        loop {
            match self.status(handle).await? {
                ProcState::Running => tokio::time::sleep(POLL).await,
                other => return Ok(other),
            }
        }
    }

    async fn stop(&self, handle: &ProcHandle, grace: Duration) -> Result<(), BackendError> {
        let conn = self.conn().await?;
        let params = json!({ "handle": handle, "grace_ms": grace.as_millis() as u64 });
        let limit = conn.limit("stop", &self.timeouts).map(|l| l + grace);
        conn.request("stop", &params, limit).await.map(drop)
    }

    async fn log_tail(&self, handle: &ProcHandle, lines: usize) -> Result<String, BackendError> {
        if !self.can("log_tail").await? {
            let (text, _) = read_file_from(&self.log_of(handle)?, 0, Some(64 * 1024))?;
            return Ok(last_lines(&text, lines));
        }
        let v = self
            .call("log_tail", json!({ "handle": handle, "lines": lines }))
            .await?;
        match v {
            Value::String(s) => Ok(s),
            other => Err(self.bad_answer("log_tail", format_args!("{other}, not a string"))),
        }
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        if !self.can("read_log").await? {
            return read_file_from(&self.log_of(handle)?, offset, None);
        }
        let v = self
            .call("read_log", json!({ "handle": handle, "offset": offset }))
            .await?;
        let chunk: LogChunk = serde_json::from_value(v.clone()).map_err(|e| {
            self.bad_answer(
                "read_log",
                format_args!("{v}, not {{\"text\", \"offset\"}} ({e})"),
            )
        })?;
        Ok((chunk.text, chunk.offset))
    }
}

/// Reads a file from `offset` (at most the last `max` bytes): (text, offset after it). A
/// missing file is an empty log; an offset past the end (a truncated file) starts over.
fn read_file_from(
    path: &Path,
    offset: u64,
    max: Option<u64>,
) -> Result<(String, u64), BackendError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), offset)),
        Err(e) => {
            return Err(BackendError::new(format!(
                "cannot read `{}`: {e}",
                path.display()
            )))
        }
    };
    let len = f.metadata()?.len();
    let mut from = if offset > len { 0 } else { offset };
    if let Some(max) = max {
        from = from.max(len.saturating_sub(max));
    }
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let end = from + buf.len() as u64;
    Ok((String::from_utf8_lossy(&buf).into_owned(), end))
}

/// A running plugin process and its handshake.
struct Conn {
    shared: Arc<Shared>,
    lines: mpsc::UnboundedSender<String>,
    hello: Hello,
    overrides: BTreeMap<String, Duration>,
    /// Dropped with the connection: tells the watcher to end the process.
    _end: oneshot::Sender<()>,
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
    fn alive(&self) -> bool {
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
    async fn start(
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
        tokio::spawn(async move {
            let how = tokio::select! {
                st = child.wait() => describe_exit(st),
                _ = end_rx => {
                    // The connection was dropped and stdin closed: give it a moment.
                    match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                        Ok(st) => describe_exit(st),
                        Err(_) => {
                            let _ = child.kill().await;
                            "was killed by prl-flow (it did not exit at end of input)".into()
                        }
                    }
                }
                () = sh.kill.notified() => {
                    let _ = child.kill().await;
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
    fn limit(&self, method: &str, t: &Timeouts) -> Option<Duration> {
        if method == "wait" {
            return None;
        }
        if let Some(d) = self.overrides.get(method) {
            return Some(*d);
        }
        Some(match method {
            "hello" => t.hello,
            "allocate" => t.allocate,
            "spawn" => t.spawn,
            _ => t.request,
        })
    }

    async fn request(
        &self,
        method: &'static str,
        params: &Value,
        limit: Option<Duration>,
    ) -> Result<Value, BackendError> {
        let sh = &self.shared;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = lock(&sh.state);
            if let Some(reason) = &st.dead {
                return Err(sh.death(reason, method));
            }
            st.next_id += 1;
            let id = st.next_id;
            st.pending.insert(id, Pending { reply: tx });
            id
        };
        let _abandon = Abandon { shared: sh, id };
        let line = serde_json::to_string(&protocol::Request { id, method, params })
            .map_err(|e| BackendError::new(format!("cannot write a `{method}` request: {e}")))?;
        // If the writer is gone, the reader is about to say why: wait for that answer.
        let _ = self.lines.send(line);
        let reply = match limit {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(BackendError::new(format!(
                        "plugin `{}` did not answer `{method}` within {}{}\n  help: a plugin answers every request; one that handles requests one at a time must not announce `wait` (see docs/plugins.md)",
                        sh.name,
                        fmt_secs(limit),
                        sh.context()
                    )))
                }
            },
        };
        match reply {
            Ok(Reply::Answer(Answer::Result(v))) => Ok(v),
            Ok(Reply::Answer(Answer::Error(e))) => Err(remote_error(&sh.name, method, e)),
            Ok(Reply::Dead(reason)) => Err(sh.death(&reason, method)),
            Err(_) => {
                let reason = lock(&sh.state)
                    .dead
                    .clone()
                    .unwrap_or_else(|| "went away".into());
                Err(sh.death(&reason, method))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[tokio::test]
    async fn a_plugin_that_dies_at_hello_is_named_with_its_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = script(
            dir.path(),
            "p",
            "#!/bin/sh\necho 'no scheduler here' >&2\nexit 7\n",
        );
        let b =
            PluginBackend::new("dies", &p).with_timeouts(Timeouts::all(Duration::from_secs(20)));
        let e = match b.status(&json!({})).await {
            Ok(s) => panic!("status of a dead plugin: {s:?}"),
            Err(e) => e.message,
        };
        assert!(
            e.contains("plugin `dies` exited with status 7 before answering `hello`"),
            "{e}"
        );
        assert!(e.contains("no scheduler here"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_executable_says_where() {
        let b = PluginBackend::new("nowhere", "/nonexistent/prl-flow-backend-nowhere");
        let e = match b.handshake().await {
            Ok(h) => panic!("handshake with nothing: {h:?}"),
            Err(e) => e.message,
        };
        assert!(e.contains("cannot start plugin `nowhere`"), "{e}");
    }

    #[test]
    fn handles_get_the_backend_name() {
        let b = PluginBackend::new("site", "/x");
        let h = b
            .tag(json!({"pid": 1, "backend": "other"}), Some(Path::new("/l")))
            .expect("tag");
        assert_eq!(
            h,
            json!({"pid": 1, "backend": "site", "plugin": "/x", "log": "/l"})
        );
        assert_eq!(
            b.tag(Value::Null, None).expect("tag"),
            json!({"backend": "site", "plugin": "/x"})
        );
        assert!(b.tag(json!(3), None).is_err());
    }
}
