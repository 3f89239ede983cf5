//! The job's control socket: `<run_dir>/jobs/<job>.sock`.
//!
//! Anyone may connect; the peer's credentials (SO_PEERCRED) decide what it
//! may do: root and the job's owner may query and checkpoint it, nobody
//! else. Every message is a framed prost message (see ckpt_protocol).

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ckpt_protocol::framing::{read_frame, write_frame, FrameError};
use ckpt_protocol::pb;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::supervisor::Job;

/// Requests are tiny; anything bigger is a confused or hostile peer.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Replies can carry a status with a long command line.
pub const MAX_REPLY: usize = 4 * 1024 * 1024;

/// Whether a job's socket has a live server behind it.
pub fn is_live(sock: &Path) -> bool {
    UnixStream::connect(sock).is_ok()
}

/// The job's control socket server; `shutdown()` stops it and removes the
/// socket.
pub type Server = ckpt_protocol::local_control::UnixServer;

pub fn serve(job: Arc<Job>) -> Result<Server> {
    let path = job.socket_path();
    Server::serve(&path, move |conn| {
        if let Err(e) = handle(&job, conn) {
            tracing::debug!(job = %job.spec.name, error = %e, "control connection ended");
        }
    })
    .with_context(|| format!("serving the job's control socket {}", path.display()))
}

fn handle(job: &Job, conn: UnixStream) -> Result<(), FrameError> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let cred = getsockopt(&conn, PeerCredentials).map_err(std::io::Error::from)?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = BufWriter::new(conn);
    let req: pb::Request = match read_frame(&mut r, MAX_REQUEST) {
        Ok(req) => req,
        Err(FrameError::Closed) => return Ok(()),
        Err(e) => {
            let _ = reply_error(
                &mut w,
                pb::ErrorKind::BadRequest,
                format!("unreadable request: {e}"),
            );
            return Err(e);
        }
    };
    if req.version != pb::Version::Version1 as i32 {
        return reply_error(
            &mut w,
            pb::ErrorKind::BadRequest,
            format!(
                "unsupported protocol version {} (this job speaks 1)",
                req.version
            ),
        );
    }
    let uid = cred.uid();
    if uid != 0 && uid != job.owner_uid() {
        tracing::warn!(job = %job.spec.name, uid, "refused control request from a user who does not own the job");
        return reply_error(
            &mut w,
            pb::ErrorKind::Permission,
            format!(
                "permission denied: job {} belongs to uid {}, you are uid {uid}",
                job.spec.name,
                job.owner_uid()
            ),
        );
    }
    match req.op {
        Some(pb::request::Op::Status(_)) => write_frame(
            &mut w,
            &pb::Response {
                body: Some(pb::response::Body::Status(job.status())),
            },
        ),
        Some(pb::request::Op::Checkpoint(c)) => {
            let mut progress = |phase: &str, done: u64, total: u64| {
                let p = pb::Progress {
                    phase: phase.to_string(),
                    done,
                    total,
                };
                // A client that went away does not stop the epoch.
                let _ = write_frame(
                    &mut w,
                    &pb::Response {
                        body: Some(pb::response::Body::Progress(p)),
                    },
                );
            };
            let result = job.checkpoint(c.stop, &mut progress);
            match result {
                Ok(done) => write_frame(
                    &mut w,
                    &pb::Response {
                        body: Some(pb::response::Body::Checkpoint(done)),
                    },
                ),
                Err(e) => reply_error(&mut w, e.kind, e.message),
            }
        }
        Some(_) => reply_error(
            &mut w,
            pb::ErrorKind::BadRequest,
            "a job's control socket takes checkpoint and status requests".into(),
        ),
        None => reply_error(&mut w, pb::ErrorKind::BadRequest, "empty request".into()),
    }?;
    w.flush()?;
    Ok(())
}

fn reply_error<W: Write>(
    w: &mut W,
    kind: pb::ErrorKind,
    message: String,
) -> Result<(), FrameError> {
    write_frame(
        w,
        &pb::Response {
            body: Some(pb::response::Body::Error(pb::Error {
                kind: kind as i32,
                message,
            })),
        },
    )
}

/// Client side: one request, then every reply until the final one.
pub fn call(
    sock: &Path,
    op: pb::request::Op,
    mut on_progress: impl FnMut(&pb::Progress),
) -> Result<pb::response::Body, CallError> {
    let conn = UnixStream::connect(sock).map_err(|e| CallError::Connect(sock.to_path_buf(), e))?;
    let mut w = BufWriter::new(
        conn.try_clone()
            .map_err(|e| CallError::Connect(sock.to_path_buf(), e))?,
    );
    write_frame(
        &mut w,
        &pb::Request {
            version: pb::Version::Version1 as i32,
            op: Some(op),
        },
    )
    .map_err(CallError::Frame)?;
    let mut r = BufReader::new(conn);
    loop {
        let resp: pb::Response = read_frame(&mut r, MAX_REPLY).map_err(CallError::Frame)?;
        match resp.body {
            Some(pb::response::Body::Progress(p)) => on_progress(&p),
            Some(pb::response::Body::Error(e)) => return Err(CallError::Remote(e)),
            Some(body) => return Ok(body),
            None => return Err(CallError::Frame(FrameError::Closed)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("talking to the job: {0}")]
    Frame(FrameError),
    #[error("{}", .0.message)]
    Remote(pb::Error),
}
