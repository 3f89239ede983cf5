//! The shim with real MPI: 4 ranks of the nonblocking halo exchange (and the
//! ring + allreduce) under LD_PRELOAD, drained repeatedly by a test client
//! speaking the control-socket protocol to every rank; every rank must
//! report READY with globally consistent counts, and the final checksum
//! must equal an uninterrupted run without the shim.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::{example, require, result_line, Prereq};
use ckpt_mpi_shim::wire::Ready;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mpi {
    OpenMpi,
    Mpich,
}

impl Mpi {
    fn name(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "openmpi",
            Mpi::Mpich => "mpich",
        }
    }
    fn prereq(self) -> Prereq {
        match self {
            Mpi::OpenMpi => Prereq::OpenMpi,
            Mpi::Mpich => Prereq::Mpich,
        }
    }
}

/// Build the shim for `mpi` once (scripts/build-shim.sh, own target dir).
fn shim_lib(mpi: Mpi) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    static BUILT: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    BUILT[mpi as usize]
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = Command::new(root.join("scripts/build-shim.sh"))
                .arg("--debug")
                .arg(mpi.name())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "scripts/build-shim.sh --debug {} failed:\n{}",
                mpi.name(),
                String::from_utf8_lossy(&out.stderr)
            );
            let lib = root.join(format!(
                "target/shim/debug/libckpt_mpi_shim_{}.so",
                mpi.name()
            ));
            assert!(lib.exists(), "{} missing after the build", lib.display());
            lib
        })
        .clone()
}

/// `mpirun … -np 4 <prog> <args>`, with `env` exported to every rank;
/// `prog` is an example (`halo` -> halo-openmpi) or a path.
fn mpirun(mpi: Mpi, prog: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = match mpi {
        Mpi::OpenMpi => {
            let mut c = Command::new("mpirun.openmpi");
            // TCP between the ranks: messages really are in flight in the
            // kernel when the drain starts.
            c.args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--mca",
                "btl",
                "self,tcp",
            ]);
            for (k, v) in env {
                c.arg("-x").arg(format!("{k}={v}"));
            }
            c
        }
        Mpi::Mpich => {
            let mut c = Command::new("mpirun.mpich");
            for (k, v) in env {
                c.args(["-genv", k, v]);
            }
            c
        }
    };
    let exe = if prog.contains('/') {
        PathBuf::from(prog)
    } else {
        example(&format!("{prog}-{}", mpi.name()))
    };
    c.args(["-np", "4"]).arg(exe).args(args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Own process group, so the guard can kill mpirun and every rank.
    c.process_group(0);
    c
}

/// Kills the job's process group unless it was waited for.
struct Job(Option<Child>);

impl Job {
    fn wait(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                kill_group(&child);
                let out = child.wait_with_output().unwrap();
                panic!(
                    "MPI job still running after {limit:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }
}

fn kill_group(child: &Child) {
    // SAFETY: signalling the process group we created for this job.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            kill_group(&c);
            let _ = c.wait();
        }
    }
}

fn run_to_end(mut cmd: Command) -> String {
    let out = Job(Some(cmd.spawn().unwrap())).wait(Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "MPI job failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn result_of(out: &str) -> String {
    result_line(out)
        .unwrap_or_else(|| panic!("no RESULT line in:\n{out}"))
        .to_string()
}

fn read_line(s: &UnixStream, what: &str) -> String {
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    line
}

/// One drain of every rank: DRAIN to all, READY from all (checked for
/// global consistency), then RESUME. Returns the READY reports.
fn drain_all(dir: &Path, ranks: usize) -> Vec<Ready> {
    let mut socks = Vec::new();
    for r in 0..ranks {
        let p = dir.join(format!("{r}.sock"));
        let s = UnixStream::connect(&p).unwrap_or_else(|e| panic!("connect {}: {e}", p.display()));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        (&s).write_all(b"DRAIN\n").unwrap();
        socks.push(s);
    }
    let mut ready = Vec::new();
    for (r, s) in socks.iter().enumerate() {
        let line = read_line(s, &format!("READY from rank {r}"));
        ready.push(Ready::parse(&line).unwrap_or_else(|e| panic!("rank {r}: {e}")));
    }
    // The cut is consistent: every message sent was received (by the
    // application or into a shim stash).
    let sent: u64 = ready.iter().map(|r| r.sent).sum();
    let received: u64 = ready.iter().map(|r| r.received).sum();
    assert_eq!(sent, received, "inconsistent cut: {ready:?}");
    // Rounds are collective on the shim's communicator: same count everywhere.
    assert!(
        ready
            .iter()
            .all(|r| r.rounds == ready[0].rounds && r.rounds >= 1),
        "ranks disagree on the drain's rounds: {ready:?}"
    );
    for s in &socks {
        (&*s).write_all(b"RESUME\n").unwrap();
    }
    for (r, s) in socks.iter().enumerate() {
        assert_eq!(read_line(s, &format!("RESUMED from rank {r}")), "RESUMED\n");
    }
    ready
}

fn wait_sockets(dir: &Path, ranks: usize, child: &mut Child) {
    let start = Instant::now();
    while (0..ranks).any(|r| !dir.join(format!("{r}.sock")).exists()) {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("MPI job ended ({st}) before every rank opened its control socket");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rank control sockets did not appear in {}",
            dir.display()
        );
        sleep(Duration::from_millis(20));
    }
}

