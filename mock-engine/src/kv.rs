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
//!   every role, which is why two engines on one host need distinct ports);
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value as Json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::log::{self, Who};

pub(crate) const DEFAULT_SIDE_CHANNEL_PORT: u16 = 5600;
const DEFAULT_ABORT_TIMEOUT_S: u64 = 480;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_LINE: u64 = 16 << 20;

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

struct Prefilled {
    prompt: String,
    first_token: String,
    block_ids: Vec<u64>,
    at: Instant,
}

/// The NIXL side of one engine: its identity, its side-channel address and, for prefill work,
/// the blocks it holds.
pub(crate) struct Nixl {
    pub(crate) engine_id: String,
    pub(crate) role: Role,
    pub(crate) host: String,
    pub(crate) port: u16,
    block_size: usize,
    ttl: Duration,
    store: Mutex<HashMap<String, Prefilled>>,
    next_block: AtomicU64,
}

impl Nixl {
    /// Binds the side channel; the caller spawns [`Nixl::serve`] with the listener.
    pub(crate) async fn bind(
        engine_id: String,
        role: Role,
        side: &SideChannel,
        block_size: usize,
    ) -> Result<(Arc<Nixl>, TcpListener), String> {
        let listener = TcpListener::bind((side.host.as_str(), side.port))
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on the NIXL side channel {}:{} (set \
                     VLLM_NIXL_SIDE_CHANNEL_HOST/VLLM_NIXL_SIDE_CHANNEL_PORT; each engine on a \
                     host needs its own port): {e}",
                    side.host, side.port
                )
            })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(side.port);
        let nixl = Arc::new(Nixl {
            engine_id,
            role,
            host: side.host.clone(),
            port,
            block_size: block_size.max(1),
            ttl: side.ttl,
            store: Mutex::new(HashMap::new()),
            next_block: AtomicU64::new(0),
        });
        Ok((nixl, listener))
    }

    fn store(&self) -> std::sync::MutexGuard<'_, HashMap<String, Prefilled>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a prefilled prompt and returns the `kv_transfer_params` for the response.
    pub(crate) fn register(
        &self,
        request_id: &str,
        prompt: &str,
        first_token: &str,
        prompt_tokens: usize,
    ) -> Json {
        let blocks = prompt_tokens.max(1).div_ceil(self.block_size) as u64;
        let first = self.next_block.fetch_add(blocks, Ordering::Relaxed);
        let block_ids: Vec<u64> = (first..first + blocks).collect();
        let mut store = self.store();
        let ttl = self.ttl;
        store.retain(|_, p| p.at.elapsed() < ttl);
        store.insert(
            request_id.to_string(),
            Prefilled {
                prompt: prompt.to_string(),
                first_token: first_token.to_string(),
                block_ids: block_ids.clone(),
                at: Instant::now(),
            },
        );
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": block_ids,
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_request_id": request_id,
            "request_id": request_id,
            "tp_size": 1,
        })
    }

    /// Accept loop of the side channel.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                // accept() fails on resource exhaustion; back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move { me.connection(stream, peer.to_string()).await });
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: String) {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        loop {
            let line = match tokio::time::timeout(IDLE_TIMEOUT, read_line(&mut rd)).await {
                Ok(Ok(Some(line))) => line,
                _ => return,
            };
            let reply = match self.answer(&line) {
                Ok((reply, req, n)) => {
                    log::info(
                        Who::Engine(0),
                        "nixl_connector.py:1290",
                        &format!(
                            "Sent {n} KV block(s) of request {req} to the decode engine at {peer}"
                        ),
                    );
                    reply
                }
                Err(e) => {
                    log::warn(
                        Who::Engine(0),
                        "nixl_connector.py:1302",
                        &format!("Refused a KV read from {peer}: {e}"),
                    );
                    json!({"ok": false, "error": e})
                }
            };
            let mut out = reply.to_string();
            out.push('\n');
            if wr.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// One request line → the reply, the request id and the number of blocks sent.
    fn answer(&self, line: &str) -> Result<(Json, String, usize), String> {
        let req: Json =
            serde_json::from_str(line).map_err(|e| format!("malformed request line: {e}"))?;
        let op = req.get("op").and_then(Json::as_str).unwrap_or_default();
        if op != "read" {
            return Err(format!(
                "unknown op `{op}` (this side channel knows `read`)"
            ));
        }
        let engine_id = req
            .get("engine_id")
            .and_then(Json::as_str)
            .unwrap_or_default();
        if engine_id != self.engine_id {
            return Err(format!(
                "this is engine {}, not {engine_id}: the kv_transfer_params point at the wrong \
                 side channel",
                self.engine_id
            ));
        }
        let request_id = req
            .get("request_id")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string();
        let wanted: Vec<u64> = req
            .get("block_ids")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_u64).collect())
            .unwrap_or_default();
        let mut store = self.store();
        let ttl = self.ttl;
        store.retain(|_, p| p.at.elapsed() < ttl);
        let Some(entry) = store.get(&request_id) else {
            return Err(format!(
                "no prefilled KV blocks for request {request_id} on engine {} (never prefilled \
                 here, already read, or expired after {}s)",
                self.engine_id,
                ttl.as_secs()
            ));
        };
        if entry.block_ids != wanted {
            return Err(format!(
                "request {request_id} holds blocks {:?}, not {wanted:?}",
                entry.block_ids
            ));
        }
        let reply = json!({
            "ok": true,
            "engine_id": self.engine_id,
            "request_id": request_id,
            "block_ids": entry.block_ids,
            "prompt": entry.prompt,
            "first_token": entry.first_token,
        });
        let n = entry.block_ids.len();
        store.remove(&request_id);
        Ok((reply, request_id, n))
    }
}

