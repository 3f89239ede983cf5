//! The image store on the shared filesystem.
//!
//! ```text
//! <root>/                       0755, root
//!   <job>/                      0700, the job's owner
//!     LATEST                    "<newest committed epoch>\n" (a hint)
//!     000001/                   0700, the job's owner; one per epoch
//!       MANIFEST                committed iff present and valid
//!       <node>.t<tree>.meta.pack, <node>.t<tree>.pages-<N>.img, ...
//! ```
//!
//! Rules:
//! - An epoch is committed iff its directory holds `MANIFEST`; the rename of
//!   `MANIFEST.tmp` to `MANIFEST` is the commit point (see
//!   [`PendingEpoch::commit`]). Everything else, `LATEST` included, is
//!   derived: [`ImageStore::latest_committed`] scans the epoch directories, so
//!   a crash between the manifest rename and the `LATEST` update loses
//!   nothing.
//! - Epoch numbers are never reused: the next one is one more than the
//!   largest directory name present, committed or not.
//! - The job's owner can write its job directory (to read its own images),
//!   so root never follows a symlink in it: directories are created with
//!   `mkdir` and opened `O_NOFOLLOW`, files with `O_CREAT|O_EXCL`, image files
//!   are hashed through `O_NOFOLLOW` descriptors, and the manifest MAC makes
//!   any change the owner makes to an image detectable.

use std::fs::{self, DirBuilder, File};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ckpt_protocol::manifest::{
    FileDigest, Key, Manifest, ManifestError, ValidationError, MANIFEST_FILE,
};

pub use crate::commit::PendingEpoch;
pub use crate::digest::{digest_file, DigestError};

/// Name of the newest-committed-epoch hint in a job directory.
pub const LATEST_FILE: &str = "LATEST";
/// A manifest lists a few files per node; anything this large is not one.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// How many taken epoch numbers `begin_epoch` steps over before giving up.
const MAX_EPOCH_TRIES: u32 = 1000;

/// Why an image store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid job name {job:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'")]
    InvalidJobName { job: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} is not a directory (ckpt does not follow a symlink there)")]
    NotADirectory { path: PathBuf },
    #[error("no free epoch number for job {job} in {path} after {MAX_EPOCH_TRIES} tries")]
    NoFreeEpoch { job: String, path: PathBuf },
    #[error("epoch {epoch} of job {job} does not exist")]
    NoSuchEpoch { job: String, epoch: u64 },
    #[error("epoch {epoch} of job {job} has no MANIFEST: it was never committed")]
    NotCommitted { job: String, epoch: u64 },
    #[error("epoch {epoch} of job {job} is already committed")]
    AlreadyCommitted { job: String, epoch: u64 },
    #[error("manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("manifest {path} is refused: {source}")]
    InvalidManifest {
        path: PathBuf,
        source: ValidationError,
    },
    #[error(
        "manifest {path} is for job {found_job} epoch {found_epoch}, not job {job} epoch {epoch}"
    )]
    WrongEpoch {
        path: PathBuf,
        job: String,
        epoch: u64,
        found_job: String,
        found_epoch: u64,
    },
    #[error("cannot commit epoch {epoch} of job {job}: {}", list(problems))]
    Incomplete {
        job: String,
        epoch: u64,
        problems: Vec<FileProblem>,
    },
    #[error("epoch {epoch} of job {job} failed verification: {}", list(problems))]
    Verify {
        job: String,
        epoch: u64,
        problems: Vec<FileProblem>,
    },
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("refusing to keep 0 epochs of job {job}: that would delete its restart point")]
    KeepNothing { job: String },
}

/// One image file that is missing or differs from its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub path: PathBuf,
    pub problem: String,
}

fn list(problems: &[FileProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.path.display(), p.problem))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// One epoch directory as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochInfo {
    pub epoch: u64,
    pub committed: bool,
    pub path: PathBuf,
}

/// What [`ImageStore::verify`] checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub job: String,
    pub epoch: u64,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// The image sets of all jobs under one root directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
