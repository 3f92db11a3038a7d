//! prl-flow-engine: a generic async runner for graphs of tasks, with a journal and resume.
//!
//! The flow: add [`Task`]s to a [`GraphBuilder`], [`seal`](GraphBuilder::seal) it into a
//! [`Graph`] (all errors at once: duplicates, unknown dependencies, cycles), let
//! [`decide`] say what runs (everything, or on resume only what is not still valid), then
//! [`run`] it with [`Subscriber`]s listening. A [`Journal`] is one such subscriber: it keeps
//! what each task did in a state dir, so a later process can resume, report or tear down.
//!
//! The engine knows tasks, edges, states and events; nothing of what the tasks do.

pub mod event;
pub mod graph;
pub mod journal;
pub mod scheduler;
pub mod task;
pub mod testing;

pub use event::{Decision, Event, Outcome, Reason, Sink, Subscriber, Summary};
pub use graph::{Graph, GraphBuilder, GraphError, Origin};
pub use journal::{Journal, JournalError, Record, Status};
pub use scheduler::{decide, fmt_duration, recover_handles, run, Report, RunOptions};
pub use task::{Cancel, CancelSource, Check, Done, Handle, Policy, Task, TaskContext, TaskError};
