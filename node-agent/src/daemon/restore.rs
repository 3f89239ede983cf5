//! Restart on this node: one node image of a committed epoch restored,
//! held frozen until the coordinator says every node is restored.
//!
//! ```text
//!        RESTORE_TREE: MANIFEST (MAC) ─► open files once ─► verify small ones
//!  Idle ───────────────────────────────────────────────────────────────────┐
//!                 per tree: CRIU restore (pages verified meanwhile; held   │
//!                 at post-restore until they match), cgroup frozen at      │
//!                 pre-resume, so the tree never runs a user instruction    │
//!   ┌─────────────────────────── RESTORED (every tree frozen) ◄────────────┘
//!   ▼
//!  Held ── RESUME: thaw ─► RESUMED ─► Resumed (normal trees of the job)
//!   │
//!   └─ ABORT, a FAIL anywhere, coordinator lost, or no RESUME in time:
//!      SIGKILL every restored task while frozen (nothing ever ran)
//! ```
//!
//! The agent trusts the MANIFEST it verifies with its own copy of the
//! cluster key, not the RestoreTree message, for what to restore. Each
//! image file is opened once and everything (verification, unpacking,
//! CRIU) reads that descriptor. The restored trees become ordinary trees
//! of the registry: new output pipes copied into files in the agent's
//! state dir, their own freezer cgroup, reaped by the agent, checkpointable
//! again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ckpt_protocol::cluster::pb;
use ckpt_protocol::manifest::{
    check_name, Key, Manifest, NetMode as ImageNet, NodeImage, TreeImage, MANIFEST_FILE,
};

use crate::checkpoint;
use crate::criu::{NotifyEvent, NotifyHandler};
use crate::freezer::{CgroupFreezer, Freezer};
use crate::images::opened::OpenedImage;
use crate::jobnet::TreeNet;
use crate::restore::{self as single, RestoreRequest};
use crate::tree::NetMode;

use super::epoch::JobTask;
use super::ops::{self, ms};
use super::trees::{pipe, Adopted, Registry, RestoredFrom, Tree};
use super::Shared;

/// A manifest lists a few files per node; anything this large is not one.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// How long a tree killed by a stop-mode commit may take to be cleaned up
/// before its init dir can be restored into.
const INIT_DIR_WAIT: Duration = Duration::from_secs(10);
/// Held trees wait this long for RESUME when RestoreTree set no deadline.
const DEFAULT_HOLD: Duration = Duration::from_secs(120);
/// Extra time a held tree waits for RESUME beyond the restore deadline.
const HOLD_SLACK: Duration = Duration::from_secs(5);

/// This node's restored trees of one restart.
#[derive(Debug)]
pub(super) struct Held {
    pub epoch: u64,
    pub image_node: String,
    pub trees: Vec<Arc<Tree>>,
    /// Frozen and waiting for RESUME until this; `None` once resumed (then
    /// the record only lets a late ABORT of the restart kill them).
    pub deadline: Option<tokio::time::Instant>,
    pub restored_at: Instant,
}

/// What a successful node restore reports.
#[derive(Debug)]
pub(super) struct RestoredNode {
    pub trees: Vec<Arc<Tree>>,
    pub verify_ms: f64,
    pub restore_ms: f64,
}

/// Reads and authenticates `<dir>/MANIFEST`: the MAC with `key`, then
/// that it names this job and epoch and passes [`Manifest::validate`].
pub(crate) fn load_manifest(
    dir: &Path,
    key: &Key,
    job: &str,
    epoch: u64,
) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST_FILE);
    let err = |e: io::Error| format!("reading {}: {e}", path.display());
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!(
                "{} does not exist: epoch {epoch} of job {job} was never committed",
                path.display()
            ),
            _ => err(e),
        })?;
    let meta = f.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{} is larger than {MAX_MANIFEST_BYTES} bytes",
            path.display()
        ));
    }
    let m = Manifest::decode(&bytes, key).map_err(|e| format!("{}: {e}", path.display()))?;
    if m.job != job || m.epoch != epoch {
        return Err(format!(
            "{} is for job {} epoch {}, not job {job} epoch {epoch}",
            path.display(),
            m.job,
            m.epoch
        ));
    }
    m.validate()
        .map_err(|e| format!("{} is refused: {e}", path.display()))?;
    Ok(m)
}

/// Verifies the page files in the background; a restored tree is held at
/// CRIU's post-restore point until they match.
struct PagesGate {
    check: Option<JoinHandle<Result<u64, String>>>,
    result: Option<Result<u64, String>>,
}

