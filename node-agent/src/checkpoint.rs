//! One tree's part of an epoch on this node: freeze, drain, capture, dump,
//! pack. The commit (digests, manifest, rename) is the coordinator's.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use ckpt_protocol::manifest::{FileDigest, FileSize, NetMode as ImageNet, PipeBinding, TreeImage};
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use crate::capture::{self, CaptureRules};
use crate::criu::{CgMode, Criu, CriuError, DumpOptions, NotifyHandler};
use crate::freezer::{Freezer, FreezerError};
use crate::images::follow::{FollowError, Followed, Follower};
use crate::images::pack;
use crate::tree::{self, NetMode};

/// CRIU's key for a tree's private network namespace (`--external
/// net[<inode>]:ckpt-net` at dump, `--inherit-fd fd[N]:ckpt-net` at restore).
pub const NETNS_KEY: &str = "ckpt-net";

/// A running tree as the agent knows it.
#[derive(Debug, Clone)]
pub struct TreeHandle {
    pub id: u32,
    pub root_pid: i32,
    pub net: NetMode,
    /// The init's private directory and the `ckpt-init` binary it runs
    /// (saved with every epoch: CRIU restores only onto the very same file).
    pub init_dir: Option<PathBuf>,
    pub init_binary: Option<PathBuf>,
}

/// Phases reported while a tree is checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Freezing,
    Capturing,
    Dumping,
    Packing,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Freezing => "freezing",
            Phase::Capturing => "capturing node-local files",
            Phase::Dumping => "dumping (CRIU)",
            Phase::Packing => "packing images",
        }
    }
}

/// Hooks the caller provides around the dump.
pub trait DumpHooks {
    /// The tree is frozen: nothing in it runs; drain what it wrote.
    fn frozen(&mut self) -> Result<(), String>;
    fn phase(&mut self, _phase: Phase) {}
}

pub struct DumpRequest<'a> {
    pub criu: &'a Criu,
    pub tree: &'a TreeHandle,
    pub freezer: &'a dyn Freezer,
    /// The (uncommitted) epoch directory.
    pub epoch_dir: &'a Path,
    /// Prefix of this tree's files in the epoch dir, e.g. `node1.t0`.
    pub prefix: String,
    /// Stop mode: leave the dumped tree frozen for the caller to kill after
    /// the commit (or thaw, if the commit fails).
    pub stop: bool,
    pub freeze_timeout: Duration,
    pub rules: &'a CaptureRules,
    /// Hash and flush CRIU's page files while CRIU writes them (a follower
    /// thread; the digests come back as `sealed`). Worth it when the tree
    /// stays frozen after the dump anyway (stop mode, the supervisor, which
    /// digests before it thaws); off, CRIU has the cores to itself and every
    /// file is left to the caller in `files`, so that it can digest them
    /// after the thaw.
    pub hash_while_dumping: bool,
}

impl std::fmt::Debug for DumpRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpRequest")
            .field("tree", self.tree)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// What a dumped tree left in the epoch dir.
