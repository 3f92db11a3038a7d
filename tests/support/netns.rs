//! The Rust side of the network-namespace harness (tests/support/netns.sh) shared by the ssh
//! and SLURM tests: can namespaces be made here, a tag for a harness's interface and
//! namespace names, and a private /24. Tags and subnets are claimed for the life of the test
//! process (`common::try_claim`), so two test processes running at once never get the same.

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

/// A /24 that no interface here uses yet, claimed for the life of this process: `10.A.B`,
/// A from `first` (each test binary takes its own hundred: ssh 150–249, SLURM 50–149), the
/// search starting at a place the pid and a counter pick.
pub fn free_subnet(first: u32, pid: u32, k: usize) -> String {
    let used = ip(&["-o", "-4", "addr"]);
    let start = (pid as usize) * 31 + k * 7;
    let candidates = (0..100 * 250).map(|i| {
        let i = (start + i) % (100 * 250);
        format!("10.{}.{}", first as usize + i / 250, i % 250 + 1)
    });
    crate::common::claim_first("net", candidates, |net| !used.contains(&format!(" {net}.")))
}

/// A tag of five hex digits for the names of a harness's bridge, veths and namespaces
/// (`pfsb-TAG`, `pf-TAG-K`: at most 15 characters), claimed for the life of this process
/// and used by no interface or namespace here (a killed run's leftovers keep theirs).
pub fn claim_tag() -> String {
    let taken = format!("{}\n{}", ip(&["-o", "link"]), ip(&["netns", "list"]));
    let start = std::process::id() as usize * 131;
    let candidates = (0..0xf0000).map(|i| format!("{:05x}", 0x10000 + (start + i) % 0xf0000));
    crate::common::claim_first("tag", candidates, |tag| !taken.contains(tag))
}

/// `ip ARGS`' stdout (empty when it fails).
fn ip(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
