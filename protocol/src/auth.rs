//! Mutual authentication of an agent (client) and the coordinator (server)
//! with the shared cluster key, and protocol version negotiation.
//!
//! ```text
//! agent -> Hello      { node, min_version, max_version, nonce_a }
//! coord -> Challenge  { version, nonce_c, coordinator, heartbeat_ms } | Reject
//! agent -> Proof      { MAC(k, "agent"       ‖ transcript) }
//! coord -> Welcome    { MAC(k, "coordinator" ‖ transcript) }         | Reject
//! ```
//!
//! `k` is derived from the cluster key with [`blake3::derive_key`] and
//! [`HANDSHAKE_CONTEXT`], so it is independent of the manifest MAC (which
//! keys BLAKE3 with the cluster key itself: different BLAKE3 mode, different
//! key) and the cluster key never leaves the process. The transcript is
//! every field both sides saw, each length-prefixed: the agent's offered
//! range, the chosen version, the heartbeat interval, both nonces, the node
//! name and the coordinator name.
//!
//! - **Replay**: each side's MAC covers the other side's fresh 32-byte
//!   nonce, so a Proof or Welcome recorded from an earlier session never
//!   verifies again.
//! - **Reflection**: the role is inside the MAC, so a coordinator's Welcome
//!   can never pass as an agent's Proof, nor the reverse. The coordinator
//!   proves itself only after the agent did, so an unauthenticated peer gets
//!   no MAC out of the coordinator at all.
//! - **Downgrade**: the agent's offered range is in the transcript; a
//!   middle-man who narrows it makes both MACs fail.
//! - MACs are compared in constant time ([`blake3::Hash`]'s `PartialEq`).
//! - Frames are capped at [`HANDSHAKE_MAX_FRAME`] until the peer is
//!   authenticated, and the whole handshake has a deadline.
//!
//! Whichever side finds the other wanting sends a [`pb::Reject`] with the
//! reason (best effort) and returns an [`AuthError`] saying why; the caller
//! logs it and drops the connection.
//!
//! What this does not give: confidentiality or integrity of the frames
//! *after* the handshake (there is no TLS). An active middle-man on the
//! cluster network who relays the handshake could then inject frames. The
//! transcript-bound [`Session::id`] is the hook for per-frame MACs if that
//! threat matters.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::async_framing::{read_frame_timeout, write_frame_timeout, FrameError};
use crate::cluster::{pb, VersionRange, DEFAULT_HEARTBEAT_INTERVAL};
use crate::manifest::{check_name, Key};

use pb::frame::Body;
use pb::RejectCode;

/// BLAKE3 key-derivation context of the handshake key. Changing it is a
/// protocol change.
pub const HANDSHAKE_CONTEXT: &str = "ckpt 2025-01-01 cluster handshake v1";
/// Length of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Frame cap before the peer is authenticated.
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
/// Default limit for the whole handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a node or coordinator name may be.
pub const MAX_NAME_LEN: usize = 255;

/// Longest reason kept from a peer's Reject, in characters.
pub const MAX_REASON_LEN: usize = 512;

/// How long we try to deliver a Reject before dropping the connection.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The protocol version both sides speak from now on.
    pub version: u32,
    /// The authenticated peer: the node name on the coordinator, the
    /// coordinator's name on the agent.
    pub peer: String,
    /// Heartbeat interval both sides use.
    pub heartbeat_interval: Duration,
    /// 16 hex digits naming this connection in both sides' logs (a hash of
    /// both nonces; not secret).
    pub id: String,
}

/// Which nodes a coordinator accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeExpectation {
    /// Any node that proves the cluster key.
    Any,
    /// Only these node names.
    OneOf(BTreeSet<String>),
}

impl NodeExpectation {
    pub fn one_of<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        NodeExpectation::OneOf(names.into_iter().map(Into::into).collect())
    }

    fn allows(&self, node: &str) -> bool {
        match self {
            NodeExpectation::Any => true,
            NodeExpectation::OneOf(set) => set.contains(node),
        }
    }
}

/// The coordinator's side of the handshake.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The coordinator's name, shown to agents.
    pub name: String,
    pub versions: VersionRange,
    pub expect: NodeExpectation,
    pub heartbeat_interval: Duration,
    /// Limit for the whole handshake.
    pub timeout: Duration,
}

