//! The command line: parsing (clap), loading files into plans, and turning results into
//! output and exit codes (0 ok, 1 the run failed, 2 bad input). Results go to stdout, progress
//! and messages to stderr; a closed stdout pipe (`prl-flow graph x | head`) is not an error.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use prl_flow_backend::{Backend, ProcState};
use prl_flow_engine::{
    decide, journal, Decision, Graph, GraphError, Journal, JournalError, Record, RunOptions, Sink,
    Status, Subscriber,
};

use crate::diag::{Problem, Problems};
use crate::exec::{build_graph, Exec};
use crate::graph_render::{self, Format};
use crate::plan::Plan;

const EXAMPLES: &str = "\
Examples:
  prl-flow run recipes/local/disaggregated.toml --engine mock   bring a deployment up here
  prl-flow run build.toml -j 4                    run a workflow of shell tasks
  prl-flow run build.toml --resume --explain      re-run only what is not done, and say why
  prl-flow graph build.toml --format dot | dot -Tsvg > graph.svg
  prl-flow status                                 what runs, and is it alive
  prl-flow logs server -f                         follow one task's log
  prl-flow down                                   stop everything, last started first";

#[derive(Parser)]
#[command(
    name = "prl-flow",
    version,
    about = "Bring up LLM inference deployments (vLLM engines, vllm-router, Mooncake) as a graph of tasks",
    long_about = "Bring up LLM inference deployments as a dependency graph of tasks.\n\n\
A FILE is either a deployment recipe (an `[inference]` table: see docs/recipes.md) or a plain \
workflow of `[[task]]` entries (shell commands with `needs`). Each run keeps a journal in a \
state dir (default `.prl-flow/<name>/`), so a bring-up that failed half-way resumes without \
starting anything twice, and `status`, `logs` and `down` work from another shell.",
    after_help = EXAMPLES
)]
struct Cli {
    /// Show debug logs on stderr (hides progress bars).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Print only errors and the final result.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Plain lines instead of progress bars, even on a terminal.
    #[arg(long, global = true)]
    no_progress: bool,
    /// A site file: the site's backend, its defaults and plugins (docs/plugins.md).
    #[arg(long, global = true, value_name = "FILE", env = "PRL_FLOW_SITE")]
    site: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a recipe or workflow: every task once its dependencies are done.
    #[command(after_help = "Examples:
  prl-flow run recipes/local/single_node.toml --engine mock
  prl-flow run build.toml -j 8 --keep-going
  prl-flow run build.toml --resume --explain

A failed or interrupted run stops the services it started (unless --keep). Fix the cause, then
`--resume`: tasks recorded as done, unchanged and still alive are kept; the rest run again.")]
    Run(RunArgs),
    /// Draw the task graph (ascii, dot, mermaid or json).
    #[command(after_help = "Examples:
  prl-flow graph build.toml
  prl-flow graph recipes/disaggregated.toml --format dot | dot -Tsvg > graph.svg
  prl-flow graph build.toml --format mermaid >> README.md")]
    Graph(GraphArgs),
    /// Show every task with its command, env, node and readiness probe, before anything runs.
    #[command(after_help = "Examples:
  prl-flow plan recipes/disaggregated.toml
  prl-flow plan recipes/multi_node.toml --backend local --format json | jq '.tasks[].argv'")]
    Plan(PlanArgs),
    /// Check a recipe or workflow and report every problem at once.
    #[command(after_help = "Example:\n  prl-flow validate recipes/wide_ep.toml")]
    Validate(FileArgs),
    /// The state of each task from the journal; services are checked live.
    #[command(after_help = "Examples:
  prl-flow status
  prl-flow status recipes/local/single_node.toml -v    also say what a --resume would do")]
    Status(StateArgs),
    /// Stop every service the journal records, in reverse order, and release nodes.
    #[command(
        after_help = "Examples:\n  prl-flow down\n  prl-flow down --state-dir /scratch/run1"
    )]
    Down(StateArgs),
    /// Print a task's log (`-f` to follow it).
    #[command(
        after_help = "Examples:\n  prl-flow logs router\n  prl-flow logs 'prefill[0].node[0]' -f"
    )]
    Logs(LogsArgs),
    /// List the backends: built in, and plugins found on PATH or named by the site file.
    #[command(after_help = "Example:\n  PATH=$PWD/examples/plugins:$PATH prl-flow plugins")]
    Plugins,
    /// Site plugins: `plugin test NAME` runs the conformance scenario against a backend.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// The stand-in for `vllm serve` used where there is no GPU (takes vllm serve's flags).
    #[command(hide = true, disable_help_flag = true)]
    MockEngine {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Run the conformance scenario (allocate, spawn, probe, check, reattach, stop, release)
    /// against a backend, built in or plugin, and report each step.
    #[command(
        after_help = "Examples:\n  prl-flow plugin test local\n  prl-flow plugin test wrapped"
    )]
    Test {
        /// The backend's name (`local`, or a plugin's).
        name: String,
    },
}

