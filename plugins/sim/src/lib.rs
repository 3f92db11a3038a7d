//! The `sim` backend: runs a real plan through the real engine and journal, and answers
//! every allocation, spawn, probe, stop and router call with a seeded model instead of
//! machines. Time is virtual: the run's tokio clock is paused, so a sleep costs nothing and
//! the clock jumps to the next timer whenever every task waits.
//!
//! - [`config`]: the `[backend]` knobs (start-up times, failure rates, queue wait, step
//!   launch rate) and their defaults.
//! - [`model`]: the draws, keyed by seed and task, never by the order of calls.
//! - [`world`]: what runs, appended to the state dir so `status` and `down` see it.
//! - [`timeline`]: the bring-up in virtual time, printed after the run
//!   ([`Backend::report`]).

pub mod config;
pub mod model;
pub mod timeline;
pub mod world;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_backend::{
    Allocation, Backend, BackendError, ConfigError, ProcHandle, ProcState, SpawnSpec,
};
use serde::{Deserialize, Serialize};

use config::SimConfig;
use model::{Fate, Kind, Model};
use world::Call;
pub use world::World;

/// The backend's name, as recipes and handles write it.
pub const NAME: &str = "sim";

/// How long one simulated probe may wait for a loading process before it answers "not yet"
/// (so a ready timeout still fires on a process that never comes up).
const PROBE_HOLD: u64 = 30_000;

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    world: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<usize>,
}

pub struct SimBackend {
    model: Model,
    path: PathBuf,
    world: OnceLock<Mutex<World>>,
    /// The clock moves (a run), or stands where the world file's last line left it
    /// (`status`, `down`).
    live: bool,
    /// The first process and call of this run: the timeline shows this run only.
    first: OnceLock<(usize, usize)>,
}

impl SimBackend {
    /// The backend of a run, from its `[backend]` table; its world lives in the state dir.
    pub fn configure(
        config: &serde_json::Value,
        state_dir: &Path,
    ) -> Result<Self, Vec<ConfigError>> {
        let config = SimConfig::parse(config)?;
        let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        Ok(Self::new(config, World::file_in(&dir), true))
    }

    /// The backend that looks after what a run recorded: the handle names the world.
    pub fn from_handle(handle: &ProcHandle) -> Result<Self, BackendError> {
        let p: Payload = handle.open(NAME)?;
        Ok(Self::new(SimConfig::default(), p.world, false))
    }

    /// A backend for a handle that names no world: everything it is asked about is gone.
    pub fn for_handles() -> Self {
        Self::new(SimConfig::default(), PathBuf::new(), false)
    }

    fn new(config: SimConfig, path: PathBuf, live: bool) -> Self {
        Self {
            model: Model { config },
            path,
            world: OnceLock::new(),
            live,
            first: OnceLock::new(),
        }
    }

    /// The address a node gets.
    pub fn address(node: &str) -> String {
        format!("{node}.sim")
    }

    fn world(&self) -> MutexGuard<'_, World> {
        let w = self.world.get_or_init(|| {
            let w = World::open(self.path.clone());
            let _ = self.first.set((w.procs.len(), w.calls.len()));
            Mutex::new(w)
        });
        match w.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn now(&self, w: &World) -> u64 {
        if self.live {
            w.now()
        } else {
            w.base_ms()
        }
    }

    fn proc_of(&self, handle: &ProcHandle) -> Result<usize, BackendError> {
        let p: Payload = handle.open(NAME)?;
        if p.world != self.path && self.world.get().is_some() {
            return Err(BackendError::new("a handle of another simulated world"));
        }
        p.p.ok_or_else(|| BackendError::new("an allocation is no process"))
    }

    fn handle(&self, p: Option<usize>) -> Result<ProcHandle, BackendError> {
        ProcHandle::new(
            NAME,
            ProcHandle::VERSION,
            &Payload {
                world: self.path.clone(),
                p,
            },
        )
    }

    /// Where a process listens: its node's address (or `local`) and its `--port`.
    fn listens(spec: &SpawnSpec) -> Option<String> {
        let i = spec.argv.iter().position(|a| a == "--port")?;
        let port: u16 = spec.argv.get(i + 1)?.parse().ok()?;
        let host = spec.node.as_deref().map_or("local".into(), Self::address);
        Some(format!("{host}:{port}"))
    }

    /// The process a URL reaches (`http://node3.sim:8100/...`).
    fn reached(w: &World, url: &str) -> Option<usize> {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next()?;
        let (host, port) = authority.rsplit_once(':')?;
        let host = if host.ends_with(".sim") {
            host
        } else {
            "local"
        };
        w.listening.get(&format!("{host}:{port}")).copied()
    }

