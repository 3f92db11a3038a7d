//! prl-flow: bring up LLM inference deployments (vLLM engines, the vllm-router, a Mooncake
//! KV-cache store) as a dependency graph of tasks.
//!
//! The flow of data, one module a step: a file (a deployment [`recipe`] or a plain
//! [`workflow`]) becomes a [`plan`], pure data; [`exec`] turns each task spec into an
//! engine task bound to a backend that the [`registry`] made (built-in [`actions`] run in
//! prl-flow itself); the engine (`prl-flow-engine`) runs the graph. The [`session`] API
//! does all of this for a caller; the [`cli`] is one caller, and only parses and prints.
//!
//! This crate must not know how a backend reaches its machines (that is `plugins/`), nor
//! how the engine schedules (that is `engine/`).

pub mod actions;
pub mod cli;
pub mod diag;
pub mod exec;
pub mod import;
pub mod plan;
pub mod recipe;
pub mod registry;
pub mod session;
pub mod site;
pub mod tools;
pub mod workflow;