#[derive(Debug)]
pub struct DumpResult {
    pub image: TreeImage,
    /// Every file of this tree in the epoch dir (to digest and fsync).
    pub files: Vec<String>,
    /// Files already digested and made durable (the page files, followed
    /// during the dump), by their name in the epoch dir.
    pub sealed: Vec<FileDigest>,
    /// Still hashing and flushing CRIU's page files after the dump; finished
    /// once the tree runs again, so the flush is not downtime.
    follower: Option<Follower>,
    /// CRIU's page files as digested during the dump, by CRIU's name.
    followed: BTreeMap<String, Followed>,
    pub freeze_ms: f64,
    pub capture_ms: f64,
    pub dump_ms: f64,
    /// From the freeze to the thaw (continue mode; 0 in stop mode, where the
    /// tree stays frozen until the caller ends it).
    pub downtime_ms: f64,
    pub pack_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("freezing the job: {0}")]
    Freeze(#[from] FreezerError),
    #[error("draining the job's output: {0}")]
    Drain(String),
    #[error("scanning the job's node-local state: {0}")]
    Capture(#[from] capture::CaptureError),
    #[error("saving node-local files into {path}: {source}")]
    CaptureSave {
        path: PathBuf,
        source: pack::PackError,
    },
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("packing CRIU images into {path}: {source}")]
    Pack {
        path: PathBuf,
        source: pack::PackError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error("the job exited before it could be checkpointed")]
    Gone,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DumpError + 'a {
    move |source| DumpError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Checkpoints one tree. On any failure the tree is thawed and left
/// running untouched; the caller drops the epoch.
pub fn dump_tree(
    req: &DumpRequest<'_>,
    hooks: &mut dyn DumpHooks,
    notify: &mut dyn NotifyHandler,
) -> Result<DumpResult, DumpError> {
    let t0 = Instant::now();
    hooks.phase(Phase::Freezing);
    req.freezer.freeze(req.freeze_timeout)?;
    let frozen_at = Instant::now();
    let result = dump_frozen(req, hooks, notify, t0, frozen_at);
    // Continue mode, or any failure: the tree runs on, untouched. In stop
    // mode a dumped tree stays frozen: the caller kills it only once the
    // epoch is committed, and thaws it if the commit fails, so a failed
    // commit never loses the job.
    let keep_frozen = req.stop && result.is_ok();
    let mut result = if keep_frozen {
        result?
    } else {
        let thawed = req.freezer.thaw();
        let mut r = result?;
        thawed?;
        r.downtime_ms = ms(frozen_at.elapsed());
        r
    };
    hooks.phase(Phase::Packing);
    let tp = Instant::now();
    if let Err(e) = finish_follow(&mut result).and_then(|()| pack_images(req, &mut result)) {
        if keep_frozen {
            req.freezer.thaw()?;
        }
        return Err(e);
    }
    result.pack_ms = ms(tp.elapsed());
    Ok(result)
}

/// Dumps a tree the caller has already frozen (and drained), and packs its
/// images, leaving it frozen whatever happens: the caller thaws it, kills
/// it, or keeps it frozen for a later commit. For the node agent, whose
/// PREPARE freezes and whose DUMP dumps. With `hash_while_dumping` the
/// digests of the page files are complete when this returns (`sealed`);
/// the other `files` are not yet digested. `hooks.frozen` is called once more before the capture.
pub fn dump_frozen_tree(
    req: &DumpRequest<'_>,
    hooks: &mut dyn DumpHooks,
    notify: &mut dyn NotifyHandler,
) -> Result<DumpResult, DumpError> {
    let t0 = Instant::now();
    let mut result = dump_frozen(req, hooks, notify, t0, t0)?;
    hooks.phase(Phase::Packing);
    let tp = Instant::now();
    finish_follow(&mut result)?;
    pack_images(req, &mut result)?;
    result.pack_ms = ms(tp.elapsed());
    Ok(result)
}

fn dump_frozen(
    req: &DumpRequest<'_>,
    hooks: &mut dyn DumpHooks,
    notify: &mut dyn NotifyHandler,
    t0: Instant,
    frozen_at: Instant,
) -> Result<DumpResult, DumpError> {
    let freeze_ms = ms(frozen_at.duration_since(t0));
    if !Path::new(&format!("/proc/{}", req.tree.root_pid)).exists() {
        return Err(DumpError::Gone);
    }
    hooks.frozen().map_err(DumpError::Drain)?;

    hooks.phase(Phase::Capturing);
    let tc = Instant::now();
    let pids = capture::tree_pids(req.tree.root_pid)?;
    let plan = capture::plan(&pids, req.rules)?;
    let local_pack = if plan.copy_paths.is_empty() {
        None
    } else {
        let name = format!("{}.local.pack", req.prefix);
        let path = req.epoch_dir.join(&name);
        pack::pack_paths(&plan.copy_paths, &path)
            .map_err(|source| DumpError::CaptureSave { path, source })?;
        Some(name)
    };
    let capture_ms = ms(tc.elapsed());

    hooks.phase(Phase::Dumping);
    let td = Instant::now();
    let criu_dir = criu_dir(req);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&criu_dir)
        .map_err(io_err("create", &criu_dir))?;
    let dir_fd = open_dir(&criu_dir)?;
    let mut opts = DumpOptions::new(req.tree.root_pid, dir_fd.as_fd());
    // CRIU never kills the tree: in stop mode the caller does, after commit.
    opts.leave_running = true;
    opts.tcp_established = true;
    opts.file_locks = true;
    opts.freeze_cgroup = Some(req.freezer.criu_path());
    opts.manage_cgroups_mode = Some(CgMode::Ignore);
    opts.notify_scripts = true;
    // Unlinked files the job still uses are saved whole, up to 256 MiB.
    opts.ghost_limit = Some(256 << 20);
    let net = match req.tree.net {
        NetMode::Host => ImageNet::Host,
        NetMode::Private => {
            let ino = tree::netns_inode(req.tree.root_pid)
                .map_err(io_err("stat netns of", Path::new("/proc")))?;
            opts.external.push(format!("net[{ino}]:{NETNS_KEY}"));
            ImageNet::Private {
                key: NETNS_KEY.to_string(),
            }
        }
    };
    // Page files are hashed and flushed while CRIU writes them, if asked.
    let follower = req
        .hash_while_dumping
        .then(|| Follower::start(&criu_dir, is_pages));
    req.criu.dump(&opts, notify)?;
    let dump_ms = ms(td.elapsed());

    let init_binary = match &req.tree.init_binary {
        Some(src) => {
            let name = format!("{}.init", req.prefix);
            let dst = req.epoch_dir.join(&name);
            fs::copy(src, &dst).map_err(io_err("save the init binary to", &dst))?;
            Some(name)
        }
        None => None,
    };
    let image = TreeImage {
        id: req.tree.id,
        root_pid: req.tree.root_pid,
        net,
        stdio: plan
            .stdio_pipes
            .iter()
            .map(|(fd, inode)| PipeBinding {
                fd: *fd,
                inode: *inode,
            })
            .collect(),
        writable_files: plan
            .writable_files
            .iter()
            .map(|w| FileSize {
                path: w.path.display().to_string(),
                size: w.size,
            })
            .collect(),
        captured: plan
            .copy_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        meta_pack: format!("{}.meta.pack", req.prefix),
        pages: Vec::new(),
        local_pack: local_pack.clone(),
        init_dir: req.tree.init_dir.as_ref().map(|d| d.display().to_string()),
        init_binary: init_binary.clone(),
    };
    Ok(DumpResult {
        image,
        files: local_pack.into_iter().chain(init_binary).collect(),
        sealed: Vec::new(),
        follower,
        followed: BTreeMap::new(),
        freeze_ms,
        capture_ms,
        dump_ms,
        downtime_ms: 0.0,
        pack_ms: 0.0,
    })
}

