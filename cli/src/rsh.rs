//! The multi-node launcher: `ckpt-job rsh HOST CMD…` (also installed as
//! `ckpt-rsh`, for MPICH's `-launcher-exec`, which takes one executable)
//! starts CMD on node HOST as a tree of the caller's job under HOST's
//! agent, so that `mpirun` launches every node's part of a job as its own
//! checkpointable tree; and `ckpt-job run --cluster`, which starts a job's
//! first tree under the local agent with the launchers pointed at rsh.
//!
//! # Why files, and no connection
//!
//! rsh runs inside the job's tree (a child of mpirun), so CRIU dumps it
//! with the job: it must not hold a socket to anything outside the tree
//! while it waits. It connects to the local agent's control socket
//! (`CKPT_AGENT_SOCKET`) only for the remote-spawn request, and then
//! follows the remote command through three files in a directory of its
//! own under `CKPT_RSH_DIR` (on the shared filesystem):
//!
//! - `stdout`, `stderr`: the remote command's output, written by
//!   `ckpt-job rsh-exec` inside the remote tree (so CRIU records their
//!   sizes with that tree's image and puts them back at restore: the
//!   offsets rsh has copied up to stay valid). rsh opens, seeks, reads and
//!   closes them on every poll: no growing file is held open.
//! - `exit`: the exit status, written atomically (temp + rename) by
//!   rsh-exec when the command ends. It is written from inside the remote
//!   tree, not by the agent: a tree killed by `checkpoint --stop` writes
//!   nothing (its rsh must not see a status: after a restart both go on),
//!   and a restored tree writes it when it really ends.
//!
//! The remote command line is run by `/bin/sh -c` with the words joined by
//! spaces, as ssh does (Open MPI and hydra quote for a remote shell).
//! stdin is /dev/null.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ckpt_agent::tree::NetMode;
use ckpt_protocol::local_control::{call, CallError};
use ckpt_protocol::pb;

/// Names the local agent's control socket (set in every tree's environment
/// by `run --cluster`, and by each agent for the trees it starts remotely).
pub const AGENT_SOCKET_ENV: &str = "CKPT_AGENT_SOCKET";
/// The agent's default `control_socket`.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/lib/ckpt/agent/control.sock";
/// Where rsh keeps one directory per remote command.
pub const RSH_DIR_ENV: &str = "CKPT_RSH_DIR";
/// argv[0] under which `ckpt-job` behaves as `ckpt-job rsh`.
pub const RSH_NAME: &str = "ckpt-rsh";
/// Exit status of rsh when the remote command could not be started (ssh's).
pub const RSH_FAILED: i32 = 255;
/// Exit status of `run --cluster` when a checkpoint stopped the job.
pub const EX_TEMPFAIL: i32 = 75;
/// The MPI drain shim's socket directory (see mpi-shim/README.md). For a
/// job with `CKPT_SHIM=1` (set by `run --cluster` for an MPI job, passed on
/// to every remote tree) `rsh-exec` sets it for its command to a directory
/// of its own tree (`<its dir>/shim`, on the shared filesystem, so a tree
/// restored on another node finds it), where the agent looks for the
/// ranks' sockets (in the environments of the tree's processes). Agents
/// do not pass it on to remote trees.
pub const SHIM_DIR_ENV: &str = "CKPT_SHIM_DIR";
/// `1`: the job's ranks run the drain shim (see [`SHIM_DIR_ENV`]).
pub const SHIM_ENV: &str = "CKPT_SHIM";
/// `openmpi`, `mpich`, `none` or `auto` (the default): which MPI the job's
/// command runs, i.e. which drain shim `run --cluster` preloads.
pub const MPI_ENV: &str = "CKPT_MPI";
/// The drain shim library to preload (default: `libckpt_mpi_shim_<mpi>.so`
/// next to `ckpt-job`).
pub const SHIM_LIB_ENV: &str = "CKPT_SHIM_LIB";