impl PagesGate {
    fn start(opened: OpenedImage) -> Self {
        let check = thread::spawn(move || {
            opened
                .verify(checkpoint::is_epoch_pages)
                .map_err(|e| e.to_string())
        });
        PagesGate {
            check: Some(check),
            result: None,
        }
    }

    fn wait(&mut self) -> Result<u64, String> {
        if let Some(t) = self.check.take() {
            self.result = Some(
                t.join()
                    .unwrap_or_else(|_| Err("page verification panicked".into())),
            );
        }
        self.result.clone().unwrap_or(Ok(0))
    }
}

/// CRIU's notifications for one tree: post-restore waits for the pages,
/// pre-resume freezes the tree's cgroup. Pre-resume comes after the tasks
/// are parked on `rt_sigreturn` and before CRIU lets them go, so the tree
/// leaves CRIU frozen without having run.
///
/// CRIU itself runs in the tree's cgroup (the restored tasks inherit it
/// from CRIU), so before freezing, every task of the cgroup outside the
/// tree's PID namespace (CRIU) is moved back to the hierarchy's root.
struct Hold<'a> {
    gate: &'a mut PagesGate,
    freezer: &'a CgroupFreezer,
    timeout: Duration,
    /// The restored root (from post-restore).
    root_pid: i32,
    /// Set once the cgroup is frozen at pre-resume.
    frozen: bool,
    /// Why freezing failed (CRIU ignores a refused pre-resume).
    freeze_error: Option<String>,
}

impl Hold<'_> {
    /// Moves every process of the cgroup that is not in the restored
    /// tree's PID namespace (CRIU) to the root of the hierarchy.
    fn evict_outsiders(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let ns = |pid: i32| fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino());
        if self.root_pid <= 0 {
            return Err("CRIU named no restored root at post-restore".into());
        }
        let tree_ns = ns(self.root_pid).map_err(|e| {
            format!(
                "reading the PID namespace of restored root {}: {e}",
                self.root_pid
            )
        })?;
        let root_procs = self
            .freezer
            .dir()
            .parent()
            .and_then(Path::parent)
            .map(|root| root.join("cgroup.procs"))
            .ok_or("the freezer cgroup has no hierarchy root")?;
        let pids = self.freezer.pids().map_err(|e| e.to_string())?;
        for pid in pids {
            match ns(pid) {
                Ok(n) if n == tree_ns => continue,
                Ok(_) => {}
                Err(_) => continue, // gone
            }
            fs::write(&root_procs, pid.to_string()).map_err(|e| {
                format!(
                    "moving CRIU (pid {pid}) out of the restored tree's cgroup into {}: {e}",
                    root_procs.display()
                )
            })?;
        }
        Ok(())
    }
}

impl NotifyHandler for Hold<'_> {
    fn notify(&mut self, event: &NotifyEvent, pid: i32) -> Result<(), String> {
        // (`pid` is the root's pid at post-restore, 0 otherwise.)
        match event {
            NotifyEvent::PostRestore => {
                self.root_pid = pid;
                self.gate.wait().map(|_| ())
            }
            NotifyEvent::PreResume => match self
                .evict_outsiders()
                .and_then(|()| self.freezer.freeze(self.timeout).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    self.frozen = true;
                    Ok(())
                }
                Err(e) => {
                    let why = format!("freezing the restored tree: {e}");
                    let _ = self.freezer.thaw();
                    self.freeze_error = Some(why.clone());
                    Err(why)
                }
            },
            _ => Ok(()),
        }
    }
}

