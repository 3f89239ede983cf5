//! One `criu swrk` process and the conversation with it over a
//! SOCK_SEQPACKET socketpair: one request, any number of NOTIFY round
//! trips, one final response.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use ckpt_protocol::criu_pb::{CriuReq, CriuReqType, CriuResp};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{
    recv, recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use prost::Message;

use super::error::{CriuError, Op};
use super::notify::{NotifyEvent, NotifyHandler};
use super::spawn::child_setup;

/// Largest response we accept. CRIU's answers are a few hundred bytes.
const MAX_MESSAGE: usize = 1 << 20;
/// How much of criu's stderr an error quotes.
const STDERR_TAIL: u64 = 4096;

/// What the criu process needs besides the socket.
#[derive(Debug, Default)]
pub(crate) struct SpawnExtras<'a> {
    /// Descriptors that must exist inside criu (for `inherit_fd`).
    pub inherit: Vec<BorrowedFd<'a>>,
    /// `cgroup.procs` files criu joins before exec.
    pub join_cgroup_procs: &'a [PathBuf],
}

/// The final answer of one call.
#[derive(Debug)]
pub(crate) struct Answer {
    /// CRIU's final response (type = the request's type).
    pub resp: CriuResp,
    /// `"<event>: <reason>"` when our handler refused a notification.
    pub refusal: Option<String>,
    /// What criu wrote to stdout/stderr (tail).
    pub output: String,
}

/// A running `criu swrk`. Dropping it closes the socket and reaps criu.
#[derive(Debug)]
struct Swrk {
    op: Op,
    child: Option<Child>,
    sock: Option<OwnedFd>,
    output: File,
}

