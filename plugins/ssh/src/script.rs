//! The shell scripts prl-flow runs on a host, and how their answers are read.
//!
//! Each script is a fixed prelude of functions plus a few variable assignments whose values
//! are quoted with `shlex` (never by hand), then a fixed body. Only POSIX `sh`, `setsid`
//! (util-linux) and Linux `/proc` are needed on the host (and `awk` and `ls` for [`ports`]).
//!
//! A process is identified by its pid, its start time (field 22 of `/proc/PID/stat`, in clock
//! ticks since boot) and the host's boot id: a pid alone could be reused, and start times
//! restart at each boot.
//!
//! Every process runs under a small wrapper `sh`, started with `setsid` so it leads a
//! session and process group of its own (stopping signals the whole group, and a dropped ssh
//! connection signals nothing in it). The wrapper writes its pid to a file (how the spawn
//! script learns it when `setsid -f` forks), reads the task's environment from a file only
//! the user can read and removes it (values never appear in a command line), runs the
//! command as its child, and writes the command's exit status to `exit-status` when it ends.
//! Stopping signals the whole group, also when the wrapper has ended and left processes in
//! it. A service is started with
//! `setsid -f`, so it keeps default signal dispositions; a one-shot is started in the
//! background of the spawn session, which then `wait`s for it and says how it ended the
//! moment it does, over the same session.
//!
//! [`ports`] holds the scripts that tell who listens on a port of the host; [`preflight`]
//! the one that finds a host's programs before anything starts.

pub mod ports;
pub mod preflight;

use prl_flow_backend::{start_line, BackendError, ProcState};

