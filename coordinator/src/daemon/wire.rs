//! Between the wire (`ckpt.cluster.v1` frames) and the epoch state machine's
//! types: commands out, agent replies in, and a cancel-safe frame reader.

use std::sync::Arc;
use std::time::Duration;

use ckpt_protocol::async_framing::FrameError;
use ckpt_protocol::cluster::pb;
use ckpt_protocol::manifest::{CheckpointMode, Timings};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::epoch::{AgentMsg, Command, Deadlines, NodeDump};

use pb::frame::Body;

/// A whole frame (length header and body), encoded once and shared by every
/// session it is broadcast to.
pub type Framed = Arc<[u8]>;

/// Longest agent-supplied reason kept (FAIL, Reject), in bytes.
const MAX_REASON: usize = 1024;

/// Read granularity while no frame length is known yet.
const MIN_READ: usize = 512;
/// Largest buffer reservation made ahead of data actually arriving.
const MAX_RESERVE: usize = 64 * 1024;
/// An idle reader keeps at most this much buffer (thousands of sessions).
const IDLE_CAPACITY: usize = 1024;

/// Encodes `frame` with its 4-byte big-endian length header.
pub fn encode(frame: &pb::Frame) -> Framed {
    let len = frame.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    // Our own frames are small control messages, far below 4 GiB.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec only fails for lack of capacity, and it grows.
    let _ = frame.encode(&mut buf);
    buf.into()
}

/// What the agents of one epoch are told besides the command itself.
#[derive(Debug, Clone)]
pub struct EpochWire {
    pub job: String,
    pub mode: CheckpointMode,
    pub deadlines: Deadlines,
    /// `<root>/<job>/<epoch>/` on the shared filesystem.
    pub epoch_dir: String,
}

fn ms32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl EpochWire {
    /// The agent-side deadlines. `frozen_max_ms` bounds how long an agent
    /// keeps its tree frozen without hearing COMMIT or ABORT: the phases
    /// during which the coordinator may legitimately keep it frozen, plus
    /// one prepare deadline of slack, so a dead coordinator never leaves a
    /// job frozen for good.
    fn deadlines(&self) -> pb::Deadlines {
        let d = &self.deadlines;
        let mut frozen = d.prepare.saturating_add(d.dump).saturating_add(d.prepare);
        if self.mode == CheckpointMode::Stop {
            // Stop mode keeps the tree frozen until COMMITTED.
            frozen = frozen
                .saturating_add(d.flush)
                .saturating_add(d.commit)
                .saturating_add(d.finish);
        }
        pb::Deadlines {
            prepare_ms: ms32(d.prepare),
            dump_ms: ms32(d.dump),
            frozen_max_ms: ms32(frozen),
            flush_ms: ms32(d.flush),
        }
    }

    /// The frame that carries `command` of epoch `epoch`.
    pub fn command_frame(&self, epoch: u64, command: &Command) -> pb::Frame {
        let job = self.job.clone();
        match command {
            Command::Prepare => pb::Prepare {
                job,
                epoch,
                mode: pb::CheckpointMode::from(self.mode) as i32,
                deadlines: Some(self.deadlines()),
                epoch_dir: self.epoch_dir.clone(),
            }
            .into(),
            Command::Dump => pb::Dump { job, epoch }.into(),
            Command::Commit { mode } => pb::Commit {
                job,
                epoch,
                action: match mode {
                    CheckpointMode::Continue => pb::CommitAction::Resume,
                    CheckpointMode::Stop => pb::CommitAction::Stop,
                } as i32,
            }
            .into(),
            Command::Committed { .. } => pb::EpochCommitted { job, epoch }.into(),
            Command::Abort { reason } => pb::Abort {
                job,
                epoch,
                reason: reason.clone(),
            }
            .into(),
        }
    }
}

