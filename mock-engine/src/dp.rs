//! Joining engines across nodes: data-parallel ranks and multi-node tensor/pipeline groups.
//!
//! With `--data-parallel-size 4 --data-parallel-size-local 2` on the API-server node, real
//! vLLM waits for the other two ranks, started elsewhere with `--headless`, to handshake with
//! it on `--data-parallel-address`:`--data-parallel-rpc-port` (default 29550) before it serves.
//! Multi-node TP/PP (`--nnodes N --node-rank R`, ranks above 0 `--headless`) does the same on
//! `--master-addr`:`--master-port` (default 29501). The mock keeps the shape of that
//! handshake so a deployment must start the pieces with matching flags and reachable
//! addresses, and must keep them alive:
//!
//! * the **master** (the engine that serves HTTP) listens on the address above and answers
//!   `/health` with 503 until the remote ranks it lacks have all joined;
//! * a **member** (`--headless`) connects, retrying until a deadline
//!   (`VLLM_ENGINE_READY_TIMEOUT_S`, default 600 s as in vLLM), and stays connected without
//!   serving HTTP.
//!
//! External load balancing (`--data-parallel-rank R`, one API server per rank) uses the same
//! handshake: rank 0 is the master, on `--data-parallel-address`:`--data-parallel-rpc-port`
//! (default `--master-addr`, then 127.0.0.1, and 29550), and every other rank is a member that
//! also serves HTTP on its own `--host`/`--port`. Every rank answers `/health` with 503 until
//! the whole group has joined: the master tells its members when it is complete.
//!
//! Protocol, one text line per message over TCP:
//!
//! ```text
//! member → master  HELLO kind=dp size=4 ranks=2 first=2     (kind=node for --nnodes groups;
//!                                                            ranks = this member's local ranks)
//! master → member  OK joined=2 needed=2                      or  ERR <reason>, then close
//! master → members READY joined=2 needed=2                   every remote rank has joined
//! master → members WAIT joined=1 needed=2                    a rank left: incomplete again
//! either → other   BYE                                       a graceful leave (on SIGTERM/SIGINT)
//! ```
//!
//! After `OK` the connection stays open and idle but for `READY`/`WAIT`. A member that reads `BYE` exits 0; one that
//! sees the connection drop without it exits 1 (the engine core lost its group). The master
//! treats a member's `BYE` as a leave (it goes back to 503 until the ranks rejoin) and a drop
//! without `BYE` as a crash of part of the group, which kills it (exit 1), as in vLLM.
//! Connections that never send a `HELLO` (port probes) are dropped after 10 s and count for
//! nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Mutex};

use crate::log::{self, Who};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const BYE_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_EVERY: Duration = Duration::from_millis(200);
const MAX_LINE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupKind {
    /// Data-parallel ranks (`--data-parallel-*`).
    Dp,
    /// Nodes of one multi-node TP/PP engine (`--nnodes`).
    Node,
}

impl GroupKind {
    fn wire(self) -> &'static str {
        match self {
            GroupKind::Dp => "dp",
            GroupKind::Node => "node",
        }
    }

    fn what(self) -> &'static str {
        match self {
            GroupKind::Dp => "data-parallel rank(s)",
            GroupKind::Node => "node(s)",
        }
    }
}

/// The master's side: where to listen and how many remote ranks to wait for.
#[derive(Clone, Debug)]
pub(crate) struct ListenSpec {
    pub(crate) kind: GroupKind,
    pub(crate) addr: String,
    pub(crate) port: u16,
    pub(crate) needed: u32,
    pub(crate) size: u32,
}

/// A member's side: where the master is and what this member brings.
#[derive(Clone, Debug)]
pub(crate) struct JoinSpec {
    pub(crate) kind: GroupKind,
    pub(crate) addr: String,
    pub(crate) port: u16,
    pub(crate) size: u32,
    pub(crate) ranks: u32,
    pub(crate) first: u32,
    pub(crate) deadline: Duration,
}

struct Hello {
    kind: String,
    size: u32,
    ranks: u32,
    first: u32,
}

fn parse_hello(line: &str) -> Result<Hello, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("HELLO") {
        return Err("expected HELLO".into());
    }
    let mut fields = HashMap::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("bad field `{w}`"))?;
        fields.insert(k, v);
    }
    let num = |k: &str| -> Result<u32, String> {
        fields
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("HELLO lacks a number `{k}=`"))
    };
    Ok(Hello {
        kind: fields
            .get("kind")
            .map(|s| s.to_string())
            .unwrap_or_default(),
        size: num("size")?,
        ranks: num("ranks")?,
        first: num("first")?,
    })
}

/// The engine that serves HTTP and waits for remote ranks.
pub(crate) struct Master {
    spec: ListenSpec,
    joined: watch::Sender<u32>,
    links: Mutex<HashMap<u64, OwnedWriteHalf>>,
    next_link: AtomicU64,
}

