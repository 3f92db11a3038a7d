//! The backends built into prl-flow, and how each is made: from a recipe's `[backend]`
//! table for a run, or bare, to look after what a journal recorded.

use std::path::Path;
use std::sync::Arc;

use prl_flow_backend::{Backend, ConfigError, ProcHandle};
use serde_json::Value;

/// The backend of this machine, and the default one.
pub const LOCAL: &str = "local";

/// The backends built into this prl-flow.
pub const BUILTINS: &[&str] = &[LOCAL, "ssh", "slurm", SIM];

/// The simulated backend: a seeded model in virtual time (docs/sim.md).
pub const SIM: &str = prl_flow_sim::NAME;

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
        SIM => Ok(Arc::new(prl_flow_sim::SimBackend::configure(
            config, state_dir,
        )?)),
        _ => Ok(Arc::new(prl_flow_local::LocalBackend::new())),
    }
}

/// A built-in backend that looks after what an earlier run recorded (`status`, `logs`,
/// `down`): every handle says how to reach its process, so no table is needed (a SLURM
/// handle says which cluster, its `SLURM_CONF`, it belongs to). `None`: not a built-in name.
pub fn for_handles(name: &str, handle: Option<&ProcHandle>) -> Option<Arc<dyn Backend>> {
    Some(match name {
        "ssh" => Arc::new(handle.map_or_else(
            prl_flow_ssh::SshBackend::from_handles,
            prl_flow_ssh::SshBackend::from_handle,
        )),
        "slurm" => Arc::new(
            handle
                .and_then(|h| prl_flow_slurm::SlurmBackend::from_handle(h).ok())
                .unwrap_or_else(prl_flow_slurm::SlurmBackend::for_handles),
        ),
        LOCAL => Arc::new(prl_flow_local::LocalBackend::new()),
        SIM => Arc::new(
            handle
                .and_then(|h| prl_flow_sim::SimBackend::from_handle(h).ok())
                .unwrap_or_else(prl_flow_sim::SimBackend::for_handles),
        ),
        _ => return None,
    })
}

/// The address the local backend gives the `i`-th node of a plan (for `plan` to show).
pub fn local_address(i: usize) -> String {
    prl_flow_local::LocalBackend::address(i)
}

/// Is `name` the simulated backend? Its run keeps virtual time (a paused clock).
pub fn simulated(name: &str) -> bool {
    name == SIM
}
