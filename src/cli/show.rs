//! What the command line prints: plans, status tables, decisions, run summaries. Pure
//! functions from data to text, so the output is deterministic and snapshot-tested.

use std::fmt::Write as _;
use std::path::Path;

use prl_flow_engine::{Decision, Report, Summary};

use crate::diag::count;
use crate::plan::{self, Plan};
use crate::session::{Listed, Live, TaskRow};

/// The plan as JSON. The values of secret-looking env keys and flags are `***` unless
/// `show_secrets` ([`plan::is_secret`]).
pub fn plan_json(plan: &Plan, show_secrets: bool) -> String {
    let tasks: Vec<serde_json::Value> = plan
        .tasks
        .iter()
        .map(|t| {
            let mut v = serde_json::json!({
                "id": t.id,
                "kind": t.kind,
                "needs": t.needs,
                "node": t.node,
                "service": t.service,
                "env": plan::shown_env(&t.env, show_secrets),
                "ports": t.ports,
                "ready": t.ready,
                "edges": t.edges,
                "fingerprint": t.fingerprint(),
            });
            match &t.command {
                plan::Command::Argv { argv } => {
                    v["argv"] = serde_json::json!(plan::shown_argv(argv, show_secrets))
                }
                plan::Command::Shell { script } => {
                    v["argv"] = serde_json::json!(["sh", "-c", script])
                }
                plan::Command::Builtin { action, args } => {
                    v["argv"] = serde_json::json!([]);
                    v["builtin"] = serde_json::json!({ "action": action, "args": args });
                }
            }
            if !t.files.is_empty() {
                v["files"] = serde_json::json!(t.files);
            }
            if let Some(d) = t.timeout {
                v["timeout"] = serde_json::json!(plan::format_duration(d));
            }
            if t.retries > 0 {
                v["retries"] = serde_json::json!(t.retries);
            }
            v
        })
        .collect();
    let doc = serde_json::json!({
        "name": plan.name,
        "backend": plan.backend,
        "nodes": plan.nodes,
        "endpoint": plan.endpoint,
        "layout": plan.layout,
        "tasks": tasks,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// The plan for people, secrets masked as in [`plan_json`].
pub fn plan_text(plan: &Plan, show_secrets: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan `{}`: {} tasks, backend `{}`{}",
        plan.name,
        plan.tasks.len(),
        plan.backend,
        if plan.nodes.is_empty() {
            String::new()
        } else {
            format!(", nodes {}", plan.nodes.join(" "))
        }
    );
    if let Some(l) = &plan.layout {
        s.push_str(&layout_text(l));
    }
    for t in &plan.tasks {
        let _ = writeln!(s);
        let svc = if t.service { " (service)" } else { "" };
        let _ = writeln!(s, "{} [{}]{svc}", t.id, t.kind);
        if let Some(n) = &t.node {
            let _ = writeln!(s, "  node:   {n}");
        }
        if !t.needs.is_empty() {
            let _ = writeln!(s, "  needs:  {}", t.needs.join(", "));
        }
        // What a resume does to it when a need re-runs, where that is not "re-run too".
        let mut by_edge: Vec<(&plan::Edge, Vec<&str>)> = Vec::new();
        for (up, e) in &t.edges {
            match by_edge.iter_mut().find(|(x, _)| *x == e) {
                Some((_, ids)) => ids.push(up),
                None => by_edge.push((e, vec![up])),
            }
        }
        for (e, ids) in by_edge {
            let more = match ids.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            let _ = writeln!(
                s,
                "  resume: when `{}`{more} re-runs, it {}",
                ids[0],
                e.describe()
            );
        }
        let _ = writeln!(s, "  run:    {}", t.shown_command_line(show_secrets));
        for (k, v) in &plan::shown_env(&t.env, show_secrets) {
            let _ = writeln!(s, "  env:    {k}={v}");
        }
        for f in &t.files {
            let _ = writeln!(s, "  file:   {} ({} bytes)", f.path, f.content.len());
        }
        if !t.ports.is_empty() {
            let ports: Vec<String> = t.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(s, "  ports:  {}", ports.join(", "));
        }
        if let Some(r) = &t.ready {
            let mut line = format!(
                "  ready:  {} every {}",
                r.probe.describe(),
                plan::format_duration(r.interval)
            );
            if !r.start_period.is_zero() {
                line.push_str(&format!(
                    ", start period {}",
                    plan::format_duration(r.start_period)
                ));
            }
            if let Some(t) = r.ready_timeout {
                line.push_str(&format!(", give up after {}", plan::format_duration(t)));
            }
            let _ = writeln!(s, "{line}");
        }
        if let Some(d) = t.timeout {
            let _ = writeln!(s, "  timeout: {}", plan::format_duration(d));
        }
        if t.retries > 0 {
            let _ = writeln!(s, "  retries: {}", t.retries);
        }
    }
    s
}

/// `validate`'s answer.
pub fn valid(file: &Path, plan: &Plan) -> String {
    let services = plan.tasks.iter().filter(|t| t.service).count();
    let mut s = format!(
        "`{}` is valid: {} ({}) on {}, backend `{}`\n",
        file.display(),
        count(plan.tasks.len(), "task"),
        count(services, "service"),
        count(plan.nodes.len(), "node"),
        plan.backend
    );
    if let Some(l) = &plan.layout {
        let _ = writeln!(s, "layout: {}", l.summary);
    }
    s
}

/// The layout: its summary, then per node each process's ranks, GPUs and ports.
pub fn layout_text(l: &plan::Layout) -> String {
    let mut s = format!("\nlayout: {}\n", l.summary);
    let width = l
        .nodes
        .iter()
        .flat_map(|n| n.processes.iter().map(|p| p.task.len()))
        .max()
        .unwrap_or(0);
    for n in &l.nodes {
        let _ = writeln!(s, "  {}:", n.node);
        for p in &n.processes {
            let ports: Vec<String> = p.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(
                s,
                "    {:<width$}  ranks {:<5}  gpus {:<8}  ports {}",
                p.task,
                p.ranks,
                p.gpus,
                ports.join(",")
            );
        }
    }
    s
}

/// Per task, in order, what it will do and why.
pub fn explain<'a>(decisions: impl Iterator<Item = (&'a str, &'a Decision)>) -> String {
    let rows: Vec<(&str, &Decision)> = decisions.collect();
    let width = rows.iter().map(|(id, _)| id.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (id, d) in rows {
        let (word, why) = match d {
            Decision::Keep => ("keep", "done, unchanged and still valid".to_string()),
            Decision::Adopt => ("adopt", "still in flight from the last run".to_string()),
            Decision::Run(r) => ("run", r.to_string()),
        };
        let _ = writeln!(s, "{word:<5} {id:<width$}  {why}");
    }
    s
}

/// `status`'s table.
pub fn status_table(rows: &[TaskRow]) -> String {
    let width = rows
        .iter()
        .map(|r| r.record.id.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!(
        "{:<width$}  {:<15} {:<10} {:<6} {}\n",
        "TASK", "KIND", "STATUS", "LIVE", "DETAIL"
    );
    for row in rows {
        let r = &row.record;
        let line = format!(
            "{:<width$}  {:<15} {:<10} {:<6} {}",
            r.id,
            r.kind,
            r.status.as_str(),
            row.live.as_str(),
            row.detail
        );
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// The refusal of a fresh run on a state dir with live services. `file` is what `down`
/// takes, `rerun` what `run` takes (the file with the options to run it with).
pub fn live_services(dir: &Path, ids: &[Live], file: &str, rerun: &str) -> String {
    let mut msg = format!(
        "error: `{}` has work from an earlier run that still runs or may: {}\n  help: `prl-flow run {rerun} --resume` keeps what is still valid and runs the rest;\n        `prl-flow down {file}` stops it first",
        dir.display(),
        Live::joined(ids)
    );
    if ids.iter().any(|i| i.unsure) {
        msg.push_str(&format!(
            "\n        a host that does not answer must answer again first; if it is gone for good, \
             pass another `--state-dir` (`{}` keeps what it knew of the run)",
            dir.display()
        ));
    }
    msg
}

/// The closing line of a run that went well.
pub fn ok_line(s: &Summary) -> String {
    let took = prl_flow_engine::fmt_duration(std::time::Duration::from_millis(s.elapsed_ms));
    let kept = if s.kept > 0 {
        format!(", {} kept", s.kept)
    } else {
        String::new()
    };
    format!("ok: {} done{kept} in {took}", count(s.done, "task"))
}

/// The one line a cancelled run ends with: why it stopped, the counts, and what it left.
/// `by` is the signal's name, or who sent it (`prl-flow down`).
pub fn cancelled_line(report: &Report, by: &str, keep: bool, file: &str) -> String {
    let s = &report.summary;
    let took = prl_flow_engine::fmt_duration(std::time::Duration::from_millis(s.elapsed_ms));
    let left = if keep {
        format!("services it started are left running (--keep); `prl-flow down {file}` stops them")
    } else if !report.unstopped.is_empty() {
        let ids: Vec<&str> = report.unstopped.iter().map(|(id, _)| id.as_str()).collect();
        format!(
            "{} could not be stopped and may still run: {}; `prl-flow down {file}` tries again",
            count(ids.len(), "task"),
            ids.join(", ")
        )
    } else {
        "everything it started is stopped".to_string()
    };
    format!(
        "cancelled by {by} after {took}: {} done, {} kept, {} cancelled, {} skipped; {left}",
        s.done, s.kept, s.cancelled, s.skipped
    )
}

/// The story of a run that failed or was cancelled: each task's error, the counts, and
/// what to do next: `file` is what `down` takes, `rerun` what `run` takes.
pub fn failure(plan: &Plan, report: &Report, keep: bool, file: &str, rerun: &str) -> String {
    let s = &report.summary;
    let left_loading = if s.left > 0 {
        format!(
            "; {} left loading (--keep): `prl-flow run {file} --resume` adopts {}",
            count(s.left, "service"),
            if s.left == 1 { "it" } else { "them" }
        )
    } else {
        String::new()
    };
    let took = prl_flow_engine::fmt_duration(std::time::Duration::from_millis(s.elapsed_ms));
    let mut msg = String::new();
    for (i, e) in report.errors.iter().enumerate() {
        if let (Some(e), Some(o)) = (e, report.outcomes[i]) {
            let _ = writeln!(
                msg,
                "error: task `{}` {}: {}",
                plan.tasks[i].id,
                o.as_str(),
                e.message
            );
        }
    }
    let what = if report.cancelled {
        "run cancelled"
    } else {
        "run failed"
    };
    let _ = writeln!(
        msg,
        "{what}: {} done, {} kept, {} failed, {} timed out, {} cancelled, {} skipped ({took}){left_loading}",
        s.done, s.kept, s.failed, s.timed_out, s.cancelled, s.skipped
    );
    if keep {
        let _ = writeln!(
            msg,
            "services were left running (--keep); `prl-flow down {file}` stops them"
        );
    }
    if !report.unstopped.is_empty() {
        for (id, why) in &report.unstopped {
            // A task's own error, above, already says why its stop failed.
            let said = plan
                .tasks
                .iter()
                .zip(&report.errors)
                .any(|(t, e)| t.id == *id && e.as_ref().is_some_and(|e| e.still_running));
            if !said {
                let _ = writeln!(
                    msg,
                    "error: `{id}` could not be stopped and may still run: {why}"
                );
            }
        }
        let ids: Vec<&str> = report.unstopped.iter().map(|(id, _)| id.as_str()).collect();
        let _ = writeln!(
            msg,
            "  help: {} may still run; `prl-flow down {file}` tries again",
            ids.join(", ")
        );
    }
    msg.push_str(&format!(
        "  help: fix the cause, then `prl-flow run {rerun} --resume` re-runs only what failed and what depends on it"
    ));
    msg
}

/// A path as people read it: relative to the current directory when under it.
pub fn shown_path(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            let cwd = cwd.canonicalize().unwrap_or(cwd);
            p.strip_prefix(&cwd).ok().map(|r| r.display().to_string())
        })
        .unwrap_or_else(|| p.display().to_string())
}

/// `ls`'s table: one state dir a line.
pub fn list_table(listed: &[Listed]) -> String {
    if listed.is_empty() {
        return "no deployments or workflows under `.prl-flow/`\n".into();
    }
    let rows: Vec<[String; 4]> = listed
        .iter()
        .map(|l| {
            [
                l.dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                l.file.as_deref().map_or_else(|| "-".into(), shown_path),
                match &l.state {
                    Ok(s) => s.as_str().to_string(),
                    Err(why) => format!("unknown ({why})"),
                },
                l.endpoint.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let head = ["NAME", "FILE", "STATE", "ENDPOINT"].map(String::from);
    let w: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .chain(std::iter::once(&head))
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let line = format!(
            "{:<a$}  {:<b$}  {:<c$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            a = w[0],
            b = w[1],
            c = w[2]
        );
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(entry: &str, unsure: bool) -> Live {
        Live {
            entry: entry.into(),
            unsure,
        }
    }

    /// The way on without an unreachable host is offered when an entry is unsure, whatever
    /// the entries' words: a task's id is no flag.
    #[test]
    fn a_refusal_offers_another_state_dir_only_when_the_backend_could_not_tell() {
        let dir = Path::new("/s");
        let alive = [live("its backend could not", false), live("router", false)];
        let msg = live_services(dir, &alive, "f.toml", "f.toml");
        assert!(
            msg.contains("still runs or may: its backend could not, router"),
            "{msg}"
        );
        assert!(!msg.contains("gone for good"), "{msg}");
        let unsure = [live("engine (no answer)", true)];
        let msg = live_services(dir, &unsure, "f.toml", "f.toml");
        assert!(msg.contains("gone for good"), "{msg}");
        assert!(msg.contains("another `--state-dir`"), "{msg}");
    }
}
