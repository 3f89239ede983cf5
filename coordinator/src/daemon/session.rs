//! One task per agent connection: the handshake, then frames in (decoded,
//! judged, forwarded to the coordinator task), its outbound queue written
//! out, heartbeats, and the liveness deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ckpt_protocol::async_framing::{write_frame_timeout, FrameError};
use ckpt_protocol::auth::{handshake_server, ServerConfig};
use ckpt_protocol::cluster::pb;
use ckpt_protocol::manifest::Key;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use super::actor::{ConnId, Inbound};
use super::wire::{self, FrameReader, Framed, FromAgent};
use super::CoordinatorConfig;

/// What every session task needs; one per coordinator.
#[derive(Debug)]
pub(crate) struct Shared {
    pub key: Key,
    pub server: ServerConfig,
    pub config: CoordinatorConfig,
}

/// How long a Reject may take before we hang up anyway.
const REJECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Back-off after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until the coordinator task is gone.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    inbox: mpsc::Sender<Inbound>,
) {
    loop {
        tokio::select! {
            _ = inbox.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Control frames are small: send each at once.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(session(stream, peer, shared.clone(), inbox.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an agent connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    tracing::debug!("accept loop stopped");
}

async fn session(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    inbox: mpsc::Sender<Inbound>,
) {
    let auth = match handshake_server(&mut stream, &shared.key, &shared.server).await {
        Ok(s) => s,
        Err(e) => {
            let _ = inbox
                .send(Inbound::Refused {
                    peer,
                    reason: e.to_string(),
                })
                .await;
            return;
        }
    };
    let conn = ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed));
    let node: Arc<str> = auth.peer.into();
    let (tx, rx) = mpsc::channel(shared.config.queue_depth);
    let (close_tx, close_rx) = oneshot::channel();
    let registered = inbox
        .send(Inbound::Register {
            conn,
            node: node.clone(),
            session: auth.id,
            peer,
            tx,
            close: close_tx,
        })
        .await;
    if registered.is_err() {
        return;
    }
    let mut s = Session {
        stream,
        node,
        conn,
        shared: &shared,
        inbox: &inbox,
    };
    let reason = s.serve(rx, close_rx).await;
    let _ = inbox.send(Inbound::Closed { conn, reason }).await;
}

struct Session<'a> {
    stream: TcpStream,
    node: Arc<str>,
    conn: ConnId,
    shared: &'a Shared,
    inbox: &'a mpsc::Sender<Inbound>,
}

impl Session<'_> {
    /// Runs until the session ends; returns why.
    async fn serve(
        &mut self,
        mut rx: mpsc::Receiver<Framed>,
        mut close_rx: oneshot::Receiver<String>,
    ) -> String {
        let cfg = &self.shared.config;
        let liveness = cfg.liveness_timeout();
        let interval = cfg.heartbeat_interval;
        let mut reader = FrameReader::new();
        let mut last_heard = Instant::now();
        let mut last_sent = Instant::now();
        let mut heartbeat_seq = 0u64;
        // Dropped without a reason: the coordinator let go of the session
        // gracefully; `rx` then yields what is queued and ends.
        let mut close_gone = false;
        // Armed for the earliest of "send a heartbeat" and "the agent is
        // lost", but re-armed only when it fires: resetting a timer on every
        // frame costs more than a spurious wake-up per interval.
        let timer = sleep_until(last_heard + interval);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                closed = &mut close_rx, if !close_gone => match closed {
                    Ok(reason) => return reason,
                    Err(_) => close_gone = true,
                },
                item = rx.recv() => match item {
                    Some(bytes) => {
                        if let Err(e) = self.write(&bytes).await {
                            return e;
                        }
                        last_sent = Instant::now();
                    }
                    None => return "the coordinator closed the session".into(),
                },
                filled = reader.fill(&mut self.stream, cfg.max_frame) => {
                    if let Err(e) = filled {
                        return self.read_failed(e).await;
                    }
                    last_heard = Instant::now();
                    if let Err(reason) = self.drain(&mut reader).await {
                        return reason;
                    }
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= last_heard + liveness {
                        return format!(
                            "no frame from the agent for {} ms ({} heartbeat intervals)",
                            liveness.as_millis(),
                            cfg.heartbeat_misses
                        );
                    }
                    if now >= last_sent + interval {
                        heartbeat_seq += 1;
                        let hb = wire::encode(&heartbeat(heartbeat_seq));
                        if let Err(e) = self.write(&hb).await {
                            return e;
                        }
                        last_sent = now;
                    }
                    timer
                        .as_mut()
                        .reset((last_heard + liveness).min(last_sent + interval));
                },
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let limit = self.shared.config.write_timeout;
        match tokio::time::timeout(limit, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("writing to the agent failed: {e}")),
            Err(_) => Err(format!(
                "the agent did not take a frame within {} ms",
                limit.as_millis()
            )),
        }
    }

    /// Hands every whole buffered frame on; `Err` ends the session.
    async fn drain(&mut self, reader: &mut FrameReader) -> Result<(), String> {
        loop {
            let frame = match reader.next_frame(self.shared.config.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.read_failed(e).await),
            };
            match wire::from_agent(frame, &self.node) {
                FromAgent::Heartbeat => {}
                FromAgent::Restart { job, epoch, msg } => {
                    let event = Inbound::Restart {
                        conn: self.conn,
                        job,
                        epoch,
                        msg,
                    };
                    if self.inbox.send(event).await.is_err() {
                        return Err("the coordinator stopped".into());
                    }
                }
                FromAgent::Registry(report) => {
                    let event = Inbound::Registry {
                        conn: self.conn,
                        report,
                    };
                    if self.inbox.send(event).await.is_err() {
                        return Err("the coordinator stopped".into());
                    }
                }
                FromAgent::Remote(msg) => {
                    let event = Inbound::Remote {
                        conn: self.conn,
                        msg,
                    };
                    if self.inbox.send(event).await.is_err() {
                        return Err("the coordinator stopped".into());
                    }
                }
                FromAgent::Address(req) => {
                    // Rare (one per tree start or restore) and a small
                    // fsynced write: answered here, not by the actor.
                    let grant = match &self.shared.config.addresses {
                        Some(a) => a.answer(&req),
                        None => super::addresses::no_network(&req),
                    };
                    self.write(&wire::encode(&grant.into())).await?;
                }
                FromAgent::Note { kind } => {
                    tracing::debug!(node = %self.node, kind, "agent note");
                }
                FromAgent::Epoch { job, epoch, msg } => {
                    let event = Inbound::Agent {
                        conn: self.conn,
                        job,
                        epoch,
                        msg,
                    };
                    if self.inbox.send(event).await.is_err() {
                        return Err("the coordinator stopped".into());
                    }
                }
                FromAgent::Violation(why) => {
                    let reason = format!("protocol violation: {why}");
                    self.reject(&reason).await;
                    return Err(reason);
                }
            }
        }
    }

    /// Why reading failed, as the session's end; a malformed frame is
    /// answered with a Reject first.
    async fn read_failed(&mut self, e: FrameError) -> String {
        match e {
            FrameError::Closed => "the agent closed the connection".into(),
            FrameError::TooLarge { .. } | FrameError::Decode(_) => {
                let reason = format!("bad frame: {e}");
                self.reject(&reason).await;
                reason
            }
            FrameError::Truncated { .. } | FrameError::Io(_) => format!("reading failed: {e}"),
        }
    }

    async fn reject(&mut self, reason: &str) {
        let reject = pb::Frame::from(pb::Reject {
            code: pb::RejectCode::Protocol as i32,
            reason: reason.to_owned(),
            min_version: 0,
            max_version: 0,
        });
        let _ = write_frame_timeout(&mut self.stream, &reject, REJECT_TIMEOUT).await;
    }
}

fn heartbeat(seq: u64) -> pb::Frame {
    let sent_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    pb::Heartbeat {
        seq,
        sent_unix_ms,
        ..Default::default()
    }
    .into()
}