#[derive(Args, Clone)]
struct FileArgs {
    /// A recipe or workflow file (TOML).
    file: PathBuf,
    /// Override the recipe's backend (`local`, `ssh`, `slurm`, or a plugin).
    #[arg(long)]
    backend: Option<String>,
    /// Use the mock engine instead of the recipe's launcher (no GPU needed).
    #[arg(long, value_enum, default_value_t = EngineArg::Real)]
    engine: EngineArg,
    /// A directory of templates overriding the built-in ones.
    #[arg(long, value_name = "DIR")]
    templates: Option<PathBuf>,
    /// The router program (argv prefix), instead of the recipe's or `vllm-router`.
    #[arg(long, value_name = "PATH")]
    router: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// The recipe's launcher (`vllm serve`).
    Real,
    /// `prl-flow mock-engine`: same flags, same HTTP API, no GPU.
    Mock,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    file: FileArgs,
    /// The state dir (journal and logs); default `.prl-flow/<name>`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// At most N tasks at once (default: CPUs + 2 for workflows, 256 for deployments).
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,
    /// After a failure, go on with everything that does not depend on it.
    #[arg(short, long)]
    keep_going: bool,
    /// On failure or Ctrl-C, leave the services this run started running.
    #[arg(long)]
    keep: bool,
    /// Keep what an earlier run did that is still valid; run the rest.
    #[arg(short, long)]
    resume: bool,
    /// Print, per task, why it runs or is kept.
    #[arg(long)]
    explain: bool,
    /// Once up, stay in the foreground: report services that die, and stop everything on
    /// Ctrl-C (or when `prl-flow down` is run elsewhere).
    #[arg(long)]
    attach: bool,
}

#[derive(Args)]
struct GraphArgs {
    #[command(flatten)]
    file: FileArgs,
    #[arg(long, value_enum, default_value_t = Format::Ascii)]
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlanFormat {
    Text,
    Json,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    file: FileArgs,
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    format: PlanFormat,
}

#[derive(Args)]
struct StateArgs {
    /// The recipe or workflow (names the state dir); optional when `.prl-flow/` holds one.
    file: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct LogsArgs {
    /// The task's id (see `prl-flow status`).
    task: String,
    /// Keep printing what is appended, until the task ends (or Ctrl-C).
    #[arg(short, long)]
    follow: bool,
    /// The recipe or workflow (names the state dir).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// A failure that ends the command, with its exit code.
#[derive(Debug)]
pub enum Exit {
    /// Bad input: a message (with help) and exit 2.
    Usage(String),
    Problems(Problems),
    /// The run failed: exit 1 (its story is already told).
    Failed(String),
}

type R<T> = Result<T, Exit>;

pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    // The mock engine takes vLLM's flags verbatim: hand them over before clap sees them.
    if args.get(1).is_some_and(|a| a == "mock-engine") {
        return crate::mock::main(args[2..].to_vec());
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            };
        }
    };
    find_router();
    if cli.verbose > 0 {
        let filter = if cli.verbose > 1 {
            "debug"
        } else {
            "prl_flow=debug,prl_flow_engine=debug,prl_flow_local=debug,prl_flow_plugin=debug,prl_flow_ssh=debug,prl_flow_slurm=debug"
        };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("PRL_FLOW_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
            )
            .try_init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let result = rt.block_on(dispatch(&cli));
    // Don't wait for lingering blocking reads (a followed log) at exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(Exit::Usage(msg)) => {
            eprintln!("{msg}");
            2
        }
        Err(Exit::Problems(p)) => {
            eprint!("{}", p.render(color_stderr()));
            2
        }
        Err(Exit::Failed(msg)) => {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            1
        }
    }
}

/// The router version `./dev` installs, and where: `$XDG_CACHE_HOME/prl-flow/router-VERSION`.
pub const ROUTER_VERSION: &str = "0.1.17";

/// The Mooncake wheel `./dev` installs (`mooncake-transfer-engine-non-cuda`), and where:
/// `$XDG_CACHE_HOME/prl-flow/mooncake-VERSION`.
pub const MOONCAKE_VERSION: &str = "0.3.13.post1";

pub fn router_venv() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(
        cache
            .join("prl-flow")
            .join(format!("router-{ROUTER_VERSION}")),
    )
}

/// Makes `vllm-router` findable by the processes prl-flow starts: `PRL_FLOW_ROUTER` (a path
/// to the program) comes first; else the venv `./dev` installs is searched after the
/// user's own PATH. This runs before any thread starts.
fn find_router() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(p) = std::env::var_os("PRL_FLOW_ROUTER") {
        if let Some(d) = Path::new(&p).parent() {
            dirs.insert(0, d.to_path_buf());
        }
    } else if let Some(v) = router_venv() {
        dirs.push(v.join("bin"));
    }
    // Mooncake's programs, for the steps of a slurm deployment (srun passes PATH on):
    // `PRL_FLOW_MOONCAKE` (its bin dir), else the venv `./dev` installs.
    if let Some(p) = std::env::var_os("PRL_FLOW_MOONCAKE") {
        dirs.push(PathBuf::from(p));
    } else if let Some(v) =
        router_venv().and_then(|r| Some(r.parent()?.join(format!("mooncake-{MOONCAKE_VERSION}"))))
    {
        dirs.push(v.join("bin"));
    }
    if let Ok(joined) = std::env::join_paths(dirs) {
        std::env::set_var("PATH", joined);
    }
}

fn color_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The site file of this invocation (`--site` or `PRL_FLOW_SITE`), loaded once.
static SITE: std::sync::OnceLock<Option<crate::site::Site>> = std::sync::OnceLock::new();

fn site() -> Option<&'static crate::site::Site> {
    SITE.get().and_then(Option::as_ref)
}

