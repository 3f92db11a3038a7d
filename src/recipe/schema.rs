//! The recipe as written: every field with its place, nothing derived yet.
//!
//! [`read`] walks the document with [`doc::Table`](super::doc::Table) cursors, so each problem
//! of type, range, enum value or spelling is reported at its field and reading goes on. A
//! field is [`F::Absent`] (use the default), [`F::Bad`] (already reported: checks that need it
//! are skipped, so one mistake does not cause a cascade) or [`F::Set`].

use std::ops::Range;
use std::time::Duration;

use toml_edit::{ImDocument, Item, Value};

use super::doc::{Sp, Table};
use super::extra::{read_extra, VllmExtra};
use crate::diag::{Problem, Problems};
use crate::workflow::TASK_FIELDS;

/// One field of the recipe.
#[derive(Debug, Clone, PartialEq)]
pub enum F<T> {
    Absent,
    Bad,
    Set(Sp<T>),
}

impl<T: Clone> F<T> {
    /// The value, the default when absent, `None` when it was wrong.
    pub fn or(&self, default: T) -> Option<T> {
        match self {
            F::Absent => Some(default),
            F::Bad => None,
            F::Set(s) => Some(s.v.clone()),
        }
    }
    pub fn get(&self) -> Option<&Sp<T>> {
        match self {
            F::Set(s) => Some(s),
            _ => None,
        }
    }
    pub fn is_set(&self) -> bool {
        matches!(self, F::Set(_))
    }
    /// Where the field is written, or `fallback` (its table) when it is not.
    pub fn span_or(&self, fallback: &Range<usize>) -> Range<usize> {
        match self {
            F::Set(s) => s.span.clone(),
            _ => fallback.clone(),
        }
    }
}

fn field<'a, T>(
    t: &mut Table<'a>,
    key: &'static str,
    p: &mut Problems,
    read: impl FnOnce(&mut Table<'a>, &'static str, &mut Problems) -> Option<Sp<T>>,
) -> F<T> {
    if !t.has(key) {
        return F::Absent;
    }
    match read(t, key, p) {
        Some(v) => F::Set(v),
        None => F::Bad,
    }
}

pub const SHAPES: &[&str] = &["single_node", "multi_node", "disaggregated"];
/// Router policies a recipe may pick (those of `vllm-router`'s Python launcher that need no
/// further configuration).
pub const POLICIES: &[&str] = &[
    "consistent_hash",
    "round_robin",
    "cache_aware",
    "power_of_two",
    "random",
];
pub const OFFLOAD_TYPES: &[&str] = &["native", "mooncake"];
/// `load_balancing`: one API server per rank (the router picks it), or vLLM's own.
pub const LOAD_BALANCING: &[&str] = &["external", "internal"];
/// vllm-router 0.1.17's `--log-level` choices.
pub const ROUTER_LOG_LEVELS: &[&str] = &["debug", "info", "warn", "error"];
pub const MOONCAKE_PROTOCOLS: &[&str] = &["rdma", "tcp"];

#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: F<String>,
    pub templates: F<String>,
    pub inference: Option<InferenceSection>,
    pub backend: BackendSection,
    /// Whether the `[[task]]` entries' keys are all known (then serde may read them).
    pub tasks_readable: bool,
}

