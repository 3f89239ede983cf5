//! Bad input of every kind: unknown jobs, damaged images, uncommitted
//! epochs, a full disk, broken configs, a replaced key, garbage on the
//! control socket. ckpt must refuse clearly, never restore anything it has
//! not verified, and never hurt a running job.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_e2e::{
    assert_suffix_of, example, job_cgroups, json_of, pids_mentioning, reference_run, require,
    result_line, text, Env, Prereq, Started, Tmpfs,
};

const T: Duration = Duration::from_secs(60);

fn all_output(o: &std::process::Output) -> String {
    format!("{}{}", text(&o.stdout), text(&o.stderr))
}

/// A job stopped by `checkpoint --stop` at step 10: epoch 1 committed.
struct Stopped {
    env: Env,
    name: String,
    work: PathBuf,
    expected: String,
    first: String,
}

fn stopped_job(name: &str) -> Stopped {
    let env = Env::new();
    let prog = example("threads");
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), "30".as_ref()], T).stdout);
    let work = env.workdir("job");
    let mut job = env.run(
        name,
        &[],
        &[prog.as_os_str(), work.as_os_str(), "30".as_ref()],
    );
    job.wait_for("step 10 ", T);
    env.checkpoint(name, true);
    let first = job.wait(T);
    assert_eq!(
        first.code(),
        75,
        "run after checkpoint --stop: {}",
        first.stderr
    );
    assert_eq!(env.committed_epochs(name), vec![1]);
    Stopped {
        env,
        name: name.to_string(),
        work,
        expected,
        first: first.stdout,
    }
}

/// `ckpt-job restart ARGS` that must be refused, and must leave nothing
/// behind: no process, no output, no control socket, no freezer cgroup.
fn refused_restart(s: &Stopped, args: &[&str]) -> std::process::Output {
    let before = job_cgroups(&s.name);
    let mut a = vec!["restart"];
    a.extend_from_slice(args);
    a.push(&s.name);
    let out = s.env.ckpt(&a);
    assert_nothing_started(s, &out, &before);
    out
}

fn assert_nothing_started(s: &Stopped, out: &std::process::Output, cgroups_before: &[PathBuf]) {
    assert!(!out.status.success(), "restart should have been refused");
    assert!(
        !text(&out.stdout).contains("step "),
        "a refused restart printed job output:\n{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stderr).contains("restored from"),
        "restart claims a restore:\n{}",
        text(&out.stderr)
    );
    let procs = pids_mentioning(s.work.to_str().unwrap());
    assert!(
        procs.is_empty(),
        "processes of the job exist after a refused restart: {procs:?}"
    );
    assert!(
        !s.env
            .run_dir
            .join("jobs")
            .join(format!("{}.sock", s.name))
            .exists(),
        "control socket left after a refused restart"
    );
    let cg: Vec<_> = job_cgroups(&s.name)
        .into_iter()
        .filter(|c| !cgroups_before.contains(c))
        .collect();
    assert!(
        cg.is_empty(),
        "a refused restart left freezer cgroups behind: {cg:?}"
    );
}

