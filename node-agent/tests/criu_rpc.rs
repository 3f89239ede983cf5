//! The CRIU RPC client against the real CRIU, as root. No mocks.
//!
//! Prerequisites: root and a `criu` binary. Missing ones make every test
//! print why it is skipped, or fail when `CI=true`.
//!
//! The tests run one at a time (a process-wide lock): they reap children
//! with `waitpid(-1)` and restore fixed PIDs, so they must not overlap.

#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ckpt_agent::criu::{
    CgMode, Criu, CriuError, DumpOptions, InheritFd, NoNotify, NotifyEvent, RestoreOptions,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock that serializes these tests plus a CRIU client, or `None` when
/// the test is to be skipped (it panics instead when `CI=true`).
fn prerequisites(test: &str) -> Option<(MutexGuard<'static, ()>, Criu)> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let missing = if !nix::unistd::Uid::effective().is_root() {
        Some("not running as root".to_string())
    } else {
        match Criu::locate() {
            Ok(criu) => {
                // Orphans of a killed tree must come to us, not to a slow PID 1.
                nix::sys::prctl::set_child_subreaper(true).unwrap();
                return Some((guard, criu));
            }
            Err(e) => Some(e.to_string()),
        }
    };
    let why = missing.unwrap_or_default();
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: CRIU test prerequisites missing under CI=true: {why}");
    }
    // Straight to fd 2: libtest captures eprintln!, and a skip must show.
    let _ = writeln!(std::io::stderr(), "skipping {test}: {why}");
    None
}

/// A shell loop in its own session that writes an increasing counter to
/// `<dir>/counter` every 0.1 s, with a `sleep` child most of the time.
fn spawn_counter(dir: &Path, join_cgroup: Option<&Path>) -> Child {
    spawn_counter_to(dir, join_cgroup, Stdio::null())
}

/// [`spawn_counter`] that also echoes each value to `stdout`.
fn spawn_counter_to(dir: &Path, join_cgroup: Option<&Path>, stdout: Stdio) -> Child {
    let procs =
        join_cgroup.map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_bytes()).unwrap());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("i=0; while :; do i=$((i+1)); echo $i > counter; echo $i; sleep 0.1; done")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null());
    // SAFETY: `counter_child_setup` runs between fork and exec and makes
    // only async-signal-safe calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || counter_child_setup(procs.as_deref()));
    }
    cmd.spawn().unwrap()
}

/// In the forked child: no stray descriptors of the test harness in the
/// dumped tree, a session of its own (not a shell job), and optionally a
/// cgroup (written before exec so that every later child starts there).
/// Async-signal-safe calls only; no allocation.
fn counter_child_setup(procs: Option<&std::ffi::CStr>) -> std::io::Result<()> {
    // SAFETY: closes only descriptors >= 3 of this (child) process, which
    // nothing in it uses any more.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    nix::unistd::setsid()?;
    if let Some(p) = procs {
        let fd = nix::fcntl::open(
            p,
            nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: `open` just returned `fd`; nothing else owns it.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut buf = [0u8; 16];
        let mut i = buf.len();
        let mut v = nix::unistd::getpid().as_raw().unsigned_abs();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        nix::unistd::write(&owned, &buf[i..])?;
    }
    Ok(())
}

fn counter(dir: &Path) -> u64 {
    for _ in 0..50 {
        if let Ok(s) = fs::read_to_string(dir.join("counter")) {
            if let Ok(n) = s.trim().parse() {
                return n;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no counter in {}", dir.display());
}

fn wait_counter_at_least(dir: &Path, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = counter(dir);
        if c >= n {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "counter stuck at {c}, wanted {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the counter moves within `within`.
fn counter_advances(dir: &Path, within: Duration) -> bool {
    let start = counter(dir);
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        if counter(dir) != start {
            return true;
        }
    }
    false
}

/// Reaps every child we have (the tests hold the lock, so they are all
/// ours): blocks until there are none left.
fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return,
            Err(e) => panic!("waitpid: {e}"),
        }
    }
}

/// Kills the tree rooted at `pid` (its own session) and reaps everything.
fn kill_tree(pid: i32) {
    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    reap_all();
}

/// Kills our tree `child` (and its session) and reaps everything.
fn kill_child_tree(child: &mut Child) {
    let pid = i32::try_from(child.id()).unwrap();
    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
    child.kill().unwrap();
    child.wait().unwrap();
    reap_all();
}

fn is_our_running_child(pid: i32) -> bool {
    matches!(
        waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
        Ok(WaitStatus::StillAlive)
    )
}

fn proc_state(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim().chars().take(1).collect())
        })
        .unwrap_or_else(|| "?".into())
}

