//! Options of a dump and of a restore, and their translation to `criu_opts`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

use ckpt_protocol::criu_pb;

use super::error::{CriuError, Op};

/// CRIU's default log level for our calls: 4 = debug, what a post-mortem
/// needs (CRIU's own default, 2, shows errors only).
pub const DEFAULT_LOG_LEVEL: i32 = 4;

/// How CRIU handles the tree's cgroups (`--manage-cgroups=<mode>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgMode {
    /// Neither dump nor restore cgroups.
    Ignore,
    /// Restore into existing cgroups; do not touch their properties.
    None,
    /// Restore the properties only.
    Props,
    /// Create missing cgroups, set properties only of those created.
    Soft,
    /// Create missing cgroups and set all properties.
    Full,
    /// Like full, and fail if a cgroup already exists.
    Strict,
    /// CRIU's default (soft).
    Default,
}

impl CgMode {
    fn to_pb(self) -> criu_pb::CriuCgMode {
        match self {
            CgMode::Ignore => criu_pb::CriuCgMode::Ignore,
            CgMode::None => criu_pb::CriuCgMode::CgNone,
            CgMode::Props => criu_pb::CriuCgMode::Props,
            CgMode::Soft => criu_pb::CriuCgMode::Soft,
            CgMode::Full => criu_pb::CriuCgMode::Full,
            CgMode::Strict => criu_pb::CriuCgMode::Strict,
            CgMode::Default => criu_pb::CriuCgMode::Default,
        }
    }
}

/// What to dump and how. Build with [`DumpOptions::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct DumpOptions<'a> {
    /// Root of the tree to dump.
    pub pid: i32,
    /// Directory the images are written to (CRIU opens it through our
    /// `/proc/<pid>/fd`, so it must stay open for the call).
    pub images_dir: BorrowedFd<'a>,
    /// Log file name inside `images_dir` (no '/'). Default "dump.log".
    pub log_file: String,
    /// CRIU log level 0–4. Default [`DEFAULT_LOG_LEVEL`].
    pub log_level: i32,
    /// Let the tree run on after the dump (`--leave-running`); otherwise
    /// CRIU kills it after a successful dump.
    pub leave_running: bool,
    /// Leave the tree stopped (SIGSTOP) after the dump (`--leave-stopped`).
    pub leave_stopped: bool,
    /// Dump established TCP connections (`--tcp-established`; needs
    /// iptables for the network lock).
    pub tcp_established: bool,
    /// The tree is a shell job: its session/pgid lies outside the tree.
    pub shell_job: bool,
    /// Allow unix sockets connected to peers outside the tree.
    pub ext_unix_sk: bool,
    /// Dump file locks.
    pub file_locks: bool,
    /// Freeze the tree with this freezer cgroup (path of the cgroup dir)
    /// instead of ptrace-stopping each task.
    pub freeze_cgroup: Option<String>,
    /// External resources, e.g. `"net[4026532000]:ckpt-net"`.
    pub external: Vec<String>,
    /// `--manage-cgroups` mode; `None` leaves CRIU's default.
    pub manage_cgroups_mode: Option<CgMode>,
    /// Largest deleted file CRIU saves as a ghost, bytes (CRIU default 1 MiB).
    pub ghost_limit: Option<u32>,
    /// Send [`NotifyEvent`](super::NotifyEvent)s to the handler.
    pub notify_scripts: bool,
    /// CRIU's timeout for freezing/seizing the tree, seconds.
    pub timeout_secs: Option<u32>,
}

impl<'a> DumpOptions<'a> {
    /// Options for dumping `pid` into `images_dir`, everything else default
    /// (tree killed after dump, log "dump.log" at level 4).
    pub fn new(pid: i32, images_dir: BorrowedFd<'a>) -> Self {
        Self {
            pid,
            images_dir,
            log_file: "dump.log".to_string(),
            log_level: DEFAULT_LOG_LEVEL,
            leave_running: false,
            leave_stopped: false,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            freeze_cgroup: None,
            external: Vec::new(),
            manage_cgroups_mode: None,
            ghost_limit: None,
            notify_scripts: false,
            timeout_secs: None,
        }
    }

    pub(crate) fn to_pb(&self) -> Result<criu_pb::CriuOpts, CriuError> {
        let op = Op::Dump { pid: self.pid };
        if self.pid <= 0 {
            return Err(CriuError::InvalidOptions {
                op,
                detail: format!(
                    "pid must be positive (a missing pid makes CRIU dump itself), got {}",
                    self.pid
                ),
            });
        }
        check_log_file(op, &self.log_file)?;
        let mut o = criu_pb::CriuOpts {
            images_dir_fd: self.images_dir.as_raw_fd(),
            pid: Some(self.pid),
            log_file: Some(self.log_file.clone()),
            log_level: Some(self.log_level),
            leave_running: Some(self.leave_running),
            leave_stopped: Some(self.leave_stopped),
            tcp_established: Some(self.tcp_established),
            shell_job: Some(self.shell_job),
            ext_unix_sk: Some(self.ext_unix_sk),
            file_locks: Some(self.file_locks),
            freeze_cgroup: self.freeze_cgroup.clone(),
            external: self.external.clone(),
            ghost_limit: self.ghost_limit,
            notify_scripts: Some(self.notify_scripts),
            timeout: self.timeout_secs,
            ..Default::default()
        };
        if let Some(m) = self.manage_cgroups_mode {
            o.set_manage_cgroups_mode(m.to_pb());
        }
        Ok(o)
    }
}

