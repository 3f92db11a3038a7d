//! The command line: it parses arguments ([`args`]), calls the [session API](crate::session),
//! and prints what comes back ([`show`]) with exit codes: 0 ok, 1 the run failed, 2 bad
//! input, 130 the run was cancelled (Ctrl-C, SIGTERM, or `prl-flow down` from elsewhere). Results go to stdout, progress and messages to stderr; a closed stdout pipe
//! (`prl-flow graph x | head`) is not an error. It knows no backend and no deployment shape.

pub mod args;
pub mod events;
mod heal;
pub mod json;
mod noop;
pub mod progress;
pub mod show;
mod sim;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use prl_flow_engine::Subscriber;

use args::{
    Cli, Cmd, EngineArg, FileArgs, ImportCmd, OutputFormat, PlanFormat, PluginCmd, RunArgs,
    StatusArgs, ValidateArgs,
};

use crate::session::options::{Chosen, Engine};
use crate::session::{self, Error, LoadOptions, RunSettings, Session};

type R<T> = Result<T, Error>;

pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
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
    crate::tools::put_on_path();
    if cli.verbose > 0 {
        let filter = if cli.verbose > 1 {
            "debug"
        } else {
            // Every crate of the workspace: their targets all start with `prl_flow`.
            "prl_flow=debug"
        };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("PRL_FLOW_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
            )
            .try_init();
    }
    let rt = match sim::runtime(&cli) {
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
        Err(Error::Usage(msg)) => {
            eprintln!("{msg}");
            2
        }
        Err(Error::Problems(p)) => {
            eprint!("{}", p.render(color_stderr()));
            2
        }
        Err(Error::LiveServices { dir, ids }) => {
            // Only `run` refuses this way, and it names its own file; see `run`.
            eprintln!("{}", {
                let d = crate::plan::shell_word(&dir.display().to_string());
                show::live_services(&dir, &ids, &d, &d)
            });
            2
        }
        Err(Error::Failed(msg)) => {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            1
        }
    }
}

fn color_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

async fn dispatch(cli: &Cli) -> R<i32> {
    if let Cmd::SlurmAgent { dir } = &cli.command {
        // On a node of the allocation: no site, no recipe, only the agent's directory.
        return match prl_flow_slurm::agent::serve(dir).await {
            Ok(()) => Ok(0),
            Err(e) => {
                eprintln!("prl-flow slurm-agent: {e}");
                Ok(1)
            }
        };
    }
    let session = Session::from_site_flag(cli.site.as_deref())?;
    match &cli.command {
        Cmd::Run(a) => run(cli, a).await,
        Cmd::Graph(a) => {
            let loaded = session.load_checked(&load_options(&a.file)?).await?;
            out(&crate::plan::draw::render(
                &loaded.plan,
                a.format,
                a.all_edges,
            ));
            std::mem::forget(loaded); // the process ends next: not freed piece by piece
            Ok(0)
        }
        Cmd::Plan(a) => {
            let plan =
                session::load::shown(session.load_checked(&load_options(&a.file)?).await?.plan);
            match a.format {
                PlanFormat::Json => out(&show::plan_json(&plan, a.show_secrets)),
                PlanFormat::Text => out(&show::plan_text(&plan, a.show_secrets)),
            }
            std::mem::forget(plan);
            Ok(0)
        }
        Cmd::Validate(a) => validate(&session, a).await,
        Cmd::Status(a) => status(cli, a).await,
        Cmd::Watch(a) => heal::watch(cli, a).await,
        Cmd::Down(a) => {
            let (session, dir, _) =
                state_dir_of(cli, a.file.as_deref(), a.state_dir.as_deref()).await?;
            down(&session, &dir, cli.quiet).await
        }
        Cmd::Logs(a) => {
            let (file, task) = a.file_and_task();
            let (session, dir, _) =
                state_dir_of(cli, file.as_deref(), a.state_dir.as_deref()).await?;
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            match task {
                Some(task) => {
                    session
                        .logs(&dir, &task, a.follow, &mut |t| out(t), stop)
                        .await?
                }
                None => {
                    session
                        .logs_all(&dir, a.follow, &mut |t| out(t), stop)
                        .await?
                }
            }
            Ok(0)
        }
        Cmd::Completions { shell } => {
            let mut buf = Vec::new();
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "prl-flow", &mut buf);
            out(&String::from_utf8_lossy(&buf));
            Ok(0)
        }
        Cmd::Ls(a) => {
            let listed = session.list(Path::new(".prl-flow")).await;
            match a.format {
                OutputFormat::Json => out(&json::list_json(&listed)),
                OutputFormat::Text => out(&show::list_table(&listed)),
            }
            Ok(0)
        }
        Cmd::Import(ImportCmd::PrimeRl { file }) => import_prime_rl(file),
        Cmd::SlurmAgent { .. } => Ok(0),
        Cmd::Plugins => {
            out(&crate::registry::report::plugins_text(session.registry()).await);
            Ok(0)
        }
        Cmd::Plugin(PluginCmd::Test { name }) => {
            let passed =
                crate::registry::report::test_backend(session.registry(), name, &mut |l| {
                    out(&format!("{l}\n"))
                })
                .await
                .map_err(Error::Usage)?;
            Ok(if passed { 0 } else { 1 })
        }
    }
}

