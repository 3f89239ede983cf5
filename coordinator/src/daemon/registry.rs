//! The coordinator's job registry: which trees of which job run on which
//! node (as the agents report them), who owns each job, its last committed
//! epoch, its periodic-checkpoint schedule and its counters.
//!
//! The actor owns the [`JobRegistry`] (no locks). The persisted part, one
//! [`JobRecord`] per job, is written to `<state_dir>/registry.json`
//! atomically (temp file, fsync, rename, fsync of the directory) by
//! [`persist_task`] whenever it changes. On start, [`load`] reads that file
//! and then the image store, which is the source of truth for epochs: each
//! job's `last_epoch` is the store's newest committed one, and a job with
//! committed epochs but no record is relearned from its newest manifest.
//! Live trees are not persisted: agents send their full list after every
//! connect.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_protocol::cluster::pb;
use ckpt_protocol::manifest::Key;
use ckpt_protocol::pb as cpb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{valid_job_name, ImageStore};

/// The registry file inside `state_dir`.
pub const REGISTRY_FILE: &str = "registry.json";
/// Most trees one TREE_LIST may carry.
const MAX_TREES: usize = 65_536;
/// Largest registry file read back.
const MAX_FILE: u64 = 64 << 20;

/// One live tree, as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeRec {
    pub job: String,
    pub tree: u32,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub root_pid: i32,
    pub restored_from: u64,
}

/// A registry frame or heartbeat progress from an authenticated agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentReport {
    Progress {
        job: String,
        epoch: u64,
        phase: i32,
        bytes_done: u64,
        bytes_total: u64,
    },
    Started(TreeRec),
    Exited {
        job: String,
        tree: u32,
        status: i32,
    },
    List(Vec<TreeRec>),
}

fn tree_rec(r: pb::TreeReport) -> Result<TreeRec, String> {
    if !valid_job_name(&r.job) {
        return Err(format!(
            "a tree report names an invalid job {:?}",
            super::wire::clean(&r.job)
        ));
    }
    Ok(TreeRec {
        job: r.job,
        tree: r.tree_id,
        owner_uid: r.owner_uid,
        owner_gid: r.owner_gid,
        root_pid: r.root_pid,
        restored_from: r.restored_from,
    })
}

impl AgentReport {
    /// A heartbeat that says where an epoch or restart is; `None` for an
    /// idle one (liveness only).
    pub fn progress(h: &pb::Heartbeat) -> Option<AgentReport> {
        if h.job.is_empty() {
            return None;
        }
        Some(AgentReport::Progress {
            job: super::wire::clean(&h.job),
            epoch: h.epoch,
            phase: h.phase,
            bytes_done: h.bytes_done,
            bytes_total: h.bytes_total,
        })
    }

    pub fn started(m: pb::TreeStarted) -> Result<AgentReport, String> {
        let tree = m.tree.ok_or("TreeStarted without a tree")?;
        Ok(AgentReport::Started(tree_rec(tree)?))
    }

    pub fn exited(m: pb::TreeExited) -> Result<AgentReport, String> {
        if !valid_job_name(&m.job) {
            return Err(format!(
                "TreeExited names an invalid job {:?}",
                super::wire::clean(&m.job)
            ));
        }
        Ok(AgentReport::Exited {
            job: m.job,
            tree: m.tree_id,
            status: m.exit_status,
        })
    }

    pub fn list(m: pb::TreeList) -> Result<AgentReport, String> {
        if m.trees.len() > MAX_TREES {
            return Err(format!(
                "TreeList of {} trees (at most {MAX_TREES})",
                m.trees.len()
            ));
        }
        let trees = m
            .trees
            .into_iter()
            .map(tree_rec)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AgentReport::List(trees))
    }
}

/// What is kept of a job across coordinator restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobRecord {
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The nodes that last ran its trees.
    pub nodes: BTreeSet<String>,
    /// Its newest committed epoch (0: none).
    pub last_epoch: u64,
    /// Periodic checkpoints: every this many seconds (0: none).
    pub interval_seconds: u64,
    /// Committed epochs kept (0: all).
    pub keep: u32,
    pub checkpoints_committed: u64,
    pub checkpoints_failed: u64,
    pub last_error: String,
}

/// The registry file's layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub version: u32,
    pub jobs: BTreeMap<String, JobRecord>,
}

