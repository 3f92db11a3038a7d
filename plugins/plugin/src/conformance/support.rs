//! The scenario's machinery: running a step under its time limit, and the small checks and
//! helpers the steps share.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prl_flow_backend::{Allocation, Backend, ProcHandle, ProcState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ConformanceSummary, Step, StepOutcome};

pub(super) struct Runner<'a> {
    pub(super) summary: ConformanceSummary,
    pub(super) report: &'a mut (dyn FnMut(&Step) + Send),
    pub(super) broken: bool,
    pub(super) limit: Duration,
}

impl Runner<'_> {
    /// Runs one step unless an earlier one failed; its value on success.
    pub(super) async fn step<T>(
        &mut self,
        name: &'static str,
        f: impl Future<Output = Result<(T, String), String>>,
    ) -> Option<T> {
        let began = Instant::now();
        let (outcome, detail, value) = if self.broken {
            (
                StepOutcome::Skipped,
                "an earlier step failed".to_string(),
                None,
            )
        } else {
            match tokio::time::timeout(self.limit, f).await {
                Ok(Ok((v, detail))) => (StepOutcome::Ok, detail, Some(v)),
                Ok(Err(why)) => (StepOutcome::Failed, why, None),
                Err(_) => (
                    StepOutcome::Failed,
                    format!(
                        "no result within {}s: the backend hangs",
                        self.limit.as_secs()
                    ),
                    None,
                ),
            }
        };
        if outcome == StepOutcome::Failed {
            self.broken = true;
        }
        let step = Step {
            name,
            outcome,
            detail,
            elapsed: began.elapsed(),
        };
        (self.report)(&step);
        self.summary.steps.push(step);
        value
    }
}

pub(super) fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The node's address if this machine has it (a port can be picked there), else loopback.
pub(super) fn free_port(addr: &str) -> Result<(String, u16), String> {
    if let Ok(l) = std::net::TcpListener::bind((addr, 0)) {
        return l
            .local_addr()
            .map(|a| (addr.to_string(), a.port()))
            .map_err(err);
    }
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    l.local_addr()
        .map(|a| (addr.to_string(), a.port()))
        .map_err(err)
}

/// A bare-bones `GET`: (status code, body).
pub(super) async fn http_get(addr: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let limit = Duration::from_secs(2);
    let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect((addr, port)))
        .await
        .map_err(|_| format!("connecting to {addr}:{port} timed out"))?
        .map_err(|e| format!("{addr}:{port}: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(err)?;
    let mut buf = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut buf))
        .await
        .map_err(|_| format!("{addr}:{port} accepted but did not answer"))?
        .map_err(err)?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {}",
                text.chars().take(80).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

pub(super) fn describe(state: &ProcState) -> String {
    match state {
        ProcState::Running => "running".into(),
        ProcState::Exited(Some(c)) => format!("exited with status {c}"),
        ProcState::Exited(None) => "killed by a signal".into(),
        ProcState::Gone => "gone".into(),
    }
}

/// A token unique enough to tell this run's output (and temp dir) from another's, in this
/// process or another.
pub(super) fn token() -> String {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("prl-flow-conformance-{}-{run}-{nanos}", std::process::id())
}

pub(super) async fn log_tail(b: &dyn Backend, h: &ProcHandle) -> String {
    match b.log_tail(h, 10).await {
        Ok(t) if t.trim().is_empty() => "its log is empty".into(),
        Ok(t) => format!(
            "its log ends:\n  {}",
            t.lines().collect::<Vec<_>>().join("\n  ")
        ),
        Err(e) => format!("its log could not be read: {e}"),
    }
}

pub(super) fn names_backend(h: &ProcHandle, name: &str) -> Result<(), String> {
    match h.backend.as_str() {
        b if b == name => Ok(()),
        "" => Err(format!(
            "the handle names no backend, so a later prl-flow cannot find this backend: {h}"
        )),
        b => Err(format!("the handle names backend `{b}`, not `{name}`: {h}")),
    }
}

/// The backend and allocation of step 1, for a later step (which is skipped anyway when
/// step 1 failed).
pub(super) fn need(
    backend: &Option<Arc<dyn Backend>>,
    allocation: &Option<Allocation>,
) -> Result<(Arc<dyn Backend>, Allocation), String> {
    match (backend, allocation) {
        (Some(b), Some(a)) => Ok((b.clone(), a.clone())),
        _ => Err("no backend".into()),
    }
}

/// The service's process as this machine's `/proc` shows it: the pid in the handle's payload,
/// when there is one and it runs the service here (its command line names `http.server` and
/// the port), with its start time. `None` when the process runs elsewhere (a remote node) or
/// the handle holds no pid; then only the port is checked.
pub(super) fn local_process(h: &ProcHandle, port: u16) -> Option<(i32, u64)> {
    let pid = i32::try_from(h.payload.get("pid")?.as_i64()?).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let ours = args.iter().any(|a| a == "http.server") && args.contains(&port.to_string());
    let (_, start) = proc_stat(pid)?;
    ours.then_some((pid, start))
}

/// (state letter, start time) of `pid` from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.get(text.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether the process `(pid, start)` has ended as the OS sees it: `kill(pid, 0)` fails
/// with ESRCH, or only a zombie is left for its parent to collect, or the pid is another
/// process now.
fn ended((pid, start): (i32, u64)) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Err(nix::errno::Errno::ESRCH) => true,
        _ => !matches!(proc_stat(pid), Some((s, st)) if s != 'Z' && s != 'X' && st == start),
    }
}

/// Whether `addr:port` accepts a connection now (within 2 s).
async fn accepts(addr: &str, port: u16) -> bool {
    let limit = Duration::from_secs(2);
    matches!(
        tokio::time::timeout(limit, tokio::net::TcpStream::connect((addr, port))).await,
        Ok(Ok(_))
    )
}

/// After a `stop`: the service is gone as the OS sees it, not only by the backend's
/// `status`. Its port on `addr` refuses connections (it answered from this machine before),
/// and, when its process runs here (`process`, from [`local_process`]), that process has
/// ended. Waits up to 5 s for both (a process may take a moment to close its socket or to
/// be reaped); says what was checked, or what is still there.
pub(super) async fn gone_as_the_os_sees_it(
    addr: &str,
    port: u16,
    process: Option<(i32, u64)>,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listening = accepts(addr, port).await;
        let running = process.filter(|p| !ended(*p));
        if !listening && running.is_none() {
            return Ok(match process {
                Some((pid, _)) => format!("{addr}:{port} refuses connections, pid {pid} ended"),
                None => format!("{addr}:{port} refuses connections"),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match running {
                Some((pid, _)) => format!("after `stop`, pid {pid} still runs"),
                None => format!("after `stop`, {addr}:{port} still accepts connections"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