impl ServerConfig {
    pub fn new(name: impl Into<String>, expect: NodeExpectation) -> Self {
        ServerConfig {
            name: name.into(),
            versions: VersionRange::SUPPORTED,
            expect,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// The agent's side of the handshake.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This node's name.
    pub node: String,
    pub versions: VersionRange,
    /// Limit for the whole handshake.
    pub timeout: Duration,
    /// Informational software string sent in Hello.
    pub software: String,
}

impl ClientConfig {
    pub fn new(node: impl Into<String>) -> Self {
        ClientConfig {
            node: node.into(),
            versions: VersionRange::SUPPORTED,
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            software: concat!("ckpt ", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}

/// Why a handshake failed. Every variant names who failed and how, for the
/// log line that goes with dropping the connection.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("handshake failed {stage}: {source}")]
    Frame {
        stage: &'static str,
        source: FrameError,
    },
    #[error("handshake failed {stage}: expected {want}, the peer sent {got}")]
    Unexpected {
        stage: &'static str,
        want: &'static str,
        got: &'static str,
    },
    #[error("handshake failed: malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error(
        "no protocol version in common: the agent speaks {agent}, the coordinator speaks \
         {coordinator}"
    )]
    VersionMismatch {
        agent: VersionRange,
        coordinator: VersionRange,
    },
    #[error(
        "agent {node:?} failed to prove the cluster key: it holds another key, or replayed or \
         altered a handshake"
    )]
    AgentProof { node: String },
    #[error(
        "coordinator {coordinator:?} failed to prove the cluster key: it holds another key, or \
         is not a ckpt coordinator"
    )]
    CoordinatorProof { coordinator: String },
    #[error("node {node:?} proved the cluster key but is not a node this coordinator expects")]
    UnexpectedNode { node: String },
    /// The peer sent a Reject. `reason` is the peer's text, cleaned of
    /// control characters and cut to [`MAX_REASON_LEN`].
    #[error("refused by the {by}: {reason}")]
    Rejected {
        by: &'static str,
        code: RejectCode,
        reason: String,
        /// The versions the peer speaks, when it refused over versions.
        peer_versions: Option<VersionRange>,
    },
    #[error("handshake not started: {0}")]
    Config(String),
    #[error("cannot get random bytes for a nonce: {0}")]
    Random(getrandom::Error),
}

impl AuthError {
    /// What to tell the peer before hanging up, if anything. `None` when
    /// the peer is gone, already told us why, or nothing was sent yet.
    fn reject(&self, ours: VersionRange) -> Option<pb::Reject> {
        let code = match self {
            AuthError::Frame { source, .. } => match source {
                FrameError::TooLarge { .. } | FrameError::Decode(_) => RejectCode::Protocol,
                FrameError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    RejectCode::Protocol
                }
                _ => return None,
            },
            AuthError::Unexpected { .. } | AuthError::Malformed { .. } => RejectCode::Protocol,
            AuthError::VersionMismatch { .. } => RejectCode::Version,
            AuthError::AgentProof { .. } | AuthError::CoordinatorProof { .. } => RejectCode::Auth,
            AuthError::UnexpectedNode { .. } => RejectCode::UnknownNode,
            AuthError::Rejected { .. } | AuthError::Config(_) | AuthError::Random(_) => {
                return None
            }
        };
        Some(pb::Reject {
            code: code as i32,
            reason: self.to_string(),
            min_version: ours.min,
            max_version: ours.max,
        })
    }
}

/// Runs the coordinator's side of the handshake on a fresh connection.
///
/// On error a Reject has been sent where that makes sense; drop `stream`.
pub async fn handshake_server<S>(
    stream: &mut S,
    key: &Key,
    cfg: &ServerConfig,
) -> Result<Session, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    check_versions(cfg.versions)?;
    check_peer_name("coordinator name", &cfg.name).map_err(AuthError::Config)?;
    let heartbeat_ms = u32::try_from(cfg.heartbeat_interval.as_millis())
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| AuthError::Config("heartbeat interval out of range".into()))?;
    let deadline = Instant::now() + cfg.timeout;
    let result = server_steps(stream, &HandshakeKey::new(key), cfg, heartbeat_ms, deadline).await;
    if let Err(e) = &result {
        send_reject(stream, e, cfg.versions).await;
    }
    result
}

/// Runs the agent's side of the handshake on a fresh connection to the
/// coordinator.
///
/// On error a Reject has been sent where that makes sense; drop `stream`.
pub async fn handshake_client<S>(
    stream: &mut S,
    key: &Key,
    cfg: &ClientConfig,
) -> Result<Session, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    check_versions(cfg.versions)?;
    check_peer_name("node name", &cfg.node).map_err(AuthError::Config)?;
    let deadline = Instant::now() + cfg.timeout;
    let result = client_steps(stream, &HandshakeKey::new(key), cfg, deadline).await;
    if let Err(e) = &result {
        send_reject(stream, e, cfg.versions).await;
    }
    result
}

