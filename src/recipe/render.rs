//! From the deployment to the plan's task specs: templates render every command line, and
//! the rest (env, files, ports, readiness, dependencies) is filled in from the deployment.
//!
//! Templates are minijinja files under `templates/`, embedded in the binary. A site may
//! override any of them with a file of the same name in a directory (`--templates DIR` or
//! the recipe's `templates` field). An argv template writes one argument per line; each
//! line is trimmed and blank lines are dropped, so templates can be laid out freely and an
//! argument may hold spaces (JSON does) but no line break.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::json;

use super::deployment::{
    node_name, url, Deployment, DpPart, EngineProcess, Router, MOONCAKE_CONFIG_FILE,
    ROUTER_STARTUP_SECS,
};
use super::kinds::ALLOCATE;
use crate::actions::Action;
use crate::diag::{Problem, Problems};
use crate::plan::{host_ref, Command, Edge, FileSpec, Probe, Readiness, TaskSpec};
use mooncake::{mooncake_ctx, mooncake_tasks};

mod mooncake;

/// Why a P/D router restarts with an engine (its `--prefill`/`--decode` lists are fixed).
pub const PD_RESTART: &str =
    "a P/D router's worker lists are fixed at its start (vllm-router 0.1.17 refuses `add_worker` in P/D mode)";

/// The built-in templates, by file name.
pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "engine.argv.j2",
        include_str!("../../templates/engine.argv.j2"),
    ),
    (
        "router.argv.j2",
        include_str!("../../templates/router.argv.j2"),
    ),
    (
        "mooncake_master.argv.j2",
        include_str!("../../templates/mooncake_master.argv.j2"),
    ),
    (
        "metadata_server.argv.j2",
        include_str!("../../templates/metadata_server.argv.j2"),
    ),
    (
        "mooncake_client.argv.j2",
        include_str!("../../templates/mooncake_client.argv.j2"),
    ),
    (
        "mooncake_config.json.j2",
        include_str!("../../templates/mooncake_config.json.j2"),
    ),
];

/// The templates in force for one load.
pub struct TaskTemplates {
    env: Environment<'static>,
    /// Where overrides came from (for messages), and the recipe span that named it.
    origin: Option<(String, Option<Range<usize>>)>,
}

impl TaskTemplates {
    /// The built-in templates, each replaced by a same-named file of `dir` if there is one.
    /// `span` is the recipe field that named `dir` (none for `--templates`).
    pub fn load(dir: Option<(&Path, Option<Range<usize>>)>, p: &mut Problems) -> Option<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.add_filter("tojson", |v: minijinja::Value| {
            serde_json::to_string(&v).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
            })
        });
        // For a site template that writes a shell line: a value as one shell word.
        env.add_filter("shell_quote", |v: minijinja::Value| {
            crate::plan::shell_word(&v.to_string())
        });
        let before = p.len();
        let origin = dir
            .as_ref()
            .map(|(d, s)| (d.display().to_string(), s.clone()));
        let mut sources: Vec<(&'static str, String)> =
            TEMPLATES.iter().map(|(n, s)| (*n, s.to_string())).collect();
        if let Some((dir, span)) = dir {
            let at = span.clone();
            match std::fs::read_dir(dir) {
                Err(e) => p.push(
                    Problem::new(format!("cannot read the templates directory `{}`: {e}", dir.display()))
                        .at(at.clone())
                        .help("name an existing directory holding `*.j2` files to override; see docs/recipes.md"),
                ),
                Ok(entries) => {
                    let mut names: Vec<String> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".j2"))
                        .collect();
                    names.sort();
                    for name in names {
                        let Some(slot) = sources.iter_mut().find(|(n, _)| *n == name) else {
                            let known = TEMPLATES.iter().map(|(n, _)| *n);
                            let mut prob = Problem::new(format!(
                                "`{}` overrides no template: there is no template named `{name}`",
                                dir.join(&name).display()
                            ))
                            .at(at.clone());
                            prob = prob.help(match super::doc::near(&name, known) {
                                Some(s) => format!("did you mean `{s}`?"),
                                None => format!(
                                    "templates: {}",
                                    TEMPLATES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                                ),
                            });
                            p.push(prob);
                            continue;
                        };
                        match std::fs::read_to_string(dir.join(&name)) {
                            Ok(text) => slot.1 = text,
                            Err(e) => p.push(
                                Problem::new(format!("cannot read `{}`: {e}", dir.join(&name).display()))
                                    .at(at.clone()),
                            ),
                        }
                    }
                }
            }
        }
        for (name, source) in sources {
            if let Err(e) = env.add_template_owned(name, source) {
                p.push(template_problem(&origin, name, &e));
            }
        }
        (p.len() == before).then_some(Self { env, origin })
    }

    fn text(&self, name: &str, ctx: &impl Serialize) -> Result<String, minijinja::Error> {
        self.env.get_template(name)?.render(ctx)
    }

    /// Renders an argv template: one argument per line, trimmed, blank lines dropped.
    fn argv(&self, name: &str, ctx: &impl Serialize) -> Result<Vec<String>, minijinja::Error> {
        let text = self.text(name, ctx)?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    fn problem(&self, name: &str, e: &minijinja::Error) -> Problem {
        template_problem(&self.origin, name, e)
    }
}

