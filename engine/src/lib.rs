//! prl-flow-engine: a generic async runner for graphs of tasks, with a journal and resume.
//!
//! It is for running many dependent tasks at once, each the moment what it needs is done,
//! and for remembering what ran so that a later process can resume, report or tear down.
//! It must not know what the tasks do: nothing of vLLM, routers, engines, nodes or
//! backends. It sees ids, dependencies, fingerprints, opaque JSON handles and events.
//!
//! The flow: add [`Task`]s to a [`GraphBuilder`], [`seal`](GraphBuilder::seal) it into a
//! [`Graph`] (all errors at once: duplicates, unknown dependencies, cycles), let
//! [`decide`] say what runs (everything, or on resume only what is not still valid), then
//! [`run`] it with [`Subscriber`]s listening. A [`Journal`] is one such subscriber: it keeps
//! what each task did in a state dir, so a later process can resume, report or tear down.
//!
//! Beside the runner, a few helpers the rest of the project shares: graph algorithms over
//! plain index lists ([`algo`]), the "did you mean" suggestion ([`text`]) and the atomic
//! file write ([`fs`]).
//!
//! Modules build on each other without a circle: [`record`] (plain data) ← [`event`] ←
//! [`task`] ← [`graph`] ← [`journal`], [`scheduler`]; [`algo`], [`text`] and [`fs`] stand
//! alone.

pub mod algo;
pub mod event;
pub mod fs;
pub mod graph;
pub mod journal;
pub mod record;
pub mod scheduler;
pub mod task;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod text;

pub use event::{Decision, Event, Outcome, Reason, Sink, Subscriber, Summary};
pub use graph::{Graph, GraphBuilder, GraphError, Origin};
pub use journal::{Journal, JournalError, Record, Status};
pub use scheduler::{decide, fmt_duration, recover_handles, run, Report, RunOptions};
pub use task::{
    Cancel, CancelSource, Check, Done, EdgeRule, Handle, Policy, Task, TaskContext, TaskError,
};