/// The MPI implementation a job runs (one shim build per ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mpi {
    OpenMpi,
    Mpich,
}

impl Mpi {
    pub fn name(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "openmpi",
            Mpi::Mpich => "mpich",
        }
    }
}

/// Which MPI `cmd` runs: `choice` (`openmpi`, `mpich`, `none`, or `auto`/
/// empty: from the launcher `cmd[0]` resolves to, e.g.
/// `/usr/bin/mpirun` -> `/usr/bin/mpirun.openmpi` or `mpiexec.hydra`). A
/// command that is not an MPI launcher is no MPI job.
pub fn detect_mpi(choice: &str, cmd: &[OsString]) -> Result<Option<Mpi>> {
    match choice {
        "openmpi" => return Ok(Some(Mpi::OpenMpi)),
        "mpich" => return Ok(Some(Mpi::Mpich)),
        "none" => return Ok(None),
        "" | "auto" => {}
        other => bail!("{MPI_ENV}={other:?}: use openmpi, mpich, none or auto"),
    }
    let Some(prog) = cmd.first() else {
        return Ok(None);
    };
    let prog = Path::new(prog);
    let found = if prog.components().count() > 1 {
        Some(prog.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(prog))
                .find(|p| p.is_file())
        })
    };
    let Some(found) = found else { return Ok(None) };
    let real = fs::canonicalize(&found).unwrap_or(found);
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let launcher = ["mpirun", "mpiexec", "orterun", "prterun"]
        .iter()
        .any(|l| name.starts_with(l));
    if !launcher {
        return Ok(None);
    }
    Ok(
        if name.contains("openmpi") || name.starts_with("orterun") || name.starts_with("prterun") {
            Some(Mpi::OpenMpi)
        } else if name.contains("mpich") || name.contains("hydra") {
            Some(Mpi::Mpich)
        } else {
            None
        },
    )
}

/// The shim library for `mpi`: `CKPT_SHIM_LIB`, else
/// `libckpt_mpi_shim_<mpi>.so` next to `exe`.
pub fn shim_lib(mpi: Mpi, exe: &Path) -> PathBuf {
    match std::env::var_os(SHIM_LIB_ENV).filter(|s| !s.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => exe
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!("libckpt_mpi_shim_{}.so", mpi.name())),
    }
}

/// What an MPI job's environment needs for the drain shim: `LD_PRELOAD`
/// for the ranks only where the launcher allows it (Open MPI: through
/// `OMPI_MCA_mca_base_env_list`, which mpirun applies to every rank, on
/// every node, but not to itself or the orted; hydra forwards the whole
/// environment, so for MPICH `LD_PRELOAD` is set for the tree), and
/// `CKPT_SHIM=1` (rsh-exec then sets `CKPT_SHIM_DIR` per tree). `env` is
/// the job's environment so far.
pub fn shim_env(mpi: Mpi, lib: &Path, env: &[(String, String)]) -> Vec<(String, String)> {
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let lib = lib.to_string_lossy();
    let preload = match get("LD_PRELOAD").filter(|v| !v.is_empty()) {
        Some(old) => format!("{lib}:{old}"),
        None => lib.into_owned(),
    };
    let mut out = vec![(SHIM_ENV.to_owned(), "1".to_owned())];
    match mpi {
        Mpi::OpenMpi => {
            let list = match get("OMPI_MCA_mca_base_env_list").filter(|v| !v.is_empty()) {
                Some(old) => format!("{old};LD_PRELOAD={preload}"),
                None => format!("LD_PRELOAD={preload}"),
            };
            out.push(("OMPI_MCA_mca_base_env_list".to_owned(), list));
        }
        Mpi::Mpich => out.push(("LD_PRELOAD".to_owned(), preload)),
    }
    out
}

/// Longest socket path (`sun_path` minus its NUL).
const SUN_PATH_MAX: usize = 107;

const SPAWN_TIMEOUT: Duration = Duration::from_secs(120);
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);

