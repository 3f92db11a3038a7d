//! Site plugins: a backend in its own executable, in any language.
//!
//! Every cluster is a little different (a container wrapper, a scheduler other than SLURM,
//! a site's way to pick hosts). Rather than fork prl-flow, a site writes an executable
//! named `prl-flow-backend-<name>` that speaks a small JSON-lines protocol over stdin and
//! stdout ([`protocol`]). prl-flow starts it and talks to it through [`PluginBackend`],
//! which implements the same [`Backend`](prl_flow_backend::Backend) trait as the built-in
//! backends, so the runner cannot tell them apart. (A Rust site may skip the process and
//! implement the trait in a library crate instead.)
//!
//! A site knows its plugin works by running [`conformance()`]: the fixed scenario behind
//! `prl-flow plugin test NAME` (allocate two nodes, run a one-shot, spawn a service, probe
//! it, check it, reattach after a restart, read its log, stop it, release), which the
//! built-in backends pass too.
//!
//! Where plugins are found (a site file, a recipe, `PATH`) is decided by the prl-flow
//! binary; this crate only scans `PATH` ([`on_path`], [`scan_path`]). It must not know
//! recipes, site files, the journal, or any built-in backend.

pub mod client;
pub mod conformance;
pub mod protocol;

use std::path::{Path, PathBuf};

pub use client::{plugin_path, PluginBackend, Timeouts};
pub use conformance::{conformance, ConformanceSummary, Scenario, Step, StepOutcome};
pub use protocol::{Hello, EXE_PREFIX, PROTOCOL};

/// Is `path` a file someone may execute?
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first `prl-flow-backend-<name>` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(format!("{EXE_PREFIX}{name}")))
        .find(|p| is_executable(p))
}

/// Every plugin on `PATH`: (name, executable), by name; where a name occurs twice, the
/// first directory wins, as it does for the shell.
pub fn scan_path() -> Vec<(String, PathBuf)> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for dir in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut here: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().to_str()?.to_string();
                let name = file.strip_prefix(EXE_PREFIX)?.to_string();
                (!name.is_empty() && is_executable(&e.path())).then(|| (name, e.path()))
            })
            .collect();
        here.sort();
        for (name, p) in here {
            if !found.iter().any(|(n, _)| *n == name) {
                found.push((name, p));
            }
        }
    }
    found.sort();
    found
}
