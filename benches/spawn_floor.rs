//! The spawn floor for `ninja_compare.sh`: the least a scheduler can do to run N shell
//! lines `J` at a time. One thread, `posix_spawn` through the standard library (as prl-flow
//! and ninja spawn), `waitpid(-1)` for whichever child ends first; no graph and no output
//! pipe, and unless asked no journal and no log file. Built by the script with plain
//! `rustc -O`, so it has no dependencies.
//!
//!   spawn_floor N J DIR [--wrapped] [--logged] [--journal FILE] [--burn US]
//!
//! runs `/bin/sh -c '/bin/true && touch DIR/ID'` for ID in 0..N, in the current directory,
//! `J` at a time. Options:
//! - `--wrapped`: under the script prl-flow's local backend wraps a one-shot in (its pid and
//!   attempt to `run/ID.pid`, its attempt exported, a trap that appends its exit status to
//!   that file), so the wrapper's cost shows with no scheduler at all;
//! - `--logged`: stdout and stderr to a log file of its own, `logs/ID.log`, opened here as
//!   prl-flow opens it (without the line that marks each start in it);
//! - `--journal FILE`: a journal of prl-flow's line sizes in FILE, each task's record
//!   written before its spawn;
//! - `--burn US`: spins for US µs per task (half after each spawn, half before each wait),
//!   a stand-in for a scheduler's own work.
//!
//! The first three together are what prl-flow's promises about a one-shot cost (its log,
//! its resume after `kill -9`, its record written ahead of its start) with no engine around
//! them: the guaranteed floor. At the end it prints its own CPU (user and system, without
//! its children's) to stderr.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

extern "C" {
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn getrusage(who: i32, usage: *mut [i64; 18]) -> i32;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: spawn_floor N J DIR [--wrapped] [--logged] [--journal FILE] [--burn US]");
        std::process::exit(2);
    }
    let n: usize = args[1].parse().expect("N: a number of tasks");
    let j: usize = args[2].parse().expect("J: how many at a time");
    let dir = &args[3];
    let rest = &args[4..];
    let wrapped = rest.iter().any(|a| a == "--wrapped");
    let logged = rest.iter().any(|a| a == "--logged");
    // The word after `flag`, for the flags that take one.
    let value = |flag: &str| {
        rest.iter()
            .position(|a| a == flag)
            .and_then(|i| rest.get(i + 1))
    };
    let mut journal = value("--journal").map(|path| Journal {
        file: std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("--journal FILE: a file to append to"),
        queued: String::new(),
    });
    let burn = value("--burn")
        .map(|us| Duration::from_micros(us.parse().expect("--burn US: microseconds")) / 2);
    let spin = |d: Option<Duration>| {
        if let Some(d) = d {
            let t = Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
        }
    };
    let (mut next, mut running) = (0, 0);
    while next < n || running > 0 {
        while running < j && next < n {
            let line = format!("/bin/true && touch {dir}/{next}");
            let mut cmd = Command::new("/bin/sh");
            if wrapped {
                cmd.arg("-c")
                    .arg(format!(
                        "echo \"$$ 1\" > \"$0\"; export PRL_FLOW_ATTEMPT='1 {next}'; \
                         trap 'echo $? >> \"$0\"' EXIT\n{line}"
                    ))
                    .arg(format!("run/{next}.pid"));
            } else {
                cmd.arg("-c").arg(line);
            }
            cmd.stdin(Stdio::null()).process_group(0);
            if logged {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(format!("logs/{next}.log"))
                    .expect("a log file in logs/");
                let err = log.try_clone().expect("a second descriptor of the log");
                cmd.stdout(log).stderr(err);
            }
            if let Some(j) = &mut journal {
                j.start(next);
            }
            // Reaped below by `waitpid(-1)`, not through the `Child`.
            let child = cmd.spawn().expect("spawn /bin/sh");
            if let Some(j) = &mut journal {
                j.spawned(next, child.id());
            }
            next += 1;
            running += 1;
            spin(burn);
        }
        spin(burn);
        let mut status = 0;
        // SAFETY: a plain call with a pointer to a local.
        let pid = unsafe { waitpid(-1, &mut status, 0) };
        if pid > 0 {
            running -= 1;
            if let Some(j) = &mut journal {
                j.ended(pid, status);
            }
        }
    }
    if let Some(j) = &mut journal {
        j.flush();
    }
    let mut usage = [0i64; 18];
    // SAFETY: `struct rusage` on 64-bit Linux is 18 longs; RUSAGE_SELF is 0.
    unsafe { getrusage(0, &mut usage) };
    let secs = |i: usize| usage[i] as f64 + usage[i + 1] as f64 / 1e6;
    eprintln!("own CPU: user {:.3} s, system {:.3} s", secs(0), secs(2));
}

/// A journal as prl-flow's keeps it, in a stand-in of the same sizes: a task's whole record
/// on file before its process starts (one `write`, which also carries what was queued),
/// then its handle and its end as short lines queued for the next write.
struct Journal {
    file: std::fs::File,
    queued: String,
}

impl Journal {
    fn start(&mut self, id: usize) {
        use std::fmt::Write as _;
        let _ = writeln!(
            self.queued,
            "{{\"id\":\"t{id}\",\"status\":\"running\",\"fingerprint\":\"9fb8a42dcfccc19d\",\
             \"kind\":\"custom\",\"service\":false,\"needs\":[\"t{}\",\"t{}\"],\"meta\":{{}},\
             \"seq\":{id},\"attempts\":1,\"started_ms\":1796571927356}}",
            id / 2,
            id / 3
        );
        self.flush();
    }
    fn flush(&mut self) {
        use std::io::Write as _;
        self.file
            .write_all(self.queued.as_bytes())
            .expect("journal write");
        self.queued.clear();
    }
    fn spawned(&mut self, id: usize, pid: u32) {
        use std::fmt::Write as _;
        let _ = writeln!(
            self.queued,
            "{{\"set\":\"t{id}\",\"handle\":{{\"backend\":\"local\",\"payload\":{{\"log\":\
             \"logs/{id}.log\",\"pid\":{pid},\"sid\":28968,\"start\":3375552,\
             \"status_file\":\"run/{id}.pid\"}},\"version\":1}}}}"
        );
    }
    fn ended(&mut self, pid: i32, status: i32) {
        use std::fmt::Write as _;
        let _ = writeln!(
            self.queued,
            "{{\"set\":\"p{pid}\",\"status\":\"done\",\"finished_ms\":1796571927426,\
             \"exit_code\":{status},\"error\":null}}"
        );
    }
}
