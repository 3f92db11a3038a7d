//! `prl-flow import prime-rl FILE`: a prime-rl `rl.toml` (with `[inference]`, `[deployment]`
//! and `[slurm]`) or a bare `inference.toml` becomes a recipe.
//!
//! Both spellings prime-rl has used are read: the early deployment fields (`router_port`,
//! `router_policy`, `num_prefill_nodes`, `prefill_env_overrides`, ...) and the later ones
//! (`[deployment.router] port/policy`, `prefill_nodes_per_replica`, `prefill_env_vars`,
//! the RL `[deployment] num_infer_nodes/num_infer_replicas`). Where prime-rl's default
//! differs from prl-flow's, the recipe states prime-rl's value. This module lays out the
//! deployment and the SLURM backend; `engine` maps the engine's own settings.
//! docs/import.md has the table of what maps to what.

mod engine;
mod slurm;

use toml_edit::{value, DocumentMut, ImDocument, InlineTable, Item, Table};

use super::source::{Ctx, Tab, R, V};
use super::{ImportError, Imported};

/// prime-rl's defaults that differ from prl-flow's (or that prl-flow leaves to the backend).
const GPUS_PER_NODE: i64 = 8;
const ROUTER_PORT: i64 = 8000;
const BACKEND_PORT: i64 = 8100;
const DECODE_PORT: i64 = 8200;
const POLICY: &str = "consistent_hash";
const DP_RPC_PORT: i64 = 13345;
const NIXL_PORT: i64 = 5600;
/// The policies prl-flow's router accepts.
const POLICIES: &[&str] = &[
    "consistent_hash",
    "round_robin",
    "cache_aware",
    "power_of_two",
    "random",
];

/// The recipe being built, table by table.
#[derive(Default)]
struct Out {
    inference: Table,
    parallel: Table,
    deployment: Table,
    env: Table,
    prefill_env: Table,
    decode_env: Table,
    offload: Option<Table>,
    extra: Table,
    backend: Option<Table>,
}

/// The deployment shape, as the engine settings need it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Single,
    Multi,
    Disaggregated,
}

/// The RL file's own tables that shape the inference deployment.
struct Rl<'a> {
    deployment: Option<Tab<'a>>,
    model_name: Option<V<String>>,
}

/// Imports the text of a prime-rl config; `file` names it in the recipe's header.
pub fn import(file: &str, source: &str) -> Result<Imported, ImportError> {
    let doc = ImDocument::parse(source).map_err(|e| {
        let ctx = Ctx::new(source);
        ctx.error(
            e.span().as_ref(),
            format!("invalid TOML: {}", e.message().trim()),
        )
    })?;
    let mut ctx = Ctx::new(source);
    let mut out = Out::default();
    let mut root = Tab::new(doc.as_table(), "");
    let is_rl = root.has("inference") || root.has("trainer") || root.has("orchestrator");
    if is_rl {
        let Some(mut inf) = root.table(&ctx, "inference")? else {
            return Err(ctx.error(
                None,
                "this RL config has no `[inference]` table: prime-rl starts no inference server for it, so there is nothing to import",
            ));
        };
        let model_name = match root.table(&ctx, "model")? {
            Some(mut m) => {
                let name = m.str(&ctx, "name")?;
                m.rest(&mut ctx, |_| {
                    "a shared training setting of the RL run".into()
                });
                name
            }
            None => None,
        };
        let rl = Rl {
            deployment: root.table(&ctx, "deployment")?,
            model_name,
        };
        let slurm = root.table(&ctx, "slurm")?;
        read(&mut ctx, &mut inf, Some(rl), slurm, &mut out)?;
        inf.rest(&mut ctx, |_| unknown());
        root.rest(&mut ctx, |_| {
            "part of the RL run (training, orchestration, logging), not of the inference deployment"
                .into()
        });
    } else {
        let slurm = root.table(&ctx, "slurm")?;
        read(&mut ctx, &mut root, None, slurm, &mut out)?;
        root.rest(&mut ctx, |_| unknown());
    }
    Ok(Imported {
        recipe: write(file, out),
        notes: ctx.notes,
    })
}

pub(super) fn unknown() -> String {
    "not a field prime-rl's inference config has (as far as this importer knows); left out".into()
}

