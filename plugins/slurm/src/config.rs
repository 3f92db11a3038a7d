//! The `[backend]` table of a SLURM recipe (or a site file's defaults for it), checked in one
//! pass: every problem is reported at once, each naming its field.
//!
//! ```toml
//! [backend]
//! type = "slurm"
//! partition = "gpu"
//! account = "rl"
//! qos = "high"
//! time = "04:00:00"
//! constraint = "h100"
//! gpus_per_node = 8
//! exclusive = true
//! sbatch_lines = ["--reservation=bringup", "--mail-type=FAIL"]   # extra `#SBATCH` lines
//! prologue = "module load cuda/12.4\nsource /opt/venvs/vllm/bin/activate"  # before every step
//! srun_args = ["--mpi=none"]                                      # extra flags of every step
//! # rarely needed:
//! job_name = "prl-flow-ds"      # default: `prl-flow-<state dir name>`
//! slurm_conf = "/etc/slurm/slurm.conf"   # default: $SLURM_CONF, else SLURM's own default
//! bin_dir = "/opt/slurm/bin"    # where sbatch, srun, squeue, scancel, scontrol are
//! templates = "site-templates"  # a directory with `slurm/*.j2` overrides
//! address = "node_addr"         # what services bind: `node_addr` (SLURM's NodeAddr) or `hostname`
//! pending_timeout = "30m"       # give up on an allocation pending longer (default: wait)
//! step_timeout = "5m"           # a step that has not started by then fails
//! poll = "500ms"                # how often a step nobody started here is looked at
//! shell = "sh"                  # the shell that runs the prologue in front of each command
//! agent = "/shared/bin/prl-flow" # the prl-flow program on the nodes (default: this one)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use prl_flow_backend::table::{kind, TableReader};
pub use prl_flow_backend::ConfigError;
use prl_flow_engine::text::closest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What services bind and clients reach on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressMode {
    /// SLURM's `NodeAddr` of the node (its hostname unless the site says otherwise).
    #[default]
    NodeAddr,
    /// The node's name as SLURM knows it.
    Hostname,
}

/// The checked `[backend]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
    pub constraint: Option<String>,
    pub gpus_per_node: Option<u32>,
    pub exclusive: bool,
    /// Extra `#SBATCH` lines of the holder script, without the `#SBATCH` prefix.
    pub sbatch_lines: Vec<String>,
    /// Shell text run before the command of every step (module loads, a venv).
    pub prologue: Option<String>,
    /// Extra flags of every `srun`.
    pub srun_args: Vec<String>,
    pub job_name: Option<String>,
    pub slurm_conf: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub templates: Option<PathBuf>,
    pub address: AddressMode,
    pub pending_timeout: Option<Duration>,
    pub step_timeout: Duration,
    pub poll: Duration,
    pub shell: String,
    /// The prl-flow program the allocation's agent runs as, on the nodes; `None`: the
    /// program running now, at the same path.
    pub agent: Option<PathBuf>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            partition: None,
            account: None,
            qos: None,
            time: None,
            constraint: None,
            gpus_per_node: None,
            exclusive: false,
            sbatch_lines: Vec::new(),
            prologue: None,
            srun_args: Vec::new(),
            job_name: None,
            slurm_conf: None,
            bin_dir: None,
            templates: None,
            address: AddressMode::NodeAddr,
            pending_timeout: None,
            step_timeout: Duration::from_secs(300),
            poll: Duration::from_millis(500),
            shell: "sh".into(),
            agent: None,
        }
    }
}

/// Every field the table may hold (`type` is the recipe's own).
pub const FIELDS: &[&str] = &[
    "type",
    "partition",
    "account",
    "qos",
    "time",
    "constraint",
    "gpus_per_node",
    "exclusive",
    "sbatch_lines",
    "prologue",
    "srun_args",
    "job_name",
    "slurm_conf",
    "bin_dir",
    "templates",
    "address",
    "pending_timeout",
    "step_timeout",
    "poll",
    "shell",
    "agent",
];

