//! The wire format: one JSON object per line, each way.
//!
//! prl-flow writes requests to the plugin's stdin:
//!
//! ```json
//! {"id": 7, "method": "status", "params": {"handle": {"backend": "wrapped", "pid": 4242}}}
//! ```
//!
//! and the plugin writes one answer per request to its stdout, in any order, carrying the
//! request's `id`:
//!
//! ```json
//! {"id": 7, "result": {"state": "running"}}
//! {"id": 8, "error": {"code": "failed", "message": "no such node `node9`"}}
//! ```
//!
//! The first request is always `hello`. Its answer says which protocol the plugin speaks,
//! its name and its capabilities (the optional methods it implements); a plugin that
//! speaks another protocol version is refused with a message saying so.
//!
//! Parameters and results are the data types of `prl-flow-backend` as serde writes them
//! ([`SpawnSpec`](prl_flow_backend::SpawnSpec), [`Allocation`](prl_flow_backend::Allocation),
//! process states), so a plugin gets exactly what a built-in backend gets; a handle is the
//! plugin's own object, as it returned it, with `backend` (its name), `plugin` (its path)
//! and maybe `log` set by prl-flow. This module only
//! reads and writes lines; what a malformed answer means for the connection is the client's
//! business.

use std::collections::BTreeMap;
use std::time::Duration;

use prl_flow_backend::{ProcState, ALLOCATE};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this prl-flow speaks.
pub const PROTOCOL: u32 = 1;

/// A plugin executable is named `prl-flow-backend-<name>`.
pub const EXE_PREFIX: &str = "prl-flow-backend-";

/// Methods every plugin answers.
pub const REQUIRED: &[&str] = &["hello", ALLOCATE, "release", "spawn", "status", "stop"];

/// Methods a plugin may implement, and then announces in `capabilities`. Without them
/// prl-flow falls back: `allocation_alive` is taken as true, `wait` polls `status`, the
/// log methods read the file named by the handle's `log` key, and `recover` finds nothing.
pub const OPTIONAL: &[&str] = &[
    "allocation_alive",
    "wait",
    "log_tail",
    "read_log",
    "recover",
];

/// Error codes a plugin should use (any other string is passed on as it is).
pub const ERROR_CODES: &[(&str, &str)] = &[
    ("bad-request", "the parameters are missing or malformed"),
    (
        "unknown-method",
        "the plugin does not implement this method",
    ),
    (
        "protocol",
        "the plugin does not speak the protocol version asked for",
    ),
    (
        "failed",
        "the operation was understood and failed (no such node, out of quota, ...)",
    ),
];

#[derive(Debug, Serialize)]
pub struct Request<'a> {
    pub id: u64,
    pub method: &'a str,
    pub params: &'a Value,
}

/// An error a plugin answered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    #[serde(default = "failed")]
    pub code: String,
    pub message: String,
}

fn failed() -> String {
    "failed".into()
}

/// What a plugin answered to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Result(Value),
    Error(RemoteError),
}

/// Reads one line a plugin wrote: the id it answers, and the answer. `Err` says why the
/// line is not an answer, in words that fit after "the plugin wrote a line that ...".
pub fn parse_answer(line: &str) -> Result<(u64, Answer), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("is not JSON ({e})"))?;
    let Value::Object(mut obj) = value else {
        return Err("is not a JSON object".into());
    };
    let id = match obj.get("id") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("has an `id` that is not a request number: {v}"))?,
        None => return Err("has no `id`".into()),
    };
    // `result` may be JSON null (an answer to `release`): its presence is what counts.
    match (obj.remove("result"), obj.remove("error")) {
        (Some(result), None) => Ok((id, Answer::Result(result))),
        (None, Some(error)) => {
            let e = match serde_json::from_value::<RemoteError>(error.clone()) {
                Ok(e) => e,
                // A bare string, or an object without `message`: keep what it said.
                Err(_) => RemoteError {
                    code: failed(),
                    message: match error {
                        Value::String(s) => s,
                        other => other.to_string(),
                    },
                },
            };
            Ok((id, Answer::Error(e)))
        }
        (Some(_), Some(_)) => Err("has both `result` and `error`".into()),
        (None, None) => Err("has neither `result` nor `error`".into()),
    }
}

/// The parameters of `hello`.
pub fn hello_params(name: &str, config: &Value) -> Value {
    serde_json::json!({
        "protocol": PROTOCOL,
        "prl_flow": env!("CARGO_PKG_VERSION"),
        "name": name,
        "config": config,
    })
}