/// The files of one started command.
#[derive(Debug, Clone)]
pub struct IoDir(pub PathBuf);

impl IoDir {
    pub fn stdout(&self) -> PathBuf {
        self.0.join("stdout")
    }
    pub fn stderr(&self) -> PathBuf {
        self.0.join("stderr")
    }
    pub fn exit(&self) -> PathBuf {
        self.0.join("exit")
    }

    /// The command's exit status, once it has ended.
    pub fn exit_status(&self) -> Result<Option<i32>> {
        match fs::read_to_string(self.exit()) {
            Ok(s) => {
                s.trim().parse().map(Some).with_context(|| {
                    format!("{}: not an exit status: {s:?}", self.exit().display())
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.exit().display())),
        }
    }
}

/// Copies what was appended to a file since the last call (open, seek,
/// read, close: no descriptor stays open between calls).
#[derive(Debug, Default)]
pub struct Tail {
    offset: u64,
}

impl Tail {
    /// Copies new bytes of `path` into `to`; a missing file is empty.
    pub fn copy(&mut self, path: &Path, to: &mut dyn Write) -> io::Result<bool> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut any = false;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            to.write_all(&buf[..n])?;
            self.offset += n as u64;
            any = true;
        }
        to.flush()?;
        Ok(any)
    }
}

/// Follows `io` until its exit status appears, copying its output to ours.
/// `gone` is asked when there is no status yet: `Some(code)` ends the wait
/// with that code (after a last copy).
pub fn follow(io: &IoDir, gone: &mut dyn FnMut() -> Option<i32>) -> Result<i32> {
    let (mut out, mut err) = (Tail::default(), Tail::default());
    let mut pause = POLL_MIN;
    loop {
        let status = io.exit_status()?;
        let a = out.copy(&io.stdout(), &mut io::stdout().lock());
        let b = err.copy(&io.stderr(), &mut io::stderr().lock());
        let moved = a.with_context(|| format!("copying {}", io.stdout().display()))?
            | b.with_context(|| format!("copying {}", io.stderr().display()))?;
        if let Some(code) = status {
            return Ok(code);
        }
        if let Some(code) = gone() {
            // The status may have been written just before the end.
            if let Some(code) = io.exit_status()? {
                out.copy(&io.stdout(), &mut io::stdout().lock())?;
                err.copy(&io.stderr(), &mut io::stderr().lock())?;
                return Ok(code);
            }
            return Ok(code);
        }
        pause = if moved {
            POLL_MIN
        } else {
            (pause * 2).min(POLL_MAX)
        };
        sleep(pause);
    }
}

/// `ckpt-job rsh [-x|-n|-T|-q …] HOST CMD…` (or `ckpt-rsh …`); returns the
/// exit status. Errors are printed naming HOST; the status is then 255.
pub fn rsh(args: &[OsString]) -> i32 {
    match rsh_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ckpt-rsh: {e:#}");
            RSH_FAILED
        }
    }
}

/// Splits rsh's arguments: ssh-style flags without a value (ignored), HOST,
/// then the command's words.
pub fn parse_rsh_args(args: &[OsString]) -> Result<(String, Vec<OsString>)> {
    let mut it = args.iter();
    let host = loop {
        let Some(a) = it.next() else {
            bail!("usage: ckpt-rsh [-x] HOST COMMAND...: no host given");
        };
        let b = a.as_bytes();
        if b.starts_with(b"-") && b.len() > 1 {
            if b.iter().skip(1).all(|c| b"xnTqtaAkC4".contains(c)) {
                continue;
            }
            bail!(
                "usage: ckpt-rsh [-x] HOST COMMAND...: unsupported option {}",
                a.to_string_lossy()
            );
        }
        break a
            .to_str()
            .with_context(|| format!("host name {a:?} is not UTF-8"))?
            .to_owned();
    };
    let cmd: Vec<OsString> = it.cloned().collect();
    if cmd.is_empty() {
        bail!("{host}: no command given (ckpt-rsh runs commands, not login sessions)");
    }
    Ok((host, cmd))
}

