//! The coordinator's network core: agents connect over TCP, authenticate,
//! and one task drives the epochs of every job.
//!
//! ```text
//!  accept loop ──► session task (one per connection) ──► Inbound ──► coordinator task
//!                   handshake_server, then frames in,      (bounded      (sessions, jobs,
//!                   liveness, heartbeats out, writes   ◄──  per-session   running Epochs,
//!                   its bounded outbound queue             queue)        deadlines)
//!  Coordinator (API handle) ──── requests ─────────────────────────────────┘
//!  ManifestWriter ◄── WriteManifest (blocking pool) ── CommitSucceeded/CommitFailed ──┘
//! ```
//!
//! # One actor, no locks
//!
//! The coordinator task ([`actor`]) owns the session registry, the job
//! registry and every running [`crate::epoch::Epoch`]. Session tasks,
//! the API handle and manifest writes talk to it only through its inbox,
//! so the state machine is never shared and never locked. The actor never
//! awaits anything but its inbox and the next epoch deadline: it cannot be
//! stalled by a peer.
//!
//! # Sessions
//!
//! - A connection is a session only after [`auth::handshake_server`] with
//!   the cluster key; a refused peer is logged (`warn`) with its address and
//!   the reason, kept in [`Coordinator::refusals`], and never registered, so
//!   it can never be part of an epoch.
//! - **One session per node; the newest wins.** A second authenticated
//!   connection for a node replaces the first, which is closed. An agent that
//!   restarts after a crash or a network partition must be able to come back
//!   at once, not after the old half-open connection's liveness timeout;
//!   both connections proved the cluster key, so a replacement can only come
//!   from a key holder. If the node is in a running epoch, the replacement
//!   counts as losing it: the new agent process knows nothing of that epoch,
//!   so the epoch aborts (fail closed).
//! - **Outbound**: each session has a bounded queue of pre-encoded frames
//!   ([`CoordinatorConfig::queue_depth`]). A broadcast encodes its frame once
//!   and `try_send`s it to each session; a session whose queue is full is an
//!   agent that stopped reading: it is dropped (and lost), never waited for.
//!   Each write also has a deadline ([`CoordinatorConfig::write_timeout`]).
//! - **Inbound**: the session task decodes, validates (a DUMPED image must be
//!   the sender's own and pass the manifest's checks) and forwards typed
//!   events; a frame over the cap, one that does not decode, or one an agent
//!   must not send closes that session (with a best-effort Reject), and the
//!   node is lost.
//! - **Liveness**: any frame from the agent counts. No frame for
//!   [`CoordinatorConfig::heartbeat_misses`] heartbeat intervals, or the
//!   connection closing or failing, makes the node lost at once; a running
//!   epoch that includes it aborts ([`crate::epoch::Event::Lost`]).
//!
//! # Epochs
//!
//! [`Coordinator::checkpoint`] starts an epoch over a set of connected nodes
//! and resolves with its [`Outcome`]. Epoch deadlines are enforced by the
//! actor sleeping until the earliest [`crate::epoch::Epoch::next_deadline`]
//! and feeding [`crate::epoch::Event::Tick`]. A manifest is committed by a
//! [`ManifestWriter`] on tokio's blocking pool.
//!
//! With a [`StoreWriter`] the epochs go into the [`crate::store::ImageStore`]:
//! [`Coordinator::checkpoint_job`] takes the number and directory from the
//! store, and the manifest rename of [`crate::commit::PendingEpoch::commit`]
//! is the commit point.
//!
//! # Restart
//!
//! [`Coordinator::restart`] places each node image of a committed epoch on
//! a live agent (the same node or another) and drives [`restart`]'s state
//! machine in the same actor: RESTORE_TREE to every target, RESUME only once
//! every one is RESTORED (each holds its trees frozen meanwhile), ABORT to
//! all (each kills what it restored) on any FAIL, timeout or lost agent. A
//! job runs an epoch or a restart, never both at once.
//!
//! [`auth::handshake_server`]: ckpt_protocol::auth::handshake_server

mod actor;
mod addresses;
mod control;
pub mod registry;
pub mod remote_spawn;
mod restart;
mod session;
pub mod sim;
mod store_writer;
pub mod wire;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ckpt_protocol::auth::{NodeExpectation, ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT};
use ckpt_protocol::cluster::{DEFAULT_HEARTBEAT_INTERVAL, MAX_FRAME};
use ckpt_protocol::manifest::{CheckpointMode, Key};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot};

