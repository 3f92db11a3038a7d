//! The OpenAI-compatible HTTP face of the mock engine (axum).
//!
//! Answers are made-up but deterministic: a completion is exactly `max_tokens` words (default
//! 16), and its first words say which engine answered (`mock@HOST:PORT role=...`), so a test
//! behind a router can tell replicas apart even with `max_tokens: 1`. A decode engine that
//! continued a remote prefill says so next (`continued-from-prefill engine=... at=...`), then
//! the prompt is echoed, then `tokN` filler. Request bodies are read as loose JSON: unknown
//! fields (the router adds SGLang-style ones) are ignored.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as AxumJson, Router};
use serde_json::{json, Map, Value as Json};

use crate::config::EngineConfig;
use crate::dp::Master;
use crate::kv::{self, FetchError, Fetched, Nixl, Role};
use crate::log::{self, Who};

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
        nixl: Option<Arc<Nixl>>,
        addr: String,
    ) -> AppState {
        AppState {
            cfg,
            started: AtomicBool::new(false),
            master,
            nixl,
            addr,
            metrics: Metrics::default(),
            counter: AtomicU64::new(0),
            created: unix_now(),
        }
    }

    fn healthy(&self) -> bool {
        self.started.load(Ordering::SeqCst)
            && match &self.master {
                Some(m) => m.ready(),
                None => true,
            }
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
            _ => "engine is not ready".to_string(),
        }
    }

    fn role_label(&self) -> &'static str {
        self.cfg
            .kv
            .as_ref()
            .map_or("standalone", |k| k.role.label())
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
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, Endpoint::Completions, headers, body).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, Endpoint::Chat, headers, body).await
}

