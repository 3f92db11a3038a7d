//! Talking to SLURM: its client commands (`sbatch`, `srun`, `squeue`, `scancel`,
//! `scontrol`), run with the cluster's `SLURM_CONF`, and their output read back.
//!
//! The environment of every command is scrubbed of `SLURM_*` (but `SLURM_CONF`), `SBATCH_*`,
//! `SALLOC_*` and `SRUN_*` variables: when prl-flow itself runs inside a job (a login shell
//! from `salloc`, a CI job), those describe *that* job, and `srun` and `sbatch` read them as
//! options (`SLURM_NTASKS` would silently change every step).
//!
//! Output formats are fixed with `-o` and split at `|`, so a site's `SQUEUE_FORMAT` does not
//! matter. Parsing lives in plain functions that unit tests reach without a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prl_flow_backend::BackendError;
use serde::{Deserialize, Serialize};

/// How long one client command may take before it counts as an unreachable controller.
/// slurmctld answers in milliseconds; its own `MessageTimeout` defaults to 10 s.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach one SLURM cluster. Every handle keeps a copy, so that `status` or `down` in a
/// later process reach the same cluster without the recipe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Cluster {
    /// `SLURM_CONF` (absolute); `None`: SLURM's own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// Where the client commands are; `None`: found on `PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bin_dir: Option<PathBuf>,
}

/// A job as `squeue` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// `PENDING`, `RUNNING`, `COMPLETING`, `CANCELLED`, ...
    pub state: String,
    /// Why it pends (`Resources`, `PartitionNodeLimit`, ...), `None` when it does not.
    pub reason: String,
    /// Its nodes as a host list expression (`n[1-4]`); empty while pending.
    pub nodelist: String,
    pub cpus: u32,
    pub nodes: u32,
    pub partition: String,
}

impl JobInfo {
    /// States in which the job holds (or will soon hold) its nodes.
    pub fn is_alive(&self) -> bool {
        matches!(
            self.state.as_str(),
            "RUNNING" | "CONFIGURING" | "SUSPENDED" | "RESIZING" | "SIGNALING"
        )
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.state.as_str(), "PENDING" | "REQUEUED" | "REQUEUE_HOLD")
    }

    /// Not over yet: running, pending, or still ending its steps (`COMPLETING`).
    pub fn is_present(&self) -> bool {
        self.is_alive() || self.is_pending() || self.state == "COMPLETING"
    }
}

/// Takes out of `c`'s environment every variable SLURM's commands read as options: inside
/// a job those describe that job (its one batch task, its CPUs). `SLURM_CONF` stays.
pub(crate) fn scrub_env(c: &mut tokio::process::Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let scrub = ["SLURM_", "SBATCH_", "SALLOC_", "SRUN_"]
            .iter()
            .any(|p| k.starts_with(p));
        if scrub && k != "SLURM_CONF" {
            c.env_remove(k.as_ref());
        }
    }
}

impl Cluster {
    pub fn program(&self, tool: &str) -> PathBuf {
        match &self.bin_dir {
            Some(d) => d.join(tool),
            None => PathBuf::from(tool),
        }
    }

