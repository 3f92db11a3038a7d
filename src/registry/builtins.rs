//! The backends built into prl-flow, and how each is made: from a recipe's `[backend]`
//! table for a run, or bare, to look after what a journal recorded.

use std::path::Path;
use std::sync::Arc;

use prl_flow_backend::{Backend, ConfigError};
use serde_json::Value;

/// The backends built into this prl-flow.
pub const BUILTINS: &[&str] = &["local", "ssh", "slurm"];

/// A built-in backend, made from its `[backend]` table; relative paths in the table are
/// taken from `base` (the recipe's directory) when given, else from the current directory.
pub fn make(
    name: &str,
    config: &Value,
    base: Option<&Path>,
    state_dir: &Path,
) -> Result<Arc<dyn Backend>, Vec<ConfigError>> {
    match name {
        "ssh" => Ok(Arc::new(prl_flow_ssh::SshBackend::configure(
            config, base, state_dir,
        )?)),
        "slurm" => Ok(Arc::new(prl_flow_slurm::SlurmBackend::configure(
            config, state_dir,
        )?)),
        _ => Ok(Arc::new(prl_flow_local::LocalBackend::new())),
    }
}

/// A built-in backend that looks after what an earlier run recorded (`status`, `logs`,
/// `down`): every handle says how to reach its process, so no table is needed. `None`: not
/// a built-in name.
pub fn for_handles(name: &str) -> Option<Arc<dyn Backend>> {
    Some(match name {
        "ssh" => Arc::new(prl_flow_ssh::SshBackend::from_handles()),
        "slurm" => Arc::new(prl_flow_slurm::SlurmBackend::for_handles()),
        "local" => Arc::new(prl_flow_local::LocalBackend::new()),
        _ => return None,
    })
}
