//! The process-feature matrix: each workload is checkpointed mid-run with
//! `--stop`, restarted, and must produce exactly the output of an
//! uninterrupted run.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ckpt_e2e::{example, reference_run, require, Env, Prereq};

const STEPS: &str = "30";
const T: Duration = Duration::from_secs(60);

/// Uninterrupted output, then: run under ckpt-job, checkpoint --stop at
/// step 10, restart, and compare the concatenated output.
fn stop_and_restart(feature: &str) {
    if !require(feature, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let env = Env::new();
    let prog = example(feature);
    let ref_dir = env.workdir("reference");
    let expected = reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), STEPS.as_ref()], T);
    let expected = String::from_utf8(expected.stdout).unwrap();

    let work = env.workdir("job");
    let name = format!("m-{feature}");
    let mut job = env.run(
        &name,
        &[],
        &[prog.as_os_str(), work.as_os_str(), STEPS.as_ref()],
    );
    job.wait_for("step 10 ", T);
    env.checkpoint(&name, true);
    let first = job.wait(T);
    assert_eq!(
        first.code(),
        75,
        "run after checkpoint --stop: {}",
        first.stderr
    );

    let second = env.restart(&name, &[]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restarted {feature} failed:\n{}",
        second.stderr
    );
    assert_eq!(
        first.stdout + &second.stdout,
        expected,
        "{feature}: output differs from an uninterrupted run"
    );
}

#[test]
fn threads() {
    stop_and_restart("threads");
}

#[test]
fn fork_tree_with_process_groups_and_session() {
    stop_and_restart("forktree");
}

#[test]
fn zombie() {
    stop_and_restart("zombie");
}

#[test]
fn pipes() {
    stop_and_restart("pipes");
}

#[test]
fn unix_stream_and_datagram_sockets() {
    stop_and_restart("unix_sockets");
}

#[test]
fn tcp_loopback_with_data_in_flight() {
    stop_and_restart("tcp_loopback");
}

#[test]
fn files_read_write_append_unlinked() {
    stop_and_restart("files");
}

#[test]
fn posix_and_sysv_shared_memory() {
    stop_and_restart("shm");
}

#[test]
fn timerfd_and_interval_timers() {
    stop_and_restart("timers");
}

#[test]
fn eventfd_epoll_signalfd_inotify() {
    stop_and_restart("events");
}
