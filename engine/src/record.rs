//! The plain data every part of the engine passes around, with no behaviour of its own:
//! what a task leaves behind ([`Handle`]), how it fails ([`TaskError`]), how its turn in a
//! run ends ([`Outcome`]), and what the journal keeps of it ([`Status`], [`Record`]).
//!
//! This module needs no other module of the engine; the others build on it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What a task leaves behind for later checks and teardown: opaque to the engine.
pub type Handle = serde_json::Value;

/// A task's failure, in words for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    pub message: String,
    /// A handle to record even though the task failed (e.g. a service that started and then
    /// never became ready was stopped; or was left running with `--keep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<Handle>,
    /// The process's exit code, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Its process was to be stopped and could not be: it may still run (a run's summary
    /// must not say everything is stopped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub still_running: bool,
}

impl TaskError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            handle: None,
            exit_code: None,
            still_running: false,
        }
    }
    /// Says that its process could not be stopped, and why: it may still run.
    pub fn still_running(mut self, why: impl std::fmt::Display) -> Self {
        self.message = format!(
            "{}\n  it could not be stopped and may still run: {why}",
            self.message
        );
        self.still_running = true;
        self
    }
    pub fn with_exit_code(mut self, code: Option<i32>) -> Self {
        self.exit_code = code;
        self
    }
    pub fn with_handle(mut self, handle: Option<Handle>) -> Self {
        self.handle = handle;
        self
    }
}

/// How a task's turn in a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    Failed,
    TimedOut,
    Cancelled,
    /// Never started: something it needs failed, or the run was aborted or cancelled first.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed-out",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
        }
    }
}

/// A task's state as recorded in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Started, not finished (or the run that started it died).
    Running,
    Done,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
    /// Stopped by teardown.
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::TimedOut => "timed-out",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
            Status::Stopped => "stopped",
        }
    }
}

impl From<Outcome> for Status {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done => Status::Done,
            Outcome::Failed => Status::Failed,
            Outcome::TimedOut => Status::TimedOut,
            Outcome::Cancelled => Status::Cancelled,
            Outcome::Skipped => Status::Skipped,
        }
    }
}

/// What the journal keeps of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub status: Status,
    pub fingerprint: String,
    pub kind: String,
    #[serde(default)]
    pub service: bool,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<Handle>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
    /// Order of starting within the state dir: teardown goes in reverse.
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub attempts: u32,
    /// Milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Milliseconds since the Unix epoch, as records keep times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