impl Master {
    pub(crate) async fn bind(spec: ListenSpec) -> Result<(Arc<Master>, TcpListener), String> {
        let listener = TcpListener::bind((spec.addr.as_str(), spec.port))
            .await
            .map_err(|e| {
                format!(
                    "cannot listen for remote {} on {}:{}: {e}",
                    spec.kind.what(),
                    spec.addr,
                    spec.port
                )
            })?;
        let (joined, _) = watch::channel(0);
        let master = Arc::new(Master {
            spec,
            joined,
            links: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(0),
        });
        Ok((master, listener))
    }

    pub(crate) fn spec(&self) -> &ListenSpec {
        &self.spec
    }

    pub(crate) fn joined(&self) -> u32 {
        *self.joined.borrow()
    }

    pub(crate) fn ready(&self) -> bool {
        self.joined() >= self.spec.needed
    }

    /// Resolves once every remote rank has joined.
    pub(crate) async fn wait_ready(&self) {
        let mut rx = self.joined.subscribe();
        let needed = self.spec.needed;
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|j| *j >= needed).await;
    }

    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        fatal: mpsc::UnboundedSender<String>,
    ) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let me = self.clone();
            let fatal = fatal.clone();
            tokio::spawn(async move { me.member(stream, peer.to_string(), fatal).await });
        }
    }

    async fn member(
        self: Arc<Self>,
        stream: TcpStream,
        peer: String,
        fatal: mpsc::UnboundedSender<String>,
    ) {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let line = match tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut rd)).await {
            Ok(Ok(Some(line))) => line,
            _ => return,
        };
        let hello = match self.admit(&line) {
            Ok(h) => h,
            Err(why) => {
                log::warn(
                    Who::Api,
                    "coordinator.py:118",
                    &format!("Refused a rank from {peer}: {why}"),
                );
                let _ = wr.write_all(format!("ERR {why}\n").as_bytes()).await;
                return;
            }
        };
        let joined = self.joined();
        let needed = self.spec.needed;
        if wr
            .write_all(format!("OK joined={joined} needed={needed}\n").as_bytes())
            .await
            .is_err()
        {
            self.joined
                .send_modify(|j| *j = j.saturating_sub(hello.ranks));
            return;
        }
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        {
            // Insert, then check, under one lock: the last member in sees every link.
            let mut links = self.links.lock().await;
            links.insert(id, wr);
            if self.ready() {
                let line = format!("READY joined={} needed={needed}\n", self.joined());
                broadcast(&mut links, &line).await;
            }
        }
        let ranks = rank_range(hello.first, hello.ranks);
        log::info(
            Who::Api,
            "coordinator.py:131",
            &format!(
                "{} {ranks} joined from {peer} ({joined}/{needed} remote)",
                self.spec.kind.what()
            ),
        );

        loop {
            match read_line(&mut rd).await {
                Ok(Some(l)) if l.trim() == "BYE" => {
                    {
                        let mut links = self.links.lock().await;
                        links.remove(&id);
                        self.joined
                            .send_modify(|j| *j = j.saturating_sub(hello.ranks));
                        let line = format!("WAIT joined={} needed={needed}\n", self.joined());
                        broadcast(&mut links, &line).await;
                    }
                    log::warn(
                        Who::Api,
                        "coordinator.py:152",
                        &format!(
                            "{} {ranks} left the group (goodbye from {peer}); /health answers \
                             503 until {} remote rank(s) are back",
                            self.spec.kind.what(),
                            needed
                        ),
                    );
                    return;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => {
                    let _ = fatal.send(format!(
                        "lost the connection to {} {ranks} at {peer} without a goodbye: the \
                         engine group is broken, shutting down",
                        self.spec.kind.what()
                    ));
                    return;
                }
            }
        }
    }

    /// Checks a HELLO and, if it fits, counts its ranks in.
    fn admit(&self, line: &str) -> Result<Hello, String> {
        let hello = parse_hello(line)?;
        let kind = self.spec.kind.wire();
        if hello.kind != kind {
            return Err(format!(
                "this master waits for kind={kind} members, not kind={}",
                hello.kind
            ));
        }
        if hello.size != self.spec.size {
            return Err(format!(
                "group size mismatch: the master has size {}, the member says {}",
                self.spec.size, hello.size
            ));
        }
        if hello.ranks == 0 {
            return Err("a member must bring at least one rank".into());
        }
        let mut admitted = false;
        let needed = self.spec.needed;
        self.joined.send_if_modified(|j| {
            admitted = *j + hello.ranks <= needed;
            if admitted {
                *j += hello.ranks;
            }
            admitted
        });
        if !admitted {
            return Err(format!(
                "too many ranks: {} of {needed} remote rank(s) already joined, this member \
                 brings {}",
                self.joined(),
                hello.ranks
            ));
        }
        Ok(hello)
    }

    /// Tells every member that the master is going away on purpose.
    pub(crate) async fn goodbye(&self) {
        let mut links = self.links.lock().await;
        for wr in links.values_mut() {
            let _ = tokio::time::timeout(BYE_TIMEOUT, wr.write_all(b"BYE\n")).await;
        }
        links.clear();
    }
}

