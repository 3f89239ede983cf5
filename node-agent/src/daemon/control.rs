//! The agent's local control socket (`control_socket` in agent.toml): a
//! caller on this node asks the agent to start a tree of a job (the seed of
//! the `ckpt-job rsh` launcher). One framed [`pb::Request`] per connection,
//! answered by one [`pb::Response`].
//!
//! Access is by the caller's SO_PEERCRED credentials: a tree runs as its
//! owner, and only root may start a tree for another user or choose where
//! its output goes (the agent, as root, creates those files).

use std::ffi::OsString;
use std::io::{BufReader, BufWriter};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ckpt_protocol::framing::{read_frame, write_frame, FrameError};
use ckpt_protocol::local_control::{error_reply, MAX_REQUEST};
use ckpt_protocol::pb;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::{AgentDaemon, Shared};
use crate::tree::NetMode;

use super::trees::TreeArgs;

/// A running control socket; [`ControlServer::shutdown`] stops it and
/// removes the socket.
pub type ControlServer = ckpt_protocol::local_control::UnixServer;

impl AgentDaemon {
    /// Serves the local control socket at `path` (threads; no runtime).
    pub fn serve_control(&self, path: &Path) -> std::io::Result<ControlServer> {
        let shared = self.shared.clone();
        shared.remote.set_socket(path);
        ControlServer::serve(path, move |conn| {
            if let Err(e) = handle(&shared, conn) {
                tracing::debug!(node = %shared.cfg.node, error = %e, "control connection ended");
            }
        })
    }
}

fn handle(shared: &Shared, conn: UnixStream) -> Result<(), FrameError> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let cred = getsockopt(&conn, PeerCredentials).map_err(std::io::Error::from)?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = BufWriter::new(conn);
    let req: pb::Request = match read_frame(&mut r, MAX_REQUEST) {
        Ok(req) => req,
        Err(FrameError::Closed) => return Ok(()),
        Err(e) => {
            let _ = write_frame(
                &mut w,
                &error_reply(
                    pb::ErrorKind::BadRequest,
                    format!("unreadable request: {e}"),
                ),
            );
            return Err(e);
        }
    };
    let reply = if req.version != pb::Version::Version1 as i32 {
        error_reply(
            pb::ErrorKind::BadRequest,
            format!(
                "unsupported protocol version {} (this agent speaks 1)",
                req.version
            ),
        )
    } else {
        match req.op {
            Some(pb::request::Op::SpawnTree(s)) => spawn(shared, cred.uid(), cred.gid(), s),
            Some(pb::request::Op::RemoteSpawn(r)) => {
                super::remote::request(shared, cred.pid(), cred.uid(), cred.gid(), r)
            }
            Some(_) => error_reply(
                pb::ErrorKind::BadRequest,
                "a node agent only takes spawn_tree and remote_spawn requests",
            ),
            None => error_reply(pb::ErrorKind::BadRequest, "empty request"),
        }
    };
    write_frame(&mut w, &reply)
}

fn spawn(shared: &Shared, uid: u32, gid: u32, s: pb::SpawnTreeRequest) -> pb::Response {
    let node = &shared.cfg.node;
    let owner_uid = s.uid.unwrap_or(uid);
    let owner_gid = s
        .gid
        .unwrap_or(if owner_uid == uid { gid } else { owner_uid });
    if uid != 0 && (owner_uid != uid || owner_gid != gid) {
        tracing::warn!(%node, uid, job = %s.job, "refused a tree for another user");
        return error_reply(
            pb::ErrorKind::Permission,
            format!(
                "permission denied: uid {uid} may start trees only as itself, not as \
                 {owner_uid}:{owner_gid}"
            ),
        );
    }
    if uid != 0 && (!s.stdout.is_empty() || !s.stderr.is_empty()) {
        return error_reply(
            pb::ErrorKind::Permission,
            "permission denied: only root may choose where a tree's output goes",
        );
    }
    let order = TreeOrder {
        job: s.job,
        argv: s.argv,
        cwd: s.cwd,
        env: s.env,
        uid: owner_uid,
        gid: owner_gid,
        groups: Vec::new(),
        host_network: s.host_network,
        stdout: s.stdout,
        stderr: s.stderr,
    };
    match start_tree(shared, order) {
        Ok(t) => pb::Response {
            body: Some(pb::response::Body::TreeSpawned(t)),
        },
        Err(e) => error_reply(pb::ErrorKind::Failed, e),
    }
}

/// A tree to start, its caller judged already (a spawn_tree caller by its
/// credentials, a remote spawn by its agent).
#[derive(Debug)]
pub(super) struct TreeOrder {
    pub job: String,
    pub argv: Vec<String>,
    /// Absolute; empty = "/".
    pub cwd: String,
    /// "NAME=value" entries.
    pub env: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub host_network: bool,
    /// Empty: a fresh file under the state dir.
    pub stdout: String,
    pub stderr: String,
}

/// Starts the tree `s` asks for; the error names what was wrong.
pub(super) fn start_tree(shared: &Shared, s: TreeOrder) -> Result<pb::TreeSpawned, String> {
    let node = &shared.cfg.node;
    if s.argv.is_empty() {
        return Err("spawn_tree: empty argv".into());
    }
    let cwd = if s.cwd.is_empty() {
        "/".into()
    } else {
        s.cwd.clone()
    };
    if !Path::new(&cwd).is_absolute() {
        return Err(format!("spawn_tree: cwd {cwd:?} is not absolute"));
    }
    let mut env = Vec::new();
    for e in &s.env {
        let Some((k, v)) = e.split_once('=') else {
            return Err(format!("spawn_tree: env entry {e:?} is not NAME=value"));
        };
        env.push((OsString::from(k), OsString::from(v)));
    }
    let out_dir = shared.registry.state_dir().join("out").join(&s.job);
    let mut args = TreeArgs::new(
        s.argv
            .iter()
            .map(|a| OsString::from_vec(a.clone().into_bytes())),
        &out_dir,
    );
    args.cwd = PathBuf::from(cwd);
    args.env = env;
    args.uid = s.uid;
    args.gid = s.gid;
    args.groups = s.groups.clone();
    args.net = if s.host_network {
        NetMode::Host
    } else {
        NetMode::Private
    };
    // Default output files: unique per tree, under root's state_dir.
    let seq = OUT_SEQ.fetch_add(1, Ordering::Relaxed);
    args.stdout = if s.stdout.is_empty() {
        out_dir.join(format!("{}-{seq}.stdout", std::process::id()))
    } else {
        PathBuf::from(&s.stdout)
    };
    args.stderr = if s.stderr.is_empty() {
        out_dir.join(format!("{}-{seq}.stderr", std::process::id()))
    } else {
        PathBuf::from(&s.stderr)
    };
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        return Err(format!("creating {}: {e}", out_dir.display()));
    }
    if !s.host_network {
        args.jobnet = shared.new_tree_net(&s.job)?;
    }
    let address = args
        .jobnet
        .as_ref()
        .map(|n| n.address().to_string())
        .unwrap_or_default();
    match shared.registry.spawn(&s.job, &args) {
        Ok(id) => {
            let pid = shared.registry.get(id).map_or(0, |t| t.handle.root_pid);
            tracing::info!(%node, job = %s.job, tree = id, pid, uid = s.uid, "tree started on request");
            Ok(pb::TreeSpawned {
                tree_id: id,
                root_pid: pid,
                stdout: args.stdout.display().to_string(),
                stderr: args.stderr.display().to_string(),
                address,
            })
        }
        Err(e) => Err(e.to_string()),
    }
}

static OUT_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