struct Scratch {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    images: PathBuf,
}

fn scratch() -> Scratch {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let images = tmp.path().join("images");
    fs::create_dir(&work).unwrap();
    fs::create_dir(&images).unwrap();
    Scratch {
        _tmp: tmp,
        work,
        images,
    }
}

/// A v1 cgroup directory that is removed when dropped.
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(controller: &str, tag: &str) -> Option<Self> {
        let path = PathBuf::from(format!(
            "/sys/fs/cgroup/{controller}/ckpt-test-{tag}-{}",
            std::process::id()
        ));
        fs::create_dir(&path).ok().map(|()| Cgroup(path))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("freezer.state"), "THAWED");
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn check_says_criu_works() {
    let Some((_lock, criu)) = prerequisites("check_says_criu_works") else {
        return;
    };
    criu.check().unwrap();
}

#[test]
fn version_is_at_least_4_1() {
    let Some((_lock, criu)) = prerequisites("version_is_at_least_4_1") else {
        return;
    };
    let v = criu.version().unwrap();
    eprintln!("criu version {v}");
    assert!(v.at_least(4, 1), "{v}");
    assert!(v
        .to_string()
        .starts_with(&format!("{}.{}", v.major, v.minor)));
}

#[test]
fn dump_kills_tree_and_restore_makes_it_our_child_counting_on() {
    let Some((_lock, criu)) =
        prerequisites("dump_kills_tree_and_restore_makes_it_our_child_counting_on")
    else {
        return;
    };
    let s = scratch();
    let mut tree = spawn_counter(&s.work, None);
    let pid = i32::try_from(tree.id()).unwrap();
    wait_counter_at_least(&s.work, 10);

    let images = File::open(&s.images).unwrap();
    let mut events = Vec::new();
    let mut opts = DumpOptions::new(pid, images.as_fd());
    opts.notify_scripts = true;
    let mut record = |e: &NotifyEvent, _pid: i32| {
        events.push(e.to_string());
        Ok(())
    };
    criu.dump(&opts, &mut record).unwrap();
    eprintln!("dump events: {events:?}");
    assert_eq!(events.first().map(String::as_str), Some("pre-dump"));
    assert_eq!(events.iter().filter(|e| *e == "post-dump").count(), 1);
    let post = events.iter().position(|e| e == "post-dump").unwrap();
    assert!(post > 0, "{events:?}");

    // leave_running=false: CRIU killed the tree. Reap it (and the orphaned
    // `sleep`, ours as subreaper) so its PIDs are free for the restore.
    let status = tree.wait().unwrap();
    assert!(!status.success(), "{status:?}");
    reap_all();
    let at_dump = counter(&s.work);
    assert!(
        !counter_advances(&s.work, Duration::from_millis(400)),
        "tree still runs after dump"
    );

    let cg = Cgroup::create("pids", "rst");
    let mut events = Vec::new();
    let mut at_post_restore = None;
    let mut ropts = RestoreOptions::new(images.as_fd());
    ropts.notify_scripts = true;
    if let Some(cg) = &cg {
        // The tree lives in the root cgroups; with cgroups ignored, the
        // restored tasks start where criu was put before exec.
        ropts.manage_cgroups_mode = Some(CgMode::Ignore);
        ropts.join_cgroup_procs.push(cg.0.join("cgroup.procs"));
    }
    let work = s.work.clone();
    let mut record = |e: &NotifyEvent, p: i32| {
        if *e == NotifyEvent::PostRestore {
            // Tasks exist but CRIU still holds them: nothing may run yet.
            let moved = counter_advances(&work, Duration::from_millis(300));
            at_post_restore = Some((p, proc_state(p), moved));
        }
        events.push(e.to_string());
        Ok(())
    };
    let out = criu.restore(&ropts, &mut record).unwrap();
    eprintln!("restore events: {events:?}; at post-restore (pid, state, counter moved): {at_post_restore:?}");
    let names: Vec<&str> = events.iter().map(String::as_str).collect();
    assert_eq!(names.first(), Some(&"pre-restore"), "{names:?}");
    let idx = |n: &str| {
        names
            .iter()
            .position(|e| *e == n)
            .unwrap_or_else(|| panic!("no {n} in {names:?}"))
    };
    assert!(idx("pre-restore") < idx("post-restore"));
    assert!(idx("post-restore") < idx("pre-resume"));
    assert!(idx("pre-resume") < idx("post-resume"));
    let (p, _, moved) = at_post_restore.clone().unwrap();
    assert_eq!(p, out.pid, "post-restore carries the root pid");
    assert!(!moved, "tasks ran before post-restore returned");

    assert_eq!(out.pid, pid, "the restored root keeps its pid");
    assert!(
        is_our_running_child(out.pid),
        "restored root is not our running child"
    );
    let after = wait_counter_at_least(&s.work, at_dump + 3);
    eprintln!("counter: {at_dump} at dump, {after} after restore");
    assert!(after > at_dump);

    if let Some(cg) = &cg {
        let cgroups = fs::read_to_string(format!("/proc/{}/cgroup", out.pid)).unwrap();
        let name = cg.0.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            cgroups
                .lines()
                .any(|l| l.contains(":pids:") && l.ends_with(&name)),
            "{cgroups}"
        );
    } else {
        eprintln!("(pids cgroup not available: join_cgroup_procs not checked)");
    }

    let _ = kill(Pid::from_raw(-out.pid), Signal::SIGKILL);
    let status = waitpid(Pid::from_raw(out.pid), None).unwrap();
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
        "{status:?}"
    );
    kill_tree(out.pid);
}

