//! Harness for the end-to-end tests: real `ckpt-job`, real CRIU, real
//! processes (and, in later suites, real MPI and several network-namespace
//! "nodes"). Every test gets a private config, image directory and run
//! directory, and cleans up after itself, also when it fails.
//!
//! Prerequisites (root, CRIU, MPI) are checked by [`require`]: under
//! `CI=true` a missing one fails the test; elsewhere the test says why it is
//! skipped and returns.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod bench;
pub mod cluster;
pub mod daemons;
pub mod slurm;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    Root,
    Criu,
    OpenMpi,
    Mpich,
    /// OpenSSH's server and ssh-keygen (agents started over SSH).
    Sshd,
    /// Slurm's daemons and clients, and munge (tests/src/slurm.rs).
    Slurm,
}

fn missing(p: Prereq) -> Option<String> {
    let have = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match p {
        Prereq::Root => {
            (!nix::unistd::geteuid().is_root()).then(|| "not running as root".to_string())
        }
        Prereq::Criu => {
            let ok = Command::new(criu_bin())
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            (!ok).then(|| format!("no working criu at {}", criu_bin()))
        }
        Prereq::OpenMpi => (!have("mpirun.openmpi") || !have("mpicc.openmpi"))
            .then(|| "Open MPI (mpirun.openmpi, mpicc.openmpi) not installed".into()),
        Prereq::Mpich => (!have("mpirun.mpich") || !have("mpicc.mpich"))
            .then(|| "MPICH (mpirun.mpich, mpicc.mpich) not installed".into()),
        Prereq::Sshd => (!Path::new("/usr/sbin/sshd").exists() || !have("ssh-keygen"))
            .then(|| "OpenSSH server (/usr/sbin/sshd, ssh-keygen) not installed".into()),
        Prereq::Slurm => {
            let gone: Vec<&str> = [
                "slurmctld",
                "slurmd",
                "munged",
                "sbatch",
                "scontrol",
                "setpriv",
            ]
            .into_iter()
            .filter(|b| !have(b))
            .collect();
            (!gone.is_empty()).then(|| {
                format!(
                    "Slurm/munge ({}) not installed (slurmctld slurmd slurm-client munge)",
                    gone.join(", ")
                )
            })
        }
    }
}

/// The CRIU binary the bootstrap installs, else `criu` on PATH.
pub fn criu_bin() -> String {
    if Path::new("/usr/local/sbin/criu").exists() {
        "/usr/local/sbin/criu".into()
    } else {
        "criu".into()
    }
}

/// True if every prerequisite is there. Otherwise: under `CI=true`, panics
/// (a CI run must not pass by skipping); elsewhere prints why and returns
/// false so the test can return early.
pub fn require(test: &str, prereqs: &[Prereq]) -> bool {
    let why: Vec<String> = prereqs.iter().filter_map(|p| missing(*p)).collect();
    if why.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: prerequisite missing: {} (run scripts/bootstrap.sh as root)",
        why.join("; ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// Directory of the built binaries (`ckpt-job`, `ckpt-init`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CKPT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("debug");
    for b in ["ckpt-job", "ckpt-init"] {
        assert!(
            dir.join(b).exists(),
            "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
            dir.join(b).display()
        );
    }
    dir
}

pub fn ckpt_job_bin() -> PathBuf {
    bin_dir().join("ckpt-job")
}

/// The example workloads, built once per test binary with `make`.
pub fn examples() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let out = bin_dir().join("examples");
        let st = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&src)
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("running make for examples/");
        assert!(st.success(), "building examples/ failed");
        out
    })
}

pub fn example(name: &str) -> PathBuf {
    let p = examples().join(name);
    assert!(p.exists(), "example {} not built", p.display());
    p
}

