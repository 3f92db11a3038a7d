//! Reading task logs: the part of the last attempt, the tail, and reading on from an offset.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::BackendError;

/// Backends write this at the start of a line of a task's log each time they start its
/// process, so that a failure quotes only the lines of the last attempt.
pub const LOG_MARK: &str = "── prl-flow: ";

/// The [`LOG_MARK`] line a backend writes when it starts the process of `task` (without its
/// newline).
pub fn start_line(task: &str) -> String {
    let mut line = String::with_capacity(LOG_MARK.len() + task.len() + 16);
    line.push_str(LOG_MARK);
    line.push('`');
    line.push_str(task);
    line.push_str("` starts ──");
    line
}

/// The part of a log written since the last [`LOG_MARK`] line.
pub fn since_last_mark(text: &str) -> &str {
    match text.rfind(LOG_MARK) {
        Some(at) => match text[at..].find('\n') {
            Some(nl) => &text[at + nl + 1..],
            None => "",
        },
        None => text,
    }
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// The last `max` bytes of a file this machine sees, as text; a missing file is empty.
pub fn tail_bytes(path: &Path, max: u64) -> Result<String, BackendError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e.into()),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The last `lines` lines of the last attempt in a log file (its last 64 KiB, from the last
/// [`LOG_MARK`] line on): what a failure quotes. A missing file is an empty log.
pub fn tail_lines(path: &Path, lines: usize) -> Result<String, BackendError> {
    let text = tail_bytes(path, 64 * 1024)?;
    Ok(last_lines(since_last_mark(&text), lines))
}

/// Reads a file from `offset`: (text, offset after it). An offset past the end (the file
/// was truncated or replaced) reads from the start; a missing file is empty.
pub fn read_from(path: &Path, offset: u64) -> Result<(String, u64), BackendError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), offset)),
        Err(e) => return Err(e.into()),
    };
    let len = f.metadata()?.len();
    let from = if offset > len { 0 } else { offset };
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let end = from + buf.len() as u64;
    Ok((String::from_utf8_lossy(&buf).into_owned(), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_attempt_counts() {
        let log = format!("old\n{LOG_MARK}`t` starts ──\nnew 1\nnew 2\n");
        assert_eq!(since_last_mark(&log), "new 1\nnew 2\n");
        assert_eq!(last_lines(since_last_mark(&log), 1), "new 2");
        assert_eq!(since_last_mark("plain\n"), "plain\n");
    }

    #[test]
    fn tails_and_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("t.log");
        assert_eq!(tail_bytes(&f, 4).expect("missing"), "");
        std::fs::write(&f, "abcdef").expect("write");
        assert_eq!(tail_bytes(&f, 4).expect("tail"), "cdef");
        assert_eq!(read_from(&f, 2).expect("read"), ("cdef".into(), 6));
        assert_eq!(
            read_from(&f, 99).expect("past the end"),
            ("abcdef".into(), 6)
        );
    }
}
