//! Built-in actions: work prl-flow does itself, as a task of a plan, rather than by a process
//! on a node. A plan names one by a value of [`Action`]; each value has its implementation
//! behind the [`Perform`] trait, reached through [`Action::perform`]. The executor runs them
//! through that trait and a [`Context`] it provides, and knows nothing of what they do. A
//! cancel cuts an action short at once (the executor drops its future); [`Perform::abandoned`]
//! then undoes what it may have begun.
//!
//! - [`allocate`]: asks the backend for the plan's nodes and learns their addresses; the
//!   allocation is held like a service and released on teardown.
//! - [`router`]: `register` (a router lists its workers) and `health-probe` (the router is
//!   ready and one completion comes back through it), for deployments.

pub mod allocate;
pub mod router;

use std::collections::BTreeMap;

use async_trait::async_trait;
use prl_flow_backend::Backend;
use prl_flow_engine::{Check, Handle, TaskError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A built-in action, as a plan names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Allocate,
    Register,
    HealthProbe,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Allocate, Action::Register, Action::HealthProbe];

    /// The action's name in plans and journals, which is also the kind of its task.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Allocate => prl_flow_backend::ALLOCATE,
            Action::Register => "register",
            Action::HealthProbe => "health-probe",
        }
    }

    /// The action whose task has this kind (journal records keep kinds as text).
    pub fn of_kind(kind: &str) -> Option<Action> {
        Self::ALL.into_iter().find(|a| a.name() == kind)
    }

    /// Its implementation.
    pub fn perform(self) -> &'static dyn Perform {
        match self {
            Action::Allocate => &allocate::Allocate,
            Action::Register => &router::Register,
            Action::HealthProbe => &router::HealthProbe,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What an action may use of the run it is part of.
#[async_trait]
pub trait Context: Send + Sync {
    /// Fills the node placeholders of `text` with the addresses known so far.
    fn resolve(&self, text: &str) -> String;
    fn backend(&self) -> &dyn Backend;
    /// The plan's nodes, in order.
    fn nodes(&self) -> &[String];
    /// Learns the nodes' addresses.
    fn set_hosts(&self, hosts: BTreeMap<String, String>);
    /// Whether this run starts `task` again (a resume re-runs it): a registration then
    /// replaces the router's entry for it.
    fn reruns(&self, _task: &str) -> bool {
        false
    }
    /// Whether `task` is left down on purpose (a service the healer gave up on): a
    /// registration leaves it out of its router.
    fn held(&self, _task: &str) -> bool {
        false
    }
    /// The run's state dir, where a backend notes what it starts before it is recorded.
    fn state_dir(&self) -> Option<&std::path::Path> {
        None
    }
    /// Once the nodes are known: are the plan's programs there and its ports free on each
    /// (the preflight)? `Err`: every problem, for the message. The default finds none.
    async fn preflight(&self, _hosts: &BTreeMap<String, String>) -> Result<(), String> {
        Ok(())
    }
}

/// How a built-in action runs, is checked on resume, and is undone on teardown.
#[async_trait]
pub trait Perform: Send + Sync {
    /// Does the work; the handle (if any) is what the journal keeps for check and undo.
    async fn run(&self, cx: &dyn Context, args: &Value) -> Result<Option<Handle>, TaskError>;

    /// Is what it did held like a service (kept running, undone on teardown)?
    fn held(&self) -> bool {
        false
    }

    /// On resume: is what an earlier run recorded still valid? By default an action that
    /// was recorded is done again (it is cheap and its effect may be gone).
    async fn check(&self, _cx: &dyn Context, _handle: Option<&Handle>) -> Check {
        Check::Invalid("interrupted".into())
    }

    /// After `run` was cut short by a cancel (its future dropped): undoes what it may have
    /// begun but not yet handed back (nothing by default).
    async fn abandoned(&self, _cx: &dyn Context) {}

    /// On teardown: undoes what `run` did (nothing by default).
    async fn undo(&self, _cx: &dyn Context, _handle: &Handle) -> Result<(), TaskError> {
        Ok(())
    }
}
