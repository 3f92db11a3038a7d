//! Stopping many steps at once: one `scancel` per job, never one per step (a thousand
//! `scancel` calls at once overload slurmctld). [`Backend::stop_many`] stops the steps it
//! is given this way; [`SlurmBackend::down`] does it for everything a journal records,
//! cancelling a job whole when its allocation is among the records.
//!
//! [`Backend::stop_many`]: prl_flow_backend::Backend::stop_many

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use prl_flow_backend::{Backend, BackendError, ProcHandle, ProcState};
use prl_flow_local::{is_local_handle, LocalBackend};

use crate::handles::{alloc_handle, allocation_backend, parse_step, read_job_file, StepHandle};
use crate::slurm::Cluster;
use crate::{SlurmBackend, END_WAIT, JOB_FILE, STATE_SUBDIR};

/// What [`SlurmBackend::down`] did with one journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownOutcome {
    /// The record's task id.
    pub id: String,
    /// Its step (or job) was running when `down` began.
    pub was_running: bool,
    /// `None`: it is not running any more.
    pub error: Option<String>,
}

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
    /// Stops steps, one `scancel` per job (see [`cancel_job`]); a handle that is not a step
    /// is an error of its own.
    pub(crate) async fn stop_steps(
        &self,
        handles: &[ProcHandle],
        grace: Duration,
    ) -> Vec<Result<(), BackendError>> {
        let mut out: Vec<Option<Result<(), BackendError>>> = vec![None; handles.len()];
        // Job → its cluster, and the steps of it (with their places in `handles`).
        type Steps = Vec<(usize, String)>;
        let mut groups: BTreeMap<(String, String), (Cluster, Steps)> = BTreeMap::new();
        for (at, h) in handles.iter().enumerate() {
            match parse_step(h) {
                Ok(s) => groups
                    .entry(job_key(&s.slurm, &s.job))
                    .or_insert_with(|| (s.slurm.clone(), Vec::new()))
                    .1
                    .push((at, s.step)),
                Err(e) => out[at] = Some(Err(e)),
            }
        }
        let jobs = groups
            .into_iter()
            .map(|((_, job), (cluster, steps))| async move {
                let ids: Vec<String> = steps.iter().map(|(_, s)| s.clone()).collect();
                let error = cancel_job(&cluster, &job, &ids, false, grace).await;
                (steps, error)
            });
        for (steps, error) in futures::future::join_all(jobs).await {
            for (at, _) in steps {
                out[at] = Some(match &error {
                    None => Ok(()),
                    Some(e) => Err(BackendError::new(e.clone())),
                });
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BackendError::new("no answer for this handle"))))
            .collect()
    }

    /// Cancels what a journal records, one `scancel` per job: the records' handles (steps,
    /// allocations, and local processes) by task id. A job whose allocation is among them is
    /// cancelled whole (SLURM ends its steps: SIGTERM, then SIGKILL after `KillWait`);
    /// otherwise its recorded steps get one `scancel --signal=TERM` together, `grace`, and
    /// one `--signal=KILL` for those still there. With `state_dir`, a job this state dir
    /// submitted but never recorded (prl-flow was killed while it pended) is cancelled too.
    /// Waits until SLURM no longer runs any of it.
    pub async fn down(
        &self,
        state_dir: Option<&Path>,
        records: &[(String, ProcHandle)],
        grace: Duration,
    ) -> Vec<DownOutcome> {
        let mut out = Vec::new();
        let local = LocalBackend::new();
        let mut groups: BTreeMap<(String, String), (Cluster, Group)> = BTreeMap::new();
        for (id, h) in records {
            if let Ok(s) = parse_step(h) {
                let entry = groups
                    .entry(job_key(&s.slurm, &s.job))
                    .or_insert_with(|| (s.slurm.clone(), Group::default()));
                entry.1.steps.push((id.clone(), s));
            } else if let Some(a) = alloc_handle(h) {
                let entry = groups
                    .entry(job_key(&a.slurm, &a.job))
                    .or_insert_with(|| (a.slurm.clone(), Group::default()));
                entry.1.allocs.push(id.clone());
            } else if is_local_handle(h) {
                let was_running = matches!(local.status(h).await, Ok(ProcState::Running));
                let error = local.stop(h, grace).await.err().map(|e| e.message);
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running,
                    error,
                });
            } else if allocation_backend(h).as_deref() == Some("local") {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: false,
                    error: None,
                });
            } else {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: false,
                    error: Some(format!("not a handle of the slurm backend: {h}")),
                });
            }
        }
        if let Some(job) =
            state_dir.and_then(|d| read_job_file(&d.join(STATE_SUBDIR).join(JOB_FILE)))
        {
            let key = job_key(&self.cluster, &job.0);
            if let std::collections::btree_map::Entry::Vacant(slot) = groups.entry(key) {
                if let Ok(Some(info)) = self.cluster.job(&job.0).await {
                    if info.is_pending() || info.is_alive() {
                        slot.insert((
                            self.cluster.clone(),
                            Group {
                                allocs: vec![format!("(job {} of this state dir)", job.0)],
                                steps: Vec::new(),
                            },
                        ));
                    }
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
            let error = cancel_job(&cluster, &job, &ours, !group.allocs.is_empty(), grace).await;
            for id in &group.allocs {
                out.push(DownOutcome {
                    id: id.clone(),
                    was_running: job_alive,
                    error: error.clone(),
                });
            }
            for (id, s) in &group.steps {
                out.push(DownOutcome {
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

/// Cancels `steps` of `job` (or, `whole`, the job itself) and waits until SLURM shows none
/// of it: `whole` is one `scancel J`; else one `scancel --signal=TERM` for the steps, up to
/// `grace` for them to end, and one `--signal=KILL` for those still there. `None` when all
/// of it has ended; else what went wrong (an unanswered query counts as "still there").
async fn cancel_job(
    cluster: &Cluster,
    job: &str,
    steps: &[String],
    whole: bool,
    grace: Duration,
) -> Option<String> {
    let job_list = [job.to_string()];
    let mut error;
    if whole {
        error = cluster
            .scancel(&job_list, None)
            .await
            .err()
            .map(|e| e.message);
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
    let mut still = String::new();
    loop {
        let steps_left: Vec<String> = match cluster.steps(&job_list).await {
            Ok(now) => steps
                .iter()
                .filter(|s| now.contains_key(*s))
                .cloned()
                .collect(),
            Err(e) => vec![e.message],
        };
        let job_left = whole
            && !matches!(cluster.job(job).await, Ok(i) if !i.as_ref().is_some_and(|i| i.is_alive() || i.is_pending() || i.state == "COMPLETING"));
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    error.or_else(|| (!still.is_empty()).then_some(still))
}

#[cfg(test)]
mod tests {
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

    fn step(cluster: &Cluster, job: &str, step: &str) -> ProcHandle {
        serde_json::json!({
            "backend": "slurm", "job": job, "step": step, "node": "node0", "host": "n1",
            "name": "pf:t", "service": true, "log": "/l", "run_dir": "/r", "slurm": cluster,
        })
    }

    #[tokio::test]
    async fn many_steps_are_stopped_with_one_scancel_per_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = fake_cluster(dir.path());
        let b = SlurmBackend::for_handles();
        let handles = [
            step(&cluster, "12", "12.1"),
            step(&cluster, "13", "13.0"),
            serde_json::json!({ "backend": "ssh" }),
            step(&cluster, "12", "12.2"),
        ];
        let done = b.stop_many(&handles, Duration::from_secs(1)).await;
        assert!(
            done[0].is_ok() && done[1].is_ok() && done[3].is_ok(),
            "{done:?}"
        );
        assert!(done[2].is_err(), "not a step: {done:?}");
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
