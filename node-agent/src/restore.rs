//! Bringing one tree back from a committed, verified epoch on this node.

use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use ckpt_protocol::manifest::{NetMode as ImageNet, TreeImage};

use crate::capture::{self, WritableFile};
use crate::checkpoint::open_dir;
use crate::criu::{CgMode, Criu, CriuError, InheritFd, NotifyHandler, RestoreOptions};
use crate::freezer::Freezer;
use crate::images::opened::{OpenedError, OpenedImage};
use crate::images::pack;
use crate::tree;

/// Node-local roots a local pack may write into.
pub const LOCAL_ROOTS: [&str; 2] = ["/dev/shm", "/tmp"];

pub struct RestoreRequest<'a> {
    pub criu: &'a Criu,
    /// The committed epoch directory.
    pub epoch_dir: &'a Path,
    /// Its files, opened once; everything is read through these (the
    /// caller verifies them: the small ones before, the page files while
    /// CRIU restores, gating the tree at post-restore).
    pub opened: &'a OpenedImage,
    pub image: &'a TreeImage,
    /// A fresh, private directory for CRIU's unpacked images and its log.
    pub staging: &'a Path,
    pub freezer: &'a dyn Freezer,
    /// More `cgroup.procs` files the restored tree joins (e.g. its
    /// [`tree::PtyBan`]).
    pub cgroups: Vec<PathBuf>,
    /// New write ends for the tree's stdio pipes, by the dumped pipe inode.
    pub stdio: Vec<(u64, BorrowedFd<'a>)>,
    /// The network namespace a tree with its own is restored into (one with
    /// its job address for a `Job` image); None: a fresh one with loopback
    /// only.
    pub netns: Option<BorrowedFd<'a>>,
}

