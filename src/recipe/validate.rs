//! The rules between a recipe's fields, checked in one pass that reports every problem
//! at once: node counts and bounds, replicas that divide their nodes, `tp × dp` that fits
//! a node, offload constraints, what the launcher manages. What passes becomes the
//! [`DeploymentSettings`] derivation starts from, every default filled in. A field the reader
//! already found wrong is skipped here, so one mistake is reported once.

use std::time::Duration;

use super::deployment::{
    LoadBalancing, Offload, OffloadKind, Replica, ReplicaRole, Shape, DEFAULT_BACKEND_PORT,
    DEFAULT_DP_RPC_PORT, DEFAULT_GPUS_PER_NODE, DEFAULT_LAUNCHER, DEFAULT_NIXL_PORT,
    DEFAULT_READY_TIMEOUT, DEFAULT_ROUTER_LAUNCHER, DEFAULT_ROUTER_LOG_LEVEL,
    DEFAULT_ROUTER_METRICS_PORT, DEFAULT_ROUTER_PORT, MAX_GPUS_PER_NODE, MAX_NODES,
};
use super::derive::{split, DeploymentSettings, PortBases};
use super::managed::{managed_dest, managed_env};
use super::ports;
use super::schema::{DeploymentSection, InferenceSection, Recipe, F};
use crate::diag::{Problem, Problems};
use offload::{mooncake, offload};

mod offload;

/// Checks every rule; the settings when all hold (`None` when anything is wrong: the
/// problems are in `p`).
pub fn settings<'a>(
    recipe: &'a Recipe,
    backend: &'a str,
    p: &mut Problems,
) -> Option<DeploymentSettings<'a>> {
    let inf = recipe.inference.as_ref()?;
    let before = p.len();
    let d = &inf.deployment;
    let shape = shape(inf);
    let too_big = check_size(d, shape, p);
    let replicas = match shape {
        Some(shape) if !too_big => replicas(inf, shape, p),
        _ => None,
    };
    check_router_host(d, p);
    check_gpus_per_node(d, p);
    if let Some(replicas) = &replicas {
        check_fit(inf, shape, replicas, p);
    }
    let offload = offload(inf, backend, p);
    check_features(inf, p);
    check_managed(inf, shape, offload.as_ref(), p);
    if p.len() > before {
        return None;
    }
    let mut s = values(inf, backend, shape?, replicas?, offload)?;
    // Port ranges are checked before the Mooncake fields are read: a wrong one of those
    // (already reported) ends the checks here, before the clash check.
    ports::check_ranges(&s, d, p);
    s.mooncake = match (&s.offload, &inf.offload) {
        (Some(o), Some(raw)) if o.kind == OffloadKind::Mooncake => Some(mooncake(raw)?),
        _ => None,
    };
    Some(s)
}

/// The deployment shape, from `type` and `enable_expert_parallel`.
fn shape(inf: &InferenceSection) -> Option<Shape> {
    let ep = inf.enable_expert_parallel.or(false);
    match (
        inf.deployment.kind.or("single_node".to_string()).as_deref(),
        ep,
    ) {
        (Some("single_node"), _) => Some(Shape::SingleNode),
        (Some("multi_node"), Some(true)) => Some(Shape::WideEp),
        (Some("multi_node"), _) => Some(Shape::MultiNode),
        (Some("disaggregated"), _) => Some(Shape::Disaggregated),
        _ => None,
    }
}

/// The nodes of one side of a P/D unit and its replica count, from either spelling: the
/// total (`num_prefill_nodes`) or per replica (`prefill_nodes_per_replica` × replicas).
fn pd_side(total: &F<u32>, per_replica: &F<u32>, replicas: &F<u32>) -> Option<(u64, u32)> {
    let r = replicas.or(1)?;
    if total.is_set() {
        return Some((u64::from(total.or(0)?), r));
    }
    Some((u64::from(per_replica.or(0)?) * u64::from(r), r))
}

