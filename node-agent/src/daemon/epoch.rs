//! One job's epochs on this node: a task that takes the coordinator's
//! commands for the job in order and keeps the agent-side phase.
//!
//! ```text
//!        PREPARE: freeze+drain          DUMP: CRIU + pack        flush done
//!  Idle ───────────────────────► Ready ──────────────► Dumped ─────────────► Flushed
//!   ▲   READY | FAIL (thawed)      DUMPED (no digests) │  FLUSHED (digests)   │ (stop mode: still
//!   │                              and the flush starts│                      │  frozen; COMMITTED:
//!   │                              in the background   │                      │  SIGKILL, STOPPED)
//!   │          COMMIT(resume), in either phase: thaw, RESUMED (the flush goes on)
//!   └──────────────────────────────────────────────────┴──────────────────────┘
//!  ABORT (any phase): stop the flush, thaw, drop this node's files, ABORTED.
//!  Coordinator lost, or `frozen_max` past: thaw (fail closed); the files
//!  are dropped unless FLUSHED went out (the commit may have happened).
//! ```
//!
//! DUMPED goes out as soon as the images are complete in the page cache.
//! The flush (digest + fsync of every file, FLUSHED with the digests) runs
//! on the blocking pool on its own: the task goes on taking COMMIT and
//! ABORT meanwhile, so a continue-mode tree thaws without waiting for
//! digests. In continue mode nothing hashes during the dump (CRIU alone is
//! the downtime); in stop mode the page-file follower hashes while CRIU
//! writes, since the tree stays frozen until COMMITTED anyway.
//!
//! Commands are handled one at a time: an ABORT that arrives during a CRIU
//! dump waits for the dump (which cannot be interrupted safely) and then
//! thaws the tree.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_protocol::cluster::{digests_to_wire, node_image_to_wire, pb};
use ckpt_protocol::manifest::{CheckpointMode, RankDrain};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ops::{self, ms};
use super::restore::Held;
use super::trees::{lock, Tree};
use super::Shared;

use pb::frame::Body;

/// What a job's task is told.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// A command from the coordinator about this job.
    Frame(Box<Body>),
    /// The connection to the coordinator is gone.
    Lost,
}

/// Where this node is in the job's current epoch while it holds the trees
/// frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Frozen and drained (READY sent).
    Ready,
    /// Dumped (DUMPED sent), still frozen; the flush runs.
    Dumped,
    /// Flushed (FLUSHED sent), still frozen: until COMMITTED in stop mode,
    /// until COMMIT in continue mode.
    Flushed,
}

/// An epoch in which this node's trees are frozen.
#[derive(Debug)]
pub(super) struct Frozen {
    pub(super) epoch: u64,
    held: Phase,
    dir: PathBuf,
    trees: Vec<Arc<Tree>>,
    frozen_at: Instant,
    /// `frozen_max` from PREPARE: past it the agent thaws on its own.
    deadline: tokio::time::Instant,
    mode: CheckpointMode,
    /// The MPI ranks drained at PREPARE (for the node's image).
    drained: Vec<RankDrain>,
}

/// The flush of one epoch's files, running on the blocking pool.
#[derive(Debug)]
pub(super) struct Flushing {
    epoch: u64,
    /// Set by ABORT (or a newer epoch): the flush stops at the next file
    /// or MiB and its result is dropped.
    cancel: Arc<AtomicBool>,
    task: JoinHandle<Result<Option<ops::Flushed>, String>>,
    /// When DUMPED went out.
    started: Instant,
}

