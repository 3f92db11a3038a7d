//! The engine's configuration, decided once at start from the parsed `vllm serve` arguments
//! and the environment: the mock-only knobs ([`Knobs`]) and what vLLM itself would build
//! ([`EngineConfig`]), with the config errors vLLM raises at start-up.

use std::time::Duration;

use crate::args;
use crate::checks::{self, DeviceError, DeviceNeeds, DpFlags};
use crate::dp::{GroupKind, JoinSpec, ListenSpec};
use crate::kv::{self, KvConfig};

const DEFAULT_MODEL: &str = "Qwen/Qwen3-0.6B";
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_DP_RPC_PORT: u16 = 29550;
const DEFAULT_MASTER_PORT: u16 = 29501;
/// Qwen3-0.6B's context length, vLLM's default model.
const DEFAULT_MAX_MODEL_LEN: i64 = 40960;
const DEFAULT_READY_TIMEOUT_S: u64 = 600;

/// A failure `PRL_MOCK_FAIL` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fail {
    Start,
    Hang,
    After(Duration),
}

/// The mock-only knobs of the environment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Knobs {
    pub(crate) delay: Duration,
    pub(crate) fail: Option<Fail>,
}

impl Knobs {
    pub(crate) fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Knobs, String> {
        let duration = |name: &str, v: &str| {
            humantime::parse_duration(v.trim()).map_err(|e| {
                format!("{name}=`{v}` is not a duration ({e}); write it like `3s` or `500ms`")
            })
        };
        let delay = match env("PRL_MOCK_STARTUP_DELAY").filter(|v| !v.is_empty()) {
            None => Duration::ZERO,
            Some(v) => duration("PRL_MOCK_STARTUP_DELAY", &v)?,
        };
        let fail = match env("PRL_MOCK_FAIL").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(match v.trim() {
                "start" => Fail::Start,
                "hang" => Fail::Hang,
                other => match other.strip_prefix("after:") {
                    Some(d) => Fail::After(duration("PRL_MOCK_FAIL", d)?),
                    None => {
                        return Err(format!(
                            "PRL_MOCK_FAIL=`{v}` is not a known failure; use `start`, `hang` or \
                             `after:DURATION` (e.g. `after:10s`)"
                        ))
                    }
                },
            }),
        };
        Ok(Knobs { delay, fail })
    }
}

/// How this engine takes part in a group spread over nodes.
#[derive(Debug)]
pub(crate) enum Group {
    None,
    Lead(ListenSpec),
    /// A `--headless` engine: joins its group, serves no HTTP.
    Member(JoinSpec),
    /// An external-LB rank above 0: joins rank 0 and serves HTTP itself.
    Peer(JoinSpec),
}

/// Everything the running engine needs, decided once from the arguments and environment.
#[derive(Debug)]
pub(crate) struct EngineConfig {
    pub(crate) model: String,
    /// `--served-model-name` values, else the model tag.
    pub(crate) served: Vec<String>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) api_keys: Vec<String>,
    pub(crate) access_log: bool,
    pub(crate) max_model_len: i64,
    pub(crate) block_size: usize,
    pub(crate) kv: Option<KvConfig>,
    pub(crate) side_channel: Option<kv::SideChannel>,
    pub(crate) group: Group,
    /// The (first) global data-parallel rank of this process.
    pub(crate) rank: u32,
    pub(crate) dp_size: u32,
    /// The visible GPUs do not fit: the engine core fails its start with this assertion.
    pub(crate) device_fault: Option<String>,
}