/// The agent's control socket: `CKPT_AGENT_SOCKET`, else the default.
pub fn agent_socket() -> PathBuf {
    std::env::var_os(AGENT_SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET), PathBuf::from)
}

fn rsh_inner(args: &[OsString]) -> Result<i32> {
    let (host, cmd) = parse_rsh_args(args)?;
    let base = std::env::var_os(RSH_DIR_ENV)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "{host}: {RSH_DIR_ENV} is not set (it names a directory on the shared \
                 filesystem; `ckpt-job run --cluster` sets it)"
            )
        })?;
    if !base.is_absolute() {
        bail!("{host}: {RSH_DIR_ENV}={} is not absolute", base.display());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&base)
        .with_context(|| format!("{host}: creating {}", base.display()))?;
    let io = IoDir(fresh_dir(&base, &host)?);
    let exe = std::env::current_exe().context("finding this program (/proc/self/exe)")?;
    let joined = cmd
        .iter()
        .map(|w| w.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    // For whoever wonders what ran there (written before, never held open).
    let cmd_file = io.0.join("command");
    fs::write(&cmd_file, format!("{host}: {joined}\n"))
        .with_context(|| format!("{host}: writing {}", cmd_file.display()))?;
    let argv = vec![
        exe.to_string_lossy().into_owned(),
        "rsh-exec".into(),
        "--dir".into(),
        io.0.to_string_lossy().into_owned(),
        "--".into(),
        "/bin/sh".into(),
        "-c".into(),
        joined,
    ];
    let sock = agent_socket();
    let req = pb::RemoteSpawnRequest {
        host: host.clone(),
        argv,
    };
    let failed = match call(&sock, pb::request::Op::RemoteSpawn(req), SPAWN_TIMEOUT) {
        Ok(pb::response::Body::RemoteSpawned(_)) => None,
        Ok(other) => Some(format!(
            "unexpected answer from the agent at {}: {other:?}",
            sock.display()
        )),
        Err(CallError::Remote(e)) => Some(e.message),
        Err(e) => Some(format!("{e} (the local agent; set {AGENT_SOCKET_ENV})")),
    };
    if let Some(why) = failed {
        // Nothing runs there: nothing to keep.
        let _ = fs::remove_dir_all(&io.0);
        bail!("{host}: {why}");
    }
    // The socket is closed: from here on only files.
    follow(&io, &mut || None)
}

/// `<base>/<host>.<pid>.<ns>`: new, ours (0700).
fn fresh_dir(base: &Path, host: &str) -> Result<PathBuf> {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    for _ in 0..100 {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = base.join(format!("{safe}.{}.{ns}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("{host}: creating {}", dir.display())),
        }
    }
    bail!("{host}: no fresh directory under {}", base.display())
}

/// Variables whose directories rsh-exec creates before the command runs
/// (the job's node-local scratch dirs; see supervisor/local.rs).
const SCRATCH_VARS: [&str; 3] = [
    "OMPI_MCA_orte_tmpdir_base",
    "OMPI_MCA_btl_vader_backing_directory",
    "UCX_POSIX_DIR",
];

/// `ckpt-job rsh-exec --dir DIR -- CMD…`, inside a tree: runs CMD with its
/// output appended to DIR/stdout and DIR/stderr, passes on the signals a
/// batch system sends, and writes DIR/exit atomically when CMD ends. Then
/// it waits for whatever CMD left running (Open MPI's rsh launch starts
/// `orted --daemonize`): the tree, whose init ends everything when its
/// command ends, must live as long as they do.
pub fn exec(dir: &Path, cmd: &[OsString]) -> Result<i32> {
    let io = IoDir(dir.to_path_buf());
    match exec_inner(&io, cmd) {
        Ok(code) => Ok(code),
        Err(e) => {
            // Whoever follows DIR must learn that the command never ran.
            let msg = format!("ckpt-job rsh-exec: error: {e:#}\n");
            if let Ok(mut f) = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(io.stderr())
            {
                let _ = f.write_all(msg.as_bytes());
            }
            write_exit(&io, 127)?;
            Err(e)
        }
    }
}

/// Writes DIR/exit atomically (temp file, rename).
fn write_exit(io: &IoDir, code: i32) -> Result<()> {
    let tmp = io.0.join(".exit.tmp");
    fs::write(&tmp, format!("{code}\n")).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, io.exit()).with_context(|| format!("renaming {}", tmp.display()))
}

