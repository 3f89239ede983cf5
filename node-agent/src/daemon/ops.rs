//! The blocking work of each epoch phase on this node's trees of one job
//! (run on tokio's blocking pool). Every function that fails leaves the
//! trees as the caller's phase requires; the caller decides what to thaw.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_protocol::manifest::{FileDigest, NetMode as ImageNet, NodeImage, RankDrain};

use crate::capture::CaptureRules;
use crate::checkpoint::{self, DumpHooks, DumpRequest};
use crate::criu::{Criu, NoNotify};
use crate::freezer::Freezer;
use crate::shim;

use super::trees::{Tree, TreeState};

/// How far the current phase is, for the heartbeats (`ckpt-job status`):
/// bytes done of an estimated total. Dump: what CRIU has written so far of
/// the trees' resident memory; flush: bytes hashed and made durable of the
/// image's size.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Progress {
    pub(crate) fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// Resident memory of every process of the trees: what a dump will write,
/// roughly (shared pages counted once per process).
fn resident_bytes(trees: &[Arc<Tree>]) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    let mut total = 0;
    for t in trees {
        for pid in crate::capture::tree_pids(t.handle.root_pid).unwrap_or_default() {
            if let Ok(statm) = fs::read_to_string(format!("/proc/{pid}/statm")) {
                let rss: u64 = statm
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                total += rss * page;
            }
        }
    }
    total
}

/// Bytes of this node's files in the epoch dir so far (CRIU's work dirs
/// included), for the dump's progress.
fn written_bytes(dir: &Path, node: &str) -> u64 {
    let prefix = format!("{node}.t");
    let mut sum = 0;
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if let Ok(inner) = fs::read_dir(e.path()) {
                sum += inner
                    .flatten()
                    .filter_map(|f| f.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum::<u64>();
            }
        } else {
            sum += meta.len();
        }
    }
    sum
}

/// Longest wait for the pumps to take a frozen tree's pending output.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// PREPARE's result.
#[derive(Debug, Clone, Default)]
pub(crate) struct Prepared {
    pub lock_ms: f64,
    pub freeze_ms: f64,
    /// The MPI ranks' drain (DRAIN to every READY) plus the output drain.
    pub drain_ms: f64,
    /// Every local MPI rank's READY counts (none for a job without the
    /// shim).
    pub ranks: Vec<shim::RankReady>,
}

impl Prepared {
    /// The ranks' counts as the manifest records them.
    pub(crate) fn drained(&self) -> Vec<RankDrain> {
        self.ranks
            .iter()
            .map(|r| RankDrain {
                rank: r.rank,
                sent: r.sent,
                received: r.received,
                stashed: r.stashed,
                rounds: r.rounds,
            })
            .collect()
    }
}

/// The MPI ranks of the trees that run the drain shim: their sockets, to
/// connect to from each tree's network namespace.
fn rank_sockets(trees: &[Arc<Tree>]) -> Vec<shim::RankSocket> {
    let mut socks = Vec::new();
    for t in trees {
        let root = t.handle.root_pid;
        let pids = crate::capture::tree_pids(root).unwrap_or_default();
        let netns = std::path::PathBuf::from(format!("/proc/{root}/ns/net"));
        socks.extend(shim::rank_sockets(&shim::shim_dirs(&pids), Some(&netns)));
    }
    socks
}

/// Drains the job's MPI ranks on this node (if it runs the shim), then
/// locks the network and freezes every tree and drains its output. The
/// ranks' connections are closed once the trees are frozen (a connection
/// to a process outside the tree cannot be dumped): a rank reads end of
/// file when it is thawed (or restored) and resumes. On failure every tree
/// is thawed again, and the ranks are resumed.
pub(crate) fn prepare(
    trees: &[Arc<Tree>],
    freeze_timeout: Duration,
    drain_deadline: Duration,
) -> Result<Prepared, String> {
    if trees.is_empty() {
        return Err("no tree of this job runs on this node".into());
    }
    for t in trees {
        if let TreeState::Exited(code) = t.state() {
            return Err(format!("tree {} has already exited (status {code})", t.id));
        }
    }
    let tr = Instant::now();
    let socks = rank_sockets(trees);
    let (parked, ranks) = shim::drain(&socks, drain_deadline);
    let ranks = ranks.map_err(|e| format!("draining the MPI ranks: {e}"))?;
    let rank_ms = ms(tr.elapsed());
    let r = lock_and_freeze(trees, freeze_timeout);
    drop(parked);
    let mut done = r?;
    done.drain_ms += rank_ms;
    done.ranks = ranks;
    Ok(done)
}

