//! The mock NIXL side channel: a prefill engine holds prompts' "KV blocks" and serves them
//! once over TCP; a decode engine fetches them (protocol in the parent module).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value as Json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{Role, SideChannel};
use crate::log::{self, Who};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_LINE: u64 = 16 << 20;

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