async fn broadcast(links: &mut HashMap<u64, OwnedWriteHalf>, line: &str) {
    for wr in links.values_mut() {
        let _ = tokio::time::timeout(BYE_TIMEOUT, wr.write_all(line.as_bytes())).await;
    }
}

fn rank_range(first: u32, n: u32) -> String {
    if n <= 1 {
        first.to_string()
    } else {
        format!("{first}..{}", first + n - 1)
    }
}

/// A member's connection, kept where the signal handler can say goodbye on it, and whether
/// its group is complete (the last `READY`/`WAIT` of the master).
#[derive(Default)]
pub(crate) struct Link {
    writer: Mutex<Option<OwnedWriteHalf>>,
    complete: watch::Sender<bool>,
}

impl Link {
    /// Every rank of the group has joined, as the master last said.
    pub(crate) fn complete(&self) -> bool {
        *self.complete.borrow()
    }

    /// Resolves once the group is complete.
    pub(crate) async fn wait_complete(&self) {
        let mut rx = self.complete.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|c| *c).await;
    }

    pub(crate) async fn goodbye(&self) {
        if let Some(wr) = self.writer.lock().await.as_mut() {
            let _ = tokio::time::timeout(BYE_TIMEOUT, wr.write_all(b"BYE\n")).await;
        }
    }
}

/// Runs a headless member until its group ends; returns the exit code.
pub(crate) async fn join(spec: JoinSpec, link: Arc<Link>) -> i32 {
    let who = Who::Engine(spec.first);
    let target = format!("{}:{}", spec.addr, spec.port);
    let ranks = rank_range(spec.first, spec.ranks);
    log::info(
        who,
        "core.py:702",
        &format!(
            "Headless engine for {} {ranks} connecting to the master at {target}",
            spec.kind.what()
        ),
    );
    let start = Instant::now();
    let mut last_note = Instant::now();
    let stream = loop {
        match TcpStream::connect((spec.addr.as_str(), spec.port)).await {
            Ok(s) => break s,
            Err(e) => {
                if start.elapsed() >= spec.deadline {
                    log::error(
                        who,
                        "core.py:710",
                        &format!(
                            "Could not reach the master at {target} within {:?} (last error: \
                             {e}); is the API-server engine running with a matching \
                             --data-parallel-address/--data-parallel-rpc-port (or \
                             --master-addr/--master-port)?",
                            spec.deadline
                        ),
                    );
                    return 1;
                }
                if last_note.elapsed() >= Duration::from_secs(10) {
                    log::info(
                        who,
                        "core.py:715",
                        &format!("Still waiting for the master at {target}: {e}"),
                    );
                    last_note = Instant::now();
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let hello = format!(
        "HELLO kind={} size={} ranks={} first={}\n",
        spec.kind.wire(),
        spec.size,
        spec.ranks,
        spec.first
    );
    if let Err(e) = wr.write_all(hello.as_bytes()).await {
        log::error(
            who,
            "core.py:722",
            &format!("Handshake with {target} failed: {e}"),
        );
        return 1;
    }
    let reply = match tokio::time::timeout(Duration::from_secs(30), read_line(&mut rd)).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => String::from("ERR the master closed the connection"),
        Ok(Err(e)) => format!("ERR {e}"),
        Err(_) => String::from("ERR no answer within 30s"),
    };
    if let Some(why) = reply.strip_prefix("ERR") {
        log::error(
            who,
            "core.py:730",
            &format!("The master at {target} refused this engine:{why}"),
        );
        return 1;
    }
    *link.writer.lock().await = Some(wr);
    log::info(
        who,
        "core.py:736",
        &format!("Joined the group at {target} ({})", reply.trim()),
    );
    loop {
        match read_line(&mut rd).await {
            Ok(Some(l)) if l.trim() == "BYE" => {
                log::info(
                    who,
                    "core.py:745",
                    "The master is shutting down; stopping this headless engine",
                );
                return 0;
            }
            Ok(Some(l)) if l.starts_with("READY") => {
                link.complete.send_replace(true);
                log::info(
                    who,
                    "core.py:740",
                    &format!("The group at {target} is complete ({l})"),
                );
            }
            Ok(Some(l)) if l.starts_with("WAIT") => {
                link.complete.send_replace(false);
                log::warn(
                    who,
                    "core.py:742",
                    &format!("The group at {target} lost a rank ({l}); waiting for it"),
                );
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                link.complete.send_replace(false);
                log::error(
                    who,
                    "core.py:752",
                    &format!(
                        "Lost the connection to the master at {target}: the engine group is \
                         broken, exiting"
                    ),
                );
                return 1;
            }
        }
    }
}

async fn read_line(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = tokio::io::AsyncReadExt::take(&mut *rd, MAX_LINE)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&buf).trim_end().to_string()))
}

#[cfg(test)]
mod tests;
