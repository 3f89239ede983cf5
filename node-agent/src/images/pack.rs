//! The pack format: many small files in one, so that a parallel filesystem
//! sees a few large writes instead of a metadata storm.
//!
//! ```text
//! "CKPTPACK"  u32 version (= 1)
//! entry*      u16 name_len, name (UTF-8), u32 mode, u32 uid, u32 gid,
//!             u8 kind (0 file, 1 dir, 2 symlink, 3 fifo), u64 size, data[size]
//! end         an entry with name_len 0, mode/uid/gid 0, kind 0xFF, size 32,
//!             whose data is the BLAKE3 hash of every byte before that data
//! ```
//!
//! All integers are little endian; nothing may follow the end entry. `mode`
//! holds the permission bits (`st_mode & 0o7777`); a symlink's data is its
//! target; a fifo has no data (it is recreated empty: CRIU saves what is
//! queued in it with the process that has it open). The trailing hash makes a pack self-checking (a truncated or
//! damaged pack is refused even where no manifest is at hand); the epoch
//! manifest still carries its own digest of the whole file.
//!
//! Two flavours share the format: [`pack_dir`] packs a flat directory (CRIU's
//! image dir) under plain names, and [`pack_paths`] packs node-local absolute
//! paths, restored by [`unpack_paths`] only below allowed roots and without
//! following symlinks (see [`super::beneath`]).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::beneath::{Dir, WalkError};

pub const MAGIC: &[u8; 8] = b"CKPTPACK";
pub const VERSION: u32 = 1;
const IO_BUF: usize = 1 << 20;
const KIND_FILE: u8 = 0;
const KIND_DIR: u8 = 1;
const KIND_SYMLINK: u8 = 2;
const KIND_FIFO: u8 = 3;
const KIND_END: u8 = 0xFF;
/// Longest symlink target we accept (PATH_MAX).
const MAX_LINK: u64 = 4096;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Fifo,
}

/// One entry's header, as [`list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: EntryKind,
    /// Bytes of data (file content, or symlink target length).
    pub size: u64,
}

/// What a pack or unpack moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    pub entries: u64,
    /// Sum of the entries' data sizes.
    pub data_bytes: u64,
    /// Size of the pack file.
    pub pack_bytes: u64,
}

/// Why a pack could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot create pack {pack}: {source}")]
    Create { pack: PathBuf, source: io::Error },
    #[error("cannot write pack {pack}: {source}")]
    Write { pack: PathBuf, source: io::Error },
    #[error("cannot read {path} to pack it into {pack}: {source}")]
    Read {
        pack: PathBuf,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} changed while being packed into {pack}: {what}")]
    Changed {
        pack: PathBuf,
        path: PathBuf,
        what: String,
    },
    #[error("cannot pack {path} into {pack}: {reason}")]
    Unsupported {
        pack: PathBuf,
        path: PathBuf,
        reason: &'static str,
    },
}

/// Why a pack could not be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read pack {pack} at {entry}: {source}")]
    Read {
        pack: PathBuf,
        entry: String,
        source: io::Error,
    },
    #[error("pack {pack} is truncated at {entry}: {detail}")]
    Truncated {
        pack: PathBuf,
        entry: String,
        detail: String,
    },
    #[error("pack {pack} is corrupt at {entry}: {detail}")]
    Corrupt {
        pack: PathBuf,
        entry: String,
        detail: String,
    },
    #[error("pack {pack}, {entry}: refusing to restore it: {reason}")]
    Refused {
        pack: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("cannot {op} {path} from pack {pack}: {source}")]
    Io {
        pack: PathBuf,
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

// ---------------------------------------------------------------- writing

/// Hashes whatever passes through, so the end entry can carry the digest.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct PackWriter {
    out: BufWriter<Hashing<File>>,
    pack: PathBuf,
    stats: PackStats,
}