/// Restores every tree of `image_node`'s image of the epoch in `dir`,
/// each left frozen. On failure nothing restored is left alive.
pub(super) fn restore_node(
    shared: &Shared,
    job: &str,
    epoch: u64,
    dir: &Path,
    image_node: &str,
) -> Result<RestoredNode, String> {
    let t0 = Instant::now();
    if !dir.is_absolute() {
        return Err(format!("epoch dir {} is not absolute", dir.display()));
    }
    check_name("node name", image_node).map_err(|e| e.to_string())?;
    let manifest = load_manifest(dir, &shared.cfg.key, job, epoch)?;
    let node = manifest
        .nodes
        .iter()
        .find(|n| n.node == image_node)
        .ok_or_else(|| {
            let have: Vec<&str> = manifest.nodes.iter().map(|n| n.node.as_str()).collect();
            format!(
                "epoch {epoch} of job {job} has no image of node {image_node} (it has {})",
                have.join(", ")
            )
        })?;
    if node.trees.is_empty() {
        return Err(format!(
            "the image of node {image_node} in epoch {epoch} holds no process tree"
        ));
    }
    let opened = OpenedImage::open(dir, &node.files).map_err(|e| e.to_string())?;
    opened
        .verify(|n| !checkpoint::is_epoch_pages(n))
        .map_err(|e| e.to_string())?;
    let verify_ms = ms(t0.elapsed());
    let mut gate = PagesGate::start(opened.clone());
    let tr = Instant::now();
    let mut done: Vec<Arc<Tree>> = Vec::new();
    for img in &node.trees {
        let owner = (manifest.owner_uid, manifest.owner_gid);
        match restore_one(
            shared, job, epoch, dir, node, img, &opened, &mut gate, owner,
        ) {
            Ok(t) => done.push(t),
            Err(e) => {
                ops::kill(&done);
                let _ = gate.wait();
                return Err(format!("tree {} of node {image_node}'s image: {e}", img.id));
            }
        }
    }
    if let Err(e) = gate.wait() {
        // Not reached: post-restore refuses a tree on unverified pages.
        ops::kill(&done);
        return Err(e);
    }
    Ok(RestoredNode {
        trees: done,
        verify_ms,
        restore_ms: ms(tr.elapsed()),
    })
}

#[allow(clippy::too_many_arguments)]
fn restore_one(
    shared: &Shared,
    job: &str,
    epoch: u64,
    dir: &Path,
    node: &NodeImage,
    img: &TreeImage,
    opened: &OpenedImage,
    gate: &mut PagesGate,
    owner: (u32, u32),
) -> Result<Arc<Tree>, String> {
    let reg: &Registry = &shared.registry;
    if let Some(d) = &img.init_dir {
        reg.wait_init_dir_free(Path::new(d), INIT_DIR_WAIT)?;
    }
    let jobnet = job_netns(shared, job, img)?;
    let id = reg.next_id();
    let freezer = CgroupFreezer::create(&reg.cgroup_name(job, id))
        .map_err(|e| format!("creating its freezer cgroup: {e}"))?;
    let pty_ban = match crate::tree::PtyBan::create(&reg.cgroup_name(job, id)) {
        Ok(b) => b,
        Err(e) => {
            let _ = freezer.remove();
            return Err(format!("creating its devices cgroup (pty ban): {e}"));
        }
    };
    let out_dir = reg.state_dir().join("output");
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&out_dir)
        .map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let stdout = out_dir.join(format!("{job}.t{id}.stdout"));
    let stderr = out_dir.join(format!("{job}.t{id}.stderr"));
    let cleanup = |freezer: &CgroupFreezer| {
        let _ = freezer.remove();
    };
    // New pipes stand in for the dumped stdio pipes.
    let mut outputs: Vec<(OwnedFd, File)> = Vec::new();
    let mut writers: Vec<(u64, OwnedFd)> = Vec::new();
    for b in &img.stdio {
        if writers.iter().any(|(ino, _)| *ino == b.inode) {
            continue;
        }
        let path = if b.fd == 2 { &stderr } else { &stdout };
        let made = (|| {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let (r, w) = pipe().map_err(|e| format!("creating a pipe: {e}"))?;
            Ok::<_, String>((r, w, f))
        })();
        match made {
            Ok((r, w, f)) => {
                outputs.push((r, f));
                writers.push((b.inode, w));
            }
            Err(e) => {
                cleanup(&freezer);
                return Err(e);
            }
        }
    }
    let staging = reg.state_dir().join(format!(
        "restore.{job}.{epoch}.{}.t{}.{id}",
        node.node, img.id
    ));
    let _ = fs::remove_dir_all(&staging);
    let req = RestoreRequest {
        criu: &shared.criu,
        epoch_dir: dir,
        opened,
        image: img,
        staging: &staging,
        freezer: &freezer,
        cgroups: pty_ban.iter().map(|b| b.procs_file()).collect(),
        stdio: writers.iter().map(|(ino, fd)| (*ino, fd.as_fd())).collect(),
        netns: jobnet.as_ref().map(|n| n.netns()),
    };
    let mut hold = Hold {
        gate,
        freezer: &freezer,
        timeout: shared.cfg.freeze_timeout,
        root_pid: 0,
        frozen: false,
        freeze_error: None,
    };
    tracing::info!(node = %shared.cfg.node, job, epoch, image_node = %node.node, tree = img.id, "CRIU restore begins");
    let restored = single::restore_tree(&req, &mut hold);
    let (frozen, freeze_error) = (hold.frozen, hold.freeze_error.take());
    drop(req);
    drop(writers); // the tree holds its own copies now
    let pid = match restored {
        Ok(pid) => pid,
        Err(e) => {
            // CRIU killed whatever it had created; its files stay for a look.
            cleanup(&freezer);
            let e = match e {
                single::RestoreError::Criu(_)
                    if matches!(img.net, ImageNet::Host) && address_in_use(&e.to_string()) =>
                {
                    host_address_in_use(&shared.cfg.node, &node.node, &staging)
                }
                single::RestoreError::Criu(_) => {
                    format!("{e} (CRIU's files are kept in {})", staging.display())
                }
                _ => {
                    let _ = fs::remove_dir_all(&staging);
                    e.to_string()
                }
            };
            return Err(e);
        }
    };
    let _ = fs::remove_dir_all(&staging);
    let tree = reg.adopt(
        job,
        Adopted {
            id,
            root_pid: pid,
            net: match img.net {
                ImageNet::Host => NetMode::Host,
                ImageNet::Private { .. } | ImageNet::Job { .. } => NetMode::Private,
            },
            init_dir: img.init_dir.as_ref().map(PathBuf::from),
            freezer,
            pty_ban,
            outputs,
            stdout,
            stderr,
            from: RestoredFrom {
                epoch,
                image_node: node.node.clone(),
                image_tree: img.id,
            },
            owner,
            jobnet,
        },
    );
    if !frozen {
        ops::kill(std::slice::from_ref(&tree));
        return Err(freeze_error.unwrap_or_else(|| {
            "CRIU resumed the restored tree without a pre-resume notification: killed".into()
        }));
    }
    tracing::info!(node = %shared.cfg.node, job, epoch, image_node = %node.node, tree = img.id, pid, "restored, frozen");
    Ok(tree)
}

