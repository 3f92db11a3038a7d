//! The OpenAI-compatible HTTP face of the mock engine (axum).
//!
//! Answers are made-up but deterministic: a completion is exactly `max_tokens` words (default
//! 16), and its first words say which engine answered (`mock@HOST:PORT role=...`), so a test
//! behind a router can tell replicas apart even with `max_tokens: 1`. A decode engine that
//! continued a remote prefill says so next (`continued-from-prefill engine=... at=...`), then
//! the prompt is echoed, then `tokN` filler. Every answer and SSE chunk also carries a
//! top-level `mock_engine` object (`rank`, `dp_size`, `addr`, `port`, `role`), which the
//! router passes through whatever `max_tokens` is. Request bodies are read as loose JSON: unknown
//! fields (the router adds SGLang-style ones) are ignored.
//!
//! Here: the shared state, the routes and the small endpoints; [`generate`] answers
//! completions and chat.

mod generate;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as AxumJson, Router};
use serde_json::{json, Value as Json};

use crate::config::EngineConfig;
use crate::dp::{Link, Master};
use crate::kv::Nixl;
use crate::log;

pub(crate) const VLLM_VERSION: &str = "0.33.0";
const DEFAULT_MAX_TOKENS: i64 = 16;
const MAX_N: i64 = 128;

#[derive(Default)]
struct Metrics {
    running: AtomicI64,
    success: AtomicU64,
    failed: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
}

/// Shared by every handler.
pub(crate) struct AppState {
    pub(crate) cfg: Arc<EngineConfig>,
    /// Set once start-up is complete (remote ranks joined, if any).
    pub(crate) started: AtomicBool,
    pub(crate) master: Option<Arc<Master>>,
    /// An external-LB rank's place in its group.
    pub(crate) link: Option<Arc<Link>>,
    pub(crate) nixl: Option<Arc<Nixl>>,
    /// `host:port` this engine answers on, as it names itself in answers.
    pub(crate) addr: String,
    metrics: Metrics,
    counter: AtomicU64,
    created: u64,
}

impl AppState {
    pub(crate) fn new(
        cfg: Arc<EngineConfig>,
        master: Option<Arc<Master>>,
        link: Option<Arc<Link>>,
        nixl: Option<Arc<Nixl>>,
        addr: String,
    ) -> AppState {
        AppState {
            cfg,
            started: AtomicBool::new(false),
            master,
            link,
            nixl,
            addr,
            metrics: Metrics::default(),
            counter: AtomicU64::new(0),
            created: unix_now(),
        }
    }

    fn healthy(&self) -> bool {
        self.started.load(Ordering::SeqCst)
            && self.master.as_ref().map_or(true, |m| m.ready())
            && self.link.as_ref().map_or(true, |l| l.complete())
    }

    fn not_ready_reason(&self) -> String {
        match &self.master {
            Some(m) if !m.ready() => format!(
                "engine is not ready: {}/{} remote rank(s) have joined at {}:{}",
                m.joined(),
                m.spec().needed,
                m.spec().addr,
                m.spec().port
            ),
            _ if self.link.as_ref().is_some_and(|l| !l.complete()) => format!(
                "engine is not ready: data-parallel rank {} waits for its group of {} to be complete",
                self.cfg.rank, self.cfg.dp_size
            ),
            _ => "engine is not ready".to_string(),
        }
    }

    fn role_label(&self) -> &'static str {
        self.cfg
            .kv
            .as_ref()
            .map_or("standalone", |k| k.role.label())
    }

    /// Who answered, for the `mock_engine` field of every completion.
    fn engine_tag(&self) -> Json {
        let port = self
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok());
        json!({
            "rank": self.cfg.rank,
            "dp_size": self.cfg.dp_size,
            "addr": self.addr,
            "port": port,
            "role": self.role_label(),
        })
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}", crate::random_hex(n))
    }
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// uvicorn's access log line.
async fn access_log(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".into());
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let resp = next.run(req).await;
    if state.cfg.access_log {
        let status = resp.status();
        log::access(&format!(
            "{peer} - \"{method} {target} HTTP/1.1\" {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ));
    }
    resp
}

async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn version() -> AxumJson<Json> {
    AxumJson(json!({ "version": VLLM_VERSION }))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        AxumJson(json!({"detail": "Not Found"})),
    )
        .into_response()
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({
        "error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": status.as_u16(),
        }
    });
    (status, AxumJson(body)).into_response()
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "BadRequestError", message)
}

/// vLLM checks `Authorization: Bearer KEY` on `/v1` routes when `--api-key` (or
/// `VLLM_API_KEY`) is set.
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    if state.cfg.api_keys.is_empty() {
        return true;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| state.cfg.api_keys.iter().any(|k| k == g))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        AxumJson(json!({"error": "Unauthorized"})),
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let data: Vec<Json> = state
        .cfg
        .served
        .iter()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "vllm",
                "root": state.cfg.model,
                "parent": null,
                "max_model_len": state.cfg.max_model_len,
                "permission": [],
            })
        })
        .collect();
    AxumJson(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let labels = format!(
        "engine=\"0\",model_name=\"{}\"",
        state.cfg.served.first().map(String::as_str).unwrap_or("")
    );
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (l, v) in lines {
            out.push_str(&format!("{name}{{{l}}} {v:?}\n"));
        }
    };
    let running = m.running.load(Ordering::Relaxed).max(0) as f64;
    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        &[(labels.clone(), running)],
    );
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        &[(labels.clone(), 0.0)],
    );
    metric(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        &[(labels.clone(), 0.0)],
    );
    metric(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        &[
            (
                format!("{labels},finished_reason=\"length\""),
                m.success.load(Ordering::Relaxed) as f64,
            ),
            (format!("{labels},finished_reason=\"stop\""), 0.0),
        ],
    );
    metric(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        &[(
            labels.clone(),
            m.prompt_tokens.load(Ordering::Relaxed) as f64,
        )],
    );
    metric(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        &[(
            labels.clone(),
            m.generation_tokens.load(Ordering::Relaxed) as f64,
        )],
    );
    metric(
        "vllm:request_failure_total",
        "counter",
        "Count of requests that failed (mock-only).",
        &[(labels, m.failed.load(Ordering::Relaxed) as f64)],
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
