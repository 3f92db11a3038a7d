//! KV-transfer config and the mock NIXL side channel.
//!
//! In vLLM's prefill/decode disaggregation with the NixlConnector, the prefill engine computes
//! a prompt's KV cache and keeps its blocks; the decode engine pulls those blocks over NIXL
//! (RDMA/UCX) after a handshake on the *side channel*, a TCP port given by the environment
//! variables `VLLM_NIXL_SIDE_CHANNEL_HOST` / `VLLM_NIXL_SIDE_CHANNEL_PORT` (default port 5600).
//! The mock makes that hand-over real on TCP, so a wrongly wired deployment (decode pointed at
//! the wrong prefill, side-channel ports clashing, the router not passing `kv_transfer_params`)
//! fails the way it would with real engines:
//!
//! * every engine with a Nixl connector listens on the side channel (real vLLM does too, for
//!   every role, which is why two engines on one host need distinct ports), on
//!   `VLLM_NIXL_SIDE_CHANNEL_PORT` plus its global data-parallel rank: one port per engine
//!   core, whatever its TP size (vLLM 0.33 `nixl/base_scheduler.py:77-80`);
//! * a prefill request (`kv_transfer_params.do_remote_decode: true`) stores the prompt under
//!   the request id with freshly numbered block ids, for `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`
//!   seconds (default 480, as in vLLM), and answers with the `kv_transfer_params` the router
//!   forwards to the decode engine;
//! * a decode request (`do_remote_prefill: true`) connects to `remote_host:remote_port` and
//!   reads the blocks. One read frees them, as vLLM frees the prefill's blocks once the decode
//!   side reports it has them.
//!
//! Side-channel protocol: one JSON object per line, one request and one reply per exchange,
//! several exchanges per connection allowed.
//!
//! ```text
//! decode → prefill  {"op":"read","engine_id":"E","request_id":"R","block_ids":[0,1]}
//! prefill → decode  {"ok":true,"engine_id":"E","request_id":"R","block_ids":[0,1],
//!                    "prompt":"...","first_token":"..."}
//!               or  {"ok":false,"error":"no prefilled KV blocks for request R ..."}
//! ```
//!
//! The decode side checks that the prompt it was given is the one that was prefilled: the
//! router must send both engines the same request.
//!
//! Here: `--kv-transfer-config` and the side-channel settings; [`nixl`] is the side channel.

mod nixl;

use std::time::Duration;

use serde_json::Value as Json;

pub(crate) use self::nixl::{fetch, FetchError, Fetched, Nixl};

pub(crate) const DEFAULT_SIDE_CHANNEL_PORT: u16 = 5600;
const DEFAULT_ABORT_TIMEOUT_S: u64 = 480;

/// Connector names vLLM 0.33 registers. A name outside this list makes vLLM fail at start
/// ("Unsupported connector type"), unless `kv_connector_module_path` points at a plugin.
const KNOWN_CONNECTORS: &[&str] = &[
    "NixlConnector",
    "MultiConnector",
    "OffloadingConnector",
    "MooncakeStoreConnector",
    "MooncakeConnector",
    "LMCacheConnectorV1",
    "LMCacheMPConnector",
    "P2pNcclConnector",
    "SharedStorageConnector",
    "ExampleConnector",
    "DecodeBenchConnector",
    "MoRIIOConnector",
    "FlexKVConnectorV1",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Producer,
    Consumer,
    Both,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "kv_producer" => Some(Role::Producer),
            "kv_consumer" => Some(Role::Consumer),
            "kv_both" => Some(Role::Both),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "kv_producer",
            Role::Consumer => "kv_consumer",
            Role::Both => "kv_both",
        }
    }

    /// The word the mock puts in its answers.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Role::Producer => "prefill",
            Role::Consumer => "decode",
            Role::Both => "prefill+decode",
        }
    }
}

/// What the mock needs from `--kv-transfer-config`.
#[derive(Clone, Debug)]
pub(crate) struct KvConfig {
    pub(crate) role: Role,
    pub(crate) engine_id: Option<String>,
    /// A NixlConnector is configured, directly or inside a MultiConnector.
    pub(crate) nixl: bool,
    /// Every connector, MultiConnector's parts flattened, for the start-up log.
    pub(crate) connectors: Vec<String>,
}

