//! The mock engine: a stand-in for `vllm serve` on machines without a GPU.
//!
//! `prl-flow mock-engine ARGS...` takes the arguments `vllm serve` would take and behaves, from
//! the outside, like a vLLM 0.33 engine: same command-line contract, same start-up log lines,
//! same HTTP API, same cross-process hand-overs. What it does not do is run a model; answers are
//! deterministic made-up text that names the engine that produced it. Deployments, the router
//! and the tests of prl-flow can then be exercised end to end on one small machine.
//!
//! # Life of a mock engine
//!
//! 1. **Arguments** ([`args`]): parsed against the flag table of vLLM 0.33 compiled into the
//!    binary. Anything `vllm serve` would refuse is refused with argparse's message and exit 2.
//! 2. **Configuration**: the parsed flags become an [`EngineConfig`]. Errors vLLM raises while
//!    building its engine config (a `kv_role` missing, an unknown KV connector, a broken
//!    `MOONCAKE_CONFIG_PATH`) exit 1, as a crashed vLLM start does.
//! 3. **Start-up**: if this engine leads a group spread over nodes, it opens the group listener
//!    at once ([`dp`]), so remote ranks may connect while it "loads the model". Loading takes
//!    `PRL_MOCK_STARTUP_DELAY`. Then the NIXL side channel is bound ([`kv`]), then the HTTP
//!    port, and `Starting vLLM API server on http://HOST:PORT` is logged. A `--headless` engine
//!    binds no HTTP port: it joins its group and waits.
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
//! `MOONCAKE_CONFIG_PATH`.
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

mod args;
mod dp;
mod kv;
mod log;
mod server;

use std::ffi::OsString;
use std::future::pending;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use self::args::Parsed;
use self::dp::{GroupKind, JoinSpec, Link, ListenSpec, Master};
use self::kv::{KvConfig, Nixl};
use self::log::Who;

const DEFAULT_MODEL: &str = "Qwen/Qwen3-0.6B";
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_DP_RPC_PORT: u16 = 29550;
const DEFAULT_MASTER_PORT: u16 = 29501;
/// Qwen3-0.6B's context length, vLLM's default model.
const DEFAULT_MAX_MODEL_LEN: i64 = 40960;
const DEFAULT_READY_TIMEOUT_S: u64 = 600;

/// Entry point of `prl-flow mock-engine`; returns the process exit code.
pub fn main(args: Vec<OsString>) -> i32 {
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
    let code = runtime.block_on(run(Arc::new(cfg), knobs, started));
    // Open connections (an SSE client, a group member) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    Start,
    Hang,
    After(Duration),
}

#[derive(Debug, PartialEq, Eq)]
struct Knobs {
    delay: Duration,
    fail: Option<Fail>,
}

impl Knobs {
    fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Knobs, String> {
        let duration = |name: &str, v: &str| {
            humantime::parse_duration(v.trim()).map_err(|e| {
                format!("{name}=`{v}` is not a duration ({e}); write it like `3s` or `500ms`")
            })
        };
        let delay = match env("PRL_MOCK_STARTUP_DELAY").filter(|v| !v.is_empty()) {
            None => Duration::ZERO,
            Some(v) => duration("PRL_MOCK_STARTUP_DELAY", &v)?,
        };
        let fail = match env("PRL_MOCK_FAIL").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(match v.trim() {
                "start" => Fail::Start,
                "hang" => Fail::Hang,
                other => match other.strip_prefix("after:") {
                    Some(d) => Fail::After(duration("PRL_MOCK_FAIL", d)?),
                    None => {
                        return Err(format!(
                            "PRL_MOCK_FAIL=`{v}` is not a known failure; use `start`, `hang` or \
                             `after:DURATION` (e.g. `after:10s`)"
                        ))
                    }
                },
            }),
        };
        Ok(Knobs { delay, fail })
    }
}

/// How this engine takes part in a group spread over nodes.
#[derive(Debug)]
enum Group {
    None,
    Lead(ListenSpec),
    Member(JoinSpec),
}