/// `import prime-rl FILE`: the recipe on stdout, one line per value not carried over on
/// stderr; exit 2 when the file cannot be read or imported.
fn import_prime_rl(file: &Path) -> R<i32> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Usage(format!("error: cannot read {name}: {e}")))?;
    let imported = crate::import::prime_rl::import(&name, &text)
        .map_err(|e| Error::Usage(format!("error: {}", e.render(&name))))?;
    for n in &imported.notes {
        eprintln!("{}", n.render(&name));
    }
    out(&imported.recipe);
    Ok(0)
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

fn load_options(a: &FileArgs) -> R<LoadOptions> {
    given(a, None).load_options(&a.file)
}

/// The options of `a` that change what runs, as given (`None`: not given), with `site`.
fn given(a: &FileArgs, site: Option<&Path>) -> Chosen {
    Chosen {
        engine: a.engine.map(|e| match e {
            EngineArg::Real => Engine::Real,
            EngineArg::Mock => Engine::Mock,
        }),
        router: a.router.clone(),
        templates: a.templates.clone(),
        backend: a.backend.clone(),
        site: site.map(Path::to_path_buf),
    }
    .normalized()
}

/// The file as hints name it, with `--state-dir` when one was given (`prl-flow down FILE`
/// alone would look in the default state dir).
fn hint_args(a: &RunArgs) -> String {
    let q = |p: &std::path::Path| crate::plan::shell_word(&p.display().to_string());
    match &a.state_dir {
        Some(d) => format!("{} --state-dir {}", q(&a.file.file), q(d)),
        None => q(&a.file.file),
    }
}

