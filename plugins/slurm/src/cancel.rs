//! Taking down many steps at once: one `scancel` per job, never one per step (a thousand
//! `scancel` calls at once overload slurmctld). [`Backend::teardown`] takes down what a
//! journal records this way, cancelling a job whole when its allocation is among the records,
//! and the jobs its state dir submitted that no record names.
//!
//! [`Backend::teardown`]: prl_flow_backend::Backend::teardown

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use prl_flow_backend::{Backend, Held, Recorded, Stopped};
use prl_flow_local::LocalBackend;

use crate::handles::{alloc_handle, parse_step, read_job_file, StepHandle};
use crate::slurm::{Cluster, JobInfo};
use crate::{SlurmBackend, CLUSTER_FILE, END_WAIT, HOLDER_SCRIPT, JOB_FILE, STATE_SUBDIR};

/// How long `down` waits for a SLURM that answers no query (slurmctld down or cut off)
/// before it says what may still run: its word on what ended cannot come.
const UNANSWERED: Duration = Duration::from_secs(10);

/// What to cancel of one job: the allocation (the job whole), or some of its steps.
#[derive(Default)]
struct Group {
    /// Ids of records that are the job's allocation.
    allocs: Vec<String>,
    steps: Vec<(String, StepHandle)>,
}

/// One job's key: its cluster (as text, for ordering) and its id.
fn job_key(cluster: &Cluster, job: &str) -> (String, String) {
    (format!("{cluster:?}"), job.to_string())
}