impl PackWriter {
    /// Creates `pack` exclusively (never overwrites, never follows a symlink).
    fn create(pack: &Path) -> Result<Self, PackError> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(pack)
            .map_err(|source| PackError::Create {
                pack: pack.to_path_buf(),
                source,
            })?;
        let mut w = PackWriter {
            out: BufWriter::with_capacity(
                IO_BUF,
                Hashing {
                    inner: file,
                    hasher: blake3::Hasher::new(),
                    written: 0,
                },
            ),
            pack: pack.to_path_buf(),
            stats: PackStats::default(),
        };
        w.write(MAGIC)?;
        w.write(&VERSION.to_le_bytes())?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PackError> {
        self.out
            .write_all(bytes)
            .map_err(|source| PackError::Write {
                pack: self.pack.clone(),
                source,
            })
    }

    fn header(
        &mut self,
        name: &str,
        meta: &fs::Metadata,
        kind: u8,
        size: u64,
    ) -> Result<(), PackError> {
        let len = u16::try_from(name.len()).map_err(|_| PackError::Unsupported {
            pack: self.pack.clone(),
            path: PathBuf::from(name),
            reason: "name longer than 65535 bytes",
        })?;
        let mut h = Vec::with_capacity(2 + name.len() + 25);
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&(meta.mode() & 0o7777).to_le_bytes());
        h.extend_from_slice(&meta.uid().to_le_bytes());
        h.extend_from_slice(&meta.gid().to_le_bytes());
        h.push(kind);
        h.extend_from_slice(&size.to_le_bytes());
        self.write(&h)?;
        self.stats.entries += 1;
        self.stats.data_bytes += size;
        Ok(())
    }

    /// Adds a regular file, opened without following a symlink.
    fn add_file(&mut self, name: &str, path: &Path) -> Result<(), PackError> {
        let pack = self.pack.clone();
        let read_err = |source| PackError::Read {
            pack: pack.clone(),
            path: path.to_path_buf(),
            source,
        };
        let file = fs::OpenOptions::new()
            .read(true)
            // O_NONBLOCK: a fifo swapped in after the listing must not hang us.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(PackError::Changed {
                pack: self.pack.clone(),
                path: path.to_path_buf(),
                what: "it is no longer a regular file".into(),
            });
        }
        let size = meta.len();
        self.header(name, &meta, KIND_FILE, size)?;
        let mut src = file.take(size);
        let copied = copy(&mut src, &mut self.out).map_err(|e| match e {
            CopyError::Read(source) => PackError::Read {
                pack: self.pack.clone(),
                path: path.to_path_buf(),
                source,
            },
            CopyError::Write(source) => PackError::Write {
                pack: self.pack.clone(),
                source,
            },
        })?;
        let now = src.into_inner().metadata().map_err(read_err)?.len();
        if copied != size || now != size {
            return Err(PackError::Changed {
                pack: self.pack.clone(),
                path: path.to_path_buf(),
                what: format!("size was {size} bytes, read {copied}, now {now}"),
            });
        }
        Ok(())
    }

    fn add_meta_only(
        &mut self,
        name: &str,
        meta: &fs::Metadata,
        kind: u8,
        data: &[u8],
    ) -> Result<(), PackError> {
        self.header(name, meta, kind, data.len() as u64)?;
        self.write(data)
    }

    /// Writes the end entry and makes the pack durable.
    fn finish(mut self) -> Result<PackStats, PackError> {
        let mut end = Vec::with_capacity(23);
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&[0u8; 12]);
        end.push(KIND_END);
        end.extend_from_slice(&32u64.to_le_bytes());
        self.write(&end)?;
        let write_err = |pack: &Path, source| PackError::Write {
            pack: pack.to_path_buf(),
            source,
        };
        self.out.flush().map_err(|e| write_err(&self.pack, e))?;
        let digest = self.out.get_ref().hasher.finalize();
        self.write(digest.as_bytes())?;
        let pack = self.pack;
        let hashing = self
            .out
            .into_inner()
            .map_err(|e| write_err(&pack, e.into_error()))?;
        hashing.inner.sync_all().map_err(|e| write_err(&pack, e))?;
        self.stats.pack_bytes = hashing.written;
        Ok(self.stats)
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

fn copy(src: &mut impl Read, dst: &mut impl Write) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; IO_BUF];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        dst.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

