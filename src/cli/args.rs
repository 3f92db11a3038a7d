//! The command line's words: every subcommand, flag and help text (clap derive). Nothing
//! here does anything; [`super`] dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::plan::draw::Format;

const EXAMPLES: &str = "\
Examples:
  prl-flow run recipes/local/disaggregated.toml --engine mock   bring a deployment up here
  prl-flow run build.toml -j 4                    run a workflow of shell tasks
  prl-flow run build.toml --resume --explain      re-run only what is not done, and say why
  prl-flow graph build.toml --format dot | dot -Tsvg > graph.svg
  prl-flow status                                 what runs, and is it alive
  prl-flow logs server -f                         follow one task's log
  prl-flow ls                                     every deployment here, with its state
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
pub struct Cli {
    /// Show debug logs on stderr (hides progress bars).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print only errors and the final result.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Plain lines instead of progress bars, even on a terminal.
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// A site file: the site's backend, its defaults and plugins (docs/plugins.md).
    #[arg(long, global = true, value_name = "FILE", env = "PRL_FLOW_SITE")]
    pub site: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a recipe or workflow: every task once its dependencies are done.
    #[command(after_help = "Examples:
  prl-flow run recipes/local/single_node.toml --engine mock
  prl-flow run build.toml -j 8 --keep-going
  prl-flow run build.toml --resume --explain
  prl-flow run build.toml --events jsonl | jq -c 'select(.event == \"failed\")'
  prl-flow run build.toml --events jsonl --events-file events.jsonl

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
    #[command(after_help = "Examples:
  prl-flow validate recipes/wide_ep.toml
  prl-flow validate build.toml --format json | jq -r '.problems[] | \"\\(.line):\\(.column) \\(.message)\"'")]
    Validate(ValidateArgs),
    /// The state of each task from the journal; services are checked live.
    #[command(
        after_help = "Exit status: 0 when all is well, 1 when a service is down (or its \
backend cannot say) or a task failed or timed out.

Examples:
  prl-flow status
  prl-flow status recipes/local/single_node.toml -v    also say what a --resume would do
  prl-flow status --format json | jq -r '.tasks[] | select(.live == \"down\") | .id'"
    )]
    Status(StatusArgs),
    /// Keep a deployment that is up healthy: restart a service that dies (with backoff and a
    /// budget), take it out of its router meanwhile and register it again.
    #[command(after_help = "Examples:
  prl-flow watch recipes/local/multi_node.toml --engine mock
  prl-flow watch recipes/disaggregated.toml --state-dir /scratch/run1

