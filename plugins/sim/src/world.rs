//! The simulated world: every process the sim backend started, with its fate, on a virtual
//! clock. A process is running until its fate ends it (a crash, a one-shot's exit) or it is
//! stopped. What happens is appended to `sim/world.jsonl` in the state dir, one JSON object
//! a line, so that a later prl-flow (`status`, `down`, `run --resume`) sees the world as
//! the run left it: its clock stands at the last time written.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use prl_flow_backend::ProcState;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::model::{Fate, Kind};

/// One process of the world.
pub struct Proc {
    pub task: String,
    pub node: Option<String>,
    pub kind: Kind,
    pub attempt: u32,
    pub service: bool,
    /// When the spawn was asked for, and when the step launched (virtual ms).
    pub asked: u64,
    pub launched: u64,
    /// Ready (or, for a one-shot, exited 0) at; crashed at.
    pub ready_at: Option<u64>,
    pub crash_at: Option<u64>,
    pub why: Option<String>,
    /// When a probe first found it ready.
    pub seen_ready: Option<u64>,
    /// When it was stopped.
    pub stopped: Option<u64>,
    /// Fires when it is stopped.
    pub stop: watch::Sender<bool>,
}

impl Proc {
    /// Its state at virtual time `t`.
    pub fn state(&self, t: u64) -> ProcState {
        if self.stopped.is_some_and(|s| s <= t) {
            return ProcState::Exited(None);
        }
        if self.crash_at.is_some_and(|c| c <= t) {
            return ProcState::Exited(Some(1));
        }
        if !self.service && self.ready_at.is_some_and(|r| r <= t) {
            return ProcState::Exited(Some(0));
        }
        ProcState::Running
    }

    /// When its fate ends it, if it does.
    pub fn ends_at(&self) -> Option<u64> {
        let done = if self.service { None } else { self.ready_at };
        match (self.crash_at, done) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One line of the world file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "kebab-case")]
enum Line {
    Spawn {
        p: usize,
        task: String,
        node: Option<String>,
        attempt: u32,
        service: bool,
        at: u64,
        launched: u64,
        ready_at: Option<u64>,
        crash_at: Option<u64>,
        why: Option<String>,
    },
    Ready {
        p: usize,
        at: u64,
    },
    Stop {
        p: usize,
        at: u64,
    },
    Alloc {
        at: u64,
        nodes: usize,
    },
    Release {
        at: u64,
    },
}

/// A call a built-in action made (`register`, `health-probe`) or the allocation, for the
/// timeline.
#[derive(Debug, Clone)]
pub struct Call {
    pub what: String,
    pub asked: u64,
    pub done: u64,
    pub error: Option<String>,
}

pub struct World {
    path: PathBuf,
    file: Mutex<Option<File>>,
    t0: Instant,
    /// Virtual ms at `t0`: where an earlier run's clock stopped.
    base: u64,
    pub procs: Vec<Proc>,
    /// Task → its processes, oldest first.
    pub by_task: HashMap<String, Vec<usize>>,
    /// `host:port` → the process that listens there.
    pub listening: HashMap<String, usize>,
    pub calls: Vec<Call>,
    pub allocated: Option<u64>,
    pub released: bool,
    /// The next free step-launch slot (virtual ms, fractional).
    pub next_slot: f64,
}

impl World {
    /// Where a state dir keeps its world.
    pub fn file_in(state_dir: &Path) -> PathBuf {
        state_dir.join("sim").join("world.jsonl")
    }

    /// Did a simulated run use this state dir?
    pub fn lives_in(state_dir: &Path) -> bool {
        Self::file_in(state_dir).exists()
    }