/// How many nodes the deployment uses, as far as the counts are known.
pub fn planned_nodes(d: &DeploymentSection, shape: Option<Shape>) -> u64 {
    match shape {
        Some(Shape::MultiNode | Shape::WideEp) => d.num_nodes.or(0).map_or(0, u64::from),
        Some(Shape::Disaggregated) => {
            let units = d.num_replicas.or(1).map_or(1, u64::from);
            let side = |t, per, r| pd_side(t, per, r).map_or(0, |(n, _)| n);
            units
                * (side(
                    &d.num_prefill_nodes,
                    &d.prefill_nodes_per_replica,
                    &d.num_prefill_replicas,
                ) + side(
                    &d.num_decode_nodes,
                    &d.decode_nodes_per_replica,
                    &d.num_decode_replicas,
                ))
        }
        _ => 1,
    }
}

/// A bound on the size, so that a typo (`num_nodes = 1000000000`) is a message rather
/// than an exhausted machine. True when the deployment is too big.
fn check_size(d: &DeploymentSection, shape: Option<Shape>, p: &mut Problems) -> bool {
    let planned = planned_nodes(d, shape);
    let too_big = planned > MAX_NODES as u64;
    if too_big {
        p.push(
            Problem::new(format!(
                "the deployment would use {planned} nodes; prl-flow plans at most {MAX_NODES}"
            ))
            .at(Some(d.kind.span_or(&d.span)))
            .label("too many nodes")
            .help("check the node counts of `[inference.deployment]`"),
        );
    }
    too_big
}

/// The data-parallel ranks of a replica over `k` nodes: `dp` as written, else for P/D
/// every GPU of its nodes (`k × gpus_per_node / tp`, as prime-rl fills them), else 1.
fn replica_dp(inf: &InferenceSection, shape: Shape, k: usize) -> Option<u32> {
    let par = &inf.parallel;
    if par.dp.is_set() || shape != Shape::Disaggregated {
        return par.dp.or(1);
    }
    let gpus = inf.deployment.gpus_per_node.or(DEFAULT_GPUS_PER_NODE)?;
    let tp = par.tp.or(1)?.max(1);
    u32::try_from(k).ok()?.checked_mul((gpus / tp).max(1))
}

/// The replicas, each a DP group over its nodes; `None` when a count is wrong.
fn replicas(inf: &InferenceSection, shape: Shape, p: &mut Problems) -> Option<Vec<Replica>> {
    let d = &inf.deployment;
    match shape {
        Shape::SingleNode => Some(split(
            ReplicaRole::Engine,
            0,
            0,
            0,
            1,
            1,
            replica_dp(inf, shape, 1)?,
        )),
        Shape::MultiNode | Shape::WideEp => {
            let n = d.num_nodes.or(0).filter(|&n| n > 0);
            let default_r = if shape == Shape::WideEp { Some(1) } else { n };
            let r = match &d.num_replicas {
                F::Absent => default_r,
                other => other.or(1),
            };
            let (n, r) = (n?, r?);
            if !check_divides(d, &d.num_replicas, "num_replicas", "num_nodes", n, r, p) {
                return None;
            }
            let dp = replica_dp(inf, shape, (n / r) as usize)?;
            Some(split(
                ReplicaRole::Engine,
                0,
                0,
                0,
                n as usize,
                r as usize,
                dp,
            ))
        }
        Shape::Disaggregated => {
            let units = d.num_replicas.or(1)? as usize;
            let mut sides = Vec::new();
            let mut ok = true;
            for (role, nodes_f, per_f, reps_f, nodes_key, reps_key) in [
                (
                    ReplicaRole::Prefill,
                    &d.num_prefill_nodes,
                    &d.prefill_nodes_per_replica,
                    &d.num_prefill_replicas,
                    "num_prefill_nodes",
                    "num_prefill_replicas",
                ),
                (
                    ReplicaRole::Decode,
                    &d.num_decode_nodes,
                    &d.decode_nodes_per_replica,
                    &d.num_decode_replicas,
                    "num_decode_nodes",
                    "num_decode_replicas",
                ),
            ] {
                match pd_side(nodes_f, per_f, reps_f) {
                    Some((n, r)) if n > 0 => {
                        let n = n as u32;
                        if nodes_f.is_set()
                            && !check_divides(d, reps_f, reps_key, nodes_key, n, r, p)
                        {
                            ok = false;
                            continue;
                        }
                        sides.push((role, n as usize, r as usize));
                    }
                    _ => ok = false,
                }
            }
            if !ok {
                return None;
            }
            let unit_nodes: usize = sides.iter().map(|(_, n, _)| n).sum();
            let mut out = Vec::new();
            for unit in 0..units {
                let mut first = unit * unit_nodes;
                for &(role, n, r) in &sides {
                    let dp = replica_dp(inf, shape, n / r)?;
                    out.extend(split(role, unit, unit * r, first, n, r, dp));
                    first += n;
                }
            }
            Some(out)
        }
    }
}