fn template_problem(
    origin: &Option<(String, Option<Range<usize>>)>,
    name: &str,
    e: &minijinja::Error,
) -> Problem {
    let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(&format!(": {s}"));
        source = s.source();
    }
    let (from, span) = match origin {
        Some((dir, span)) => (format!(" (templates from `{dir}`)"), span.clone()),
        None => (String::new(), None),
    };
    Problem::new(format!("template `{name}`{line}{from}: {detail}"))
        .at(span)
        .label("templates from here")
        .help("fix the template; the variables each template gets are listed at its top and in docs/recipes.md")
}

#[derive(Serialize)]
struct EngineCtx<'a> {
    launcher: &'a [String],
    model: &'a str,
    role: &'static str,
    host: String,
    port: u16,
    headless: bool,
    tp: u32,
    dp: u32,
    dp_local: u32,
    dp_start_rank: u32,
    /// The global rank of an external-balancing rank; none otherwise.
    dp_rank: Option<u32>,
    dp_address: String,
    dp_rpc_port: u16,
    multi_node: bool,
    /// Raise the locked-memory limit before starting (KV offload pins host memory).
    memlock_unlimited: bool,
    gpu_memory_utilization: Option<&'a str>,
    compilation_config: Option<&'a str>,
    expert_parallel: bool,
    dbo: bool,
    eplb: bool,
    return_routed_experts: bool,
    prefix_caching: Option<bool>,
    kv_transfer_config: Option<&'a str>,
    extra: &'a [String],
}

#[derive(Serialize)]
struct RouterCtx<'a> {
    launcher: &'a [String],
    host: String,
    /// The address it binds: `host`, or the recipe's `router_host`.
    bind: String,
    log_level: &'a str,
    port: u16,
    metrics_port: u16,
    policy: &'a str,
    pd: bool,
    workers: &'a [String],
    prefill: &'a [String],
    decode: &'a [String],
    startup_timeout_secs: u64,
}

/// The argv prefixes that start the engine and the router: the caller decides them
/// rather than the recipe.
pub struct ArgvPrefixes<'a> {
    pub engine: &'a [String],
    pub router: &'a [String],
}

