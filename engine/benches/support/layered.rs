//! The graph of the engine's scheduler benchmark and its memory example: 100 layers of 1,000
//! no-op tasks; each task of a layer needs 2 distinct random tasks of the layer before (fixed
//! seed, so every run measures the same graph). Included by `benches/scheduler.rs` and
//! `examples/journal_memory.rs` with `#[path]`.

use std::sync::Arc;

use async_trait::async_trait;
use prl_flow_engine::{Done, Graph, GraphBuilder, Task, TaskContext, TaskError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const LAYERS: usize = 100;
pub const WIDTH: usize = 1000;
pub const TASKS: usize = LAYERS * WIDTH;
const SEED: u64 = 0x5eed_da65;

/// A task whose `run` returns at once.
struct Noop {
    id: String,
    needs: Vec<String>,
}

#[async_trait]
impl Task for Noop {
    fn id(&self) -> &str {
        &self.id
    }
    fn needs(&self) -> &[String] {
        &self.needs
    }
    fn fingerprint(&self) -> String {
        String::new()
    }
    async fn run(&self, _cx: &TaskContext) -> Result<Done, TaskError> {
        Ok(Done::default())
    }
}

pub fn layered_graph() -> Graph {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut b = GraphBuilder::with_capacity(TASKS);
    for layer in 0..LAYERS {
        for k in 0..WIDTH {
            let needs = if layer == 0 {
                Vec::new()
            } else {
                let a = rng.gen_range(0..WIDTH);
                let mut c = rng.gen_range(0..WIDTH - 1);
                if c >= a {
                    c += 1;
                }
                vec![format!("l{}_{a}", layer - 1), format!("l{}_{c}", layer - 1)]
            };
            b.add(Arc::new(Noop {
                id: format!("l{layer}_{k}"),
                needs,
            }));
        }
    }
    b.seal()
        .map_err(|e| format!("{e:?}"))
        .expect("the bench graph seals")
}
