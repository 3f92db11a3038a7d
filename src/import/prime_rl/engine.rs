//! The engine's settings of a prime-rl inference config: the model, the `enable_*`
//! switches, KV offload, the environment and every option prime-rl forwards to
//! `vllm serve`, mapped to recipe fields or `vllm_extra`.

use toml_edit::{value, Item, Table};

use super::super::source::{plain, plain_item, Ctx, Tab, R, V};
use super::{inline, Out, Shape};
use crate::recipe::flags;
use crate::recipe::managed::{managed_dest, managed_env};

/// prime-rl's default model (its `BaseModelConfig.name`).
const MODEL: &str = "Qwen/Qwen3-0.6B";
/// vLLM's accepted LoRA ranks: prime-rl rounds `max_lora_rank` up to one of them.
const LORA_RANKS: &[i64] = &[8, 16, 32, 64, 128, 256, 320, 512];

/// Reads the engine's settings into `out`; returns whether expert parallelism is on.
pub(super) fn read(
    ctx: &mut Ctx,
    inf: &mut Tab,
    shape: Shape,
    shared_model: Option<V<String>>,
    out: &mut Out,
) -> R<bool> {
    let pd = shape == Shape::Disaggregated;
    model(ctx, inf, shared_model, out)?;

    // The switches: prime-rl turns expert parallelism on for P/D, EPLB off.
    let i = &mut out.inference;
    let ep = inf.bool(ctx, "enable_expert_parallel")?.map(|v| v.v);
    let ep = ep.unwrap_or(pd);
    i.insert("enable_expert_parallel", value(ep));
    let eplb = inf.bool(ctx, "enable_eplb")?.is_some_and(|v| v.v);
    i.insert("enable_eplb", value(eplb));
    for k in ["enable_dbo", "enable_return_routed_experts"] {
        if let Some(v) = inf.bool(ctx, k)? {
            i.insert(k, value(v.v));
        }
    }
    let prefix = inf.bool(ctx, "enable_prefix_caching")?;
    let mooncake = offload(ctx, inf, out)?;
    match (&prefix, out.offload.is_some()) {
        (Some(p), true) if !p.v => {
            return Err(ctx.error(
                p.at.as_ref(),
                format!("`{}` is false with KV offload, which prime-rl refuses (offload needs prefix caching)", p.key),
            ))
        }
        (_, true) => {
            out.inference.insert("enable_prefix_caching", value(true));
        }
        (Some(p), false) => {
            out.inference.insert("enable_prefix_caching", value(p.v));
        }
        (None, false) => {}
    }

    // Options prime-rl always passes, with its values.
    let e = &mut out.extra;
    let gmu = inf
        .float(ctx, "gpu_memory_utilization")?
        .map_or(0.9, |v| v.v);
    e.insert("gpu_memory_utilization", value(gmu));
    e.insert("logprobs_mode", value("processed_logprobs"));
    if let Some(v) = inf.int(ctx, "seed")? {
        e.insert("seed", value(v.v));
    }
    lora(ctx, inf, out)?;
    if let Some(v) = inf.str(ctx, "all2all_backend")? {
        if pd {
            ctx.note(&v.key, v.at.as_ref(), "a disaggregated recipe sets it per role (prefill deepep_high_throughput, decode deepep_low_latency)");
        } else {
            out.extra.insert("all2all_backend", value(v.v));
        }
    }
    let deep_gemm = inf.bool(ctx, "use_deep_gemm")?.is_some_and(|v| v.v);
    for name in ["VLLM_USE_DEEP_GEMM", "VLLM_MOE_USE_DEEP_GEMM"] {
        out.env
            .insert(name, value(if deep_gemm { "1" } else { "0" }));
    }
    for v in inf.env(ctx, "env_vars")? {
        put_env(ctx, &mut out.env, v, pd, mooncake);
    }

    // What the launcher lays out, and what belongs to prime-rl alone.
    let why = [
        (
            "api_server_count",
            "prl-flow runs one API server per data-parallel rank, as prime-rl's launcher does",
        ),
        (
            "data_parallel_size_local",
            "prl-flow lays out the ranks of each node from tp, dp and the node counts",
        ),
        (
            "use_pd_kv_transfer",
            "set by prime-rl itself for P/D; a disaggregated recipe always moves KV cache by NIXL",
        ),
        (
            "weight_broadcast",
            "a setting of RL weight updates, not of the deployment",
        ),
        (
            "log",
            "prime-rl's logging; prl-flow keeps each task's log in its state dir",
        ),
        (
            "output_dir",
            "prl-flow keeps logs and state in its state dir (`.prl-flow/<name>/`)",
        ),
        (
            "dry_run",
            "use `prl-flow plan` to see everything before it runs",
        ),
        (
            "experimental",
            "prime-rl's experimental settings have no recipe field",
        ),
    ];
    for (k, w) in why {
        if let Some(v) = inf.take(k) {
            ctx.note(&v.key, v.at.as_ref(), w);
        }
    }
    let fp32 = inf.bool(ctx, "enable_fp32_lm_head")?;
    if fp32.as_ref().map_or(true, |v| v.v) {
        let key = fp32.as_ref().map_or(
            format!("{} (default true)", inf.path("enable_fp32_lm_head")),
            |v| v.key.clone(),
        );
        ctx.note(
            &key,
            fp32.as_ref().and_then(|v| v.at.as_ref()),
            "an fp32 lm_head is a prime-rl patch of vLLM; plain `vllm serve` has no such option",
        );
    }

    if let Some(mut x) = inf.table(ctx, "vllm_extra")? {
        for k in x.keys() {
            let item = x.take(&k).expect("listed key");
            extra(ctx, &mut out.extra, &k, item, pd);
        }
    }
    Ok(ep)
}