/// The last progress a node reported.
#[derive(Debug, Clone, PartialEq)]
struct NodeProgress {
    job: String,
    epoch: u64,
    phase: i32,
    done: u64,
    total: u64,
}

/// Everything the coordinator knows of its jobs.
#[derive(Debug, Default)]
pub struct JobRegistry {
    jobs: BTreeMap<String, JobRecord>,
    /// job -> node -> tree id -> tree.
    live: BTreeMap<String, BTreeMap<String, BTreeMap<u32, TreeRec>>>,
    progress: HashMap<String, NodeProgress>,
    next_due: HashMap<String, Instant>,
    /// Jobs some agent reported a tree of since this process started.
    seen: BTreeSet<String>,
    /// The persisted part changed since the last [`JobRegistry::take_dirty`].
    dirty: bool,
}

/// A job as the control socket shows it, with what the actor knows.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: String,
    pub record: JobRecord,
    /// Nodes with live trees (or, if none is known, the last ones).
    pub nodes: Vec<String>,
    pub has_live_trees: bool,
    /// Trees whose owner differs from the job's (uid, tree, node).
    pub foreign: Vec<(String, u32, u32)>,
    pub status: cpb::ClusterJob,
}

/// A periodic checkpoint to start now.
#[derive(Debug, Clone, PartialEq)]
pub struct DueCheckpoint {
    pub job: String,
    pub nodes: Vec<String>,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub keep: u32,
}

fn phase_name(phase: i32) -> String {
    pb::NodePhase::try_from(phase)
        .map(|p| p.as_str_name().trim_start_matches("NODE_PHASE_").to_owned())
        .unwrap_or_else(|_| format!("PHASE_{phase}"))
}

impl JobRegistry {
    pub fn new(jobs: BTreeMap<String, JobRecord>) -> Self {
        JobRegistry {
            jobs,
            ..JobRegistry::default()
        }
    }

    pub fn snapshot(&self) -> RegistryFile {
        RegistryFile {
            version: 1,
            jobs: self.jobs.clone(),
        }
    }

