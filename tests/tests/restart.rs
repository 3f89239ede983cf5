//! Restarting later, from other epochs, and against a hostile machine:
//! continue-mode checkpoints restored after the original ended, restores
//! while the original host PIDs are taken, a middle epoch, and periodic
//! checkpoints with retention. Every restored job must finish with exactly
//! the output of an uninterrupted run.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::{
    assert_suffix_of, example, reference_run, require, result_line, text, tree_pids, Env,
    PidSquatters, Prereq, Started,
};

const T: Duration = Duration::from_secs(60);

/// The regular files directly in `dir`, by name.
fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The workload's output files must be byte-identical to the reference run's.
fn assert_same_files(reference: &Path, work: &Path, what: &str) {
    let want = files_in(reference);
    let got = files_in(work);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{what}: the workdir holds other files than the reference run's"
    );
    for (name, bytes) in &want {
        assert!(
            got[name] == *bytes,
            "{what}: {name} differs from the reference run's ({} vs {} bytes)",
            got[name].len(),
            bytes.len()
        );
    }
}

/// Step number of the first `step N` line.
fn first_step(out: &str) -> u32 {
    out.lines()
        .find_map(|l| {
            l.strip_prefix("step ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no step line in:\n{out}"))
}

/// Continue-mode checkpoint at step 10; the original runs to its end; then
/// the epoch is restored and must finish the same way again.
fn continue_then_restart_later(feature: &str, steps: &str) {
    if !require(
        &format!("continue_then_restart_later_{feature}"),
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let prog = example(feature);
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), steps.as_ref()], T).stdout);

    let work = env.workdir("job");
    let name = format!("later-{feature}");
    let mut job = env.run(
        &name,
        &[],
        &[prog.as_os_str(), work.as_os_str(), steps.as_ref()],
    );
    job.wait_for("step 10 ", T);
    env.checkpoint(&name, false);
    let first = job.wait(T);
    assert_eq!(first.code(), 0, "original run failed:\n{}", first.stderr);
    assert_eq!(
        first.stdout, expected,
        "{feature}: the checkpointed (continue mode) run's output differs"
    );
    assert_same_files(&ref_dir, &work, "after the original run");

    let second = env.restart(&name, &[]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restart of {feature} failed:\n{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("restored from epoch 1"),
        "restart does not say where it restored from:\n{}",
        second.stderr
    );
    assert_suffix_of(
        &expected,
        &second.stdout,
        &format!("{feature} restarted after the original ended"),
    );
    assert!(
        first_step(&second.stdout) > 10,
        "restart began at step {}, before the checkpoint",
        first_step(&second.stdout)
    );
    assert_same_files(&ref_dir, &work, "after the restarted run");
}

#[test]
fn continue_checkpoint_restart_after_end_tcp_loopback() {
    continue_then_restart_later("tcp_loopback", "30");
}

#[test]
fn continue_checkpoint_restart_after_end_files() {
    continue_then_restart_later("files", "30");
}

/// The restored tree must not need the host PIDs it had: they are all
/// taken by other processes when it comes back.
#[test]
fn restart_while_original_pids_are_taken() {
    if !require(
        "restart_while_original_pids_are_taken",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let name = "pids-taken";
    let Started {
        mut job, expected, ..
    } = env.start_workload(name, "forktree", "30", &[]);
    job.wait_for("step 10 ", T);
    let root = env.root_pid(name);
    let pids = tree_pids(root);
    assert!(
        pids.len() >= 4,
        "forktree should be init + 4 processes, found {pids:?}"
    );
    env.checkpoint(name, true);
    let first = job.wait(T);
    assert_eq!(
        first.code(),
        75,
        "run after checkpoint --stop: {}",
        first.stderr
    );

    let mut squatters = PidSquatters::default();
    for p in &pids {
        assert!(
            squatters.occupy(*p),
            "could not occupy host pid {p} (ns_last_pid)"
        );
    }
    assert_eq!(squatters.pids(), pids);

    let mut restarted = env.restart(name, &[]);
    restarted.wait_for("step 20 ", T);
    let new_pids = tree_pids(env.root_pid(name));
    for p in &new_pids {
        assert!(
            !pids.contains(p),
            "restored tree uses pid {p}, which a sleeper holds?"
        );
    }
    let second = restarted.wait(T);
    assert_eq!(
        second.code(),
        0,
        "restart with the original pids taken failed:\n{}",
        second.stderr
    );
    assert_eq!(
        first.stdout + &second.stdout,
        expected,
        "output differs from an uninterrupted run"
    );
    // The sleepers were not disturbed.
    for p in &pids {
        assert!(
            Path::new(&format!("/proc/{p}")).exists(),
            "sleeper {p} is gone"
        );
    }
}

/// Three continue-mode epochs in one run; a middle one is restored after
/// the original ended (output files must be put back to that epoch).
#[test]
fn restart_from_a_middle_epoch() {
    if !require("restart_from_a_middle_epoch", &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let env = Env::new();
    let prog = example("files");
    let steps = "40";
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), steps.as_ref()], T).stdout);

    let work = env.workdir("job");
    let name = "middle";
    let mut job = env.run(
        name,
        &[],
        &[prog.as_os_str(), work.as_os_str(), steps.as_ref()],
    );
    for (i, at) in ["step 8 ", "step 16 ", "step 24 "].iter().enumerate() {
        job.wait_for(at, T);
        let out = env.ckpt(&["checkpoint", "--json", name]);
        assert!(
            out.status.success(),
            "checkpoint {} failed:\n{}",
            i + 1,
            text(&out.stderr)
        );
        let v = ckpt_e2e::json_of(&out);
        assert_eq!(v["epoch"], i as u64 + 1, "checkpoint --json: {v}");
    }
    let first = job.wait(T);
    assert_eq!(first.code(), 0, "original run failed:\n{}", first.stderr);
    assert_eq!(first.stdout, expected);
    assert_eq!(env.committed_epochs(name), vec![1, 2, 3]);

    let second = env.restart(name, &["--epoch", "2"]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restart --epoch 2 failed:\n{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("restored from epoch 2"),
        "stderr:\n{}",
        second.stderr
    );
    assert_suffix_of(&expected, &second.stdout, "restart --epoch 2");
    let s = first_step(&second.stdout);
    assert!(
        (17..=25).contains(&s),
        "epoch 2 was taken at step 16; the restart began at step {s}"
    );
    assert_same_files(&ref_dir, &work, "after restarting epoch 2");
}