impl SlurmBackend {
    /// Cancels what a journal records, one `scancel` per job: steps, allocations, and local
    /// processes. A job whose allocation is among them is cancelled whole (SLURM ends its
    /// steps: SIGTERM, then SIGKILL after `KillWait`); otherwise its recorded steps get one
    /// `scancel --signal=TERM` together, `grace`, and one `--signal=KILL` for those still
    /// there. With `state_dir`, a job this state dir submitted but never recorded (prl-flow
    /// was killed while it pended) is cancelled too. Waits until SLURM no longer runs any of
    /// it.
    pub(crate) async fn cancel_jobs(
        &self,
        items: &[Recorded],
        grace: Duration,
        state_dir: Option<&Path>,
    ) -> Vec<Stopped> {
        let mut out = Vec::new();
        let local = LocalBackend::new();
        let mut groups: BTreeMap<(String, String), (Cluster, Group)> = BTreeMap::new();
        for item in items {
            let id = &item.id;
            let foreign = || Stopped {
                id: id.clone(),
                was_running: false,
                error: Some(format!(
                    "not a handle of the slurm backend: {}",
                    item.held.handle()
                )),
            };
            match &item.held {
                Held::Process(h) if h.is("local") => {
                    out.extend(
                        local
                            .teardown(std::slice::from_ref(item), grace, None)
                            .await,
                    );
                }
                Held::Allocation(a) if a.handle.is("local") => out.push(Stopped {
                    id: id.clone(),
                    was_running: false,
                    error: None,
                }),
                Held::Process(h) => match parse_step(h) {
                    Ok(s) => groups
                        .entry(job_key(&s.slurm, &s.job))
                        .or_insert_with(|| (s.slurm.clone(), Group::default()))
                        .1
                        .steps
                        .push((id.clone(), s)),
                    Err(_) => out.push(foreign()),
                },
                Held::Allocation(a) => match alloc_handle(&a.handle) {
                    Some(a) => groups
                        .entry(job_key(&a.slurm, &a.job))
                        .or_insert_with(|| (a.slurm.clone(), Group::default()))
                        .1
                        .allocs
                        .push(id.clone()),
                    None => out.push(foreign()),
                },
            }
        }
        if let Some(dir) = state_dir {
            let (cluster, jobs, unknown) = self.unrecorded_jobs(dir).await;
            // `down` must not say all is gone when it could not look.
            if let Some(why) = unknown {
                out.push(Stopped {
                    id: "(the jobs this state dir submitted)".to_string(),
                    was_running: false,
                    error: Some(why),
                });
            }
            for job in jobs {
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    groups.entry(job_key(&cluster, &job))
                {
                    slot.insert((
                        cluster.clone(),
                        Group {
                            allocs: vec![format!("(job {job} of this state dir)")],
                            steps: Vec::new(),
                        },
                    ));
                }
            }
        }

        for ((_, job), (cluster, group)) in groups {
            // What ran when `down` began, for the report; a failed query is no reason not to
            // cancel (cancelling what has ended is harmless), only not to claim it ran.
            let job_alive =
                matches!(cluster.job(&job).await, Ok(Some(i)) if i.is_alive() || i.is_pending());
            let running = cluster
                .steps(std::slice::from_ref(&job))
                .await
                .unwrap_or_default();
            let ours: Vec<String> = group.steps.iter().map(|(_, s)| s.step.clone()).collect();
            let agent_dir = state_dir.map(|d| d.join(STATE_SUBDIR).join(crate::AGENT_SUBDIR));
            let error = cancel_job(
                &cluster,
                &job,
                &ours,
                !group.allocs.is_empty(),
                grace,
                agent_dir.as_deref(),
            )
            .await;
            for id in &group.allocs {
                out.push(Stopped {
                    id: id.clone(),
                    was_running: job_alive,
                    error: error.clone(),
                });
            }
            for (id, s) in &group.steps {
                out.push(Stopped {
                    id: id.clone(),
                    was_running: running.contains_key(&s.step),
                    error: error.clone(),
                });
            }
            if let Some(d) = state_dir {
                let f = d.join(STATE_SUBDIR).join(JOB_FILE);
                if error.is_none() && read_job_file(&f).is_some_and(|(j, _)| j == job) {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
        out
    }
}

impl SlurmBackend {
    /// The jobs `dir` submitted that may still pend or run, whether or not a journal
    /// recorded them, and the cluster they went to (from the state dir's cluster file, else
    /// this backend's): the one its job file names, and any job of this user whose command
    /// is the state dir's holder script (its id was lost: prl-flow was killed between
    /// `sbatch` and writing it down). The job file's job is among them unless SLURM says it
    /// has ended (cancelling what has ended is harmless); when SLURM could not list this
    /// user's jobs, the third part says so: jobs may then be left that nothing names.
    async fn unrecorded_jobs(&self, dir: &Path) -> (Cluster, Vec<String>, Option<String>) {
        let sub = dir.join(STATE_SUBDIR);
        let cluster = std::fs::read(sub.join(CLUSTER_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Cluster>(&b).ok())
            .unwrap_or_else(|| self.cluster.clone());
        let mut jobs = Vec::new();
        let mut unknown = None;
        if let Some((job, _)) = read_job_file(&sub.join(JOB_FILE)) {
            match cluster.job(&job).await {
                Ok(Some(info)) if !(info.is_pending() || info.is_alive()) => {}
                Ok(None) => {}
                _ => jobs.push(job),
            }
        }
        let script = sub.join(HOLDER_SCRIPT);
        if script.exists() {
            let script = std::path::absolute(&script).unwrap_or(script);
            match cluster.jobs_of_script(&script).await {
                Ok(found) => {
                    for job in found {
                        if !jobs.contains(&job) {
                            jobs.push(job);
                        }
                    }
                }
                Err(e) => {
                    unknown = Some(format!(
                        "could not list the jobs submitted from `{}`, so any that were never \
                         recorded may still pend or run (check `squeue --me`): {}",
                        dir.display(),
                        e.message
                    ))
                }
            }
        }
        (cluster, jobs, unknown)
    }
}

/// Cancels `steps` of `job` (or, `whole`, the job itself) and waits until SLURM shows none
/// of it: `whole` is, with the allocation's agent told to stop (its `stop` file in
/// `agent_dir`), one `scancel --signal=TERM J` (and a plain `scancel J` if the job is still
/// there after `grace`), else one `scancel J`; else one `scancel --signal=TERM` for the steps, up to
/// `grace` for them to end, and one `--signal=KILL` for those still there. `None` when SLURM
/// shows none of it (a failed `scancel` of what had ended is no failure); else what is left
/// and what went wrong (an unanswered query counts as "still there", and a SLURM that has
/// answered none for [`UNANSWERED`] ends the wait).
pub(crate) async fn cancel_job(
    cluster: &Cluster,
    job: &str,
    steps: &[String],
    whole: bool,
    grace: Duration,
    agent_dir: Option<&Path>,
) -> Option<String> {
    let job_list = [job.to_string()];
    let mut error = None;
    if whole {
        // The quick way, when the agent can be told: it stops taking requests and waits for
        // its `srun`s; the steps get SIGTERM; once their tasks have ended and so their
        // `srun`s, the agent and the holder script exit, and the job ends after its steps.
        // (A plain `scancel J` ends the batch step while the steps still wind down, and
        // SLURM then waits seconds for `srun`s that are gone.) A plain `scancel` for a job
        // still there after the grace period, or when there is no agent to tell.
        let running = matches!(cluster.job(job).await, Ok(Some(i)) if i.is_alive());
        let told = running
            && agent_dir.is_some_and(|d| {
                d.is_dir() && crate::write_atomic(&d.join(crate::agent::STOP), b"down\n").is_ok()
            });
        if told {
            // A job without steps has nothing to signal (scancel then fails): the agent,
            // told, ends the job by itself.
            let _ = cluster.scancel(&job_list, Some("TERM")).await;
            let deadline = Instant::now() + grace;
            while job_running(cluster, job).await && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if !told || job_running(cluster, job).await {
            error = cluster
                .scancel(&job_list, None)
                .await
                .err()
                .map(|e| e.message);
        }
    } else {
        error = cluster
            .scancel(steps, Some("TERM"))
            .await
            .err()
            .map(|e| e.message);
        let deadline = Instant::now() + grace;
        let mut left = steps.to_vec();
        loop {
            match cluster.steps(&job_list).await {
                Ok(now) => left.retain(|s| now.contains_key(s)),
                Err(e) => error = Some(e.message),
            }
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !left.is_empty() {
            error = cluster
                .scancel(&left, Some("KILL"))
                .await
                .err()
                .map(|e| e.message);
        }
    }
    let deadline = Instant::now() + grace + END_WAIT;
    // Since when SLURM has answered no query: waiting for its word is for a controller that
    // answers; one that does not is said so after UNANSWERED rather than after END_WAIT.
    let mut unanswered: Option<Instant> = None;
    let mut still = String::new();
    loop {
        let steps_left: Vec<String> = match cluster.steps(&job_list).await {
            Ok(now) => {
                unanswered = None;
                steps
                    .iter()
                    .filter(|s| now.contains_key(*s))
                    .cloned()
                    .collect()
            }
            Err(e) => {
                let since = *unanswered.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNANSWERED {
                    let what = if whole {
                        format!("job {job}")
                    } else {
                        format!("steps {}", steps.join(", "))
                    };
                    still = format!(
                        "SLURM has not answered for {} s ({}); {what} may still run",
                        UNANSWERED.as_secs(),
                        e.message
                    );
                    break;
                }
                vec![e.message]
            }
        };
        let job_left = whole && job_running(cluster, job).await;
        if !job_left && steps_left.is_empty() {
            still.clear();
            break;
        }
        if Instant::now() > deadline {
            still = if job_left {
                format!("job {job} may still run (SLURM did not confirm its end)")
            } else {
                format!("steps may still run: {}", steps_left.join(", "))
            };
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SLURM's word on what is left decides: `scancel --quiet` of a job or step that has
    // ended fails without a message, and cancelling what has ended is no failure.
    if still.is_empty() {
        return None;
    }
    Some(match error {
        Some(e) => format!("{e}; {still}"),
        None => still,
    })
}

/// Whether SLURM still runs (or will run) `job`; a failed query counts as running.
pub(crate) async fn job_running(cluster: &Cluster, job: &str) -> bool {
    !matches!(cluster.job(job).await, Ok(i) if !i.as_ref().is_some_and(JobInfo::is_present))
}

#[cfg(test)]
mod tests {
    use prl_flow_backend::ProcHandle;

    use super::*;

    /// A cluster whose `scancel` writes down each call and whose `squeue` lists no step.
    fn fake_cluster(dir: &Path) -> Cluster {
        use std::os::unix::fs::PermissionsExt;
        let calls = dir.join("calls");
        for (tool, body) in [
            ("scancel", format!("echo \"$*\" >> '{}'\n", calls.display())),
            ("squeue", String::new()),
        ] {
            let p = dir.join(tool);
            std::fs::write(&p, format!("#!/bin/sh\n{body}")).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Cluster {
            conf: None,
            bin_dir: Some(dir.to_path_buf()),
        }
    }

    fn step(cluster: &Cluster, id: &str, job: &str, step: &str) -> Recorded {
        let h = crate::handles::seal(&serde_json::json!({
            "job": job, "step": step, "node": "node0", "host": "n1",
            "name": "pf:t", "service": true, "log": "/l", "run_dir": "/r", "slurm": cluster,
        }))
        .expect("handle");
        Recorded {
            id: id.into(),
            held: Held::Process(h),
        }
    }

    /// `scancel --quiet` of a step that has ended fails without a word; SLURM shows nothing
    /// left of it, so the stop went well.
    #[tokio::test]
    async fn a_failed_scancel_of_what_has_ended_is_no_failure() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = fake_cluster(dir.path());
        let scancel = dir.path().join("scancel");
        std::fs::write(&scancel, "#!/bin/sh\nexit 1\n").expect("write");
        std::fs::set_permissions(&scancel, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let b = SlurmBackend::for_handles();
        let done = b
            .teardown(
                &[step(&cluster, "a", "12", "12.1")],
                Duration::from_secs(1),
                None,
            )
            .await;
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].error, None, "{done:?}");
        // And one step alone, as a re-run stops what an earlier run left.
        let Held::Process(h) = &step(&cluster, "a", "12", "12.1").held else {
            unreachable!()
        };
        b.stop(h, Duration::from_secs(1))
            .await
            .expect("a step that has ended is stopped");
    }

    /// With slurmctld down, nothing it was told can be confirmed: `down` says so once SLURM
    /// has answered nothing for a while, not after the wait for a job's end (grace + 120 s).
    #[tokio::test]
    async fn a_cancel_that_slurm_never_answers_is_said_to_have_left_what_may_still_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = fake_cluster(dir.path());
        for tool in ["scancel", "squeue"] {
            let p = dir.path().join(tool);
            std::fs::write(
                &p,
                "#!/bin/sh\necho 'error: Unable to contact slurm controller (connect failure)' \
                 >&2\nexit 1\n",
            )
            .expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let steps = ["12.1".to_string(), "12.2".to_string()];
        let left = tokio::time::timeout(
            END_WAIT / 2,
            cancel_job(
                &cluster,
                "12",
                &steps,
                false,
                Duration::from_millis(100),
                None,
            ),
        )
        .await
        .expect("given up on an unanswering SLURM before the wait for a job's end")
        .expect("what may still run is said");
        assert!(
            left.contains("SLURM has not answered for 10 s")
                && left.contains("Unable to contact slurm controller")
                && left.contains("steps 12.1, 12.2 may still run"),
            "{left}"
        );
    }

    #[tokio::test]
    async fn down_says_so_when_slurm_cannot_list_the_jobs_a_state_dir_submitted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = fake_cluster(dir.path());
        // This user's jobs cannot be listed (slurmctld unreachable); other queries answer.
        let squeue = dir.path().join("squeue");
        std::fs::write(
            &squeue,
            "#!/bin/sh\ncase \"$*\" in *--me*) echo 'slurm_load_jobs error: Unable to contact \
             slurm controller' >&2; exit 1;; esac\n",
        )
        .expect("write");
        std::fs::set_permissions(&squeue, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let state = dir.path().join("state");
        let sub = state.join(STATE_SUBDIR);
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(sub.join(HOLDER_SCRIPT), "#!/bin/sh\n").expect("write");
        std::fs::write(
            sub.join(CLUSTER_FILE),
            serde_json::to_vec(&cluster).expect("json"),
        )
        .expect("write");

        let b = SlurmBackend::for_handles();
        let done = b.teardown(&[], Duration::from_secs(1), Some(&state)).await;
        let errors: Vec<&str> = done.iter().filter_map(|s| s.error.as_deref()).collect();
        assert_eq!(errors.len(), 1, "{done:?}");
        assert!(
            errors[0].contains("could not list the jobs")
                && errors[0].contains("Unable to contact slurm controller"),
            "{}",
            errors[0]
        );
    }

    #[tokio::test]
    async fn many_steps_are_stopped_with_one_scancel_per_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = fake_cluster(dir.path());
        let b = SlurmBackend::for_handles();
        let ssh = ProcHandle::new("ssh", 1, &serde_json::json!({})).expect("handle");
        let items = [
            step(&cluster, "a", "12", "12.1"),
            step(&cluster, "b", "13", "13.0"),
            Recorded {
                id: "c".into(),
                held: Held::Process(ssh),
            },
            step(&cluster, "d", "12", "12.2"),
        ];
        let done = b.teardown(&items, Duration::from_secs(1), None).await;
        let failed: Vec<&str> = done
            .iter()
            .filter(|s| s.error.is_some())
            .map(|s| s.id.as_str())
            .collect();
        assert_eq!(failed, ["c"], "not a step: {done:?}");
        assert_eq!(done.len(), 4, "{done:?}");
        let calls = std::fs::read_to_string(dir.path().join("calls")).expect("calls");
        let mut calls: Vec<&str> = calls.lines().collect();
        calls.sort();
        assert_eq!(
            calls,
            [
                "--ctld --quiet --signal=TERM 12.1 12.2",
                "--ctld --quiet --signal=TERM 13.0"
            ]
        );
    }
}
