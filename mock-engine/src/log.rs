//! vLLM-shaped log lines.
//!
//! Deployments watch engine logs with line probes written against real vLLM, so the mock copies
//! the shape of its lines: `(APIServer pid=N) INFO 11-25 17:36:00 [file.py:123] message` for
//! vLLM's own logger (stdout) and `(APIServer pid=N) INFO:     message` for uvicorn (stderr,
//! where uvicorn's default handler writes). Errors go to stderr. Timestamps are UTC: the mock
//! has no time-zone database and a probe never parses them.

use std::io::Write;
use std::time::SystemTime;

/// Which vLLM process a line pretends to come from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Who {
    Api,
    Engine(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Info,
    Warning,
    Error,
}

fn prefix(who: Who) -> String {
    let pid = std::process::id();
    match who {
        Who::Api => format!("(APIServer pid={pid})"),
        Who::Engine(rank) => format!("(EngineCore_DP{rank} pid={pid})"),
    }
}

/// `MM-DD HH:MM:SS`, as vLLM's formatter prints it.
fn stamp() -> String {
    let full = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // "2026-11-25T17:36:00Z": fixed width, so slicing by position is safe.
    match (full.get(5..10), full.get(11..19)) {
        (Some(date), Some(time)) => format!("{date} {time}"),
        _ => full,
    }
}

/// One line of vLLM's logger.
pub(crate) fn line(level: Level, who: Who, src: &str, msg: &str) {
    let lvl = match level {
        Level::Info => "INFO",
        Level::Warning => "WARNING",
        Level::Error => "ERROR",
    };
    let text = format!("{} {lvl} {} [{src}] {msg}\n", prefix(who), stamp());
    write_out(level == Level::Error, &text);
}

/// One line of uvicorn's logger (`INFO:     ...`), which goes to stderr.
pub(crate) fn uvicorn(msg: &str) {
    write_out(true, &format!("{} INFO:     {msg}\n", prefix(Who::Api)));
}

/// One uvicorn access-log line, which goes to stdout.
pub(crate) fn access(msg: &str) {
    write_out(false, &format!("{} INFO:     {msg}\n", prefix(Who::Api)));
}

pub(crate) fn info(who: Who, src: &str, msg: &str) {
    line(Level::Info, who, src, msg);
}

pub(crate) fn warn(who: Who, src: &str, msg: &str) {
    line(Level::Warning, who, src, msg);
}

pub(crate) fn error(who: Who, src: &str, msg: &str) {
    line(Level::Error, who, src, msg);
}

fn write_out(to_stderr: bool, text: &str) {
    // A closed pipe must not kill the engine: a log reader going away is not the engine's
    // problem, so write errors are dropped on purpose.
    if to_stderr {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}
