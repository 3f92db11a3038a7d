//! The journal as a subscriber: it turns a run's events into records.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::Journal;
use crate::event::{Decision, Event, Outcome, Subscriber};
use crate::graph::Graph;
use crate::record::{Record, Status};
use crate::task::Task;

impl Journal {
    /// A subscriber that records a run of `graph` in this journal.
    pub fn recorder(self: &Arc<Self>, graph: &Graph) -> Arc<dyn Subscriber> {
        Arc::new(Recorder {
            journal: self.clone(),
            tasks: graph.tasks().to_vec(),
            slots: (0..graph.len()).map(|_| AtomicU32::new(NO_SLOT)).collect(),
        })
    }
}

/// Records a run's events in the journal.
struct Recorder {
    journal: Arc<Journal>,
    /// The graph's tasks: a record is made from its task when the task starts or is
    /// skipped, so the journal's record is the one copy of it in memory.
    tasks: Vec<Arc<dyn Task>>,
    /// Where the journal keeps each task's record, once this run put it there
    /// ([`Journal::put_slot`]): its later updates need no lookup by id.
    slots: Vec<AtomicU32>,
}

/// No slot known: the record is looked up by id.
const NO_SLOT: u32 = u32::MAX;

impl Recorder {
    fn slot(&self, index: usize) -> Option<usize> {
        let s = self.slots.get(index)?.load(Ordering::Relaxed);
        (s != NO_SLOT).then_some(s as usize)
    }

    fn put(&self, index: usize, r: Record) {
        let slot = self.journal.put_slot(r);
        if let Some(s) = self.slots.get(index) {
            s.store(u32::try_from(slot).unwrap_or(NO_SLOT), Ordering::Relaxed);
        }
    }

    /// Task `index`'s record as a fresh start or skip makes it: its fixed parts, nothing
    /// of an earlier attempt.
    fn fresh(&self, index: usize) -> Record {
        let t = &self.tasks[index];
        Record {
            id: t.id().to_string(),
            status: Status::Running,
            fingerprint: t.fingerprint(),
            kind: t.kind().to_string(),
            service: t.is_service(),
            needs: t.needs().to_vec(),
            handle: None,
            meta: t.meta(),
            seq: 0,
            attempts: 0,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            error: None,
        }
    }
}

impl Subscriber for Recorder {
    fn broken(&self) -> Option<String> {
        self.journal.failure()
    }

    fn commit(&self) {
        self.journal.write_queued();
    }

    fn on_event(&self, event: &Event) {
        match event {
            Event::Planned { decisions } => {
                // Work a killed run left in flight that has since finished is kept: record
                // it as done.
                for (id, d) in decisions.iter() {
                    if *d == Decision::Keep {
                        self.journal.settle_kept(id);
                    }
                }
            }
            Event::Started {
                index,
                id,
                attempt,
                adopted,
                at_ms,
            } => {
                let old = if *adopted { self.journal.get(id) } else { None };
                let r = match old {
                    Some(old) => Record {
                        status: Status::Running,
                        ..old
                    },
                    None => {
                        let mut r = self.fresh(*index);
                        if !*adopted {
                            r.seq = self.journal.take_seq();
                            r.attempts = *attempt;
                            r.started_ms = Some(*at_ms);
                        }
                        r
                    }
                };
                // Queued here, and on file at the scheduler's next `commit`, which comes
                // before the task can start a process: if it cannot be written, the
                // journal is broken and the scheduler does not start the task.
                self.put(*index, r);
            }
            Event::Spawned {
                index,
                id,
                handle,
                findable,
            } => {
                // On file at once, so that `down` and `status` from another shell see it,
                // unless they find the process without it (as a resume does): then with the
                // next batch.
                self.journal
                    .set_handle_at(self.slot(*index), id, handle.clone(), !*findable);
            }
            Event::Finished {
                index,
                id,
                outcome,
                handle,
                error,
                ..
            } => {
                if *outcome == Outcome::Skipped {
                    // Nothing ran: keep an earlier record (a resume may still use it).
                    if !self.journal.contains(id) {
                        let mut r = self.fresh(*index);
                        r.status = Status::Skipped;
                        self.put(*index, r);
                    }
                    return;
                }
                // A failure's handle (a service stopped, or left with `--keep`) wins.
                let handle = error
                    .as_ref()
                    .and_then(|e| e.handle.as_ref())
                    .or(handle.as_ref());
                self.journal.finish_at(
                    self.slot(*index),
                    id,
                    (*outcome).into(),
                    handle.cloned(),
                    error.as_ref().and_then(|e| e.exit_code),
                    error.as_ref().map(|e| e.message.as_str()),
                );
            }
            Event::Undone { index, id, error } => {
                self.journal.update_at(self.slot(*index), id, |r| {
                    // A service that failed, timed out or was cancelled keeps saying so
                    // (`status`, and `--resume --explain`); only one that was up, and was
                    // really stopped, is `stopped` (one that could not be stopped may still
                    // run: `down` must try again).
                    if error.is_none() && matches!(r.status, Status::Done | Status::Running) {
                        r.status = Status::Stopped;
                    }
                    if let Some(e) = error {
                        r.error = Some(e.clone());
                    }
                });
            }
            Event::RunFinished { .. } | Event::Cancelling | Event::Aborting { .. } => {
                self.journal.flush();
            }
            _ => {}
        }
    }
}
