//! A simulated agent for tests and benchmarks: a real TCP client that does
//! the handshake and answers the epoch protocol without CRIU, with
//! scriptable faults.
//!
//! PREPARE → READY, DUMP → DUMPED (a fake one-tree image, no digests) and
//! at once FLUSHED (its two file digests: the sim's flush is instant),
//! COMMIT(resume) → RESUMED, COMMIT(stop) → nothing, EPOCH_COMMITTED →
//! STOPPED (stop mode), ABORT → ABORTED. A heartbeat goes
//! out when nothing else was sent for the interval the coordinator chose.
//!
//! Benchmarks run thousands of these next to the coordinator on the same
//! cores, so each reply is encoded into one reused buffer and written with
//! one `write` (what a careful real agent does too); the protocol work per
//! message is the full one: every frame is decoded, judged and answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckpt_protocol::auth::{handshake_client, AuthError, ClientConfig, Session};
use ckpt_protocol::cluster::{pb, MAX_FRAME};
use ckpt_protocol::manifest::{CheckpointMode, Key};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::wire::FrameReader;

use pb::frame::Body;

/// The coordinator message at which a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    Dump,
    /// Right after DUMPED went out, instead of FLUSHED.
    Flush,
    Commit,
    Committed,
}

/// How a simulated agent misbehaves at its [`Step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer FAIL with this reason.
    Fail(String),
    /// Close the connection instead of answering.
    Drop,
    /// Never answer again; heartbeats go on (only a deadline catches it).
    Silent,
    /// Never send anything again, heartbeats included, with the connection
    /// left open (the liveness timeout catches it).
    Freeze,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub node: String,
    pub key: Key,
    pub fault: Option<(Step, Fault)>,
    pub criu_version: String,
    /// Send heartbeats (on by default).
    pub heartbeats: bool,
    pub handshake_timeout: Duration,
}

