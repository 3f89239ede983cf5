//! Creating files below a trusted directory without ever following a
//! symlink on the way down.
//!
//! The agent restores node-local files as root into directories such as
//! `/dev/shm` and `/tmp` that every user can write to. Resolving
//! `/tmp/ompi.n1.1000/x` with `open()` would follow a symlink a user planted at
//! `/tmp/ompi.n1.1000` and write wherever it points. So we walk one component
//! at a time with `openat(O_NOFOLLOW | O_DIRECTORY)` from a directory fd, and
//! create the last component relative to its parent's fd.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchownat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// What stops a walk below the root.
#[derive(Debug)]
pub enum WalkError {
    /// A parent component is missing.
    Missing(String),
    /// A parent component is a symlink or not a directory.
    NotADirectory(String),
    Io(String, io::Error),
}

/// An open directory to create things in.
#[derive(Debug)]
pub struct Dir(OwnedFd);

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful openat(2) and nothing
    // else holds it, so the OwnedFd is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn raw_io(e: Errno) -> io::Error {
    io::Error::from(e)
}

impl Dir {
    /// Opens a trusted root (symlinks in `root` itself are followed: it comes
    /// from configuration, not from a user).
    pub fn open_root(root: &Path) -> io::Result<Dir> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(root)?;
        Ok(Dir(OwnedFd::from(f)))
    }

    /// Walks `components` down from `self`, refusing symlinks and
    /// non-directories. `shown` prefixes the components in error messages.
    pub fn walk(&self, shown: &Path, components: &[&str]) -> Result<Dir, WalkError> {
        let mut cur = self
            .0
            .try_clone()
            .map_err(|e| WalkError::Io(shown.display().to_string(), e))?;
        let mut at = shown.to_path_buf();
        for c in components {
            at.push(c);
            let fd = openat(
                Some(cur.as_raw_fd()),
                OsStr::new(c),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            );
            cur = match fd {
                Ok(fd) => owned(fd),
                Err(Errno::ENOENT) => return Err(WalkError::Missing(at.display().to_string())),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(WalkError::NotADirectory(at.display().to_string()))
                }
                Err(e) => return Err(WalkError::Io(at.display().to_string(), raw_io(e))),
            };
        }
        Ok(Dir(cur))
    }

    fn kind_of(&self, name: &str) -> io::Result<Option<SFlag>> {
        match fstatat(
            Some(self.0.as_raw_fd()),
            OsStr::new(name),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(SFlag::from_bits_truncate(
                st.st_mode & SFlag::S_IFMT.bits(),
            ))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(raw_io(e)),
        }
    }

    /// Makes `name` a directory (replacing a file or symlink there) with the
    /// given owner and mode; an existing directory is kept and re-owned.
    pub fn ensure_dir(&self, name: &str, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
        match self.kind_of(name)? {
            Some(SFlag::S_IFDIR) => {}
            Some(_) => {
                unlinkat(
                    Some(self.0.as_raw_fd()),
                    OsStr::new(name),
                    UnlinkatFlags::NoRemoveDir,
                )
                .map_err(raw_io)?;
                self.mkdir(name)?;
            }
            None => self.mkdir(name)?,
        }
        let fd = openat(
            Some(self.0.as_raw_fd()),
            OsStr::new(name),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(raw_io)?;
        let dir = File::from(owned(fd));
        std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))?;
        dir.set_permissions(std::fs::Permissions::from_mode(mode))
    }

    fn mkdir(&self, name: &str) -> io::Result<()> {
        match mkdirat(
            Some(self.0.as_raw_fd()),
            OsStr::new(name),
            Mode::from_bits_truncate(0o700),
        ) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(raw_io(e)),
        }
    }

    /// Creates a fresh temporary file next to `name`; [`Dir::replace`] moves
    /// it into place.
    pub fn create_temp(&self) -> io::Result<(String, File)> {
        loop {
            let tmp = temp_name();
            match openat(
                Some(self.0.as_raw_fd()),
                OsStr::new(&tmp),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => return Ok((tmp, File::from(owned(fd)))),
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(raw_io(e)),
            }
        }
    }

    /// Creates a symlink under a temporary name and gives it an owner.
    pub fn create_temp_symlink(&self, target: &[u8], uid: u32, gid: u32) -> io::Result<String> {
        loop {
            let tmp = temp_name();
            match symlinkat(
                OsStr::from_bytes(target),
                Some(self.0.as_raw_fd()),
                OsStr::new(&tmp),
            ) {
                Ok(()) => {
                    if let Err(e) = fchownat(
                        Some(self.0.as_raw_fd()),
                        OsStr::new(&tmp),
                        Some(Uid::from_raw(uid)),
                        Some(Gid::from_raw(gid)),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    ) {
                        self.remove_temp(&tmp);
                        return Err(raw_io(e));
                    }
                    return Ok(tmp);
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(raw_io(e)),
            }
        }
    }

    /// Creates an empty FIFO under a temporary name with its mode and owner.
    pub fn create_temp_fifo(&self, mode: u32, uid: u32, gid: u32) -> io::Result<String> {
        loop {
            let tmp = temp_name();
            match nix::sys::stat::mknodat(
                Some(self.0.as_raw_fd()),
                OsStr::new(&tmp),
                nix::sys::stat::SFlag::S_IFIFO,
                Mode::from_bits_truncate(0o600),
                0,
            ) {
                Ok(()) => {
                    // Owner first: chown clears set-id bits.
                    let set = fchownat(
                        Some(self.0.as_raw_fd()),
                        OsStr::new(&tmp),
                        Some(Uid::from_raw(uid)),
                        Some(Gid::from_raw(gid)),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .and_then(|()| {
                        nix::sys::stat::fchmodat(
                            Some(self.0.as_raw_fd()),
                            OsStr::new(&tmp),
                            Mode::from_bits_truncate(mode),
                            nix::sys::stat::FchmodatFlags::FollowSymlink,
                        )
                    });
                    if let Err(e) = set {
                        self.remove_temp(&tmp);
                        return Err(raw_io(e));
                    }
                    return Ok(tmp);
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(raw_io(e)),
            }
        }
    }

    /// Atomically puts `tmp` in place of `name`. A file or symlink at `name`
    /// is replaced (rename never follows it); a directory there is an error.
    pub fn replace(&self, tmp: &str, name: &str) -> io::Result<()> {
        let fd = Some(self.0.as_raw_fd());
        renameat(fd, OsStr::new(tmp), fd, OsStr::new(name)).map_err(|e| {
            self.remove_temp(tmp);
            raw_io(e)
        })
    }

    /// Best effort: the temporary name is only litter if this fails.
    pub fn remove_temp(&self, tmp: &str) {
        let _ = unlinkat(
            Some(self.0.as_raw_fd()),
            OsStr::new(tmp),
            UnlinkatFlags::NoRemoveDir,
        );
    }
}

fn temp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        ".ckpt-unpack.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