/// Renders every deployment task, in a stable order: allocate, the Mooncake store, engines
/// (replica by replica, node by node), routers, registrations, health probes.
pub fn tasks(
    dep: &Deployment,
    t: &TaskTemplates,
    launchers: &ArgvPrefixes<'_>,
    p: &mut Problems,
) -> Vec<TaskSpec> {
    let mut out = Vec::with_capacity(dep.engines.len() * 2 + dep.routers.len() * 3 + dep.nodes + 3);
    out.push(TaskSpec {
        id: ALLOCATE.into(),
        kind: Action::Allocate.name().into(),
        command: Command::Builtin {
            action: Action::Allocate,
            args: json!({ "nodes": dep.nodes, "gpus_per_node": dep.gpus_per_node }),
        },
        ..TaskSpec::default()
    });
    if let Some(m) = &dep.mooncake {
        mooncake_tasks(dep, m, t, p, &mut out);
    }
    // A node's Mooncake client config, the same for every engine on the node: rendered once
    // per node (`None`: it could not be, and that was reported once).
    let mut node_configs: HashMap<usize, Option<String>> = HashMap::new();
    for e in &dep.engines {
        if let Some(task) = engine_task(dep, e, t, launchers.engine, &mut node_configs, p) {
            out.push(task);
        }
    }
    for r in &dep.routers {
        if let Some(task) = router_task(dep, r, t, launchers.router, p) {
            out.push(task);
        }
    }
    // Each router's engines by id: a look-up per engine of the router, not a pass over every
    // engine of the deployment per router.
    let engines: HashMap<&str, &EngineProcess> =
        dep.engines.iter().map(|e| (e.id.as_str(), e)).collect();
    for r in &dep.routers {
        // It needs the engines too: an engine that a resume restarts is announced again to
        // a router that stayed up (regular mode), or checked in a restarted one (P/D).
        let mut needs = vec![r.id.clone()];
        needs.extend(r.engines.iter().cloned());
        let tasks: serde_json::Map<String, serde_json::Value> = r
            .engines
            .iter()
            .filter_map(|id| engines.get(id.as_str()))
            .filter(|e| !e.headless)
            .map(|e| (url(e.node, e.port), json!(e.id)))
            .collect();
        out.push(TaskSpec {
            id: format!("register{}", r.suffix),
            kind: Action::Register.name().into(),
            needs,
            command: Command::Builtin {
                action: Action::Register,
                args: json!({
                    "router": r.url(),
                    "mode": if r.pd { "pd" } else { "regular" },
                    "workers": r.workers,
                    "prefill": r.prefill,
                    "decode": r.decode,
                    "worker_tasks": tasks,
                }),
            },
            ..TaskSpec::default()
        });
    }
    for r in &dep.routers {
        out.push(TaskSpec {
            id: format!("health-probe{}", r.suffix),
            kind: Action::HealthProbe.name().into(),
            needs: vec![format!("register{}", r.suffix)],
            command: Command::Builtin {
                action: Action::HealthProbe,
                args: json!({ "router": r.url(), "model": dep.served_model_name }),
            },
            ..TaskSpec::default()
        });
    }
    out
}

fn readiness(
    probe: Probe,
    interval: Duration,
    start_period: Duration,
    ready_timeout: Duration,
) -> Readiness {
    let mut r = Readiness::new(probe);
    r.interval = interval;
    r.start_period = start_period;
    r.ready_timeout = Some(ready_timeout);
    r
}

