//! Taking down what a journal records: the items [`Backend::teardown`] is given and what it
//! says of each.
//!
//! [`Backend::teardown`]: crate::Backend::teardown

use std::time::Duration;

use crate::{Allocation, Backend, BackendError, ProcHandle};

/// What a journal record holds that a teardown takes down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A process a spawn started.
    Process(ProcHandle),
    /// Nodes an allocate got.
    Allocation(Allocation),
}

impl Held {
    /// Reads what a journal record keeps: an [`Allocation`] (`{hosts, handle}`) or a
    /// process's [`ProcHandle`].
    pub fn from_json(value: &serde_json::Value) -> Result<Self, BackendError> {
        if let Ok(a) = serde_json::from_value::<Allocation>(value.clone()) {
            return Ok(Self::Allocation(a));
        }
        serde_json::from_value::<ProcHandle>(value.clone())
            .map(Self::Process)
            .map_err(|e| BackendError::new(format!("not a handle ({e}): {value}")))
    }

    /// The handle inside: the process's, or the allocation's.
    pub fn handle(&self) -> &ProcHandle {
        match self {
            Self::Process(h) => h,
            Self::Allocation(a) => &a.handle,
        }
    }
}

/// One record to take down: its task id and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub id: String,
    pub held: Held,
}

/// What a teardown did with one record (or with something it found besides them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// The record's task id.
    pub id: String,
    /// The process (or, where the backend can tell, the allocation) was there when the
    /// teardown began.
    pub was_running: bool,
    /// `None`: it is stopped or released now.
    pub error: Option<String>,
}

/// The default [`Backend::teardown`](crate::Backend::teardown): each item in turn, in the
/// order given; a process is stopped, an allocation released.
pub async fn teardown_each<B: Backend + ?Sized>(
    backend: &B,
    items: &[Recorded],
    grace: Duration,
) -> Vec<Stopped> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (was_running, result) = match &item.held {
            Held::Allocation(a) => (false, backend.release(a).await),
            Held::Process(h) => match backend.stop_found(h, grace).await {
                Ok(found) => (found, Ok(())),
                Err(e) => (false, Err(e)),
            },
        };
        out.push(Stopped {
            id: item.id.clone(),
            was_running,
            error: result.err().map(|e| e.message),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::{ProcState, SpawnSpec};

    /// Remembers each call; `p1` is running, stopping `p2` fails.
    #[derive(Default)]
    struct Notes(Mutex<Vec<String>>);

    impl Notes {
        fn note(&self, s: String) {
            self.0.lock().expect("lock").push(s);
        }
    }

    fn handle(id: &str) -> ProcHandle {
        ProcHandle::new("notes", ProcHandle::VERSION, &id).expect("handle")
    }

    fn id(h: &ProcHandle) -> String {
        h.open::<String>("notes").expect("ours")
    }

    #[async_trait]
    impl Backend for Notes {
        fn name(&self) -> &str {
            "notes"
        }
        async fn allocate(&self, _: &[String]) -> Result<Allocation, BackendError> {
            Err(BackendError::new("no"))
        }
        async fn release(&self, a: &Allocation) -> Result<(), BackendError> {
            self.note(format!("release {}", id(&a.handle)));
            Ok(())
        }
        async fn spawn(&self, _: &SpawnSpec) -> Result<ProcHandle, BackendError> {
            Err(BackendError::new("no"))
        }
        async fn status(&self, h: &ProcHandle) -> Result<ProcState, BackendError> {
            self.note(format!("status {}", id(h)));
            Ok(match id(h).as_str() {
                "p1" => ProcState::Running,
                _ => ProcState::Gone,
            })
        }
        async fn wait(&self, _: &ProcHandle) -> Result<ProcState, BackendError> {
            Ok(ProcState::Gone)
        }
        async fn stop(&self, h: &ProcHandle, _: Duration) -> Result<(), BackendError> {
            self.note(format!("stop {}", id(h)));
            match id(h).as_str() {
                "p2" => Err(BackendError::new("stuck")),
                _ => Ok(()),
            }
        }
        async fn log_tail(&self, _: &ProcHandle, _: usize) -> Result<String, BackendError> {
            Ok(String::new())
        }
        async fn read_log(&self, _: &ProcHandle, o: u64) -> Result<(String, u64), BackendError> {
            Ok((String::new(), o))
        }
    }

    #[tokio::test]
    async fn the_default_teardown_takes_items_down_one_after_the_other_in_order() {
        let b = Notes::default();
        let items = [
            Recorded {
                id: "one".into(),
                held: Held::Process(handle("p1")),
            },
            Recorded {
                id: "two".into(),
                held: Held::Process(handle("p2")),
            },
            Recorded {
                id: "nodes".into(),
                held: Held::Allocation(Allocation {
                    hosts: Default::default(),
                    handle: handle("a"),
                }),
            },
        ];
        let done = b.teardown(&items, Duration::from_secs(1), None).await;
        let stopped = |id: &str, was_running, error: Option<&str>| Stopped {
            id: id.into(),
            was_running,
            error: error.map(String::from),
        };
        assert_eq!(
            done,
            [
                stopped("one", true, None),
                stopped("two", false, Some("stuck")),
                stopped("nodes", false, None),
            ]
        );
        let calls = b.0.lock().expect("lock").clone();
        assert_eq!(
            calls,
            ["status p1", "stop p1", "status p2", "stop p2", "release a"]
        );
    }

    #[test]
    fn a_record_reads_as_an_allocation_or_a_process() {
        let a = Allocation {
            hosts: [("node0".to_string(), "n1".to_string())].into(),
            handle: handle("a"),
        };
        let json = serde_json::to_value(&a).expect("json");
        assert_eq!(Held::from_json(&json).expect("held"), Held::Allocation(a));
        let json = serde_json::to_value(handle("p")).expect("json");
        assert_eq!(
            Held::from_json(&json).expect("held"),
            Held::Process(handle("p"))
        );
        assert!(Held::from_json(&serde_json::json!({ "pid": 1 })).is_err());
    }
}