    /// The world of a state dir: as an earlier run left it, if one did.
    pub fn open(path: PathBuf) -> World {
        let mut w = World {
            path,
            file: Mutex::new(None),
            t0: Instant::now(),
            base: 0,
            procs: Vec::new(),
            by_task: HashMap::new(),
            listening: HashMap::new(),
            calls: Vec::new(),
            allocated: None,
            released: false,
            next_slot: 0.0,
        };
        let text = std::fs::read_to_string(&w.path).unwrap_or_default();
        let mut last = 0;
        for line in text.lines() {
            let Ok(l) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            match l {
                Line::Spawn {
                    task,
                    node,
                    attempt,
                    service,
                    at,
                    launched,
                    ready_at,
                    crash_at,
                    why,
                    ..
                } => {
                    last = last.max(at).max(launched);
                    w.add(Proc {
                        kind: Kind::of(&task),
                        task,
                        node,
                        attempt,
                        service,
                        asked: at,
                        launched,
                        ready_at,
                        crash_at,
                        why,
                        seen_ready: None,
                        stopped: None,
                        stop: watch::channel(false).0,
                    });
                }
                Line::Ready { p, at } => {
                    last = last.max(at);
                    if let Some(q) = w.procs.get_mut(p) {
                        q.seen_ready = Some(at);
                    }
                }
                Line::Stop { p, at } => {
                    last = last.max(at);
                    if let Some(q) = w.procs.get_mut(p) {
                        q.stopped = Some(at);
                    }
                }
                Line::Alloc { at, .. } => {
                    last = last.max(at);
                    w.allocated = Some(at);
                    w.released = false;
                }
                Line::Release { at } => {
                    last = last.max(at);
                    w.released = true;
                }
            }
        }
        w.base = last;
        w.next_slot = last as f64;
        w
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the clock stood when this world was opened.
    pub fn base_ms(&self) -> u64 {
        self.base
    }

    /// Virtual ms now.
    pub fn now(&self) -> u64 {
        self.base + self.t0.elapsed().as_millis() as u64
    }

    /// The instant of virtual ms `t`, to sleep until.
    pub fn instant(&self, t: u64) -> Instant {
        self.t0 + Duration::from_millis(t.saturating_sub(self.base))
    }

    fn add(&mut self, p: Proc) -> usize {
        let i = self.procs.len();
        self.by_task.entry(p.task.clone()).or_default().push(i);
        self.procs.push(p);
        i
    }

    fn write(&self, line: &Line) {
        let Ok(mut text) = serde_json::to_string(line) else {
            return;
        };
        text.push('\n');
        let Ok(mut f) = self.file.lock() else { return };
        if f.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            *f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        if let Some(f) = f.as_mut() {
            let _ = f.write_all(text.as_bytes());
        }
    }

    /// Notes a new process and its fate; returns its number.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        &mut self,
        task: &str,
        node: Option<String>,
        service: bool,
        asked: u64,
        launched: u64,
        fate: &Fate,
        listens: Option<String>,
    ) -> usize {
        let attempt = self.by_task.get(task).map_or(0, Vec::len) as u32 + 1;
        let ms = |d: Duration| launched + d.as_millis() as u64;
        let p = Proc {
            task: task.to_string(),
            node,
            kind: Kind::of(task),
            attempt,
            service,
            asked,
            launched,
            ready_at: fate.ready.map(ms),
            crash_at: fate.crash.map(ms),
            why: fate.why.map(str::to_string),
            seen_ready: None,
            stopped: None,
            stop: watch::channel(false).0,
        };
        let i = self.add(p);
        let p = &self.procs[i];
        self.write(&Line::Spawn {
            p: i,
            task: p.task.clone(),
            node: p.node.clone(),
            attempt,
            service,
            at: asked,
            launched,
            ready_at: p.ready_at,
            crash_at: p.crash_at,
            why: p.why.clone(),
        });
        if let Some(l) = listens {
            self.listening.insert(l, i);
        }
        i
    }

    /// The attempt the next spawn of `task` will be.
    pub fn next_attempt(&self, task: &str) -> u32 {
        self.by_task.get(task).map_or(0, Vec::len) as u32 + 1
    }

    pub fn seen_ready(&mut self, p: usize, at: u64) {
        if let Some(q) = self.procs.get_mut(p) {
            if q.seen_ready.is_none() {
                q.seen_ready = Some(at);
                self.write(&Line::Ready { p, at });
            }
        }
    }

    /// Stops a process; says whether it was running.
    pub fn stop(&mut self, p: usize, at: u64) -> bool {
        let Some(q) = self.procs.get_mut(p) else {
            return false;
        };
        let was = q.state(at) == ProcState::Running;
        if q.stopped.is_none() && was {
            q.stopped = Some(at);
            q.stop.send_replace(true);
            self.write(&Line::Stop { p, at });
        }
        was
    }

    pub fn allocate(&mut self, at: u64, nodes: usize) {
        self.allocated = Some(at);
        self.released = false;
        self.write(&Line::Alloc { at, nodes });
    }

    pub fn release(&mut self, at: u64) {
        self.released = true;
        self.write(&Line::Release { at });
    }
}
