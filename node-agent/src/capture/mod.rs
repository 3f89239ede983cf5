//! Node-local state a job tree needs at restore.
//!
//! CRIU saves only the *paths* of shared file mappings and open files, and
//! at restore it checks that open regular files still have their dump-time
//! size. So while a tree is frozen for a dump the agent computes a
//! [`CapturePlan`]: which node-local files to copy into the image set
//! (shared-memory files, MPI session dirs), which output files must be put
//! back to their dump-time size at restore, and which pipes are the root's
//! stdio. Copying is the pack module's job; this module only decides.
//!
//! What MPI stacks leave on a node (measured here with 4-rank jobs):
//!
//! - Open MPI 4.1.4 (`--mca btl self,vader`): `/dev/shm/vader_segment.<host>.<uid>.<jobid>.<rank>`
//!   (4 MiB each, mapped `rw-s` by every rank), and the session dir
//!   `/tmp/ompi.<host>.<uid>/pid.<mpirun pid>/` holding the PMIx dstore
//!   segments (`pmix_dstor_ds{12,21}_<pid>/`, mapped by mpirun and every rank),
//!   `hwloc.sm` (open `O_RDWR` by mpirun), `contact.txt`, per-rank dirs and a
//!   `debugger_attach_fifo` FIFO open in mpirun. Under direct launch the
//!   job-family dir is `jf.<jobfam>` instead of `pid.<pid>`. The per-user dir
//!   `ompi.<host>.<uid>` can hold other jobs' dirs, so only the job's own dir
//!   is captured. PMIx talks TCP on 127.0.0.1 here: no unix-socket rendezvous
//!   files. `/dev/shm/open_mpi.0000` is unlinked (CRIU keeps it itself).
//! - MPICH 4.0 hydra (ch4:ucx, `UCX_TLS=^sysv`): nothing under `/tmp`; its
//!   `/dev/shm` files (`ucx_shm_posix_*`, `mpich_shar_tmp*`) are all unlinked
//!   while mapped, so CRIU dumps them as ghost files; PMI runs over an
//!   inherited socketpair (`PMI_FD`) and UCX uses abstract unix sockets.

mod paths;
mod procfs;
mod restore;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use restore::restore_writable_sizes;

/// Errors of tree scanning, planning and size restoring; each names the
/// process or file it was about.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} vanished while its tree was scanned (is the tree frozen?)")]
    Vanished { pid: i32 },
    #[error("process {pid}: cannot parse {file}: {line:?}")]
    Parse {
        pid: i32,
        file: PathBuf,
        line: String,
    },
    #[error("no process to plan a capture for (empty pid list)")]
    EmptyTree,
    #[error("process {pid} uses {path}, which does not exist in the agent's view (other mount namespace?)")]
    NotVisible { pid: i32, path: PathBuf },
    #[error("process {pid} uses {path}, but that path names another file in the agent's view (other mount namespace?)")]
    NotSameFile { pid: i32, path: PathBuf },
    #[error("{path} is missing at restore (it had {size} bytes at dump)")]
    Missing { path: PathBuf, size: u64 },
    #[error("{path} is no longer a regular file at restore")]
    NotRegular { path: PathBuf },
    #[error(
        "{path} shrank since the dump: {actual} bytes now, {expected} at dump; refusing to restore"
    )]
    Shrunk {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

/// A regular file the tree had open for writing, with its size at dump.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WritableFile {
    pub path: PathBuf,
    /// Size when the tree was frozen.
    pub size: u64,
    /// Some descriptor had it open `O_APPEND`. Truncating such a file back is
    /// exact; a file written at offsets may also have had bytes below `size`
    /// overwritten after the dump, which no truncation can undo.
    #[serde(default)]
    pub append: bool,
}

/// What to save of a frozen tree besides CRIU's images.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct CapturePlan {
    /// Files and whole dirs to copy and put back before restore: absolute,
    /// sorted, deduplicated, none inside another listed dir. May include
    /// FIFOs (and dirs holding FIFOs or socket files): the packer recreates
    /// FIFOs empty and skips sockets, which CRIU binds itself.
    pub copy_paths: Vec<PathBuf>,
    /// Regular files open for writing outside the copied paths, sorted by path.
    pub writable_files: Vec<WritableFile>,
    /// `(fd, pipe inode)` for each of the root's fds 0, 1, 2 that is a pipe.
    pub stdio_pipes: Vec<(i32, u64)>,
    /// Filesystem paths the tree's unix sockets are bound to (sorted). Not
    /// copied: CRIU rebinds them, but their directories must exist.
    #[serde(default)]
    pub socket_paths: Vec<PathBuf>,
}

/// Where node-local state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRules {
    /// tmpfs dirs whose files the tree uses are copied one by one.
    pub shm_roots: Vec<PathBuf>,
    /// Session dirs captured whole when the tree refers to anything in them
    /// (an open file, a mapping, a bound socket, its cwd, or an environment
    /// value naming a path): `/`-separated component globs relative to
    /// `tmp_root`, e.g. `ompi.*/pid.*`. Dirs the tree does not refer to are
    /// never captured, even if they match: they belong to other jobs.
    pub session_dir_patterns: Vec<String>,
    pub tmp_root: PathBuf,
    /// Environment variables whose value, in any process of the tree, names
    /// a session dir to capture whole wherever it is (Open MPI exports its
    /// job-family dir, also when `orte_tmpdir_base` moves it out of
    /// `tmp_root`).
    pub session_dir_env_vars: Vec<String>,
}

