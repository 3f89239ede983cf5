//! Filling, committing and aborting one epoch directory.
//!
//! The commit protocol, in order: every file the manifest lists is present
//! with its size (the agents fsynced them, [`PendingEpoch::seal_file`] hashed
//! and fsynced them again), the epoch directory is fsynced, `MANIFEST.tmp` is
//! written and fsynced, renamed to `MANIFEST` (the commit point), and the
//! epoch directory fsynced again. `LATEST` follows the same write-temp,
//! fsync, rename, fsync-dir dance in the job directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ckpt_protocol::manifest::{
    check_name, FileDigest, Key, Manifest, MANIFEST_FILE, MANIFEST_TMP_FILE,
};

use crate::digest::digest_and_sync;
use crate::store::{chown_fd, fsync_dir, io_err, read_small, FileProblem, StoreError, LATEST_FILE};

const LATEST_TMP_FILE: &str = "LATEST.tmp";

/// An epoch directory being filled. Commit or abort it; dropping it leaves
/// the directory uncommitted (retention removes it later).
#[derive(Debug)]
#[must_use = "a pending epoch must be committed or aborted"]
pub struct PendingEpoch {
    pub job: String,
    pub epoch: u64,
    pub dir: PathBuf,
    pub(crate) job_dir: PathBuf,
    pub(crate) owner_uid: u32,
    pub(crate) owner_gid: u32,
}

impl PendingEpoch {
    /// Hashes one file of the epoch and makes it durable; the digest goes
    /// into the manifest.
    pub fn seal_file(&self, name: &str) -> Result<FileDigest, StoreError> {
        let path = self.dir.join(name);
        check_name("file name", name).map_err(|source| StoreError::InvalidManifest {
            path: path.clone(),
            source,
        })?;
        Ok(digest_and_sync(&path)?)
    }

    /// Commits the epoch: checks the manifest and that every file it lists
    /// is present with its size, fsyncs the epoch directory, writes
    /// `MANIFEST` atomically (the commit point), then updates `LATEST`.
    /// Returns the epoch directory.
    ///
    /// Once `MANIFEST` is renamed into place the epoch is committed, so a
    /// failure to update `LATEST` (only a hint) is logged, not returned: the
    /// caller must never abort a committed epoch.
    pub fn commit(self, manifest: &Manifest, key: &Key) -> Result<PathBuf, StoreError> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        manifest
            .validate()
            .map_err(|source| StoreError::InvalidManifest {
                path: manifest_path.clone(),
                source,
            })?;
        if manifest.job != self.job || manifest.epoch != self.epoch {
            return Err(StoreError::WrongEpoch {
                path: manifest_path,
                job: self.job.clone(),
                epoch: self.epoch,
                found_job: manifest.job.clone(),
                found_epoch: manifest.epoch,
            });
        }
        match fs::symlink_metadata(&manifest_path) {
            Ok(_) => {
                return Err(StoreError::AlreadyCommitted {
                    job: self.job.clone(),
                    epoch: self.epoch,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", &manifest_path)(e)),
        }
        let mut problems = Vec::new();
        for (_node, f) in manifest.files() {
            let path = self.dir.join(&f.name);
            let problem = match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some("missing".to_owned()),
                Err(e) => return Err(io_err("stat", &path)(e)),
                Ok(m) if !m.is_file() => Some("not a regular file".to_owned()),
                Ok(m) if m.len() != f.size => Some(format!(
                    "size is {} bytes, manifest says {}",
                    m.len(),
                    f.size
                )),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                problems.push(FileProblem { path, problem });
            }
        }
        if !problems.is_empty() {
            return Err(StoreError::Incomplete {
                job: self.job,
                epoch: self.epoch,
                problems,
            });
        }

        fsync_dir(&self.dir)?;
        let owner = (self.owner_uid, self.owner_gid);
        write_atomically(
            &self.dir,
            MANIFEST_TMP_FILE,
            MANIFEST_FILE,
            &manifest.encode(key),
            owner,
        )?;
        tracing::info!(job = %self.job, epoch = self.epoch, "epoch committed");

        if let Err(e) = self.update_latest(owner) {
            tracing::warn!(job = %self.job, epoch = self.epoch, error = %e, "epoch committed but LATEST not updated");
        }
        Ok(self.dir)
    }

    /// Moves `LATEST` forward (never back) to this epoch.
    fn update_latest(&self, owner: (u32, u32)) -> Result<(), StoreError> {
        let current = read_small(&self.job_dir.join(LATEST_FILE), 64)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if current.is_some_and(|c| c > self.epoch) {
            return Ok(());
        }
        let text = format!("{}\n", self.epoch);
        write_atomically(
            &self.job_dir,
            LATEST_TMP_FILE,
            LATEST_FILE,
            text.as_bytes(),
            owner,
        )
    }

    /// Drops the epoch: removes everything in its directory but leaves the
    /// empty directory as a tombstone, so that its number is never handed
    /// out again (a straggling agent of the aborted epoch must not write into
    /// a later epoch). Retention removes the tombstone once a newer epoch is
    /// committed.
    pub fn abort(self) -> Result<(), StoreError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list epoch directory", &self.dir)(e)),
        };
        for entry in rd {
            let entry = entry.map_err(io_err("list epoch directory", &self.dir))?;
            let path = entry.path();
            let is_dir = entry.file_type().map_err(io_err("stat", &path))?.is_dir();
            let removed = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
        tracing::info!(job = %self.job, epoch = self.epoch, "epoch aborted");
        Ok(())
    }
}

/// Writes `bytes` to `dir/tmp_name`, fsyncs, renames to `dir/name`, fsyncs
/// `dir`. A stale temporary file (even a symlink) is unlinked first; the new
/// one is created exclusively, so nothing a user planted is followed.
fn write_atomically(
    dir: &Path,
    tmp_name: &str,
    name: &str,
    bytes: &[u8],
    owner: (u32, u32),
) -> Result<(), StoreError> {
    let tmp = dir.join(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale", &tmp)(e)),
    }
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    chown_fd(&f, owner.0, owner.1, &tmp)?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    let dest = dir.join(name);
    fs::rename(&tmp, &dest).map_err(io_err("rename into place", &dest))?;
    fsync_dir(dir)
}