    /// Whether the persisted part changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    fn learn(&mut self, node: &str, t: TreeRec) {
        let rec = self.jobs.entry(t.job.clone()).or_insert_with(|| {
            tracing::info!(job = %t.job, owner_uid = t.owner_uid, node, "job registered");
            JobRecord {
                owner_uid: t.owner_uid,
                owner_gid: t.owner_gid,
                ..JobRecord::default()
            }
        });
        if rec.nodes.insert(node.to_owned()) {
            self.dirty = true;
        }
        // A new job (or the first tree after none was live) is dirty too.
        self.dirty = true;
        self.seen.insert(t.job.clone());
        self.live
            .entry(t.job.clone())
            .or_default()
            .entry(node.to_owned())
            .or_default()
            .insert(t.tree, t);
    }

    /// Applies an agent's report.
    pub fn apply(&mut self, node: &str, report: AgentReport) {
        match report {
            AgentReport::Progress {
                job,
                epoch,
                phase,
                bytes_done,
                bytes_total,
            } => {
                self.progress.insert(
                    node.to_owned(),
                    NodeProgress {
                        job,
                        epoch,
                        phase,
                        done: bytes_done,
                        total: bytes_total,
                    },
                );
            }
            AgentReport::Started(t) => {
                tracing::info!(node, job = %t.job, tree = t.tree, pid = t.root_pid, "tree reported");
                self.learn(node, t);
            }
            AgentReport::Exited { job, tree, status } => {
                tracing::info!(node, job, tree, status, "tree exit reported");
                self.forget_tree(node, &job, tree);
            }
            AgentReport::List(trees) => {
                tracing::info!(node, trees = trees.len(), "tree list reported");
                let jobs: Vec<String> = self.live.keys().cloned().collect();
                for job in jobs {
                    self.forget_node(&job, node);
                }
                for t in trees {
                    self.learn(node, t);
                }
            }
        }
    }

    fn forget_tree(&mut self, node: &str, job: &str, tree: u32) {
        let Some(nodes) = self.live.get_mut(job) else {
            return;
        };
        if let Some(trees) = nodes.get_mut(node) {
            trees.remove(&tree);
            if trees.is_empty() {
                self.forget_node(job, node);
            }
        }
    }

    /// `node` runs no tree of `job` any more; if some other node still
    /// does, it leaves the job's node set.
    fn forget_node(&mut self, job: &str, node: &str) {
        let Some(nodes) = self.live.get_mut(job) else {
            return;
        };
        if nodes.remove(node).is_none() {
            return;
        }
        if nodes.is_empty() {
            self.live.remove(job);
        } else if let Some(rec) = self.jobs.get_mut(job) {
            if rec.nodes.remove(node) {
                self.dirty = true;
            }
        }
    }

    /// A session ended: its progress is stale (its trees are kept until the
    /// node reports again, so a checkpoint names it as not connected).
    pub fn disconnected(&mut self, node: &str) {
        self.progress.remove(node);
    }

    /// An epoch of `job` ended.
    pub fn epoch_done(&mut self, job: &str, epoch: u64, error: Option<String>) {
        let Some(rec) = self.jobs.get_mut(job) else {
            return;
        };
        match error {
            None => {
                rec.last_epoch = rec.last_epoch.max(epoch);
                rec.checkpoints_committed += 1;
                rec.last_error.clear();
            }
            Some(e) => {
                rec.checkpoints_failed += 1;
                rec.last_error = e;
            }
        }
        self.dirty = true;
    }

    /// A checkpoint of `job` that did not start (no epoch ran), e.g. a
    /// periodic one while a node was not connected.
    pub fn failed_to_start(&mut self, job: &str, error: String) {
        if let Some(rec) = self.jobs.get_mut(job) {
            rec.checkpoints_failed += 1;
            rec.last_error = error;
            self.dirty = true;
        }
    }

    /// Registers a job the caller names explicitly (root, with its nodes),
    /// so its epochs are counted and it is listed.
    pub fn ensure(&mut self, job: &str, uid: u32, gid: u32, nodes: &[String]) {
        if !self.jobs.contains_key(job) {
            let rec = JobRecord {
                owner_uid: uid,
                owner_gid: gid,
                nodes: nodes.iter().cloned().collect(),
                ..JobRecord::default()
            };
            self.jobs.insert(job.to_owned(), rec);
            self.dirty = true;
        }
    }

    /// Sets the periodic checkpoints of `job`; false if it is unknown.
    pub fn schedule(&mut self, job: &str, interval: Duration, keep: u32, now: Instant) -> bool {
        let Some(rec) = self.jobs.get_mut(job) else {
            return false;
        };
        rec.interval_seconds = interval.as_secs();
        rec.keep = keep;
        self.dirty = true;
        if interval.is_zero() {
            self.next_due.remove(job);
        } else {
            self.next_due.insert(job.to_owned(), now + interval);
        }
        true
    }

    /// The periodic checkpoints due at `now`; `busy` says whether a job has
    /// an epoch or restart in flight (its tick is skipped).
    pub fn due(&mut self, now: Instant, busy: impl Fn(&str) -> bool) -> Vec<DueCheckpoint> {
        let mut out = Vec::new();
        for (job, rec) in &self.jobs {
            if rec.interval_seconds == 0 {
                continue;
            }
            let interval = Duration::from_secs(rec.interval_seconds);
            let next = self.next_due.entry(job.clone()).or_insert(now + interval);
            if *next > now {
                continue;
            }
            *next = now + interval;
            if busy(job) {
                tracing::info!(job, "periodic checkpoint skipped: an epoch is running");
                continue;
            }
            let Some(nodes) = self.live.get(job) else {
                tracing::debug!(job, "periodic checkpoint skipped: no live tree");
                continue;
            };
            out.push(DueCheckpoint {
                job: job.clone(),
                nodes: nodes.keys().cloned().collect(),
                owner_uid: rec.owner_uid,
                owner_gid: rec.owner_gid,
                keep: rec.keep,
            });
        }
        out
    }

    /// The registered owner (uid, gid) of `job`, if the job is known.
    pub fn owner(&self, job: &str) -> Option<(u32, u32)> {
        self.jobs.get(job).map(|r| (r.owner_uid, r.owner_gid))
    }

    /// Every known job's name.
    pub fn names(&self) -> Vec<String> {
        self.jobs.keys().cloned().collect()
    }

    /// `job` as shown to clients; `running` and `restarting` are the
    /// epoch in flight, `connected` says which nodes have a session.
    pub fn view(
        &self,
        job: &str,
        running: Option<u64>,
        restarting: Option<u64>,
        connected: impl Fn(&str) -> bool,
    ) -> Option<JobView> {
        let rec = self.jobs.get(job)?;
        let live = self.live.get(job);
        let mut foreign = Vec::new();
        let nodes: Vec<String> = match live {
            Some(l) => l.keys().cloned().collect(),
            None => rec.nodes.iter().cloned().collect(),
        };
        let mut statuses = Vec::new();
        for node in &nodes {
            let trees: Vec<u32> = live
                .and_then(|l| l.get(node))
                .map(|t| {
                    for tr in t.values() {
                        if tr.owner_uid != rec.owner_uid {
                            foreign.push((node.clone(), tr.tree, tr.owner_uid));
                        }
                    }
                    t.keys().copied().collect()
                })
                .unwrap_or_default();
            let progress = self.progress.get(node).filter(|p| {
                p.job == job && (running == Some(p.epoch) || restarting == Some(p.epoch))
            });
            let phase = match (progress, live.is_some()) {
                (Some(p), _) => phase_name(p.phase),
                (None, true) if !trees.is_empty() => "RUNNING".to_owned(),
                (None, _) => "NO_TREE".to_owned(),
            };
            statuses.push(cpb::ClusterNodeStatus {
                node: node.clone(),
                connected: connected(node),
                trees,
                phase,
                bytes_done: progress.map_or(0, |p| p.done),
                bytes_total: progress.map_or(0, |p| p.total),
            });
        }
        let phase = if running.is_some() {
            "checkpointing"
        } else if restarting.is_some() {
            "restarting"
        } else if live.is_some() {
            "running"
        } else if self.seen.contains(job) {
            "exited"
        } else {
            // Known from the state dir or the store; no agent has reported
            // a tree of it since this coordinator started.
            "unknown"
        };
        let status = cpb::ClusterJob {
            job: job.to_owned(),
            owner_uid: rec.owner_uid,
            owner_gid: rec.owner_gid,
            phase: phase.to_owned(),
            nodes: statuses,
            last_epoch: rec.last_epoch,
            running_epoch: running.or(restarting).unwrap_or(0),
            interval_seconds: rec.interval_seconds,
            keep: rec.keep,
            checkpoints_committed: rec.checkpoints_committed,
            checkpoints_failed: rec.checkpoints_failed,
            last_error: rec.last_error.clone(),
        };
        Some(JobView {
            job: job.to_owned(),
            record: rec.clone(),
            nodes,
            has_live_trees: live.is_some(),
            foreign,
            status,
        })
    }
}