/// Decrements the running gauge however the handler ends.
struct Running<'a>(&'a AtomicI64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn generate(state: Arc<AppState>, ep: Endpoint, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if !state.healthy() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            &state.not_ready_reason(),
        );
    }
    let req: Map<String, Json> = match serde_json::from_slice::<Json>(&body) {
        Ok(Json::Object(m)) => m,
        Ok(_) => return bad_request("the request body must be a JSON object"),
        Err(e) => return bad_request(&format!("invalid JSON body: {e}")),
    };
    if let Some(model) = req.get("model").and_then(Json::as_str) {
        if !state.cfg.served.iter().any(|s| s == model) {
            return error(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                &format!("The model `{model}` does not exist."),
            );
        }
    }
    let model = req
        .get("model")
        .and_then(Json::as_str)
        .map(str::to_string)
        .or_else(|| state.cfg.served.first().cloned())
        .unwrap_or_default();
    let prompts = match ep {
        Endpoint::Completions => completion_prompts(req.get("prompt")),
        Endpoint::Chat => chat_prompt(req.get("messages")).map(|p| vec![p]),
    };
    let prompts = match prompts {
        Ok(p) => p,
        Err(msg) => return bad_request(&msg),
    };
    let max_tokens = {
        let raw = match ep {
            Endpoint::Chat => req
                .get("max_completion_tokens")
                .filter(|v| !v.is_null())
                .or_else(|| req.get("max_tokens")),
            Endpoint::Completions => req.get("max_tokens"),
        };
        match raw {
            None | Some(Json::Null) => DEFAULT_MAX_TOKENS,
            Some(v) => match v.as_i64() {
                Some(n) if n >= 1 => n,
                Some(n) => return bad_request(&format!("max_tokens must be at least 1, got {n}.")),
                None => return bad_request(&format!("max_tokens must be an integer, got {v}")),
            },
        }
    };
    let n = match req.get("n") {
        None | Some(Json::Null) => 1,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=MAX_N).contains(&n) => n,
            _ => return bad_request(&format!("n must be an integer from 1 to {MAX_N}, got {v}")),
        },
    };
    let prompt_tokens: Vec<usize> = prompts
        .iter()
        .map(|p| p.split_whitespace().count().max(1))
        .collect();
    if let Some(&longest) = prompt_tokens.iter().max() {
        let total = longest as i64 + max_tokens;
        if total > state.cfg.max_model_len {
            let what = if ep == Endpoint::Chat {
                "messages"
            } else {
                "prompt"
            };
            return bad_request(&format!(
                "This model's maximum context length is {} tokens. However, you requested {total} \
                 tokens ({longest} in the {what}, {max_tokens} in the completion). Please reduce \
                 the length of the {what} or completion.",
                state.cfg.max_model_len
            ));
        }
    }
    let stream = req.get("stream").and_then(Json::as_bool).unwrap_or(false);
    let include_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let echo =
        ep == Endpoint::Completions && req.get("echo").and_then(Json::as_bool).unwrap_or(false);
    let kv_params = req.get("kv_transfer_params").and_then(Json::as_object);

    let id = state.next_id(match ep {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    });
    let first_prompt = prompts.first().cloned().unwrap_or_default();
    let metrics = &state.metrics;
    metrics.running.fetch_add(1, Ordering::Relaxed);
    let _running = Running(&metrics.running);
    log::info(
        Who::Api,
        "logger.py:49",
        &format!(
            "Received request {id}: prompt: {}, params: SamplingParams(n={n}, max_tokens={max_tokens}), \
             stream: {stream}, kv_transfer_params: {}",
            crate::args::py_repr(&shorten(&first_prompt, 80)),
            kv_params.map_or("None".to_string(), |p| Json::Object(p.clone()).to_string())
        ),
    );

    // Prefill/decode hand-over.
    let mut fetched: Option<Fetched> = None;
    let mut register = false;
    match (kv_params, &state.nixl) {
        (Some(p), Some(nixl)) => {
            if p.get("do_remote_prefill") == Some(&Json::Bool(true)) {
                if nixl.role == Role::Producer {
                    log::warn(
                        Who::Engine(0),
                        "nixl_connector.py:640",
                        &format!("Request {id} asks to pull remote KV blocks, but this engine is kv_producer"),
                    );
                }
                match kv::fetch(p, &first_prompt).await {
                    Ok(f) => {
                        log::info(
                            Who::Engine(0),
                            "nixl_connector.py:1410",
                            &format!(
                                "Request {id}: read {} KV block(s) of request {} from engine {} at {}:{}",
                                f.block_ids.len(),
                                f.request_id,
                                f.engine_id,
                                f.host,
                                f.port
                            ),
                        );
                        fetched = Some(f);
                    }
                    Err(FetchError::BadParams(m)) => {
                        metrics.failed.fetch_add(1, Ordering::Relaxed);
                        return bad_request(&m);
                    }
                    Err(FetchError::Transfer(m)) => {
                        metrics.failed.fetch_add(1, Ordering::Relaxed);
                        log::error(Who::Engine(0), "nixl_connector.py:1422", &format!("Request {id}: {m}"));
                        return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", &m);
                    }
                }
            } else if p.get("do_remote_decode") == Some(&Json::Bool(true)) {
                if nixl.role == Role::Consumer {
                    log::warn(
                        Who::Engine(0),
                        "nixl_connector.py:655",
                        &format!("Request {id} asks this kv_consumer engine to prefill for a remote decode"),
                    );
                }
                register = true;
            }
        }
        (Some(_), None) => log::warn(
            Who::Api,
            "serving_engine.py:301",
            &format!("Request {id}: kv_transfer_params ignored: no NixlConnector in --kv-transfer-config"),
        ),
        (None, _) => {}
    }

    // One choice per prompt and per n.
    let mut choices: Vec<(usize, String, usize)> = Vec::new(); // (index, text, words)
    for (pi, prompt) in prompts.iter().enumerate() {
        for k in 0..n as usize {
            let index = pi * n as usize + k;
            let words = answer_words(&state, prompt, fetched.as_ref(), index, max_tokens as usize);
            let mut text = words.join(" ");
            if echo {
                text = format!("{prompt}{text}");
            }
            choices.push((index, text, words.len()));
        }
    }
    let kv_out = match (&state.nixl, register) {
        (Some(nixl), true) => {
            let first = answer_words(&state, &first_prompt, None, 0, 1).join(" ");
            let p = nixl.register(
                &id,
                &first_prompt,
                &first,
                prompt_tokens.first().copied().unwrap_or(1),
            );
            log::info(
                Who::Engine(0),
                "nixl_connector.py:980",
                &format!("Request {id}: prefilled, KV blocks held for a remote decode: {p}"),
            );
            p
        }
        _ => Json::Null,
    };
    let prompt_total: usize = prompt_tokens.iter().sum();
    let completion_total: usize = choices.iter().map(|c| c.2).sum();
    metrics.success.fetch_add(1, Ordering::Relaxed);
    metrics
        .prompt_tokens
        .fetch_add(prompt_total as u64, Ordering::Relaxed);
    metrics
        .generation_tokens
        .fetch_add(completion_total as u64, Ordering::Relaxed);
    let usage = json!({
        "prompt_tokens": prompt_total,
        "total_tokens": prompt_total + completion_total,
        "completion_tokens": completion_total,
        "prompt_tokens_details": null,
    });
    let created = unix_now();

    if !stream {
        let choices: Vec<Json> = choices
            .iter()
            .map(|(index, text, _)| match ep {
                Endpoint::Completions => json!({
                    "index": index, "text": text, "logprobs": null,
                    "finish_reason": "length", "stop_reason": null, "prompt_logprobs": null,
                }),
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text, "reasoning_content": null, "tool_calls": []},
                    "logprobs": null, "finish_reason": "length", "stop_reason": null,
                }),
            })
            .collect();
        let object = match ep {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        return AxumJson(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": choices, "usage": usage, "system_fingerprint": null,
            "prompt_logprobs": null, "kv_transfer_params": kv_out,
        }))
        .into_response();
    }

    // Server-sent events: one chunk per word, then a closing chunk per choice.
    let object = match ep {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    let mut events: Vec<String> = Vec::new();
    let chunk = |choice: Json| -> String {
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
            .to_string()
    };
    for (index, text, _) in &choices {
        if ep == Endpoint::Chat {
            events.push(chunk(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
        }
        for (i, word) in text.split(' ').enumerate() {
            let piece = if i == 0 {
                word.to_string()
            } else {
                format!(" {word}")
            };
            events.push(chunk(match ep {
                Endpoint::Completions => json!({"index": index, "text": piece, "logprobs": null, "finish_reason": null, "stop_reason": null}),
                Endpoint::Chat => json!({"index": index, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}),
            }));
        }
        let mut last = match ep {
            Endpoint::Completions => {
                json!({"index": index, "text": "", "logprobs": null, "finish_reason": "length", "stop_reason": null})
            }
            Endpoint::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": "length", "stop_reason": null})
            }
        };
        if !kv_out.is_null() {
            if let Some(obj) = last.as_object_mut() {
                obj.insert("kv_transfer_params".into(), kv_out.clone());
            }
        }
        events.push(chunk(last));
    }
    if include_usage {
        events.push(
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
                .to_string(),
        );
    }
    let mut body = String::new();
    for e in events {
        body.push_str("data: ");
        body.push_str(&e);
        body.push_str("\n\n");
    }
    body.push_str("data: [DONE]\n\n");
    // One frame per event would be closer to vLLM; a single body is simpler and every SSE
    // client reads it the same way.
    let stream = futures::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(body))]);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The words of one answer, exactly `max_tokens` of them.
