//! The ssh backend against real sshd hosts.
//!
//! Each test makes its own hosts with `tests/support/netns_hosts.sh`: N network namespaces on
//! a private bridge, each with its own address, hostname and sshd, and its own client key,
//! known_hosts and ssh config in a temp dir (nothing touches `~/.ssh`). A [`Hosts`] guard
//! removes them when the test ends, passing or not, after killing every process in them.
//! Names and subnets are claimed for the life of the test process (`netns::claim_tag`,
//! `netns::free_subnet`), so test runs, even two at once, never share them. Where network namespaces cannot be made, the hosts are sshd instances on
//! loopback ports instead, and the tests that cut a link are skipped, loudly.
//!
//! The processes a task starts on a "host" run in that host's namespace, and the pid space
//! is shared, so `ip netns pids` tells exactly what runs on which host. On loopback hosts
//! the OS tells it too: every process a session starts inherits `SSH_CONNECTION` from sshd,
//! naming the host's address and port, and so do its children and the sessions it leads
//! ([`Hosts::pids`]). Either way the tests check processes as `/proc` shows them, not as
//! the backend reports them.
//!
//! `PRL_FLOW_TEST_NO_NETNS=1` forces the loopback fallback (to test it where namespaces work).
//!
//! Needs (installed by `./dev test`): openssh-server, openssh-client, iproute2, and root. The
//! end-to-end test also needs the router (`PRL_FLOW_ROUTER`, or the venv `./dev` installs);
//! the benchmarks at the end (ignored; docs/benchmarks.md, "SSH fan-out") need pdsh.

mod common;
#[path = "support/netns.rs"]
mod netns;

use netns::{free_subnet, netns_possible};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prl_flow::actions::Action;
use prl_flow::plan::{Command as Cmd, FileSpec, Plan, Probe, Readiness, TaskSpec};
use prl_flow::session::{self, RunSettings, Session};
use prl_flow_backend::{Backend, ProcState, SpawnSpec};
use prl_flow_engine::{Event, Outcome, Report, Status, Subscriber};
use prl_flow_ssh::SshBackend;
use serde_json::{json, Value};

/// The `allocate` task's id and kind.
const ALLOCATE: &str = prl_flow::actions::Action::Allocate.name();

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/netns_hosts.sh");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One line of the hosts file the script writes.
#[derive(Debug, Clone)]
struct Host {
    name: String,
    /// What the recipe names: the address (namespaces) or `127.0.0.1:PORT` (loopback).
    target: String,
    netns: Option<String>,
}

/// Test hosts; removed on drop.
struct Hosts {
    dir: tempfile::TempDir,
    tag: String,
    list: Vec<Host>,
}

