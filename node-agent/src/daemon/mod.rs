//! The node agent daemon's core: a connection to the coordinator, the
//! trees this node runs, and the epoch protocol over them.
//!
//! ```text
//!  AgentDaemon ── spawn_tree ──► Registry (trees, freezers, pumps, reapers)
//!       │                             ▲
//!  session task: connect, handshake,  │ freeze / CRIU / flush / kill
//!  heartbeats, liveness, reconnect ───┼─► one task per job (epoch.rs) ──► spawn_blocking (ops.rs)
//!       ▲                             │            │
//!       └──── outbound frames (one queue per connection, in order) ◄──┘
//! ```
//!
//! Fail closed: when the connection is lost (closed, broken, or silent for
//! `heartbeat_misses` intervals) every job task is told, and a job whose
//! trees are frozen thaws them. A job task also thaws on its own once the
//! `frozen_max` of the PREPARE has passed. The agent then reconnects with
//! exponential backoff; the coordinator aborts the epoch it lost us in.

mod control;
mod epoch;
mod net;
mod ops;
mod remote;
mod report;
mod restore;
mod trees;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ckpt_protocol::async_framing::{read_frame, write_frame_timeout};
use ckpt_protocol::auth::{handshake_client, ClientConfig, DEFAULT_HANDSHAKE_TIMEOUT};
use ckpt_protocol::cluster::{pb, MAX_FRAME};
use ckpt_protocol::manifest::Key;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::criu::Criu;

use epoch::{Cmd, Status};
use trees::{lock, Registry};

pub use control::ControlServer;
pub use trees::{RestoredFrom, SpawnError, TreeArgs, TreeId, TreeInfo, TreeState};

use pb::frame::Body;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name (authenticated in the handshake).
    pub node: String,
    pub coordinator: SocketAddr,
    /// The cluster key.
    pub key: Key,
    pub criu: Criu,
    /// The `ckpt-init` binary each tree runs as its PID 1.
    pub init_binary: PathBuf,
    /// Root's private directory for the trees' init dirs.
    pub state_dir: PathBuf,
    /// Longest wait for a tree's cgroup to freeze.
    pub freeze_timeout: Duration,
    /// Backoff between connection attempts: first and largest.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub handshake_timeout: Duration,
    /// The coordinator is lost after this many heartbeat intervals without
    /// any frame from it.
    pub heartbeat_misses: u32,
    /// Limit for writing one frame to the coordinator.
    pub write_timeout: Duration,
}

