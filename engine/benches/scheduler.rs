//! Scheduler overhead: what the engine itself costs per task, with tasks that do nothing.
//!
//! The graph: 100 layers of 1,000 no-op tasks; each task of a layer needs 2 distinct random
//! tasks of the layer before (fixed seed, so every run measures the same graph). Timed:
//! `decide` + `run`, on a current-thread tokio runtime like the scheduler's own task, with
//!
//! - no subscribers, for several `jobs` bounds (`no_subscribers/jobs/N`);
//! - a [`Journal`] in a temp dir as the one subscriber (`journal/run`: decide + run, the
//!   journal opened before and closed after the timed part; `journal/total`: open, decide,
//!   run, close, i.e. everything a run pays for its journal, including the final snapshot).
//!
//! Those are wall-clock times. The `cpu/` groups time the same work by the on-CPU time of
//! the scheduler's thread instead, which stays put when other work shares the machine's
//! cores (wall time then grows by whatever the others take).
//!
//! Criterion prints the time per iteration; divide by 100,000 for the time per task (the
//! throughput line says the same in tasks per second). Building and sealing the graph is
//! not timed here.
//!
//! ```sh
//! cargo bench -p prl-flow-engine --bench scheduler
//! cargo bench -p prl-flow-engine --bench scheduler -- cpu/
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prl_flow_engine::{decide, run, Cancel, Graph, Journal, RunOptions, Sink};

#[path = "support/layered.rs"]
mod layered;
use layered::{layered_graph, TASKS};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn decide_and_run(graph: &Graph, jobs: usize, sink: Sink) {
    let decisions = decide(graph, None).await;
    let options = RunOptions {
        jobs,
        ..RunOptions::default()
    };
    let report = run(graph, &decisions, None, &options, sink, Cancel::never()).await;
    assert_eq!(report.summary.done, TASKS);
}

/// The time this thread has spent on a CPU (`/proc/thread-self/schedstat`, in ns): unlike
/// wall time, it does not grow when other processes take the machine's cores.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

#[derive(Clone, Copy)]
enum Clock {
    Wall,
    /// On-CPU time of the thread that runs the scheduler (the runtime is current-thread, so
    /// every task's future is polled there too). The journal's background fsync thread is
    /// not counted.
    ThreadCpu,
}

/// A stopwatch on `clock`.
fn measure(clock: Clock, f: impl FnOnce()) -> Duration {
    match clock {
        Clock::Wall => {
            let t = Instant::now();
            f();
            t.elapsed()
        }
        Clock::ThreadCpu => {
            let before = thread_cpu().expect("/proc/thread-self/schedstat");
            f();
            thread_cpu()
                .expect("/proc/thread-self/schedstat")
                .saturating_sub(before)
        }
    }
}

fn open(dir: &std::path::Path) -> Arc<Journal> {
    Arc::new(Journal::open(dir, false, "bench").expect("open"))
}

fn close(j: Arc<Journal>) {
    Arc::try_unwrap(j)
        .map_err(|_| "the journal is still shared after the run")
        .expect("sole owner")
        .close()
        .expect("close");
}

fn bench(c: &mut Criterion) {
    let built = Instant::now();
    let graph = layered_graph();
    eprintln!(
        "graph: {TASKS} tasks, built and sealed in {:.0} ms (not timed below)",
        built.elapsed().as_secs_f64() * 1e3
    );
    let rt = runtime();
    let clocks: &[(&str, Clock, &[usize])] = &[
        ("", Clock::Wall, &[1, 16, 1024, TASKS]),
        ("cpu/", Clock::ThreadCpu, &[1, 1024]),
    ];
    for &(prefix, clock, jobs_list) in clocks {
        let mut g = c.benchmark_group(format!("{prefix}no_subscribers"));
        g.throughput(Throughput::Elements(TASKS as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(1));
        for &jobs in jobs_list {
            g.bench_with_input(BenchmarkId::new("jobs", jobs), &jobs, |b, &jobs| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            measure(clock, || {
                                rt.block_on(decide_and_run(&graph, jobs, Sink::none()))
                            })
                        })
                        .sum()
                });
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("{prefix}journal"));
        g.throughput(Throughput::Elements(TASKS as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(1));
        g.bench_function("run", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempdir();
                    let journal = open(dir.path());
                    let sink = Sink::new(vec![journal.recorder(&graph)]);
                    spent += measure(clock, || {
                        rt.block_on(decide_and_run(&graph, 1024, sink));
                    });
                    close(journal);
                }
                spent
            });
        });
        if let Clock::Wall = clock {
            g.bench_function("total", |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tempdir();
                        spent += measure(clock, || {
                            let journal = open(dir.path());
                            let sink = Sink::new(vec![journal.recorder(&graph)]);
                            rt.block_on(decide_and_run(&graph, 1024, sink));
                            close(journal);
                        });
                    }
                    spent
                });
            });
        }
        g.finish();
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

criterion_group!(benches, bench);
criterion_main!(benches);
