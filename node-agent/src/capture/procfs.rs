//! Readers and parsers for the few `/proc` files a plan is built from.
//!
//! Parsers take text or bytes so they are unit-tested without processes;
//! readers map a vanished process to [`CaptureError::Vanished`] because a
//! tree that changes under a scan is not the frozen tree we were given.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::CaptureError;

/// One open descriptor of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FdEntry {
    pub fd: i32,
    /// What `readlink /proc/<pid>/fd/<fd>` says: a path, `pipe:[N]`, ...
    pub target: OsString,
    /// The `flags:` of `/proc/<pid>/fdinfo/<fd>` (open flags, octal there).
    pub flags: u32,
}

/// One file-backed line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
    pub path: PathBuf,
    /// The kernel appended ` (deleted)`: the file is unlinked, CRIU keeps it
    /// itself as a ghost file.
    pub deleted: bool,
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> CaptureError {
    CaptureError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// ENOENT/ESRCH on a pid's own /proc entry means the process is gone.
fn gone_or_io(pid: i32, what: &'static str, path: &Path, e: io::Error) -> CaptureError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        CaptureError::Vanished { pid }
    } else {
        io_err(what, path, e)
    }
}

/// Whether `pid` is a zombie (state `Z` in /proc/<pid>/stat).
pub(crate) fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

/// Children of every thread of `pid` (`/proc/<pid>/task/*/children`).
pub(crate) fn children(pid: i32) -> Result<Vec<i32>, CaptureError> {
    let task_dir = PathBuf::from(format!("/proc/{pid}/task"));
    let rd = fs::read_dir(&task_dir).map_err(|e| gone_or_io(pid, "list threads", &task_dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| gone_or_io(pid, "list threads", &task_dir, e))?;
        let file = ent.path().join("children");
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            // A thread that exited between readdir and read has no children.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue
            }
            Err(e) => return Err(io_err("read children", &file, e)),
        };
        for tok in text.split_ascii_whitespace() {
            let child = tok.parse::<i32>().map_err(|_| CaptureError::Parse {
                pid,
                file: file.clone(),
                line: text.clone(),
            })?;
            out.push(child);
        }
    }
    Ok(out)
}

/// The `flags:` value of an fdinfo file.
pub(crate) fn parse_fdinfo_flags(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// All open descriptors of `pid`. A descriptor closed during the scan is
/// skipped (only possible if the tree is not frozen).
pub(crate) fn fds(pid: i32) -> Result<Vec<FdEntry>, CaptureError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let rd = fs::read_dir(&dir).map_err(|e| gone_or_io(pid, "list fds", &dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| gone_or_io(pid, "list fds", &dir, e))?;
        let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let target = match fs::read_link(ent.path()) {
            Ok(t) => t.into_os_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("readlink fd", &ent.path(), e)),
        };
        let info = PathBuf::from(format!("/proc/{pid}/fdinfo/{fd}"));
        let text = match fs::read_to_string(&info) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read fdinfo", &info, e)),
        };
        let flags = parse_fdinfo_flags(&text).ok_or_else(|| CaptureError::Parse {
            pid,
            file: info.clone(),
            line: text.clone(),
        })?;
        out.push(FdEntry { fd, target, flags });
    }
    out.sort_by_key(|e| e.fd);
    Ok(out)
}

/// `pipe:[123]` -> 123 (same shape for `socket:[N]` with another prefix).
pub(crate) fn bracket_inode(target: &[u8], prefix: &[u8]) -> Option<u64> {
    let rest = target
        .strip_prefix(prefix)?
        .strip_prefix(b"[")?
        .strip_suffix(b"]")?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// The kernel escapes `\n` in map paths as `\012`; nothing else.
fn unescape_map_path(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i..].starts_with(b"\\012") {
            out.push(b'\n');
            i += 4;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

/// Parses one line of `/proc/<pid>/maps`; `None` for anonymous and special
/// (`[heap]`, `[vdso]`, ...) mappings.
/// `addr perms offset major:minor inode<spaces>path`
pub(crate) fn parse_maps_line(line: &[u8]) -> Option<MapEntry> {
    let mut rest = line;
    let mut fields: [&[u8]; 5] = [&[]; 5];
    for f in fields.iter_mut() {
        let start = rest.iter().position(|b| *b != b' ')?;
        rest = &rest[start..];
        let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
        *f = &rest[..end];
        rest = &rest[end..];
    }
    let start = rest.iter().position(|b| *b != b' ')?;
    let raw_path = &rest[start..];
    if raw_path.first() != Some(&b'/') {
        return None;
    }
    let (maj, min) = std::str::from_utf8(fields[3]).ok()?.split_once(':')?;
    let major = u32::from_str_radix(maj, 16).ok()?;
    let minor = u32::from_str_radix(min, 16).ok()?;
    let inode = std::str::from_utf8(fields[4]).ok()?.parse().ok()?;
    let (raw_path, deleted) = match raw_path.strip_suffix(b" (deleted)") {
        Some(p) => (p, true),
        None => (raw_path, false),
    };
    let path = PathBuf::from(OsString::from_vec(unescape_map_path(raw_path)));
    Some(MapEntry {
        major,
        minor,
        inode,
        path,
        deleted,
    })
}

/// File-backed mappings of `pid`, one entry per distinct (path, inode).
pub(crate) fn maps(pid: i32) -> Result<Vec<MapEntry>, CaptureError> {
    let file = PathBuf::from(format!("/proc/{pid}/maps"));
    let bytes = fs::read(&file).map_err(|e| gone_or_io(pid, "read maps", &file, e))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        if let Some(m) = parse_maps_line(line) {
            if seen.insert((m.path.clone(), m.inode, m.deleted)) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// `(inode, path)` of every socket in a `/proc/net/unix` text that is bound
/// to a filesystem path (abstract `@name` and unnamed sockets are left out).
pub(crate) fn parse_net_unix(text: &[u8]) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n').skip(1) {
        // Num RefCount Protocol Flags Type St Inode [Path]; the path may hold spaces.
        let mut rest = line;
        let mut inode = None;
        for i in 0..7 {
            let Some(start) = rest.iter().position(|b| *b != b' ') else {
                break;
            };
            rest = &rest[start..];
            let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
            if i == 6 {
                inode = std::str::from_utf8(&rest[..end])
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
            }
            rest = &rest[end..];
        }
        let (Some(inode), Some(start)) = (inode, rest.iter().position(|b| *b != b' ')) else {
            continue;
        };
        let path = &rest[start..];
        if path.first() == Some(&b'/') {
            out.push((inode, PathBuf::from(std::ffi::OsStr::from_bytes(path))));
        }
    }
    out
}

/// Reads `/proc/<pid>/net/unix` (the unix sockets of `pid`'s netns).
pub(crate) fn net_unix(pid: i32) -> Result<Vec<(u64, PathBuf)>, CaptureError> {
    let file = PathBuf::from(format!("/proc/{pid}/net/unix"));
    let bytes = fs::read(&file).map_err(|e| gone_or_io(pid, "read net/unix", &file, e))?;
    Ok(parse_net_unix(&bytes))
}

/// `(name, value)` of the environment `pid` was exec'd with.
pub(crate) fn environ(pid: i32) -> Result<Vec<(OsString, OsString)>, CaptureError> {
    let file = PathBuf::from(format!("/proc/{pid}/environ"));
    let bytes = fs::read(&file).map_err(|e| gone_or_io(pid, "read environ", &file, e))?;
    Ok(parse_environ(&bytes))
}

pub(crate) fn parse_environ(bytes: &[u8]) -> Vec<(OsString, OsString)> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|kv| {
            kv.iter()
                .position(|b| *b == b'=')
                .map(|i| (&kv[..i], &kv[i + 1..]))
        })
        .map(|(k, v)| {
            (
                OsString::from_vec(k.to_vec()),
                OsString::from_vec(v.to_vec()),
            )
        })
        .collect()
}

