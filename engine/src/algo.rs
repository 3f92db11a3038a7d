//! Graph algorithms over a plain index adjacency: `deps[i]` lists the nodes that node `i`
//! needs. The engine seals its graphs with them, and the tools that check or draw a plan
//! before it becomes a graph use the same functions, so they all agree on orders, cycles
//! and stages.
//!
//! Every function is deterministic: ties are broken by the smaller index.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use petgraph::graph::{DiGraph, NodeIndex};

/// The index adjacency of `items` named by `id` and needing the names `needs` lists: names
/// that are no item's id are left out; for an id given twice, the later item is the one
/// found.
pub fn adjacency<'a, T>(
    items: &'a [T],
    id: impl Fn(&'a T) -> &'a str,
    needs: impl Fn(&'a T) -> &'a [String],
) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = items.iter().enumerate().map(|(i, t)| (id(t), i)).collect();
    items
        .iter()
        .map(|t| {
            needs(t)
                .iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .collect()
        })
        .collect()
}

/// The reverse adjacency: `out[j]` lists, in increasing order, the nodes that need `j`.
pub fn dependents(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); deps.len()];
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            out[j].push(i);
        }
    }
    out
}

/// A topological order (every node after the nodes it needs), ties broken by the smaller
/// index. Nodes on a cycle, or needing one, are left out: the order is shorter than `deps`
/// exactly when there is a cycle.
pub fn topo(deps: &[Vec<usize>]) -> Vec<usize> {
    topo_with(deps, &dependents(deps))
}

