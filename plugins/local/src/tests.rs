//! The local backend's tests, on real processes of this machine.

use super::*;
use crate::wrapper::PID_FILE;
use prl_flow_backend::{Held, Recorded};
use std::path::Path;

fn spec(dir: &Path, argv: &[&str], service: bool) -> SpawnSpec {
    SpawnSpec {
        task: "t".into(),
        node: None,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        files: [("conf/a.json".to_string(), "{}".to_string())].into(),
        run_dir: dir.join("run"),
        cwd: None,
        log: dir.join("t.log"),
        service,
        attempt: 1_700_000_000_123,
    }
}

/// The handle built in place per spawn is the one serializing gives, with or without its
/// optional parts.
#[test]
fn a_handle_built_in_place_is_the_serialized_one() {
    let full = Handle {
        pid: 42,
        start: 7,
        node: Some("node0".into()),
        log: "/s/logs/t.log".into(),
        status_file: Some("/s/run/t.pid".into()),
        sid: Some(3),
    };
    let bare = Handle {
        node: None,
        status_file: None,
        sid: None,
        ..full.clone()
    };
    for h in [full, bare] {
        assert_eq!(h.payload(), Some(serde_json::to_value(&h).expect("json")));
        assert_eq!(
            LocalBackend::wrap(&h).expect("wrap"),
            ProcHandle::new(NAME, ProcHandle::VERSION, &h).expect("new")
        );
    }
}

#[test]
fn addresses_are_loopback() {
    assert_eq!(LocalBackend::address(0), "127.0.0.1");
    assert_eq!(LocalBackend::address(1), "127.0.0.2");
    assert_eq!(LocalBackend::address(255), "127.0.1.0");
}

#[tokio::test]
async fn oneshot_exit_status_is_recorded_and_readable_without_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let h = b
        .spawn(&spec(dir.path(), &["sh", "-c", "echo hi; exit 3"], false))
        .await
        .expect("spawn");
    assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(3)));
    assert!(dir.path().join("run/conf/a.json").exists());
    assert_eq!(b.log_tail(&h, 5).await.expect("log"), "hi");
    // Another backend instance (a later prl-flow) reads the status file.
    let later = LocalBackend::new();
    assert_eq!(
        later.status(&h).await.expect("status"),
        ProcState::Exited(Some(3))
    );
}

#[tokio::test]
async fn a_later_attempt_in_the_same_run_dir_never_reads_the_earlier_ones_exit_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let first = spec(dir.path(), &["sh", "-c", "exit 3"], false);
    let h = b.spawn(&first).await.expect("spawn");
    assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(3)));
    assert!(std::fs::read_to_string(proc_file(&first)).is_ok_and(|t| t.ends_with("\n3\n")));
    // The second attempt is killed before it can write a status of its own: what a later
    // prl-flow reads of it must not be the first attempt's 3.
    let mut second = spec(dir.path(), &["sh", "-c", "sleep 30"], false);
    second.attempt += 1;
    let h = b.spawn(&second).await.expect("spawn again");
    // Stopped once its shell has written its pid (a shell stopped before that left no trace
    // of the attempt, and there would be nothing to recover).
    let pid_file = proc_file(&second);
    let mine = format!(" {}\n", second.attempt);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&pid_file).is_ok_and(|t| t.ends_with(&mine)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the second attempt never wrote its pid"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.stop(&h, Duration::from_secs(5)).await.expect("stop");
    let later = LocalBackend::new();
    assert_eq!(later.status(&h).await.expect("status"), ProcState::Gone);
    let found = later
        .recover(&second)
        .await
        .expect("recover")
        .expect("found");
    assert_eq!(later.status(&found).await.expect("status"), ProcState::Gone);
}

