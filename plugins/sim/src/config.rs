//! The `[backend]` table of a simulated run: the model's knobs, each with a default, checked
//! in one pass so that every problem is reported at once, each naming its field.
//!
//! ```toml
//! [backend]
//! type = "sim"
//! seed = 1                   # `--seed` overrides it
//! queue_wait = "2m"          # median wait of the allocation in the queue
//! step_rate = 200            # job steps launched per second, across the allocation
//! engine_startup = "4m"      # median load time of a vLLM engine
//! engine_tail = 0.35         # spread of that time (log-normal sigma): the long tail
//! router_startup = "5s"      # median start of a router, before its worker checks
//! worker_check = "50ms"      # the router's start-up check of one worker
//! mooncake_startup = "3s"    # median start of a Mooncake master, metadata server or client
//! other_startup = "1s"       # any other process
//! health = "2s"              # one completion through a router
//! node_dead = 0.0            # probability that a node never comes up
//! crash_loading = 0.0        # probability that an engine crashes while it loads
//! crash_after = 0.0          # probability that an engine crashes after it is ready...
//! crash_window = "30m"       # ...within this time of being ready
//! ```

use std::time::Duration;

use prl_flow_backend::table::TableReader;
pub use prl_flow_backend::ConfigError;
use prl_flow_engine::text::closest;
use serde_json::Value;

/// The checked `[backend]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    pub queue_wait: Duration,
    pub step_rate: f64,
    pub engine_startup: Duration,
    pub engine_tail: f64,
    pub router_startup: Duration,
    pub worker_check: Duration,
    pub mooncake_startup: Duration,
    pub other_startup: Duration,
    pub health: Duration,
    pub node_dead: f64,
    pub crash_loading: f64,
    pub crash_after: f64,
    pub crash_window: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            queue_wait: Duration::from_secs(120),
            step_rate: 200.0,
            engine_startup: Duration::from_secs(240),
            engine_tail: 0.35,
            router_startup: Duration::from_secs(5),
            worker_check: Duration::from_millis(50),
            mooncake_startup: Duration::from_secs(3),
            other_startup: Duration::from_secs(1),
            health: Duration::from_secs(2),
            node_dead: 0.0,
            crash_loading: 0.0,
            crash_after: 0.0,
            crash_window: Duration::from_secs(1800),
        }
    }
}

/// Every field the table may hold (`type` is the recipe's own).
pub const FIELDS: &[&str] = &[
    "type",
    "seed",
    "queue_wait",
    "step_rate",
    "engine_startup",
    "engine_tail",
    "router_startup",
    "worker_check",
    "mooncake_startup",
    "other_startup",
    "health",
    "node_dead",
    "crash_loading",
    "crash_after",
    "crash_window",
];

impl SimConfig {
    /// Reads the table (JSON, as the recipe module hands it over; `null` is an empty table).
    pub fn parse(value: &Value) -> Result<Self, Vec<ConfigError>> {
        let empty = serde_json::Map::new();
        let table = match value {
            Value::Null => &empty,
            Value::Object(m) => m,
            _ => return Err(vec![ConfigError::new("", "must be a table")]),
        };
        let mut errors = Vec::new();
        let mut c = SimConfig::default();
        let mut r = TableReader::new(table, &mut errors);
        r.unknown_fields("sim", FIELDS, |k, f| closest(k, f.iter().copied()));
        if let Some(s) = r.whole("seed") {
            c.seed = s;
        }
        for (key, slot) in [
            ("queue_wait", &mut c.queue_wait),
            ("engine_startup", &mut c.engine_startup),
            ("router_startup", &mut c.router_startup),
            ("worker_check", &mut c.worker_check),
            ("mooncake_startup", &mut c.mooncake_startup),
            ("other_startup", &mut c.other_startup),
            ("health", &mut c.health),
            ("crash_window", &mut c.crash_window),
        ] {
            if let Some(d) = r.duration(key) {
                *slot = d;
            }
        }
        if let Some(v) = r.number("step_rate", 0.001, 1e9) {
            c.step_rate = v;
        }
        if let Some(v) = r.number("engine_tail", 0.0, 3.0) {
            c.engine_tail = v;
        }
        for (key, slot) in [
            ("node_dead", &mut c.node_dead),
            ("crash_loading", &mut c.crash_loading),
            ("crash_after", &mut c.crash_after),
        ] {
            if let Some(p) = r.number(key, 0.0, 1.0) {
                *slot = p;
            }
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_every_problem_at_once() {
        assert_eq!(SimConfig::parse(&Value::Null), Ok(SimConfig::default()));
        let c = SimConfig::parse(&serde_json::json!({
            "type": "sim", "seed": 7, "engine_startup": "10m", "node_dead": 0.01
        }))
        .expect("valid");
        assert_eq!(c.seed, 7);
        assert_eq!(c.engine_startup, Duration::from_secs(600));
        assert_eq!(c.node_dead, 0.01);
        let e = SimConfig::parse(&serde_json::json!({
            "seed": -1, "node_dead": 2, "health": "soon", "step_rat": 3
        }))
        .expect_err("invalid");
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["step_rat", "seed", "health", "node_dead"]);
    }
}
