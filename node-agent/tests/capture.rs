//! Capture planning against real processes: a helper that maps and opens
//! files, a small fork tree, output files that grew or shrank, and (when
//! installed) real 4-rank Open MPI and MPICH jobs.
//!
//! The helper processes are this test binary re-executed with
//! `CKPT_CAPTURE_HELPER` set, running the `helper_process` test.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ckpt_agent::capture::{
    plan, restore_writable_sizes, tree_pids, CaptureError, CaptureRules, WritableFile,
};

const HELPER_ENV: &str = "CKPT_CAPTURE_HELPER";

/// With `CI=true` a missing prerequisite fails the test; otherwise it is
/// skipped with a note on stderr. Returns whether to go on.
fn prerequisite(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing (CI=true): {what}");
    }
    eprintln!("skipping: {what}");
    false
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

fn fd_inode(fd: &impl AsRawFd) -> u64 {
    fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .ino()
}

/// Reads lines of `out` on a thread; waits up to `timeout` for `want`.
fn wait_for_line(out: ChildStdout, want: &str, timeout: Duration) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.trim() == want => return rx,
            Ok(_) => continue,
            Err(e) => panic!("child never printed {want:?}: {e}"),
        }
    }
}

/// Kills (SIGTERM, then SIGKILL) and reaps a child when a test ends, also
/// when an assertion failed.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_helper(mode: &str, envs: &[(&str, &OsStr)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "helper_process",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, mode)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Not a test: the body of the helper processes (returns at once otherwise).
#[test]
fn helper_process() {
    let Ok(mode) = std::env::var(HELPER_ENV) else {
        return;
    };
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap());
    let mut keep = Vec::new();
    match mode.as_str() {
        "files" => {
            // Mapped shared, then closed: only /proc/<pid>/maps shows it.
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(var("SHM_MAPPED"))
                .unwrap();
            f.set_len(4096).unwrap();
            // SAFETY: a fresh 4 KiB shared mapping of a file we just sized
            // to 4 KiB; no Rust reference aliases it, it is never unmapped.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: p points to 4096 writable bytes mapped above.
            unsafe { p.cast::<u8>().write(42) };
            drop(f);
            // Open, not mapped.
            let mut f = fs::File::create(var("SHM_OPEN")).unwrap();
            f.write_all(b"shm").unwrap();
            keep.push(f);
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(var("APPEND_FILE"))
                .unwrap();
            f.write_all(b"hello").unwrap();
            keep.push(f);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(var("WRONLY_FILE"))
                .unwrap();
            f.write_all(b"abc").unwrap();
            keep.push(f);
            keep.push(fs::File::open(var("RDONLY_FILE")).unwrap());
            // Written, but inside a session dir: copied whole, not "writable".
            keep.push(
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_APPEND)
                    .open(var("SESSION_FILE"))
                    .unwrap(),
            );
            keep.push(
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(var("DECLARED_FILE"))
                    .unwrap(),
            );
        }
        "thread_child" => {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut child = Command::new("sleep")
                    .arg("30")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap();
                tx.send(child.id()).unwrap();
                // Stay alive while the child lives: a dead thread's children
                // move to a live thread of the process.
                let _ = child.wait();
            });
            let pid = rx.recv().unwrap();
            std::io::stdout()
                .write_all(format!("\nchild {pid}").as_bytes())
                .unwrap();
        }
        other => panic!("unknown helper mode {other}"),
    }
    let mut out = std::io::stdout();
    // libtest already wrote "test helper_process ... " without a newline.
    out.write_all(b"\nready\n").unwrap();
    out.flush().unwrap();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