/// Reads the inference config `inf` (the `[inference]` table, or a bare file's root).
fn read<'a>(
    ctx: &mut Ctx,
    inf: &mut Tab<'a>,
    rl: Option<Rl<'a>>,
    slurm: Option<Tab<'a>>,
    out: &mut Out,
) -> R<()> {
    let mut dep = inf.table(ctx, "deployment")?;
    let shape = match dep.as_mut().map(|d| d.str(ctx, "type")).transpose()?.flatten() {
        None => Shape::Single,
        Some(t) => match t.v.as_str() {
            "single_node" => Shape::Single,
            "multi_node" => Shape::Multi,
            "disaggregated" => Shape::Disaggregated,
            other => {
                return Err(ctx.error(
                    t.at.as_ref(),
                    format!("`{}`: unknown deployment type \"{other}\" (prime-rl has single_node, multi_node and disaggregated)", t.key),
                ))
            }
        },
    };
    let ep = engine::read(
        ctx,
        inf,
        shape,
        rl.as_ref().and_then(|r| r.model_name.clone()),
        out,
    )?;
    let mut rl_dep = rl.and_then(|r| r.deployment);
    let gpus = layout(ctx, inf, dep.as_mut(), rl_dep.as_mut(), shape, ep, out)?;
    if let Some(d) = dep {
        d.rest(ctx, |_| unknown());
    }
    if let Some(d) = rl_dep {
        d.rest(ctx, |_| {
            "a training setting of the RL deployment, not part of the inference recipe".into()
        });
    }
    match slurm {
        Some(s) => out.backend = Some(slurm::backend(ctx, s, gpus)?),
        None if shape != Shape::Single => ctx.note(
            "slurm",
            None,
            "absent: prime-rl runs multi_node and disaggregated deployments only under SLURM; the recipe has no [backend] (so `local`): add `[backend] type = \"slurm\"`",
        ),
        None => {}
    }
    Ok(())
}