async fn server_steps<S>(
    stream: &mut S,
    key: &HandshakeKey,
    cfg: &ServerConfig,
    heartbeat_ms: u32,
    deadline: Instant,
) -> Result<Session, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    const HELLO: &str = "reading the agent's Hello";
    let hello = match recv(stream, deadline, HELLO, "agent").await? {
        Body::Hello(h) => h,
        other => return Err(unexpected(HELLO, "Hello", other)),
    };
    check_peer_name("node name", &hello.node).map_err(|reason| AuthError::Malformed {
        what: "Hello",
        reason,
    })?;
    let agent_nonce = nonce("Hello", &hello.nonce)?;
    let offered = VersionRange {
        min: hello.min_version,
        max: hello.max_version,
    };
    let version = offered
        .negotiate(cfg.versions)
        .ok_or(AuthError::VersionMismatch {
            agent: offered,
            coordinator: cfg.versions,
        })?;

    let coordinator_nonce = fresh_nonce()?;
    let challenge = pb::Challenge {
        version,
        nonce: coordinator_nonce.to_vec(),
        coordinator: cfg.name.clone(),
        heartbeat_interval_ms: heartbeat_ms,
    };
    send(stream, challenge, deadline, "sending the Challenge").await?;

    const PROOF: &str = "reading the agent's Proof";
    let proof = match recv(stream, deadline, PROOF, "agent").await? {
        Body::Proof(p) => p,
        other => return Err(unexpected(PROOF, "Proof", other)),
    };
    let transcript = Transcript {
        offered,
        version,
        heartbeat_ms,
        agent_nonce: &agent_nonce,
        coordinator_nonce: &coordinator_nonce,
        node: &hello.node,
        coordinator: &cfg.name,
    };
    if !key.verify(Role::Agent, &transcript, &proof.mac) {
        return Err(AuthError::AgentProof { node: hello.node });
    }
    if !cfg.expect.allows(&hello.node) {
        return Err(AuthError::UnexpectedNode { node: hello.node });
    }
    let welcome = pb::Welcome {
        mac: key.mac(Role::Coordinator, &transcript).as_bytes().to_vec(),
    };
    send(stream, welcome, deadline, "sending the Welcome").await?;
    Ok(transcript.session(hello.node.clone()))
}

async fn client_steps<S>(
    stream: &mut S,
    key: &HandshakeKey,
    cfg: &ClientConfig,
    deadline: Instant,
) -> Result<Session, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let agent_nonce = fresh_nonce()?;
    let hello = pb::Hello {
        node: cfg.node.clone(),
        min_version: cfg.versions.min,
        max_version: cfg.versions.max,
        nonce: agent_nonce.to_vec(),
        software: cfg.software.clone(),
    };
    send(stream, hello, deadline, "sending the Hello").await?;

    const CHALLENGE: &str = "reading the coordinator's Challenge";
    let challenge = match recv(stream, deadline, CHALLENGE, "coordinator").await? {
        Body::Challenge(c) => c,
        other => return Err(unexpected(CHALLENGE, "Challenge", other)),
    };
    let malformed = |reason: String| AuthError::Malformed {
        what: "Challenge",
        reason,
    };
    check_peer_name("coordinator name", &challenge.coordinator).map_err(malformed)?;
    let coordinator_nonce = nonce("Challenge", &challenge.nonce)?;
    if coordinator_nonce == agent_nonce {
        return Err(malformed("the coordinator echoed our nonce".into()));
    }
    if !cfg.versions.contains(challenge.version) {
        return Err(malformed(format!(
            "the coordinator chose version {}, outside the offered {}",
            challenge.version, cfg.versions
        )));
    }
    if challenge.heartbeat_interval_ms == 0 {
        return Err(malformed("heartbeat interval of 0 ms".into()));
    }
    let transcript = Transcript {
        offered: cfg.versions,
        version: challenge.version,
        heartbeat_ms: challenge.heartbeat_interval_ms,
        agent_nonce: &agent_nonce,
        coordinator_nonce: &coordinator_nonce,
        node: &cfg.node,
        coordinator: &challenge.coordinator,
    };
    let proof = pb::Proof {
        mac: key.mac(Role::Agent, &transcript).as_bytes().to_vec(),
    };
    send(stream, proof, deadline, "sending the Proof").await?;

    const WELCOME: &str = "reading the coordinator's Welcome";
    let welcome = match recv(stream, deadline, WELCOME, "coordinator").await? {
        Body::Welcome(w) => w,
        other => return Err(unexpected(WELCOME, "Welcome", other)),
    };
    if !key.verify(Role::Coordinator, &transcript, &welcome.mac) {
        return Err(AuthError::CoordinatorProof {
            coordinator: challenge.coordinator,
        });
    }
    Ok(transcript.session(challenge.coordinator.clone()))
}

#[derive(Clone, Copy)]
enum Role {
    Agent,
    Coordinator,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Agent => b"agent",
            Role::Coordinator => b"coordinator",
        }
    }
}

/// Everything both sides saw; what the MACs cover.
struct Transcript<'a> {
    offered: VersionRange,
    version: u32,
    heartbeat_ms: u32,
    agent_nonce: &'a [u8; NONCE_LEN],
    coordinator_nonce: &'a [u8; NONCE_LEN],
    node: &'a str,
    coordinator: &'a str,
}

impl Transcript<'_> {
    fn feed(&self, role: Role, h: &mut blake3::Hasher) {
        // Every variable-length field is length-prefixed, so no two
        // different transcripts hash the same bytes.
        let mut put = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        put(b"ckpt cluster handshake");
        put(role.label());
        put(&self.offered.min.to_be_bytes());
        put(&self.offered.max.to_be_bytes());
        put(&self.version.to_be_bytes());
        put(&self.heartbeat_ms.to_be_bytes());
        put(self.agent_nonce);
        put(self.coordinator_nonce);
        put(self.node.as_bytes());
        put(self.coordinator.as_bytes());
    }

    fn session(&self, peer: String) -> Session {
        let mut h = blake3::Hasher::new();
        h.update(self.agent_nonce);
        h.update(self.coordinator_nonce);
        let id = h.finalize().to_hex();
        Session {
            version: self.version,
            peer,
            heartbeat_interval: Duration::from_millis(u64::from(self.heartbeat_ms)),
            id: id[..16].to_owned(),
        }
    }
}

