//! The conformance scenario: what any backend, built in or plugin, must do for prl-flow to
//! run a deployment on it.
//!
//! It plays, in order, what a bring-up and a later teardown ask of a backend:
//!
//! 1. `allocate 2 nodes`: two nodes, each with an address; the handle names the backend.
//! 2. `allocation is alive`.
//! 3. `run a one-shot`: `sh -c 'echo $TOKEN; exit 3'` on node0, with `TOKEN` in its env;
//!    waiting says it exited with status 3, and the tail of its log holds the token.
//! 4. `spawn a service`: `python3 -m http.server PORT --bind ADDR` on node1, in a run dir
//!    where a placed file holds a token; the handle names the backend.
//! 5. `probe it`: `GET http://ADDR:PORT/conformance.txt` answers 200 with the token (so the
//!    address, the run dir and the placed file are right).
//! 6. `check it`: `status` says running.
//! 7. `reattach after a restart`: the backend object is dropped (a plugin's process ends
//!    with it) and a new one made, as a later `prl-flow status` would; it still sees the
//!    service running, and the service still answers. If the backend can find a spawn whose
//!    answer was lost ([`Backend::recover`]), it finds the service by its spawn's id (the
//!    task and the attempt), and nothing for an attempt that never started.
//! 8. `read its log`: `read_log` from 0 holds the server's line for our GET, and reading on
//!    from the returned offset works.
//! 9. `stop it`: `stop` ends it; `status` no longer says running; its port refuses
//!    connections and, when it runs on this machine (the handle's payload holds a `pid` that
//!    `/proc` shows running the server), that process has ended, as the OS sees it; a second
//!    `stop` is not an error.
//! 10. `release`.
//!
//! Each step has a time limit, so a backend that hangs fails a step rather than the test
//! hanging. After a failed step the rest are skipped, but whatever was started is still
//! stopped and released. The service binds a free port picked from the OS on the node's
//! address when this machine has that address (the local backend, a plugin like it), or on
//! loopback otherwise; a remote backend needs `python3` on its nodes and a run dir on a file
//! system they share ([`Scenario::dir`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prl_flow_backend::{Backend, ProcHandle, ProcState, SpawnSpec};

mod support;

use support::{
    describe, err, free_port, gone_as_the_os_sees_it, http_get, local_process, log_tail,
    names_backend, need, token, Runner,
};

/// The names of the steps, in order.
pub const STEPS: &[&str] = &[
    "allocate 2 nodes",
    "allocation is alive",
    "run a one-shot",
    "spawn a service",
    "probe it",
    "check it",
    "reattach after a restart",
    "read its log",
    "stop it",
    "release",
];

/// How to run the scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Where run dirs and logs go (made if missing, left in place); `None`: a new temp dir,
    /// removed afterwards.
    pub dir: Option<PathBuf>,
    /// The interpreter the service runs with.
    pub python: String,
    /// Each step's time limit.
    pub step_timeout: Duration,
    /// The port the service listens on; `None`: a free one.
    pub port: Option<u16>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            dir: None,
            python: "python3".into(),
            step_timeout: Duration::from_secs(30),
            port: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Ok,
    Failed,
    /// Not run: an earlier step failed.
    Skipped,
}

/// One step's result.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: &'static str,
    pub outcome: StepOutcome,
    /// What was seen (ok) or what went wrong (failed).
    pub detail: String,
    pub elapsed: Duration,
}

impl Step {
    /// One line (more, if a failure's detail has several) for a terminal.
    pub fn line(&self) -> String {
        let word = match self.outcome {
            StepOutcome::Ok => "ok",
            StepOutcome::Failed => "FAILED",
            StepOutcome::Skipped => "skipped",
        };
        let took = if self.outcome == StepOutcome::Skipped {
            String::new()
        } else {
            format!(" ({}ms)", self.elapsed.as_millis())
        };
        let mut lines = self.detail.lines();
        let first = lines.next().unwrap_or("");
        let mut s = format!("{word:<8}{:<26}{first}{took}", self.name);
        for l in lines {
            s.push_str("\n          ");
            s.push_str(l);
        }
        s
    }
}

/// All steps' results.
#[derive(Debug, Clone, Default)]
pub struct ConformanceSummary {
    pub steps: Vec<Step>,
    /// Things that could not be cleaned up after a failure (a process may still run).
    pub leftovers: Vec<String>,
}

