//! The two command templates of the backend, minijinja like every template of prl-flow:
//!
//! - `slurm/holder.sbatch.j2`: the batch script holding the allocation (its `#SBATCH`
//!   header carries the site options);
//! - `slurm/srun.argv.j2`: the srun command line of a step, one argument per line (as the
//!   recipe's argv templates are), so no value is ever re-split by a shell.
//!
//! Both are built in (from `templates/slurm/` of the repository); a site overrides either
//! with a file of the same name under `<templates dir>/slurm/`. Undefined variables are
//! errors, and both templates are rendered once with sample values when the backend is
//! made, so a broken override fails before anything is submitted.

use std::path::Path;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

pub const HOLDER: &str = "holder.sbatch.j2";
pub const SRUN: &str = "srun.argv.j2";

const BUILT_IN: &[(&str, &str)] = &[
    (
        HOLDER,
        include_str!("../../../templates/slurm/holder.sbatch.j2"),
    ),
    (SRUN, include_str!("../../../templates/slurm/srun.argv.j2")),
];

/// What the holder script is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct HolderVars<'a> {
    pub deployment: &'a str,
    pub nodes: usize,
    pub partition: &'a str,
    pub account: &'a str,
    pub qos: &'a str,
    pub time: &'a str,
    pub constraint: &'a str,
    pub gpus_per_node: u32,
    pub exclusive: bool,
    pub sbatch_lines: &'a [String],
    /// The prl-flow program the allocation's agent runs as, and the agent's directory.
    pub agent_program: &'a str,
    pub agent_dir: &'a str,
}

/// What the srun line of a step is rendered with.
#[derive(Debug, Clone, Serialize)]
pub struct SrunVars<'a> {
    pub job_id: &'a str,
    /// SLURM's names of the step's nodes, comma separated.
    pub host: &'a str,
    pub nodes: usize,
    pub ntasks: usize,
    pub ntasks_per_node: usize,
    pub step_name: &'a str,
    pub run_dir: &'a str,
    pub log: &'a str,
    pub cpus_per_task: u32,
    /// More tasks on a node than it has CPUs.
    pub overcommit: bool,
    pub service: bool,
    pub srun_args: &'a [String],
}

pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// The built-in templates, each replaced by `<dir>/slurm/<name>` where that exists.
    pub fn load(dir: Option<&Path>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_keep_trailing_newline(true);
        env.add_filter("shell_quote", shell_quote);
        for (name, source) in BUILT_IN {
            let mut text = source.to_string();
            let mut origin = format!("built-in template `slurm/{name}`");
            if let Some(d) = dir {
                let path = d.join("slurm").join(name);
                if path.exists() {
                    text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
                    origin = format!("`{}`", path.display());
                }
            }
            env.add_template_owned(*name, text)
                .map_err(|e| format!("{origin} does not parse: {}", detail(&e)))?;
        }
        let t = Self { env };
        t.check()?;
        Ok(t)
    }

    /// No templates: every render fails (for a backend that only reads handles).
    pub fn empty() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        Self { env }
    }

    /// Renders both with sample values: a typo in an override shows now, not at the first
    /// allocation.
    fn check(&self) -> Result<(), String> {
        let lines = vec!["--comment=x".to_string()];
        self.holder(&HolderVars {
            deployment: "d",
            nodes: 2,
            partition: "p",
            account: "a",
            qos: "q",
            time: "1:00:00",
            constraint: "c",
            gpus_per_node: 8,
            exclusive: true,
            sbatch_lines: &lines,
            agent_program: "/bin/prl-flow",
            agent_dir: "/s/slurm/agent",
        })?;
        self.srun(&SrunVars {
            job_id: "1",
            host: "n1,n2",
            nodes: 2,
            ntasks: 4,
            ntasks_per_node: 2,
            step_name: "pf:t",
            run_dir: "/r",
            log: "/l",
            cpus_per_task: 1,
            overcommit: true,
            service: true,
            srun_args: &lines,
        })?;
        Ok(())
    }

    pub fn holder(&self, vars: &HolderVars<'_>) -> Result<String, String> {
        self.render(HOLDER, vars)
    }

    /// The srun argv: one argument per rendered line, trimmed, blank lines dropped.
    pub fn srun(&self, vars: &SrunVars<'_>) -> Result<Vec<String>, String> {
        let text = self.render(SRUN, vars)?;
        let argv: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if argv.is_empty() {
            return Err(format!("template `slurm/{SRUN}` rendered no command"));
        }
        Ok(argv)
    }

    fn render(&self, name: &str, vars: &impl Serialize) -> Result<String, String> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(vars))
            .map_err(|e| format!("template `slurm/{name}`: {}", detail(&e)))
    }
}

