//! The Rust side of the network-namespace harness (tests/support/netns.sh) shared by the ssh
//! and SLURM tests: can namespaces be made here, and which private /24 is free.

// Each test binary uses what it needs of this file.
#![allow(dead_code)]

use std::process::Command;

/// Can this process make network namespaces? `PRL_FLOW_TEST_NO_NETNS=1` says no, to
/// exercise the loopback fallback.
pub fn netns_possible(tag: &str) -> bool {
    if std::env::var_os("PRL_FLOW_TEST_NO_NETNS").is_some_and(|v| v == "1") {
        return false;
    }
    let probe = format!("pf-probe-{tag}");
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    }
    ok
}

/// A /24 that no interface here uses yet: `10.A.B`, A from `first` + the pid (each test
/// binary takes its own hundred: ssh 150–249, SLURM 50–149), B from a counter.
pub fn free_subnet(first: u32, pid: u32, k: usize) -> String {
    let used = Command::new("ip")
        .args(["-o", "-4", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for i in 0..250 {
        let net = format!("10.{}.{}", first + (pid % 100), (k * 7 + i) % 250 + 1);
        if !used.contains(&format!(" {net}.")) {
            return net;
        }
    }
    panic!("no free 10.x.y.0/24 subnet");
}
