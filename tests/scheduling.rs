//! How `prl-flow run` asks to be scheduled: its thread, which reaps the children and starts
//! the next ones, takes a short scheduler slice of its own (so that it gets a core as soon
//! as a child's end wakes it), and what it starts keeps the system's default slice.

mod common;

use common::Sandbox;

/// `se.slice` in the text of a `/proc/PID/sched` file.
fn slice_in(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("se.slice"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Whether this kernel keeps a thread's own slice (Linux 6.12 and later) and shows it.
fn kernel_keeps_slices() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let shown = std::fs::read_to_string("/proc/thread-self/sched")
        .ok()
        .and_then(|t| slice_in(&t))
        .is_some();
    (major, minor) >= (6, 12) && shown
}

#[test]
fn a_run_takes_a_short_slice_and_its_tasks_keep_the_default() {
    if !common::prerequisite(
        kernel_keeps_slices(),
        "Linux 6.12 or later, with /proc/PID/sched (a thread's own scheduler slice)",
        "run the tests on such a kernel",
    ) {
        return;
    }
    // What a thread that asked for nothing gets here.
    let default = std::thread::spawn(|| {
        slice_in(&std::fs::read_to_string("/proc/thread-self/sched").expect("own sched"))
    })
    .join()
    .expect("a thread")
    .expect("a slice");
    assert_ne!(
        default,
        prl_flow_local::slice::SLICE_NS,
        "the system's default slice is the short one: this test could not tell them apart"
    );

    let sb = Sandbox::new();
    // The task's shell is prl-flow's child: its parent is prl-flow's main thread.
    sb.write(
        "flow.toml",
        "[[task]]\nid = \"look\"\nrun = \"cat /proc/$PPID/sched > parent.txt && cat /proc/$$/sched > own.txt\"\n",
    );
    sb.run(&[
        "run",
        "flow.toml",
        "--state-dir",
        "st",
        "-q",
        "--no-progress",
    ])
    .expect_code(0);
    let read = |f: &str| {
        let text = std::fs::read_to_string(sb.join(f)).expect("the task wrote it");
        slice_in(&text).unwrap_or_else(|| panic!("no se.slice in {f}:\n{text}"))
    };
    assert_eq!(read("parent.txt"), prl_flow_local::slice::SLICE_NS);
    assert_eq!(
        read("own.txt"),
        default,
        "a task must not inherit the short slice"
    );
}