    /// A command for `tool` with this cluster's environment.
    pub fn command(&self, tool: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(self.program(tool));
        scrub_env(&mut c);
        if let Some(conf) = &self.conf {
            c.env("SLURM_CONF", conf);
        }
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Runs `tool args`; `Ok` holds (success, stdout, stderr).
    pub async fn output(
        &self,
        tool: &str,
        args: &[String],
    ) -> Result<(bool, String, String), BackendError> {
        let mut c = self.command(tool);
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, c.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackendError::new(format!(
                    "`{}` is not installed here{}",
                    tool,
                    match &self.bin_dir {
                        Some(d) => format!(" (looked in `{}`)", d.display()),
                        None => " (not on PATH; set `[backend] bin_dir`)".into(),
                    }
                )))
            }
            Ok(Err(e)) => return Err(BackendError::new(format!("cannot run `{tool}`: {e}"))),
            Err(_) => {
                return Err(BackendError::new(format!(
                    "`{tool}` did not answer in {} s: is slurmctld up?{}",
                    COMMAND_TIMEOUT.as_secs(),
                    self.conf_hint()
                )))
            }
        };
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs `tool args` and returns its stdout; a failure carries its stderr.
    pub async fn run(&self, tool: &str, args: &[String]) -> Result<String, BackendError> {
        let (ok, out, err) = self.output(tool, args).await?;
        if ok {
            Ok(out)
        } else {
            Err(BackendError::new(format!(
                "`{tool} {}` failed: {}{}",
                args.join(" "),
                one_line(&err),
                self.conf_hint()
            )))
        }
    }

    fn conf_hint(&self) -> String {
        match &self.conf {
            Some(c) => format!(" (SLURM_CONF={})", c.display()),
            None => String::new(),
        }
    }

    /// Submits a batch script; returns the job id.
    pub async fn sbatch(&self, args: &[String], script: &Path) -> Result<String, BackendError> {
        let mut a = vec!["--parsable".to_string()];
        a.extend(args.iter().cloned());
        a.push(script.to_string_lossy().into_owned());
        let (ok, out, err) = self.output("sbatch", &a).await?;
        if !ok {
            return Err(BackendError::new(format!(
                "SLURM refused the allocation: {}",
                one_line(&err)
            )));
        }
        // `--parsable` prints `ID` or `ID;CLUSTER`.
        let id = out
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(BackendError::new(format!(
                "sbatch answered `{}`, not a job id",
                out.trim()
            )));
        }
        Ok(id)
    }

    /// The job, or `None` when SLURM no longer knows it (ended longer ago than `MinJobAge`).
    pub async fn job(&self, job: &str) -> Result<Option<JobInfo>, BackendError> {
        let args = ["-h", "-t", "all", "-j", job, "-o", "%T|%r|%N|%C|%D|%P"].map(String::from);
        let (ok, out, err) = self.output("squeue", &args).await?;
        if !ok {
            if err.contains("Invalid job id") {
                return Ok(None);
            }
            return Err(BackendError::new(format!(
                "`squeue -j {job}` failed: {}{}",
                one_line(&err),
                self.conf_hint()
            )));
        }
        Ok(out.lines().find_map(parse_job_line))
    }

    /// The running steps of `jobs`, as `JOB.STEP` → step name. One call for all of them.
    pub async fn steps(&self, jobs: &[String]) -> Result<BTreeMap<String, String>, BackendError> {
        if jobs.is_empty() {
            return Ok(BTreeMap::new());
        }
        let args = ["-h", "-s", "-j", &jobs.join(","), "-o", "%i|%j"].map(String::from);
        let (ok, out, err) = self.output("squeue", &args).await?;
        if !ok {
            if err.contains("Invalid job id") {
                return Ok(BTreeMap::new());
            }
            return Err(BackendError::new(format!(
                "`squeue -s` failed: {}{}",
                one_line(&err),
                self.conf_hint()
            )));
        }
        Ok(parse_steps(&out))
    }

    /// This user's jobs (pending or running) whose batch script is `script`: SLURM keeps
    /// the script's absolute path as the job's command (`%o`).
    pub async fn jobs_of_script(&self, script: &Path) -> Result<Vec<String>, BackendError> {
        let args = ["--me", "-h", "-o", "%i|%T|%o"].map(String::from);
        let out = self.run("squeue", &args).await?;
        Ok(parse_script_jobs(&out, script))
    }

    /// `scancel` of jobs or steps, through slurmctld (`--ctld`: the direct path to slurmd
    /// reports bogus errors for step signals in SLURM 22.05, and one request to the
    /// controller is what it is best at).
    pub async fn scancel(
        &self,
        targets: &[String],
        signal: Option<&str>,
    ) -> Result<(), BackendError> {
        if targets.is_empty() {
            return Ok(());
        }
        let mut args = vec!["--ctld".to_string(), "--quiet".to_string()];
        if let Some(s) = signal {
            args.push(format!("--signal={s}"));
        }
        args.extend(targets.iter().cloned());
        let (ok, _, err) = self.output("scancel", &args).await?;
        // Cancelling what already ended is not an error (`--quiet` drops most of those).
        if ok || err.contains("Invalid job id") || err.contains("already completing") {
            Ok(())
        } else {
            Err(BackendError::new(format!(
                "`scancel {}` failed: {}",
                targets.join(" "),
                one_line(&err)
            )))
        }
    }

    /// The node a (one-node) step runs on.
    pub async fn step_node(&self, step: &str) -> Option<String> {
        let out = self
            .run(
                "scontrol",
                &["show".into(), "step".into(), "-o".into(), step.into()],
            )
            .await
            .ok()?;
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("NodeList="))
            .map(String::from)
    }

    /// How many nodes a partition has (`None` when SLURM does not say).
    pub async fn partition_nodes(&self, partition: &str) -> Option<u32> {
        let out = self
            .run(
                "scontrol",
                &[
                    "show".into(),
                    "partition".into(),
                    "-o".into(),
                    partition.into(),
                ],
            )
            .await
            .ok()?;
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("TotalNodes="))
            .and_then(|n| n.parse().ok())
    }

    /// The node names of a host list expression, in SLURM's order.
    pub async fn hostnames(&self, nodelist: &str) -> Result<Vec<String>, BackendError> {
        let out = self
            .run(
                "scontrol",
                &["show".into(), "hostnames".into(), nodelist.into()],
            )
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// `NodeAddr` of each node of a host list expression.
    pub async fn node_addrs(
        &self,
        nodelist: &str,
    ) -> Result<BTreeMap<String, String>, BackendError> {
        let out = self
            .run(
                "scontrol",
                &["show".into(), "node".into(), "-o".into(), nodelist.into()],
            )
            .await?;
        Ok(parse_node_addrs(&out))
    }
}

