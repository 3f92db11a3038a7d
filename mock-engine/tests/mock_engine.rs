//! End-to-end tests of `prl-flow-mock-engine`: the real binary as child processes, on ports the
//! OS hands out, probed over HTTP and TCP like a deployment would.
//!
//! Every engine a test starts is owned by an [`Engine`] guard that kills it on drop, also when
//! the test fails; a failing test prints the logs of its engines. Waits are polls against a
//! deadline, never bare sleeps, so the tests hold on a loaded 2-core machine and run in
//! parallel (each test has its own ports).

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_prl-flow-mock-engine");
/// Generous: the first engine of a run may start while cargo still links other test binaries.
const READY_WITHIN: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// A running mock engine; killed when dropped.
struct Engine {
    name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Engine {
    fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Engine {
        Engine::start_program(name, BIN.as_ref(), args, env)
    }

    /// Any program under the same guard (the router).
    fn start_program(
        name: &str,
        program: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Engine {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("engine.log");
        // Both streams append to one file so the interleaving matches what a log probe sees.
        let open = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("log file")
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(open())
            .stderr(open());
        for var in [
            "PRL_MOCK_STARTUP_DELAY",
            "PRL_MOCK_FAIL",
            "VLLM_NIXL_SIDE_CHANNEL_HOST",
            "VLLM_NIXL_SIDE_CHANNEL_PORT",
            "VLLM_API_KEY",
            "VLLM_ENGINE_READY_TIMEOUT_S",
            "VLLM_NIXL_ABORT_REQUEST_TIMEOUT",
            "MOONCAKE_CONFIG_PATH",
            "CUDA_VISIBLE_DEVICES",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Engine {
            name: name.to_string(),
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {within:?}",
                self.name
            );
            std::thread::sleep(POLL);
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig} {} failed", self.name);
    }

    /// Polls `GET /health` until it answers `want`, failing early if the engine dies.
    async fn wait_health(&mut self, port: u16, want: u16) {
        let url = format!("http://127.0.0.1:{port}/health");
        let http = client();
        let deadline = Instant::now() + READY_WITHIN;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before /health answered {want}",
                    self.name
                );
            }
            match http.get(&url).send().await {
                Ok(r) if r.status().as_u16() == want => return,
                Ok(r) => last = format!("HTTP {}", r.status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "{}: /health never answered {want} (last: {last})",
            self.name
        );
    }

    /// Polls until the log holds `needle`.
    fn wait_log(&mut self, needle: &str) {
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(POLL);
        }
        panic!("{}: `{needle}` never appeared in the log", self.name);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} -----\n{}----- end of {} -----",
                self.name,
                self.log(),
                self.name
            );
        }
    }
}

