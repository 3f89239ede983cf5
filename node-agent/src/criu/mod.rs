//! Our own client of CRIU's RPC: every call runs one `criu swrk <fd>`
//! process and talks protobuf (`ckpt_protocol::criu_pb`) to it over a
//! SOCK_SEQPACKET socketpair.
//!
//! Facts this client is built on (CRIU 4.1.1, see DESIGN.md):
//! - directories are passed as descriptors of *our* process
//!   (`images_dir_fd`; CRIU opens `/proc/<our pid>/fd/<n>`), while
//!   `inherit_fd` numbers are descriptors of the *criu* process, so those
//!   are copied into criu at known numbers;
//! - a response may carry `cr_errmsg` even on success: only `success`
//!   decides;
//! - with `rst_sibling` the restored root becomes a child of the process
//!   that started criu, i.e. of the caller, which can `waitpid` it.
//!
//! Calls are synchronous and block the calling thread until CRIU is done;
//! the criu process is always reaped before a call returns.

mod error;
mod log;
mod notify;
mod opts;
mod rpc;
mod spawn;

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ckpt_protocol::criu_pb::{self, CriuReq, CriuReqType, CriuResp};

pub use error::{CriuError, Op};
pub use notify::{NoNotify, NotifyEvent, NotifyHandler};
pub use opts::{CgMode, DumpOptions, InheritFd, RestoreOptions, DEFAULT_LOG_LEVEL};

use rpc::{Answer, SpawnExtras};

/// Where the project's install step puts CRIU; preferred over `PATH`.
pub const PREFERRED_CRIU: &str = "/usr/local/sbin/criu";

/// A CRIU binary to run requests against.
#[derive(Debug, Clone)]
pub struct Criu {
    bin: PathBuf,
}

/// CRIU's version as reported over RPC. Orders by (major, minor, sublevel,
/// extra); displays as CRIU does ("4.1.1").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriuVersion {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Sublevel (0 when CRIU does not report one).
    pub sublevel: u32,
    /// Extra level (0 when CRIU does not report one).
    pub extra: u32,
    /// Git id of a development build.
    pub gitid: Option<String>,
}

impl CriuVersion {
    /// Whether this version is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 || self.extra != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        if self.extra != 0 {
            write!(f, ".{}", self.extra)?;
        }
        if let Some(g) = &self.gitid {
            write!(f, " ({g})")?;
        }
        Ok(())
    }
}

/// Result of a successful dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpOutcome {
    /// `cr_errmsg` CRIU sent along with success (the first error line of
    /// its log, e.g. from a probe that failed harmlessly).
    pub note: Option<String>,
}

/// Result of a successful restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Real pid of the restored root. With `rst_sibling` it is our child.
    pub pid: i32,
    /// `cr_errmsg` CRIU sent along with success.
    pub note: Option<String>,
}

