//! One recipe, unchanged, at two sites: a site file says which backend a recipe that names
//! none runs on. Site A runs it on the built-in local backend; site B through the example
//! site plugin (`examples/plugins/prl-flow-backend-wrapped`), which starts every process
//! behind the site's wrapper. Both bring the deployment up with the real router, answer a
//! completion through it, and leave nothing running after `down`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

/// A single-node recipe with no `[backend]`: where it runs is the site's business.
fn recipe(router: u16, backend: u16, metrics: u16) -> String {
    format!(
        r#"[inference]
model = "Qwen/Qwen3-0.6B"

[inference.parallel]
tp = 1
dp = 1

[inference.deployment]
type = "single_node"
gpus_per_node = 1
router_port = {router}
backend_port = {backend}
router_metrics_port = {metrics}
ready_timeout = "60s"

[inference.vllm_extra]
max_model_len = 4096
"#
    )
}

fn environ(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

/// Brings the recipe up with `site`, checks it answers, returns the engine's environment,
/// then takes it down and checks nothing of it runs.
fn up_and_down(sb: &Sandbox, site: &str, st: &str, router: u16) -> String {
    sb.track_state_dir(st);
    let out = sb.run(&[
        "-q",
        "--site",
        site,
        "run",
        "recipe.toml",
        "--engine",
        "mock",
        "--state-dir",
        st,
    ]);
    out.expect_code(0);
    let url = format!("http://127.0.0.1:{router}/v1/completions");
    let (code, body) = http(
        "POST",
        &url,
        Some(&json!({"model": "Qwen/Qwen3-0.6B", "prompt": "hi", "max_tokens": 4})),
    )
    .expect("the router answers");
    assert_eq!(code, 200, "{body}");
    let engine = pid_of(&sb.join(st), "engine[0].rank[0]").expect("the engine's pid");
    let env = environ(engine);
    sb.run(&["down", "--state-dir", st]).expect_code(0);
    wait_gone("the engine", engine);
    assert!(
        processes_under(&sb.join(st)).is_empty(),
        "nothing of the deployment runs after `down`"
    );
    env
}

#[test]
fn one_recipe_runs_unchanged_at_two_sites() {
    if router_or_skip().is_none() {
        return;
    }
    let sb = Sandbox::new();
    let base = free_port_block(3);
    let (router, backend, metrics) = (base, base + 1, base + 2);
    sb.write("recipe.toml", &recipe(router, backend, metrics));
    sb.write("site-a.toml", "name = \"a\"\n[backend]\ntype = \"local\"\n");
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/plugins/prl-flow-backend-wrapped")
        .display()
        .to_string();
    sb.write(
        "site-b.toml",
        &format!(
            "name = \"b\"\n[backend]\ntype = \"wrapped\"\nplugin = \"{plugin}\"\nsite = \"b\"\nwrapper = [\"env\", \"SITE_B=1\"]\n"
        ),
    );

    let a = up_and_down(&sb, "site-a.toml", "st-a", router);
    assert!(
        !a.contains("SITE_WRAPPED=1"),
        "site A runs processes itself"
    );

    let b = up_and_down(&sb, "site-b.toml", "st-b", router);
    assert!(
        b.contains("SITE_WRAPPED=1") && b.contains("SITE_B=1"),
        "site B starts the engine through its plugin and wrapper:\n{b}"
    );
    // The journal of site B names the plugin, so `status` and `down` found it again.
    let recs = records(&sb.join("st-b"));
    assert_eq!(recs["engine[0].rank[0]"]["handle"]["backend"], "wrapped");
}

#[test]
fn validate_names_the_site_backend() {
    let sb = Sandbox::new();
    sb.write("recipe.toml", &recipe(8000, 8100, 29000));
    sb.write("site-a.toml", "[backend]\ntype = \"local\"\n");
    let out = output_within(
        {
            let mut c = sb.cmd(&["--site", "site-a.toml", "validate", "recipe.toml"]);
            c.env_remove("PRL_FLOW_SITE");
            c
        },
        Duration::from_secs(30),
    );
    out.expect_code(0);
    assert!(out.stdout.contains("backend `local`"), "{}", out.stdout);
    let bad = sb.run(&["--site", "nosuch.toml", "validate", "recipe.toml"]);
    bad.expect_code(2);
}

#[test]
fn an_ssh_recipe_needing_more_nodes_than_hosts_is_refused_at_validate() {
    let sb = Sandbox::new();
    sb.write(
        "r.toml",
        "[inference]\nmodel = \"m\"\n[inference.parallel]\ntp = 1\ndp = 1\n\
         [inference.deployment]\ntype = \"multi_node\"\nnum_nodes = 3\ngpus_per_node = 1\n\
         [backend]\ntype = \"ssh\"\nhosts = [\"a\", \"b\"]\n",
    );
    let out = sb.run(&["validate", "r.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains(
            "r.toml:12:9: `backend.hosts`: the recipe needs 3 nodes but 2 hosts are given"
        ),
        "{}",
        out.stderr
    );
    assert!(!sb.join(".prl-flow").exists(), "nothing was started");
}
