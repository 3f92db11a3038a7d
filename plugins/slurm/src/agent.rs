//! The allocation's agent: a small prl-flow process on the allocation's first node that
//! starts the job steps, so that nothing of a deployment lives on the machine `prl-flow run`
//! was typed on.
//!
//! A step lives as long as the `srun` that started it. Started from the submitting machine,
//! every step would keep an `srun` there for as long as the deployment runs (two processes and
//! about 10 MB each), and a logout or a reboot there would end the deployment. So the holder
//! batch script runs `prl-flow slurm-agent DIR` (and starts it again if it ever exits), and
//! the submitting side hands it each `srun` to start through files in `DIR`, the state dir's
//! `slurm/agent/`, which both sides see on the cluster's shared file system:
//!
//! - `inbox/ID.json`: a `Request`, written whole (a rename) by the submitting side;
//! - `work/ID.json`: the request once the agent took it; `work/ID.pid` the pid of its `srun`;
//!   `work/ID.exit` how that `srun` ended (its status, `signal N`, or `gone`/`lost` for one a
//!   previous agent started);
//! - `heartbeat`: `PID HOST UNIX_MS`, rewritten every second.
//!
//! What a step runs, and whether it still runs, is SLURM's and the step's own files' business
//! (`squeue`, the step and exit-status files in each task's run dir), so an agent that dies
//! loses nothing: its `srun`s are in process groups of their own and go on; the next agent
//! adopts them (it watches their pids and writes their exit files when they end), and
//! requests it finds half-taken are reported `lost`, never started twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prl_flow_local::procfs;
use serde::{Deserialize, Serialize};

use crate::write_atomic;

pub(crate) const INBOX: &str = "inbox";
pub(crate) const WORK: &str = "work";
pub(crate) const HEARTBEAT: &str = "heartbeat";
/// Written by `prl-flow down` before it signals the steps: the agent takes no more requests,
/// waits for its `srun`s to end, and exits; so does the holder script.
pub(crate) const STOP: &str = "stop";

/// How often the agent looks at its inbox.
const INBOX_POLL: Duration = Duration::from_millis(20);
/// How often it says it is alive.
const BEAT: Duration = Duration::from_secs(1);
/// How long it waits, once told to stop, for its `srun`s to end.
const DRAIN: Duration = Duration::from_secs(60);

/// An `srun` to start: its argv (the first word the program), variables to add to the
/// agent's environment, and the file its output goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) argv: Vec<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) out: PathBuf,
}

/// Runs the agent on `dir` until the directory is removed, or its `stop` file appears or
/// SIGTERM comes. Told to stop, it takes no more requests and returns once every `srun` it
/// watches has ended (`prl-flow down` writes the file, then signals the steps), so that the
/// job ends after its steps, not before them: SLURM ends a job whose steps are still winding
/// down much more slowly.
pub async fn serve(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory: the state dir is gone, or not on a file system this node sees",
            dir.display()
        ));
    }
    let inbox = dir.join(INBOX);
    let work = dir.join(WORK);
    for d in [&inbox, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let host = hostname();
    eprintln!(
        "prl-flow slurm-agent: pid {} on {host}, serving {}",
        std::process::id(),
        dir.display()
    );
    let live = Arc::new(AtomicUsize::new(0));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    adopt(&work, &live);
    let beat = {
        let path = dir.join(HEARTBEAT);
        tokio::spawn(async move {
            loop {
                let line = format!("{} {host} {}\n", std::process::id(), now_ms());
                if let Err(e) = write_atomic(&path, line.as_bytes()) {
                    eprintln!("prl-flow slurm-agent: cannot write {}: {e}", path.display());
                }
                tokio::time::sleep(BEAT).await;
            }
        })
    };
    let result = loop {
        if !dir.exists() {
            break Ok(());
        }
        if dir.join(STOP).exists() {
            drain(&live).await;
            break Ok(());
        }
        match take(&inbox, &work) {
            Ok(taken) => {
                for (id, req) in taken {
                    start(&work, &id, req, &live);
                }
            }
            Err(e) => break Err(e),
        }
        tokio::select! {
            () = tokio::time::sleep(INBOX_POLL) => {}
            _ = term.recv() => {
                drain(&live).await;
                break Ok(());
            }
        }
    };
    beat.abort();
    result
}

/// Waits (up to [`DRAIN`]) until no `srun` the agent watches runs.
async fn drain(live: &AtomicUsize) {
    let began = Instant::now();
    while live.load(Ordering::SeqCst) > 0 && began.elapsed() < DRAIN {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "prl-flow slurm-agent: stopped ({} srun(s) still running)",
        live.load(Ordering::SeqCst)
    );
}

/// Moves every request of the inbox to `work/`, oldest first.
fn take(inbox: &Path, work: &Path) -> Result<Vec<(String, Request)>, String> {
    let mut names: Vec<String> = match std::fs::read_dir(inbox) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", inbox.display())),
    };
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let id = name.trim_end_matches(".json").to_string();
        let taken = work.join(&name);
        if std::fs::rename(inbox.join(&name), &taken).is_err() {
            continue;
        }
        match std::fs::read(&taken)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()))
        {
            Ok(req) => out.push((id, req)),
            Err(e) => {
                eprintln!("prl-flow slurm-agent: request {id} is unreadable: {e}");
                let _ = write_atomic(&work.join(format!("{id}.exit")), b"lost\n");
            }
        }
    }
    Ok(out)
}