The budget and backoff are recipe fields: `restart_budget` (5), `restart_window` (\"10m\"),
`restart_backoff` (\"1s\", doubled at each death up to a minute). Events go to stderr and to
the state dir's `logs/heal.log`. Ctrl-C ends the watch and leaves the deployment up.")]
    Watch(WatchArgs),
    /// Stop every service the journal records, in reverse order, and release nodes.
    #[command(
        after_help = "Examples:\n  prl-flow down\n  prl-flow down --state-dir /scratch/run1"
    )]
    Down(StateArgs),
    /// Print a task's log, or every task's, each line prefixed by its task (`-f` to follow).
    #[command(after_help = "Examples:
  prl-flow logs                                   every task's log, `TASK | line`
  prl-flow logs router
  prl-flow logs recipes/local/single_node.toml router -f
  prl-flow logs build.toml -f                     follow every task of build.toml")]
    Logs(LogsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:
  prl-flow completions bash > ~/.local/share/bash-completion/completions/prl-flow
  prl-flow completions zsh > \"${fpath[1]}/_prl-flow\"
  source <(prl-flow completions bash)")]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// List the deployments and workflows under `./.prl-flow/`: file, state, endpoint.
    #[command(
        after_help = "State: `up` (every service that should run is up), `partly up`, \
`down`, `failed` (a task failed), `done` (a workflow without services, all done), as `status` \
says it.

Examples:
  prl-flow ls
  prl-flow ls --format json | jq -r '.[] | select(.state == \"up\") | .endpoint'"
    )]
    Ls(LsArgs),
    /// List the backends: built in, and plugins found on PATH or named by the site file.
    #[command(after_help = "Example:\n  PATH=$PWD/examples/plugins:$PATH prl-flow plugins")]
    Plugins,
    /// Write the recipe equivalent to another launcher's config on stdout.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Site plugins: `plugin test NAME` runs the conformance scenario against a backend.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// The agent of a SLURM allocation: run by the allocation's batch script on its first
    /// node, it starts the deployment's job steps (docs/slurm.md).
    #[command(hide = true)]
    SlurmAgent {
        /// The agent's directory: `<state dir>/slurm/agent`.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum PluginCmd {
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

#[derive(Subcommand)]
pub enum ImportCmd {
    /// A prime-rl `rl.toml` or `inference.toml`: the recipe goes to stdout, and every value
    /// that could not be carried over is listed on stderr with the reason.
    #[command(after_help = "Examples:
  prl-flow import prime-rl rl.toml > recipe.toml
  prl-flow import prime-rl inference.toml > recipe.toml && prl-flow validate recipe.toml

What maps to what: docs/import.md.")]
    PrimeRl {
        /// The prime-rl config file (TOML).
        file: PathBuf,
    },
}

#[derive(Args, Clone)]
pub struct FileArgs {
    /// A recipe or workflow file (TOML).
    pub file: PathBuf,
    /// Override the recipe's backend (`local`, `ssh`, `slurm`, or a plugin).
    #[arg(long)]
    pub backend: Option<String>,
    /// Use the mock engine instead of the recipe's launcher (no GPU needed). Default: `real`,
    /// or on `--resume` the last run's.
    #[arg(long, value_enum)]
    pub engine: Option<EngineArg>,
    /// A directory of templates overriding the built-in ones.
    #[arg(long, value_name = "DIR")]
    pub templates: Option<PathBuf>,
    /// The router program (argv prefix), instead of the recipe's or `vllm-router`.
    #[arg(long, value_name = "PATH")]
    pub router: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// The recipe's launcher (`vllm serve`).
    #[value(alias = "vllm")]
    Real,
    /// `prl-flow-mock-engine`, installed beside prl-flow: same flags, same HTTP API, no GPU.
    Mock,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// The state dir (journal and logs); default `.prl-flow/<name>`.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// At most N tasks at once (default: CPUs + 2 for workflows, 256 for deployments).
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
    /// After a failure, go on with everything that does not depend on it.
    #[arg(short, long)]
    pub keep_going: bool,
    /// On failure or Ctrl-C, leave the services this run started running.
    #[arg(long)]
    pub keep: bool,
    /// Keep what an earlier run did that is still valid; run the rest.
    #[arg(short, long)]
    pub resume: bool,
    /// Print, per task, why it runs or is kept.
    #[arg(long)]
    pub explain: bool,
    /// Write each event of the run as one JSON object a line (schema in docs/cli.md): to
    /// stdout, or to `--events-file`.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub events: Option<EventsFormat>,
    /// Where `--events` go (appended), instead of stdout.
    #[arg(long, value_name = "FILE", requires = "events")]
    pub events_file: Option<PathBuf>,
    /// Once up, stay in the foreground: report services that die, and stop everything on
    /// Ctrl-C (or when `prl-flow down` is run elsewhere).
    #[arg(long)]
    pub attach: bool,
    /// The seed of the simulated backend's model (`--backend sim`; docs/sim.md).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// The formats of `run --events`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventsFormat {
    /// One JSON object a line.
    Jsonl,
}

#[derive(Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub file: FileArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub file: FileArgs,
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub file: FileArgs,
    #[arg(long, value_enum, default_value_t = Format::Ascii)]
    pub format: Format,
    /// Draw every need, also those another need already implies (by default a need
    /// reached through another one is left out of the drawing; JSON lists them all).
    #[arg(long)]
    pub all_edges: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub file: FileArgs,
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
    /// Show the values of secret-looking env variables and flags (names holding TOKEN,
    /// KEY, SECRET, PASSWORD, CREDENTIAL, ...); they are `***` otherwise.
    #[arg(long)]
    pub show_secrets: bool,
}

/// Text for people, or JSON for scripts (its schema is in docs/cli.md).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct LsArgs {
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Args)]
pub struct StateArgs {
    /// The recipe or workflow (names the state dir); optional when `.prl-flow/` holds one.
    pub file: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct LogsArgs {
    /// `[FILE] [TASK]`: the recipe or workflow (names the state dir) and the task's id (see
    /// `prl-flow status`). A lone word is the FILE when such a file exists, else the TASK.
    /// No TASK: every task's log, each line prefixed by `TASK | `.
    #[arg(value_name = "FILE|TASK", num_args = 0..=2)]
    pub words: Vec<String>,
    /// Keep printing what is appended, until the task (or every task) ends, or Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    /// The recipe or workflow (the same as the FILE word).
    #[arg(long, value_name = "FILE", hide = true)]
    pub file: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl LogsArgs {
    /// (FILE, TASK) from the words and `--file`.
    pub fn file_and_task(&self) -> (Option<PathBuf>, Option<String>) {
        match (self.file.clone(), self.words.as_slice()) {
            (Some(f), [task, ..]) => (Some(f), Some(task.clone())),
            (f, []) => (f, None),
            (None, [file, task]) => (Some(PathBuf::from(file)), Some(task.clone())),
            (None, [one]) if std::path::Path::new(one).is_file() => (Some(one.into()), None),
            (None, [one, ..]) => (None, Some(one.clone())),
        }
    }
}