impl EngineConfig {
    pub(crate) fn from_args(
        a: &args::ServeArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EngineConfig, String> {
        let model = a
            .model_tag
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let mut served = a.strings("served_model_name");
        if served.is_empty() {
            served.push(model.clone());
        }
        let host_flag = a.str("host").map(str::to_string);
        let host = host_flag
            .clone()
            .unwrap_or_else(|| DEFAULT_HOST.to_string());
        let port = port_of(a.int("port").unwrap_or(8000), "--port")?;
        let mut api_keys = a.strings("api_key");
        if api_keys.is_empty() {
            api_keys.extend(env("VLLM_API_KEY").filter(|k| !k.is_empty()));
        }
        let max_model_len = match a.int("max_model_len") {
            None | Some(-1) => DEFAULT_MAX_MODEL_LEN,
            Some(n) if n >= 1 => n,
            Some(n) => return Err(format!("max_model_len must be positive, got {n}")),
        };
        let block_size = match a.int("block_size") {
            None => 16,
            Some(n) if n >= 1 => n as usize,
            Some(n) => return Err(format!("block_size must be positive, got {n}")),
        };
        let kv = match a.json("kv_transfer_config") {
            Some(j) => kv::parse_config(j, env)?,
            None => None,
        };
        let headless = a.flag("headless").unwrap_or(false);
        let side_channel = match &kv {
            Some(k) if k.nixl && !headless => Some(kv::side_channel_from_env(env, &host)?),
            _ => None,
        };

        let dp_size = positive(
            a.int("data_parallel_size").unwrap_or(1),
            "--data-parallel-size",
        )?;
        let api_server_count = a.int("api_server_count");
        // `--api-server-count 0` runs vLLM headless too (`serve.py:149-150`).
        let headless = headless || api_server_count.is_some_and(|n| n < 1);
        let dp_flags = DpFlags {
            headless: a.flag("headless").unwrap_or(false),
            api_server_count,
            size: i64::from(dp_size),
            size_local: a.int("data_parallel_size_local"),
            rank: a.int("data_parallel_rank"),
            start_rank: a.int("data_parallel_start_rank"),
            external_lb: a.flag("data_parallel_external_lb").unwrap_or(false),
            hybrid_lb: a.flag("data_parallel_hybrid_lb").unwrap_or(false),
            multi_port: a
                .flag("data_parallel_multi_port_external_lb")
                .unwrap_or(false),
        };
        let external = checks::external_rank(&dp_flags)?;
        let dp_local = match (external, a.int("data_parallel_size_local")) {
            (Some(_), _) => 1,
            (None, None) => dp_size,
            (None, Some(n)) if n >= 0 => n as u32,
            (None, Some(n)) => {
                return Err(format!(
                    "--data-parallel-size-local ({n}) must be between 0 and --data-parallel-size ({dp_size})"
                ))
            }
        };
        let dp_port = match a.int("data_parallel_rpc_port") {
            None => DEFAULT_DP_RPC_PORT,
            Some(p) => port_of(p, "--data-parallel-rpc-port")?,
        };
        let dp_addr = a.str("data_parallel_address").map(str::to_string);
        let start_rank = a.int("data_parallel_start_rank").map(|r| r.max(0) as u32);
        let nnodes = positive(a.int("nnodes").unwrap_or(1), "--nnodes")?;
        let node_rank = a.int("node_rank").unwrap_or(0).max(0) as u32;
        let master_addr = a.str("master_addr").unwrap_or(DEFAULT_HOST).to_string();
        let master_port = match a.int("master_port") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => port_of(p, "--master-port")?,
        };
        let deadline = match env("VLLM_ENGINE_READY_TIMEOUT_S").filter(|v| !v.is_empty()) {
            None => DEFAULT_READY_TIMEOUT_S,
            Some(v) => v.trim().parse().map_err(|_| {
                format!("VLLM_ENGINE_READY_TIMEOUT_S=`{v}` is not a whole number of seconds")
            })?,
        };
        let world = [
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "prefill_context_parallel_size",
        ]
        .iter()
        .map(|d| a.int(d).unwrap_or(1).max(1) as u64)
        .product::<u64>();
        let device_fault = match checks::check_devices(
            env("CUDA_VISIBLE_DEVICES").as_deref(),
            &DeviceNeeds {
                world,
                dp_size: u64::from(dp_size),
                local_engines: u64::from(dp_local),
                nnodes: u64::from(nnodes),
                backend_set: a.str("distributed_executor_backend").is_some(),
            },
        ) {
            Ok(()) => None,
            Err(DeviceError::Config(m)) => return Err(m),
            Err(DeviceError::Worker(m)) => Some(m),
        };
        let group = if let Some(rank) = external {
            // vLLM's default address is --master-addr's (`arg_utils.py:2539-2553`).
            let addr = dp_addr.unwrap_or(master_addr);
            if rank == 0 {
                Group::Lead(ListenSpec {
                    kind: GroupKind::Dp,
                    addr,
                    port: dp_port,
                    needed: dp_size - 1,
                    size: dp_size,
                })
            } else {
                Group::Peer(JoinSpec {
                    kind: GroupKind::Dp,
                    addr,
                    port: dp_port,
                    size: dp_size,
                    ranks: 1,
                    first: rank,
                    deadline: Duration::from_secs(deadline),
                })
            }
        } else if headless {
            if dp_size > 1 {
                if dp_local == 0 {
                    return Err(
                        "a --headless engine with --data-parallel-size-local 0 has no rank to run"
                            .into(),
                    );
                }
                Group::Member(JoinSpec {
                    kind: GroupKind::Dp,
                    addr: dp_addr.unwrap_or_else(|| DEFAULT_HOST.to_string()),
                    port: dp_port,
                    size: dp_size,
                    ranks: dp_local,
                    first: start_rank.unwrap_or(0),
                    deadline: Duration::from_secs(deadline),
                })
            } else if nnodes > 1 {
                Group::Member(JoinSpec {
                    kind: GroupKind::Node,
                    addr: master_addr,
                    port: master_port,
                    size: nnodes,
                    ranks: 1,
                    first: node_rank,
                    deadline: Duration::from_secs(deadline),
                })
            } else {
                return Err(
                    "--headless needs --data-parallel-size > 1 or --nnodes > 1: a headless engine \
                     only runs ranks for an API server started elsewhere"
                        .into(),
                );
            }
        } else if dp_size > dp_local && a.int("data_parallel_rank").is_none() {
            Group::Lead(ListenSpec {
                kind: GroupKind::Dp,
                addr: dp_addr
                    .or(host_flag)
                    .unwrap_or_else(|| DEFAULT_HOST.to_string()),
                port: dp_port,
                needed: dp_size - dp_local,
                size: dp_size,
            })
        } else if nnodes > 1 && node_rank == 0 {
            Group::Lead(ListenSpec {
                kind: GroupKind::Node,
                addr: master_addr,
                port: master_port,
                needed: nnodes - 1,
                size: nnodes,
            })
        } else {
            Group::None
        };
        let rank = match &group {
            Group::Member(j) | Group::Peer(j) => j.first,
            _ => external.or(start_rank).unwrap_or(0),
        };
        // One side channel per engine core, on the base port plus its global data-parallel
        // rank (`nixl/base_scheduler.py:77-80`, `config/parallel.py:1048`).
        let side_channel = match side_channel {
            Some(mut s) => {
                s.port = u16::try_from(u32::from(s.port) + rank).map_err(|_| {
                    format!(
                        "VLLM_NIXL_SIDE_CHANNEL_PORT {} + data-parallel rank {rank} is not a TCP port",
                        s.port
                    )
                })?;
                Some(s)
            }
            None => None,
        };
        Ok(EngineConfig {
            model,
            served,
            host,
            port,
            api_keys,
            access_log: !a.flag("disable_uvicorn_access_log").unwrap_or(false),
            max_model_len,
            block_size,
            kv,
            side_channel,
            group,
            rank,
            dp_size,
            device_fault,
        })
    }
}

