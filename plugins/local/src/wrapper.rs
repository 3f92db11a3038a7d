//! The shell every local process starts under, and how a later prl-flow tells that process
//! again: what the shell writes to `RUN_DIR/pid` and `RUN_DIR/exit-status`, and the checks
//! that take the process at a recorded pid for an attempt's.

use prl_flow_backend::{BackendError, SpawnSpec};

use super::ATTEMPT_ENV;

pub(crate) const PID_FILE: &str = "pid";

pub(crate) const STATUS_FILE: &str = "exit-status";

/// The shell of the wrapper, by its full path as make's and ninja's: looking `sh` up on a
/// long `PATH` costs a failed `execve` per entry before it, on every spawn.
const SHELL: &str = "/bin/sh";

/// What a process writes to `RUN_DIR/pid` first thing: `PID ATTEMPT START SID` (a service),
/// or `PID ATTEMPT` (a one-shot, whose process [`is_attempt`] recognises instead).
pub(crate) struct PidFile {
    pub(crate) pid: i32,
    pub(crate) attempt: u64,
    /// Its start time in clock ticks since boot, as `/proc/PID/stat` says.
    pub(crate) start: Option<u64>,
    pub(crate) sid: Option<i32>,
}

impl PidFile {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut w = text.split_whitespace();
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
    format!("{} {}", spec.attempt, spec.task)
}

/// Whether process `pid` is the one-shot `spec`'s attempt: its wrapper shell (the command
/// line [`wrap`] gave it: this attempt's first line, this run dir), or a program that
/// replaced the shell by `exec` and so inherited [`ATTEMPT_ENV`] from it. Unreadable counts
/// as no.
pub(crate) fn is_attempt(pid: i32, spec: &SpawnSpec) -> bool {
    let Ok(prelude) = oneshot_prelude(spec) else {
        return false;
    };
    let run_dir = spec.run_dir.to_string_lossy();
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
        let mut args = cmdline.split(|b| *b == 0);
        let (_sh, c, script, dir) = (args.next(), args.next(), args.next(), args.next());
        if c == Some(b"-c".as_slice())
            && script.is_some_and(|s| s.starts_with(prelude.as_bytes()))
            && dir == Some(run_dir.as_bytes())
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

/// The first line of a one-shot's wrapper: its pid and attempt to `RUN_DIR/pid`, and its
/// attempt exported for what it runs.
fn oneshot_prelude(spec: &SpawnSpec) -> Result<String, BackendError> {
    Ok(format!(
        "echo \"$$ {}\" > \"$0/{PID_FILE}\"; export {ATTEMPT_ENV}={}",
        spec.attempt,
        prl_flow_backend::shell::quote(&attempt_token(spec))?
    ))
}

/// Runs `argv` under `sh`, which first writes its pid and `attempt` to `RUN_DIR/pid`; a
/// service adds its start time and session (fields 22 and 6 of `/proc/$$/stat`, read by the
/// shell itself: `sh`'s command name holds no space, so the fields split plainly). A
/// one-shot skips that read (a shell's `read` takes a byte a system call: about 300 of
/// them, more than the rest of a small task's shell), exports [`ATTEMPT_ENV`] for what it
/// runs, and leaves its exit status in `RUN_DIR/exit-status` when it ends (not when it is
/// killed: then there is no status, which is the truth); a service `exec`s, keeping the pid.
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
    let run_dir = spec.run_dir.to_string_lossy().into_owned();
    let script = match (service, argv.as_slice()) {
        (true, _) => format!("{pid}; exec \"$@\""),
        // A shell command line: one shell, with the trap in front.
        (false, [sh, c, script]) if sh == "sh" && c == "-c" => {
            format!("{pid}; trap 'echo $? > \"$0/{STATUS_FILE}\"' EXIT\n{script}")
        }
        (false, _) => format!("{pid}; trap 'echo $? > \"$0/{STATUS_FILE}\"' EXIT; \"$@\""),
    };
    let mut v = vec![SHELL.to_string(), "-c".to_string(), script, run_dir];
    match (service, argv.as_slice()) {
        (false, [sh, c, _]) if sh == "sh" && c == "-c" => {}
        _ => v.extend(argv.iter().cloned()),
    }
    Ok(v)
}
