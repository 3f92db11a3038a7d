//! The async life of a running engine: start-up (group listener, model "loading", NIXL side
//! channel, HTTP port), readiness, serving, and the end (signals, failures of the group,
//! `PRL_MOCK_FAIL=after:`).

use std::future::pending;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::args;
use crate::config::{EngineConfig, Fail, Group, Knobs};
use crate::dp::{self, Link, Master};
use crate::kv::Nixl;
use crate::log::{self, Who};
use crate::server;

/// The async life of the engine; returns the exit code.
pub(crate) async fn run(cfg: Arc<EngineConfig>, knobs: Knobs, started: Instant) -> i32 {
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
                let a = crate::random_hex(1);
                let b = crate::random_hex(2);
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
    let peer = match &cfg.group {
        Group::Peer(spec) => Some(spec.clone()),
        _ => None,
    };
    let state = Arc::new(server::AppState::new(
        cfg.clone(),
        master.clone(),
        peer.as_ref().map(|_| link.clone()),
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

    let ready_link = peer.as_ref().map(|spec| (spec.clone(), link.clone()));
    tokio::spawn(async move {
        if let Some((spec, link)) = &ready_link {
            log::info(
                Who::Api,
                "core_client.py:455",
                &format!(
                    "Waiting for the {} data-parallel ranks to join at {}:{} (/health answers 503 until then)",
                    spec.size, spec.addr, spec.port
                ),
            );
            link.wait_complete().await;
            log::info(
                Who::Api,
                "core_client.py:470",
                "All data-parallel ranks have joined",
            );
        }
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
    );
    let served = match peer {
        // An external-LB rank lives as long as its place in the group.
        Some(spec) => tokio::select! {
            s = served => s,
            code = dp::join(spec, link) => return code,
        },
        None => served.await,
    };
    let why = match served {
        Ok(()) => "the HTTP server stopped".to_string(),
        Err(e) => format!("the HTTP server failed: {e}"),
    };
    let _ = fatal.send(why);
    pending::<i32>().await
}
