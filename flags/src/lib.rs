//! The command-line flags of the programs a deployment starts (`vllm serve`, `vllm-router`,
//! Mooncake's programs), read from the project's own tables under `data/` and embedded at
//! build time: the one parser of those tables.
//!
//! Users: the recipe checker (`vllm_extra` keys become flags), the mock engine (it parses
//! `vllm serve` arguments as vLLM does) and the tests (every rendered argv is checked, see
//! `check`, feature `testing`). This crate knows flag spellings, value kinds, types and
//! choices; it must not know recipes, TOML, deployments or how argparse reports errors.

mod line;
pub mod mooncake;
pub mod router;
pub mod vllm;

#[cfg(any(test, feature = "testing"))]
pub mod check;

/// `vllm serve` 0.33's flags, one a line (`data/vllm-serve-flags.txt`).
pub const VLLM_SERVE_TABLE: &str = include_str!("../data/vllm-serve-flags.txt");
/// `vllm-router` 0.1.17's flags, Rust binary and Python launcher (`data/vllm-router-flags.txt`).
pub const VLLM_ROUTER_TABLE: &str = include_str!("../data/vllm-router-flags.txt");
/// The flags of Mooncake's programs, one section each (`data/mooncake-flags.txt`).
pub const MOONCAKE_TABLE: &str = include_str!("../data/mooncake-flags.txt");