/// The model: `[inference.model]` (a table with `name`, or a string), else the RL file's
/// shared `[model] name`, else prime-rl's default.
fn model(ctx: &mut Ctx, inf: &mut Tab, shared: Option<V<String>>, out: &mut Out) -> R<()> {
    let mut name = None;
    let mut tool_parser = None;
    let mut reasoning_parser = None;
    if let Some(item) = inf.take("model") {
        if let Some(s) = item.v.as_str() {
            name = Some(s.to_string());
        } else {
            let mut m = inf.table(ctx, "model")?.expect("a model table");
            name = m.str(ctx, "name")?.map(|v| v.v);
            for k in ["dtype", "chat_template"] {
                if let Some(v) = m.str(ctx, k)? {
                    out.extra.insert(k, value(v.v));
                }
            }
            if let Some(v) = m.int(ctx, "max_model_len")? {
                out.extra.insert("max_model_len", value(v.v));
            }
            for k in ["enforce_eager", "trust_remote_code"] {
                if let Some(v) = m.bool(ctx, k)? {
                    out.extra.insert(k, value(v.v));
                }
            }
            tool_parser = Some(m.str(ctx, "tool_call_parser")?);
            reasoning_parser = Some(m.str(ctx, "reasoning_parser")?);
            if let Some(v) = m.take("rope_scaling") {
                ctx.note(&v.key, v.at.as_ref(), "vLLM 0.33 has no --rope-scaling; write it in `vllm_extra.hf_overrides` as `{ rope_scaling = {...} }`");
            }
            m.rest(ctx, |_| {
                "not a model setting prime-rl forwards to vLLM".into()
            });
        }
    }
    let name = match (name, shared) {
        (Some(n), _) => n,
        (None, Some(s)) => s.v,
        (None, None) => {
            ctx.note(
                &inf.path("model.name"),
                None,
                format!("not set: prime-rl's default \"{MODEL}\" is written"),
            );
            MODEL.to_string()
        }
    };
    out.inference.insert("model", value(name));
    for (k, v) in [
        ("tool_call_parser", tool_parser.flatten()),
        ("reasoning_parser", reasoning_parser.flatten()),
    ] {
        match v {
            Some(v) if v.v != "auto" => {
                out.extra.insert(k, value(v.v));
                if k == "tool_call_parser" {
                    out.extra.insert("enable_auto_tool_choice", value(true));
                }
            }
            Some(v) => ctx.note(&v.key, v.at.as_ref(), "\"auto\": prime-rl picks a parser from the model's name; prl-flow does not guess: set it in `vllm_extra`"),
            None => ctx.note(&format!("{} (default \"auto\")", inf.path(&format!("model.{k}"))), None, "prime-rl picks a parser from the model's name; prl-flow does not guess: set it in `vllm_extra` if the model needs one"),
        }
    }
    Ok(())
}

/// LoRA options; prime-rl forwards its own defaults for `max_loras` and `max_cpu_loras`.
fn lora(ctx: &mut Ctx, inf: &mut Tab, out: &mut Out) -> R<()> {
    let on = inf.bool(ctx, "enable_lora")?.is_some_and(|v| v.v);
    let max_loras = inf.int(ctx, "max_loras")?;
    let max_cpu = inf.int(ctx, "max_cpu_loras")?;
    let rank = inf.int(ctx, "max_lora_rank")?;
    let modules = inf.take("lora_target_modules");
    if !on {
        let set = [
            max_loras.map(|v| (v.key, v.at)),
            max_cpu.map(|v| (v.key, v.at)),
            rank.map(|v| (v.key, v.at)),
            modules.map(|v| (v.key, v.at)),
        ];
        for (k, at) in set.into_iter().flatten() {
            ctx.note(
                &k,
                at.as_ref(),
                "has no effect without `enable_lora = true`",
            );
        }
        return Ok(());
    }
    let e = &mut out.extra;
    e.insert("enable_lora", value(true));
    e.insert("max_loras", value(max_loras.map_or(8, |v| v.v)));
    e.insert("max_cpu_loras", value(max_cpu.map_or(100, |v| v.v)));
    if let Some(r) = rank {
        match LORA_RANKS.iter().find(|&&x| x >= r.v) {
            Some(x) => {
                e.insert("max_lora_rank", value(*x));
            }
            None => {
                return Err(ctx.error(
                    r.at.as_ref(),
                    format!(
                        "`{}` ({}) exceeds vLLM's largest LoRA rank (512)",
                        r.key, r.v
                    ),
                ))
            }
        }
    }
    if let Some(m) = modules.and_then(|m| plain_item(m.v)) {
        e.insert("lora_target_modules", value(m));
    }
    Ok(())
}