/// Functions every script starts with. They set variables rather than print, and read
/// files with `read` rather than `cat`: a fork costs about a millisecond on a small host, and
/// a fan-out to many hosts pays for each one.
const PRELUDE: &str = r#"set -u
set -f
say() { printf 'PRLFLOW %s\n' "$*"; }
# Sets boot_ to the host's boot id.
boot_id() { read -r boot_ 2>/dev/null </proc/sys/kernel/random/boot_id || boot_=none; }
# Sets start_ and pstate_ for pid $1; fails when there is no such process.
proc_start() {
	read -r s_ 2>/dev/null <"/proc/$1/stat" || return 1
	# The command name (field 2) may hold spaces and parentheses: cut after the last ") ".
	r_=${s_##*) }
	set -- $r_
	[ $# -ge 20 ] || return 1
	start_=${20}
	pstate_=$1
}
# Is pid $1 the process that started at $2 during boot $3, and not a zombie?
ours() {
	boot_id
	[ "$boot_" = "$3" ] || return 1
	proc_start "$1" || return 1
	[ "$start_" = "$2" ] || return 1
	case $pstate_ in Z | X) return 1 ;; esac
	return 0
}
# Sets st_ to how pid $1 (start $2, boot $3, exit status file $4) is: running, exited CODE,
# or gone.
state() {
	if ours "$1" "$2" "$3"; then st_=running; return 0; fi
	if [ -s "$4" ] && read -r c_ 2>/dev/null <"$4"; then
		case $c_ in '' | *[!0-9]*) ;; *) st_="exited $c_"; return 0 ;; esac
	fi
	st_=gone
}
# Says `found PID COMM` for each live process of the group led by pid $1 (in the session
# it leads, started at or after $2 ticks) and sets n_ to their number. The leader itself may
# be gone: the others still hold the group's id, which no new process can take meanwhile.
members() {
	g_=$1 t_=$2 n_=0
	set +f
	for d_ in /proc/[0-9]*; do
		set -f
		read -r s_ 2>/dev/null <"$d_/stat" || continue
		c_=${s_#*(}
		c_=${c_%) *}
		set -- ${s_##*) }
		[ $# -ge 20 ] || continue
		[ "$3" = "$g_" ] && [ "$4" = "$g_" ] || continue
		case $1 in Z | X) continue ;; esac
		[ "${20}" -ge "$t_" ] 2>/dev/null || continue
		n_=$((n_ + 1))
		say found "${d_#/proc/}" "$c_"
	done
	set -f
}
# Says `found PID COMM` for each live process of the group of pid $1 (start $2, boot $3),
# whether or not its leader still runs, and sets n_ to their number: none after a reboot,
# nor when another process has the leader's pid (the whole group ended long ago).
group_of() {
	n_=0
	boot_id
	[ "$boot_" = "$3" ] || return 0
	if proc_start "$1" && [ "$start_" != "$2" ]; then return 0; fi
	members "$1" "$2"
}
# Stops the group of pid $1 (start $2, boot $3), whether or not its leader still runs:
# SIGTERM (and SIGCONT: a stopped process acts on it only once it runs), up to $4 tenths of
# a second, SIGKILL. Says what it found running (`found`), sets
# n_ to how many and stopped_ to none, term, kill or stuck.
stop_group() {
	group_of "$1" "$2" "$3"
	[ "$n_" -gt 0 ] || { stopped_=none; return 0; }
	kill -s TERM -- "-$1" 2>/dev/null
	kill -s CONT -- "-$1" 2>/dev/null
	i_=0
	while kill -s 0 -- "-$1" 2>/dev/null && [ "$i_" -lt "$4" ]; do sleep 0.1; i_=$((i_ + 1)); done
	kill -s 0 -- "-$1" 2>/dev/null || { stopped_=term; return 0; }
	kill -s KILL -- "-$1" 2>/dev/null
	i_=0
	while kill -s 0 -- "-$1" 2>/dev/null && [ "$i_" -lt 50 ]; do sleep 0.1; i_=$((i_ + 1)); done
	stopped_=kill
	kill -s 0 -- "-$1" 2>/dev/null && stopped_=stuck
	return 0
}
"#;

/// The wrapper every process runs under:
/// `sh -c WRAPPER prl-flow PIDFILE STATUSFILE ENVFILE ARGV...`. Each file is written by one
/// `echo`, a single write: a reader that sees it non-empty sees all of it. ENVFILE (empty
/// when the task sets no variable) holds `export NAME=VALUE` lines, readable by the user
/// alone; the wrapper reads it and removes it before it starts the command, so environment
/// values are never part of a command line.
const WRAPPER: &str = r#"pidf=$1 statf=$2 envf=$3
shift 3
echo "$$" >"$pidf"
trap 'echo "$?" >"$statf"' EXIT
if [ -n "$envf" ]; then
	. "$envf" || exit 126
	rm -f "$envf"
fi
"$@"
exit $?"#;

/// Sets up the run dir, places the files and stops an earlier unrecorded instance; after the
/// start line, [`SPAWN_AFTER`] says `spawned PID START BOOT BASE` and, for a watched
/// one-shot, waits and says `state ...`.
const SPAWN_BEFORE: &str = r#"command -v setsid >/dev/null 2>&1 || { say error "\`setsid\` is not installed on this host (package util-linux)"; exit 3; }
if [ ! -d "$base/run/$name" ] || [ ! -d "$base/logs" ]; then
	mkdir -p "$base/run/$name" "$base/logs" || { say error "cannot make the run dir $base/run/$name"; exit 3; }
fi
cd "$base" || { say error "cannot enter $base"; exit 3; }
base=$PWD
rd=$base/run/$name
lf=$base/logs/$logname
pf=$rd/.pid
sf=$rd/exit-status
boot_id
boot=$boot_
# A process of this task that no journal records (its spawn's answer was lost with the
# connection) must not run twice.
if [ -s "$rd/.proc" ] && read -r opid ostart oboot _ <"$rd/.proc"; then
	stop_group "$opid" "$ostart" "$oboot" 50
	if [ "$stopped_" != none ]; then
		echo "prl-flow: stopped an earlier instance (process group $opid) that no run recorded" >>"$lf"
	fi
fi
ef=$rd/.env
for f_ in "$pf" "$sf" "$rd/.proc" "$ef"; do
	if [ -e "$f_" ]; then rm -f "$f_"; fi
done
place_files || exit 3
cd "$rd" || { say error "cannot enter $rd"; exit 3; }
# The environment, in a file only the user can read (a new one: `set -C`); `printf` is a
# shell builtin, so the values are in no command line.
if [ -n "$envtext" ]; then
	(umask 077 && set -C && printf '%s' "$envtext" >"$ef") || { say error "cannot write the environment file $ef"; exit 3; }
else
	ef=
fi
"#;

/// After the start line (which sets `bg` to the pid of a one-shot started in the
/// background: `setsid` does not fork when its caller leads no group, so that is the
/// wrapper's pid, and this shell can `wait` for it).
const SPAWN_AFTER: &str = r#"if [ -n "$bg" ]; then
	pid=$bg
else
	i=0
	while [ ! -s "$pf" ]; do
		i=$((i + 1))
		[ "$i" -gt 1000 ] && { say error "the process did not start (no pid after 10s)"; exit 3; }
		sleep 0.01
	done
	read -r pid <"$pf"
fi
start=0
if proc_start "$pid"; then start=$start_; fi
echo "$pid $start $boot $attempt" >"$rd/.proc"
say spawned "$pid" "$start" "$boot" "$base"
[ "$watch" = 1 ] || exit 0
if [ -n "$bg" ]; then
	wait "$pid"
	code=$?
	if [ -s "$sf" ]; then
		state "$pid" "$start" "$boot" "$sf"
		say state "$st_"
	elif [ "$code" -gt 128 ]; then
		say state killed
	else
		say state "exited $code"
	fi
else
	while ours "$pid" "$start" "$boot"; do echo; sleep 0.1; done
	state "$pid" "$start" "$boot" "$sf"
	say state "$st_"
fi
"#;

/// Finds what the spawn of `attempt` left in the run dir `name` under `base`: says `spawned
/// PID START BOOT BASE` as the spawn would have when its `.proc` names that attempt, and
/// nothing otherwise (whether the process still runs is for a status script to say, by that
/// identity).
pub fn recover(base: &str, name: &str, attempt: u64) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.set("base", base)?
        .set("name", name)?
        .set("attempt", &attempt.to_string())?;
    sc.line(
        r#"cd "$base" 2>/dev/null || exit 0
base=$PWD
if [ -s "run/$name/.proc" ] && read -r pid start boot att _ <"run/$name/.proc" && [ "$att" = "$attempt" ]; then
	say spawned "$pid" "$start" "$boot" "$base"
fi"#,
    );
    Ok(sc.text().to_string())
}

