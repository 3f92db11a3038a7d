//! Resident memory per task of a run with the journal on: 100,000 no-op tasks (the graph of
//! the `scheduler` bench: 100 layers of 1,000, 2 random needs each, fixed seed), recorded by
//! a [`Journal`] in a temp dir. Prints the growth of VmRSS and VmHWM (`/proc/self/status`)
//! over the run (open, decide, run, close; the graph is built before the first reading),
//! and over graph and run together, in bytes per task.
//!
//! ```sh
//! cargo run --release -p prl-flow-engine --example journal_memory
//! ```

use std::sync::Arc;

use prl_flow_engine::{decide, run, Cancel, Journal, RunOptions, Sink};

#[path = "../benches/support/layered.rs"]
mod layered;
use layered::{layered_graph, TASKS};

/// VmRSS and VmHWM of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("a memory field")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let start = memory();
    let graph = layered_graph();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let built = memory();
    let dir = tempfile::tempdir().expect("a temp dir");
    let journal = Arc::new(Journal::open(dir.path(), false, "example").expect("open"));
    let sink = Sink::new(vec![journal.recorder(&graph)]);
    rt.block_on(async {
        let decisions = decide(&graph, None).await;
        let options = RunOptions {
            jobs: 1024,
            ..RunOptions::default()
        };
        let report = run(&graph, &decisions, None, &options, sink, Cancel::never()).await;
        assert_eq!(report.summary.done, TASKS);
    });
    Arc::try_unwrap(journal)
        .map_err(|_| "shared")
        .expect("sole owner")
        .close()
        .expect("close");
    let ran = memory();
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / TASKS as f64;
    println!("{TASKS} no-op tasks, journal on, jobs 1024");
    println!(
        "graph:          RSS +{:.0} B/task, HWM +{:.0} B/task",
        per(start.0, built.0),
        per(start.1, built.1)
    );
    println!(
        "run (journal):  RSS +{:.0} B/task, HWM +{:.0} B/task",
        per(built.0, ran.0),
        per(built.1, ran.1)
    );
    println!(
        "graph and run:  RSS +{:.0} B/task, HWM +{:.0} B/task",
        per(start.0, ran.0),
        per(start.1, ran.1)
    );
}