/// Whether a CRIU failure text is a bind/connect refused with EADDRINUSE.
fn address_in_use(criu_error: &str) -> bool {
    criu_error.contains("Address already in use") || criu_error.contains("EADDRINUSE")
}

/// The error of a host-network tree whose restore could not bind one of
/// its sockets: the address is held in this node's network namespace,
/// which the tree shares with everything else on the node.
fn host_address_in_use(here: &str, image_node: &str, staging: &Path) -> String {
    let held = held_inet_sockets(Path::new("/proc/net/tcp"), 6);
    let holders = if held.is_empty() {
        "a process of this node (no socket without a process is left)".to_owned()
    } else {
        format!("sockets without a process: {}", held.join(", "))
    };
    let moved = if here == image_node {
        String::new()
    } else {
        format!(
            " It ran on {image_node}: a host-network tree has that node's addresses and \
             restarts only there."
        )
    };
    format!(
        "the tree ran in the node's own network (host network) and one of its addresses is \
         still in use in {here}'s network namespace (CRIU: Address already in use), held by \
         {holders}; a host-network tree restarts only on its own node and only after its old \
         connections are gone (TIME_WAIT lasts 60 s after a stop checkpoint).{moved} Run the \
         job with a private network (a job address: `ckpt-job run --cluster --net private`, \
         the default) to restart it at once and on any node. (CRIU's files are kept in {})",
        staging.display()
    )
}

/// Up to `max` IPv4 TCP sockets of `/proc/net/tcp` that no process owns
/// (inode 0: TIME_WAIT, FIN_WAIT, orphans), as "addr:port STATE".
fn held_inet_sockets(table: &Path, max: usize) -> Vec<String> {
    let text = fs::read_to_string(table).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if *inode != "0" {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints the network-order address as a native u32.
            let ip = Ipv4Addr::from(ip.to_ne_bytes());
            let state = match *state {
                "01" => "ESTABLISHED",
                "04" => "FIN_WAIT1",
                "05" => "FIN_WAIT2",
                "06" => "TIME_WAIT",
                "08" => "CLOSE_WAIT",
                "09" => "LAST_ACK",
                "0B" => "CLOSING",
                other => other,
            };
            Some(format!("{ip}:{port} {state}"))
        })
        .take(max)
        .collect()
}