/// Runs the engine to completion (for commands that must exit by themselves).
fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    cmd.env_remove("PRL_MOCK_FAIL")
        .env_remove("PRL_MOCK_STARTUP_DELAY")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .envs(env.iter().copied());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // A watchdog: a regression that makes these commands serve must not hang the suite.
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + READY_WITHIN;
        let alive = || {
            Command::new("kill")
                .args(["-0", &pid])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        while alive() {
            if Instant::now() > deadline {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                return;
            }
            std::thread::sleep(POLL);
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = watchdog.join();
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn post(port: u16, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

async fn get_text(port: u16, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .expect("GET");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn text_of(v: &Value) -> &str {
    v["choices"][0]["text"].as_str().unwrap_or_default()
}

#[test]
fn bad_arguments_exit_2_with_argparse_messages() {
    let out = run_to_end(&["my/model", "--port", "1", "--foo"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "usage: vllm serve [model_tag] [options]\nvllm serve: error: unrecognized arguments: --foo\n"
    );

    let out = run_to_end(&["m", "--port", "x"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).ends_with("vllm serve: error: argument --port: invalid int value: 'x'\n"));

    let out = run_to_end(&["m", "--dtype", "fp7"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(
        "argument --dtype: invalid choice: 'fp7' (choose from auto, bfloat16, float, float16, float32, half)"
    ));

    let out = run_to_end(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("usage: vllm serve [model_tag] [options]")
    );
}

#[test]
fn bad_knobs_exit_2_and_failed_start_exits_1() {
    let out = run_to_end(&["m"], &[("PRL_MOCK_FAIL", "explode")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PRL_MOCK_FAIL=`explode` is not a known failure"));

    let out = run_to_end(&["m"], &[("PRL_MOCK_STARTUP_DELAY", "soon")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PRL_MOCK_STARTUP_DELAY=`soon` is not a duration"));

    let port = free_port().to_string();
    let out = run_to_end(&["m", "--port", &port], &[("PRL_MOCK_FAIL", "start")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("EngineCore failed to start."), "{err}");
    assert!(err.contains("PRL_MOCK_FAIL=start"), "{err}");
}

#[test]
fn config_errors_exit_1() {
    let out = run_to_end(
        &[
            "m",
            "--kv-transfer-config",
            r#"{"kv_connector":"NixlConnector"}"#,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Please specify kv_role"),
        "{}",
        stderr(&out)
    );

    let out = run_to_end(
        &[
            "m",
            "--kv-transfer-config",
            r#"{"kv_connector":"MooncakeStoreConnector","kv_role":"kv_both"}"#,
        ],
        &[("MOONCAKE_CONFIG_PATH", "/nonexistent/mooncake.json")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read MOONCAKE_CONFIG_PATH `/nonexistent/mooncake.json`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn plain_completion_models_metrics_and_logs() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start(
        "engine",
        &[
            "org/base-model",
            "--port",
            &p,
            "--served-model-name",
            "alias",
        ],
        &[],
    );
    e.wait_health(port, 200).await;
    e.wait_log("Application startup complete.");
    let log = e.log();
    assert!(
        log.contains(&format!(
            "Starting vLLM API server on http://127.0.0.1:{port}"
        )),
        "{log}"
    );

    // The router adds SGLang-style fields: they must be ignored.
    let (status, body) = post(
        port,
        "/v1/completions",
        json!({"model": "alias", "prompt": "hello there", "max_tokens": 5,
               "ignore_eos": false, "skip_special_tokens": true, "echo": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let text = text_of(&body);
    assert_eq!(text.split(' ').count(), 5, "{text}");
    assert!(
        text.starts_with(&format!("mock@127.0.0.1:{port} role=standalone")),
        "{text}"
    );
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["prompt_tokens"], 2);

    let (status, body) = post(
        port,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["message"], "The model `nope` does not exist.");

    let (status, models) = get_text(port, "/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "alias");
    assert_eq!(models["data"][0]["root"], "org/base-model");

    let (status, metrics) = get_text(port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# TYPE vllm:num_requests_running gauge"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vllm:request_success_total{engine="0",model_name="alias",finished_reason="length"} 1.0"#),
        "{metrics}"
    );
    let (status, version) = get_text(port, "/version").await;
    assert_eq!((status, version.as_str()), (200, r#"{"version":"0.33.0"}"#));

    // A request is logged, as vLLM logs it.
    e.wait_log("Received request cmpl-");
}

#[tokio::test]
async fn models_default_to_the_model_tag() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start("engine", &["--model", "org/tagged", "--port", &p], &[]);
    e.wait_health(port, 200).await;
    let (_, models) = get_text(port, "/v1/models").await;
    let models: Value = serde_json::from_str(&models).expect("json");
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(models["data"][0]["id"], "org/tagged");
}

#[tokio::test]
async fn streaming_chat() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start("engine", &["m", "--port", &p], &[]);
    e.wait_health(port, 200).await;
    let r = client()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&json!({"model": "m", "stream": true, "max_tokens": 6,
                      "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "tell me"}]}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let body = r.text().await.expect("body");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content.split(' ').count(), 6, "{content}");
    assert!(
        content.starts_with(&format!("mock@127.0.0.1:{port}")),
        "{content}"
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    assert_eq!(
        chunks.last().map(|c| &c["usage"]["completion_tokens"]),
        Some(&json!(6))
    );
}

#[tokio::test]
async fn startup_delay_then_healthy() {
    let port = free_port();
    let p = port.to_string();
    let started = Instant::now();
    let mut e = Engine::start(
        "engine",
        &["m", "--port", &p],
        &[("PRL_MOCK_STARTUP_DELAY", "1500ms")],
    );
    // While "loading the model" the port is closed, as with vLLM.
    let early = client()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await;
    if started.elapsed() < Duration::from_millis(1500) {
        assert!(
            early.is_err(),
            "the port answered during the start-up delay"
        );
    }
    e.wait_health(port, 200).await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn hang_never_gets_healthy_and_sigterm_is_graceful() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start("engine", &["m", "--port", &p], &[("PRL_MOCK_FAIL", "hang")]);
    e.wait_log("PRL_MOCK_FAIL=hang");
    let http = client();
    let window = Instant::now() + Duration::from_secs(2);
    while Instant::now() < window {
        let r = http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await;
        assert!(r.is_err(), "a hanging engine answered /health");
        assert!(e.exited().is_none(), "a hanging engine exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    e.signal("-TERM");
    let status = e.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_stops_a_serving_engine_with_0() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start("engine", &["m", "--port", &p], &[]);
    e.wait_health(port, 200).await;
    e.signal("-TERM");
    assert_eq!(e.wait_exit(Duration::from_secs(5)).code(), Some(0));
    assert!(e
        .log()
        .contains("Received SIGTERM, shutting down gracefully"));
}

#[tokio::test]
async fn fail_after_serves_then_exits_1() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start(
        "engine",
        &["m", "--port", &p],
        &[("PRL_MOCK_FAIL", "after:1s")],
    );
    e.wait_health(port, 200).await;
    assert_eq!(e.wait_exit(READY_WITHIN).code(), Some(1));
    assert!(
        e.log().contains("simulated by PRL_MOCK_FAIL=after:1s"),
        "{}",
        e.log()
    );
}

fn nixl(role: &str) -> String {
    json!({"kv_connector": "NixlConnector", "kv_role": role}).to_string()
}

#[tokio::test]
async fn prefill_decode_over_nixl_side_channel() {
    let (pp, dp, psc, dsc) = (free_port(), free_port(), free_port(), free_port());
    let (pps, dps, pscs, dscs) = (
        pp.to_string(),
        dp.to_string(),
        psc.to_string(),
        dsc.to_string(),
    );
    let producer = nixl("kv_producer");
    // The decode side uses a MultiConnector holding the Nixl part, to cover that shape too.
    let consumer = json!({
        "kv_connector": "MultiConnector", "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"connectors": [
            {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"},
            {"kv_connector": "OffloadingConnector", "kv_role": "kv_consumer"}
        ]}
    })
    .to_string();
    let mut prefill = Engine::start(
        "prefill",
        &["m", "--port", &pps, "--kv-transfer-config", &producer],
        &[
            ("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1"),
            ("VLLM_NIXL_SIDE_CHANNEL_PORT", &pscs),
        ],
    );
    let mut decode = Engine::start(
        "decode",
        &["m", "--port", &dps, "--kv-transfer-config", &consumer],
        &[
            ("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1"),
            ("VLLM_NIXL_SIDE_CHANNEL_PORT", &dscs),
        ],
    );
    prefill.wait_health(pp, 200).await;
    decode.wait_health(dp, 200).await;

    let prompt = "the quick brown fox jumps over the lazy dog";
    // What the router sends to the prefill worker.
    let (status, pre) = post(
        pp,
        "/v1/completions",
        json!({"model": "m", "prompt": prompt, "max_tokens": 1, "stream": false,
               "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
                                      "remote_engine_id": null, "remote_block_ids": null,
                                      "remote_host": null, "remote_port": null}}),
    )
    .await;
    assert_eq!(status, 200, "{pre}");
    assert_eq!(text_of(&pre), format!("mock@127.0.0.1:{pp}"));
    let params = pre["kv_transfer_params"].clone();
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["do_remote_decode"], false);
    assert_eq!(params["remote_host"], "127.0.0.1");
    assert_eq!(params["remote_port"], psc);
    assert!(params["remote_block_ids"]
        .as_array()
        .is_some_and(|b| !b.is_empty()));
    let engine_id = params["remote_engine_id"]
        .as_str()
        .expect("engine id")
        .to_string();

    // What the router sends to the decode worker: the client's request plus those params.
    let decode_req = json!({"model": "m", "prompt": prompt, "max_tokens": 12,
                            "kv_transfer_params": params});
    let (status, dec) = post(dp, "/v1/completions", decode_req.clone()).await;
    assert_eq!(status, 200, "{dec}");
    let text = text_of(&dec);
    assert!(
        text.starts_with(&format!(
            "mock@127.0.0.1:{dp} role=decode continued-from-prefill"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("engine={engine_id}")), "{text}");
    assert!(text.contains(&format!("at=127.0.0.1:{psc}")), "{text}");
    assert!(
        text.contains(&format!("first-token=mock@127.0.0.1:{pp}")),
        "{text}"
    );
    assert_eq!(text.split(' ').count(), 12);
    prefill.wait_log("Sent 1 KV block(s) of request");

    // The blocks were handed over once; a replay finds nothing to read.
    let (status, again) = post(dp, "/v1/completions", decode_req).await;
    assert_eq!(status, 500, "{again}");
    assert!(
        again["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already read")),
        "{again}"
    );

    // Without kv_transfer_params the decode engine serves on its own.
    let (status, plain) = post(
        dp,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        text_of(&plain),
        format!("mock@127.0.0.1:{dp} role=decode echo: the")
    );
}

#[tokio::test]
async fn decode_fails_clearly_when_the_prefill_is_unreachable() {
    let (dp, dsc, dead) = (free_port(), free_port(), free_port());
    let (dps, dscs) = (dp.to_string(), dsc.to_string());
    let consumer = nixl("kv_consumer");
    let mut decode = Engine::start(
        "decode",
        &["m", "--port", &dps, "--kv-transfer-config", &consumer],
        &[("VLLM_NIXL_SIDE_CHANNEL_PORT", &dscs)],
    );
    decode.wait_health(dp, 200).await;
    let (status, body) = post(
        dp,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
                                      "remote_engine_id": "gone", "remote_block_ids": [0],
                                      "remote_host": "127.0.0.1", "remote_port": dead,
                                      "request_id": "cmpl-1"}}),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.starts_with("KV transfer failed"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{dead}")), "{msg}");
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(
        decode.exited().is_none(),
        "a failed transfer must not kill the engine"
    );
}

#[tokio::test]
async fn data_parallel_rank0_waits_for_the_headless_rank() {
    let (port, rpc) = (free_port(), free_port());
    let (ps, rpcs) = (port.to_string(), rpc.to_string());
    let mut rank0 = Engine::start(
        "rank0",
        &[
            "m",
            "--port",
            &ps,
            "--data-parallel-size",
            "2",
            "--data-parallel-size-local",
            "1",
            "--data-parallel-address",
            "127.0.0.1",
            "--data-parallel-rpc-port",
            &rpcs,
        ],
        &[],
    );
    // The HTTP port opens, but the engine is not healthy without its remote rank.
    rank0.wait_health(port, 503).await;
    rank0.wait_log("Waiting for 1 remote rank(s) to join");
    let (status, _) = post(port, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(status, 503);

    let mut rank1 = Engine::start(
        "rank1",
        &[
            "m",
            "--headless",
            "--data-parallel-size",
            "2",
            "--data-parallel-size-local",
            "1",
            "--data-parallel-start-rank",
            "1",
            "--data-parallel-address",
            "127.0.0.1",
            "--data-parallel-rpc-port",
            &rpcs,
        ],
        &[],
    );
    rank0.wait_health(port, 200).await;
    rank0.wait_log("Application startup complete.");
    rank1.wait_log("Joined the group at 127.0.0.1:");
    assert!(rank1.exited().is_none());

    // The headless rank dies with its master.
    rank0.signal("-KILL");
    assert_eq!(rank1.wait_exit(Duration::from_secs(10)).code(), Some(1));
    assert!(
        rank1.log().contains("Lost the connection to the master"),
        "{}",
        rank1.log()
    );
}

#[tokio::test]
async fn a_headless_rank_leaves_gracefully_on_sigterm() {
    let (port, rpc) = (free_port(), free_port());
    let (ps, rpcs) = (port.to_string(), rpc.to_string());
    let mut rank0 = Engine::start(
        "rank0",
        &["m", "--port", &ps, "-dp", "2", "-dpl", "1", "-dpp", &rpcs],
        &[],
    );
    let mut rank1 = Engine::start(
        "rank1",
        &[
            "m",
            "--headless",
            "-dp",
            "2",
            "-dpl",
            "1",
            "-dpr",
            "1",
            "-dpp",
            &rpcs,
        ],
        &[],
    );
    rank0.wait_health(port, 200).await;
    rank1.wait_log("Joined the group");
    rank1.signal("-TERM");
    assert_eq!(rank1.wait_exit(Duration::from_secs(5)).code(), Some(0));
    // The master survives a graceful leave but is no longer healthy.
    rank0.wait_health(port, 503).await;
    assert!(rank0.exited().is_none());
}

#[test]
fn occupied_ports_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = run_to_end(&["m", "--port", &port], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("Cannot bind the HTTP port 127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );

    // Two engines on one host need distinct NIXL side-channel ports, as with vLLM.
    let http = free_port().to_string();
    let out = run_to_end(
        &[
            "m",
            "--port",
            &http,
            "--kv-transfer-config",
            &nixl("kv_both"),
        ],
        &[("VLLM_NIXL_SIDE_CHANNEL_PORT", &port)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "cannot listen on the NIXL side channel 127.0.0.1:{port}"
        )),
        "{}",
        stderr(&out)
    );
    drop(taken);
}

#[tokio::test]
async fn api_key_guards_the_v1_routes() {
    let port = free_port();
    let p = port.to_string();
    let mut e = Engine::start("engine", &["m", "--port", &p, "--api-key", "sesame"], &[]);
    e.wait_health(port, 200).await;
    let url = format!("http://127.0.0.1:{port}/v1/models");
    let r = client().get(&url).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 401);
    let r = client()
        .get(&url)
        .bearer_auth("sesame")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
}

/// `vllm serve` flags of one rank of a two-rank external-LB group (prime-rl's layout).
fn external_rank(rank: u32, port: u16, rpc: u16) -> Vec<String> {
    [
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--tensor-parallel-size",
        "2",
        "--data-parallel-size",
        "2",
        "--data-parallel-size-local",
        "1",
        "--data-parallel-rank",
        &rank.to_string(),
        "--data-parallel-address",
        "127.0.0.1",
        "--data-parallel-rpc-port",
        &rpc.to_string(),
        "--api-server-count",
        "1",
        "--enable-expert-parallel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_rank(name: &str, argv: &[String], env: &[(&str, &str)]) -> Engine {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    Engine::start(name, &argv, env)
}

/// The `mock_engine` field of a completion: who served it.
async fn served_by(port: u16) -> Value {
    let (status, body) = post(
        port,
        "/v1/completions",
        json!({"prompt": "who", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["mock_engine"].clone()
}

#[tokio::test]
async fn external_lb_rank1_waits_for_rank0_and_both_serve() {
    let (p0, p1, rpc) = (free_port(), free_port(), free_port());
    // Rank 1 first: it serves HTTP at once but is not healthy without rank 0.
    let mut rank1 = start_rank(
        "rank1",
        &external_rank(1, p1, rpc),
        &[("CUDA_VISIBLE_DEVICES", "2,3")],
    );
    rank1.wait_health(p1, 503).await;
    let (status, body) = post(p1, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(status, 503, "{body}");

    let mut rank0 = start_rank(
        "rank0",
        &external_rank(0, p0, rpc),
        &[("CUDA_VISIBLE_DEVICES", "0,1")],
    );
    rank0.wait_health(p0, 200).await;
    rank1.wait_health(p1, 200).await;
    rank1.wait_log("Application startup complete.");

    let who = served_by(p0).await;
    assert_eq!(
        (who["rank"].as_u64(), who["port"].as_u64()),
        (Some(0), Some(u64::from(p0)))
    );
    let who = served_by(p1).await;
    assert_eq!(
        (who["rank"].as_u64(), who["port"].as_u64()),
        (Some(1), Some(u64::from(p1)))
    );
    assert_eq!(who["dp_size"].as_u64(), Some(2));
    assert_eq!(who["role"].as_str(), Some("standalone"));
}

#[tokio::test]
async fn external_lb_rank0_waits_for_rank1_and_a_leave_turns_it_503() {
    let (p0, p1, rpc) = (free_port(), free_port(), free_port());
    let mut rank0 = start_rank("rank0", &external_rank(0, p0, rpc), &[]);
    rank0.wait_health(p0, 503).await;
    rank0.wait_log("Waiting for 1 remote rank(s) to join");

    let mut rank1 = start_rank("rank1", &external_rank(1, p1, rpc), &[]);
    rank0.wait_health(p0, 200).await;
    rank1.wait_health(p1, 200).await;

    // A rank that leaves on purpose: rank 0 stays up but is no longer healthy.
    rank1.signal("-TERM");
    assert_eq!(rank1.wait_exit(Duration::from_secs(5)).code(), Some(0));
    rank0.wait_health(p0, 503).await;

    // It comes back: the group is whole again.
    let mut again = start_rank("rank1-again", &external_rank(1, p1, rpc), &[]);
    rank0.wait_health(p0, 200).await;
    again.wait_health(p1, 200).await;

    // Rank 0 dies: rank 1 has lost its group and exits 1.
    rank0.signal("-KILL");
    assert_eq!(again.wait_exit(Duration::from_secs(10)).code(), Some(1));
}

#[tokio::test]
async fn external_lb_nixl_side_channel_is_base_plus_rank() {
    let (p1, rpc) = (free_port(), free_port());
    // A base whose rank-1 port is the free one.
    let side = free_port();
    let base = (side - 1).to_string();
    let mut argv = external_rank(1, p1, rpc);
    argv.extend(["--kv-transfer-config".to_string(), nixl("kv_producer")]);
    let mut rank1 = start_rank(
        "rank1",
        &argv,
        &[("VLLM_NIXL_SIDE_CHANNEL_PORT", base.as_str())],
    );
    rank1.wait_health(p1, 503).await;
    rank1.wait_log(&format!("NIXL side channel listening on 127.0.0.1:{side} "));
    std::net::TcpStream::connect(("127.0.0.1", side)).expect("the side channel is bound");
}

#[test]
fn external_lb_refusals_name_the_flag() {
    let (port, rpc) = (free_port(), free_port());
    let mut argv = external_rank(1, port, rpc);
    let local = argv
        .iter()
        .position(|a| a == "--data-parallel-size-local")
        .expect("flag")
        + 1;
    argv[local] = "2".into();
    let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run_to_end(&argv_ref, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "an external data-parallel rank requires `--data-parallel-size-local 1`; got 2"
        ),
        "{}",
        stderr(&out)
    );

    let argv = external_rank(2, port, rpc);
    let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run_to_end(&argv_ref, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data_parallel_rank (2) must be in the range [0, 2)"),
        "{}",
        stderr(&out)
    );

    // A tp-2 rank given one GPU.
    let argv = external_rank(0, port, rpc);
    let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run_to_end(&argv_ref, &[("CUDA_VISIBLE_DEVICES", "0")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "World size (2) is larger than the number of available GPUs (1) in this node."
        ),
        "{}",
        stderr(&out)
    );

    // Internal LB: two local engines of tp 2 on three GPUs.
    let out = run_to_end(
        &["m", "--port", &port.to_string(), "-tp", "2", "-dp", "2"],
        &[("CUDA_VISIBLE_DEVICES", "0,1,2")],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("DP adjusted local rank 3 is out of bounds for 3 devices."),
        "{}",
        stderr(&out)
    );
}

/// The real `vllm-router` 0.1.17: `PRL_FLOW_ROUTER`, else the venv prl-flow's `./dev`
/// installs, else `PATH`. Missing, the test is skipped loudly, or fails when
/// `PRL_FLOW_TEST_REQUIRE_ALL` is on.
fn router_or_skip() -> Option<PathBuf> {
    let named = std::env::var_os("PRL_FLOW_ROUTER").filter(|p| !p.is_empty());
    let found = match &named {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/prl-flow/router-0.1.17/bin/vllm-router"))
            .into_iter()
            .chain(
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .map(|d| d.join("vllm-router")),
            )
            .find(|p| p.is_file()),
    };
    if found.is_none() {
        let required =
            std::env::var("PRL_FLOW_TEST_REQUIRE_ALL").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(!required, "missing: vllm-router (set PRL_FLOW_ROUTER)");
        eprintln!("\n!!! SKIPPED, missing: vllm-router 0.1.17 (set PRL_FLOW_ROUTER)\n");
    }
    found
}

/// Starts the router on free ports and waits until it is ready.
async fn start_router(router: &std::path::Path, mode: &[&str]) -> (Engine, u16) {
    let (port, metrics) = (free_port(), free_port());
    let (ps, ms) = (port.to_string(), metrics.to_string());
    let mut args = vec![
        "--host",
        "127.0.0.1",
        "--port",
        &ps,
        "--prometheus-port",
        &ms,
        "--policy",
        "round_robin",
        "--worker-startup-check-interval",
        "1",
        "--worker-startup-timeout-secs",
        "60",
    ];
    args.extend_from_slice(mode);
    let mut r = Engine::start_program("router", router, &args, &[]);
    let url = format!("http://127.0.0.1:{port}/readiness");
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        assert!(r.exited().is_none(), "the router exited");
        if client()
            .get(&url)
            .send()
            .await
            .is_ok_and(|a| a.status().is_success())
        {
            return (r, port);
        }
        assert!(Instant::now() < deadline, "the router never got ready");
        tokio::time::sleep(POLL).await;
    }
}

/// A two-rank external-LB group; each rank with `extra` flags and its NIXL base port chosen
/// so that base + rank is free.
async fn external_group(extra: &[String]) -> Vec<(Engine, u16)> {
    let rpc = free_port();
    let mut ranks = Vec::new();
    for rank in 0..2u16 {
        let port = free_port();
        let base = (free_port() - rank).to_string();
        let mut argv = external_rank(u32::from(rank), port, rpc);
        argv.extend_from_slice(extra);
        let e = start_rank(
            &format!("rank{rank}"),
            &argv,
            &[("VLLM_NIXL_SIDE_CHANNEL_PORT", base.as_str())],
        );
        ranks.push((e, port));
    }
    for (e, port) in &mut ranks {
        e.wait_health(*port, 200).await;
    }
    ranks
}

/// Every answer names the rank that served it, through the router: `(rank, port, role)`.
async fn answers_through(router_port: u16, n: usize) -> Vec<(u64, u64, String)> {
    let mut seen = Vec::new();
    for i in 0..n {
        let (path, body) = if i % 2 == 0 {
            (
                "/v1/completions",
                json!({"model": "m", "prompt": "who are you", "max_tokens": 2}),
            )
        } else {
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": [{"role": "user", "content": "who"}], "max_tokens": 2}),
            )
        };
        let (status, v) = post(router_port, path, body).await;
        assert_eq!(status, 200, "{v}");
        let who = &v["mock_engine"];
        seen.push((
            who["rank"].as_u64().expect("rank"),
            who["port"].as_u64().expect("port"),
            who["role"].as_str().expect("role").to_string(),
        ));
    }
    seen
}

#[tokio::test]
async fn the_serving_rank_survives_the_real_router() {
    let Some(router) = router_or_skip() else {
        return;
    };
    let group = external_group(&[]).await;
    let urls: Vec<String> = group
        .iter()
        .map(|(_, p)| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut mode = vec!["--worker-urls"];
    mode.extend(urls.iter().map(String::as_str));
    let (_router, rport) = start_router(&router, &mode).await;
    let seen = answers_through(rport, 4).await;
    for (rank, port, role) in &seen {
        assert_eq!(u64::from(group[*rank as usize].1), *port, "{seen:?}");
        assert_eq!(role, "standalone");
    }
    // Round robin over two ranks: both answer.
    assert!(
        seen.iter().any(|s| s.0 == 0) && seen.iter().any(|s| s.0 == 1),
        "{seen:?}"
    );
}

#[tokio::test]
async fn pd_router_answers_name_the_decode_rank() {
    let Some(router) = router_or_skip() else {
        return;
    };
    let (pport, pside) = (free_port(), free_port());
    let (pps, psides) = (pport.to_string(), pside.to_string());
    let producer = nixl("kv_producer");
    let mut prefill = Engine::start(
        "prefill",
        &["m", "--port", &pps, "--kv-transfer-config", &producer],
        &[("VLLM_NIXL_SIDE_CHANNEL_PORT", psides.as_str())],
    );
    prefill.wait_health(pport, 200).await;
    let decode = external_group(&["--kv-transfer-config".into(), nixl("kv_consumer")]).await;
    let purl = format!("http://127.0.0.1:{pport}");
    let durls: Vec<String> = decode
        .iter()
        .map(|(_, p)| format!("http://127.0.0.1:{p}"))
        .collect();
    let (_router, rport) = start_router(
        &router,
        &[
            "--vllm-pd-disaggregation",
            "--prefill",
            &purl,
            "--decode",
            &durls[0],
            "--decode",
            &durls[1],
        ],
    )
    .await;
    let seen = answers_through(rport, 4).await;
    for (rank, port, role) in &seen {
        assert_eq!(role, "decode", "{seen:?}");
        assert_eq!(u64::from(decode[*rank as usize].1), *port, "{seen:?}");
    }
}
