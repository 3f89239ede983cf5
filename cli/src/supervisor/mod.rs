//! The single-node job supervisor behind `ckpt-job run` and `restart`: the
//! coordinator and the node agent of one job in one process.
//!
//! It owns the job tree (as child subreaper), forwards the tree's output,
//! serves the job's control socket, runs periodic checkpoints, and commits
//! epochs into the image store.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ckpt_agent::checkpoint;
use ckpt_agent::criu::Criu;
use ckpt_agent::freezer::{CgroupFreezer, Freezer};
use ckpt_agent::images::opened::OpenedImage;
use ckpt_agent::restore::{self, RestoreRequest};
use ckpt_agent::tree::{self, NetMode, TreeSpec};
use ckpt_coordinator::store::ImageStore;
use ckpt_protocol::manifest::Key;
use ckpt_protocol::pb;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use self::gate::PagesGate;
use self::job::{periodic, State};
use self::local::{
    init_dir, job_local_dirs, job_local_env, prepare_job_dir, remove_job_local_dirs,
    RemoveDirOnDrop,
};
use crate::config::Config;
use crate::control;

mod gate;
mod job;
mod local;

pub use self::job::{CheckpointFailure, Job};

/// Exit status of `run`/`restart` when the job was stopped by
/// `checkpoint --stop` (EX_TEMPFAIL: restartable).
pub const EXIT_STOPPED: i32 = 75;

/// What a job is and where its checkpoints go.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub ckpt_dir: PathBuf,
    pub interval: Option<Duration>,
    pub keep: usize,
    pub net: NetMode,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub command: Vec<OsString>,
    pub cwd: PathBuf,
}

/// Progress of a long operation, for the CLI's progress bars.
pub type ProgressFn<'a> = dyn FnMut(&str, u64, u64) + 'a;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything that `run` and `restart` share before the tree exists.
struct Setup {
    cfg: Config,
    criu: Criu,
    key: Key,
    store: ImageStore,
    freezer: CgroupFreezer,
    /// Keeps the tree from opening ptys, which CRIU restores only at their
    /// node-wide index (see [`tree::PtyBan`]). Removed when dropped.
    pty_ban: Option<tree::PtyBan>,
    node: String,
}

fn setup(cfg: &Config, spec: &JobSpec) -> Result<Setup> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ckpt-job run/restart must run as root: CRIU needs CAP_SYS_ADMIN to checkpoint and restore (use --user to run the job as another user)");
    }
    let criu = match &cfg.criu {
        Some(p) => Criu::new(p),
        None => Criu::locate().context("finding criu")?,
    };
    let key = Key::load_or_generate(&cfg.key_file)
        .with_context(|| format!("loading the manifest key {}", cfg.key_file.display()))?;
    let store = ImageStore::new(&spec.ckpt_dir);
    if !ckpt_coordinator::store::valid_job_name(&spec.name) {
        bail!("invalid job name {:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'", spec.name);
    }
    let sock = cfg.socket_path(&spec.name);
    if control::is_live(&sock) {
        bail!(
            "a job named {:?} is already running on this node (socket {})",
            spec.name,
            sock.display()
        );
    }
    let freezer = CgroupFreezer::create(&format!("{}-{}", spec.name, std::process::id()))
        .context("creating the job's freezer cgroup")?;
    let pty_ban = tree::PtyBan::create(&format!("{}-{}", spec.name, std::process::id()))
        .context("creating the job's devices cgroup")?;
    Ok(Setup {
        cfg: cfg.clone(),
        criu,
        key,
        store,
        freezer,
        pty_ban,
        node: cfg.node_name(),
    })
}

/// `ckpt-job run`: start the tree and supervise it; returns the exit status.
pub fn run(cfg: &Config, spec: JobSpec) -> Result<i32> {
    let s = setup(cfg, &spec)?;
    let mut cgroup_guard = RemoveDirOnDrop(Some(s.freezer.dir().to_path_buf()));
    become_subreaper()?;
    let mut env = vec![(OsString::from("CKPT_JOB"), OsString::from(&spec.name))];
    env.extend(job_local_env(&spec)?);
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let init_dir = init_dir(&s.cfg, &spec.name);
    let init =
        restore::install_init(&init_dir, &init_binary()?).context("installing the job's init")?;
    let tree_spec = TreeSpec {
        init,
        init_dir: init_dir.clone(),
        argv: spec.command.clone(),
        cwd: spec.cwd.clone(),
        env,
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
        net: spec.net,
        stdin: None,
        stdout: out_w,
        stderr: err_w,
        cgroups: std::iter::once(s.freezer.procs_file())
            .chain(s.pty_ban.as_ref().map(|b| b.procs_file()))
            .collect(),
        netns: None,
    };
    // Our copies of the write ends go with the spec: EOF when the tree ends.
    let pid = tree::spawn(tree_spec).context("starting the job tree")?;
    cgroup_guard.0 = None;
    eprintln!(
        "ckpt: job {} started (pid {pid}, {} network); checkpoints in {}",
        spec.name,
        if spec.net == NetMode::Private {
            "private"
        } else {
            "host"
        },
        s.store.job_dir(&spec.name).display()
    );
    supervise(s, spec, pid, 0, vec![(out_r, 1), (err_r, 2)])
}

