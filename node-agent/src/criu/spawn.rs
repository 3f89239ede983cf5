//! What the forked criu child does before exec.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::stat::Mode;

/// Runs in the forked child before exec: async-signal-safe calls only, no
/// allocation (the parent may be multithreaded).
pub(crate) fn child_setup(keep: &[RawFd], cgroup_procs: &[CString]) -> io::Result<()> {
    for fd in keep {
        fcntl(*fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    }
    if cgroup_procs.is_empty() {
        return Ok(());
    }
    let mut digits = [0u8; 16];
    let pid = format_pid(nix::unistd::getpid().as_raw(), &mut digits);
    for path in cgroup_procs {
        let raw = nix::fcntl::open(
            path.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: `open` just returned `raw`; nothing else owns it. Dropping
        // an OwnedFd only calls close(2), which is async-signal-safe.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let n = nix::unistd::write(&fd, pid)?;
        if n != pid.len() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
    Ok(())
}

/// Decimal digits of `pid` in `buf`, without allocating.
fn format_pid(pid: i32, buf: &mut [u8; 16]) -> &[u8] {
    let mut v = pid.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        // `v % 10` < 10, so the cast cannot truncate.
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_pids() {
        let mut b = [0u8; 16];
        assert_eq!(format_pid(0, &mut b), b"0");
        assert_eq!(format_pid(7, &mut b), b"7");
        assert_eq!(format_pid(4194304, &mut b), b"4194304");
    }
}