fn lock_and_freeze(trees: &[Arc<Tree>], freeze_timeout: Duration) -> Result<Prepared, String> {
    // The network lock comes first (DESIGN.md): once every node is READY,
    // no packet of the job crosses the cut.
    let tl = Instant::now();
    for t in trees {
        if let Some(n) = t.net() {
            if let Err(e) = n.lock() {
                unlock(trees);
                return Err(format!("tree {}: {e}", t.id));
            }
        }
    }
    let lock_ms = ms(tl.elapsed());
    let t0 = Instant::now();
    for (i, t) in trees.iter().enumerate() {
        if let Err(e) = t.freezer.freeze(freeze_timeout) {
            unlock(trees);
            thaw(&trees[..=i]);
            return Err(format!("freezing tree {}: {e}", t.id));
        }
    }
    let freeze_ms = ms(t0.elapsed());
    // A tree that died just before its freeze is not worth a dump.
    for t in trees {
        if !Path::new(&format!("/proc/{}", t.handle.root_pid)).exists()
            || matches!(t.state(), TreeState::Exited(_))
        {
            thaw(trees);
            return Err(format!("tree {} exited while it was frozen", t.id));
        }
    }
    let td = Instant::now();
    for t in trees {
        if let Err(e) = t.drain(DRAIN_LIMIT) {
            thaw(trees);
            return Err(e);
        }
    }
    Ok(Prepared {
        lock_ms,
        freeze_ms,
        drain_ms: ms(td.elapsed()),
        ranks: Vec::new(),
    })
}

/// Removes the network lock of every tree; failures are logged.
pub(crate) fn unlock(trees: &[Arc<Tree>]) {
    for t in trees {
        if let Some(n) = t.net() {
            if let Err(e) = n.unlock() {
                tracing::error!(job = %t.job, tree = t.id, error = %e, "cannot unlock the tree's network");
            }
        }
    }
}

/// Unlocks and thaws every tree; failures are logged (a tree that is gone
/// is thawed).
pub(crate) fn thaw(trees: &[Arc<Tree>]) {
    unlock(trees);
    for t in trees {
        if let Err(e) = t.freezer.thaw() {
            tracing::error!(job = %t.job, tree = t.id, error = %e, "cannot thaw the tree");
        }
    }
}

/// SIGKILLs every task of the frozen trees, then thaws them.
pub(crate) fn kill(trees: &[Arc<Tree>]) {
    for t in trees {
        if let Err(e) = t.kill_frozen() {
            tracing::error!(job = %t.job, tree = t.id, error = %e, "cannot thaw the killed tree");
        }
    }
}

/// DUMP's result: this node's image, complete in the page cache; its
/// `files` are empty (the flush digests them).
#[derive(Debug)]
pub(crate) struct Dumped {
    pub image: NodeImage,
    /// Files already digested and durable (page files followed during the
    /// dump).
    pub sealed: Vec<FileDigest>,
    /// Files still to digest and fsync.
    pub pending: Vec<String>,
    pub dump_ms: f64,
    pub capture_ms: f64,
    pub pack_ms: f64,
}

/// The drain happened at PREPARE; the tree has been frozen since.
struct Drained;

impl DumpHooks for Drained {
    fn frozen(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Dumps each frozen tree into `dir` (one CRIU call per tree). With
/// `hash_while_dumping` (stop mode) the page files are digested and made
/// durable during the dump; otherwise nothing is, and CRIU has the cores to
/// itself. Everything not digested yet is in `pending`, for [`flush`].
/// Trees stay frozen, also on failure.
pub(crate) fn dump(
    criu: &Criu,
    node: &str,
    trees: &[Arc<Tree>],
    dir: &Path,
    freeze_timeout: Duration,
    hash_while_dumping: bool,
    progress: &Progress,
) -> Result<Dumped, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    progress.start(resident_bytes(trees));
    let finished = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                progress
                    .done
                    .store(written_bytes(dir, node), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = dump_trees(criu, node, trees, dir, freeze_timeout, hash_while_dumping);
        finished.store(true, Ordering::Relaxed);
        r
    })
}