impl SlurmConfig {
    /// Reads the table (JSON, as the recipe module hands it over; `null` is an empty table).
    pub fn parse(value: &Value) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let empty = serde_json::Map::new();
        let table = match value {
            Value::Null => &empty,
            Value::Object(m) => m,
            other => {
                return Err(vec![ConfigError::new(
                    "",
                    format!("must be a table, not {}", kind(other)),
                )])
            }
        };
        let mut c = SlurmConfig::default();
        let mut r = TableReader::new(table, &mut errors);
        r.unknown_fields("slurm", FIELDS, |k, f| closest(k, f.iter().copied()));
        c.partition = word(&mut r, "partition");
        c.account = word(&mut r, "account");
        c.qos = word(&mut r, "qos");
        c.time = word(&mut r, "time");
        c.constraint = word(&mut r, "constraint");
        c.job_name = word(&mut r, "job_name");
        c.gpus_per_node = r.count("gpus_per_node");
        c.exclusive = r.boolean("exclusive").unwrap_or(false);
        c.sbatch_lines = r
            .list("sbatch_lines")
            .into_iter()
            .map(|l| {
                l.trim()
                    .strip_prefix("#SBATCH")
                    .unwrap_or(l.trim())
                    .trim()
                    .to_string()
            })
            .collect();
        c.srun_args = r.list("srun_args");
        c.prologue = r.string("prologue").filter(|p| !p.trim().is_empty());
        c.slurm_conf = r.string("slurm_conf").map(PathBuf::from);
        c.bin_dir = r.string("bin_dir").map(PathBuf::from);
        c.templates = r.string("templates").map(PathBuf::from);
        c.agent = r.string("agent").map(PathBuf::from);
        if let Some(s) = word(&mut r, "shell") {
            c.shell = s;
        }
        if let Some(a) = r.string("address") {
            match a.as_str() {
                "node_addr" => c.address = AddressMode::NodeAddr,
                "hostname" => c.address = AddressMode::Hostname,
                other => r.error(
                    ConfigError::new("address", format!("`{other}` is not an address mode"))
                        .help("`node_addr` (SLURM's NodeAddr of each node) or `hostname`"),
                ),
            }
        }
        c.pending_timeout = r.duration("pending_timeout");
        if let Some(d) = r.duration("step_timeout") {
            c.step_timeout = d;
        }
        if let Some(d) = r.duration("poll") {
            c.poll = d.max(Duration::from_millis(50));
        }
        for (i, l) in c.sbatch_lines.iter().enumerate() {
            if l.is_empty() || !l.starts_with('-') {
                errors.push(
                    ConfigError::new(
                        format!("sbatch_lines[{i}]"),
                        format!("`{l}` is not an sbatch option"),
                    )
                    .help("write each line as sbatch takes it, e.g. `--reservation=bringup`"),
                );
            }
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }
}

/// A string that goes into an `#SBATCH` line or a command line as one word: sbatch
/// splits those lines at white space, so a value with a space would become two options.
fn word(r: &mut TableReader<'_>, key: &str) -> Option<String> {
    let s = r.string(key)?;
    if s.trim().is_empty() {
        r.error(ConfigError::new(key, "is empty").help("leave it out instead"));
        return None;
    }
    if s.chars().any(char::is_whitespace) {
        r.error(ConfigError::new(
            key,
            format!("`{s}` holds white space, which SLURM would split into two options"),
        ));
        return None;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_table_reads() {
        let c = SlurmConfig::parse(&json!({
            "type": "slurm",
            "partition": "gpu", "account": "rl", "qos": "high", "time": "04:00:00",
            "constraint": "h100&ib", "gpus_per_node": 8, "exclusive": true,
            "sbatch_lines": ["#SBATCH --reservation=r1", "--mail-type=FAIL"],
            "prologue": "module load cuda", "srun_args": ["--mpi=none"],
            "address": "hostname", "pending_timeout": "30m", "step_timeout": "2m", "poll": "1s",
        }))
        .expect("valid");
        assert_eq!(c.partition.as_deref(), Some("gpu"));
        assert_eq!(c.gpus_per_node, Some(8));
        assert!(c.exclusive);
        assert_eq!(c.sbatch_lines, ["--reservation=r1", "--mail-type=FAIL"]);
        assert_eq!(c.address, AddressMode::Hostname);
        assert_eq!(c.pending_timeout, Some(Duration::from_secs(1800)));
        assert_eq!(c.step_timeout, Duration::from_secs(120));
        assert_eq!(SlurmConfig::parse(&Value::Null), Ok(SlurmConfig::default()));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let errors = SlurmConfig::parse(&json!({
            "partiton": "gpu", "account": "a b", "gpus_per_node": -1, "exclusive": "yes",
            "sbatch_lines": ["reservation=x", 3], "address": "ip", "time": "",
            "pending_timeout": "soon",
        }))
        .expect_err("invalid");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let all = text.join("\n");
        for needle in [
            "`[backend] partiton`: is not a field of the slurm backend\n  help: did you mean `partition`?",
            "`[backend] account`: `a b` holds white space",
            "`[backend] gpus_per_node`: `-1` is not a count",
            "`[backend] exclusive`: must be `true` or `false`, not a string",
            "`[backend] sbatch_lines[1]`: must be a string, not a number",
            "`[backend] sbatch_lines[0]`: `reservation=x` is not an sbatch option",
            "`[backend] address`: `ip` is not an address mode",
            "`[backend] time`: is empty",
            "`[backend] pending_timeout`: `soon` is not a duration",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(errors.len(), 9, "{all}");
    }
}
