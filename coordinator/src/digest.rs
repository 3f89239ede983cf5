//! Size and BLAKE3 digest of an image file.
//!
//! Image files sit in epoch directories that the job's owner can write to,
//! and the coordinator runs as root for every job. So a file is opened with
//! `O_NOFOLLOW | O_NONBLOCK` (a planted symlink is refused, a planted fifo
//! does not hang us) and must be a regular file by `fstat` of that same fd.
//!
//! Large files are hashed from a memory map with `update_rayon` (both cores;
//! ~10 GiB/s from the page cache here, against ~4 GiB/s for read() into a
//! buffer), but only when no unprivileged process can change the file under
//! the map: a file truncated while mapped kills the whole coordinator with
//! SIGBUS. So the map is used only if the file belongs to our effective uid
//! and is not group- or world-writable (the agents write images as root);
//! anything else is read into a buffer. We do not call
//! `Hasher::update_mmap_rayon`: it opens the path itself, following symlinks.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ckpt_protocol::manifest::FileDigest;

/// Read buffer for files we do not map: measured best here (512 KiB to
/// 1 MiB, ~4 GiB/s).
const CHUNK: usize = 1 << 20;

/// Why a file could not be digested.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("cannot open {path} to hash it: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path} has no UTF-8 file name")]
    BadName { path: PathBuf },
    #[error("cannot read {path} to hash it: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot fsync {path}: {source}")]
    Sync { path: PathBuf, source: io::Error },
}

impl DigestError {
    /// The file does not exist (as opposed to existing but being unreadable).
    pub fn is_missing(&self) -> bool {
        matches!(self, DigestError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Name, size and BLAKE3 of the regular file at `path`.
pub fn digest_file(path: &Path) -> Result<FileDigest, DigestError> {
    digest(path, false, true)
}

/// Like [`digest_file`], but one thread reading the file front to back:
/// for hashing beside another sequential reader (CRIU restoring from the
/// same file), where both share the page cache and readahead, and neither
/// starves the other of the two cores.
pub fn digest_file_sequential(path: &Path) -> Result<FileDigest, DigestError> {
    digest(path, false, false)
}

/// Like [`digest_file`], and fsyncs the file through the same descriptor.
pub fn digest_and_sync(path: &Path) -> Result<FileDigest, DigestError> {
    digest(path, true, true)
}

fn digest(path: &Path, sync: bool, parallel: bool) -> Result<FileDigest, DigestError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| DigestError::BadName {
            path: path.to_path_buf(),
        })?
        .to_owned();
    let open_err = |source| DigestError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => DigestError::NotRegular {
                path: path.to_path_buf(),
            },
            _ => open_err(e),
        })?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(DigestError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    if sync {
        file.sync_all().map_err(|source| DigestError::Sync {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let read_err = |source| DigestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let (hash, size) = if parallel && mappable(&meta) {
        hash_mapped(&file, meta.len()).map_err(read_err)?
    } else {
        hash_reader(&mut file, meta.len()).map_err(read_err)?
    };
    Ok(FileDigest {
        name,
        size,
        blake3: hash.to_hex().to_string(),
    })
}

/// Smaller files are not worth a mapping.
const MAP_THRESHOLD: u64 = 1 << 20;

/// Whether mapping is safe: only we (or root) can truncate the file.
fn mappable(meta: &std::fs::Metadata) -> bool {
    meta.len() >= MAP_THRESHOLD
        && meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.mode() & 0o022 == 0
}

fn hash_mapped(file: &File, len: u64) -> io::Result<(blake3::Hash, u64)> {
    // SAFETY: the mapping is undefined behaviour only if the file changes
    // while mapped. `mappable` checked (on this same descriptor) that the
    // file is owned by our euid and writable by nobody else, so only we or
    // root could change it; image files are complete before they are hashed
    // (agents have fsynced them and reported DUMPED).
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(usize::try_from(len).map_err(io::Error::other)?)
            .map(file)?
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update_rayon(&map);
    Ok((hasher.finalize(), len))
}

/// Hashes everything `r` yields; `size_hint` only sizes the buffer.
fn hash_reader(r: &mut impl Read, size_hint: u64) -> io::Result<(blake3::Hash, u64)> {
    let cap = usize::try_from(size_hint)
        .unwrap_or(CHUNK)
        .clamp(64 << 10, CHUNK);
    let mut buf = vec![0u8; cap];
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let n = fill(r, &mut buf)?;
        if n == 0 {
            break;
        }
        // Below ~128 KiB rayon costs more than it saves.
        if n >= 128 << 10 {
            hasher.update_rayon(&buf[..n]);
        } else {
            hasher.update(&buf[..n]);
        }
        total += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((hasher.finalize(), total))
}

/// Reads until `buf` is full or the input ends.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_one_shot_hash_at_every_boundary() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0usize,
            1,
            128 << 10,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK + 7,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &data).unwrap();
            let d = digest_file(&path).unwrap();
            assert_eq!(d.size, len as u64);
            assert_eq!(
                d.blake3,
                blake3::hash(&data).to_hex().to_string(),
                "len {len}"
            );
            assert_eq!(d.name, format!("f{len}"));
            assert_eq!(digest_and_sync(&path).unwrap(), d);
        }
    }

    #[test]
    fn mapped_and_read_paths_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..(5usize << 20) + 3).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let want = blake3::hash(&data).to_hex().to_string();
        use std::os::unix::fs::PermissionsExt;
        for mode in [0o600, 0o644, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(mappable(&meta), mode != 0o666);
            assert_eq!(digest_file(&path).unwrap().blake3, want, "mode {mode:o}");
        }
    }

    #[test]
    fn refuses_symlinks_fifos_and_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            digest_file(&link),
            Err(DigestError::NotRegular { .. })
        ));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            digest_file(&fifo),
            Err(DigestError::NotRegular { .. })
        ));
        let err = digest_file(&dir.path().join("gone")).unwrap_err();
        assert!(err.is_missing());
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
