//! The single-node job supervisor behind `ckpt-job run` and `restart`: the
//! coordinator and the node agent of one job in one process.
//!
//! It owns the job tree (as child subreaper), forwards the tree's output,
//! serves the job's control socket, runs periodic checkpoints, and commits
//! epochs into the image store.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ckpt_agent::capture::CaptureRules;
use ckpt_agent::checkpoint::{self, DumpHooks, DumpRequest, Phase, TreeHandle};
use ckpt_agent::criu::{Criu, NoNotify, NotifyEvent, NotifyHandler};
use ckpt_agent::freezer::{CgroupFreezer, Freezer};
use ckpt_agent::images::opened::OpenedImage;
use ckpt_agent::restore::{self, RestoreRequest};
use ckpt_agent::tree::{self, NetMode, TreeSpec};
use ckpt_coordinator::store::{ImageStore, PendingEpoch};
use ckpt_protocol::manifest::{CheckpointMode, Key, Manifest, NodeImage, Timings};
use ckpt_protocol::pb;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::config::Config;
use crate::control;

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

struct State {
    phase: pb::JobPhase,
    last_epoch: u64,
    committed: u64,
    failed: u64,
    last_error: String,
    /// Set by a stop-mode checkpoint once its epoch is committed.
    stopped_at: Option<u64>,
}

/// Shared between the waiting main thread, the control server, the timer.
pub struct Job {
    pub spec: JobSpec,
    pub node: String,
    root_pid: i32,
    started_unix: u64,
    restored_from: u64,
    cfg: Config,
    criu: Criu,
    key: Key,
    store: ImageStore,
    freezer: CgroupFreezer,
    /// Read ends of the tree's stdio pipes (drained before every dump).
    outputs: Vec<RawFd>,
    state: Mutex<State>,
    /// Held for the whole of an epoch: one checkpoint at a time.
    epoch_lock: Mutex<()>,
    /// Serialises retention passes, which run after the reply (deleting a
    /// GiB-sized epoch can take longer than writing one).
    retention: Arc<Mutex<()>>,
    exited: AtomicBool,
    exit_cv: (Mutex<bool>, Condvar),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.spec.name)
            .field("root_pid", &self.root_pid)
            .finish()
    }
}

/// Failure of a checkpoint request, as the client sees it.
#[derive(Debug)]
pub struct CheckpointFailure {
    pub kind: pb::ErrorKind,
    pub message: String,
}

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
    };
    let pid = tree::spawn(&tree_spec).context("starting the job tree")?;
    cgroup_guard.0 = None;
    drop(tree_spec); // our copies of the write ends: EOF when the tree ends
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
        ckpt_protocol::manifest::NetMode::Private { .. } => NetMode::Private,
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

/// Verifies the page files in the background and holds the restored tree
/// at CRIU's post-restore point until they match.
struct PagesGate {
    check: Option<JoinHandle<Result<(), String>>>,
    result: Option<Result<(), String>>,
}

