//! The bring-up timeline of a simulated run, in virtual time: when each group (allocation,
//! Mooncake, prefill, decode, routers, registration, health) became ready, the critical
//! path (the last task in of each group), the stragglers (the slowest engines), and every
//! failure once, with what followed it (a retry, or nothing).

use std::collections::BTreeMap;
use std::fmt::Write;

use prl_flow_backend::ProcState;

use crate::model::Kind;
use crate::world::{Proc, World};

/// Virtual ms as a short clock reading: `12.3s`, `4m05.0s`, `1h02m03s`.
pub fn clock(ms: u64) -> String {
    let s = ms as f64 / 1000.0;
    if ms < 60_000 {
        format!("{s:.1}s")
    } else if ms < 3_600_000 {
        format!("{}m{:04.1}s", ms / 60_000, (ms % 60_000) as f64 / 1000.0)
    } else {
        let t = ms / 1000;
        format!("{}h{:02}m{:02}s", t / 3600, t / 60 % 60, t % 60)
    }
}

/// When a process was up: a service when a probe found it ready, a one-shot when it exited 0.
fn up_at(p: &Proc, now: u64) -> Option<u64> {
    if p.service {
        return p.seen_ready;
    }
    let r = p.ready_at.filter(|r| *r <= now)?;
    (p.crash_at.map_or(true, |c| c > r) && p.stopped.map_or(true, |s| s > r)).then_some(r)
}

/// Why a process failed, and when, if it did: a crash before it was stopped, or a node that
/// never came up (the process hung until it was stopped).
fn failure(p: &Proc, now: u64) -> Option<(u64, &str)> {
    let why = p.why.as_deref()?;
    let end = p.stopped.unwrap_or(now).min(now);
    match p.crash_at {
        Some(c) if c <= end => Some((c, why)),
        None if p.ready_at.is_none() && p.stopped.is_some() => Some((end, why)),
        _ => None,
    }
}

struct Group<'a> {
    tasks: BTreeMap<&'a str, &'a Proc>,
}