impl Criu {
    /// A client for the CRIU binary at `bin` (a bare name is looked up on
    /// `PATH` when spawned).
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    /// Finds CRIU: [`PREFERRED_CRIU`] if it is executable, else `criu` on
    /// `PATH`.
    pub fn locate() -> Result<Self, CriuError> {
        let preferred = Path::new(PREFERRED_CRIU);
        if is_executable(preferred) {
            return Ok(Self::new(preferred));
        }
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("criu"))
            .find(|p| is_executable(p))
            .map(Self::new)
            .ok_or_else(|| CriuError::NotFound {
                preferred: preferred.to_path_buf(),
            })
    }

    /// The binary this client runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// `criu check`: whether CRIU works on this kernel. On failure the
    /// error quotes CRIU's output (it logs to stderr for this call).
    pub fn check(&self) -> Result<(), CriuError> {
        let op = Op::Check;
        // CHECK goes through CRIU's option setup, which needs opts and an
        // images dir; "/" is only opened, nothing is written (log to stderr).
        let root = File::open("/").map_err(|source| CriuError::Io {
            op,
            what: "open / as the (unused) images dir",
            source,
        })?;
        let opts = criu_pb::CriuOpts {
            images_dir_fd: std::os::fd::AsRawFd::as_raw_fd(&root),
            log_to_stderr: Some(true),
            log_level: Some(2),
            ..Default::default()
        };
        let answer = self.call(
            op,
            SpawnExtras::default(),
            request(CriuReqType::Check, opts),
            &mut NoNotify,
        )?;
        if answer.resp.success {
            return Ok(());
        }
        Err(failed(op, answer, None))
    }

    /// CRIU's version.
    pub fn version(&self) -> Result<CriuVersion, CriuError> {
        let op = Op::Version;
        let req = CriuReq {
            r#type: CriuReqType::Version as i32,
            ..Default::default()
        };
        let answer = self.call(op, SpawnExtras::default(), |_| Ok(req), &mut NoNotify)?;
        if !answer.resp.success {
            return Err(failed(op, answer, None));
        }
        let v = answer.resp.version.ok_or_else(|| CriuError::Protocol {
            op,
            detail: "VERSION response without a version".to_string(),
        })?;
        let n = |x: i32| u32::try_from(x).unwrap_or(0);
        Ok(CriuVersion {
            major: n(v.major_number),
            minor: n(v.minor_number),
            sublevel: n(v.sublevel.unwrap_or(0)),
            extra: n(v.extra.unwrap_or(0)),
            gitid: v.gitid,
        })
    }

    /// Dumps the tree rooted at `opts.pid` into `opts.images_dir`. With
    /// `opts.notify_scripts`, `notify` sees each event while CRIU waits.
    pub fn dump(
        &self,
        opts: &DumpOptions<'_>,
        notify: &mut dyn NotifyHandler,
    ) -> Result<DumpOutcome, CriuError> {
        let op = Op::Dump { pid: opts.pid };
        let pb = opts.to_pb()?;
        let answer = self.call(
            op,
            SpawnExtras::default(),
            request(CriuReqType::Dump, pb),
            notify,
        )?;
        if !answer.resp.success || answer.refusal.is_some() {
            return Err(failed(op, answer, Some((opts.images_dir, &opts.log_file))));
        }
        Ok(DumpOutcome {
            note: answer.resp.cr_errmsg,
        })
    }

    /// Restores the tree saved in `opts.images_dir`. With `rst_sibling`
    /// (the default) the restored root is the caller's child: the caller
    /// must reap it.
    pub fn restore(
        &self,
        opts: &RestoreOptions<'_>,
        notify: &mut dyn NotifyHandler,
    ) -> Result<RestoreOutcome, CriuError> {
        let op = Op::Restore;
        let extras = SpawnExtras {
            inherit: opts.inherit_fd.iter().map(|i| i.fd.as_fd()).collect(),
            join_cgroup_procs: &opts.join_cgroup_procs,
        };
        let answer = self.call(
            op,
            extras,
            |child_fds| request(CriuReqType::Restore, opts.to_pb(child_fds)?)(child_fds),
            notify,
        )?;
        if !answer.resp.success {
            return Err(failed(op, answer, Some((opts.images_dir, &opts.log_file))));
        }
        if let Some(r) = &answer.refusal {
            // Only pre-resume / post-resume can be refused without CRIU
            // aborting; the tree runs, so it is the caller's to handle.
            tracing::warn!(refusal = %r, "criu restore went on despite a refused notification");
        }
        let pid = answer
            .resp
            .restore
            .map(|r| r.pid)
            .ok_or_else(|| CriuError::Protocol {
                op,
                detail: "successful RESTORE response without a pid".to_string(),
            })?;
        Ok(RestoreOutcome {
            pid,
            note: answer.resp.cr_errmsg,
        })
    }

    fn call(
        &self,
        op: Op,
        extras: SpawnExtras<'_>,
        make_req: impl FnOnce(&[i32]) -> Result<CriuReq, CriuError>,
        notify: &mut dyn NotifyHandler,
    ) -> Result<Answer, CriuError> {
        rpc::call(op, &self.bin, extras, make_req, notify)
    }
}

fn request(
    t: CriuReqType,
    opts: criu_pb::CriuOpts,
) -> impl FnOnce(&[i32]) -> Result<CriuReq, CriuError> {
    move |_| {
        Ok(CriuReq {
            r#type: t as i32,
            opts: Some(opts),
            ..Default::default()
        })
    }
}

/// Builds [`CriuError::Failed`] from a failed answer; `log` is the images
/// dir and log file name, when CRIU logs to a file.
fn failed(op: Op, answer: Answer, log: Option<(BorrowedFd<'_>, &str)>) -> CriuError {
    let Answer {
        resp,
        refusal,
        output,
    } = answer;
    let CriuResp {
        cr_errno,
        cr_errmsg,
        ..
    } = resp;
    let (log_path, log_excerpt) = match log {
        Some((dir, file)) => (
            Some(log::path_in_dir(dir, file)),
            log::excerpt_from_dir(dir, file),
        ),
        None => (None, log::excerpt(&output)),
    };
    // cr_errmsg is CRIU's *first* error line, which can be a harmless one
    // it logs on every run; then the log's first real error says more.
    let message = match cr_errmsg {
        Some(m) if !log::is_benign(&m) => m,
        other => log::first_real_error(&log_excerpt)
            .or(other)
            .unwrap_or_default(),
    };
    CriuError::Failed {
        op,
        errno: cr_errno.filter(|e| *e != 0),
        message,
        notify_refusal: refusal,
        log_path,
        log_excerpt,
    }
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_display_and_order() {
        let v = |major, minor, sublevel| CriuVersion {
            major,
            minor,
            sublevel,
            extra: 0,
            gitid: None,
        };
        assert_eq!(v(4, 1, 1).to_string(), "4.1.1");
        assert_eq!(v(4, 2, 0).to_string(), "4.2");
        assert!(v(4, 1, 1) > v(4, 1, 0));
        assert!(v(4, 1, 1).at_least(4, 1));
        assert!(!v(3, 17, 1).at_least(4, 1));
    }

    #[test]
    fn failed_display_quotes_the_log() {
        let e = CriuError::Failed {
            op: Op::Dump { pid: 1234 },
            errno: Some(95),
            message: "Can't get 1:16 opt".into(),
            notify_refusal: None,
            log_path: Some(PathBuf::from("/img/dump.log")),
            log_excerpt: vec!["(0.1) Error (sockets.c:1): Can't get 1:16 opt".into()],
        };
        let s = e.to_string();
        assert!(
            s.starts_with("criu dump of pid 1234 failed (errno 95: EOPNOTSUPP"),
            "{s}"
        );
        assert!(s.contains("\n  log /img/dump.log:\n    (0.1) Error"), "{s}");
    }
}