async fn dispatch(cli: &Cli) -> R<i32> {
    let _ = SITE.set(crate::site::load(cli.site.as_deref()).map_err(Exit::Problems)?);
    match &cli.command {
        Cmd::Run(a) => run(cli, a).await,
        Cmd::Graph(a) => {
            let (plan, _) = load_checked(&a.file)?;
            out(&graph_render::render(&plan, a.format));
            Ok(0)
        }
        Cmd::Plan(a) => {
            let (mut plan, _) = load_checked(&a.file)?;
            if plan.backend == "local" {
                resolve_local(&mut plan);
            }
            match a.format {
                PlanFormat::Json => out(&plan_json(&plan)),
                PlanFormat::Text => out(&plan_text(&plan)),
            }
            Ok(0)
        }
        Cmd::Validate(a) => {
            let (plan, _) = load_checked(a)?;
            let services = plan.tasks.iter().filter(|t| t.service).count();
            out(&format!(
                "`{}` is valid: {} ({}) on {}, backend `{}`\n",
                a.file.display(),
                crate::diag::count(plan.tasks.len(), "task"),
                crate::diag::count(services, "service"),
                crate::diag::count(plan.nodes.len(), "node"),
                plan.backend
            ));
            Ok(0)
        }
        Cmd::Status(a) => status(cli, a).await,
        Cmd::Down(a) => down(cli, a).await,
        Cmd::Logs(a) => logs(a).await,
        Cmd::MockEngine { args } => Ok(crate::mock::main(args.clone())),
        Cmd::Plugins => {
            out(&crate::site::plugins_text(site()).await);
            Ok(0)
        }
        Cmd::Plugin(PluginCmd::Test { name }) => {
            let passed = crate::site::test_backend(name, site(), &mut |l| out(&format!("{l}\n")))
                .await
                .map_err(Exit::Usage)?;
            Ok(if passed { 0 } else { 1 })
        }
    }
}

/// Prints to stdout; a closed pipe ends quietly.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    if o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// Reads a file and makes a plan of it: a recipe when it has `[inference]`, else a workflow.
fn load(a: &FileArgs) -> R<(Plan, Arc<String>)> {
    let path = &a.file;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Exit::Usage(format!("error: cannot read `{}`: {e}", path.display())))?;
    let source = Arc::new(text);
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let shown = path.display().to_string();
    // The site's backend applies to a file that names none (a recipe is derived for its
    // backend, so it is passed in, not patched in afterwards).
    let explicit = a.backend.is_some() || crate::site::declares_backend(&source);
    let backend = match (&a.backend, site()) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(s)) if !explicit => s.backend.clone(),
        _ => None,
    };
    let mut plan = if crate::recipe::is_recipe(&source) {
        let launcher = match a.engine {
            EngineArg::Real => crate::recipe::Launcher::Vllm,
            EngineArg::Mock => crate::recipe::Launcher::Mock {
                argv_prefix: vec![self_exe(), "mock-engine".into()],
            },
        };
        let opts = crate::recipe::Options {
            backend: backend.clone(),
            templates: a
                .templates
                .clone()
                .or_else(|| site().and_then(|s| crate::site::default_templates(s, &source))),
            launcher,
            router: a.router.as_ref().map(|r| vec![r.clone()]),
        };
        crate::recipe::load(&shown, source.clone(), &name, &opts).map_err(Exit::Problems)?
    } else {
        crate::workflow::parse(&shown, source.clone(), &name).map_err(Exit::Problems)?
    };
    if let Some(b) = &backend {
        plan.backend = b.clone();
    }
    if let Some(s) = site() {
        crate::site::apply(s, &mut plan, explicit);
    }
    if plan.backend == "ssh" {
        check_ssh_hosts(path, &source, &plan)?;
    }
    Ok((plan, source))
}

/// The ssh backend's `[backend]` table, checked against the plan: every problem at once, at
/// the table's place, e.g. a recipe that needs more nodes than there are hosts.
fn check_ssh_hosts(path: &Path, source: &Arc<String>, plan: &Plan) -> R<()> {
    let base = path.parent().filter(|p| !p.as_os_str().is_empty());
    let Err(errors) = prl_flow_ssh::validate(&plan.backend_config, plan.nodes.len(), base) else {
        return Ok(());
    };
    let at = source.find("[backend]").map(|i| i..i + "[backend]".len());
    let mut p = Problems::new(path.display().to_string(), source.clone());
    for e in errors {
        let mut q = Problem::new(format!("`backend.{}`: {}", e.field, e.message))
            .at(at.clone())
            .label("the ssh backend's table");
        if let Some(h) = e.help {
            q = q.help(h);
        }
        p.push(q);
    }
    Err(Exit::Problems(p))
}

fn self_exe() -> String {
    std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "prl-flow".into())
}

/// Loads and checks the graph too (duplicates, unknown needs, cycles), without running.
fn load_checked(a: &FileArgs) -> R<(Plan, Arc<String>)> {
    let (plan, source) = load(a)?;
    let exec = Arc::new(Exec::new(
        Arc::new(prl_flow_local::LocalBackend::new()),
        Path::new("."),
        plan.nodes.clone(),
    ));
    build_graph(&plan, &exec).map_err(|e| graph_problems(&a.file, &source, e))?;
    Ok((plan, source))
}

fn graph_problems(path: &Path, source: &Arc<String>, errors: Vec<GraphError>) -> Exit {
    let mut p = Problems::new(path.display().to_string(), source.clone());
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
    Exit::Problems(p)
}

fn resolve_local(plan: &mut Plan) {
    let hosts: BTreeMap<String, String> = plan
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), prl_flow_local::LocalBackend::address(i)))
        .collect();
    let f = |s: &str| crate::plan::resolve_hosts(s, &|n| hosts.get(n).cloned());
    for t in &mut plan.tasks {
        t.command = match std::mem::take(&mut t.command) {
            crate::plan::Command::Argv { argv } => crate::plan::Command::Argv {
                argv: argv.iter().map(|a| f(a)).collect(),
            },
            crate::plan::Command::Shell { script } => {
                crate::plan::Command::Shell { script: f(&script) }
            }
            crate::plan::Command::Builtin { action, args } => {
                let text = f(&args.to_string());
                crate::plan::Command::Builtin {
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
                crate::plan::Probe::Http { url } => crate::plan::Probe::Http { url: f(url) },
                crate::plan::Probe::Tcp { addr } => crate::plan::Probe::Tcp { addr: f(addr) },
                other => other.clone(),
            };
        }
    }
    if let Some(e) = &plan.endpoint {
        plan.endpoint = Some(f(e));
    }
}

