//! Job trees in their own namespaces.
//!
//! Every tree starts as `ckpt-init -- CMD…`, PID 1 of a fresh PID namespace
//! (restore never collides with live PIDs), in a fresh IPC namespace (CRIU
//! can then dump SysV IPC) and, by default, a private network namespace with
//! only loopback (its sockets never collide with TIME_WAIT leftovers or
//! another copy of the job, and a restored tree keeps its addresses). The
//! init is its own session leader, as CRIU requires of a namespace init.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

/// How a tree is connected to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// The host's network namespace.
    Host,
    /// A namespace of its own with loopback only.
    Private,
}

/// Everything needed to start one tree.
#[derive(Debug)]
pub struct TreeSpec {
    /// Path of the `ckpt-init` binary.
    pub init: PathBuf,
    /// The init's own working directory: private to the tree, root's (CRIU
    /// mounts a /proc for the namespace there while dumping).
    pub init_dir: PathBuf,
    pub argv: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub net: NetMode,
    /// None: /dev/null.
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// `cgroup.procs` files the init joins before it runs anything.
    pub cgroups: Vec<PathBuf>,
    /// With [`NetMode::Private`]: join this prepared network namespace (a
    /// job address, see [`crate::jobnet`]) instead of creating one.
    pub netns: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("invalid argument for the job: {0}")]
    BadArgument(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the job's namespaces (clone): {0}")]
    Clone(#[source] io::Error),
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, TreeError> {
    CString::new(bytes).map_err(|_| TreeError::BadArgument(format!("{what} contains a NUL byte")))
}

/// Starts a tree and returns the host PID of its init once the init runs
/// (it has its session, cgroups and namespaces: a checkpoint right after
/// this returns finds a well-formed tree). The clone happens on the
/// [`crate::forker`] thread, so the init's parent-death signal fires only
/// when this process dies. The spec's descriptors are closed on return.
pub fn spawn(spec: TreeSpec) -> Result<i32, TreeError> {
    crate::forker::run(move || spawn_here(&spec))
}

fn spawn_here(spec: &TreeSpec) -> Result<i32, TreeError> {
    // Everything the child needs is prepared here: between clone and execve
    // the child may only make async-signal-safe calls (the caller is
    // multithreaded; locks held by other threads are never released there).
    let init = cstring(spec.init.as_os_str().as_bytes(), "init path")?;
    // The init stays root; it drops to the job's credentials in its child.
    let groups_arg = spec
        .groups
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut argv = vec![init.clone()];
    for (opt, val) in [
        ("--uid", spec.uid.to_string().into_bytes()),
        ("--gid", spec.gid.to_string().into_bytes()),
        ("--groups", groups_arg.into_bytes()),
        ("--cwd", spec.cwd.as_os_str().as_bytes().to_vec()),
    ] {
        argv.push(cstring(opt.as_bytes(), "argv")?);
        argv.push(cstring(&val, "argv")?);
    }
    argv.push(cstring(b"--", "argv")?);
    for a in &spec.argv {
        argv.push(cstring(a.as_bytes(), "argument")?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    let mut env: Vec<CString> = Vec::new();
    let overridden: Vec<&OsString> = spec.env.iter().map(|(k, _)| k).collect();
    for (k, v) in std::env::vars_os() {
        if !overridden.contains(&&k) {
            env.push(env_entry(&k, &v)?);
        }
    }
    for (k, v) in &spec.env {
        env.push(env_entry(k, v)?);
    }
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let cwd = cstring(spec.init_dir.as_os_str().as_bytes(), "init directory")?;
    let devnull;
    let stdin_fd = match &spec.stdin {
        Some(fd) => fd.as_raw_fd(),
        None => {
            devnull = open_fd(Path::new("/dev/null"), OFlag::O_RDONLY)?;
            devnull.as_raw_fd()
        }
    };
    let cgroup_fds = spec
        .cgroups
        .iter()
        .map(|p| open_fd(p, OFlag::O_WRONLY))
        .collect::<Result<Vec<_>, _>>()?;
    let cgroup_raw: Vec<i32> = cgroup_fds.iter().map(|f| f.as_raw_fd()).collect();
    let lo_name = *b"lo\0";

    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWIPC;
    let join_net = match (&spec.netns, spec.net) {
        (Some(fd), NetMode::Private) => fd.as_raw_fd(),
        _ => -1,
    };
    if spec.net == NetMode::Private && join_net < 0 {
        flags |= libc::CLONE_NEWNET;
    }
    let child = ChildPlan {
        argv: &argv_ptrs,
        envp: &env_ptrs,
        init: &init,
        cwd: &cwd,
        stdio: [stdin_fd, spec.stdout.as_raw_fd(), spec.stderr.as_raw_fd()],
        cgroups: &cgroup_raw,
        lo_up: spec.net == NetMode::Private && join_net < 0,
        lo_name: &lo_name,
        join_net,
    };

    // Exec barrier: both ends close-on-exec; EOF on the read end means the
    // child has exec'd the init (or died trying).
    let (barrier_r, barrier_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| TreeError::Clone(io::Error::from(e)))?;

    // SAFETY: clone without CLONE_VM and without a new stack behaves like
    // fork(2); the child runs only `child.exec()`, which makes raw,
    // async-signal-safe system calls and ends in execve or _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(TreeError::Clone(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; see ChildPlan::exec.
        unsafe { child.exec() }
    }
    drop(barrier_w);
    let mut byte = [0u8; 1];
    while let Err(nix::errno::Errno::EINTR) = nix::unistd::read(barrier_r.as_raw_fd(), &mut byte) {}
    Ok(pid as i32)
}

fn env_entry(k: &OsString, v: &OsString) -> Result<CString, TreeError> {
    let mut b = k.as_bytes().to_vec();
    b.push(b'=');
    b.extend_from_slice(v.as_bytes());
    cstring(&b, "environment")
}

fn open_fd(path: &Path, flags: OFlag) -> Result<OwnedFd, TreeError> {
    open(path, flags | OFlag::O_CLOEXEC, Mode::empty())
        .map(|fd| {
            // SAFETY: open returned a fresh descriptor that nothing else owns.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .map_err(|source| TreeError::Open {
            path: path.to_path_buf(),
            source,
        })
}

struct ChildPlan<'a> {
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    init: &'a CString,
    cwd: &'a CString,
    stdio: [i32; 3],
    cgroups: &'a [i32],
    lo_up: bool,
    lo_name: &'a [u8; 3],
    /// A network namespace to join (-1: none).
    join_net: i32,
}

/// Reports a setup failure on the job's stderr and ends the child.
fn fail(msg: &[u8]) -> ! {
    // SAFETY: write(2) and _exit(2) are async-signal-safe; msg is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

impl ChildPlan<'_> {
    /// Runs in the cloned child: set up and exec the init, or _exit(127).
    ///
    /// # Safety
    /// Must only be called in the child right after clone; it never returns.
    unsafe fn exec(&self) -> ! {
        // SAFETY: raw, async-signal-safe system calls on descriptors and
        // buffers the parent prepared, alive in this copy of its memory.
        unsafe {
            if self.join_net >= 0 && libc::setns(self.join_net, libc::CLONE_NEWNET) < 0 {
                fail(b"ckpt: cannot join the job's network namespace\n");
            }
            for fd in self.cgroups {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    fail(b"ckpt: cannot join the job's cgroup\n");
                }
            }
            // The caller may block signals (a supervisor waits for them
            // in one thread); the job starts with none blocked.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::setsid() < 0 {
                fail(b"ckpt: setsid failed\n");
            }
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            if self.lo_up {
                let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (i, b) in self.lo_name.iter().enumerate() {
                    ifr.ifr_name[i] = *b as libc::c_char;
                }
                if s < 0 || libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                    fail(b"ckpt: cannot read loopback flags in the job's netns\n");
                }
                ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                if libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) < 0 {
                    fail(b"ckpt: cannot bring up loopback in the job's netns\n");
                }
                libc::close(s);
            }
            for (target, fd) in self.stdio.iter().enumerate() {
                let target = target as i32;
                if *fd == target {
                    // dup2 onto itself keeps CLOEXEC; clear it instead.
                    libc::fcntl(target, libc::F_SETFD, 0);
                } else if libc::dup2(*fd, target) < 0 {
                    fail(b"ckpt: cannot set up the job's stdio\n");
                }
            }
            if libc::chdir(self.cwd.as_ptr()) < 0 {
                fail(b"ckpt: cannot enter the init's directory\n");
            }
            libc::execve(self.init.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
            fail(b"ckpt: cannot execute ckpt-init\n")
        }
    }
}

