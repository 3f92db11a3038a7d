//! Remembered options, end to end with the real `prl-flow`, the real vllm-router and the mock
//! engine: a run records the options that change what runs (`options.json` beside the
//! journal), and `run --resume`, `status -v` and the commands prl-flow suggests use them when
//! none are given. An option given again with another value is named by `--explain`.
//!
//! Each test fills `tests/fixtures/local/single_node.toml` with ports from the OS and works in
//! its own [`Sandbox`] with `--state-dir st`; the sandbox stops what is left when it ends.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use common::{
    alive, free_port_block, mock_engine, output_within, pid_of, records, router_or_skip, Out,
    Sandbox, COMMAND_DEADLINE,
};

const FILE: &str = "single_node.toml";
const ENGINE: &str = "engine[0].rank[0]";

/// `single_node.toml` in a new sandbox, with free ports and the mock's `PRL_MOCK_FAIL`.
fn sandbox(fail: &str) -> Sandbox {
    let sb = Sandbox::new();
    let ports = [
        ("ROUTER_PORT", free_port_block(1)),
        ("BACKEND_PORT", free_port_block(2)),
        ("METRICS_PORT", free_port_block(1)),
    ]
    .map(|(k, p)| (k, p.to_string()));
    let mut vars: Vec<(&str, &str)> = ports.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend([("READY_TIMEOUT", "1m"), ("DELAY", ""), ("FAIL", fail)]);
    sb.fixture_from("local", FILE, FILE, &vars);
    sb
}

/// The pid of every service the journal of `st` records with one, by id.
fn service_pids(sb: &Sandbox) -> BTreeMap<String, i32> {
    let st = sb.join("st");
    records(&st)
        .into_iter()
        .filter(|(_, r)| r["service"] == true)
        .filter_map(|(id, _)| Some((id.clone(), pid_of(&st, &id)?)))
        .collect()
}

/// `--explain` lines by task id: (word, reason).
fn explained(stdout: &str) -> BTreeMap<String, (String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let word = words.next()?.to_string();
            let id = words.next()?.to_string();
            let why = words.collect::<Vec<_>>().join(" ");
            matches!(word.as_str(), "run" | "keep" | "adopt").then_some((id, (word, why)))
        })
        .collect()
}

#[track_caller]
fn assert_all_kept(out: &Out) {
    let all = explained(&out.stdout);
    assert!(!all.is_empty(), "nothing explained:\n{}", out.stdout);
    for (id, (word, why)) in &all {
        assert_eq!(word, "keep", "`{id}`: {word} {why}\n{}", out.stdout);
    }
}

#[test]
fn a_resume_without_options_keeps_the_mock_engine_and_a_changed_engine_is_named() {
    if router_or_skip().is_none() {
        return;
    }
    let sb = sandbox("");
    let out = sb.run(&["run", FILE, "--engine", "mock", "--state-dir", "st"]);
    out.expect_code(0);
    // `down` needs no options: it finds them in the state dir.
    assert!(
        out.stderr.contains(&format!(
            "stop them with `prl-flow down {FILE} --state-dir st`"
        )),
        "{}",
        out.stderr
    );
    let recorded: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sb.join("st/options.json")).expect("options.json"),
    )
    .expect("options json");
    assert_eq!(recorded["engine"], "mock", "{recorded}");
    let pids = service_pids(&sb);
    assert!(
        pids.contains_key(ENGINE) && pids.contains_key("router"),
        "{pids:?}"
    );

    // A fresh run is refused, and the resume it suggests carries the remembered engine.
    let out = sb.run(&["run", FILE, "--state-dir", "st"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains(&format!(
            "`prl-flow run {FILE} --state-dir st --engine mock --resume`"
        )),
        "{}",
        out.stderr
    );

    // The resume without `--engine` keeps everything: the same processes.
    let out = sb.run(&["run", FILE, "--state-dir", "st", "--resume", "--explain"]);
    out.expect_code(0);
    assert_all_kept(&out);
    assert_eq!(service_pids(&sb), pids);
    assert!(pids.values().all(|&p| alive(p)), "{pids:?}");

    // `status -v` sees no change either.
    let out = sb.run(&["status", FILE, "--state-dir", "st", "-v"]);
    out.expect_code(0);
    let (_, resume) = out
        .stdout
        .split_once("what `run --resume` would do:")
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(!resume.contains(" changed"), "{}", out.stdout);
    assert_all_kept(&Out {
        code: out.code,
        stdout: resume.to_string(),
        stderr: out.stderr.clone(),
    });

    // Another engine, given on resume: a change, named, and said on stderr. A `vllm` on PATH
    // that runs the mock stands in for the real one.
    let bin = sb.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let vllm = bin.join("vllm");
    std::fs::write(
        &vllm,
        format!(
            "#!/bin/sh\n[ \"$1\" = serve ] && shift\nexec '{}' \"$@\"\n",
            mock_engine()
        ),
    )
    .expect("write vllm");
    std::fs::set_permissions(&vllm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = sb.cmd(&[
        "run",
        FILE,
        "--state-dir",
        "st",
        "--resume",
        "--engine",
        "vllm",
        "--explain",
    ]);
    cmd.env("PATH", &path);
    let out = output_within(cmd, COMMAND_DEADLINE);
    out.expect_code(0);
    let all = explained(&out.stdout);
    let (word, why) = &all[ENGINE];
    assert_eq!(
        (word.as_str(), why.as_str()),
        ("run", "changed (--engine: mock → real)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("note: --engine differs from the last run (mock → real)"),
        "{}",
        out.stderr
    );
    assert_ne!(pid_of(&sb.join("st"), ENGINE), pids.get(ENGINE).copied());

    // Now `real` is remembered: a resume without options keeps it.
    let mut cmd = sb.cmd(&["run", FILE, "--state-dir", "st", "--resume", "--explain"]);
    cmd.env("PATH", &path);
    let out = output_within(cmd, COMMAND_DEADLINE);
    out.expect_code(0);
    assert_all_kept(&out);

    sb.run(&["down", FILE, "--state-dir", "st"]).expect_code(0);
}

#[test]
fn a_failed_run_suggests_the_resume_with_its_options_and_the_resume_reuses_them() {
    if router_or_skip().is_none() {
        return;
    }
    let sb = sandbox("start");
    let out = sb.run(&["run", FILE, "--engine", "mock", "--state-dir", "st"]);
    out.expect_code(1);
    let hint = format!("`prl-flow run {FILE} --state-dir st --engine mock --resume`");
    assert!(out.stderr.contains(&hint), "{}", out.stderr);

    // The suggested resume, without `--engine`: the mock engine runs again (and fails as
    // asked), not `vllm`.
    let out = sb.run(&["run", FILE, "--state-dir", "st", "--resume"]);
    out.expect_code(1);
    assert!(out.stderr.contains(&hint), "{}", out.stderr);
    assert!(!out.stderr.contains("vllm: not found"), "{}", out.stderr);
    let log = std::fs::read_to_string(sb.join("st/logs").join(format!("{ENGINE}.log")))
        .unwrap_or_default();
    assert!(log.contains("PRL_MOCK_FAIL"), "{log}");
}