impl Default for CaptureRules {
    fn default() -> Self {
        Self {
            shm_roots: vec![PathBuf::from("/dev/shm")],
            session_dir_patterns: vec![
                // Open MPI 4.x (orte): job-family dir of an mpirun-launched job ...
                "ompi.*/pid.*".to_string(),
                // ... and of a direct launch (srun) without an HNP.
                "ompi.*/jf.*".to_string(),
                // Both below the per-job `orte_tmpdir_base` that ckpt-job
                // sets (`/tmp/ckpt-job.<job>`).
                "ckpt-job.*/ompi.*/pid.*".to_string(),
                "ckpt-job.*/ompi.*/jf.*".to_string(),
            ],
            tmp_root: PathBuf::from("/tmp"),
            session_dir_env_vars: vec!["OMPI_MCA_orte_jobfam_session_dir".to_string()],
        }
    }
}

/// All pids of the tree rooted at `root` (root first, then depth-first), via
/// `/proc/<pid>/task/*/children`, so children forked by any thread count.
/// Pids are as seen in the agent's PID namespace.
pub fn tree_pids(root: i32) -> Result<Vec<i32>, CaptureError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let kids = match procfs::children(pid) {
            Ok(k) => k,
            // A descendant that exited after its parent listed it is no
            // longer part of the tree; the root itself must exist.
            Err(CaptureError::Vanished { .. }) if pid != root => continue,
            Err(e) => return Err(e),
        };
        out.push(pid);
        stack.extend(kids.into_iter().rev());
    }
    Ok(out)
}

/// A file some process of the tree has open or mapped, with the identity
/// the kernel gave for it (so the agent can check it sees the same file).
#[derive(Debug)]
struct FileRef {
    pid: i32,
    path: PathBuf,
    dev: (u64, u64),
    ino: u64,
}

/// A regular file open for writing.
#[derive(Debug)]
struct WriteRef {
    file: FileRef,
    size: u64,
    append: bool,
}

#[derive(Debug, Default)]
struct Scan {
    files: Vec<FileRef>,
    writes: Vec<WriteRef>,
    /// Paths only used to find session dirs (cwd, environment, sockets).
    hints: Vec<PathBuf>,
    /// Values of `session_dir_env_vars`.
    declared_dirs: Vec<PathBuf>,
    sockets: BTreeSet<u64>,
    /// One pid per network namespace of the tree.
    netns: BTreeMap<OsString, i32>,
    stdio_pipes: Vec<(i32, u64)>,
}

