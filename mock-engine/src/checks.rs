//! vLLM 0.33's start-up checks of the data-parallel launch mode and of the visible GPUs.
//!
//! `vllm serve` picks one of three data-parallel load-balancing modes from its flags:
//! internal (one API server in front of every rank, remote ranks `--headless`), hybrid
//! (`--data-parallel-start-rank` or `--data-parallel-hybrid-lb`: one API server per node) and
//! external (`--data-parallel-rank` or `--data-parallel-external-lb`: one API server per rank,
//! an outside router in front). These checks refuse the same mixes vLLM refuses, with vLLM's
//! messages, in vLLM's order; source lines are those of vLLM 0.33.0:
//!
//! * `--headless` with `--api-server-count` > 0 (`entrypoints/cli/serve.py:69-75`);
//! * more than one mode at once (`serve.py:83-105`);
//! * an external rank needs a rank (`engine/arg_utils.py:2467-2475`) and
//!   `--data-parallel-size-local` 1 or unset (`arg_utils.py:2476-2484`);
//! * `0 <= rank < --data-parallel-size` when the size is above 1 (`config/parallel.py:1017`);
//! * `--data-parallel-size-local` at most `--data-parallel-size` (`parallel.py:545`);
//! * external mode needs `--data-parallel-size` > 1 (`parallel.py:551`): `--data-parallel-rank`
//!   with size 1 is refused, an independent engine passes no `--data-parallel-*` flag.
//!
//! vLLM also refuses external mode for a dense model (`arg_utils.py:2455-2465`); the mock
//! cannot tell a dense model from a mixture-of-experts one and lets that pass.
//!
//! GPUs: when `CUDA_VISIBLE_DEVICES` lists devices, a process needs `tp × pp × pcp` of them
//! for one engine (`parallel.py:1064-1077`, a config error) and `tp × pp × pcp × local
//! engines` in all: engine `d` of this process drives devices `d × world .. (d+1) × world`
//! (`parallel.py:842-857`); one beyond the list fails the worker's assertion
//! (`v1/worker/gpu_worker.py:486-490`). An external rank runs one local engine.

/// The flags that choose the data-parallel mode.
#[derive(Debug, Default)]
pub(crate) struct DpFlags {
    pub(crate) headless: bool,
    pub(crate) api_server_count: Option<i64>,
    pub(crate) size: i64,
    pub(crate) size_local: Option<i64>,
    pub(crate) rank: Option<i64>,
    pub(crate) start_rank: Option<i64>,
    pub(crate) external_lb: bool,
    pub(crate) hybrid_lb: bool,
    pub(crate) multi_port: bool,
}

/// Checks the data-parallel flags as vLLM does; `Ok(Some(rank))` when this process is one
/// rank of an external-LB group, `Ok(None)` for the other modes.
pub(crate) fn external_rank(f: &DpFlags) -> Result<Option<u32>, String> {
    if let Some(n) = f.api_server_count.filter(|&n| f.headless && n > 0) {
        return Err(format!(
            "--api-server-count={n} cannot be used with --headless (no API servers are started \
             in headless mode)."
        ));
    }
    let external = f.external_lb || f.rank.is_some();
    let (hybrid, multi_port) = if !f.hybrid_lb && !f.multi_port {
        (f.start_rank.is_some(), false)
    } else {
        (f.hybrid_lb, f.multi_port)
    };
    if [external, hybrid, multi_port]
        .iter()
        .filter(|&&m| m)
        .count()
        > 1
    {
        return Err(
            "Cannot use more than one data parallel load balancing mode. Choose one of: \
             --data-parallel-multi-port-external-lb, --data-parallel-external-lb (or \
             --data-parallel-rank), --data-parallel-hybrid-lb (or --data-parallel-start-rank)."
                .into(),
        );
    }
    if !external {
        if let Some(local) = f.size_local.filter(|&l| l > f.size) {
            return Err(size_local_too_big(local, f.size));
        }
        return Ok(None);
    }
    let Some(rank) = f.rank else {
        return Err(
            "Invalid data-parallel launch options: `--data-parallel-external-lb` \
             requires a data-parallel rank. Set `--data-parallel-rank`, or set \
             `--data-parallel-size` greater than 1 and use `--nnodes` with `--node-rank` so \
             the rank can be inferred."
                .into(),
        );
    };
    if let Some(local) = f.size_local.filter(|&l| l != 1) {
        return Err(format!(
            "Invalid data-parallel launch options: an external data-parallel rank requires \
             `--data-parallel-size-local 1`; got {local}. Set it to 1 or omit it."
        ));
    }
    if f.size > 1 && !(0..f.size).contains(&rank) {
        return Err(format!(
            "data_parallel_rank ({rank}) must be in the range [0, {})",
            f.size
        ));
    }
    if f.size <= 1 {
        return Err("data_parallel_external_lb can only be set when data_parallel_size > 1".into());
    }
    // In range of [0, size) above, so it fits.
    Ok(Some(rank as u32))
}

fn size_local_too_big(local: i64, size: i64) -> String {
    format!("data_parallel_size_local ({local}) must be <= data_parallel_size ({size})")
}

/// Why the visible GPUs do not fit: a config error (`ValueError`, at once) or the worker's
/// assertion (the engine core fails to start).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DeviceError {
    Config(String),
    Worker(String),
}