/// `router_host` is an address the router can bind.
fn check_router_host(d: &DeploymentSection, p: &mut Problems) {
    if let Some(h) = d.router_host.get() {
        if h.v.trim().parse::<std::net::IpAddr>().is_err() {
            p.push(
                Problem::new(format!(
                    "`router_host` must be an IP address for the router to bind, not `{}`",
                    h.v
                ))
                .at(Some(h.span.clone()))
                .label("not an IP address")
                .help("write `router_host = \"0.0.0.0\"` to listen on every interface, or leave it out to bind the node's own address"),
            );
        }
    }
}

/// Every replica spans the same number of nodes: `replicas` must divide `nodes`.
fn check_divides(
    d: &DeploymentSection,
    reps_f: &F<u32>,
    reps_key: &str,
    nodes_key: &str,
    nodes: u32,
    replicas: u32,
    p: &mut Problems,
) -> bool {
    if nodes % replicas == 0 {
        return true;
    }
    p.push(
        Problem::new(format!(
            "`{reps_key}` ({replicas}) must divide `{nodes_key}` ({nodes}): every replica spans the same number of nodes"
        ))
        .at(Some(reps_f.span_or(&d.span)))
        .label(format!("does not divide {nodes_key}"))
        .help(format!("pick a divisor of {nodes}: {}", divisors(nodes))),
    );
    false
}

fn check_gpus_per_node(d: &DeploymentSection, p: &mut Problems) {
    if d.gpus_per_node
        .or(DEFAULT_GPUS_PER_NODE)
        .is_some_and(|g| g > MAX_GPUS_PER_NODE)
    {
        p.push(
            Problem::new(format!("`gpus_per_node` is more than {MAX_GPUS_PER_NODE}"))
                .at(Some(d.gpus_per_node.span_or(&d.span)))
                .label("too many GPUs")
                .help("write the number of GPUs of one node, e.g. `gpus_per_node = 8`"),
        );
    }
}

/// GPUs: each node of a replica hosts `dp / k` ranks of `tp` GPUs. (In u64: the counts
/// are anything a user wrote.)
fn check_fit(inf: &InferenceSection, shape: Option<Shape>, replicas: &[Replica], p: &mut Problems) {
    let par = &inf.parallel;
    let (Some(tp), Some(gpus)) = (
        par.tp.or(1).map(u64::from),
        inf.deployment
            .gpus_per_node
            .or(DEFAULT_GPUS_PER_NODE)
            .map(u64::from),
    ) else {
        return;
    };
    let mut sizes: Vec<(ReplicaRole, usize, u32)> = replicas
        .iter()
        .map(|r| (r.role, r.nodes.len(), r.dp))
        .collect();
    sizes.sort_by_key(|&(role, k, dp)| (role as u8, k, dp));
    sizes.dedup();
    for (role, k, dp) in sizes {
        let (k64, dp) = (k as u64, u64::from(dp));
        let side = match role {
            ReplicaRole::Engine => String::new(),
            r => format!(" ({} side)", r.kind()),
        };
        if dp % k64 != 0 {
            p.push(
                Problem::new(format!(
                    "`dp` ({dp}) cannot be spread evenly over the {k} nodes of each replica{side}"
                ))
                .at(Some(par.dp.span_or(&par.span)))
                .label(format!("not a multiple of {k}"))
                .help(format!(
                    "make `dp` a multiple of {k}, e.g. `dp = {}`",
                    k64 * (dp / k64).max(1)
                )),
            );
            continue;
        }
        let local = dp / k64;
        if local * tp > gpus {
            p.push(
                Problem::new(format!(
                    "`tp × dp` does not fit a node{side}: {local} rank(s) × tp {tp} = {} GPUs per node, and `gpus_per_node` is {gpus}",
                    local * tp
                ))
                .at(Some(par.dp.span_or(&par.tp.span_or(&par.span))))
                .label("too many GPUs per node")
                .help(if k == 1 {
                    format!("make `tp × dp` at most {gpus}, or raise `gpus_per_node`")
                } else {
                    format!("make `tp × dp / {k}` at most {gpus} (dp counts the ranks of a whole replica), or use more nodes per replica")
                }),
            );
        }
        if shape == Some(Shape::WideEp) {
            check_wide_ep(inf, k64, tp, dp, gpus, p);
        }
    }
}