impl Flushing {
    fn cancel(self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The running flush's result, or never if none runs.
async fn flush_done(f: &mut Option<Flushing>) -> Result<Option<ops::Flushed>, String> {
    match f {
        Some(f) => match (&mut f.task).await {
            Ok(r) => r,
            Err(e) => Err(format!("the agent's flush worker failed: {e}")),
        },
        None => std::future::pending().await,
    }
}

pub(super) struct JobTask {
    pub(super) shared: Arc<Shared>,
    pub(super) job: String,
    pub(super) frozen: Option<Frozen>,
    /// The last epoch that is not frozen any more but may still be aborted
    /// (its files are dropped then): `(epoch, dir)`.
    pub(super) last: Option<(u64, PathBuf)>,
    /// This node's part of a restart (restore.rs).
    pub(super) restore: Option<Held>,
    /// The flush of the last dumped epoch, until FLUSHED (or ABORT).
    pub(super) flush: Option<Flushing>,
}

/// Runs the job's task until its sender is dropped (then any frozen tree is
/// thawed).
pub(crate) async fn run(shared: Arc<Shared>, job: String, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut t = JobTask {
        shared,
        job,
        frozen: None,
        last: None,
        restore: None,
        flush: None,
    };
    loop {
        let frozen = t.frozen.as_ref().map(|f| f.deadline);
        let held = t.restore_deadline();
        let deadline = match (frozen, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let recv = async {
            match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, rx.recv()).await.ok(),
                None => Some(rx.recv().await),
            }
        };
        let received = tokio::select! {
            r = recv => r,
            r = flush_done(&mut t.flush) => {
                if let Some(f) = t.flush.take() {
                    t.flushed(f.epoch, f.started, r).await;
                }
                continue;
            }
        };
        let cmd = match received {
            Some(c) => c,
            None => {
                let now = tokio::time::Instant::now();
                if frozen.is_some_and(|d| d <= now) {
                    t.expired().await;
                }
                if held.is_some_and(|d| d <= now) {
                    t.restore_expired().await;
                }
                continue;
            }
        };
        match cmd {
            Some(Cmd::Frame(body)) => t.on_frame(*body).await,
            Some(Cmd::Lost) => {
                t.give_up("the coordinator was lost").await;
                t.restore_lost("the coordinator was lost").await;
            }
            None => {
                t.give_up("the agent is shutting down").await;
                t.restore_lost("the agent is shutting down").await;
                return;
            }
        }
    }
}

/// Runs blocking work on tokio's blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the agent's worker failed: {e}"))
}

impl JobTask {
    pub(super) fn send(&self, frame: impl Into<pb::Frame>) {
        self.shared.send(frame.into());
    }

    pub(super) fn fail(&self, epoch: u64, phase: pb::Phase, reason: String) {
        tracing::warn!(node = %self.shared.cfg.node, job = %self.job, epoch, phase = ?phase, %reason, "epoch failed here");
        self.send(pb::Fail {
            job: self.job.clone(),
            epoch,
            phase: phase as i32,
            reason,
        });
    }

    pub(super) fn status(&self, epoch: u64, phase: pb::NodePhase) {
        self.shared.set_status(&self.job, epoch, phase);
    }

    async fn on_frame(&mut self, body: Body) {
        match body {
            Body::Prepare(p) => self.prepare(p).await,
            Body::Dump(d) => self.dump(d.epoch).await,
            Body::Commit(c) => self.commit(c.epoch, c.action).await,
            Body::EpochCommitted(c) => self.committed(c.epoch).await,
            Body::Abort(a) if self.is_restart(a.epoch) => {
                self.abort_restart(a.epoch, &a.reason).await
            }
            Body::Abort(a) => self.abort(a.epoch, &a.reason).await,
            Body::RestoreTree(r) => self.restore_tree(r).await,
            Body::Resume(r) => self.resume(r.epoch).await,
            other => {
                let kind = pb::Frame { body: Some(other) }.kind();
                tracing::warn!(job = %self.job, kind, "ignoring a frame an agent does not take");
            }
        }
    }

    fn frozen_in(&self, epoch: u64, held: Phase) -> bool {
        self.frozen
            .as_ref()
            .is_some_and(|f| f.epoch == epoch && f.held == held)
    }