pub fn valid_job_name(job: &str) -> bool {
    (1..=64).contains(&job.len())
        && !job.starts_with('.')
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_job(job: &str) -> Result<(), StoreError> {
    if valid_job_name(job) {
        Ok(())
    } else {
        Err(StoreError::InvalidJobName {
            job: job.to_owned(),
        })
    }
}

/// `000007` for 7; wider numbers keep all their digits.
pub fn epoch_dir_name(epoch: u64) -> String {
    format!("{epoch:06}")
}

/// The epoch a directory name stands for, if it is exactly what
/// [`epoch_dir_name`] would produce.
pub fn parse_epoch_dir_name(name: &str) -> Option<u64> {
    if name.len() < 6 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = name.parse().ok()?;
    (n >= 1 && epoch_dir_name(n) == name).then_some(n)
}

/// Opens a directory without following a symlink and checks it is one.
pub(crate) fn open_dir_nofollow(path: &Path) -> Result<File, StoreError> {
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => StoreError::NotADirectory {
                path: path.to_path_buf(),
            },
            _ => io_err("open directory", path)(e),
        })
}

pub(crate) fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    open_dir_nofollow(path)?
        .sync_all()
        .map_err(io_err("fsync directory", path))
}

pub(crate) fn chown_fd(f: &File, uid: u32, gid: u32, path: &Path) -> Result<(), StoreError> {
    std::os::unix::fs::fchown(f, Some(uid), Some(gid)).map_err(io_err("chown", path))
}

