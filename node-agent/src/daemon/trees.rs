//! The agent's local tree registry: trees it started, their freezer
//! cgroups, their output, and their exit.
//!
//! Each tree gets its own freezer cgroup (one CRIU call per tree), its own
//! `ckpt-init` copy (CRIU restores only onto the very same file), and two
//! pipes whose read ends a pump thread copies into files the agent owns. A
//! reaper thread waits for the init and then removes the cgroup.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::checkpoint::TreeHandle;
use crate::freezer::{CgroupFreezer, Freezer, FreezerError};
use crate::jobnet::TreeNet;
use crate::restore;
use crate::tree::{self, NetMode, TreeSpec};

/// A tree's id on this agent (unique for the agent's lifetime).
pub type TreeId = u32;

/// What to start: the job's command and where its output goes.
#[derive(Debug, Clone)]
pub struct TreeArgs {
    pub argv: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub net: NetMode,
    /// The tree's stdout and stderr are appended to these files (created
    /// 0600 if missing).
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// With `net` private: the prepared namespace with the tree's job
    /// address (None: a fresh one with loopback only).
    pub jobnet: Option<Arc<TreeNet>>,
}

impl TreeArgs {
    /// `argv` as root in `/`, private network, output into `out_dir/{stdout,stderr}`.
    pub fn new<I, S>(argv: I, out_dir: &Path) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        TreeArgs {
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: PathBuf::from("/"),
            env: Vec::new(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            net: NetMode::Private,
            stdout: out_dir.join("stdout"),
            stderr: out_dir.join("stderr"),
            jobnet: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("job name {0:?} is not a plain name (letters, digits, '.', '_', '-')")]
    BadJobName(String),
    #[error("creating the freezer cgroup of job {job}: {source}")]
    Freezer { job: String, source: FreezerError },
    #[error("creating the devices cgroup (pty ban) of job {job}: {source}")]
    PtyBan { job: String, source: io::Error },
    #[error("installing ckpt-init for job {job}: {source}")]
    Init {
        job: String,
        source: Box<restore::RestoreError>,
    },
    #[error("{op} {path} for job {job}: {source}")]
    Io {
        job: String,
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("starting the tree of job {job}: {source}")]
    Tree {
        job: String,
        source: tree::TreeError,
    },
}

/// Whether a tree still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeState {
    Running,
    /// The init was reaped: its exit code, or 128 + the signal.
    Exited(i32),
}

/// Where a restored tree came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredFrom {
    pub epoch: u64,
    /// The node whose image it is (may differ from this node).
    pub image_node: String,
    /// The tree's id in that image.
    pub image_tree: u32,
}

/// A snapshot of one tree, for callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeInfo {
    pub id: TreeId,
    pub job: String,
    pub root_pid: i32,
    pub state: TreeState,
    /// Where the tree's stdout and stderr go.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Set for a tree this agent restored rather than started.
    pub restored_from: Option<RestoredFrom>,
    /// The tree's job-network address, if it has one.
    pub address: Option<std::net::Ipv4Addr>,
}

/// One tree the agent started.
#[derive(Debug)]
pub(crate) struct Tree {
    pub id: TreeId,
    pub job: String,
    pub handle: TreeHandle,
    pub freezer: CgroupFreezer,
    /// Keeps the tree from opening ptys (mpirun and orted give ranks ptys
    /// when they can; CRIU restores a pty only at its dumped index, which
    /// is node-wide, so two restores collide). Removed with the tree.
    #[allow(dead_code)]
    pty_ban: Option<tree::PtyBan>,
    /// Read ends of the stdio pipes (drained while the tree is frozen).
    outputs: Vec<Arc<File>>,
    state: Mutex<TreeState>,
    stdout: PathBuf,
    stderr: PathBuf,
    restored_from: Option<RestoredFrom>,
    /// The tree's namespace with its job address; taken (and so removed)
    /// once the tree has exited.
    net: Mutex<Option<Arc<TreeNet>>>,
    /// The job's owner (uid, gid), reported to the coordinator.
    pub owner: (u32, u32),
}

