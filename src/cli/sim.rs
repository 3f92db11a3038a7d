//! A simulated run (`run --backend sim`, or a recipe whose `[backend] type` is `sim`): its
//! async runtime keeps virtual time (one thread, tokio's paused clock, which jumps to the
//! next timer whenever every task waits), and `--seed` picks the model's draws.

use std::path::Path;

use super::args::{Cli, Cmd, RunArgs};
use crate::plan::Plan;
use crate::registry::builtins;
use crate::session::{self, Error};

/// Does this invocation run a plan on the simulated backend? The flag, else the file's own
/// `[backend] type`, else (a resume without the flag) a state dir that a simulated run left.
fn simulated(a: &RunArgs) -> bool {
    if let Some(b) = &a.file.backend {
        return builtins::simulated(b);
    }
    // A file whose text cannot spell a `backend` key (neither the word nor a `\u` escape)
    // names none: a large workflow is not parsed here only to learn that.
    let named = std::fs::read_to_string(&a.file.file)
        .ok()
        .filter(|s| s.contains("backend") || s.contains("\\u") || s.contains("\\U"))
        .and_then(|s| s.parse::<toml::Table>().ok())
        .and_then(|t| Some(t.get("backend")?.get("type")?.as_str()?.to_string()));
    if let Some(n) = named {
        return builtins::simulated(&n);
    }
    let dir = a.state_dir.clone().or_else(|| {
        let name = session::options::plan_name(&a.file.file).ok()?;
        Some(session::identity::state_dir_for(&name, &a.file.file).dir)
    });
    a.resume && dir.is_some_and(|d| prl_flow_sim::World::lives_in(Path::new(&d)))
}

/// The runtime of an invocation. `run` gets one thread: its scheduler is one future anyway,
/// and a child's exit then reaches it without a hand-off between threads (measured:
/// docs/benchmarks.md, "Against ninja"); a simulated run's clock is paused as well. A real
/// run's thread also asks for a short scheduler slice, so that it gets a core as soon as a
/// child's end wakes it ([`prl_flow_local::slice`]). The other commands get the
/// multi-thread one.
pub fn runtime(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    match &cli.command {
        Cmd::Run(a) => {
            let simulated = simulated(a);
            if !simulated {
                prl_flow_local::slice::short_slice();
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(simulated)
                .build()
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

/// `--seed N`: the simulated backend's seed, over its table's. Refused for another backend.
pub fn seed(a: &RunArgs, plan: &mut Plan) -> Result<(), Error> {
    let Some(seed) = a.seed else { return Ok(()) };
    if !builtins::simulated(&plan.backend) {
        return Err(Error::Usage(format!(
            "error: `--seed` is for the simulated backend; `{}` runs on `{}`\n  help: add `--backend sim`, or leave `--seed` out",
            a.file.file.display(),
            plan.backend
        )));
    }
    if !plan.backend_config.is_object() {
        plan.backend_config = serde_json::Value::Object(serde_json::Map::new());
    }
    plan.backend_config["seed"] = seed.into();
    Ok(())
}