#[tokio::test]
async fn a_process_starts_in_its_cwd_and_leaves_its_files_in_the_run_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("work dir");
    let b = LocalBackend::new();
    let mut s = spec(dir.path(), &["sh", "-c", "pwd > out; exit 4"], false);
    s.cwd = Some(work.clone());
    let h = b.spawn(&s).await.expect("spawn");
    assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(4)));
    let out = std::fs::read_to_string(work.join("out")).expect("out");
    assert_eq!(Path::new(out.trim()), work);
    assert!(dir.path().join("run/conf/a.json").exists());
    let pid = h.open::<Handle>("local").expect("local").pid;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("run.pid")).expect("proc file"),
        format!("{pid} {}\n4\n", s.attempt)
    );
    assert!(!dir.path().join("run/out").exists());
    // Given no files, a one-shot that starts elsewhere makes no run dir at all.
    s.files.clear();
    s.run_dir = dir.path().join("runs/t");
    let h = b.spawn(&s).await.expect("spawn");
    assert_eq!(b.wait(&h).await.expect("wait"), ProcState::Exited(Some(4)));
    assert!(!s.run_dir.exists());
    assert!(
        std::fs::read_to_string(dir.path().join("runs/t.pid")).is_ok_and(|t| t.ends_with("\n4\n"))
    );
    assert_eq!(
        LocalBackend::new().status(&h).await,
        Ok(ProcState::Exited(Some(4)))
    );
    s.cwd = Some(dir.path().join("missing"));
    let e = b.spawn(&s).await.expect_err("no such dir");
    assert!(e.message.contains("not a directory"), "{e}");
}

#[tokio::test]
async fn a_handle_with_a_childs_pid_but_another_start_time_is_not_that_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let h = b
        .spawn(&spec(dir.path(), &["sleep", "30"], true))
        .await
        .expect("spawn");
    let mut other: Handle = h.open(NAME).expect("handle");
    other.start += 1;
    let other = LocalBackend::wrap(&other).expect("handle");
    // The same backend knows the child by pid; a later process with that pid is not it.
    assert_eq!(b.status(&other).await.expect("status"), ProcState::Gone);
    assert_eq!(b.status(&h).await.expect("status"), ProcState::Running);
    b.stop(&h, Duration::from_secs(2)).await.expect("stop");
}

#[tokio::test]
async fn service_stops_with_its_group_and_pid_reuse_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let h = b
        .spawn(&spec(
            dir.path(),
            &["sh", "-c", "sleep 30 & sleep 30; wait"],
            true,
        ))
        .await
        .expect("spawn");
    assert_eq!(b.status(&h).await.expect("status"), ProcState::Running);
    b.stop(&h, Duration::from_secs(2)).await.expect("stop");
    assert_ne!(b.status(&h).await.expect("status"), ProcState::Running);
    // A handle with the right pid but another start time is not ours.
    let mut fake: Handle = h.open(NAME).expect("handle");
    fake.pid = std::process::id() as i32;
    fake.start += 1;
    let fake = LocalBackend::wrap(&fake).expect("handle");
    assert_eq!(
        LocalBackend::new().status(&fake).await.expect("status"),
        ProcState::Gone
    );
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server whose leader died and left a worker: the worker is still ours, is reported,
/// and is stopped.
#[tokio::test]
async fn stop_reaches_the_group_after_its_leader_died() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let s = spec(dir.path(), &["sh", "-c", "sleep 4031 & exit 0"], true);
    let h = b.spawn(&s).await.expect("spawn");
    assert_ne!(b.wait(&h).await.expect("wait"), ProcState::Running);
    let p: Handle = h.open(NAME).expect("handle");
    wait_until("the worker runs", || !p.members().is_empty()).await;
    let worker = p.members()[0];
    assert_ne!(worker, p.pid);
    let items = [Recorded {
        id: "t".into(),
        held: Held::Process(h.clone()),
    }];
    let out = b.teardown(&items, Duration::from_secs(2), None).await;
    assert!(out[0].was_running, "{out:?}");
    assert_eq!(out[0].error, None);
    assert!(procfs::stat(worker).is_none_or(|s| s.is_dead()));
    assert!(p.members().is_empty());
}