#[test]
fn plan_finds_exactly_the_files_the_tree_uses() {
    if !prerequisite(
        Path::new("/dev/shm").is_dir(),
        "/dev/shm is not a directory",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tag = format!("ckpt-capture-test-{}", std::process::id());
    let shm_mapped = PathBuf::from(format!("/dev/shm/{tag}-mapped"));
    let shm_open = PathBuf::from(format!("/dev/shm/{tag}-open"));
    struct Unlink(Vec<PathBuf>);
    impl Drop for Unlink {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = fs::remove_file(p);
            }
        }
    }
    let _unlink = Unlink(vec![shm_mapped.clone(), shm_open.clone()]);

    let (append, wronly, rdonly) = (
        t.join("a-append.log"),
        t.join("b-wronly.dat"),
        t.join("c-rdonly.dat"),
    );
    fs::write(&rdonly, b"input").unwrap();
    for d in ["sess.a/job.1", "sess.a/job.2", "sess.a/job.3"] {
        fs::create_dir_all(t.join(d)).unwrap();
    }
    let session_file = t.join("sess.a/job.1/log");
    fs::write(&session_file, b"x").unwrap();
    let session_env = t.join("sess.a/job.2");
    // Declared by an env var, outside every pattern; a file in it is written.
    let declared = t.join("elsewhere/ompi.n.0/pid.1");
    fs::create_dir_all(&declared).unwrap();
    let declared_file = declared.join("hwloc.sm");

    let mut child = spawn_helper(
        "files",
        &[
            ("SHM_MAPPED", shm_mapped.as_os_str()),
            ("SHM_OPEN", shm_open.as_os_str()),
            ("APPEND_FILE", append.as_os_str()),
            ("WRONLY_FILE", wronly.as_os_str()),
            ("RDONLY_FILE", rdonly.as_os_str()),
            ("SESSION_FILE", session_file.as_os_str()),
            ("CKPT_TEST_SESSION", session_env.as_os_str()),
            ("CKPT_TEST_DECLARED", declared.as_os_str()),
            ("DECLARED_FILE", declared_file.as_os_str()),
        ],
    );
    let stdin_ino = fd_inode(child.stdin.as_ref().unwrap());
    let stdout = child.stdout.take().unwrap();
    let stdout_ino = fd_inode(&stdout);
    let pid = child.id() as i32;
    let child = Reap(child);
    let _lines = wait_for_line(stdout, "ready", Duration::from_secs(30));

    // The mapped file has no descriptor left: plan() must find it in maps.
    let fd_targets: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(!fd_targets.contains(&shm_mapped));

    let rules = CaptureRules {
        shm_roots: vec![PathBuf::from("/dev/shm")],
        session_dir_patterns: vec!["sess.*/job.*".into()],
        tmp_root: t.to_path_buf(),
        session_dir_env_vars: vec!["CKPT_TEST_DECLARED".into()],
    };
    let pids = tree_pids(pid).unwrap();
    assert_eq!(pids, vec![pid]);
    let p = plan(&pids, &rules).unwrap();

    let mut want_copy = vec![
        shm_mapped.clone(),
        shm_open.clone(),
        t.join("sess.a/job.1"),
        session_env.clone(),
        declared.clone(),
    ];
    want_copy.sort();
    assert_eq!(
        p.copy_paths, want_copy,
        "job.3 is not referenced and must not be copied"
    );
    assert_eq!(
        p.writable_files,
        vec![
            WritableFile {
                path: append.clone(),
                size: 5,
                append: true
            },
            WritableFile {
                path: wronly.clone(),
                size: 3,
                append: false
            },
        ]
    );
    assert_eq!(p.stdio_pipes, vec![(0, stdin_ino), (1, stdout_ino)]);
    assert!(p.socket_paths.is_empty(), "{:?}", p.socket_paths);

    // The plan is what the agent stores: it must survive a serde round trip.
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(
        serde_json::from_str::<ckpt_agent::capture::CapturePlan>(&json).unwrap(),
        p
    );
    drop(child);
}

#[test]
fn plan_of_an_empty_pid_list_is_an_error() {
    assert!(matches!(
        plan(&[], &CaptureRules::default()),
        Err(CaptureError::EmptyTree)
    ));
}