/// An authenticated agent's frame, judged.
#[derive(Debug)]
pub enum FromAgent {
    /// Liveness only (every frame counts as liveness).
    Heartbeat,
    /// A reply about `epoch` of `job`, for the state machine.
    Epoch {
        job: String,
        epoch: u64,
        msg: AgentMsg,
    },
    /// A reply only a restart waits for (RESTORED, ABORTED).
    Restart {
        job: String,
        epoch: u64,
        msg: RestartReply,
    },
    /// Informational: logged, nothing to decide.
    Note { kind: &'static str },
    /// A job address to grant (answered by the session itself).
    Address(pb::AddressRequest),
    /// For the job registry (tree reports, heartbeat progress).
    Registry(super::registry::AgentReport),
    /// A remote spawn (`ckpt-job rsh`) to route.
    Remote(super::remote_spawn::RemoteMsg),
    /// A frame an agent must not send: the session is closed.
    Violation(String),
}

/// What an agent says that only a restart waits for. (RESUMED and FAIL
/// come as [`FromAgent::Epoch`]; the coordinator routes them to a running
/// restart of the job first.)
#[derive(Debug, Clone, PartialEq)]
pub enum RestartReply {
    Restored {
        image_node: String,
        verify_ms: f64,
        restore_ms: f64,
    },
    Aborted,
}

/// A peer-supplied text, cut and cleaned of control characters (it goes
/// into logs and abort reasons).
pub fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// A duration in milliseconds from a peer: NaN, negative or absurd values
/// become zero (it is only reported).
fn duration_ms(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::ZERO)
}

fn finite_ms(ms: f64) -> f64 {
    if ms.is_finite() && ms >= 0.0 {
        ms
    } else {
        0.0
    }
}

/// Turns a frame from the authenticated node `peer` into what the
/// coordinator acts on. A DUMPED whose image is not the peer's own, carries
/// digests or fails the manifest's checks, and a FLUSHED whose digests are
/// malformed (bad length, unsafe or repeated names), become a FAIL of that
/// node (the epoch aborts naming it). Whether FLUSHED's digests cover the
/// DUMPED image is the epoch's check.
pub fn from_agent(frame: pb::Frame, peer: &str) -> FromAgent {
    let kind = frame.kind();
    let Some(body) = frame.body else {
        return FromAgent::Violation("an empty frame".into());
    };
    let (job, epoch, msg) = match body {
        Body::AddressRequest(m) => return FromAgent::Address(m),
        Body::Heartbeat(h) => {
            return super::registry::AgentReport::progress(&h)
                .map_or(FromAgent::Heartbeat, FromAgent::Registry)
        }
        Body::TreeStarted(m) => return registry_report(super::registry::AgentReport::started(m)),
        Body::TreeExited(m) => return registry_report(super::registry::AgentReport::exited(m)),
        Body::TreeList(m) => return registry_report(super::registry::AgentReport::list(m)),
        Body::RemoteSpawn(m) => return FromAgent::Remote(super::remote_spawn::RemoteMsg::Spawn(m)),
        Body::RemoteSpawned(m) => {
            return FromAgent::Remote(super::remote_spawn::RemoteMsg::Spawned(m))
        }
        Body::Ready(m) => (m.job, m.epoch, AgentMsg::Ready),
        Body::Fail(m) => {
            let phase = pb::Phase::try_from(m.phase)
                .map(|p| p.as_str_name())
                .unwrap_or("PHASE_UNKNOWN");
            let reason = format!("{} ({phase})", clean(&m.reason));
            (m.job, m.epoch, AgentMsg::Failed { reason })
        }
        Body::Dumped(m) => {
            let msg = match m.node_image(peer) {
                Ok(image) => {
                    let t = m.timings.unwrap_or_default();
                    AgentMsg::Dumped(Box::new(NodeDump {
                        image,
                        criu_version: clean(&m.criu_version),
                        timings: Timings {
                            dump_ms: finite_ms(t.dump_ms),
                            capture_ms: finite_ms(t.capture_ms),
                            ..Timings::default()
                        },
                    }))
                }
                Err(e) => AgentMsg::Failed {
                    reason: format!("its DUMPED was refused: {e}"),
                },
            };
            (m.job, m.epoch, msg)
        }
        Body::Resumed(m) => (
            m.job,
            m.epoch,
            AgentMsg::Resumed {
                downtime: duration_ms(m.downtime_ms),
            },
        ),
        Body::Stopped(m) => (
            m.job,
            m.epoch,
            AgentMsg::Stopped {
                downtime: duration_ms(m.downtime_ms),
            },
        ),
        Body::Flushed(m) => {
            let msg = match m.file_digests(peer) {
                Ok(files) => AgentMsg::Flushed { files },
                Err(e) => AgentMsg::Failed {
                    reason: format!("its FLUSHED was refused: {e}"),
                },
            };
            (m.job, m.epoch, msg)
        }
        Body::Aborted(m) => {
            return FromAgent::Restart {
                job: m.job,
                epoch: m.epoch,
                msg: RestartReply::Aborted,
            }
        }
        Body::Restored(m) => {
            return FromAgent::Restart {
                job: m.job,
                epoch: m.epoch,
                msg: RestartReply::Restored {
                    image_node: clean(&m.image_node),
                    verify_ms: finite_ms(m.verify_ms),
                    restore_ms: finite_ms(m.restore_ms),
                },
            }
        }
        Body::Reject(r) => {
            return FromAgent::Violation(format!("the agent hung up: {}", clean(&r.reason)))
        }
        Body::Hello(_)
        | Body::Challenge(_)
        | Body::Proof(_)
        | Body::Welcome(_)
        | Body::Prepare(_)
        | Body::Dump(_)
        | Body::Commit(_)
        | Body::EpochCommitted(_)
        | Body::Abort(_)
        | Body::RestoreTree(_)
        | Body::Resume(_)
        | Body::AddressGrant(_) => {
            return FromAgent::Violation(format!("{kind} is not a message an agent sends here"))
        }
    };
    FromAgent::Epoch { job, epoch, msg }
}