/// For a tree with a job address: its namespace rebuilt here with the
/// same address (the coordinator confirms the address is the job's),
/// locked until the restart resumes.
fn job_netns(shared: &Shared, job: &str, img: &TreeImage) -> Result<Option<Arc<TreeNet>>, String> {
    let ImageNet::Job { address, .. } = &img.net else {
        return Ok(None);
    };
    let addr: Ipv4Addr = address
        .parse()
        .map_err(|_| format!("job address {address:?} is not an IPv4 address"))?;
    let g = shared.job_address(job, Some(addr))?.ok_or_else(|| {
        format!("the tree had job address {addr}, but the coordinator has no job network")
    })?;
    let net = TreeNet::create(addr, &g.uplink, true)
        .map_err(|e| format!("rebuilding its network namespace at {addr}: {e}"))?;
    tracing::info!(node = %shared.cfg.node, job, address = %addr, veth = net.host_if(), "job address rebuilt, locked");
    Ok(Some(Arc::new(net)))
}

/// How long held trees wait for RESUME: the coordinator waits at most the
/// restore deadline for the other nodes after our RESTORED.
fn hold_for(restore_ms: u32) -> Duration {
    if restore_ms == 0 {
        DEFAULT_HOLD
    } else {
        Duration::from_millis(restore_ms.into()) + HOLD_SLACK
    }
}

impl JobTask {
    pub(super) async fn restore_tree(&mut self, r: pb::RestoreTree) {
        let epoch = r.epoch;
        if let Some(h) = &self.restore {
            if h.epoch == epoch && h.image_node == r.image_node && h.deadline.is_some() {
                tracing::debug!(job = %self.job, epoch, "duplicate RestoreTree");
                return;
            }
        }
        // A new restart replaces a held one (never a resumed one: below,
        // running trees refuse it).
        if self.restore.as_ref().is_some_and(|h| h.deadline.is_some()) {
            self.kill_restored("a new restart replaced it").await;
        }
        if let Some(f) = &self.frozen {
            let reason = format!("epoch {} of this job is being checkpointed here", f.epoch);
            return self.fail(epoch, pb::Phase::Restore, reason);
        }
        let running: Vec<u32> = self
            .shared
            .registry
            .of_job(&self.job)
            .iter()
            .filter(|t| t.state() == super::TreeState::Running)
            .map(|t| t.id)
            .collect();
        if !running.is_empty() {
            let reason = format!(
                "job {} already runs here (trees {running:?}); stop it before restarting it",
                self.job
            );
            return self.fail(epoch, pb::Phase::Restore, reason);
        }
        // The restored trees replace the job's dead ones here.
        self.shared.registry.forget_exited(&self.job);
        // We restore from it, so it is committed: never drop its files.
        if self.last.as_ref().is_some_and(|l| l.0 == epoch) {
            self.last = None;
        }
        self.restore = None;
        self.status(epoch, pb::NodePhase::Restoring);
        let (shared, job, image_node) = (self.shared.clone(), self.job.clone(), r.image_node);
        let dir = PathBuf::from(&r.epoch_dir);
        let node = image_node.clone();
        let res = super::epoch::blocking(move || restore_node(&shared, &job, epoch, &dir, &node))
            .await
            .and_then(|r| r);
        match res {
            Ok(done) => {
                tracing::info!(
                    node = %self.shared.cfg.node, job = %self.job, epoch, %image_node,
                    trees = done.trees.len(), verify_ms = done.verify_ms,
                    restore_ms = done.restore_ms, "restored; held frozen"
                );
                self.restore = Some(Held {
                    epoch,
                    image_node: image_node.clone(),
                    trees: done.trees,
                    deadline: Some(tokio::time::Instant::now() + hold_for(r.restore_ms)),
                    restored_at: Instant::now(),
                });
                self.status(epoch, pb::NodePhase::Restored);
                self.send(pb::Restored {
                    job: self.job.clone(),
                    epoch,
                    image_node,
                    verify_ms: done.verify_ms,
                    restore_ms: done.restore_ms,
                });
            }
            Err(reason) => {
                self.status(epoch, pb::NodePhase::Idle);
                self.fail(epoch, pb::Phase::Restore, reason);
            }
        }
    }

