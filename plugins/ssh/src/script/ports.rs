//! Who listens on a port of a host: the scripts that read the host's `/proc`, and how their
//! answers become [`PortHolder`]s and a [`Listener`].
//!
//! A script lists the LISTEN sockets of `/proc/net/tcp` and `tcp6` on the ports asked
//! about, then, only when there are some, which processes hold them (the socket links in
//! `/proc/PID/fd`, as far as the user may read them). Each is one ssh round trip, with
//! `sh`, `awk` and `ls` on the host, nothing else. Addresses are compared here, not on the
//! host: a socket counts when it is at the address asked about or at a wildcard address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use prl_flow_backend::{BackendError, Listener, PortHolder};
use prl_flow_local::procfs::{proc_net_addr, same_ip};

use super::{Proc, Script};

/// The words a holder that no readable process shows is described with.
pub const UNSEEN: &str = "a process prl-flow cannot see (another user's?)";

/// Functions the port scripts add to the prelude.
const FUNCTIONS: &str = r#"# Says `listen PORT HEXADDR INODE` for each LISTEN socket on one of the ports $1 (decimal,
# space-separated) and sets inodes_ to their inodes.
listening() {
	inodes_= t_=
	for f_ in /proc/net/tcp /proc/net/tcp6; do
		if [ -r "$f_" ]; then t_="$t_ $f_"; fi
	done
	[ -n "$t_" ] || return 0
	l_=$(awk -v ports="$1" '
		BEGIN { n = split(ports, p, " "); for (i = 1; i <= n; i++) want[sprintf("%04X", p[i])] = p[i] + 0 }
		FNR > 1 && $4 == "0A" {
			k = index($2, ":")
			h = substr($2, k + 1)
			if (h in want) print want[h], substr($2, 1, k - 1), $10
		}' $t_)
	set -- $l_
	while [ $# -ge 3 ]; do
		say listen "$1" "$2" "$3"
		inodes_="$inodes_ $3"
		shift 3
	done
}
# Says `holds INODE PID COMM` for each process this user may look at that holds one of the
# sockets $1 (inodes, space-separated). One `ls` reads every process's descriptors.
holders() {
	[ -n "$1" ] || return 0
	set +f
	ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v inodes="$1" '
		BEGIN { n = split(inodes, x, " "); for (i = 1; i <= n; i++) want["socket:[" x[i] "]"] = x[i] }
		/^\/proc\/[0-9]+\/fd:$/ { pid = substr($0, 7, length($0) - 10); next }
		($NF in want) && !((pid, want[$NF]) in seen) {
			seen[pid, want[$NF]] = 1
			f = "/proc/" pid "/comm"
			if ((getline c < f) <= 0) c = "?"
			close(f)
			print "PRLFLOW holds", want[$NF], pid, c
		}'
	set -f
}
"#;

/// Says what listens on `ports`: `listen PORT HEXADDR INODE`, `holds INODE PID COMM`, then
/// `ports done`.
pub fn ports_taken(ports: &[u16]) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.line(FUNCTIONS).set("ports", &words(ports))?;
    sc.line(r#"listening "$ports"; holders "$inodes_"; say ports done"#);
    Ok(sc.text().to_string())
}

/// Like [`ports_taken`] for one port, after `found PID COMM` for each live process of the
/// group of `p` (the rule the stop script follows: also when its leader has ended, never
/// when its pid is now another process's).
pub fn listener(p: &Proc<'_>, port: u16) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.line(FUNCTIONS)
        .set("pid", &p.pid.to_string())?
        .set("start", &p.start.to_string())?
        .set("boot", p.boot)?
        .set("port", &port.to_string())?;
    sc.line(r#"group_of "$pid" "$start" "$boot""#);
    sc.line(r#"listening "$port"; holders "$inodes_"; say ports done"#);
    Ok(sc.text().to_string())
}

fn words(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a port script said.
#[derive(Debug, Default)]
pub struct Sockets {
    /// Port, address, inode of each LISTEN socket.
    listen: Vec<(u16, Option<IpAddr>, u64)>,
    /// Inode → the processes that hold it, as `pid N (comm)`, and their pids.
    holds: BTreeMap<u64, Vec<(i32, String)>>,
    /// The live processes of the service's group.
    members: BTreeSet<i32>,
}

impl Sockets {
    /// Reads the answer's lines (without their mark); `None` when the script did not finish.
    pub fn read(lines: &[String]) -> Option<Sockets> {
        let mut s = Sockets::default();
        let mut done = false;
        for l in lines {
            let w: Vec<&str> = l.splitn(4, ' ').collect();
            match w.as_slice() {
                ["listen", port, addr, inode] => {
                    if let (Ok(p), Ok(i)) = (port.parse(), inode.parse()) {
                        s.listen.push((p, proc_net_addr(addr), i));
                    }
                }
                ["holds", inode, pid, comm] => {
                    if let (Ok(i), Ok(p)) = (inode.parse(), pid.parse()) {
                        s.holds.entry(i).or_default().push((p, comm.to_string()));
                    }
                }
                ["found", pid, ..] => {
                    if let Ok(p) = pid.parse() {
                        s.members.insert(p);
                    }
                }
                ["ports", "done"] => done = true,
                _ => {}
            }
        }
        done.then_some(s)
    }

    /// The inodes of the sockets listening on `port` at `address` or at a wildcard address
    /// (at any address when `address` is not an IP address).
    fn at(&self, port: u16, address: &str) -> BTreeSet<u64> {
        let want: Option<IpAddr> = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
            .filter(|a: &IpAddr| !a.is_unspecified());
        self.listen
            .iter()
            .filter(|(p, have, _)| {
                *p == port
                    && match (want, have) {
                        (Some(w), Some(h)) => h.is_unspecified() || same_ip(w, *h),
                        _ => true,
                    }
            })
            .map(|(_, _, i)| *i)
            .collect()
    }

    /// Who holds `inodes`: `pid 4242 (python3)`, ..., or [`UNSEEN`].
    fn describe(&self, inodes: &BTreeSet<u64>) -> String {
        let mut seen = BTreeSet::new();
        let found: Vec<String> = inodes
            .iter()
            .flat_map(|i| self.holds.get(i).into_iter().flatten())
            .filter(|(pid, _)| seen.insert(*pid))
            .map(|(pid, comm)| format!("pid {pid} ({comm})"))
            .collect();
        if found.is_empty() {
            return UNSEEN.to_string();
        }
        found.join(", ")
    }

    /// Which of `ports` something listens on at `address` (or a wildcard), and who.
    pub fn taken(&self, address: &str, ports: &[u16]) -> Vec<PortHolder> {
        ports
            .iter()
            .filter_map(|&port| {
                let inodes = self.at(port, address);
                (!inodes.is_empty()).then(|| PortHolder {
                    port,
                    holder: Some(self.describe(&inodes)),
                })
            })
            .collect()
    }

    /// Whose the listener on `address:port` is: the group's, someone else's, or nobody's.
    pub fn listener(&self, address: &str, port: u16) -> Listener {
        let inodes = self.at(port, address);
        if inodes.is_empty() {
            return Listener::Nobody;
        }
        let ours = inodes
            .iter()
            .flat_map(|i| self.holds.get(i).into_iter().flatten())
            .any(|(pid, _)| self.members.contains(pid));
        if ours {
            return Listener::Ours;
        }
        Listener::Other(self.describe(&inodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn addresses_read_as_the_kernel_writes_them() {
        assert_eq!(proc_net_addr("0100007F"), "127.0.0.1".parse().ok());
        assert_eq!(proc_net_addr("00000000"), "0.0.0.0".parse().ok());
        assert_eq!(
            proc_net_addr("0000000000000000FFFF00000100007F"),
            "::ffff:127.0.0.1".parse().ok()
        );
        assert_eq!(
            proc_net_addr("00000000000000000000000001000000"),
            "::1".parse().ok()
        );
        assert_eq!(proc_net_addr("xyz"), None);
    }

    #[test]
    fn answers_tell_free_taken_ours_and_someone_elses() {
        let s = Sockets::read(&lines(
            "found 40 sh\nfound 41 engine\n\
             listen 8000 0200000A 7\nlisten 9000 00000000000000000000000000000000 8\n\
             listen 7000 0300000A 9\n\
             holds 7 41 engine\nholds 8 77 python3 -m x\nports done",
        ))
        .expect("done");
        assert_eq!(s.listener("10.0.0.2", 8000), Listener::Ours);
        assert_eq!(s.listener("10.0.0.2", 7000), Listener::Nobody);
        assert_eq!(
            s.listener("10.0.0.2", 9000),
            Listener::Other("pid 77 (python3 -m x)".into())
        );
        assert_eq!(s.listener("10.0.0.3", 7000), Listener::Other(UNSEEN.into()));
        let taken = s.taken("10.0.0.2", &[8000, 7000, 9000, 1]);
        assert_eq!(
            taken.iter().map(|t| t.port).collect::<Vec<_>>(),
            [8000, 9000]
        );
        assert_eq!(taken[0].holder.as_deref(), Some("pid 41 (engine)"));
        // A name rather than an address: any address counts.
        assert_eq!(s.taken("gpu1", &[7000]).len(), 1);
        assert!(Sockets::read(&lines("listen 8000 0200000A 7")).is_none());
    }

    /// Runs a script with this machine's `sh`, as a host would.
    fn run(text: &str) -> Sockets {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("script");
        let out = child.wait_with_output().expect("output");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("PRLFLOW ").map(String::from))
            .collect();
        Sockets::read(&lines).unwrap_or_else(|| panic!("no answer: {text}"))
    }

    #[test]
    fn the_scripts_read_proc_as_a_host_would() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|f| f.local_addr())
            .expect("a free port")
            .port();
        let me = std::process::id() as i32;
        let s = run(&ports_taken(&[port, free]).expect("script"));
        let taken = s.taken("127.0.0.1", &[port, free]);
        assert_eq!(taken.len(), 1, "{s:?}");
        assert_eq!(taken[0].port, port);
        let holder = taken[0].holder.clone().unwrap_or_default();
        assert!(holder.starts_with(&format!("pid {me} (")), "{holder}");
        assert!(s.taken("127.0.0.2", &[port]).is_empty());

        // A process that leads its own session and group, as the wrapper of a service does.
        let script = "import socket,sys\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\nprint(s.getsockname()[1],flush=True)\nsys.stdin.read()";
        let mut child = std::process::Command::new("setsid")
            .args(["python3", "-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("setsid python3");
        let mut said = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut said,
        )
        .expect("its port");
        let its: u16 = said.trim().parse().expect("a port");
        let pid = child.id() as i32;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let start: u64 = stat
            .rsplit_once(") ")
            .expect("stat")
            .1
            .split(' ')
            .nth(19)
            .and_then(|s| s.parse().ok())
            .expect("start");
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot");
        let p = Proc {
            pid,
            start,
            boot: boot.trim(),
            status_file: "",
        };
        let ask = |p: &Proc<'_>, port: u16| {
            run(&listener(p, port).expect("script")).listener("127.0.0.1", port)
        };
        assert_eq!(ask(&p, its), Listener::Ours);
        assert_eq!(ask(&p, free), Listener::Nobody);
        assert_eq!(ask(&p, port), Listener::Other(holder));
        // Another start time: the pid is someone else's now, and so is the socket.
        let stranger = Proc {
            start: start + 1,
            ..p
        };
        assert!(
            matches!(ask(&stranger, its), Listener::Other(w) if w.contains(&format!("pid {pid} ")))
        );
        drop(child.stdin.take());
        let _ = child.wait();
        drop(l);
    }

    #[test]
    fn scripts_quote_their_values() {
        let p = Proc {
            pid: 42,
            start: 7,
            boot: "b 'x'",
            status_file: "",
        };
        let text = listener(&p, 8000).expect("script");
        assert!(text.contains(&format!(
            "boot={}",
            super::super::quote("b 'x'").expect("q")
        )));
        assert!(ports_taken(&[1, 2])
            .expect("script")
            .contains("ports='1 2'"));
    }
}