#[test]
fn unknown_job_is_named_in_every_error() {
    if !require(
        "unknown_job_is_named_in_every_error",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let name = "no-such-job-q7";
    let cgroups_before = job_cgroups(name);
    let cmds: Vec<Vec<&str>> = vec![
        vec!["checkpoint", name],
        vec!["checkpoint", "--stop", name],
        vec!["status", name],
        vec!["status", "--json", name],
        vec!["restart", name],
        vec!["restart", "--epoch", "1", name],
        vec!["inspect", name],
        vec!["inspect", "no-such-job-q7@1"],
        vec!["verify", name],
        vec!["verify", "no-such-job-q7@1"],
    ];
    for args in &cmds {
        let out = env.ckpt(args);
        assert!(
            !out.status.success(),
            "`ckpt-job {}` succeeded for a job that does not exist",
            args.join(" ")
        );
        assert!(
            text(&out.stderr).contains(name),
            "`ckpt-job {}`: the error does not name the job:\n{}",
            args.join(" "),
            text(&out.stderr)
        );
    }
    let cg: Vec<_> = job_cgroups(name)
        .into_iter()
        .filter(|c| !cgroups_before.contains(c))
        .collect();
    assert!(
        cg.is_empty(),
        "restart of an unknown job left freezer cgroups behind: {cg:?}"
    );
}

fn flip_byte(path: &Path) {
    let mut b = fs::read(path).unwrap();
    assert!(!b.is_empty(), "{} is empty", path.display());
    let i = b.len() / 2;
    b[i] ^= 0x5a;
    fs::write(path, b).unwrap();
}

/// One flipped byte in `pick`'s file: verify fails naming it, restart
/// refuses naming it and starts nothing; the byte put back, both work.
fn corrupted(name: &str, pick: fn(&str) -> bool) {
    let s = stopped_job(name);
    let dir = s.env.epoch_dir(&s.name, 1);
    let mut victims: Vec<(u64, PathBuf)> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| pick(&e.file_name().to_string_lossy()))
        .map(|e| (e.metadata().unwrap().len(), e.path()))
        .collect();
    victims.sort();
    let (_, victim) = victims
        .pop()
        .unwrap_or_else(|| panic!("no such image file in {}", dir.display()));
    let file_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let original = fs::read(&victim).unwrap();
    flip_byte(&victim);

    let out = s.env.ckpt(&["verify", &s.name]);
    assert!(
        !out.status.success(),
        "verify passed with a flipped byte in {file_name}"
    );
    assert!(
        all_output(&out).contains(&file_name),
        "verify does not name {file_name}:\n{}",
        all_output(&out)
    );
    let out = s.env.ckpt(&["verify", "--json", &format!("{}@1", s.name)]);
    assert!(
        !out.status.success(),
        "verify --json passed with a flipped byte"
    );
    let v = json_of(&out);
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains(&file_name),
        "verify --json does not name {file_name}: {v}"
    );

    let out = refused_restart(&s, &[]);
    assert!(
        text(&out.stderr).contains(&file_name),
        "restart's refusal does not name {file_name}:\n{}",
        text(&out.stderr)
    );

    // Put the byte back: the same epoch verifies and restores.
    fs::write(&victim, original).unwrap();
    let out = s.env.ckpt(&["verify", &s.name]);
    assert!(
        out.status.success(),
        "verify of the repaired epoch failed:\n{}",
        all_output(&out)
    );
    let second = s.env.restart(&s.name, &[]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restart of the repaired epoch failed:\n{}",
        second.stderr
    );
    assert_eq!(s.first + &second.stdout, s.expected);
}

