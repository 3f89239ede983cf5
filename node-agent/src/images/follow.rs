//! Digesting and flushing CRIU's page files *while CRIU writes them*.
//!
//! A dump writes ~1 GiB/s into the page cache; hashing it afterwards and
//! then waiting for fsync would add most of the dump time again. Instead a
//! follower thread tails every `pages-*.img` in the images directory as it
//! grows: it hashes the new bytes (BLAKE3, from the page cache) and starts
//! their writeback at once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so
//! disk I/O overlaps the dump. When CRIU is done, [`Follower::finish`]
//! reads the tails, waits for the remaining writeback (`fdatasync`) and
//! returns each file's size and digest.
//!
//! CRIU writes page files sequentially and never rewrites them, so bytes
//! once hashed stay valid; `finish` still checks each file's final size
//! against the bytes hashed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Size and BLAKE3 of one followed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("following {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} changed size behind the follower ({hashed} bytes hashed, {now} now)")]
    Changed {
        path: PathBuf,
        hashed: u64,
        now: u64,
    },
    #[error("the image follower thread panicked")]
    Panicked,
}

struct Tail {
    file: File,
    hasher: blake3::Hasher,
    pos: u64,
    /// Start of the range not yet handed to writeback.
    flushed: u64,
}

/// Start writeback in slices of this size.
const WRITEBACK_SLICE: u64 = 8 << 20;

#[derive(Debug)]
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<BTreeMap<String, Followed>, FollowError>>>,
}

impl Follower {
    /// Starts following files of `dir` whose names pass `select`.
    pub fn start(dir: &Path, select: fn(&str) -> bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let dir = dir.to_path_buf();
        let thread = thread::Builder::new()
            .name("ckpt-follow".into())
            .spawn(move || run(&dir, select, &stop2))
            .ok();
        Self { stop, thread }
    }

    /// The writer is done: hash the tails, make everything durable, and
    /// return name → size and digest.
    pub fn finish(mut self) -> Result<BTreeMap<String, Followed>, FollowError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| FollowError::Panicked)?,
            None => Ok(BTreeMap::new()),
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        // Abandoned (the dump failed): stop the thread, ignore its result.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    dir: &Path,
    select: fn(&str) -> bool,
    stop: &AtomicBool,
) -> Result<BTreeMap<String, Followed>, FollowError> {
    let mut tails: BTreeMap<String, Tail> = BTreeMap::new();
    loop {
        // Read the flag first: a pass that starts after the writer finished
        // sees every byte.
        let last = stop.load(Ordering::SeqCst);
        discover(dir, select, &mut tails)?;
        let mut progressed = false;
        for (name, t) in tails.iter_mut() {
            progressed |= pump(&dir.join(name), t)?;
        }
        if last {
            break;
        }
        if !progressed {
            thread::sleep(Duration::from_millis(2));
        }
    }
    let mut out = BTreeMap::new();
    for (name, t) in tails {
        let path = dir.join(&name);
        let io = |source| FollowError::Io {
            path: path.clone(),
            source,
        };
        t.file.sync_data().map_err(io)?;
        let now = t
            .file
            .metadata()
            .map_err(|source| FollowError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if now != t.pos {
            return Err(FollowError::Changed {
                path,
                hashed: t.pos,
                now,
            });
        }
        out.insert(
            name,
            Followed {
                size: t.pos,
                blake3: t.hasher.finalize().to_hex().to_string(),
            },
        );
    }
    Ok(out)
}

fn discover(
    dir: &Path,
    select: fn(&str) -> bool,
    tails: &mut BTreeMap<String, Tail>,
) -> Result<(), FollowError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(FollowError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for entry in rd.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !select(&name) || tails.contains_key(&name) {
            continue;
        }
        let path = entry.path();
        let file = File::open(&path).map_err(|source| FollowError::Io {
            path: path.clone(),
            source,
        })?;
        tails.insert(
            name,
            Tail {
                file,
                hasher: blake3::Hasher::new(),
                pos: 0,
                flushed: 0,
            },
        );
    }
    Ok(())
}

/// Hashes whatever was appended since the last call; true if anything was.
///
/// New bytes are hashed straight from the page cache through a mapping of
/// just the appended range (no copy into a buffer). CRIU only appends, and
/// the files are root's, so a mapped range never shrinks under us.
fn pump(path: &Path, t: &mut Tail) -> Result<bool, FollowError> {
    let io = |source| FollowError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = t.file.metadata().map_err(io)?.len();
    if size <= t.pos {
        return Ok(false);
    }
    const PAGE: u64 = 4096;
    let start = t.pos - t.pos % PAGE;
    let len = usize::try_from(size - start).map_err(|e| FollowError::Io {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    // SAFETY: maps [start, size) of a regular file that only grows while we
    // follow it (CRIU appends; only root can write it), so the mapped range
    // stays backed for the mapping's short life.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len(len)
            .map(&t.file)
    }
    .map_err(io)?;
    t.hasher.update(&map[(t.pos - start) as usize..]);
    t.pos = size;
    if t.pos - t.flushed >= WRITEBACK_SLICE {
        start_writeback(&t.file, t.flushed, t.pos - t.flushed);
        t.flushed = t.pos;
    }
    Ok(true)
}

fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; a failure
    // just means the final fdatasync does all the work.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pages(name: &str) -> bool {
        name.starts_with("pages-")
    }

    #[test]
    fn digests_files_written_while_following() {
        let dir = tempfile::tempdir().unwrap();
        let f = Follower::start(dir.path(), pages);
        let mut w = File::create(dir.path().join("pages-1.img")).unwrap();
        let mut all = Vec::new();
        for i in 0..64u32 {
            let chunk: Vec<u8> = (0..100_000u32).map(|j| (i ^ j) as u8).collect();
            w.write_all(&chunk).unwrap();
            all.extend_from_slice(&chunk);
            if i % 16 == 0 {
                thread::sleep(Duration::from_millis(3));
            }
        }
        fs::write(dir.path().join("core-1.img"), b"ignored").unwrap();
        fs::write(dir.path().join("pages-2.img"), b"late small file").unwrap();
        let got = f.finish().unwrap();
        assert_eq!(got.len(), 2);
        let one = &got["pages-1.img"];
        assert_eq!(one.size, all.len() as u64);
        assert_eq!(one.blake3, blake3::hash(&all).to_hex().to_string());
        assert_eq!(
            got["pages-2.img"].blake3,
            blake3::hash(b"late small file").to_hex().to_string()
        );
    }

    #[test]
    fn a_file_truncated_behind_the_follower_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pages-1.img");
        fs::write(&p, vec![7u8; 10_000]).unwrap();
        let f = Follower::start(dir.path(), pages);
        thread::sleep(Duration::from_millis(50));
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(10)
            .unwrap();
        assert!(matches!(f.finish(), Err(FollowError::Changed { .. })));
    }
}