/// Runs one request in a fresh `criu swrk`. `make_req` gets the numbers
/// the `extras.inherit` descriptors have inside criu.
pub(crate) fn call(
    op: Op,
    bin: &Path,
    extras: SpawnExtras<'_>,
    make_req: impl FnOnce(&[i32]) -> Result<CriuReq, CriuError>,
    handler: &mut dyn NotifyHandler,
) -> Result<Answer, CriuError> {
    let (mut swrk, child_fds) = Swrk::spawn(op, bin, &extras)?;
    let req = make_req(&child_fds)?;
    let outcome = swrk.converse(&req, handler);
    let status = swrk.reap();
    let output = swrk.output_tail();
    match outcome? {
        Some((resp, refusal)) => {
            match status {
                Some(s) if !s.success() => {
                    tracing::warn!(%op, status = %describe(s), "criu answered but then {}", describe(s))
                }
                _ => {}
            }
            Ok(Answer {
                resp,
                refusal,
                output,
            })
        }
        None => Err(CriuError::NoAnswer {
            op,
            status: status.map_or_else(|| "could not be waited for".to_string(), describe),
            stderr: output,
        }),
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => format!("was killed by {name}"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        _ => format!("ended ({s})"),
    }
}

fn io_err(op: Op, what: &'static str) -> impl FnOnce(Errno) -> CriuError {
    move |e| CriuError::Io {
        op,
        what,
        source: io::Error::from(e),
    }
}

impl Swrk {
    /// Starts `criu swrk <fd>`; returns the numbers of the inherited
    /// descriptors inside criu.
    fn spawn(op: Op, bin: &Path, extras: &SpawnExtras<'_>) -> Result<(Self, Vec<i32>), CriuError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io_err(op, "create socketpair"))?;

        // Fresh copies (>= 3, close-on-exec in this process) of the
        // inherited descriptors: the child clears close-on-exec on exactly
        // these, and their numbers cannot collide with criu's stdio.
        let mut dups = Vec::with_capacity(extras.inherit.len());
        for fd in &extras.inherit {
            let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3))
                .map_err(io_err(op, "duplicate an inherit_fd descriptor"))?;
            // SAFETY: F_DUPFD_CLOEXEC just created `raw`; nothing else owns it.
            dups.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        let child_fds: Vec<RawFd> = dups.iter().map(AsRawFd::as_raw_fd).collect();

        let mut cgroup_procs = Vec::with_capacity(extras.join_cgroup_procs.len());
        for p in extras.join_cgroup_procs {
            cgroup_procs.push(CString::new(p.as_os_str().as_bytes()).map_err(|_| {
                CriuError::InvalidOptions {
                    op,
                    detail: format!("NUL byte in {}", p.display()),
                }
            })?);
        }

        let output: File = memfd_create(c"criu-output", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(io_err(op, "create output memfd"))?
            .into();
        let for_stdout = output.try_clone().map_err(|source| CriuError::Io {
            op,
            what: "duplicate output memfd",
            source,
        })?;
        let for_stderr = output.try_clone().map_err(|source| CriuError::Io {
            op,
            what: "duplicate output memfd",
            source,
        })?;

        let sock_fd = theirs.as_raw_fd();
        let mut keep = child_fds.clone();
        keep.push(sock_fd);

        let mut cmd = Command::new(bin);
        cmd.arg("swrk")
            .arg(sock_fd.to_string())
            .stdin(Stdio::null())
            .stdout(for_stdout)
            .stderr(for_stderr);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (fcntl, getpid, open, write, close)
        // on data prepared before the fork; it does not allocate.
        unsafe {
            cmd.pre_exec(move || child_setup(&keep, &cgroup_procs));
        }
        // On the forker thread: a restore makes the restored tree a child
        // of swrk's parent thread, and the tree's parent-death signal must
        // not fire when some short-lived thread exits (see crate::forker).
        let child = crate::forker::run(move || cmd.spawn()).map_err(|source| CriuError::Spawn {
            op,
            bin: bin.to_path_buf(),
            source,
        })?;
        // Our copies of criu's end must go, or we would never see EOF.
        drop(theirs);
        drop(dups);
        tracing::debug!(%op, pid = child.id(), "criu swrk started");
        Ok((
            Swrk {
                op,
                child: Some(child),
                sock: Some(ours),
                output,
            },
            child_fds,
        ))
    }

    /// Sends `req`, serves NOTIFY round trips, returns the final response
    /// (and our handler's refusal, if any); `None` if criu hung up first.
    fn converse(
        &mut self,
        req: &CriuReq,
        handler: &mut dyn NotifyHandler,
    ) -> Result<Option<(CriuResp, Option<String>)>, CriuError> {
        let want = req.r#type;
        if !self.send(req)? {
            return Ok(None);
        }
        let mut refusal = None;
        loop {
            let Some(resp) = self.recv()? else {
                return Ok(None);
            };
            if resp.r#type == CriuReqType::Notify as i32 {
                let script = resp
                    .notify
                    .as_ref()
                    .and_then(|n| n.script.clone())
                    .unwrap_or_default();
                let pid = resp.notify.as_ref().and_then(|n| n.pid).unwrap_or(0);
                let event = NotifyEvent::from_script(&script);
                tracing::debug!(op = %self.op, %event, pid, "criu notify");
                let ok = match handler.notify(&event, pid) {
                    Ok(()) => true,
                    Err(reason) => {
                        tracing::warn!(op = %self.op, %event, %reason, "notify handler refused");
                        refusal.get_or_insert_with(|| format!("{event}: {reason}"));
                        false
                    }
                };
                let reply = CriuReq {
                    r#type: CriuReqType::Notify as i32,
                    notify_success: Some(ok),
                    ..Default::default()
                };
                if !self.send(&reply)? {
                    return Ok(None);
                }
                continue;
            }
            if resp.r#type != want {
                return Err(CriuError::Protocol {
                    op: self.op,
                    detail: format!(
                        "response of type {} to a {} request",
                        type_name(resp.r#type),
                        type_name(want)
                    ),
                });
            }
            return Ok(Some((resp, refusal)));
        }
    }

    fn sock(&self) -> Result<BorrowedFd<'_>, CriuError> {
        self.sock
            .as_ref()
            .map(AsFd::as_fd)
            .ok_or(CriuError::Protocol {
                op: self.op,
                detail: "socket already closed".to_string(),
            })
    }

    /// Sends one message; `Ok(false)` if criu has hung up.
    fn send(&self, msg: &CriuReq) -> Result<bool, CriuError> {
        let buf = msg.encode_to_vec();
        let fd = self.sock()?.as_raw_fd();
        loop {
            match send(fd, &buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) if n == buf.len() => return Ok(true),
                Ok(n) => {
                    return Err(CriuError::Protocol {
                        op: self.op,
                        detail: format!("short send: {n} of {} bytes", buf.len()),
                    })
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Ok(false),
                Err(e) => return Err(io_err(self.op, "send request")(e)),
            }
        }
    }

    /// Receives one message whole: its size first (MSG_PEEK|MSG_TRUNC),
    /// then the message. Descriptors CRIU attaches (orphan-pts-master) are
    /// closed. `Ok(None)` on EOF.
    fn recv(&self) -> Result<Option<CriuResp>, CriuError> {
        let fd = self.sock()?.as_raw_fd();
        let len = loop {
            match recv(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET) => return Ok(None),
                Err(e) => return Err(io_err(self.op, "receive response size")(e)),
            }
        };
        if len == 0 {
            return Ok(None);
        }
        if len > MAX_MESSAGE {
            return Err(CriuError::Protocol {
                op: self.op,
                detail: format!("response of {len} bytes exceeds the {MAX_MESSAGE}-byte cap"),
            });
        }
        let mut buf = vec![0u8; len];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (got, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                for r in raw {
                                    // SAFETY: the kernel just installed `r`
                                    // in our table for this message; we own it.
                                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                                }
                            }
                        }
                    }
                    break (msg.bytes, fds);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io_err(self.op, "receive response")(e)),
            }
        };
        drop(fds);
        if got != len {
            return Err(CriuError::Protocol {
                op: self.op,
                detail: format!("response truncated: {got} of {len} bytes"),
            });
        }
        CriuResp::decode(&buf[..])
            .map(Some)
            .map_err(|e| CriuError::Protocol {
                op: self.op,
                detail: format!("cannot decode criu_resp: {e}"),
            })
    }

    /// Closes our end of the socket (so a criu still working notices) and
    /// waits for criu. `None` if it could not be waited for.
    fn reap(&mut self) -> Option<ExitStatus> {
        self.sock = None;
        let mut child = self.child.take()?;
        match child.wait() {
            Ok(s) => {
                tracing::debug!(op = %self.op, status = %s, "criu swrk reaped");
                Some(s)
            }
            Err(e) => {
                tracing::warn!(op = %self.op, error = %e, "cannot wait for criu");
                None
            }
        }
    }

    /// The tail of everything criu wrote to stdout/stderr.
    fn output_tail(&self) -> String {
        let len = self.output.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(STDERR_TAIL);
        let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(0)];
        match self.output.read_at(&mut buf, start) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(_) => String::new(),
        }
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        // Only reached with a live child on an early return or a panic in
        // the handler: still never leave a zombie behind.
        if self.child.is_some() {
            self.reap();
        }
    }
}

fn type_name(t: i32) -> String {
    CriuReqType::try_from(t).map_or_else(|_| format!("#{t}"), |t| t.as_str_name().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_failure_names_the_binary() {
        let err = call(
            Op::Check,
            Path::new("/nonexistent/criu"),
            SpawnExtras::default(),
            |_| Ok(CriuReq::default()),
            &mut super::super::NoNotify,
        )
        .unwrap_err();
        assert!(matches!(err, CriuError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/criu"), "{err}");
    }

    #[test]
    fn criu_that_exits_without_answering_is_reported() {
        // `false` ignores its arguments and exits 1: no answer.
        let err = call(
            Op::Version,
            Path::new("/bin/false"),
            SpawnExtras::default(),
            |_| {
                Ok(CriuReq {
                    r#type: CriuReqType::Version as i32,
                    ..Default::default()
                })
            },
            &mut super::super::NoNotify,
        )
        .unwrap_err();
        assert!(matches!(err, CriuError::NoAnswer { .. }), "{err}");
        assert!(err.to_string().contains("exited with status 1"), "{err}");
    }
}
