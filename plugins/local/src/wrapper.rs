//! The shell every local process starts under, and how a later prl-flow tells that process
//! again: what the shell writes to its proc file ([`proc_file`]), and the checks that take
//! the process at a recorded pid for an attempt's.

use std::path::PathBuf;

use prl_flow_backend::{BackendError, SpawnSpec};

use super::ATTEMPT_ENV;

pub(crate) const PID_FILE: &str = "pid";

/// Where the process of `spec` writes `PID ATTEMPT` before anything else: a service in its
/// run dir (`RUN_DIR/pid`, with its start time and session), a one-shot beside its run dir
/// (`RUN_DIR.pid`), where its shell also appends its exit status when it ends. So a one-shot
/// that starts elsewhere (a workflow's, in the workflow's directory) and is given no files
/// needs no run dir: one directory fewer to make per task.
pub(crate) fn proc_file(spec: &SpawnSpec) -> PathBuf {
    if spec.service {
        return spec.run_dir.join(PID_FILE);
    }
    let mut p = spec.run_dir.clone().into_os_string();
    p.push(".pid");
    p.into()
}

/// Whether the spawn of `spec` makes its run dir: a service's pid file is there; a one-shot
/// starts there unless it has a `cwd`, and its files are written there.
pub(crate) fn needs_run_dir(spec: &SpawnSpec) -> bool {
    spec.service || spec.cwd.is_none() || !spec.files.is_empty()
}

/// The shell of the wrapper, by its full path as make's and ninja's: looking `sh` up on a
/// long `PATH` costs a failed `execve` per entry before it, on every spawn.
const SHELL: &str = "/bin/sh";

/// The first line of a proc file: `PID ATTEMPT START SID` (a service), or `PID ATTEMPT` (a
/// one-shot, whose process the backend recognises by its command line or environment
/// instead; its exit status follows on a line of its own once it ended).
pub struct PidFile {
    pub pid: i32,
    pub attempt: u64,
    /// Its start time in clock ticks since boot, as `/proc/PID/stat` says.
    pub start: Option<u64>,
    pub sid: Option<i32>,
}

impl PidFile {
    /// The first line of a proc file's `text`; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let mut w = text.lines().next()?.split_whitespace();
        let pid = w.next()?.parse().ok()?;
        let attempt = w.next()?.parse().ok()?;
        let (start, sid) = match (w.next(), w.next()) {
            (None, None) => (None, None),
            (Some(start), Some(sid)) => (Some(start.parse().ok()?), Some(sid.parse().ok()?)),
            _ => return None,
        };
        Some(Self {
            pid,
            attempt,
            start,
            sid,
        })
    }
}

/// The value of [`ATTEMPT_ENV`] for a spawn: its attempt and its task (two tasks may start
/// in the same millisecond).
fn attempt_token(spec: &SpawnSpec) -> String {
    let mut t = spec.attempt.to_string();
    t.push(' ');
    t.push_str(&spec.task);
    t
}

/// Whether process `pid` is the one-shot `spec`'s attempt: its wrapper shell (the command
/// line [`wrap`] gave it: this attempt's first line, this proc file), or a program that
/// replaced the shell by `exec` and so inherited [`ATTEMPT_ENV`] from it. Unreadable counts
/// as no.
pub(crate) fn is_attempt(pid: i32, spec: &SpawnSpec) -> bool {
    let Ok(prelude) = oneshot_prelude(spec) else {
        return false;
    };
    let file = proc_file(spec);
    let file = file.to_string_lossy();
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
        let mut args = cmdline.split(|b| *b == 0);
        let (_sh, c, script, zero) = (args.next(), args.next(), args.next(), args.next());
        if c == Some(b"-c".as_slice())
            && script.is_some_and(|s| s.starts_with(prelude.as_bytes()))
            && zero == Some(file.as_bytes())
        {
            return true;
        }
    }
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{ATTEMPT_ENV}={}", attempt_token(spec));
    env.split(|b| *b == 0).any(|v| v == want.as_bytes())
}

/// The first line of a one-shot's wrapper: its pid and attempt to its proc file (`$0`), and
/// its attempt exported for what it runs. Pieced together rather than formatted: it is made
/// for every spawn.
fn oneshot_prelude(spec: &SpawnSpec) -> Result<String, BackendError> {
    let attempt = spec.attempt.to_string();
    let token = prl_flow_backend::shell::quote(&attempt_token(spec))?;
    let mut s = String::with_capacity(48 + 2 * attempt.len() + token.len());
    s.push_str("echo \"$$ ");
    s.push_str(&attempt);
    s.push_str("\" > \"$0\"; export ");
    s.push_str(ATTEMPT_ENV);
    s.push('=');
    s.push_str(&token);
    Ok(s)
}

/// Runs `argv` under `sh`, which first writes its pid and `attempt` to its [`proc_file`]
/// (`$0` of the shell: the run dir of a service, the file itself for a one-shot); a
/// service adds its start time and session (fields 22 and 6 of `/proc/$$/stat`, read by the
/// shell itself: `sh`'s command name holds no space, so the fields split plainly). A
/// one-shot skips that read (a shell's `read` takes a byte a system call: about 300 of
/// them, more than the rest of a small task's shell), exports [`ATTEMPT_ENV`] for what it
/// runs, and appends its exit status to the same file when it ends (not when it is killed:
/// then there is no status, which is the truth); a service `exec`s, keeping the pid.
pub(crate) fn wrap(spec: &SpawnSpec) -> Result<Vec<String>, BackendError> {
    let (argv, service) = (&spec.argv, spec.service);
    let pid = if service {
        format!(
            "_prl_flow_pid() {{ echo \"$1 $2 ${{24}} ${{8}}\"; }}; read -r _s < /proc/$$/stat; \
             _prl_flow_pid $$ {} $_s > \"$0/{PID_FILE}\"",
            spec.attempt
        )
    } else {
        oneshot_prelude(spec)?
    };
    let zero = if service {
        spec.run_dir.to_string_lossy().into_owned()
    } else {
        proc_file(spec).to_string_lossy().into_owned()
    };
    const TRAP: &str = "; trap 'echo $? >> \"$0\"' EXIT";
    let mut script = pid;
    match (service, argv.as_slice()) {
        (true, _) => script.push_str("; exec \"$@\""),
        // A shell command line: one shell, with the trap in front.
        (false, [sh, c, line]) if sh == "sh" && c == "-c" => {
            script.reserve(TRAP.len() + 1 + line.len());
            script.push_str(TRAP);
            script.push('\n');
            script.push_str(line);
        }
        (false, _) => {
            script.push_str(TRAP);
            script.push_str("; \"$@\"");
        }
    }
    let mut v = vec![SHELL.to_string(), "-c".to_string(), script, zero];
    match (service, argv.as_slice()) {
        (false, [sh, c, _]) if sh == "sh" && c == "-c" => {}
        _ => v.extend(argv.iter().cloned()),
    }
    Ok(v)
}