/// One line of `squeue -o %T|%r|%N|%C|%D|%P`.
pub fn parse_job_line(line: &str) -> Option<JobInfo> {
    let f: Vec<&str> = line.trim().split('|').collect();
    if f.len() < 6 || f[0].is_empty() {
        return None;
    }
    Some(JobInfo {
        state: f[0].to_string(),
        reason: f[1].to_string(),
        nodelist: f[2].to_string(),
        cpus: f[3].parse().unwrap_or(0),
        nodes: f[4].parse().unwrap_or(0),
        partition: f[5].to_string(),
    })
}

/// `squeue -s -o %i|%j` output: step id → name. The batch step (`J.batch`) and the extern
/// step are SLURM's, not ours, and are left out.
/// Job ids of `squeue -o %i|%T|%o` lines whose command is `script` and that have not
/// ended (squeue lists only those, unless asked for more).
pub fn parse_script_jobs(out: &str, script: &Path) -> Vec<String> {
    const ENDED: &[&str] = &[
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    ];
    out.lines()
        .filter_map(|l| {
            let mut w = l.trim().splitn(3, '|');
            let (id, state, command) = (w.next()?, w.next()?, w.next()?);
            let ours = !id.is_empty() && Path::new(command) == script;
            (ours && !ENDED.contains(&state)).then(|| id.to_string())
        })
        .collect()
}

pub fn parse_steps(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| {
            let (id, name) = l.trim().split_once('|')?;
            let (_, step) = id.split_once('.')?;
            step.chars()
                .all(|c| c.is_ascii_digit())
                .then(|| (id.to_string(), name.to_string()))
        })
        .collect()
}

/// `scontrol show node -o` output: NodeName → NodeAddr.
pub fn parse_node_addrs(out: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let mut name = None;
        let mut addr = None;
        for word in line.split_whitespace() {
            if let Some(v) = word.strip_prefix("NodeName=") {
                name = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("NodeAddr=") {
                addr = Some(v.to_string());
            }
        }
        if let (Some(n), Some(a)) = (name, addr) {
            m.insert(n, a);
        }
    }
    m
}