fn answer_words(
    state: &AppState,
    prompt: &str,
    fetched: Option<&Fetched>,
    index: usize,
    max_tokens: usize,
) -> Vec<String> {
    let mut w = vec![
        format!("mock@{}", state.addr),
        format!("role={}", state.role_label()),
    ];
    if let Some(f) = fetched {
        w.push("continued-from-prefill".into());
        w.push(format!("engine={}", f.engine_id));
        w.push(format!("at={}:{}", f.host, f.port));
        w.push(format!("blocks={}", f.block_ids.len()));
        w.push(format!("first-token={}", f.first_token));
    }
    if index > 0 {
        w.push(format!("choice={index}"));
    }
    w.push("echo:".into());
    w.extend(prompt.split_whitespace().take(32).map(str::to_string));
    while w.len() < max_tokens {
        w.push(format!("tok{}", w.len() + 1));
    }
    w.truncate(max_tokens);
    w
}

fn completion_prompts(prompt: Option<&Json>) -> Result<Vec<String>, String> {
    let missing = || "Either prompt or prompt_embeds must be provided and non-empty.".to_string();
    let ids = |a: &[Json]| -> Option<String> {
        let ids: Option<Vec<String>> = a
            .iter()
            .map(|t| t.as_i64().map(|i| i.to_string()))
            .collect();
        ids.map(|v| v.join(" "))
    };
    match prompt {
        Some(Json::String(s)) => Ok(vec![s.clone()]),
        Some(Json::Array(items)) if !items.is_empty() => {
            if items.iter().all(Json::is_string) {
                Ok(items
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect())
            } else if let Some(one) = ids(items) {
                Ok(vec![one])
            } else {
                items
                    .iter()
                    .map(|i| i.as_array().and_then(|a| ids(a)).ok_or_else(missing))
                    .collect()
            }
        }
        _ => Err(missing()),
    }
}

fn chat_prompt(messages: Option<&Json>) -> Result<String, String> {
    let msgs = messages
        .and_then(Json::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("`messages` is required and must be a non-empty list")?;
    let mut lines = Vec::new();
    for m in msgs {
        let role = m.get("role").and_then(Json::as_str).unwrap_or("user");
        let content = match m.get("content") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(parts)) => parts
                .iter()
                .map(|p| match p.get("text").and_then(Json::as_str) {
                    Some(t) => t.to_string(),
                    None => format!(
                        "[{}]",
                        p.get("type").and_then(Json::as_str).unwrap_or("part")
                    ),
                })
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
        lines.push(format!("{role}: {content}"));
    }
    Ok(lines.join("\n"))
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push_str("...");
        t
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts() {
        assert_eq!(
            completion_prompts(Some(&json!("hi there"))),
            Ok(vec!["hi there".to_string()])
        );
        assert_eq!(
            completion_prompts(Some(&json!(["a", "b"]))).map(|v| v.len()),
            Ok(2)
        );
        assert_eq!(
            completion_prompts(Some(&json!([1, 2, 3]))),
            Ok(vec!["1 2 3".to_string()])
        );
        assert_eq!(
            completion_prompts(Some(&json!([[1], [2, 3]]))).map(|v| v.len()),
            Ok(2)
        );
        assert!(completion_prompts(None).is_err());
        assert!(completion_prompts(Some(&json!([]))).is_err());
        let chat = chat_prompt(Some(&json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url"}]}
        ])));
        assert_eq!(
            chat,
            Ok("system: be brief\nuser: hello [image_url]".to_string())
        );
        assert!(chat_prompt(Some(&json!([]))).is_err());
    }
}
