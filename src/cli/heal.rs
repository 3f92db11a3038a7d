//! Keeping a deployment healthy from the command line: `run --attach` (stay, restart what
//! dies, tear down on Ctrl-C) and `watch` (the same for a deployment already up; Ctrl-C leaves
//! it up), both around the session's healer, whose events go to stderr, `logs/heal.log` and
//! the `--events` stream.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use prl_flow_engine::Subscriber;

use super::args::{Cli, WatchArgs};
use super::{down, events, given, progress, wait_signal, R};
use crate::session::{self, Error, Session};

/// Stays with a deployment that is up and keeps it healthy (restarts a service that dies,
/// within its budget); tears everything down on Ctrl-C or SIGTERM. Ends by itself when
/// `prl-flow down` stopped it from elsewhere.
pub(super) async fn attach(
    session: &Session,
    loaded: &session::Loaded,
    dir: &Path,
    backend: &dyn prl_flow_backend::Backend,
    cli: &Cli,
    events: Option<Arc<events::Jsonl>>,
) -> R<i32> {
    eprintln!("attached: a service that dies is restarted; Ctrl-C stops the deployment (or run `prl-flow down` elsewhere)");
    let end = heal(session, loaded, dir, backend, cli, events).await;
    match end {
        session::down::WatchEnd::StoppedElsewhere => {
            eprintln!("the deployment was stopped by `prl-flow down`");
            Ok(0)
        }
        session::down::WatchEnd::Signalled => {
            eprintln!("stopping the deployment");
            down(session, dir, cli.quiet).await
        }
    }
}

/// The healer's loop until Ctrl-C: each event on stderr, in `logs/heal.log`, and on the
/// `--events` stream when there is one (with the restart runs' own events).
async fn heal(
    session: &Session,
    loaded: &session::Loaded,
    dir: &Path,
    backend: &dyn prl_flow_backend::Backend,
    cli: &Cli,
    events: Option<Arc<events::Jsonl>>,
) -> session::down::WatchEnd {
    let log_path = dir.join("logs").join("heal.log");
    // Remote backends keep their task logs elsewhere: the folder may not exist here yet.
    let _ = std::fs::create_dir_all(dir.join("logs"));
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| eprintln!("warning: cannot write `{}`: {e}", log_path.display()))
        .ok();
    let quiet = cli.quiet;
    let stream = events.clone();
    let subs = move || -> Vec<Arc<dyn Subscriber>> {
        let mut v: Vec<Arc<dyn Subscriber>> = vec![Arc::new(progress::Lines::stderr(quiet))];
        if let Some(j) = &stream {
            v.push(j.clone());
        }
        v
    };
    let mut on = |e: session::heal::HealEvent| {
        if let Some(j) = &events {
            j.heal(&e);
        }
        let line = format!("heal: {e}");
        eprintln!("{line}");
        if let Some(f) = log.as_mut() {
            let _ = writeln!(
                f,
                "{} {line}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
        }
    };
    session
        .heal(
            loaded,
            dir,
            backend,
            &loaded.plan.restart,
            &subs,
            &mut on,
            async {
                wait_signal().await;
            },
        )
        .await
}

/// `watch`: keeps a deployment that is already up healthy, until Ctrl-C (which leaves it up).
pub(super) async fn watch(cli: &Cli, a: &WatchArgs) -> R<i32> {
    // The options the deployment was brought up with, unless given here.
    let dir = match &a.state_dir {
        Some(d) => d.clone(),
        None => {
            let name = session::options::plan_name(&a.file.file)?;
            session::identity::state_dir_for(&name, &a.file.file).dir
        }
    };
    let resolved = session::options::resolve(&given(&a.file, cli.site.as_deref()), &dir, true);
    let session = resolved.chosen.session()?;
    let loaded = session
        .load(&resolved.chosen.load_options(&a.file.file)?)
        .await?;
    session::identity::check(&dir, &loaded.path)?;
    if prl_flow_engine::journal::load(&dir).map_or(true, |r| r.is_empty()) {
        return Err(Error::Usage(format!(
            "error: `{}` holds no deployment to watch\n  help: bring it up first with `prl-flow run {}`",
            dir.display(),
            a.file.file.display()
        )));
    }
    let backend = session
        .registry()
        .for_plan(&loaded.plan, &dir)
        .map_err(Error::Usage)?;
    eprintln!("watching `{}`: a service that dies is restarted; Ctrl-C ends the watch and leaves the deployment up", dir.display());
    match heal(&session, &loaded, &dir, backend.as_ref(), cli, None).await {
        session::down::WatchEnd::StoppedElsewhere => {
            eprintln!("the deployment was stopped by `prl-flow down`");
            Ok(0)
        }
        session::down::WatchEnd::Signalled => Ok(0),
    }
}
