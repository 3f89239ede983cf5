//! What can go wrong talking to CRIU, and which operation it was.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The CRIU operation an error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `criu check`.
    Check,
    /// The VERSION request.
    Version,
    /// A dump of the tree rooted at `pid`.
    Dump {
        /// Root of the dumped tree.
        pid: i32,
    },
    /// A restore.
    Restore,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Check => f.write_str("check"),
            Op::Version => f.write_str("version"),
            Op::Dump { pid } => write!(f, "dump of pid {pid}"),
            Op::Restore => f.write_str("restore"),
        }
    }
}

/// Every failure of the CRIU client. Each variant that concerns a request
/// carries the operation, so the message says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// No `criu` binary at the preferred path nor on `PATH`.
    #[error("criu binary not found (looked at {preferred} and on PATH)")]
    NotFound {
        /// The path tried first.
        preferred: PathBuf,
    },

    /// The options cannot be turned into a request (e.g. a log file name
    /// with a '/', which CRIU refuses).
    #[error("criu {op}: invalid options: {detail}")]
    InvalidOptions {
        /// The operation.
        op: Op,
        /// What is wrong.
        detail: String,
    },

    /// `criu swrk` could not be started.
    #[error("criu {op}: cannot start {}: {source}", bin.display())]
    Spawn {
        /// The operation.
        op: Op,
        /// The binary we tried to run.
        bin: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },

    /// A system call on the RPC socket (or setting it up) failed.
    #[error("criu {op}: {what}: {source}")]
    Io {
        /// The operation.
        op: Op,
        /// The step that failed ("send request", "receive response", ...).
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// CRIU answered something we cannot use: an undecodable message, an
    /// unexpected response type, or a message over the size cap.
    #[error("criu {op}: protocol error: {detail}")]
    Protocol {
        /// The operation.
        op: Op,
        /// What was wrong with the answer.
        detail: String,
    },

    /// CRIU closed the socket (exited or crashed) before its final answer.
    #[error("criu {op}: criu {status} without answering{}", stderr_block(.stderr))]
    NoAnswer {
        /// The operation.
        op: Op,
        /// How the criu process ended ("exited with status 1", "was killed
        /// by SIGSEGV").
        status: String,
        /// The tail of criu's stderr.
        stderr: String,
    },

    /// CRIU answered `success = false`.
    #[error("{}", render_failed(*.op, *.errno, .message, .notify_refusal.as_deref(), .log_path.as_deref(), .log_excerpt))]
    Failed {
        /// The operation.
        op: Op,
        /// `cr_errno` (an errno value), when CRIU set one.
        errno: Option<i32>,
        /// `cr_errmsg`: the first error line of CRIU's log.
        message: String,
        /// When our [`NotifyHandler`](super::NotifyHandler) refused an
        /// event and so made CRIU abort: `"<event>: <handler's reason>"`.
        notify_refusal: Option<String>,
        /// CRIU's log file, when it has one.
        log_path: Option<PathBuf>,
        /// The relevant lines of that log (or of criu's stderr).
        log_excerpt: Vec<String>,
    },
}

impl CriuError {
    /// The operation the error belongs to (`None` for [`CriuError::NotFound`]).
    pub fn op(&self) -> Option<Op> {
        match self {
            CriuError::NotFound { .. } => None,
            CriuError::InvalidOptions { op, .. }
            | CriuError::Spawn { op, .. }
            | CriuError::Io { op, .. }
            | CriuError::Protocol { op, .. }
            | CriuError::NoAnswer { op, .. }
            | CriuError::Failed { op, .. } => Some(*op),
        }
    }
}

fn stderr_block(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        return String::new();
    }
    let mut out = String::from("\n  stderr:");
    for line in stderr.lines() {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

fn render_failed(
    op: Op,
    errno: Option<i32>,
    message: &str,
    notify_refusal: Option<&str>,
    log_path: Option<&Path>,
    excerpt: &[String],
) -> String {
    let mut out = format!("criu {op} failed");
    if let Some(e) = errno {
        let name = nix::errno::Errno::from_raw(e);
        out.push_str(&format!(" (errno {e}: {name})"));
    }
    out.push_str(": ");
    match notify_refusal {
        Some(r) => {
            out.push_str(&format!("aborted by our notify handler at {r}"));
            if !message.is_empty() {
                out.push_str(&format!(" (criu: {})", message.trim_end()));
            }
        }
        None if message.is_empty() => out.push_str("no error message from criu"),
        None => out.push_str(message.trim_end()),
    }
    match (log_path, excerpt.is_empty()) {
        (Some(p), false) => out.push_str(&format!("\n  log {}:", p.display())),
        (Some(p), true) => out.push_str(&format!("\n  log {} (no error lines found)", p.display())),
        (None, false) => out.push_str("\n  criu output:"),
        (None, true) => {}
    }
    for line in excerpt {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}