/// What a plugin says of itself in its answer to `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub name: String,
    /// The optional methods it implements (see [`OPTIONAL`]); unknown entries are ignored.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Per-method request time limits in seconds, replacing prl-flow's defaults (a
    /// scheduler whose queue takes an hour gives `allocate` 3600).
    #[serde(default)]
    pub timeouts: BTreeMap<String, f64>,
    /// Anything else it says (a version, a site), shown by `prl-flow plugins`.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Hello {
    pub fn can(&self, method: &str) -> bool {
        self.capabilities.iter().any(|c| c == method)
    }

    /// The time limits it asks for, as durations (nonsense values are ignored).
    pub fn timeout_overrides(&self) -> BTreeMap<String, Duration> {
        self.timeouts
            .iter()
            .filter(|(_, s)| s.is_finite() && **s > 0.0 && **s < 1e9)
            .map(|(m, s)| (m.clone(), Duration::from_secs_f64(*s)))
            .collect()
    }
}

/// Reads an answer to `hello`. The protocol version is looked at first, so a plugin of
/// another version is told so even if the rest of its answer has another shape.
pub fn parse_hello(v: &Value) -> Result<Hello, String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("answered `hello` with {v}, not an object"));
    };
    match obj.get("protocol").map(Value::as_u64) {
        Some(Some(p)) if p == u64::from(PROTOCOL) => {}
        Some(Some(p)) => {
            return Err(format!(
                "speaks protocol {p}, and this prl-flow speaks protocol {PROTOCOL}"
            ))
        }
        Some(None) | None => {
            return Err(format!("answered `hello` without a `protocol` number: {v}"))
        }
    }
    serde_json::from_value(v.clone()).map_err(|e| format!("answered `hello` with {v}: {e}"))
}

/// Reads a process state: `{"state": "running"}`, `{"state": "exited", "code": 3}` (a null
/// or missing code: killed by a signal), `{"state": "gone"}`.
pub fn parse_state(v: &Value) -> Result<ProcState, String> {
    let state = v
        .get("state")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{v} is not a process state"))?;
    match state {
        "running" => Ok(ProcState::Running),
        "gone" => Ok(ProcState::Gone),
        "exited" => match v.get("code") {
            None | Some(Value::Null) => Ok(ProcState::Exited(None)),
            Some(c) => c
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .map(|c| ProcState::Exited(Some(c)))
                .ok_or_else(|| format!("{v} has an exit code that is not a number")),
        },
        other => Err(format!(
            "`{other}` is not a process state (`running`, `exited` or `gone`)"
        )),
    }
}

/// The answer to `read_log`: `{"text": "...", "offset": 1234}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub text: String,
    pub offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_with_null_results() {
        assert_eq!(
            parse_answer(r#"{"id": 3, "result": null}"#),
            Ok((3, Answer::Result(Value::Null)))
        );
        assert_eq!(
            parse_answer(r#"{"id": 4, "error": {"code": "failed", "message": "no"}}"#),
            Ok((
                4,
                Answer::Error(RemoteError {
                    code: "failed".into(),
                    message: "no".into()
                })
            ))
        );
        assert_eq!(
            parse_answer(r#"{"id": 5, "error": "plain words"}"#),
            Ok((
                5,
                Answer::Error(RemoteError {
                    code: "failed".into(),
                    message: "plain words".into()
                })
            ))
        );
    }

    #[test]
    fn nonsense_says_why() {
        assert!(parse_answer("hello").is_err_and(|e| e.starts_with("is not JSON")));
        assert!(parse_answer("[1]").is_err_and(|e| e.contains("not a JSON object")));
        assert!(parse_answer(r#"{"result": 1}"#).is_err_and(|e| e.contains("no `id`")));
        assert!(parse_answer(r#"{"id": 1}"#).is_err_and(|e| e.contains("neither")));
        assert!(
            parse_answer(r#"{"id": -1, "result": 1}"#).is_err_and(|e| e.contains("request number"))
        );
    }

    #[test]
    fn hello_version_comes_first() {
        let v = serde_json::json!({"protocol": 2, "nom": "x"});
        assert!(
            parse_hello(&v).is_err_and(|e| e.contains("protocol 2") && e.contains("protocol 1"))
        );
        let v = serde_json::json!({"protocol": 1, "name": "x", "capabilities": ["wait"], "version": "0.3"});
        let h = parse_hello(&v).expect("hello");
        assert!(h.can("wait") && !h.can("read_log"));
        assert_eq!(h.extra.get("version"), Some(&Value::from("0.3")));
    }

    #[test]
    fn states_match_the_backend_types() {
        for s in [
            ProcState::Running,
            ProcState::Exited(Some(3)),
            ProcState::Exited(None),
            ProcState::Gone,
        ] {
            let v = serde_json::to_value(&s).expect("json");
            assert_eq!(parse_state(&v), Ok(s));
        }
        assert_eq!(
            parse_state(&serde_json::json!({"state": "exited"})),
            Ok(ProcState::Exited(None))
        );
        assert!(parse_state(&serde_json::json!("running")).is_err());
    }
}
