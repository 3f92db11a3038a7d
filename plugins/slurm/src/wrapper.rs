//! The shell wrapper every step runs: it names its step in a file, runs the site's prologue,
//! gives the command its GPU slice, then runs the command (a one-shot under a trap that
//! leaves its exit status), in the run dir (srun's `--chdir`) or in the directory the spawn
//! spec names.

use std::path::Path;

use crate::{STATUS_FILE, STEP_FILE};

/// The variable a step's GPU slice travels in: SLURM sets `CUDA_VISIBLE_DEVICES` for a step
/// itself (every GPU of the job on the node), after the environment srun passes on, so a
/// rank's own slice would be lost. The wrapper applies it last: each index picks that entry
/// of the list SLURM gave the step (its GPUs may be numbered `4,5,6,7`), or is the GPU
/// itself when SLURM gave none.
pub(crate) const GPU_SLICE_VAR: &str = "PRL_FLOW_GPU_SLICE";

const GPU_SLICE: &str = r#"if [ -n "${PRL_FLOW_GPU_SLICE:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    _all=$CUDA_VISIBLE_DEVICES; _pick=
    for _i in $(echo "$PRL_FLOW_GPU_SLICE" | tr ',' ' '); do
      _n=0; _g=
      for _d in $(echo "$_all" | tr ',' ' '); do [ "$_n" = "$_i" ] && _g=$_d; _n=$((_n + 1)); done
      [ -n "$_g" ] || { echo "prl-flow: this step sees the GPUs $_all; the rank's GPU $_i is not among them" >&2; exit 1; }
      _pick=${_pick:+$_pick,}$_g
    done
    CUDA_VISIBLE_DEVICES=$_pick
  else
    CUDA_VISIBLE_DEVICES=$PRL_FLOW_GPU_SLICE
  fi
  export CUDA_VISIBLE_DEVICES
  unset PRL_FLOW_GPU_SLICE _all _pick _i _n _g _d
fi
"#;