/// A pid file whose pid now belongs to a stranger (here: this test process): the stranger
/// is never taken for the attempt's process, nor signalled.
#[tokio::test]
async fn a_reused_pid_is_never_adopted_nor_signalled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = spec(dir.path(), &["sleep", "30"], true);
    std::fs::create_dir_all(&s.run_dir).expect("run dir");
    let me = std::process::id();
    // The attempt's process started at tick 1, in this session, and is long gone.
    let sid = procfs::stat(me as i32).expect("stat").sid;
    let line = format!("{me} {} 1 {sid}\n", s.attempt);
    std::fs::write(s.run_dir.join(PID_FILE), line).expect("pid");
    let b = LocalBackend::new();
    let h = b.recover(&s).await.expect("recover").expect("a handle");
    assert_eq!(b.status(&h).await, Ok(ProcState::Gone));
    b.stop(&h, Duration::from_millis(100)).await.expect("stop");
    assert!(procfs::stat(me as i32).is_some_and(|s| !s.is_dead()));
}

/// A port held by someone else is reported with its holder, before a start and as the
/// answer to "whose listener is this"; our own process's listener is ours.
#[tokio::test]
async fn ports_are_told_free_taken_ours_or_someone_elses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    // Held for the whole test, so no other process can take them meanwhile: `taken` on
    // 127.0.0.1; `elsewhere` on 127.0.0.2 only, which leaves that port free on 127.0.0.1.
    let stranger = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = stranger.local_addr().expect("addr").port();
    // (A port free on 127.0.0.2 may be held on 127.0.0.1 by someone else: one that is not.)
    let (other_node, elsewhere) = loop {
        let l = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            break (l, port);
        }
    };
    let found = b
        .ports_taken(None, "127.0.0.1", &[taken, elsewhere])
        .await
        .expect("ports")
        .expect("the local backend can tell");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].port, taken);
    let me = format!("pid {}", std::process::id());
    assert!(found[0].holder.as_deref().is_some_and(|h| h.contains(&me)));

    // Our service listens on a port the OS gives it, and says which.
    let script = "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\n\
                  open('port.tmp','w').write(str(s.getsockname()[1]))\n\
                  __import__('os').rename('port.tmp','port')\ntime.sleep(60)";
    let s = spec(dir.path(), &["python3", "-c", script], true);
    let h = b.spawn(&s).await.expect("spawn");
    // Another process holds it: this test's, named as `/proc` names it. (Not compared with
    // a second scan of `/proc`: a child that another test of this binary is starting holds
    // a copy of the socket between its fork and its exec, and may be in one scan only.)
    match b.listener(&h, "127.0.0.1", taken).await {
        Ok(Listener::Other(holders)) => assert!(
            holders
                .split(", ")
                .any(|one| one == me || one.starts_with(&format!("{me} ("))),
            "{holders} does not name {me}"
        ),
        other => panic!("a stranger's port is not told as another process's: {other:?}"),
    }
    let port_file = s.run_dir.join("port");
    wait_until("the service's port", || port_file.exists()).await;
    let port: u16 = std::fs::read_to_string(&port_file)
        .expect("port")
        .parse()
        .expect("a port");
    assert_eq!(b.listener(&h, "127.0.0.1", port).await, Ok(Listener::Ours));
    b.stop(&h, Duration::from_secs(2)).await.expect("stop");
    drop((stranger, other_node));
}