fn dev_pair(dev: u64) -> (u64, u64) {
    (nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
}

impl Scan {
    fn process(
        &mut self,
        pid: i32,
        is_root: bool,
        rules: &CaptureRules,
    ) -> Result<(), CaptureError> {
        // A zombie has no files, maps or memory left; CRIU dumps it as such.
        if procfs::is_zombie(pid) {
            return Ok(());
        }
        for fd in procfs::fds(pid)? {
            let target = fd.target.as_bytes();
            if let Some(ino) = procfs::bracket_inode(target, b"socket:") {
                self.sockets.insert(ino);
                continue;
            }
            if let Some(ino) = procfs::bracket_inode(target, b"pipe:") {
                if is_root && (0..=2).contains(&fd.fd) {
                    self.stdio_pipes.push((fd.fd, ino));
                }
                continue;
            }
            // anon_inode:[...], and anything else that is not a path.
            if target.first() != Some(&b'/') {
                continue;
            }
            let Some(meta) = procfs::fd_metadata(pid, fd.fd)? else {
                continue;
            };
            // Unlinked (incl. memfd): CRIU saves the contents as a ghost file.
            if meta.nlink() == 0 {
                continue;
            }
            let file = FileRef {
                pid,
                path: PathBuf::from(fd.target.clone()),
                dev: dev_pair(meta.dev()),
                ino: meta.ino(),
            };
            let acc = fd.flags & libc::O_ACCMODE as u32;
            let writes = acc == libc::O_WRONLY as u32 || acc == libc::O_RDWR as u32;
            let is_path_only = fd.flags & libc::O_PATH as u32 != 0;
            if meta.is_file() && writes && !is_path_only {
                let append = fd.flags & libc::O_APPEND as u32 != 0;
                self.writes.push(WriteRef {
                    file: FileRef {
                        pid,
                        path: file.path.clone(),
                        dev: file.dev,
                        ino: file.ino,
                    },
                    size: meta.len(),
                    append,
                });
            }
            self.files.push(file);
        }
        for m in procfs::maps(pid)? {
            if m.deleted {
                continue;
            }
            self.files.push(FileRef {
                pid,
                path: m.path,
                dev: (u64::from(m.major), u64::from(m.minor)),
                ino: m.inode,
            });
        }
        self.hints.push(PathBuf::from(procfs::link(pid, "cwd")?));
        for (k, v) in procfs::environ(pid)? {
            if v.as_bytes().first() != Some(&b'/') {
                continue;
            }
            if rules
                .session_dir_env_vars
                .iter()
                .any(|n| n.as_bytes() == k.as_bytes())
            {
                self.declared_dirs.push(PathBuf::from(&v));
            }
            self.hints.push(PathBuf::from(v));
        }
        let ns = procfs::link(pid, "ns/net")?;
        self.netns.entry(ns).or_insert(pid);
        Ok(())
    }

    /// Bound paths of the tree's own sockets, from each netns it uses.
    fn socket_paths(&self) -> Result<Vec<PathBuf>, CaptureError> {
        let mut out = BTreeSet::new();
        for &pid in self.netns.values() {
            for (ino, path) in procfs::net_unix(pid)? {
                if self.sockets.contains(&ino) {
                    out.insert(path);
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// Checks that `path` names, in the agent's view, the file the process uses.
fn same_file(f: &FileRef) -> Result<fs::Metadata, CaptureError> {
    let meta = match fs::metadata(&f.path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CaptureError::NotVisible {
                pid: f.pid,
                path: f.path.clone(),
            })
        }
        Err(e) => {
            return Err(CaptureError::Io {
                what: "stat",
                path: f.path.clone(),
                source: e,
            })
        }
    };
    if dev_pair(meta.dev()) != f.dev || meta.ino() != f.ino {
        return Err(CaptureError::NotSameFile {
            pid: f.pid,
            path: f.path.clone(),
        });
    }
    Ok(meta)
}

fn is_pseudo_fs(path: &Path) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// Scans the (frozen) tree `pids` (root first, as [`tree_pids`] returns it):
/// open fds with their fdinfo flags, file mappings, the unix sockets of the
/// tree's network namespaces, cwds and environments.
///
/// - `copy_paths`: every regular file or FIFO under a shm root that the tree
///   has open or mapped, and every session dir (see [`CaptureRules`]) it
///   refers to. Unlinked files, `/proc`, `/sys`, other `/dev` files,
///   anonymous maps, pipes, sockets and anon inodes are left to CRIU.
/// - `writable_files`: regular files open `O_WRONLY`/`O_RDWR` outside shm
///   roots, session dirs and pseudo filesystems, with their current size.
///
/// Fails if a process vanishes (the tree was not frozen) or if a path the
/// tree uses names another file, or none, in the agent's mount namespace:
/// copying the wrong file would restore silently broken state.
pub fn plan(pids: &[i32], rules: &CaptureRules) -> Result<CapturePlan, CaptureError> {
    let root = *pids.first().ok_or(CaptureError::EmptyTree)?;
    let mut scan = Scan::default();
    for &pid in pids {
        scan.process(pid, pid == root, rules)?;
    }
    let socket_paths = scan.socket_paths()?;

    let mut session_dirs = BTreeSet::new();
    let referenced = scan
        .files
        .iter()
        .map(|f| &f.path)
        .chain(&scan.hints)
        .chain(&socket_paths);
    for path in referenced {
        if let Some(dir) = paths::session_dir_of(path, &rules.tmp_root, &rules.session_dir_patterns)
        {
            if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                session_dirs.insert(dir);
            }
        }
    }
    for dir in &scan.declared_dirs {
        if paths::plausible_session_dir(dir, rules)
            && fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
        {
            session_dirs.insert(dir.clone());
        }
    }
    let in_session = |p: &Path| session_dirs.iter().any(|d| p.starts_with(d));
    let in_shm = |p: &Path| rules.shm_roots.iter().any(|r| paths::strictly_under(p, r));

    let mut copy: Vec<PathBuf> = session_dirs.iter().cloned().collect();
    for f in &scan.files {
        if !in_shm(&f.path) || in_session(&f.path) {
            continue;
        }
        let ft = same_file(f)?.file_type();
        if ft.is_file() || ft.is_fifo() {
            copy.push(f.path.clone());
        } else {
            tracing::debug!(pid = f.pid, path = %f.path.display(), "not copying non-regular shm entry");
        }
    }

    let mut writable: BTreeMap<PathBuf, WritableFile> = BTreeMap::new();
    for w in &scan.writes {
        let p = &w.file.path;
        if in_shm(p) || in_session(p) || is_pseudo_fs(p) {
            continue;
        }
        same_file(&w.file)?;
        let e = writable.entry(p.clone()).or_insert_with(|| WritableFile {
            path: p.clone(),
            size: w.size,
            append: false,
        });
        e.append |= w.append;
    }

    scan.stdio_pipes.sort_unstable();
    let plan = CapturePlan {
        copy_paths: paths::normalize(copy),
        writable_files: writable.into_values().collect(),
        stdio_pipes: scan.stdio_pipes,
        socket_paths,
    };
    tracing::debug!(
        root,
        processes = pids.len(),
        copy = plan.copy_paths.len(),
        writable = plan.writable_files.len(),
        "capture plan"
    );
    Ok(plan)
}