/// Everything the running engine needs, decided once from the arguments and environment.
#[derive(Debug)]
pub(crate) struct EngineConfig {
    pub(crate) model: String,
    /// `--served-model-name` values, else the model tag.
    pub(crate) served: Vec<String>,
    host: String,
    port: u16,
    pub(crate) api_keys: Vec<String>,
    pub(crate) access_log: bool,
    pub(crate) max_model_len: i64,
    block_size: usize,
    pub(crate) kv: Option<KvConfig>,
    side_channel: Option<kv::SideChannel>,
    group: Group,
    /// The (first) data-parallel rank of this process, for log prefixes.
    rank: u32,
}

impl EngineConfig {
    fn from_args(
        a: &args::ServeArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EngineConfig, String> {
        let model = a
            .model_tag
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let mut served = a.strings("served_model_name");
        if served.is_empty() {
            served.push(model.clone());
        }
        let host_flag = a.str("host").map(str::to_string);
        let host = host_flag
            .clone()
            .unwrap_or_else(|| DEFAULT_HOST.to_string());
        let port = port_of(a.int("port").unwrap_or(8000), "--port")?;
        let mut api_keys = a.strings("api_key");
        if api_keys.is_empty() {
            api_keys.extend(env("VLLM_API_KEY").filter(|k| !k.is_empty()));
        }
        let max_model_len = match a.int("max_model_len") {
            None | Some(-1) => DEFAULT_MAX_MODEL_LEN,
            Some(n) if n >= 1 => n,
            Some(n) => return Err(format!("max_model_len must be positive, got {n}")),
        };
        let block_size = match a.int("block_size") {
            None => 16,
            Some(n) if n >= 1 => n as usize,
            Some(n) => return Err(format!("block_size must be positive, got {n}")),
        };
        let kv = match a.json("kv_transfer_config") {
            Some(j) => kv::parse_config(j, env)?,
            None => None,
        };
        let headless = a.flag("headless").unwrap_or(false);
        let side_channel = match &kv {
            Some(k) if k.nixl && !headless => Some(kv::side_channel_from_env(env, &host)?),
            _ => None,
        };

        let dp_size = positive(
            a.int("data_parallel_size").unwrap_or(1),
            "--data-parallel-size",
        )?;
        let dp_local = match a.int("data_parallel_size_local") {
            None => dp_size,
            Some(n) if (0..=i64::from(dp_size)).contains(&n) => n as u32,
            Some(n) => {
                return Err(format!(
                    "--data-parallel-size-local ({n}) must be between 0 and --data-parallel-size ({dp_size})"
                ))
            }
        };
        let dp_port = match a.int("data_parallel_rpc_port") {
            None => DEFAULT_DP_RPC_PORT,
            Some(p) => port_of(p, "--data-parallel-rpc-port")?,
        };
        let dp_addr = a.str("data_parallel_address").map(str::to_string);
        let start_rank = a.int("data_parallel_start_rank").map(|r| r.max(0) as u32);
        let nnodes = positive(a.int("nnodes").unwrap_or(1), "--nnodes")?;
        let node_rank = a.int("node_rank").unwrap_or(0).max(0) as u32;
        let master_addr = a.str("master_addr").unwrap_or(DEFAULT_HOST).to_string();
        let master_port = match a.int("master_port") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => port_of(p, "--master-port")?,
        };
        let deadline = match env("VLLM_ENGINE_READY_TIMEOUT_S").filter(|v| !v.is_empty()) {
            None => DEFAULT_READY_TIMEOUT_S,
            Some(v) => v.trim().parse().map_err(|_| {
                format!("VLLM_ENGINE_READY_TIMEOUT_S=`{v}` is not a whole number of seconds")
            })?,
        };
        let group = if headless {
            if dp_size > 1 {
                if dp_local == 0 {
                    return Err(
                        "a --headless engine with --data-parallel-size-local 0 has no rank to run"
                            .into(),
                    );
                }
                Group::Member(JoinSpec {
                    kind: GroupKind::Dp,
                    addr: dp_addr.unwrap_or_else(|| DEFAULT_HOST.to_string()),
                    port: dp_port,
                    size: dp_size,
                    ranks: dp_local,
                    first: start_rank.unwrap_or(0),
                    deadline: Duration::from_secs(deadline),
                })
            } else if nnodes > 1 {
                Group::Member(JoinSpec {
                    kind: GroupKind::Node,
                    addr: master_addr,
                    port: master_port,
                    size: nnodes,
                    ranks: 1,
                    first: node_rank,
                    deadline: Duration::from_secs(deadline),
                })
            } else {
                return Err(
                    "--headless needs --data-parallel-size > 1 or --nnodes > 1: a headless engine \
                     only runs ranks for an API server started elsewhere"
                        .into(),
                );
            }
        } else if dp_size > dp_local && a.int("data_parallel_rank").is_none() {
            Group::Lead(ListenSpec {
                kind: GroupKind::Dp,
                addr: dp_addr
                    .or(host_flag)
                    .unwrap_or_else(|| DEFAULT_HOST.to_string()),
                port: dp_port,
                needed: dp_size - dp_local,
                size: dp_size,
            })
        } else if nnodes > 1 && node_rank == 0 {
            Group::Lead(ListenSpec {
                kind: GroupKind::Node,
                addr: master_addr,
                port: master_port,
                needed: nnodes - 1,
                size: nnodes,
            })
        } else {
            Group::None
        };
        let rank = match &group {
            Group::Member(j) => j.first,
            _ => start_rank.unwrap_or(0),
        };
        Ok(EngineConfig {
            model,
            served,
            host,
            port,
            api_keys,
            access_log: !a.flag("disable_uvicorn_access_log").unwrap_or(false),
            max_model_len,
            block_size,
            kv,
            side_channel,
            group,
            rank,
        })
    }
}

