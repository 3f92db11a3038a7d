//! The seeded model: what happens to each process the plan starts, drawn from the knobs of
//! [`SimConfig`]. Every draw is keyed by the seed, the task and its attempt (or the node),
//! never by the order of calls, so a run is the same for the same seed however the engine
//! interleaves its tasks.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::SimConfig;

/// What kind of process a task starts, read from its id (the plan's names: `prefill[0]...`,
/// `decode[1]...`, `router...`, `mooncake-...`, `metadata-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Mooncake,
    Prefill,
    Decode,
    Engine,
    Router,
    Other,
}

impl Kind {
    pub fn of(task: &str) -> Kind {
        if task.starts_with("mooncake") || task.starts_with("metadata") {
            Kind::Mooncake
        } else if task.contains("prefill") {
            Kind::Prefill
        } else if task.contains("decode") {
            Kind::Decode
        } else if task.starts_with("router") {
            Kind::Router
        } else if task.starts_with("engine") || task.contains("rank[") {
            Kind::Engine
        } else {
            Kind::Other
        }
    }

    pub fn is_engine(self) -> bool {
        matches!(self, Kind::Prefill | Kind::Decode | Kind::Engine)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mooncake => "mooncake",
            Kind::Prefill => "prefill",
            Kind::Decode => "decode",
            Kind::Engine => "engines",
            Kind::Router => "routers",
            Kind::Other => "other",
        }
    }
}

/// How one attempt of a process goes, from its launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Fate {
    /// Ready (a service) or done (a one-shot) this long after the launch; `None`: never.
    pub ready: Option<Duration>,
    /// It crashes this long after the launch (before `ready`: while loading).
    pub crash: Option<Duration>,
    /// Why it never comes up or crashes, for its log and the timeline.
    pub why: Option<&'static str>,
}

/// A small stable hash (FNV-1a), so that keys give the same streams on every machine.
fn key(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

pub struct Model {
    pub config: SimConfig,
}

impl Model {
    fn rng(&self, parts: &[&[u8]]) -> StdRng {
        let seed = self.config.seed.to_le_bytes();
        let mut all = vec![&seed[..]];
        all.extend_from_slice(parts);
        StdRng::seed_from_u64(key(&all))
    }

    /// A log-normal time of this median and spread.
    fn lognormal(rng: &mut StdRng, median: Duration, sigma: f64) -> Duration {
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        Duration::from_secs_f64(median.as_secs_f64() * (sigma * z).exp())
    }

    /// How long the allocation waits in the queue.
    pub fn queue_wait(&self) -> Duration {
        let mut rng = self.rng(&[b"queue"]);
        Self::lognormal(&mut rng, self.config.queue_wait, 0.5)
    }

    /// Does this node never come up?
    pub fn node_dead(&self, node: &str) -> bool {
        let p = self.config.node_dead;
        p > 0.0 && self.rng(&[b"node", node.as_bytes()]).gen_bool(p)
    }

    /// The fate of attempt `attempt` (1, 2, ...) of `task`, on a node that is dead or not.
    pub fn fate(&self, task: &str, attempt: u32, service: bool, dead_node: bool) -> Fate {
        let c = &self.config;
        let kind = Kind::of(task);
        let mut rng = self.rng(&[b"task", task.as_bytes(), &attempt.to_le_bytes()]);
        let startup = match kind {
            k if k.is_engine() => Self::lognormal(&mut rng, c.engine_startup, c.engine_tail),
            Kind::Router => Self::lognormal(&mut rng, c.router_startup, 0.3),
            Kind::Mooncake => Self::lognormal(&mut rng, c.mooncake_startup, 0.3),
            _ => Self::lognormal(&mut rng, c.other_startup, 0.3),
        };
        let loading: f64 = rng.gen();
        let after: f64 = rng.gen();
        let when: f64 = rng.gen();
        if dead_node {
            return Fate {
                ready: None,
                crash: None,
                why: Some("its node never came up"),
            };
        }
        if !service || !kind.is_engine() {
            return Fate {
                ready: Some(startup),
                crash: None,
                why: None,
            };
        }
        if loading < c.crash_loading {
            return Fate {
                ready: None,
                crash: Some(startup.mul_f64(when)),
                why: Some("crashed while loading"),
            };
        }
        if after < c.crash_after {
            return Fate {
                ready: Some(startup),
                crash: Some(startup + c.crash_window.mul_f64(when)),
                why: Some("crashed after it was ready"),
            };
        }
        Fate {
            ready: Some(startup),
            crash: None,
            why: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_the_seed_and_the_key_only() {
        let m = Model {
            config: SimConfig {
                crash_loading: 0.5,
                ..SimConfig::default()
            },
        };
        let a = m.fate("prefill[0].rank[1]", 1, true, false);
        assert_eq!(a, m.fate("prefill[0].rank[1]", 1, true, false));
        assert_ne!(a, m.fate("prefill[0].rank[1]", 2, true, false));
        let other = Model {
            config: SimConfig {
                seed: 2,
                ..m.config.clone()
            },
        };
        assert_ne!(a, other.fate("prefill[0].rank[1]", 1, true, false));
        assert_eq!(Kind::of("mooncake-client.node[3]"), Kind::Mooncake);
        assert_eq!(Kind::of("decode[2].rank[0]"), Kind::Decode);
        assert_eq!(Kind::of("router.unit[1]"), Kind::Router);
    }
}