/// Reference run without the shim, then the shim run drained `drains`
/// times (`gap` apart); both must print the same RESULT.
fn drained_run(mpi: Mpi, prog: &str, args: &[&str], drains: usize, gap: Duration) {
    let reference = result_of(&run_to_end(mpirun(mpi, prog, args, &[])));
    let lib = shim_lib(mpi);
    let dir = ckpt_e2e::TempDir::new().unwrap();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("CKPT_SHIM_DIR", dir.path().to_str().unwrap()),
    ];
    let mut job = Job(Some(mpirun(mpi, prog, args, &env).spawn().unwrap()));
    wait_sockets(dir.path(), 4, job.0.as_mut().unwrap());
    let mut stashed = 0;
    let mut max_rounds = 0;
    let mut last = Vec::new();
    for _ in 0..drains {
        sleep(gap);
        last = drain_all(dir.path(), 4);
        stashed += last.iter().map(|r| r.stashed).sum::<u64>();
        max_rounds = max_rounds.max(last[0].rounds);
    }
    // Counts are cumulative: by the last drain every rank has sent.
    assert!(
        last.iter().all(|r| r.sent > 0),
        "a rank sent nothing: {last:?}"
    );
    let out = job.wait(Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "shim run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        result_of(&stdout),
        reference,
        "checksum differs from the run without the shim"
    );
    eprintln!(
        "{prog} ({}): {drains} drains, {stashed} messages stashed in total, \
         at most {max_rounds} rounds in one drain",
        mpi.name()
    );
    // Sockets are removed at MPI_Finalize.
    assert!(
        !dir.path().join("0.sock").exists(),
        "rank 0's socket left behind"
    );
}

#[test]
fn openmpi_halo_drains_with_messages_in_flight() {
    if !require(
        "openmpi_halo_drains_with_messages_in_flight",
        &[Prereq::OpenMpi],
    ) {
        return;
    }
    drained_run(
        Mpi::OpenMpi,
        "halo",
        &["400", "2000"],
        8,
        Duration::from_millis(80),
    );
}

#[test]
fn mpich_halo_drains_with_messages_in_flight() {
    if !require(
        "mpich_halo_drains_with_messages_in_flight",
        &[Prereq::Mpich],
    ) {
        return;
    }
    drained_run(
        Mpi::Mpich,
        "halo",
        &["400", "2000"],
        8,
        Duration::from_millis(80),
    );
}

#[test]
fn shim_without_drains_changes_nothing() {
    for mpi in [Mpi::OpenMpi, Mpi::Mpich] {
        if !require("shim_without_drains_changes_nothing", &[mpi.prereq()]) {
            return;
        }
        let reference = result_of(&run_to_end(mpirun(mpi, "halo", &["60", "500"], &[])));
        let lib = shim_lib(mpi);
        // No CKPT_SHIM_DIR: counting only, blocking calls not converted.
        let out = run_to_end(mpirun(
            mpi,
            "halo",
            &["60", "500"],
            &[("LD_PRELOAD", lib.to_str().unwrap())],
        ));
        assert_eq!(result_of(&out), reference, "{}", mpi.name());
    }
}

