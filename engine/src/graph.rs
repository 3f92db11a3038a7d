//! Building and sealing the task graph.
//!
//! A [`GraphBuilder`] collects tasks in any order. [`GraphBuilder::seal`] checks the whole
//! set at once (duplicate ids, unknown dependencies, cycles) and only then hands back a
//! [`Graph`], the one type the scheduler and the renderers accept. So nothing can run or
//! draw a graph that was never checked (turborepo's `Engine<Building>` → `Engine<Built>`).
//!
//! Indices: task `i` of a sealed graph is the `i`th task added. `deps[i]` and `dependents[i]`
//! are sorted, so every walk over the graph is deterministic. `topo` is a topological order
//! that breaks ties by insertion order, which keeps output stable for snapshot tests.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::task::Task;
use crate::{algo, text};

/// Where a task was declared, so that graph errors can point at a file's line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Byte range of the declaration in its source file, if there is a file.
    pub span: Option<std::ops::Range<usize>>,
    /// Byte ranges of each entry of its `needs` list, in order.
    pub need_spans: Vec<Option<std::ops::Range<usize>>>,
}

/// Errors found while sealing a graph. All of them are reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("task id `{id}` is declared twice")]
    Duplicate {
        id: String,
        first: Option<std::ops::Range<usize>>,
        second: Option<std::ops::Range<usize>>,
    },
    #[error("task `{task}` needs `{missing}`, which is not a task")]
    UnknownDependency {
        task: String,
        missing: String,
        span: Option<std::ops::Range<usize>>,
        suggestion: Option<String>,
    },
    #[error("the tasks form a cycle: {}", cycle.join(" → "))]
    Cycle {
        /// The ids around the cycle, the first repeated at the end.
        cycle: Vec<String>,
        span: Option<std::ops::Range<usize>>,
    },
}

/// A graph under construction: any order, not yet checked.
#[derive(Default)]
pub struct GraphBuilder {
    tasks: Vec<Arc<dyn Task>>,
    origins: Vec<Origin>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            tasks: Vec::with_capacity(n),
            origins: Vec::with_capacity(n),
        }
    }

    pub fn add(&mut self, task: Arc<dyn Task>) -> &mut Self {
        self.add_with_origin(task, Origin::default())
    }

    pub fn add_with_origin(&mut self, task: Arc<dyn Task>, origin: Origin) -> &mut Self {
        self.tasks.push(task);
        self.origins.push(origin);
        self
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Checks the graph and returns it sealed, or every error found.
    pub fn seal(self) -> Result<Graph, Vec<GraphError>> {
        let shape = check(
            self.tasks.iter().map(|t| (t.id(), t.needs())),
            &self.origins,
        )?;
        let by_id = shape
            .index
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok(Graph {
            deps: shape.deps,
            dependents: shape.dependents,
            topo: shape.topo,
            tasks: self.tasks,
            origins: self.origins,
            by_id,
        })
    }
}

/// What [`check`] finds of a set of tasks: each task's index by id, its dependencies and
/// dependents by index (sorted), and a topological order that breaks ties by position.
pub struct Shape<'a> {
    pub index: HashMap<&'a str, usize>,
    pub deps: Vec<Vec<usize>>,
    pub dependents: Vec<Vec<usize>>,
    pub topo: Vec<usize>,
}

/// The checks [`GraphBuilder::seal`] makes (duplicate ids, unknown dependencies, cycles),
/// on each task's id and needs alone, with its origin at the same position: for a caller
/// that only checks a set of tasks and need not build them.
pub fn check<'a>(
    tasks: impl ExactSizeIterator<Item = (&'a str, &'a [String])> + Clone,
    origins: &[Origin],
) -> Result<Shape<'a>, Vec<GraphError>> {
    let n = tasks.len();
    let mut errors = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, (id, _)) in tasks.clone().enumerate() {
        if let Some(&first) = index.get(id) {
            errors.push(GraphError::Duplicate {
                id: id.to_string(),
                first: origins[first].span.clone(),
                second: origins[i].span.clone(),
            });
        } else {
            index.insert(id, i);
        }
    }
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(n);
    for (i, (id, needs)) in tasks.clone().enumerate() {
        let mut d = BTreeSet::new();
        for (k, need) in needs.iter().enumerate() {
            match index.get(need.as_str()) {
                Some(&j) => {
                    d.insert(j);
                }
                None => errors.push(GraphError::UnknownDependency {
                    task: id.to_string(),
                    missing: need.clone(),
                    span: origins[i]
                        .need_spans
                        .get(k)
                        .cloned()
                        .flatten()
                        .or_else(|| origins[i].span.clone()),
                    // Never the task itself: a task that needs itself is a cycle.
                    suggestion: text::closest(need, index.keys().copied().filter(|k| *k != id))
                        .map(str::to_string),
                }),
            }
        }
        deps.push(d.into_iter().collect());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let dependents = algo::dependents(&deps);
    let topo = algo::topo_with(&deps, &dependents);
    if topo.len() < n {
        let cycle = algo::find_cycle(&deps).unwrap_or_default();
        let ids: Vec<&str> = tasks.map(|(id, _)| id).collect();
        return Err(vec![GraphError::Cycle {
            span: cycle.first().and_then(|&i| origins[i].span.clone()),
            cycle: cycle.iter().map(|&i| ids[i].to_string()).collect(),
        }]);
    }
    Ok(Shape {
        index,
        deps,
        dependents,
        topo,
    })
}