#[test]
fn dump_leave_running_keeps_the_original_running() {
    let Some((_lock, criu)) = prerequisites("dump_leave_running_keeps_the_original_running") else {
        return;
    };
    let s = scratch();
    let mut tree = spawn_counter(&s.work, None);
    let pid = i32::try_from(tree.id()).unwrap();
    wait_counter_at_least(&s.work, 3);

    let images = File::open(&s.images).unwrap();
    let mut opts = DumpOptions::new(pid, images.as_fd());
    opts.leave_running = true;
    let out = criu.dump(&opts, &mut NoNotify).unwrap();
    if let Some(note) = &out.note {
        eprintln!("dump succeeded with cr_errmsg: {note}");
    }
    assert!(s.images.join("pstree.img").exists());
    assert!(s.images.join("dump.log").exists());
    assert!(is_our_running_child(pid));
    assert!(
        counter_advances(&s.work, Duration::from_secs(2)),
        "original stopped counting"
    );
    kill_child_tree(&mut tree);
}

#[test]
fn dump_of_missing_pid_fails_and_quotes_the_log() {
    let Some((_lock, criu)) = prerequisites("dump_of_missing_pid_fails_and_quotes_the_log") else {
        return;
    };
    let s = scratch();
    // A pid that just died and was reaped: free.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = i32::try_from(gone.id()).unwrap();
    gone.wait().unwrap();

    let images = File::open(&s.images).unwrap();
    let err = criu
        .dump(&DumpOptions::new(pid, images.as_fd()), &mut NoNotify)
        .unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    let CriuError::Failed {
        log_path,
        log_excerpt,
        ..
    } = &err
    else {
        panic!("not Failed: {err:?}")
    };
    assert_eq!(
        log_path.as_deref(),
        Some(s.images.join("dump.log").canonicalize().unwrap().as_path())
    );
    assert!(!log_excerpt.is_empty());
    assert!(
        text.starts_with(&format!("criu dump of pid {pid} failed")),
        "{text}"
    );
    assert!(text.contains("\n  log "), "{text}");
    assert!(text.contains(&log_excerpt[0]), "{text}");
    assert!(log_excerpt.len() <= 21);
}

#[test]
fn refusing_post_dump_fails_the_dump_and_the_tree_runs_on() {
    let Some((_lock, criu)) =
        prerequisites("refusing_post_dump_fails_the_dump_and_the_tree_runs_on")
    else {
        return;
    };
    let s = scratch();
    let mut tree = spawn_counter(&s.work, None);
    let pid = i32::try_from(tree.id()).unwrap();
    wait_counter_at_least(&s.work, 3);

    let images = File::open(&s.images).unwrap();
    let mut opts = DumpOptions::new(pid, images.as_fd());
    opts.notify_scripts = true; // leave_running = false: only the refusal saves the tree
    let mut events = Vec::new();
    let mut refuse = |e: &NotifyEvent, _pid: i32| {
        events.push(e.to_string());
        if *e == NotifyEvent::PostDump {
            Err("images not durable".to_string())
        } else {
            Ok(())
        }
    };
    let err = criu.dump(&opts, &mut refuse).unwrap_err();
    eprintln!("events: {events:?}\n{err}");
    let CriuError::Failed { notify_refusal, .. } = &err else {
        panic!("not Failed: {err:?}")
    };
    assert_eq!(
        notify_refusal.as_deref(),
        Some("post-dump: images not durable")
    );
    assert!(err.to_string().contains("post-dump: images not durable"));
    assert!(
        is_our_running_child(pid),
        "tree did not survive a refused post-dump"
    );
    assert!(
        counter_advances(&s.work, Duration::from_secs(2)),
        "tree stopped counting"
    );
    kill_child_tree(&mut tree);
}