fn port_of(n: i64, flag: &str) -> Result<u16, String> {
    u16::try_from(n).map_err(|_| format!("{flag} {n} is not a TCP port (0-65535)"))
}

fn positive(n: i64, flag: &str) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{flag} must be at least 1, got {n}"))
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

/// The async life of the engine; returns the exit code.
async fn run(cfg: Arc<EngineConfig>, knobs: Knobs, started: Instant) -> i32 {
    // Handlers first: a signal during start-up must still end the engine gracefully.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("mock-engine: cannot install signal handlers: {e}");
            return 1;
        }
    };
    // Background tasks report a broken engine here; the engine then exits 1.
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<String>();
    let hang = knobs.fail == Some(Fail::Hang);

    let master = match (&cfg.group, hang) {
        (Group::Lead(spec), false) => match Master::bind(spec.clone()).await {
            Ok((m, listener)) => {
                tokio::spawn(m.clone().serve(listener, fatal_tx.clone()));
                Some(m)
            }
            Err(e) => {
                log::error(Who::Api, "coordinator.py:96", &e);
                return 1;
            }
        },
        _ => None,
    };
    let link = Arc::new(Link::default());
    let work = engine(
        cfg.clone(),
        knobs.delay,
        hang,
        master.clone(),
        link.clone(),
        fatal_tx,
    );
    tokio::pin!(work);
    let fail_after = async {
        match knobs.fail {
            Some(Fail::After(d)) => tokio::time::sleep_until((started + d).into()).await,
            _ => pending::<()>().await,
        }
    };

    tokio::select! {
        code = &mut work => code,
        name = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        } => {
            log::info(Who::Api, "launcher.py:112", &format!("Received {name}, shutting down gracefully"));
            if let Some(m) = &master {
                m.goodbye().await;
            }
            link.goodbye().await;
            log::uvicorn("Shutting down");
            log::uvicorn(&format!("Finished server process [{}]", std::process::id()));
            0
        }
        Some(why) = fatal_rx.recv() => {
            log::error(Who::Api, "core_client.py:611", &why);
            1
        }
        _ = fail_after => {
            let after = match knobs.fail { Some(Fail::After(d)) => d, _ => Duration::ZERO };
            log::error(
                Who::Engine(cfg.rank),
                "core.py:934",
                &format!(
                    "EngineCore encountered a fatal error: simulated by PRL_MOCK_FAIL=after:{}",
                    humantime::format_duration(after)
                ),
            );
            1
        }
    }
}