/// `readlink /proc/<pid>/<name>` (`cwd`, `ns/net`, ...).
pub(crate) fn link(pid: i32, name: &str) -> Result<OsString, CaptureError> {
    let file = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read_link(&file)
        .map(PathBuf::into_os_string)
        .map_err(|e| gone_or_io(pid, "readlink", &file, e))
}

/// `stat` through `/proc/<pid>/fd/<fd>`: the open file itself, whatever its
/// path now names.
pub(crate) fn fd_metadata(pid: i32, fd: i32) -> Result<Option<fs::Metadata>, CaptureError> {
    let file = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    match fs::metadata(&file) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat fd", &file, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_flags() {
        let t = "pos:\t0\nflags:\t02102001\nmnt_id:\t25\nino:\t7\n";
        assert_eq!(parse_fdinfo_flags(t), Some(0o2102001));
        assert_eq!(parse_fdinfo_flags("pos: 0\n"), None);
    }

    #[test]
    fn bracket_inodes() {
        assert_eq!(bracket_inode(b"pipe:[21182]", b"pipe:"), Some(21182));
        assert_eq!(bracket_inode(b"socket:[7]", b"pipe:"), None);
        assert_eq!(bracket_inode(b"pipe:[x]", b"pipe:"), None);
    }

    #[test]
    fn maps_lines() {
        let l = b"7f0000000000-7f0000400000 rw-s 00000000 00:19 12345                      /dev/shm/vader_segment.vm.0.2c320001.0";
        let m = parse_maps_line(l).unwrap();
        assert_eq!((m.major, m.minor, m.inode), (0, 0x19, 12345));
        assert_eq!(
            m.path,
            PathBuf::from("/dev/shm/vader_segment.vm.0.2c320001.0")
        );
        assert!(!m.deleted);

        let l = b"7f00-7f01 rw-s 00000000 00:19 99 /dev/shm/ucx shm posix (deleted)";
        let m = parse_maps_line(l).unwrap();
        assert_eq!(m.path, PathBuf::from("/dev/shm/ucx shm posix"));
        assert!(m.deleted);

        let l = b"7f00-7f01 rw-p 00000000 08:01 5 /tmp/a\\012b";
        assert_eq!(parse_maps_line(l).unwrap().path, PathBuf::from("/tmp/a\nb"));

        assert!(parse_maps_line(b"7f00-7f01 rw-p 00000000 00:00 0 ").is_none());
        assert!(parse_maps_line(b"7f00-7f01 rw-p 00000000 00:00 0").is_none());
        assert!(parse_maps_line(
            b"7ffd-7ffe rw-p 00000000 00:00 0                          [stack]"
        )
        .is_none());
    }

    #[test]
    fn net_unix_lines() {
        let t = b"Num       RefCount Protocol Flags    Type St Inode Path\n\
00000000a9f0ec97: 00000002 00000000 00000000 0002 01 22880 @da655\n\
0000000011111111: 00000002 00000000 00010000 0001 01 30001 /tmp/pmix sock\n\
0000000022222222: 00000003 00000000 00000000 0001 03 30002\n";
        assert_eq!(
            parse_net_unix(t),
            vec![(30001, PathBuf::from("/tmp/pmix sock"))]
        );
    }

    #[test]
    fn environ() {
        let v = parse_environ(b"A=1\0B=/tmp/x=y\0junk\0");
        let o = OsString::from;
        assert_eq!(v, vec![(o("A"), o("1")), (o("B"), o("/tmp/x=y"))]);
    }
}