use crate::epoch::{Deadlines, EpochError, Outcome};
use crate::store::StoreError;

use actor::{Inbound, Request};

pub use addresses::{AddressError, Addresses};
pub use control::ControlServer;
pub use restart::{
    RestartError, RestartOutcome, RestartPhase, RestartRequest, RestartTimeouts, RestartedNode,
};
pub use store_writer::{BegunEpoch, StoreWriter};
pub use writer::{CommittedEpoch, ManifestWriter, MemoryWriter};

/// How the coordinator serves agents.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The coordinator's name, shown to agents in the handshake.
    pub name: String,
    /// Which node names may connect.
    pub expect: NodeExpectation,
    /// Proposed to every agent; both sides send a heartbeat this often when
    /// otherwise idle.
    pub heartbeat_interval: Duration,
    /// A node is lost after this many intervals without any frame from it.
    pub heartbeat_misses: u32,
    /// Limit for a connection's whole handshake.
    pub handshake_timeout: Duration,
    /// Frames waiting to be written to one agent; a full queue drops it.
    pub queue_depth: usize,
    /// Limit for writing one frame to an agent.
    pub write_timeout: Duration,
    /// Cap on one frame from an authenticated agent.
    pub max_frame: usize,
    /// Events waiting for the coordinator task (backpressure onto the
    /// session tasks, hence onto the sockets, when it falls behind).
    pub inbox_depth: usize,
    /// Job-stable addresses (`job_network`); None: agents are told there
    /// is no job network.
    pub addresses: Option<Arc<Addresses>>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            name: "ckpt-coordinator".into(),
            expect: NodeExpectation::Any,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_misses: 3,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            queue_depth: 64,
            write_timeout: Duration::from_secs(10),
            max_frame: MAX_FRAME,
            inbox_depth: 8192,
            addresses: None,
        }
    }
}

impl CoordinatorConfig {
    fn server_config(&self) -> ServerConfig {
        let mut cfg = ServerConfig::new(self.name.clone(), self.expect.clone());
        cfg.heartbeat_interval = self.heartbeat_interval;
        cfg.timeout = self.handshake_timeout;
        cfg
    }

    /// How long a node may stay silent before it is lost.
    pub fn liveness_timeout(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.heartbeat_misses)
    }

    fn check(&self) -> Result<(), StartError> {
        let bad = |what: &'static str| Err(StartError::Config { what });
        if self.heartbeat_interval.is_zero()
            || self.heartbeat_interval.as_millis() > u32::MAX as u128
        {
            return bad("heartbeat_interval must be between 1 ms and u32::MAX ms");
        }
        if self.heartbeat_misses == 0 {
            return bad("heartbeat_misses must be at least 1");
        }
        if self.queue_depth == 0 || self.inbox_depth == 0 {
            return bad("queue_depth and inbox_depth must be at least 1");
        }
        if self.handshake_timeout.is_zero() || self.write_timeout.is_zero() {
            return bad("handshake_timeout and write_timeout must not be zero");
        }
        if self.max_frame < 1024 {
            return bad("max_frame must be at least 1024 bytes");
        }
        Ok(())
    }
}

/// Why the coordinator did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the coordinator: {what}")]
    Config { what: &'static str },
    #[error("cannot start the coordinator: the listener has no local address: {0}")]
    Listener(io::Error),
}

/// One epoch to run.
#[derive(Debug, Clone)]
pub struct CheckpointRequest {
    pub job: String,
    /// Must be above every epoch number this coordinator ran for the job,
    /// so a late reply of an earlier epoch is never taken for this one.
    pub epoch: u64,
    pub mode: CheckpointMode,
    /// The job's nodes; each must have a session when the epoch starts.
    pub nodes: Vec<String>,
    pub deadlines: Deadlines,
    /// `<root>/<job>/<epoch>/` on the shared filesystem, sent in PREPARE.
    pub epoch_dir: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub command: Vec<String>,
    pub cwd: String,
}

