//! `ckpt-init -- CMD [ARGS…]`: PID 1 of a job tree's PID namespace.
//!
//! It starts CMD, forwards the signals a batch system sends (TERM, INT, HUP,
//! QUIT, USR1, USR2) to it, reaps every orphan the namespace hands it, and
//! exits with CMD's status (128+N if CMD died of signal N) — whereupon the
//! kernel ends whatever is left in the namespace. It is part of every image,
//! so it stays tiny: one thread, no allocation in the loop, blocking in
//! sigwaitinfo(2), which CRIU checkpoints and restarts transparently.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execvp, fork, ForkResult, Pid};

const FORWARDED: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

extern "C" fn noop(_: libc::c_int) {}

fn main() {
    let args: Vec<CString> = std::env::args_os()
        .skip(1)
        .skip_while(|a| a.as_bytes() == b"--")
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    if args.is_empty() {
        eprintln!("ckpt-init: usage: ckpt-init -- CMD [ARGS...]");
        std::process::exit(2);
    }

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
    // state and execs.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            for s in FORWARDED.iter().chain([Signal::SIGCHLD].iter()) {
                // SAFETY: restoring default dispositions before exec.
                unsafe {
                    let _ = nix::sys::signal::signal(*s, nix::sys::signal::SigHandler::SigDfl);
                }
            }
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let err = execvp(&args[0], &args).err();
            eprintln!("ckpt-init: cannot execute {:?}: {}", args[0], err.map(|e| e.desc()).unwrap_or("?"));
            // SAFETY: leaving the forked child without running destructors.
            unsafe { libc::_exit(127) }
        }
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
            let _ = kill(child, sig);
            continue;
        }
        if let Some(code) = reap(child) {
            std::process::exit(code);
        }
    }
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
