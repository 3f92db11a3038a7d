//! The `register` action's repair path against the real `vllm-router` (0.1.17): in regular
//! mode, `register` adds each worker the router does not list (`POST /add_worker`). A
//! bring-up never needs it (the router starts with `--worker-urls`), so this test takes a
//! worker away from a running router (`POST /remove_worker`) and has `run --resume` run
//! `register` again, then asks the router (`GET /list_workers`) and sends a completion.
//!
//! The deployment is `tests/fixtures/local/single_node.toml` with `--engine mock`, ports from
//! the OS, in its own [`Sandbox`]; the sandbox stops whatever is left when the test ends.

mod common;

use std::io::Write;

use common::{free_port_block, http, records, router_or_skip, router_workers, status_of, Sandbox};
use serde_json::{json, Value};

const REGISTER: &str = prl_flow::actions::Action::Register.name();

/// Guards `register`'s repair path (`add_worker` in `src/actions/router.rs`): a router that
/// lost a worker gets it back when `register` runs again. Broken, the router would still
/// list no worker after the resume, and the completion through it would fail.
#[test]
fn resume_reregisters_a_worker_the_router_lost() {
    if router_or_skip().is_none() {
        return;
    }
    let sb = Sandbox::new();
    let router_port = free_port_block(1).to_string();
    let backend_port = free_port_block(1).to_string();
    let metrics_port = free_port_block(1).to_string();
    sb.fixture_from(
        "local",
        "single_node.toml",
        "single_node.toml",
        &[
            ("ROUTER_PORT", &router_port),
            ("BACKEND_PORT", &backend_port),
            ("METRICS_PORT", &metrics_port),
            ("READY_TIMEOUT", "1m"),
            ("DELAY", ""),
            ("FAIL", ""),
        ],
    );
    let run = |extra: &[&str]| {
        let mut args = vec![
            "-q",
            "run",
            "single_node.toml",
            "--engine",
            "mock",
            "--state-dir",
            "st",
        ];
        args.extend_from_slice(extra);
        sb.run(&args)
    };
    run(&[]).expect_code(0);
    let st = sb.join("st");
    let router = format!("http://127.0.0.1:{router_port}");
    let workers = router_workers(&router);
    assert_eq!(
        workers.len(),
        1,
        "one engine behind the router: {workers:?}"
    );
    let worker = workers[0].clone();
    let pids_before: Vec<(String, Value)> = records(&st)
        .into_iter()
        .filter(|(id, _)| id != REGISTER)
        .map(|(id, r)| (id, r["handle"].clone()))
        .collect();

    // The router loses the worker.
    let url = format!("{router}/remove_worker?url={worker}");
    let (status, text) = http("POST", &url, None).unwrap_or_else(|e| panic!("{e}"));
    assert!((200..300).contains(&status), "POST {url}: {status} {text}");
    assert_eq!(router_workers(&router), Vec::<String>::new());

    // `register`'s record says it failed (as after a run in which the router refused it),
    // so the resume runs it again and keeps everything else. The journal's last line for an
    // id wins.
    let mut rec = records(&st)
        .remove(REGISTER)
        .expect("a record of `register`");
    assert_eq!(rec["status"], "done", "{rec}");
    rec["status"] = json!("failed");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(st.join("journal.log"))
        .expect("open the journal log");
    writeln!(log, "{rec}").expect("append to the journal log");
    drop(log);

    let out = run(&["--resume", "--explain"]);
    out.expect_code(0);
    let reran: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("run "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        reran.contains(&REGISTER),
        "`{REGISTER}` runs again:\n{}",
        out.stdout
    );
    assert_eq!(status_of(&st, REGISTER).as_deref(), Some("done"));
    // The engine and the router are the same processes: only `register` repaired the list.
    let recs = records(&st);
    for (id, handle) in &pids_before {
        if handle.is_object() && id != "health-probe" {
            assert_eq!(
                &recs[id]["handle"], handle,
                "`{id}` was kept:\n{}",
                out.stdout
            );
        }
    }
    assert_eq!(router_workers(&router), [worker]);
    let body = json!({ "model": "Qwen/Qwen3-0.6B", "prompt": "back again", "max_tokens": 8 });
    let url = format!("{router}/v1/completions");
    let (status, text) = http("POST", &url, Some(&body)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "POST {url}: {text}");

    sb.run(&["down", "--state-dir", "st"]).expect_code(0);
}
