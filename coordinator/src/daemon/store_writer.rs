//! The real [`ManifestWriter`]: epochs committed into the [`ImageStore`] on
//! the shared filesystem.
//!
//! ```text
//!  checkpoint_job: begin (ImageStore::begin_epoch: number + dir, kept as a
//!                  PendingEpoch) ──► run_epoch(epoch, epoch_dir) ──► agents
//!                  write their files into the dir
//!  actor: WriteManifest ──► commit(): PendingEpoch::commit (checks, fsync,
//!                  MANIFEST.tmp → MANIFEST rename = commit point, LATEST)
//!  not committed ──► abort(): PendingEpoch::abort (files removed, the empty
//!                  dir stays as a tombstone: its number is never reused)
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use ckpt_protocol::manifest::{Key, Manifest, MANIFEST_FILE};

use crate::commit::PendingEpoch;
use crate::store::{ImageStore, StoreError};

use super::ManifestWriter;

/// A [`ManifestWriter`] over an [`ImageStore`], with the cluster key that
/// MACs every manifest (the agents verify restores with theirs).
pub struct StoreWriter {
    store: ImageStore,
    key: Key,
    pending: Mutex<HashMap<(String, u64), PendingEpoch>>,
}

impl fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreWriter")
            .field("root", &self.store.root())
            .finish_non_exhaustive()
    }
}

/// An epoch directory made ready for a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BegunEpoch {
    pub epoch: u64,
    pub dir: PathBuf,
}

impl StoreWriter {
    pub fn new(store: ImageStore, key: Key) -> Self {
        StoreWriter {
            store,
            key,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    pub(crate) fn key(&self) -> &Key {
        &self.key
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<(String, u64), PendingEpoch>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the job's next epoch directory (owned by the job's owner)
    /// and keeps it pending until [`ManifestWriter::commit`] or
    /// [`StoreWriter::abort`]. Blocking (filesystem).
    pub fn begin(
        &self,
        job: &str,
        owner_uid: u32,
        owner_gid: u32,
    ) -> Result<BegunEpoch, StoreError> {
        let p = self.store.begin_epoch(job, owner_uid, owner_gid)?;
        let begun = BegunEpoch {
            epoch: p.epoch,
            dir: p.dir.clone(),
        };
        self.pending().insert((job.to_owned(), p.epoch), p);
        Ok(begun)
    }

    /// Drops an epoch that was not committed: everything in its directory
    /// is removed, the empty directory stays as a tombstone. Blocking.
    pub fn abort(&self, job: &str, epoch: u64) -> Result<(), StoreError> {
        let p = self
            .pending()
            .remove(&(job.to_owned(), epoch))
            .unwrap_or_else(|| self.reopen(job, epoch));
        p.abort()
    }

    /// Whether `epoch` of `job` is begun and not yet committed or aborted.
    pub fn is_pending(&self, job: &str, epoch: u64) -> bool {
        self.pending().contains_key(&(job.to_owned(), epoch))
    }

    /// A handle on an epoch directory that is no longer pending (its commit
    /// failed halfway, or it was revoked), for cleaning it up.
    fn reopen(&self, job: &str, epoch: u64) -> PendingEpoch {
        PendingEpoch {
            job: job.to_owned(),
            epoch,
            dir: self.store.epoch_dir(job, epoch),
            job_dir: self.store.job_dir(job),
            owner_uid: 0,
            owner_gid: 0,
        }
    }
}

impl ManifestWriter for StoreWriter {
    fn commit(&self, manifest: &Manifest) -> Result<(), String> {
        let id = (manifest.job.clone(), manifest.epoch);
        let p = self.pending().remove(&id).ok_or_else(|| {
            format!(
                "epoch {} of job {} was not begun in the image store {}",
                manifest.epoch,
                manifest.job,
                self.store.root().display()
            )
        })?;
        p.commit(manifest, &self.key)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn revoke(&self, job: &str, epoch: u64) -> Result<(), String> {
        // Uncommit first: whatever happens next, the epoch is not restorable.
        let m = self.store.epoch_dir(job, epoch).join(MANIFEST_FILE);
        match fs::remove_file(&m) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", m.display())),
        }
        self.reopen(job, epoch).abort().map_err(|e| e.to_string())
    }
}