impl std::fmt::Debug for RestoreRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreRequest")
            .field("epoch_dir", &self.epoch_dir)
            .field("tree", &self.image.id)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("unpacking {path}: {source}")]
    Unpack {
        path: PathBuf,
        source: pack::UnpackError,
    },
    #[error("putting back node-local files: {0}")]
    Capture(#[from] capture::CaptureError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating a network namespace for the tree: {0}")]
    Netns(std::io::Error),
    #[error("the image has no pipe for the job's fd {fd} (inode {inode}) to be reconnected to")]
    Stdio { fd: i32, inode: u64 },
    #[error(transparent)]
    Image(#[from] OpenedError),
    #[error(transparent)]
    Criu(#[from] CriuError),
}

/// Restores the tree; returns the host PID of its (new) root, a child of
/// the calling process. Processes run again when this returns.
pub fn restore_tree(
    req: &RestoreRequest<'_>,
    notify: &mut dyn NotifyHandler,
) -> Result<i32, RestoreError> {
    let meta = req.opened.proc_path(&req.image.meta_pack)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(req.staging)
        .map_err(|source| RestoreError::Io {
            op: "create",
            path: req.staging.to_path_buf(),
            source,
        })?;
    pack::unpack_to_dir(&meta, req.staging).map_err(|source| RestoreError::Unpack {
        path: req.epoch_dir.join(&req.image.meta_pack),
        source,
    })?;
    let prefix = req.image.meta_pack.trim_end_matches(".meta.pack");
    for name in &req.image.pages {
        let criu_name = name
            .strip_prefix(prefix)
            .and_then(|n| n.strip_prefix('.'))
            .unwrap_or(name);
        let link = req.staging.join(criu_name);
        symlink(req.opened.proc_path(name)?, &link).map_err(|source| RestoreError::Io {
            op: "link",
            path: link,
            source,
        })?;
    }
    if let Some(local) = &req.image.local_pack {
        let path = req.opened.proc_path(local)?;
        let roots: Vec<&Path> = LOCAL_ROOTS.iter().map(Path::new).collect();
        create_missing_parents(&path, &roots)?;
        pack::unpack_paths(&path, &roots).map_err(|source| RestoreError::Unpack {
            path: req.epoch_dir.join(local),
            source,
        })?;
    }
    if let (Some(dir), Some(bin)) = (&req.image.init_dir, &req.image.init_binary) {
        install_init(Path::new(dir), &req.opened.proc_path(bin)?)?;
    }
    let writable: Vec<WritableFile> = req
        .image
        .writable_files
        .iter()
        .map(|f| WritableFile {
            path: PathBuf::from(&f.path),
            size: f.size,
            append: false,
        })
        .collect();
    capture::restore_writable_sizes(&writable)?;

    let dir_fd = open_dir(req.staging).map_err(|e| RestoreError::Io {
        op: "open",
        path: req.staging.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let fresh: Option<OwnedFd> = match (&req.image.net, req.netns) {
        (ImageNet::Private { .. }, None) => {
            Some(tree::new_private_netns().map_err(RestoreError::Netns)?)
        }
        (ImageNet::Job { address, .. }, None) => {
            return Err(RestoreError::Netns(std::io::Error::other(format!(
                "the tree had job address {address}: it needs a namespace with that address"
            ))))
        }
        _ => None,
    };
    let netns: Option<BorrowedFd> = match &req.image.net {
        ImageNet::Host => None,
        _ => req.netns.or(fresh.as_ref().map(|f| f.as_fd())),
    };
    let mut opts = RestoreOptions::new(dir_fd.as_fd());
    opts.rst_sibling = true;
    opts.tcp_established = true;
    opts.file_locks = true;
    opts.notify_scripts = true;
    opts.manage_cgroups_mode = Some(CgMode::Ignore);
    opts.join_cgroup_procs = vec![req.freezer.procs_file()];
    opts.join_cgroup_procs.extend(req.cgroups.iter().cloned());
    if let (Some(fd), ImageNet::Private { key } | ImageNet::Job { key, .. }) =
        (netns, &req.image.net)
    {
        opts.inherit_fd.push(InheritFd {
            fd,
            key: key.clone(),
        });
    }
    let mut seen = Vec::new();
    for b in &req.image.stdio {
        if seen.contains(&b.inode) {
            continue;
        }
        seen.push(b.inode);
        let fd = req
            .stdio
            .iter()
            .find(|(ino, _)| *ino == b.inode)
            .map(|(_, fd)| *fd)
            .ok_or(RestoreError::Stdio {
                fd: b.fd,
                inode: b.inode,
            })?;
        opts.inherit_fd.push(InheritFd {
            fd,
            key: format!("pipe:[{}]", b.inode),
        });
    }
    let outcome = req.criu.restore(&opts, notify)?;
    Ok(outcome.pid)
}

/// The parents of a local pack's entries must exist before it is unpacked;
/// after the job ended they may not (Open MPI removes its per-user
/// `ompi.<host>.<uid>` dir with the last session dir in it, the supervisor
/// its per-job dirs). Creates each missing dir between an allowed root and a
/// top-level entry of the pack, mode 0700, owned like that entry (the job's
/// owner). Walks with `O_NOFOLLOW` from the root, so a symlink planted in a
/// world-writable root is refused, never followed.
fn create_missing_parents(pack_path: &Path, roots: &[&Path]) -> Result<(), RestoreError> {
    use std::collections::BTreeSet;

    let entries = pack::list(pack_path).map_err(|source| RestoreError::Unpack {
        path: pack_path.to_path_buf(),
        source,
    })?;
    let names: BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    for e in &entries {
        let path = Path::new(&e.name);
        let Some(parent) = path.parent() else {
            continue;
        };
        if names.contains(parent.to_str().unwrap_or_default()) {
            continue; // created by the pack itself, before this entry
        }
        let Some(root) = roots
            .iter()
            .filter(|r| parent.starts_with(r))
            .max_by_key(|r| r.components().count())
        else {
            continue; // unpack_paths refuses it with a precise error
        };
        let Ok(rel) = parent.strip_prefix(root) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        ensure_dirs_beneath(root, rel, e.uid, e.gid)?;
    }
    Ok(())
}

fn ensure_dirs_beneath(root: &Path, rel: &Path, uid: u32, gid: u32) -> Result<(), RestoreError> {
    use std::path::Component;

    use nix::errno::Errno;
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    use nix::unistd::{fchown, Gid, Uid};

    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let io = |op: &'static str, path: &Path, e: Errno| RestoreError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    };
    let own = |fd: i32| {
        // SAFETY: fd was just returned by open/openat and is owned by nobody else.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    };
    let mut dir =
        own(nix::fcntl::open(root, dir_flags, Mode::empty()).map_err(|e| io("open", root, e))?);
    let mut at = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(RestoreError::Io {
                op: "walk",
                path: root.join(rel),
                source: std::io::Error::other("not a plain relative path"),
            });
        };
        at.push(name);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&dir);
        let next = match openat(Some(raw), name, dir_flags, Mode::empty()) {
            Ok(fd) => own(fd),
            Err(Errno::ENOENT) => {
                match mkdirat(Some(raw), name, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io("create directory", &at, e)),
                }
                let fd = own(openat(Some(raw), name, dir_flags, Mode::empty())
                    .map_err(|e| io("open", &at, e))?);
                fchown(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                )
                .map_err(|e| io("chown", &at, e))?;
                tracing::debug!(path = %at.display(), uid, gid, "created a missing parent of captured node-local files");
                fd
            }
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                return Err(RestoreError::Io {
                    op: "refusing to follow (symlink or not a directory)",
                    path: at,
                    source: e.into(),
                })
            }
            Err(e) => return Err(io("open", &at, e)),
        };
        dir = next;
    }
    Ok(())
}

/// Name of the init binary inside its directory.
pub const INIT_NAME: &str = "ckpt-init";

/// Puts `binary` at `<dir>/ckpt-init` (dir: root's, 0700), replacing any
/// file there by rename, so a running copy keeps its own inode. Returns
/// the installed path.
pub fn install_init(dir: &Path, binary: &Path) -> Result<PathBuf, RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { op, path, source }
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .map_err(io("create", dir))?;
    let meta = fs::symlink_metadata(dir).map_err(io("stat", dir))?;
    if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != 0 {
        return Err(RestoreError::Io {
            op: "use",
            path: dir.to_path_buf(),
            source: std::io::Error::other("not a root-owned directory"),
        });
    }
    let tmp = dir.join(format!(".{INIT_NAME}.{}", std::process::id()));
    let dst = dir.join(INIT_NAME);
    fs::copy(binary, &tmp).map_err(io("copy the init binary to", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, &dst).map_err(io("install", &dst))?;
    Ok(dst)
}
