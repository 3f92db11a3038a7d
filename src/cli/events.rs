//! `run --events jsonl`: every event of a run worth a script's attention as one JSON object
//! a line, built from the engine's [`Event`]s by a [`Subscriber`]. Each line is written and
//! flushed as it happens. The schema is `docs/schemas/events.schema.json`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

use prl_flow_engine::{Decision, Event, Outcome, Subscriber};
use serde_json::{json, Value};

/// Writes events as JSON lines.
pub struct Jsonl {
    out: Mutex<Box<dyn Write + Send>>,
    /// Which tasks are services (their `done` is `ready`), by id.
    services: HashMap<String, bool>,
}

impl Jsonl {
    /// Events to `out`; `services` says, by task id, which tasks are services.
    pub fn new(out: Box<dyn Write + Send>, services: HashMap<String, bool>) -> Self {
        Self {
            out: Mutex::new(out),
            services,
        }
    }

    /// A line for what `run --attach` did to keep the deployment up: `down`, `detached`,
    /// `restarting`, `restarted`, `restart-failed`, `gave-up`.
    pub fn heal(&self, e: &crate::session::heal::HealEvent) {
        use crate::session::heal::HealEvent as H;
        self.write(match e {
            H::Down(t) => json!({ "event": "down", "task": t }),
            H::Detached { task, router } => {
                json!({ "event": "detached", "task": task, "router": router })
            }
            H::Restarting { tasks, wait } => json!({
                "event": "restarting", "tasks": tasks,
                "delay_ms": u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            }),
            H::Restarted(tasks) => json!({ "event": "restarted", "tasks": tasks }),
            H::RestartFailed(why) => json!({ "event": "restart-failed", "error": why }),
            H::GaveUp { task, deaths, .. } => {
                json!({ "event": "gave-up", "task": task, "deaths": deaths })
            }
        });
    }

    fn write(&self, mut v: Value) {
        v["time_ms"] = json!(prl_flow_engine::record::now_ms());
        if let (Ok(mut o), Ok(line)) = (self.out.lock(), serde_json::to_string(&v)) {
            let _ = writeln!(o, "{line}").and_then(|()| o.flush());
        }
    }
}

/// The JSON object of one event, `None` for events a script has no use for (a line of a
/// task's output, a spawn).
pub fn event_json(e: &Event, is_service: impl Fn(&str) -> bool) -> Option<Value> {
    Some(match e {
        Event::Planned { decisions } => {
            let tasks: Vec<Value> = decisions
                .iter()
                .map(|(id, d)| {
                    let (what, why) = match d {
                        Decision::Keep => ("keep", None),
                        Decision::Adopt => ("adopt", None),
                        Decision::Run(r) => ("run", Some(r.to_string())),
                    };
                    json!({ "task": id.as_ref(), "decision": what, "reason": why })
                })
                .collect();
            json!({ "event": "planned", "tasks": tasks })
        }
        Event::Started {
            id,
            attempt,
            adopted,
            ..
        } => json!({
            "event": "started", "task": id.as_ref(), "attempt": attempt, "adopted": adopted,
        }),
        Event::Retrying {
            id,
            attempt,
            error,
            delay,
            ..
        } => json!({
            "event": "retried",
            "task": id.as_ref(),
            "attempt": attempt,
            "error": error,
            "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        }),
        Event::Finished {
            id,
            outcome,
            duration,
            error,
            ..
        } => {
            let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            match outcome {
                Outcome::Done => json!({
                    "event": if is_service(id) { "ready" } else { "done" },
                    "task": id.as_ref(),
                    "duration_ms": ms,
                }),
                Outcome::Skipped => json!({ "event": "skipped", "task": id.as_ref() }),
                other => json!({
                    "event": "failed",
                    "task": id.as_ref(),
                    "outcome": other.as_str(),
                    "error": error.as_ref().map(|e| e.message.as_str()),
                    "duration_ms": ms,
                }),
            }
        }
        Event::Undone { id, error, .. } => {
            json!({ "event": "stopped", "task": id.as_ref(), "error": error })
        }
        Event::Aborting { id } => json!({ "event": "aborting", "task": id.as_ref() }),
        Event::Cancelling => json!({ "event": "cancelling" }),
        Event::RunFinished { summary } => json!({
            "event": "finished",
            "ok": summary.ok(),
            "summary": summary,
        }),
        // A spawn, a line of output: nothing a script acts on.
        _ => return None,
    })
}

impl Subscriber for Jsonl {
    fn on_event(&self, e: &Event) {
        let is_service = |id: &str| self.services.get(id).copied().unwrap_or(false);
        if let Some(v) = event_json(e, is_service) {
            self.write(v);
        }
    }
}