#[derive(Debug, Clone, Default)]
pub struct BackendSection {
    pub kind: Option<Sp<String>>,
    /// The other fields, for the backend to validate.
    pub config: serde_json::Value,
    pub span: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct InferenceSection {
    pub span: Range<usize>,
    pub model: F<String>,
    pub launcher: F<Vec<String>>,
    pub enable_expert_parallel: F<bool>,
    pub enable_dbo: F<bool>,
    pub enable_eplb: F<bool>,
    pub enable_return_routed_experts: F<bool>,
    pub enable_prefix_caching: F<bool>,
    pub parallel: ParallelSection,
    pub deployment: DeploymentSection,
    pub offload: Option<OffloadSection>,
    pub vllm_extra: Vec<VllmExtra>,
}

#[derive(Debug, Clone)]
pub struct ParallelSection {
    pub span: Range<usize>,
    pub tp: F<u32>,
    pub dp: F<u32>,
}

#[derive(Debug, Clone)]
pub struct DeploymentSection {
    pub span: Range<usize>,
    pub kind: F<String>,
    pub gpus_per_node: F<u32>,
    pub router_port: F<u16>,
    pub backend_port: F<u16>,
    pub router_policy: F<String>,
    pub num_nodes: F<u32>,
    pub num_replicas: F<u32>,
    pub num_prefill_nodes: F<u32>,
    pub num_decode_nodes: F<u32>,
    pub num_prefill_replicas: F<u32>,
    pub num_decode_replicas: F<u32>,
    pub prefill_nodes_per_replica: F<u32>,
    pub decode_nodes_per_replica: F<u32>,
    pub load_balancing: F<String>,
    pub router_host: F<String>,
    pub router_log_level: F<String>,
    pub restart_budget: F<u32>,
    pub restart_window: F<Duration>,
    pub restart_backoff: F<Duration>,
    pub env: Vec<(Sp<String>, Sp<String>)>,
    pub prefill_env: Vec<(Sp<String>, Sp<String>)>,
    pub decode_env: Vec<(Sp<String>, Sp<String>)>,
    pub ready_timeout: F<Duration>,
    pub probe_interval: F<Duration>,
    pub router_launcher: F<Vec<String>>,
    pub router_metrics_port: F<u16>,
    pub data_parallel_rpc_port: F<u16>,
    pub nixl_side_channel_port: F<u16>,
}

#[derive(Debug, Clone)]
pub struct OffloadSection {
    pub span: Range<usize>,
    pub kind: F<String>,
    /// `cpu.num_bytes`; `Absent` when there is no `cpu` table at all.
    pub cpu_bytes: F<u64>,
    pub has_cpu: bool,
    pub disk_path: F<String>,
    pub protocol: F<String>,
    pub device_name: F<String>,
    pub master_port: F<u16>,
    pub master_metrics_port: F<u16>,
    pub metadata_port: F<u16>,
    pub client_port: F<u16>,
}

/// Reads the whole recipe; problems go to `p`.
pub fn read(doc: &ImDocument<&str>, p: &mut Problems) -> Recipe {
    let end = doc.raw().len();
    let mut root = Table::new("", doc.as_table(), 0..end.min(1));
    let name = field(&mut root, "name", p, Table::string);
    let templates = field(&mut root, "templates", p, Table::string);
    let inference = match root.table("inference", p) {
        Some(t) => Some(read_inference(t, p)),
        None => {
            if !root.has("inference") {
                p.push(
                    Problem::new("the recipe has no `[inference]` table")
                        .at(Some(0..0))
                        .help(
                            "start with `[inference]` and `model = \"...\"`; see docs/recipes.md",
                        ),
                );
            }
            None
        }
    };
    let backend = read_backend(&mut root, p);
    let before = p.len();
    if root.has("task") {
        check_task_keys(&mut root, p);
    }
    let tasks_readable = p.len() == before;
    root.finish(p);
    Recipe {
        name,
        templates,
        inference,
        backend,
        tasks_readable,
    }
}

fn read_backend(root: &mut Table<'_>, p: &mut Problems) -> BackendSection {
    let Some(mut t) = root.table("backend", p) else {
        return BackendSection::default();
    };
    let kind = t.string("type", p);
    if let Some(k) = &kind {
        if k.v.trim().is_empty() {
            p.push(
                Problem::new("`backend.type` is empty")
                    .at(Some(k.span.clone()))
                    .help("name a backend: `local`, `ssh`, `slurm`, or a site plugin's name"),
            );
        }
    }
    let mut config = serde_json::Map::new();
    for (key, item) in t.entries() {
        if key.v != "type" {
            config.insert(key.v.clone(), super::doc::to_json(item));
        }
    }
    BackendSection {
        kind,
        config: if config.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::Object(config)
        },
        span: t.span.clone(),
    }
}

/// Unknown keys of every `[[task]]` entry (serde would report only the first).
fn check_task_keys(root: &mut Table<'_>, p: &mut Problems) {
    let Some((item, _)) = root.item("task") else {
        return;
    };
    let tables: Vec<(&dyn toml_edit::TableLike, Range<usize>)> = match item {
        Item::ArrayOfTables(a) => a
            .iter()
            .map(|t| (t as &dyn toml_edit::TableLike, t.span().unwrap_or(0..0)))
            .collect(),
        Item::Value(Value::Array(a)) => a
            .iter()
            .filter_map(|v| {
                v.as_inline_table()
                    .map(|t| (t as &dyn toml_edit::TableLike, v.span().unwrap_or(0..0)))
            })
            .collect(),
        // serde reports the wrong shape.
        _ => return,
    };
    for (t, span) in tables {
        let mut cursor = Table::new("[task]", t, span);
        for f in TASK_FIELDS {
            cursor.has(f);
        }
        cursor.finish(p);
    }
}