/// Whether a pending job's reason will never clear by itself: then waiting is a hang, and
/// the allocation fails at once with SLURM's reason and what it means.
pub fn hopeless(reason: &str) -> Option<&'static str> {
    let r = reason.trim_start_matches('(').trim_end_matches(')');
    let known: &[(&str, &str)] = &[
        ("PartitionNodeLimit", "the job asks for more (or fewer) nodes than the partition allows: ask for fewer nodes or another partition"),
        ("PartitionTimeLimit", "the time limit asked for is longer than the partition allows: lower `time` or pick another partition"),
        ("PartitionDown", "the partition is down; an administrator must bring it up"),
        ("PartitionInactive", "the partition is inactive; an administrator must bring it up"),
        ("BadConstraints", "no node of the partition has the features asked for (`constraint`) with the resources asked for"),
        ("InvalidAccount", "the account is not valid: check `account`"),
        ("InvalidQOS", "the QOS is not valid: check `qos`"),
        ("AccountNotAllowed", "the account may not use this partition"),
        ("QOSNotAllowed", "the QOS may not be used in this partition"),
        ("DependencyNeverSatisfied", "a dependency of the job can never be met"),
        ("JobHeldAdmin", "an administrator holds the job"),
        ("JobHeldUser", "the job is held (`scontrol release` it, or cancel it)"),
    ];
    if let Some((_, why)) = known.iter().find(|(k, _)| *k == r) {
        return Some(why);
    }
    // Per-job limits of QOS and associations (`QOSMaxNodePerJobLimit`, `AssocMaxCpuPerJob`,
    // `MaxGRESPerJob`, ...) never clear: the job itself is too big. Group limits do, when
    // other jobs end.
    if r.contains("PerJob") || r.starts_with("QOSMin") || r.starts_with("AssocMin") {
        return Some("the job is larger than a per-job limit of its QOS or account allows");
    }
    None
}

fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "no message".into()
    } else {
        lines.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_parse() {
        let j = parse_job_line("RUNNING|None|n[1-4]|4|4|gpu\n").expect("line");
        assert_eq!(j.state, "RUNNING");
        assert_eq!(j.nodelist, "n[1-4]");
        assert_eq!((j.cpus, j.nodes), (4, 4));
        assert!(j.is_alive());
        let p = parse_job_line("PENDING|PartitionNodeLimit||8|4|small").expect("line");
        assert!(p.is_pending() && !p.is_alive());
        assert!(parse_job_line("").is_none());
        let steps = parse_steps("12.0|pf:router\n12.batch|batch\n12.extern|extern\n12.3|x|y\n");
        assert_eq!(steps.len(), 2);
        assert_eq!(steps["12.0"], "pf:router");
        assert_eq!(steps["12.3"], "x|y");
        let script = Path::new("/s/a b/slurm/holder.sbatch");
        let jobs = parse_script_jobs(
            "7|PENDING|/s/a b/slurm/holder.sbatch\n8|RUNNING|/s/other/slurm/holder.sbatch\n9|COMPLETED|/s/a b/slurm/holder.sbatch\n10|RUNNING|/s/a b/slurm/holder.sbatch\n",
            script,
        );
        assert_eq!(jobs, ["7", "10"]);
    }

    #[test]
    fn node_addresses_parse() {
        let out =
            "NodeName=n1 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.61.8.2 NodeHostName=vm Port=1\n\
                   NodeName=n2 Arch=x86_64 NodeAddr=gpu-002.ib NodeHostName=vm\n";
        let m = parse_node_addrs(out);
        assert_eq!(m["n1"], "10.61.8.2");
        assert_eq!(m["n2"], "gpu-002.ib");
    }

    #[test]
    fn hopeless_reasons_are_told_apart_from_waiting() {
        assert!(hopeless("PartitionNodeLimit").is_some());
        assert!(hopeless("(BadConstraints)").is_some());
        assert!(hopeless("QOSMaxNodePerJobLimit").is_some());
        assert!(hopeless("Resources").is_none());
        assert!(hopeless("Priority").is_none());
        assert!(hopeless("QOSGrpNodeLimit").is_none());
        assert!(hopeless("ReqNodeNotAvail, Reserved for maintenance").is_none());
    }
}
