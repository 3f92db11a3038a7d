//! Deployments on this machine, end to end: the real `prl-flow` binary, the real
//! `vllm-router` (0.1.17, from the venv `./dev` installs or `PRL_FLOW_ROUTER`), and
//! `prl-flow-mock-engine` in place of `vllm serve` (`--engine mock`).
//!
//! Fixtures are the recipes of `recipes/local/` with every port and the mock's knobs left as
//! `@PLACEHOLDERS@` (`tests/fixtures/local/`). Each test fills them in with ports the OS hands
//! out, so tests run in parallel, and works in its own [`Sandbox`] with `--state-dir st`.
//!
//! What a test started is found by the working directory: the local backend starts every
//! deployment task's process in `STATE_DIR/run/TASK` (and a workflow's task in the sandbox,
//! where its file is), so a live process whose cwd is under `st/` (or the sandbox) belongs
//! to this test, whoever its parent is now (after a `kill -9` of prl-flow, nobody's). That
//! is how "nothing twice" and "nothing left" are counted, against the plan's own count.
//!
//! Waits are on the run's exit, the journal, a log line or a probe, each with a deadline; the
//! sandbox stops whatever is left when a test ends, also when it fails.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    alive, free_port_block, http_with, pid_of, processes_under, records, router_or_skip, status_of,
    wait_until, Out, Proc, Running, Sandbox, COMMAND_DEADLINE, WAIT,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// The `allocate` task's id and kind.
const ALLOCATE: &str = prl_flow::actions::Action::Allocate.name();

const MODEL: &str = "Qwen/Qwen3-0.6B";
/// The model of `wide_ep.toml`: a mixture of experts.
const MOE_MODEL: &str = "Qwen/Qwen3-30B-A3B";

/// The ports of one deployment, each from the OS.
#[derive(Clone, Copy)]
struct Ports {
    router: u16,
    backend: u16,
    metrics: u16,
    nixl: u16,
    rpc: u16,
}

/// A recipe of `tests/fixtures/local/` in a sandbox, with its ports and knobs.
struct Local {
    sb: Sandbox,
    recipe: &'static str,
    ports: Ports,
    knobs: BTreeMap<&'static str, String>,
}

/// Knobs a fixture may hold, with the values they default to (an empty `PRL_MOCK_*` is unset).
const KNOBS: &[(&str, &str)] = &[
    ("READY_TIMEOUT", "1m"),
    ("DELAY", ""),
    ("FAIL", ""),
    ("PREFILL_DELAY", ""),
    ("PREFILL_FAIL", ""),
    ("DECODE_DELAY", ""),
    ("DECODE_FAIL", ""),
];

/// The router is needed by every test that gets past the engines. Without it the test is
/// skipped, loudly, or fails when `PRL_FLOW_TEST_REQUIRE_ALL` is set (`./dev test` sets it
/// and installs the router).
#[track_caller]
fn have_router() -> bool {
    router_or_skip().is_some()
}

