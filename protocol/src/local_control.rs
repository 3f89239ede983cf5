//! Client side of the daemons' local control sockets (the node agent's
//! and the coordinator's Unix sockets): one framed [`pb::Request`], then
//! [`pb::Response`] frames until the final one. The servers decide what a
//! caller may do from its SO_PEERCRED credentials.

use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::framing::{read_frame, write_frame, FrameError};
use crate::pb;

/// Requests are small; anything bigger is a confused or hostile peer.
pub const MAX_REQUEST: usize = 1024 * 1024;
/// Largest reply a client accepts.
pub const MAX_REPLY: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("talking to {0}: {1}")]
    Frame(PathBuf, FrameError),
    #[error("{}", .0.message)]
    Remote(pb::Error),
}

/// Sends `op` to the control socket `sock` and returns the final reply
/// (an [`pb::Error`] reply is [`CallError::Remote`]). `timeout` bounds each
/// read of a reply (checkpoints and restarts can take minutes).
pub fn call(
    sock: &Path,
    op: pb::request::Op,
    timeout: Duration,
) -> Result<pb::response::Body, CallError> {
    let connect = |e| CallError::Connect(sock.to_path_buf(), e);
    let frame = |e| CallError::Frame(sock.to_path_buf(), e);
    let conn = UnixStream::connect(sock).map_err(connect)?;
    conn.set_read_timeout(Some(timeout)).map_err(connect)?;
    let mut w = BufWriter::new(conn.try_clone().map_err(connect)?);
    write_frame(
        &mut w,
        &pb::Request {
            version: pb::Version::Version1 as i32,
            op: Some(op),
        },
    )
    .map_err(frame)?;
    let mut r = BufReader::new(conn);
    loop {
        let resp: pb::Response = read_frame(&mut r, MAX_REPLY).map_err(frame)?;
        match resp.body {
            Some(pb::response::Body::Progress(_)) => continue,
            Some(pb::response::Body::Error(e)) => return Err(CallError::Remote(e)),
            Some(body) => return Ok(body),
            None => return Err(frame(FrameError::Closed)),
        }
    }
}

/// An error reply.
pub fn error_reply(kind: pb::ErrorKind, message: impl Into<String>) -> pb::Response {
    pb::Response {
        body: Some(pb::response::Body::Error(pb::Error {
            kind: kind as i32,
            message: message.into(),
        })),
    }
}

/// Binds a control socket at `path`: creates its directory (0755), removes a
/// stale socket (one nobody answers on), refuses a live one, and makes it
/// connectable by everyone (0666; access is decided per request from the
/// peer's credentials).
pub fn bind_socket(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// A control socket served by threads: one thread accepts, one per
/// connection runs `handle`. [`UnixServer::shutdown`] stops it (by shutting
/// the listening socket down, which wakes a blocked accept even if the
/// socket's path is already gone) and removes the socket.
#[derive(Debug)]
pub struct UnixServer {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    listener: std::sync::Arc<std::os::unix::net::UnixListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UnixServer {
    /// Binds `path` (see [`bind_socket`]) and serves it.
    pub fn serve<H>(path: &Path, handle: H) -> std::io::Result<Self>
    where
        H: Fn(UnixStream) + Send + Sync + 'static,
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = Arc::new(bind_socket(path)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, accepting, handle) = (stop.clone(), listener.clone(), Arc::new(handle));
        let thread = std::thread::spawn(move || {
            for conn in accepting.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else {
                    // EINVAL after shutdown; anything else: keep serving,
                    // but do not spin on a persistent error.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let handle = handle.clone();
                std::thread::spawn(move || handle(conn));
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            listener,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket.
    pub fn shutdown(mut self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: shutdown(2) on a descriptor we own; it only changes the
        // socket's state.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
