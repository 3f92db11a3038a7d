//! The router's actions, as tasks of a deployment: `register` makes sure a router lists its
//! workers, `health-probe` proves the deployment answers (the router is ready, then one real
//! completion comes back through it).

use std::time::{Duration, Instant};

use prl_flow_engine::TaskError;
use serde_json::Value;

use async_trait::async_trait;
use prl_flow_engine::Handle;

use super::{Context, Perform};

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn arg(ex: &dyn Context, args: &Value, key: &str) -> Result<String, TaskError> {
    args.get(key)
        .and_then(Value::as_str)
        .map(|s| ex.resolve(s))
        .ok_or_else(|| TaskError::new(format!("built-in action lacks `{key}`")))
}

/// Every URL-looking string anywhere in a JSON answer.
fn urls_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => {
            out.push(s.trim_end_matches('/').to_string())
        }
        Value::Array(a) => a.iter().for_each(|x| urls_in(x, out)),
        Value::Object(o) => o.values().for_each(|x| urls_in(x, out)),
        _ => {}
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_default()
}

async fn listed(http: &reqwest::Client, router: &str) -> Result<Vec<String>, TaskError> {
    let url = format!("{router}/list_workers");
    let resp = http
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| TaskError::new(format!("GET {url}: {e}")))?;
    let body: Value = resp
        .json()
        .await
        .map_err(|e| TaskError::new(format!("GET {url}: not JSON: {e}")))?;
    let mut out = Vec::new();
    urls_in(&body, &mut out);
    Ok(out)
}

/// Regular mode: adds each worker the router does not list, and replaces the entry of each
/// worker whose engine this run restarted (a resume that kept the router): removed, then
/// added again, so the router drops what it knew of the old process. P/D mode: the lists
/// are fixed at the router's start, so check them.
async fn register(ex: &dyn Context, args: &Value) -> Result<(), TaskError> {
    let router = arg(ex, args, "router")?;
    if let Some(answer) = ex.backend().answer_call("register", &router).await {
        return answer.map_err(TaskError::new);
    }
    let http = client();
    let have = listed(&http, &router).await?;
    let mode = args
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("regular");
    let want: Vec<String> = if mode == "pd" {
        [strings(args, "prefill"), strings(args, "decode")].concat()
    } else {
        strings(args, "workers")
    };
    let task_of = |w: &str| {
        args.get("worker_tasks")
            .and_then(|t| t.get(w))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut missing = Vec::new();
    for raw in &want {
        let w = ex.resolve(raw).trim_end_matches('/').to_string();
        if mode != "pd" && task_of(raw).is_some_and(|t| ex.held(&t)) {
            if have.contains(&w) {
                worker_call(&http, &router, "remove_worker", &w).await?;
            }
            continue;
        }
        let restarted = task_of(raw).is_some_and(|t| ex.reruns(&t));
        if have.contains(&w) && !(restarted && mode != "pd") {
            continue;
        }
        if mode == "pd" {
            missing.push(w);
            continue;
        }
        if have.contains(&w) {
            worker_call(&http, &router, "remove_worker", &w).await?;
        }
        worker_call(&http, &router, "add_worker", &w).await?;
    }
    if !missing.is_empty() {
        return Err(TaskError::new(format!(
            "the router at {router} does not list {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// `POST ROUTER/ACTION?url=WORKER`, which must succeed.
async fn worker_call(
    http: &reqwest::Client,
    router: &str,
    action: &str,
    worker: &str,
) -> Result<(), TaskError> {
    let url = format!("{router}/{action}");
    let resp = http
        .post(&url)
        .query(&[("url", worker)])
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| TaskError::new(format!("POST {url}?url={worker}: {e}")))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(TaskError::new(format!(
            "the router at {router} refused `{action}` of worker {worker}: {status} {text}"
        )));
    }
    Ok(())
}

/// The router is ready, then one completion comes back through it.
async fn health_probe(ex: &dyn Context, args: &Value) -> Result<(), TaskError> {
    let router = arg(ex, args, "router")?;
    let model = args
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("default");
    if let Some(answer) = ex.backend().answer_call("health-probe", &router).await {
        return answer.map_err(TaskError::new);
    }
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(120);
    let readiness = format!("{router}/readiness");
    loop {
        match http
            .get(&readiness)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => break,
            other => {
                if Instant::now() > deadline {
                    let why = match other {
                        Ok(r) => format!("answered {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    return Err(TaskError::new(format!("GET {readiness} {why}")));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("{router}/v1/completions");
    let resp = http
        .post(&url)
        .header("X-Session-ID", "prl-flow-health-probe")
        .json(&serde_json::json!({ "model": model, "prompt": "Say hello.", "max_tokens": 8 }))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| TaskError::new(format!("POST {url}: {e}")))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let text = body
        .pointer("/choices/0/text")
        .and_then(Value::as_str)
        .map(String::from);
    match (status.is_success(), text) {
        (true, Some(_)) => Ok(()),
        _ => Err(TaskError::new(format!(
            "a completion through {url} failed: {status} {body}"
        ))),
    }
}

pub struct Register;

#[async_trait]
impl Perform for Register {
    async fn run(&self, cx: &dyn Context, args: &Value) -> Result<Option<Handle>, TaskError> {
        register(cx, args).await.map(|()| None)
    }
}

pub struct HealthProbe;

#[async_trait]
impl Perform for HealthProbe {
    async fn run(&self, cx: &dyn Context, args: &Value) -> Result<Option<Handle>, TaskError> {
        health_probe(cx, args).await.map(|()| None)
    }
}