/// What the GPU check needs to know of the engine.
#[derive(Debug)]
pub(crate) struct DeviceNeeds {
    /// `tp × pp × pcp`: the GPUs of one engine.
    pub(crate) world: u64,
    pub(crate) dp_size: u64,
    /// Engines this process runs.
    pub(crate) local_engines: u64,
    pub(crate) nnodes: u64,
    /// `--distributed-executor-backend` given.
    pub(crate) backend_set: bool,
}

/// Checks `CUDA_VISIBLE_DEVICES` against what the engine needs. Unset or empty: nothing to
/// check (the mock has no GPUs to count). Multi-node engines are not checked.
pub(crate) fn check_devices(visible: Option<&str>, n: &DeviceNeeds) -> Result<(), DeviceError> {
    let Some(list) = visible.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    if n.nnodes > 1 {
        return Ok(());
    }
    let count = list.split(',').count() as u64;
    if !n.backend_set && n.world * n.dp_size > 1 && count < n.world {
        return Err(DeviceError::Config(format!(
            "World size ({}) is larger than the number of available GPUs ({count}) in this \
             node. If this is intentional and you are using:\n- ray, set \
             '--distributed-executor-backend ray'.\n- multiprocessing, set '--nnodes' \
             appropriately.",
            n.world
        )));
    }
    if count < n.world * n.local_engines.max(1) {
        return Err(DeviceError::Worker(format!(
            "DP adjusted local rank {count} is out of bounds for {count} devices."
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(size: i64) -> DpFlags {
        DpFlags {
            size,
            ..DpFlags::default()
        }
    }

    #[test]
    fn external_ranks() {
        let f = DpFlags {
            rank: Some(1),
            size_local: Some(1),
            api_server_count: Some(1),
            ..dp(2)
        };
        assert_eq!(external_rank(&f), Ok(Some(1)));
        let f = DpFlags {
            rank: Some(0),
            api_server_count: Some(4),
            ..dp(8)
        };
        assert_eq!(external_rank(&f), Ok(Some(0)));
        assert_eq!(external_rank(&dp(4)), Ok(None));
        let hybrid = DpFlags {
            start_rank: Some(2),
            size_local: Some(2),
            ..dp(4)
        };
        assert_eq!(external_rank(&hybrid), Ok(None));
    }

    #[test]
    fn refusals_name_the_flag() {
        let err = |f: DpFlags| external_rank(&f).expect_err("must be refused");
        let e = err(DpFlags {
            rank: Some(0),
            size_local: Some(2),
            ..dp(4)
        });
        assert!(
            e.contains("requires `--data-parallel-size-local 1`; got 2"),
            "{e}"
        );
        let e = err(DpFlags {
            rank: Some(0),
            size_local: Some(0),
            ..dp(4)
        });
        assert!(e.contains("got 0"), "{e}");
        let e = err(DpFlags {
            rank: Some(4),
            ..dp(4)
        });
        assert_eq!(e, "data_parallel_rank (4) must be in the range [0, 4)");
        let e = err(DpFlags {
            rank: Some(-1),
            ..dp(4)
        });
        assert!(e.contains("[0, 4)"), "{e}");
        let e = err(DpFlags {
            rank: Some(0),
            ..dp(1)
        });
        assert!(e.contains("only be set when data_parallel_size > 1"), "{e}");
        let e = err(DpFlags {
            external_lb: true,
            ..dp(2)
        });
        assert!(e.contains("Set `--data-parallel-rank`"), "{e}");
        let e = err(DpFlags {
            rank: Some(1),
            start_rank: Some(1),
            ..dp(2)
        });
        assert!(
            e.starts_with("Cannot use more than one data parallel"),
            "{e}"
        );
        let e = err(DpFlags {
            rank: Some(1),
            hybrid_lb: true,
            ..dp(2)
        });
        assert!(
            e.starts_with("Cannot use more than one data parallel"),
            "{e}"
        );
        let e = err(DpFlags {
            headless: true,
            api_server_count: Some(1),
            ..dp(2)
        });
        assert!(e.starts_with("--api-server-count=1 cannot be used with --headless"));
        let e = err(DpFlags {
            size_local: Some(3),
            ..dp(2)
        });
        assert_eq!(
            e,
            "data_parallel_size_local (3) must be <= data_parallel_size (2)"
        );
    }

    #[test]
    fn visible_devices() {
        let needs = |world, dp_size, local_engines| DeviceNeeds {
            world,
            dp_size,
            local_engines,
            nnodes: 1,
            backend_set: false,
        };
        // An external rank of tp 2 on its two-GPU slice.
        assert_eq!(check_devices(Some("2,3"), &needs(2, 4, 1)), Ok(()));
        assert_eq!(check_devices(None, &needs(8, 4, 4)), Ok(()));
        assert_eq!(check_devices(Some(""), &needs(8, 4, 4)), Ok(()));
        match check_devices(Some("2"), &needs(2, 4, 1)) {
            Err(DeviceError::Config(m)) => assert!(
                m.starts_with(
                    "World size (2) is larger than the number of available GPUs (1) in this node."
                ),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // Internal LB: two local engines of tp 2 need four devices.
        assert_eq!(
            check_devices(Some("0,1,2"), &needs(2, 2, 2)),
            Err(DeviceError::Worker(
                "DP adjusted local rank 3 is out of bounds for 3 devices.".into()
            ))
        );
        assert_eq!(check_devices(Some("0,1,2,3"), &needs(2, 2, 2)), Ok(()));
        let multi_node = DeviceNeeds {
            nnodes: 2,
            ..needs(16, 1, 1)
        };
        assert_eq!(check_devices(Some("0"), &multi_node), Ok(()));
    }
}