impl Hosts {
    /// `n` hosts in network namespaces, or on loopback ports where namespaces are impossible
    /// (then `netns()` is false). `None` (after a loud message) when sshd cannot run at all.
    fn up(n: usize) -> Option<Hosts> {
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = netns::claim_tag();
        let dir = tempfile::tempdir().expect("tempdir");
        if !common::prerequisite(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd (the ssh backend is NOT tested)",
            "apt-get install openssh-server openssh-client, or run `./dev test`",
        ) {
            return None;
        }
        // Leftovers of an earlier run with the same tag (a killed test) go first.
        let _ = script(&["down", path(dir.path()), &tag, "40"]);
        let mut hosts = Hosts {
            dir,
            tag: tag.clone(),
            list: Vec::new(),
        };
        let d = path(hosts.dir.path()).to_string();
        let ok = if netns_possible(&tag) {
            let net = free_subnet(150, pid, k);
            script(&["up", &d, &tag, &net, &n.to_string()])
        } else {
            // Forced (`PRL_FLOW_TEST_NO_NETNS=1`) the fallback is what is tested; otherwise
            // the link-cut checks go untested, which the switch does not allow.
            if std::env::var_os("PRL_FLOW_TEST_NO_NETNS").is_some_and(|v| v == "1") {
                eprintln!("\nnote: PRL_FLOW_TEST_NO_NETNS=1: hosts are sshd on loopback ports, and link-cut checks are SKIPPED\n");
            } else {
                common::prerequisite(
                    false,
                    "network namespaces (`ip netns add` failed: hosts are sshd on loopback ports, and link-cut checks are SKIPPED)",
                    "run as root with iproute2 installed, in a container with CAP_NET_ADMIN",
                );
            }
            let net = format!("127.{}.{}", 150 + (pid % 100), k % 250 + 1);
            script(&["loopback", &d, &tag, &net, &n.to_string()])
        };
        if let Err(e) = ok {
            panic!("cannot make the test hosts: {e}");
        }
        let text = std::fs::read_to_string(hosts.dir.path().join("hosts")).expect("hosts file");
        hosts.list = text
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                Host {
                    name: w[0].to_string(),
                    target: w[1].to_string(),
                    netns: (w[2] != "-").then(|| w[2].to_string()),
                }
            })
            .collect();
        Some(hosts)
    }

    fn netns(&self) -> bool {
        self.list.first().is_some_and(|h| h.netns.is_some())
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `[backend]` table for these hosts (as the recipe module hands it over).
    fn config(&self) -> Value {
        json!({
            "type": "ssh",
            "hosts": self.list.iter().map(|h| h.target.clone()).collect::<Vec<_>>(),
            "ssh_config": self.dir().join("ssh_config"),
            "control_dir": self.dir().join("cm"),
            "remote_dir": self.dir().join("remote"),
            "connect_timeout": "2s",
            "server_alive_interval": "1s",
        })
    }

    fn backend(&self, state_dir: &Path) -> prl_flow_local::WithLocal<SshBackend> {
        SshBackend::from_config(&self.config(), state_dir).expect("config")
    }

    fn cut(&self, k: usize) {
        script(&["cut", &self.tag, &k.to_string()]).expect("cut");
    }

    fn restore(&self, k: usize) {
        script(&["restore", &self.tag, &k.to_string()]).expect("restore");
    }

    /// Waits until plain `ssh` reaches host `k` (after [`Hosts::restore`], the bridge and
    /// ARP take a moment).
    fn wait_reachable(&self, k: usize) {
        let (host, port) = match self.list[k].target.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.to_string()),
            None => (self.list[k].target.clone(), "22".to_string()),
        };
        let began = Instant::now();
        loop {
            let ok = Command::new("ssh")
                .arg("-F")
                .arg(self.dir().join("ssh_config"))
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "ConnectTimeout=2",
                    "-p",
                    &port,
                    &host,
                    "true",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "host {k} stays unreachable"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The processes running on host `k`, as the OS sees them: pid and command line, sshd
    /// itself left out. In namespaces, what `ip netns pids` lists for the host; on loopback
    /// hosts, every process whose environment says its ssh session came in at this host's
    /// address and port (`SSH_CONNECTION`, which sshd sets and everything a session starts
    /// inherits), with their children and the members of sessions they lead.
    fn pids(&self, k: usize) -> Vec<(i32, String)> {
        let candidates: Vec<i32> = match &self.list[k].netns {
            Some(ns) => {
                let out = Command::new("ip")
                    .args(["netns", "pids", ns])
                    .output()
                    .expect("ip netns pids");
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            }
            None => {
                let (addr, port) = self.list[k]
                    .target
                    .rsplit_once(':')
                    .expect("a loopback host is ADDRESS:PORT");
                let came_here = |p: i32| {
                    let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
                    env.split(|b| *b == 0).any(|v| {
                        let v = String::from_utf8_lossy(v);
                        let w: Vec<&str> = v
                            .strip_prefix("SSH_CONNECTION=")
                            .unwrap_or_default()
                            .split(' ')
                            .collect();
                        w.len() == 4 && w[2] == addr && w[3] == port
                    })
                };
                // A program that rewrites its process title may overwrite its environment
                // too: its parent or its session leader (the backend's wrapper) tells then.
                let all: Vec<(i32, i32, i32)> = all_pids()
                    .into_iter()
                    .filter_map(|p| {
                        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                        let (_, rest) = stat.rsplit_once(") ")?;
                        let w: Vec<&str> = rest.split_whitespace().collect();
                        Some((p, w.get(1)?.parse().ok()?, w.get(3)?.parse().ok()?))
                    })
                    .collect();
                let mut found: std::collections::BTreeSet<i32> = all
                    .iter()
                    .map(|(p, ..)| *p)
                    .filter(|p| came_here(*p))
                    .collect();
                loop {
                    let more: Vec<i32> = all
                        .iter()
                        .filter(|(p, ppid, sid)| {
                            !found.contains(p) && (found.contains(ppid) || found.contains(sid))
                        })
                        .map(|(p, ..)| *p)
                        .collect();
                    if more.is_empty() {
                        break;
                    }
                    found.extend(more);
                }
                found.into_iter().collect()
            }
        };
        candidates
            .into_iter()
            .filter_map(|p| {
                let cmd = cmdline(p)?;
                (!cmd.is_empty() && !cmd.starts_with("sshd")).then_some((p, cmd))
            })
            .collect()
    }

    /// Command lines of the processes running on host `k` (sshd itself left out).
    fn processes(&self, k: usize) -> Vec<String> {
        self.pids(k).into_iter().map(|(_, c)| c).collect()
    }

    /// Waits (up to [`common::WAIT`]: sessions being closed take a moment, longer on a
    /// loaded machine) until host `k` runs nothing but sshd, and says what it still runs
    /// otherwise.
    fn settle(&self, k: usize) -> Vec<String> {
        let began = Instant::now();
        loop {
            let p = self.processes(k);
            if p.is_empty() || began.elapsed() > common::WAIT {
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Like [`Hosts::settle`], with process `pid` left out.
    fn settle_but(&self, k: usize, pid: i32) -> Vec<String> {
        let began = Instant::now();
        loop {
            let p: Vec<String> = self
                .pids(k)
                .into_iter()
                .filter(|(p, _)| *p != pid)
                .map(|(_, c)| c)
                .collect();
            if p.is_empty() || began.elapsed() > common::WAIT {
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, k: usize, needle: &str) -> usize {
        self.processes(k)
            .iter()
            .filter(|c| c.contains(needle) && !c.starts_with("sh -c"))
            .count()
    }

    /// Every host runs exactly one mock engine, as the OS sees it.
    #[track_caller]
    fn assert_one_engine_each(&self) {
        for k in 0..self.list.len() {
            assert_eq!(
                self.count(k, "mock-engine"),
                1,
                "host {k}: {:?}",
                self.processes(k)
            );
        }
    }
}

/// Kills what the backend started under `remote` and still runs (the `.proc` file of each
/// run dir: pid, start time, boot id), group and all. In namespaces, `down` does this too;
/// on loopback hosts it is the only cleanup.
fn kill_recorded(remote: &Path) {
    let Ok(states) = std::fs::read_dir(remote) else {
        return;
    };
    for state in states.flatten() {
        for run in std::fs::read_dir(state.path().join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(run.path().join(".proc")) else {
                continue;
            };
            let w: Vec<&str> = text.split_whitespace().collect();
            let (Some(pid), Some(start)) =
                (w.first().and_then(|p| p.parse::<i32>().ok()), w.get(1))
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ours = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(19))
                == Some(*start);
            if ours {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Every pid on this machine.
fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's command line, its words joined by spaces; `None` when it is gone.
fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim()
            .to_string(),
    )
}

/// The live (not zombie) processes of process group `pgid`, as `PID COMMAND LINE`.
fn group_members(pgid: i32) -> Vec<String> {
    all_pids()
        .into_iter()
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let w: Vec<&str> = stat
                .rsplit_once(") ")
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            w.len() > 2 && w[2] == pgid.to_string() && !matches!(w[0], "Z" | "X")
        })
        .map(|p| format!("{p} {}", cmdline(p).unwrap_or_default()))
        .collect()
}

/// The command lines on this machine that contain `needle`.
fn cmdlines_containing(needle: &str) -> Vec<String> {
    all_pids()
        .into_iter()
        .filter_map(|p| {
            let raw = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let text = String::from_utf8_lossy(&raw).replace('\0', " ");
            text.contains(needle).then_some(format!("{p}: {text}"))
        })
        .collect()
}

impl Drop for Hosts {
    fn drop(&mut self) {
        kill_recorded(&self.dir().join("remote"));
        // On loopback hosts, whatever else a session started there (namespaces go whole).
        for k in 0..self.list.len() {
            if self.list[k].netns.is_none() {
                for (p, _) in self.pids(k) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // Masters first (they are ours, in this namespace), then everything in the hosts.
        for entry in std::fs::read_dir(self.dir().join("cm"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new("ssh")
                .args([
                    "-o",
                    &format!("ControlPath={}", entry.path().display()),
                    "-O",
                    "exit",
                    "x",
                ])
                .output();
        }
        let d = path(self.dir.path()).to_string();
        if let Err(e) = script(&["down", &d, &self.tag, &self.list.len().max(1).to_string()]) {
            eprintln!("warning: removing the test hosts: {e}");
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn script(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "netns_hosts.sh {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn spec(task: &str, node: Option<&str>, argv: &[&str], service: bool, dir: &Path) -> SpawnSpec {
    SpawnSpec {
        task: task.into(),
        node: node.map(String::from),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        files: BTreeMap::new(),
        run_dir: dir.join("run").join(task),
        cwd: None,
        log: dir.join("logs").join(format!("{task}.log")),
        service,
        attempt: 0,
    }
}

/// Polls `f` until it gives `Some`, for at most `limit`.
async fn eventually<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Fut,
) -> T {
    let began = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(began.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_real_hosts_start_report_and_stop() {
    let Some(hosts) = Hosts::up(2) else { return };
    let state = hosts.dir().join("state");
    let b = hosts.backend(&state);
    let nodes = vec!["node0".to_string(), "node1".to_string()];
    let alloc = b.allocate(&nodes).await.expect("allocation");
    assert_eq!(alloc.hosts.len(), 2);

    // A one-shot on each host says which host it ran on, and its end is known at once.
    for (k, node) in nodes.iter().enumerate() {
        let mut s = spec(
            &format!("hello{k}"),
            Some(node),
            &["sh", "-c", "echo \"on $(hostname)\"; exit 3"],
            false,
            &state,
        );
        s.env.insert("ODD_VALUE".into(), "it's $HOME".into());
        let h = b.spawn(&s).await.expect("spawn");
        assert_eq!(h.backend, "ssh");
        assert_eq!(
            h.payload["host"],
            hosts.list[k].target.split(':').next().unwrap_or_default()
        );
        assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(3)));
        let log = b.log_tail(&h, 5).await.expect("log");
        if hosts.netns() {
            assert_eq!(log, format!("on {}", hosts.list[k].name));
        }
        // A later prl-flow, with only the handle, reads the recorded exit status.
        assert_eq!(
            SshBackend::from_handles().status(&h).await.expect("status"),
            ProcState::Exited(Some(3))
        );
    }

    // A service gets its files (quoting survives anything), keeps running, logs, stops.
    let mut s = spec(
        "svc",
        Some("node1"),
        &[
            "sh",
            "-c",
            "cat conf/odd.json; echo; echo \"$GREETING\"; exec sleep 300",
        ],
        true,
        &state,
    );
    let tricky = "{\"a\": 'single' \"$(touch /tmp/pwned)\" `x` \\ \n last}";
    s.files.insert("conf/odd.json".into(), tricky.into());
    s.env.insert("GREETING".into(), "hello; rm -rf /".into());
    let h = b.spawn(&s).await.expect("spawn service");
    assert_eq!(b.status(&h).await.expect("status"), ProcState::Running);
    let later = SshBackend::from_handles();
    let text = eventually("the service's log", Duration::from_secs(10), || async {
        let t = later
            .read_log(&h, 0)
            .await
            .map(|(t, _)| t)
            .unwrap_or_default();
        t.contains("hello; rm -rf /").then_some(t)
    })
    .await;
    // The log as the process wrote it, after the line that marks its attempt's start.
    assert_eq!(
        text,
        format!("── prl-flow: `svc` starts ──\n{tricky}\nhello; rm -rf /\n")
    );
    let (_, end) = later.read_log(&h, 0).await.expect("log");
    let (more, end2) = later.read_log(&h, end).await.expect("log from offset");
    assert_eq!((more.as_str(), end2), ("", end));
    assert!(!Path::new("/tmp/pwned").exists());

    // A handle whose start time is not the process's names nothing.
    let mut fake = h.clone();
    fake.payload["start"] = json!(h.payload["start"].as_u64().unwrap_or(0) + 1);
    assert_eq!(later.status(&fake).await.expect("status"), ProcState::Gone);
    later
        .stop(&fake, Duration::from_secs(1))
        .await
        .expect("stopping a stranger is a no-op");
    assert_eq!(later.status(&h).await.expect("status"), ProcState::Running);

    // Stop, from a backend made from the handle alone.
    later.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_ne!(b.status(&h).await.expect("status"), ProcState::Running);
    assert_eq!(hosts.count(1, "sleep 300"), 0, "{:?}", hosts.processes(1));

    // A task without a node runs on this machine.
    let h = b
        .spawn(&spec("here", None, &["true"], false, &state))
        .await
        .expect("local spawn");
    assert_eq!(h.backend, "local");
    assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(0)));

    // More nodes than hosts: refused with the numbers.
    let e = b
        .allocate(&["node0".into(), "node1".into(), "node2".into()])
        .await
        .expect_err("3 > 2");
    assert!(e.message.contains("needs 3 nodes but 2 hosts"), "{e}");

    b.release(&alloc).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_backend_passes_the_plugin_conformance_scenario() {
    let Some(hosts) = Hosts::up(2) else { return };
    let state = hosts.dir().join("state");
    let config = hosts.config();
    let make = || SshBackend::from_config(&config, &state).map(|b| Arc::new(b) as Arc<dyn Backend>);
    let mut lines = Vec::new();
    let summary = prl_flow_plugin::conformance(
        &make,
        &prl_flow_plugin::Scenario::default(),
        &mut |s: &prl_flow_plugin::Step| lines.push(s.line()),
    )
    .await;
    eprintln!("{}", lines.join("\n"));
    assert!(
        summary.ok(),
        "conformance failed:\n{}\n{}",
        lines.join("\n"),
        summary.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_keys_are_refused_unless_the_recipe_accepts_new_ones() {
    let Some(hosts) = Hosts::up(1) else { return };
    // The same client setup with an empty known_hosts.
    let cfg = std::fs::read_to_string(hosts.dir().join("ssh_config")).expect("ssh_config");
    let empty = hosts.dir().join("known_hosts.empty");
    std::fs::write(&empty, "").expect("write");
    let strict = cfg.replace(path(&hosts.dir().join("known_hosts")), path(&empty));
    std::fs::write(hosts.dir().join("ssh_config.strict"), strict).expect("write");
    let mut config = hosts.config();
    config["ssh_config"] = json!(hosts.dir().join("ssh_config.strict"));
    config["control_dir"] = json!(hosts.dir().join("cm2"));
    let state = hosts.dir().join("state");

    let b = SshBackend::from_config(&config, &state).expect("config");
    let e = b
        .allocate(&["node0".into()])
        .await
        .expect_err("unknown host key");
    let target = hosts.list[0]
        .target
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        e.message
            .contains(&format!("host `{}`", hosts.list[0].target)),
        "{e}"
    );
    assert!(e.message.contains("Host key verification failed"), "{e}");
    assert!(e.message.contains("accept_new_host_keys = true"), "{e}");
    assert_eq!(
        std::fs::read_to_string(&empty).expect("read"),
        "",
        "nothing was learnt silently"
    );

    config["accept_new_host_keys"] = json!(true);
    let b = SshBackend::from_config(&config, &state).expect("config");
    b.allocate(&["node0".into()]).await.expect("accepted");
    let learnt = std::fs::read_to_string(&empty).expect("read");
    assert!(learnt.contains(&target) || learnt.contains('['), "{learnt}");
    b.disconnect_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_names_the_host_and_spares_its_processes() {
    let Some(hosts) = Hosts::up(2) else { return };
    if !hosts.netns() {
        eprintln!("!!! SKIPPED: cutting a link needs network namespaces");
        return;
    }
    let state = hosts.dir().join("state");
    let b = hosts.backend(&state);
    b.allocate(&["node0".into(), "node1".into()])
        .await
        .expect("allocation");
    let h = b
        .spawn(&spec("svc", Some("node1"), &["sleep", "300"], true, &state))
        .await
        .expect("spawn");

    hosts.cut(1);
    let began = Instant::now();
    let e = b.status(&h).await.expect_err("host 1 is cut off");
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "took {:?}",
        began.elapsed()
    );
    assert!(
        e.message
            .contains(&format!("host `{}`", hosts.list[1].target)),
        "{e}"
    );
    let e = b
        .spawn(&spec("more", Some("node1"), &["true"], false, &state))
        .await
        .expect_err("cannot start on a cut host");
    assert!(e.message.contains(&hosts.list[1].target), "{e}");
    // The other host is not affected.
    let ok = b
        .spawn(&spec("other", Some("node0"), &["true"], false, &state))
        .await
        .expect("node0");
    assert_eq!(b.wait(&ok).await.expect("wait"), ProcState::Exited(Some(0)));
    // The service did not notice.
    assert_eq!(hosts.count(1, "sleep 300"), 1);

    hosts.restore(1);
    let later = SshBackend::from_handles();
    let state_now = eventually(
        "host 1 to answer again",
        Duration::from_secs(20),
        || async { later.status(&h).await.ok() },
    )
    .await;
    assert_eq!(state_now, ProcState::Running);
    later.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_eq!(hosts.count(1, "sleep 300"), 0);
}

// ---------------------------------------------------------------------------------------
// What the backend guarantees about the control directory, secrets and process groups
// (docs/ssh.md lists each with its test).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_control_dir_or_a_stray_socket_is_never_trusted() {
    use std::os::unix::fs::PermissionsExt;
    let Some(hosts) = Hosts::up(1) else { return };
    let state = hosts.dir().join("state");
    let node0 = vec!["node0".to_string()];
    let backend_in = |cm: &Path, host: Option<String>| {
        let mut c = hosts.config();
        c["control_dir"] = json!(cm);
        if let Some(h) = host {
            c["hosts"] = json!([h]);
        }
        SshBackend::from_config(&c, &state).expect("config")
    };
    let private = |name: &str| {
        let d = hosts.dir().join(name);
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        d
    };

    // A directory anyone can write, one of another user, a symbolic link: each refused,
    // naming the path and what is wrong, before ssh is ever run.
    let open = private("cm-open");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let theirs = private("cm-theirs");
    std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)).expect("chown");
    let target = private("cm-target");
    let link = hosts.dir().join("cm-link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    for (dir, what) in [
        (
            &open,
            "writable by its group or by others (mode 0777)".to_string(),
        ),
        (&theirs, "owned by uid 4242".to_string()),
        (&link, "a symbolic link".to_string()),
    ] {
        let e = backend_in(dir, None)
            .allocate(&node0)
            .await
            .expect_err("an unsafe control dir");
        assert!(
            e.message.contains(&format!("`{}`", dir.display())) && e.message.contains(&what),
            "{e}"
        );
    }
    for dir in [&open, &theirs, &target] {
        let left: Vec<_> = std::fs::read_dir(dir).expect("read").flatten().collect();
        assert!(left.is_empty(), "{dir:?}: {left:?}");
    }

    // A listening socket that is no master, where an unreachable host's master would be:
    // the host is not reported as allocated.
    let cm = private("cm-stray");
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = nobody.local_addr().expect("addr").port();
    drop(nobody);
    let b = backend_in(&cm, Some(format!("127.0.0.1:{port}")));
    let socket = b.control_path("node0").expect("control path");
    let _stray = std::os::unix::net::UnixListener::bind(&socket).expect("stray socket");
    let e = b
        .allocate(&node0)
        .await
        .expect_err("an unreachable host with a stray socket");
    assert!(e.message.contains(&format!("127.0.0.1:{port}")), "{e}");

    // The same at a reachable host's path: a master of its own replaces it, and work goes on.
    let b = backend_in(&cm, None);
    let socket = b.control_path("node0").expect("control path");
    let _stray = std::os::unix::net::UnixListener::bind(&socket).expect("stray socket");
    b.allocate(&node0).await.expect("a real master");
    let h = b
        .spawn(&spec("hello", Some("node0"), &["true"], false, &state))
        .await
        .expect("spawn");
    assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(0)));
    b.disconnect_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_values_reach_the_process_and_no_command_line() {
    let Some(hosts) = Hosts::up(1) else { return };
    let state = hosts.dir().join("state");
    let b = hosts.backend(&state);
    b.allocate(&["node0".into()]).await.expect("allocation");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let secret = format!("hf_{:x}secret{nanos:x}", std::process::id());

    // Every command line on this machine, read over and over while the spawns run.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scanner = {
        let (done, secret) = (done.clone(), secret.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                seen.extend(cmdlines_containing(&secret));
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let mut svc = spec("svc", Some("node0"), &["sleep", "4031"], true, &state);
    svc.env.insert("HF_TOKEN".into(), secret.clone());
    let h = b.spawn(&svc).await.expect("spawn service");
    // A one-shot (started in the spawn session's background) writes what it was given.
    let mut once = spec(
        "once",
        Some("node0"),
        &["sh", "-c", "printf %s \"$HF_TOKEN\" >seen"],
        false,
        &state,
    );
    once.env.insert("HF_TOKEN".into(), secret.clone());
    let o = b.spawn(&once).await.expect("spawn one-shot");
    assert_eq!(b.wait(&o).await.expect("wait"), ProcState::Exited(Some(0)));
    done.store(true, Ordering::SeqCst);
    let seen = scanner.join().expect("scanner");
    assert!(seen.is_empty(), "the value was in a command line: {seen:?}");
    assert_eq!(cmdlines_containing(&secret), Vec::<String>::new());

    let run_dir = PathBuf::from(o.payload["run_dir"].as_str().expect("run dir"));
    assert_eq!(
        std::fs::read_to_string(run_dir.join("seen")).expect("seen"),
        secret
    );
    // The service has it in its environment (readable by its user alone), and the file
    // that carried it is gone.
    let (pid, _) = hosts
        .pids(0)
        .into_iter()
        .find(|(_, c)| c == "sleep 4031")
        .expect("the service runs");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let wanted = format!("HF_TOKEN={secret}");
    assert!(environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()));
    let svc_dir = PathBuf::from(h.payload["run_dir"].as_str().expect("run dir"));
    assert!(!svc_dir.join(".env").exists());

    // A name a shell cannot export is refused before anything runs.
    let mut odd = spec("odd", Some("node0"), &["true"], false, &state);
    odd.env.insert("ODD NAME".into(), "x".into());
    let e = b.spawn(&odd).await.expect_err("not a shell name");
    assert!(e.message.contains("`ODD NAME`"), "{e}");

    b.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_eq!(hosts.count(0, "sleep 4031"), 0, "{:?}", hosts.processes(0));
}

/// The pid (= process group) of a task, from the journal.
fn recorded(state: &Path, id: &str) -> Value {
    prl_flow_engine::journal::load(state)
        .ok()
        .and_then(|r| r.get(id).and_then(|r| r.handle.clone()))
        .unwrap_or_else(|| panic!("no handle recorded for `{id}`"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_down_end_a_group_whose_leader_is_gone() {
    let Some(hosts) = Hosts::up(1) else { return };
    let state = hosts.dir().join("state");
    let b = hosts.backend(&state);
    b.allocate(&["node0".into()]).await.expect("allocation");
    // A crashed server whose workers still run: the command leaves `sleep` behind in its
    // group and ends once the file `go` appears in its run dir.
    let leaver = |n: u32| format!("sleep {n} & while [ ! -e go ]; do sleep 0.1; done");
    let wait_for_orphan = |h: &prl_flow_backend::ProcHandle, n: u32| {
        let pid = h.payload["pid"].as_i64().expect("pid") as i32;
        let run_dir = PathBuf::from(h.payload["run_dir"].as_str().expect("run dir"));
        std::fs::write(run_dir.join("go"), "").expect("go");
        let began = Instant::now();
        loop {
            let members = group_members(pid);
            let orphan = members.iter().any(|m| m.ends_with(&format!(" sleep {n}")));
            if orphan && members.len() == 1 {
                return pid;
            }
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "the leader does not end alone: {members:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Backend::stop, from a backend made from the handle alone.
    let h = b
        .spawn(&spec(
            "one",
            Some("node0"),
            &["sh", "-c", &leaver(4032)],
            true,
            &state,
        ))
        .await
        .expect("spawn");
    let pid = wait_for_orphan(&h, 4032);
    let later = SshBackend::from_handles();
    assert_ne!(later.status(&h).await.expect("status"), ProcState::Running);
    later.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_eq!(group_members(pid), Vec::<String>::new());

    // `down`, through the session API: it finds what still ran and reports it stopped.
    let mut t = task(
        "two",
        "custom",
        &[ALLOCATE],
        Some("node0"),
        Cmd::Argv {
            argv: vec!["sh".into(), "-c".into(), leaver(4033)],
        },
    );
    t.service = true;
    let plan = Plan {
        name: "orphans".into(),
        backend: "ssh".into(),
        nodes: vec!["node0".into()],
        tasks: vec![allocate_task(), t],
        ..Default::default()
    };
    let report = run_plan(
        &plan,
        Arc::new(hosts.backend(&state)),
        &state,
        false,
        false,
        None,
    )
    .await;
    assert!(report.ok(), "{}", errors(&report));
    let handle: prl_flow_backend::ProcHandle =
        serde_json::from_value(recorded(&state, "two")).expect("handle");
    let pid = wait_for_orphan(&handle, 4033);
    let mut said = Vec::new();
    let down = Session::default()
        .down(&state, &mut |id| said.push(id.to_string()))
        .await
        .expect("down");
    assert!(down.failures.is_empty(), "{:?}", down.failures);
    assert_eq!((down.stopped, said), (1, vec!["two".to_string()]));
    assert_eq!(group_members(pid), Vec::<String>::new());
    assert_eq!(hosts.count(0, "sleep 403"), 0, "{:?}", hosts.processes(0));
}

/// Starts `argv` on host `k` over plain ssh, in a session of its own, and says its pid (the
/// pid space is shared with the host). A stranger to prl-flow: no run knows it.
fn start_on(hosts: &Hosts, k: usize, argv: &[&str]) -> Stranger {
    let (host, port) = match hosts.list[k].target.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.to_string()),
        None => (hosts.list[k].target.clone(), "22".to_string()),
    };
    let words: Vec<String> = argv
        .iter()
        .map(|a| shlex::try_quote(a).expect("quote").into_owned())
        .collect();
    let remote = format!(
        "setsid {} </dev/null >/dev/null 2>&1 & echo $!",
        words.join(" ")
    );
    let out = Command::new("ssh")
        .arg("-F")
        .arg(hosts.dir().join("ssh_config"))
        .args(["-o", "BatchMode=yes", "-p", &port, &host, &remote])
        .output()
        .expect("ssh");
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text.trim().parse().unwrap_or_else(|_| {
        panic!(
            "no pid from host {k}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Stranger(pid)
}

/// A process started by [`start_on`]; killed on drop.
struct Stranger(i32);

impl Stranger {
    fn alive(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).unwrap_or_default();
        stat.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z') && !r.starts_with('X'))
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits until something accepts connections at `addr:port`.
fn wait_listening(addr: &str, port: u16) {
    let began = Instant::now();
    let to: std::net::SocketAddr = format!("{addr}:{port}").parse().expect("address");
    while std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "nothing listens at {to}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_tells_a_services_own_listener_from_a_strangers_on_the_host() {
    let Some(hosts) = Hosts::up(1) else { return };
    let state = hosts.dir().join("state");
    let b = hosts.backend(&state);
    let alloc = b.allocate(&["node0".into()]).await.expect("allocation");
    let addr = alloc.hosts["node0"].clone();
    let base = common::free_port_block(3);
    let (its, taken, free) = (base, base + 1, base + 2);
    let engine = common::mock_engine();
    // A stranger on a wildcard address; then the service: an engine that its leader leaves
    // behind in the group once the file `go` appears in the run dir.
    let stranger = start_on(
        &hosts,
        0,
        &[&engine, "--host", "0.0.0.0", "--port", &taken.to_string()],
    );
    wait_listening(&addr, taken);
    let found = b
        .ports_taken(Some("node0"), &addr, &[its, taken, free])
        .await
        .expect("ports")
        .expect("the ssh backend can tell");
    let want = format!("pid {} (", stranger.0);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].port, taken);
    assert!(
        found[0]
            .holder
            .as_deref()
            .is_some_and(|h| h.starts_with(&want)),
        "{found:?}"
    );

    let cmd = format!(
        "{} --host {addr} --port {its} & while [ ! -e go ]; do sleep 0.1; done",
        shlex::try_quote(&engine).expect("quote")
    );
    let h = b
        .spawn(&spec(
            "svc",
            Some("node0"),
            &["sh", "-c", &cmd],
            true,
            &state,
        ))
        .await
        .expect("spawn");
    wait_listening(&addr, its);
    let later = SshBackend::from_handles();
    assert_eq!(
        later.listener(&h, &addr, its).await.expect("listener"),
        prl_flow_backend::Listener::Ours
    );
    assert_eq!(
        later.listener(&h, &addr, free).await.expect("listener"),
        prl_flow_backend::Listener::Nobody
    );
    match later.listener(&h, &addr, taken).await.expect("listener") {
        prl_flow_backend::Listener::Other(who) => assert!(who.starts_with(&want), "{who}"),
        other => panic!("{other:?}"),
    }
    // A handle whose start time is not the leader's names no group (the pid is
    // another process's now): the engine is a stranger to it.
    let mut fake = h.clone();
    fake.payload["start"] = json!(h.payload["start"].as_u64().unwrap_or(0) + 1);
    assert!(matches!(
        later.listener(&fake, &addr, its).await.expect("listener"),
        prl_flow_backend::Listener::Other(_)
    ));
    // The port is taken now, by the service.
    let found = b
        .ports_taken(Some("node0"), &addr, &[its])
        .await
        .expect("ports")
        .expect("the ssh backend can tell");
    assert_eq!(found.len(), 1, "{found:?}");

    // The leader ends; the engine it left in the group still counts as the service's.
    let pid = h.payload["pid"].as_i64().expect("pid") as i32;
    let run_dir = PathBuf::from(h.payload["run_dir"].as_str().expect("run dir"));
    std::fs::write(run_dir.join("go"), "").expect("go");
    let began = Instant::now();
    while later.status(&h).await.expect("status") == ProcState::Running {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the leader runs on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(group_members(pid).len(), 1, "{:?}", group_members(pid));
    assert_eq!(
        later.listener(&h, &addr, its).await.expect("listener"),
        prl_flow_backend::Listener::Ours
    );

    later.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_eq!(group_members(pid), Vec::<String>::new());
    assert!(stranger.alive(), "the stranger was stopped");
    b.release(&alloc).await.expect("release");
}

// ---------------------------------------------------------------------------------------
// A deployment through the engine: the library-level twin of
// `prl-flow run recipes/local/multi_node.toml` on three ssh hosts.

fn router_program() -> Option<PathBuf> {
    common::router_or_skip()
}

fn task(id: &str, kind: &str, needs: &[&str], node: Option<&str>, command: Cmd) -> TaskSpec {
    TaskSpec {
        id: id.into(),
        kind: kind.into(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
        node: node.map(String::from),
        command,
        ..Default::default()
    }
}

/// The plan's `allocate` task.
fn allocate_task() -> TaskSpec {
    task(
        ALLOCATE,
        ALLOCATE,
        &[],
        None,
        Cmd::Builtin {
            action: Action::Allocate,
            args: Value::Null,
        },
    )
}

fn http_ready(url: String) -> Option<Readiness> {
    let mut r = Readiness::new(Probe::Http { url });
    r.interval = Duration::from_millis(100);
    r.ready_timeout = Some(Duration::from_secs(90));
    Some(r)
}

/// allocate → engine on each node → router on node0 → health probe (one completion).
/// `slow` engines take that long to become ready.
fn multi_node_plan(nodes: usize, router: &Path, slow: &[(usize, &str)]) -> Plan {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_prl-flow"))
        .with_file_name("prl-flow-mock-engine")
        .to_string_lossy()
        .into_owned();
    let node_names: Vec<String> = (0..nodes).map(|k| format!("node{k}")).collect();
    let mut tasks = vec![allocate_task()];
    let mut engines = Vec::new();
    for (k, node) in node_names.iter().enumerate() {
        let host = format!("${{host:{node}}}");
        let id = format!("engine{k}");
        let mut t = task(
            &id,
            "engine",
            &[ALLOCATE],
            Some(node),
            Cmd::Argv {
                argv: vec![
                    bin.clone(),
                    "--host".into(),
                    host.clone(),
                    "--port".into(),
                    "18110".into(),
                ],
            },
        );
        t.service = true;
        t.ready = http_ready(format!("http://{host}:18110/health"));
        t.files = vec![FileSpec {
            path: "conf/engine.json".into(),
            content: format!("{{\"node\": \"{node}\"}}\n"),
        }];
        if let Some((_, d)) = slow.iter().find(|(i, _)| *i == k) {
            t.env.insert("PRL_MOCK_STARTUP_DELAY".into(), d.to_string());
        }
        tasks.push(t);
        engines.push(id);
    }
    let mut argv = vec![
        router.to_string_lossy().into_owned(),
        "--host".into(),
        "${host:node0}".into(),
        "--port".into(),
        "18010".into(),
        "--prometheus-port".into(),
        "18910".into(),
        "--policy".into(),
        "round_robin".into(),
        "--worker-startup-check-interval".into(),
        "1".into(),
        "--worker-startup-timeout-secs".into(),
        "60".into(),
        "--health-check-interval-secs".into(),
        "5".into(),
        "--worker-urls".into(),
    ];
    argv.extend(
        node_names
            .iter()
            .map(|n| format!("http://${{host:{n}}}:18110")),
    );
    let needs: Vec<&str> = engines.iter().map(String::as_str).collect();
    let mut r = task(
        "router",
        "router",
        &needs,
        Some("node0"),
        Cmd::Argv { argv },
    );
    r.service = true;
    r.ready = http_ready("http://${host:node0}:18010/readiness".into());
    tasks.push(r);
    tasks.push(task(
        "health",
        "health-probe",
        &["router"],
        None,
        Cmd::Builtin {
            action: Action::HealthProbe,
            args: json!({ "router": "http://${host:node0}:18010", "model": "Qwen/Qwen3-0.6B" }),
        },
    ));
    Plan {
        name: "multi_node".into(),
        backend: "ssh".into(),
        nodes: node_names,
        tasks,
        ..Default::default()
    }
}

/// Task durations as the engine reports them.
#[derive(Default)]
struct Durations(Mutex<BTreeMap<String, Duration>>);

impl Subscriber for Durations {
    fn on_event(&self, e: &Event) {
        if let Event::Finished {
            id,
            duration,
            outcome: Outcome::Done,
            ..
        } = e
        {
            if let Ok(mut m) = self.0.lock() {
                m.insert(id.to_string(), *duration);
            }
        }
    }
}

/// `prl-flow run [--resume]`, through the session API the CLI uses.
async fn run_plan(
    plan: &Plan,
    backend: Arc<dyn Backend>,
    dir: &Path,
    resume: bool,
    keep: bool,
    durations: Option<Arc<Durations>>,
) -> Report {
    let settings = RunSettings {
        jobs: Some(64),
        keep,
        resume,
        holder: "tests/ssh.rs".into(),
        ..RunSettings::default()
    };
    let prepared = session::run::prepare(plan, backend, dir, &settings)
        .await
        .expect("prepare the run");
    let mut subs: Vec<Arc<dyn Subscriber>> = Vec::new();
    if let Some(d) = durations {
        subs.push(d);
    }
    prepared
        .execute(subs, prl_flow_engine::Cancel::never())
        .await
        .expect("run")
        .report
}

/// `prl-flow down`, through the session API the CLI uses: every recorded process, last
/// started first, with a backend rebuilt from the journal alone.
async fn down(dir: &Path) {
    let report = Session::default()
        .down(dir, &mut |_| {})
        .await
        .expect("down");
    assert!(
        report.failures.is_empty(),
        "down failed: {:?}",
        report.failures
    );
}

fn errors(r: &Report) -> String {
    r.errors
        .iter()
        .flatten()
        .map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `log` probe reads the log where the process writes it, on its host, and only the
/// attempt's own lines: a service started again whose new process never prints its ready
/// line is not ready because the old one printed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_probe_reads_the_log_on_the_host_and_of_the_attempt_alone() {
    let Some(hosts) = Hosts::up(1) else { return };
    let state = hosts.dir().join("state");
    let again = shlex::try_quote(path(&hosts.dir().join("again")))
        .expect("quote")
        .into_owned();
    let mut s = task(
        "s",
        "custom",
        &[ALLOCATE],
        Some("node0"),
        Cmd::Argv {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "if [ -e {again} ]; then echo 'second attempt'; \
                     else touch {again}; echo up; fi; exec sleep 300"
                ),
            ],
        },
    );
    s.service = true;
    let mut ready = Readiness::new(Probe::Log {
        regex: "^up$".into(),
    });
    ready.interval = Duration::from_millis(50);
    ready.ready_timeout = Some(Duration::from_secs(3));
    s.ready = Some(ready);
    let allocate = allocate_task();
    let plan = Plan {
        name: "log_probe".into(),
        backend: "ssh".into(),
        nodes: vec!["node0".into()],
        tasks: vec![allocate, s],
        ..Default::default()
    };
    let backend: Arc<dyn Backend> = Arc::new(hosts.backend(&state));
    let report = run_plan(&plan, backend.clone(), &state, false, false, None).await;
    assert!(report.ok(), "{}", errors(&report));
    let first = recorded(&state, "s")["payload"]["pid"]
        .as_i64()
        .expect("pid") as i32;
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill s");
    let report = run_plan(&plan, backend, &state, true, false, None).await;
    let msg = errors(&report);
    assert!(!report.ok(), "ready on the first attempt's line");
    assert!(msg.contains("`s` on node0"), "{msg}");
    assert!(msg.contains("was not ready after 3s"), "{msg}");
    // What the failure quotes is the second attempt's log alone, named where it is: on
    // the host.
    let h = recorded(&state, "s");
    let at = format!(
        "last lines of {}:{}:",
        h["payload"]["host"].as_str().expect("host"),
        h["payload"]["log"].as_str().expect("log")
    );
    assert!(msg.contains(&at), "no `{at}` in: {msg}");
    assert!(msg.contains("second attempt"), "{msg}");
    assert!(!msg.contains("\n    up"), "{msg}");
    down(&state).await;
    assert_eq!(hosts.settle(0), Vec::<String>::new(), "host after down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_node_on_three_hosts_survives_a_cut_link_and_resumes_without_duplicates() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(3) else { return };
    let state = hosts.dir().join("state");
    let backend: Arc<dyn Backend> = Arc::new(hosts.backend(&state));

    // 1. Up: three mock engines and the real router, healthy (one completion through it).
    let plan = multi_node_plan(3, &router, &[]);
    let report = run_plan(&plan, backend.clone(), &state, false, false, None).await;
    assert!(report.ok(), "{}", errors(&report));
    hosts.assert_one_engine_each();
    assert_eq!(hosts.count(0, "router"), 1, "{:?}", hosts.processes(0));
    down(&state).await;
    for k in 0..3 {
        assert_eq!(hosts.settle(k), Vec::<String>::new(), "host {k} after down");
    }

    if !hosts.netns() {
        eprintln!("!!! SKIPPED: the link-cut half of this test needs network namespaces");
        return;
    }
    // 2. A fresh bring-up, with `--keep`, in which host 2's engine is slow to load and a
    // sidecar service on host 2 is up at once; host 2's link is cut while its engine loads.
    // The run fails, naming that host.
    let mut plan = multi_node_plan(3, &router, &[(2, "5s")]);
    let mut sidecar = task(
        "sidecar2",
        "custom",
        &[ALLOCATE],
        Some("node2"),
        Cmd::Argv {
            argv: vec!["sleep".into(), "600".into()],
        },
    );
    sidecar.service = true;
    plan.tasks.insert(1, sidecar);
    let cutter = {
        let tag = hosts.tag.clone();
        let dir = state.clone();
        tokio::spawn(async move {
            // Cut once the engine of host 2 has started (it loads for 5 s) and the sidecar
            // and the other two engines are up (what the resume is to keep).
            let began = Instant::now();
            while began.elapsed() < Duration::from_secs(60) {
                let records = prl_flow_engine::journal::load(&dir).unwrap_or_default();
                let engine = records
                    .get("engine2")
                    .is_some_and(|r| r.status == Status::Running && r.handle.is_some());
                let up = ["sidecar2", "engine0", "engine1"]
                    .iter()
                    .all(|id| records.get(*id).is_some_and(|r| r.status == Status::Done));
                if engine && up {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            script(&["cut", &tag, "2"]).expect("cut");
        })
    };
    let report = run_plan(&plan, backend.clone(), &state, false, true, None).await;
    cutter.await.expect("cutter");
    assert!(!report.ok());
    let msg = errors(&report);
    assert!(
        msg.contains(&format!("host `{}`", hosts.list[2].target)),
        "{msg}"
    );
    // What runs on the cut host still runs: a lost connection kills nothing.
    assert_eq!(hosts.count(2, "mock-engine"), 1, "{:?}", hosts.processes(2));
    assert_eq!(hosts.count(2, "sleep 600"), 1, "{:?}", hosts.processes(2));
    let pid_of = |id: &str| {
        prl_flow_engine::journal::load(&state)
            .ok()
            .and_then(|r| r.get(id).and_then(|r| r.handle.clone()))
            .and_then(|h| h["payload"]["pid"].as_i64())
    };
    let before: Vec<_> = ["sidecar2", "engine0", "engine1"].map(pid_of).to_vec();
    assert!(before.iter().all(Option::is_some), "{before:?}");

    // 3. The link is back: --resume reattaches to what still runs (the sidecar on the cut
    // host, the engines that were up), replaces the engine whose start failed, and completes
    // with one engine per host and one router.
    hosts.restore(2);
    hosts.wait_reachable(2);
    // A new prl-flow process: a new backend, from the recipe's config.
    let backend: Arc<dyn Backend> = Arc::new(hosts.backend(&state));
    let report = run_plan(&plan, backend.clone(), &state, true, false, None).await;
    assert!(report.ok(), "{}", errors(&report));
    assert_eq!(
        report.summary.kept, 4,
        "allocate, sidecar2, engine0, engine1"
    );
    let after: Vec<_> = ["sidecar2", "engine0", "engine1"].map(pid_of).to_vec();
    assert_eq!(before, after, "reattached, not restarted");
    hosts.assert_one_engine_each();
    assert_eq!(hosts.count(2, "sleep 600"), 1, "{:?}", hosts.processes(2));
    assert_eq!(hosts.count(0, "router"), 1, "{:?}", hosts.processes(0));

    // 4. Down leaves nothing on any host.
    down(&state).await;
    for k in 0..3 {
        assert_eq!(hosts.settle(k), Vec::<String>::new(), "host {k} after down");
    }
}

// ---------------------------------------------------------------------------------------
// The same through the binary. The recipe is tests/fixtures/ssh/multi_node.toml with this test's hosts.

/// tests/fixtures/ssh/multi_node.toml with these hosts filled in (`@ENGINE_ENV@` left for
/// the test).
fn multi_node_recipe(hosts: &Hosts) -> String {
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ssh/multi_node.toml"
    ))
    .expect("fixture");
    let list: Vec<String> = hosts
        .list
        .iter()
        .map(|h| format!("\"{}\"", h.target))
        .collect();
    fixture
        .replace("@HOSTS@", &format!("[{}]", list.join(", ")))
        .replace("@SSH_CONFIG@", path(&hosts.dir().join("ssh_config")))
        .replace("@CONTROL_DIR@", path(&hosts.dir().join("cm")))
        .replace("@REMOTE_DIR@", path(&hosts.dir().join("remote")))
}

/// `watch` on ssh hosts: an engine killed on its host is taken out of the router, restarted
/// there and registered again; the router (on the first host) keeps its process.
#[test]
fn watch_restarts_an_engine_killed_on_its_host() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(3) else { return };
    let recipe = multi_node_recipe(&hosts).replace("@ENGINE_ENV@", "restart_backoff = \"100ms\"");
    let file = hosts.dir().join("watched.toml");
    std::fs::write(&file, recipe).expect("recipe");
    let state = hosts.dir().join("state-watch");
    let (f, r) = (path(&file), path(&router));
    let run = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["run", f, "--engine", "mock", "--router", r, "--state-dir"])
        .arg(&state)
        .env("PRL_FLOW_ROUTER", &router)
        .output()
        .expect("run");
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let pid_of = |id: &str| {
        prl_flow_engine::journal::load(&state)
            .ok()
            .and_then(|r| r.get(id).and_then(|r| r.handle.clone()))
            .and_then(|h| h["payload"]["pid"].as_i64())
    };
    let watch_err = hosts.dir().join("watch.stderr");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["watch", f, "--state-dir"])
        .arg(&state)
        .env("PRL_FLOW_ROUTER", &router)
        .stderr(std::fs::File::create(&watch_err).expect("stderr file"))
        .spawn()
        .expect("watch");
    let victim = "engine[2].rank[0]";
    let router_pid = pid_of("router").expect("router pid");
    let pid = pid_of(victim).expect("engine pid");
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let heal_log = || std::fs::read_to_string(state.join("logs/heal.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !heal_log().contains(&format!("restarted `{victim}`")) {
        assert!(
            Instant::now() < deadline,
            "the engine is not back after 60 s; watch said:\n{}",
            std::fs::read_to_string(&watch_err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        heal_log().contains(&format!("`{victim}` taken out of")),
        "{}",
        heal_log()
    );
    assert_ne!(pid_of(victim), Some(pid));
    assert_eq!(
        pid_of("router"),
        Some(router_pid),
        "the router was replaced"
    );
    hosts.assert_one_engine_each();
    let _ = Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status();
    let _ = watch.wait();
    let down = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["down", f, "--state-dir"])
        .arg(&state)
        .output()
        .expect("down");
    assert_eq!(down.status.code(), Some(0));
    for k in 0..3 {
        assert_eq!(hosts.settle(k), Vec::<String>::new(), "host {k} after down");
    }
}

#[test]
fn cli_multi_node_recipe_on_three_hosts_cut_resume_down() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(3) else { return };
    let recipe = multi_node_recipe(&hosts);
    let file = hosts.dir().join("multi_node.toml");
    let slow_file = hosts.dir().join("multi_node_slow.toml");
    std::fs::write(&file, recipe.replace("@ENGINE_ENV@", "")).expect("recipe");
    // The engines' environment is the remote one: a slow start must be in the recipe.
    let slow_env = "[inference.deployment.env]\nPRL_MOCK_STARTUP_DELAY = \"5s\"";
    std::fs::write(&slow_file, recipe.replace("@ENGINE_ENV@", slow_env)).expect("recipe");
    // One state dir per recipe file: a state dir belongs to the file that first ran in it.
    let state = hosts.dir().join("state");
    let slow_state = hosts.dir().join("state-slow");
    let prl_in = |state: &Path, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
            .args(args)
            .arg("--state-dir")
            .arg(state)
            .env("PRL_FLOW_ROUTER", &router)
            .output()
            .expect("prl-flow");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let prl = |args: &[&str]| prl_in(&state, args);
    let f = path(&file);
    let r = path(&router);

    let (code, err) = prl(&["run", f, "--engine", "mock", "--router", r]);
    assert_eq!(code, Some(0), "{err}");
    hosts.assert_one_engine_each();
    let (code, err) = prl(&["down", f]);
    assert_eq!(code, Some(0), "{err}");
    for k in 0..3 {
        assert_eq!(hosts.settle(k), Vec::<String>::new(), "host {k} after down");
    }
    if !hosts.netns() {
        eprintln!("!!! SKIPPED: the link-cut half of this test needs network namespaces");
        return;
    }

    // Cut host 2 while the run is in flight (its engine loads for 5 s): the run fails,
    // naming it.
    let f = path(&slow_file);
    let prl = |args: &[&str]| prl_in(&slow_state, args);
    let state = &slow_state;
    let child = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["run", f, "--engine", "mock", "--router", r, "--state-dir"])
        .arg(state)
        .env("PRL_FLOW_ROUTER", &router)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // Cut once the journal records host 2's engine as started (it then loads for 5 s).
    let began = Instant::now();
    loop {
        let records = prl_flow_engine::journal::load(state).unwrap_or_default();
        let started = records.values().any(|r| {
            r.kind == "engine"
                && r.status == Status::Running
                && r.handle
                    .as_ref()
                    .is_some_and(|h| h["payload"]["node"] == "node2")
        });
        if started {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "host 2's engine never started: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    hosts.cut(2);
    let out = child.wait_with_output().expect("run ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&hosts.list[2].target), "{err}");
    // Its engine could not be stopped over the cut link, and the run does not say otherwise.
    assert!(
        err.contains("it could not be stopped and may still run")
            && err.contains("engine[2].rank[0] may still run; `prl-flow down"),
        "{err}"
    );
    // While host 2 cannot be asked, a fresh run is refused: it would forget what may still
    // run there.
    let (code, err) = prl(&["run", f, "--engine", "mock", "--router", r]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("its backend could not tell whether it still runs")
            && err.contains("gone for good"),
        "{err}"
    );

    hosts.restore(2);
    hosts.wait_reachable(2);
    let (code, err) = prl(&["run", f, "--engine", "mock", "--router", r, "--resume"]);
    assert_eq!(code, Some(0), "{err}");
    hosts.assert_one_engine_each();
    let (code, err) = prl(&["logs", "router", "--file", f]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = prl(&["down", f]);
    assert_eq!(code, Some(0), "{err}");
    for k in 0..3 {
        assert_eq!(hosts.settle(k), Vec::<String>::new(), "host {k} after down");
    }
}

/// `tests/fixtures/ssh/multi_node.toml` on `hosts` as one node, its ports free ones from
/// `base` (backend, router, router metrics) and `engine_env` in its place; and the path of
/// the recipe written.
fn one_node_recipe(hosts: &Hosts, base: u16, engine_env: &str) -> PathBuf {
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ssh/multi_node.toml"
    ))
    .expect("fixture");
    let recipe = fixture
        .replace("num_nodes = 3", "num_nodes = 1")
        .replace("backend_port = 18110", &format!("backend_port = {base}"))
        .replace(
            "router_port = 18010",
            &format!("router_port = {}", base + 1),
        )
        .replace(
            "router_metrics_port = 18910",
            &format!("router_metrics_port = {}", base + 2),
        )
        .replace("@HOSTS@", &format!("[\"{}\"]", hosts.list[0].target))
        .replace("@SSH_CONFIG@", path(&hosts.dir().join("ssh_config")))
        .replace("@CONTROL_DIR@", path(&hosts.dir().join("cm")))
        .replace("@REMOTE_DIR@", path(&hosts.dir().join("remote")))
        .replace("@ENGINE_ENV@", engine_env);
    let file = hosts.dir().join("one_node.toml");
    std::fs::write(&file, recipe).expect("recipe");
    file
}

/// The address of host `k` (what `${host:node0}` becomes).
fn address(hosts: &Hosts, k: usize) -> String {
    let t = &hosts.list[k].target;
    t.rsplit_once(':').map_or(t.clone(), |(h, _)| h.to_string())
}

#[test]
fn cli_a_port_taken_on_the_host_fails_the_start_naming_the_port_and_its_holder() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(1) else { return };
    let base = common::free_port_block(3);
    let file = one_node_recipe(&hosts, base, "");
    let addr = address(&hosts, 0);
    // Another process holds the engine's port on the host, at every address.
    let engine = common::mock_engine();
    let stranger = start_on(
        &hosts,
        0,
        &[&engine, "--host", "0.0.0.0", "--port", &base.to_string()],
    );
    wait_listening(&addr, base);
    let state = hosts.dir().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["run", path(&file), "--engine", "mock", "--router"])
        .arg(&router)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("prl-flow");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "port {base} is already in use (set by [inference.deployment] backend_port), held by pid {} (",
        stranger.0
    );
    assert!(err.contains(&want), "no `{want}` in:\n{err}");
    // Nothing started: the host runs the stranger alone, and the journal holds no handle.
    assert_eq!(hosts.settle_but(0, stranger.0), Vec::<String>::new());
    let records = prl_flow_engine::journal::load(&state).unwrap_or_default();
    assert!(
        records
            .values()
            .all(|r| r.kind == ALLOCATE || r.handle.is_none()),
        "{records:?}"
    );
    assert!(stranger.alive(), "the stranger was stopped");
    let (code, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
            .args(["down", path(&file), "--state-dir"])
            .arg(&state)
            .output()
            .expect("down");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{err}");
    assert!(stranger.alive(), "down stopped the stranger");
}

/// The preflight asks the host, not this machine: a launcher on prl-flow's own `PATH` but not
/// on the `PATH` of an ssh session on the host fails the run before anything starts there,
/// naming the node, its address, the program and the fix.
#[test]
fn cli_a_launcher_missing_on_the_host_fails_before_anything_starts() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(1) else { return };
    let base = common::free_port_block(3);
    let file = one_node_recipe(&hosts, base, "");
    let text = std::fs::read_to_string(&file).expect("recipe");
    let text = text.replacen(
        "[inference]\n",
        "[inference]\nlauncher = [\"prl-flow-test-engine\", \"serve\"]\n",
        1,
    );
    std::fs::write(&file, text).expect("recipe");
    // Here, the launcher is on PATH (and works: it is the mock engine).
    let bin = hosts.dir().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::os::unix::fs::symlink(common::mock_engine(), bin.join("prl-flow-test-engine"))
        .expect("link");
    let local_path = format!(
        "{}:{}",
        path(&bin),
        std::env::var("PATH").unwrap_or_default()
    );
    let state = hosts.dir().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["run", path(&file), "--router"])
        .arg(&router)
        .arg("--state-dir")
        .arg(&state)
        .env("PATH", local_path)
        .output()
        .expect("prl-flow");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "node0 ({}): `prl-flow-test-engine` is not on PATH",
        address(&hosts, 0)
    );
    assert!(err.contains(&want), "no `{want}` in:\n{err}");
    assert!(err.contains("--engine mock"), "{err}");
    // The router's program is on the host: only the launcher is named.
    assert!(!err.contains("vllm-router` is not"), "{err}");
    // Nothing started: the host runs nothing of the plan, the journal holds no handle.
    assert_eq!(hosts.settle_but(0, 0), Vec::<String>::new());
    let records = prl_flow_engine::journal::load(&state).unwrap_or_default();
    assert!(records.values().all(|r| r.handle.is_none()), "{records:?}");
}

#[test]
fn cli_a_probe_answered_by_another_process_on_the_host_does_not_make_a_service_ready() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(1) else { return };
    let base = common::free_port_block(3);
    // The engine never binds its port.
    let file = one_node_recipe(
        &hosts,
        base,
        "[inference.deployment.env]\nPRL_MOCK_FAIL = \"hang\"",
    );
    let addr = address(&hosts, 0);
    let state = hosts.dir().join("state");
    let run = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
        .args(["run", path(&file), "--engine", "mock", "--router"])
        .arg(&router)
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // Once the journal records the engine as started, a stranger answers on its port.
    let began = Instant::now();
    let engine_id = loop {
        let records = prl_flow_engine::journal::load(&state).unwrap_or_default();
        let started = records
            .iter()
            .find(|(_, r)| r.kind == "engine" && r.status == Status::Running && r.handle.is_some());
        if let Some((id, _)) = started {
            break id.clone();
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "the engine never started: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let engine = common::mock_engine();
    let stranger = start_on(
        &hosts,
        0,
        &[&engine, "--host", &addr, "--port", &base.to_string()],
    );
    let out = run.wait_with_output().expect("run ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "`{engine_id}` on node0 ({addr}) is not what answers on port {base}: pid {} (",
        stranger.0
    );
    assert!(err.contains(&want), "no `{want}` in:\n{err}");
    // Ours is stopped; the stranger is left alone.
    assert_eq!(hosts.settle_but(0, stranger.0), Vec::<String>::new());
    assert!(stranger.alive(), "the stranger was stopped");
}

// ---------------------------------------------------------------------------------------
// Benchmarks (docs/benchmarks.md, "SSH fan-out"):
//
//   cargo test --release --test ssh -- --ignored --nocapture bench_
//
// They need `pdsh` (Debian package `pdsh`) besides sshd.

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// CPU time used by this process and everything it starts (the sshd hosts, their sessions,
/// ssh clients, pdsh), from a cgroup v1 `cpuacct` group of its own: unlike wall-clock time,
/// it does not depend on what else the machine runs. `None` where there is no such cgroup.
struct CpuMeter {
    dir: PathBuf,
}

impl CpuMeter {
    fn new() -> Option<Self> {
        let root = Path::new("/sys/fs/cgroup/cpuacct");
        let dir = root.join(format!("prl-flow-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).ok()?;
        Some(Self { dir })
    }

    fn used(&self) -> Duration {
        let ns = std::fs::read_to_string(self.dir.join("cpuacct.usage"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Duration::from_nanos(ns)
    }
}

impl Drop for CpuMeter {
    fn drop(&mut self) {
        let _ = std::fs::write(
            "/sys/fs/cgroup/cpuacct/cgroup.procs",
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// N one-shots `hostname`, one per node: a workflow of N tasks; with `allocate` first, as a
/// deployment starts (it connects to every host before anything runs).
fn fanout_plan(n: usize, allocate: bool) -> Plan {
    let mut tasks = Vec::new();
    if allocate {
        tasks.push(allocate_task());
    }
    let needs: &[&str] = if allocate { &[ALLOCATE] } else { &[] };
    for k in 0..n {
        tasks.push(task(
            &format!("hostname{k}"),
            "custom",
            needs,
            Some(&format!("node{k}")),
            Cmd::Argv {
                argv: vec!["hostname".into()],
            },
        ));
    }
    Plan {
        name: "fanout".into(),
        backend: "ssh".into(),
        nodes: (0..n).map(|k| format!("node{k}")).collect(),
        tasks,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_fanout_against_pdsh() {
    const REPEAT: usize = 7;
    // Before the hosts start, so that their sshd and sessions are counted too.
    let cpu = CpuMeter::new();
    let used = || cpu.as_ref().map(CpuMeter::used).unwrap_or_default();
    let Some(hosts) = Hosts::up(32) else { return };
    let cfg = hosts.dir().join("ssh_config");
    let mut rows = Vec::new();
    for n in [2usize, 4, 8, 16, 32] {
        let targets: Vec<String> = hosts.list[..n].iter().map(|h| h.target.clone()).collect();
        // Rounds of pdsh, then prl-flow cold (no master yet: a control dir of its own), cold
        // with allocate, and warm (the masters the first prl-flow run left), so that whatever
        // else the machine does falls on all alike. Wall-clock and CPU time of each.
        let mut wall: [Vec<Duration>; 4] = Default::default();
        let mut cpu_time: [Vec<Duration>; 4] = Default::default();
        for rep in 0..REPEAT {
            let (c0, began) = (used(), Instant::now());
            let out = Command::new("pdsh")
                .args([
                    "-R",
                    "ssh",
                    "-f",
                    "64",
                    "-w",
                    &targets.join(","),
                    "hostname",
                ])
                .env(
                    "PDSH_SSH_ARGS_APPEND",
                    format!("-F {} -o BatchMode=yes", cfg.display()),
                )
                .output()
                .expect("pdsh (apt-get install pdsh)");
            wall[0].push(began.elapsed());
            cpu_time[0].push(used() - c0);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), n);

            for (i, allocate) in [(1, false), (2, true), (3, false)] {
                let mut config = hosts.config();
                let cm = if i == 3 { 1 } else { i };
                config["control_dir"] = json!(hosts.dir().join(format!("cm{n}-{rep}-{cm}")));
                let state = hosts.dir().join(format!("state{n}-{rep}-{i}"));
                let b = Arc::new(SshBackend::from_config(&config, &state).expect("config"));
                let (c0, began) = (used(), Instant::now());
                let plan = fanout_plan(n, allocate);
                let r = run_plan(&plan, b.clone(), &state, false, false, None).await;
                wall[i].push(began.elapsed());
                cpu_time[i].push(used() - c0);
                assert!(r.ok(), "{}", errors(&r));
                if i >= 2 {
                    b.disconnect_all().await;
                }
            }
        }
        rows.push((n, wall.map(median), cpu_time.map(median)));
    }
    // (wall-clock, CPU time) medians of pdsh, cold, cold with allocate, warm.
    type Medians = ([Duration; 4], [Duration; 4]);
    let table = |title: &str, pick: &dyn Fn(&Medians) -> [Duration; 4]| {
        println!("\n{title}, median of {REPEAT}:");
        println!("| hosts | pdsh (ms) | prl-flow (ms) | / pdsh | with allocate (ms) | / pdsh | warm (ms) | / pdsh |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (n, w, c) in &rows {
            let [p, cold, alloc, warm] = pick(&(*w, *c));
            let r = |x: Duration| x.as_secs_f64() / p.as_secs_f64().max(1e-9);
            println!(
                "| {n} | {} | {} | {:.2} | {} | {:.2} | {} | {:.2} |",
                ms(p),
                ms(cold),
                r(cold),
                ms(alloc),
                r(alloc),
                ms(warm),
                r(warm)
            );
        }
    };
    table("Wall-clock", &|(w, _)| *w);
    if cpu.is_some() {
        table("CPU time of everything involved (both ends)", &|(_, c)| *c);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_multi_node_bring_up_against_its_critical_path() {
    const REPEAT: usize = 5;
    let Some(router) = router_program() else {
        eprintln!("no vllm-router: skipped");
        return;
    };
    let Some(hosts) = Hosts::up(3) else { return };
    println!("| engine load time | bring-up (ms) | critical path (ms) | overhead |");
    println!("|---|---:|---:|---:|");
    for delay in ["0s", "2s"] {
        let slow: Vec<(usize, &str)> = (0..3).map(|k| (k, delay)).collect();
        let plan = multi_node_plan(3, &router, &slow);
        let (mut walls, mut paths) = (Vec::new(), Vec::new());
        for rep in 0..REPEAT {
            let state = hosts.dir().join(format!("bring-up-{delay}-{rep}"));
            let b: Arc<dyn Backend> = Arc::new(hosts.backend(&state));
            let d = Arc::new(Durations::default());
            let began = Instant::now();
            let r = run_plan(&plan, b, &state, false, false, Some(d.clone())).await;
            let wall = began.elapsed();
            assert!(r.ok(), "{}", errors(&r));
            // The longest chain of task durations through the graph.
            let dur = d.0.lock().map(|m| m.clone()).unwrap_or_default();
            let mut finish: BTreeMap<String, Duration> = BTreeMap::new();
            for t in &plan.tasks {
                let start = t.needs.iter().map(|n| finish[n]).max().unwrap_or_default();
                finish.insert(t.id.clone(), start + dur[&t.id]);
            }
            paths.push(finish.values().copied().max().unwrap_or_default());
            walls.push(wall);
            down(&state).await;
        }
        let (w, p) = (median(walls), median(paths));
        println!(
            "| {delay} | {} | {} | {:+.1}% |",
            ms(w),
            ms(p),
            (w.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0
        );
    }
}

// ---------------------------------------------------------------------------------------
// Where a process starts on a host

/// A spawn spec's `cwd` is where the command starts on the host; the pid and exit-status
/// files stay in the run dir, and a directory the host lacks is refused with its path.
#[tokio::test]
async fn a_process_starts_in_its_cwd_on_the_host_and_keeps_its_files_in_the_run_dir() {
    let Some(hosts) = Hosts::up(1) else { return };
    let state = hosts.dir().join("state");
    let work = hosts.dir().join("work dir");
    std::fs::create_dir_all(&work).expect("work dir");
    let b = hosts.backend(&state);
    b.allocate(&["node0".into()]).await.expect("allocation");
    let mut once = spec(
        "here",
        Some("node0"),
        &["sh", "-c", "pwd >out; exit 5"],
        false,
        &state,
    );
    once.cwd = Some(work.clone());
    let o = b.spawn(&once).await.expect("spawn");
    assert_eq!(b.wait(&o).await.expect("wait"), ProcState::Exited(Some(5)));
    let out = std::fs::read_to_string(work.join("out")).expect("out");
    assert_eq!(Path::new(out.trim()), work);
    let run_dir = PathBuf::from(o.payload["run_dir"].as_str().expect("run dir"));
    assert_eq!(
        std::fs::read_to_string(run_dir.join("exit-status")).expect("exit status"),
        "5\n"
    );
    assert!(run_dir.join(".pid").exists() && !run_dir.join("out").exists());

    once.cwd = Some(hosts.dir().join("missing"));
    let e = b.spawn(&once).await.expect_err("no such dir on the host");
    assert!(e.message.contains("missing"), "{e}");
}

/// prl-flow killed between an engine's spawn on its host and the journal write of its
/// handle: the record says `running` with no handle. `status` finds the engine on its host
/// from the run dir's `.proc` (through the allocation's handle: which host, which remote
/// dir), and `down` stops it there.
#[test]
fn cli_status_and_down_find_an_engine_whose_handle_never_reached_the_journal() {
    let Some(router) = router_program() else {
        return;
    };
    let Some(hosts) = Hosts::up(1) else { return };
    let base = common::free_port_block(3);
    let file = one_node_recipe(&hosts, base, "");
    let state = hosts.dir().join("state");
    let prl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_prl-flow"))
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .env("PRL_FLOW_ROUTER", &router)
            .output()
            .expect("prl-flow");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let f = path(&file);
    let (code, _, err) = prl(&["run", f, "--engine", "mock", "--router", path(&router)]);
    assert_eq!(code, Some(0), "{err}");
    hosts.assert_one_engine_each();

    // The gap: the engine's handle is not in the journal.
    let engine = "engine[0].rank[0]";
    let journal = prl_flow_engine::Journal::open(&state, true, "test").expect("journal");
    assert!(journal.get(engine).is_some_and(|r| r.handle.is_some()));
    journal.update(engine, |r| {
        r.handle = None;
        r.status = Status::Running;
    });
    journal.close().expect("close");

    let (code, out, err) = prl(&["status", f]);
    let row = out
        .lines()
        .find(|l| l.starts_with(engine))
        .unwrap_or_else(|| panic!("no row for `{engine}` ({code:?}):\n{out}\n{err}"))
        .to_string();
    assert!(row.contains(" up "), "{row}\n{err}");

    let (code, _, err) = prl(&["down", f]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&format!("stopped {engine}")), "{err}");
    assert_eq!(hosts.settle(0), Vec::<String>::new(), "host 0 after down");
}