/// Wide-EP fills every GPU of its nodes with ranks.
fn check_wide_ep(inf: &InferenceSection, k: u64, tp: u64, dp: u64, gpus: u64, p: &mut Problems) {
    let par = &inf.parallel;
    if gpus % tp != 0 {
        p.push(
            Problem::new(format!(
                "wide-EP needs `gpus_per_node` ({gpus}) to be a multiple of `tp` ({tp})"
            ))
            .at(Some(par.tp.span_or(&par.span)))
            .label("does not divide gpus_per_node")
            .help(
                "pick a `tp` that divides `gpus_per_node` (often `tp = 1` with expert parallelism)",
            ),
        );
    } else if dp * tp != k * gpus {
        p.push(
            Problem::new(format!(
                "wide-EP uses every GPU of its nodes: `dp × tp` must be {} ({k} node(s) per replica × {gpus} GPUs), not {}",
                k * gpus,
                dp * tp
            ))
            .at(Some(par.dp.span_or(&par.span)))
            .label("does not fill the replica")
            .help(format!("set `dp = {}`", k * gpus / tp)),
        );
    }
}

/// Features that exclude or need one another.
fn check_features(inf: &InferenceSection, p: &mut Problems) {
    if inf.enable_return_routed_experts.or(false) == Some(true) && inf.offload.is_some() {
        p.push(
            Problem::new("`enable_return_routed_experts` cannot be combined with `kv_cache_offload`: routed experts are not kept with offloaded KV blocks, so a replayed prefix would come back without them")
                .at(Some(inf.enable_return_routed_experts.span_or(&inf.span)))
                .label("router replay")
                .help("drop `[inference.kv_cache_offload]`, or set `enable_return_routed_experts = false`"),
        );
    }
    let ep_default = inf
        .deployment
        .kind
        .get()
        .is_some_and(|k| k.v == "disaggregated");
    if inf.enable_eplb.or(false) == Some(true)
        && inf.enable_expert_parallel.or(ep_default) == Some(false)
    {
        p.push(
            Problem::new("`enable_eplb` balances experts across expert-parallel ranks, and `enable_expert_parallel` is off")
                .at(Some(inf.enable_eplb.span_or(&inf.span)))
                .label("needs expert parallelism")
                .help("set `enable_expert_parallel = true`, or drop `enable_eplb`"),
        );
    }
}

/// Env variables and `vllm serve` options the launcher sets may not be set by hand.
fn check_managed(
    inf: &InferenceSection,
    shape: Option<Shape>,
    offload: Option<&Offload>,
    p: &mut Problems,
) {
    let d = &inf.deployment;
    let disaggregated = shape == Some(Shape::Disaggregated);
    let mooncake = offload.is_some_and(|o| o.kind == OffloadKind::Mooncake);
    for (table, vars) in [
        ("env", &d.env),
        ("prefill_env", &d.prefill_env),
        ("decode_env", &d.decode_env),
    ] {
        for (k, _) in vars {
            if let Some(why) = managed_env(&k.v, disaggregated, mooncake) {
                p.push(
                    Problem::new(format!(
                        "`inference.deployment.{table}` may not set `{}`: the launcher manages it",
                        k.v
                    ))
                    .at(Some(k.span.clone()))
                    .label("managed by the launcher")
                    .help(why),
                );
            }
        }
    }
    for x in &inf.vllm_extra {
        if let Some(why) = managed_dest(&x.dest, disaggregated) {
            p.push(
                Problem::new(format!(
                    "`inference.vllm_extra.{}` sets what the launcher manages",
                    x.key.v
                ))
                .at(Some(x.key.span.clone()))
                .label("managed by the launcher")
                .help(why),
            );
        }
    }
}

