//! The deployment's task kinds: the names a recipe's `[[task]]` entries may give in `needs`
//! and `before`, and how `graph --format dot` draws each. Three of them are built-in actions
//! ([`Action`]); the rest are processes the plan starts. And, once a deployment is up, the
//! request that tries it ([`try_it`]).

use crate::actions::Action;

pub const ALLOCATE: &str = Action::Allocate.name();
pub const REGISTER: &str = Action::Register.name();
pub const HEALTH_PROBE: &str = Action::HealthProbe.name();

/// Every kind, in the order a deployment's tasks start.
pub const KINDS: &[&str] = &[
    ALLOCATE,
    "mooncake-master",
    "metadata-server",
    "mooncake-client",
    "engine",
    "prefill",
    "decode",
    "router",
    REGISTER,
    HEALTH_PROBE,
];

/// Shape and colour of a deployment's kind in DOT, so its structure shows at a glance.
pub fn dot_style(kind: &str) -> Option<&'static str> {
    Some(match kind {
        ALLOCATE => "shape=folder, fillcolor=\"#eeeeee\"",
        "mooncake-master" | "metadata-server" | "mooncake-client" => {
            "shape=cylinder, fillcolor=\"#ffe0b2\""
        }
        "engine" => "shape=box3d, fillcolor=\"#c8e6c9\"",
        "prefill" => "shape=box3d, fillcolor=\"#bbdefb\"",
        "decode" => "shape=box3d, fillcolor=\"#d1c4e9\"",
        "router" => "shape=hexagon, fillcolor=\"#fff59d\"",
        REGISTER => "shape=cds, fillcolor=\"#f0f4c3\"",
        HEALTH_PROBE => "shape=doubleoctagon, fillcolor=\"#b2dfdb\"",
        _ => return None,
    })
}

/// Where a deployment answers, and a request to try it with.
pub fn try_it(plan: &crate::plan::Plan, url: &str) -> String {
    let model = plan
        .tasks
        .iter()
        .find_map(|t| match &t.command {
            crate::plan::Command::Builtin {
                action: crate::actions::Action::HealthProbe,
                args,
            } => args.get("model").and_then(|m| m.as_str()).map(String::from),
            _ => None,
        })
        .unwrap_or_else(|| "default".into());
    // The request body is JSON made by serde, and every value reaches the shell as one
    // quoted word: a model name may hold quotes, `$(...)`, anything.
    let body = serde_json::json!({ "model": model, "prompt": "Hello", "max_tokens": 16 });
    let q = crate::plan::shell_word;
    // Several routers (one per P/D unit): each is an endpoint; the example uses the first.
    let urls: Vec<&str> = url.split_whitespace().collect();
    let first = urls.first().copied().unwrap_or(url);
    let head = if urls.len() > 1 {
        let mut h = format!("endpoints ({}, one per unit):\n", urls.len());
        for (i, u) in urls.iter().enumerate() {
            h.push_str(&format!("  [{i}] {u}\n"));
        }
        h
    } else {
        format!("endpoint: {first}\n")
    };
    format!(
        "{head}try:\n  curl -s {} -H {} -H {} \\\n    -d {}\n",
        q(&format!("{first}/v1/completions")),
        q("Content-Type: application/json"),
        q("X-Session-ID: demo"),
        q(&body.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_routers_are_one_endpoint_each() {
        let plan = crate::plan::Plan::default();
        let one = try_it(&plan, "http://a:1");
        assert!(one.starts_with("endpoint: http://a:1\n"), "{one}");
        let two = try_it(&plan, "http://a:1 http://b:1");
        assert!(
            two.starts_with("endpoints (2, one per unit):\n  [0] http://a:1\n  [1] http://b:1\n"),
            "{two}"
        );
        assert!(two.contains("curl -s http://a:1/v1/completions"), "{two}");
    }
}
