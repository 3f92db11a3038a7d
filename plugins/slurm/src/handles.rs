//! What the journal keeps of SLURM work, and the small files a step's wrapper leaves: a
//! step's handle (job, step, node, cluster), an allocation's handle, the step file, the job
//! file and exit status files. Handles are JSON in journals: the payloads' shape does not
//! change without a new [`ProcHandle::VERSION`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prl_flow_backend::{BackendError, ProcHandle, ProcState};
use serde::{Deserialize, Serialize};

use crate::slurm::Cluster;

/// The backend's name, in its handles.
pub(crate) const NAME: &str = "slurm";

/// A job step: the payload of its [`ProcHandle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StepHandle {
    pub(crate) job: String,
    /// `JOB.STEP`, as scancel and squeue write it.
    pub(crate) step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<String>,
    /// SLURM's name of the node.
    pub(crate) host: String,
    /// The step's name (`pf:<task>`).
    pub(crate) name: String,
    pub(crate) service: bool,
    pub(crate) log: PathBuf,
    pub(crate) run_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) slurm: Cluster,
    /// How many tasks the step carries (one task of a step of many is stopped alone, not
    /// with `scancel` of the step).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub(crate) tasks: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// The payload of a SLURM allocation's handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AllocHandle {
    pub(crate) job: String,
    /// Plan node (`node0`) → SLURM's node name.
    pub(crate) nodes: BTreeMap<String, String>,
    /// CPUs the job has on each node (what each step may use).
    pub(crate) cpus_per_node: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) log: Option<PathBuf>,
    #[serde(default)]
    pub(crate) slurm: Cluster,
}

/// The allocation a handle names, if it is one of this backend's.
pub(crate) fn alloc_handle(h: &ProcHandle) -> Option<AllocHandle> {
    h.open(NAME).ok()
}

/// The step a handle names; an error says why it is not one of this backend's.
pub(crate) fn parse_step(h: &ProcHandle) -> Result<StepHandle, BackendError> {
    h.open(NAME)
}

/// Wraps a step's or an allocation's data into this backend's handle.
pub(crate) fn seal(payload: &impl Serialize) -> Result<ProcHandle, BackendError> {
    ProcHandle::new(NAME, ProcHandle::VERSION, payload)
}

/// How a step ended that is no longer running: its exit status file if it left one, else
/// the exit status of its `srun` (when this process started it), else gone.
pub(crate) fn ended_state(h: &StepHandle, srun: Option<ProcState>) -> ProcState {
    if let Some(code) = h.status_file.as_deref().and_then(read_status) {
        return ProcState::Exited(Some(code));
    }
    match srun {
        Some(s @ ProcState::Exited(_)) => s,
        _ => ProcState::Gone,
    }
}

pub(crate) fn read_status(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `<job> <digest>` of the job file.
pub(crate) fn read_job_file(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut w = text.split_whitespace();
    Some((w.next()?.to_string(), w.next().unwrap_or("").to_string()))
}

/// What a task's dispatcher writes to its step file: `JOB.STEP NODE PID ATTEMPT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepFile {
    /// `JOB.STEP`.
    pub(crate) step: String,
    /// SLURM's name of the node.
    pub(crate) node: String,
    /// The dispatcher's pid on its node.
    pub(crate) pid: Option<u32>,
    /// The spawn's attempt.
    pub(crate) attempt: Option<u64>,
}

/// The step file, read once; `None` unless it names a step (`JOB.STEP`, both numbers).
pub(crate) fn read_step_file(path: &Path) -> Option<StepFile> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut w = text.split_whitespace();
    let step = w.next()?.to_string();
    let (job, s) = step.split_once('.')?;
    if job.is_empty() || s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(StepFile {
        node: w.next().unwrap_or("").to_string(),
        pid: w.next().and_then(|p| p.parse().ok()),
        attempt: w.next().and_then(|a| a.parse().ok()),
        step,
    })
}

/// The step file if the spawn of `attempt` wrote it (another attempt's is an earlier one's).
pub(crate) fn step_file_of(path: &Path, attempt: u64) -> Option<StepFile> {
    read_step_file(path).filter(|f| f.attempt == Some(attempt))
}

/// A step's name: `pf:` and the task id, with what SLURM or a shell might mangle replaced.
pub fn step_name(task: &str) -> String {
    let clean: String = task
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("pf:{clean}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::STEP_FILE;

    #[test]
    fn step_names_survive_slurm_and_shells() {
        assert_eq!(step_name("prefill[0].node[1]"), "pf:prefill_0_.node_1_");
        assert_eq!(
            step_name("mooncake-client.node[3]"),
            "pf:mooncake-client.node_3_"
        );
        assert_eq!(step_name("a b/c"), "pf:a_b_c");
    }

    #[test]
    fn step_files_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join(STEP_FILE);
        std::fs::write(&f, "12.3 n2 4242 1700000000123\n").expect("write");
        assert_eq!(
            read_step_file(&f),
            Some(StepFile {
                step: "12.3".into(),
                node: "n2".into(),
                pid: Some(4242),
                attempt: Some(1_700_000_000_123)
            })
        );
        assert!(step_file_of(&f, 1_700_000_000_123).is_some());
        assert_eq!(step_file_of(&f, 1_700_000_000_124), None);
        std::fs::write(&f, "12. n2 1\n").expect("write");
        assert_eq!(read_step_file(&f), None);
        std::fs::write(&f, "12.batch n2 1\n").expect("write");
        assert_eq!(read_step_file(&f), None);
    }
}
