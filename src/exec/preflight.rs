//! The preflight: right after the allocation, before any task of the plan starts, every node
//! is asked (through the backend) whether the programs its tasks run are there and whether
//! the ports its services bind are free. A problem fails `allocate`, which releases the
//! nodes, so nothing starts; the message names each node, program or port, and the fix.
//!
//! A resume checks the programs of the tasks it will start alone, and no ports: a task it
//! keeps, adopts or restarts may hold its own ([`crate::exec::Exec::set_resume_scope`]).
//! When it keeps the allocation, that check runs before anything starts
//! ([`crate::exec::Exec::preflight_resume`]).
//!
//! A backend that cannot tell (its default), or whose check fails to run (logged as a
//! warning), lets the run go ahead; each task's own checks at its start remain.

use std::collections::{BTreeMap, BTreeSet};

use prl_flow_backend::{Backend, Program};

use crate::plan::{host_ref, Command, Plan};

/// What the plan's tasks need of their nodes, gathered once from the plan.
#[derive(Debug, Clone, Default)]
pub struct Preflight {
    tasks: Vec<Needs>,
}

/// One task's needs.
#[derive(Debug, Clone)]
struct Needs {
    id: String,
    kind: String,
    node: Option<String>,
    programs: Vec<String>,
    ports: Vec<u16>,
    port_fields: BTreeMap<u16, String>,
}

impl Preflight {
    /// The programs and ports of every task of `plan` that runs a command. A shell
    /// command's first word is `sh`; the check is only as good as what the plan names.
    pub fn of(plan: &Plan) -> Self {
        let tasks = plan
            .tasks
            .iter()
            .filter_map(|t| {
                let programs = match &t.command {
                    Command::Argv { argv } => programs_of(argv),
                    Command::Shell { .. } => Vec::new(),
                    Command::Builtin { .. } => return None,
                };
                let ports = if t.service {
                    t.ports.clone()
                } else {
                    Vec::new()
                };
                Some(Needs {
                    id: t.id.clone(),
                    kind: t.kind.clone(),
                    node: t.node.clone(),
                    programs,
                    ports,
                    port_fields: t.port_fields.clone(),
                })
            })
            .collect();
        Self { tasks }
    }