/// Packs the regular files of the flat directory `src_dir` whose names pass
/// `filter`, sorted by name, into the new file `out` (which must not exist),
/// and fsyncs it. Anything that is not a regular file is skipped.
pub fn pack_dir(
    src_dir: &Path,
    out: &Path,
    filter: impl Fn(&str) -> bool,
) -> Result<PackStats, PackError> {
    let read_err = |source| PackError::Read {
        pack: out.to_path_buf(),
        path: src_dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(src_dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if !entry.file_type().map_err(read_err)?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(PackError::Unsupported {
                pack: out.to_path_buf(),
                path: entry.path(),
                reason: "the name is not UTF-8",
            });
        };
        if filter(name) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    let mut w = PackWriter::create(out)?;
    for name in &names {
        w.add_file(name, &src_dir.join(name))?;
    }
    w.finish()
}

/// Packs node-local absolute paths: files, directories (recursively, each
/// before its content), symlinks (as links) and fifos (empty). Sockets and
/// devices are skipped. A path given twice, or inside another given path, is packed
/// once.
pub fn pack_paths(paths: &[PathBuf], out: &Path) -> Result<PackStats, PackError> {
    let mut names = Vec::with_capacity(paths.len());
    for p in paths {
        names.push(clean_abs(p).ok_or_else(|| PackError::Unsupported {
            pack: out.to_path_buf(),
            path: p.clone(),
            reason: "not a clean absolute UTF-8 path",
        })?);
    }
    let mut w = PackWriter::create(out)?;
    let mut seen = BTreeSet::new();
    for name in names {
        add_tree(&mut w, &name, &mut seen)?;
    }
    w.finish()
}

/// `/a/b` for an absolute path without `..`, or None.
fn clean_abs(p: &Path) -> Option<String> {
    let mut s = String::new();
    let mut comps = p.components();
    if comps.next() != Some(Component::RootDir) {
        return None;
    }
    for c in comps {
        match c {
            Component::Normal(n) => {
                s.push('/');
                s.push_str(n.to_str()?);
            }
            _ => return None,
        }
    }
    if s.is_empty() || s.contains('\0') {
        return None;
    }
    Some(s)
}

fn add_tree(w: &mut PackWriter, name: &str, seen: &mut BTreeSet<String>) -> Result<(), PackError> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path = Path::new(name);
    let pack = w.pack.clone();
    let read_err = |source| PackError::Read {
        pack: pack.clone(),
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(read_err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        w.add_file(name, path)
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(read_err)?;
        w.add_meta_only(name, &meta, KIND_SYMLINK, target.as_os_str().as_bytes())
    } else if ft.is_dir() {
        w.add_meta_only(name, &meta, KIND_DIR, &[])?;
        let mut children = Vec::new();
        for entry in fs::read_dir(path).map_err(read_err)? {
            let child = entry.map_err(read_err)?.path();
            children.push(clean_abs(&child).ok_or_else(|| PackError::Unsupported {
                pack: w.pack.clone(),
                path: child.clone(),
                reason: "the name is not UTF-8",
            })?);
        }
        children.sort();
        for child in children {
            add_tree(w, &child, seen)?;
        }
        Ok(())
    } else if ft.is_fifo() {
        // A job's fifo (e.g. Open MPI's debugger_attach_fifo) must exist at
        // restore: CRIU reopens it by path.
        w.add_meta_only(name, &meta, KIND_FIFO, &[])
    } else {
        tracing::debug!(path = %path.display(), "not packing a socket or device");
        Ok(())
    }
}

// ---------------------------------------------------------------- reading

/// Reads a pack entry by entry, hashing as it goes.
struct PackReader {
    r: BufReader<File>,
    pack: PathBuf,
    hasher: blake3::Hasher,
    /// Bytes left in the file after what was consumed.
    left: u64,
    /// 1-based index and name of the current entry, for error messages.
    index: u64,
    name: Option<String>,
}

impl PackReader {
    fn open(pack: &Path) -> Result<Self, UnpackError> {
        let open_err = |source| UnpackError::Read {
            pack: pack.to_path_buf(),
            entry: "open".into(),
            source,
        };
        let file = File::open(pack).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let mut r = PackReader {
            r: BufReader::with_capacity(IO_BUF, file),
            pack: pack.to_path_buf(),
            hasher: blake3::Hasher::new(),
            left: len,
            index: 0,
            name: None,
        };
        let mut head = [0u8; 12];
        r.read_exact(&mut head, "the header")?;
        if &head[..8] != MAGIC {
            return Err(r.corrupt("not a ckpt pack (bad magic)".into()));
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(r.corrupt(format!(
                "pack version {version} is not supported (this ckpt reads version {VERSION})"
            )));
        }
        Ok(r)
    }

    fn at(&self) -> String {
        match (&self.name, self.index) {
            (_, 0) => "the file header".into(),
            (Some(n), i) => format!("entry #{i} {n:?}"),
            (None, i) => format!("entry #{i}"),
        }
    }

    fn corrupt(&self, detail: String) -> UnpackError {
        UnpackError::Corrupt {
            pack: self.pack.clone(),
            entry: self.at(),
            detail,
        }
    }

    fn truncated(&self, detail: String) -> UnpackError {
        UnpackError::Truncated {
            pack: self.pack.clone(),
            entry: self.at(),
            detail,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), UnpackError> {
        if (buf.len() as u64) > self.left {
            return Err(self.truncated(format!("the file ends inside {what}")));
        }
        self.r.read_exact(buf).map_err(|source| UnpackError::Read {
            pack: self.pack.clone(),
            entry: self.at(),
            source,
        })?;
        self.hasher.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }

    /// The next entry, or None after a valid end entry.
    fn next(&mut self) -> Result<Option<Entry>, UnpackError> {
        self.index += 1;
        self.name = None;
        let mut len = [0u8; 2];
        if self.left == 0 {
            return Err(self.truncated("the end marker is missing".into()));
        }
        self.read_exact(&mut len, "an entry header")?;
        let len = usize::from(u16::from_le_bytes(len));
        let mut name = vec![0u8; len];
        self.read_exact(&mut name, "an entry name")?;
        let mut fixed = [0u8; 21];
        self.read_exact(&mut fixed, "an entry header")?;
        let u32_at =
            |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let (mode, uid, gid, kind) = (u32_at(0), u32_at(4), u32_at(8), fixed[12]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&fixed[13..21]);
        let size = u64::from_le_bytes(size);

        if len == 0 {
            if kind != KIND_END || size != 32 {
                return Err(self.corrupt(format!("empty name with kind {kind} and size {size}")));
            }
            let expected = self.hasher.finalize();
            let mut stored = [0u8; 32];
            self.read_exact(&mut stored, "the end marker")?;
            if blake3::Hash::from(stored) != expected {
                return Err(
                    self.corrupt("checksum mismatch: the pack was altered or damaged".into())
                );
            }
            if self.left != 0 {
                return Err(self.corrupt(format!("{} bytes follow the end marker", self.left)));
            }
            return Ok(None);
        }
        let name =
            String::from_utf8(name).map_err(|_| self.corrupt("the name is not UTF-8".into()))?;
        self.name = Some(name.clone());
        let kind = match kind {
            KIND_FILE => EntryKind::File,
            KIND_DIR if size == 0 => EntryKind::Dir,
            KIND_SYMLINK if size > 0 && size <= MAX_LINK => EntryKind::Symlink,
            KIND_FIFO if size == 0 => EntryKind::Fifo,
            KIND_DIR | KIND_SYMLINK | KIND_FIFO => {
                return Err(self.corrupt(format!("impossible size {size}")))
            }
            other => return Err(self.corrupt(format!("unknown kind {other}"))),
        };
        if mode & !0o7777 != 0 {
            return Err(self.corrupt(format!("impossible mode {mode:o}")));
        }
        if size > self.left {
            return Err(self.truncated(format!(
                "it holds {size} bytes but only {} are left in the file",
                self.left
            )));
        }
        Ok(Some(Entry {
            name,
            mode,
            uid,
            gid,
            kind,
            size,
        }))
    }

    /// Streams the current entry's `size` bytes of data to `sink`.
    fn data(
        &mut self,
        size: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), UnpackError>,
    ) -> Result<(), UnpackError> {
        let mut left = size;
        while left > 0 {
            let buf = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(UnpackError::Read {
                        pack: self.pack.clone(),
                        entry: self.at(),
                        source,
                    })
                }
            };
            if buf.is_empty() {
                return Err(self.truncated(format!("{left} bytes of data are missing")));
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            self.hasher.update(&buf[..n]);
            sink(&buf[..n])?;
            self.r.consume(n);
            left -= n as u64;
            self.left = self.left.saturating_sub(n as u64);
        }
        Ok(())
    }

    fn small_data(&mut self, size: u64) -> Result<Vec<u8>, UnpackError> {
        let mut v = Vec::new();
        self.data(size, |b| {
            v.extend_from_slice(b);
            Ok(())
        })?;
        Ok(v)
    }
}