/// Reads one `\n`-terminated line, at most [`MAX_LINE`] bytes; `None` at end of stream.
async fn read_line<R: AsyncRead + Unpin>(rd: &mut BufReader<R>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = tokio::io::AsyncReadExt::take(&mut *rd, MAX_LINE)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long or cut short",
        ));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// What the decode engine got from the prefill engine.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) engine_id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) request_id: String,
    pub(crate) block_ids: Vec<u64>,
    pub(crate) first_token: String,
}

#[derive(Debug)]
pub(crate) enum FetchError {
    /// The params cannot describe a remote prefill (a client error: HTTP 400).
    BadParams(String),
    /// The transfer itself failed (HTTP 500).
    Transfer(String),
}

/// Pulls the prefilled blocks that `params` (from the prefill's response) describe.
pub(crate) async fn fetch(params: &Map<String, Json>, prompt: &str) -> Result<Fetched, FetchError> {
    let field = |name: &str| {
        FetchError::BadParams(format!(
            "kv_transfer_params has do_remote_prefill=true but no valid `{name}`; pass on the \
             kv_transfer_params of the prefill engine's response unchanged"
        ))
    };
    let host = params
        .get("remote_host")
        .and_then(Json::as_str)
        .ok_or_else(|| field("remote_host"))?
        .to_string();
    let port = params
        .get("remote_port")
        .and_then(Json::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| field("remote_port"))?;
    let engine_id = params
        .get("remote_engine_id")
        .and_then(Json::as_str)
        .ok_or_else(|| field("remote_engine_id"))?
        .to_string();
    let block_ids: Vec<u64> = params
        .get("remote_block_ids")
        .and_then(Json::as_array)
        .and_then(|a| a.iter().map(Json::as_u64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| field("remote_block_ids"))?;
    let request_id = params
        .get("remote_request_id")
        .or_else(|| params.get("request_id"))
        .and_then(Json::as_str)
        .ok_or_else(|| field("request_id"))?
        .to_string();

    let fail = |why: String| {
        FetchError::Transfer(format!(
            "KV transfer failed: could not fetch the prefilled KV blocks of request {request_id} \
             from engine {engine_id} over the NIXL side channel at {host}:{port}: {why}"
        ))
    };
    let stream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(fail(format!("cannot connect: {e}"))),
        Err(_) => return Err(fail(format!("no connection within {CONNECT_TIMEOUT:?}"))),
    };
    let request = json!({
        "op": "read",
        "engine_id": engine_id,
        "request_id": request_id,
        "block_ids": block_ids,
    });
    let exchange = async {
        let (rd, mut wr) = stream.into_split();
        let mut line = request.to_string();
        line.push('\n');
        wr.write_all(line.as_bytes()).await?;
        read_line(&mut BufReader::new(rd)).await
    };
    let reply = match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => return Err(fail("the side channel closed without answering".into())),
        Ok(Err(e)) => return Err(fail(format!("side channel error: {e}"))),
        Err(_) => return Err(fail(format!("no answer within {EXCHANGE_TIMEOUT:?}"))),
    };
    let reply: Json =
        serde_json::from_str(&reply).map_err(|e| fail(format!("malformed answer: {e}")))?;
    if reply.get("ok") != Some(&Json::Bool(true)) {
        let why = reply
            .get("error")
            .and_then(Json::as_str)
            .unwrap_or("refused without a reason");
        return Err(fail(why.to_string()));
    }
    let prefilled = reply
        .get("prompt")
        .and_then(Json::as_str)
        .unwrap_or_default();
    if prefilled != prompt {
        return Err(fail(
            "the prefill engine prefilled a different prompt than this request carries".into(),
        ));
    }
    Ok(Fetched {
        first_token: reply
            .get("first_token")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        engine_id,
        host,
        port,
        request_id,
        block_ids,
    })
}

#[cfg(test)]
mod tests {
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

    #[tokio::test]
    async fn a_read_round_trip_frees_the_blocks() {
        let side = SideChannel {
            host: "127.0.0.1".into(),
            port: 0,
            ttl: Duration::from_secs(60),
        };
        let (nixl, listener) = Nixl::bind("eng-1".into(), Role::Producer, &side, 16)
            .await
            .expect("bind");
        tokio::spawn(nixl.clone().serve(listener));
        let params = nixl.register("req-1", "hello world", "mock", 40);
        let params = params.as_object().expect("object").clone();
        assert_eq!(params["remote_block_ids"], json!([0, 1, 2]));

        let wrong = fetch(&params, "another prompt")
            .await
            .expect_err("must be refused");
        assert!(
            matches!(&wrong, FetchError::Transfer(m) if m.contains("different prompt")),
            "{wrong:?}"
        );
        // The failed read above already consumed the blocks, so register again.
        let params = nixl.register("req-1", "hello world", "mock", 40);
        let params = params.as_object().expect("object").clone();
        let got = fetch(&params, "hello world").await.expect("fetch");
        assert_eq!(got.engine_id, "eng-1");
        assert_eq!(got.block_ids, [3, 4, 5]);
        let again = fetch(&params, "hello world")
            .await
            .expect_err("must be refused");
        assert!(
            matches!(&again, FetchError::Transfer(m) if m.contains("already read")),
            "{again:?}"
        );

        let mut bad = params.clone();
        bad.remove("remote_host");
        assert!(matches!(
            fetch(&bad, "x").await,
            Err(FetchError::BadParams(_))
        ));
    }
}