impl SimConfig {
    pub fn new(node: impl Into<String>, key: Key) -> Self {
        SimConfig {
            node: node.into(),
            key,
            fault: None,
            criu_version: "4.1.1".into(),
            heartbeats: true,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    pub fn with_fault(mut self, step: Step, fault: Fault) -> Self {
        self.fault = Some((step, fault));
        self
    }
}

/// What a simulated agent received, and how it ended.
#[derive(Debug, Default)]
pub struct SimStats {
    pub prepares: AtomicU32,
    pub dumps: AtomicU32,
    pub commits: AtomicU32,
    pub committed: AtomicU32,
    pub aborts: AtomicU32,
    pub closed: AtomicBool,
    /// Why it ended (once `closed`).
    pub end: Mutex<Option<String>>,
}

impl SimStats {
    pub fn get(counter: &AtomicU32) -> u32 {
        counter.load(Ordering::Relaxed)
    }

    pub fn end(&self) -> Option<String> {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulated agent {node}: cannot connect to {addr}: {source}")]
    Connect {
        node: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("simulated agent {node}: {source}")]
    Handshake { node: String, source: AuthError },
}

/// A connected simulated agent. Dropping it drops its connection.
#[derive(Debug)]
pub struct SimAgent {
    pub node: String,
    pub session: Session,
    pub stats: Arc<SimStats>,
    task: JoinHandle<()>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimAgent {
    /// Connects, authenticates, and starts answering in a task of the
    /// current runtime.
    pub async fn connect(addr: SocketAddr, cfg: SimConfig) -> Result<SimAgent, SimError> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| SimError::Connect {
                node: cfg.node.clone(),
                addr,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let mut client = ClientConfig::new(cfg.node.clone());
        client.timeout = cfg.handshake_timeout;
        let session = handshake_client(&mut stream, &cfg.key, &client)
            .await
            .map_err(|source| SimError::Handshake {
                node: cfg.node.clone(),
                source,
            })?;
        let stats = Arc::new(SimStats::default());
        let node = cfg.node.clone();
        let mut image = fake_image(&cfg.node);
        let files = std::mem::take(&mut image.files);
        let agent = Agent {
            flushed: pb::Flushed {
                files,
                bytes: 8192,
                ..Default::default()
            }
            .into(),
            dumped: pb::Dumped {
                image: Some(image),
                timings: Some(pb::NodeTimings {
                    dump_ms: 1.0,
                    ..Default::default()
                }),
                criu_version: cfg.criu_version.clone(),
                ..Default::default()
            }
            .into(),
            out: Vec::new(),
            last_sent: Instant::now(),
            cfg,
            stream,
            stats: stats.clone(),
            interval: session.heartbeat_interval,
            mode: CheckpointMode::Continue,
            frozen_at: None,
            silent: false,
            frozen: false,
        };
        let task = tokio::spawn(agent.run());
        Ok(SimAgent {
            node,
            session,
            stats,
            task,
        })
    }

    /// Drops the connection now.
    pub fn kill(&self) {
        self.task.abort();
    }
}

/// A node image that passes the manifest's checks: one tree, a meta pack
/// and a page image, each with a digest (DUMPED sends it without the
/// digests, FLUSHED sends them).
pub fn fake_image(node: &str) -> pb::NodeImage {
    let meta = format!("{node}.t0.meta.pack");
    let pages = format!("{node}.t0.pages-1.img");
    let digest = |name: &str| pb::FileDigest {
        name: name.to_owned(),
        size: 4096,
        blake3: blake3::hash(name.as_bytes()).as_bytes().to_vec(),
    };
    pb::NodeImage {
        node: node.to_owned(),
        ranks: vec![0],
        drained: Vec::new(),
        trees: vec![pb::TreeImage {
            id: 0,
            root_pid: 100,
            meta_pack: meta.clone(),
            pages: vec![pages.clone()],
            ..Default::default()
        }],
        files: vec![digest(&meta), digest(&pages)],
    }
}

struct Agent {
    cfg: SimConfig,
    stream: TcpStream,
    stats: Arc<SimStats>,
    /// The DUMPED frame (this node's image); only job and epoch change.
    dumped: pb::Frame,
    /// The FLUSHED frame (the image's digests); only job and epoch change.
    flushed: pb::Frame,
    /// Frames encoded for the next write.
    out: Vec<u8>,
    last_sent: Instant,
    interval: Duration,
    mode: CheckpointMode,
    frozen_at: Option<Instant>,
    silent: bool,
    frozen: bool,
}

/// Appends `frame` with its 4-byte big-endian length header to `out`.
fn push_frame(out: &mut Vec<u8>, frame: &pb::Frame) {
    let len = frame.encoded_len();
    out.reserve(4 + len);
    // Our own frames are small control messages, far below 4 GiB.
    out.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec only fails for lack of capacity, and it grows.
    let _ = frame.encode(out);
}

fn ms_since(t: Option<Instant>) -> f64 {
    t.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3)
}

impl Agent {
    async fn run(mut self) {
        let reason = self.serve().await;
        *self.stats.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.stats.closed.store(true, Ordering::Relaxed);
    }

    async fn serve(&mut self) -> String {
        let mut reader = FrameReader::new();
        let mut heartbeat = tokio::time::interval(self.interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = heartbeat.tick(), if self.cfg.heartbeats && !self.frozen => {
                    // Any frame is liveness: only an idle agent needs one,
                    // an interval after its last frame.
                    if self.last_sent.elapsed() < self.interval {
                        let due = self.last_sent + self.interval;
                        heartbeat.reset_at(tokio::time::Instant::from_std(due));
                        continue;
                    }
                    seq += 1;
                    let hb = pb::Frame::from(pb::Heartbeat { seq, ..Default::default() });
                    if let Err(e) = self.send(&hb).await {
                        return e;
                    }
                }
                filled = reader.fill(&mut self.stream, MAX_FRAME) => {
                    if let Err(e) = filled {
                        return format!("connection ended: {e}");
                    }
                    loop {
                        match reader.next_frame(MAX_FRAME) {
                            Ok(Some(frame)) => {
                                if let Err(e) = self.on_frame(frame).await {
                                    return e;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return format!("bad frame from the coordinator: {e}"),
                        }
                    }
                }
            }
        }
    }

    /// Appends `frame`, length-prefixed, to the next write.
    fn push(&mut self, frame: &pb::Frame) {
        push_frame(&mut self.out, frame);
    }

    /// Writes what was pushed.
    async fn flush(&mut self) -> Result<(), String> {
        let result = self.stream.write_all(&self.out).await;
        self.out.clear();
        self.last_sent = Instant::now();
        result.map_err(|e| format!("write failed: {e}"))
    }

    async fn send(&mut self, frame: &pb::Frame) -> Result<(), String> {
        self.push(frame);
        self.flush().await
    }

    /// Applies the fault at `step`, if any; true if the agent answers.
    async fn fault_at(&mut self, step: Step, job: &str, epoch: u64) -> Result<bool, String> {
        if self.silent {
            return Ok(false);
        }
        let fault = match &self.cfg.fault {
            Some((s, f)) if *s == step => f.clone(),
            _ => return Ok(true),
        };
        match fault {
            Fault::Fail(reason) => {
                let phase = match step {
                    Step::Prepare => pb::Phase::Prepare,
                    Step::Dump => pb::Phase::Dump,
                    Step::Flush => pb::Phase::Flush,
                    Step::Commit | Step::Committed => pb::Phase::Commit,
                };
                let fail = pb::Fail {
                    job: job.to_owned(),
                    epoch,
                    phase: phase as i32,
                    reason,
                };
                self.send(&fail.into()).await?;
                Ok(false)
            }
            Fault::Drop => Err(format!("dropped the connection at {step:?} (fault)")),
            Fault::Silent => {
                self.silent = true;
                Ok(false)
            }
            Fault::Freeze => {
                self.silent = true;
                self.frozen = true;
                Ok(false)
            }
        }
    }

    async fn on_frame(&mut self, frame: pb::Frame) -> Result<(), String> {
        let kind = frame.kind();
        let Some(body) = frame.body else {
            return Err("empty frame from the coordinator".into());
        };
        let st = self.stats.clone();
        match body {
            Body::Heartbeat(_) => {}
            Body::Prepare(p) => {
                st.prepares.fetch_add(1, Ordering::Relaxed);
                self.frozen_at = Some(Instant::now());
                self.mode = p
                    .checkpoint_mode("coordinator")
                    .map_err(|e| e.to_string())?;
                if self.fault_at(Step::Prepare, &p.job, p.epoch).await? {
                    let ready = pb::Ready {
                        job: p.job,
                        epoch: p.epoch,
                        ..Default::default()
                    };
                    self.send(&ready.into()).await?;
                }
            }
            Body::Dump(d) => {
                st.dumps.fetch_add(1, Ordering::Relaxed);
                if self.fault_at(Step::Dump, &d.job, d.epoch).await? {
                    if let Some(Body::Dumped(m)) = &mut self.dumped.body {
                        m.job.clone_from(&d.job);
                        m.epoch = d.epoch;
                    }
                    push_frame(&mut self.out, &self.dumped);
                    // With a fault at the flush, DUMPED goes out before it
                    // strikes, as a real agent's does; otherwise DUMPED and
                    // FLUSHED share one write.
                    if matches!(self.cfg.fault, Some((Step::Flush, _))) {
                        self.flush().await?;
                    }
                    if self.fault_at(Step::Flush, &d.job, d.epoch).await? {
                        if let Some(Body::Flushed(m)) = &mut self.flushed.body {
                            m.job = d.job;
                            m.epoch = d.epoch;
                        }
                        push_frame(&mut self.out, &self.flushed);
                        self.flush().await?;
                    }
                }
            }
            Body::Commit(c) => {
                st.commits.fetch_add(1, Ordering::Relaxed);
                if self.fault_at(Step::Commit, &c.job, c.epoch).await?
                    && c.action == pb::CommitAction::Resume as i32
                {
                    let resumed = pb::Resumed {
                        job: c.job,
                        epoch: c.epoch,
                        downtime_ms: ms_since(self.frozen_at.take()),
                    };
                    self.send(&resumed.into()).await?;
                }
            }
            Body::EpochCommitted(c) => {
                st.committed.fetch_add(1, Ordering::Relaxed);
                if self.fault_at(Step::Committed, &c.job, c.epoch).await?
                    && self.mode == CheckpointMode::Stop
                {
                    let stopped = pb::Stopped {
                        job: c.job,
                        epoch: c.epoch,
                        downtime_ms: ms_since(self.frozen_at.take()),
                    };
                    self.send(&stopped.into()).await?;
                }
            }
            Body::Abort(a) => {
                st.aborts.fetch_add(1, Ordering::Relaxed);
                self.frozen_at = None;
                if !self.silent {
                    let aborted = pb::Aborted {
                        job: a.job,
                        epoch: a.epoch,
                    };
                    self.send(&aborted.into()).await?;
                }
            }
            Body::Reject(r) => return Err(format!("rejected by the coordinator: {}", r.reason)),
            _ => return Err(format!("unexpected {kind} from the coordinator")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::{bind, Coordinator, CoordinatorConfig, MemoryWriter};
    use crate::epoch::Deadlines;

    /// A sim sends heartbeats only when idle; one must still follow its
    /// last frame within an interval, or a coordinator that allows few
    /// misses loses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_then_idle_agent_stays_alive_on_heartbeats() {
        let key = Key::from_bytes([7; 32]);
        let interval = Duration::from_millis(100);
        let cfg = CoordinatorConfig {
            heartbeat_interval: interval,
            // Lost after 200 ms without a frame.
            heartbeat_misses: 2,
            handshake_timeout: Duration::from_secs(2),
            ..CoordinatorConfig::default()
        };
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let writer = Arc::new(MemoryWriter::new());
        let c = Coordinator::start(listener, key.clone(), cfg, writer).unwrap();
        let sim = SimAgent::connect(c.local_addr(), SimConfig::new("n1", key))
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while c.nodes().await.is_empty() {
            assert!(Instant::now() < until, "n1 never registered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Busy: frames more often than the interval, so heartbeat ticks
        // find it not idle.
        for epoch in 1..=8 {
            let o = c
                .checkpoint(
                    "job",
                    epoch,
                    CheckpointMode::Continue,
                    vec!["n1".into()],
                    Deadlines::default(),
                )
                .await
                .unwrap();
            assert!(o.committed(), "{:?}", o.verdict);
            tokio::time::sleep(interval / 3).await;
        }
        // Idle for many liveness timeouts: heartbeats alone keep it.
        tokio::time::sleep(interval * 10).await;
        let nodes = c.nodes().await;
        assert_eq!(nodes.len(), 1, "n1 was lost: {:?}", sim.stats.end());
        assert!(
            !sim.stats.closed.load(Ordering::Relaxed),
            "{:?}",
            sim.stats.end()
        );
        c.shutdown().await;
    }
}