fn exec_inner(io: &IoDir, cmd: &[OsString]) -> Result<i32> {
    use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
    let Some((prog, args)) = cmd.split_first() else {
        bail!("rsh-exec: no command");
    };
    for var in SCRATCH_VARS {
        if let Some(d) = std::env::var_os(var).filter(|d| Path::new(d).is_absolute()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .with_context(|| format!("creating {} ({var})", Path::new(&d).display()))?;
        }
    }
    let open = |p: PathBuf| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))
    };
    let (out, mut err) = (open(io.stdout())?, open(io.stderr())?);
    let shim_dir = match std::env::var_os(SHIM_ENV) {
        Some(v) if v == "1" => tree_shim_dir(io, &mut err)?,
        _ => None,
    };
    let forwarded = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in forwarded {
        set.add(s);
    }
    // Blocked before the child exists, so none is lost; std's spawn gives
    // the child an empty mask.
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("sigprocmask")?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } < 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            io::Error::last_os_error()
        );
    }
    let mut command = Command::new(prog);
    match &shim_dir {
        Some(d) => command.env(SHIM_DIR_ENV, d),
        None => command.env_remove(SHIM_DIR_ENV),
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", Path::new(prog).display()))?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let code = loop {
        if let Some(st) = child.try_wait().context("waiting for the command")? {
            use std::os::unix::process::ExitStatusExt;
            break st.code().or(st.signal().map(|s| 128 + s)).unwrap_or(1);
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(pid, sig);
            }
        }
    };
    write_exit(io, code)?;
    // What the command left running (e.g. an orted that daemonized) is ours
    // now (subreaper): the tree lives until it ends too, as under sshd.
    loop {
        match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => break,
            Ok(nix::sys::wait::WaitStatus::StillAlive) => match set.wait() {
                Ok(Signal::SIGCHLD) | Err(_) => {}
                Ok(sig) => {
                    for c in children() {
                        let _ = kill(c, sig);
                    }
                }
            },
            Ok(_) | Err(_) => {}
        }
    }
    Ok(code)
}

/// `<io dir>/shim`, created for this tree's MPI ranks' drain sockets; None
/// (with a warning in the tree's stderr) if the socket paths would be too
/// long for a Unix socket: the ranks then run undrained.
fn tree_shim_dir(io: &IoDir, err: &mut File) -> Result<Option<PathBuf>> {
    let dir = io.0.join("shim");
    let longest = dir.join("4294967295.sock");
    if longest.as_os_str().len() > SUN_PATH_MAX {
        let _ = writeln!(
            err,
            "ckpt-job rsh-exec: warning: {} is too long for a Unix socket path \
             ({} > {SUN_PATH_MAX} bytes): the MPI ranks of this tree are not drained \
             at checkpoints; use a shorter --io-dir",
            longest.display(),
            longest.as_os_str().len()
        );
        return Ok(None);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {} ({SHIM_DIR_ENV})", dir.display()))?;
    Ok(Some(dir))
}

/// Our children (all threads'), from /proc.
fn children() -> Vec<nix::unistd::Pid> {
    let mut v = Vec::new();
    for t in fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = fs::read_to_string(t.path().join("children")) {
            v.extend(
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .map(nix::unistd::Pid::from_raw),
            );
        }
    }
    v
}

