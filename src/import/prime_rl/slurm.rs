//! prime-rl's `[slurm]` table as the SLURM backend's `[backend]` table (docs/slurm.md).

use toml_edit::{value, Array, Table};

use super::super::source::{Ctx, Tab, R};
use super::unknown;

/// prime-rl's defaults, which the recipe states (SLURM's own would differ).
const SLURM_PARTITION: &str = "cluster";
const SLURM_JOB_NAME: &str = "prime-rl";

/// `[slurm]` as a `[backend]` table of the SLURM backend.
pub(super) fn backend(ctx: &mut Ctx, mut s: Tab, gpus: i64) -> R<Table> {
    let mut b = Table::new();
    b.insert("type", value("slurm"));
    let job = s
        .str(ctx, "job_name")?
        .map_or(SLURM_JOB_NAME.to_string(), |v| v.v);
    b.insert("job_name", value(job));
    let part = s
        .str(ctx, "partition")?
        .map_or(SLURM_PARTITION.to_string(), |v| v.v);
    b.insert("partition", value(part));
    for k in ["account", "time"] {
        if let Some(v) = s.str(ctx, k)? {
            b.insert(k, value(v.v));
        }
    }
    b.insert("gpus_per_node", value(gpus));
    b.insert("exclusive", value(true));
    let mut lines = Array::new();
    for k in ["nodelist", "exclude"] {
        if let Some(v) = s.str(ctx, k)? {
            lines.push(format!("--{k}={}", v.v));
        }
    }
    if !lines.is_empty() {
        b.insert("sbatch_lines", value(lines));
    }
    let why = [
        ("project_dir", "prime-rl sources its .env and activates its .venv there; write what your nodes need in `[backend] prologue`"),
        ("template_path", "prl-flow renders its own SLURM scripts; see docs/slurm.md for template overrides"),
        ("pre_run_command", "prime-rl runs it once on the head node; the closest is `[backend] prologue`, which runs before every step"),
        ("cleanup_grace_period", "a setting of prime-rl's RL job teardown"),
    ];
    for (k, w) in why {
        if let Some(v) = s.take(k) {
            ctx.note(&v.key, v.at.as_ref(), w);
        }
    }
    s.rest(ctx, |_| unknown());
    Ok(b)
}