    async fn prepare(&mut self, p: pb::Prepare) {
        let epoch = p.epoch;
        if let Some(f) = &self.frozen {
            if f.epoch == epoch {
                return; // a duplicate
            }
            let old = f.epoch;
            self.give_up(&format!("PREPARE of epoch {epoch} replaced epoch {old}"))
                .await;
        }
        if let Some(h) = self.restore.as_ref().filter(|h| h.deadline.is_some()) {
            let reason = format!(
                "epoch {} of this job is restored here and waits for RESUME",
                h.epoch
            );
            return self.fail(epoch, pb::Phase::Prepare, reason);
        }
        // A restart that resumed is over once the job is checkpointed again.
        self.restore = None;
        // A flush of an older epoch that is still running: that epoch was
        // given up (a committed one has all its FLUSHED).
        if let Some(f) = self.flush.take_if(|f| f.epoch != epoch) {
            f.cancel();
        }
        let checked = (|| {
            let mode = p
                .checkpoint_mode("coordinator")
                .map_err(|e| e.to_string())?;
            let d = p.deadlines.ok_or("PREPARE carries no deadlines")?;
            if d.frozen_max_ms == 0 {
                return Err("PREPARE sets no frozen_max deadline".to_owned());
            }
            if !Path::new(&p.epoch_dir).is_absolute() {
                return Err(format!("epoch dir {:?} is not absolute", p.epoch_dir));
            }
            Ok((mode, d))
        })();
        let (mode, deadlines) = match checked {
            Ok(d) => d,
            Err(reason) => return self.fail(epoch, pb::Phase::Prepare, reason),
        };
        let received = tokio::time::Instant::now();
        let deadline = received + Duration::from_millis(deadlines.frozen_max_ms.into());
        let dir = PathBuf::from(&p.epoch_dir);
        self.status(epoch, pb::NodePhase::Preparing);
        let trees = self.shared.registry.of_job(&self.job);
        let mut freeze_timeout = self.shared.cfg.freeze_timeout;
        if deadlines.prepare_ms > 0 {
            freeze_timeout = freeze_timeout.min(Duration::from_millis(deadlines.prepare_ms.into()));
        }
        let frozen_at = Instant::now();
        let work = trees.clone();
        // The ranks' drain gets 3/4 of the PREPARE deadline, so that a
        // rank that never reaches a drain point fails the PREPARE here
        // (closing every rank's socket: they resume) before the
        // coordinator gives up.
        let drain_deadline = if deadlines.prepare_ms > 0 {
            Duration::from_millis(u64::from(deadlines.prepare_ms) * 3 / 4)
        } else {
            self.shared.cfg.freeze_timeout
        };
        let r = blocking(move || ops::prepare(&work, freeze_timeout, drain_deadline))
            .await
            .and_then(|r| r);
        match r {
            Ok(done) => {
                tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, freeze_ms = done.freeze_ms, drain_ms = done.drain_ms, ranks = done.ranks.len(), "ready");
                for r in &done.ranks {
                    tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, rank = r.rank, sent = r.sent, received = r.received, stashed = r.stashed, rounds = r.rounds, "rank drained");
                }
                self.frozen = Some(Frozen {
                    epoch,
                    held: Phase::Ready,
                    dir,
                    trees,
                    frozen_at,
                    deadline,
                    mode,
                    drained: done.drained(),
                });
                self.status(epoch, pb::NodePhase::Ready);
                self.send(pb::Ready {
                    job: self.job.clone(),
                    epoch,
                    drain_ms: done.drain_ms,
                    lock_ms: done.lock_ms,
                    freeze_ms: done.freeze_ms,
                });
            }
            Err(reason) => {
                self.last = Some((epoch, dir));
                self.status(epoch, pb::NodePhase::Idle);
                self.fail(epoch, pb::Phase::Prepare, reason);
            }
        }
    }

    async fn dump(&mut self, epoch: u64) {
        if !self.frozen_in(epoch, Phase::Ready) {
            return self.fail(epoch, pb::Phase::Dump, self.not_in(epoch, "READY"));
        }
        let Some(f) = self.frozen.as_mut() else {
            return;
        };
        self.shared
            .set_status(&self.job, epoch, pb::NodePhase::Dumping);
        let (shared, trees, dir) = (self.shared.clone(), f.trees.clone(), f.dir.clone());
        // Stop mode: the tree stays frozen until COMMITTED anyway, so the
        // page files are hashed while CRIU writes them. Continue mode: CRIU
        // alone, the hashing comes after the thaw.
        let hash_while_dumping = f.mode == CheckpointMode::Stop;
        let drained = f.drained.clone();
        let progress = self.shared.progress();
        let r = blocking(move || {
            ops::dump(
                &shared.criu,
                &shared.cfg.node,
                &trees,
                &dir,
                shared.cfg.freeze_timeout,
                hash_while_dumping,
                &progress,
            )
        })
        .await
        .and_then(|r| r)
        .and_then(|mut d| {
            d.image.drained = drained;
            let wire = node_image_to_wire(&d.image).map_err(|e| e.to_string())?;
            Ok((d, wire))
        });
        match r {
            Ok((d, image)) => {
                f.held = Phase::Dumped;
                let dir = f.dir.clone();
                tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, dump_ms = d.dump_ms, capture_ms = d.capture_ms, pack_ms = d.pack_ms, sealed = d.sealed.len(), pending = d.pending.len(), hash_while_dumping, "dumped");
                self.status(epoch, pb::NodePhase::Dumped);
                self.send(pb::Dumped {
                    job: self.job.clone(),
                    epoch,
                    image: Some(image),
                    timings: Some(pb::NodeTimings {
                        dump_ms: d.dump_ms,
                        capture_ms: d.capture_ms,
                        pack_ms: d.pack_ms,
                        digest_ms: 0.0,
                    }),
                    criu_version: self.shared.criu_version.clone(),
                });
                // The flush starts now, without waiting for COMMIT.
                let cancel = Arc::new(AtomicBool::new(false));
                let stop = cancel.clone();
                let (sealed, pending) = (d.sealed, d.pending);
                self.shared
                    .set_status(&self.job, epoch, pb::NodePhase::Flushing);
                let progress = self.shared.progress();
                let task = tokio::task::spawn_blocking(move || {
                    ops::flush(&dir, sealed, &pending, &stop, &progress)
                });
                self.flush = Some(Flushing {
                    epoch,
                    cancel,
                    task,
                    started: Instant::now(),
                });
            }
            Err(reason) => {
                self.drop_frozen(true).await;
                self.fail(epoch, pb::Phase::Dump, reason);
            }
        }
    }

    /// The background flush of `epoch` ended.
    async fn flushed(
        &mut self,
        epoch: u64,
        started: Instant,
        r: Result<Option<ops::Flushed>, String>,
    ) {
        let still_frozen = self.frozen.as_ref().is_some_and(|f| f.epoch == epoch);
        let done = match r {
            Ok(Some(done)) => done,
            Ok(None) => return, // cancelled: the epoch is gone
            Err(reason) => {
                if still_frozen {
                    // Thaw (fail closed); ABORT drops the files.
                    self.drop_frozen(false).await;
                }
                if self.frozen.is_none() {
                    self.status(epoch, pb::NodePhase::Idle);
                }
                return self.fail(epoch, pb::Phase::Flush, reason);
            }
        };
        let files = match digests_to_wire(&done.files) {
            Ok(files) => files,
            Err(e) => return self.fail(epoch, pb::Phase::Flush, e.to_string()),
        };
        if let Some(f) = self.frozen.as_mut().filter(|f| f.epoch == epoch) {
            f.held = Phase::Flushed;
        } else if self.frozen.is_none() {
            self.status(epoch, pb::NodePhase::Idle);
        }
        let flush_ms = ms(started.elapsed());
        tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, flush_ms, digest_ms = done.digest_ms, bytes = done.bytes, files = files.len(), "flushed");
        self.send(pb::Flushed {
            job: self.job.clone(),
            epoch,
            bytes: done.bytes,
            flush_ms,
            files,
            digest_ms: done.digest_ms,
        });
    }

    async fn commit(&mut self, epoch: u64, action: i32) {
        let dumped = self
            .frozen
            .as_ref()
            .is_some_and(|f| f.epoch == epoch && matches!(f.held, Phase::Dumped | Phase::Flushed));
        if !dumped {
            return self.fail(epoch, pb::Phase::Commit, self.not_in(epoch, "DUMPED"));
        }
        match pb::CommitAction::try_from(action) {
            Ok(pb::CommitAction::Resume) => {
                // Thaw now, whether the flush is done or not.
                let Some(f) = self.frozen.take() else { return };
                let trees = f.trees.clone();
                let _ = blocking(move || ops::thaw(&trees)).await;
                let downtime_ms = ms(f.frozen_at.elapsed());
                self.last = Some((epoch, f.dir));
                self.send(pb::Resumed {
                    job: self.job.clone(),
                    epoch,
                    downtime_ms,
                });
                let flushing = self.flush.as_ref().is_some_and(|fl| fl.epoch == epoch);
                self.status(
                    epoch,
                    if flushing {
                        pb::NodePhase::Flushing
                    } else {
                        pb::NodePhase::Idle
                    },
                );
            }
            // The tree stays frozen until COMMITTED; FLUSHED goes out when
            // the flush is done (or went out already).
            Ok(pb::CommitAction::Stop) => {}
            _ => self.fail(
                epoch,
                pb::Phase::Commit,
                format!("COMMIT with unknown action {action}"),
            ),
        }
    }

    async fn committed(&mut self, epoch: u64) {
        if self.last.as_ref().is_some_and(|l| l.0 == epoch) {
            self.last = None; // committed: never drop its files
        }
        if !self.frozen_in(epoch, Phase::Flushed) {
            return; // continue mode: nothing left to do
        }
        let Some(f) = self.frozen.take() else { return };
        let trees = f.trees.clone();
        let _ = blocking(move || ops::kill(&trees)).await;
        tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, "committed; trees stopped");
        self.status(epoch, pb::NodePhase::Idle);
        self.send(pb::Stopped {
            job: self.job.clone(),
            epoch,
            downtime_ms: ms(f.frozen_at.elapsed()),
        });
    }

    async fn abort(&mut self, epoch: u64, reason: &str) {
        tracing::info!(node = %self.shared.cfg.node, job = %self.job, epoch, %reason, "abort");
        self.status(epoch, pb::NodePhase::Aborting);
        if let Some(f) = self.flush.take_if(|f| f.epoch == epoch) {
            f.cancel();
        }
        if self.frozen.as_ref().is_some_and(|f| f.epoch == epoch) {
            self.drop_frozen(true).await;
        } else if let Some((_, dir)) = self.last.take_if(|l| l.0 == epoch) {
            let node = self.shared.cfg.node.clone();
            let _ = blocking(move || ops::remove_node_files(&dir, &node)).await;
        }
        self.status(epoch, pb::NodePhase::Idle);
        self.send(pb::Aborted {
            job: self.job.clone(),
            epoch,
        });
    }

    /// Thaws a frozen epoch's trees; drops its files if `remove`, else
    /// keeps it abortable in `last`.
    async fn drop_frozen(&mut self, remove: bool) {
        let Some(f) = self.frozen.take() else { return };
        let (trees, dir, node) = (f.trees, f.dir.clone(), self.shared.cfg.node.clone());
        let _ = blocking(move || {
            ops::thaw(&trees);
            if remove {
                ops::remove_node_files(&dir, &node);
            }
        })
        .await;
        if !remove {
            self.last = Some((f.epoch, f.dir));
        }
    }

    /// Fail closed without the coordinator: thaw. An epoch that was
    /// FLUSHED may have been committed, so its files stay.
    async fn give_up(&mut self, why: &str) {
        let Some(f) = &self.frozen else { return };
        let (epoch, held) = (f.epoch, f.held);
        tracing::warn!(node = %self.shared.cfg.node, job = %self.job, epoch, ?held, why, "thawing the job's trees on our own");
        self.drop_frozen(held != Phase::Flushed).await;
        self.status(epoch, pb::NodePhase::Idle);
    }

    async fn expired(&mut self) {
        let Some(f) = &self.frozen else { return };
        let (epoch, held) = (f.epoch, f.held);
        self.give_up("frozen_max passed without COMMIT or ABORT")
            .await;
        let phase = match held {
            Phase::Ready => pb::Phase::Dump,
            Phase::Dumped => pb::Phase::Commit,
            Phase::Flushed => pb::Phase::Flush,
        };
        self.fail(
            epoch,
            phase,
            "the tree stayed frozen past frozen_max; thawed".into(),
        );
    }

    fn not_in(&self, epoch: u64, want: &str) -> String {
        match &self.frozen {
            Some(f) => format!(
                "epoch {epoch} is not {want} here (this node is in epoch {} at {:?})",
                f.epoch, f.held
            ),
            None => format!("epoch {epoch} is not {want} here (no epoch in progress)"),
        }
    }
}

/// Heartbeat status of the agent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status {
    pub job: String,
    pub epoch: u64,
    pub phase: i32,
    /// Of the current phase; reset when the phase changes.
    pub progress: Arc<ops::Progress>,
}

impl Shared {
    pub(crate) fn set_status(&self, job: &str, epoch: u64, phase: pb::NodePhase) {
        let mut s = lock(&self.status);
        if s.job != job || s.epoch != epoch || s.phase != phase as i32 {
            s.progress.start(0);
        }
        s.job = job.to_owned();
        s.epoch = epoch;
        s.phase = phase as i32;
    }

    /// The progress counters heartbeats report.
    pub(crate) fn progress(&self) -> Arc<ops::Progress> {
        lock(&self.status).progress.clone()
    }
}