/// `--interval 1s --keep 2`: several periodic epochs, only two kept, the
/// newest restorable.
#[test]
fn periodic_checkpoints_with_retention() {
    if !require(
        "periodic_checkpoints_with_retention",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let prog = example("threads");
    let steps = "40";
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), steps.as_ref()], T).stdout);

    let work = env.workdir("job");
    let name = "periodic";
    let mut job = env.run(
        name,
        &["--interval", "1s", "--keep", "2"],
        &[prog.as_os_str(), work.as_os_str(), steps.as_ref()],
    );
    job.wait_for("step 1 ", T);
    let start = Instant::now();
    let mut committed = 0;
    let mut most_on_disk = 0;
    while !job.out().contains("RESULT ") && start.elapsed() < T {
        let out = env.ckpt(&["status", "--json", name]);
        if out.status.success() {
            let v = ckpt_e2e::json_of(&out);
            if v["state"] != "not running" {
                committed = committed.max(v["checkpoints_committed"].as_u64().unwrap_or(0));
                assert_eq!(v["interval_seconds"], 1, "{v}");
                assert_eq!(v["keep"], 2, "{v}");
            }
        }
        most_on_disk = most_on_disk.max(env.committed_epochs(name).len());
        sleep(Duration::from_millis(100));
    }
    let first = job.wait(T);
    assert_eq!(first.code(), 0, "periodic run failed:\n{}", first.stderr);
    assert_eq!(
        first.stdout, expected,
        "periodic checkpoints changed the job's output"
    );
    assert!(
        committed >= 3,
        "only {committed} periodic epochs committed during a ~4 s run with --interval 1s\n{}",
        first.stderr
    );
    let on_disk = env.committed_epochs(name);
    assert!(
        !on_disk.is_empty() && on_disk.len() <= 2,
        "--keep 2 but committed epochs on disk: {on_disk:?}"
    );
    assert!(
        most_on_disk <= 2,
        "at one point {most_on_disk} committed epochs were on disk with --keep 2"
    );
    let newest = *on_disk.last().unwrap();
    assert!(newest >= 3, "newest epoch is {newest}");

    let second = env.restart(name, &[]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restart from the newest periodic epoch failed:\n{}",
        second.stderr
    );
    assert!(
        second
            .stderr
            .contains(&format!("restored from epoch {newest}")),
        "stderr:\n{}",
        second.stderr
    );
    assert_suffix_of(
        &expected,
        &second.stdout,
        "restart from the newest periodic epoch",
    );
    assert_eq!(result_line(&second.stdout), result_line(&expected));
}

/// Two jobs started from the same directory, checkpointed at the same
/// moment, several times: every epoch must commit (CRIU must not trip over
/// the other dump's scratch files), and both jobs finish unchanged.
#[test]
fn simultaneous_checkpoints_of_jobs_sharing_a_cwd() {
    if !require(
        "simultaneous_checkpoints_of_jobs_sharing_a_cwd",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let prog = example("threads");
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), "40".as_ref()], T).stdout);
    // Both jobs are started from the same directory.
    let cwd = env.workdir("shared-cwd");
    let names = ["twin-a", "twin-b"];
    let mut jobs: Vec<_> = names
        .iter()
        .map(|n| {
            let w = env.workdir(n);
            env.run_in(
                n,
                &cwd,
                &[],
                &[prog.as_os_str(), w.as_os_str(), "40".as_ref()],
            )
        })
        .collect();
    for j in &mut jobs {
        j.wait_for("step 3 ", T);
    }
    let mut failures = Vec::new();
    for round in 1..=10 {
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = names
                .iter()
                .map(|n| s.spawn(|| env.ckpt(&["checkpoint", n])))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (n, o) in names.iter().zip(outs) {
            if !o.status.success() {
                failures.push(format!(
                    "round {round}, {n}: {}",
                    text(&o.stderr).lines().next().unwrap_or("")
                ));
            }
        }
        sleep(Duration::from_millis(100));
    }
    for (n, j) in names.iter().zip(jobs) {
        let fin = j.wait(T);
        assert_eq!(fin.code(), 0, "{n}: {}", fin.stderr);
        assert_eq!(fin.stdout, expected, "{n}: output changed");
    }
    assert!(
        failures.is_empty(),
        "simultaneous checkpoints failed:\n{}",
        failures.join("\n")
    );
}