/// The entries of a pack, after checking it whole (including its checksum).
pub fn list(pack: &Path) -> Result<Vec<Entry>, UnpackError> {
    let mut r = PackReader::open(pack)?;
    let mut entries = Vec::new();
    while let Some(e) = r.next()? {
        r.data(e.size, |_| Ok(()))?;
        entries.push(e);
    }
    Ok(entries)
}

/// Unpacks a flat pack into the existing directory `dest_dir`. Every file is
/// created new (O_EXCL, O_NOFOLLOW) with mode 0600; names with `/`, `..`,
/// NUL, or empty are refused, and so are directory and symlink entries.
/// On error, files already written stay: the caller drops `dest_dir`.
pub fn unpack_to_dir(pack: &Path, dest_dir: &Path) -> Result<PackStats, UnpackError> {
    let mut r = PackReader::open(pack)?;
    let mut stats = PackStats::default();
    while let Some(e) = r.next()? {
        if let Err(reason) = flat_name_ok(&e.name) {
            return Err(refused(&r, reason.into()));
        }
        if e.kind != EntryKind::File {
            return Err(refused(
                &r,
                format!("a flat pack holds only files, not {:?}", e.kind),
            ));
        }
        let path = dest_dir.join(&e.name);
        let io_err = |op, source| UnpackError::Io {
            pack: pack.to_path_buf(),
            op,
            path: path.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|s| io_err("create", s))?;
        let mut out = BufWriter::with_capacity(IO_BUF, file);
        r.data(e.size, |b| out.write_all(b).map_err(|s| io_err("write", s)))?;
        out.flush().map_err(|s| io_err("write", s))?;
        stats.entries += 1;
        stats.data_bytes += e.size;
    }
    stats.pack_bytes = fs::metadata(pack).map(|m| m.len()).unwrap_or(0);
    Ok(stats)
}