    /// A router checks each worker its argv lists, one after another, once it has started:
    /// a worker that is not up then fails the router's start.
    fn router_fate(&self, w: &World, spec: &SpawnSpec, launched: u64, fate: Fate) -> Fate {
        let Some(start) = fate.ready else { return fate };
        let check = self.model.config.worker_check.as_millis() as u64;
        let mut t = launched + start.as_millis() as u64;
        for url in spec.argv.iter().filter(|a| a.starts_with("http")) {
            t += check;
            if let Some(p) = Self::reached(w, url) {
                let q = &w.procs[p];
                let up = q.ready_at.is_some_and(|r| r <= t) && q.state(t) == ProcState::Running;
                if !up {
                    return Fate {
                        ready: None,
                        crash: Some(Duration::from_millis(t - launched)),
                        why: Some("a worker failed the router's start-up check"),
                    };
                }
            }
        }
        Fate {
            ready: Some(Duration::from_millis(t - launched)),
            ..fate
        }
    }

    fn call_done(&self, what: String, asked: u64, error: Option<String>) {
        let mut w = self.world();
        let done = self.now(&w);
        w.calls.push(Call {
            what,
            asked,
            done,
            error,
        });
    }
}

#[async_trait]
impl Backend for SimBackend {
    fn name(&self) -> &str {
        NAME
    }

    async fn check(&self, _nodes: &[String]) -> Result<(), Vec<ConfigError>> {
        Ok(())
    }

    async fn allocate(&self, nodes: &[String]) -> Result<Allocation, BackendError> {
        let (asked, until) = {
            let w = self.world();
            let asked = self.now(&w);
            (
                asked,
                w.instant(asked + self.model.queue_wait().as_millis() as u64),
            )
        };
        tokio::time::sleep_until(until).await;
        let at = {
            let mut w = self.world();
            let at = self.now(&w);
            w.allocate(at, nodes.len());
            w.next_slot = w.next_slot.max(at as f64);
            at
        };
        self.call_done(format!("allocate {} nodes", nodes.len()), asked, None);
        let _ = at;
        Ok(Allocation {
            hosts: nodes
                .iter()
                .map(|n| (n.clone(), Self::address(n)))
                .collect::<BTreeMap<_, _>>(),
            handle: self.handle(None)?,
        })
    }

    async fn allocation_alive(&self, _allocation: &Allocation) -> Result<bool, BackendError> {
        let w = self.world();
        Ok(w.allocated.is_some() && !w.released)
    }