#[test]
fn tree_pids_walks_a_fork_tree() {
    let sh = Command::new("sh")
        .args(["-c", "sleep 5 & sleep 5 & wait"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let root = sh.id() as i32;
    let sh = Reap(sh);
    let deadline = Instant::now() + Duration::from_secs(5);
    let pids = loop {
        let pids = tree_pids(root).unwrap();
        let sleeping = pids[1..]
            .iter()
            .filter(|p| {
                fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
            })
            .count();
        if pids.len() == 3 && sleeping == 2 {
            break pids;
        }
        assert!(
            Instant::now() < deadline,
            "tree of sh never became sh + 2 sleeps: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(pids[0], root);
    for p in &pids[1..] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    drop(sh);
}

#[test]
fn tree_pids_finds_children_of_other_threads() {
    let mut child = spawn_helper("thread_child", &[]);
    let root = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let child = Reap(child);
    let lines = wait_for_line(stdout, "ready", Duration::from_secs(30));
    drop(lines);
    // The "child <pid>" line came before "ready"; read it from /proc instead
    // of the channel (already drained): the only `sleep` in the tree.
    let pids = tree_pids(root).unwrap();
    let sleeper = *pids
        .iter()
        .find(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep"))
        .unwrap_or_else(|| panic!("no sleep in tree {pids:?}"));
    let main_children = fs::read_to_string(format!("/proc/{root}/task/{root}/children")).unwrap();
    assert!(
        !main_children
            .split_whitespace()
            .any(|c| c == sleeper.to_string()),
        "test is moot: the sleep is a child of the main thread"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleeper),
        nix::sys::signal::Signal::SIGKILL,
    );
    drop(child);
}

#[test]
fn restore_truncates_grown_files_and_refuses_shrunk_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let grown = tmp.path().join("grown.log");
    let same = tmp.path().join("same.log");
    let shrunk = tmp.path().join("shrunk.log");
    fs::write(&grown, b"0123456789").unwrap();
    fs::write(&same, b"0123").unwrap();
    fs::write(&shrunk, b"01").unwrap();
    let wf = |p: &Path| WritableFile {
        path: p.to_path_buf(),
        size: 4,
        append: true,
    };

    // All files are checked before any is touched.
    let err = restore_writable_sizes(&[wf(&grown), wf(&shrunk)]).unwrap_err();
    assert!(
        matches!(
            err,
            CaptureError::Shrunk {
                expected: 4,
                actual: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(shrunk.to_str().unwrap()), "{err}");
    assert_eq!(fs::read(&grown).unwrap(), b"0123456789");

    let missing = tmp.path().join("missing.log");
    let err = restore_writable_sizes(&[wf(&missing)]).unwrap_err();
    assert!(matches!(err, CaptureError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");

    let err = restore_writable_sizes(&[wf(tmp.path())]).unwrap_err();
    assert!(matches!(err, CaptureError::NotRegular { .. }), "{err:?}");

    restore_writable_sizes(&[wf(&grown), wf(&same)]).unwrap();
    assert_eq!(fs::read(&grown).unwrap(), b"0123");
    assert_eq!(fs::read(&same).unwrap(), b"0123");
}

const MPI_RING_C: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long tok = 0;
    int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    if (rank == 0) {
        tok = 1;
        MPI_Send(&tok, 1, MPI_LONG, next, 0, MPI_COMM_WORLD);
        MPI_Recv(&tok, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
        MPI_Recv(&tok, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        tok++;
        MPI_Send(&tok, 1, MPI_LONG, next, 0, MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) { printf("ready\n"); fflush(stdout); }
    sleep(atoi(argv[1]));
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
"#;

/// Compiles the ring with `mpicc`, runs it with 4 ranks and returns the
/// launcher (killed on drop), its pid, the inode of its stdout pipe, and the
/// temp dir holding the binary.
fn start_mpi_ring(mpicc: &str, mut mpirun: Command) -> (Reap, i32, u64, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ring.c");
    let exe = dir.path().join("ring");
    fs::write(&src, MPI_RING_C).unwrap();
    let st = Command::new(mpicc)
        .arg("-O2")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "{mpicc} failed: {st}");
    let mut child = mpirun
        .arg(&exe)
        .arg("60")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let ino = fd_inode(&stdout);
    // Keep mpirun's stderr drained (and shown, for diagnosis).
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        if !s.is_empty() {
            eprintln!("launcher stderr: {s}");
        }
    });
    let child = Reap(child);
    let rx = wait_for_line(stdout, "ready", Duration::from_secs(120));
    std::mem::forget(rx);
    (child, pid, ino, dir)
}

#[test]
fn open_mpi_job_plan_has_vader_segments_and_session_dir() {
    if !prerequisite(
        in_path("mpirun.openmpi") && in_path("mpicc.openmpi"),
        "mpirun.openmpi/mpicc.openmpi not in PATH",
    ) {
        return;
    }
    let mut mpirun = Command::new("mpirun.openmpi");
    mpirun.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "4",
        "--mca",
        "btl",
        "self,vader",
    ]);
    let (job, root, stdout_ino, _dir) = start_mpi_ring("mpicc.openmpi", mpirun);

    let pids = tree_pids(root).unwrap();
    assert_eq!(pids[0], root);
    assert!(pids.len() >= 5, "mpirun + 4 ranks expected, got {pids:?}");
    let p = plan(&pids, &CaptureRules::default()).unwrap();
    eprintln!("Open MPI plan: {p:#?}");

    let vader: Vec<_> = p
        .copy_paths
        .iter()
        .filter(|c| c.to_string_lossy().starts_with("/dev/shm/vader_segment."))
        .collect();
    assert_eq!(
        vader.len(),
        4,
        "one vader segment per rank: {:?}",
        p.copy_paths
    );
    let sessions: Vec<_> = p
        .copy_paths
        .iter()
        .filter(|c| c.starts_with("/tmp"))
        .collect();
    assert_eq!(sessions.len(), 1, "{:?}", p.copy_paths);
    let s = sessions[0];
    assert_eq!(
        s.file_name().unwrap().to_string_lossy(),
        format!("pid.{root}"),
        "{s:?}"
    );
    assert!(
        s.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ompi."),
        "{s:?}"
    );
    assert!(s.is_dir());
    assert!(
        s.join(format!("pmix_dstor_ds21_{root}")).is_dir(),
        "PMIx dstore expected in {s:?}"
    );
    assert_eq!(p.copy_paths.len(), 5, "{:?}", p.copy_paths);
    // hwloc.sm is open O_RDWR by mpirun, but lives in the copied session dir.
    assert!(p.writable_files.is_empty(), "{:?}", p.writable_files);
    assert!(
        p.stdio_pipes.contains(&(1, stdout_ino)),
        "{:?}",
        p.stdio_pipes
    );
    drop(job);
}

#[test]
fn mpich_job_plan_has_nothing_node_local() {
    if !prerequisite(
        in_path("mpirun.mpich") && in_path("mpicc.mpich"),
        "mpirun.mpich/mpicc.mpich not in PATH",
    ) {
        return;
    }
    let mut mpirun = Command::new("mpirun.mpich");
    // SysV shm cannot be dumped outside an IPC namespace (DESIGN.md).
    mpirun.env("UCX_TLS", "^sysv").args(["-np", "4"]);
    let (job, root, _ino, _dir) = start_mpi_ring("mpicc.mpich", mpirun);
    let pids = tree_pids(root).unwrap();
    assert!(
        pids.len() >= 6,
        "mpiexec + hydra proxy + 4 ranks expected, got {pids:?}"
    );
    let p = plan(&pids, &CaptureRules::default()).unwrap();
    eprintln!("MPICH plan: {p:#?}");
    // Its /dev/shm segments are unlinked while mapped (CRIU keeps them as
    // ghost files) and hydra puts nothing under /tmp.
    assert!(p.copy_paths.is_empty(), "{:?}", p.copy_paths);
    assert!(p.writable_files.is_empty(), "{:?}", p.writable_files);
    drop(job);
}
