//! Deployment recipes: a TOML file describing one inference deployment becomes a checked
//! deployment model, then a [`Plan`] with every command rendered.
//!
//! # How it works
//!
//! [`load`] runs its stages over one [`Problems`] list, so a recipe with five mistakes is
//! reported with five messages, each at its `file:line:col`. The files read top-down in
//! the same order:
//!
//! 1. **Read** ([`schema`], over [`doc`]): the text is parsed with `toml_edit`, which keeps
//!    the span of every key and value, and walked field by field. Wrong types, unknown
//!    fields ("did you mean"), bad enum values and out-of-range numbers are reported where
//!    they are written; `vllm_extra` entries are checked against `vllm serve`'s own flag
//!    table ([`flags`]). A field that was wrong is remembered as such, so later checks that
//!    would trip over it are skipped instead of piling on.
//! 2. **Validate** ([`validate`], [`managed`], [`ports`]): the rules between fields
//!    (counts divide, `tp × dp` fits a node, offload constraints, what the launcher
//!    manages, port ranges), all reported at once; what passes is a set of checked
//!    settings.
//! 3. **Derive** ([`derive`](mod@derive) into [`deployment`]): every derived value, computed
//!    once: replicas, per-node DP ranks, ports, KV connector configs, env, router layout.
//!    Plain functions, testable without I/O. The derived ports are then checked for clashes
//!    on a node.
//! 4. **Render** ([`render`]): minijinja templates (embedded; a site may override any of
//!    them by file name) turn each engine, router and Mooncake process into an argv; the
//!    task specs get env, files, ports, readiness probes and dependencies.
//! 5. **Weave** ([`custom`]): the recipe's own `[[task]]` entries join the graph, by id,
//!    kind or node, and the graph is checked for cycles.
//!
//! Nothing here touches a machine: addresses are `${host:nodeK}` placeholders
//! ([`crate::plan::host_ref`]) that a run fills in once nodes are allocated. The only I/O
//! is reading override templates. docs/recipes.md documents every field and rule.

pub mod custom;
pub mod deployment;
pub mod derive;
pub mod doc;
pub mod extra;
pub mod flags;
pub mod kinds;
pub mod layout;
pub mod managed;
pub mod ports;
pub mod render;
pub mod schema;
pub mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::diag::{Problem, Problems};
use crate::plan::{Plan, TaskSpec};
use deployment::Deployment;
use schema::Recipe;

/// What the caller (the CLI) decides rather than the recipe.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Overrides the recipe's `[backend] type`.
    pub backend: Option<String>,
    /// A directory of override templates (wins over the recipe's `templates`).
    pub templates: Option<PathBuf>,
    pub launcher: Launcher,
    /// The router's argv prefix (wins over `router_launcher`).
    pub router: Option<Vec<String>>,
}

/// Which program serves as the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Launcher {
    /// The recipe's `launcher` (`vllm serve`).
    #[default]
    Vllm,
    /// A stand-in: `argv_prefix` replaces the recipe's `launcher` (e.g.
    /// `["/path/prl-flow-mock-engine"]`); the flags stay those of `vllm serve`.
    Mock { argv_prefix: Vec<String> },
}

/// True when the text is a deployment recipe (it has a top-level `inference` table) rather
/// than a plain workflow. Broken TOML is judged by its lines, so that the right parser
/// reports the syntax error.
pub fn is_recipe(source: &str) -> bool {
    match toml_edit::ImDocument::parse(source) {
        Ok(d) => d
            .as_table()
            .get("inference")
            .is_some_and(|i| i.is_table_like()),
        Err(_) => source.lines().any(|l| {
            let t = l.trim_start();
            t.starts_with("[inference")
                || t.starts_with("inference.")
                || t.starts_with("inference ")
                || t.starts_with("inference=")
        }),
    }
}

