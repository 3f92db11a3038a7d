//! The mock engine: a stand-in for `vllm serve` on machines without a GPU.
//!
//! `prl-flow-mock-engine ARGS...` takes the arguments `vllm serve` would take and behaves, from
//! the outside, like a vLLM 0.33 engine: same command-line contract, same start-up log lines,
//! same HTTP API, same cross-process hand-overs. What it does not do is run a model; answers are
//! deterministic made-up text that names the engine that produced it. Deployments, the router
//! and the tests of prl-flow can then be exercised end to end on one small machine.
//!
//! # Life of a mock engine
//!
//! 1. **Arguments** ([`args`]): parsed against the flag table of vLLM 0.33 compiled into the
//!    binary. Anything `vllm serve` would refuse is refused with argparse's message and exit 2.
//! 2. **Configuration** ([`config`]): the parsed flags become an [`EngineConfig`]. Errors
//!    vLLM raises while building its engine config (a `kv_role` missing, an unknown KV
//!    connector, a broken `MOONCAKE_CONFIG_PATH`) exit 1, as a crashed vLLM start does.
//! 3. **Start-up** ([`life`]): if this engine leads a group spread over nodes, it opens the
//!    group listener at once ([`dp`]), so remote ranks may connect while it "loads the model".
//!    Loading takes `PRL_MOCK_STARTUP_DELAY`. Then the NIXL side channel is bound ([`kv`]),
//!    then the HTTP port, and `Starting vLLM API server on http://HOST:PORT` is logged. A
//!    `--headless` engine binds no HTTP port: it joins its group and waits.
//!    An external-LB rank above 0 (`--data-parallel-rank`) serves HTTP too and joins rank 0.
//! 4. **Ready**: once every remote rank has joined (at once when there are none), `/health`
//!    turns 200 and uvicorn's `Application startup complete.` is logged: both are probes a
//!    deployment can wait on.
//! 5. **Serving** ([`server`]): OpenAI completions and chat, plain and SSE, `/v1/models`,
//!    `/metrics`, `/version`; prefill/decode hand-over through the side channel.
//! 6. **End**: SIGTERM or SIGINT → goodbyes to the group, `Shutting down`, exit 0 within
//!    milliseconds. A crash of part of the group, `PRL_MOCK_FAIL=after:...` or a lost master
//!    → exit 1 with an `ERROR` line saying why.
//!
//! # Knobs (environment, mock-only)
//!
//! * `PRL_MOCK_STARTUP_DELAY=3s` (humantime): how long "loading the model" takes.
//! * `PRL_MOCK_FAIL=start`: fail like a model that cannot load, exit 1 at once.
//! * `PRL_MOCK_FAIL=after:10s`: serve, then die with exit 1 that long after the process began.
//! * `PRL_MOCK_FAIL=hang`: never bind, never get healthy, run until signalled.
//!
//! Any other value of these two is refused with exit 2: a typo must not silently turn a
//! failure test into a success test. vLLM's own environment variables that the mock honours:
//! `VLLM_NIXL_SIDE_CHANNEL_HOST`, `VLLM_NIXL_SIDE_CHANNEL_PORT`,
//! `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, `VLLM_ENGINE_READY_TIMEOUT_S`, `VLLM_API_KEY`,
//! `MOONCAKE_CONFIG_PATH`, `CUDA_VISIBLE_DEVICES` (counted against the parallel sizes,
//! [`checks`]).
//!
//! # Protocols
//!
//! The two TCP protocols of the mock (the KV hand-over between prefill and decode, and the join
//! of remote ranks) are described where they live: [`kv`] and [`dp`]. Both are line-based and
//! loopback-friendly; neither is the real wire protocol of NIXL or vLLM's ZMQ handshakes, only
//! their contract: who connects to whom, when, and what breaks if they cannot.
//!
//! Where the mock binds: HTTP on `--host` (default 127.0.0.1, where vLLM's is 0.0.0.0: a mock
//! has no business on a public interface unless asked) and `--port` (8000).
//!
//! This crate knows vLLM's outside contract (flags, log lines, HTTP API, hand-overs) and
//! nothing of prl-flow: no recipes, plans or backends. `prl-flow run --engine mock` finds
//! this binary beside its own and runs it where a recipe would run `vllm serve`.

mod args;
mod checks;
mod config;
mod dp;
mod kv;
mod life;
mod log;
mod server;

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use self::args::Parsed;
use self::config::{EngineConfig, Fail, Knobs};
use self::log::Who;

fn main() {
    std::process::exit(run_main(std::env::args_os().skip(1).collect()));
}

/// The whole engine; returns the process exit code.
fn run_main(args: Vec<OsString>) -> i32 {
    let started = Instant::now();
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let parsed = match args::parse(&args) {
        Ok(Parsed::Help) => {
            print!("{}", args::help_text());
            return 0;
        }
        Ok(Parsed::Serve(a)) => a,
        Err(e) => {
            eprint!("{}", e.render());
            return 2;
        }
    };
    let env = |k: &str| std::env::var(k).ok();
    let knobs = match Knobs::from_env(&env) {
        Ok(k) => k,
        Err(msg) => {
            eprintln!("mock-engine: {msg}");
            return 2;
        }
    };
    let cfg = match EngineConfig::from_args(&parsed, &env) {
        Ok(c) => c,
        Err(msg) => {
            log::error(
                Who::Api,
                "arg_utils.py:1480",
                &format!("Invalid engine configuration: {msg}"),
            );
            eprintln!("ValueError: {msg}");
            return 1;
        }
    };
    log::info(
        Who::Api,
        "api_server.py:1953",
        &format!("vLLM API server version {}", server::VLLM_VERSION),
    );
    log::info(
        Who::Api,
        "utils.py:253",
        &format!("non-default args: {}", parsed.non_default_summary()),
    );
    for w in &parsed.warnings {
        log::warn(Who::Api, "argparse_utils.py:210", w);
    }
    if let Some(why) = &cfg.device_fault {
        log::error(
            Who::Engine(cfg.rank),
            "core.py:708",
            "EngineCore failed to start.",
        );
        eprintln!("AssertionError: {why}");
        return 1;
    }
    if knobs.fail == Some(Fail::Start) {
        log::error(
            Who::Engine(cfg.rank),
            "core.py:708",
            "EngineCore failed to start.",
        );
        eprintln!(
            "RuntimeError: Failed to load model `{}`: simulated by PRL_MOCK_FAIL=start",
            cfg.model
        );
        return 1;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mock-engine: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(life::run(Arc::new(cfg), knobs, started));
    // Open connections (an SSE client, a group member) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

/// Hex that differs between requests and between processes; ids need no more than that.
pub(crate) fn random_hex(counter: u64) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 32) ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser: spreads the low-entropy inputs over all bits.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    format!("{x:016x}")
}