async fn run(cli: &Cli, a: &RunArgs) -> R<i32> {
    let file = hint_args(a);
    // A resume uses the last run's options where none are given; a fresh run what it is
    // given (a refused one names the last run's in its hint).
    let given = given(&a.file, cli.site.as_deref());
    let dir = match &a.state_dir {
        Some(d) => d.clone(),
        None => {
            let name = session::options::plan_name(&a.file.file)?;
            session::identity::state_dir_for(&name, &a.file.file).dir
        }
    };
    let last = session::options::resolve(&given, &dir, true);
    if let Some(code) = noop::shortcut(cli, a, &dir, &last) {
        return Ok(code);
    }
    let resolved = if a.resume {
        last.clone()
    } else {
        session::options::resolve(&given, &dir, false)
    };
    let session = resolved.chosen.session()?;
    let mut loaded = session
        .load(&resolved.chosen.load_options(&a.file.file)?)
        .await?;
    sim::seed(a, &mut loaded.plan)?;
    let settings = RunSettings {
        state_dir: a.state_dir.clone(),
        jobs: a.jobs,
        keep_going: a.keep_going,
        keep: a.keep,
        resume: a.resume,
        holder: format!("prl-flow run {}", a.file.file.display()),
        ..RunSettings::default()
    };
    let rerun = format!("{file}{}", resolved.chosen.args());
    let prepared = session
        .prepare_remembered(&loaded, &settings, &resolved.chosen)
        .await;
    let (mut prepared, note) = match prepared {
        Err(Error::LiveServices { dir, ids }) => {
            let rerun = format!("{file}{}", last.chosen.args());
            return Err(Error::Usage(show::live_services(&dir, &ids, &file, &rerun)));
        }
        other => other?,
    };
    if let Some(note) = note {
        eprintln!("{note}");
    }
    prepared.hold_lock();
    if a.resume {
        let causes = session::options::Causes::of(&resolved, &session, &loaded).await;
        let ids: Vec<String> = prepared
            .graph
            .tasks()
            .iter()
            .map(|t| t.id().to_string())
            .collect();
        causes.name(
            &loaded.plan,
            ids.iter()
                .map(String::as_str)
                .zip(prepared.decisions.iter_mut()),
        );
        let then = "the tasks it changes run again (`--explain` names them)";
        for c in &causes.changes {
            eprintln!(
                "note: {} differs from the last run ({} → {}); {then}",
                c.flag, c.from, c.to
            );
        }
        for c in &causes.contents {
            eprintln!("note: {c} since the last run; {then}");
        }
    }
    // With events on stdout, what is said for people goes to stderr.
    let events_on_stdout = a.events.is_some() && a.events_file.is_none();
    let result = |text: &str| {
        if events_on_stdout {
            eprint!("{text}");
        } else {
            out(text);
        }
    };
    if a.explain {
        result(&show::explain(prepared.graph.topo().iter().map(|&i| {
            (prepared.graph.task(i).id(), &prepared.decisions[i])
        })));
    }
    let mut subs: Vec<Arc<dyn Subscriber>> = Vec::new();
    let tty = std::io::stderr().is_terminal();
    if cli.verbose == 0
        && tty
        && !cli.no_progress
        && !cli.quiet
        && std::env::var_os("NO_COLOR").is_none()
    {
        subs.push(Arc::new(progress::Bars::new()));
    } else {
        subs.push(Arc::new(progress::Lines::stderr(cli.quiet)));
    }
    let jsonl = match a.events {
        Some(_) => Some(Arc::new(events_subscriber(a, &loaded.plan)?)),
        None => None,
    };
    if let Some(j) = &jsonl {
        subs.push(j.clone());
    }
    let cancel = prl_flow_engine::CancelSource::new();
    let token = cancel.token();
    // Who cancelled the run: the signal's name, or the `prl-flow down` that sent it.
    let by = Arc::new(std::sync::Mutex::new(String::new()));
    let signals = {
        let journal = prepared.journal();
        let (by, dir) = (by.clone(), prepared.dir.clone());
        tokio::spawn(async move {
            let sig = wait_signal().await;
            let who = session::abort::abort_requester(&dir).unwrap_or_else(|| sig.to_string());
            if let Ok(mut b) = by.lock() {
                *b = who;
            }
            cancel.fire();
            wait_signal().await;
            eprintln!("second signal: exiting now; the journal records what still runs");
            journal.flush();
            std::process::exit(130);
        })
    };
    let ran = prepared.execute(subs, token).await;
    signals.abort();
    let mut ran = ran?;
    noop::record(&mut ran, &loaded, &resolved);
    if let Some(report) = ran.exec.backend.report() {
        result(&report);
    }
    let plan = &loaded.plan;
    let s = &ran.report.summary;
    if ran.report.cancelled {
        let by = by.lock().map(|b| b.clone()).unwrap_or_default();
        eprintln!("{}", show::cancelled_line(&ran.report, &by, a.keep, &file));
        return Ok(130);
    }
    if ran.report.ok() {
        eprintln!("{}", show::ok_line(s));
        if let Some(e) = &plan.endpoint {
            let endpoint = ran.exec.resolve(e);
            // Only for `ls`: a run that is up must not fail for it.
            let _ = session::identity::record_endpoint(&ran.dir, &endpoint);
            result(&crate::recipe::kinds::try_it(plan, &endpoint));
        }
        if a.attach {
            return heal::attach(
                &session,
                &loaded,
                &ran.dir,
                ran.exec.backend.as_ref(),
                cli,
                jsonl,
            )
            .await;
        }
        if plan.tasks.iter().any(|t| t.service) {
            eprintln!("services keep running; stop them with `prl-flow down {file}`");
        }
        // The process ends next: what the run and its plan hold goes with it.
        ran.leave();
        std::mem::forget(loaded);
        return Ok(0);
    }
    Err(Error::Failed(show::failure(
        plan,
        &ran.report,
        a.keep,
        &file,
        &rerun,
    )))
}

/// The `--events` writer: to `--events-file` (appended), else stdout.
fn events_subscriber(a: &RunArgs, plan: &crate::plan::Plan) -> R<events::Jsonl> {
    let to: Box<dyn Write + Send> = match &a.events_file {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    Error::Usage(format!(
                        "error: cannot open `{}` for the events: {e}\n  help: nothing was started",
                        p.display()
                    ))
                })?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let services = plan
        .tasks
        .iter()
        .map(|t| (t.id.clone(), t.service))
        .collect();
    Ok(events::Jsonl::new(to, services))
}