#[test]
fn freeze_cgroup_dump_keeps_the_cgroup_state() {
    let Some((_lock, criu)) = prerequisites("freeze_cgroup_dump_keeps_the_cgroup_state") else {
        return;
    };
    for pre_frozen in [true, false] {
        let Some(cg) = Cgroup::create("freezer", if pre_frozen { "frozen" } else { "thawed" })
        else {
            eprintln!("skipping freeze_cgroup_dump_keeps_the_cgroup_state: no writable v1 freezer");
            return;
        };
        let s = scratch();
        let mut tree = spawn_counter(&s.work, Some(&cg.0));
        let pid = i32::try_from(tree.id()).unwrap();
        wait_counter_at_least(&s.work, 3);
        let state = || {
            fs::read_to_string(cg.0.join("freezer.state"))
                .unwrap()
                .trim()
                .to_string()
        };
        if pre_frozen {
            fs::write(cg.0.join("freezer.state"), "FROZEN").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while state() != "FROZEN" {
                assert!(Instant::now() < deadline, "cgroup does not freeze");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        let images = File::open(&s.images).unwrap();
        let mut opts = DumpOptions::new(pid, images.as_fd());
        opts.leave_running = true;
        opts.freeze_cgroup = Some(cg.0.to_string_lossy().into_owned());
        criu.dump(&opts, &mut NoNotify).unwrap();

        let after = state();
        let moving = counter_advances(&s.work, Duration::from_millis(500));
        eprintln!("freezer {} before dump -> {after} after a leave_running dump; counter moving: {moving}",
            if pre_frozen { "FROZEN" } else { "THAWED" });
        if pre_frozen {
            assert_eq!(after, "FROZEN");
            assert!(!moving);
            fs::write(cg.0.join("freezer.state"), "THAWED").unwrap();
            assert!(
                counter_advances(&s.work, Duration::from_secs(2)),
                "tree dead after thaw"
            );
        } else {
            assert_eq!(after, "THAWED");
            assert!(moving);
        }
        kill_child_tree(&mut tree);
    }
}

#[test]
fn restore_inherits_our_pipe_for_the_trees_stdout() {
    let Some((_lock, criu)) = prerequisites("restore_inherits_our_pipe_for_the_trees_stdout")
    else {
        return;
    };
    let s = scratch();
    let (old_r, old_w) = nix::unistd::pipe().unwrap();
    let old_ino = nix::sys::stat::fstat(old_w.as_raw_fd()).unwrap().st_ino;
    let mut tree = spawn_counter_to(&s.work, None, Stdio::from(old_w));
    let pid = i32::try_from(tree.id()).unwrap();
    wait_counter_at_least(&s.work, 3);

    let images = File::open(&s.images).unwrap();
    criu.dump(&DumpOptions::new(pid, images.as_fd()), &mut NoNotify)
        .unwrap();
    tree.wait().unwrap();
    reap_all();
    drop(old_r);

    // The restored shell's stdout becomes a new pipe of ours. Its write
    // end is put at a number far from criu's own descriptors to show the
    // number in the request is the one inside criu, not ours.
    let (new_r, new_w) = nix::unistd::pipe().unwrap();
    let high = nix::fcntl::fcntl(
        new_w.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(200),
    )
    .unwrap();
    drop(new_w);
    // SAFETY: F_DUPFD_CLOEXEC just returned `high`; nothing else owns it.
    let new_w = unsafe { std::os::fd::OwnedFd::from_raw_fd(high) };
    let mut ropts = RestoreOptions::new(images.as_fd());
    ropts.inherit_fd.push(InheritFd {
        fd: new_w.as_fd(),
        key: format!("pipe:[{old_ino}]"),
    });
    let out = criu.restore(&ropts, &mut NoNotify).unwrap();
    // Only the restored shell may hold the write end now: if criu did not
    // hand it over, the read below sees EOF instead of hanging.
    drop(new_w);
    let mut text = String::new();
    let mut r = File::from(new_r);
    let mut buf = [0u8; 64];
    while !text.contains('\n') {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "restored tree does not write to the inherited pipe");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    eprintln!("restored tree wrote {text:?} to the inherited pipe");
    let first: u64 = text.lines().next().unwrap().trim().parse().unwrap();
    assert!(first >= 3, "{text:?}");
    kill_tree(out.pid);
}