/// The deployment table and the parallel layout; returns the GPUs per node.
fn layout(
    ctx: &mut Ctx,
    inf: &mut Tab,
    mut dep: Option<&mut Tab>,
    mut rl_dep: Option<&mut Tab>,
    shape: Shape,
    expert_parallel: bool,
    out: &mut Out,
) -> R<i64> {
    let d = &mut out.deployment;
    d.insert(
        "type",
        value(match shape {
            Shape::Single => "single_node",
            Shape::Multi => "multi_node",
            Shape::Disaggregated => "disaggregated",
        }),
    );
    // GPUs per node: the RL deployment's wins (prime-rl's RL launcher uses it).
    let inf_gpus = match dep.as_deref_mut() {
        Some(t) => t.count(ctx, "gpus_per_node")?,
        None => None,
    };
    let rl_gpus = match rl_dep.as_deref_mut() {
        Some(t) => t.count(ctx, "gpus_per_node")?,
        None => None,
    };
    let gpus = match (&rl_gpus, &inf_gpus) {
        (Some(r), Some(i)) if r.v != i.v => {
            ctx.note(
                &i.key,
                i.at.as_ref(),
                format!(
                    "prime-rl's RL launcher uses `deployment.gpus_per_node` ({}) instead",
                    r.v
                ),
            );
            r.v
        }
        (Some(r), _) => r.v,
        (None, Some(i)) => i.v,
        (None, None) => GPUS_PER_NODE,
    };
    d.insert("gpus_per_node", value(gpus));

    // Router and ports.
    let (port, policy) = router(ctx, dep.as_deref_mut())?;
    let server = inf.table(ctx, "server")?;
    let mut endpoint = port;
    if let Some(mut s) = server {
        if let Some(p) = s.int(ctx, "port")? {
            if shape == Shape::Single {
                // A single-node prime-rl server listens there itself; here the router does.
                endpoint = p.v;
            } else {
                ctx.note(
                    &p.key,
                    p.at.as_ref(),
                    "prime-rl's multi-node launchers do not use it (clients reach the router)",
                );
            }
        }
        s.rest(ctx, |_| {
            "a setting of prime-rl's own server wrapper; plain `vllm serve` has no such option"
                .into()
        });
    }
    d.insert("router_port", value(endpoint));
    d.insert("router_host", value("0.0.0.0"));
    d.insert("router_log_level", value("debug"));
    if let Some(p) = policy {
        d.insert("router_policy", value(p));
    }
    let backend_port = match dep.as_deref_mut() {
        Some(t) => t.int(ctx, "backend_port")?.map_or(BACKEND_PORT, |v| v.v),
        None => BACKEND_PORT,
    };
    let dp_rpc = inf
        .int(ctx, "data_parallel_rpc_port")?
        .map_or(DP_RPC_PORT, |v| v.v);

    let (tp, dp) = parallel(ctx, inf)?;
    out.parallel
        .insert("tp", value(tp.as_ref().map_or(1, |v| v.v)));
    let tpv = tp.as_ref().map_or(1, |v| v.v);
    let per_node = gpus / tpv;
    if per_node < 1 {
        return Err(ctx.error(
            tp.as_ref().and_then(|t| t.at.as_ref()),
            format!("`tp` ({tpv}) is larger than gpus_per_node ({gpus})"),
        ));
    }
    let rl_type = match rl_dep.as_deref_mut() {
        Some(t) => t.str(ctx, "type")?,
        None => None,
    };
    let rl_multi = rl_type.as_ref().is_some_and(|t| t.v == "multi_node");
    let infer_nodes = match (rl_multi, rl_dep.as_deref_mut()) {
        (true, Some(t)) => t.int(ctx, "num_infer_nodes")?,
        _ => None,
    };
    if let Some(n) = &infer_nodes {
        if n.v < 1 {
            return Err(ctx.error(
                n.at.as_ref(),
                format!(
                    "`{}` is {}: the RL run starts no inference, so there is nothing to import",
                    n.key, n.v
                ),
            ));
        }
    }
    let infer_replicas = match (rl_multi, rl_dep.as_deref_mut()) {
        (true, Some(t)) => t.count(ctx, "num_infer_replicas")?,
        _ => None,
    };
    let islands = infer_replicas.as_ref().map_or(1, |v| v.v);

    match shape {
        Shape::Single => {
            d.insert("backend_port", value(backend_port));
            d.insert("data_parallel_rpc_port", value(dp_rpc));
            let mut dpv = dp.as_ref().map_or(1, |v| v.v);
            if let (Some(t), false) = (rl_dep, rl_multi) {
                // prime-rl's single-node RL fills the inference GPUs with DP ranks.
                if let Some(g) = t.count(ctx, "num_infer_gpus")? {
                    if g.v % tpv != 0 {
                        return Err(ctx.error(
                            g.at.as_ref(),
                            format!("`{}` ({}) must be a multiple of tp ({tpv})", g.key, g.v),
                        ));
                    }
                    dpv = g.v / tpv;
                }
            }
            out.parallel.insert("dp", value(dpv));
        }
        Shape::Multi => {
            d.insert("backend_port", value(backend_port));
            d.insert("data_parallel_rpc_port", value(dp_rpc));
            let inf_nodes = match dep.as_deref_mut() {
                Some(t) => t.count(ctx, "num_nodes")?,
                None => None,
            };
            let per_replica = match (&infer_nodes, &inf_nodes) {
                (Some(n), Some(i)) if rl_multi => {
                    if n.v != i.v {
                        ctx.note(&i.key, i.at.as_ref(), format!("prime-rl's RL launcher uses `deployment.num_infer_nodes` ({}) instead", n.v));
                    }
                    n.v
                }
                (Some(n), _) => n.v,
                (None, Some(i)) => i.v,
                (None, None) => 2,
            };
            let nodes = per_replica * islands;
            d.insert("num_nodes", value(nodes));
            let replicas = if expert_parallel { islands } else { nodes };
            d.insert("num_replicas", value(replicas));
            let want = if expert_parallel {
                per_replica * per_node
            } else {
                per_node
            };
            if let Some(v) = &dp {
                if v.v != want && v.v != 1 {
                    ctx.note(&v.key, v.at.as_ref(), format!("prime-rl's multi-node launcher runs gpus_per_node / tp ranks on every node, so each replica has dp {want}"));
                }
            }
            out.parallel.insert("dp", value(want));
            if let Some(r) = infer_replicas.as_ref().filter(|r| r.v > 1) {
                ctx.note(&r.key, r.at.as_ref(), format!("prime-rl starts a router per inference replica ({}); prl-flow's multi_node puts one router in front of every rank", r.v));
            }
        }
        Shape::Disaggregated => {
            d.insert("backend_port", value(backend_port));
            d.insert("data_parallel_rpc_port", value(dp_rpc));
            if let Some(v) = &dp {
                ctx.note(&v.key, v.at.as_ref(), "prime-rl sizes each P/D replica's DP group as its nodes × gpus_per_node / tp; prl-flow does the same when dp is left out, and the recipe writes it out when both roles span as many nodes");
            }
            let t = dep
                .as_deref_mut()
                .expect("a disaggregated deployment has its table");
            let decode_port = t.int(ctx, "decode_port")?;
            if let Some(p) = t.int(ctx, "prefill_port")? {
                d.insert("backend_port", value(p.v));
            }
            let prefill = backend_port_of(d);
            let dec = decode_port.as_ref().map_or(DECODE_PORT, |v| v.v);
            if dec != prefill {
                let at = decode_port.as_ref().and_then(|v| v.at.clone());
                let key = decode_port.as_ref().map_or(
                    format!("{} (default {DECODE_PORT})", t.path("decode_port")),
                    |v| v.key.clone(),
                );
                ctx.note(&key, at.as_ref(), format!("prl-flow gives every engine one backend_port ({prefill}); decode engines listen there (they run on their own nodes)"));
            }
            let (p_nodes, p_per) = pd_nodes(ctx, t, d, "prefill")?;
            let (d_nodes, d_per) = pd_nodes(ctx, t, d, "decode")?;
            if p_per == d_per {
                // Each role replica is one DP group over its nodes, every GPU used.
                out.parallel.insert("dp", value(p_per * per_node));
            }
            d.insert("nixl_side_channel_port", value(NIXL_PORT));
            if let Some(n) = &infer_nodes {
                if n.v != p_nodes + d_nodes {
                    return Err(ctx.error(n.at.as_ref(), format!("`{}` ({}) must equal the prefill and decode nodes of one P/D unit ({}), as prime-rl requires", n.key, n.v, p_nodes + d_nodes)));
                }
            }
            if rl_multi {
                d.insert("num_replicas", value(islands));
            }
            for (old, new, dest) in [
                ("prefill_env_overrides", "prefill_env_vars", "prefill"),
                ("decode_env_overrides", "decode_env_vars", "decode"),
            ] {
                for name in [old, new] {
                    for v in t.env(ctx, name)? {
                        let table = if dest == "prefill" {
                            &mut out.prefill_env
                        } else {
                            &mut out.decode_env
                        };
                        engine::put_env(ctx, table, v, true, false);
                    }
                }
            }
            for k in ["prefill_vllm_overrides", "decode_vllm_overrides"] {
                if let Some(v) = t.take(k) {
                    ctx.note(&v.key, v.at.as_ref(), "prl-flow has one vllm_extra for both roles; per-role flags need a template override (engine.argv.j2)");
                }
            }
        }
    }
    if shape != Shape::Disaggregated {
        if let Some(t) = dep {
            for k in [
                "num_prefill_nodes",
                "num_decode_nodes",
                "prefill_port",
                "decode_port",
            ] {
                if let Some(v) = t.take(k) {
                    ctx.note(
                        &v.key,
                        v.at.as_ref(),
                        "only used by a disaggregated deployment",
                    );
                }
            }
        }
    }
    Ok(gpus)
}