/// `validate`: text for people, or JSON (exit 2 too when there are problems).
async fn validate(session: &Session, a: &ValidateArgs) -> R<i32> {
    let loaded = match load_options(&a.file) {
        Ok(o) => session.load_checked(&o).await,
        Err(e) => Err(e),
    };
    let file = &a.file.file;
    match (a.format, loaded) {
        (OutputFormat::Text, loaded) => {
            out(&show::valid(file, &loaded?.plan));
            Ok(0)
        }
        (OutputFormat::Json, Ok(l)) => {
            out(&json::valid_json(file, &l.plan));
            Ok(0)
        }
        (OutputFormat::Json, Err(Error::Problems(p))) => {
            out(&json::problems_json(file, &p));
            Ok(2)
        }
        (OutputFormat::Json, Err(Error::Usage(m))) => {
            out(&json::usage_json(file, &m));
            Ok(2)
        }
        (OutputFormat::Json, Err(e)) => Err(e),
    }
}

/// Resolves on Ctrl-C or SIGTERM, with the signal's name.
async fn wait_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// The options of a command that takes none but `--site`.
fn site_only(cli: &Cli) -> Chosen {
    Chosen {
        site: cli.site.clone(),
        ..Chosen::default()
    }
    .normalized()
}

/// The state dir: `--state-dir`, or named by the file, or the only one under `.prl-flow/`;
/// the session of the site file given, else of the one the last run there recorded; and the
/// file loaded with the options that run recorded, when one is named. A state dir that
/// belongs to another file than the one named is refused.
async fn state_dir_of(
    cli: &Cli,
    file: Option<&Path>,
    dir: Option<&Path>,
) -> R<(Session, PathBuf, Option<session::Loaded>)> {
    let dir = match (dir, file) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(f)) => {
            session::identity::state_dir_for(&session::options::plan_name(f)?, f).dir
        }
        (None, None) => session::only_state_dir()?,
    };
    let resolved = session::options::resolve(&site_only(cli), &dir, true);
    let session = resolved.chosen.session()?;
    let loaded = match file {
        Some(f) => Some(session.load(&resolved.chosen.load_options(f)?).await?),
        None => None,
    };
    if let Some(l) = &loaded {
        session::identity::check(&dir, &l.path)?;
    }
    Ok((session, dir, loaded))
}

async fn status(cli: &Cli, a: &StatusArgs) -> R<i32> {
    let (session, dir, loaded) =
        state_dir_of(cli, a.state.file.as_deref(), a.state.state_dir.as_deref()).await?;
    let rows = session.status(&dir).await?;
    if a.format == OutputFormat::Json {
        out(&json::status_json(&dir, &rows));
    } else {
        out(&show::status_table(&rows));
    }
    if cli.verbose > 0 && a.format == OutputFormat::Text {
        if let Some(loaded) = loaded {
            let mut d = session.resume_decisions(&loaded, &dir).await?;
            let resolved = session::options::resolve(&site_only(cli), &dir, true);
            session::options::Causes::of(&resolved, &session, &loaded)
                .await
                .name(&loaded.plan, d.iter_mut().map(|(id, d)| (id.as_str(), d)));
            out("\nwhat `run --resume` would do:\n");
            out(&show::explain(d.iter().map(|(id, d)| (id.as_str(), d))));
        } else {
            out("\n(name the recipe or workflow to see what `run --resume` would do)\n");
        }
    }
    // A failure shows as one: a service down (or that cannot be asked), a task that failed.
    let bad = rows.iter().any(|r| {
        matches!(r.live, session::Liveness::Down | session::Liveness::Unknown)
            || matches!(
                r.record.status,
                prl_flow_engine::Status::Failed | prl_flow_engine::Status::TimedOut
            )
    });
    Ok(i32::from(bad))
}

async fn down(session: &Session, dir: &Path, quiet: bool) -> R<i32> {
    let report = session
        .down_aborting(
            dir,
            &mut |holder| {
                eprintln!("down: aborting {holder}; waiting for it to stop what it started")
            },
            &mut |id| {
                if !quiet {
                    eprintln!("stopped {id}");
                }
            },
        )
        .await?;
    if report.failures.is_empty() {
        eprintln!(
            "down: {} process{} stopped; nothing of `{}` runs",
            report.stopped,
            if report.stopped == 1 { "" } else { "es" },
            dir.display()
        );
        Ok(0)
    } else {
        Err(Error::Failed(format!(
            "error: could not stop everything:\n  {}",
            report.failures.join("\n  ")
        )))
    }
}
