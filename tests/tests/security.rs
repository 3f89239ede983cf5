//! Who may do what: only root and a job's owner may checkpoint it, a job
//! run with `--user` really runs as that user and its images are private to
//! it, and running jobs needs root.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use ckpt_e2e::{
    as_user, example, json_of, proc_uid, reference_run, require, text, tree_pids, Env, Prereq,
    Started,
};

const T: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;

/// The test Env is private (0700): let other users reach its config and
/// the job's control socket.
fn open_up(env: &Env) {
    for d in [env.path(), env.run_dir.as_path(), &env.run_dir.join("jobs")] {
        if d.exists() {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    fs::set_permissions(&env.config, fs::Permissions::from_mode(0o644)).unwrap();
}

fn denied(out: &std::process::Output) -> bool {
    !out.status.success()
        && text(&out.stderr)
            .to_lowercase()
            .contains("permission denied")
}

#[test]
fn non_root_cannot_checkpoint_a_root_job() {
    if !require(
        "non_root_cannot_checkpoint_a_root_job",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let name = "roots-job";
    let Started {
        mut job, expected, ..
    } = env.start_workload(name, "threads", "30", &[]);
    job.wait_for("step 2 ", T);
    open_up(&env);

    for args in [
        vec!["checkpoint", name],
        vec!["checkpoint", "--stop", name],
        vec!["checkpoint", "--json", name],
    ] {
        let out = env.ckpt_as(NOBODY, NOBODY, &args);
        assert!(
            denied(&out),
            "uid {NOBODY} `ckpt-job {}`: not refused with 'permission denied':\n{}",
            args.join(" "),
            text(&out.stderr)
        );
    }
    let v = env.status_json(name);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["checkpoints_committed"], 0, "{v}");
    assert_eq!(
        v["checkpoints_failed"], 0,
        "a refused request counted as a checkpoint attempt: {v}"
    );
    assert!(
        !env.ckpt_dir.join(name).exists(),
        "a refused checkpoint created an image directory"
    );

    let fin = job.wait(T);
    assert_eq!(fin.code(), 0, "{}", fin.stderr);
    assert_eq!(fin.stdout, expected, "the job was disturbed");
}

#[test]
fn job_run_as_nobody_is_owned_by_nobody() {
    if !require(
        "job_run_as_nobody_is_owned_by_nobody",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let prog = example("forktree");
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), "30".as_ref()], T).stdout);
    let work = env.workdir("job");
    std::os::unix::fs::chown(&work, Some(NOBODY), Some(NOBODY)).unwrap();
    for d in [env.path().to_path_buf(), env.path().join("work")] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let name = "nobodys-job";
    let mut job = env.run(
        name,
        &["--user", "nobody"],
        &[prog.as_os_str(), work.as_os_str(), "30".as_ref()],
    );
    job.wait_for("step 3 ", T);
    open_up(&env);

    let v = env.status_json(name);
    assert_eq!(v["owner_uid"], NOBODY, "{v}");
    let root = i32::try_from(v["pid"].as_i64().unwrap()).unwrap();
    let pids = tree_pids(root);
    assert!(pids.len() >= 2, "no job processes under {root}: {pids:?}");
    for p in pids.iter().filter(|p| **p != root) {
        assert_eq!(
            proc_uid(*p),
            Some(NOBODY),
            "job process {p} does not run as nobody"
        );
    }

    let out = env.ckpt_as(OTHER, OTHER, &["checkpoint", name]);
    assert!(
        denied(&out),
        "uid {OTHER} may checkpoint nobody's job:\n{}",
        text(&out.stderr)
    );
    let out = env.ckpt_as(NOBODY, NOBODY, &["checkpoint", "--json", name]);
    assert!(
        out.status.success(),
        "nobody cannot checkpoint its own job:\n{}",
        text(&out.stderr)
    );
    assert_eq!(json_of(&out)["epoch"], 1);

    let job_dir = env.ckpt_dir.join(name);
    let epoch_dir = env.epoch_dir(name, 1);
    for d in [&job_dir, &epoch_dir] {
        let m = fs::metadata(d).unwrap();
        assert_eq!(m.uid(), NOBODY, "{} is not owned by nobody", d.display());
        assert_eq!(
            m.mode() & 0o777,
            0o700,
            "{} has mode {:o}",
            d.display(),
            m.mode() & 0o777
        );
    }
    let files: Vec<_> = fs::read_dir(&epoch_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(files.iter().any(|f| f.ends_with("MANIFEST")), "{files:?}");
    let cat = Path::new("/bin/cat");
    for f in &files {
        let mut c = as_user(OTHER, OTHER, cat);
        c.arg(f);
        let out = ckpt_e2e::run_with_timeout(c, T);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "uid {OTHER} can read {}",
            f.display()
        );
    }
    let mut ls = as_user(OTHER, OTHER, Path::new("/bin/ls"));
    ls.arg(&job_dir);
    assert!(
        !ckpt_e2e::run_with_timeout(ls, T).status.success(),
        "uid {OTHER} can list {}",
        job_dir.display()
    );
    // Nor can it inspect or verify the epoch through ckpt-job.
    for cmd in ["inspect", "verify"] {
        let out = env.ckpt_as(OTHER, OTHER, &[cmd, name]);
        assert!(
            !out.status.success(),
            "uid {OTHER} `ckpt-job {cmd}` of nobody's job succeeded:\n{}",
            text(&out.stdout)
        );
    }

    let fin = job.wait(T);
    assert_eq!(fin.code(), 0, "{}", fin.stderr);
    assert_eq!(fin.stdout, expected);
}

#[test]
fn run_and_restart_need_root() {
    if !require("run_and_restart_need_root", &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let env = Env::new();
    open_up(&env);
    let scratch = env.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    std::os::unix::fs::chown(&scratch, Some(NOBODY), Some(NOBODY)).unwrap();
    let marker = scratch.join("ran");
    let out = env.ckpt_as(
        NOBODY,
        NOBODY,
        &[
            "run",
            "--name",
            "users-job",
            "--",
            "/usr/bin/touch",
            marker.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "`ckpt-job run` as uid {NOBODY} succeeded"
    );
    let msg = text(&out.stderr);
    assert!(
        msg.contains("root"),
        "the refusal does not say that root is needed:\n{msg}"
    );
    assert!(!marker.exists(), "the job ran anyway");
    let out = env.ckpt_as(NOBODY, NOBODY, &["restart", "users-job"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("root"),
        "restart as non-root:\n{}",
        text(&out.stderr)
    );
    let out = env.ckpt_as(
        NOBODY,
        NOBODY,
        &[
            "run",
            "--user",
            "root",
            "--",
            "/usr/bin/touch",
            marker.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("root"),
        "run --user as non-root:\n{}",
        text(&out.stderr)
    );
    assert!(!marker.exists(), "the job ran anyway");
}
