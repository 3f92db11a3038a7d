//! What Linux's `/proc` says about processes and sockets: a process's start time, state,
//! group and session, who listens on a port.
//!
//! The local backend uses it to tell its own processes from strangers: a pid can be reused,
//! a process group can outlive its leader, and a port can be answered by someone else.

use std::collections::BTreeSet;
use std::net::IpAddr;

/// The fields of `/proc/PID/stat` the backend reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// The process group id.
    pub pgrp: i32,
    /// The session id.
    pub sid: i32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

impl Stat {
    /// A zombie or a dead process: nothing of it runs.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

pub fn stat(pid: i32) -> Option<Stat> {
    // One `read` into a buffer on the stack: the line is a few hundred bytes, and this runs
    // once per spawn and once per process in every scan of a group.
    use std::io::Read as _;
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    parse_stat(&buf[..len])
}

/// The clock of the start times in `/proc/PID/stat` (field 22), read now: clock ticks of
/// `CLOCK_BOOTTIME` (the kernel stamps a new process with that clock, and `/proc` divides it
/// by the tick's length, 1/100 s on Linux; [`stat`] is the authority that a caller checks
/// this against before relying on it).
pub fn boot_ticks() -> Option<u64> {
    const TICK_NS: u128 = 1_000_000_000 / 100;
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let ns = u128::try_from(t.tv_sec()).ok()? * 1_000_000_000 + u128::try_from(t.tv_nsec()).ok()?;
    u64::try_from(ns / TICK_NS).ok()
}

/// The fields of a `/proc/PID/stat` line.
fn parse_stat(line: &[u8]) -> Option<Stat> {
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let close = line.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(line.get(close + 2..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    // Fields 3 (state), 5, 6 and 22 overall are indices 0, 2, 3 and 19 after the name.
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    let sid = fields.next()?.parse().ok()?;
    let start = fields.nth(15)?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        sid,
        start,
    })
}

/// The command name of a process (`/proc/PID/comm`).
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

/// Every pid in `/proc`.
pub fn pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The live processes of group `pgrp` (zombies left out), with what `/proc` says of each.
pub fn group(pgrp: i32) -> Vec<(i32, Stat)> {
    pids()
        .into_iter()
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, s)| s.pgrp == pgrp && !s.is_dead())
        .collect()
}

/// The inodes of the TCP sockets listening on `port`, at `address` or at a wildcard address
/// (any address when `address` is `None`).
pub fn listening(port: u16, address: Option<IpAddr>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            if *st != "0A" {
                continue;
            }
            let Some((addr, p)) = local.split_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            let matches = match (address, proc_net_addr(addr)) {
                (None, _) => true,
                (Some(want), Some(have)) => have.is_unspecified() || same_ip(want, have),
                (Some(_), None) => true,
            };
            if matches {
                if let Ok(i) = inode.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// `want` and `have` name one address (an IPv4 address may show as IPv4-mapped IPv6).
pub fn same_ip(want: IpAddr, have: IpAddr) -> bool {
    let v4 = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        a => a,
    };
    v4(want) == v4(have)
}

/// An address as `/proc/net/tcp*` writes it: the bytes of the address in the machine's
/// order, 32 bits at a time, in hex (read in this machine's order: a remote host's text is
/// taken to come from a machine of the same byte order).
pub fn proc_net_addr(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Of `candidates`, the pids that hold one of the sockets `inodes` (only processes whose
/// file descriptors this user may read are seen).
pub fn holders(inodes: &BTreeSet<u64>, candidates: impl IntoIterator<Item = i32>) -> Vec<i32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    candidates
        .into_iter()
        .filter(|pid| {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                return false;
            };
            fds.filter_map(Result::ok).any(|fd| {
                std::fs::read_link(fd.path()).ok().is_some_and(|l| {
                    l.to_str()
                        .and_then(|l| l.strip_prefix("socket:["))
                        .and_then(|l| l.strip_suffix(']'))
                        .and_then(|i| i.parse::<u64>().ok())
                        .is_some_and(|i| inodes.contains(&i))
                })
            })
        })
        .collect()
}

/// Who holds the sockets `inodes`, in words: `pid 4242 (python3)`, or, when no process we
/// may look at holds them, `a process prl-flow cannot see (another user's?)`.
pub fn describe_holders(inodes: &BTreeSet<u64>) -> String {
    let found = holders(inodes, pids());
    if found.is_empty() {
        return "a process prl-flow cannot see (another user's?)".into();
    }
    found
        .iter()
        .map(|pid| match comm(*pid) {
            Some(c) => format!("pid {pid} ({c})"),
            None => format!("pid {pid}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat() {
        let me = std::process::id() as i32;
        let s = stat(me).expect("stat");
        assert!(!s.is_dead());
        assert!(s.start > 0);
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        assert_eq!(s.sid, nix::unistd::getsid(None).expect("sid").as_raw());
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let line =
            b"4242 (a) b (c) S 1 4240 4239 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0\n";
        let s = parse_stat(line).expect("parsed");
        assert_eq!((s.state, s.pgrp, s.sid, s.start), ('S', 4240, 4239, 987654));
        assert!(parse_stat(b"4242 (a) S 1 2").is_none());
    }

    #[test]
    fn finds_a_listener_and_its_holder() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let here: IpAddr = "127.0.0.1".parse().expect("ip");
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        let inodes = listening(port, Some(here));
        assert_eq!(inodes.len(), 1);
        assert!(listening(port, Some(other)).is_empty());
        let me = std::process::id() as i32;
        assert_eq!(holders(&inodes, [me]), [me]);
        assert!(describe_holders(&inodes).contains(&format!("pid {me}")));
        drop(l);
        // The port may be anyone's now; it is no longer this process's.
        assert!(holders(&listening(port, None), [me]).is_empty());
    }
}
