//! What the launcher manages: the env variables and `vllm serve` options a recipe may not
//! set by hand, each with where to set it instead. [`super::validate`] reports them.

/// The environment variables the launcher sets or that would contradict what it sets.
pub fn managed_env(name: &str, disaggregated: bool, mooncake: bool) -> Option<&'static str> {
    match name {
        "CUDA_VISIBLE_DEVICES" => Some("the launcher gives each rank its own slice of `tp` GPUs (with `load_balancing = \"internal\"`, vLLM places a node's ranks on the GPUs the backend gives it)"),
        "VLLM_NIXL_SIDE_CHANNEL_HOST" | "VLLM_NIXL_SIDE_CHANNEL_PORT" => Some("the launcher sets the NIXL side channel per rank; change the first port with `[inference.deployment] nixl_side_channel_port`"),
        "MOONCAKE_CONFIG_PATH" => Some("the launcher writes each node's Mooncake config and points at it"),
        "VLLM_DP_RANK" | "VLLM_DP_RANK_LOCAL" | "VLLM_DP_SIZE" | "VLLM_DP_MASTER_IP" | "VLLM_DP_MASTER_PORT" => Some("the launcher lays out data parallelism from `[inference.parallel]`"),
        "VLLM_ALL2ALL_BACKEND" if disaggregated => Some("a disaggregated deployment sets the all2all backend per role; only a template override (`engine.argv.j2`) changes it"),
        "PYTHONHASHSEED" if mooncake => Some("Mooncake offload pins `PYTHONHASHSEED=0` so that every node hashes KV blocks alike"),
        "MOONCAKE_OFFLOAD_FSDIR" | "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH" | "MOONCAKE_OFFLOAD_ENABLE_EVICTION" if mooncake => Some("the launcher sets Mooncake's disk tier from `[inference.kv_cache_offload] disk`"),
        _ => None,
    }
}

/// The `vllm serve` options the launcher sets, with where to set them instead.
pub fn managed_dest(dest: &str, disaggregated: bool) -> Option<&'static str> {
    match dest {
        "model" => Some("set `inference.model`"),
        "host" | "port" | "uds" | "grpc_port" | "data_parallel_supervisor_port" => {
            Some("addresses and ports are set per node; the engine port is `[inference.deployment] backend_port`")
        }
        "tensor_parallel_size" => Some("set `[inference.parallel] tp`"),
        "data_parallel_size" => Some("set `[inference.parallel] dp`"),
        "data_parallel_rpc_port" => Some("set `[inference.deployment] data_parallel_rpc_port`"),
        "data_parallel_rank" | "data_parallel_start_rank" | "data_parallel_size_local"
        | "data_parallel_address" | "data_parallel_hybrid_lb" | "data_parallel_external_lb"
        | "data_parallel_multi_port_external_lb" => {
            Some("the launcher lays out data parallelism from `tp`, `dp` and the node counts; `[inference.deployment] load_balancing` chooses one API server per rank (`external`) or vLLM's own balancing (`internal`)")
        }
        "headless" => Some("in prime-rl, `headless = true` means `api_server_count = 0`: nodes without an API server. prl-flow starts every rank with its own API server; for vLLM's layout with `--headless` secondary nodes write `[inference.deployment] load_balancing = \"internal\"`"),
        "pipeline_parallel_size" | "nnodes" | "node_rank" | "master_addr" | "master_port" => {
            Some("recipes place engines by `tp` and `dp`; pipeline parallelism and tensor parallelism across nodes are not supported")
        }
        "device_ids" => Some("GPU visibility belongs to the backend and the launcher"),
        "kv_transfer_config" | "kv_offloading_size" | "kv_offloading_backend" => Some(
            "the launcher writes the KV connector config: use `[inference.kv_cache_offload]` and the deployment type",
        ),
        "enable_expert_parallel" => Some("set `inference.enable_expert_parallel`"),
        "enable_dbo" => Some("set `inference.enable_dbo`"),
        "enable_eplb" => Some("set `inference.enable_eplb`"),
        "enable_return_routed_experts" => Some("set `inference.enable_return_routed_experts`"),
        "enable_prefix_caching" => Some("set `inference.enable_prefix_caching`"),
        "config" => Some("a `--config` file could set what the launcher manages; write its keys in `vllm_extra`"),
        "all2all_backend" if disaggregated => Some(
            "a disaggregated deployment sets it per role (prefill `deepep_high_throughput`, decode `deepep_low_latency`); only a template override (`engine.argv.j2`) changes it",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_names_say_where_to_go() {
        assert!(managed_dest("tensor_parallel_size", false).is_some_and(|h| h.contains("tp")));
        assert!(managed_dest("all2all_backend", false).is_none());
        assert!(managed_dest("all2all_backend", true).is_some());
        assert!(managed_env("CUDA_VISIBLE_DEVICES", false, false).is_some());
        assert!(managed_env("PRL_MOCK_DELAY", true, true).is_none());
    }
}