    async fn release(&self, _allocation: &Allocation) -> Result<(), BackendError> {
        let mut w = self.world();
        let at = self.now(&w);
        w.release(at);
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<ProcHandle, BackendError> {
        let (p, until) = {
            let mut w = self.world();
            let asked = self.now(&w);
            // SLURM launches job steps at a limited rate across the allocation.
            let launched = if spec.node.is_some() {
                let slot = w.next_slot.max(asked as f64);
                w.next_slot = slot + 1000.0 / self.model.config.step_rate;
                slot as u64
            } else {
                asked
            };
            let dead = spec
                .node
                .as_deref()
                .is_some_and(|n| self.model.node_dead(n));
            let attempt = w.next_attempt(&spec.task);
            let mut fate = self.model.fate(&spec.task, attempt, spec.service, dead);
            if Kind::of(&spec.task) == Kind::Router && !dead {
                fate = self.router_fate(&w, spec, launched, fate);
            }
            let listens = Self::listens(spec);
            let p = w.spawn(
                &spec.task,
                spec.node.clone(),
                spec.service,
                asked,
                launched,
                &fate,
                listens,
            );
            (p, w.instant(launched))
        };
        tokio::time::sleep_until(until).await;
        self.handle(Some(p))
    }

    async fn status(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let p = self.proc_of(handle)?;
        let w = self.world();
        let now = self.now(&w);
        Ok(w.procs.get(p).map_or(ProcState::Gone, |q| q.state(now)))
    }

    async fn wait(&self, handle: &ProcHandle) -> Result<ProcState, BackendError> {
        let p = self.proc_of(handle)?;
        let (end, mut stop) = {
            let w = self.world();
            let Some(q) = w.procs.get(p) else {
                return Ok(ProcState::Gone);
            };
            (q.ends_at().map(|t| w.instant(t)), q.stop.subscribe())
        };
        let ended = async {
            match end {
                Some(t) if self.live => tokio::time::sleep_until(t).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = ended => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        self.status(handle).await
    }

    async fn stop(&self, handle: &ProcHandle, _grace: Duration) -> Result<(), BackendError> {
        self.stop_found(handle, _grace).await.map(|_| ())
    }

    async fn stop_found(
        &self,
        handle: &ProcHandle,
        _grace: Duration,
    ) -> Result<bool, BackendError> {
        let p = self.proc_of(handle)?;
        let mut w = self.world();
        let now = self.now(&w);
        Ok(w.stop(p, now))
    }

    async fn answer_probe(&self, handle: &ProcHandle) -> Option<Result<(), String>> {
        let p = match self.proc_of(handle) {
            Ok(p) => p,
            Err(e) => return Some(Err(e.message)),
        };
        let until = {
            let mut w = self.world();
            let now = self.now(&w);
            let q = w.procs.get(p)?;
            if q.state(now) != ProcState::Running {
                return Some(Err("connection refused".into()));
            }
            match q.ready_at {
                Some(r) if r <= now => {
                    w.seen_ready(p, now);
                    return Some(Ok(()));
                }
                Some(r) if self.live => w.instant(r.min(now + PROBE_HOLD)),
                _ if self.live => w.instant(now + PROBE_HOLD),
                _ => return Some(Err("not ready yet".into())),
            }
        };
        tokio::time::sleep_until(until).await;
        let mut w = self.world();
        let now = self.now(&w);
        let q = w.procs.get(p)?;
        if q.state(now) == ProcState::Running && q.ready_at.is_some_and(|r| r <= now) {
            w.seen_ready(p, now);
            Some(Ok(()))
        } else {
            Some(Err("not ready yet: still loading".into()))
        }
    }

    async fn answer_call(&self, action: &str, url: &str) -> Option<Result<(), String>> {
        let asked = {
            let w = self.world();
            self.now(&w)
        };
        let up = {
            let w = self.world();
            let now = self.now(&w);
            Self::reached(&w, url).is_some_and(|p| {
                let q = &w.procs[p];
                q.state(now) == ProcState::Running && q.ready_at.is_some_and(|r| r <= now)
            })
        };
        let result = if !up {
            Err(format!("{action} {url}: connection refused"))
        } else {
            if action == "health-probe" {
                tokio::time::sleep(self.model.config.health).await;
            }
            Ok(())
        };
        self.call_done(
            format!("{action} {url}"),
            asked,
            result.as_ref().err().cloned(),
        );
        Some(result)
    }

    async fn listener(
        &self,
        _handle: &ProcHandle,
        _address: &str,
        _port: u16,
    ) -> Result<prl_flow_backend::Listener, BackendError> {
        Ok(prl_flow_backend::Listener::Ours)
    }

    fn describe(&self, handle: &ProcHandle) -> String {
        match self.proc_of(handle) {
            Ok(p) => format!("simulated process {p}"),
            Err(_) => String::new(),
        }
    }

    fn report(&self) -> Option<String> {
        let w = self.world();
        let (procs, calls) = self.first.get().copied().unwrap_or((0, 0));
        let now = self.now(&w);
        Some(timeline::render(
            &w,
            procs,
            calls,
            now,
            self.model.config.seed,
        ))
    }

    async fn log_tail(&self, handle: &ProcHandle, _lines: usize) -> Result<String, BackendError> {
        let p = self.proc_of(handle)?;
        let w = self.world();
        let now = self.now(&w);
        let Some(q) = w.procs.get(p) else {
            return Ok(String::new());
        };
        let mut text = format!(
            "simulated `{}` (attempt {}){}: launched at {}\n",
            q.task,
            q.attempt,
            q.node
                .as_deref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default(),
            timeline::clock(q.launched)
        );
        if let Some(r) = q.ready_at.filter(|r| *r <= now) {
            text.push_str(&format!("ready at {}\n", timeline::clock(r)));
        }
        if let (Some(why), true) = (&q.why, q.crash_at.is_some_and(|c| c <= now)) {
            text.push_str(&format!(
                "{why} at {}\n",
                timeline::clock(q.crash_at.unwrap_or(0))
            ));
        } else if let Some(why) = &q.why {
            text.push_str(&format!("{why}\n"));
        }
        Ok(text)
    }

    async fn read_log(
        &self,
        handle: &ProcHandle,
        offset: u64,
    ) -> Result<(String, u64), BackendError> {
        let text = self.log_tail(handle, 0).await?;
        let rest = text.get(offset as usize..).unwrap_or_default().to_string();
        Ok((rest, text.len() as u64))
    }
}
