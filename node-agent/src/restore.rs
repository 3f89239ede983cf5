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
use crate::images::pack;
use crate::tree;

/// Node-local roots a local pack may write into.
pub const LOCAL_ROOTS: [&str; 2] = ["/dev/shm", "/tmp"];

pub struct RestoreRequest<'a> {
    pub criu: &'a Criu,
    /// The committed epoch directory (already verified by the caller).
    pub epoch_dir: &'a Path,
    pub image: &'a TreeImage,
    /// A fresh, private directory for CRIU's unpacked images and its log.
    pub staging: &'a Path,
    pub freezer: &'a dyn Freezer,
    /// New write ends for the tree's stdio pipes, by the dumped pipe inode.
    pub stdio: Vec<(u64, BorrowedFd<'a>)>,
}

impl std::fmt::Debug for RestoreRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreRequest").field("epoch_dir", &self.epoch_dir).field("tree", &self.image.id).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("unpacking {path}: {source}")]
    Unpack { path: PathBuf, source: pack::UnpackError },
    #[error("putting back node-local files: {0}")]
    Capture(#[from] capture::CaptureError),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("creating a network namespace for the tree: {0}")]
    Netns(std::io::Error),
    #[error("the image has no pipe for the job's fd {fd} (inode {inode}) to be reconnected to")]
    Stdio { fd: i32, inode: u64 },
    #[error(transparent)]
    Criu(#[from] CriuError),
}

/// Restores the tree; returns the host PID of its (new) root, a child of
/// the calling process. Processes run again when this returns.
pub fn restore_tree(req: &RestoreRequest<'_>, notify: &mut dyn NotifyHandler) -> Result<i32, RestoreError> {
    let meta = req.epoch_dir.join(&req.image.meta_pack);
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(req.staging)
        .map_err(|source| RestoreError::Io { op: "create", path: req.staging.to_path_buf(), source })?;
    pack::unpack_to_dir(&meta, req.staging).map_err(|source| RestoreError::Unpack { path: meta.clone(), source })?;
    let prefix = req.image.meta_pack.trim_end_matches(".meta.pack");
    for name in &req.image.pages {
        let criu_name = name.strip_prefix(prefix).and_then(|n| n.strip_prefix('.')).unwrap_or(name);
        let link = req.staging.join(criu_name);
        symlink(req.epoch_dir.join(name), &link).map_err(|source| RestoreError::Io { op: "link", path: link, source })?;
    }
    if let Some(local) = &req.image.local_pack {
        let path = req.epoch_dir.join(local);
        let roots: Vec<&Path> = LOCAL_ROOTS.iter().map(Path::new).collect();
        pack::unpack_paths(&path, &roots).map_err(|source| RestoreError::Unpack { path, source })?;
    }
    let writable: Vec<WritableFile> = req
        .image
        .writable_files
        .iter()
        .map(|f| WritableFile { path: PathBuf::from(&f.path), size: f.size, append: false })
        .collect();
    capture::restore_writable_sizes(&writable)?;

    let dir_fd = open_dir(req.staging).map_err(|e| RestoreError::Io {
        op: "open",
        path: req.staging.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let netns: Option<OwnedFd> = match &req.image.net {
        ImageNet::Host => None,
        ImageNet::Private { .. } => Some(tree::new_private_netns().map_err(RestoreError::Netns)?),
    };
    let mut opts = RestoreOptions::new(dir_fd.as_fd());
    opts.rst_sibling = true;
    opts.tcp_established = true;
    opts.file_locks = true;
    opts.notify_scripts = true;
    opts.manage_cgroups_mode = Some(CgMode::Ignore);
    opts.join_cgroup_procs = vec![req.freezer.procs_file()];
    if let (Some(fd), ImageNet::Private { key }) = (&netns, &req.image.net) {
        opts.inherit_fd.push(InheritFd { fd: fd.as_fd(), key: key.clone() });
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
            .ok_or(RestoreError::Stdio { fd: b.fd, inode: b.inode })?;
        opts.inherit_fd.push(InheritFd { fd, key: format!("pipe:[{}]", b.inode) });
    }
    let outcome = req.criu.restore(&opts, notify)?;
    Ok(outcome.pid)
}