/// The values derivation needs, each default filled in; `None` when one of them was
/// already reported wrong.
fn values<'a>(
    inf: &'a InferenceSection,
    backend: &'a str,
    shape: Shape,
    replicas: Vec<Replica>,
    offload: Option<Offload>,
) -> Option<DeploymentSettings<'a>> {
    let d = &inf.deployment;
    let interval_default = if backend == "local" {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    let gpus_per_node = d.gpus_per_node.or(DEFAULT_GPUS_PER_NODE)?;
    let tp = inf.parallel.tp.or(1)?;
    let load_balancing = match d.load_balancing.or("external".to_string())?.as_str() {
        "internal" => LoadBalancing::Internal,
        _ => LoadBalancing::External,
    };
    let ports = PortBases {
        backend: d.backend_port.or(DEFAULT_BACKEND_PORT)?,
        router: d.router_port.or(DEFAULT_ROUTER_PORT)?,
        router_metrics: d.router_metrics_port.or(DEFAULT_ROUTER_METRICS_PORT)?,
        dp_rpc: d.data_parallel_rpc_port.or(DEFAULT_DP_RPC_PORT)?,
        nixl: d.nixl_side_channel_port.or(DEFAULT_NIXL_PORT)?,
    };
    let model = inf.model.get()?.v.clone();
    let launcher = inf.launcher.or(to_strings(DEFAULT_LAUNCHER))?;
    let router_launcher = d.router_launcher.or(to_strings(DEFAULT_ROUTER_LAUNCHER))?;
    let ready_timeout = d.ready_timeout.or(DEFAULT_READY_TIMEOUT)?;
    let probe_interval = d.probe_interval.or(interval_default)?;
    let router_policy = d.router_policy.or("consistent_hash".to_string())?;
    let router_log_level = d
        .router_log_level
        .or(DEFAULT_ROUTER_LOG_LEVEL.to_string())?;
    let router_bind = match &d.router_host {
        F::Set(h) => Some(h.v.trim().to_string()),
        F::Bad => return None,
        F::Absent => None,
    };
    let units = replicas.iter().map(|r| r.unit + 1).max().unwrap_or(1);
    let defaults = crate::plan::RestartPolicy::default();
    let restart = crate::plan::RestartPolicy {
        budget: d.restart_budget.or(defaults.budget)?,
        window: d.restart_window.or(defaults.window)?,
        backoff: d.restart_backoff.or(defaults.backoff)?,
        max_backoff: defaults.max_backoff,
    };
    let prefix_caching = match (
        inf.enable_prefix_caching.or(false)?,
        &inf.enable_prefix_caching,
        &offload,
    ) {
        (_, _, Some(_)) => Some(true),
        (v, F::Set(_), None) => Some(v),
        _ => None,
    };
    let strings = |vars: &[(super::doc::Sp<String>, super::doc::Sp<String>)]| {
        vars.iter()
            .map(|(k, v)| (k.v.clone(), v.v.clone()))
            .collect()
    };
    Some(DeploymentSettings {
        shape,
        backend,
        model,
        launcher,
        router_launcher,
        replicas,
        units,
        gpus_per_node,
        tp,
        load_balancing,
        expert_parallel: inf
            .enable_expert_parallel
            .or(shape == Shape::Disaggregated)
            .unwrap_or(false),
        dbo: inf.enable_dbo.or(false).unwrap_or(false),
        eplb: inf.enable_eplb.or(false).unwrap_or(false),
        return_routed_experts: inf.enable_return_routed_experts.or(false).unwrap_or(false),
        prefix_caching,
        router_policy,
        router_bind,
        router_log_level,
        restart,
        ready_timeout,
        probe_interval,
        ports,
        offload,
        mooncake: None,
        env: strings(&d.env),
        prefill_env: strings(&d.prefill_env),
        decode_env: strings(&d.decode_env),
        vllm_extra: &inf.vllm_extra,
    })
}

fn to_strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn divisors(n: u32) -> String {
    (1..=n)
        .filter(|d| n % d == 0)
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