impl Local {
    /// `recipe` (`single_node`, `multi_node`, `wide_ep`, `disaggregated`) with free ports and
    /// `knobs` over the defaults, written to `RECIPE.toml` in a new sandbox.
    fn new(recipe: &'static str, knobs: &[(&'static str, &str)]) -> Local {
        let mut all: BTreeMap<&'static str, String> =
            KNOBS.iter().map(|(k, v)| (*k, v.to_string())).collect();
        for (k, v) in knobs {
            assert!(all.contains_key(k), "unknown knob `{k}`");
            all.insert(k, v.to_string());
        }
        let ports = Ports {
            router: free_port_block(1),
            // Up to two ranks on a node: `backend_port + 0` and `+ 1`.
            backend: free_port_block(2),
            // One router: `router_metrics_port + 0`. One rank of tp 1 per P/D node: one
            // side-channel port from `nixl_side_channel_port`.
            metrics: free_port_block(1),
            nixl: free_port_block(1),
            rpc: free_port_block(1),
        };
        let local = Local {
            sb: Sandbox::new(),
            recipe,
            ports,
            knobs: all,
        };
        local.write();
        local
    }

    fn write(&self) {
        let ports = [
            ("ROUTER_PORT", self.ports.router),
            ("BACKEND_PORT", self.ports.backend),
            ("METRICS_PORT", self.ports.metrics),
            ("NIXL_PORT", self.ports.nixl),
            ("RPC_PORT", self.ports.rpc),
        ]
        .map(|(k, p)| (k, p.to_string()));
        let mut vars: Vec<(&str, &str)> = ports.iter().map(|(k, v)| (*k, v.as_str())).collect();
        vars.extend(self.knobs.iter().map(|(k, v)| (*k, v.as_str())));
        let name = format!("{}.toml", self.recipe);
        self.sb.fixture_from("local", &name, &name, &vars);
    }

    /// Changes a knob in the recipe file (an edit between two runs).
    fn set(&mut self, knob: &'static str, value: &str) {
        self.knobs.insert(knob, value.to_string());
        self.write();
    }

    fn file(&self) -> String {
        format!("{}.toml", self.recipe)
    }

    fn st(&self) -> PathBuf {
        self.sb.join("st")
    }

    fn args<'a>(&'a self, file: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["run", file, "--engine", "mock", "--state-dir", "st"];
        args.extend_from_slice(extra);
        args
    }

    /// `prl-flow -q run RECIPE --engine mock --state-dir st EXTRA...`, to its end.
    fn run(&self, extra: &[&str]) -> Out {
        let file = self.file();
        let mut args = vec!["-q"];
        args.extend(self.args(&file, extra));
        self.sb.run(&args)
    }

    /// The same in the background, with plain progress lines in `NAME.stderr`.
    fn spawn(&self, name: &str, extra: &[&str]) -> Running {
        let file = self.file();
        let mut args = vec!["--no-progress"];
        args.extend(self.args(&file, extra));
        self.sb.spawn(name, &args)
    }

    /// (engine processes, router processes) the plan calls for.
    fn planned(&self) -> (usize, usize) {
        let file = self.file();
        let out = self.sb.run(&[
            "plan",
            &file,
            "--engine",
            "mock",
            "--backend",
            "local",
            "--format",
            "json",
        ]);
        out.expect_code(0);
        let plan: Value = serde_json::from_str(&out.stdout).expect("plan json");
        let kinds: Vec<&str> = plan["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .filter_map(|t| t["kind"].as_str())
            .collect();
        let engines = kinds
            .iter()
            .filter(|k| matches!(**k, "engine" | "prefill" | "decode"))
            .count();
        let routers = kinds.iter().filter(|k| **k == "router").count();
        (engines, routers)
    }

    /// The live processes this test's runs started.
    fn processes(&self) -> Vec<Proc> {
        processes_under(&self.st())
    }

    /// (engine processes, router processes) alive now; anything else under the state dir
    /// fails the test.
    fn running(&self) -> (usize, usize) {
        let procs = self.processes();
        let (mut engines, mut routers) = (0, 0);
        for p in &procs {
            if p.cmdline.contains("mock-engine ") {
                engines += 1;
            } else if p.cmdline.starts_with("vllm::router") || p.cmdline.contains("vllm-router") {
                // The router's launcher renames itself `vllm::router` once it runs.
                routers += 1;
            } else {
                panic!("an unexpected process under the state dir: {p:?}\nall: {procs:#?}");
            }
        }
        (engines, routers)
    }

    #[track_caller]
    fn assert_as_planned(&self) {
        let planned = self.planned();
        let running = self.running();
        assert_eq!(
            running,
            planned,
            "(engines, routers) running vs planned; processes:\n{:#?}",
            self.processes()
        );
    }

    #[track_caller]
    fn assert_nothing_runs(&self) {
        let left = self.processes();
        assert!(left.is_empty(), "processes left running:\n{left:#?}");
    }

    fn router_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.router)
    }

    /// The URL of node `k`'s engine.
    fn engine_url(&self, node: usize) -> String {
        format!("http://127.0.0.{}:{}", node + 1, self.ports.backend)
    }

    /// One completion through the router: the text of its first choice.
    #[track_caller]
    fn complete(&self, prompt: &str) -> String {
        self.complete_in(None, prompt)
    }

    /// [`Self::complete`] within a session (`X-Session-ID`), when given.
    #[track_caller]
    fn complete_in(&self, session: Option<&str>, prompt: &str) -> String {
        let url = format!("{}/v1/completions", self.router_url());
        let model = if self.recipe == "wide_ep" {
            MOE_MODEL
        } else {
            MODEL
        };
        let body = json!({ "model": model, "prompt": prompt, "max_tokens": 16 });
        let headers: Vec<(&str, &str)> = session.map(|s| ("X-Session-ID", s)).into_iter().collect();
        let (status, text) =
            http_with("POST", &url, Some(&body), &headers).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "POST {url}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        v.pointer("/choices/0/text")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no text in {text}"))
            .to_string()
    }

    /// The worker URLs the router lists.
    #[track_caller]
    fn router_workers(&self) -> Vec<String> {
        common::router_workers(&self.router_url())
    }

    /// A task's log (`st/logs/TASK.log`).
    fn log(&self, task: &str) -> String {
        std::fs::read_to_string(self.st().join("logs").join(format!("{task}.log")))
            .unwrap_or_default()
    }

    /// How many times prl-flow started a process for `task` (its log marks each start).
    fn starts(&self, task: &str) -> usize {
        let mark = format!("prl-flow: `{task}` starts");
        self.log(task).lines().filter(|l| l.contains(&mark)).count()
    }

    /// `status --state-dir st`: (exit code, the row of each task by id).
    fn status(&self) -> (Option<i32>, BTreeMap<String, String>) {
        let out = self.sb.run(&["status", "--state-dir", "st"]);
        let rows = out
            .stdout
            .lines()
            .skip(1)
            .filter_map(|l| Some((l.split_whitespace().next()?.to_string(), l.to_string())))
            .collect();
        (out.code, rows)
    }

    /// `down --state-dir st`, which must leave nothing running.
    #[track_caller]
    fn down(&self) {
        let out = self.sb.run(&["down", "--state-dir", "st"]);
        out.expect_code(0);
        self.assert_nothing_runs();
    }
}

/// Lines of `--explain` output by task id: (word, reason).
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
fn assert_explained(stdout: &str, id: &str, word: &str, why: &str) {
    let all = explained(stdout);
    let (w, y) = all
        .get(id)
        .unwrap_or_else(|| panic!("`{id}` is not explained:\n{stdout}"));
    assert!(
        w == word && y.starts_with(why),
        "`{id}`: expected `{word} {why}...`, got `{w} {y}`:\n{stdout}"
    );
}

/// Whether the journal records `id` as started (a handle) and still running.
fn in_flight(st: &std::path::Path, id: &str) -> bool {
    records(st)
        .get(id)
        .is_some_and(|r| r["status"] == "running" && r.get("handle").is_some())
}

// ---------------------------------------------------------------------------------------
// 1. every local recipe comes up healthy, answers through the router, and goes down

/// Brings `recipe` up, checks that it is healthy and as planned, runs the recipe's own
/// `check` (answers through the router), then `down`, which must leave nothing running.
fn comes_up_healthy(recipe: &'static str, check: impl FnOnce(&Local)) {
    if !have_router() {
        return;
    }
    let d = Local::new(recipe, &[]);
    let out = d.run(&[]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains(&format!("endpoint: {}", d.router_url())),
        "{}",
        out.stdout
    );
    for (id, r) in records(&d.st()) {
        assert_eq!(r["status"], "done", "`{id}`: {r}");
    }
    // The health probe (router ready, then a real completion through it) passed.
    assert_eq!(status_of(&d.st(), "health-probe").as_deref(), Some("done"));
    let (code, rows) = d.status();
    assert_eq!(code, Some(0), "{rows:#?}");
    for (id, r) in records(&d.st()) {
        if r["service"] != true || r["kind"] == ALLOCATE {
            continue;
        }
        let row = &rows[&id];
        assert!(row.contains(" up "), "{row}");
        // A `--headless` engine has no probe of its own: its head's /health speaks for it.
        if !r["meta"]["ready"].is_null() {
            assert!(row.contains("ready, pid"), "{row}");
        }
    }
    d.assert_as_planned();
    check(&d);
    d.down();
}

