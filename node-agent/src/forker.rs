//! One long-lived thread that forks every process which must outlive the
//! call that made it: job trees and the `criu swrk` of a restore (CRIU
//! makes the restored tree a child of swrk's parent).
//!
//! Why: a tree's init runs with `PR_SET_PDEATHSIG(SIGKILL)` (a tree must
//! not outlive its agent or supervisor), and Linux delivers that signal
//! when the parent *thread* exits, not the parent process. Forked from a
//! short-lived thread — one connection thread of a control socket, a tokio
//! blocking-pool thread that retires after 10 s idle — a healthy tree was
//! SIGKILLed at that thread's exit. This thread never exits, so the
//! signal comes only when the whole process dies.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;

type Job = Box<dyn FnOnce() + Send + 'static>;

fn forker() -> &'static Mutex<Sender<Job>> {
    static FORKER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    FORKER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("ckpt-forker".into())
            .spawn(move || {
                // The senders live in a static: this loop never ends.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the forker thread: {e}"));
        Mutex::new(tx)
    })
}

/// Runs `f` on the forker thread and returns its result (a panic in `f`
/// is resumed in the caller).
pub fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    forker()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .unwrap_or_else(|_| panic!("the forker thread is gone"));
    match rx.recv() {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("the forker thread dropped a job"),
    }
}

/// The kernel thread id of the forker (for tests).
pub fn thread_id() -> i32 {
    run(|| nix::unistd::gettid().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_one_long_lived_thread() {
        let a = thread_id();
        let b = thread::spawn(thread_id).join().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, nix::unistd::gettid().as_raw());
        assert_eq!(run(|| 6 * 7), 42);
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_forker_survives() {
        let r = std::panic::catch_unwind(|| run(|| panic!("boom")));
        assert!(r.is_err());
        assert_eq!(run(|| 1), 1);
    }
}