impl CheckpointRequest {
    pub fn new(
        job: impl Into<String>,
        epoch: u64,
        mode: CheckpointMode,
        nodes: Vec<String>,
        deadlines: Deadlines,
    ) -> Self {
        CheckpointRequest {
            job: job.into(),
            epoch,
            mode,
            nodes,
            deadlines,
            epoch_dir: String::new(),
            owner_uid: 0,
            owner_gid: 0,
            command: Vec::new(),
            cwd: String::new(),
        }
    }
}

/// Most nodes named in a [`CheckpointError::NotConnected`].
const NAMED_MISSING: usize = 10;

/// Why an epoch did not start (nothing was sent to any agent) or its
/// outcome is unknown.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot checkpoint job {job}: {reason}")]
    Roster { job: String, reason: String },
    #[error("cannot checkpoint job {job}: epoch {running} is still running")]
    Busy { job: String, running: u64 },
    #[error(
        "cannot checkpoint job {job} as epoch {epoch}: epoch numbers must grow, and {last} was \
         already used"
    )]
    StaleEpoch { job: String, epoch: u64, last: u64 },
    #[error(
        "cannot checkpoint job {job}: {count} of its nodes have no agent connected: {}",
        named(missing, *count)
    )]
    NotConnected {
        job: String,
        /// The first few missing nodes.
        missing: Vec<String>,
        count: usize,
    },
    #[error(transparent)]
    Epoch(#[from] EpochError),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

fn named(missing: &[String], count: usize) -> String {
    let mut s = missing.join(", ");
    if count > missing.len() {
        s.push_str(&format!(" and {} more", count - missing.len()));
    }
    s
}

/// Who owns a job and how it was started (recorded in every manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOwner {
    pub uid: u32,
    pub gid: u32,
    pub command: Vec<String>,
    pub cwd: String,
}

/// Why [`Coordinator::checkpoint_job`] produced no outcome.
#[derive(Debug, thiserror::Error)]
pub enum JobCheckpointError {
    #[error("cannot checkpoint job {job}: {source}")]
    Store { job: String, source: StoreError },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// A connection refused before it became a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub peer: SocketAddr,
    pub reason: String,
    pub at: SystemTime,
}

/// Refusals kept for [`Coordinator::refusals`].
const REFUSALS_KEPT: usize = 64;

/// A connected, authenticated agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    /// The handshake's session id (in both sides' logs).
    pub session: String,
    pub peer: SocketAddr,
}

/// Handle to a running coordinator. Cheap to clone. The coordinator runs
/// until [`Coordinator::shutdown`] (or until its runtime shuts down):
/// dropping the handles does not stop it, the accept loop and the sessions
/// keep it alive.
#[derive(Debug, Clone)]
pub struct Coordinator {
    inbox: mpsc::Sender<Inbound>,
    addr: SocketAddr,
}

/// Runs blocking work (the filesystem) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io {
            op: "run",
            path: std::path::PathBuf::from("<blocking task>"),
            source: io::Error::other(e.to_string()),
        }),
    }
}

/// Binds a listening TCP socket with a backlog fit for thousands of agents
/// connecting at once.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(backlog)
}

impl Coordinator {
    /// Starts serving agents on `listener` (inside a tokio runtime).
    pub fn start(
        listener: TcpListener,
        key: Key,
        config: CoordinatorConfig,
        writer: Arc<dyn ManifestWriter>,
    ) -> Result<Coordinator, StartError> {
        Self::start_with_registry(listener, key, config, writer, BTreeMap::new(), None)
    }

    /// [`Coordinator::start`] knowing `jobs` (see [`registry::load`]); with
    /// a `state_dir`, the registry is saved there whenever it changes.
    pub fn start_with_registry(
        listener: TcpListener,
        key: Key,
        config: CoordinatorConfig,
        writer: Arc<dyn ManifestWriter>,
        jobs: BTreeMap<String, registry::JobRecord>,
        state_dir: Option<std::path::PathBuf>,
    ) -> Result<Coordinator, StartError> {
        config.check()?;
        let reg = registry::JobRegistry::new(jobs);
        let persist = state_dir.map(|dir| {
            let (ptx, prx) = tokio::sync::watch::channel(reg.snapshot());
            tokio::spawn(registry::persist_task(dir, prx));
            ptx
        });
        let addr = listener.local_addr().map_err(StartError::Listener)?;
        let (tx, rx) = mpsc::channel(config.inbox_depth);
        let shared = Arc::new(session::Shared {
            key,
            server: config.server_config(),
            config: config.clone(),
        });
        tokio::spawn(session::accept_loop(listener, shared, tx.clone()));
        tokio::spawn(actor::run(rx, tx.downgrade(), writer, reg, persist));
        tracing::info!(%addr, name = %config.name, "coordinator listening");
        Ok(Coordinator { inbox: tx, addr })
    }

