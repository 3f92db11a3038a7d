//! The preflight as one job step across the allocation: `srun --overlap` with one task per
//! node runs the site's prologue, then looks up the programs of that node on its `PATH`, so
//! a missing program is found in seconds, before any step of the plan starts (and before a
//! model download).

use std::collections::{BTreeMap, BTreeSet};

use prl_flow_backend::preflight::{read_missing, CHECK_SH};
use prl_flow_backend::{BackendError, Missing, Program};

use crate::SlurmBackend;

impl SlurmBackend {
    /// Checks `programs` (each on its plan node) in one step on every node they name.
    pub(crate) async fn preflight_step(
        &self,
        programs: &[Program],
    ) -> Result<Option<Vec<Missing>>, BackendError> {
        let Some(alloc) = self.current_alloc() else {
            return Ok(None);
        };
        // (plan node, SLURM node, program), in one list the script's indexes point into.
        let mut wanted = Vec::new();
        for p in programs {
            let Some(node) = &p.node else { continue };
            if let Some(host) = alloc.nodes.get(node) {
                wanted.push((node.clone(), host.clone(), p.program.clone()));
            }
        }
        let hosts: BTreeSet<&str> = wanted.iter().map(|(_, h, _)| h.as_str()).collect();
        if hosts.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let script = self.preflight_script(&wanted)?;
        let hosts: Vec<&str> = hosts.into_iter().collect();
        let mut args = vec![
            format!("--jobid={}", alloc.job),
            "--overlap".into(),
            format!("--nodelist={}", hosts.join(",")),
            format!("--nodes={}", hosts.len()),
            format!("--ntasks={}", hosts.len()),
            "--ntasks-per-node=1".into(),
            "--job-name=pf:preflight".into(),
            "--chdir=/".into(),
            "--input=none".into(),
        ];
        args.extend(self.config.srun_args.iter().cloned());
        args.extend([self.config.shell.clone(), "-c".into(), script]);
        let (_, out, err) = alloc.slurm.output("srun", &args).await?;
        let lines: Vec<&str> = out
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix("PRLFLOW "))
            .collect();
        let done: BTreeSet<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("preflight done "))
            .collect();
        let silent: Vec<&str> = hosts
            .iter()
            .copied()
            .filter(|h| !done.contains(h))
            .collect();
        if !silent.is_empty() {
            return Err(BackendError::new(format!(
                "the preflight step (job {}) did not finish on {}: {}",
                alloc.job,
                silent.join(", "),
                err.trim()
            )));
        }
        let path = match &self.config.prologue {
            Some(_) => " (after `[backend] prologue`)",
            None => " (of a job step; `[backend] prologue` can set it)",
        };
        let mut missing = Vec::new();
        for l in &lines {
            if let Some(host) = l.strip_prefix("prologue-failed ") {
                missing.extend(
                    wanted
                        .iter()
                        .filter(|(_, h, _)| h == host)
                        .map(|(n, _, p)| Missing {
                            node: Some(n.clone()),
                            program: p.clone(),
                            why: "could not be looked for: `[backend] prologue` failed there"
                                .into(),
                        }),
                );
            }
        }
        for (i, why) in read_missing(lines.iter().copied(), path) {
            if let Some((node, _, program)) = wanted.get(i) {
                missing.push(Missing {
                    node: Some(node.clone()),
                    program: program.clone(),
                    why,
                });
            }
        }
        Ok(Some(missing))
    }

    /// The step's script: the prologue (its output dropped), then, on each node, `check`
    /// of that node's programs; every node ends with `preflight done NODE`.
    fn preflight_script(
        &self,
        wanted: &[(String, String, String)],
    ) -> Result<String, BackendError> {
        let q = |s: &str| {
            shlex::try_quote(s)
                .map(|c| c.into_owned())
                .map_err(|_| BackendError::new(format!("`{s}` cannot be passed to a shell")))
        };
        let mut text = String::from("set -u\nset -f\n");
        text.push_str(CHECK_SH);
        text.push_str("node_=${SLURMD_NODENAME:-$(hostname)}\n");
        if let Some(p) = &self.config.prologue {
            text.push_str(&format!(
                "if ! {{\n{p}\n}} </dev/null >/dev/null 2>&1; then printf 'PRLFLOW prologue-failed %s\\n' \"$node_\"; printf 'PRLFLOW preflight done %s\\n' \"$node_\"; exit 0; fi\n"
            ));
        }
        let mut by_host: BTreeMap<&str, Vec<(usize, &str)>> = BTreeMap::new();
        for (i, (_, host, program)) in wanted.iter().enumerate() {
            by_host.entry(host).or_default().push((i, program));
        }
        text.push_str("case $node_ in\n");
        for (host, progs) in by_host {
            text.push_str(&format!("{})\n", q(host)?));
            for (i, p) in progs {
                text.push_str(&format!("\tcheck {i} {}\n", q(p)?));
            }
            text.push_str("\t;;\n");
        }
        text.push_str("esac\nprintf 'PRLFLOW preflight done %s\\n' \"$node_\"\n");
        Ok(text)
    }
}
