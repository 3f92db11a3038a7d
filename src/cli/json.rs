//! What the command line prints for scripts (`--format json`): `ls`, `status` and
//! `validate`. Each document's shape is fixed by a JSON Schema in `docs/schemas/`, and the
//! tests check real outputs against it; a field is only ever added, never renamed.

use std::path::Path;

use serde_json::{json, Value};

use crate::diag::Problems;
use crate::plan::Plan;
use crate::session::{Listed, Liveness, Overall, TaskRow};

/// Pretty JSON with a closing newline.
pub fn text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// `ls --format json`: an array, one object per state dir.
pub fn list_json(listed: &[Listed]) -> String {
    let items: Vec<Value> = listed
        .iter()
        .map(|l| {
            json!({
                "name": l.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
                "state_dir": path(&l.dir),
                "file": l.file.as_deref().map(path),
                "state": l.state.as_ref().ok().map(|s| s.as_str()),
                "error": l.state.as_ref().err(),
                "endpoint": l.endpoint,
            })
        })
        .collect();
    text(&Value::Array(items))
}

/// `status --format json`: the state dir, its file, its state as a whole, and every task.
pub fn status_json(dir: &Path, rows: &[TaskRow]) -> String {
    let identity = crate::session::identity::read(dir);
    let tasks: Vec<Value> = rows
        .iter()
        .map(|row| {
            let r = &row.record;
            json!({
                "id": r.id,
                "kind": r.kind,
                "service": r.service,
                "status": r.status.as_str(),
                "live": match row.live {
                    Liveness::Up => "up",
                    Liveness::Down => "down",
                    Liveness::NotApplicable => "n/a",
                    Liveness::Unknown => "unknown",
                },
                "detail": row.detail,
                "node": r.meta.get("node").and_then(Value::as_str),
                "attempts": r.attempts,
                "exit_code": r.exit_code,
                "error": r.error,
            })
        })
        .collect();
    text(&json!({
        "state_dir": path(dir),
        "file": identity.as_ref().map(|i| path(&i.file)),
        "state": Overall::of(rows).as_str(),
        "endpoint": identity.and_then(|i| i.endpoint),
        "tasks": tasks,
    }))
}

/// `validate --format json` of a valid file.
pub fn valid_json(file: &Path, plan: &Plan) -> String {
    text(&json!({
        "file": path(file),
        "valid": true,
        "problems": [],
        "plan": {
            "name": plan.name,
            "backend": plan.backend,
            "tasks": plan.tasks.len(),
            "services": plan.tasks.iter().filter(|t| t.service).count(),
            "nodes": plan.nodes.len(),
            "layout": plan.layout.as_ref().map(|l| l.summary.as_str()),
        },
    }))
}

/// `validate --format json` of a file with problems, each with its place (line and column
/// from 1; `null` when a problem has no single place).
pub fn problems_json(file: &Path, problems: &Problems) -> String {
    let items: Vec<Value> = problems
        .items
        .iter()
        .map(|p| {
            let place = p
                .span
                .as_ref()
                .map(|s| crate::diag::line_col(&problems.source, s.start));
            json!({
                "file": problems.path,
                "line": place.map(|(l, _)| l),
                "column": place.map(|(_, c)| c),
                "message": p.message,
                "label": (!p.label.is_empty()).then_some(&p.label),
                "help": p.help,
            })
        })
        .collect();
    text(&json!({ "file": path(file), "valid": false, "problems": items }))
}

/// `validate --format json` of a file that could not be checked at all (it cannot be read,
/// a flag is wrong): the message as one problem without a place.
pub fn usage_json(file: &Path, message: &str) -> String {
    let mut lines = message.lines();
    let first = lines.next().unwrap_or("").trim_start_matches("error: ");
    let help: Vec<&str> = lines
        .map(str::trim)
        .map(|l| l.trim_start_matches("help: "))
        .collect();
    text(&json!({
        "file": path(file),
        "valid": false,
        "problems": [{
            "file": path(file),
            "line": null,
            "column": null,
            "message": first,
            "label": null,
            "help": (!help.is_empty()).then(|| help.join(" ")),
        }],
    }))
}
