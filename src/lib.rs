//! prl-flow: bring up LLM inference deployments (vLLM engines, the vllm-router, a Mooncake
//! KV-cache store) as a dependency graph of tasks.
//!
//! The flow of data: a file (a deployment [`recipe`] or a plain [`workflow`]) becomes a
//! [`plan::Plan`], pure data; [`exec`] turns each task spec into an engine task bound to a
//! backend; the engine runs the graph; the [`cli`] shows events and writes the journal.

pub mod actions;
pub mod cli;
pub mod diag;
pub mod exec;
pub mod plan;
pub mod recipe;
pub mod registry;
pub mod session;
pub mod site;
pub mod tools;
pub mod workflow;