fn read_inference(mut t: Table<'_>, p: &mut Problems) -> InferenceSection {
    let model = field(&mut t, "model", p, Table::string);
    match &model {
        F::Absent => p.push(
            Problem::new("`inference.model` is missing")
                .at(Some(t.span.clone()))
                .label("in this table")
                .help("name the model to serve, e.g. `model = \"Qwen/Qwen3-0.6B\"`"),
        ),
        F::Set(m) if m.v.trim().is_empty() || m.v.contains('\n') => p.push(
            Problem::new("`inference.model` must be one non-empty line")
                .at(Some(m.span.clone()))
                .help("name the model to serve, e.g. `model = \"Qwen/Qwen3-0.6B\"`"),
        ),
        _ => {}
    }
    let launcher = field(&mut t, "launcher", p, Table::argv);
    let enable_expert_parallel = field(&mut t, "enable_expert_parallel", p, Table::boolean);
    let enable_dbo = field(&mut t, "enable_dbo", p, Table::boolean);
    let enable_eplb = field(&mut t, "enable_eplb", p, Table::boolean);
    let enable_return_routed_experts =
        field(&mut t, "enable_return_routed_experts", p, Table::boolean);
    let enable_prefix_caching = field(&mut t, "enable_prefix_caching", p, Table::boolean);

    let parallel = match t.table("parallel", p) {
        Some(mut pt) => {
            let tp = field(&mut pt, "tp", p, Table::count);
            let dp = field(&mut pt, "dp", p, Table::count);
            let span = pt.span.clone();
            pt.finish(p);
            ParallelSection { span, tp, dp }
        }
        None => ParallelSection {
            span: t.span.clone(),
            tp: if t.has("parallel") { F::Bad } else { F::Absent },
            dp: if t.has("parallel") { F::Bad } else { F::Absent },
        },
    };
    let deployment = read_deployment(&mut t, p);
    let offload = t.table("kv_cache_offload", p).map(|o| read_offload(o, p));
    let vllm_extra = match t.table("vllm_extra", p) {
        Some(x) => read_extra(&x, p),
        None => Vec::new(),
    };
    let span = t.span.clone();
    t.finish(p);
    InferenceSection {
        span,
        model,
        launcher,
        enable_expert_parallel,
        enable_dbo,
        enable_eplb,
        enable_return_routed_experts,
        enable_prefix_caching,
        parallel,
        deployment,
        offload,
        vllm_extra,
    }
}

/// Fields that only one deployment type reads.
const ONLY_MULTI: &[&str] = &["num_nodes"];
const ONLY_PD: &[&str] = &[
    "prefill_nodes_per_replica",
    "decode_nodes_per_replica",
    "num_prefill_nodes",
    "num_decode_nodes",
    "num_prefill_replicas",
    "num_decode_replicas",
    "prefill_env",
    "decode_env",
    "nixl_side_channel_port",
];