/// Reads a small regular file without following a symlink or blocking on a
/// fifo; None if it does not exist.
pub(crate) fn read_small(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let f = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let meta = f.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(StoreError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, "not a regular file"),
        });
    }
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() as u64 > limit {
        return Err(StoreError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes"),
            ),
        });
    }
    Ok(Some(bytes))
}

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<job>`. Does not validate `job`: every other method does.
    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join(job)
    }

    /// `<root>/<job>/<epoch>`.
    pub fn epoch_dir(&self, job: &str, epoch: u64) -> PathBuf {
        self.job_dir(job).join(epoch_dir_name(epoch))
    }

    /// Creates the next epoch directory of `job` (and the root and job
    /// directories if needed), owned by the job's owner.
    pub fn begin_epoch(
        &self,
        job: &str,
        owner_uid: u32,
        owner_gid: u32,
    ) -> Result<PendingEpoch, StoreError> {
        check_job(job)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io_err("create image root", &self.root))?;
        let job_dir = self.job_dir(job);
        match DirBuilder::new().mode(0o700).create(&job_dir) {
            Ok(()) => {
                let d = open_dir_nofollow(&job_dir)?;
                chown_fd(&d, owner_uid, owner_gid, &job_dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                open_dir_nofollow(&job_dir)?;
            }
            Err(e) => return Err(io_err("create job directory", &job_dir)(e)),
        }
        let mut next = self
            .epoch_numbers(job)?
            .into_iter()
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        for _ in 0..MAX_EPOCH_TRIES {
            let dir = self.epoch_dir(job, next);
            match DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    // The owner can write the job dir: chown through an
                    // O_NOFOLLOW fd, never by path.
                    let d = open_dir_nofollow(&dir)?;
                    chown_fd(&d, owner_uid, owner_gid, &dir)?;
                    tracing::debug!(job, epoch = next, dir = %dir.display(), "epoch directory created");
                    return Ok(PendingEpoch {
                        job: job.to_owned(),
                        epoch: next,
                        dir,
                        job_dir,
                        owner_uid,
                        owner_gid,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => next = next.saturating_add(1),
                Err(e) => return Err(io_err("create epoch directory", &dir)(e)),
            }
        }
        Err(StoreError::NoFreeEpoch {
            job: job.to_owned(),
            path: job_dir,
        })
    }

    /// Every epoch-like name in the job directory, whatever it is.
    fn epoch_numbers(&self, job: &str) -> Result<Vec<u64>, StoreError> {
        let dir = self.job_dir(job);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list job directory", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err("list job directory", &dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_epoch_dir_name) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// The epoch directories of `job`, oldest first; empty if the job has
    /// none. Names that are not epoch numbers and non-directories are ignored.
    pub fn epochs(&self, job: &str) -> Result<Vec<EpochInfo>, StoreError> {
        check_job(job)?;
        let dir = self.job_dir(job);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list job directory", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err("list job directory", &dir))?;
            let Some(epoch) = entry.file_name().to_str().and_then(parse_epoch_dir_name) else {
                continue;
            };
            if !entry
                .file_type()
                .map_err(io_err("stat", &entry.path()))?
                .is_dir()
            {
                continue;
            }
            let path = entry.path();
            let committed = match fs::symlink_metadata(path.join(MANIFEST_FILE)) {
                Ok(m) => m.is_file(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_err("stat", &path.join(MANIFEST_FILE))(e)),
            };
            out.push(EpochInfo {
                epoch,
                committed,
                path,
            });
        }
        out.sort_by_key(|e| e.epoch);
        Ok(out)
    }

    /// The newest committed epoch. `LATEST` is only a hint: the answer comes
    /// from the epoch directories themselves, so an epoch whose manifest
    /// rename happened is found even if `LATEST` was not updated, and a
    /// `LATEST` naming an epoch without a manifest is not believed.
    pub fn latest_committed(&self, job: &str) -> Result<Option<u64>, StoreError> {
        let latest = self
            .epochs(job)?
            .into_iter()
            .filter(|e| e.committed)
            .map(|e| e.epoch)
            .max();
        let hint_path = self.job_dir(job).join(LATEST_FILE);
        let hint = read_small(&hint_path, 64)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if hint.is_some() && hint != latest {
            tracing::warn!(
                job,
                ?hint,
                ?latest,
                "LATEST disagrees with the committed epochs; using the epochs"
            );
        }
        Ok(latest)
    }

    /// Reads and checks the manifest of a committed epoch: with a key, its
    /// MAC (restore); without, only its form (`inspect` by users who cannot
    /// read the key). Either way it must name this job and epoch and pass
    /// [`Manifest::validate`].
    pub fn load_manifest(
        &self,
        job: &str,
        epoch: u64,
        key: Option<&Key>,
    ) -> Result<Manifest, StoreError> {
        check_job(job)?;
        let dir = self.epoch_dir(job, epoch);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StoreError::NotADirectory { path: dir }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchEpoch {
                    job: job.to_owned(),
                    epoch,
                })
            }
            Err(e) => return Err(io_err("stat", &dir)(e)),
        }
        let path = dir.join(MANIFEST_FILE);
        let bytes =
            read_small(&path, MAX_MANIFEST_BYTES)?.ok_or_else(|| StoreError::NotCommitted {
                job: job.to_owned(),
                epoch,
            })?;
        let manifest = match key {
            Some(key) => Manifest::decode(&bytes, key),
            None => Manifest::decode_unverified(&bytes),
        }
        .map_err(|source| StoreError::Manifest {
            path: path.clone(),
            source,
        })?;
        if manifest.job != job || manifest.epoch != epoch {
            return Err(StoreError::WrongEpoch {
                path,
                job: job.to_owned(),
                epoch,
                found_job: manifest.job,
                found_epoch: manifest.epoch,
            });
        }
        manifest
            .validate()
            .map_err(|source| StoreError::InvalidManifest { path, source })?;
        Ok(manifest)
    }

    /// Checks a committed epoch end to end: the manifest's MAC, then every
    /// listed file's existence, size and BLAKE3. All differences are
    /// reported together, each naming its file.
    pub fn verify(&self, job: &str, epoch: u64, key: &Key) -> Result<VerifyReport, StoreError> {
        let manifest = self.load_manifest(job, epoch, Some(key))?;
        self.verify_files(&manifest, |_| true)
    }

    /// Checks size and digest of the files of an already loaded (and MAC
    /// checked) manifest whose names pass `select`. Lets a restore check the
    /// small images before CRIU reads them and the page files while CRIU
    /// restores (the tree is released only once they match).
    pub fn verify_files(
        &self,
        manifest: &Manifest,
        select: impl Fn(&str) -> bool,
    ) -> Result<VerifyReport, StoreError> {
        self.verify_files_with(manifest, select, false)
    }

    /// [`Self::verify_files`] reading each file front to back on one thread
    /// (see [`crate::digest::digest_file_sequential`]).
    pub fn verify_files_sequential(
        &self,
        manifest: &Manifest,
        select: impl Fn(&str) -> bool,
    ) -> Result<VerifyReport, StoreError> {
        self.verify_files_with(manifest, select, true)
    }

    fn verify_files_with(
        &self,
        manifest: &Manifest,
        select: impl Fn(&str) -> bool,
        sequential: bool,
    ) -> Result<VerifyReport, StoreError> {
        let started = Instant::now();
        let (job, epoch) = (manifest.job.as_str(), manifest.epoch);
        let dir = self.epoch_dir(job, epoch);
        let mut problems = Vec::new();
        let mut report = VerifyReport {
            job: job.to_owned(),
            epoch,
            files: 0,
            bytes: 0,
            seconds: 0.0,
        };
        for (_node, want) in manifest.files().filter(|(_, f)| select(&f.name)) {
            let path = dir.join(&want.name);
            if let Some(problem) = check_file(&path, want, sequential)? {
                problems.push(FileProblem { path, problem });
            } else {
                report.files += 1;
                report.bytes += want.size;
            }
        }
        if !problems.is_empty() {
            return Err(StoreError::Verify {
                job: job.to_owned(),
                epoch,
                problems,
            });
        }
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            job,
            epoch,
            files = report.files,
            bytes = report.bytes,
            seconds = report.seconds,
            "epoch verified"
        );
        Ok(report)
    }

    /// Keeps the newest `keep` committed epochs of `job`. Deletes older
    /// committed epochs, and uncommitted directories older than the newest
    /// committed epoch (never a newer one: it may be in progress). Returns
    /// the deleted epoch numbers, oldest first.
    pub fn retain(&self, job: &str, keep: usize) -> Result<Vec<u64>, StoreError> {
        if keep == 0 {
            return Err(StoreError::KeepNothing {
                job: job.to_owned(),
            });
        }
        let epochs = self.epochs(job)?;
        let committed: Vec<&EpochInfo> = epochs.iter().filter(|e| e.committed).collect();
        let Some(newest) = committed.last().map(|e| e.epoch) else {
            return Ok(Vec::new());
        };
        let cutoff = committed
            .len()
            .checked_sub(keep)
            .and_then(|i| committed.get(i))
            .map_or(0, |e| e.epoch);
        let mut deleted = Vec::new();
        for e in &epochs {
            let doomed = if e.committed {
                e.epoch < cutoff
            } else {
                e.epoch < newest
            };
            if !doomed {
                continue;
            }
            if e.committed {
                // Uncommit first, so that a crash halfway through the delete
                // never leaves a committed epoch with missing files.
                let m = e.path.join(MANIFEST_FILE);
                fs::remove_file(&m).map_err(io_err("remove", &m))?;
            }
            fs::remove_dir_all(&e.path).map_err(io_err("remove epoch directory", &e.path))?;
            tracing::info!(
                job,
                epoch = e.epoch,
                committed = e.committed,
                "epoch deleted by retention"
            );
            deleted.push(e.epoch);
        }
        Ok(deleted)
    }

    /// The jobs that have a directory under the root, sorted.
    pub fn jobs(&self) -> Result<Vec<String>, StoreError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list image root", &self.root)(e)),
        };
        let mut jobs = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err("list image root", &self.root))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if valid_job_name(&name)
                && entry
                    .file_type()
                    .map_err(io_err("stat", &entry.path()))?
                    .is_dir()
            {
                jobs.push(name);
            }
        }
        jobs.sort();
        Ok(jobs)
    }
}

/// What is wrong with one file, or None if it matches. Errors other than a
/// missing or non-regular file (e.g. EIO) are returned, not listed.
fn check_file(
    path: &Path,
    want: &FileDigest,
    sequential: bool,
) -> Result<Option<String>, StoreError> {
    // Size first: a wrong size needs no hashing.
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some("missing".into())),
        Err(e) => return Err(io_err("stat", path)(e)),
        Ok(m) if !m.is_file() => return Ok(Some("not a regular file".into())),
        Ok(m) if m.len() != want.size => {
            return Ok(Some(format!(
                "size is {} bytes, manifest says {}",
                m.len(),
                want.size
            )))
        }
        Ok(_) => {}
    }
    let got = match if sequential {
        crate::digest::digest_file_sequential(path)
    } else {
        digest_file(path)
    } {
        Ok(d) => d,
        Err(e) if e.is_missing() => return Ok(Some("missing".into())),
        Err(DigestError::NotRegular { .. }) => return Ok(Some("not a regular file".into())),
        Err(e) => return Err(e.into()),
    };
    Ok(if got.size != want.size {
        Some(format!(
            "size is {} bytes, manifest says {}",
            got.size, want.size
        ))
    } else if got.blake3 != want.blake3 {
        Some(format!(
            "BLAKE3 is {}, manifest says {}",
            got.blake3, want.blake3
        ))
    } else {
        None
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
