//! Hostile and mistaken input through the real binary and a real shell: names and task ids
//! that would be paths elsewhere, values that would vanish or fail only at a spawn, an
//! unknown backend, shell quoting of every value that reaches a shell, and secrets kept out
//! of `plan` and out of everything prl-flow writes.

mod common;

use std::path::Path;
use std::process::Command;

use common::Sandbox;

/// `validate FILE` (and `run FILE`) exit 2 and say each of `says`; nothing is started.
fn refused(sb: &Sandbox, file: &str, says: &[&str]) {
    for args in [
        &["validate", file][..],
        &["run", file, "--state-dir", "st"][..],
    ] {
        let cmd = args[0];
        let out = sb.run(args);
        out.expect_code(2);
        for s in says {
            assert!(
                out.stderr.contains(s),
                "{cmd} {file}: expected `{s}` in:\n{}",
                out.stderr
            );
        }
        assert!(
            !sb.join("st").exists(),
            "{cmd} {file}: a refused file made its state dir"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Names and task ids are safe path parts.

#[test]
fn a_name_that_is_a_path_is_refused_and_makes_nothing_outside() {
    let sb = Sandbox::new();
    let escape = format!("prl-flow-escape-{}", std::process::id());
    // `.prl-flow/../../NAME` is the sandbox's parent.
    let outside = sb.path().parent().expect("parent").join(&escape);
    sb.write(
        "up.toml",
        &format!("name = \"../../{escape}\"\n[[task]]\nid = \"a\"\nrun = \"true\"\n"),
    );
    sb.write(
        "abs.toml",
        "name = \"/tmp/prl-flow-absolute\"\n[inference]\nmodel = \"m\"\n",
    );
    for (file, at) in [("up.toml", "up.toml:1:8"), ("abs.toml", "abs.toml:1:8")] {
        let out = sb.run(&["run", file]);
        out.expect_code(2);
        for s in [
            at,
            "cannot name a state dir",
            "letters, digits, `-`, `_` and `.`",
        ] {
            assert!(out.stderr.contains(s), "{file}: `{s}` in:\n{}", out.stderr);
        }
        assert!(!sb.join(".prl-flow").exists(), "{file}: made .prl-flow");
    }
    assert!(!outside.exists(), "a journal was written outside .prl-flow");
}

#[test]
fn a_task_id_that_is_a_path_is_refused() {
    let sb = Sandbox::new();
    sb.write(
        "dots.toml",
        "[[task]]\nid = \"..\"\nrun = \"true\"\n\n[[task]]\nid = \"a/b\"\nrun = \"true\"\n",
    );
    refused(
        &sb,
        "dots.toml",
        &[
            "dots.toml:2:6",
            "task id `..` cannot name the task's log and run dir: it starts with `.`",
            "dots.toml:6:6",
            "task id `a/b`",
            "holds a `/`",
        ],
    );
    // The same rule for a recipe's own tasks.
    sb.write(
        "recipe.toml",
        "[inference]\nmodel = \"m\"\n\n[[task]]\nid = \".hidden\"\nrun = \"true\"\n",
    );
    refused(
        &sb,
        "recipe.toml",
        &["recipe.toml:5:6", "task id `.hidden`"],
    );
}

// ---------------------------------------------------------------------------------------
// What used to pass `validate` and fail only at `run`.

#[test]
fn validate_catches_what_would_fail_at_run_with_places() {
    let sb = Sandbox::new();
    sb.write(
        "nul.toml",
        "[inference]\nmodel = \"Qwen/Qwen3\\u0000-0.6B\"\n",
    );
    refused(
        &sb,
        "nul.toml",
        &["nul.toml:2:9", "`inference.model` holds a NUL character"],
    );

    sb.write(
        "blank.toml",
        "[inference]\nmodel = \"m\"\n[inference.vllm_extra]\ntokenizer = \"  \"\nrevision = \"main\"\n",
    );
    refused(
        &sb,
        "blank.toml",
        &[
            "blank.toml:4:13",
            "`inference.vllm_extra.tokenizer` has an empty or blank value",
            "shift the next flag into its place",
        ],
    );

    sb.write(
        "probe.toml",
        "[[task]]\nid = \"s\"\nrun = \"sleep 1\"\nservice = true\nready = { http = \"::::\" }\n",
    );
    refused(
        &sb,
        "probe.toml",
        &[
            "probe.toml:5:18",
            "`ready.http` of task `s` is not an http URL",
            "http://127.0.0.1:8000/health",
        ],
    );

    sb.write(
        "backend.toml",
        "[inference]\nmodel = \"m\"\n\n[backend]\ntype = \"locl\"\n",
    );
    refused(
        &sb,
        "backend.toml",
        &[
            "backend.toml:5:8",
            "no backend `locl`",
            "did you mean `local`?",
            "local, ssh, slurm",
        ],
    );
}

#[test]
fn every_problem_of_a_recipe_is_said_at_once_backend_included() {
    let sb = Sandbox::new();
    sb.write(
        "all.toml",
        "name = \"../x\"\n[inference]\nmodel = \"m\\u0000\"\n[inference.vllm_extra]\ntokenizer = \"\"\n[backend]\ntype = \"locl\"\n",
    );
    let out = sb.run(&["validate", "all.toml"]);
    out.expect_code(2);
    for at in [
        "all.toml:1:8",
        "all.toml:3:9",
        "all.toml:5:13",
        "all.toml:7:8",
    ] {
        assert!(out.stderr.contains(at), "`{at}` in:\n{}", out.stderr);
    }
    assert!(out.stderr.contains("4 problems"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------
// Shell quoting: a value comes back from a real `sh` as written, and runs nothing.

/// Values a shell must not read as code.
fn hostile(marker: &Path) -> Vec<String> {
    let m = marker.display();
    vec![
        format!("x$(touch {m})"),
        format!("x`touch {m}`"),
        format!("x'; touch {m}; echo '"),
        format!("x\"; touch {m}; echo \""),
        format!("x\n touch {m}\n"),
        "it's \\ $HOME * ~".to_string(),
    ]
}

#[test]
fn the_holder_script_keeps_the_deployment_name_one_word() {
    use prl_flow_slurm::templates::{HolderVars, Templates};
    let sb = Sandbox::new();
    let marker = sb.join("pwned");
    // The script ends in `exec sleep infinity`: a `sleep` of our own returns at once.
    sb.write("bin/sleep", "#!/bin/sh\nexit 0\n");
    make_executable(&sb.join("bin/sleep"));
    let path = format!(
        "{}:{}",
        sb.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let t = Templates::load(None).expect("built-in templates");
    for name in hostile(&marker) {
        let script = t
            .holder(&HolderVars {
                deployment: &name,
                nodes: 2,
                partition: "",
                account: "",
                qos: "",
                time: "",
                constraint: "",
                gpus_per_node: 0,
                exclusive: false,
                sbatch_lines: &[],
                agent_program: &name,
                agent_dir: &name,
            })
            .expect("render");
        sb.write("holder.sh", &script);
        let out = Command::new("sh")
            .arg(sb.join("holder.sh"))
            .env("PATH", &path)
            .env("SLURM_JOB_NODELIST", "n[1-2]")
            .output()
            .expect("sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name:?}: {out:?}\n{script}");
        assert_eq!(
            stdout,
            format!(
                "holding 2 node(s) for prl-flow deployment `{name}`: n[1-2]\nprl-flow: {name} is gone: holding the allocation without an agent\n"
            ),
            "{script}"
        );
        assert!(!marker.exists(), "{name:?} ran a command:\n{script}");
    }
}

#[test]
fn the_try_hint_hands_curl_the_model_name_intact() {
    let sb = Sandbox::new();
    let marker = sb.join("pwned");
    for model in hostile(&marker) {
        if model.contains('\n') {
            continue; // a model is one line (validation says so)
        }
        let text = format!(
            "[inference]\nmodel = {}\n",
            toml::Value::String(model.clone())
        );
        let plan = prl_flow::recipe::load(
            "r.toml",
            std::sync::Arc::new(text),
            "r",
            &prl_flow::recipe::Options::default(),
        )
        .expect("plan");
        let hint = prl_flow::recipe::kinds::try_it(&plan, "http://127.0.0.1:8000");
        let command = hint.split_once("try:\n").expect("a try line").1;
        // `curl` prints its arguments, one per NUL, instead of sending anything.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("curl() {{ printf '%s\\0' \"$@\"; }}\n{command}"))
            .output()
            .expect("sh");
        assert!(out.status.success(), "{hint}: {out:?}");
        let args: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split('\0')
            .map(String::from)
            .collect();
        let body = args
            .iter()
            .position(|a| a == "-d")
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("no -d in {args:?}"));
        let json: serde_json::Value = serde_json::from_str(body).expect("the body is JSON");
        assert_eq!(json["model"], model.as_str(), "{hint}");
        assert_eq!(args[1], "http://127.0.0.1:8000/v1/completions");
        assert!(!marker.exists(), "{model:?} ran a command:\n{hint}");
    }
}

fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

// ---------------------------------------------------------------------------------------
// Secrets.

const SECRET: &str = "hf_Zq8sEcReT0nlyF0rTh3Task";

#[test]
fn plan_masks_secret_values_unless_asked() {
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        &format!(
            "[inference]\nmodel = \"m\"\n[inference.deployment]\nenv = {{ HF_TOKEN = \"{SECRET}\", Db_Password = \"{SECRET}\", NCCL_DEBUG = \"INFO\" }}\n[inference.vllm_extra]\napi_key = \"{SECRET}\"\n"
        ),
    );
    for format in ["text", "json"] {
        let out = sb.run(&["plan", "r.toml", "--format", format]);
        out.expect_code(0);
        assert!(
            !out.stdout.contains(SECRET),
            "{format}: the secret shows:\n{}",
            out.stdout
        );
        assert!(out.stdout.contains("***"), "{format}: {}", out.stdout);
        assert!(out.stdout.contains("INFO"), "{format}: {}", out.stdout);
        let shown = sb.run(&["plan", "r.toml", "--format", format, "--show-secrets"]);
        shown.expect_code(0);
        assert_eq!(
            shown.stdout.matches(SECRET).count(),
            3,
            "{format}: {}",
            shown.stdout
        );
    }
}

/// Every file under `dir` (recursively) that holds `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if String::from_utf8_lossy(&bytes).contains(needle) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn a_run_writes_no_secret_value_anywhere() {
    let sb = Sandbox::new();
    // The task checks it got the value, without printing it.
    sb.write(
        "wf.toml",
        &format!(
            "[[task]]\nid = \"use-token\"\nrun = 'case \"$HF_TOKEN\" in hf_*) touch \"$WORK/seen\";; esac; echo used'\nenv = {{ HF_TOKEN = \"{SECRET}\", API_KEY = \"{SECRET}\" }}\n\n[[task]]\nid = \"after\"\nrun = \"echo done\"\nneeds = [\"use-token\"]\n"
        ),
    );
    let out = sb.run(&["-v", "run", "wf.toml", "--state-dir", "st"]);
    out.expect_code(0);
    assert!(sb.join("seen").exists(), "the task did not get its env");
    assert!(!out.stdout.contains(SECRET) && !out.stderr.contains(SECRET));
    for cmd in [
        &["status", "--state-dir", "st", "-v"][..],
        &["logs", "use-token", "--state-dir", "st"][..],
    ] {
        let o = sb.run(cmd);
        assert!(
            !o.stdout.contains(SECRET) && !o.stderr.contains(SECRET),
            "{cmd:?}"
        );
    }
    let found = files_holding(&sb.join("st"), SECRET);
    assert!(found.is_empty(), "the secret is in {found:?}");
    // The journal is there, with its fingerprints: the check looked at real files.
    assert!(sb.join("st/journal.json").exists() || sb.join("st/journal.log").exists());
}
