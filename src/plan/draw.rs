//! Drawing a plan's graph: ASCII for a terminal, DOT for Graphviz, Mermaid for Markdown, and
//! JSON for tools. Output is deterministic (declaration order within each stage, sorted
//! edges), so it can be snapshot-tested and diffed.
//!
//! The ASCII form groups tasks by *stage*: the length of the longest chain of dependencies
//! before them. Everything in a stage can run at once once the stage before is done; each
//! task lists what it needs, so a few hundred tasks stay readable.

use std::collections::HashMap;
use std::fmt::Write as _;

use prl_flow_engine::algo;

use crate::plan::Plan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Ascii,
    Dot,
    Mermaid,
    Json,
}

/// Stage of every task: the length of its longest chain of needs (0 on a cycle; seal the
/// graph first).
fn stages(plan: &Plan) -> Vec<usize> {
    let deps = algo::adjacency(&plan.tasks, |t| t.id.as_str(), |t| t.needs.as_slice());
    algo::stages(&deps)
}

fn is_service(t: &crate::plan::TaskSpec) -> bool {
    t.service
}

/// Draws the plan. Without `all_edges`, a need that another need already implies is left
/// out of the drawing (ascii, dot, mermaid): `register` needs its router and every engine,
/// and the router needs the engines too, so `register` is drawn under the router only. JSON
/// always lists every need.
pub fn render(plan: &Plan, format: Format, all_edges: bool) -> String {
    let drawn = if all_edges || format == Format::Json {
        plan.clone()
    } else {
        reduced(plan)
    };
    match format {
        Format::Ascii => ascii(&drawn),
        Format::Dot => dot(&drawn),
        Format::Mermaid => mermaid(&drawn),
        Format::Json => json(&drawn),
    }
}

/// The plan with each task's needs reduced to those no other need implies.
fn reduced(plan: &Plan) -> Plan {
    let deps = algo::adjacency(&plan.tasks, |t| t.id.as_str(), |t| t.needs.as_slice());
    let keep = algo::reduced(&deps);
    let mut out = plan.clone();
    for (t, keep) in out.tasks.iter_mut().zip(keep) {
        t.needs = keep.iter().map(|&d| plan.tasks[d].id.clone()).collect();
    }
    out
}

fn ascii(plan: &Plan) -> String {
    let stage = stages(plan);
    let max = stage.iter().copied().max().unwrap_or(0);
    let width = plan
        .tasks
        .iter()
        .map(|t| t.id.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let services = plan.tasks.iter().filter(|t| is_service(t)).count();
    let _ = writeln!(
        out,
        "{}: {} ({}), {}",
        plan.name,
        crate::diag::count(plan.tasks.len(), "task"),
        crate::diag::count(services, "service"),
        crate::diag::count(max + 1, "stage")
    );
    for s in 0..=max {
        let _ = writeln!(out, "\nstage {s}");
        for (i, t) in plan
            .tasks
            .iter()
            .enumerate()
            .filter(|(i, _)| stage[*i] == s)
        {
            let _ = i;
            let kind = if is_service(t) {
                format!("{} (service)", t.kind)
            } else {
                t.kind.clone()
            };
            let mut line = format!("  {:<width$}  {}", t.id, kind);
            if let Some(n) = &t.node {
                line.push_str(&format!(" @{n}"));
            }
            if !t.needs.is_empty() {
                line.push_str(&format!("  ← {}", t.needs.join(", ")));
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Shape and colour per kind: a deployment's kinds have their own; other tasks are boxes.
fn dot_style(kind: &str, service: bool) -> &'static str {
    match crate::recipe::kinds::dot_style(kind) {
        Some(style) => style,
        None if service => "shape=box, style=\"rounded,filled\", fillcolor=\"#e1f5fe\"",
        None => "shape=box, fillcolor=\"#ffffff\"",
    }
}

fn dot(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", dot_escape(&plan.name));
    let _ = writeln!(out, "  rankdir=LR;");
    let _ = writeln!(out, "  node [style=filled, fontname=\"Helvetica\"];");
    for t in &plan.tasks {
        let label = match &t.node {
            Some(n) => format!("{}\\n{} @{}", dot_escape(&t.id), t.kind, n),
            None => format!("{}\\n{}", dot_escape(&t.id), t.kind),
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\", {}];",
            dot_escape(&t.id),
            label,
            dot_style(&t.kind, is_service(t))
        );
    }
    for (a, b) in edges(plan) {
        let _ = writeln!(out, "  \"{}\" -> \"{}\";", dot_escape(a), dot_escape(b));
    }
    out.push_str("}\n");
    out
}

/// Every dependency as (from, to), sorted, each once.
fn edges(plan: &Plan) -> Vec<(&str, &str)> {
    let mut edges: Vec<(&str, &str)> = plan
        .tasks
        .iter()
        .flat_map(|t| t.needs.iter().map(move |d| (d.as_str(), t.id.as_str())))
        .collect();
    edges.sort_unstable();
    edges.dedup();
    edges
}

fn mermaid(plan: &Plan) -> String {
    let ids: HashMap<&str, String> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), format!("t{i}")))
        .collect();
    let mut out = String::from("flowchart LR\n");
    for (i, t) in plan.tasks.iter().enumerate() {
        let label = format!("{}<br/>{}", t.id, t.kind).replace('"', "#quot;");
        let (open, close) = if is_service(t) {
            ("([", "])")
        } else {
            ("[", "]")
        };
        let _ = writeln!(out, "  t{i}{open}\"{label}\"{close}");
    }
    for (a, b) in edges(plan) {
        if let (Some(a), Some(b)) = (ids.get(a), ids.get(b)) {
            let _ = writeln!(out, "  {a} --> {b}");
        }
    }
    out
}

fn json(plan: &Plan) -> String {
    let stage = stages(plan);
    let tasks: Vec<serde_json::Value> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "id": t.id,
                "kind": t.kind,
                "service": is_service(t),
                "node": t.node,
                "needs": t.needs,
                "stage": stage[i],
            })
        })
        .collect();
    let mut s =
        serde_json::to_string_pretty(&serde_json::json!({ "name": plan.name, "tasks": tasks }))
            .unwrap_or_default();
    s.push('\n');
    s
}