/// `ckpt-job run --cluster`: what to start.
#[derive(Debug)]
pub struct ClusterRun {
    pub job: String,
    /// Default: `<cwd>/.ckpt/<job>`.
    pub io_dir: Option<PathBuf>,
    pub net: NetMode,
    pub agent_socket: PathBuf,
    pub command: Vec<OsString>,
    pub cwd: PathBuf,
}

/// The node-local scratch dirs of a job (same names as the single-node
/// supervisor's, supervisor/local.rs).
///
/// `run --cluster` does not remove them on the other nodes when the job
/// ends for good: it could reach them only by starting new trees of the
/// ended job there (and a node that is down or was left by a restart
/// elsewhere would keep them anyway), while a stop checkpoint (exit 75)
/// must keep them for the restart. That is an epilog's job: the Slurm
/// epilog runs as root on every node of the allocation once the job is
/// really over (not on a checkpoint-and-requeue), and removes
/// `/tmp/ckpt-job.<job>` and `/dev/shm/ckpt-job.<job>` there.
fn scratch_env(job: &str) -> [(&'static str, String); 4] {
    [
        ("OMPI_MCA_orte_tmpdir_base", format!("/tmp/ckpt-job.{job}")),
        (
            "OMPI_MCA_btl_vader_backing_directory",
            format!("/dev/shm/ckpt-job.{job}"),
        ),
        ("UCX_POSIX_USE_PROC_LINK", "n".into()),
        ("UCX_POSIX_DIR", format!("/dev/shm/ckpt-job.{job}")),
    ]
}

/// Starts the job's first tree under the local agent and follows it like
/// rsh; returns its exit status, or 75 when a checkpoint stopped it.
pub fn run_cluster(o: ClusterRun) -> Result<i32> {
    if !ckpt_coordinator::store::valid_job_name(&o.job) {
        bail!(
            "invalid job name {:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'",
            o.job
        );
    }
    let io_root = match o.io_dir {
        Some(d) if d.is_absolute() => d,
        Some(d) => o.cwd.join(d),
        None => o.cwd.join(".ckpt").join(&o.job),
    };
    let main = IoDir(io_root.join("main"));
    if main.0.exists() {
        bail!(
            "{} exists: job {:?} already ran with these files; remove {} or choose --io-dir",
            main.0.display(),
            o.job,
            io_root.display()
        );
    }
    let mkdir = |d: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .with_context(|| format!("creating {}", d.display()))
    };
    let (rsh_dir, bin_dir) = (io_root.join("rsh"), io_root.join("bin"));
    mkdir(&main.0)?;
    mkdir(&rsh_dir)?;
    mkdir(&bin_dir)?;
    let exe = std::env::current_exe().context("finding this program (/proc/self/exe)")?;
    let rsh_bin = bin_dir.join(RSH_NAME);
    let _ = fs::remove_file(&rsh_bin);
    std::os::unix::fs::symlink(&exe, &rsh_bin)
        .with_context(|| format!("creating {}", rsh_bin.display()))?;

    let sock = if o.agent_socket.is_absolute() {
        o.agent_socket.clone()
    } else {
        o.cwd.join(&o.agent_socket)
    };
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut set = |k: &str, v: String, force: bool| {
        if force || !env.iter().any(|(n, _)| n == k) {
            env.retain(|(n, _)| n != k);
            env.push((k.to_owned(), v));
        }
    };
    let rsh = rsh_bin.to_string_lossy().into_owned();
    set(AGENT_SOCKET_ENV, sock.to_string_lossy().into_owned(), true);
    set(RSH_DIR_ENV, rsh_dir.to_string_lossy().into_owned(), true);
    set("OMPI_MCA_plm_rsh_agent", rsh.clone(), true);
    // Every orted from mpirun's node: each rsh is then a child of mpirun,
    // in the first tree.
    set("OMPI_MCA_plm_rsh_no_tree_spawn", "1".into(), false);
    set("HYDRA_LAUNCHER", "rsh".into(), true);
    set("HYDRA_LAUNCHER_EXEC", rsh, true);
    for (k, v) in scratch_env(&o.job) {
        set(k, v, false);
    }
    // Open MPI's posix shmem component, when merely probed, leaves mpirun
    // and each orted (and every rank, by inheritance) holding a deleted
    // `/dev/shm/open_mpi.NNNN`: a ghost file for CRIU, restored under a
    // node-wide name that two trees restoring at once collide on ("Can't
    // create ghost regfile: File exists"). vader works the same on mmap.
    set("OMPI_MCA_shmem", "mmap".into(), false);
    let choice = std::env::var(MPI_ENV).unwrap_or_default();
    if let Some(mpi) = detect_mpi(&choice, &o.command)? {
        let lib = shim_lib(mpi, &exe);
        if lib.is_file() {
            let snapshot = env.clone();
            for (k, v) in shim_env(mpi, &lib, &snapshot) {
                env.retain(|(n, _)| n != &k);
                env.push((k, v));
            }
        } else {
            eprintln!(
                "ckpt-job: warning: {} MPI job, but the drain shim {} is not installed \
                 (scripts/build-shim.sh; or set {SHIM_LIB_ENV}): its ranks are checkpointed \
                 without a drain",
                mpi.name(),
                lib.display()
            );
        }
    }
    let mut argv = vec![
        exe.to_string_lossy().into_owned(),
        "rsh-exec".into(),
        "--dir".into(),
        main.0.to_string_lossy().into_owned(),
        "--".into(),
    ];
    argv.extend(o.command.iter().map(|a| a.to_string_lossy().into_owned()));
    let req = pb::SpawnTreeRequest {
        job: o.job.clone(),
        argv,
        cwd: o.cwd.to_string_lossy().into_owned(),
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        host_network: o.net == NetMode::Host,
        ..Default::default()
    };
    let tree = match call(&sock, pb::request::Op::SpawnTree(req), SPAWN_TIMEOUT) {
        Ok(pb::response::Body::TreeSpawned(t)) => t,
        Ok(other) => bail!(
            "unexpected answer from the agent at {}: {other:?}",
            sock.display()
        ),
        Err(CallError::Remote(e)) => {
            bail!("the agent at {} refused: {}", sock.display(), e.message)
        }
        Err(e) => bail!("{e} (is ckpt-agent running? --agent-socket or {AGENT_SOCKET_ENV})"),
    };
    eprintln!(
        "ckpt-job: job {} started (tree {} on this node); output in {}",
        o.job,
        tree.tree_id,
        main.0.display()
    );
    let root = Process::of(tree.root_pid);
    let t0 = Instant::now();
    let code = follow(&main, &mut || {
        // Give a fresh tree a moment to show up in /proc.
        if t0.elapsed() > Duration::from_secs(1) && !root.alive() {
            Some(EX_TEMPFAIL)
        } else {
            None
        }
    })?;
    if main.exit_status()?.is_none() {
        eprintln!(
            "ckpt-job: job {} ended without an exit status: stopped by a checkpoint \
             (its output goes on in {} after a restart)",
            o.job,
            main.stdout().display()
        );
    }
    Ok(code)
}