pub fn render(w: &World, first: usize, first_call: usize, now: u64, seed: u64) -> String {
    let procs = &w.procs[first.min(w.procs.len())..];
    let calls = &w.calls[first_call.min(w.calls.len())..];
    let mut groups: BTreeMap<Kind, Group> = BTreeMap::new();
    for p in procs {
        // The last attempt of a task is the one that counts.
        groups
            .entry(p.kind)
            .or_insert_with(|| Group {
                tasks: BTreeMap::new(),
            })
            .tasks
            .insert(&p.task, p);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "simulated bring-up (seed {seed}), in virtual time; the run ended at {}",
        clock(now)
    );
    let _ = writeln!(
        out,
        "  {:<12} {:>7} {:>11} {:>11} {:>9}",
        "group", "tasks", "first up", "all up", "not up"
    );
    let mut path: Vec<String> = Vec::new();
    let call_row = |out: &mut String, path: &mut Vec<String>, name: &str, prefix: &str| {
        let mine: Vec<_> = calls
            .iter()
            .filter(|c| c.what.starts_with(prefix))
            .collect();
        if mine.is_empty() {
            return;
        }
        let ok: Vec<_> = mine.iter().filter(|c| c.error.is_none()).collect();
        let firstup = ok.iter().map(|c| c.done).min();
        let last = ok.iter().max_by_key(|c| c.done);
        let failed = mine.len() - ok.len();
        let _ = writeln!(
            out,
            "  {:<12} {:>7} {:>11} {:>11} {:>9}",
            name,
            mine.len(),
            firstup.map_or("-".into(), clock),
            if failed == 0 {
                last.map_or("-".into(), |c| clock(c.done))
            } else {
                "-".into()
            },
            failed
        );
        if let Some(c) = last {
            path.push(format!(
                "{name:<12} {}: {} → {}",
                c.what,
                clock(c.asked),
                clock(c.done)
            ));
        }
    };
    call_row(&mut out, &mut path, "allocation", "allocate");
    for (kind, g) in &groups {
        let ups: Vec<(u64, &Proc)> = g
            .tasks
            .values()
            .filter_map(|p| up_at(p, now).map(|t| (t, *p)))
            .collect();
        let not_up = g.tasks.len() - ups.len();
        let firstup = ups.iter().map(|(t, _)| *t).min();
        let last = ups.iter().max_by_key(|(t, p)| (*t, &p.task));
        let _ = writeln!(
            out,
            "  {:<12} {:>7} {:>11} {:>11} {:>9}",
            kind.name(),
            g.tasks.len(),
            firstup.map_or("-".into(), clock),
            match (not_up, last) {
                (0, Some((t, _))) => clock(*t),
                _ => "-".into(),
            },
            not_up
        );
        if let Some((t, p)) = last {
            path.push(format!(
                "{:<12} {}{}: asked {}, launched {}, up {}",
                kind.name(),
                p.task,
                p.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                clock(p.asked),
                clock(p.launched),
                clock(*t)
            ));
        }
    }
    call_row(&mut out, &mut path, "register", "register");
    call_row(&mut out, &mut path, "health", "health-probe");

    let _ = writeln!(out, "critical path (the last one up in each group):");
    for line in &path {
        let _ = writeln!(out, "  {line}");
    }

    let mut loads: Vec<(u64, &Proc)> = procs
        .iter()
        .filter(|p| p.kind.is_engine())
        .filter_map(|p| up_at(p, now).map(|t| (t - p.launched, p)))
        .collect();
    loads.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.task.cmp(&b.1.task)));
    if !loads.is_empty() {
        let median = loads[loads.len() / 2].0;
        let _ = writeln!(
            out,
            "stragglers (slowest engines from launch to ready; median {}):",
            clock(median)
        );
        for (took, p) in loads.iter().take(5) {
            let _ = writeln!(
                out,
                "  {}{}: {} (up at {})",
                p.task,
                p.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                clock(*took),
                clock(up_at(p, now).unwrap_or(0))
            );
        }
    }

    let mut failures = Vec::new();
    for p in procs {
        if let Some((at, why)) = failure(p, now) {
            let next = w.by_task.get(&p.task).and_then(|all| {
                all.iter()
                    .map(|i| &w.procs[*i])
                    .find(|q| q.attempt == p.attempt + 1)
            });
            let then = match next {
                Some(q) => match up_at(q, now) {
                    Some(t) => format!("retried: attempt {} up at {}", q.attempt, clock(t)),
                    None => format!("retried: attempt {} not up", q.attempt),
                },
                None => "not retried".into(),
            };
            failures.push(format!(
                "  {} (attempt {}){}: {why} at {}; {then}",
                p.task,
                p.attempt,
                p.node
                    .as_deref()
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                clock(at)
            ));
        }
    }
    for c in calls {
        if let Some(e) = &c.error {
            failures.push(format!("  {} failed at {}: {e}", c.what, clock(c.done)));
        }
    }
    let stopped = procs
        .iter()
        .filter(|p| {
            p.stopped.is_some() && failure(p, now).is_none() && p.state(now) != ProcState::Running
        })
        .count();
    let running = procs
        .iter()
        .filter(|p| p.state(now) == ProcState::Running)
        .count();
    // Stopped by prl-flow while still loading: a ready timeout, or the cancel after
    // another task failed. The run's own messages name each one.
    let never_up: Vec<&str> = procs
        .iter()
        .filter(|p| p.stopped.is_some() && failure(p, now).is_none() && up_at(p, now).is_none())
        .map(|p| p.task.as_str())
        .collect();
    let _ = writeln!(
        out,
        "modelled failures: {} (each once); stopped before they were up (a ready timeout, or cancelled): {}; processes stopped: {stopped}; running at the end: {running}",
        failures.len(),
        never_up.len()
    );
    for f in failures {
        let _ = writeln!(out, "{f}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clock;

    #[test]
    fn clock_readings() {
        assert_eq!(clock(12_345), "12.3s");
        assert_eq!(clock(245_000), "4m05.0s");
        assert_eq!(clock(3_723_000), "1h02m03s");
    }
}