/// The handshake subkey of the cluster key.
struct HandshakeKey([u8; 32]);

impl HandshakeKey {
    fn new(key: &Key) -> Self {
        HandshakeKey(key.derive_subkey(HANDSHAKE_CONTEXT))
    }

    fn mac(&self, role: Role, t: &Transcript<'_>) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        t.feed(role, &mut h);
        h.finalize()
    }

    /// Constant-time check of a peer's MAC (any length but 32 fails).
    fn verify(&self, role: Role, t: &Transcript<'_>, mac: &[u8]) -> bool {
        let Ok(mac) = <[u8; 32]>::try_from(mac) else {
            return false;
        };
        // blake3::Hash's PartialEq is constant-time.
        self.mac(role, t) == blake3::Hash::from_bytes(mac)
    }
}

impl fmt::Debug for HandshakeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandshakeKey(<redacted>)")
    }
}

fn fresh_nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

fn nonce(what: &'static str, bytes: &[u8]) -> Result<[u8; NONCE_LEN], AuthError> {
    bytes.try_into().map_err(|_| AuthError::Malformed {
        what,
        reason: format!("nonce of {} bytes, not {NONCE_LEN}", bytes.len()),
    })
}

fn check_versions(v: VersionRange) -> Result<(), AuthError> {
    if v.min == 0 || v.min > v.max {
        return Err(AuthError::Config(format!(
            "bad version range {}..={}",
            v.min, v.max
        )));
    }
    Ok(())
}

/// A node or coordinator name: what a hostname may hold, nothing that could
/// walk a path or forge a log line.
fn check_peer_name(field: &'static str, name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field} of {} bytes (at most {MAX_NAME_LEN})",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("{field} {name:?} contains {c:?}"));
    }
    check_name(field, name).map_err(|e| e.to_string())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

async fn recv<S>(
    stream: &mut S,
    deadline: Instant,
    stage: &'static str,
    peer: &'static str,
) -> Result<Body, AuthError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let frame: pb::Frame = read_frame_timeout(stream, HANDSHAKE_MAX_FRAME, remaining(deadline))
        .await
        .map_err(|source| AuthError::Frame { stage, source })?;
    match frame.body {
        Some(Body::Reject(r)) => {
            let code = RejectCode::try_from(r.code).unwrap_or(RejectCode::Unspecified);
            Err(AuthError::Rejected {
                by: peer,
                code,
                reason: clean_reason(&r.reason),
                peer_versions: (code == RejectCode::Version).then_some(VersionRange {
                    min: r.min_version,
                    max: r.max_version,
                }),
            })
        }
        Some(body) => Ok(body),
        None => Err(AuthError::Unexpected {
            stage,
            want: "a handshake message",
            got: "an empty frame",
        }),
    }
}

async fn send<S, M>(
    stream: &mut S,
    msg: M,
    deadline: Instant,
    stage: &'static str,
) -> Result<(), AuthError>
where
    S: AsyncWrite + Unpin + ?Sized,
    M: Into<pb::Frame>,
{
    write_frame_timeout(stream, &msg.into(), remaining(deadline))
        .await
        .map_err(|source| AuthError::Frame { stage, source })
}

/// A peer's reason, fit for one log line.
fn clean_reason(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .take(MAX_REASON_LEN)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if reason.chars().nth(MAX_REASON_LEN).is_some() {
        out.push('…');
    }
    out
}

fn unexpected(stage: &'static str, want: &'static str, got: Body) -> AuthError {
    AuthError::Unexpected {
        stage,
        want,
        got: pb::Frame { body: Some(got) }.kind(),
    }
}