#[test]
fn single_node_comes_up_healthy_and_down_leaves_nothing() {
    comes_up_healthy("single_node", |d| {
        let text = d.complete("Hello there");
        let engine = format!("mock@127.0.0.1:{}", d.ports.backend);
        assert!(text.starts_with(&engine), "{text}");
        assert_eq!(d.router_workers(), [d.engine_url(0)]);
    });
}

#[test]
fn multi_node_comes_up_healthy_and_the_router_reaches_both_engines() {
    comes_up_healthy("multi_node", |d| {
        assert_eq!(d.router_workers(), [d.engine_url(0), d.engine_url(1)]);
        // Round robin: a few requests reach both nodes' engines.
        let answered: std::collections::BTreeSet<String> = (0..4)
            .map(|i| {
                let text = d.complete(&format!("request {i}"));
                text.split_whitespace().next().unwrap_or("").to_string()
            })
            .collect();
        let want: std::collections::BTreeSet<String> = (1..=2)
            .map(|n| format!("mock@127.0.0.{n}:{}", d.ports.backend))
            .collect();
        assert_eq!(answered, want);
    });
}

#[test]
fn wide_ep_comes_up_healthy_with_every_rank_behind_the_router() {
    comes_up_healthy("wide_ep", |d| {
        // One replica of 4 ranks over two nodes, each rank its own API server on
        // `backend_port + k`, every one listed by the router.
        let b = d.ports.backend;
        let mut want: Vec<String> = (1..=2)
            .flat_map(|n| (0..2).map(move |k| format!("http://127.0.0.{n}:{}", b + k)))
            .collect();
        let mut workers = d.router_workers();
        want.sort();
        workers.sort();
        assert_eq!(workers, want);
        let text = d.complete("Hello there");
        assert!(text.starts_with("mock@127.0.0."), "{text}");
    });
}

/// One node, two ranks (each an engine of its own) behind a `consistent_hash` router: the
/// router lists both, a session's turns stay on one rank while sessions spread over both,
/// and a killed rank is the one `status` names.
#[test]
fn consistent_hash_keeps_a_session_on_one_rank_and_status_names_a_killed_rank() {
    if !have_router() {
        return;
    }
    let d = Local::new("ranks", &[]);
    let st = d.st();
    d.run(&[]).expect_code(0);
    let b = d.ports.backend;
    assert_eq!(
        d.router_workers(),
        [
            format!("http://127.0.0.1:{b}"),
            format!("http://127.0.0.1:{}", b + 1)
        ]
    );
    // The mock's answer begins with who served it: `mock@HOST:PORT`, one port per rank.
    let who = |session: &str, turn: usize| -> String {
        let text = d.complete_in(Some(session), &format!("turn {turn}"));
        text.split_whitespace().next().unwrap_or("").to_string()
    };
    let mut ranks_used = std::collections::BTreeSet::new();
    for s in 0..24 {
        let session = format!("session-{s}");
        let first = who(&session, 0);
        for turn in 1..4 {
            assert_eq!(
                who(&session, turn),
                first,
                "{session} moved to another rank"
            );
        }
        ranks_used.insert(first);
    }
    assert_eq!(
        ranks_used.len(),
        2,
        "sessions all went to one rank: {ranks_used:?}"
    );

    let victim = "engine[0].rank[1]";
    let pid = pid_of(&st, victim).expect("rank 1's pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    wait_until("the killed rank to be gone", WAIT, || !alive(pid));
    let (code, rows) = d.status();
    assert_eq!(code, Some(1), "{rows:#?}");
    assert!(rows[victim].contains(" down "), "{}", rows[victim]);
    assert!(
        rows["engine[0].rank[0]"].contains(" up "),
        "{}",
        rows["engine[0].rank[0]"]
    );
    d.down();
}

/// `router_host = "0.0.0.0"` (prime-rl's bind): the router listens on every address, its
/// probe on the node's address passes as its own listener, and it serves there.
#[test]
fn a_router_bound_to_every_address_comes_up_and_serves() {
    if !have_router() {
        return;
    }
    let d = Local::new("single_node", &[]);
    let path = d.sb.path().join(d.file());
    let text = std::fs::read_to_string(&path).expect("recipe");
    let text = text.replace(
        "[inference.deployment]\n",
        "[inference.deployment]\nrouter_host = \"0.0.0.0\"\n",
    );
    d.sb.write(d.file(), &text);
    d.run(&[]).expect_code(0);
    // Listening on 0.0.0.0 (`/proc/net/tcp`: address 00000000, state 0A).
    let wildcard = format!("00000000:{:04X}", d.ports.router);
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    assert!(
        tcp.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&wildcard.as_str()) && f.get(3) == Some(&"0A")
        }),
        "no listener on {wildcard}"
    );
    assert!(d.complete("hello").starts_with("mock@127.0.0.1:"));
    d.down();
}

#[test]
fn disaggregated_comes_up_healthy_and_decode_continues_the_prefill() {
    comes_up_healthy("disaggregated", |d| {
        assert_eq!(d.router_workers(), [d.engine_url(0), d.engine_url(1)]);
        assert_pd_answer(d);
    });
}

