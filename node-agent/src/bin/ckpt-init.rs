//! `ckpt-init [--uid U --gid G --groups G1,G2 --cwd DIR] -- CMD [ARGS…]`:
//! PID 1 of a job tree's PID namespace.
//!
//! It starts CMD (as U:G with the supplementary groups, in DIR), forwards
//! the signals a batch system sends (TERM, INT, HUP, QUIT, USR1, USR2) to
//! it, reaps every orphan the namespace hands it, and exits with CMD's
//! status (128+N if CMD died of signal N) — whereupon the kernel ends
//! whatever is left in the namespace.
//!
//! The init itself stays root, in a private directory of its own: CRIU's
//! parasite mounts a /proc for the namespace in the init's working
//! directory while it dumps, which takes root and a directory no other job
//! shares. It is part of every image, so it stays tiny: one thread, no
//! allocation in the loop, blocking in sigwaitinfo(2), which CRIU
//! checkpoints and restarts transparently.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execvp, fork, setgid, setgroups, setuid, ForkResult, Gid, Pid, Uid};

const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

extern "C" fn noop(_: libc::c_int) {}

/// Who CMD runs as, and where.
#[derive(Default)]
struct Child {
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Option<Vec<u32>>,
    cwd: Option<OsString>,
    argv: Vec<CString>,
}

fn usage(msg: &str) -> ! {
    eprintln!("ckpt-init: {msg}\nusage: ckpt-init [--uid U --gid G --groups G1,G2 --cwd DIR] -- CMD [ARGS...]");
    std::process::exit(2)
}

fn parse() -> Child {
    let mut c = Child::default();
    let mut args = std::env::args_os().skip(1);
    let num = |v: Option<OsString>, what: &str| -> u32 {
        v.and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
            .unwrap_or_else(|| usage(&format!("{what} needs a number")))
    };
    while let Some(a) = args.next() {
        match a.as_bytes() {
            b"--" => break,
            b"--uid" => c.uid = Some(num(args.next(), "--uid")),
            b"--gid" => c.gid = Some(num(args.next(), "--gid")),
            b"--groups" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage("--groups needs a list"));
                let v = v
                    .to_str()
                    .unwrap_or_else(|| usage("--groups needs numbers"));
                let groups = v.split(',').filter(|s| !s.is_empty()).map(|g| {
                    g.parse()
                        .unwrap_or_else(|_| usage("--groups needs numbers"))
                });
                c.groups = Some(groups.collect());
            }
            b"--cwd" => {
                c.cwd = Some(
                    args.next()
                        .unwrap_or_else(|| usage("--cwd needs a directory")),
                )
            }
            _ => usage(&format!("unknown option {a:?}")),
        }
    }
    c.argv = args
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    if c.argv.is_empty() {
        usage("no command");
    }
    c
}

fn main() {
    let child = parse();
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(s);
    }
    // A namespace init drops signals it has no handler for; install no-op
    // handlers so that forwarded signals are queued for sigwaitinfo.
    for s in FORWARDED.iter().chain([Signal::SIGCHLD].iter()) {
        // SAFETY: installing a handler that does nothing is always sound.
        unsafe {
            let _ = nix::sys::signal::signal(*s, nix::sys::signal::SigHandler::Handler(noop));
        }
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("ckpt-init: sigprocmask: {e}");
        std::process::exit(127);
    }

    // SAFETY: single-threaded process; the child only resets its signal
    // state, drops privileges and execs.
    let pid = match unsafe { fork() } {
        Ok(ForkResult::Child) => exec_child(&child),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            eprintln!("ckpt-init: fork: {e}");
            std::process::exit(127);
        }
    };

    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig != Signal::SIGCHLD {
            let _ = kill(pid, sig);
            continue;
        }
        if let Some(code) = reap(pid) {
            std::process::exit(code);
        }
    }
}

fn exec_child(c: &Child) -> ! {
    let fail = |what: &str, e: nix::Error| -> ! {
        eprintln!("ckpt-init: {what}: {e}");
        // SAFETY: leaving the forked child without running destructors.
        unsafe { libc::_exit(127) }
    };
    for s in FORWARDED.iter().chain([Signal::SIGCHLD].iter()) {
        // SAFETY: restoring default dispositions before exec.
        unsafe {
            let _ = nix::sys::signal::signal(*s, nix::sys::signal::SigHandler::SigDfl);
        }
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        fail("sigprocmask", e);
    }
    if let Some(cwd) = &c.cwd {
        if let Err(e) = nix::unistd::chdir(cwd.as_os_str()) {
            fail(&format!("cannot enter {cwd:?}"), e);
        }
    }
    if let Some(groups) = &c.groups {
        let g: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
        if let Err(e) = setgroups(&g) {
            fail("setgroups", e);
        }
    }
    if let Some(gid) = c.gid {
        if let Err(e) = setgid(Gid::from_raw(gid)) {
            fail("setgid", e);
        }
    }
    if let Some(uid) = c.uid {
        if let Err(e) = setuid(Uid::from_raw(uid)) {
            fail("setuid", e);
        }
    }
    let err = execvp(&c.argv[0], &c.argv).err();
    eprintln!(
        "ckpt-init: cannot execute {:?}: {}",
        c.argv[0],
        err.map(|e| e.desc()).unwrap_or("?")
    );
    // SAFETY: leaving the forked child without running destructors.
    unsafe { libc::_exit(127) }
}

/// Reaps every exited child; returns CMD's exit code once CMD is gone.
fn reap(main: Pid) -> Option<i32> {
    let mut result = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => result = Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => result = Some(128 + sig as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return result,
            Ok(_) => {}
        }
    }
}