/// A private ckpt installation for one test: config, keys, images, sockets.
#[derive(Debug)]
pub struct Env {
    pub dir: TempDir,
    pub config: PathBuf,
    pub ckpt_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        Self::with_config("")
    }

    /// `extra` is appended to the generated config.
    pub fn with_config(extra: &str) -> Self {
        // /var/tmp: a real disk filesystem, like a shared FS would be.
        let dir = tempfile::Builder::new()
            .prefix("ckpt-e2e-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = dir.path();
        let ckpt_dir = root.join("images");
        let run_dir = root.join("run");
        let config = root.join("ckpt.toml");
        let mut text = format!(
            "ckpt_dir = \"{}\"\nkey_file = \"{}\"\nrun_dir = \"{}\"\nstaging_dir = \"{}\"\n",
            ckpt_dir.display(),
            root.join("cluster.key").display(),
            run_dir.display(),
            root.join("staging").display()
        );
        text.push_str(extra);
        fs::write(&config, text).unwrap();
        Self {
            dir,
            config,
            ckpt_dir,
            run_dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh work directory for a workload.
    pub fn workdir(&self, name: &str) -> PathBuf {
        let d = self.path().join("work").join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// `ckpt-job --config <ours>`.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(ckpt_job_bin());
        c.arg("--config").arg(&self.config);
        c
    }

    /// Runs a short ckpt-job command to completion.
    pub fn ckpt<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let mut c = self.cmd();
        c.args(args).stdin(Stdio::null());
        run_with_timeout(c, Duration::from_secs(120))
    }

    /// `ckpt-job checkpoint [--stop] NAME`, which must succeed.
    pub fn checkpoint(&self, name: &str, stop: bool) -> Output {
        let mut args = vec!["checkpoint"];
        if stop {
            args.push("--stop");
        }
        args.push(name);
        let out = self.ckpt(&args);
        assert!(
            out.status.success(),
            "checkpoint of {name} failed:\n{}",
            text(&out.stderr)
        );
        out
    }

    /// Starts `ckpt-job run [opts] --name NAME -- CMD…` in the background.
    pub fn run<S: AsRef<OsStr>>(&self, name: &str, opts: &[&str], command: &[S]) -> Job {
        let mut c = self.cmd();
        c.arg("run")
            .arg("--name")
            .arg(name)
            .args(opts)
            .arg("--")
            .args(command);
        Job::spawn(c, self.path(), &format!("{name}.run"))
    }

    /// The reference output of the example `program` run uninterrupted for
    /// `steps` steps, then the same workload started as job `name` under
    /// `ckpt-job run [opts]`, in a fresh work directory.
    pub fn start_workload(&self, name: &str, program: &str, steps: &str, opts: &[&str]) -> Started {
        let prog = example(program);
        let ref_dir = self.workdir("reference");
        let expected = text(
            &reference_run(
                &[prog.as_os_str(), ref_dir.as_os_str(), steps.as_ref()],
                T_REFERENCE,
            )
            .stdout,
        );
        let work = self.workdir("job");
        let job = self.run(
            name,
            opts,
            &[prog.as_os_str(), work.as_os_str(), steps.as_ref()],
        );
        Started {
            job,
            expected,
            prog,
            work,
        }
    }

    /// Starts `ckpt-job restart [opts] NAME` in the background.
    pub fn restart(&self, name: &str, opts: &[&str]) -> Job {
        let mut c = self.cmd();
        c.arg("restart").args(opts).arg(name);
        Job::spawn(c, self.path(), &format!("{name}.restart"))
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// How long an uninterrupted reference run may take.
const T_REFERENCE: Duration = Duration::from_secs(120);

/// A workload started by [`Env::start_workload`].
#[derive(Debug)]
pub struct Started {
    pub job: Job,
    /// Stdout of an uninterrupted run.
    pub expected: String,
    pub prog: PathBuf,
    pub work: PathBuf,
}

/// A `ckpt-job run`/`restart` in the background, its output in files.
#[derive(Debug)]
pub struct Job {
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// How a job ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

impl Job {
    fn spawn(mut c: Command, dir: &Path, tag: &str) -> Self {
        let mut n = 0;
        let (stdout, stderr) = loop {
            let o = dir.join(format!("{tag}.{n}.out"));
            if !o.exists() {
                break (o, dir.join(format!("{tag}.{n}.err")));
            }
            n += 1;
        };
        c.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap());
        let child = c.spawn().expect("spawning ckpt-job");
        Self {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn out(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn err(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stdout contains `needle` (panics after `timeout`, or if
    /// the job ends first).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.out().contains(needle) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "job ended ({st}) before printing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                        self.out(),
                        self.err()
                    );
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the end (panics after `timeout`, killing the job).
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "job did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.out(),
                    self.err()
                );
            }
            sleep(Duration::from_millis(20));
        };
        Finished {
            status,
            stdout: self.out(),
            stderr: self.err(),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // SIGTERM first: the supervisor passes it to the job and cleans up
        // (socket, cgroups, node-local dirs) when the job ends. SIGKILL after
        // a grace period; the job's init then dies with its supervisor
        // (PDEATHSIG).
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command to completion with a deadline (killed and panics after).
pub fn run_with_timeout(mut c: Command, timeout: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{c:?} did not finish within {timeout:?}");
        }
        sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Runs a workload directly (no ckpt) for the reference output.
pub fn reference_run<S: AsRef<OsStr>>(command: &[S], timeout: Duration) -> Output {
    let mut c = Command::new(command[0].as_ref());
    c.args(&command[1..]).stdin(Stdio::null());
    let out = run_with_timeout(c, timeout);
    assert!(
        out.status.success(),
        "reference run of {:?} failed:\n{}",
        command[0].as_ref(),
        text(&out.stderr)
    );
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The line `RESULT …` of a workload's output.
pub fn result_line(out: &str) -> Option<&str> {
    out.lines().rev().find(|l| l.starts_with("RESULT "))
}

// ---------------------------------------------------------------------------
// Helpers for the restart / bad-input / security / CLI suites.

/// Parses a command's stdout as JSON (panics with the output if it is not).
pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\nstdout:\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

impl Env {
    /// `ckpt-job status --json NAME`, which must succeed.
    pub fn status_json(&self, name: &str) -> serde_json::Value {
        let out = self.ckpt(&["status", "--json", name]);
        assert!(
            out.status.success(),
            "status --json {name} failed:\n{}",
            text(&out.stderr)
        );
        json_of(&out)
    }

    /// Host pid of a running job's root (its init), from `status --json`.
    pub fn root_pid(&self, name: &str) -> i32 {
        let v = self.status_json(name);
        let pid = v["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("status of {name} has no pid: {v}"));
        i32::try_from(pid).unwrap()
    }

    /// Runs a short `ckpt-job` command as another user (`setpriv`).
    pub fn ckpt_as<S: AsRef<OsStr>>(&self, uid: u32, gid: u32, args: &[S]) -> Output {
        let mut c = as_user(uid, gid, &ckpt_job_bin());
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null());
        run_with_timeout(c, Duration::from_secs(120))
    }

    /// Like [`Env::run`], with the supervisor (and so the job) started in `cwd`.
    pub fn run_in<S: AsRef<OsStr>>(
        &self,
        name: &str,
        cwd: &Path,
        opts: &[&str],
        command: &[S],
    ) -> Job {
        let mut c = self.cmd();
        c.current_dir(cwd)
            .arg("run")
            .arg("--name")
            .arg(name)
            .args(opts)
            .arg("--")
            .args(command);
        Job::spawn(c, self.path(), &format!("{name}.run"))
    }

    /// Epoch numbers of `job` whose directory holds a MANIFEST, oldest first.
    pub fn committed_epochs(&self, job: &str) -> Vec<u64> {
        committed_epochs_in(&self.ckpt_dir, job)
    }

    /// `<ckpt_dir>/<job>/<epoch 6 digits>`.
    pub fn epoch_dir(&self, job: &str, epoch: u64) -> PathBuf {
        self.ckpt_dir.join(job).join(format!("{epoch:06}"))
    }
}

/// Epoch numbers of `job` under `root` whose directory holds a MANIFEST.
pub fn committed_epochs_in(root: &Path, job: &str) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(root.join(job))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("MANIFEST").is_file())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// `setpriv --reuid=UID --regid=GID --clear-groups PROGRAM`.
pub fn as_user(uid: u32, gid: u32, program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(program);
    c
}

/// Host pids of a process tree: `root` and all its descendants (threads'
/// children included), found through `/proc/<pid>/task/*/children`.
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if out.contains(&p) {
            continue;
        }
        out.push(p);
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                todo.extend(s.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out
}

/// The real uid of a process (`Uid:` of /proc/<pid>/status).
pub fn proc_uid(pid: i32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// Checks that `out` is a non-empty tail of `reference`, made of whole lines,
/// and ends with the reference's RESULT line.
pub fn assert_suffix_of(reference: &str, out: &str, what: &str) {
    let want = result_line(reference).expect("reference has no RESULT line");
    assert!(!out.is_empty(), "{what}: no output at all");
    assert!(reference.ends_with(out), "{what}: output is not a suffix of the uninterrupted run\n--- got:\n{out}\n--- reference:\n{reference}");
    assert!(
        out.len() == reference.len()
            || reference.as_bytes()[reference.len() - out.len() - 1] == b'\n',
        "{what}: output starts mid-line:\n{out}"
    );
    assert_eq!(result_line(out), Some(want), "{what}: RESULT differs");
}

/// A tmpfs mounted for one test; unmounted on drop (also when the test
/// panics), lazily if something still holds it.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: "16m") on `path`, creating it.
    pub fn mount(path: &Path, size: &str) -> Self {
        fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "ckpt-e2e-tmpfs",
            ])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "mounting a tmpfs on {} failed",
            path.display()
        );
        Self {
            path: path.to_path_buf(),
        }
    }

    /// (total, available) bytes.
    pub fn space(&self) -> (u64, u64) {
        let s = nix::sys::statvfs::statvfs(&self.path).unwrap();
        let f = s.fragment_size() as u64;
        (s.blocks() as u64 * f, s.blocks_available() as u64 * f)
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        let (t, a) = self.space();
        t - a
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Sleeping processes that hold given host pids; killed on drop.
#[derive(Debug, Default)]
pub struct PidSquatters {
    pub children: Vec<Child>,
}

impl PidSquatters {
    /// Takes exactly `pid` with a `sleep 60` (root: ns_last_pid = pid-1,
    /// then fork), retrying for a few seconds (the pid may still be a zombie,
    /// or another process may fork in between). False if it never worked.
    pub fn occupy(&mut self, pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if Path::new(&format!("/proc/{pid}")).exists() {
                sleep(Duration::from_millis(50));
                continue;
            }
            if fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).is_err() {
                return false;
            }
            let Ok(mut c) = Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            else {
                return false;
            };
            if c.id() as i32 == pid {
                self.children.push(c);
                return true;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        false
    }

    pub fn pids(&self) -> Vec<i32> {
        self.children.iter().map(|c| c.id() as i32).collect()
    }
}

impl Drop for PidSquatters {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Freezer cgroups (`ckpt/<job>-<pid>`) that exist for `job`.
pub fn job_cgroups(job: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in [
        "/sys/fs/cgroup/freezer/ckpt",
        "/sys/fs/cgroup/unified/ckpt",
        "/sys/fs/cgroup/ckpt",
    ] {
        if let Ok(rd) = fs::read_dir(root) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.strip_prefix(job)
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                {
                    out.push(e.path());
                }
            }
        }
    }
    out
}

/// Pids of processes whose command line mentions `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}