impl Tree {
    pub fn state(&self) -> TreeState {
        *lock(&self.state)
    }

    /// The tree's job network namespace, while it runs.
    pub fn net(&self) -> Option<Arc<TreeNet>> {
        lock(&self.net).clone()
    }

    pub fn info(&self) -> TreeInfo {
        TreeInfo {
            id: self.id,
            job: self.job.clone(),
            root_pid: self.handle.root_pid,
            state: self.state(),
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            restored_from: self.restored_from.clone(),
            address: self.net().map(|n| n.address()),
        }
    }

    /// Waits until every byte the (frozen) tree wrote to its pipes has been
    /// taken by the pumps.
    pub fn drain(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        for f in &self.outputs {
            loop {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD on a descriptor we own (kept open by the
                // Arc) writes one int.
                let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
                if r < 0 || n == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{n} bytes of tree {}'s output still unread after {} ms",
                        self.id,
                        limit.as_millis()
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Ends the frozen tree without letting it run again: SIGKILL to every
    /// task while frozen, then thaw (each dies before user space).
    pub fn kill_frozen(&self) -> Result<(), FreezerError> {
        let mut pids = self.freezer.pids().unwrap_or_default();
        if !pids.contains(&self.handle.root_pid) {
            pids.push(self.handle.root_pid);
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.freezer.thaw()
    }
}

/// The trees of this agent.
#[derive(Debug)]
pub(crate) struct Registry {
    node: String,
    init_binary: PathBuf,
    state_dir: PathBuf,
    trees: Mutex<BTreeMap<TreeId, Arc<Tree>>>,
    next: Mutex<TreeId>,
    /// Distinguishes registries of one process in cgroup names.
    instance: u64,
    /// Notified when a tree starts, is adopted or exits (the session
    /// reports it to the coordinator).
    pub changed: Arc<tokio::sync::Notify>,
}

static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Registry {
    pub fn new(node: &str, init_binary: PathBuf, state_dir: PathBuf) -> Self {
        Registry {
            node: node.to_owned(),
            init_binary,
            state_dir,
            trees: Mutex::new(BTreeMap::new()),
            next: Mutex::new(0),
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn get(&self, id: TreeId) -> Option<Arc<Tree>> {
        lock(&self.trees).get(&id).cloned()
    }

    /// The job's trees, by id.
    pub fn of_job(&self, job: &str) -> Vec<Arc<Tree>> {
        lock(&self.trees)
            .values()
            .filter(|t| t.job == job)
            .cloned()
            .collect()
    }

    /// Drops the job's trees that have exited (a restart replaces them).
    pub fn forget_exited(&self, job: &str) {
        lock(&self.trees).retain(|_, t| t.job != job || matches!(t.state(), TreeState::Running));
    }

    pub fn all(&self) -> Vec<Arc<Tree>> {
        lock(&self.trees).values().cloned().collect()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A fresh tree id.
    pub fn next_id(&self) -> TreeId {
        let mut next = lock(&self.next);
        *next += 1;
        *next - 1
    }

    /// `agent.<node>.<instance>.<job>.t<id>-<our pid>`: unique even for
    /// several agents in one process (tests), and freezer::sweep_stale
    /// removes it once we are gone.
    pub fn cgroup_name(&self, job: &str, id: TreeId) -> String {
        format!(
            "agent.{}.{}.{job}.t{id}-{}",
            self.node,
            self.instance,
            std::process::id()
        )
    }

    /// Takes a tree that was restored into `freezer` (root `pid`, our
    /// child): pumps its output pipes into the files, reaps it when it ends.
    pub fn adopt(&self, job: &str, r: Adopted) -> Arc<Tree> {
        let (id, pid) = (r.id, r.root_pid);
        let mut pumps = Vec::new();
        let mut outputs = Vec::new();
        for (read, file) in r.outputs {
            let read = Arc::new(File::from(read));
            pumps.push(pump(read.clone(), file));
            outputs.push(read);
        }
        let tree = Arc::new(Tree {
            id,
            job: job.to_owned(),
            handle: TreeHandle {
                id,
                root_pid: pid,
                net: r.net,
                init_binary: r.init_dir.as_ref().map(|d| d.join(restore::INIT_NAME)),
                init_dir: r.init_dir,
            },
            freezer: r.freezer,
            pty_ban: r.pty_ban,
            outputs,
            state: Mutex::new(TreeState::Running),
            stdout: r.stdout,
            stderr: r.stderr,
            restored_from: Some(r.from),
            net: Mutex::new(r.jobnet),
            owner: r.owner,
        });
        lock(&self.trees).insert(id, tree.clone());
        tracing::info!(node = %self.node, job, tree = id, pid, "restored tree adopted");
        reap(tree.clone(), pumps, self.changed.clone());
        self.changed.notify_one();
        tree
    }

    /// Waits until no tree of ours uses `init_dir` any more (a tree killed
    /// at a stop-mode commit is reaped, and its init dir removed, shortly
    /// after); a tree that still runs there is an error at once.
    pub fn wait_init_dir_free(&self, init_dir: &Path, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let user = self.all().into_iter().find(|t| {
                t.handle.init_dir.as_deref() == Some(init_dir) && t.state() == TreeState::Running
            });
            let Some(t) = user else { return Ok(()) };
            let alive = Path::new(&format!("/proc/{}", t.handle.root_pid)).exists()
                && !is_zombie(t.handle.root_pid);
            if alive {
                return Err(format!(
                    "tree {} (pid {}) of job {} still runs from init dir {}",
                    t.id,
                    t.handle.root_pid,
                    t.job,
                    init_dir.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "tree {} that used init dir {} was not cleaned up within {} ms",
                    t.id,
                    init_dir.display(),
                    limit.as_millis()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `args` as a new tree of `job` (blocking: clone + exec).
    pub fn spawn(&self, job: &str, args: &TreeArgs) -> Result<TreeId, SpawnError> {
        if ckpt_protocol::manifest::check_name("job", job).is_err()
            || !job
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(SpawnError::BadJobName(job.to_owned()));
        }
        let id = self.next_id();
        let io_err = |op: &'static str, path: &Path| {
            let (job, path) = (job.to_owned(), path.to_path_buf());
            move |source| SpawnError::Io {
                job,
                op,
                path,
                source,
            }
        };
        let freezer = CgroupFreezer::create(&self.cgroup_name(job, id)).map_err(|source| {
            SpawnError::Freezer {
                job: job.to_owned(),
                source,
            }
        })?;
        let pty_ban = tree::PtyBan::create(&self.cgroup_name(job, id)).map_err(|source| {
            let _ = freezer.remove();
            SpawnError::PtyBan {
                job: job.to_owned(),
                source,
            }
        })?;
        let init_dir = self.state_dir.join(format!("{job}.t{id}"));
        let init = restore::install_init(&init_dir, &self.init_binary).map_err(|source| {
            let _ = freezer.remove();
            SpawnError::Init {
                job: job.to_owned(),
                source: Box::new(source),
            }
        })?;
        let open_out = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err("open", path))
        };
        let out_file = open_out(&args.stdout)?;
        let err_file = open_out(&args.stderr)?;
        let (out_r, out_w) = pipe().map_err(io_err("create a pipe for", &args.stdout))?;
        let (err_r, err_w) = pipe().map_err(io_err("create a pipe for", &args.stderr))?;
        let spec = TreeSpec {
            init,
            init_dir: init_dir.clone(),
            argv: args.argv.clone(),
            cwd: args.cwd.clone(),
            env: args.env.clone(),
            uid: args.uid,
            gid: args.gid,
            groups: args.groups.clone(),
            net: args.net,
            stdin: None,
            stdout: out_w,
            stderr: err_w,
            cgroups: std::iter::once(freezer.procs_file())
                .chain(pty_ban.as_ref().map(|b| b.procs_file()))
                .collect(),
            netns: match &args.jobnet {
                Some(n) => Some(n.netns().try_clone_to_owned().map_err(io_err(
                    "duplicate the network namespace descriptor for",
                    Path::new("/proc/self/ns/net"),
                ))?),
                None => None,
            },
        };
        let pid = match tree::spawn(spec) {
            Ok(pid) => pid,
            Err(source) => {
                let _ = freezer.remove();
                return Err(SpawnError::Tree {
                    job: job.to_owned(),
                    source,
                });
            }
        };
        let (out_r, err_r) = (Arc::new(File::from(out_r)), Arc::new(File::from(err_r)));
        let pumps = vec![pump(out_r.clone(), out_file), pump(err_r.clone(), err_file)];
        let tree = Arc::new(Tree {
            id,
            job: job.to_owned(),
            handle: TreeHandle {
                id,
                root_pid: pid,
                net: args.net,
                init_binary: Some(init_dir.join(restore::INIT_NAME)),
                init_dir: Some(init_dir),
            },
            freezer,
            pty_ban,
            outputs: vec![out_r, err_r],
            state: Mutex::new(TreeState::Running),
            stdout: args.stdout.clone(),
            stderr: args.stderr.clone(),
            restored_from: None,
            net: Mutex::new(args.jobnet.clone()),
            owner: (args.uid, args.gid),
        });
        lock(&self.trees).insert(id, tree.clone());
        tracing::info!(node = %self.node, job, tree = id, pid, "tree started");
        reap(tree, pumps, self.changed.clone());
        self.changed.notify_one();
        Ok(id)
    }
}

/// A restored tree for [`Registry::adopt`].
#[derive(Debug)]
pub(crate) struct Adopted {
    pub id: TreeId,
    pub root_pid: i32,
    pub net: NetMode,
    pub init_dir: Option<PathBuf>,
    pub freezer: CgroupFreezer,
    pub pty_ban: Option<tree::PtyBan>,
    /// Read end of each stdio pipe and the file it is copied into.
    pub outputs: Vec<(OwnedFd, File)>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub from: RestoredFrom,
    /// The namespace it was restored into, with its job address.
    pub jobnet: Option<Arc<TreeNet>>,
    /// The job's owner (uid, gid) from the manifest.
    pub owner: (u32, u32),
}

/// Waits for the tree's init, removes its cgroup (once the namespace's
/// other tasks are gone too) and its init dir, then records how it ended:
/// a tree seen `Exited` has left nothing behind (a restore may reuse its
/// init dir at once).
fn reap(tree: Arc<Tree>, pumps: Vec<thread::JoinHandle<()>>, changed: Arc<tokio::sync::Notify>) {
    thread::spawn(move || {
        let pid = Pid::from_raw(tree.handle.root_pid);
        let code = loop {
            match waitpid(pid, None) {
                Ok(WaitStatus::Exited(_, code)) => break code,
                Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(tree = tree.id, error = %e, "lost track of the tree");
                    break -1;
                }
            }
        };
        for p in pumps {
            let _ = p.join();
        }
        for _ in 0..50 {
            if tree.freezer.remove().is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Some(dir) = &tree.handle.init_dir {
            let _ = fs::remove_dir_all(dir);
        }
        // The node side of its job address goes (the namespace itself with
        // the last descriptor and process).
        drop(lock(&tree.net).take());
        *lock(&tree.state) = TreeState::Exited(code);
        tracing::info!(job = %tree.job, tree = tree.id, code, "tree exited");
        changed.notify_one();
    });
}

pub(crate) fn pump(src: Arc<File>, mut dst: File) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match (&*src).read(&mut buf) {
                Ok(0) => return,
                // A full disk must not block the job: keep draining.
                Ok(n) => drop(dst.write_all(&buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Whether `pid` is a zombie (dead, not yet reaped).
fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