/// `ckpt-job restart`: restore `epoch` (default: newest committed) and
/// supervise it like `run`.
pub fn restart(
    cfg: &Config,
    mut spec: JobSpec,
    epoch: Option<u64>,
    progress: &mut ProgressFn<'_>,
) -> Result<i32> {
    let s = setup(cfg, &spec)?;
    // Until a tree is in it, any early return (unknown job, refused
    // verification, ...) must not leave the empty freezer cgroup behind.
    let mut cgroup_guard = RemoveDirOnDrop(Some(s.freezer.dir().to_path_buf()));
    let epoch = match epoch {
        Some(e) => e,
        None => s.store.latest_committed(&spec.name)?.ok_or_else(|| {
            anyhow!(
                "job {:?} has no committed checkpoint in {}",
                spec.name,
                s.store.job_dir(&spec.name).display()
            )
        })?,
    };
    progress("verifying images", 0, 0);
    let refusing = || format!("refusing to restore epoch {epoch} of job {}", spec.name);
    // Everything CRIU parses is verified before CRIU starts; the page files
    // (the bulk) are verified while CRIU restores, and the restored tree is
    // released (post-restore) only if they match, so no restored process
    // ever runs on unverified memory.
    let manifest = s
        .store
        .load_manifest(&spec.name, epoch, Some(&s.key))
        .with_context(refusing)?;
    let epoch_dir = s.store.epoch_dir(&spec.name, epoch);
    let all_files: Vec<_> = manifest
        .nodes
        .iter()
        .flat_map(|n| n.files.iter().cloned())
        .collect();
    // Each file is opened once and read only through that descriptor, so
    // the bytes verified are the bytes restored.
    let opened = OpenedImage::open(&epoch_dir, &all_files).with_context(refusing)?;
    opened
        .verify(|n| !checkpoint::is_epoch_pages(n))
        .with_context(refusing)?;
    tracing::info!(job = %spec.name, epoch, phase = "verified", "manifest and small images verified");
    let mut gate = PagesGate::start(opened.clone());
    let node = manifest
        .nodes
        .first()
        .ok_or_else(|| anyhow!("epoch {epoch} of job {} holds no node image", spec.name))?;
    let image = node
        .trees
        .first()
        .ok_or_else(|| anyhow!("epoch {epoch} of job {} holds no process tree", spec.name))?;
    spec.uid = manifest.owner_uid;
    spec.gid = manifest.owner_gid;
    spec.command = manifest.command.iter().map(OsString::from).collect();
    spec.cwd = PathBuf::from(&manifest.cwd);
    spec.net = match image.net {
        ckpt_protocol::manifest::NetMode::Host => NetMode::Host,
        ckpt_protocol::manifest::NetMode::Private { .. }
        | ckpt_protocol::manifest::NetMode::Job { .. } => NetMode::Private,
    };
    become_subreaper()?;
    // The restored processes keep the environment of the original run, so
    // they use these dirs again (the local pack refills them).
    for dir in job_local_dirs(&spec.name) {
        prepare_job_dir(&dir, spec.uid, spec.gid)?;
    }

    // New pipes stand in for the dumped stdout/stderr pipes.
    let mut readers = Vec::new();
    let mut writers: Vec<(u64, OwnedFd)> = Vec::new();
    for b in &image.stdio {
        if writers.iter().any(|(ino, _)| *ino == b.inode) {
            continue;
        }
        let (r, w) = pipe()?;
        readers.push((r, if b.fd == 2 { 2 } else { 1 }));
        writers.push((b.inode, w));
    }
    let staging = s
        .cfg
        .staging_dir
        .join(format!("{}.{}.{}", spec.name, epoch, std::process::id()));
    progress("restoring (CRIU)", 0, 0);
    let req = RestoreRequest {
        criu: &s.criu,
        epoch_dir: &epoch_dir,
        opened: &opened,
        image,
        staging: &staging,
        freezer: &s.freezer,
        cgroups: s.pty_ban.iter().map(|b| b.procs_file()).collect(),
        stdio: writers.iter().map(|(ino, fd)| (*ino, fd.as_fd())).collect(),
        netns: None,
    };
    tracing::info!(job = %spec.name, epoch, phase = "restoring", "CRIU restore begins");
    let restored = restore::restore_tree(&req, &mut gate);
    tracing::info!(job = %spec.name, epoch, phase = "restored", "CRIU restore returned");
    let verified = gate.finish();
    let pid = match (restored, verified) {
        (Ok(pid), Ok(())) => {
            cgroup_guard.0 = None;
            pid
        }
        (Ok(pid), Err(e)) => {
            // Not reached: the gate refuses post-restore. Fail closed anyway.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = s.freezer.remove();
            remove_job_local_dirs(&spec.name);
            return Err(anyhow!("{e}")).with_context(refusing);
        }
        (Err(_), Err(e)) => {
            let _ = s.freezer.remove();
            remove_job_local_dirs(&spec.name);
            let _ = fs::remove_dir_all(&staging);
            return Err(anyhow!("{e}")).with_context(refusing);
        }
        (Err(e), Ok(())) => {
            let _ = s.freezer.remove();
            remove_job_local_dirs(&spec.name);
            return Err(anyhow!(
                "restoring epoch {epoch} of job {}: {e}\n  (CRIU's files are kept in {})",
                spec.name,
                staging.display()
            ));
        }
    };
    drop(req);
    drop(writers);
    let _ = fs::remove_dir_all(&staging);
    eprintln!(
        "ckpt: job {} restored from epoch {epoch} (pid {pid})",
        spec.name
    );
    supervise(s, spec, pid, epoch, readers)
}