#[test]
fn flipped_byte_in_pages_file_is_refused() {
    if !require(
        "flipped_byte_in_pages_file_is_refused",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    corrupted("bad-pages", |n| {
        n.contains(".pages-") && n.ends_with(".img")
    });
}

#[test]
fn flipped_byte_in_meta_pack_is_refused() {
    if !require(
        "flipped_byte_in_meta_pack_is_refused",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    corrupted("bad-meta", |n| n.ends_with(".meta.pack"));
}

#[test]
fn epoch_without_manifest_is_never_restored() {
    if !require(
        "epoch_without_manifest_is_never_restored",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let s = stopped_job("no-manifest");
    let e2 = s.env.epoch_dir(&s.name, 2);
    fs::create_dir(&e2).unwrap();
    let e1 = s.env.epoch_dir(&s.name, 1);
    // Junk that looks like a half-written epoch: copies of epoch 1's image
    // files (one damaged), and a stray temporary manifest, but no MANIFEST.
    for entry in fs::read_dir(&e1).unwrap().flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n != "MANIFEST" {
            fs::copy(entry.path(), e2.join(&n)).unwrap();
        }
    }
    fs::write(e2.join("MANIFEST.tmp"), b"not a manifest").unwrap();
    fs::write(e2.join("junk"), b"garbage").unwrap();
    // A LATEST that believes in the uncommitted epoch (a crash between the two).
    fs::write(s.env.ckpt_dir.join(&s.name).join("LATEST"), b"2\n").unwrap();

    let out = s.env.ckpt(&["status", "--json", &s.name]);
    assert!(
        out.status.success(),
        "status failed:\n{}",
        text(&out.stderr)
    );
    let v = json_of(&out);
    let epochs = v["epochs"]
        .as_array()
        .unwrap_or_else(|| panic!("no epochs in status: {v}"));
    assert!(
        epochs
            .iter()
            .any(|e| e["epoch"] == 1 && e["committed"] == true),
        "{v}"
    );
    assert!(
        epochs
            .iter()
            .any(|e| e["epoch"] == 2 && e["committed"] == false),
        "epoch 2 not listed as uncommitted: {v}"
    );
    assert_eq!(v["last_epoch"], 1, "{v}");
    let out = s.env.ckpt(&["status", &s.name]);
    let human = text(&out.stdout);
    let line2 = human
        .lines()
        .find(|l| l.starts_with("epoch") && l.contains(" 2:"))
        .unwrap_or_else(|| panic!("no epoch 2 line:\n{human}"));
    assert!(
        line2.contains("incomplete"),
        "epoch 2 not shown as incomplete: {line2}"
    );

    let out = refused_restart(&s, &["--epoch", "2"]);
    assert!(
        text(&out.stderr).contains("epoch 2") && text(&out.stderr).contains("MANIFEST"),
        "restart --epoch 2 does not say why:\n{}",
        text(&out.stderr)
    );
    let out = s.env.ckpt(&["verify", &format!("{}@2", s.name)]);
    assert!(
        !out.status.success(),
        "verify of an uncommitted epoch passed"
    );

    let second = s.env.restart(&s.name, &[]).wait(T);
    assert_eq!(second.code(), 0, "restart failed:\n{}", second.stderr);
    assert!(
        second.stderr.contains("restored from epoch 1"),
        "restart did not restore epoch 1:\n{}",
        second.stderr
    );
    assert_eq!(s.first + &second.stdout, s.expected);
}

/// memhog of 64 MiB, images on a 16 MiB tmpfs: the dump runs out of space.
#[test]
fn disk_full_during_first_checkpoint() {
    if !require(
        "disk_full_during_first_checkpoint",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let fsys = Tmpfs::mount(&env.path().join("small"), "16m");
    let prog = example("memhog");
    let args = [prog.as_os_str(), "64".as_ref(), "5".as_ref()];
    let reference = {
        let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.to_os_string()).collect();
        std::thread::spawn(move || text(&reference_run(&args, T).stdout))
    };
    let name = "full-first";
    let dir = fsys.path.to_str().unwrap();
    let mut job = env.run(name, &["--ckpt-dir", dir], &args);
    job.wait_for("READY", T);

    let out = env.ckpt(&["checkpoint", name]);
    assert!(
        !out.status.success(),
        "a 64 MiB job checkpointed into a 16 MiB filesystem?"
    );
    let msg = text(&out.stderr);
    assert!(
        msg.contains("No space left on device") || msg.contains("space"),
        "the error does not mention space:\n{msg}"
    );
    assert!(
        msg.contains("continues"),
        "the error does not say the job continues:\n{msg}"
    );

    let v = env.status_json(name);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["checkpoints_failed"], 1, "{v}");
    assert_eq!(v["checkpoints_committed"], 0, "{v}");
    let last = v["last_error"].as_str().unwrap_or("");
    assert!(
        last.contains("space"),
        "status' last_error does not say why the checkpoint failed: {last:?}"
    );
    // The aborted epoch's data is gone again.
    assert!(
        fsys.used() < 1 << 20,
        "the aborted epoch still uses {} bytes",
        fsys.used()
    );

    let fin = job.wait(T);
    assert_eq!(
        fin.code(),
        0,
        "memhog failed after the aborted checkpoint:\n{}",
        fin.stderr
    );
    let expected = reference.join().unwrap();
    assert_eq!(fin.stdout, expected);
    assert!(result_line(&fin.stdout).is_some());

    assert!(
        ckpt_e2e::committed_epochs_in(&fsys.path, name).is_empty(),
        "an epoch was committed"
    );
    let out = env.ckpt(&["restart", "--ckpt-dir", dir, name]);
    assert!(
        !out.status.success(),
        "restart from an aborted epoch succeeded"
    );
    assert!(!text(&out.stdout).contains("RESULT"));
    let out = env.ckpt(&["verify", "--ckpt-dir", dir, &format!("{name}@1")]);
    assert!(!out.status.success(), "the aborted epoch verifies");
}

/// Epoch 1 fits; then the filesystem is nearly filled and epoch 2 fails.
/// Epoch 1 stays intact and restorable.
#[test]
fn disk_full_during_second_checkpoint() {
    if !require(
        "disk_full_during_second_checkpoint",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let fsys = Tmpfs::mount(&env.path().join("small"), "8m");
    let prog = example("threads");
    let ref_dir = env.workdir("reference");
    let expected =
        text(&reference_run(&[prog.as_os_str(), ref_dir.as_os_str(), "40".as_ref()], T).stdout);
    let work = env.workdir("job");
    let name = "full-second";
    let dir = fsys.path.to_str().unwrap();
    let mut job = env.run(
        name,
        &["--ckpt-dir", dir],
        &[prog.as_os_str(), work.as_os_str(), "40".as_ref()],
    );
    job.wait_for("step 5 ", T);
    let out = env.ckpt(&["checkpoint", "--json", name]);
    assert!(
        out.status.success(),
        "first checkpoint into the tmpfs failed (tmpfs too small?):\n{}",
        text(&out.stderr)
    );
    assert_eq!(json_of(&out)["epoch"], 1);
    let used_by_epoch1 = fsys.used();

    // Leave 16 KiB.
    let (_, avail) = fsys.space();
    let filler = fsys.path.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let chunk = vec![0x55u8; 1 << 16];
    let mut left = avail.saturating_sub(16 << 10);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    drop(f);
    assert!(
        fsys.space().1 <= 32 << 10,
        "could not fill the tmpfs (epoch 1 used {used_by_epoch1} bytes)"
    );

    job.wait_for("step 12 ", T);
    let out = env.ckpt(&["checkpoint", name]);
    assert!(
        !out.status.success(),
        "checkpoint into a full filesystem succeeded"
    );
    let msg = text(&out.stderr);
    assert!(
        msg.contains("space"),
        "the error does not mention space:\n{msg}"
    );
    let v = env.status_json(name);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["checkpoints_committed"], 1, "{v}");
    assert_eq!(v["checkpoints_failed"], 1, "{v}");

    let fin = job.wait(T);
    assert_eq!(
        fin.code(),
        0,
        "the job failed after the aborted checkpoint:\n{}",
        fin.stderr
    );
    assert_eq!(
        fin.stdout, expected,
        "the aborted checkpoint changed the job's output"
    );
    assert_eq!(ckpt_e2e::committed_epochs_in(&fsys.path, name), vec![1]);

    let out = env.ckpt(&["verify", "--ckpt-dir", dir, name]);
    assert!(
        out.status.success(),
        "epoch 1 no longer verifies:\n{}",
        all_output(&out)
    );
    assert!(
        text(&out.stdout).contains("@1"),
        "verify did not check epoch 1: {}",
        text(&out.stdout)
    );
    let second = env.restart(name, &["--ckpt-dir", dir]).wait(T);
    assert_eq!(
        second.code(),
        0,
        "restart from epoch 1 (filesystem still full) failed:\n{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("restored from epoch 1"),
        "{}",
        second.stderr
    );
    assert_suffix_of(
        &expected,
        &second.stdout,
        "restart from epoch 1 after a failed epoch 2",
    );
}

#[test]
fn malformed_config_is_reported_with_file_key_and_line() {
    if !require(
        "malformed_config_is_reported_with_file_key_and_line",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    // Env writes four lines; ours is line 5.
    let cases = [
        ("unknown key", "keep_epochs = 3\n", "keep_epochs"),
        ("wrong type", "keep = \"three\"\n", "keep"),
        (
            "bad duration",
            "freeze_timeout = \"soon\"\n",
            "freeze_timeout",
        ),
        ("zero keep", "keep = 0\n", "keep"),
    ];
    for (what, line, key) in cases {
        let env = Env::with_config(line);
        let marker = env.path().join("ran");
        let cfg = env.config.to_str().unwrap();
        let marker_s = marker.to_str().unwrap();
        let cmds: Vec<Vec<&str>> = vec![
            vec!["list"],
            vec!["list", "--json"],
            vec!["status", "some-job"],
            vec!["checkpoint", "some-job"],
            vec!["restart", "some-job"],
            vec!["inspect", "some-job"],
            vec!["verify", "some-job"],
            vec![
                "run",
                "--name",
                "some-job",
                "--",
                "/usr/bin/touch",
                marker_s,
            ],
        ];
        for args in &cmds {
            let out = env.ckpt(args);
            let err = text(&out.stderr);
            let cmd = format!("{what}: `ckpt-job {}`", args.join(" "));
            assert!(
                !out.status.success(),
                "{cmd} succeeded with a broken config"
            );
            assert!(
                err.contains(cfg),
                "{cmd}: the error does not name the config file:\n{err}"
            );
            assert!(
                err.contains("line 5"),
                "{cmd}: the error does not give the line:\n{err}"
            );
            assert!(
                err.contains(key),
                "{cmd}: the error does not name the key {key}:\n{err}"
            );
            assert!(
                out.stdout.is_empty(),
                "{cmd} printed something: {}",
                text(&out.stdout)
            );
        }
        assert!(
            !marker.exists(),
            "{what}: `run` ran the job despite a broken config"
        );
    }
}

fn random_key_hex() -> String {
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn replaced_key_is_refused() {
    if !require("replaced_key_is_refused", &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let s = stopped_job("wrong-key");
    let out = s.env.ckpt(&["verify", &s.name]);
    assert!(
        out.status.success(),
        "verify with the right key failed:\n{}",
        all_output(&out)
    );
    let key_file = s.env.path().join("cluster.key");
    let old = fs::read(&key_file).unwrap();
    fs::write(&key_file, format!("{}\n", random_key_hex())).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    assert_ne!(fs::read(&key_file).unwrap(), old);

    let out = s.env.ckpt(&["verify", &s.name]);
    assert!(!out.status.success(), "verify passed with another key");
    let msg = all_output(&out);
    assert!(
        msg.contains("altered or written with another key"),
        "verify does not say why:\n{msg}"
    );
    let out = refused_restart(&s, &[]);
    let msg = text(&out.stderr);
    assert!(
        msg.contains("altered or written with another key"),
        "restart does not say why:\n{msg}"
    );
}

/// Sends `bytes` on a fresh connection (then half-closes) and returns what
/// came back before the job closed the connection.
fn send_raw(sock: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(bytes).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap_or_else(|e| {
        panic!("the job neither answered nor closed within 10 s after {bytes:02x?}: {e}")
    });
    got
}

/// A reply is empty (closed) or one framed message carrying some text.
fn check_reply(what: &str, reply: &[u8], expect: &[&str]) {
    if reply.is_empty() {
        return;
    }
    assert!(
        reply.len() >= 4,
        "{what}: reply is a truncated frame: {reply:02x?}"
    );
    let len = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
    assert_eq!(
        len + 4,
        reply.len(),
        "{what}: reply is not exactly one frame"
    );
    let body = String::from_utf8_lossy(&reply[4..]);
    assert!(
        expect.iter().any(|e| body.contains(e)),
        "{what}: reply does not explain the error: {body:?}"
    );
}

#[test]
fn garbage_on_the_control_socket() {
    if !require(
        "garbage_on_the_control_socket",
        &[Prereq::Root, Prereq::Criu],
    ) {
        return;
    }
    let env = Env::new();
    let name = "garbage";
    let Started {
        mut job, expected, ..
    } = env.start_workload(name, "threads", "40", &[]);
    job.wait_for("step 2 ", T);
    let sock = env.run_dir.join("jobs").join(format!("{name}.sock"));
    assert!(sock.exists());

    // A peer that sends half a header and then just sits there.
    let mut idle = UnixStream::connect(&sock).unwrap();
    idle.write_all(&[0, 0]).unwrap();

    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("half a header", vec![0, 0], vec!["frame", "unreadable"]),
        (
            "truncated body",
            [&100u32.to_be_bytes()[..], &[8, 1, 0x52, 0]].concat(),
            vec!["frame", "unreadable"],
        ),
        (
            "huge length",
            vec![0xff, 0xff, 0xff, 0xff],
            vec!["limit", "unreadable"],
        ),
        (
            "garbage body",
            [&16u32.to_be_bytes()[..], &[0xff; 16]].concat(),
            vec!["malformed", "unreadable"],
        ),
        (
            "empty message",
            0u32.to_be_bytes().to_vec(),
            vec!["version"],
        ),
        (
            "unknown operation",
            // field 1000 (no such op), varint 1
            [&5u32.to_be_bytes()[..], &[0x08, 0x01, 0xc0, 0x3e, 0x01]].concat(),
            vec!["empty request"],
        ),
        (
            "wrong version",
            [&2u32.to_be_bytes()[..], &[0x08, 0x07]].concat(),
            vec!["version"],
        ),
    ];
    for (what, bytes, expect) in &cases {
        let reply = send_raw(&sock, bytes);
        check_reply(what, &reply, expect);
        let v = env.status_json(name);
        assert_eq!(v["state"], "running", "after {what}: {v}");
    }
    // Many bad peers at once do not matter either.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || send_raw(&sock, &[i as u8; 7]))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // With the idle half-frame connection still open, a real checkpoint works.
    let out = env.ckpt(&["checkpoint", "--json", name]);
    assert!(
        out.status.success(),
        "checkpoint after garbage failed:\n{}",
        text(&out.stderr)
    );
    assert_eq!(json_of(&out)["epoch"], 1);
    drop(idle);
    let out = env.ckpt(&["verify", name]);
    assert!(out.status.success(), "{}", all_output(&out));

    let fin = job.wait(T);
    assert_eq!(fin.code(), 0, "{}", fin.stderr);
    assert_eq!(
        fin.stdout, expected,
        "garbage on the control socket changed the job's output"
    );
}
