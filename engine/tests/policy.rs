//! A task's policy as the scheduler applies it, in virtual time (tokio's paused clock): the
//! pause before each retry doubles, and `timeout` covers the whole attempt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prl_flow_engine::{
    decide, run, Cancel, Done, GraphBuilder, Outcome, Policy, RunOptions, Sink, Task, TaskContext,
    TaskError,
};
use tokio::time::Instant;

/// Fails its first `fails` attempts (or hangs in each, with `hang`), and notes when each
/// attempt began.
struct Flaky {
    needs: Vec<String>,
    fails: usize,
    hang: bool,
    policy: Policy,
    began: Mutex<Vec<Instant>>,
}

impl Flaky {
    fn new(fails: usize, hang: bool, policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            needs: Vec::new(),
            fails,
            hang,
            policy,
            began: Mutex::new(Vec::new()),
        })
    }

    /// The time from one attempt's start to the next one's.
    fn gaps(&self) -> Vec<Duration> {
        let b = self.began.lock().expect("began");
        b.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

#[async_trait]
impl Task for Flaky {
    fn id(&self) -> &str {
        "flaky"
    }
    fn needs(&self) -> &[String] {
        &self.needs
    }
    fn fingerprint(&self) -> String {
        "f".into()
    }
    fn policy(&self) -> Policy {
        self.policy
    }
    async fn run(&self, cx: &TaskContext) -> Result<Done, TaskError> {
        let n = {
            let mut b = self.began.lock().expect("began");
            b.push(Instant::now());
            b.len()
        };
        if self.hang {
            // Hung until the scheduler stops it, as a real task's process is.
            cx.cancel.cancelled().await;
            return Err(TaskError::new(format!("attempt {n} was stopped")));
        }
        if n <= self.fails {
            return Err(TaskError::new(format!("attempt {n} fails")));
        }
        Ok(Done { handle: None })
    }
}

async fn go(task: Arc<Flaky>) -> Vec<Option<Outcome>> {
    let mut b = GraphBuilder::new();
    b.add(task);
    let graph = b.seal().map_err(|e| format!("{e:?}")).expect("graph");
    let d = decide(&graph, None).await;
    let r = run(
        &graph,
        &d,
        None,
        &RunOptions::default(),
        Sink::none(),
        Cancel::never(),
    )
    .await;
    r.outcomes
}

#[track_caller]
fn assert_gaps(gaps: &[Duration], want: &[u64]) {
    assert_eq!(gaps.len(), want.len(), "gaps {gaps:?}, want {want:?} s");
    // Virtual time: each pause is exactly what the scheduler asked for, plus the
    // scheduler's own (virtual, near-zero) moments.
    for (gap, w) in gaps.iter().zip(want) {
        let w = Duration::from_secs(*w);
        assert!(
            *gap >= w && *gap < w + Duration::from_millis(100),
            "gaps {gaps:?}, want {want:?} s"
        );
    }
}

/// The pause before the first retry is `backoff`, and each further one twice the one before.
#[tokio::test(start_paused = true)]
async fn each_retry_waits_twice_as_long_as_the_one_before() {
    let policy = Policy {
        retries: 3,
        backoff: Duration::from_secs(1),
        timeout: None,
    };
    let t = Flaky::new(3, false, policy);
    assert_eq!(go(t.clone()).await, [Some(Outcome::Done)]);
    assert_gaps(&t.gaps(), &[1, 2, 4]);
}

/// A hung attempt ends at `timeout`; the retry starts `backoff` later, and times out too.
#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_retried_after_its_backoff() {
    let policy = Policy {
        retries: 1,
        backoff: Duration::from_secs(1),
        timeout: Some(Duration::from_secs(10)),
    };
    let t = Flaky::new(0, true, policy);
    assert_eq!(go(t.clone()).await, [Some(Outcome::TimedOut)]);
    assert_gaps(&t.gaps(), &[11]);
}