fn supervise(
    s: Setup,
    spec: JobSpec,
    pid: i32,
    restored_from: u64,
    outputs: Vec<(OwnedFd, i32)>,
) -> Result<i32> {
    // Before any thread starts, so that all inherit the mask and only the
    // forwarder takes these signals.
    let forward = forward_signals(pid);
    let pty_ban = s.pty_ban;
    let last_epoch = s
        .store
        .latest_committed(&spec.name)
        .ok()
        .flatten()
        .unwrap_or(0);
    let job = Arc::new(Job {
        outputs: outputs.iter().map(|(fd, _)| fd.as_raw_fd()).collect(),
        spec,
        node: s.node,
        root_pid: pid,
        started_unix: now_unix(),
        restored_from,
        cfg: s.cfg,
        criu: s.criu,
        key: s.key,
        store: s.store,
        freezer: s.freezer,
        state: Mutex::new(State {
            phase: pb::JobPhase::Running,
            last_epoch,
            committed: 0,
            failed: 0,
            last_error: String::new(),
            stopped_at: None,
        }),
        epoch_lock: Mutex::new(()),
        retention: Arc::new(Mutex::new(())),
        exited: AtomicBool::new(false),
        exit_cv: (Mutex::new(false), Condvar::new()),
    });
    let pumps: Vec<JoinHandle<()>> = outputs.into_iter().map(|(fd, to)| pump(fd, to)).collect();
    let server = control::serve(job.clone());
    if let Err(e) = &server {
        // The job runs on, but nobody can checkpoint it: say so loudly.
        eprintln!(
            "ckpt: warning: no control socket for job {}: {e:#}",
            job.spec.name
        );
    }
    let timer = job.spec.interval.map(|every| {
        let job = job.clone();
        thread::spawn(move || periodic(&job, every))
    });
    let status = wait_root(pid);
    job.exited.store(true, Ordering::SeqCst);
    {
        let (m, cv) = &job.exit_cv;
        *lock(m) = true;
        cv.notify_all();
    }
    job.lock_state().phase = pb::JobPhase::Exited;
    if let Ok(srv) = server {
        srv.shutdown();
    }
    for p in pumps {
        let _ = p.join();
    }
    if let Some(t) = timer {
        let _ = t.join();
    }
    drop(forward);
    // An epoch still in flight (the tree died under it) has cleaned up by
    // the time we hold its lock.
    let _guard = lock(&job.epoch_lock);
    let _retention = lock(&job.retention);
    let _ = job.freezer.remove();
    drop(pty_ban);
    // The whole tree is gone (its init was reaped last); what it left in its
    // node-local dirs is in the image set if a checkpoint needs it.
    remove_job_local_dirs(&job.spec.name);
    let _ = fs::remove_dir_all(init_dir(&job.cfg, &job.spec.name));
    let stopped = job.lock_state().stopped_at;
    if let Some(epoch) = stopped {
        eprintln!(
            "ckpt: job {} stopped after checkpoint epoch {epoch}; continue it with: ckpt-job restart {}",
            job.spec.name, job.spec.name
        );
        return Ok(EXIT_STOPPED);
    }
    Ok(status)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wait_root(pid: i32) -> i32 {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("ckpt: lost track of the job (waitpid {pid}: {e})");
                return 1;
            }
        }
    }
}

fn pump(fd: OwnedFd, to: i32) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut src = fs::File::from(fd);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match src.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let r = if to == 2 {
                        io::stderr().lock().write_all(&buf[..n])
                    } else {
                        let mut o = io::stdout().lock();
                        o.write_all(&buf[..n]).and_then(|_| o.flush())
                    };
                    // Our own output is gone (closed terminal, broken
                    // pipe): keep draining so the job never blocks.
                    let _ = r;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")
}

fn become_subreaper() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if r < 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `ckpt-init`, installed beside `ckpt-job`.
fn init_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating ckpt-job")?;
    let dir = me.parent().unwrap_or(Path::new("/"));
    let p = dir.join("ckpt-init");
    if !p.exists() {
        bail!(
            "{} not found: ckpt-init must be installed beside ckpt-job",
            p.display()
        );
    }
    Ok(p)
}

/// Forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 sent to the supervisor to
/// the job's init (which passes them on to the job).
fn forward_signals(pid: i32) -> Option<JoinHandle<()>> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).ok()?;
    Some(thread::spawn(move || loop {
        match set.wait() {
            Ok(sig) => {
                if kill(Pid::from_raw(pid), sig).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }))
}
