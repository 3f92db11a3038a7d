//! A recipe's own `[[task]]` entries (the workflow format), woven into the deployment.
//!
//! An entry may run where prl-flow runs (no `node`), on one node (`node = "node2"`), or on
//! every node (`node = "each"`: one task per node, `ID.node[K]`). Its `needs` and `before`
//! name tasks by id (`engine[0].rank[0]`), by kind (`engine`, `prefill`, `router`, ...: all
//! tasks of that kind), or by the id of another `each` entry. Inside an `each` entry a kind
//! or an `each` id means the ones *on the same node*, so "stage weights on every node
//! before its engine starts" is `node = "each"`, `before = ["engine"]`. A task on a node
//! also needs `allocate`. The whole graph is then checked for cycles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use prl_flow_engine::algo;
use serde::Deserialize;
use toml::Spanned;

use super::deployment::node_name;
use crate::diag::{Problem, Problems};
use crate::plan::TaskSpec;
use crate::workflow::{add_before, entry_to_spec, toml_problem, TaskEntry, TASK_FIELDS};

pub use super::kinds::KINDS;

#[derive(Deserialize)]
struct TasksOnly {
    #[serde(default)]
    task: Vec<Spanned<TaskEntry>>,
}

/// The `[[task]]` entries of the recipe (their unknown keys were reported already).
pub fn entries(source: &str, p: &mut Problems) -> Vec<Spanned<TaskEntry>> {
    match toml::from_str::<TasksOnly>(source) {
        Ok(t) => t.task,
        Err(e) => {
            p.push(toml_problem(&e, TASK_FIELDS));
            Vec::new()
        }
    }
}

/// Checks the entries on their own (when the deployment itself could not be derived).
pub fn check(entries: &[Spanned<TaskEntry>], p: &mut Problems) {
    for t in entries {
        let _ = entry_to_spec(t, "custom", p);
    }
}

struct Expanded {
    spec: TaskSpec,
    /// For an `each` entry: the node this copy is for.
    each_node: Option<usize>,
    needs: Vec<(String, Option<Range<usize>>)>,
    before: Vec<Spanned<String>>,
}