fn engine_task(
    dep: &Deployment,
    e: &EngineProcess,
    t: &TaskTemplates,
    launcher: &[String],
    node_configs: &mut HashMap<usize, Option<String>>,
    p: &mut Problems,
) -> Option<TaskSpec> {
    let node = node_name(e.node);
    let (dp, dp_local, dp_start_rank, dp_rank, multi_node) = match e.dp {
        DpPart::Alone => (1, 1, 0, None, false),
        DpPart::Rank { size, rank } => (size, 1, rank, Some(rank), false),
        DpPart::Node {
            size,
            local,
            start,
            spans_nodes,
        } => (size, local, start, None, spans_nodes),
    };
    let ctx = EngineCtx {
        launcher,
        model: &dep.model,
        role: e.role.kind(),
        host: host_ref(&node),
        port: e.port,
        headless: e.headless,
        tp: dep.tp,
        dp,
        dp_local,
        dp_start_rank,
        dp_rank,
        dp_address: host_ref(&node_name(e.head)),
        dp_rpc_port: e.rpc_port,
        multi_node,
        memlock_unlimited: dep.offload.is_some(),
        gpu_memory_utilization: dep.gpu_memory_utilization.as_deref(),
        compilation_config: e.compilation_config.as_deref(),
        expert_parallel: dep.expert_parallel,
        dbo: dep.dbo,
        eplb: dep.eplb,
        return_routed_experts: dep.return_routed_experts,
        prefix_caching: dep.prefix_caching,
        kv_transfer_config: e.kv_transfer_config.as_deref(),
        extra: &dep.extra_args,
    };
    let argv = match t.argv("engine.argv.j2", &ctx) {
        Ok(a) => a,
        Err(err) => {
            p.push(t.problem("engine.argv.j2", &err));
            return None;
        }
    };
    let mut needs = vec![ALLOCATE.to_string()];
    let mut files = Vec::new();
    if let Some(m) = &dep.mooncake {
        needs.push(format!("mooncake-client.node[{}]", e.node));
        let config = node_configs.entry(e.node).or_insert_with(|| {
            t.text("mooncake_config.json.j2", &mooncake_ctx(dep, m, e.node))
                .map_err(|err| p.push(t.problem("mooncake_config.json.j2", &err)))
                .ok()
        });
        if let Some(content) = config {
            files.push(FileSpec {
                path: MOONCAKE_CONFIG_FILE.into(),
                content: content.clone(),
            });
        }
    }
    // A headless node has no HTTP server: it is up once started, and its replica's head
    // answers /health only when every rank has joined.
    let ready = (!e.headless).then(|| {
        readiness(
            Probe::Http {
                url: format!("{}/health", url(e.node, e.port)),
            },
            dep.probe_interval,
            dep.ready_timeout,
            dep.ready_timeout,
        )
    });
    Some(TaskSpec {
        id: e.id.clone(),
        kind: e.role.kind().into(),
        needs,
        node: Some(node),
        command: Command::Argv { argv },
        env: e.env.clone(),
        files,
        ports: e.ports.clone(),
        service: true,
        ready,
        ..TaskSpec::default()
    })
}

fn router_task(
    dep: &Deployment,
    r: &Router,
    t: &TaskTemplates,
    launcher: &[String],
    p: &mut Problems,
) -> Option<TaskSpec> {
    let host = host_ref(&node_name(r.node));
    let ctx = RouterCtx {
        launcher,
        bind: r.bind.clone().unwrap_or_else(|| host.clone()),
        log_level: &dep.router_log_level,
        host,
        port: r.port,
        metrics_port: r.metrics_port,
        policy: &dep.router_policy,
        pd: r.pd,
        workers: &r.workers,
        prefill: &r.prefill,
        decode: &r.decode,
        startup_timeout_secs: dep.ready_timeout.as_secs().max(ROUTER_STARTUP_SECS),
    };
    let argv = match t.argv("router.argv.j2", &ctx) {
        Ok(a) => a,
        Err(err) => {
            p.push(t.problem("router.argv.j2", &err));
            return None;
        }
    };
    let mut needs = vec![ALLOCATE.to_string()];
    needs.extend(r.engines.iter().cloned());
    // A restarted engine is re-registered with the live router; in P/D mode the router
    // cannot take it back and restarts.
    let edge = if r.pd {
        Edge::Restart(PD_RESTART.into())
    } else {
        Edge::Reregister
    };
    let edges = r
        .engines
        .iter()
        .map(|e| (e.clone(), edge.clone()))
        .collect();
    Some(TaskSpec {
        id: r.id.clone(),
        kind: "router".into(),
        needs,
        edges,
        node: Some(node_name(r.node)),
        command: Command::Argv { argv },
        ports: vec![r.port, r.metrics_port],
        service: true,
        // `/readiness`, not `/health`: the router answers /health with no worker at all.
        ready: Some(readiness(
            Probe::Http {
                url: format!("{}/readiness", r.url()),
            },
            dep.probe_interval,
            Duration::from_secs(ROUTER_STARTUP_SECS),
            Duration::from_secs(ROUTER_STARTUP_SECS + 30),
        )),
        ..TaskSpec::default()
    })
}