/// Parses, validates, derives and renders a recipe into a plan named `default_name`
/// (unless the recipe names itself). All problems are returned together.
pub fn load(
    path: &str,
    source: Arc<String>,
    default_name: &str,
    opts: &Options,
) -> Result<Plan, Problems> {
    let mut p = Problems::new(path, source.clone());
    let doc = match toml_edit::ImDocument::parse(source.as_str()) {
        Ok(d) => d,
        Err(e) => {
            p.push(
                Problem::new(format!("invalid TOML: {}", e.message().trim()))
                    .at(e.span())
                    .label("here")
                    .help("fix the TOML syntax (https://toml.io)"),
            );
            return Err(p);
        }
    };
    let recipe = schema::read(&doc, &mut p);
    let written = recipe
        .name
        .get()
        .map(|n| (n.v.trim(), n.span.clone()))
        .filter(|(n, _)| !n.is_empty());
    crate::workflow::check_name(written, default_name, &mut p);
    // The `[[task]]` entries go through the workflow's own parser, unless their keys were
    // already found wrong (it would report the first of them again).
    let entries = if recipe.tasks_readable {
        custom::entries(&source, &mut p)
    } else {
        Vec::new()
    };

    let backend = opts
        .backend
        .clone()
        .or_else(|| recipe.backend.kind.as_ref().map(|k| k.v.clone()))
        .unwrap_or_else(|| "local".to_string());
    let deployment = checked_deployment(&recipe, &backend, &mut p);

    let dir: Option<(PathBuf, Option<std::ops::Range<usize>>)> =
        match (&opts.templates, recipe.templates.get()) {
            (Some(d), _) => Some((d.clone(), None)),
            (None, Some(t)) => {
                let base = Path::new(path).parent().unwrap_or(Path::new(""));
                Some((base.join(&t.v), Some(t.span.clone())))
            }
            (None, None) => None,
        };
    let templates =
        render::TaskTemplates::load(dir.as_ref().map(|(d, s)| (d.as_path(), s.clone())), &mut p);

    let (Some(dep), Some(templates)) = (deployment, templates) else {
        custom::check(&entries, &mut p);
        if p.is_empty() {
            p.push(Problem::new("the recipe could not be planned").help("see docs/recipes.md"));
        }
        return Err(in_file_order(p));
    };
    let engine_launcher = match &opts.launcher {
        Launcher::Vllm => dep.launcher.clone(),
        Launcher::Mock { argv_prefix } => argv_prefix.clone(),
    };
    let router_launcher = opts
        .router
        .clone()
        .unwrap_or_else(|| dep.router_launcher.clone());
    let prefixes = render::ArgvPrefixes {
        engine: &engine_launcher,
        router: &router_launcher,
    };
    let mut tasks = render::tasks(&dep, &templates, &prefixes, &mut p);
    custom::add(&mut tasks, &entries, dep.nodes, &mut p);
    if let Some(inf) = &recipe.inference {
        name_port_fields(&mut tasks, &dep, inf);
    }
    if !p.is_empty() {
        return Err(in_file_order(p));
    }
    let name = recipe
        .name
        .get()
        .map(|n| n.v.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| default_name.to_string());
    let endpoint = dep
        .routers
        .iter()
        .map(|r| r.url())
        .collect::<Vec<_>>()
        .join(" ");
    Ok(Plan {
        name,
        backend,
        backend_config: recipe.backend.config.clone(),
        nodes: (0..dep.nodes).map(deployment::node_name).collect(),
        tasks,
        endpoint: (!endpoint.is_empty()).then_some(endpoint),
        layout: Some(layout::of(&dep)),
        restart: dep.restart.clone(),
    })
}

/// Validates the recipe and derives its deployment; `None` when anything is wrong (the
/// problems are in `p`).
pub fn checked_deployment(recipe: &Recipe, backend: &str, p: &mut Problems) -> Option<Deployment> {
    let before = p.len();
    let settings = validate::settings(recipe, backend, p)?;
    let dep = derive::deployment(&settings);
    if let Some(inf) = &recipe.inference {
        ports::check_clashes(&dep, &inf.deployment, inf.offload.as_ref(), p);
    }
    (p.len() == before).then_some(dep)
}

/// Notes on each task the recipe field that set each of its ports.
fn name_port_fields(tasks: &mut [TaskSpec], dep: &Deployment, inf: &schema::InferenceSection) {
    let uses = ports::port_uses(dep, &inf.deployment, inf.offload.as_ref());
    // By task: one look-up per task, not a pass over every use (a deployment of 10,000
    // nodes has tens of thousands of each).
    let mut by_task: HashMap<&str, Vec<&ports::PortUse>> = HashMap::new();
    for u in &uses {
        by_task.entry(u.task.as_str()).or_default().push(u);
    }
    for t in tasks {
        for u in by_task.get(t.id.as_str()).into_iter().flatten() {
            let table = match u.field {
                "master_port" | "master_metrics_port" | "metadata_port" | "client_port" => {
                    "[inference.offload]"
                }
                _ => "[inference.deployment]",
            };
            t.port_fields.insert(u.port, format!("{table} {}", u.field));
        }
    }
}

/// Problems in the order their places appear in the file (those without a place last),
/// as a reader goes through it.
fn in_file_order(mut p: Problems) -> Problems {
    p.items
        .sort_by_key(|x| x.span.as_ref().map_or(usize::MAX, |s| s.start));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(src: &str) -> Result<Plan, Problems> {
        load(
            "r.toml",
            Arc::new(src.to_string()),
            "r",
            &Options::default(),
        )
    }

    #[test]
    fn recognizes_recipes() {
        assert!(is_recipe("[inference]\nmodel = \"m\"\n"));
        assert!(is_recipe("[inference.parallel]\ntp = 1\n"));
        assert!(!is_recipe("[[task]]\nid = \"a\"\nrun = \"true\"\n"));
        assert!(is_recipe("[inference\nmodel = "));
    }

    #[test]
    fn smallest_recipe_plans() {
        let plan = plan("[inference]\nmodel = \"m\"\n").expect("plan");
        let ids: Vec<&str> = plan.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                kinds::ALLOCATE,
                "engine[0].rank[0]",
                "router",
                "register",
                "health-probe"
            ]
        );
        assert_eq!(plan.nodes, ["node0"]);
        assert_eq!(plan.endpoint.as_deref(), Some("http://${host:node0}:8000"));
    }

    #[test]
    fn all_problems_at_once() {
        let err = plan(
            "[inference]\nmodel = \"m\"\nlauncher = \"vllm\"\n[inference.parallel]\ntp = 0\ndp = \"2\"\n[inference.deployment]\ntype = \"singel_node\"\nnmu_nodes = 2\n",
        )
        .expect_err("problems");
        let out = err.render(false);
        assert_eq!(err.len(), 5, "{out}");
        assert!(out.contains("did you mean `single_node`?"), "{out}");
        assert!(out.contains("did you mean `num_nodes`?"), "{out}");
    }
}
