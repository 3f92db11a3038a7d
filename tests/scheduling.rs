//! How `prl-flow run` asks to be scheduled: its thread, which reaps the children and starts
//! the next ones, takes a short scheduler slice of its own (so that it gets a core as soon
//! as a child's end wakes it), and what it starts keeps the system's default slice.

mod common;

use common::Sandbox;
use prl_flow_local::slice::{kernel_keeps_slices, slice_in, slice_ns, SLICE_NS};

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
    let default = std::thread::spawn(slice_ns)
        .join()
        .expect("a thread")
        .expect("a slice");
    assert_ne!(
        default, SLICE_NS,
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
    assert_eq!(read("parent.txt"), SLICE_NS);
    assert_eq!(
        read("own.txt"),
        default,
        "a task must not inherit the short slice"
    );
}
