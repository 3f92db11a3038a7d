//! Showing a run as it happens. Two subscribers, one chosen per run:
//!
//! - [`Bars`] on a terminal: an overall bar and one spinner line per running task, with
//!   what the task is waiting for;
//! - [`Lines`] otherwise (pipes, CI, `--no-progress`): one timestamped line per event worth
//!   reading later, and what a task waits for when that changes (or once a minute while it
//!   does not: an engine loads for many minutes).
//!
//! Both write to stderr; stdout is kept for results. Neither holds up the scheduler: they
//! only format and print.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use prl_flow_engine::{fmt_duration, Decision, Event, Outcome, Subscriber};

/// `HH:MM:SS.mmm` in UTC, for plain lines.
pub fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs();
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        now.subsec_millis()
    )
}

/// How often a task's unchanged "waiting for" line is said again in plain lines.
const SAY_AGAIN: Duration = Duration::from_secs(60);

/// Plain lines, for logs and CI.
pub struct Lines {
    out: Mutex<Box<dyn Write + Send>>,
    quiet: bool,
    /// The last line of output said per task, and when.
    waiting: Mutex<HashMap<String, (String, std::time::Instant)>>,
}

impl Lines {
    pub fn stderr(quiet: bool) -> Self {
        Self {
            out: Mutex::new(Box::new(std::io::stderr())),
            quiet,
            waiting: Mutex::new(HashMap::new()),
        }
    }
    fn say(&self, text: &str) {
        if let Ok(mut o) = self.out.lock() {
            let _ = writeln!(o, "{} {text}", clock());
        }
    }
}

impl Subscriber for Lines {
    fn on_event(&self, e: &Event) {
        match e {
            Event::Planned { decisions } if !self.quiet => {
                let kept = decisions
                    .iter()
                    .filter(|(_, d)| *d == Decision::Keep)
                    .count();
                let n = decisions.len();
                if kept > 0 {
                    self.say(&format!(
                        "plan: {}, {kept} kept from the last run",
                        crate::diag::count(n, "task")
                    ));
                } else {
                    self.say(&format!("plan: {}", crate::diag::count(n, "task")));
                }
            }
            Event::Started {
                id,
                attempt,
                adopted,
                ..
            } if !self.quiet => {
                if *adopted {
                    self.say(&format!("adopt  {id} (left running by the last run)"));
                } else if *attempt > 1 {
                    self.say(&format!("start  {id} (attempt {attempt})"));
                } else {
                    self.say(&format!("start  {id}"));
                }
            }
            Event::Retrying {
                id, error, delay, ..
            } => {
                let first = error.lines().next().unwrap_or("");
                self.say(&format!("retry  {id} in {}: {first}", fmt_duration(*delay)));
            }
            Event::Output { id, line } if !self.quiet => {
                let now = std::time::Instant::now();
                let say = self.waiting.lock().is_ok_and(|mut w| {
                    let fresh = w.get(id.as_ref()).map_or(true, |(last, at)| {
                        last != line || now.duration_since(*at) >= SAY_AGAIN
                    });
                    if fresh {
                        w.insert(id.to_string(), (line.clone(), now));
                    }
                    fresh
                });
                if say {
                    self.say(&format!("wait   {id}: {line}"));
                }
            }
            Event::Finished {
                id,
                outcome,
                duration,
                error,
                ..
            } => match outcome {
                Outcome::Done if !self.quiet => {
                    self.say(&format!("done   {id} ({})", fmt_duration(*duration)))
                }
                Outcome::Done => {}
                Outcome::Skipped if !self.quiet => self.say(&format!("skip   {id}")),
                Outcome::Skipped => {}
                other => {
                    let msg = error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
                    let first = msg.lines().next().unwrap_or("");
                    self.say(&format!("{:<6} {id}: {first}", other.as_str()));
                }
            },
            Event::Undone { id, error, .. } => match error {
                None if !self.quiet => self.say(&format!("stop   {id}")),
                None => {}
                Some(e) => self.say(&format!("stop   {id} failed: {e}")),
            },
            Event::Aborting { id } => {
                self.say(&format!("abort: `{id}` failed; starting nothing new"))
            }
            Event::Cancelling => self.say("cancel: stopping what this run started"),
            _ => {}
        }
    }
}

/// Progress bars for a terminal.
pub struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    running: Mutex<HashMap<usize, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(12));
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{elapsed:>4} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        overall.enable_steady_tick(Duration::from_millis(100));
        Self {
            multi,
            overall,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, text: String) {
        let _ = self.multi.println(text);
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Subscriber for Bars {
    fn on_event(&self, e: &Event) {
        match e {
            Event::Planned { decisions } => {
                let kept = decisions
                    .iter()
                    .filter(|(_, d)| *d == Decision::Keep)
                    .count();
                self.overall.set_length(decisions.len() as u64);
                self.overall.set_position(kept as u64);
                if kept > 0 {
                    self.overall.set_message(format!("({kept} kept)"));
                }
            }
            Event::Started {
                index,
                id,
                attempt,
                adopted,
                ..
            } => {
                let Ok(mut running) = self.running.lock() else {
                    return;
                };
                let bar = running.entry(*index).or_insert_with(|| {
                    let b = self.multi.add(ProgressBar::new_spinner());
                    b.set_style(
                        ProgressStyle::with_template(
                            "  {spinner:.green} {prefix:.bold} {elapsed} {wide_msg:.dim}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                bar.set_prefix(id.to_string());
                if *adopted {
                    bar.set_message("adopted from the last run");
                } else if *attempt > 1 {
                    bar.set_message(format!("attempt {attempt}"));
                }
            }
            Event::Output { id, line } => {
                if let Ok(running) = self.running.lock() {
                    for b in running.values() {
                        if b.prefix() == id.as_ref() {
                            b.set_message(line.clone());
                        }
                    }
                }
            }
            Event::Retrying {
                id, error, delay, ..
            } => {
                let first = error.lines().next().unwrap_or("");
                self.line(format!("retry {id} in {}: {first}", fmt_duration(*delay)));
            }
            Event::Finished {
                index,
                id,
                outcome,
                duration,
                error,
                ..
            } => {
                if let Ok(mut running) = self.running.lock() {
                    if let Some(b) = running.remove(index) {
                        b.finish_and_clear();
                        self.multi.remove(&b);
                    }
                }
                self.overall.inc(1);
                match outcome {
                    Outcome::Done => self.line(format!("  ✓ {id} ({})", fmt_duration(*duration))),
                    Outcome::Skipped => {}
                    other => {
                        let msg = error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
                        let first = msg.lines().next().unwrap_or("");
                        self.line(format!("  ✗ {id} {}: {first}", other.as_str()));
                    }
                }
            }
            Event::Undone { id, error, .. } => match error {
                None => self.line(format!("  ■ stopped {id}")),
                Some(e) => self.line(format!("  ■ stopping {id} failed: {e}")),
            },
            Event::Aborting { id } => {
                self.line(format!("abort: `{id}` failed; starting nothing new"))
            }
            Event::Cancelling => self.line("cancel: stopping what this run started".into()),
            Event::RunFinished { .. } => {
                self.overall.finish_and_clear();
                let _ = self.multi.clear();
            }
            _ => {}
        }
    }
}