/// Reads `--kv-transfer-config`. `Ok(None)` when no connector is configured. Errors are the
/// config errors vLLM raises while building its engine config (exit 1).
pub(crate) fn parse_config(
    cfg: &Json,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<KvConfig>, String> {
    let obj = cfg
        .as_object()
        .ok_or_else(|| format!("--kv-transfer-config must be a JSON object, got {cfg}"))?;
    let connector = match obj.get("kv_connector") {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::String(s)) => s.clone(),
        Some(other) => return Err(format!("kv_connector must be a string, got {other}")),
    };
    let roles = "['kv_producer', 'kv_consumer', 'kv_both']";
    let role = match obj.get("kv_role") {
        None | Some(Json::Null) => {
            return Err(format!(
                "Please specify kv_role when kv_connector is set, supported roles are {roles}"
            ))
        }
        Some(Json::String(s)) => Role::parse(s)
            .ok_or_else(|| format!("Unsupported kv_role: {s}. Supported roles are {roles}"))?,
        Some(other) => return Err(format!("kv_role must be a string, got {other}")),
    };
    let engine_id = obj
        .get("engine_id")
        .and_then(Json::as_str)
        .map(str::to_string);
    let plugin = obj
        .get("kv_connector_module_path")
        .is_some_and(|p| !p.is_null());

    // The top-level name first, then MultiConnector's parts.
    let mut connectors = vec![connector.clone()];
    if connector == "MultiConnector" {
        let parts = obj
            .get("kv_connector_extra_config")
            .and_then(|e| e.get("connectors"))
            .and_then(Json::as_array)
            .ok_or("MultiConnector needs kv_connector_extra_config.connectors, a list of connector configs")?;
        if parts.is_empty() {
            return Err("MultiConnector's kv_connector_extra_config.connectors is empty".into());
        }
        for part in parts {
            let name = part
                .get("kv_connector")
                .and_then(Json::as_str)
                .ok_or_else(|| {
                    format!("each MultiConnector entry needs a kv_connector, got {part}")
                })?;
            if let Some(r) = part.get("kv_role").and_then(Json::as_str) {
                Role::parse(r).ok_or_else(|| {
                    format!("Unsupported kv_role: {r} (in MultiConnector entry {name})")
                })?;
            }
            let part_plugin = part
                .get("kv_connector_module_path")
                .is_some_and(|p| !p.is_null());
            check_known(name, part_plugin)?;
            connectors.push(name.to_string());
        }
    } else {
        check_known(&connector, plugin)?;
    }

    if connectors.iter().any(|c| c == "MooncakeStoreConnector") {
        check_mooncake_config(env)?;
    }
    Ok(Some(KvConfig {
        nixl: connectors.iter().any(|c| c == "NixlConnector"),
        role,
        engine_id,
        connectors,
    }))
}

fn check_known(name: &str, plugin: bool) -> Result<(), String> {
    if plugin || KNOWN_CONNECTORS.contains(&name) {
        return Ok(());
    }
    let hint = KNOWN_CONNECTORS
        .iter()
        .find(|k| strsim::jaro_winkler(&k.to_lowercase(), &name.to_lowercase()) > 0.9)
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    Err(format!(
        "Unsupported connector type: {name}{hint}; known connectors: {}",
        KNOWN_CONNECTORS.join(", ")
    ))
}

/// MooncakeStoreConnector reads its store settings from the JSON file named by
/// `MOONCAKE_CONFIG_PATH` at start; a missing or broken file kills the engine there.
fn check_mooncake_config(env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    let Some(path) = env("MOONCAKE_CONFIG_PATH").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!("MooncakeStoreConnector: cannot read MOONCAKE_CONFIG_PATH `{path}`: {e}")
    })?;
    serde_json::from_str::<Json>(&text).map_err(|e| {
        format!("MooncakeStoreConnector: MOONCAKE_CONFIG_PATH `{path}` is not valid JSON: {e}")
    })?;
    Ok(())
}

/// Side-channel address and block lifetime from the environment, as vLLM's NIXL connector
/// reads them.
#[derive(Debug)]
pub(crate) struct SideChannel {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) ttl: Duration,
}