/// Starts one request's `srun` in a process group of its own (it must outlive this agent),
/// and writes its exit file when it ends.
fn start(work: &Path, id: &str, req: Request, live: &Arc<AtomicUsize>) {
    let exit_file = work.join(format!("{id}.exit"));
    let Some(program) = req.argv.first() else {
        let _ = write_atomic(&exit_file, b"lost\n");
        return;
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&req.out);
    let out = match out {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "prl-flow slurm-agent: cannot open {}: {e}",
                req.out.display()
            );
            let _ = write_atomic(&exit_file, b"127\n");
            return;
        }
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&req.argv[1..]);
    // The batch script's SLURM variables describe the batch step (one task, its CPUs): an
    // srun reading them would inherit that shape. Only the cluster's config path stays.
    crate::slurm::scrub_env(&mut cmd);
    cmd.envs(&req.env)
        .stdin(std::process::Stdio::null())
        .stdout(
            out.try_clone()
                .map(Into::into)
                .unwrap_or_else(|_| std::process::Stdio::null()),
        )
        .stderr(out)
        .process_group(0)
        .kill_on_drop(false);
    match cmd.spawn() {
        Ok(mut child) => {
            if let Some(pid) = child.id() {
                let _ = write_atomic(
                    &work.join(format!("{id}.pid")),
                    format!("{pid}\n").as_bytes(),
                );
            }
            live.fetch_add(1, Ordering::SeqCst);
            let live = live.clone();
            tokio::spawn(async move {
                let how = match child.wait().await {
                    Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                        (Some(c), _) => c.to_string(),
                        (None, Some(sig)) => format!("signal {sig}"),
                        (None, None) => "gone".into(),
                    },
                    Err(_) => "gone".into(),
                };
                let _ = write_atomic(&exit_file, format!("{how}\n").as_bytes());
                live.fetch_sub(1, Ordering::SeqCst);
            });
        }
        Err(e) => {
            eprintln!("prl-flow slurm-agent: cannot start `{program}`: {e}");
            let _ = write_atomic(&exit_file, b"127\n");
        }
    }
}

/// An earlier agent's requests: an `srun` still running is watched until it ends; one
/// taken but never started (or whose pid is unknown) is reported lost.
fn adopt(work: &Path, live: &Arc<AtomicUsize>) {
    let Ok(rd) = std::fs::read_dir(work) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let exit_file = work.join(format!("{id}.exit"));
        if exit_file.exists() {
            continue;
        }
        let pid = std::fs::read_to_string(work.join(format!("{id}.pid")))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        match pid {
            Some(pid) if is_srun(pid) => {
                eprintln!("prl-flow slurm-agent: adopting request {id} (srun pid {pid})");
                live.fetch_add(1, Ordering::SeqCst);
                let live = live.clone();
                tokio::spawn(async move {
                    while is_srun(pid) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = write_atomic(&exit_file, b"gone\n");
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ => {
                let _ = write_atomic(&exit_file, b"lost\n");
            }
        }
    }
}

/// Whether `pid` is an `srun` that has not ended (a reused pid is some other program's).
fn is_srun(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    procfs::comm(pid).as_deref() == Some("srun") && procfs::stat(pid).is_some_and(|s| !s.is_dead())
}

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The agent's last heartbeat: its pid, host and age.
pub(crate) fn heartbeat(dir: &Path) -> Option<(String, String, Duration)> {
    let text = std::fs::read_to_string(dir.join(HEARTBEAT)).ok()?;
    let mut w = text.split_whitespace();
    let pid = w.next()?.to_string();
    let host = w.next()?.to_string();
    let ms: u128 = w.next()?.parse().ok()?;
    let age = Duration::from_millis(now_ms().saturating_sub(ms).min(u64::MAX as u128) as u64);
    Some((pid, host, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without SLURM: the agent starts what its inbox holds, in a group of its own, writes
    /// the exit file, and a second agent reports a request taken but never started as lost.
    #[tokio::test]
    async fn the_agent_runs_its_inbox_and_a_new_agent_adopts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("agent");
        std::fs::create_dir(&d).expect("agent dir");
        let server = {
            let d = d.clone();
            tokio::spawn(async move { serve(&d).await })
        };
        let out = dir.path().join("out.log");
        let req = Request {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$GREETING\"; exit 3".into(),
            ],
            env: [("GREETING".to_string(), "hello".to_string())].into(),
            out: out.clone(),
        };
        for _ in 0..500 {
            if d.join(INBOX).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        write_atomic(
            &d.join(INBOX).join("1-a.json"),
            &serde_json::to_vec(&req).expect("json"),
        )
        .expect("request");
        let exit = d.join(WORK).join("1-a.exit");
        for _ in 0..500 {
            if exit.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::read_to_string(&exit).expect("exit").trim(), "3");
        assert_eq!(std::fs::read_to_string(&out).expect("out"), "hello\n");
        assert!(heartbeat(&d).is_some(), "the agent beats");
        server.abort();

        // Taken, never started: lost, not started again.
        std::fs::write(
            d.join(WORK).join("2-b.json"),
            serde_json::to_vec(&req).expect("json"),
        )
        .expect("taken");
        adopt(&d.join(WORK), &Arc::new(AtomicUsize::new(0)));
        assert_eq!(
            std::fs::read_to_string(d.join(WORK).join("2-b.exit"))
                .expect("exit")
                .trim(),
            "lost"
        );
        assert_eq!(std::fs::read_to_string(&out).expect("out"), "hello\n");
    }
}
