//! Real MPI jobs on one node under `ckpt-job`: a 4-rank ring over Open MPI's
//! shared-memory transport (vader) and over MPICH (ch4:ucx), checkpointed
//! mid-run and restarted; the restarted job must finish with exactly the
//! output of an uninterrupted run.

#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::time::Duration;

use ckpt_e2e::{example, reference_run, require, result_line, Env, Prereq};

const STEPS: &str = "40";
const T: Duration = Duration::from_secs(120);

/// `mpirun.openmpi … ring-openmpi <workdir> <STEPS>`.
fn openmpi_cmd(workdir: &std::path::Path) -> Vec<OsString> {
    let mut c: Vec<OsString> = [
        "mpirun.openmpi",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "4",
        "--mca",
        "btl",
        "self,vader",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    c.push(example("ring-openmpi").into_os_string());
    c.push(workdir.as_os_str().to_owned());
    c.push(STEPS.into());
    c
}

/// `mpirun.mpich -np 4 ring-mpich <workdir> <STEPS>`, UCX at its defaults:
/// inside the job's namespaces the ranks share memory through UCX's SysV
/// transport (the tree has its own IPC namespace, which CRIU dumps). Not
/// `UCX_TLS=^sysv`: UCX's posix transport is unreachable inside a PID
/// namespace (see cli/src/supervisor/local.rs), so the ranks would talk TCP
/// on loopback, where MPICH 4.0.2's MPI_Finalize hangs now and then even
/// without any checkpoint (ucp_disconnect_nb waits for a peer's PUT ack while
/// that peer already sits in the PMI barrier).
fn mpich_cmd(workdir: &std::path::Path) -> Vec<OsString> {
    let mut c: Vec<OsString> = ["mpirun.mpich", "-np", "4"]
        .iter()
        .map(OsString::from)
        .collect();
    c.push(example("ring-mpich").into_os_string());
    c.push(workdir.as_os_str().to_owned());
    c.push(STEPS.into());
    c
}

fn reference(env: &Env, cmd: fn(&std::path::Path) -> Vec<OsString>) -> String {
    let dir = env.workdir("reference");
    let out = reference_run(&cmd(&dir), T);
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(
        result_line(&out).is_some(),
        "reference run printed no RESULT line:\n{out}"
    );
    out
}

/// Uninterrupted output, then: run under ckpt-job, checkpoint --stop at
/// step 10, restart, and compare the concatenated output.
fn stop_and_restart(name: &str, cmd: fn(&std::path::Path) -> Vec<OsString>) {
    let env = Env::new();
    let expected = reference(&env, cmd);

    let work = env.workdir("job");
    let mut job = env.run(name, &[], &cmd(&work));
    job.wait_for("step 10 ", T);
    env.checkpoint(name, true);
    let first = job.wait(T);
    assert_eq!(
        first.code(),
        75,
        "run after checkpoint --stop: {}",
        first.stderr
    );

    let second = env.restart(name, &[]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restarted {name} failed:\nstdout:\n{}\nstderr:\n{}",
        second.stdout,
        second.stderr
    );
    let got = first.stdout + &second.stdout;
    assert_eq!(
        result_line(&got),
        result_line(&expected),
        "{name}: RESULT differs from an uninterrupted run\n{}",
        second.stderr
    );
    assert_eq!(
        got, expected,
        "{name}: output differs from an uninterrupted run"
    );
}

#[test]
fn openmpi_vader_stop_and_restart() {
    if !require(
        "openmpi_vader_stop_and_restart",
        &[Prereq::Root, Prereq::Criu, Prereq::OpenMpi],
    ) {
        return;
    }
    stop_and_restart("mpi-ompi-stop", openmpi_cmd);
}

#[test]
fn mpich_stop_and_restart() {
    if !require(
        "mpich_stop_and_restart",
        &[Prereq::Root, Prereq::Criu, Prereq::Mpich],
    ) {
        return;
    }
    stop_and_restart("mpi-mpich-stop", mpich_cmd);
}

/// Continue mode: the job runs on and finishes; the checkpoint is restored
/// afterwards and must finish the same way, although the job's node-local
/// files (shm segments, session dir) and its output are long gone or grown.
#[test]
fn openmpi_continue_then_restart_after_exit() {
    if !require(
        "openmpi_continue_then_restart_after_exit",
        &[Prereq::Root, Prereq::Criu, Prereq::OpenMpi],
    ) {
        return;
    }
    let name = "mpi-ompi-cont";
    let env = Env::new();
    let expected = reference(&env, openmpi_cmd);

    let work = env.workdir("job");
    let mut job = env.run(name, &[], &openmpi_cmd(&work));
    job.wait_for("step 10 ", T);
    env.checkpoint(name, false);
    let first = job.wait(T);
    assert_eq!(
        first.code(),
        0,
        "original run after a continue-mode checkpoint failed:\n{}",
        first.stderr
    );
    assert_eq!(
        first.stdout, expected,
        "original run's output changed by the checkpoint"
    );

    // The checkpoint was taken at some step >= 10: the restored run prints
    // the rest, which must be exactly the tail of the uninterrupted output.
    let second = env.restart(name, &[]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restarted {name} failed:\nstdout:\n{}\nstderr:\n{}",
        second.stdout,
        second.stderr
    );
    assert_eq!(
        result_line(&second.stdout),
        result_line(&expected),
        "{name}: RESULT differs\n{}",
        second.stderr
    );
    assert!(
        expected.ends_with(&second.stdout) && second.stdout.contains("step 40 "),
        "{name}: restarted output is not a tail of the uninterrupted run:\n{}",
        second.stdout
    );
}
