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

/// What a drawing shows of the plan: each task's id, kind, node and the needs drawn. Borrowed
/// from the plan, so drawing a large plan copies none of its commands or environments.
struct Drawn<'a> {
    name: &'a str,
    tasks: Vec<Node<'a>>,
    /// Every need of each task, by index: the stages come from these (leaving out implied
    /// needs keeps every longest chain).
    deps: Vec<Vec<usize>>,
}

struct Node<'a> {
    id: &'a str,
    kind: &'a str,
    service: bool,
    node: Option<&'a str>,
    needs: Vec<&'a str>,
}

impl<'a> Drawn<'a> {
    /// The plan with every need (`all`), or with each task's needs reduced to those no other
    /// need implies.
    fn of(plan: &'a Plan, all: bool) -> Self {
        let deps = algo::adjacency(&plan.tasks, |t| t.id.as_str(), |t| t.needs.as_slice());
        let kept = (!all).then(|| algo::reduced(&deps));
        let tasks = plan
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| Node {
                id: &t.id,
                kind: &t.kind,
                service: t.service,
                node: t.node.as_deref(),
                needs: match &kept {
                    Some(kept) => kept[i].iter().map(|&d| plan.tasks[d].id.as_str()).collect(),
                    None => t.needs.iter().map(String::as_str).collect(),
                },
            })
            .collect();
        Self {
            name: &plan.name,
            tasks,
            deps,
        }
    }

    /// Stage of every task: the length of its longest chain of needs (0 on a cycle; seal
    /// the graph first).
    fn stages(&self) -> Vec<usize> {
        algo::stages(&self.deps)
    }
}

/// Draws the plan. Without `all_edges`, a need that another need already implies is left
/// out of the drawing (ascii, dot, mermaid): `register` needs its router and every engine,
/// and the router needs the engines too, so `register` is drawn under the router only. JSON
/// always lists every need.
pub fn render(plan: &Plan, format: Format, all_edges: bool) -> String {
    let drawn = Drawn::of(plan, all_edges || format == Format::Json);
    match format {
        Format::Ascii => ascii(&drawn),
        Format::Dot => dot(&drawn),
        Format::Mermaid => mermaid(&drawn),
        Format::Json => json(&drawn),
    }
}

fn ascii(plan: &Drawn<'_>) -> String {
    let stage = plan.stages();
    let max = stage.iter().copied().max().unwrap_or(0);
    // Each stage's tasks, in the plan's order: one pass, however many stages.
    let mut by_stage: Vec<Vec<&Node<'_>>> = vec![Vec::new(); max + 1];
    for (t, &s) in plan.tasks.iter().zip(&stage) {
        by_stage[s].push(t);
    }
    let width = plan
        .tasks
        .iter()
        .map(|t| t.id.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let services = plan.tasks.iter().filter(|t| t.service).count();
    let _ = writeln!(
        out,
        "{}: {} ({}), {}",
        plan.name,
        crate::diag::count(plan.tasks.len(), "task"),
        crate::diag::count(services, "service"),
        crate::diag::count(max + 1, "stage")
    );
    for (s, tasks) in by_stage.iter().enumerate() {
        let _ = writeln!(out, "\nstage {s}");
        for t in tasks {
            let kind = if t.service {
                format!("{} (service)", t.kind)
            } else {
                t.kind.to_string()
            };
            let mut line = format!("  {:<width$}  {}", t.id, kind);
            if let Some(n) = t.node {
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

fn dot(plan: &Drawn<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", dot_escape(plan.name));
    let _ = writeln!(out, "  rankdir=LR;");
    let _ = writeln!(out, "  node [style=filled, fontname=\"Helvetica\"];");
    for t in &plan.tasks {
        let label = match t.node {
            Some(n) => format!("{}\\n{} @{}", dot_escape(t.id), t.kind, n),
            None => format!("{}\\n{}", dot_escape(t.id), t.kind),
        };
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\", {}];",
            dot_escape(t.id),
            label,
            dot_style(t.kind, t.service)
        );
    }
    for (a, b) in edges(plan) {
        let _ = writeln!(out, "  \"{}\" -> \"{}\";", dot_escape(a), dot_escape(b));
    }
    out.push_str("}\n");
    out
}

/// Every dependency as (from, to), sorted, each once.
fn edges<'a>(plan: &Drawn<'a>) -> Vec<(&'a str, &'a str)> {
    let mut edges: Vec<(&str, &str)> = plan
        .tasks
        .iter()
        .flat_map(|t| t.needs.iter().map(move |&d| (d, t.id)))
        .collect();
    edges.sort_unstable();
    edges.dedup();
    edges
}

fn mermaid(plan: &Drawn<'_>) -> String {
    let ids: HashMap<&str, String> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id, format!("t{i}")))
        .collect();
    let mut out = String::from("flowchart LR\n");
    for (i, t) in plan.tasks.iter().enumerate() {
        let label = format!("{}<br/>{}", t.id, t.kind).replace('"', "#quot;");
        let (open, close) = if t.service { ("([", "])") } else { ("[", "]") };
        let _ = writeln!(out, "  t{i}{open}\"{label}\"{close}");
    }
    for (a, b) in edges(plan) {
        if let (Some(a), Some(b)) = (ids.get(a), ids.get(b)) {
            let _ = writeln!(out, "  {a} --> {b}");
        }
    }
    out
}

fn json(plan: &Drawn<'_>) -> String {
    let stage = plan.stages();
    let tasks: Vec<serde_json::Value> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "id": t.id,
                "kind": t.kind,
                "service": t.service,
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
