//! The rules of `[inference.kv_cache_offload]`: a CPU tier under any disk tier, Mooncake on
//! SLURM only, prefix caching on; and the Mooncake store's settings with their defaults.

use crate::diag::{Problem, Problems};
use crate::recipe::deployment::{
    Mooncake, Offload, OffloadKind, DEFAULT_MOONCAKE_CLIENT_PORT, DEFAULT_MOONCAKE_MASTER_PORT,
    DEFAULT_MOONCAKE_METADATA_PORT, DEFAULT_MOONCAKE_METRICS_PORT,
};
use crate::recipe::schema::{InferenceSection, OffloadSection, F};

/// KV offload: a CPU tier, Mooncake only on SLURM, prefix caching on. The offload when
/// every rule holds.
pub(super) fn offload(inf: &InferenceSection, backend: &str, p: &mut Problems) -> Option<Offload> {
    let raw = inf.offload.as_ref()?;
    let kind = match raw.kind.get().map(|k| k.v.as_str()) {
        Some("native") => OffloadKind::Native,
        Some("mooncake") => OffloadKind::Mooncake,
        _ => return None,
    };
    let mut ok = true;
    if !raw.has_cpu {
        ok = false;
        p.push(
            Problem::new("`kv_cache_offload` has no `cpu` tier: both vLLM's offload and Mooncake stage KV blocks through CPU memory, and a disk tier sits under it")
                .at(Some(raw.disk_path.span_or(&raw.span)))
                .label("disk only")
                .help("add a CPU tier, e.g. `cpu = { num_bytes = 107374182400 }`"),
        );
    }
    // `sim` models a SLURM cluster.
    if kind == OffloadKind::Mooncake && !matches!(backend, "slurm" | "sim") {
        ok = false;
        p.push(
            Problem::new(format!(
                "Mooncake offload runs on the `slurm` backend only (its store needs RDMA between allocated nodes), and this recipe's backend is `{backend}`"
            ))
            .at(Some(raw.kind.span_or(&raw.span)))
            .label("mooncake")
            .help("use `type = \"native\"` (vLLM's own CPU offload) here, or `[backend] type = \"slurm\"`"),
        );
    }
    if inf.enable_prefix_caching.or(true) == Some(false) {
        ok = false;
        p.push(
            Problem::new("KV offload turns prefix caching on (offloaded blocks are found again by their prefix), and `enable_prefix_caching` is false")
                .at(Some(inf.enable_prefix_caching.span_or(&inf.span)))
                .label("contradicts kv_cache_offload")
                .help("drop `enable_prefix_caching = false`, or drop `[inference.kv_cache_offload]`"),
        );
    }
    let cpu_bytes = raw.cpu_bytes.get().map(|b| b.v);
    let disk = match &raw.disk_path {
        F::Set(s) => Some(s.v.clone()),
        F::Bad => {
            ok = false;
            None
        }
        F::Absent => None,
    };
    match (ok, cpu_bytes) {
        (true, Some(cpu_bytes)) => Some(Offload {
            kind,
            cpu_bytes,
            disk,
        }),
        _ => None,
    }
}

/// The Mooncake store's settings; `None` when one of them was already reported wrong.
pub(super) fn mooncake(raw: &OffloadSection) -> Option<Mooncake> {
    Some(Mooncake {
        node: 0,
        master_port: raw.master_port.or(DEFAULT_MOONCAKE_MASTER_PORT)?,
        metrics_port: raw.master_metrics_port.or(DEFAULT_MOONCAKE_METRICS_PORT)?,
        metadata_port: raw.metadata_port.or(DEFAULT_MOONCAKE_METADATA_PORT)?,
        client_port: raw.client_port.or(DEFAULT_MOONCAKE_CLIENT_PORT)?,
        protocol: raw.protocol.or("rdma".to_string())?,
        device_name: raw.device_name.or(String::new())?,
    })
}