/// The `shell_quote` filter: a value as one POSIX shell word (quoted by `shlex`).
fn shell_quote(v: minijinja::Value) -> Result<String, minijinja::Error> {
    let text = v.to_string();
    shlex::try_quote(&text)
        .map(|q| q.into_owned())
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))
}

fn detail(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder_vars(lines: &[String]) -> HolderVars<'_> {
        HolderVars {
            deployment: "disaggregated",
            nodes: 4,
            partition: "gpu",
            account: "",
            qos: "high",
            time: "04:00:00",
            constraint: "",
            gpus_per_node: 8,
            exclusive: true,
            sbatch_lines: lines,
            agent_program: "/opt/prl flow/prl-flow",
            agent_dir: "/state/slurm/agent",
        }
    }

    #[test]
    fn the_holder_script_carries_the_site_options() {
        let t = Templates::load(None).expect("built-in templates");
        let lines = vec!["--reservation=r1".to_string()];
        let s = t.holder(&holder_vars(&lines)).expect("render");
        let header: Vec<&str> = s.lines().filter(|l| l.starts_with("#SBATCH")).collect();
        assert_eq!(
            header,
            [
                "#SBATCH --ntasks-per-node=1",
                "#SBATCH --partition=gpu",
                "#SBATCH --qos=high",
                "#SBATCH --time=04:00:00",
                "#SBATCH --gpus-per-node=8",
                "#SBATCH --exclusive",
                "#SBATCH --reservation=r1",
            ]
        );
        assert!(s.starts_with("#!/bin/sh\n"), "{s}");
        assert!(
            s.contains("'/opt/prl flow/prl-flow' slurm-agent /state/slurm/agent"),
            "the agent, quoted: {s}"
        );
        assert!(s.trim_end().ends_with("exec sleep infinity"), "{s}");
    }

    #[test]
    fn the_srun_line_is_one_argument_per_line() {
        let t = Templates::load(None).expect("built-in templates");
        let extra = vec!["--mpi=none".to_string(), "--comment=a b".to_string()];
        let argv = t
            .srun(&SrunVars {
                job_id: "12",
                host: "n3,n4",
                nodes: 2,
                ntasks: 4,
                ntasks_per_node: 2,
                step_name: "pf:decode_0_.rank_0_+3",
                run_dir: "/state dir/slurm/agent",
                log: "/state dir/slurm/agent/work/1.out",
                cpus_per_task: 8,
                overcommit: false,
                service: true,
                srun_args: &extra,
            })
            .expect("render");
        assert_eq!(
            argv,
            [
                "srun",
                "--jobid=12",
                "--overlap",
                "--nodelist=n3,n4",
                "--nodes=2",
                "--ntasks=4",
                "--ntasks-per-node=2",
                "--cpus-per-task=8",
                "--kill-on-bad-exit=0",
                "--job-name=pf:decode_0_.rank_0_+3",
                "--chdir=/state dir/slurm/agent",
                "--input=none",
                "--output=/state dir/slurm/agent/work/1.out",
                "--open-mode=append",
                "--mpi=none",
                "--comment=a b",
            ]
        );
    }

    #[test]
    fn a_site_override_wins_and_a_broken_one_fails_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("slurm")).expect("mkdir");
        std::fs::write(
            dir.path().join("slurm").join(SRUN),
            "site-srun\n--jobid={{ job_id }}\n",
        )
        .expect("write");
        let t = Templates::load(Some(dir.path())).expect("override");
        let argv = t
            .srun(&SrunVars {
                job_id: "7",
                host: "n1",
                nodes: 1,
                ntasks: 1,
                ntasks_per_node: 1,
                step_name: "s",
                run_dir: "/r",
                log: "/l",
                cpus_per_task: 1,
                overcommit: false,
                service: false,
                srun_args: &[],
            })
            .expect("render");
        assert_eq!(argv, ["site-srun", "--jobid=7"]);
        // The holder is still the built-in one.
        assert!(t
            .holder(&holder_vars(&[]))
            .expect("render")
            .contains("--partition=gpu"));

        std::fs::write(
            dir.path().join("slurm").join(HOLDER),
            "#!/bin/sh\n#SBATCH -p {{ partiton }}\n",
        )
        .expect("write");
        let err = Templates::load(Some(dir.path()))
            .err()
            .expect("an undefined variable is an error");
        assert!(
            err.contains("holder.sbatch.j2") && err.contains("undefined"),
            "{err}"
        );
    }
}