fn read_deployment(parent: &mut Table<'_>, p: &mut Problems) -> DeploymentSection {
    let empty = toml_edit::Table::new();
    let fallback = parent.span.clone();
    let mut t = parent
        .table("deployment", p)
        .unwrap_or_else(|| Table::new("inference.deployment", &empty, fallback));
    let kind = field(&mut t, "type", p, |t, k, p| t.choice(k, SHAPES, p));
    let shape = kind.or("single_node".to_string());
    // A field of another deployment type is a mistake worth saying (it would be ignored).
    if let Some(shape) = shape.as_deref() {
        for (fields, owners) in [
            (ONLY_MULTI, &["multi_node"][..]),
            (ONLY_PD, &["disaggregated"][..]),
            (&["num_replicas"][..], &["multi_node", "disaggregated"][..]),
        ] {
            if owners.contains(&shape) {
                continue;
            }
            let named: Vec<String> = owners.iter().map(|o| format!("`{o}`")).collect();
            for f in fields {
                if t.has(f) {
                    p.push(
                        Problem::new(format!(
                            "`inference.deployment.{f}` applies to {} deployments, and this one is `{shape}`",
                            named.join(" and ")
                        ))
                        .at(Some(t.key_span(f)))
                        .label("not read for this type")
                        .help(format!("drop `{f}`, or set `type = \"{}\"`", owners[0])),
                    );
                }
            }
        }
    }
    let d = DeploymentSection {
        span: t.span.clone(),
        kind,
        gpus_per_node: field(&mut t, "gpus_per_node", p, Table::count),
        router_port: field(&mut t, "router_port", p, Table::port),
        backend_port: field(&mut t, "backend_port", p, Table::port),
        router_policy: field(&mut t, "router_policy", p, |t, k, p| {
            t.choice(k, POLICIES, p)
        }),
        num_nodes: field(&mut t, "num_nodes", p, Table::count),
        num_replicas: field(&mut t, "num_replicas", p, Table::count),
        num_prefill_nodes: field(&mut t, "num_prefill_nodes", p, Table::count),
        num_decode_nodes: field(&mut t, "num_decode_nodes", p, Table::count),
        num_prefill_replicas: field(&mut t, "num_prefill_replicas", p, Table::count),
        num_decode_replicas: field(&mut t, "num_decode_replicas", p, Table::count),
        prefill_nodes_per_replica: field(&mut t, "prefill_nodes_per_replica", p, Table::count),
        decode_nodes_per_replica: field(&mut t, "decode_nodes_per_replica", p, Table::count),
        load_balancing: field(&mut t, "load_balancing", p, |t, k, p| {
            t.choice(k, LOAD_BALANCING, p)
        }),
        router_host: field(&mut t, "router_host", p, Table::string),
        router_log_level: field(&mut t, "router_log_level", p, |t, k, p| {
            t.choice(k, ROUTER_LOG_LEVELS, p)
        }),
        restart_budget: field(&mut t, "restart_budget", p, Table::count),
        restart_window: field(&mut t, "restart_window", p, Table::duration),
        restart_backoff: field(&mut t, "restart_backoff", p, Table::duration),
        env: t.env("env", p).unwrap_or_default(),
        prefill_env: t.env("prefill_env", p).unwrap_or_default(),
        decode_env: t.env("decode_env", p).unwrap_or_default(),
        ready_timeout: field(&mut t, "ready_timeout", p, Table::duration),
        probe_interval: field(&mut t, "probe_interval", p, Table::duration),
        router_launcher: field(&mut t, "router_launcher", p, Table::argv),
        router_metrics_port: field(&mut t, "router_metrics_port", p, Table::port),
        data_parallel_rpc_port: field(&mut t, "data_parallel_rpc_port", p, Table::port),
        nixl_side_channel_port: field(&mut t, "nixl_side_channel_port", p, Table::port),
    };
    if shape.as_deref() == Some("multi_node") && !d.num_nodes.is_set() && d.num_nodes != F::Bad {
        p.push(
            Problem::new("a `multi_node` deployment needs `num_nodes`")
                .at(Some(d.kind.span_or(&d.span)))
                .label("multi_node")
                .help("add `num_nodes = 2` (or more) to `[inference.deployment]`"),
        );
    }
    if shape.as_deref() == Some("disaggregated") {
        for (f, v, g, w) in [
            (
                "num_prefill_nodes",
                &d.num_prefill_nodes,
                "prefill_nodes_per_replica",
                &d.prefill_nodes_per_replica,
            ),
            (
                "num_decode_nodes",
                &d.num_decode_nodes,
                "decode_nodes_per_replica",
                &d.decode_nodes_per_replica,
            ),
        ] {
            if *v == F::Absent && *w == F::Absent {
                p.push(
                    Problem::new(format!(
                        "a `disaggregated` deployment needs `{f}` (or `{g}`)"
                    ))
                    .at(Some(d.kind.span_or(&d.span)))
                    .label("disaggregated")
                    .help(format!(
                        "add `{f} = 1` (or more) to `[inference.deployment]`"
                    )),
                );
            } else if v.is_set() && w.is_set() {
                p.push(
                    Problem::new(format!(
                        "`{f}` and `{g}` say the same thing two ways; give one of them"
                    ))
                    .at(Some(w.span_or(&d.span)))
                    .label("second spelling")
                    .help(format!(
                        "keep `{f}` (the total over the unit's replicas) or `{g}` (nodes of one replica; the total is it × the replica count)"
                    )),
                );
            }
        }
    }
    t.finish(p);
    d
}

