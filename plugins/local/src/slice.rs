//! A short scheduler slice for the thread that reaps children and starts the next ones.
//!
//! With as many children as cores, that thread wakes on a core where a child runs, each time
//! a child ends. Linux's fair scheduler (EEVDF, from 6.6) lets a waking thread take the core
//! at once only if its virtual deadline comes before the running one's; the deadline is the
//! thread's eligible time plus its slice (0.75 ms and up by default). A child's shell then
//! keeps the core until it blocks, and the other core may idle meanwhile: that is the
//! slow regime of docs/benchmarks.md ("Eleventh pass"). Since Linux 6.12 a thread may ask
//! for a shorter slice of its own (`sched_setattr` with `sched_runtime` under `SCHED_OTHER`,
//! clamped to 0.1–100 ms; kernel commit 857b158dc5e8, "sched/eevdf: Use
//! sched_attr::sched_runtime to set request/slice suggestion"), so its deadlines come early
//! and a wake-up takes the core. It costs no privilege and no more CPU time: the slice only
//! sets when the thread runs, not how much.
//!
//! What the thread starts must not inherit it, so it is set with `SCHED_FLAG_RESET_ON_FORK`
//! (a child gets the default slice). That flag would also raise a negative nice value to 0 in
//! the children, so nothing is changed for a thread that has one, nor for one under another
//! policy than `SCHED_OTHER` (someone chose that). Older kernels accept and ignore the slice;
//! a refusal (a seccomp filter, another system) leaves the thread as it was.

/// `struct sched_attr` as of its first version (`SCHED_ATTR_SIZE_VER0`, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

const SCHED_OTHER: u32 = 0;
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// The slice asked for: the kernel's least.
pub const SLICE_NS: u64 = 100_000;

/// Gives the calling thread a slice of [`SLICE_NS`], as described above. Returns whether
/// the kernel took the request (a kernel before 6.12 takes it and ignores the slice).
///
/// The workspace denies `unsafe`; this and `current` are its exception: no crate of the
/// field wraps `sched_setattr`, and each call passes a pointer to a local structure only.
#[allow(unsafe_code)]
pub fn short_slice() -> bool {
    let Some(mut attr) = current() else {
        return false;
    };
    if attr.policy != SCHED_OTHER || attr.nice < 0 {
        return false;
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags |= SCHED_FLAG_RESET_ON_FORK;
    attr.runtime = SLICE_NS;
    // SAFETY: `sched_setattr(0, attr, 0)` reads `attr.size` bytes of a live, initialized
    // `struct sched_attr` laid out as the kernel's first version, and writes nothing.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_sched_setattr, 0, &attr, 0) };
    r == 0
}

/// The calling thread's scheduling attributes.
#[allow(unsafe_code)]
fn current() -> Option<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `sched_getattr(0, attr, size, 0)` writes at most `size` bytes into `attr`,
    // which is that large and laid out as the kernel's first version of the structure.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    (r == 0).then_some(attr)
}

/// The calling thread's slice, if the kernel says (`/proc/thread-self/sched`; with
/// `CONFIG_SCHED_DEBUG`): for tests.
pub fn slice_ns() -> Option<u64> {
    slice_in(&std::fs::read_to_string("/proc/thread-self/sched").ok()?)
}

/// The slice (`se.slice`, in ns) in the text of a `/proc/PID/sched` file.
pub fn slice_in(sched: &str) -> Option<u64> {
    sched
        .lines()
        .find(|l| l.starts_with("se.slice"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Whether this kernel keeps a thread's own slice (Linux 6.12 and later) and shows it in
/// `/proc`: for tests, which can only look where it does.
pub fn kernel_keeps_slices() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 12) && slice_ns().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's nice value, as `sched_getattr` gives it.
    fn nice() -> i32 {
        current().expect("the thread's scheduling attributes").nice
    }

    /// `renice -n N` of the calling thread alone; whether it took.
    fn renice(n: i32) -> bool {
        let tid = std::fs::read_link("/proc/thread-self").expect("thread-self");
        let tid = tid
            .file_name()
            .expect("a thread id")
            .to_string_lossy()
            .into_owned();
        std::process::Command::new("renice")
            .args(["-n", &n.to_string(), "-p", &tid])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && nice() == n
    }

    #[test]
    fn a_thread_gets_the_short_slice_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            assert!(renice(5), "renice the thread to 5");
            assert!(short_slice(), "the kernel refused the request");
            assert_eq!(nice(), 5, "the nice value must stay as it was");
            if kernel_keeps_slices() {
                assert_eq!(slice_ns(), Some(SLICE_NS));
            }
        })
        .join()
        .expect("the thread");
    }

    #[test]
    fn a_negative_nice_value_is_left_alone() {
        std::thread::spawn(|| {
            let before = slice_ns();
            // Only a privileged user may lower a nice value; elsewhere there is nothing to see.
            if !renice(-2) {
                return;
            }
            assert!(
                !short_slice(),
                "a thread with a negative nice value must be left alone"
            );
            assert_eq!(slice_ns(), before);
            assert_eq!(nice(), -2);
        })
        .join()
        .expect("the thread");
    }
}