/// Why the registry could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid registry file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("reading the image store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
}

/// Reads `<state_dir>/registry.json` (no state dir or no file: empty) and
/// reconciles it with the image store (see the module comment).
pub fn load(
    state_dir: Option<&Path>,
    store: &ImageStore,
    key: &Key,
) -> Result<BTreeMap<String, JobRecord>, RegistryError> {
    let mut jobs = match state_dir {
        Some(dir) => read_file(&dir.join(REGISTRY_FILE))?,
        None => BTreeMap::new(),
    };
    reconcile(&mut jobs, store, key)?;
    Ok(jobs)
}

fn read_file(path: &Path) -> Result<BTreeMap<String, JobRecord>, RegistryError> {
    let path = path.to_path_buf();
    let jobs = match fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(source) => {
            return Err(RegistryError::Io {
                op: "reading",
                path,
                source,
            })
        }
        Ok(m) if m.len() > MAX_FILE => {
            return Err(RegistryError::Corrupt {
                path,
                reason: format!("{} bytes (at most {MAX_FILE})", m.len()),
            })
        }
        Ok(_) => {
            let bytes = fs::read(&path).map_err(|source| RegistryError::Io {
                op: "reading",
                path: path.clone(),
                source,
            })?;
            let f: RegistryFile =
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if f.version != 1 {
                return Err(RegistryError::Corrupt {
                    path,
                    reason: format!("version {} (this coordinator reads 1)", f.version),
                });
            }
            if let Some(bad) = f.jobs.keys().find(|j| !valid_job_name(j)) {
                return Err(RegistryError::Corrupt {
                    path,
                    reason: format!("invalid job name {bad:?}"),
                });
            }
            f.jobs
        }
    };
    Ok(jobs)
}