/// A descriptor of ours that replaces an external resource of the restored
/// tree (`--inherit-fd fd[N]:<key>`), e.g. a network namespace fd for the
/// key given as `external` at dump time.
#[derive(Debug, Clone)]
pub struct InheritFd<'a> {
    /// The descriptor; the client makes it available inside criu.
    pub fd: BorrowedFd<'a>,
    /// CRIU's key, e.g. `"ckpt-net"` or `"pipe:[12345]"`.
    pub key: String,
}

/// What to restore and how. Build with [`RestoreOptions::new`].
#[derive(Debug, Clone)]
pub struct RestoreOptions<'a> {
    /// Directory holding the images.
    pub images_dir: BorrowedFd<'a>,
    /// Log file name inside `images_dir` (no '/'). Default "restore.log".
    pub log_file: String,
    /// CRIU log level 0–4. Default [`DEFAULT_LOG_LEVEL`].
    pub log_level: i32,
    /// Make the restored root a child of the calling process (so it can
    /// `waitpid` it) instead of a child of the short-lived criu. Default true.
    pub rst_sibling: bool,
    /// Leave the restored tasks stopped (SIGSTOP) (`--leave-stopped`).
    pub leave_stopped: bool,
    /// Restore established TCP connections.
    pub tcp_established: bool,
    /// The tree is a shell job.
    pub shell_job: bool,
    /// Allow unix sockets connected to peers outside the tree.
    pub ext_unix_sk: bool,
    /// Restore file locks.
    pub file_locks: bool,
    /// Descriptors that replace external resources.
    pub inherit_fd: Vec<InheritFd<'a>>,
    /// External resources (e.g. `"mnt[...]:..."`), as at dump.
    pub external: Vec<String>,
    /// `--manage-cgroups` mode; `None` leaves CRIU's default.
    pub manage_cgroups_mode: Option<CgMode>,
    /// Send [`NotifyEvent`](super::NotifyEvent)s to the handler.
    pub notify_scripts: bool,
    /// `cgroup.procs` files the criu process writes its own pid into before
    /// it execs, so that the restored tasks (forked by criu) start in those
    /// cgroups (one per hierarchy on cgroup v1).
    pub join_cgroup_procs: Vec<PathBuf>,
}

impl<'a> RestoreOptions<'a> {
    /// Options for restoring from `images_dir` as our child (`rst_sibling`),
    /// log "restore.log" at level 4, everything else off.
    pub fn new(images_dir: BorrowedFd<'a>) -> Self {
        Self {
            images_dir,
            log_file: "restore.log".to_string(),
            log_level: DEFAULT_LOG_LEVEL,
            rst_sibling: true,
            leave_stopped: false,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            inherit_fd: Vec::new(),
            external: Vec::new(),
            manage_cgroups_mode: None,
            notify_scripts: false,
            join_cgroup_procs: Vec::new(),
        }
    }

    /// `child_fds[i]` is the number `inherit_fd[i]` has inside criu.
    pub(crate) fn to_pb(&self, child_fds: &[i32]) -> Result<criu_pb::CriuOpts, CriuError> {
        check_log_file(Op::Restore, &self.log_file)?;
        let inherit_fd = self
            .inherit_fd
            .iter()
            .zip(child_fds)
            .map(|(i, fd)| criu_pb::InheritFd {
                key: i.key.clone(),
                fd: *fd,
            })
            .collect();
        let mut o = criu_pb::CriuOpts {
            images_dir_fd: self.images_dir.as_raw_fd(),
            log_file: Some(self.log_file.clone()),
            log_level: Some(self.log_level),
            rst_sibling: Some(self.rst_sibling),
            leave_stopped: Some(self.leave_stopped),
            tcp_established: Some(self.tcp_established),
            shell_job: Some(self.shell_job),
            ext_unix_sk: Some(self.ext_unix_sk),
            file_locks: Some(self.file_locks),
            inherit_fd,
            external: self.external.clone(),
            notify_scripts: Some(self.notify_scripts),
            ..Default::default()
        };
        if let Some(m) = self.manage_cgroups_mode {
            o.set_manage_cgroups_mode(m.to_pb());
        }
        Ok(o)
    }
}

fn check_log_file(op: Op, name: &str) -> Result<(), CriuError> {
    if name.is_empty() || name.contains('/') {
        return Err(CriuError::InvalidOptions {
            op,
            detail: format!("log_file {name:?} must be a plain file name inside the images dir"),
        });
    }
    Ok(())
}