/// Creates a fresh network namespace with loopback up and returns a
/// descriptor of it (the namespace lives as long as the descriptor). Used to
/// restore a tree with a private network into a clean namespace.
pub fn new_private_netns() -> io::Result<OwnedFd> {
    // unshare(CLONE_NEWNET) affects only the calling thread, so a short-lived
    // thread creates the namespace and hands back a descriptor of it.
    std::thread::spawn(|| -> io::Result<OwnedFd> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        loopback_up()?;
        let fd = open(
            Path::new("/proc/thread-self/ns/net"),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        // SAFETY: fresh descriptor from open, owned by nobody else.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: plain ioctls on a socket we own, with a zeroed ifreq whose
    // name is set to "lo".
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let r = if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            Err(io::Error::last_os_error())
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(s);
        r
    }
}

/// Inode of a process's network namespace (CRIU's `net[<inode>]` key).
pub fn netns_inode(pid: i32) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// A devices cgroup (v1) that keeps the tree from creating pseudo-terminals
/// (`/dev/ptmx`, char 5:2, is denied).
///
/// Why: a pty lives in the host's devpts, where its index is a node-wide
/// name. CRIU restores a pty pair only at its dumped index (`tty: Unable to
/// open dev/ptmx with specified index N` when any other session on the node
/// holds it by then), and it cannot move it into a fresh devpts unless the
/// tree has a mount namespace of its own. Open MPI's mpirun gives every rank
/// a pty for stdout when it can, and silently falls back to pipes when
/// `openpty` fails; pipes restore anywhere. Ptys the job inherits or opens
/// by an existing path are unaffected.
///
/// Only cgroup v1's `devices` hierarchy is used; on a cgroup2-only host
/// (where this needs a BPF program) [`PtyBan::create`] returns `None` and
/// ptys stay allowed.
#[derive(Debug)]
pub struct PtyBan {
    dir: PathBuf,
}

const DEVICES_V1: &str = "/sys/fs/cgroup/devices";

impl PtyBan {
    /// Creates (or reuses) `ckpt/<name>` in the devices hierarchy.
    pub fn create(name: &str) -> io::Result<Option<Self>> {
        let root = Path::new(DEVICES_V1);
        if !root.join("devices.deny").exists() {
            return Ok(None);
        }
        crate::freezer::sweep_stale(&root.join("ckpt"));
        let dir = root.join("ckpt").join(name);
        std::fs::create_dir_all(&dir)?;
        let me = Self { dir };
        if let Err(e) = std::fs::write(me.dir.join("devices.deny"), "c 5:2 rwm") {
            me.remove();
            return Err(e);
        }
        Ok(Some(me))
    }

    /// The file a process writes `0` to, to join the cgroup.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Best effort (the cgroup is busy until the tree is gone).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for PtyBan {
    fn drop(&mut self) {
        self.remove();
    }
}