fn read_offload(mut t: Table<'_>, p: &mut Problems) -> OffloadSection {
    let kind = field(&mut t, "type", p, |t, k, p| t.choice(k, OFFLOAD_TYPES, p));
    if kind == F::Absent {
        p.push(
            Problem::new("`inference.kv_cache_offload` needs a `type`")
                .at(Some(t.span.clone()))
                .label("in this table")
                .help("add `type = \"native\"` (vLLM's own CPU offload) or `type = \"mooncake\"`"),
        );
    }
    let has_cpu = t.has("cpu");
    let cpu_bytes = match t.table("cpu", p) {
        Some(mut cpu) => {
            let bytes = field(&mut cpu, "num_bytes", p, |t, k, p| {
                let i = t.integer(k, p)?;
                match u64::try_from(i.v) {
                    Ok(n) if n > 0 => Some(Sp::new(n, i.span)),
                    _ => {
                        p.push(
                            Problem::new(format!(
                                "`inference.kv_cache_offload.cpu.num_bytes` must be more than 0, not {}",
                                i.v
                            ))
                            .at(Some(i.span))
                            .label("no room")
                            .help("give the CPU tier its size in bytes, e.g. `num_bytes = 107374182400` (100 GiB)"),
                        );
                        None
                    }
                }
            });
            if bytes == F::Absent {
                p.push(
                    Problem::new("`inference.kv_cache_offload.cpu` needs `num_bytes`")
                        .at(Some(cpu.span.clone()))
                        .label("in this table")
                        .help("write e.g. `cpu = { num_bytes = 107374182400 }`"),
                );
            }
            cpu.finish(p);
            if bytes == F::Absent {
                F::Bad
            } else {
                bytes
            }
        }
        None if has_cpu => F::Bad,
        None => F::Absent,
    };
    let disk_path = match t.table("disk", p) {
        Some(mut disk) => {
            let path = field(&mut disk, "path", p, Table::string);
            match &path {
                F::Absent => p.push(
                    Problem::new("`inference.kv_cache_offload.disk` needs `path`")
                        .at(Some(disk.span.clone()))
                        .help("write e.g. `disk = { path = \"/mnt/nvme/kv\" }`"),
                ),
                F::Set(s) if s.v.trim().is_empty() || s.v.contains('\n') => p.push(
                    Problem::new(
                        "`inference.kv_cache_offload.disk.path` must be one non-empty line",
                    )
                    .at(Some(s.span.clone()))
                    .help("write e.g. `disk = { path = \"/mnt/nvme/kv\" }`"),
                ),
                _ => {}
            }
            disk.finish(p);
            path
        }
        None if t.has("disk") => F::Bad,
        None => F::Absent,
    };
    let mooncake_only = [
        "protocol",
        "device_name",
        "master_port",
        "master_metrics_port",
        "metadata_port",
        "client_port",
    ];
    if kind.get().is_some_and(|k| k.v == "native") {
        for f in mooncake_only {
            if t.has(f) {
                p.push(
                    Problem::new(format!(
                        "`inference.kv_cache_offload.{f}` applies to `mooncake` offload, and this one is `native`"
                    ))
                    .at(Some(t.key_span(f)))
                    .label("not read for native offload")
                    .help(format!("drop `{f}`, or set `type = \"mooncake\"`")),
                );
            }
        }
    }
    let o = OffloadSection {
        span: t.span.clone(),
        kind,
        cpu_bytes,
        has_cpu,
        disk_path,
        protocol: field(&mut t, "protocol", p, |t, k, p| {
            t.choice(k, MOONCAKE_PROTOCOLS, p)
        }),
        device_name: field(&mut t, "device_name", p, Table::string),
        master_port: field(&mut t, "master_port", p, Table::port),
        master_metrics_port: field(&mut t, "master_metrics_port", p, Table::port),
        metadata_port: field(&mut t, "metadata_port", p, Table::port),
        client_port: field(&mut t, "client_port", p, Table::port),
    };
    t.finish(p);
    o
}