/// `[inference.kv_cache_offload]`; returns whether it is Mooncake.
fn offload(ctx: &mut Ctx, inf: &mut Tab, out: &mut Out) -> R<bool> {
    let Some(mut o) = inf.table(ctx, "kv_cache_offload")? else {
        return Ok(false);
    };
    let kind = o.str(ctx, "type")?;
    let kind = match kind {
        Some(k) if k.v == "native" || k.v == "mooncake" => k.v,
        Some(k) => {
            return Err(ctx.error(
                k.at.as_ref(),
                format!(
                    "`{}`: unknown offload type \"{}\" (prime-rl has native and mooncake)",
                    k.key, k.v
                ),
            ))
        }
        None => {
            return Err(ctx.error(
                None,
                format!(
                    "`{}` needs a `type` (native or mooncake), as prime-rl does",
                    o.path("type")
                ),
            ))
        }
    };
    let mut t = Table::new();
    t.insert("type", value(kind.as_str()));
    match o.table(ctx, "cpu")? {
        Some(mut c) => {
            if let Some(n) = c.count(ctx, "num_bytes")? {
                t.insert("cpu", value(inline("num_bytes", n.v)));
            }
            c.rest(ctx, |_| "not a field of the cpu tier".into());
        }
        None => {
            return Err(ctx.error(
                None,
                format!(
                    "`{}` is required: prime-rl refuses offload without a cpu tier",
                    o.path("cpu")
                ),
            ))
        }
    }
    if let Some(mut d) = o.table(ctx, "disk")? {
        if let Some(p) = d.str(ctx, "path")? {
            t.insert("disk", value(inline("path", p.v)));
        }
        d.rest(ctx, |_| "not a field of the disk tier".into());
    }
    let mooncake = kind == "mooncake";
    if mooncake {
        t.insert("protocol", value("rdma"));
        if let Some(d) = o.str(ctx, "device_name")? {
            if !d.v.is_empty() {
                t.insert("device_name", value(d.v));
            }
        }
    }
    o.rest(ctx, |_| "not a field of prime-rl's KV offload".into());
    out.offload = Some(t);
    Ok(mooncake)
}

/// One environment variable, unless the launcher manages it.
pub(super) fn put_env(
    ctx: &mut Ctx,
    t: &mut Table,
    (name, v): (String, V<String>),
    pd: bool,
    mooncake: bool,
) {
    match managed_env(&name, pd, mooncake) {
        Some(why) => ctx.note(&v.key, v.at.as_ref(), why),
        None => {
            t.insert(&name, value(v.v));
        }
    }
}

/// One `vllm_extra` entry: copied when it is a `vllm serve` flag the recipe may set.
fn extra(ctx: &mut Ctx, e: &mut Table, key: &str, item: V<&Item>, pd: bool) {
    let k = key.trim_start_matches("--").replace('-', "_");
    let vllm = flags::vllm();
    let Some(flag) = vllm.by_key(&k) else {
        let hint = vllm
            .suggest(&k)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        ctx.note(
            &item.key,
            item.at.as_ref(),
            format!("not a `vllm serve` flag of vLLM 0.33{hint}"),
        );
        return;
    };
    if flag.dest == "headless" {
        ctx.note(&item.key, item.at.as_ref(), "prime-rl reads it as api_server_count 0 (no HTTP server), which the router cannot reach; prl-flow runs one API server per rank, so leave it out");
        return;
    }
    if let Some(why) = managed_dest(flag.dest, pd) {
        ctx.note(
            &item.key,
            item.at.as_ref(),
            format!("the launcher manages it: {why}"),
        );
        return;
    }
    match item.v {
        Item::Value(v) => {
            e.insert(&k, value(plain(v)));
        }
        other => match plain_item(other) {
            Some(v) => {
                e.insert(&k, value(v));
            }
            None => ctx.note(
                &item.key,
                item.at.as_ref(),
                "an array of tables is no `vllm serve` value",
            ),
        },
    }
}