/// A script under construction: the prelude, then quoted assignments and body lines.
pub struct Script {
    text: String,
}

impl Script {
    pub fn new() -> Self {
        Self {
            text: PRELUDE.to_string(),
        }
    }

    /// `var=VALUE`, quoted.
    pub fn set(&mut self, var: &str, value: &str) -> Result<&mut Self, BackendError> {
        let q = quote(value)?;
        self.text.push_str(&format!("{var}={q}\n"));
        Ok(self)
    }

    pub fn line(&mut self, line: &str) -> &mut Self {
        self.text.push_str(line);
        self.text.push('\n');
        self
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

pub use prl_flow_backend::shell::{env_file, is_env_name, quote};

/// What to start, for [`spawn`].
pub struct Start<'a> {
    /// The task's id, for the line that marks the attempt's start in its log.
    pub task: &'a str,
    pub base: &'a str,
    pub name: &'a str,
    pub log_name: &'a str,
    pub argv: &'a [String],
    pub env: &'a std::collections::BTreeMap<String, String>,
    pub files: &'a std::collections::BTreeMap<String, String>,
    /// Where the command starts on the host (an absolute path); `None`: its run dir.
    pub cwd: Option<&'a str>,
    pub service: bool,
    pub watch: bool,
    /// The spawn's attempt, kept beside the process's identity in the run dir's `.proc`,
    /// where [`recover`] looks for it.
    pub attempt: u64,
}

/// The spawn script.
pub fn spawn(s: &Start<'_>) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.set("base", s.base)?
        .set("name", s.name)?
        .set("logname", s.log_name)?
        .set("service", if s.service { "1" } else { "0" })?
        .set("watch", if s.watch { "1" } else { "0" })?
        .set("attempt", &s.attempt.to_string())?
        .set("envtext", &env_file(s.env)?)?
        .set("cwd", s.cwd.unwrap_or(""))?;

    // The files: one `printf` per file, its content a single quoted word.
    sc.line("place_files() {");
    for (rel, content) in s.files {
        // `"$rd"/'a b/c.json'`: the run dir, then the relative path as one quoted word.
        let path = format!("\"$rd\"/{}", quote(rel)?);
        let dir = match rel.rsplit_once('/') {
            Some((d, _)) => format!("\"$rd\"/{}", quote(d)?),
            None => "\"$rd\"".to_string(),
        };
        sc.line(&format!(
            "\tmkdir -p {dir} && printf '%s' {c} >{path} || {{ say error {msg}; return 1; }}",
            c = quote(content)?,
            msg = quote(&format!("cannot write {rel} in the run dir"))?,
        ));
    }
    sc.line("\treturn 0");
    sc.line("}");

    // The command: the wrapper, its files, then argv, each word quoted.
    let mut words: Vec<String> = vec![
        "setsid".into(),
        if s.service {
            "-f".into()
        } else {
            String::new()
        },
        "sh".into(),
        "-c".into(),
        quote(WRAPPER)?,
        "prl-flow".into(),
        "\"$pf\"".into(),
        "\"$sf\"".into(),
        "\"$ef\"".into(),
    ];
    words.retain(|w| !w.is_empty());
    for a in s.argv {
        words.push(quote(a)?);
    }
    sc.line(SPAWN_BEFORE);
    // The attempt's first line in the log: what a failure quotes and a `log` probe reads
    // starts after it.
    sc.line(&format!(
        "printf '%s\\n' {} >>\"$lf\"",
        quote(&start_line(s.task))?
    ));
    // The run dir keeps the pid, exit-status and environment files (their paths are
    // absolute); only the command starts elsewhere.
    sc.line("if [ -n \"$cwd\" ]; then cd \"$cwd\" || { say error \"cannot enter $cwd, where the task is to start\"; exit 3; }; fi");
    // A one-shot is a plain background command, so that `$!` is the wrapper itself (setsid
    // does not fork when its caller leads no group) and the session can `wait` for it.
    let redirect = "</dev/null >>\"$lf\" 2>&1";
    if s.service {
        sc.line(&format!("{} {redirect}", words.join(" ")));
        sc.line("bg=");
    } else {
        sc.line(&format!("{} {redirect} &", words.join(" ")));
        sc.line("bg=$!");
    }
    sc.line(SPAWN_AFTER);
    Ok(sc.text().to_string())
}

/// Identity of a process on the host, quoted for a script.
pub struct Proc<'a> {
    pub pid: i32,
    pub start: u64,
    pub boot: &'a str,
    pub status_file: &'a str,
}

