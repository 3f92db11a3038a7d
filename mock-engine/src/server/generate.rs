//! `/v1/completions` and `/v1/chat/completions`: checks of the request, the made-up answer
//! (plain or SSE), and the prefill/decode hand-over through the NIXL side channel.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json as AxumJson;
use serde_json::{json, Map, Value as Json};

use super::{
    authorized, bad_request, error, unauthorized, unix_now, AppState, DEFAULT_MAX_TOKENS, MAX_N,
};
use crate::kv::{self, FetchError, Fetched, Role};
use crate::log::{self, Who};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(state, Endpoint::Completions, headers, body).await
}

pub(super) async fn chat_completions(
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
    let tag = state.engine_tag();

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
            "mock_engine": tag,
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
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "mock_engine": tag})
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
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage, "mock_engine": tag})
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