/// The store is the source of truth for epochs.
fn reconcile(
    jobs: &mut BTreeMap<String, JobRecord>,
    store: &ImageStore,
    key: &Key,
) -> Result<(), RegistryError> {
    let store_err = |e: crate::store::StoreError| RegistryError::Store {
        path: store.root().to_path_buf(),
        reason: e.to_string(),
    };
    let stored = if store.root().exists() {
        store.jobs().map_err(store_err)?
    } else {
        Vec::new()
    };
    for job in stored {
        let latest = store.latest_committed(&job).map_err(store_err)?;
        match (jobs.get_mut(&job), latest) {
            (Some(rec), latest) => rec.last_epoch = latest.unwrap_or(0),
            (None, Some(epoch)) => match store.load_manifest(&job, epoch, Some(key)) {
                Ok(m) => {
                    jobs.insert(
                        job.clone(),
                        JobRecord {
                            owner_uid: m.owner_uid,
                            owner_gid: m.owner_gid,
                            nodes: m.nodes.iter().map(|n| n.node.clone()).collect(),
                            last_epoch: epoch,
                            ..JobRecord::default()
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(job, epoch, error = %e, "cannot relearn a job from its manifest")
                }
            },
            (None, None) => {}
        }
    }
    // A job the file knows but whose images are gone has no epoch.
    for (job, rec) in jobs.iter_mut() {
        if !store.job_dir(job).exists() {
            rec.last_epoch = 0;
        }
    }
    Ok(())
}

/// Writes `file` to `<state_dir>/registry.json` atomically.
pub fn save(state_dir: &Path, file: &RegistryFile) -> Result<(), RegistryError> {
    let path = state_dir.join(REGISTRY_FILE);
    let tmp = state_dir.join(format!("{REGISTRY_FILE}.tmp"));
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| RegistryError::Io {
            op,
            path: p,
            source,
        }
    };
    let bytes = serde_json::to_vec_pretty(file).map_err(|e| RegistryError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(&bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io("renaming into", &path))?;
    fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", state_dir))?;
    Ok(())
}

/// Writes every snapshot sent on `rx` (the newest one when several queued
/// up) until the sender is gone.
pub async fn persist_task(state_dir: PathBuf, mut rx: watch::Receiver<RegistryFile>) {
    while rx.changed().await.is_ok() {
        let file = rx.borrow_and_update().clone();
        let dir = state_dir.clone();
        let r = tokio::task::spawn_blocking(move || save(&dir, &file)).await;
        match r {
            Ok(Ok(())) => tracing::debug!("registry saved"),
            Ok(Err(e)) => tracing::error!(error = %e, "saving the job registry failed"),
            Err(e) => tracing::error!(error = %e, "saving the job registry failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(job: &str, id: u32, uid: u32) -> TreeRec {
        TreeRec {
            job: job.into(),
            tree: id,
            owner_uid: uid,
            owner_gid: uid,
            root_pid: 100 + id as i32,
            restored_from: 0,
        }
    }

    #[test]
    fn trees_make_jobs_and_lists_replace_a_node() {
        let mut r = JobRegistry::default();
        r.apply("n1", AgentReport::Started(tree("a", 0, 1000)));
        r.apply(
            "n2",
            AgentReport::List(vec![tree("a", 3, 1000), tree("b", 4, 0)]),
        );
        let v = r.view("a", None, None, |_| true).unwrap();
        assert_eq!(v.nodes, ["n1", "n2"]);
        assert_eq!(v.record.owner_uid, 1000);
        assert_eq!(v.status.phase, "running");
        assert!(r.take_dirty());
        // n1's new list drops its tree of a.
        r.apply("n1", AgentReport::List(vec![]));
        assert_eq!(r.view("a", None, None, |_| true).unwrap().nodes, ["n2"]);
        r.apply(
            "n2",
            AgentReport::Exited {
                job: "a".into(),
                tree: 3,
                status: 0,
            },
        );
        let v = r.view("a", None, None, |_| false).unwrap();
        assert!(!v.has_live_trees);
        // The last nodes are kept for a job whose trees ended.
        assert_eq!(v.nodes, ["n2"]);
        assert_eq!(v.status.nodes[0].phase, "NO_TREE");
        assert_eq!(v.status.phase, "exited");
        // A job only known from the state dir: no agent reported it yet.
        let r = JobRegistry::new(BTreeMap::from([("old".to_owned(), JobRecord::default())]));
        assert_eq!(
            r.view("old", None, None, |_| true).unwrap().status.phase,
            "unknown"
        );
        assert!(!v.status.nodes[0].connected);
    }

    #[test]
    fn owner_is_the_first_one_and_foreign_trees_are_flagged() {
        let mut r = JobRegistry::default();
        r.apply("n1", AgentReport::Started(tree("a", 0, 1000)));
        r.apply("n2", AgentReport::Started(tree("a", 1, 1001)));
        let v = r.view("a", None, None, |_| true).unwrap();
        assert_eq!(v.record.owner_uid, 1000);
        assert_eq!(v.foreign, vec![("n2".to_owned(), 1, 1001)]);
    }

    #[test]
    fn progress_shows_only_for_the_running_epoch() {
        let mut r = JobRegistry::default();
        r.apply("n1", AgentReport::Started(tree("a", 0, 0)));
        r.apply(
            "n1",
            AgentReport::Progress {
                job: "a".into(),
                epoch: 7,
                phase: pb::NodePhase::Dumping as i32,
                bytes_done: 5,
                bytes_total: 10,
            },
        );
        let v = r.view("a", Some(7), None, |_| true).unwrap();
        assert_eq!(v.status.phase, "checkpointing");
        assert_eq!(v.status.nodes[0].phase, "DUMPING");
        assert_eq!(v.status.nodes[0].bytes_done, 5);
        let v = r.view("a", None, None, |_| true).unwrap();
        assert_eq!(v.status.nodes[0].phase, "RUNNING");
    }

    #[test]
    fn epochs_and_schedules() {
        let mut r = JobRegistry::default();
        r.apply("n1", AgentReport::Started(tree("a", 0, 0)));
        r.epoch_done("a", 3, None);
        r.epoch_done("a", 4, Some("boom".into()));
        let v = r.view("a", None, None, |_| true).unwrap();
        assert_eq!(v.record.last_epoch, 3);
        assert_eq!(
            (v.record.checkpoints_committed, v.record.checkpoints_failed),
            (1, 1)
        );
        assert_eq!(v.record.last_error, "boom");
        r.failed_to_start("a", "n1 not connected".into());
        let v = r.view("a", None, None, |_| true).unwrap();
        assert_eq!(v.record.checkpoints_failed, 2);
        assert_eq!(v.record.last_error, "n1 not connected");
        let t0 = Instant::now();
        assert!(r.schedule("a", Duration::from_secs(10), 2, t0));
        assert!(!r.schedule("nope", Duration::from_secs(10), 2, t0));
        assert!(r.due(t0 + Duration::from_secs(5), |_| false).is_empty());
        let due = r.due(t0 + Duration::from_secs(10), |_| false);
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].nodes.clone(), due[0].keep),
            (vec!["n1".to_owned()], 2)
        );
        // Skipped while busy, and the next tick is an interval later.
        assert!(r.due(t0 + Duration::from_secs(20), |_| true).is_empty());
        assert!(r.due(t0 + Duration::from_secs(25), |_| false).is_empty());
        assert_eq!(r.due(t0 + Duration::from_secs(30), |_| false).len(), 1);
    }

    #[test]
    fn bad_reports_are_refused() {
        let e = AgentReport::list(pb::TreeList {
            trees: vec![pb::TreeReport {
                job: "../x".into(),
                ..Default::default()
            }],
        })
        .unwrap_err();
        assert!(e.contains("invalid job"), "{e}");
        assert!(AgentReport::started(pb::TreeStarted { tree: None }).is_err());
    }

    #[test]
    fn save_and_load_round_trip_and_the_store_wins() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let store = ImageStore::new(dir.path().join("images"));
        let key = Key::from_bytes([7; 32]);
        let mut r = JobRegistry::default();
        r.apply("n1", AgentReport::Started(tree("a", 0, 1000)));
        r.epoch_done("a", 5, None);
        save(&state, &r.snapshot()).unwrap();
        // The store has no image of job a: its epoch is 0 now.
        let jobs = load(Some(&state), &store, &key).unwrap();
        assert_eq!(jobs["a"].owner_uid, 1000);
        assert_eq!(jobs["a"].last_epoch, 0);
        assert_eq!(jobs["a"].nodes, BTreeSet::from(["n1".to_owned()]));
        fs::write(state.join(REGISTRY_FILE), b"{not json").unwrap();
        let e = load(Some(&state), &store, &key).unwrap_err().to_string();
        assert!(
            e.contains(REGISTRY_FILE) && e.contains("not a valid"),
            "{e}"
        );
    }
}