impl AgentConfig {
    pub fn new(
        node: impl Into<String>,
        coordinator: SocketAddr,
        key: Key,
        criu: Criu,
        init_binary: PathBuf,
        state_dir: PathBuf,
    ) -> Self {
        AgentConfig {
            node: node.into(),
            coordinator,
            key,
            criu,
            init_binary,
            state_dir,
            freeze_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            heartbeat_misses: 3,
            write_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("starting the agent of node {node}: {what}")]
    Start { node: String, what: String },
}

/// What the session, the job tasks and the API handle share.
pub(crate) struct Shared {
    cfg: AgentConfig,
    criu: Criu,
    criu_version: String,
    registry: Registry,
    /// The current connection's outbound queue, if connected.
    out: Mutex<Option<mpsc::UnboundedSender<pb::Frame>>>,
    status: Mutex<Status>,
    connected: AtomicBool,
    /// Remote spawns (`ckpt-job rsh`) waiting for an answer.
    remote: remote::Remote,
    /// Job-network address requests and this node's part of the network.
    net: net::NetState,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.cfg.node)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Queues `frame` for the coordinator; dropped if not connected (the
    /// coordinator then aborts the epoch that waits for it).
    fn send(&self, frame: pb::Frame) {
        let kind = frame.kind();
        let sent = lock(&self.out)
            .as_ref()
            .is_some_and(|tx| tx.send(frame).is_ok());
        if !sent {
            tracing::debug!(node = %self.cfg.node, kind, "not connected: frame dropped");
        }
    }
}

/// A running agent. Dropping it stops the connection; frozen trees are
/// thawed by their job tasks.
#[derive(Debug)]
pub struct AgentDaemon {
    shared: Arc<Shared>,
    stop: Arc<Notify>,
    task: Option<JoinHandle<()>>,
}

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

impl AgentDaemon {
    /// Makes this process the child subreaper and starts connecting to the
    /// coordinator (inside a tokio runtime).
    pub fn start(cfg: AgentConfig) -> Result<AgentDaemon, AgentError> {
        let start_err = |what: String| AgentError::Start {
            node: cfg.node.clone(),
            what,
        };
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            return Err(start_err(format!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                std::io::Error::last_os_error()
            )));
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| start_err(format!("creating {}: {e}", cfg.state_dir.display())))?;
        let criu_version = cfg
            .criu
            .version()
            .map(|v| v.to_string())
            .map_err(|e| start_err(format!("asking CRIU for its version: {e}")))?;
        let shared = Arc::new(Shared {
            criu: cfg.criu.clone(),
            criu_version,
            registry: Registry::new(&cfg.node, cfg.init_binary.clone(), cfg.state_dir.clone()),
            out: Mutex::new(None),
            status: Mutex::new(Status::default()),
            connected: AtomicBool::new(false),
            remote: remote::Remote::default(),
            net: net::NetState::default(),
            cfg,
        });
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(run(shared.clone(), stop.clone()));
        Ok(AgentDaemon {
            shared,
            stop,
            task: Some(task),
        })
    }

    pub fn node(&self) -> &str {
        &self.shared.cfg.node
    }

    /// Starts a tree of `job` on this node (blocking for the clone/exec).
    pub fn spawn_tree(&self, job: &str, args: &TreeArgs) -> Result<TreeId, SpawnError> {
        self.shared.registry.spawn(job, args)
    }

    pub fn tree(&self, id: TreeId) -> Option<TreeInfo> {
        self.shared.registry.get(id).map(|t| t.info())
    }

    /// Every tree this agent started, by id.
    pub fn trees(&self) -> Vec<TreeInfo> {
        self.shared
            .registry
            .all()
            .iter()
            .map(|t| t.info())
            .collect()
    }

    /// Whether a session with the coordinator is up.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Drops the connection and stops reconnecting; job tasks thaw any
    /// frozen tree. Trees keep running.
    pub async fn shutdown(mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// How a connection attempt ended.
enum SessionEnd {
    /// Never authenticated.
    Failed(String),
    /// Was a session, then ended.
    Ended(String),
}

async fn run(shared: Arc<Shared>, stop: Arc<Notify>) {
    let mut jobs: HashMap<String, mpsc::UnboundedSender<Cmd>> = HashMap::new();
    let mut backoff = shared.cfg.reconnect_min;
    loop {
        let end = tokio::select! {
            end = session(&shared, &mut jobs) => Some(end),
            () = stop.notified() => None,
        };
        shared.connected.store(false, Ordering::SeqCst);
        *lock(&shared.out) = None;
        for tx in jobs.values() {
            let _ = tx.send(Cmd::Lost);
        }
        let node = &shared.cfg.node;
        match end {
            None => {
                tracing::info!(%node, "agent stopping");
                return;
            }
            Some(SessionEnd::Ended(reason)) => {
                tracing::warn!(%node, %reason, "lost the coordinator; reconnecting");
                backoff = shared.cfg.reconnect_min;
            }
            Some(SessionEnd::Failed(reason)) => {
                tracing::warn!(%node, %reason, retry_ms = backoff.as_millis() as u64, "cannot reach the coordinator");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.notified() => return,
        }
        backoff = (backoff * 2).min(shared.cfg.reconnect_max);
    }
}

async fn session(
    shared: &Arc<Shared>,
    jobs: &mut HashMap<String, mpsc::UnboundedSender<Cmd>>,
) -> SessionEnd {
    let cfg = &shared.cfg;
    let connect = tokio::time::timeout(cfg.handshake_timeout, TcpStream::connect(cfg.coordinator));
    let mut stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return SessionEnd::Failed(format!("connect {}: {e}", cfg.coordinator)),
        Err(_) => return SessionEnd::Failed(format!("connect {}: timed out", cfg.coordinator)),
    };
    let _ = stream.set_nodelay(true);
    let mut client = ClientConfig::new(cfg.node.clone());
    client.timeout = cfg.handshake_timeout;
    let sess = match handshake_client(&mut stream, &cfg.key, &client).await {
        Ok(s) => s,
        Err(e) => return SessionEnd::Failed(e.to_string()),
    };
    tracing::info!(node = %cfg.node, coordinator = %sess.peer, session = %sess.id, "connected");
    let (mut rd, mut wr) = stream.into_split();
    // Reading in its own task keeps the select below cancel-safe.
    let (in_tx, mut in_rx) = mpsc::channel::<Result<pb::Frame, String>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame::<_, pb::Frame>(&mut rd, MAX_FRAME)
                .await
                .map_err(|e| e.to_string());
            let end = r.is_err();
            if in_tx.send(r).await.is_err() || end {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let mut reporter = report::Reporter::default();
    let _ = out_tx.send(reporter.full(&shared.registry));
    *lock(&shared.out) = Some(out_tx.clone());
    shared.connected.store(true, Ordering::SeqCst);
    let interval = sess.heartbeat_interval;
    let liveness = interval.saturating_mul(cfg.heartbeat_misses.max(1));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    let mut seq = 0u64;
    let end = loop {
        let frame = tokio::select! {
            _ = tick.tick() => {
                if last_heard.elapsed() > liveness {
                    break format!("nothing from the coordinator for {} ms", liveness.as_millis());
                }
                for f in reporter.changes(&shared.registry) {
                    let _ = out_tx.send(f);
                }
                seq += 1;
                heartbeat(shared, seq)
            }
            () = shared.registry.changed.notified() => {
                for f in reporter.changes(&shared.registry) {
                    let _ = out_tx.send(f);
                }
                continue;
            }
            got = in_rx.recv() => match got {
                Some(Ok(frame)) => {
                    last_heard = tokio::time::Instant::now();
                    if let Err(reason) = dispatch(shared, jobs, frame) {
                        break reason;
                    }
                    continue;
                }
                Some(Err(e)) => break format!("reading from the coordinator: {e}"),
                None => break "the reader ended".to_owned(),
            },
            out = out_rx.recv() => match out {
                Some(f) => f,
                None => break "outbound queue closed".to_owned(),
            },
        };
        if let Err(e) = write_frame_timeout(&mut wr, &frame, cfg.write_timeout).await {
            break format!("writing {} to the coordinator: {e}", frame.kind());
        }
    };
    reader.abort();
    SessionEnd::Ended(end)
}

fn heartbeat(shared: &Shared, seq: u64) -> pb::Frame {
    let st = lock(&shared.status).clone();
    pb::Heartbeat {
        seq,
        sent_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        job: st.job,
        epoch: st.epoch,
        phase: st.phase,
        bytes_done: st.progress.get().0,
        bytes_total: st.progress.get().1,
    }
    .into()
}

/// Hands a coordinator frame to its job's task. `Err` ends the session.
fn dispatch(
    shared: &Arc<Shared>,
    jobs: &mut HashMap<String, mpsc::UnboundedSender<Cmd>>,
    frame: pb::Frame,
) -> Result<(), String> {
    let kind = frame.kind();
    let job = frame.job_epoch().map(|(j, e)| (j.to_owned(), e));
    let Some(body) = frame.body else {
        return Err("an empty frame from the coordinator".into());
    };
    match (body, job) {
        (Body::Heartbeat(_), _) => Ok(()),
        (Body::AddressGrant(g), _) => {
            shared.address_granted(g);
            Ok(())
        }
        (Body::Reject(r), _) => Err(format!("rejected by the coordinator: {}", r.reason)),
        (
            body @ (Body::Prepare(_)
            | Body::Dump(_)
            | Body::Commit(_)
            | Body::EpochCommitted(_)
            | Body::Abort(_)
            | Body::RestoreTree(_)
            | Body::Resume(_)),
            Some((job, _)),
        ) => {
            let tx = jobs.entry(job.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(epoch::run(shared.clone(), job, rx));
                tx
            });
            let _ = tx.send(Cmd::Frame(Box::new(body)));
            Ok(())
        }
        (Body::RemoteSpawn(s), _) => {
            remote::spawn_for(shared.clone(), s);
            Ok(())
        }
        (Body::RemoteSpawned(a), _) => {
            remote::answered(shared, a);
            Ok(())
        }
        _ => {
            tracing::warn!(node = %shared.cfg.node, kind, "ignoring a frame an agent does not take");
            Ok(())
        }
    }
}