fn backend_port_of(d: &Table) -> i64 {
    d.get("backend_port")
        .and_then(Item::as_integer)
        .unwrap_or(BACKEND_PORT)
}

/// A count that may be absent.
type Opt = Option<V<i64>>;

/// `[inference.parallel] tp/dp`.
fn parallel(ctx: &mut Ctx, inf: &mut Tab) -> R<(Opt, Opt)> {
    let Some(mut p) = inf.table(ctx, "parallel")? else {
        return Ok((None, None));
    };
    let tp = p.count(ctx, "tp")?;
    let dp = p.count(ctx, "dp")?;
    p.rest(ctx, |_| "prl-flow places engines by tp and dp only".into());
    Ok((tp, dp))
}

/// The router: `[deployment.router] type/port/policy`, or the early `router_port`/`router_policy`.
fn router(ctx: &mut Ctx, dep: Option<&mut Tab>) -> R<(i64, Option<String>)> {
    let Some(dep) = dep else {
        return Ok((ROUTER_PORT, Some(POLICY.into())));
    };
    let mut port = dep.int(ctx, "router_port")?;
    let mut policy = dep.str(ctx, "router_policy")?;
    if let Some(mut r) = dep.table(ctx, "router")? {
        if let Some(old) = port.as_ref().or(None) {
            if r.has("port") {
                return Err(ctx.error(
                    old.at.as_ref(),
                    format!(
                        "`{}` and `{}` both set the router's port; keep one",
                        old.key,
                        r.path("port")
                    ),
                ));
            }
        }
        if let Some(t) = r.str(ctx, "type")? {
            if t.v != "vllm-router" {
                ctx.note(
                    &t.key,
                    t.at.as_ref(),
                    format!(
                        "prl-flow runs vllm-router only; \"{}\" is not carried over",
                        t.v
                    ),
                );
            }
        }
        port = port.or(r.int(ctx, "port")?);
        policy = policy.or(r.str(ctx, "policy")?);
        r.rest(ctx, |_| {
            "a setting of a router prl-flow does not run (it runs vllm-router)".into()
        });
    }
    let policy = match policy {
        None => Some(POLICY.to_string()),
        Some(p) if POLICIES.contains(&p.v.as_str()) => Some(p.v),
        Some(p) => {
            ctx.note(
                &p.key,
                p.at.as_ref(),
                format!(
                    "\"{}\" is not a policy prl-flow can start the router with ({})",
                    p.v,
                    POLICIES.join(", ")
                ),
            );
            None
        }
    };
    Ok((port.map_or(ROUTER_PORT, |v| v.v), policy))
}