/// [`topo`] with the reverse adjacency already at hand.
pub fn topo_with(deps: &[Vec<usize>], dependents: &[Vec<usize>]) -> Vec<usize> {
    // Kahn's algorithm with a min-heap on the index.
    let mut indeg: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut heap: BinaryHeap<Reverse<usize>> = indeg
        .iter()
        .enumerate()
        .filter(|(_, &d)| d == 0)
        .map(|(i, _)| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(deps.len());
    while let Some(Reverse(i)) = heap.pop() {
        order.push(i);
        for &k in &dependents[i] {
            indeg[k] -= 1;
            if indeg[k] == 0 {
                heap.push(Reverse(k));
            }
        }
    }
    order
}

/// The stage of every node: the length of its longest chain of needs (0 for a node that
/// needs nothing). A node on a cycle, or needing one, has stage 0.
pub fn stages(deps: &[Vec<usize>]) -> Vec<usize> {
    stages_in(deps, &topo(deps))
}

/// Each node's edges without those another of its edges already implies (the transitive
/// reduction of a DAG): `a` needs `b` and `c`, and `c` needs `b`, so `a → b` goes. Order
/// within each list is kept. A node on a cycle, or needing one, implies nothing.
///
/// For each node, one walk from what its needs need marks what they reach; a need that is
/// marked is implied. The walk goes no lower than the lowest stage among the node's needs
/// (a node that reaches another has a higher stage), so in a layered graph it stops at
/// once. Memory is linear in the nodes, time in the parts walked.
pub fn reduced(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = deps.len();
    let order = topo(deps);
    let stage = stages_in(deps, &order);
    let mut ordered = vec![false; n];
    for &i in &order {
        ordered[i] = true;
    }
    // The walk that last marked each node (no clearing between walks).
    let mut seen = vec![usize::MAX; n];
    let mut stack = Vec::new();
    deps.iter()
        .enumerate()
        .map(|(walk, ds)| {
            let Some(low) = ds.iter().map(|&d| stage[d]).min() else {
                return Vec::new();
            };
            // Outside the topological order, a need's ancestors are not known: it implies
            // nothing (a node in the order needs only nodes in the order).
            for &o in ds.iter().filter(|&&o| ordered[o]) {
                stack.extend(deps[o].iter().copied());
            }
            while let Some(x) = stack.pop() {
                if seen[x] == walk || stage[x] < low {
                    continue;
                }
                seen[x] = walk;
                stack.extend(deps[x].iter().copied());
            }
            ds.iter().copied().filter(|&d| seen[d] != walk).collect()
        })
        .collect()
}

/// [`stages`] with a topological order already at hand.
pub fn stages_in(deps: &[Vec<usize>], topo: &[usize]) -> Vec<usize> {
    let mut stage = vec![0; deps.len()];
    for &i in topo {
        stage[i] = deps[i].iter().map(|&j| stage[j] + 1).max().unwrap_or(0);
    }
    stage
}

/// One cycle, if there is any, as the path `a, b, ..., a` along the edges (`a` needs `b`):
/// the shortest one through the smallest node of the strongly connected component that
/// holds the smallest node on any cycle. A node that needs itself gives `a, a`.
pub fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    let mut g = DiGraph::<usize, ()>::with_capacity(deps.len(), 0);
    let nodes: Vec<NodeIndex> = (0..deps.len()).map(|i| g.add_node(i)).collect();
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            g.add_edge(nodes[i], nodes[j], ());
        }
    }
    // A strongly connected component with more than one node (or a self loop) holds a
    // cycle; take the one with the smallest node and walk it from there.
    let members: BTreeSet<usize> = petgraph::algo::tarjan_scc(&g)
        .into_iter()
        .filter(|c| c.len() > 1 || g.contains_edge(c[0], c[0]))
        .map(|c| c.iter().map(|n| g[*n]).collect::<BTreeSet<usize>>())
        .min_by_key(|members| members.first().copied())?;
    let start = *members.first()?;
    // Breadth-first search for the shortest way back to `start` inside the component.
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(u) = queue.pop_front() {
        for &v in &deps[u] {
            if !members.contains(&v) {
                continue;
            }
            if v == start {
                let mut path = vec![start];
                let mut cur = u;
                while cur != start {
                    path.push(cur);
                    cur = prev[&cur];
                }
                path.push(start);
                let len = path.len();
                path[1..len - 1].reverse();
                return Some(path);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(v) {
                e.insert(u);
                queue.push_back(v);
            }
        }
    }
    Some(vec![start, start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topo_breaks_ties_by_index_and_leaves_out_cycles() {
        // 0 needs 2; 1 needs nothing; 2 needs 1; 3 and 4 need each other.
        let deps = vec![vec![2], vec![], vec![1], vec![4], vec![3]];
        assert_eq!(topo(&deps), [1, 2, 0]);
    }

    #[test]
    fn reduction_drops_only_implied_edges() {
        // 0; 1 needs 0; 2 needs 0 and 1 (0 implied); 3 needs 2 and 0 (implied via 2); 4
        // needs 3 and 1 (1 implied via 3 → 2 → 1).
        let deps = vec![vec![], vec![0], vec![0, 1], vec![2, 0], vec![3, 1]];
        assert_eq!(reduced(&deps), [vec![], vec![0], vec![1], vec![2], vec![3]]);
        // Nothing implied: nothing dropped.
        let deps = vec![vec![], vec![], vec![0, 1]];
        assert_eq!(reduced(&deps), deps);
    }

    /// The reduction as ancestor bitsets compute it, built in topological order: memory
    /// quadratic in the nodes, so only an oracle here.
    fn reduced_by_bitsets(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
        let n = deps.len();
        let words = n.div_ceil(64);
        let mut anc: Vec<Vec<u64>> = vec![vec![0; words]; n];
        for &i in &topo(deps) {
            let mut set = vec![0u64; words];
            for &d in &deps[i] {
                set[d / 64] |= 1 << (d % 64);
                for (w, a) in set.iter_mut().zip(&anc[d]) {
                    *w |= a;
                }
            }
            anc[i] = set;
        }
        deps.iter()
            .map(|ds| {
                ds.iter()
                    .copied()
                    .filter(|&d| {
                        !ds.iter()
                            .any(|&o| o != d && anc[o][d / 64] & (1 << (d % 64)) != 0)
                    })
                    .collect()
            })
            .collect()
    }

    proptest::proptest! {
        /// On any graph, cycles and repeated needs included, the walks drop exactly the
        /// edges the ancestor sets do.
        #[test]
        fn reduction_agrees_with_ancestor_sets(
            deps in proptest::collection::vec(
                proptest::collection::vec(0usize..40, 0..6), 1..40)
        ) {
            let n = deps.len();
            let deps: Vec<Vec<usize>> =
                deps.into_iter().map(|d| d.into_iter().map(|j| j % n).collect()).collect();
            proptest::prop_assert_eq!(reduced(&deps), reduced_by_bitsets(&deps));
        }

        /// The same on DAGs, where every node needs only earlier ones.
        #[test]
        fn reduction_agrees_with_ancestor_sets_on_dags(
            deps in proptest::collection::vec(
                proptest::collection::vec(0usize..1000, 0..5), 1..60)
        ) {
            let deps: Vec<Vec<usize>> = deps
                .into_iter()
                .enumerate()
                .map(|(i, d)| if i == 0 { Vec::new() } else { d.into_iter().map(|j| j % i).collect() })
                .collect();
            proptest::prop_assert_eq!(reduced(&deps), reduced_by_bitsets(&deps));
        }
    }

    #[test]
    fn stages_are_the_longest_chains() {
        let deps = vec![vec![], vec![0], vec![0, 1], vec![], vec![3, 2]];
        assert_eq!(stages(&deps), [0, 1, 2, 0, 3]);
        // On a cycle, or after one: 0.
        assert_eq!(stages(&[vec![1], vec![0], vec![1]]), [0, 0, 0]);
    }

    #[test]
    fn finds_the_shortest_cycle_through_the_smallest_node() {
        assert_eq!(find_cycle(&[vec![], vec![0]]), None);
        // 0 needs 1 and 2, 1 needs 2, 2 needs 0: 0 → 2 → 0 is shorter than 0 → 1 → 2 → 0.
        assert_eq!(
            find_cycle(&[vec![1, 2], vec![2], vec![0]]),
            Some(vec![0, 2, 0])
        );
        assert_eq!(find_cycle(&[vec![], vec![1]]), Some(vec![1, 1]));
        // Only the part on the cycle counts, not what hangs off it.
        assert_eq!(
            find_cycle(&[vec![], vec![0, 3], vec![1], vec![2]]),
            Some(vec![1, 3, 2, 1])
        );
    }

    #[test]
    fn adjacency_skips_unknown_names() {
        let items = [
            ("a", vec![]),
            ("b", vec!["a".to_string(), "zz".to_string()]),
        ];
        let deps = adjacency(&items, |t| t.0, |t| t.1.as_slice());
        assert_eq!(deps, vec![vec![], vec![0]]);
    }
}