/// The wrapper a step runs: `SHELL -c SCRIPT RUN_DIR [CWD] ARGV...` (the run dir is `$0`,
/// and `cwd`, when given, `$1`, so no path is ever quoted into the script). The step file
/// holds `JOB.STEP NODE PID ATTEMPT`, `attempt` naming the spawn's attempt exactly (a
/// number). With a `cwd`, the command starts there, after the prologue; the step and
/// exit-status files stay in the run dir.
pub(crate) fn wrap(
    shell: &str,
    prologue: Option<&str>,
    argv: &[String],
    run_dir: &Path,
    cwd: Option<&Path>,
    service: bool,
    attempt: u64,
) -> Vec<String> {
    let mut script = format!(
        "printf '%s %s %s %s\\n' \"$SLURM_JOB_ID.$SLURM_STEP_ID\" \"${{SLURMD_NODENAME:-}}\" \"$$\" {attempt} > \"$0/{STEP_FILE}.tmp\" && mv -f \"$0/{STEP_FILE}.tmp\" \"$0/{STEP_FILE}\"\n"
    );
    if !service {
        script.push_str(&format!("trap 'echo $? > \"$0/{STATUS_FILE}\"' EXIT\n"));
    }
    if let Some(p) = prologue {
        // A group, not a subshell: `source venv/bin/activate` must reach the command.
        script.push_str(&format!(
            "{{\n{p}\n}} || {{ s=$?; echo \"prl-flow: the step prologue failed with status $s\" >&2; exit $s; }}\n"
        ));
    }
    script.push_str(GPU_SLICE);
    if cwd.is_some() {
        script.push_str(
            "cd \"$1\" || { echo \"prl-flow: cannot enter $1, where the task is to start\" >&2; exit 1; }\nshift\n",
        );
    }
    script.push_str(if service { "exec \"$@\"\n" } else { "\"$@\"\n" });
    let mut v = vec![
        shell.to_string(),
        "-c".to_string(),
        script,
        run_dir.to_string_lossy().into_owned(),
    ];
    v.extend(cwd.map(|c| c.to_string_lossy().into_owned()));
    v.extend(argv.iter().cloned());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handles::read_status;

    #[test]
    fn the_wrapper_names_its_step_then_runs_the_prologue_then_the_command() {
        let run = Path::new("/r");
        let argv = vec!["echo".to_string(), "a b".to_string()];
        let w = wrap("sh", Some("module load cuda"), &argv, run, None, false, 7);
        assert_eq!(&w[..2], ["sh", "-c"]);
        assert_eq!(&w[3..], ["/r", "echo", "a b"]);
        let s = &w[2];
        let (step, trap, prologue, run_it) = (
            s.find(STEP_FILE).expect("step file"),
            s.find("trap").expect("trap"),
            s.find("module load cuda").expect("prologue"),
            s.rfind("\"$@\"").expect("command"),
        );
        assert!(step < trap && trap < prologue && prologue < run_it, "{s}");
        assert!(!s.contains("exec \"$@\""), "a one-shot is waited for: {s}");
        let svc = wrap("sh", None, &argv, run, None, true, 7);
        assert!(
            svc[2].ends_with("exec \"$@\"\n") && !svc[2].contains("trap"),
            "{}",
            svc[2]
        );
    }

    #[tokio::test]
    async fn the_wrapper_runs_under_sh() {
        // Without SLURM: the step file then holds `.` fields; the rest works the same.
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            "echo \"$GREETING\"; exit 3".to_string(),
        ];
        let w = wrap(
            "sh",
            Some("GREETING=hello; export GREETING"),
            &argv,
            dir.path(),
            None,
            false,
            7,
        );
        let out = tokio::process::Command::new(&w[0])
            .args(&w[1..])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
        assert_eq!(read_status(&dir.path().join(STATUS_FILE)), Some(3));
        assert!(dir.path().join(STEP_FILE).exists());

        let failing = wrap("sh", Some("false"), &argv, dir.path(), None, true, 7);
        let out = tokio::process::Command::new(&failing[0])
            .args(&failing[1..])
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("prologue failed"));
    }

    /// A rank's GPU slice picks from the GPUs SLURM gave the step, or stands alone.
    #[tokio::test]
    async fn the_gpu_slice_is_applied_after_slurm_set_the_steps_gpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            "echo \"$CUDA_VISIBLE_DEVICES ${PRL_FLOW_GPU_SLICE:-gone}\"".to_string(),
        ];
        let w = wrap("sh", None, &argv, dir.path(), None, false, 7);
        let run = |env: &[(&str, &str)]| {
            let mut c = std::process::Command::new(&w[0]);
            c.args(&w[1..]).env_remove("CUDA_VISIBLE_DEVICES");
            for (k, v) in env {
                c.env(k, v);
            }
            c.output().expect("run")
        };
        for (env, want) in [
            (
                &[(GPU_SLICE_VAR, "2,3"), ("CUDA_VISIBLE_DEVICES", "4,5,6,7")][..],
                "6,7 gone",
            ),
            (&[(GPU_SLICE_VAR, "2,3")][..], "2,3 gone"),
            (&[("CUDA_VISIBLE_DEVICES", "4,5")][..], "4,5 gone"),
        ] {
            let out = run(env);
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{env:?}");
        }
        let out = run(&[(GPU_SLICE_VAR, "2"), ("CUDA_VISIBLE_DEVICES", "0,1")]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("GPU 2 is not among them"));
    }

    #[tokio::test]
    async fn with_a_cwd_the_command_starts_there_and_the_files_stay_in_the_run_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work dir");
        std::fs::create_dir(&work).expect("work dir");
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            "pwd; exit 4".to_string(),
        ];
        let w = wrap("sh", Some("cd /"), &argv, dir.path(), Some(&work), false, 7);
        let out = tokio::process::Command::new(&w[0])
            .args(&w[1..])
            .current_dir(dir.path())
            .output()
            .await
            .expect("run");
        assert_eq!(out.status.code(), Some(4));
        let pwd = String::from_utf8_lossy(&out.stdout);
        assert_eq!(Path::new(pwd.trim()), work);
        assert_eq!(read_status(&dir.path().join(STATUS_FILE)), Some(4));
        assert!(dir.path().join(STEP_FILE).exists());

        let missing = dir.path().join("missing");
        let w = wrap("sh", None, &argv, dir.path(), Some(&missing), false, 7);
        let out = std::process::Command::new(&w[0])
            .args(&w[1..])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot enter"));
    }
}