fn port_of(n: i64, flag: &str) -> Result<u16, String> {
    u16::try_from(n).map_err(|_| format!("{flag} {n} is not a TCP port (0-65535)"))
}

fn positive(n: i64, flag: &str) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{flag} must be at least 1, got {n}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Parsed;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn knobs() {
        assert_eq!(
            Knobs::from_env(&env_of(&[])),
            Ok(Knobs {
                delay: Duration::ZERO,
                fail: None
            })
        );
        let k = Knobs::from_env(&env_of(&[
            ("PRL_MOCK_STARTUP_DELAY", "1s 500ms"),
            ("PRL_MOCK_FAIL", "after:2s"),
        ]));
        assert_eq!(
            k,
            Ok(Knobs {
                delay: Duration::from_millis(1500),
                fail: Some(Fail::After(Duration::from_secs(2)))
            })
        );
        assert_eq!(
            Knobs::from_env(&env_of(&[("PRL_MOCK_FAIL", "hang")])).map(|k| k.fail),
            Ok(Some(Fail::Hang))
        );
        let e =
            Knobs::from_env(&env_of(&[("PRL_MOCK_FAIL", "crash")])).expect_err("must be refused");
        assert!(e.contains("not a known failure"), "{e}");
        let e = Knobs::from_env(&env_of(&[("PRL_MOCK_STARTUP_DELAY", "soon")]))
            .expect_err("must be refused");
        assert!(e.contains("is not a duration"), "{e}");
        assert!(Knobs::from_env(&env_of(&[("PRL_MOCK_FAIL", "after:x")])).is_err());
    }

    fn config(
        argv: &str,
        env: &'static [(&'static str, &'static str)],
    ) -> Result<EngineConfig, String> {
        let argv = shlex::split(argv).expect("shell words");
        match args::parse(&argv) {
            Ok(Parsed::Serve(a)) => EngineConfig::from_args(&a, &env_of(env)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn groups() {
        let c = config(
            "m --data-parallel-size 4 --data-parallel-size-local 1 --data-parallel-rpc-port 1234",
            &[],
        )
        .expect("valid");
        match c.group {
            Group::Lead(s) => {
                assert_eq!((s.needed, s.port, s.addr.as_str()), (3, 1234, "127.0.0.1"))
            }
            other => panic!("{other:?}"),
        }
        let c = config(
            "m --headless -dp 4 -dpl 2 --data-parallel-start-rank 2 -dpa 10.0.0.1",
            &[],
        )
        .expect("valid");
        match c.group {
            Group::Member(s) => {
                assert_eq!(
                    (s.ranks, s.first, s.port, s.addr.as_str()),
                    (2, 2, 29550, "10.0.0.1")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            config("m -dp 2", &[]).map(|c| c.group),
            Ok(Group::None)
        ));
        assert!(matches!(
            config("m --nnodes 2 --master-addr 127.0.0.1", &[]).map(|c| c.group),
            Ok(Group::Lead(_))
        ));
        assert!(config("m --headless", &[]).is_err());
        assert!(config("m -dp 2 -dpl 3", &[]).is_err());
        assert!(config("m --port 70000", &[]).is_err());
    }

    #[test]
    fn served_names_and_keys() {
        let c = config("org/m --served-model-name a b --api-key k", &[]).expect("valid");
        assert_eq!(c.served, ["a", "b"]);
        assert_eq!(c.api_keys, ["k"]);
        let c = config("org/m", &[("VLLM_API_KEY", "env-key")]).expect("valid");
        assert_eq!(c.served, ["org/m"]);
        assert_eq!(c.api_keys, ["env-key"]);
        let c = config(
            r#"m --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'"#,
            &[("VLLM_NIXL_SIDE_CHANNEL_PORT", "5700")],
        )
        .expect("valid");
        assert_eq!(c.side_channel.map(|s| s.port), Some(5700));
    }
}