fn with_proc(p: &Proc<'_>) -> Result<Script, BackendError> {
    let mut sc = Script::new();
    sc.set("pid", &p.pid.to_string())?
        .set("start", &p.start.to_string())?
        .set("boot", p.boot)?
        .set("sf", p.status_file)?;
    Ok(sc)
}

/// Says `state ...` once.
pub fn status(p: &Proc<'_>) -> Result<String, BackendError> {
    let mut sc = with_proc(p)?;
    sc.line(r#"state "$pid" "$start" "$boot" "$sf"; say state "$st_""#);
    Ok(sc.text().to_string())
}

/// Waits on the host until the process ends, then says `state ...`. An empty line every
/// 200 ms makes the loop end (SIGPIPE) if prl-flow goes away.
pub fn wait(p: &Proc<'_>) -> Result<String, BackendError> {
    let mut sc = with_proc(p)?;
    sc.line(r#"while ours "$pid" "$start" "$boot"; do echo; sleep 0.2; done"#);
    sc.line(r#"state "$pid" "$start" "$boot" "$sf"; say state "$st_""#);
    Ok(sc.text().to_string())
}

/// Stops the process group, whether or not its leader lives; says `found PID COMM` for each
/// process of the group it found running, then `stopped none|term|kill|stuck N` (N: how many
/// it found).
pub fn stop(p: &Proc<'_>, grace: std::time::Duration) -> Result<String, BackendError> {
    let mut sc = with_proc(p)?;
    let tenths = (grace.as_millis() / 100).max(1);
    sc.line(&format!(
        r#"stop_group "$pid" "$start" "$boot" {tenths}; say stopped "$stopped_" "$n_""#
    ));
    Ok(sc.text().to_string())
}

/// Says `log FROM SIZE` and then prints the log from byte `from` to its size then.
pub fn read_log(log: &str, from: u64) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.set("lf", log)?.set("from", &from.to_string())?;
    sc.line(
        r#"if [ ! -f "$lf" ]; then say log "$from" "$from"; exit 0; fi
size=$(wc -c <"$lf") || size=0
size=$((size + 0))
[ "$from" -gt "$size" ] && from=0
say log "$from" "$size"
tail -c "+$((from + 1))" "$lf" | head -c "$((size - from))""#,
    );
    Ok(sc.text().to_string())
}

/// Says `log 0 0` and then prints up to the last `bytes` bytes of the log.
pub fn tail_log(log: &str, bytes: u64) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.set("lf", log)?;
    sc.line(&format!(
        r#"say log 0 0; tail -c {bytes} "$lf" 2>/dev/null; exit 0"#
    ));
    Ok(sc.text().to_string())
}

/// Reads `state ...` words.
pub fn parse_state(words: &[&str]) -> Option<ProcState> {
    match words {
        ["running"] => Some(ProcState::Running),
        ["gone"] => Some(ProcState::Gone),
        ["killed"] => Some(ProcState::Exited(None)),
        ["exited", code] => {
            let c: i32 = code.parse().ok()?;
            // The shell reports death by signal N as 128+N.
            Some(if c > 128 {
                ProcState::Exited(None)
            } else {
                ProcState::Exited(Some(c))
            })
        }
        _ => None,
    }
}

/// The text after the `PRLFLOW log ...` line of a reply, and that line's words.
pub fn split_log(raw: &str) -> Option<(Vec<&str>, &str)> {
    let at = raw.find("PRLFLOW log ")?;
    let rest = &raw[at + "PRLFLOW log ".len()..];
    let (line, body) = rest.split_once('\n').unwrap_or((rest, ""));
    Some((line.split(' ').collect(), body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn every_value_is_quoted() {
        let argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            "echo \"$HOME\" 'x'; rm -rf /nope".to_string(),
        ];
        let env: BTreeMap<String, String> = [("A".to_string(), "it's $x".to_string())].into();
        let files: BTreeMap<String, String> =
            [("conf/a b.json".to_string(), "{\"k\": '$(id)'}".to_string())].into();
        let text = spawn(&Start {
            task: "t",
            base: ".prl-flow/remote/x y",
            name: "t",
            log_name: "t.log",
            argv: &argv,
            env: &env,
            files: &files,
            cwd: Some("/srv/a b"),
            service: true,
            watch: false,
            attempt: 7,
        })
        .expect("script");
        assert!(text.contains("base='.prl-flow/remote/x y'"), "{text}");
        assert!(text.contains("cwd='/srv/a b'"), "{text}");
        // The value is inside the quoted environment file text, never a word of the command.
        assert!(!text.contains(&quote("A=it's $x").expect("q")));
        let env_text = env_file(&env).expect("env");
        assert_eq!(
            env_text,
            format!("export A={}\n", quote("it's $x").expect("q"))
        );
        assert!(text.contains(&format!("envtext={}", quote(&env_text).expect("q"))));
        assert!(text.contains(&quote("echo \"$HOME\" 'x'; rm -rf /nope").expect("q")));
        assert!(quote("a\0b").is_err());
    }

    #[test]
    fn only_shell_names_are_exported() {
        assert!(is_env_name("HF_TOKEN") && is_env_name("_x1"));
        assert!(!is_env_name("1X") && !is_env_name("A B") && !is_env_name(""));
        let env: BTreeMap<String, String> = [("A B".to_string(), "v".to_string())].into();
        assert!(env_file(&env).is_err());
    }

    #[test]
    fn states() {
        assert_eq!(
            parse_state(&["exited", "3"]),
            Some(ProcState::Exited(Some(3)))
        );
        assert_eq!(
            parse_state(&["exited", "143"]),
            Some(ProcState::Exited(None))
        );
        assert_eq!(parse_state(&["running"]), Some(ProcState::Running));
        assert_eq!(parse_state(&["what"]), None);
        let (w, body) = split_log("motd\nPRLFLOW log 0 5\nhello").expect("log");
        assert_eq!((w, body), (vec!["0", "5"], "hello"));
    }
}
