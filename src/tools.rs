//! The outside programs a deployment starts and where prl-flow finds them: the router
//! (`vllm-router`) and Mooncake's programs. `./dev` installs both into venvs under the cache
//! dir; [`put_on_path`] makes them findable by every process prl-flow starts.

use std::path::{Path, PathBuf};

/// The router version `./dev` installs, and where: `$XDG_CACHE_HOME/prl-flow/router-VERSION`.
pub const ROUTER_VERSION: &str = "0.1.17";

/// The Mooncake wheel `./dev` installs (`mooncake-transfer-engine-non-cuda`), and where:
/// `$XDG_CACHE_HOME/prl-flow/mooncake-VERSION`.
pub const MOONCAKE_VERSION: &str = "0.3.13.post1";

/// The venv `./dev` installs the router into.
pub fn router_venv() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(
        cache
            .join("prl-flow")
            .join(format!("router-{ROUTER_VERSION}")),
    )
}

/// Makes `vllm-router` findable by the processes prl-flow starts: `PRL_FLOW_ROUTER` (a path
/// to the program) comes first; else the venv `./dev` installs is searched after the
/// user's own PATH. Call it before any thread starts (it sets `PATH`).
pub fn put_on_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(p) = std::env::var_os("PRL_FLOW_ROUTER") {
        if let Some(d) = Path::new(&p).parent() {
            dirs.insert(0, d.to_path_buf());
        }
    } else if let Some(v) = router_venv() {
        dirs.push(v.join("bin"));
    }
    // Mooncake's programs, for the steps of a slurm deployment (srun passes PATH on):
    // `PRL_FLOW_MOONCAKE` (its bin dir), else the venv `./dev` installs.
    if let Some(p) = std::env::var_os("PRL_FLOW_MOONCAKE") {
        dirs.push(PathBuf::from(p));
    } else if let Some(v) =
        router_venv().and_then(|r| Some(r.parent()?.join(format!("mooncake-{MOONCAKE_VERSION}"))))
    {
        dirs.push(v.join("bin"));
    }
    if let Ok(joined) = std::env::join_paths(dirs) {
        std::env::set_var("PATH", joined);
    }
}
