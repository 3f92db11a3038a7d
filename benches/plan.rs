//! Planning a large deployment: a 1,000-node disaggregated recipe (500 prefill and 500
//! decode nodes in 250 P/D pairs, Mooncake offload, so 250 routers) is parsed, checked,
//! derived and rendered by `recipe::load`, then drawn as DOT. Goal: under 100 ms together
//! in a release build.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use prl_flow::plan::draw::{render, Format};
use prl_flow::recipe::{load, Options};

fn recipe(prefill: usize, decode: usize, pairs: usize) -> String {
    format!(
        r#"[inference]
model = "Qwen/Qwen3-30B-A3B"
enable_expert_parallel = true

[inference.parallel]
tp = 1
dp = 16

[inference.deployment]
type = "disaggregated"
gpus_per_node = 8
num_prefill_nodes = {prefill}
num_decode_nodes = {decode}
num_prefill_replicas = {pairs}
num_decode_replicas = {pairs}

[inference.deployment.prefill_env]
UCX_TLS = "all"

[inference.deployment.decode_env]
UCX_NET_DEVICES = "mlx5_0:1"

[inference.kv_cache_offload]
type = "mooncake"
cpu = {{ num_bytes = 107374182400 }}

[inference.vllm_extra]
max_model_len = 32768

[backend]
type = "slurm"
partition = "gpu"

[[task]]
id = "stage-weights"
run = "cp -r /shared/weights /tmp/weights"
node = "each"
before = ["prefill", "decode"]
"#
    )
}

fn bench(c: &mut Criterion) {
    let text = Arc::new(recipe(500, 500, 250));
    let opts = Options::default();
    let plan = match load("bench.toml", text.clone(), "bench", &opts) {
        Ok(p) => p,
        Err(e) => panic!("the bench recipe does not plan:\n{}", e.render(false)),
    };
    assert_eq!(plan.nodes.len(), 1000);
    let mut group = c.benchmark_group("plan-1000-nodes");
    group.sample_size(20);
    group.bench_function("load", |b| {
        b.iter(|| {
            load("bench.toml", black_box(text.clone()), "bench", &opts).map(|p| p.tasks.len())
        })
    });
    group.bench_function("dot", |b| {
        b.iter(|| render(black_box(&plan), Format::Dot, false).len())
    });
    group.bench_function("load+dot", |b| {
        b.iter(|| {
            load("bench.toml", black_box(text.clone()), "bench", &opts)
                .map(|p| render(&p, Format::Dot, false).len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
