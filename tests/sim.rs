//! The simulated backend (`--backend sim`), with the real binary: a 10,000-node
//! disaggregated bring-up runs to its end in virtual time and prints its timeline; the same
//! seed gives the same timeline; with 1% of nodes that never come up, no task starts twice,
//! every failure is reported once, and `down` stops everything the model says runs.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{output_within, Out, Sandbox};

/// The repository's 10,000-node recipe, written into the sandbox with extra `[backend]`
/// lines.
fn recipe(sb: &Sandbox, name: &str, backend_lines: &str) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/sim/disaggregated_10k.toml");
    let text = std::fs::read_to_string(&path).expect("read the 10k recipe");
    let text = text.replace(
        "[backend]\ntype = \"sim\"\n",
        &format!("[backend]\ntype = \"sim\"\n{backend_lines}"),
    );
    let file = format!("{name}.toml");
    sb.write(&file, &text);
    file
}

/// `prl-flow ARGS` with a deadline that only guards against a hang (no timing is asserted).
fn run(sb: &Sandbox, args: &[&str]) -> Out {
    output_within(sb.cmd(args), Duration::from_secs(600))
}

/// The timeline block of a run's stdout.
fn timeline(out: &Out) -> String {
    let start = out
        .stdout
        .find("simulated bring-up")
        .unwrap_or_else(|| panic!("no timeline:\n{}\n{}", out.stdout, out.stderr));
    out.stdout[start..].to_string()
}

struct Spawn {
    p: usize,
    task: String,
    attempt: u64,
}

/// The world file's spawns and stops.
fn world(sb: &Sandbox, state: &str) -> (Vec<Spawn>, Vec<usize>) {
    let text = std::fs::read_to_string(sb.join(state).join("sim/world.jsonl")).expect("world");
    let mut spawns = Vec::new();
    let mut stops = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        match v["ev"].as_str() {
            Some("spawn") => spawns.push(Spawn {
                p: v["p"].as_u64().expect("p") as usize,
                task: v["task"].as_str().expect("task").to_string(),
                attempt: v["attempt"].as_u64().expect("attempt"),
            }),
            Some("stop") => stops.push(v["p"].as_u64().expect("p") as usize),
            _ => {}
        }
    }
    (spawns, stops)
}

#[test]
fn ten_thousand_nodes_come_up_with_a_timeline_the_same_for_the_same_seed() {
    let sb = Sandbox::new();
    let file = recipe(&sb, "big", "");
    let a = run(&sb, &["run", &file, "--state-dir", "a", "--seed", "7"]);
    a.expect_code(0);
    let t = timeline(&a);
    println!("{t}");
    for group in [
        "allocation",
        "mooncake",
        "prefill",
        "decode",
        "routers",
        "register",
        "health",
    ] {
        assert!(t.contains(&format!("\n  {group} ")), "no {group} row:\n{t}");
    }
    assert!(t.contains("critical path"), "{t}");
    assert!(t.contains("stragglers"), "{t}");
    assert!(t.contains("modelled failures: 0 (each once)"), "{t}");
    assert!(
        t.contains("stopped before they were up (a ready timeout, or cancelled): 0;"),
        "{t}"
    );
    // 10,000 engines, 10,000 Mooncake clients and two Mooncake servers, 100 routers.
    assert!(t.contains("  prefill         4000 "), "{t}");
    assert!(t.contains("  decode          6000 "), "{t}");
    assert!(t.contains("  mooncake       10002 "), "{t}");
    let (spawns, _) = world(&sb, "a");
    assert_eq!(spawns.len(), 20_102);

    let again = run(&sb, &["run", &file, "--state-dir", "b", "--seed", "7"]);
    again.expect_code(0);
    assert_eq!(timeline(&again), t, "the same seed, another timeline");
    let other = run(&sb, &["run", &file, "--state-dir", "c", "--seed", "8"]);
    other.expect_code(0);
    assert_ne!(timeline(&other), t, "another seed, the same timeline");
    for d in ["a", "b", "c"] {
        run(&sb, &["down", "--state-dir", d]).expect_code(0);
    }
}

#[test]
fn one_percent_dead_nodes_each_failure_once_nothing_started_twice_and_down_stops_all() {
    let sb = Sandbox::new();
    let file = recipe(&sb, "dead", "node_dead = 0.01\n");
    // `--keep`: what came up stays up after the failed run, for `down` to stop.
    let out = run(
        &sb,
        &["run", &file, "--state-dir", "s", "--keep-going", "--keep"],
    );
    out.expect_code(1);
    let t = timeline(&out);
    println!("{t}");

    let (spawns, stops) = world(&sb, "s");
    // No task started twice: one process per task, attempt 1 (the plan has no retries).
    let mut per_task: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &spawns {
        *per_task.entry(&s.task).or_default() += 1;
        assert_eq!(s.attempt, 1, "`{}` started again", s.task);
    }
    assert!(per_task.values().all(|n| *n == 1));
    // Every failure reported once: each process on a dead node hangs until its ready
    // timeout stops it, and its line names it once.
    let failed: Vec<&str> = t
        .lines()
        .filter(|l| l.contains(": its node never came up at "))
        .map(|l| l.trim().split(' ').next().unwrap_or_default())
        .collect();
    assert!(!failed.is_empty(), "no failures at 1%:\n{t}");
    let mut unique = failed.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), failed.len(), "a failure reported twice:\n{t}");
    let said: usize = t
        .lines()
        .find_map(|l| l.strip_prefix("modelled failures: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a failures line");
    assert_eq!(said, failed.len(), "{t}");
    // Each was stopped once, and the failure also appears in the run's own report.
    for task in &failed {
        assert!(
            out.stderr.contains(task),
            "`{task}` missing from the report"
        );
        let p: Vec<usize> = spawns
            .iter()
            .filter(|s| s.task == *task)
            .map(|s| s.p)
            .collect();
        assert_eq!(stops.iter().filter(|s| p.contains(s)).count(), 1, "{task}");
    }

    // With --keep-going, the units without a dead node come up, and --keep leaves them up.
    let running: usize = t
        .lines()
        .find_map(|l| l.split("running at the end: ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .expect("a running count");
    assert!(running > 0, "{t}");
    let down = run(&sb, &["down", "--state-dir", "s"]);
    down.expect_code(0);
    let stopped = |o: &Out| {
        o.stderr
            .lines()
            .filter(|l| l.starts_with("stopped "))
            .count()
    };
    assert_eq!(stopped(&down), running, "{}", down.stderr);
    // The world agrees: a stop for each, and nothing is left for a second `down`.
    let (_, after) = world(&sb, "s");
    assert_eq!(after.len() - stops.len(), running);
    let again = run(&sb, &["down", "--state-dir", "s"]);
    assert_eq!(stopped(&again), 0, "{}", again.stderr);
}