/// Adds the entries to `tasks`, resolving nodes, `needs` and `before`, then checks the
/// whole graph for cycles.
pub fn add(
    tasks: &mut Vec<TaskSpec>,
    entries: &[Spanned<TaskEntry>],
    nodes: usize,
    p: &mut Problems,
) {
    let deployment_ids: HashSet<String> = tasks.iter().map(|t| t.id.clone()).collect();
    let node_names: Vec<String> = (0..nodes).map(node_name).collect();
    let mut declared: HashMap<String, Range<usize>> = HashMap::new();
    let mut expanded: Vec<Expanded> = Vec::new();
    let mut each_bases: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();

    for t in entries {
        let Some(entry) = entry_to_spec(t, "custom", p) else {
            continue;
        };
        let e = t.get_ref();
        let id = entry.spec.id.clone();
        let id_span = e.id.span();
        if deployment_ids.contains(&id) || KINDS.contains(&id.as_str()) {
            p.push(
                Problem::new(format!("task id `{id}` is taken by the deployment"))
                    .at(Some(id_span.clone()))
                    .label("already a deployment task or kind")
                    .help("give your task another id, e.g. `stage-weights`"),
            );
            continue;
        }
        if let Some(first) = declared.get(&id) {
            let (line, _) = crate::diag::line_col(&p.source, first.start);
            p.push(
                Problem::new(format!(
                    "task id `{id}` is declared twice (first on line {line})"
                ))
                .at(Some(id_span))
                .label("second declaration")
                .help("give each `[[task]]` its own id"),
            );
            continue;
        }
        declared.insert(id.clone(), id_span);
        let needs: Vec<(String, Option<Range<usize>>)> = entry
            .spec
            .needs
            .iter()
            .cloned()
            .zip(
                entry
                    .spec
                    .need_spans
                    .iter()
                    .cloned()
                    .chain(std::iter::repeat(None)),
            )
            .collect();
        let placement = match &e.node {
            None => Some((false, None)),
            Some(n) if n.get_ref() == "each" => Some((true, None)),
            Some(n) => match node_names.iter().position(|x| x == n.get_ref()) {
                Some(k) => Some((false, Some(k))),
                None => {
                    let mut candidates: Vec<&str> = node_names.iter().map(String::as_str).collect();
                    candidates.push("each");
                    let help = match super::doc::near(n.get_ref(), candidates.iter().copied()) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!(
                            "this deployment has nodes `node0` to `node{}`; `each` runs the task on every node",
                            nodes.saturating_sub(1)
                        ),
                    };
                    p.push(
                        Problem::new(format!(
                            "task `{id}` runs on `{}`, which is not a node of this deployment",
                            n.get_ref()
                        ))
                        .at(Some(n.span()))
                        .label("unknown node")
                        .help(help),
                    );
                    None
                }
            },
        };
        let Some((each, node)) = placement else {
            continue;
        };
        if each {
            for k in 0..nodes {
                let mut spec = entry.spec.clone();
                spec.id = format!("{id}.node[{k}]");
                spec.node = Some(node_name(k));
                each_bases
                    .entry(id.clone())
                    .or_default()
                    .push((spec.id.clone(), k));
                expanded.push(Expanded {
                    spec,
                    each_node: Some(k),
                    needs: needs.clone(),
                    before: entry.before.clone(),
                });
            }
        } else {
            let mut spec = entry.spec;
            spec.node = node.map(node_name);
            expanded.push(Expanded {
                spec,
                each_node: None,
                needs,
                before: entry.before,
            });
        }
    }

    // What a name in `needs` / `before` can mean.
    let mut by_kind: BTreeMap<&str, Vec<String>> = KINDS.iter().map(|k| (*k, Vec::new())).collect();
    // The same by node, for `each` entries: (kind, node) → ids, plus the kind's node-less
    // tasks, which every node sees.
    let mut by_kind_node: HashMap<(&str, &str), Vec<String>> = HashMap::new();
    let mut nodeless: HashMap<&str, Vec<String>> = HashMap::new();
    for t in tasks.iter() {
        let Some(kind) = KINDS.iter().copied().find(|k| *k == t.kind) else {
            continue;
        };
        by_kind.entry(kind).or_default().push(t.id.clone());
        match &t.node {
            Some(n) => by_kind_node
                .entry((kind, n.as_str()))
                .or_default()
                .push(t.id.clone()),
            None => nodeless.entry(kind).or_default().push(t.id.clone()),
        }
    }
    let custom_ids: HashSet<String> = expanded.iter().map(|x| x.spec.id.clone()).collect();
    // Names for suggestions, gathered only when one is needed.
    let all_names = || -> Vec<String> {
        let mut all: Vec<String> = deployment_ids.iter().cloned().collect();
        all.extend(custom_ids.iter().cloned());
        all.extend(each_bases.keys().cloned());
        all.extend(KINDS.iter().map(|k| k.to_string()));
        all.sort();
        all
    };

    let resolve = |name: &str, each_node: Option<usize>| -> Result<Vec<String>, String> {
        if deployment_ids.contains(name) || custom_ids.contains(name) {
            return Ok(vec![name.to_string()]);
        }
        if let Some(list) = each_bases.get(name) {
            return Ok(list
                .iter()
                .filter(|(_, k)| each_node.map_or(true, |n| n == *k))
                .map(|(id, _)| id.clone())
                .collect());
        }
        if let Some(list) = by_kind.get(name) {
            if list.is_empty() {
                return Err(format!("this deployment has no `{name}` task"));
            }
            let Some(k) = each_node else {
                return Ok(list.clone());
            };
            let here = node_name(k);
            let mut ids = nodeless.get(name).cloned().unwrap_or_default();
            ids.extend(
                by_kind_node
                    .get(&(name, here.as_str()))
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
            return Ok(ids);
        }
        Err(String::new())
    };
    let unknown = |p: &mut Problems,
                   what: &str,
                   id: &str,
                   name: &str,
                   why: String,
                   span: Option<Range<usize>>| {
        let names = all_names();
        // Never the task itself: a task that needs itself is a cycle.
        let others = names.iter().map(String::as_str).filter(|n| *n != id);
        let help = match super::doc::near(name, others) {
            Some(s) if why.is_empty() => format!("did you mean `{s}`?"),
            _ => "name a task id (`engine[0].rank[0]`), a kind (`engine`, `prefill`, `decode`, `router`, ...) or another `[[task]]` id".to_string(),
        };
        let why = if why.is_empty() {
            "which is not a task".to_string()
        } else {
            why
        };
        p.push(
            Problem::new(format!("task `{id}` {what} `{name}`: {why}"))
                .at(span)
                .label("unknown task")
                .help(help),
        );
    };

    let mut befores: Vec<(String, Spanned<String>)> = Vec::new();
    let mut reported: HashSet<(String, usize)> = HashSet::new();
    for x in &mut expanded {
        let mut needs: Vec<String> = Vec::new();
        let mut spans: Vec<Option<Range<usize>>> = Vec::new();
        if x.spec.node.is_some() {
            needs.push(super::kinds::ALLOCATE.into());
            spans.push(None);
        }
        for (name, span) in &x.needs {
            match resolve(name, x.each_node) {
                Ok(ids) => {
                    for id in ids {
                        if id != x.spec.id && !needs.contains(&id) {
                            needs.push(id);
                            spans.push(span.clone());
                        }
                    }
                }
                Err(why) => {
                    // An `each` entry is one mistake, however many nodes it expands to.
                    if reported.insert((name.clone(), span.as_ref().map_or(0, |s| s.start))) {
                        unknown(p, "needs", &x.spec.id, name, why, span.clone());
                    }
                }
            }
        }
        x.spec.needs = needs;
        x.spec.need_spans = spans;
        for b in &x.before {
            match resolve(b.get_ref(), x.each_node) {
                Ok(ids) => {
                    for id in ids {
                        befores.push((x.spec.id.clone(), Spanned::new(b.span(), id)));
                    }
                }
                Err(why) => {
                    if reported.insert((b.get_ref().clone(), b.span().start)) {
                        unknown(
                            p,
                            "is to run before",
                            &x.spec.id,
                            b.get_ref(),
                            why,
                            Some(b.span()),
                        );
                    }
                }
            }
        }
    }
    tasks.extend(expanded.into_iter().map(|x| x.spec));
    // Every target is an id by now; an index keeps this linear for large plans (the
    // workflow's `add_before` searches the list for each pair).
    let index: HashMap<String, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.clone(), i))
        .collect();
    let mut unresolved = Vec::new();
    for (id, target) in befores {
        match index.get(target.get_ref()) {
            Some(&i) => {
                let t = &mut tasks[i];
                if !t.needs.contains(&id) {
                    t.needs.push(id);
                    t.need_spans.push(Some(target.span()));
                }
            }
            None => unresolved.push((id, target)),
        }
    }
    add_before(tasks, unresolved, p);
    if let Some(cycle) = find_cycle(tasks) {
        let names: Vec<&str> = cycle.iter().map(|&i| tasks[i].id.as_str()).collect();
        let span = cycle.iter().find_map(|&i| tasks[i].span.clone());
        p.push(
            Problem::new(format!(
                "the tasks form a cycle: {} → {}",
                names.join(" → "),
                names[0]
            ))
            .at(span)
            .label("part of the cycle")
            .help("drop one of these `needs` or `before` entries"),
        );
    }
}

/// A cycle of the `needs` graph, as task indices, if there is one: in the order things
/// start (each needed by the next), ending with the smallest index on it.
pub fn find_cycle(tasks: &[TaskSpec]) -> Option<Vec<usize>> {
    let deps = algo::adjacency(tasks, |t| t.id.as_str(), |t| t.needs.as_slice());
    // The engine's path runs `a, b, ..., a` from each task to what it needs.
    let mut cycle = algo::find_cycle(&deps)?;
    cycle.pop();
    cycle.reverse();
    Some(cycle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, needs: &[&str]) -> TaskSpec {
        TaskSpec {
            id: id.into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            ..TaskSpec::default()
        }
    }

    #[test]
    fn finds_a_cycle_or_none() {
        assert_eq!(find_cycle(&[t("a", &[]), t("b", &["a"])]), None);
        let c = find_cycle(&[t("a", &["c"]), t("b", &["a"]), t("c", &["b"])]).expect("cycle");
        assert_eq!(c.len(), 3);
    }
}
