//! Loading a file into a plan: a recipe when it has an `[inference]` table, else a plain
//! workflow. The registry decides the backend once, before the recipe is derived
//! ([`Registry::decide`](crate::registry::Registry::decide)), gives the plan the site's
//! defaults ([`settle`](crate::registry::Registry::settle)), and lets the backend check its
//! table before anything starts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use prl_flow_engine::graph::{check, Origin};
use prl_flow_engine::GraphError;

use super::{Error, Result, Session};
use crate::diag::{Problem, Problems};
use crate::plan::{resolve_hosts, Command, Plan, Probe, TaskSpec};

/// What to load, and how.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A recipe or workflow file (TOML).
    pub file: PathBuf,
    /// Overrides the recipe's backend.
    pub backend: Option<String>,
    /// Which program serves as the inference engine.
    pub launcher: crate::recipe::Launcher,
    /// A directory of templates overriding the built-in ones.
    pub templates: Option<PathBuf>,
    /// The router program (argv prefix), instead of the recipe's or `vllm-router`.
    pub router: Option<String>,
}

impl LoadOptions {
    pub fn file(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            ..Self::default()
        }
    }
}

/// A plan and the text it came from (for messages with places).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub source: Arc<String>,
    pub plan: Plan,
    /// A workflow's start dirs, each as written (joined to the file's directory as named)
    /// with the directory it led to; empty for a recipe.
    pub start_dirs: Vec<(PathBuf, String)>,
}

impl Session {
    /// Reads a file and makes a plan of it.
    pub async fn load(&self, a: &LoadOptions) -> Result<Loaded> {
        let path = &a.file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Usage(format!("error: cannot read `{}`: {e}", path.display())))?;
        let source = Arc::new(text);
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let shown = path.display().to_string();
        let site = self.site();
        // Parsed once: what decides the backend and the file's kind, then (for a workflow)
        // the tasks, all come from this one document.
        let doc = toml_edit::ImDocument::parse(source.to_string());
        let head = Head::of(&doc, &source);
        let backend = self
            .registry()
            .decide_own(a.backend.as_deref(), head.backend.clone())
            .map_err(Error::Usage)?;
        let mut start_dirs = Vec::new();
        let mut plan = if head.recipe {
            let opts = crate::recipe::Options {
                backend: Some(backend.clone()),
                templates: a
                    .templates
                    .clone()
                    .or_else(|| site.and_then(|s| crate::site::default_templates(s, &source))),
                launcher: a.launcher.clone(),
                router: a.router.as_ref().map(|r| vec![r.clone()]),
            };
            crate::recipe::load(&shown, source.clone(), &name, &opts).map_err(|mut p| {
                // Said with the recipe's other problems, not only once it plans.
                p.items
                    .extend(self.registry().backend_problem_of(&backend, &source));
                Error::Problems(p)
            })?
        } else {
            let (plan, dirs) = crate::workflow::parse_doc_dirs(&shown, source.clone(), doc, &name)
                .map_err(Error::Problems)?;
            start_dirs = dirs;
            plan
        };
        crate::registry::simulated_over_own(&mut plan, &backend, head.backend);
        self.registry().settle(&mut plan, backend);
        self.registry()
            .check(&plan, path, &source)
            .await
            .map_err(Error::Problems)?;
        Ok(Loaded {
            path: path.clone(),
            source,
            plan,
            start_dirs,
        })
    }

    /// Loads and checks the graph too (duplicates, unknown needs, cycles), without running:
    /// the checks a run's graph gets, on the tasks' ids and needs alone.
    pub async fn load_checked(&self, a: &LoadOptions) -> Result<Loaded> {
        let loaded = self.load(a).await?;
        let tasks = &loaded.plan.tasks;
        let origins: Vec<Origin> = tasks.iter().map(TaskSpec::origin).collect();
        if let Err(e) = check(
            tasks.iter().map(|t| (t.id.as_str(), t.needs.as_slice())),
            &origins,
        ) {
            return Err(loaded.graph_problems(e));
        }
        Ok(loaded)
    }
}

/// What a load decides from a file before making its plan, read from its one parse.
struct Head {
    /// It has an `[inference]` table: a recipe.
    recipe: bool,
    /// Its own `[backend] type`.
    backend: Option<String>,
}

impl Head {
    fn of(
        doc: &std::result::Result<toml_edit::ImDocument<String>, toml_edit::TomlError>,
        source: &str,
    ) -> Self {
        match doc {
            Ok(d) => Head {
                recipe: d
                    .as_table()
                    .get("inference")
                    .is_some_and(|i| i.is_table_like()),
                backend: d
                    .as_table()
                    .get("backend")
                    .and_then(|b| b.get("type"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
            },
            // Bad TOML: whichever load runs reports where.
            Err(_) => Head {
                recipe: crate::recipe::is_recipe(source),
                backend: None,
            },
        }
    }
}

impl Loaded {
    /// The graph's problems, placed in the file's text.
    pub fn graph_problems(&self, errors: Vec<GraphError>) -> Error {
        let mut p = Problems::new(self.path.display().to_string(), self.source.clone());
        for e in errors {
            let msg = e.to_string();
            p.push(match e {
                GraphError::Duplicate { second, .. } => Problem::new(msg)
                    .at(second)
                    .label("declared again here")
                    .help("give each task its own `id`"),
                GraphError::UnknownDependency {
                    span, suggestion, ..
                } => {
                    let q = Problem::new(msg).at(span).label("no task has this id");
                    match suggestion {
                        Some(s) => q.help(format!("did you mean `{s}`?")),
                        None => q.help("name a task declared in this file"),
                    }
                }
                GraphError::Cycle { span, .. } => Problem::new(msg)
                    .at(span)
                    .label("this task is part of the cycle")
                    .help("remove one of these `needs` so that the tasks can be ordered"),
            });
        }
        Error::Problems(p)
    }
}

/// The plan as `plan` shows it: on the local backend, the node addresses are known before
/// anything runs, so they are filled in; elsewhere the placeholders stay.
pub fn shown(mut plan: Plan) -> Plan {
    if plan.backend == crate::registry::builtins::LOCAL {
        resolve_local(&mut plan);
    }
    plan
}

/// The plan with every node placeholder filled in by the local backend's addresses.
pub fn resolve_local(plan: &mut Plan) {
    let hosts: BTreeMap<String, String> = plan
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), crate::registry::builtins::local_address(i)))
        .collect();
    let f = |s: &str| resolve_hosts(s, &|n| hosts.get(n).cloned());
    for t in &mut plan.tasks {
        t.command = match std::mem::take(&mut t.command) {
            Command::Argv { argv } => Command::Argv {
                argv: argv.iter().map(|a| f(a)).collect(),
            },
            Command::Shell { script } => Command::Shell { script: f(&script) },
            Command::Builtin { action, args } => {
                let text = f(&args.to_string());
                Command::Builtin {
                    action,
                    args: serde_json::from_str(&text).unwrap_or(args),
                }
            }
        };
        for v in t.env.values_mut() {
            *v = f(v);
        }
        for file in &mut t.files {
            file.content = f(&file.content);
        }
        if let Some(r) = &mut t.ready {
            r.probe = match &r.probe {
                Probe::Http { url } => Probe::Http { url: f(url) },
                Probe::Tcp { addr } => Probe::Tcp { addr: f(addr) },
                other => other.clone(),
            };
        }
    }
    if let Some(e) = &plan.endpoint {
        plan.endpoint = Some(f(e));
    }
}