/// Best effort: tell the peer why, then close our side. Errors are moot,
/// the connection is being dropped anyway.
async fn send_reject<S>(stream: &mut S, e: &AuthError, ours: VersionRange)
where
    S: AsyncWrite + Unpin + ?Sized,
{
    if let Some(reject) = e.reject(ours) {
        let frame = pb::Frame::from(reject);
        if write_frame_timeout(stream, &frame, REJECT_WRITE_TIMEOUT)
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, stream.shutdown()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::async_framing::{read_frame, write_frame};
    use std::sync::mpsc;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};

    fn key(b: u8) -> Key {
        Key::from_bytes([b; 32])
    }

    fn server_cfg() -> ServerConfig {
        let mut cfg = ServerConfig::new("coord", NodeExpectation::Any);
        cfg.timeout = Duration::from_secs(5);
        cfg
    }

    fn range(min: u32, max: u32) -> VersionRange {
        VersionRange { min, max }
    }

    /// Runs both sides over an in-memory pipe.
    async fn pair(
        server_key: Key,
        server: ServerConfig,
        client_key: Key,
        client: ClientConfig,
    ) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let (mut c, mut s) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move { handshake_server(&mut s, &server_key, &server).await });
        let cli = handshake_client(&mut c, &client_key, &client).await;
        // Hang up as a real agent would, so a waiting server sees it.
        drop(c);
        (srv.await.unwrap(), cli)
    }

    /// Accepts connections forever, handshaking each one in its own task and
    /// reporting every outcome, as the coordinator's accept loop will.
    async fn serve(key: Key, cfg: ServerConfig) -> (u16, Outcomes) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let (key, cfg, tx) = (key.clone(), cfg.clone(), tx.clone());
                tokio::spawn(async move {
                    let r = handshake_server(&mut sock, &key, &cfg).await;
                    if let Ok(s) = &r {
                        // Prove the stream is usable after the handshake.
                        let hb: pb::Frame = read_frame(&mut sock, 1024).await.unwrap();
                        assert_eq!(hb.kind(), "Heartbeat", "session {}", s.id);
                    }
                    let _ = tx.send(r);
                });
            }
        });
        (port, Outcomes(rx))
    }

    /// Handshake results of [`serve`], in completion order.
    struct Outcomes(mpsc::Receiver<Result<Session, AuthError>>);

    impl Outcomes {
        async fn recv(&mut self) -> Option<Result<Session, AuthError>> {
            // std's channel, polled: tokio's `sync` feature is not enabled.
            loop {
                match self.0.try_recv() {
                    Ok(r) => return Some(r),
                    Err(mpsc::TryRecvError::Empty) => {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Err(mpsc::TryRecvError::Disconnected) => return None,
                }
            }
        }
    }

    #[tokio::test]
    async fn mutual_handshake_over_tcp() {
        let (port, mut results) = serve(key(1), server_cfg()).await;
        for node in ["n1", "n2"] {
            let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let client = handshake_client(&mut sock, &key(1), &ClientConfig::new(node))
                .await
                .unwrap();
            write_frame(
                &mut sock,
                &pb::Frame::from(pb::Heartbeat {
                    seq: 1,
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
            let server = results.recv().await.unwrap().unwrap();
            assert_eq!(client.peer, "coord");
            assert_eq!(server.peer, node);
            assert_eq!(client.version, 1);
            assert_eq!(server.version, 1);
            assert_eq!(client.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
            assert_eq!(client.id, server.id);
            assert_eq!(client.id.len(), 16);
        }
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_ends() {
        // Whichever side holds the "wrong" key, the coordinator finds the
        // agent's proof bad; the agent hears why.
        for (server_key, client_key) in [(key(1), key(2)), (key(2), key(1))] {
            let (srv, cli) = pair(
                server_key,
                server_cfg(),
                client_key,
                ClientConfig::new("n1"),
            )
            .await;
            let srv = srv.unwrap_err();
            assert!(
                matches!(&srv, AuthError::AgentProof { node } if node == "n1"),
                "{srv}"
            );
            assert!(
                srv.to_string().contains("failed to prove the cluster key"),
                "{srv}"
            );
            let cli = cli.unwrap_err();
            assert!(
                matches!(
                    &cli,
                    AuthError::Rejected {
                        by: "coordinator",
                        code: RejectCode::Auth,
                        ..
                    }
                ),
                "{cli}"
            );
            assert!(cli.to_string().contains("cluster key"), "{cli}");
        }
    }

    /// A fake coordinator that does not know the key: it accepts any proof
    /// and answers with a made-up Welcome.
    #[tokio::test]
    async fn coordinator_without_the_key_is_refused_by_the_agent() {
        let (mut c, mut s) = tokio::io::duplex(64 * 1024);
        let fake = tokio::spawn(async move {
            let hello: pb::Frame = read_frame(&mut s, 4096).await.unwrap();
            assert_eq!(hello.kind(), "Hello");
            let challenge = pb::Challenge {
                version: 1,
                nonce: vec![7; 32],
                coordinator: "evil".into(),
                heartbeat_interval_ms: 1000,
            };
            write_frame(&mut s, &pb::Frame::from(challenge))
                .await
                .unwrap();
            let proof: pb::Frame = read_frame(&mut s, 4096).await.unwrap();
            // Reflect the agent's own proof back as the Welcome.
            let Some(Body::Proof(p)) = proof.body else {
                panic!("{}", proof.kind())
            };
            write_frame(&mut s, &pb::Frame::from(pb::Welcome { mac: p.mac }))
                .await
                .unwrap();
            read_frame::<_, pb::Frame>(&mut s, 4096).await.unwrap()
        });
        let err = handshake_client(&mut c, &key(1), &ClientConfig::new("n1"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AuthError::CoordinatorProof { coordinator } if coordinator == "evil"),
            "{err}"
        );
        let told = fake.await.unwrap();
        let Some(Body::Reject(r)) = told.body else {
            panic!("{}", told.kind())
        };
        assert_eq!(r.code, RejectCode::Auth as i32);
        assert!(
            r.reason.contains("failed to prove the cluster key"),
            "{}",
            r.reason
        );
    }

    /// Relays one handshake between a real agent and a real coordinator,
    /// returning every frame and letting `edit` change the agent's frames.
    async fn relay(
        c: &mut DuplexStream,
        s: &mut DuplexStream,
        mut edit: impl FnMut(&mut pb::Frame),
    ) -> Vec<pb::Frame> {
        let mut seen = Vec::new();
        for from_agent in [true, false, true, false] {
            let (src, dst) = if from_agent {
                (&mut *c, &mut *s)
            } else {
                (&mut *s, &mut *c)
            };
            let Ok(mut f) = read_frame::<_, pb::Frame>(src, 4096).await else {
                break;
            };
            if from_agent {
                edit(&mut f);
            }
            seen.push(f.clone());
            if write_frame(dst, &f).await.is_err() {
                break;
            }
            if f.kind() == "Reject" {
                break;
            }
        }
        seen
    }

    #[tokio::test]
    async fn replayed_proof_is_refused() {
        // Session 1: record a genuine agent's Hello and Proof.
        let (mut c, mut c_relay) = tokio::io::duplex(64 * 1024);
        let (mut s_relay, mut s) = tokio::io::duplex(64 * 1024);
        let srv =
            tokio::spawn(async move { handshake_server(&mut s, &key(1), &server_cfg()).await });
        let cli = tokio::spawn(async move {
            handshake_client(&mut c, &key(1), &ClientConfig::new("n1")).await
        });
        let seen = relay(&mut c_relay, &mut s_relay, |_| {}).await;
        srv.await.unwrap().unwrap();
        cli.await.unwrap().unwrap();
        let kinds: Vec<_> = seen.iter().map(|f| f.kind()).collect();
        assert_eq!(kinds, ["Hello", "Challenge", "Proof", "Welcome"]);

        // Session 2: an attacker without the key replays both.
        let (mut a, mut s) = tokio::io::duplex(64 * 1024);
        let srv =
            tokio::spawn(async move { handshake_server(&mut s, &key(1), &server_cfg()).await });
        write_frame(&mut a, &seen[0]).await.unwrap();
        let challenge: pb::Frame = read_frame(&mut a, 4096).await.unwrap();
        assert_eq!(challenge.kind(), "Challenge");
        assert_ne!(challenge, seen[1], "the coordinator's nonce must be fresh");
        write_frame(&mut a, &seen[2]).await.unwrap();
        let answer: pb::Frame = read_frame(&mut a, 4096).await.unwrap();
        let Some(Body::Reject(r)) = answer.body else {
            panic!("{}", answer.kind())
        };
        assert_eq!(r.code, RejectCode::Auth as i32);
        let err = srv.await.unwrap().unwrap_err();
        assert!(matches!(err, AuthError::AgentProof { .. }), "{err}");
        assert!(err.to_string().contains("replayed"), "{err}");
    }

    #[tokio::test]
    async fn narrowed_version_offer_is_detected() {
        // A middle-man rewrites the agent's offer 1..=2 to 1..=1: both
        // sides would accept version 1, but the MACs no longer agree.
        let (mut c, mut c_relay) = tokio::io::duplex(64 * 1024);
        let (mut s_relay, mut s) = tokio::io::duplex(64 * 1024);
        let mut scfg = server_cfg();
        scfg.versions = range(1, 2);
        let srv = tokio::spawn(async move { handshake_server(&mut s, &key(1), &scfg).await });
        let cli = tokio::spawn(async move {
            let mut cfg = ClientConfig::new("n1");
            cfg.versions = range(1, 2);
            handshake_client(&mut c, &key(1), &cfg).await
        });
        relay(&mut c_relay, &mut s_relay, |f| {
            if let Some(Body::Hello(h)) = &mut f.body {
                h.max_version = 1;
            }
        })
        .await;
        let err = srv.await.unwrap().unwrap_err();
        assert!(matches!(err, AuthError::AgentProof { .. }), "{err}");
        assert!(cli.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn version_mismatch_names_both_ranges() {
        let mut client = ClientConfig::new("n1");
        client.versions = range(3, 4);
        let (srv, cli) = pair(key(1), server_cfg(), key(1), client).await;
        let srv = srv.unwrap_err();
        assert!(matches!(srv, AuthError::VersionMismatch { .. }), "{srv}");
        let cli = cli.unwrap_err();
        for err in [srv.to_string(), cli.to_string()] {
            assert!(
                err.contains("agent speaks versions 3..=4")
                    && err.contains("coordinator speaks version 1"),
                "{err}"
            );
        }
        assert!(
            matches!(cli, AuthError::Rejected { code: RejectCode::Version, peer_versions: Some(v), .. } if v == range(1, 1)),
            "{cli}"
        );

        // Overlapping ranges settle on the highest common version.
        let mut server = server_cfg();
        server.versions = range(2, 5);
        let mut client = ClientConfig::new("n1");
        client.versions = range(1, 3);
        let (srv, cli) = pair(key(1), server, key(1), client).await;
        assert_eq!(srv.unwrap().version, 3);
        assert_eq!(cli.unwrap().version, 3);
    }

    #[tokio::test]
    async fn unexpected_node_is_refused_after_it_authenticates() {
        let mut server = server_cfg();
        server.expect = NodeExpectation::one_of(["n1", "n2"]);
        let (srv, cli) = pair(key(1), server.clone(), key(1), ClientConfig::new("n2")).await;
        assert_eq!(srv.unwrap().peer, "n2");
        cli.unwrap();
        let (srv, cli) = pair(key(1), server, key(1), ClientConfig::new("n9")).await;
        let srv = srv.unwrap_err();
        assert!(
            matches!(&srv, AuthError::UnexpectedNode { node } if node == "n9"),
            "{srv}"
        );
        let cli = cli.unwrap_err();
        assert!(
            matches!(
                cli,
                AuthError::Rejected {
                    code: RejectCode::UnknownNode,
                    ..
                }
            ),
            "{cli}"
        );
    }

    #[tokio::test]
    async fn bad_names_are_refused() {
        let (srv, cli) = pair(key(1), server_cfg(), key(1), ClientConfig::new("../n1")).await;
        assert!(matches!(cli, Err(AuthError::Config(_))));
        // Nothing was sent: the server just sees the connection close.
        let srv = srv.unwrap_err();
        assert!(
            matches!(
                &srv,
                AuthError::Frame {
                    source: FrameError::Closed,
                    ..
                }
            ),
            "{srv}"
        );
        // A hand-made Hello with a hostile node name.
        let (mut a, mut s) = tokio::io::duplex(64 * 1024);
        let srv =
            tokio::spawn(async move { handshake_server(&mut s, &key(1), &server_cfg()).await });
        let hello = pb::Hello {
            node: "n1\nFAKE LOG LINE".into(),
            min_version: 1,
            max_version: 1,
            nonce: vec![1; 32],
            software: String::new(),
        };
        write_frame(&mut a, &pb::Frame::from(hello)).await.unwrap();
        let err = srv.await.unwrap().unwrap_err();
        assert!(
            matches!(err, AuthError::Malformed { what: "Hello", .. }),
            "{err}"
        );
        let answer: pb::Frame = read_frame(&mut a, 4096).await.unwrap();
        assert_eq!(answer.kind(), "Reject");
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let mut cfg = server_cfg();
        cfg.timeout = Duration::from_millis(100);
        let (_a, mut s) = tokio::io::duplex(1024);
        let err = handshake_server(&mut s, &key(1), &cfg).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::Frame { source, .. } if source.is_timeout()),
            "{err}"
        );
        assert!(
            err.to_string().contains("reading the agent's Hello"),
            "{err}"
        );
    }

    /// Sends `bytes` to the coordinator, half-closes, and returns whatever
    /// frame it answers with (if any).
    async fn poke(port: u16, bytes: &[u8]) -> Option<pb::Frame> {
        let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        sock.write_all(bytes).await.unwrap();
        sock.shutdown().await.unwrap();
        let answer = read_frame::<_, pb::Frame>(&mut sock, 4096).await.ok();
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest).await;
        answer
    }

    #[tokio::test]
    async fn hostile_connections_fail_and_the_server_keeps_accepting() {
        let (port, mut results) = serve(key(1), server_cfg()).await;
        let hello = {
            let mut v = Vec::new();
            let h = pb::Hello {
                node: "n1".into(),
                min_version: 1,
                max_version: 1,
                nonce: vec![3; 32],
                software: String::new(),
            };
            write_frame(&mut v, &pb::Frame::from(h)).await.unwrap();
            v
        };
        let prepare_first = {
            let mut v = Vec::new();
            write_frame(&mut v, &pb::Frame::from(pb::Prepare::default()))
                .await
                .unwrap();
            v
        };
        let garbage = {
            let mut v = 8u32.to_be_bytes().to_vec();
            v.extend_from_slice(&[0xff; 8]);
            v
        };
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("empty connection", Vec::new(), false),
            ("truncated header", vec![0, 0], false),
            ("truncated Hello", hello[..hello.len() - 5].to_vec(), false),
            ("1 GiB length", (1u32 << 30).to_be_bytes().to_vec(), true),
            ("4 GiB length", u32::MAX.to_be_bytes().to_vec(), true),
            (
                "just over the cap",
                ((HANDSHAKE_MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
                true,
            ),
            ("garbage body", garbage, true),
            ("empty frame", 0u32.to_be_bytes().to_vec(), true),
            ("epoch message before the handshake", prepare_first, true),
            ("Hello then hang up", hello.clone(), false),
        ];
        for (what, bytes, expect_reject) in cases {
            let answer = poke(port, &bytes).await;
            let result = results.recv().await.unwrap();
            let err = result.expect_err(what);
            eprintln!("{what}: {err}");
            if expect_reject {
                let f = answer.unwrap_or_else(|| panic!("{what}: no Reject"));
                let Some(Body::Reject(r)) = f.body else {
                    panic!("{what}: {}", f.kind())
                };
                assert_eq!(r.code, RejectCode::Protocol as i32, "{what}");
                assert!(!r.reason.is_empty());
            } else if what.starts_with("Hello") {
                assert_eq!(answer.map(|f| f.kind()), Some("Challenge"));
            } else {
                assert!(answer.is_none(), "{what}");
            }
        }
        // After all that, a real agent still gets in.
        let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let s = handshake_client(&mut sock, &key(1), &ClientConfig::new("n1"))
            .await
            .unwrap();
        write_frame(
            &mut sock,
            &pb::Frame::from(pb::Heartbeat {
                seq: 1,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(results.recv().await.unwrap().unwrap().id, s.id);
    }

    #[test]
    fn macs_are_bound_to_role_key_and_transcript() {
        let k = HandshakeKey::new(&key(1));
        let (na, nc) = ([1u8; 32], [2u8; 32]);
        let t = Transcript {
            offered: range(1, 1),
            version: 1,
            heartbeat_ms: 1000,
            agent_nonce: &na,
            coordinator_nonce: &nc,
            node: "n1",
            coordinator: "c",
        };
        let agent = k.mac(Role::Agent, &t);
        assert!(k.verify(Role::Agent, &t, agent.as_bytes()));
        // No reflection: the agent's MAC is not a coordinator's.
        assert!(!k.verify(Role::Coordinator, &t, agent.as_bytes()));
        // Another key, another nonce, another name: no match.
        assert!(!HandshakeKey::new(&key(2)).verify(Role::Agent, &t, agent.as_bytes()));
        let nc2 = [3u8; 32];
        let t2 = Transcript {
            coordinator_nonce: &nc2,
            ..t
        };
        assert!(!k.verify(Role::Agent, &t2, agent.as_bytes()));
        let t3 = Transcript { node: "n2", ..t };
        assert!(!k.verify(Role::Agent, &t3, agent.as_bytes()));
        // Name boundaries are unambiguous: ("n1", "c") vs ("n", "1c").
        let t4 = Transcript {
            node: "n",
            coordinator: "1c",
            ..t
        };
        assert!(!k.verify(Role::Agent, &t4, agent.as_bytes()));
        // Short or long MACs never verify (and never panic).
        assert!(!k.verify(Role::Agent, &t, &agent.as_bytes()[..31]));
        assert!(!k.verify(Role::Agent, &t, &[0; 33]));
        assert!(!k.verify(Role::Agent, &t, &[]));
        // The handshake key is not the cluster key.
        assert_ne!(k.0, [1u8; 32]);
        assert_eq!(format!("{k:?}"), "HandshakeKey(<redacted>)");
    }

    #[tokio::test]
    async fn the_key_never_goes_on_the_wire() {
        let (mut c, mut c_relay) = tokio::io::duplex(64 * 1024);
        let (mut s_relay, mut s) = tokio::io::duplex(64 * 1024);
        let cluster = [0x5a; 32];
        let srv = tokio::spawn(async move {
            handshake_server(&mut s, &Key::from_bytes(cluster), &server_cfg()).await
        });
        let cli = tokio::spawn(async move {
            handshake_client(&mut c, &Key::from_bytes(cluster), &ClientConfig::new("n1")).await
        });
        let seen = relay(&mut c_relay, &mut s_relay, |_| {}).await;
        srv.await.unwrap().unwrap();
        cli.await.unwrap().unwrap();
        let derived = HandshakeKey::new(&Key::from_bytes(cluster)).0;
        let mut wire = Vec::new();
        for f in &seen {
            write_frame(&mut wire, f).await.unwrap();
        }
        for secret in [cluster, derived] {
            assert!(!wire.windows(8).any(|w| secret.windows(8).any(|s| s == w)));
        }
    }

    #[tokio::test]
    async fn random_peers_never_get_in_and_never_panic() {
        // xorshift64*, fixed seed: a failure reproduces.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut cfg = server_cfg();
        cfg.timeout = Duration::from_millis(200);
        let mut client = ClientConfig::new("n1");
        client.timeout = Duration::from_millis(200);
        for i in 0..400 {
            let len = (next() % 96) as usize;
            let mut noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && noise.len() >= 4 {
                // A small, plausible length so the body gets decoded.
                let body = (noise.len() - 4) as u32;
                noise[..4].copy_from_slice(&body.to_be_bytes());
            }
            let (mut ours, mut theirs) = tokio::io::duplex(4096);
            let peer = tokio::spawn(async move {
                theirs.write_all(&noise).await.ok();
                theirs.shutdown().await.ok();
                let mut sink = Vec::new();
                theirs.read_to_end(&mut sink).await.ok();
            });
            let result = if i % 4 < 2 {
                handshake_server(&mut ours, &key(1), &cfg).await
            } else {
                handshake_client(&mut ours, &key(1), &client).await
            };
            assert!(result.is_err(), "iteration {i} got in");
            drop(ours);
            peer.await.unwrap();
        }
    }

    #[test]
    fn peer_reasons_are_cleaned() {
        assert_eq!(clean_reason("a\nb\x1b[31m"), "a b [31m");
        let long = "x".repeat(MAX_REASON_LEN + 10);
        assert_eq!(clean_reason(&long).chars().count(), MAX_REASON_LEN + 1);
    }
}