impl ConformanceSummary {
    pub fn ok(&self) -> bool {
        self.steps.iter().all(|s| s.outcome == StepOutcome::Ok) && self.steps.len() == STEPS.len()
    }

    pub fn line(&self) -> String {
        let passed = self
            .steps
            .iter()
            .filter(|s| s.outcome == StepOutcome::Ok)
            .count();
        let mut s = if self.ok() {
            format!("passed: all {passed} steps")
        } else {
            let failed = self.steps.iter().find(|s| s.outcome == StepOutcome::Failed);
            format!(
                "failed: {passed} of {} steps passed{}",
                STEPS.len(),
                failed
                    .map(|f| format!("; `{}` failed", f.name))
                    .unwrap_or_default()
            )
        };
        for l in &self.leftovers {
            s.push_str(&format!("\nwarning: {l}"));
        }
        s
    }
}

/// Something that makes a backend: called once at the start and again for the restart.
pub type MakeBackend<'a> = &'a (dyn Fn() -> Result<Arc<dyn Backend>, String> + Send + Sync);

/// Runs the scenario. `make` is called for the first backend and again for the restart;
/// `report` hears of each step as it ends.
pub async fn conformance(
    make: MakeBackend<'_>,
    scenario: &Scenario,
    report: &mut (dyn FnMut(&Step) + Send),
) -> ConformanceSummary {
    let mut run = Runner {
        summary: ConformanceSummary::default(),
        report,
        broken: false,
        limit: scenario.step_timeout,
    };
    let token = token();
    let (dir, temporary) = match &scenario.dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(&token), true),
    };
    let nodes = vec!["node0".to_string(), "node1".to_string()];
    // Every process started, so that a failure half-way still stops them all.
    let started: std::sync::Mutex<Vec<ProcHandle>> = std::sync::Mutex::new(Vec::new());
    let remember = |h: &ProcHandle| {
        if let Ok(mut s) = started.lock() {
            s.push(h.clone());
        }
    };
    let spec = |task: &str, node: &str, argv: Vec<String>, service: bool| SpawnSpec {
        task: task.into(),
        node: Some(node.into()),
        argv,
        env: [("PRL_FLOW_CONFORMANCE".to_string(), token.clone())].into(),
        files: Default::default(),
        run_dir: dir.join("run").join(task),
        cwd: None,
        log: dir.join("logs").join(format!("{task}.log")),
        service,
        attempt: 0,
    };

    let first = run
        .step(STEPS[0], async {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot make `{}`: {e}", dir.display()))?;
            let b = make()?;
            let a = b.allocate(&nodes).await.map_err(err)?;
            let mut shown = Vec::new();
            for n in &nodes {
                match a.hosts.get(n) {
                    Some(h) if !h.trim().is_empty() => shown.push(format!("{n} → {h}")),
                    _ => return Err(format!("no address for `{n}` in {:?}", a.hosts)),
                }
            }
            names_backend(&a.handle, b.name())?;
            Ok(((b, a), shown.join(", ")))
        })
        .await;
    let (mut backend, allocation) = match first {
        Some((b, a)) => (Some(b), Some(a)),
        None => (None, None),
    };

    let ready = need(&backend, &allocation);
    run.step(STEPS[1], async {
        let (b, a) = ready?;
        match b.allocation_alive(&a).await.map_err(err)? {
            true => Ok(((), "yes".to_string())),
            false => Err("`allocation_alive` says no right after `allocate`".to_string()),
        }
    })
    .await;

    let ready = need(&backend, &allocation);
    run.step(STEPS[2], async {
        let (b, _) = ready?;
        let argv = ["sh", "-c", "echo \"$PRL_FLOW_CONFORMANCE\"; exit 3"]
            .map(String::from)
            .to_vec();
        let h = b
            .spawn(&spec("one-shot", "node0", argv, false))
            .await
            .map_err(err)?;
        remember(&h);
        names_backend(&h, b.name())?;
        match b.wait(&h).await.map_err(err)? {
            ProcState::Exited(Some(3)) => {}
            other => {
                return Err(format!(
                    "`sh -c '...; exit 3'` should exit with status 3, and `wait` says: {}; {}",
                    describe(&other),
                    log_tail(b.as_ref(), &h).await
                ))
            }
        }
        let tail = b.log_tail(&h, 5).await.map_err(err)?;
        if !tail.contains(&token) {
            return Err(format!(
                "its log does not hold what it printed (the env var `PRL_FLOW_CONFORMANCE`); {}",
                log_tail(b.as_ref(), &h).await
            ));
        }
        Ok((
            (),
            "exited with status 3; its env and its log are right".to_string(),
        ))
    })
    .await;

    let ready = need(&backend, &allocation);
    let service = run
        .step(STEPS[3], async {
            let (b, a) = ready?;
            let host = a.hosts.get("node1").cloned().unwrap_or_default();
            let (host, port) = match scenario.port {
                Some(p) => (host, p),
                None => free_port(&host)?,
            };
            let argv = vec![
                scenario.python.clone(),
                "-u".into(),
                "-m".into(),
                "http.server".into(),
                port.to_string(),
                "--bind".into(),
                host.clone(),
            ];
            let mut s = spec("service", "node1", argv, true);
            s.files.insert("conformance.txt".into(), token.clone());
            // The spawn's id, as a run gives it: the attempt's start time.
            s.attempt = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_millis() as u64);
            let h = b.spawn(&s).await.map_err(err)?;
            remember(&h);
            names_backend(&h, b.name())?;
            let shown = format!(
                "{} -m http.server {port} --bind {host} on node1",
                scenario.python
            );
            Ok(((h, host, port, s), shown))
        })
        .await;

    let ready = need(&backend, &allocation);
    let probe = |b: Arc<dyn Backend>, h: ProcHandle, host: String, port: u16| {
        let token = token.clone();
        async move {
            let url = format!("http://{host}:{port}/conformance.txt");
            loop {
                let last = match http_get(&host, port, "/conformance.txt").await {
                    Ok((200, body)) if body.contains(&token) => {
                        return Ok(((), format!("GET {url} answered the placed file")))
                    }
                    Ok((200, body)) => format!("GET {url} answered 200 with {body:?}"),
                    Ok((code, _)) => format!("GET {url} answered {code}"),
                    Err(e) => e,
                };
                match b.status(&h).await {
                    Ok(ProcState::Running) => {}
                    Ok(other) => {
                        return Err(format!(
                            "the service is not running ({}); last probe: {last}; {}",
                            describe(&other),
                            log_tail(b.as_ref(), &h).await
                        ))
                    }
                    Err(e) => return Err(format!("status: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let svc = service.clone();
    run.step(STEPS[4], async {
        let (b, _) = ready?;
        let (h, host, port, _) = svc.ok_or("no service")?;
        probe(b, h, host, port).await
    })
    .await;

    let ready = need(&backend, &allocation);
    let svc = service.clone();
    run.step(STEPS[5], async {
        let (b, _) = ready?;
        let (h, _, _, _) = svc.ok_or("no service")?;
        match b.status(&h).await.map_err(err)? {
            ProcState::Running => Ok(((), "running".to_string())),
            other => Err(format!(
                "`status` says {}; {}",
                describe(&other),
                log_tail(b.as_ref(), &h).await
            )),
        }
    })
    .await;

    if !run.broken {
        // A later prl-flow: nothing of this backend object survives, a plugin's process
        // included.
        drop(backend.take());
    }
    let svc = service.clone();
    let fresh = run
        .step(STEPS[6], async {
            let (h, host, port, s) = svc.ok_or("no service")?;
            let b = make()?;
            match b.status(&h).await.map_err(err)? {
                ProcState::Running => {}
                other => {
                    return Err(format!(
                        "a new backend sees the recorded handle as {}, not running; {}",
                        describe(&other),
                        log_tail(b.as_ref(), &h).await
                    ))
                }
            }
            probe(b.clone(), h.clone(), host, port).await?;
            let found = recovers(b.as_ref(), &h, &s).await?;
            Ok((
                b,
                format!("a new backend sees it running, and it still answers; {found}"),
            ))
        })
        .await;
    if fresh.is_some() {
        backend = fresh;
    }

    let ready = need(&backend, &allocation);
    let svc = service.clone();
    run.step(STEPS[7], async {
        let (b, _) = ready?;
        let (h, _, _, _) = svc.ok_or("no service")?;
        loop {
            let (text, offset) = b.read_log(&h, 0).await.map_err(err)?;
            if text.contains("GET /conformance.txt") {
                if offset < text.len() as u64 {
                    return Err(format!(
                        "`read_log` from 0 returned {} bytes and the offset {offset}",
                        text.len()
                    ));
                }
                let (_, next) = b.read_log(&h, offset).await.map_err(err)?;
                if next < offset {
                    return Err(format!("reading on from {offset} went back to {next}"));
                }
                return Ok(((), "it holds the server's line for our GET".to_string()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let ready = need(&backend, &allocation);
    let svc = service.clone();
    let stopped = run
        .step(STEPS[8], async {
            let (b, _) = ready?;
            let (h, host, port, _) = svc.ok_or("no service")?;
            // What the OS can tell, not only the backend's word: the process, when it
            // runs on this machine, and the port it answered on.
            let process = local_process(&h, port);
            b.stop(&h, Duration::from_secs(5)).await.map_err(err)?;
            let state = b.status(&h).await.map_err(err)?;
            if state == ProcState::Running {
                return Err("`status` still says running after `stop`".into());
            }
            let gone = gone_as_the_os_sees_it(&host, port, process).await?;
            b.stop(&h, Duration::from_secs(5))
                .await
                .map_err(|e| format!("stopping it a second time: {e}"))?;
            Ok((
                (),
                format!(
                    "now {}, {gone}; stopping it again is fine",
                    describe(&state)
                ),
            ))
        })
        .await
        .is_some();

    let ready = need(&backend, &allocation);
    let released = run
        .step(STEPS[9], async {
            let (b, a) = ready?;
            b.release(&a).await.map_err(err)?;
            Ok(((), "released".to_string()))
        })
        .await
        .is_some();

    if run.broken {
        // Stop what was started and give back the nodes, as a teardown would.
        let b = match backend {
            Some(b) => Some(b),
            None => make().ok(),
        };
        let handles = started.lock().map(|s| s.clone()).unwrap_or_default();
        let limit = scenario.step_timeout;
        match &b {
            Some(b) => {
                if !stopped {
                    for h in &handles {
                        let r =
                            tokio::time::timeout(limit, b.stop(h, Duration::from_secs(2))).await;
                        if !matches!(r, Ok(Ok(()))) {
                            run.summary
                                .leftovers
                                .push(format!("could not stop a process it started: {h}"));
                        }
                    }
                }
                if let (false, Some(a)) = (released, &allocation) {
                    let r = tokio::time::timeout(limit, b.release(a)).await;
                    if !matches!(r, Ok(Ok(()))) {
                        run.summary
                            .leftovers
                            .push(format!("could not release the allocation: {}", a.handle));
                    }
                }
            }
            None if !handles.is_empty() => run
                .summary
                .leftovers
                .push("no backend left to stop what the test started".into()),
            None => {}
        }
    }
    if temporary && run.summary.leftovers.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else if !run.summary.ok() {
        run.summary
            .leftovers
            .push(format!("logs and run dirs are kept in `{}`", dir.display()));
    }
    run.summary
}

/// A spawn whose answer was lost, as a later prl-flow asks about it: the backend finds the
/// service `h` by the spec's id, and nothing for another attempt. A backend that cannot
/// recover passes, and is told so.
async fn recovers(b: &dyn Backend, h: &ProcHandle, s: &SpawnSpec) -> Result<String, String> {
    let Some(found) = b.recover(s).await.map_err(err)? else {
        return Ok("it cannot find a spawn whose answer was lost (no `recover`)".into());
    };
    names_backend(&found, b.name())?;
    match b.status(&found).await.map_err(err)? {
        ProcState::Running => {}
        other => {
            return Err(format!(
                "`recover` of the service's spawn gave a handle that is {}, not running: {found}",
                describe(&other)
            ))
        }
    }
    if b.describe(&found) != b.describe(h) {
        return Err(format!(
            "`recover` of the service's spawn found `{}`, and the service is `{}`",
            b.describe(&found),
            b.describe(h)
        ));
    }
    let other = SpawnSpec {
        attempt: s.attempt + 1,
        ..s.clone()
    };
    if let Some(stranger) = b.recover(&other).await.map_err(err)? {
        return Err(format!(
            "`recover` of an attempt that never started found {stranger}"
        ));
    }
    Ok("`recover` finds it by its spawn's id".into())
}