    pub(super) async fn resume(&mut self, epoch: u64) {
        let held = self
            .restore
            .as_mut()
            .filter(|h| h.epoch == epoch && h.deadline.is_some());
        let Some(h) = held else {
            let reason = match &self.restore {
                Some(h) if h.epoch == epoch => return, // a duplicate: already resumed
                Some(h) => format!("epoch {epoch} is not restored here (epoch {} is)", h.epoch),
                None => format!("epoch {epoch} is not restored here"),
            };
            return self.fail(epoch, pb::Phase::Resume, reason);
        };
        h.deadline = None;
        let trees = h.trees.clone();
        let downtime_ms = ms(h.restored_at.elapsed());
        let thawed = super::epoch::blocking(move || {
            for t in &trees {
                if let Some(n) = t.net() {
                    n.unlock()
                        .map_err(|e| format!("restored tree {}: {e}", t.id))?;
                }
                t.freezer
                    .thaw()
                    .map_err(|e| format!("thawing restored tree {}: {e}", t.id))?;
            }
            // Peers may still map the addresses to the nodes they left.
            for n in trees.iter().filter_map(|t| t.net()) {
                if let Err(e) = n.announce() {
                    tracing::warn!(address = %n.address(), error = %e, "cannot announce the moved address");
                }
            }
            Ok::<_, String>(())
        })
        .await
        .and_then(|r| r);
        match thawed {
            Ok(()) => {
                tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, "restored trees resumed");
                self.status(epoch, pb::NodePhase::Idle);
                self.send(pb::Resumed {
                    job: self.job.clone(),
                    epoch,
                    downtime_ms,
                });
            }
            Err(reason) => {
                self.kill_restored(&reason).await;
                self.status(epoch, pb::NodePhase::Idle);
                self.fail(epoch, pb::Phase::Resume, reason);
            }
        }
    }

    /// Whether an ABORT of `epoch` is about this node's restart.
    pub(super) fn is_restart(&self, epoch: u64) -> bool {
        self.restore.as_ref().is_some_and(|h| h.epoch == epoch)
    }

    /// ABORT of a restart: every tree it restored here is killed.
    pub(super) async fn abort_restart(&mut self, epoch: u64, reason: &str) {
        tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, %reason, "restart aborted");
        self.status(epoch, pb::NodePhase::Aborting);
        self.kill_restored(reason).await;
        self.status(epoch, pb::NodePhase::Idle);
        self.send(pb::Aborted {
            job: self.job.clone(),
            epoch,
        });
    }

    /// Kills the restored trees (frozen or not) and forgets the restart.
    pub(super) async fn kill_restored(&mut self, why: &str) {
        let Some(h) = self.restore.take() else { return };
        tracing::warn!(node = %self.shared.cfg.node, job = %self.job, epoch = h.epoch, why, "killing the restored trees");
        let trees = h.trees;
        let _ = super::epoch::blocking(move || ops::kill(&trees)).await;
    }

    /// Held trees that waited for RESUME too long are killed.
    pub(super) async fn restore_expired(&mut self) {
        let Some(epoch) = self.restore.as_ref().map(|h| h.epoch) else {
            return;
        };
        self.kill_restored("no RESUME in time").await;
        self.status(epoch, pb::NodePhase::Idle);
        self.fail(
            epoch,
            pb::Phase::Resume,
            "no RESUME or ABORT came in time: the restored trees were killed".into(),
        );
    }

    /// The coordinator is gone: trees still held are killed (the other
    /// nodes may never resume theirs); resumed ones run on.
    pub(super) async fn restore_lost(&mut self, why: &str) {
        if self.restore.as_ref().is_some_and(|h| h.deadline.is_some()) {
            let epoch = self.restore.as_ref().map_or(0, |h| h.epoch);
            self.kill_restored(why).await;
            self.status(epoch, pb::NodePhase::Idle);
        }
    }

    /// The held restart's deadline, if trees are held.
    pub(super) fn restore_deadline(&self) -> Option<tokio::time::Instant> {
        self.restore.as_ref().and_then(|h| h.deadline)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn address_in_use_of_a_host_network_tree_names_the_holders_and_the_way_out() {
        assert!(address_in_use(
            "criu restore failed (errno 98: EADDRINUSE)\n  Can't bind inet socket: Address already in use"
        ));
        assert!(!address_in_use("criu restore failed: No such file"));
        let tmp = tempfile::tempdir().unwrap();
        let table = tmp.path().join("tcp");
        fs::write(
            &table,
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: 0100007F:1BBC 0100007F:D431 06 00000000:00000000 03:00000F1C 00000000     0        0 0 3 0000000000000000\n\
             1: 0200800A:1BBC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n",
        )
        .unwrap();
        assert_eq!(
            held_inet_sockets(&table, 6),
            ["127.0.0.1:7100 TIME_WAIT"],
            "only sockets without a process"
        );
        let e = host_address_in_use("n1", "n2", Path::new("/state/restore.x"));
        for part in [
            "host network",
            "Address already in use",
            "only on its own node",
            "It ran on n2",
            "--net private",
            "/state/restore.x",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
    }
}