fn dump_trees(
    criu: &Criu,
    node: &str,
    trees: &[Arc<Tree>],
    dir: &Path,
    freeze_timeout: Duration,
    hash_while_dumping: bool,
) -> Result<Dumped, String> {
    let rules = CaptureRules::default();
    let mut out = Dumped {
        image: NodeImage {
            node: node.to_owned(),
            ranks: Vec::new(),
            drained: Vec::new(),
            trees: Vec::new(),
            files: Vec::new(),
        },
        sealed: Vec::new(),
        pending: Vec::new(),
        dump_ms: 0.0,
        capture_ms: 0.0,
        pack_ms: 0.0,
    };
    for t in trees {
        let req = DumpRequest {
            criu,
            tree: &t.handle,
            freezer: &t.freezer,
            epoch_dir: dir,
            prefix: tree_prefix(node, t.id),
            stop: true,
            freeze_timeout,
            rules: &rules,
            hash_while_dumping,
        };
        let r = checkpoint::dump_frozen_tree(&req, &mut Drained, &mut NoNotify)
            .map_err(|e| format!("dumping tree {} (pid {}): {e}", t.id, t.handle.root_pid))?;
        out.dump_ms += r.dump_ms;
        out.capture_ms += r.capture_ms;
        out.pack_ms += r.pack_ms;
        out.sealed.extend(r.sealed.iter().cloned());
        out.pending.extend(r.files.iter().cloned());
        let mut image = r.image;
        if let (Some(n), ImageNet::Private { key }) = (t.net(), &image.net) {
            image.net = ImageNet::Job {
                key: key.clone(),
                address: n.address().to_string(),
            };
        }
        out.image.trees.push(image);
    }
    Ok(out)
}

/// `<node>.t<id>`: the prefix of every file of one tree in the epoch dir.
pub(crate) fn tree_prefix(node: &str, id: u32) -> String {
    format!("{node}.t{id}")
}

/// Digests and fsyncs one file; `None` if `cancel` was set meanwhile.
fn digest_and_sync(
    dir: &Path,
    name: &str,
    cancel: &AtomicBool,
    done: &AtomicU64,
) -> Result<Option<FileDigest>, String> {
    let path = dir.join(name);
    let err = |e: io::Error| format!("digesting {}: {e}", path.display());
    let mut f = File::open(&path).map_err(err)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
        done.fetch_add(n as u64, Ordering::Relaxed);
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    Ok(Some(FileDigest {
        name: name.to_owned(),
        size,
        blake3: h.finalize().to_hex().to_string(),
    }))
}

/// The flush's result: every file of the node's image digested and
/// durable.
#[derive(Debug)]
pub(crate) struct Flushed {
    pub files: Vec<FileDigest>,
    pub bytes: u64,
    pub digest_ms: f64,
}

/// Digests and fsyncs every `pending` file, fsyncs the `sealed` ones (the
/// follower made them durable already: cheap), then the directory. Returns
/// `None` as soon as it sees `cancel` (the epoch was aborted).
pub(crate) fn flush(
    dir: &Path,
    sealed: Vec<FileDigest>,
    pending: &[String],
    cancel: &AtomicBool,
    progress: &Progress,
) -> Result<Option<Flushed>, String> {
    let td = Instant::now();
    let size = |name: &str| fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    progress.start(
        sealed.iter().map(|f| f.size).sum::<u64>() + pending.iter().map(|n| size(n)).sum::<u64>(),
    );
    let mut files = sealed;
    for f in &files {
        let path = dir.join(&f.name);
        File::open(&path)
            .and_then(|h| h.sync_all())
            .map_err(|e| format!("fsync {}: {e}", path.display()))?;
        progress.done.fetch_add(f.size, Ordering::Relaxed);
    }
    for name in pending {
        match digest_and_sync(dir, name, cancel, &progress.done)? {
            Some(d) => files.push(d),
            None => return Ok(None),
        }
    }
    File::open(dir)
        .and_then(|h| h.sync_all())
        .map_err(|e| format!("fsync {}: {e}", dir.display()))?;
    Ok(Some(Flushed {
        bytes: files.iter().map(|f| f.size).sum(),
        files,
        digest_ms: ms(td.elapsed()),
    }))
}

/// Removes this node's files (and CRIU work dirs) from the epoch dir. The
/// dir itself stays: the image store keeps an aborted epoch's empty dir as
/// a tombstone so that its number is never handed out again.
pub(crate) fn remove_node_files(dir: &Path, node: &str) {
    let prefix = format!("{node}.t");
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(err) = r {
            tracing::warn!(path = %path.display(), error = %err, "cannot remove an aborted epoch's file");
        }
    }
}