impl PagesGate {
    fn start(opened: OpenedImage) -> Self {
        let check = thread::spawn(move || {
            opened
                .verify(checkpoint::is_epoch_pages)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Self {
            check: Some(check),
            result: None,
        }
    }

    fn wait(&mut self) -> Result<(), String> {
        if let Some(t) = self.check.take() {
            self.result = Some(
                t.join()
                    .unwrap_or_else(|_| Err("page verification panicked".into())),
            );
        }
        self.result.clone().unwrap_or(Ok(()))
    }

    fn finish(mut self) -> Result<(), String> {
        self.wait()
    }
}

impl NotifyHandler for PagesGate {
    fn notify(&mut self, event: &NotifyEvent, _pid: i32) -> Result<(), String> {
        match event {
            NotifyEvent::PostRestore => {
                tracing::info!(phase = "post-restore", "waiting for page verification");
                let r = self.wait();
                tracing::info!(
                    phase = "post-restore",
                    ok = r.is_ok(),
                    "page verification done"
                );
                r
            }
            _ => Ok(()),
        }
    }
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

/// Node-local scratch dirs of one job, named after it (job names are unique
/// on a node while the job lives): `/tmp/ckpt-job.<job>` and
/// `/dev/shm/ckpt-job.<job>`. Created at run and restart, owned by the job's
/// owner, and removed (whole) when the tree is gone: the prefix is ckpt's.
fn job_local_dirs(name: &str) -> [PathBuf; 2] {
    [
        PathBuf::from(format!("/tmp/ckpt-job.{name}")),
        PathBuf::from(format!("/dev/shm/ckpt-job.{name}")),
    ]
}

/// Environment that keeps MPI runtimes of different jobs on one node apart
/// and restorable. Each variable is set only if the user did not set it.
///
/// - Inside the job's PID namespace mpirun always has the same small pid, so
///   Open MPI's job family (a hash of host name and mpirun's pid), its
///   session dir `/tmp/ompi.<host>.<uid>/pid.<pid>` and its shared-memory
///   segments `/dev/shm/vader_segment.<host>.<jobid>.<rank>` would be the
///   same for every job on the node: two jobs would share (and corrupt) one
///   another's segments, and a restore would overwrite a live job's files.
///   The session dir goes below `/tmp/ckpt-job.<job>` (`orte_tmpdir_base`; the
///   capture finds it through `OMPI_MCA_orte_jobfam_session_dir`), the vader
///   segments into `/dev/shm/ckpt-job.<job>`.
/// - UCX (MPICH ch4:ucx) shares POSIX shared memory through
///   `/proc/<pid>/fd/<fd>` of the peer by default; `/proc` is the host's,
///   where the namespace's pids name other processes, so MPI_Init fails
///   (`open(/proc/4/fd/21) failed`). By path instead, the segment stays
///   linked while in use, in `/dev/shm/ckpt-job.<job>`, and is captured like
///   Open MPI's.
fn job_local_env(spec: &JobSpec) -> Result<Vec<(OsString, OsString)>> {
    let [tmp, shm] = job_local_dirs(&spec.name);
    let wanted: [(&str, &Path, bool); 4] = [
        ("OMPI_MCA_orte_tmpdir_base", &tmp, true),
        ("OMPI_MCA_btl_vader_backing_directory", &shm, true),
        ("UCX_POSIX_USE_PROC_LINK", Path::new("n"), false),
        ("UCX_POSIX_DIR", &shm, true),
    ];
    let mut env = Vec::new();
    for (var, value, is_dir) in wanted {
        if std::env::var_os(var).is_some() {
            continue;
        }
        if is_dir {
            prepare_job_dir(value, spec.uid, spec.gid)?;
        }
        env.push((OsString::from(var), value.as_os_str().to_owned()));
    }
    Ok(env)
}

/// Creates `dir` (mode 0700) for the job's owner, or takes over a leftover
/// of an earlier run of the same job. Refuses a symlink or a dir owned by
/// somebody else (`/tmp` and `/dev/shm` are world-writable).
fn prepare_job_dir(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::{fstat, Mode};
    use std::os::fd::FromRawFd;

    match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => bail!("creating the job's scratch dir {}: {e}", dir.display()),
    }
    let fd = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| {
        format!(
            "opening the job's scratch dir {} (a symlink?)",
            dir.display()
        )
    })?;
    // SAFETY: fresh descriptor from open, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd()).with_context(|| format!("stat {}", dir.display()))?;
    if st.st_uid != 0 && st.st_uid != uid {
        bail!(
            "{} belongs to uid {}, not to the job's owner; remove it",
            dir.display(),
            st.st_uid
        );
    }
    nix::unistd::fchown(
        fd.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .with_context(|| format!("chown {}", dir.display()))?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    Ok(())
}

/// The init's private directory: `<run_dir>/trees/<job>`.
fn init_dir(cfg: &Config, name: &str) -> PathBuf {
    cfg.run_dir.join("trees").join(name)
}

fn remove_job_local_dirs(name: &str) {
    for dir in job_local_dirs(name) {
        // remove_dir_all never follows symlinks.
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("ckpt: warning: could not remove {}: {e}", dir.display());
            }
        }
    }
}