/// A completion through the P/D router was decoded on node1 from KV blocks prefilled on
/// node0 and handed over through node0's NIXL side channel.
#[track_caller]
fn assert_pd_answer(d: &Local) {
    let text = d.complete("Hello there");
    for s in [
        // Both sides are `kv_both` (as prime-rl configures NIXL): the answer comes from the
        // decode node, continuing what the prefill node computed.
        format!("mock@127.0.0.2:{} role=prefill+decode", d.ports.backend),
        "continued-from-prefill".to_string(),
        format!("at=127.0.0.1:{}", d.ports.nixl),
        format!("first-token=mock@127.0.0.1:{}", d.ports.backend),
        "echo: Hello there".to_string(),
    ] {
        assert!(text.contains(&s), "no `{s}` in the answer: {text}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. kill -9 of `prl-flow run` mid bring-up, then --resume: nothing twice

/// Where in the bring-up the run is killed or interrupted.
#[derive(Clone, Copy, Debug)]
enum Moment {
    /// Both engines started and still loading the model.
    EnginesLoading,
    /// Both engines ready, the router started and not yet ready.
    RouterStarting,
}

const ENGINES: [&str; 2] = ["prefill[0].rank[0]", "decode[0].rank[0]"];

/// A disaggregated deployment whose engines take `delay` to load (so that a bring-up has a
/// middle), started in the background and waited for until `at`.
fn start_disaggregated(name: &str, delay: &str, at: Moment) -> (Local, Running) {
    let d = Local::new(
        "disaggregated",
        &[("PREFILL_DELAY", delay), ("DECODE_DELAY", delay)],
    );
    let run = d.spawn(name, &[]);
    let st = d.st();
    match at {
        Moment::EnginesLoading => wait_until("both engines started and loading", WAIT, || {
            ENGINES.iter().all(|id| in_flight(&st, id))
                && ENGINES
                    .iter()
                    .all(|id| d.log(id).contains("Starting to load model"))
        }),
        Moment::RouterStarting => wait_until("the router started, not ready yet", WAIT, || {
            ENGINES
                .iter()
                .all(|id| status_of(&st, id).as_deref() == Some("done"))
                && in_flight(&st, "router")
        }),
    }
    (d, run)
}

fn kill_9_then_resume_starts_nothing_twice(at: Moment) {
    if !have_router() {
        return;
    }
    // Loading takes long enough for the kill to land in it, short enough for the resume.
    let delay = match at {
        Moment::EnginesLoading => "1500ms",
        Moment::RouterStarting => "",
    };
    let (d, mut first) = start_disaggregated("first", delay, at);
    let st = d.st();
    let engines: Vec<i32> = ENGINES
        .iter()
        .map(|id| pid_of(&st, id).expect("engine pid"))
        .collect();
    let router = pid_of(&st, "router");
    first.kill9();
    // What the killed run started goes on without it.
    for pid in &engines {
        assert!(alive(*pid), "{at:?}: an engine died with prl-flow");
    }
    let still_starting = match at {
        Moment::EnginesLoading => ENGINES.iter().all(|id| in_flight(&st, id)),
        Moment::RouterStarting => in_flight(&st, "router"),
    };

    let out = d.run(&["--resume", "--explain"]);
    out.expect_code(0);
    // What was in flight is adopted (or kept, had it become ready meanwhile), never re-run.
    let decisions = explained(&out.stdout);
    let router_started: &[&str] = match at {
        Moment::EnginesLoading => &[],
        Moment::RouterStarting => &["router"],
    };
    for id in ENGINES.iter().chain(router_started) {
        let (word, why) = &decisions[*id];
        assert!(
            word == "adopt" || word == "keep",
            "{at:?}: `{id}` must not run again: {word} {why}\n{}",
            out.stdout
        );
    }
    if !still_starting {
        eprintln!("note: {at:?}: it became ready before the resume looked; checked as kept");
    } else {
        match at {
            Moment::EnginesLoading => {
                for id in ENGINES {
                    assert_explained(&out.stdout, id, "adopt", "still in flight");
                }
                assert_explained(&out.stdout, "router", "run", "never ran");
            }
            Moment::RouterStarting => {
                assert_explained(&out.stdout, "router", "adopt", "still in flight")
            }
        }
    }
    // The same processes, each started once, and exactly as many as the plan has.
    for (id, pid) in ENGINES.iter().zip(&engines) {
        assert_eq!(pid_of(&st, id), Some(*pid), "{at:?}: `{id}` was replaced");
        assert_eq!(d.starts(id), 1, "{at:?}: `{id}` started twice");
    }
    if let (Moment::RouterStarting, Some(router)) = (at, router) {
        assert_eq!(
            pid_of(&st, "router"),
            Some(router),
            "the router was replaced"
        );
    }
    assert_eq!(d.starts("router"), 1, "{at:?}: the router started twice");
    d.assert_as_planned();
    assert_eq!(status_of(&st, "health-probe").as_deref(), Some("done"));
    assert_pd_answer(&d);
    d.down();
}

#[test]
fn kill_9_while_engines_load_then_resume_starts_nothing_twice() {
    kill_9_then_resume_starts_nothing_twice(Moment::EnginesLoading);
}

#[test]
fn kill_9_while_the_router_starts_then_resume_starts_nothing_twice() {
    kill_9_then_resume_starts_nothing_twice(Moment::RouterStarting);
}

// ---------------------------------------------------------------------------------------
// 3. Ctrl-C mid bring-up stops everything the run started

fn ctrl_c_stops_everything(at: Moment) {
    if matches!(at, Moment::RouterStarting) && !have_router() {
        return;
    }
    // The engines never get to finish loading: the signal comes first.
    let delay = match at {
        Moment::EnginesLoading => "1m",
        Moment::RouterStarting => "",
    };
    let (d, mut run) = start_disaggregated("run", delay, at);
    assert!(!d.processes().is_empty());
    run.signal(Signal::SIGINT);
    let out = run.wait(COMMAND_DEADLINE);
    assert_eq!(out.code, Some(130), "{at:?}:\n{}", out.stderr);
    assert_one_cancelled_line(&out.stderr, "cancelled by SIGINT after ");
    // prl-flow waited for every process it stopped before it exited.
    d.assert_nothing_runs();
    let st = d.st();
    let engines = match at {
        Moment::EnginesLoading => "cancelled",
        Moment::RouterStarting => "stopped",
    };
    for id in ENGINES {
        assert_eq!(
            status_of(&st, id).as_deref(),
            Some(engines),
            "{at:?}: `{id}`"
        );
    }
    let router = status_of(&st, "router");
    match at {
        Moment::EnginesLoading => assert_eq!(router.as_deref(), Some("skipped")),
        // Cancelled while it starts; a router that got ready just before the signal is
        // stopped like the engines. Either way it no longer runs (checked above).
        Moment::RouterStarting => assert!(
            matches!(router.as_deref(), Some("cancelled" | "stopped")),
            "{router:?}"
        ),
    }
    assert_eq!(status_of(&st, "health-probe").as_deref(), Some("skipped"));
}

/// A cancelled run ends with one summary line starting with `head`: no `error:` per task,
/// no help to fix a cause.
#[track_caller]
fn assert_one_cancelled_line(stderr: &str, head: &str) {
    let summary: Vec<&str> = stderr.lines().filter(|l| l.starts_with(head)).collect();
    assert_eq!(summary.len(), 1, "no one `{head}` line in:\n{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(!stderr.contains("help: fix the cause"), "{stderr}");
}

/// `down` from a second process while the engines load aborts the bring-up: the run stops
/// what it started and exits 130 naming the `down`; the `down` exits 0; nothing is left.
#[test]
fn down_while_engines_load_aborts_the_bring_up_and_leaves_nothing() {
    let (d, mut run) = start_disaggregated("run", "1m", Moment::EnginesLoading);
    let down = d.sb.run(&["down", "--state-dir", "st"]);
    down.expect_code(0);
    assert!(
        down.stderr.contains(&format!("(pid {})", run.pid())),
        "{}",
        down.stderr
    );
    let out = run.wait(COMMAND_DEADLINE);
    assert_eq!(out.code, Some(130), "{}", out.stderr);
    assert_one_cancelled_line(&out.stderr, "cancelled by `prl-flow down` (pid ");
    d.assert_nothing_runs();
    // Cancelled by the run; `stopped` once the `down` has looked at it too.
    for id in ENGINES {
        let status = status_of(&d.st(), id);
        assert!(
            matches!(status.as_deref(), Some("cancelled" | "stopped")),
            "`{id}`: {status:?}"
        );
    }
}

/// `--keep`: when one engine fails, the other, still loading, is left running and recorded
/// as running, so a resume adopts it instead of starting it again.
#[test]
fn keep_leaves_a_loading_engine_running_for_a_resume_to_adopt() {
    let d = Local::new(
        "disaggregated",
        &[("PREFILL_DELAY", "1m"), ("DECODE_FAIL", "start")],
    );
    let out = d.run(&["--keep"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("1 service left loading (--keep)"),
        "{}",
        out.stderr
    );
    let st = d.st();
    let prefill = ENGINES[0];
    let pid = pid_of(&st, prefill).expect("the loading engine's pid is recorded");
    assert!(alive(pid), "--keep: the loading engine was stopped");
    assert_eq!(status_of(&st, prefill).as_deref(), Some("running"));
    wait_until("the kept engine still loading", WAIT, || {
        d.log(prefill).contains("Starting to load model")
    });
    // The resume adopts it; the decode engine fails again, which ends this run too.
    let resume = d.run(&["--resume", "--explain"]);
    resume.expect_code(1);
    let (word, _) = &explained(&resume.stdout)[prefill];
    let plan = &resume.stdout;
    assert_eq!(word, "adopt", "{plan}");
    assert_eq!(d.starts(prefill), 1, "the loading engine was started again");
    d.down();
}

#[test]
fn ctrl_c_while_engines_load_stops_them_all() {
    ctrl_c_stops_everything(Moment::EnginesLoading);
}

#[test]
fn ctrl_c_while_the_router_starts_stops_it_and_the_engines() {
    ctrl_c_stops_everything(Moment::RouterStarting);
}

// ---------------------------------------------------------------------------------------
// 4. an engine that cannot start; the fix; a resume of only what it concerns

#[test]
fn engine_that_fails_to_start_is_named_and_resume_reruns_only_it_and_its_dependents() {
    if !have_router() {
        return;
    }
    let mut d = Local::new("disaggregated", &[("PREFILL_FAIL", "start")]);
    let st = d.st();
    let prefill = "prefill[0].rank[0]";
    let decode = "decode[0].rank[0]";

    // A plain run: fails naming the task, its node and the end of its log; stops the rest.
    let failed = d.run(&[]);
    failed.expect_code(1);
    for s in [
        format!("error: task `{prefill}` failed: `{prefill}` on node0 (127.0.0.1) exited with status 1 before it was ready"),
        format!("last lines of {}", st.join("logs").join(format!("{prefill}.log")).display()),
        "EngineCore failed to start.".to_string(),
        format!("RuntimeError: Failed to load model `{MODEL}`: simulated by PRL_MOCK_FAIL=start"),
        format!("`prl-flow run {} --state-dir st --engine mock --resume`", d.file()),
    ] {
        assert!(failed.stderr.contains(&s), "no `{s}` in:\n{}", failed.stderr);
    }
    assert_eq!(status_of(&st, prefill).as_deref(), Some("failed"));
    assert_eq!(status_of(&st, "router").as_deref(), Some("skipped"));
    d.assert_nothing_runs();

    // Keep what does come up while the broken side is fixed: `--keep-going` lets the decode
    // engine get ready, `--keep` leaves it running after the failure.
    let kept = d.run(&["--resume", "--keep-going", "--keep"]);
    kept.expect_code(1);
    assert!(
        kept.stderr.contains("services were left running"),
        "{}",
        kept.stderr
    );
    assert_eq!(status_of(&st, decode).as_deref(), Some("done"));
    let decode_pid = pid_of(&st, decode).expect("decode pid");
    assert!(alive(decode_pid));
    assert_eq!(d.running(), (1, 0));

    // The fix: the prefill engine and what needs it run, the rest is kept as it is.
    d.set("PREFILL_FAIL", "");
    let fixed = d.run(&["--resume", "--explain"]);
    fixed.expect_code(0);
    assert_explained(&fixed.stdout, ALLOCATE, "keep", "");
    assert_explained(&fixed.stdout, decode, "keep", "");
    assert_explained(&fixed.stdout, prefill, "run", "failed");
    for id in ["router", "register", "health-probe"] {
        assert_explained(&fixed.stdout, id, "run", "never ran");
    }
    assert_eq!(explained(&fixed.stdout).len(), 6, "{}", fixed.stdout);
    assert_eq!(
        pid_of(&st, decode),
        Some(decode_pid),
        "the kept engine was replaced"
    );
    assert!(alive(decode_pid));
    assert_eq!(d.starts(decode), 2, "decode: once per run that ran it");
    assert_eq!(status_of(&st, "health-probe").as_deref(), Some("done"));
    d.assert_as_planned();
    assert_pd_answer(&d);
    d.down();
}

// ---------------------------------------------------------------------------------------
// 5. an engine dies after bring-up: status says so, --resume brings it back into the router

#[test]
fn engine_killed_after_bringup_is_down_and_resume_restores_it_behind_the_router() {
    if !have_router() {
        return;
    }
    let d = Local::new("multi_node", &[]);
    let st = d.st();
    d.run(&[]).expect_code(0);
    let victim = "engine[1].rank[0]";
    let survivor = "engine[0].rank[0]";
    let victim_pid = pid_of(&st, victim).expect("victim pid");
    let survivor_pid = pid_of(&st, survivor).expect("survivor pid");
    let router_pid = pid_of(&st, "router").expect("router pid");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim_pid), Signal::SIGKILL)
        .expect("kill the engine");
    wait_until("the killed engine to be gone", WAIT, || !alive(victim_pid));
    let (code, rows) = d.status();
    assert_eq!(
        code,
        Some(1),
        "status exits 1 with a service down: {rows:#?}"
    );
    assert!(rows[victim].contains(" down "), "{}", rows[victim]);
    assert!(rows[survivor].contains(" up "), "{}", rows[survivor]);

    // Completions go on through the router while the resume runs: every one succeeds, on
    // the healthy engine.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let url = format!("{}/v1/completions", d.router_url());
        std::thread::spawn(move || {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let body = json!({ "model": MODEL, "prompt": "during", "max_tokens": 4 });
                let (status, text) =
                    http_with("POST", &url, Some(&body), &[]).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(status, 200, "a completion during the resume failed: {text}");
                answered += 1;
            }
            answered
        })
    };
    // As a user types it, without `--engine mock`: the run's options are remembered.
    let file = d.file();
    let out = d.sb.run(&[
        "-q",
        "run",
        &file,
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answered = traffic.join().expect("no completion failed");
    assert!(answered > 0);
    out.expect_code(0);
    assert_explained(&out.stdout, survivor, "keep", "");
    assert_explained(&out.stdout, victim, "run", "no longer alive");
    // Surgical: the router stays, and its registration re-announces the new engine.
    assert_explained(&out.stdout, "router", "keep", "");
    assert_explained(
        &out.stdout,
        "register",
        "run",
        &format!("upstream re-ran (`{victim}`)"),
    );
    assert_explained(&out.stdout, "health-probe", "run", "upstream re-ran");
    assert_eq!(pid_of(&st, survivor), Some(survivor_pid));
    let new_victim = pid_of(&st, victim).expect("new engine pid");
    assert_ne!(new_victim, victim_pid);
    assert_eq!(
        pid_of(&st, "router"),
        Some(router_pid),
        "the router was replaced"
    );
    assert_eq!(d.starts("router"), 1);
    // The health probe passed again, the router lists the engine and sends it requests.
    assert_eq!(status_of(&st, "health-probe").as_deref(), Some("done"));
    assert_eq!(d.router_workers(), [d.engine_url(0), d.engine_url(1)]);
    let answered: std::collections::BTreeSet<String> = (0..4)
        .map(|i| {
            let text = d.complete(&format!("after the restart {i}"));
            text.split_whitespace().next().unwrap_or("").to_string()
        })
        .collect();
    assert!(
        answered.contains(&format!("mock@127.0.0.2:{}", d.ports.backend)),
        "the restarted engine got no request: {answered:?}"
    );
    let (code, rows) = d.status();
    assert_eq!(code, Some(0), "{rows:#?}");
    d.assert_as_planned();
    d.down();
}

/// P/D: the router cannot take a restarted worker back (vllm-router 0.1.17 refuses
/// `add_worker` in P/D mode), so a resume restarts it too, and `--explain` says why; the
/// prefill engine stays.
#[test]
fn pd_resume_restarts_the_router_with_a_killed_decode_engine_and_says_why() {
    if !have_router() {
        return;
    }
    let d = Local::new("disaggregated", &[]);
    let st = d.st();
    d.run(&[]).expect_code(0);
    let (prefill, decode) = ENGINES.into();
    let prefill_pid = pid_of(&st, prefill).expect("prefill pid");
    let decode_pid = pid_of(&st, decode).expect("decode pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(decode_pid), Signal::SIGKILL).expect("kill");
    wait_until("the killed engine to be gone", WAIT, || !alive(decode_pid));
    let out = d.run(&["--resume", "--explain"]);
    out.expect_code(0);
    assert_explained(&out.stdout, prefill, "keep", "");
    assert_explained(&out.stdout, decode, "run", "no longer alive");
    assert_explained(
        &out.stdout,
        "router",
        "run",
        &format!(
            "upstream re-ran (`{decode}`): a P/D router's worker lists are fixed at its start"
        ),
    );
    assert_eq!(pid_of(&st, prefill), Some(prefill_pid));
    assert_pd_answer(&d);
    d.down();
}

/// `run --attach` keeps the deployment healthy: a killed engine is taken out of the router,
/// restarted and registered again while the router runs on (same pid); killed more often
/// than its budget allows, it is reported once and left down.
#[test]
fn attach_restarts_a_killed_engine_and_its_budget_stops_a_crash_loop() {
    if !have_router() {
        return;
    }
    let d = Local::new("multi_node", &[]);
    let path = d.sb.path().join(d.file());
    let text = std::fs::read_to_string(&path).expect("recipe").replace(
        "[inference.deployment]\n",
        "[inference.deployment]\nrestart_budget = 2\nrestart_backoff = \"100ms\"\n",
    );
    d.sb.write(d.file(), &text);
    let st = d.st();
    let mut run = d.spawn(
        "attach",
        &[
            "--attach",
            "--events",
            "jsonl",
            "--events-file",
            "events.jsonl",
        ],
    );
    wait_until("the deployment to be up", WAIT, || {
        status_of(&st, "health-probe").as_deref() == Some("done")
    });
    let router_pid = pid_of(&st, "router").expect("router pid");
    let victim = "engine[1].rank[0]";
    let heal_log = || std::fs::read_to_string(st.join("logs/heal.log")).unwrap_or_default();
    // Killed twice: restarted each time, the router untouched.
    for round in 1..=2 {
        let pid = pid_of(&st, victim).expect("victim pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
        wait_until("the engine to be back", WAIT, || {
            heal_log().matches("restarted `engine[1].rank[0]`").count() == round
        });
        assert_ne!(pid_of(&st, victim), Some(pid));
        assert_eq!(
            pid_of(&st, "router"),
            Some(router_pid),
            "the router was replaced"
        );
        assert_eq!(d.router_workers(), [d.engine_url(0), d.engine_url(1)]);
        assert!(d.complete("after a restart").starts_with("mock@"));
    }
    let log = heal_log();
    assert!(
        log.contains("`engine[1].rank[0]` taken out of http://127.0.0.1:"),
        "{log}"
    );
    // The third death within the window is over the budget: reported, left down, and out of
    // the router; the rest keeps serving.
    let pid = pid_of(&st, victim).expect("victim pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    wait_until("the budget to say so", WAIT, || {
        heal_log().contains("left down")
    });
    assert!(
        heal_log().contains("`engine[1].rank[0]` died 3 times within 10m"),
        "{}",
        heal_log()
    );
    assert_eq!(d.router_workers(), [d.engine_url(0)]);
    assert!(d.complete("still serving").starts_with("mock@127.0.0.1:"));
    assert!(
        run.is_running(),
        "the attached run ended: {}",
        run.stderr_text()
    );
    assert!(run
        .stderr_text()
        .contains("heal: `engine[1].rank[0]` is down"));
    run.signal(Signal::SIGINT);
    run.wait(COMMAND_DEADLINE);
    d.down();
}

// ---------------------------------------------------------------------------------------
// 6. a hung engine fails at its ready timeout

#[test]
fn hung_engine_fails_at_its_ready_timeout_with_a_clear_message() {
    let d = Local::new("single_node", &[("FAIL", "hang"), ("READY_TIMEOUT", "3s")]);
    let began = Instant::now();
    let out = d.run(&[]);
    let took = began.elapsed();
    out.expect_code(1);
    let engine = "engine[0].rank[0]";
    for s in [
        format!(
            "error: task `{engine}` failed: `{engine}` on node0 (127.0.0.1) was not ready after 3s"
        ),
        format!(
            "(last probe: GET http://127.0.0.1:{}/health: connection refused)",
            d.ports.backend
        ),
        "PRL_MOCK_FAIL=hang: this never ends".to_string(),
    ] {
        assert!(out.stderr.contains(&s), "no `{s}` in:\n{}", out.stderr);
    }
    assert!(took >= Duration::from_secs(3), "gave up after {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "took {took:?} for a 3s timeout"
    );
    assert_eq!(status_of(&d.st(), engine).as_deref(), Some("failed"));
    assert_eq!(status_of(&d.st(), "router").as_deref(), Some("skipped"));
    // The hung engine was stopped, and nothing else had started.
    d.assert_nothing_runs();
}

// ---------------------------------------------------------------------------------------
// 7. a kill -9 between a spawn and the journal write of its handle, built on purpose

/// Kills a process group when dropped (what a test found running that prl-flow may not know
/// of).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// Whether `pid` names a process at all, as `kill(pid, 0)` sees it.
fn signalable(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The state a `kill -9` of prl-flow leaves when it lands between the spawn of a service and
/// the journal write of its handle: the service's record says `running` with no handle, its
/// process runs (it wrote `PID ATTEMPT START SID` to its pid file before anything else), and nothing
/// downstream has run. Any pid file time is possible then; this one is 5 ms older than the
/// record's `started_ms`, the case file times could not tell apart.
struct Gap {
    sb: Sandbox,
    port: u16,
    /// The service's process.
    pid: i32,
    _guard: KillOnDrop,
}

const GAP_SERVICE: &str = "engine";

impl Gap {
    /// Brings up `gap.toml` (a mock engine as a service, a one-shot after it) in a new
    /// sandbox, then rewrites its journal into the gap.
    fn new() -> Gap {
        let sb = Sandbox::new();
        let port = free_port_block(1);
        sb.write(
            "gap.toml",
            &format!(
                r#"name = "gap"

[[task]]
id = "{GAP_SERVICE}"
run = 'echo engine-start >> "$WORK/marks"; exec "{mock}" serve {MODEL} --port {port}'
service = true
ready = {{ http = "http://127.0.0.1:{port}/health", interval = "20ms" }}

[[task]]
id = "client"
run = 'echo client >> "$WORK/marks"'
needs = ["{GAP_SERVICE}"]
"#,
                mock = common::mock_engine(),
            ),
        );
        let st = sb.track_state_dir("st");
        sb.run(&["-q", "run", "gap.toml", "--state-dir", "st"])
            .expect_code(0);
        let pid = pid_of(&st, GAP_SERVICE).expect("the service's pid is recorded");
        let guard = KillOnDrop(pid);
        assert!(alive(pid));

        // The pid file names this process and the attempt the record started.
        let mut recs = records(&st);
        let started_ms = recs[GAP_SERVICE]["started_ms"]
            .as_u64()
            .expect("started_ms");
        let pid_file = st.join("run").join(GAP_SERVICE).join("pid");
        let text = std::fs::read_to_string(&pid_file).expect("the pid file");
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            words[..2],
            [pid.to_string(), started_ms.to_string()],
            "the pid file holds `PID ATTEMPT START SID`: {text}"
        );
        assert_eq!(
            words.len(),
            4,
            "the pid file holds `PID ATTEMPT START SID`: {text}"
        );

        // The journal as the kill leaves it: the service `running` without a handle, its
        // dependent never started. One snapshot, an empty log.
        let r = recs.get_mut(GAP_SERVICE).expect("the service's record");
        r["status"] = json!("running");
        let o = r.as_object_mut().expect("a record is an object");
        o.remove("handle");
        o.remove("finished_ms");
        recs.remove("client");
        let snapshot = json!({ "version": 1, "records": recs });
        let on_file: Value = serde_json::from_str(
            &std::fs::read_to_string(st.join("journal.json")).expect("journal.json"),
        )
        .expect("journal.json is JSON");
        assert_eq!(
            on_file["version"], 1,
            "the snapshot format this test writes"
        );
        std::fs::write(
            st.join("journal.json"),
            serde_json::to_vec_pretty(&snapshot).expect("json"),
        )
        .expect("write journal.json");
        std::fs::write(st.join("journal.log"), "").expect("empty journal.log");
        assert!(records(&st)[GAP_SERVICE].get("handle").is_none());
        assert_eq!(status_of(&st, GAP_SERVICE).as_deref(), Some("running"));

        // The pid file written 5 ms before the attempt's recorded start.
        let when = std::time::UNIX_EPOCH + Duration::from_millis(started_ms - 5);
        std::fs::File::options()
            .write(true)
            .open(&pid_file)
            .and_then(|f| f.set_modified(when))
            .expect("set the pid file's time");
        Gap {
            sb,
            port,
            pid,
            _guard: guard,
        }
    }

    fn st(&self) -> PathBuf {
        self.sb.join("st")
    }

    /// The live processes started in the sandbox (the workflow's tasks start in its dir).
    fn processes(&self) -> Vec<Proc> {
        processes_under(self.sb.path())
    }

    /// The service's process and port are gone, as the OS sees them.
    #[track_caller]
    fn assert_gone(&self) {
        // `down` waited for it; only its reaping by init may lag.
        wait_until("the service's pid to name no process", WAIT, || {
            !signalable(self.pid)
        });
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "port {} still takes connections",
            self.port
        );
        let left = self.processes();
        assert!(left.is_empty(), "processes left running:\n{left:#?}");
    }
}

/// `status` finds the process as `down` would, and says it is up: not `-`, as if nothing
/// had started. It only reads: the journal still has no handle.
#[test]
fn status_shows_a_service_whose_handle_never_reached_the_journal_as_up() {
    let g = Gap::new();
    let out = g.sb.run(&["status", "--state-dir", "st"]);
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(GAP_SERVICE))
        .unwrap_or_else(|| panic!("no row for `{GAP_SERVICE}`:\n{}", out.stdout))
        .to_string();
    assert!(
        row.contains(" up ") && row.contains(&format!("pid {}", g.pid)),
        "{row}\n{}",
        out.stderr
    );
    assert!(records(&g.st())[GAP_SERVICE]["handle"].is_null());
}

#[test]
fn down_stops_a_service_whose_handle_never_reached_the_journal() {
    let g = Gap::new();
    assert!(signalable(g.pid), "the service runs before `down`");
    let out = g.sb.run(&["down", "--state-dir", "st"]);
    out.expect_code(0);
    assert!(
        out.stderr.contains(&format!("stopped {GAP_SERVICE}"))
            && out.stderr.contains("down: 1 process stopped"),
        "{}",
        out.stderr
    );
    g.assert_gone();
}

#[test]
fn resume_adopts_a_service_whose_handle_never_reached_the_journal() {
    let g = Gap::new();
    let st = g.st();
    let out = g.sb.run(&[
        "run",
        "gap.toml",
        "--state-dir",
        "st",
        "--resume",
        "--explain",
    ]);
    out.expect_code(0);
    // Taken over from its pid file, not run again: adopted, or kept since it is ready.
    let (word, why) = &explained(&out.stdout)[GAP_SERVICE];
    assert!(
        word == "adopt" || word == "keep",
        "`{GAP_SERVICE}` must not run again: {word} {why}\n{}",
        out.stdout
    );
    assert_explained(&out.stdout, "client", "run", "never ran");
    // Adopted, not started a second time: one start, the same process, nothing else.
    assert_eq!(
        g.sb.count("marks", "engine-start"),
        1,
        "{:?}",
        g.sb.lines("marks")
    );
    assert_eq!(
        g.sb.count("marks", "client"),
        2,
        "{:?}",
        g.sb.lines("marks")
    );
    assert_eq!(
        pid_of(&st, GAP_SERVICE),
        Some(g.pid),
        "the service was replaced"
    );
    assert_eq!(status_of(&st, GAP_SERVICE).as_deref(), Some("done"));
    let procs: Vec<i32> = g.processes().iter().map(|p| p.pid).collect();
    assert_eq!(procs, [g.pid], "{:#?}", g.processes());

    let out = g.sb.run(&["down", "--state-dir", "st"]);
    out.expect_code(0);
    assert!(
        out.stderr.contains("down: 1 process stopped"),
        "{}",
        out.stderr
    );
    g.assert_gone();
}

// ---------------------------------------------------------------------------------------
// 8. a port that is not ours: taken before the start, or answered by someone else

impl Local {
    /// Another sandbox with the same recipe on the same ports (a second copy of a
    /// deployment, with its own state dir).
    fn twin(&self) -> Local {
        let twin = Local {
            sb: Sandbox::new(),
            recipe: self.recipe,
            ports: self.ports,
            knobs: self.knobs.clone(),
        };
        twin.write();
        twin
    }
}

/// A second copy of a deployment on the same ports fails at once, naming the port, the
/// field that set it and who holds it, starts nothing, and the first keeps serving.
#[test]
fn a_second_copy_on_the_same_ports_fails_naming_the_port_and_the_first_keeps_serving() {
    if !have_router() {
        return;
    }
    let first = Local::new("multi_node", &[]);
    first.run(&[]).expect_code(0);
    let second = first.twin();
    let out = second.run(&[]);
    out.expect_code(1);
    let want = format!(
        "port {} is already in use (set by [inference.deployment] backend_port), held by pid ",
        first.ports.backend
    );
    assert!(
        out.stderr.contains(&want),
        "no `{want}` in:\n{}",
        out.stderr
    );
    second.assert_nothing_runs();
    // The first deployment still answers, from its own engines.
    first.assert_as_planned();
    assert!(first.complete("still here").starts_with("mock@"));
    first.down();
}

/// A service whose probe is answered by another process (on its port, after its start)
/// is not ready: the run fails at once, naming who answers, and stops what it started.
#[test]
fn a_probe_answered_by_another_process_does_not_make_a_service_ready() {
    let d = Local::new("single_node", &[("FAIL", "hang")]);
    let mut run = d.spawn("run", &[]);
    let engine = "engine[0].rank[0]";
    let st = d.st();
    wait_until("the engine started", WAIT, || in_flight(&st, engine));
    // The stranger: another engine on the port the hung engine never binds.
    let port = d.ports.backend.to_string();
    let mut stranger = std::process::Command::new(common::mock_engine())
        .args([MODEL, "--host", "127.0.0.1", "--port", &port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the stranger");
    let _guard = KillOnDrop(stranger.id() as i32);
    let out = run.wait(COMMAND_DEADLINE);
    out.expect_code(1);
    let want = format!(
        "`{engine}` on node0 (127.0.0.1) is not what answers on port {port}: pid {} ",
        stranger.id()
    );
    assert!(
        out.stderr.contains(&want),
        "no `{want}` in:\n{}",
        out.stderr
    );
    assert_eq!(status_of(&st, engine).as_deref(), Some("failed"));
    d.assert_nothing_runs();
    assert!(alive(stranger.id() as i32), "the stranger was stopped");
    let _ = stranger.kill();
    let _ = stranger.wait();
}