fn registry_report(r: Result<super::registry::AgentReport, String>) -> FromAgent {
    r.map_or_else(FromAgent::Violation, FromAgent::Registry)
}

/// Frames read from a byte stream, in a way that may be cancelled at any
/// await (`tokio::select!`) without losing bytes: everything read is kept in
/// the buffer until a whole frame is there.
///
/// Like [`ckpt_protocol::async_framing::read_frame`], a length above the cap
/// is refused before its body is awaited, and the buffer grows with bytes
/// that arrive, not with the length a peer announces.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader::default()
    }

    /// The next whole frame already buffered, if any.
    pub fn next_frame(&mut self, max: usize) -> Result<Option<pb::Frame>, FrameError> {
        let Some(len) = self.announced(max)? else {
            return Ok(None);
        };
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = pb::Frame::decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        if self.buf.is_empty() && self.buf.capacity() > IDLE_CAPACITY {
            self.buf = Vec::new();
        }
        Ok(Some(frame?))
    }

    /// The body length of the buffered frame, once its header is in.
    fn announced(&self, max: usize) -> Result<Option<usize>, FrameError> {
        let Some(hdr) = self.buf.get(..4) else {
            return Ok(None);
        };
        let mut b = [0u8; 4];
        b.copy_from_slice(hdr);
        let len = u32::from_be_bytes(b) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Some(len))
    }

    /// Reads more bytes. Cancel-safe. The peer closing the stream is
    /// [`FrameError::Closed`] between frames, [`FrameError::Truncated`]
    /// inside one.
    pub async fn fill<R>(&mut self, r: &mut R, max: usize) -> Result<(), FrameError>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        self.reserve(max)?;
        let n = r.read_buf(&mut self.buf).await?;
        self.got(n, max)
    }

    fn reserve(&mut self, max: usize) -> Result<(), FrameError> {
        let want = match self.announced(max)? {
            Some(len) => (4 + len).saturating_sub(self.buf.len()).min(MAX_RESERVE),
            None => MIN_READ,
        };
        self.buf.reserve(want.max(MIN_READ));
        Ok(())
    }

    /// Judges a read of `n` bytes into the buffer.
    fn got(&mut self, n: usize, max: usize) -> Result<(), FrameError> {
        if n == 0 {
            if self.buf.is_empty() {
                return Err(FrameError::Closed);
            }
            let want = match self.announced(max)? {
                Some(len) => 4 + len,
                None => 4,
            };
            return Err(FrameError::Truncated {
                got: self.buf.len(),
                want,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reader_reassembles_frames_from_small_pieces() {
        let frames: Vec<pb::Frame> = (1..=20)
            .map(|seq| {
                pb::Heartbeat {
                    seq,
                    ..Default::default()
                }
                .into()
            })
            .collect();
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend_from_slice(&encode(f));
        }
        let (mut a, mut b) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut a, &bytes)
                .await
                .unwrap();
        });
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        while got.len() < frames.len() {
            match r.next_frame(1024).unwrap() {
                Some(f) => got.push(f),
                None => r.fill(&mut b, 1024).await.unwrap(),
            }
        }
        assert_eq!(got, frames);
        writer.await.unwrap();
        let err = r.fill(&mut b, 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
    }

    #[tokio::test]
    async fn reader_refuses_oversized_and_garbage_and_truncated() {
        let mut r = FrameReader::new();
        let big = (1u32 << 30).to_be_bytes();
        r.fill(&mut big.as_slice(), 1024).await.unwrap();
        assert!(matches!(
            r.next_frame(1024),
            Err(FrameError::TooLarge { .. })
        ));

        let mut r = FrameReader::new();
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 3]);
        r.fill(&mut garbage.as_slice(), 1024).await.unwrap();
        assert!(matches!(r.next_frame(1024), Err(FrameError::Decode(_))));

        let mut r = FrameReader::new();
        let mut cut = 10u32.to_be_bytes().to_vec();
        cut.push(1);
        let mut src = cut.as_slice();
        r.fill(&mut src, 1024).await.unwrap();
        assert!(r.next_frame(1024).unwrap().is_none());
        let err = r.fill(&mut src, 1024).await.unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { got: 5, want: 14 }),
            "{err}"
        );
    }

    #[test]
    fn agent_frames_are_judged() {
        let ready = pb::Frame::from(pb::Ready {
            job: "j".into(),
            epoch: 3,
            ..Default::default()
        });
        assert!(matches!(
            from_agent(ready, "n1"),
            FromAgent::Epoch {
                epoch: 3,
                msg: AgentMsg::Ready,
                ..
            }
        ));
        let prepare = pb::Frame::from(pb::Prepare::default());
        assert!(matches!(from_agent(prepare, "n1"), FromAgent::Violation(_)));
        assert!(matches!(
            from_agent(pb::Frame::default(), "n1"),
            FromAgent::Violation(_)
        ));
        // A DUMPED for another node becomes a FAIL of the sender.
        let dumped = pb::Frame::from(pb::Dumped {
            job: "j".into(),
            epoch: 3,
            image: Some(pb::NodeImage {
                node: "n2".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        match from_agent(dumped, "n1") {
            FromAgent::Epoch {
                msg: AgentMsg::Failed { reason },
                ..
            } => assert!(reason.contains("n2"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // DUMPED without digests is taken; FLUSHED brings them, checked.
        let mut image = crate::daemon::sim::fake_image("n1");
        let digests = std::mem::take(&mut image.files);
        let dumped = pb::Frame::from(pb::Dumped {
            job: "j".into(),
            epoch: 3,
            image: Some(image.clone()),
            ..Default::default()
        });
        assert!(matches!(
            from_agent(dumped, "n1"),
            FromAgent::Epoch { msg: AgentMsg::Dumped(ref d), .. } if d.image.files.is_empty()
        ));
        let mut early = image.clone();
        early.files = digests.clone();
        let dumped = pb::Frame::from(pb::Dumped {
            image: Some(early),
            ..Default::default()
        });
        match from_agent(dumped, "n1") {
            FromAgent::Epoch {
                msg: AgentMsg::Failed { reason },
                ..
            } => assert!(reason.contains("FLUSHED"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let flushed = pb::Frame::from(pb::Flushed {
            job: "j".into(),
            epoch: 3,
            files: digests.clone(),
            ..Default::default()
        });
        assert!(matches!(
            from_agent(flushed, "n1"),
            FromAgent::Epoch { msg: AgentMsg::Flushed { ref files }, .. } if files.len() == 2
        ));
        let mut bad = digests;
        bad[0].name = "../../etc/passwd".into();
        let flushed = pb::Frame::from(pb::Flushed {
            files: bad,
            ..Default::default()
        });
        match from_agent(flushed, "n1") {
            FromAgent::Epoch {
                msg: AgentMsg::Failed { reason },
                ..
            } => assert!(reason.contains("FLUSHED was refused"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let resumed = pb::Frame::from(pb::Resumed {
            downtime_ms: f64::NAN,
            ..Default::default()
        });
        assert!(matches!(
            from_agent(resumed, "n1"),
            FromAgent::Epoch { msg: AgentMsg::Resumed { downtime }, .. } if downtime.is_zero()
        ));
        let restored = pb::Frame::from(pb::Restored {
            job: "j".into(),
            epoch: 3,
            image_node: "n2".into(),
            verify_ms: f64::INFINITY,
            restore_ms: 5.0,
        });
        assert!(matches!(
            from_agent(restored, "n1"),
            FromAgent::Restart {
                epoch: 3,
                msg: RestartReply::Restored { ref image_node, verify_ms, .. },
                ..
            } if image_node == "n2" && verify_ms == 0.0
        ));
        assert!(matches!(
            from_agent(pb::Frame::from(pb::Aborted::default()), "n1"),
            FromAgent::Restart {
                msg: RestartReply::Aborted,
                ..
            }
        ));
        assert_eq!(clean("a\nb"), "a b");
        assert!(clean(&"é".repeat(2000)).len() <= MAX_REASON + 3);
    }
}