fn flat_name_ok(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name.contains('/') {
        Err("the name contains '/'")
    } else if name.contains("..") {
        Err("the name contains '..'")
    } else if name.contains('\0') {
        Err("the name contains NUL")
    } else if name == "." {
        Err("the name is '.'")
    } else {
        Ok(())
    }
}

fn refused(r: &PackReader, reason: String) -> UnpackError {
    UnpackError::Refused {
        pack: r.pack.clone(),
        entry: r.at(),
        reason,
    }
}

/// Restores a [`pack_paths`] pack: each absolute path must lie strictly below
/// one of `allowed_roots` and have no `.`/`..`/empty component. Parents are
/// walked without following symlinks and must exist (or come earlier in the
/// pack). Directories are created or re-owned; files and symlinks replace
/// whatever non-directory is there (atomically, via a temporary name and
/// rename), with the packed content, mode, uid and gid.
///
/// Restore verifies the pack's manifest digest before calling this; the
/// pack's own checksum is only known at its end, after earlier entries were
/// restored.
pub fn unpack_paths(pack: &Path, allowed_roots: &[&Path]) -> Result<PackStats, UnpackError> {
    let roots: Vec<(Vec<String>, &Path)> = allowed_roots
        .iter()
        .filter_map(|root| {
            let clean = clean_abs(root)?;
            Some((clean.split('/').skip(1).map(str::to_owned).collect(), *root))
        })
        .collect();
    let mut r = PackReader::open(pack)?;
    let mut stats = PackStats::default();
    while let Some(e) = r.next()? {
        let comps = abs_components(&e.name).map_err(|reason| refused(&r, reason.into()))?;
        let Some((root_len, root)) = roots
            .iter()
            .filter(|(rc, _)| comps.len() > rc.len() && comps[..rc.len()] == rc[..])
            .max_by_key(|(rc, _)| rc.len())
            .map(|(rc, root)| (rc.len(), *root))
        else {
            return Err(refused(&r, "it is not below any allowed root".into()));
        };
        let (parents, last) = match comps[root_len..].split_last() {
            Some((last, parents)) => (parents, *last),
            None => return Err(refused(&r, "it is an allowed root itself".into())),
        };
        let path = PathBuf::from(&e.name);
        let io_err = |op, source| UnpackError::Io {
            pack: pack.to_path_buf(),
            op,
            path: path.clone(),
            source,
        };
        let top = Dir::open_root(root).map_err(|s| UnpackError::Io {
            pack: pack.to_path_buf(),
            op: "open allowed root",
            path: root.to_path_buf(),
            source: s,
        })?;
        let dir = top.walk(root, parents).map_err(|w| match w {
            WalkError::Missing(p) => {
                refused(&r, format!("its parent directory {p} does not exist"))
            }
            WalkError::NotADirectory(p) => refused(
                &r,
                format!("{p} is a symlink or not a directory; refusing to follow it"),
            ),
            WalkError::Io(p, source) => UnpackError::Io {
                pack: pack.to_path_buf(),
                op: "open directory",
                path: PathBuf::from(p),
                source,
            },
        })?;
        match e.kind {
            EntryKind::Dir => dir
                .ensure_dir(last, e.mode, e.uid, e.gid)
                .map_err(|s| io_err("create directory", s))?,
            EntryKind::File => {
                let (tmp, file) = dir.create_temp().map_err(|s| io_err("create", s))?;
                let mut out = BufWriter::with_capacity(IO_BUF, file);
                let written = r
                    .data(e.size, |b| out.write_all(b).map_err(|s| io_err("write", s)))
                    .and_then(|()| {
                        let file = out
                            .into_inner()
                            .map_err(|err| io_err("write", err.into_error()))?;
                        std::os::unix::fs::fchown(&file, Some(e.uid), Some(e.gid))
                            .map_err(|s| io_err("chown", s))?;
                        // After chown, which clears set-id bits.
                        file.set_permissions(fs::Permissions::from_mode(e.mode))
                            .map_err(|s| io_err("chmod", s))
                    });
                if let Err(err) = written {
                    dir.remove_temp(&tmp);
                    return Err(err);
                }
                dir.replace(&tmp, last).map_err(|s| io_err("replace", s))?;
            }
            EntryKind::Symlink => {
                let target = r.small_data(e.size)?;
                let tmp = dir
                    .create_temp_symlink(&target, e.uid, e.gid)
                    .map_err(|s| io_err("create symlink", s))?;
                dir.replace(&tmp, last).map_err(|s| io_err("replace", s))?;
            }
            EntryKind::Fifo => {
                let tmp = dir
                    .create_temp_fifo(e.mode, e.uid, e.gid)
                    .map_err(|s| io_err("create fifo", s))?;
                dir.replace(&tmp, last).map_err(|s| io_err("replace", s))?;
            }
        }
        stats.entries += 1;
        stats.data_bytes += e.size;
    }
    stats.pack_bytes = fs::metadata(pack).map(|m| m.len()).unwrap_or(0);
    Ok(stats)
}

/// The components of an absolute name, refusing empty, `.` and `..` ones.
fn abs_components(name: &str) -> Result<Vec<&str>, &'static str> {
    let Some(rest) = name.strip_prefix('/') else {
        return Err("the path is not absolute");
    };
    if name.contains('\0') {
        return Err("the path contains NUL");
    }
    let comps: Vec<&str> = rest.split('/').collect();
    if comps
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err("the path has an empty, '.' or '..' component");
    }
    Ok(comps)
}

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