/// A checked, acyclic task graph: the only thing the scheduler runs.
pub struct Graph {
    tasks: Vec<Arc<dyn Task>>,
    origins: Vec<Origin>,
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    topo: Vec<usize>,
    by_id: HashMap<String, usize>,
}

impl Graph {
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
    pub fn task(&self, i: usize) -> &Arc<dyn Task> {
        &self.tasks[i]
    }
    pub fn tasks(&self) -> &[Arc<dyn Task>] {
        &self.tasks
    }
    pub fn origin(&self, i: usize) -> &Origin {
        &self.origins[i]
    }
    /// Indices of the tasks `i` needs, sorted.
    pub fn deps(&self, i: usize) -> &[usize] {
        &self.deps[i]
    }
    /// Indices of the tasks that need `i`, sorted.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }
    /// A topological order, ties broken by insertion order.
    pub fn topo(&self) -> &[usize] {
        &self.topo
    }
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }
    /// Every task reachable from `roots` through dependents, roots included, in topo order.
    pub fn descendants(&self, roots: &[usize]) -> Vec<usize> {
        let mut seen = vec![false; self.len()];
        let mut stack: Vec<usize> = roots.to_vec();
        while let Some(i) = stack.pop() {
            if !seen[i] {
                seen[i] = true;
                stack.extend_from_slice(&self.dependents[i]);
            }
        }
        self.topo.iter().copied().filter(|&i| seen[i]).collect()
    }
    /// The length of each task's longest dependency chain (0 for roots), by topo order.
    pub fn depths(&self) -> Vec<usize> {
        algo::stages_in(&self.deps, &self.topo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeTask;

    fn build(specs: &[(&str, &[&str])]) -> Result<Graph, Vec<GraphError>> {
        let mut b = GraphBuilder::new();
        for (id, needs) in specs {
            b.add(FakeTask::new(id, needs).arc());
        }
        b.seal()
    }

    #[test]
    fn topo_is_stable_and_respects_deps() {
        let g = build(&[("c", &["a", "b"]), ("a", &[]), ("b", &["a"])]).expect("valid");
        let ids: Vec<&str> = g.topo().iter().map(|&i| g.task(i).id()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn names_the_cycle() {
        let err = build(&[("x", &["z"]), ("y", &["x"]), ("z", &["y"]), ("w", &[])])
            .err()
            .expect("a cycle");
        assert_eq!(err[0].to_string(), "the tasks form a cycle: x → z → y → x");
    }

    #[test]
    fn self_loop_is_a_cycle() {
        let err = build(&[("a", &["a"])]).err().expect("a cycle");
        assert_eq!(err[0].to_string(), "the tasks form a cycle: a → a");
    }

    #[test]
    fn reports_all_duplicates_and_unknowns_at_once() {
        let err = build(&[("a", &[]), ("a", &[]), ("b", &["compile", "zzz"])])
            .err()
            .expect("errors");
        assert_eq!(err.len(), 3);
        assert!(matches!(&err[0], GraphError::Duplicate { id, .. } if id == "a"));
        assert!(
            matches!(&err[1], GraphError::UnknownDependency { missing, .. } if missing == "compile")
        );
    }

    #[test]
    fn never_suggests_that_a_task_needs_itself() {
        let err = build(&[("a", &["c"])]).err().expect("errors");
        assert!(
            matches!(
                &err[0],
                GraphError::UnknownDependency {
                    suggestion: None,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = build(&[("ab", &["ac"]), ("ad", &[])])
            .err()
            .expect("errors");
        assert!(
            matches!(&err[0], GraphError::UnknownDependency { suggestion: Some(s), .. } if s == "ad"),
            "{err:?}"
        );
    }

    #[test]
    fn suggests_a_near_miss() {
        let err = build(&[("compile", &[]), ("link", &["comple"])])
            .err()
            .expect("errors");
        assert!(
            matches!(&err[0], GraphError::UnknownDependency { suggestion: Some(s), .. } if s == "compile")
        );
    }
}
