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

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    Root,
    Criu,
    OpenMpi,
    Mpich,
}

fn missing(p: Prereq) -> Option<String> {
    let have = |bin: &str| Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success());
    match p {
        Prereq::Root => (!nix::unistd::geteuid().is_root()).then(|| "not running as root".to_string()),
        Prereq::Criu => {
            let ok = Command::new(criu_bin()).arg("--version").output().is_ok_and(|o| o.status.success());
            (!ok).then(|| format!("no working criu at {}", criu_bin()))
        }
        Prereq::OpenMpi => (!have("mpirun.openmpi") || !have("mpicc.openmpi")).then(|| "Open MPI (mpirun.openmpi, mpicc.openmpi) not installed".into()),
        Prereq::Mpich => (!have("mpirun.mpich") || !have("mpicc.mpich")).then(|| "MPICH (mpirun.mpich, mpicc.mpich) not installed".into()),
    }
}

fn criu_bin() -> String {
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
    let msg = format!("{test}: prerequisite missing: {} (run scripts/bootstrap.sh as root)", why.join("; "));
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
        let dir = tempfile::Builder::new().prefix("ckpt-e2e-").tempdir_in("/var/tmp").unwrap();
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
        Self { dir, config, ckpt_dir, run_dir }
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
        assert!(out.status.success(), "checkpoint of {name} failed:\n{}", text(&out.stderr));
        out
    }

    /// Starts `ckpt-job run [opts] --name NAME -- CMD…` in the background.
    pub fn run<S: AsRef<OsStr>>(&self, name: &str, opts: &[&str], command: &[S]) -> Job {
        let mut c = self.cmd();
        c.arg("run").arg("--name").arg(name).args(opts).arg("--").args(command);
        Job::spawn(c, self.path(), &format!("{name}.run"))
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
        self.status.code().unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
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
        c.stdin(Stdio::null()).stdout(fs::File::create(&stdout).unwrap()).stderr(fs::File::create(&stderr).unwrap());
        let child = c.spawn().expect("spawning ckpt-job");
        Self { child: Some(child), stdout, stderr }
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
                    panic!("job ended ({st}) before printing {needle:?}\nstdout:\n{}\nstderr:\n{}", self.out(), self.err());
                }
            }
            assert!(start.elapsed() < timeout, "no {needle:?} after {timeout:?}\nstdout:\n{}\nstderr:\n{}", self.out(), self.err());
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
                panic!("job did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}", self.out(), self.err());
            }
            sleep(Duration::from_millis(20));
        };
        Finished { status, stdout: self.out(), stderr: self.err() }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // The job's init dies with its supervisor (PDEATHSIG), so killing
        // ckpt-job cleans the whole tree up.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command to completion with a deadline (killed and panics after).
pub fn run_with_timeout(mut c: Command, timeout: Duration) -> Output {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
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
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// Runs a workload directly (no ckpt) for the reference output.
pub fn reference_run<S: AsRef<OsStr>>(command: &[S], timeout: Duration) -> Output {
    let mut c = Command::new(command[0].as_ref());
    c.args(&command[1..]).stdin(Stdio::null());
    let out = run_with_timeout(c, timeout);
    assert!(out.status.success(), "reference run of {:?} failed:\n{}", command[0].as_ref(), text(&out.stderr));
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The line `RESULT …` of a workload's output.
pub fn result_line(out: &str) -> Option<&str> {
    out.lines().rev().find(|l| l.starts_with("RESULT "))
}
