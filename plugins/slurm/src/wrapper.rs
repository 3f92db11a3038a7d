//! What a step runs on each node: the *dispatcher* (the same for every task of a step) finds
//! its task by node and local task id in the step's task list, takes the task's command and
//! environment from the `.task` file in the task's run dir (and removes it), sends its output
//! to the task's log, names its step in the step file, runs the site's prologue, gives the
//! command its GPU slice, and runs the command, leaving its exit status in the run dir when
//! it ends. One step can so carry many tasks, each with its own argv, env, log and files.

use std::collections::BTreeMap;
use std::path::Path;

use prl_flow_backend::shell::{env_file, quote};
use prl_flow_backend::{BackendError, SpawnSpec};

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

/// The file in a task's run dir that the dispatcher reads (and removes) before it starts the
/// command: the command, the environment (no value is ever on a command line) and where
/// the output goes. Written new, readable by its owner only.
pub(crate) const TASK_FILE: &str = ".task";

/// The task file's text: `_pf_*` settings, the environment as `export` lines (the GPU
/// slice under [`GPU_SLICE_VAR`]) and the command as the positional parameters.
pub(crate) fn task_file(spec: &SpawnSpec) -> Result<String, BackendError> {
    let mut text = format!(
        "_pf_attempt={}\n_pf_log={}\n_pf_cwd={}\n",
        spec.attempt,
        quote(&spec.log.to_string_lossy())?,
        quote(
            &spec
                .cwd
                .as_deref()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        )?,
    );
    let env: BTreeMap<String, String> = spec
        .env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "CUDA_VISIBLE_DEVICES" => (GPU_SLICE_VAR.to_string(), v.clone()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    text.push_str(&env_file(&env)?);
    text.push_str("set --");
    for a in &spec.argv {
        text.push(' ');
        text.push_str(&quote(a)?);
    }
    text.push('\n');
    Ok(text)
}

/// Writes the task file, new (an old one is an earlier attempt's, never started).
pub(crate) fn write_task_file(spec: &SpawnSpec) -> Result<(), BackendError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = task_file(spec)?;
    let path = spec.run_dir.join(TASK_FILE);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| BackendError::new(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The dispatcher: `SHELL -c SCRIPT LIST`. Each line of the list file is `NODE LOCALID
/// RUN_DIR` (the run dir is the rest of the line); the task whose node is this one
/// (`SLURMD_NODENAME`) and whose local id is this task's (`SLURM_LOCALID`) is this task.
/// The step file holds `JOB.STEP NODE PID ATTEMPT`; the PID is the dispatcher's, the
/// command's parent. The dispatcher does not `exec` the command: it waits for it (a TERM
/// for the whole step reaches both; it lets the command end first) and writes its exit
/// status, for a service as for a one-shot, so one task of a step can end while the others
/// run.
pub(crate) fn dispatcher(shell: &str, prologue: Option<&str>) -> Vec<String> {
    let mut script = String::from(
        r#"_pf_me="${SLURMD_NODENAME:-?} ${SLURM_LOCALID:-0} "
_pf_rd=
while IFS= read -r _pf_line; do
  case $_pf_line in "$_pf_me"*) _pf_rd=${_pf_line#"$_pf_me"}; break ;; esac
done < "$0"
[ -n "$_pf_rd" ] || { echo "prl-flow: step ${SLURM_JOB_ID:-?}.${SLURM_STEP_ID:-?} has no task for node ${SLURMD_NODENAME:-?}, local task ${SLURM_LOCALID:-?} (list $0)" >&2; exit 1; }
cd "$_pf_rd" || exit 1
[ -f ./.task ] || { echo "prl-flow: $_pf_rd holds no task file: this task was started already" >&2; exit 1; }
. ./.task || { echo "prl-flow: cannot read the task file in $_pf_rd" >&2; exit 126; }
rm -f ./.task
exec >>"$_pf_log" 2>&1 </dev/null
"#,
    );
    script.push_str(&format!(
        r#"printf '%s %s %s %s\n' "${{SLURM_JOB_ID:-}}.${{SLURM_STEP_ID:-}}" "${{SLURMD_NODENAME:-?}}" "$$" "$_pf_attempt" > "$_pf_rd/{STEP_FILE}.tmp" && mv -f "$_pf_rd/{STEP_FILE}.tmp" "$_pf_rd/{STEP_FILE}"
trap 'echo $? > "$_pf_rd/{STATUS_FILE}"' EXIT
trap : TERM INT HUP
"#
    ));
    if let Some(p) = prologue {
        // A group, not a subshell: `source venv/bin/activate` must reach the command.
        script.push_str(&format!(
            "{{\n{p}\n}} || {{ s=$?; echo \"prl-flow: the step prologue failed with status $s\" >&2; exit $s; }}\n"
        ));
    }
    script.push_str(GPU_SLICE);
    script.push_str(
        "if [ -n \"$_pf_cwd\" ]; then cd \"$_pf_cwd\" || { echo \"prl-flow: cannot enter $_pf_cwd, where the task is to start\" >&2; exit 1; }; fi\nunset _pf_me _pf_line _pf_cwd _pf_log _pf_attempt\n\"$@\"\n",
    );
    vec![shell.to_string(), "-c".to_string(), script]
}

/// The list file of a step: `NODE LOCALID RUN_DIR` per task.
pub(crate) fn task_list<'a>(tasks: impl IntoIterator<Item = (&'a str, usize, &'a Path)>) -> String {
    let mut text = String::new();
    for (node, local, run_dir) in tasks {
        text.push_str(&format!("{node} {local} {}\n", run_dir.display()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handles::read_status;
    use std::path::PathBuf;

    fn spec(run_dir: &Path, argv: &[&str], env: &[(&str, &str)]) -> SpawnSpec {
        SpawnSpec {
            task: "t".into(),
            node: Some("node0".into()),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            files: BTreeMap::new(),
            run_dir: run_dir.to_path_buf(),
            cwd: None,
            log: run_dir.join("log"),
            service: false,
            attempt: 7,
        }
    }

    /// Runs the dispatcher as SLURM would, outside SLURM: node `?`, local task 0.
    fn dispatch(
        prologue: Option<&str>,
        tasks: &[&Path],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        let list_dir = tempfile::tempdir().expect("tempdir");
        let list = list_dir.path().join("list");
        std::fs::write(
            &list,
            task_list(tasks.iter().enumerate().map(|(i, p)| ("n9", i, *p))),
        )
        .expect("list");
        // This node's line is the last: the others are other nodes'.
        let mut text = std::fs::read_to_string(&list).expect("list");
        text.push_str(&format!("? 0 {}\n", tasks[0].display()));
        std::fs::write(&list, text).expect("list");
        let d = dispatcher("sh", prologue);
        let mut c = std::process::Command::new(&d[0]);
        c.args(&d[1..])
            .arg(&list)
            .env_remove("SLURMD_NODENAME")
            .env_remove("SLURM_LOCALID")
            .env_remove("CUDA_VISIBLE_DEVICES");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run")
    }

    #[test]
    fn the_dispatcher_runs_its_task_with_its_env_and_leaves_its_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rd = dir.path().join("run dir");
        std::fs::create_dir(&rd).expect("run dir");
        let s = spec(
            &rd,
            &["sh", "-c", "echo \"$GREETING $HIDDEN\"; exit 3"],
            &[("HIDDEN", "it's $secret")],
        );
        write_task_file(&s).expect("task file");
        let out = dispatch(Some("GREETING=hello; export GREETING"), &[&rd], &[]);
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(rd.join("log")).expect("log"),
            "hello it's $secret\n"
        );
        assert_eq!(read_status(&rd.join(STATUS_FILE)), Some(3));
        // Outside SLURM the step field is `.`: the attempt is the fourth field.
        let step_file = std::fs::read_to_string(rd.join(STEP_FILE)).expect("step file");
        assert_eq!(
            step_file.split_whitespace().nth(3),
            Some("7"),
            "{step_file}"
        );
        assert!(!rd.join(TASK_FILE).exists(), "the task file is gone");
        // A second start of the same task finds no task file: it refuses.
        let out = dispatch(None, &[&rd], &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("started already"));
    }

    #[test]
    fn a_failing_prologue_and_a_missing_cwd_are_said() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rd = dir.path().to_path_buf();
        write_task_file(&spec(&rd, &["true"], &[])).expect("task file");
        let out = dispatch(Some("false"), &[&rd], &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(std::fs::read_to_string(rd.join("log"))
            .expect("log")
            .contains("prologue failed"));
        let mut s = spec(&rd, &["sh", "-c", "pwd"], &[]);
        let work = rd.join("work dir");
        std::fs::create_dir(&work).expect("work");
        s.cwd = Some(work.clone());
        write_task_file(&s).expect("task file");
        let out = dispatch(Some("cd /"), &[&rd], &[]);
        assert_eq!(out.status.code(), Some(0));
        let log = std::fs::read_to_string(rd.join("log")).expect("log");
        assert_eq!(PathBuf::from(log.lines().last().expect("pwd")), work);
        s.cwd = Some(rd.join("missing"));
        write_task_file(&s).expect("task file");
        let out = dispatch(None, &[&rd], &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(std::fs::read_to_string(rd.join("log"))
            .expect("log")
            .contains("cannot enter"));
    }

    #[test]
    fn a_task_without_a_line_in_the_list_is_refused() {
        let list_dir = tempfile::tempdir().expect("tempdir");
        let list = list_dir.path().join("list");
        std::fs::write(&list, "n1 0 /nowhere\n").expect("list");
        let d = dispatcher("sh", None);
        let out = std::process::Command::new(&d[0])
            .args(&d[1..])
            .arg(&list)
            .env("SLURMD_NODENAME", "n2")
            .env("SLURM_LOCALID", "0")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no task for node n2"));
    }

    /// A rank's GPU slice picks from the GPUs SLURM gave the step, or stands alone.
    #[test]
    fn the_gpu_slice_is_applied_after_slurm_set_the_steps_gpus() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rd = dir.path().to_path_buf();
        let argv = [
            "sh",
            "-c",
            "echo \"$CUDA_VISIBLE_DEVICES ${PRL_FLOW_GPU_SLICE:-gone}\"",
        ];
        let run = |slice: Option<&str>, slurm: &[(&str, &str)]| {
            let _ = std::fs::remove_file(rd.join("log"));
            let env: Vec<(&str, &str)> = slice
                .map(|s| ("CUDA_VISIBLE_DEVICES", s))
                .into_iter()
                .collect();
            write_task_file(&spec(&rd, &argv, &env)).expect("task file");
            let out = dispatch(None, &[&rd], slurm);
            (
                out.status.code(),
                std::fs::read_to_string(rd.join("log")).unwrap_or_default(),
            )
        };
        assert_eq!(
            run(Some("2,3"), &[("CUDA_VISIBLE_DEVICES", "4,5,6,7")])
                .1
                .trim(),
            "6,7 gone"
        );
        assert_eq!(run(Some("2,3"), &[]).1.trim(), "2,3 gone");
        assert_eq!(
            run(None, &[("CUDA_VISIBLE_DEVICES", "4,5")]).1.trim(),
            "4,5 gone"
        );
        let (code, log) = run(Some("2"), &[("CUDA_VISIBLE_DEVICES", "0,1")]);
        assert_eq!(code, Some(1));
        assert!(log.contains("GPU 2 is not among them"), "{log}");
    }
}