/// Removes an (empty) directory when dropped, unless disarmed by taking
/// the path out: the job's freezer cgroup while no tree is in it yet.
struct RemoveDirOnDrop(Option<PathBuf>);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir(&d);
        }
    }
}

/// When a dump fails on a (nearly) full filesystem, CRIU's own message is
/// often about something else (it cannot even write its log there), so say
/// what the real problem probably is. Looked at before the aborted epoch's
/// files are removed.
fn low_space_note(dir: &Path) -> Option<String> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = st.blocks_free() * st.fragment_size();
    if free < 1 << 20 {
        Some(format!(
            "no space left on device: only {free} bytes are free on the filesystem of {}",
            dir.display()
        ))
    } else if st.files_free() == 0 && st.files() > 0 {
        Some(format!(
            "no space left on device: no free inodes on the filesystem of {}",
            dir.display()
        ))
    } else {
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Job {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn owner_uid(&self) -> u32 {
        self.spec.uid
    }

    pub fn socket_path(&self) -> PathBuf {
        self.cfg.socket_path(&self.spec.name)
    }

    pub fn status(&self) -> pb::JobStatus {
        let st = self.lock_state();
        pb::JobStatus {
            name: self.spec.name.clone(),
            owner_uid: self.spec.uid,
            root_pid: self.root_pid,
            phase: st.phase as i32,
            ckpt_dir: self.spec.ckpt_dir.display().to_string(),
            last_epoch: st.last_epoch,
            started_unix: self.started_unix,
            command: self
                .spec
                .command
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect(),
            interval_seconds: self.spec.interval.map(|d| d.as_secs()).unwrap_or(0),
            keep: self.spec.keep as u32,
            checkpoints_committed: st.committed,
            checkpoints_failed: st.failed,
            last_error: st.last_error.clone(),
            restored_from: self.restored_from,
            node: self.node.clone(),
        }
    }

    /// One epoch: dump, seal, commit. Fails closed: on any error the tree
    /// runs on untouched and the previous epoch stays the restart point.
    pub fn checkpoint(
        &self,
        stop: bool,
        progress: &mut ProgressFn<'_>,
    ) -> Result<pb::CheckpointDone, CheckpointFailure> {
        let Ok(_guard) = self.epoch_lock.try_lock() else {
            return Err(CheckpointFailure {
                kind: pb::ErrorKind::Busy,
                message: format!(
                    "a checkpoint of job {} is already in progress",
                    self.spec.name
                ),
            });
        };
        if self.exited.load(Ordering::SeqCst) || self.lock_state().stopped_at.is_some() {
            return Err(CheckpointFailure {
                kind: pb::ErrorKind::Failed,
                message: format!("job {} has already ended", self.spec.name),
            });
        }
        self.lock_state().phase = if stop {
            pb::JobPhase::Stopping
        } else {
            pb::JobPhase::Checkpointing
        };
        let result = self.checkpoint_locked(stop, progress);
        let mut st = self.lock_state();
        match &result {
            Ok(done) => {
                st.committed += 1;
                st.last_epoch = done.epoch;
                if stop {
                    st.stopped_at = Some(done.epoch);
                }
                st.phase = if stop {
                    pb::JobPhase::Stopping
                } else {
                    pb::JobPhase::Running
                };
            }
            Err(e) => {
                st.failed += 1;
                st.last_error = format!("{e:#}");
                st.phase = pb::JobPhase::Running;
            }
        }
        result.map_err(|e| CheckpointFailure {
            kind: pb::ErrorKind::Failed,
            message: format!("{e:#}"),
        })
    }

    fn checkpoint_locked(
        &self,
        stop: bool,
        progress: &mut ProgressFn<'_>,
    ) -> Result<pb::CheckpointDone> {
        let t0 = Instant::now();
        let name = &self.spec.name;
        let pending = self
            .store
            .begin_epoch(name, self.spec.uid, self.spec.gid)
            .with_context(|| format!("starting a checkpoint of job {name}"))?;
        let epoch = pending.epoch;
        tracing::info!(job = %name, epoch, node = %self.node, stop, "checkpoint begins");
        let init_dir = init_dir(&self.cfg, &self.spec.name);
        let handle = TreeHandle {
            id: 0,
            root_pid: self.root_pid,
            net: self.spec.net,
            init_binary: Some(init_dir.join(restore::INIT_NAME)),
            init_dir: Some(init_dir),
        };
        let rules = CaptureRules::default();
        let req = DumpRequest {
            criu: &self.criu,
            tree: &handle,
            freezer: &self.freezer,
            epoch_dir: &pending.dir,
            prefix: format!("{}.t0", self.node),
            stop,
            freeze_timeout: self.cfg.freeze_timeout,
            rules: &rules,
        };
        let mut hooks = Hooks {
            job: self,
            progress: &mut *progress,
        };
        let dumped = checkpoint::dump_tree(&req, &mut hooks, &mut NoNotify);
        // In stop mode a dumped tree is still frozen: it is killed only after
        // the commit, and thawed (the job goes on) if anything fails.
        let result = match dumped {
            Ok(d) => self.seal_and_commit(pending, &d, stop, t0, progress),
            Err(e) => {
                let dir = pending.dir.clone();
                let note = low_space_note(&dir);
                if let Err(rm) = pending.abort() {
                    eprintln!(
                        "ckpt: warning: could not remove aborted epoch {}: {rm}",
                        dir.display()
                    );
                }
                let e = anyhow::Error::from(e);
                Err(match note {
                    Some(n) => e.context(n),
                    None => e,
                })
            }
        };
        match result {
            Ok(done) => {
                if stop {
                    self.kill_frozen_tree();
                }
                tracing::info!(job = %name, epoch, "epoch committed");
                Ok(done)
            }
            Err(e) => {
                if stop {
                    let _ = self.freezer.thaw();
                }
                tracing::warn!(job = %name, epoch, error = %format!("{e:#}"), "epoch aborted");
                Err(e.context(format!(
                    "checkpoint of job {name} (epoch {epoch}) aborted; the job continues"
                )))
            }
        }
    }

    fn seal_and_commit(
        &self,
        pending: PendingEpoch,
        dumped: &checkpoint::DumpResult,
        stop: bool,
        t0: Instant,
        progress: &mut ProgressFn<'_>,
    ) -> Result<pb::CheckpointDone> {
        let tc = Instant::now();
        let presealed: u64 = dumped.sealed.iter().map(|d| d.size).sum();
        let total: u64 = presealed
            + dumped
                .files
                .iter()
                .map(|f| {
                    fs::metadata(pending.dir.join(f))
                        .map(|m| m.len())
                        .unwrap_or(0)
                })
                .sum::<u64>();
        let mut done_bytes = presealed;
        let mut files = dumped.sealed.clone();
        for f in &dumped.files {
            progress("sealing images", done_bytes, total);
            match pending.seal_file(f) {
                Ok(d) => {
                    done_bytes += d.size;
                    files.push(d);
                }
                Err(e) => {
                    let _ = pending.abort();
                    return Err(e.into());
                }
            }
        }
        progress("committing", total, total);
        let criu_version = self
            .criu
            .version()
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "unknown".into());
        let mut manifest = Manifest {
            format: ckpt_protocol::manifest::FORMAT_VERSION,
            job: self.spec.name.clone(),
            epoch: pending.epoch,
            created_unix: now_unix(),
            owner_uid: self.spec.uid,
            owner_gid: self.spec.gid,
            criu_version,
            command: self
                .spec
                .command
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect(),
            cwd: self.spec.cwd.display().to_string(),
            mode: if stop {
                CheckpointMode::Stop
            } else {
                CheckpointMode::Continue
            },
            nodes: vec![NodeImage {
                node: self.node.clone(),
                ranks: Vec::new(),
                trees: vec![dumped.image.clone()],
                files,
            }],
            timings: Timings {
                freeze_ms: dumped.freeze_ms,
                dump_ms: dumped.dump_ms,
                capture_ms: dumped.capture_ms,
                commit_ms: 0.0,
                downtime_ms: dumped.downtime_ms,
                total_ms: 0.0,
            },
        };
        manifest.timings.commit_ms = checkpoint_ms(tc.elapsed());
        manifest.timings.total_ms = checkpoint_ms(t0.elapsed());
        let epoch = pending.epoch;
        let dir = pending.commit(&manifest, &self.key)?;
        self.retain_in_background();
        Ok(pb::CheckpointDone {
            epoch,
            path: dir.display().to_string(),
            image_bytes: total,
            downtime_seconds: dumped.downtime_ms / 1000.0,
            total_seconds: t0.elapsed().as_secs_f64(),
            stopped: stop,
        })
    }

    /// Ends a frozen tree without letting any of it run again. Every task
    /// gets SIGKILL while still frozen, then the cgroup is thawed: a task
    /// dies before it returns to user space. (Killing only the namespace's
    /// init would let the others run between the thaw and the kernel's
    /// namespace teardown, and print output the image already holds.)
    fn kill_frozen_tree(&self) {
        let mut pids = self.freezer.pids().unwrap_or_default();
        if !pids.contains(&self.root_pid) {
            pids.push(self.root_pid);
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.freezer.thaw();
    }

    /// Deletes epochs beyond `keep` without delaying the checkpoint's
    /// reply. Safe beside a new epoch: retention never touches an epoch newer
    /// than the newest committed one, and uncommits (removes MANIFEST) before
    /// it deletes.
    fn retain_in_background(&self) {
        let (store, name, keep, lock) = (
            self.store.clone(),
            self.spec.name.clone(),
            self.spec.keep,
            self.retention.clone(),
        );
        thread::spawn(move || {
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = store.retain(&name, keep) {
                eprintln!("ckpt: warning: retention for job {name}: {e}");
            }
        });
    }

    /// Waits until every byte the tree wrote to its stdio pipes has been
    /// read by our pumps (the tree is frozen, so no more arrives).
    fn drain_outputs(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        for fd in &self.outputs {
            loop {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD on a descriptor we own writes one int.
                let r = unsafe { libc::ioctl(*fd, libc::FIONREAD, &mut n) };
                if r < 0 || n == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{n} bytes of the job's output are still unread after 5 s (is our stdout blocked?)"));
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Sleeps up to `d`; true if the job exited meanwhile.
    fn sleep_or_exit(&self, d: Duration) -> bool {
        let (m, cv) = &self.exit_cv;
        let guard = lock(m);
        let (guard, _) = cv
            .wait_timeout_while(guard, d, |exited| !*exited)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

fn checkpoint_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Hooks<'a, 'b> {
    job: &'a Job,
    progress: &'a mut ProgressFn<'b>,
}

impl DumpHooks for Hooks<'_, '_> {
    fn frozen(&mut self) -> Result<(), String> {
        self.job.drain_outputs()
    }
    fn phase(&mut self, phase: Phase) {
        (self.progress)(phase.name(), 0, 0);
    }
}

impl std::fmt::Display for CheckpointFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn periodic(job: &Job, every: Duration) {
    loop {
        if job.sleep_or_exit(every) {
            return;
        }
        match job.checkpoint(false, &mut |_, _, _| {}) {
            Ok(done) => eprintln!(
                "ckpt: periodic checkpoint of job {}: epoch {} committed",
                job.spec.name, done.epoch
            ),
            // A checkpoint still running: skip this tick.
            Err(e) if e.kind == pb::ErrorKind::Busy => {}
            Err(e) if job.exited.load(Ordering::SeqCst) => return drop(e),
            Err(e) => eprintln!(
                "ckpt: periodic checkpoint of job {} failed: {e}",
                job.spec.name
            ),
        }
    }
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