    /// Where agents connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inbox.send(Inbound::Request(make(tx))).await.ok()?;
        rx.await.ok()
    }

    /// Runs one epoch of `job` over `nodes` and waits for its outcome.
    pub async fn checkpoint(
        &self,
        job: &str,
        epoch: u64,
        mode: CheckpointMode,
        nodes: Vec<String>,
        deadlines: Deadlines,
    ) -> Result<Outcome, CheckpointError> {
        self.run_epoch(CheckpointRequest::new(job, epoch, mode, nodes, deadlines))
            .await
    }

    /// [`Coordinator::checkpoint`] with every field of the request.
    pub async fn run_epoch(&self, req: CheckpointRequest) -> Result<Outcome, CheckpointError> {
        self.ask(|reply| Request::Checkpoint {
            req: Box::new(req),
            reply,
        })
        .await
        .unwrap_or(Err(CheckpointError::ShuttingDown))
    }

    /// Checkpoints `job` into the image store: the store creates the next
    /// epoch's directory ([`StoreWriter::begin`]), the epoch runs with
    /// that number and directory, the manifest is committed by `writer`
    /// (which must be the writer this coordinator was started with), and
    /// an epoch that does not commit is dropped from the store (its empty
    /// directory stays as a tombstone).
    pub async fn checkpoint_job(
        &self,
        writer: &Arc<StoreWriter>,
        job: &str,
        owner: &JobOwner,
        mode: CheckpointMode,
        nodes: Vec<String>,
        deadlines: Deadlines,
    ) -> Result<Outcome, JobCheckpointError> {
        let mut req = CheckpointRequest::new(job, 0, mode, nodes, deadlines);
        req.owner_uid = owner.uid;
        req.owner_gid = owner.gid;
        req.command = owner.command.clone();
        req.cwd = owner.cwd.clone();
        self.checkpoint_job_request(writer, req).await
    }

    /// [`Coordinator::checkpoint_job`] with every field of the request;
    /// its `epoch` and `epoch_dir` are replaced by the store's.
    pub async fn checkpoint_job_request(
        &self,
        writer: &Arc<StoreWriter>,
        mut req: CheckpointRequest,
    ) -> Result<Outcome, JobCheckpointError> {
        let (w, job, uid, gid) = (
            writer.clone(),
            req.job.clone(),
            req.owner_uid,
            req.owner_gid,
        );
        let begun = blocking(move || w.begin(&job, uid, gid))
            .await
            .map_err(|source| JobCheckpointError::Store {
                job: req.job.clone(),
                source,
            })?;
        req.epoch = begun.epoch;
        req.epoch_dir = begun.dir.display().to_string();
        let (job, epoch) = (req.job.clone(), begun.epoch);
        let result = self.run_epoch(req).await;
        let committed = matches!(&result, Ok(o) if o.committed());
        if !committed {
            let w = writer.clone();
            let (j, e) = (job.clone(), epoch);
            if let Err(err) = blocking(move || w.abort(&j, e)).await {
                tracing::warn!(job, epoch, error = %err, "cannot drop an aborted epoch from the store");
            }
        }
        Ok(result?)
    }

    /// Runs a restart as asked (see [`Coordinator::restart`]).
    pub async fn restart_epoch(&self, req: RestartRequest) -> Result<RestartOutcome, RestartError> {
        self.ask(|reply| Request::Restart {
            req: Box::new(req),
            reply,
        })
        .await
        .unwrap_or(Err(RestartError::ShuttingDown))
    }

    /// Restarts `job` from `epoch` (default: its newest committed epoch in
    /// the store) with each node image restored by the agent `placement`
    /// names (image node → agent node; the same nodes or others). Every
    /// image of the epoch must be placed, each agent takes one. Each agent
    /// verifies the manifest and its image itself and restores its trees
    /// frozen; all are resumed only once every agent reported RESTORED. On
    /// any failure, timeout or lost agent every agent is told to kill what
    /// it restored.
    pub async fn restart(
        &self,
        writer: &Arc<StoreWriter>,
        job: &str,
        epoch: Option<u64>,
        placement: BTreeMap<String, String>,
        timeouts: RestartTimeouts,
    ) -> Result<RestartOutcome, RestartError> {
        let refused = |reason: String| RestartError::Refused {
            job: job.to_owned(),
            reason,
        };
        let (w, j) = (writer.clone(), job.to_owned());
        let loaded = blocking(move || {
            let epoch = match epoch {
                Some(e) => Some(e),
                None => w.store().latest_committed(&j)?,
            };
            let Some(epoch) = epoch else {
                return Ok(None);
            };
            let m = w.store().load_manifest(&j, epoch, Some(w.key()))?;
            Ok(Some((m, w.store().epoch_dir(&j, epoch))))
        })
        .await
        .map_err(|e| refused(e.to_string()))?;
        let Some(loaded) = loaded else {
            return Err(refused(format!(
                "it has no committed epoch in {}",
                writer.store().job_dir(job).display()
            )));
        };
        let (manifest, dir) = loaded;
        let images: Vec<&str> = manifest.nodes.iter().map(|n| n.node.as_str()).collect();
        for image in &images {
            if !placement.contains_key(*image) {
                return Err(refused(format!(
                    "the placement does not say which agent restores node {image}'s image of epoch {}",
                    manifest.epoch
                )));
            }
        }
        if let Some(extra) = placement.keys().find(|k| !images.contains(&k.as_str())) {
            return Err(refused(format!(
                "epoch {} has no image of node {extra} (it has {})",
                manifest.epoch,
                images.join(", ")
            )));
        }
        self.restart_epoch(RestartRequest {
            job: job.to_owned(),
            epoch: manifest.epoch,
            epoch_dir: dir.display().to_string(),
            placement,
            timeouts,
        })
        .await
    }

    /// The nodes with a session now, sorted by name.
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        self.ask(|reply| Request::Nodes { reply })
            .await
            .unwrap_or_default()
    }

    /// One job of the registry.
    pub async fn job(&self, job: &str) -> Option<registry::JobView> {
        let job = job.to_owned();
        self.ask(|reply| Request::Job { job, reply })
            .await
            .flatten()
    }

    /// Every job of the registry, by name.
    pub async fn jobs(&self) -> Vec<registry::JobView> {
        self.ask(|reply| Request::Jobs { reply })
            .await
            .unwrap_or_default()
    }

    /// Sets `job`'s periodic checkpoints; false if the job is unknown.
    pub async fn schedule(&self, job: &str, interval: Duration, keep: u32) -> bool {
        let job = job.to_owned();
        self.ask(|reply| Request::Schedule {
            job,
            interval,
            keep,
            reply,
        })
        .await
        .unwrap_or(false)
    }

    /// The periodic checkpoints due now (each is rescheduled).
    pub async fn due(&self) -> Vec<registry::DueCheckpoint> {
        self.ask(|reply| Request::Due { reply })
            .await
            .unwrap_or_default()
    }

    /// Counts a checkpoint of `job` that did not start (see
    /// [`registry::JobRegistry::failed_to_start`]).
    pub async fn checkpoint_not_started(&self, job: &str, error: String) {
        let req = Request::FailedToStart {
            job: job.to_owned(),
            error,
        };
        let _ = self.inbox.send(Inbound::Request(req)).await;
    }

    /// Registers `job` (if unknown) as owned by `uid`/`gid` on `nodes`.
    pub async fn ensure_job(&self, job: &str, uid: u32, gid: u32, nodes: Vec<String>) {
        let req = Request::Ensure {
            job: job.to_owned(),
            uid,
            gid,
            nodes,
        };
        let _ = self.inbox.send(Inbound::Request(req)).await;
    }

    /// The latest refused connections, oldest first.
    pub async fn refusals(&self) -> Vec<Refusal> {
        self.ask(|reply| Request::Refusals { reply })
            .await
            .unwrap_or_default()
    }

    /// Aborts running epochs (their callers get the `Cancelled` outcome),
    /// closes every session and stops listening.
    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| Request::Shutdown { reply }).await;
    }
}