/// A prl-flow killed between a spawn and its journal write: the record says when the
/// attempt started, and the process's pid file must be found by that, exactly, even when
/// the file's time reads earlier than the record (coarse file-system clocks do that).
#[tokio::test]
async fn recover_finds_its_attempt_by_its_token_whatever_the_file_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let s = spec(dir.path(), &["sleep", "30"], true);
    let h = b.spawn(&s).await.expect("spawn");
    let pid_file = s.run_dir.join(PID_FILE);
    // The child writes it first thing; wait for that, not for a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&pid_file).map_or(true, |t| !t.ends_with('\n')) {
        assert!(std::time::Instant::now() < deadline, "no pid file");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let f = std::fs::File::options()
        .write(true)
        .open(&pid_file)
        .expect("pid file");
    let when = std::time::UNIX_EPOCH + Duration::from_millis(s.attempt - 5);
    f.set_modified(when).expect("set mtime");
    drop(f);

    let found = b
        .recover(&s)
        .await
        .expect("recover")
        .expect("this attempt's process is found");
    assert_eq!(
        found.open::<Handle>("local").expect("local").pid,
        h.open::<Handle>("local").expect("local").pid
    );
    assert_eq!(b.status(&found).await, Ok(ProcState::Running));
    // An attempt that started later never got to its spawn: this process is not its.
    let later = SpawnSpec {
        attempt: s.attempt + 1,
        ..s.clone()
    };
    assert_eq!(b.recover(&later).await, Ok(None));
    b.stop(&h, Duration::from_secs(5)).await.expect("stop");
}

#[tokio::test]
async fn a_handle_of_another_backend_is_refused() {
    let other = ProcHandle::new("ssh", ProcHandle::VERSION, &serde_json::json!({ "pid": 1 }))
        .expect("handle");
    let e = LocalBackend::new()
        .status(&other)
        .await
        .expect_err("not ours");
    assert_eq!(
        e.message,
        "backend `local` cannot use a handle of backend `ssh`"
    );
    assert_eq!(LocalBackend::new().describe(&other), "");
}

/// A one-shot's pid file holds `PID ATTEMPT` alone (its shell reads nothing of `/proc`):
/// a later prl-flow finds the running process by the attempt it carries in its environment,
/// and an attempt that never got to its spawn does not take it.
#[tokio::test]
async fn recover_finds_a_one_shot_by_its_wrapper_shells_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let s = spec(dir.path(), &["sleep", "30"], false);
    let h = b.spawn(&s).await.expect("spawn");
    let pid_file = proc_file(&s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&pid_file).map_or(true, |t| !t.ends_with('\n')) {
        assert!(std::time::Instant::now() < deadline, "no pid file");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = h.open::<Handle>("local").expect("local").pid;
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file"),
        format!("{pid} {}\n", s.attempt)
    );
    let later = LocalBackend::new();
    let found = later
        .recover(&s)
        .await
        .expect("recover")
        .expect("this attempt's process is found");
    let f = found.open::<Handle>("local").expect("local");
    assert_eq!(
        (f.pid, f.start),
        (pid, procfs::stat(pid).expect("stat").start)
    );
    assert_eq!(later.status(&found).await, Ok(ProcState::Running));
    let other = SpawnSpec {
        attempt: s.attempt + 1,
        ..s.clone()
    };
    assert_eq!(later.recover(&other).await, Ok(None));
    b.stop(&h, Duration::from_secs(5)).await.expect("stop");
}

/// A one-shot whose command `exec`s a program in place of the wrapper shell: the program
/// holds the pid and no longer the shell's command line, but the attempt the shell exported.
#[tokio::test]
async fn recover_finds_a_one_shot_that_execd_by_the_attempt_in_its_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    let s = spec(dir.path(), &["sh", "-c", "exec sleep 30"], false);
    let h = b.spawn(&s).await.expect("spawn");
    let pid = h.open::<Handle>("local").expect("local").pid;
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::comm(pid).as_deref() != Some("sleep") {
        assert!(Instant::now() < deadline, "the shell never became sleep");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let later = LocalBackend::new();
    let found = later
        .recover(&s)
        .await
        .expect("recover")
        .expect("the exec'd program is this attempt's");
    assert_eq!(found.open::<Handle>("local").expect("local").pid, pid);
    assert_eq!(later.status(&found).await, Ok(ProcState::Running));
    // Named by a pid file of another attempt, the same process is not that attempt's.
    let other = SpawnSpec {
        attempt: s.attempt + 1,
        ..s.clone()
    };
    std::fs::write(proc_file(&s), format!("{pid} {}\n", other.attempt)).expect("pid");
    let not_it = later
        .recover(&other)
        .await
        .expect("recover")
        .expect("a handle");
    assert_eq!(later.status(&not_it).await, Ok(ProcState::Gone));
    b.stop(&h, Duration::from_secs(5)).await.expect("stop");
}