/// A process by pid and start time (a recycled pid is not it).
#[derive(Debug)]
struct Process {
    pid: i32,
    start: Option<u64>,
}

impl Process {
    fn of(pid: i32) -> Self {
        Process {
            pid,
            start: start_time(pid),
        }
    }

    fn alive(&self) -> bool {
        let now = start_time(self.pid);
        now.is_some() && now == self.start
    }
}

/// Field 22 of /proc/<pid>/stat; `None` for a zombie or no process.
fn start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    if f.next()? == "Z" {
        return None;
    }
    f.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn mpi_is_detected_from_the_launcher_or_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let p = dir.path().join(name);
            fs::write(&p, "").unwrap();
            p
        };
        let ompi = mk("mpirun.openmpi");
        let link = dir.path().join("mpirun");
        std::os::unix::fs::symlink(&ompi, &link).unwrap();
        let hydra = mk("mpiexec.hydra");
        let other = mk("simulate");
        let cmd = |p: &Path| vec![p.as_os_str().to_owned(), "-np".into()];
        assert_eq!(detect_mpi("", &cmd(&link)).unwrap(), Some(Mpi::OpenMpi));
        assert_eq!(detect_mpi("auto", &cmd(&hydra)).unwrap(), Some(Mpi::Mpich));
        assert_eq!(detect_mpi("", &cmd(&other)).unwrap(), None);
        assert_eq!(detect_mpi("none", &cmd(&link)).unwrap(), None);
        assert_eq!(detect_mpi("mpich", &cmd(&other)).unwrap(), Some(Mpi::Mpich));
        let e = detect_mpi("lam", &cmd(&link)).unwrap_err().to_string();
        assert!(e.contains("CKPT_MPI=\"lam\""), "{e}");
    }

    #[test]
    fn shim_env_preloads_ranks_only_for_open_mpi() {
        let lib = Path::new("/opt/ckpt/libckpt_mpi_shim_openmpi.so");
        let env = vec![
            ("LD_PRELOAD".to_owned(), "/x.so".to_owned()),
            ("OMPI_MCA_mca_base_env_list".to_owned(), "A=1".to_owned()),
        ];
        let got = shim_env(Mpi::OpenMpi, lib, &env);
        assert_eq!(
            got,
            [
                ("CKPT_SHIM".to_owned(), "1".to_owned()),
                (
                    "OMPI_MCA_mca_base_env_list".to_owned(),
                    "A=1;LD_PRELOAD=/opt/ckpt/libckpt_mpi_shim_openmpi.so:/x.so".to_owned()
                ),
            ]
        );
        let got = shim_env(Mpi::Mpich, Path::new("/l.so"), &[]);
        assert_eq!(got[1], ("LD_PRELOAD".to_owned(), "/l.so".to_owned()));
    }

    #[test]
    fn rsh_args_like_ssh() {
        let (h, c) = parse_rsh_args(&os(&["-x", "n2", "orted", "-mca", "a b"])).unwrap();
        assert_eq!(h, "n2");
        assert_eq!(c, os(&["orted", "-mca", "a b"]));
        let e = parse_rsh_args(&os(&["n2"])).unwrap_err().to_string();
        assert!(e.contains("n2") && e.contains("no command"), "{e}");
        let e = parse_rsh_args(&os(&["-l", "bob", "n2", "x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported option -l"), "{e}");
        assert!(parse_rsh_args(&[]).is_err());
    }

    #[test]
    fn tail_copies_only_what_was_appended() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut t = Tail::default();
        let mut got = Vec::new();
        assert!(!t.copy(&p, &mut got).unwrap());
        fs::write(&p, b"ab").unwrap();
        assert!(t.copy(&p, &mut got).unwrap());
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"cd").unwrap();
        assert!(t.copy(&p, &mut got).unwrap());
        assert!(!t.copy(&p, &mut got).unwrap());
        assert_eq!(got, b"abcd");
    }

    #[test]
    fn exit_status_is_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let io = IoDir(d.path().to_path_buf());
        assert_eq!(io.exit_status().unwrap(), None);
        fs::write(io.exit(), "3\n").unwrap();
        assert_eq!(io.exit_status().unwrap(), Some(3));
        fs::write(io.exit(), "x").unwrap();
        let e = format!("{:#}", io.exit_status().unwrap_err());
        assert!(
            e.contains("exit") && e.contains("not an exit status"),
            "{e}"
        );
    }

    #[test]
    fn start_time_of_ourselves() {
        let me = Process::of(std::process::id() as i32);
        assert!(me.start.is_some() && me.alive());
        assert!(!Process::of(i32::MAX).alive());
    }
}