fn finish_follow(result: &mut DumpResult) -> Result<(), DumpError> {
    if let Some(f) = result.follower.take() {
        result.followed = f.finish()?;
    }
    Ok(())
}

fn criu_dir(req: &DumpRequest<'_>) -> PathBuf {
    req.epoch_dir.join(format!("{}.criu", req.prefix))
}

/// CRIU's small files go into one pack; its page files are moved next to it
/// unchanged (renames, no copy), so a parallel filesystem sees a handful of
/// large files per tree instead of hundreds of small ones.
fn pack_images(req: &DumpRequest<'_>, result: &mut DumpResult) -> Result<(), DumpError> {
    let criu_dir = criu_dir(req);
    let meta = req.epoch_dir.join(&result.image.meta_pack);
    pack::pack_dir(&criu_dir, &meta, |name| !is_pages(name)).map_err(|source| DumpError::Pack {
        path: meta.clone(),
        source,
    })?;
    result.files.push(result.image.meta_pack.clone());
    let mut pages = Vec::new();
    for entry in fs::read_dir(&criu_dir).map_err(io_err("list", &criu_dir))? {
        let entry = entry.map_err(io_err("list", &criu_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_pages(&name) {
            let to = format!("{}.{}", req.prefix, name);
            fs::rename(entry.path(), req.epoch_dir.join(&to))
                .map_err(io_err("move", &entry.path()))?;
            match result.followed.get(&name) {
                Some(f) => result.sealed.push(FileDigest {
                    name: to.clone(),
                    size: f.size,
                    blake3: f.blake3.clone(),
                }),
                None => result.files.push(to.clone()),
            }
            pages.push(to);
        }
    }
    pages.sort();
    fs::remove_dir_all(&criu_dir).map_err(io_err("remove", &criu_dir))?;
    result.image.pages = pages;
    Ok(())
}

/// CRIU's page data files (`pages-<n>.img`), the bulk of an image.
pub fn is_pages(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// A page file as named in the epoch directory (`<node>.t<id>.pages-<n>.img`).
pub fn is_epoch_pages(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(stem, ext)| {
        ext == "img"
            && stem
                .rsplit('.')
                .next()
                .is_some_and(|p| p.starts_with("pages-"))
    })
}

pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd, DumpError> {
    open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: fresh descriptor returned by open, owned by nobody else.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    })
    .map_err(|e| DumpError::Io {
        op: "open",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_file_names() {
        assert!(is_pages("pages-1.img"));
        assert!(!is_pages("pagemap-1.img"));
        assert!(is_epoch_pages("n1.t0.pages-12.img"));
        assert!(is_epoch_pages("node.with.dots.t3.pages-1.img"));
        assert!(!is_epoch_pages("n1.t0.meta.pack"));
        assert!(!is_epoch_pages("n1.t0.pagemap-1.img"));
        assert!(!is_epoch_pages("n1.t0.local.pack"));
    }
}