/// A one-shot's pid file whose pid now belongs to a stranger (this test process, which
/// carries no attempt): the stranger is never taken for it, nor signalled; the exit status,
/// once there, says how the attempt ended.
#[tokio::test]
async fn a_one_shot_pid_reused_by_a_stranger_is_never_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = spec(dir.path(), &["true"], false);
    let me = std::process::id();
    std::fs::write(proc_file(&s), format!("{me} {}\n", s.attempt)).expect("pid");
    let b = LocalBackend::new();
    let h = b.recover(&s).await.expect("recover").expect("a handle");
    assert_eq!(b.status(&h).await, Ok(ProcState::Gone));
    b.stop(&h, Duration::from_millis(100)).await.expect("stop");
    assert!(procfs::stat(me as i32).is_some_and(|s| !s.is_dead()));
    std::fs::write(proc_file(&s), format!("{me} {}\n0\n", s.attempt)).expect("status");
    assert_eq!(b.status(&h).await, Ok(ProcState::Exited(Some(0))));
    // A proc file that a later attempt rewrote says nothing of this one.
    std::fs::write(proc_file(&s), format!("{} {}\n5\n", me + 1, s.attempt + 1)).expect("later");
    assert_eq!(b.status(&h).await, Ok(ProcState::Gone));
}

/// A process that joins the group after `stop` first looked is asked to end too (SIGTERM),
/// not only killed when the grace period is over.
#[tokio::test]
async fn a_process_forked_while_stopping_gets_sigterm_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    // The late child inherits SIGTERM blocked, sets its handler, then unblocks: a SIGTERM
    // sent to it at any moment after its birth reaches the handler.
    let late = format!(
        "import signal, time\n\
         signal.signal(signal.SIGTERM, lambda *_: (open('{d}/late-term', 'w').close(), exit(0)))\n\
         signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])\n\
         time.sleep(60)\n"
    );
    let first = format!(
        "import os, signal, subprocess, sys, time\n\
         def on_term(*_):\n\
         \x20   signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n\
         \x20   subprocess.Popen([sys.executable, '-c', {late:?}])\n\
         \x20   os._exit(0)\n\
         signal.signal(signal.SIGTERM, on_term)\n\
         open('{d}/ready', 'w').close()\n\
         time.sleep(60)\n"
    );
    let b = LocalBackend::new();
    let h = b
        .spawn(&spec(dir.path(), &["python3", "-c", &first], false))
        .await
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("ready").exists() {
        assert!(Instant::now() < deadline, "python3 never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.stop(&h, Duration::from_secs(10)).await.expect("stop");
    assert!(
        dir.path().join("late-term").exists(),
        "the process forked during the stop never got SIGTERM"
    );
}

/// A child's start time taken off the clock (no `/proc` read at the spawn) is the one
/// `/proc` gives, for every child: a wrong one would make the child a stranger to `status`.
#[tokio::test]
async fn a_childs_start_time_and_session_are_those_proc_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::new();
    for i in 0..200 {
        let mut s = spec(dir.path(), &["sleep", "30"], true);
        s.run_dir = dir.path().join(format!("run{i}"));
        let h = b.spawn(&s).await.expect("spawn");
        let got = h.open::<Handle>("local").expect("local");
        let st = procfs::stat(got.pid).expect("stat");
        assert_eq!((got.start, got.sid), (st.start, Some(st.sid)), "child {i}");
        assert_eq!(b.status(&h).await, Ok(ProcState::Running));
        b.stop(&h, Duration::from_secs(5)).await.expect("stop");
    }
    assert_eq!(b.clock_agrees.get(), Some(&true));
}