fn plan_json(plan: &Plan) -> String {
    let tasks: Vec<serde_json::Value> = plan
        .tasks
        .iter()
        .map(|t| {
            let mut v = serde_json::json!({
                "id": t.id,
                "kind": t.kind,
                "needs": t.needs,
                "node": t.node,
                "service": t.service,
                "env": t.env,
                "ports": t.ports,
                "ready": t.ready,
                "fingerprint": t.fingerprint(),
            });
            match &t.command {
                crate::plan::Command::Argv { argv } => v["argv"] = serde_json::json!(argv),
                crate::plan::Command::Shell { script } => {
                    v["argv"] = serde_json::json!(["sh", "-c", script])
                }
                crate::plan::Command::Builtin { action, args } => {
                    v["argv"] = serde_json::json!([]);
                    v["builtin"] = serde_json::json!({ "action": action, "args": args });
                }
            }
            if !t.files.is_empty() {
                v["files"] = serde_json::json!(t.files);
            }
            if let Some(d) = t.timeout {
                v["timeout"] = serde_json::json!(crate::plan::format_duration(d));
            }
            if t.retries > 0 {
                v["retries"] = serde_json::json!(t.retries);
            }
            v
        })
        .collect();
    let doc = serde_json::json!({
        "name": plan.name,
        "backend": plan.backend,
        "nodes": plan.nodes,
        "endpoint": plan.endpoint,
        "tasks": tasks,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

fn plan_text(plan: &Plan) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "plan `{}`: {} tasks, backend `{}`{}",
        plan.name,
        plan.tasks.len(),
        plan.backend,
        if plan.nodes.is_empty() {
            String::new()
        } else {
            format!(", nodes {}", plan.nodes.join(" "))
        }
    );
    for t in &plan.tasks {
        let _ = writeln!(s);
        let svc = if t.service { " (service)" } else { "" };
        let _ = writeln!(s, "{} [{}]{svc}", t.id, t.kind);
        if let Some(n) = &t.node {
            let _ = writeln!(s, "  node:   {n}");
        }
        if !t.needs.is_empty() {
            let _ = writeln!(s, "  needs:  {}", t.needs.join(", "));
        }
        let _ = writeln!(s, "  run:    {}", t.command_line());
        for (k, v) in &t.env {
            let _ = writeln!(s, "  env:    {k}={v}");
        }
        for f in &t.files {
            let _ = writeln!(s, "  file:   {} ({} bytes)", f.path, f.content.len());
        }
        if !t.ports.is_empty() {
            let ports: Vec<String> = t.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(s, "  ports:  {}", ports.join(", "));
        }
        if let Some(r) = &t.ready {
            let mut line = format!(
                "  ready:  {} every {}",
                r.probe.describe(),
                crate::plan::format_duration(r.interval)
            );
            if !r.start_period.is_zero() {
                line.push_str(&format!(
                    ", start period {}",
                    crate::plan::format_duration(r.start_period)
                ));
            }
            if let Some(t) = r.ready_timeout {
                line.push_str(&format!(
                    ", give up after {}",
                    crate::plan::format_duration(t)
                ));
            }
            let _ = writeln!(s, "{line}");
        }
        if let Some(d) = t.timeout {
            let _ = writeln!(s, "  timeout: {}", crate::plan::format_duration(d));
        }
        if t.retries > 0 {
            let _ = writeln!(s, "  retries: {}", t.retries);
        }
    }
    s
}

/// A backend by name: built in, or a plugin (site file, recipe, PATH). `config` is the
/// plan's `[backend]` table, `Value::Null` without a plan.
fn backend_for(name: &str, config: &serde_json::Value) -> R<Arc<dyn Backend>> {
    match name {
        "ssh" => Ok(Arc::new(prl_flow_ssh::SshBackend::from_handles())),
        "slurm" => Ok(Arc::new(prl_flow_slurm::SlurmBackend::for_handles())),
        _ => crate::site::find(name, site(), config).map_err(Exit::Usage),
    }
}

/// The backend a run of `plan` uses, configured by the recipe's `[backend]` table (with the
/// site's defaults) and knowing the state dir.
fn backend_for_plan(plan: &Plan, dir: &Path) -> R<Arc<dyn Backend>> {
    let bad = |e: String| {
        Exit::Usage(format!(
            "error: the `[backend]` of `{}` is not usable: {e}",
            plan.name
        ))
    };
    match plan.backend.as_str() {
        "ssh" => Ok(Arc::new(
            prl_flow_ssh::SshBackend::from_config(&plan.backend_config, dir).map_err(bad)?,
        )),
        "slurm" => Ok(Arc::new(
            prl_flow_slurm::SlurmBackend::from_config(&plan.backend_config, dir).map_err(bad)?,
        )),
        other => backend_for(other, &plan.backend_config),
    }
}

fn default_state_dir(plan: &Plan) -> PathBuf {
    PathBuf::from(".prl-flow").join(&plan.name)
}

fn journal_error(e: JournalError) -> Exit {
    match e {
        JournalError::Locked { dir, holder } => Exit::Usage(format!(
            "error: the state dir `{}` is in use by another prl-flow: {holder}\n  help: wait for it to finish, or use another `--state-dir`",
            dir.display()
        )),
        other => Exit::Usage(format!("error: {other}")),
    }
}

/// Services an earlier run left that are still alive, by id.
/// Fills in the handles of records left `running` without one (prl-flow was killed between
/// starting a process and recording it) from what the backend finds in the task's run dir,
/// and records them, so that nothing a killed run started is invisible to a fresh run's
/// check for live services, to `down`, or to `status`.
async fn recover_missing(
    backend: &dyn Backend,
    journal: &Journal,
    records: &mut BTreeMap<String, Record>,
) {
    let paths = Exec::new(
        Arc::new(prl_flow_local::LocalBackend::new()),
        journal.dir(),
        Vec::new(),
    );
    for r in records.values_mut() {
        if r.status != Status::Running
            || r.handle.is_some()
            || BUILTIN_KINDS.contains(&r.kind.as_str())
        {
            continue;
        }
        let spec = prl_flow_backend::SpawnSpec {
            task: r.id.clone(),
            node: r
                .meta
                .get("node")
                .and_then(|n| n.as_str())
                .map(String::from),
            run_dir: paths.run_dir(&r.id),
            log: paths.log_path(&r.id),
            service: r.service,
            ..Default::default()
        };
        if let Ok(Some(h)) = backend.recover(&spec, r.started_ms.unwrap_or(0)).await {
            r.handle = Some(h.clone());
            journal.update_now(&r.id, |rec| rec.handle = Some(h));
        }
    }
}

/// Kinds whose work prl-flow does itself: no process to find.
const BUILTIN_KINDS: &[&str] = &["allocate", "register", "health-probe"];

async fn live_services(backend: &dyn Backend, records: &BTreeMap<String, Record>) -> Vec<String> {
    let mut live = Vec::new();
    for r in records.values() {
        if r.service && matches!(r.status, Status::Done | Status::Running) && r.kind != "allocate" {
            if let Some(h) = &r.handle {
                if matches!(backend.status(h).await, Ok(ProcState::Running)) {
                    live.push(r.id.clone());
                }
            }
        }
    }
    live
}

/// The file as hints name it, with `--state-dir` when one was given (`prl-flow down FILE`
/// alone would look in the default state dir).
fn hint_args(a: &RunArgs) -> String {
    match &a.state_dir {
        Some(d) => format!("{} --state-dir {}", a.file.file.display(), d.display()),
        None => a.file.file.display().to_string(),
    }
}

fn holder(args: &RunArgs) -> String {
    format!("prl-flow run {}", args.file.file.display())
}

async fn run(cli: &Cli, a: &RunArgs) -> R<i32> {
    let (plan, source) = load(&a.file)?;
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&plan));
    let backend = backend_for_plan(&plan, &dir)?;
    let exec = Arc::new(Exec::new(backend.clone(), &dir, plan.nodes.clone()));
    let graph = build_graph(&plan, &exec).map_err(|e| graph_problems(&a.file.file, &source, e))?;

    let journal = Journal::open(&dir, true, &holder(a)).map_err(journal_error)?;
    let mut previous = journal.records();
    recover_missing(backend.as_ref(), &journal, &mut previous).await;
    if !a.resume {
        let live = live_services(backend.as_ref(), &previous).await;
        if !live.is_empty() {
            let file = hint_args(a);
            return Err(Exit::Usage(format!(
                "error: `{}` has {} live service{} from an earlier run: {}\n  help: `prl-flow run {file} --resume` keeps what is still valid and runs the rest;\n        `prl-flow down {file}` stops them first",
                dir.display(),
                live.len(),
                if live.len() == 1 { "" } else { "s" },
                live.join(", ")
            )));
        }
        journal.reset();
    }
    if a.resume {
        for id in prl_flow_engine::recover_handles(&graph, &mut previous).await {
            if let Some(h) = previous.get(&id).and_then(|r| r.handle.clone()) {
                journal.update(&id, |r| r.handle = Some(h));
            }
        }
    }
    let journal = Arc::new(journal);
    exec.prime(&previous);
    let previous = a.resume.then_some(previous);
    let decisions = decide(&graph, previous.as_ref()).await;
    if a.explain {
        out(&explain(&graph, &decisions));
    }

    let mut subs: Vec<Arc<dyn Subscriber>> = vec![journal.recorder(&graph)];
    let tty = std::io::stderr().is_terminal();
    if cli.verbose == 0
        && tty
        && !cli.no_progress
        && !cli.quiet
        && std::env::var_os("NO_COLOR").is_none()
    {
        subs.push(Arc::new(crate::progress::Bars::new()));
    } else {
        subs.push(Arc::new(crate::progress::Lines::stderr(cli.quiet)));
    }
    let is_deployment = !plan.nodes.is_empty();
    let options = RunOptions {
        jobs: a.jobs.unwrap_or(if is_deployment {
            256
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                + 2
        }),
        keep_going: a.keep_going,
        keep: a.keep,
    };
    let cancel = prl_flow_engine::CancelSource::new();
    let token = cancel.token();
    let signals = {
        let journal = journal.clone();
        tokio::spawn(async move {
            wait_signal().await;
            cancel.fire();
            wait_signal().await;
            eprintln!("second signal: exiting now; the journal records what still runs");
            journal.flush();
            std::process::exit(130);
        })
    };
    let report = prl_flow_engine::run(
        &graph,
        &decisions,
        previous.as_ref(),
        &options,
        Sink::new(subs),
        token,
    )
    .await;
    signals.abort();
    journal.flush();
    drop(graph);
    if let Ok(j) = Arc::try_unwrap(journal) {
        j.close().map_err(journal_error)?;
    }

    let s = &report.summary;
    let took = prl_flow_engine::fmt_duration(Duration::from_millis(s.elapsed_ms));
    let file = hint_args(a);
    if report.ok() {
        let kept = if s.kept > 0 {
            format!(", {} kept", s.kept)
        } else {
            String::new()
        };
        eprintln!(
            "ok: {} done{kept} in {took}",
            crate::diag::count(s.done, "task")
        );
        if let Some(e) = &plan.endpoint {
            let url = exec.resolve(e);
            let model = plan
                .tasks
                .iter()
                .find(|t| t.kind == "health-probe")
                .and_then(|t| match &t.command {
                    crate::plan::Command::Builtin { args, .. } => {
                        args.get("model").and_then(|m| m.as_str()).map(String::from)
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "default".into());
            out(&format!(
                "endpoint: {url}\ntry:\n  curl -s {url}/v1/completions -H 'Content-Type: application/json' -H 'X-Session-ID: demo' \\\n    -d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
            ));
        }
        if a.attach {
            return attach(&dir, backend.as_ref(), cli.quiet).await;
        }
        if plan.tasks.iter().any(|t| t.service) {
            eprintln!("services keep running; stop them with `prl-flow down {file}`");
        }
        return Ok(0);
    }
    let mut msg = String::new();
    for (i, e) in report.errors.iter().enumerate() {
        if let (Some(e), Some(o)) = (e, report.outcomes[i]) {
            msg.push_str(&format!(
                "error: task {} {}: {}\n",
                exec_id(&plan, i),
                o.as_str(),
                e.message
            ));
        }
    }
    let what = if report.cancelled {
        "run cancelled"
    } else {
        "run failed"
    };
    msg.push_str(&format!(
        "{what}: {} done, {} kept, {} failed, {} timed out, {} cancelled, {} skipped ({took})\n",
        s.done, s.kept, s.failed, s.timed_out, s.cancelled, s.skipped
    ));
    if a.keep {
        msg.push_str(&format!(
            "services were left running (--keep); `prl-flow down {file}` stops them\n"
        ));
    }
    msg.push_str(&format!(
        "  help: fix the cause, then `prl-flow run {file} --resume` re-runs only what failed and what depends on it"
    ));
    Err(Exit::Failed(msg))
}

fn exec_id(plan: &Plan, i: usize) -> String {
    format!("`{}`", plan.tasks[i].id)
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn explain(graph: &Graph, decisions: &[Decision]) -> String {
    let width = graph
        .tasks()
        .iter()
        .map(|t| t.id().len())
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    for &i in graph.topo() {
        let (word, why) = match &decisions[i] {
            Decision::Keep => ("keep", "done, unchanged and still valid".to_string()),
            Decision::Adopt => ("adopt", "still in flight from the last run".to_string()),
            Decision::Run(r) => ("run", r.to_string()),
        };
        s.push_str(&format!(
            "{word:<5} {:<width$}  {why}\n",
            graph.task(i).id()
        ));
    }
    s
}

/// The state dir: `--state-dir`, or named by the file, or the only one under `.prl-flow/`.
/// A plan and the source text it came from.
type Loaded = (Plan, Arc<String>);

fn state_dir_of(file: Option<&Path>, dir: Option<&Path>) -> R<(PathBuf, Option<Loaded>)> {
    if let Some(d) = dir {
        let loaded = match file {
            Some(f) => Some(load(&file_args(f))?),
            None => None,
        };
        return Ok((d.to_path_buf(), loaded));
    }
    if let Some(f) = file {
        let loaded = load(&file_args(f))?;
        return Ok((default_state_dir(&loaded.0), Some(loaded)));
    }
    let root = Path::new(".prl-flow");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("journal.json").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    match dirs.len() {
        1 => Ok((dirs.remove(0), None)),
        0 => Err(Exit::Usage(
            "error: no state dir here (`.prl-flow/` has none)\n  help: name the recipe or workflow (`prl-flow status FILE`) or `--state-dir DIR`".into(),
        )),
        _ => Err(Exit::Usage(format!(
            "error: `.prl-flow/` holds several state dirs: {}\n  help: name the recipe or workflow, or pass `--state-dir DIR`",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn file_args(f: &Path) -> FileArgs {
    FileArgs {
        file: f.to_path_buf(),
        backend: None,
        engine: EngineArg::Real,
        templates: None,
        router: None,
    }
}

fn read_records(dir: &Path) -> R<BTreeMap<String, Record>> {
    if !dir.join("journal.json").exists() {
        return Err(Exit::Usage(format!(
            "error: `{}` has no journal: nothing has run there",
            dir.display()
        )));
    }
    journal::load(dir).map_err(journal_error)
}

fn handle_backend(r: &Record) -> Option<String> {
    let h = r.handle.as_ref()?;
    // An allocation record keeps the backend's own handle inside: `{hosts, handle}`.
    h.get("backend")
        .or_else(|| h.get("handle")?.get("backend"))?
        .as_str()
        .map(String::from)
}

/// The backend that started what a record's handle names: a plugin by the path the handle
/// carries (so `status` and `down` need neither the site file nor the recipe), else by name.
fn backend_of(r: &Record) -> R<Arc<dyn Backend>> {
    let name = handle_backend(r).unwrap_or_else(|| "local".into());
    let plugin = r.handle.as_ref().and_then(|h| {
        h.get("plugin")
            .or_else(|| h.get("handle")?.get("plugin"))?
            .as_str()
            .map(PathBuf::from)
    });
    match plugin {
        Some(p) if prl_flow_plugin::is_executable(&p) => {
            Ok(Arc::new(prl_flow_plugin::PluginBackend::new(name, p)))
        }
        // A SLURM handle says which cluster (its `SLURM_CONF`) it belongs to.
        _ if name == "slurm" => Ok(Arc::new(
            r.handle
                .as_ref()
                .and_then(|h| prl_flow_slurm::SlurmBackend::from_handle(h).ok())
                .unwrap_or_else(prl_flow_slurm::SlurmBackend::for_handles),
        )),
        _ => backend_for(&name, &serde_json::Value::Null),
    }
}

async fn status(cli: &Cli, a: &StateArgs) -> R<i32> {
    let (dir, loaded) = state_dir_of(a.file.as_deref(), a.state_dir.as_deref())?;
    let records = read_records(&dir)?;
    let mut rows: Vec<&Record> = records.values().collect();
    rows.sort_by_key(|r| (r.started_ms.is_none(), r.seq, r.id.clone()));
    let backend = match rows.iter().find(|r| r.handle.is_some()) {
        Some(r) => backend_of(r)?,
        None => backend_for("local", &serde_json::Value::Null)?,
    };
    let exec = Exec::new(backend.clone(), &dir, Vec::new());
    exec.prime(&records);
    let width = rows.iter().map(|r| r.id.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<width$}  {:<15} {:<10} {:<6} {}\n",
        "TASK", "KIND", "STATUS", "LIVE", "DETAIL"
    );
    let mut down = 0;
    for r in &rows {
        let (live, detail) = liveness(&exec, r).await;
        if live == "down" {
            down += 1;
        }
        let detail = detail
            .or_else(|| {
                r.error
                    .as_ref()
                    .map(|e| e.lines().next().unwrap_or("").to_string())
            })
            .unwrap_or_default();
        let line = format!(
            "{:<width$}  {:<15} {:<10} {:<6} {}",
            r.id,
            r.kind,
            r.status.as_str(),
            live,
            detail
        );
        s.push_str(line.trim_end());
        s.push('\n');
    }
    out(&s);
    if cli.verbose > 0 {
        if let Some((plan, source)) = loaded {
            let exec = Arc::new(Exec::new(backend, &dir, plan.nodes.clone()));
            exec.prime(&records);
            let f = a.file.clone().unwrap_or_default();
            let graph = build_graph(&plan, &exec).map_err(|e| graph_problems(&f, &source, e))?;
            let d = decide(&graph, Some(&records)).await;
            out("\nwhat `run --resume` would do:\n");
            out(&explain(&graph, &d));
        } else {
            out("\n(name the recipe or workflow to see what `run --resume` would do)\n");
        }
    }
    Ok(if down > 0 { 1 } else { 0 })
}

/// (`up` / `down` / `-`, a detail) for a record.
async fn liveness(exec: &Exec, r: &Record) -> (&'static str, Option<String>) {
    let Some(h) = &r.handle else {
        return ("-", None);
    };
    if r.kind == "allocate" {
        return ("-", None);
    }
    let state = exec.backend.status(h).await;
    let pid = h.get("pid").and_then(|p| p.as_i64());
    let on = r
        .meta
        .get("node")
        .and_then(|n| n.as_str())
        .map(|n| format!(" on {n}"))
        .unwrap_or_default();
    match state {
        Ok(ProcState::Running) => {
            // A process says its pid; a SLURM job step its step id.
            let pid = pid
                .map(|p| format!("pid {p}"))
                .or_else(|| {
                    h.get("step")
                        .and_then(|s| s.as_str())
                        .map(|s| format!("step {s}"))
                })
                .unwrap_or_default();
            if !r.service {
                return ("up", Some(format!("running, {pid}{on}")));
            }
            match crate::exec::recorded_readiness(&r.meta) {
                Some(ready) => {
                    let log = exec.log_path(&r.id);
                    match exec.probe_once(&ready.probe, ready.timeout, &log).await {
                        Ok(()) => ("up", Some(format!("ready, {pid}{on}"))),
                        Err(e) => ("up", Some(format!("not ready: {e}"))),
                    }
                }
                None => ("up", Some(format!("{pid}{on}"))),
            }
        }
        Ok(ProcState::Exited(code))
            if r.service && matches!(r.status, Status::Done | Status::Running) =>
        {
            (
                "down",
                Some(match code {
                    Some(c) => format!("exited with status {c}"),
                    None => "killed by a signal".into(),
                }),
            )
        }
        Ok(ProcState::Gone) if r.service && matches!(r.status, Status::Done | Status::Running) => {
            ("down", Some("the process is gone".into()))
        }
        Ok(ProcState::Exited(Some(c))) if !r.service => ("-", Some(format!("exit {c}"))),
        _ => ("-", None),
    }
}

async fn down(cli: &Cli, a: &StateArgs) -> R<i32> {
    let (dir, _) = state_dir_of(a.file.as_deref(), a.state_dir.as_deref())?;
    read_records(&dir)?;
    stop_recorded(&dir, cli.quiet).await
}

/// Stops every process the journal of `dir` records as possibly running, last started
/// first, and releases allocations.
async fn stop_recorded(dir: &Path, quiet: bool) -> R<i32> {
    let journal = Journal::open(dir, true, "prl-flow down").map_err(journal_error)?;
    let mut all = journal.records();
    if let Some(r) = all.values().find(|r| r.handle.is_some()).cloned() {
        recover_missing(backend_of(&r)?.as_ref(), &journal, &mut all).await;
    } else {
        recover_missing(&prl_flow_local::LocalBackend::new(), &journal, &mut all).await;
    }
    let mut records: Vec<Record> = all.into_values().collect();
    records.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let mut stopped = 0;
    let mut failures = Vec::new();
    // SLURM: everything of a job in one `scancel` (one call per step overloads slurmctld
    // on a big deployment), the allocation with it.
    let (slurm, records): (Vec<Record>, Vec<Record>) = records
        .into_iter()
        .partition(|r| handle_backend(r).as_deref() == Some("slurm"));
    let slurm: Vec<(String, serde_json::Value)> = slurm
        .into_iter()
        .filter(|r| r.status != Status::Stopped && (r.service || r.status == Status::Running))
        .filter_map(|r| Some((r.id.clone(), r.handle.clone()?)))
        .collect();
    if !slurm.is_empty() {
        let backend = prl_flow_slurm::SlurmBackend::for_handles();
        for o in backend
            .down(Some(dir), &slurm, crate::exec::STOP_GRACE)
            .await
        {
            let process = journal.get(&o.id).is_some_and(|r| r.kind != "allocate");
            match o.error {
                None => {
                    journal.update(&o.id, |rec| rec.status = Status::Stopped);
                    if o.was_running && process {
                        stopped += 1;
                        if !quiet {
                            eprintln!("stopped {}", o.id);
                        }
                    }
                }
                Some(e) => failures.push(format!("{}: {e}", o.id)),
            }
        }
    }
    // One backend (for a plugin: one plugin process) per name, not per record.
    let mut backends: BTreeMap<String, Arc<dyn Backend>> = BTreeMap::new();
    for r in records {
        let Some(h) = &r.handle else { continue };
        if r.status == Status::Stopped || !(r.service || r.status == Status::Running) {
            continue;
        }
        let name = handle_backend(&r).unwrap_or_else(|| "local".into());
        let backend = match backends.get(&name) {
            Some(b) => b.clone(),
            None => {
                let b = backend_of(&r)?;
                backends.insert(name, b.clone());
                b
            }
        };
        let result = if r.kind == "allocate" {
            match serde_json::from_value(h.clone()) {
                Ok(alloc) => backend.release(&alloc).await,
                Err(e) => Err(prl_flow_backend::BackendError::new(e.to_string())),
            }
        } else {
            let was_running = matches!(backend.status(h).await, Ok(ProcState::Running));
            let res = backend.stop(h, crate::exec::STOP_GRACE).await;
            if was_running && res.is_ok() && !quiet {
                eprintln!("stopped {}", r.id);
            }
            if was_running {
                stopped += 1;
            }
            res
        };
        match result {
            Ok(()) => journal.update(&r.id, |rec| rec.status = Status::Stopped),
            Err(e) => failures.push(format!("{}: {e}", r.id)),
        }
    }
    journal.close().map_err(journal_error)?;
    if failures.is_empty() {
        eprintln!(
            "down: {stopped} process{} stopped; nothing of `{}` runs",
            if stopped == 1 { "" } else { "es" },
            dir.display()
        );
        Ok(0)
    } else {
        Err(Exit::Failed(format!(
            "error: could not stop everything:\n  {}",
            failures.join("\n  ")
        )))
    }
}

/// Stays with a deployment that is up: says when a service dies, and tears everything down
/// on Ctrl-C or SIGTERM. Ends by itself when `prl-flow down` stopped it from elsewhere.
async fn attach(dir: &Path, backend: &dyn Backend, quiet: bool) -> R<i32> {
    eprintln!("attached: Ctrl-C stops the deployment (or run `prl-flow down` elsewhere)");
    let mut reported: std::collections::BTreeSet<String> = Default::default();
    let signal = wait_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Ok(records) = journal::load(dir) else {
            continue;
        };
        let services: Vec<&Record> = records
            .values()
            .filter(|r| r.service && r.kind != "allocate" && r.handle.is_some())
            .collect();
        if !services.is_empty() && services.iter().all(|r| r.status == Status::Stopped) {
            eprintln!("the deployment was stopped by `prl-flow down`");
            return Ok(0);
        }
        for r in services {
            if r.status != Status::Done || reported.contains(&r.id) {
                continue;
            }
            if let Some(h) = &r.handle {
                if !matches!(backend.status(h).await, Ok(ProcState::Running)) {
                    eprintln!(
                        "warning: `{}` is down; `prl-flow status` shows more, `run --resume` restarts it",
                        r.id
                    );
                    reported.insert(r.id.clone());
                }
            }
        }
    }
    eprintln!("stopping the deployment");
    stop_recorded(dir, quiet).await
}

async fn logs(a: &LogsArgs) -> R<i32> {
    let (dir, _) = state_dir_of(a.file.as_deref(), a.state_dir.as_deref())?;
    let records = read_records(&dir)?;
    let Some(r) = records.get(&a.task) else {
        let ids: Vec<&str> = records.keys().map(String::as_str).collect();
        let hint = match crate::diag::did_you_mean(&a.task, ids.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("tasks: {}", ids.join(", ")),
        };
        return Err(Exit::Usage(format!(
            "error: no task `{}` in `{}`\n  help: {hint}",
            a.task,
            dir.display()
        )));
    };
    let Some(h) = &r.handle else {
        return Err(Exit::Usage(format!(
            "error: task `{}` has no log: it never started a process (status: {})",
            r.id,
            r.status.as_str()
        )));
    };
    let backend = backend_of(r)?;
    let (text, mut offset) = backend
        .read_log(h, 0)
        .await
        .map_err(|e| Exit::Failed(format!("error: {e}")))?;
    out(&text);
    if !a.follow {
        return Ok(0);
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
        let (more, next) = backend
            .read_log(h, offset)
            .await
            .map_err(|e| Exit::Failed(format!("error: {e}")))?;
        out(&more);
        offset = next;
        if !matches!(backend.status(h).await, Ok(ProcState::Running)) {
            let (rest, _) = backend.read_log(h, offset).await.unwrap_or_default();
            out(&rest);
            return Ok(0);
        }
    }
}