pub(crate) fn side_channel_from_env(
    env: &dyn Fn(&str) -> Option<String>,
    default_host: &str,
) -> Result<SideChannel, String> {
    let host = env("VLLM_NIXL_SIDE_CHANNEL_HOST")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| default_host.to_string());
    let port = match env("VLLM_NIXL_SIDE_CHANNEL_PORT").filter(|p| !p.is_empty()) {
        None => DEFAULT_SIDE_CHANNEL_PORT,
        Some(p) => p.trim().parse().map_err(|_| {
            format!("VLLM_NIXL_SIDE_CHANNEL_PORT=`{p}` is not a port number (1-65535)")
        })?,
    };
    let ttl = match env("VLLM_NIXL_ABORT_REQUEST_TIMEOUT").filter(|p| !p.is_empty()) {
        None => DEFAULT_ABORT_TIMEOUT_S,
        Some(t) => t.trim().parse().map_err(|_| {
            format!("VLLM_NIXL_ABORT_REQUEST_TIMEOUT=`{t}` is not a whole number of seconds")
        })?,
    };
    Ok(SideChannel {
        host,
        port,
        ttl: Duration::from_secs(ttl),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn configs() {
        let c = parse_config(
            &json!({"kv_connector": "NixlConnector", "kv_role": "kv_producer"}),
            &no_env,
        )
        .expect("valid")
        .expect("a connector");
        assert!(c.nixl);
        assert_eq!(c.role, Role::Producer);

        let multi = json!({
            "kv_connector": "MultiConnector", "kv_role": "kv_consumer",
            "kv_connector_extra_config": {"connectors": [
                {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"},
                {"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {}}
            ]}
        });
        let c = parse_config(&multi, &no_env)
            .expect("valid")
            .expect("a connector");
        assert!(c.nixl);
        assert_eq!(
            c.connectors,
            ["MultiConnector", "NixlConnector", "OffloadingConnector"]
        );

        assert!(parse_config(&json!({}), &no_env).expect("valid").is_none());
        let e = parse_config(&json!({"kv_connector": "NixlConnector"}), &no_env)
            .expect_err("must be refused");
        assert!(e.contains("Please specify kv_role"), "{e}");
        let e = parse_config(
            &json!({"kv_connector": "NixlConnector", "kv_role": "producer"}),
            &no_env,
        )
        .expect_err("must be refused");
        assert!(e.starts_with("Unsupported kv_role: producer"), "{e}");
        let e = parse_config(
            &json!({"kv_connector": "NIXLConnector", "kv_role": "kv_both"}),
            &no_env,
        )
        .expect_err("must be refused");
        assert!(e.contains("did you mean `NixlConnector`"), "{e}");
        let e = parse_config(
            &json!({"kv_connector": "MultiConnector", "kv_role": "kv_both"}),
            &no_env,
        )
        .expect_err("must be refused");
        assert!(e.contains("kv_connector_extra_config.connectors"), "{e}");
    }

    #[test]
    fn mooncake_config_path() {
        let store = json!({"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both"});
        assert!(parse_config(&store, &no_env).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"master_server_address": "127.0.0.1:50051"}"#).expect("write");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{nope").expect("write");
        let with = |p: std::path::PathBuf| {
            let p = p.to_string_lossy().into_owned();
            move |k: &str| (k == "MOONCAKE_CONFIG_PATH").then(|| p.clone())
        };
        assert!(parse_config(&store, &with(good)).is_ok());
        let e = parse_config(&store, &with(bad)).expect_err("must be refused");
        assert!(e.contains("is not valid JSON"), "{e}");
        let e = parse_config(&store, &with(dir.path().join("missing.json")))
            .expect_err("must be refused");
        assert!(e.contains("cannot read MOONCAKE_CONFIG_PATH"), "{e}");
    }

    #[test]
    fn side_channel_env() {
        let s = side_channel_from_env(&no_env, "127.0.0.1").expect("defaults");
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 5600));
        let env = |k: &str| match k {
            "VLLM_NIXL_SIDE_CHANNEL_HOST" => Some("127.0.0.2".to_string()),
            "VLLM_NIXL_SIDE_CHANNEL_PORT" => Some("5601".to_string()),
            _ => None,
        };
        let s = side_channel_from_env(&env, "127.0.0.1").expect("set");
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.2", 5601));
        let bad = |k: &str| (k == "VLLM_NIXL_SIDE_CHANNEL_PORT").then(|| "x".to_string());
        assert!(side_channel_from_env(&bad, "h").is_err());
    }
}
