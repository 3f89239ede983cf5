//! An epoch's image files, each opened exactly once for a restore.
//!
//! The job's owner can rename entries in their image directory, so checking
//! a file by path and then letting CRIU open the path again would leave a
//! window to swap in other bytes. Instead every file is opened once
//! (`O_NOFOLLOW`), must be a regular file written by root and writable by
//! nobody else, is hashed through that descriptor, and is handed to CRIU
//! and the unpacker as `/proc/<our pid>/fd/<n>`: the very inode that was
//! verified.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ckpt_protocol::manifest::FileDigest;

#[derive(Debug, thiserror::Error)]
pub enum OpenedError {
    #[error("cannot open image file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("image file {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("image file {path} was not written by ckpt (owner uid {uid}, mode {mode:o}): refusing it for a root restore")]
    Foreign { path: PathBuf, uid: u32, mode: u32 },
    #[error("image file {path}: {problem}")]
    Mismatch { path: PathBuf, problem: String },
    #[error("reading image file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the manifest lists no file named {0}")]
    Unknown(String),
}

/// The opened files of one node's part of an epoch, by name.
#[derive(Debug, Clone)]
pub struct OpenedImage {
    dir: PathBuf,
    files: BTreeMap<String, (Arc<File>, FileDigest)>,
}

impl OpenedImage {
    /// Opens and checks (type, owner, mode, size) every file in `files`.
    pub fn open(dir: &Path, files: &[FileDigest]) -> Result<Self, OpenedError> {
        let mut out = BTreeMap::new();
        for want in files {
            let path = dir.join(&want.name);
            let f = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|source| match source.raw_os_error() {
                    Some(libc::ELOOP) => OpenedError::NotRegular { path: path.clone() },
                    _ => OpenedError::Open {
                        path: path.clone(),
                        source,
                    },
                })?;
            let meta = f.metadata().map_err(|source| OpenedError::Open {
                path: path.clone(),
                source,
            })?;
            if !meta.is_file() {
                return Err(OpenedError::NotRegular { path });
            }
            // Written by root (or, for a restore that is not root's, by us).
            let ours = meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw();
            if !ours || meta.mode() & 0o022 != 0 {
                return Err(OpenedError::Foreign {
                    path,
                    uid: meta.uid(),
                    mode: meta.mode() & 0o7777,
                });
            }
            if meta.len() != want.size {
                return Err(OpenedError::Mismatch {
                    path,
                    problem: format!("size is {} bytes, manifest says {}", meta.len(), want.size),
                });
            }
            out.insert(want.name.clone(), (Arc::new(f), want.clone()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files: out,
        })
    }

    /// A path that names the opened file itself (for CRIU, which runs as
    /// another process, and for our own unpacker).
    pub fn proc_path(&self, name: &str) -> Result<PathBuf, OpenedError> {
        let (f, _) = self
            .files
            .get(name)
            .ok_or_else(|| OpenedError::Unknown(name.to_string()))?;
        Ok(PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            f.as_raw_fd()
        )))
    }

    /// Hashes (one thread, front to back) every opened file whose name
    /// passes `select` and compares it with the manifest.
    pub fn verify(&self, select: impl Fn(&str) -> bool) -> Result<u64, OpenedError> {
        let mut bytes = 0;
        let mut buf = vec![0u8; 1 << 20];
        for (name, (f, want)) in self.files.iter().filter(|(n, _)| select(n)) {
            let path = self.dir.join(name);
            let mut h = blake3::Hasher::new();
            let mut off = 0u64;
            loop {
                let n = match f.read_at(&mut buf, off) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => return Err(OpenedError::Read { path, source }),
                };
                h.update(&buf[..n]);
                off += n as u64;
            }
            let got = h.finalize().to_hex().to_string();
            if off != want.size || got != want.blake3 {
                return Err(OpenedError::Mismatch {
                    path,
                    problem: format!(
                        "{off} bytes with BLAKE3 {got}, manifest says {} bytes with {}",
                        want.size, want.blake3
                    ),
                });
            }
            bytes += off;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(name: &str, data: &[u8]) -> FileDigest {
        FileDigest {
            name: name.into(),
            size: data.len() as u64,
            blake3: blake3::hash(data).to_hex().to_string(),
        }
    }

    #[test]
    fn verifies_through_the_opened_file_even_after_a_swap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), b"good bytes").unwrap();
        let want = [digest("a.img", b"good bytes")];
        let img = OpenedImage::open(dir.path(), &want).unwrap();
        // Swap the directory entry after opening: what we hash and hand on
        // is still the opened inode.
        std::fs::rename(dir.path().join("a.img"), dir.path().join("old.img")).unwrap();
        std::fs::write(dir.path().join("a.img"), b"evil bytes").unwrap();
        assert_eq!(img.verify(|_| true).unwrap(), 10);
        assert_eq!(
            std::fs::read(img.proc_path("a.img").unwrap()).unwrap(),
            b"good bytes"
        );
    }

    #[test]
    fn a_flipped_byte_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), b"good bytes").unwrap();
        let img = OpenedImage::open(dir.path(), &[digest("a.img", b"good byte!")]).unwrap();
        let e = img.verify(|_| true).unwrap_err().to_string();
        assert!(e.contains("a.img") && e.contains("BLAKE3"), "{e}");
    }

    #[test]
    fn symlinks_and_wrong_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link.img")).unwrap();
        assert!(matches!(
            OpenedImage::open(dir.path(), &[digest("link.img", b"x")]),
            Err(OpenedError::NotRegular { .. })
        ));
        assert!(matches!(
            OpenedImage::open(dir.path(), &[digest("real", b"xy")]),
            Err(OpenedError::Mismatch { .. })
        ));
    }
}