/// The ring + allreduce: drains land while ranks block in MPI_Waitall or
/// sit inside (or at the entry of) MPI_Allreduce.
fn ring(mpi: Mpi) {
    let work = ckpt_e2e::TempDir::new().unwrap();
    let w = work.path().to_str().unwrap().to_string();
    drained_run(mpi, "ring", &[&w, "30"], 6, Duration::from_millis(250));
}

#[test]
fn openmpi_ring_drains_around_collectives() {
    if !require("openmpi_ring_drains_around_collectives", &[Prereq::OpenMpi]) {
        return;
    }
    ring(Mpi::OpenMpi);
}

#[test]
fn mpich_ring_drains_around_collectives() {
    if !require("mpich_ring_drains_around_collectives", &[Prereq::Mpich]) {
        return;
    }
    ring(Mpi::Mpich);
}

/// Rank 0 computes (sleeps) while the others block in receives and inside
/// MPI_Allreduce: drains requested then still complete.
#[test]
fn openmpi_drains_while_others_wait_in_receives_and_collectives() {
    let name = "openmpi_drains_while_others_wait_in_receives_and_collectives";
    if !require(name, &[Prereq::OpenMpi]) {
        return;
    }
    drained_run(
        Mpi::OpenMpi,
        "halo",
        &["100", "200", "20000"],
        6,
        Duration::from_millis(130),
    );
}

#[test]
fn mpich_drains_while_others_wait_in_receives_and_collectives() {
    let name = "mpich_drains_while_others_wait_in_receives_and_collectives";
    if !require(name, &[Prereq::Mpich]) {
        return;
    }
    drained_run(
        Mpi::Mpich,
        "halo",
        &["100", "200", "20000"],
        6,
        Duration::from_millis(130),
    );
}

/// Open MPI's Fortran bindings bypass the shim: a Fortran rank is refused
/// at MPI_INIT with a message saying why (exit 70), `use mpi` and
/// `use mpi_f08` alike.
#[test]
fn openmpi_fortran_is_refused_at_init() {
    if !require("openmpi_fortran_is_refused_at_init", &[Prereq::OpenMpi]) {
        return;
    }
    // mpifort.openmpi and gfortran come with libopenmpi-dev (Debian).
    let lib = shim_lib(Mpi::OpenMpi);
    let dir = ckpt_e2e::TempDir::new().unwrap();
    for (module, init) in [
        ("mpi", "call MPI_Init(ierr)"),
        ("mpi_f08", "call MPI_Init(ierr)"),
    ] {
        let src = dir.path().join(format!("hello_{module}.f90"));
        let exe = dir.path().join(format!("hello_{module}"));
        std::fs::write(
            &src,
            format!(
                "program hello\n  use {module}\n  integer :: ierr\n  {init}\n  \
                 print *, 'running'\n  call MPI_Finalize(ierr)\nend program\n"
            ),
        )
        .unwrap();
        let st = Command::new("mpifort.openmpi")
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success(), "mpifort.openmpi {} failed", src.display());
        let out = Command::new(&exe).env("LD_PRELOAD", &lib).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(70), "{module}: {err}");
        assert!(
            err.contains("Fortran bindings call PMPI_"),
            "{module}: {err}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("running"),
            "{module}"
        );
    }
}

/// examples/rust-ring (rsmpi), built for `mpi` in its own target dir.
fn rust_ring(mpi: Mpi) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join(format!("target/rust-ring-{}", mpi.name()));
    let cc = match mpi {
        Mpi::OpenMpi => "mpicc.openmpi",
        Mpi::Mpich => "mpicc.mpich",
    };
    let out = Command::new(env!("CARGO"))
        .args(["build", "-q", "--release", "--manifest-path"])
        .arg(root.join("examples/rust-ring/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env("MPICC", cc)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building examples/rust-ring for {} failed:\n{}",
        mpi.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release/rust-ring")
}

/// The Rust ring + allreduce (rsmpi calls the C API, so the shim sees it).
#[test]
fn rust_ring_drains_with_both_mpis() {
    for mpi in [Mpi::OpenMpi, Mpi::Mpich] {
        if !require("rust_ring_drains_with_both_mpis", &[mpi.prereq()]) {
            return;
        }
        let exe = rust_ring(mpi);
        drained_run(
            mpi,
            exe.to_str().unwrap(),
            &["40"],
            5,
            Duration::from_millis(200),
        );
    }
}