/// Start-up and serving; returns only when the engine must exit.
async fn engine(
    cfg: Arc<EngineConfig>,
    delay: Duration,
    hang: bool,
    master: Option<Arc<Master>>,
    link: Arc<Link>,
    fatal: mpsc::UnboundedSender<String>,
) -> i32 {
    let who = Who::Engine(cfg.rank);
    log::info(
        who,
        "core.py:93",
        &format!(
            "Initializing a V1 LLM engine (v{}) with config: model={}, served_model_name={}, \
             kv_transfer={}, group={:?} (prl-flow mock engine: no GPU work is done)",
            server::VLLM_VERSION,
            args::py_repr(&cfg.model),
            args::py_repr(&cfg.served.join(",")),
            cfg.kv.as_ref().map_or("None".to_string(), |k| format!(
                "{}/{}",
                k.connectors.join("+"),
                k.role.as_str()
            )),
            cfg.group
        ),
    );
    if hang {
        log::info(
            who,
            "gpu_model_runner.py:2602",
            "Starting to load model (PRL_MOCK_FAIL=hang: this never ends)",
        );
        return pending::<i32>().await;
    }
    log::info(
        who,
        "gpu_model_runner.py:2602",
        &format!("Starting to load model {}...", cfg.model),
    );
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    log::info(
        who,
        "default_loader.py:267",
        &format!("Loading weights took {:.2} seconds", delay.as_secs_f64()),
    );

    if let Group::Member(spec) = &cfg.group {
        return dp::join(spec.clone(), link).await;
    }

    let nixl = match (&cfg.kv, &cfg.side_channel) {
        (Some(k), Some(side)) => {
            let engine_id = k.engine_id.clone().unwrap_or_else(|| {
                let a = random_hex(1);
                let b = random_hex(2);
                format!(
                    "{}-{}-{}-{}-{}",
                    &a[..8],
                    &a[8..12],
                    &a[12..16],
                    &b[..4],
                    &b[4..16]
                )
            });
            match Nixl::bind(engine_id, k.role, side, cfg.block_size).await {
                Ok((nixl, listener)) => {
                    log::info(
                        who,
                        "nixl_connector.py:870",
                        &format!(
                            "NIXL side channel listening on {}:{} (engine_id={}, role={})",
                            nixl.host,
                            nixl.port,
                            nixl.engine_id,
                            k.role.as_str()
                        ),
                    );
                    tokio::spawn(nixl.clone().serve(listener));
                    Some(nixl)
                }
                Err(e) => {
                    log::error(who, "nixl_connector.py:862", &e);
                    return 1;
                }
            }
        }
        _ => None,
    };

    let listener = match tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).await {
        Ok(l) => l,
        Err(e) => {
            log::error(
                Who::Api,
                "api_server.py:1990",
                &format!("Cannot bind the HTTP port {}:{}: {e}", cfg.host, cfg.port),
            );
            return 1;
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
    let addr = if cfg.host.contains(':') {
        format!("[{}]:{port}", cfg.host)
    } else {
        format!("{}:{port}", cfg.host)
    };
    let state = Arc::new(server::AppState::new(
        cfg.clone(),
        master.clone(),
        nixl,
        addr.clone(),
    ));
    let app = server::router(state.clone());
    log::info(
        Who::Api,
        "api_server.py:1988",
        &format!("Starting vLLM API server on http://{addr}"),
    );
    log::info(Who::Api, "launcher.py:37", "Available routes are: /health, /ping, /version, /metrics, /v1/models, /v1/completions, /v1/chat/completions");
    log::uvicorn(&format!("Started server process [{}]", std::process::id()));
    log::uvicorn("Waiting for application startup.");

    tokio::spawn(async move {
        if let Some(m) = &master {
            let spec = m.spec();
            log::info(
                Who::Api,
                "core_client.py:455",
                &format!(
                    "Waiting for {} remote rank(s) to join at {}:{} (/health answers 503 until then)",
                    spec.needed, spec.addr, spec.port
                ),
            );
            m.wait_ready().await;
            log::info(
                Who::Api,
                "core_client.py:470",
                "All remote ranks have joined",
            );
        }
        state.started.store(true, Ordering::SeqCst);
        log::uvicorn("Application startup complete.");
    });

    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await;
    let why = match served {
        Ok(()) => "the HTTP server stopped".to_string(),
        Err(e) => format!("the HTTP server failed: {e}"),
    };
    let _ = fatal.send(why);
    pending::<i32>().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn knobs() {
        assert_eq!(
            Knobs::from_env(&env_of(&[])),
            Ok(Knobs {
                delay: Duration::ZERO,
                fail: None
            })
        );
        let k = Knobs::from_env(&env_of(&[
            ("PRL_MOCK_STARTUP_DELAY", "1s 500ms"),
            ("PRL_MOCK_FAIL", "after:2s"),
        ]));
        assert_eq!(
            k,
            Ok(Knobs {
                delay: Duration::from_millis(1500),
                fail: Some(Fail::After(Duration::from_secs(2)))
            })
        );
        assert_eq!(
            Knobs::from_env(&env_of(&[("PRL_MOCK_FAIL", "hang")])).map(|k| k.fail),
            Ok(Some(Fail::Hang))
        );
        let e =
            Knobs::from_env(&env_of(&[("PRL_MOCK_FAIL", "crash")])).expect_err("must be refused");
        assert!(e.contains("not a known failure"), "{e}");
        let e = Knobs::from_env(&env_of(&[("PRL_MOCK_STARTUP_DELAY", "soon")]))
            .expect_err("must be refused");
        assert!(e.contains("is not a duration"), "{e}");
        assert!(Knobs::from_env(&env_of(&[("PRL_MOCK_FAIL", "after:x")])).is_err());
    }

    fn config(
        argv: &str,
        env: &'static [(&'static str, &'static str)],
    ) -> Result<EngineConfig, String> {
        let argv = shlex::split(argv).expect("shell words");
        match args::parse(&argv) {
            Ok(Parsed::Serve(a)) => EngineConfig::from_args(&a, &env_of(env)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn groups() {
        let c = config(
            "m --data-parallel-size 4 --data-parallel-size-local 1 --data-parallel-rpc-port 1234",
            &[],
        )
        .expect("valid");
        match c.group {
            Group::Lead(s) => {
                assert_eq!((s.needed, s.port, s.addr.as_str()), (3, 1234, "127.0.0.1"))
            }
            other => panic!("{other:?}"),
        }
        let c = config(
            "m --headless -dp 4 -dpl 2 --data-parallel-start-rank 2 -dpa 10.0.0.1",
            &[],
        )
        .expect("valid");
        match c.group {
            Group::Member(s) => {
                assert_eq!(
                    (s.ranks, s.first, s.port, s.addr.as_str()),
                    (2, 2, 29550, "10.0.0.1")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            config("m -dp 2", &[]).map(|c| c.group),
            Ok(Group::None)
        ));
        assert!(matches!(
            config("m --nnodes 2 --master-addr 127.0.0.1", &[]).map(|c| c.group),
            Ok(Group::Lead(_))
        ));
        assert!(config("m --headless", &[]).is_err());
        assert!(config("m -dp 2 -dpl 3", &[]).is_err());
        assert!(config("m --port 70000", &[]).is_err());
    }

    #[test]
    fn served_names_and_keys() {
        let c = config("org/m --served-model-name a b --api-key k", &[]).expect("valid");
        assert_eq!(c.served, ["a", "b"]);
        assert_eq!(c.api_keys, ["k"]);
        let c = config("org/m", &[("VLLM_API_KEY", "env-key")]).expect("valid");
        assert_eq!(c.served, ["org/m"]);
        assert_eq!(c.api_keys, ["env-key"]);
        let c = config(
            r#"m --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'"#,
            &[("VLLM_NIXL_SIDE_CHANNEL_PORT", "5700")],
        )
        .expect("valid");
        assert_eq!(c.side_channel.map(|s| s.port), Some(5700));
    }
}