    /// Asks `backend` about every node at once. `Err`: every problem found, one paragraph
    /// each, under one heading; nothing of the plan has started.
    pub async fn check(
        &self,
        backend: &dyn Backend,
        hosts: &BTreeMap<String, String>,
        ports: bool,
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let where_ = |node: &Option<String>| match node {
            Some(n) => match hosts.get(n) {
                Some(a) => format!("{n} ({a})"),
                None => n.clone(),
            },
            None => "this machine".to_string(),
        };

        // Programs: one call for every node.
        let wanted: BTreeSet<Program> = self
            .tasks
            .iter()
            .flat_map(|t| {
                t.programs.iter().map(|p| Program {
                    node: t.node.clone(),
                    program: p.clone(),
                })
            })
            .collect();
        let wanted: Vec<Program> = wanted.into_iter().collect();
        if !wanted.is_empty() {
            match backend.preflight(&wanted).await {
                Ok(Some(missing)) => {
                    for m in missing {
                        let users: Vec<&Needs> = self
                            .tasks
                            .iter()
                            .filter(|t| t.node == m.node && t.programs.contains(&m.program))
                            .collect();
                        let ids: Vec<String> =
                            users.iter().map(|t| format!("`{}`", t.id)).collect();
                        let kind = users.first().map(|t| t.kind.as_str()).unwrap_or("");
                        problems.push(format!(
                            "{}: `{}` {}; {} runs it\n    help: {}",
                            where_(&m.node),
                            m.program,
                            m.why,
                            ids.join(", "),
                            program_help(kind)
                        ));
                    }
                }
                Ok(None) => {}
                // A check that cannot run cannot tell: each start finds out for itself.
                Err(e) => tracing::warn!("preflight: the programs could not be checked: {e}"),
            }
        }

        // Ports: one call per node.
        let mut by_node: BTreeMap<Option<String>, Vec<&Needs>> = BTreeMap::new();
        for t in self.tasks.iter().filter(|t| ports && !t.ports.is_empty()) {
            by_node.entry(t.node.clone()).or_default().push(t);
        }
        for (node, tasks) in by_node {
            let ports: Vec<u16> = tasks.iter().flat_map(|t| t.ports.clone()).collect();
            let address = match &node {
                Some(n) => hosts.get(n).cloned().unwrap_or_else(|| host_ref(n)),
                None => "0.0.0.0".to_string(),
            };
            match backend.ports_taken(node.as_deref(), &address, &ports).await {
                Ok(Some(taken)) => {
                    for h in taken {
                        let Some(t) = tasks.iter().find(|t| t.ports.contains(&h.port)) else {
                            continue;
                        };
                        let field = t
                            .port_fields
                            .get(&h.port)
                            .map(|f| format!(" (set by {f})"))
                            .unwrap_or_default();
                        let holder = h
                            .holder
                            .map(|h| format!(", held by {h}"))
                            .unwrap_or_default();
                        problems.push(format!(
                            "{}: port {} is already in use{field}{holder}; `{}` binds it\n    \
                             help: stop what holds it, or choose another port in the recipe",
                            where_(&node),
                            h.port,
                            t.id
                        ));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    "preflight: the ports of {} could not be checked: {e}",
                    where_(&node)
                ),
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The needs of the tasks `ids` alone (those a resume will start).
    pub fn only(&self, ids: &BTreeSet<String>) -> Self {
        Self {
            tasks: self
                .tasks
                .iter()
                .filter(|t| ids.contains(&t.id))
                .cloned()
                .collect(),
        }
    }
}

/// The message of the problems found: a heading that says what was done about them
/// (`after`), then one paragraph each.
pub fn message(problems: &[String], after: &str) -> String {
    format!(
        "preflight: {} problem{} found before anything started; {after}\n  {}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        problems.join("\n  ")
    )
}

/// The programs an argv runs: its first word, and, when that is a shell running a script
/// that execs its arguments (`sh -c '... exec "$@"' NAME PROGRAM ARGS...`), the program
/// the script ends in.
fn programs_of(argv: &[String]) -> Vec<String> {
    let Some(first) = argv.first() else {
        return Vec::new();
    };
    let mut out = vec![first.clone()];
    let shell = matches!(
        first.rsplit('/').next(),
        Some("sh" | "bash" | "dash" | "zsh")
    );
    if shell && argv.get(1).is_some_and(|a| a == "-c") {
        if let (Some(script), Some(program)) = (argv.get(2), argv.get(4)) {
            if script.contains("\"$@\"") && !program.contains("${") {
                out.push(program.clone());
            }
        }
    }
    out
}

/// What to do about a missing program, by the kind of task that runs it.
fn program_help(kind: &str) -> &'static str {
    match kind {
        "engine" | "prefill" | "decode" => {
            "run with `--engine mock` (no GPU or vLLM needed), point `[inference] launcher` \
             at vLLM, or install vLLM on the node (a SLURM site's `[backend] prologue` can \
             load it)"
        }
        "router" => {
            "install vllm-router on the node (`./dev` installs it; `PRL_FLOW_ROUTER` names \
             it), or point `[inference.deployment] router_launcher` at it"
        }
        "mooncake-master" | "metadata-server" | "mooncake-client" => {
            "install Mooncake on the node (`./dev` installs it; `PRL_FLOW_MOONCAKE` names its \
             bin dir), or load it in a SLURM site's `[backend] prologue`"
        }
        _ => "install it on the node, or change the task's command in the recipe",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn a_wrapping_shell_names_the_program_it_execs() {
        assert_eq!(programs_of(&words(&["vllm", "serve", "m"])), ["vllm"]);
        assert_eq!(
            programs_of(&words(&[
                "sh",
                "-c",
                "ulimit -l unlimited; exec \"$@\"",
                "engine",
                "vllm",
                "serve"
            ])),
            ["sh", "vllm"]
        );
        assert_eq!(programs_of(&words(&["sh", "-c", "echo hi"])), ["sh"]);
        assert!(programs_of(&[]).is_empty());
    }
}
