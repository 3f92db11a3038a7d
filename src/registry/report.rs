//! What `prl-flow plugins` and `prl-flow plugin test NAME` say: every backend with what it
//! says of itself ([`plugins_text`]), and the conformance scenario against one
//! ([`test_backend`]).

use std::time::Duration;

use prl_flow_plugin::Timeouts;
use serde_json::Value;

use super::plugins::{discover, locate};
use super::Registry;

/// The text of `prl-flow plugins`: every backend, and for each plugin what it says of
/// itself when started (or why it cannot be).
pub async fn plugins_text(registry: &Registry) -> String {
    let infos = discover(registry.site());
    let checks = infos.iter().map(|info| async move {
        let Some(path) = &info.path else {
            return ("ok", None);
        };
        let p = registry
            .plugin(info, path, &Value::Null)
            .with_timeouts(Timeouts::all(Duration::from_secs(5)));
        let said = match p.handshake().await {
            Ok(h) => {
                let caps = if h.capabilities.is_empty() {
                    "none".to_string()
                } else {
                    h.capabilities.join(", ")
                };
                let version = h
                    .extra
                    .get("version")
                    .and_then(Value::as_str)
                    .map(|v| format!(" {v}"))
                    .unwrap_or_default();
                let detail = format!(
                    "`{}`{version}, protocol {}, capabilities: {caps}",
                    h.name, h.protocol
                );
                ("ok", Some(detail))
            }
            Err(e) => (
                "error",
                Some(e.message.lines().next().unwrap_or_default().to_string()),
            ),
        };
        p.shutdown().await;
        said
    });
    let said = futures::future::join_all(checks).await;
    let width = infos.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<width$}  {:<8}  {:<6}  WHERE\n",
        "NAME", "KIND", "STATUS"
    );
    for (info, (status, detail)) in infos.iter().zip(said) {
        let kind = if info.path.is_some() {
            "plugin"
        } else {
            "built-in"
        };
        s.push_str(&format!(
            "{:<width$}  {kind:<8}  {status:<6}  {}\n",
            info.name,
            info.describe()
        ));
        if let Some(d) = detail {
            s.push_str(&format!("{:<width$}  {:<8}  {:<6}  {d}\n", "", "", ""));
        }
    }
    s
}

/// `prl-flow plugin test NAME`: the conformance scenario against a backend, each step
/// printed as it ends. `Ok(true)` if every step passed; `Err` if there is no such backend.
pub async fn test_backend(
    registry: &Registry,
    name: &str,
    print: &mut (dyn FnMut(&str) + Send),
) -> Result<bool, String> {
    let info = locate(name, registry.site(), &Value::Null)?;
    print(&format!(
        "conformance of backend `{}`: {}",
        info.name,
        info.describe()
    ));
    if let Some(path) = &info.path {
        let p = registry.plugin(&info, path, &Value::Null);
        match p.handshake().await {
            Ok(h) => print(&format!(
                "{:<8}{:<26}protocol {}, capabilities: {}",
                "ok",
                "handshake",
                h.protocol,
                h.capabilities.join(", ")
            )),
            Err(e) => {
                let mut lines = e.message.lines();
                print(&format!(
                    "{:<8}{:<26}{}",
                    "FAILED",
                    "handshake",
                    lines.next().unwrap_or_default()
                ));
                for l in lines {
                    print(&format!("          {l}"));
                }
                return Ok(false);
            }
        }
        p.shutdown().await;
    }
    let make = |/* a new backend object, and for a plugin a new process */| registry.by_name(name);
    let summary =
        prl_flow_plugin::conformance(&make, &prl_flow_plugin::Scenario::default(), &mut |step| {
            print(&step.line())
        })
        .await;
    print(&summary.line());
    Ok(summary.ok())
}