/// One role's node count, in the spelling the source uses; returns the total and the
/// nodes per replica.
fn pd_nodes(ctx: &mut Ctx, t: &mut Tab, d: &mut Table, role: &str) -> R<(i64, i64)> {
    let total = t.count(ctx, &format!("num_{role}_nodes"))?;
    let per = t.count(ctx, &format!("{role}_nodes_per_replica"))?;
    let replicas = t.count(ctx, &format!("num_{role}_replicas"))?;
    let r = replicas.as_ref().map_or(1, |v| v.v);
    let total_v = match (&total, &per) {
        (Some(a), Some(b)) => {
            return Err(ctx.error(
                b.at.as_ref(),
                format!(
                    "`{}` and `{}` are both set; prime-rl accepts only one",
                    a.key, b.key
                ),
            ))
        }
        (Some(a), None) => {
            if a.v % r != 0 {
                return Err(ctx.error(
                    a.at.as_ref(),
                    format!(
                        "`{}` ({}) must be divisible by num_{role}_replicas ({r})",
                        a.key, a.v
                    ),
                ));
            }
            d.insert(&format!("num_{role}_nodes"), value(a.v));
            a.v
        }
        (None, Some(b)) => {
            d.insert(&format!("{role}_nodes_per_replica"), value(b.v));
            b.v * r
        }
        // prime-rl's later default: one node per replica.
        (None, None) => {
            d.insert(&format!("num_{role}_nodes"), value(r));
            r
        }
    };
    d.insert(&format!("num_{role}_replicas"), value(r));
    Ok((total_v, total_v / r))
}

/// The recipe's text: a header naming the source, then the tables in the order of
/// docs/recipes.md.
fn write(file: &str, out: Out) -> String {
    let mut doc = DocumentMut::new();
    let mut inf = out.inference;
    inf.decor_mut().set_prefix(format!(
        "# Imported by `prl-flow import prime-rl` from {file}.\n\
         # prime-rl's defaults are written out where they differ from prl-flow's; every value\n\
         # that could not be carried over was listed on stderr.\n"
    ));
    let mut dep = out.deployment;
    for (name, env) in [
        ("env", out.env),
        ("prefill_env", out.prefill_env),
        ("decode_env", out.decode_env),
    ] {
        if !env.is_empty() {
            dep.insert(name, Item::Table(env));
        }
    }
    inf.insert("parallel", Item::Table(out.parallel));
    inf.insert("deployment", Item::Table(dep));
    if let Some(o) = out.offload {
        inf.insert("kv_cache_offload", Item::Table(o));
    }
    if !out.extra.is_empty() {
        inf.insert("vllm_extra", Item::Table(out.extra));
    }
    doc.insert("inference", Item::Table(inf));
    if let Some(b) = out.backend {
        doc.insert("backend", Item::Table(b));
    }
    doc.to_string()
}

/// `{ key = value }` for a tier table.
fn inline(k: &str, v: impl Into<toml_edit::Value>) -> InlineTable {
    let mut t = InlineTable::new();
    t.insert(k, v.into());
    t
}
