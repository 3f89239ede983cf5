//! Freezing a job tree with the cgroup freezer.
//!
//! A frozen tree cannot run, exit or write: the agent freezes it before it
//! drains the job's output pipes and scans its node-local state, and CRIU is
//! told the cgroup (`freeze_cgroup`) so it seizes the tree without thawing
//! it. Cgroup v1's freezer hierarchy is used where it is mounted (it is on
//! hybrid hosts), else cgroup v2's `cgroup.freeze`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    #[error("no cgroup freezer found (looked for {v1} and a cgroup2 mount at {v2})")]
    NotAvailable { v1: String, v2: String },
    #[error("cgroup {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} did not reach state {want} within {waited:?} (last seen: {seen})")]
    Timeout {
        path: PathBuf,
        want: &'static str,
        seen: String,
        waited: Duration,
    },
}

/// What the agent needs of a freezer; a seam for tests of the coordination
/// logic, which run without root.
pub trait Freezer: Send + Sync {
    fn freeze(&self, timeout: Duration) -> Result<(), FreezerError>;
    fn thaw(&self) -> Result<(), FreezerError>;
    /// The file a process writes `0` to, to join the cgroup.
    fn procs_file(&self) -> PathBuf;
    /// The path CRIU's `freeze_cgroup` option takes.
    fn criu_path(&self) -> String;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// One cgroup per job tree, under `ckpt/` in the freezer hierarchy.
#[derive(Debug)]
pub struct CgroupFreezer {
    dir: PathBuf,
    version: Version,
}

const V1_ROOT: &str = "/sys/fs/cgroup/freezer";
const V2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

impl CgroupFreezer {
    /// Creates (or reuses) the cgroup `ckpt/<name>` and returns its handle.
    pub fn create(name: &str) -> Result<Self, FreezerError> {
        let (root, version) = Self::hierarchy()?;
        sweep_stale(&root.join("ckpt"));
        let dir = root.join("ckpt").join(name);
        fs::create_dir_all(&dir).map_err(|source| FreezerError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        let me = Self { dir, version };
        // A cgroup left frozen by a crashed agent would hang the new tree.
        me.thaw()?;
        Ok(me)
    }

    fn hierarchy() -> Result<(PathBuf, Version), FreezerError> {
        if Path::new(V1_ROOT).join("freezer.state").exists()
            || Path::new(V1_ROOT).join("tasks").exists()
        {
            return Ok((PathBuf::from(V1_ROOT), Version::V1));
        }
        for c in V2_CANDIDATES {
            if Path::new(c).join("cgroup.controllers").exists() {
                return Ok((PathBuf::from(c), Version::V2));
            }
        }
        Err(FreezerError::NotAvailable {
            v1: V1_ROOT.into(),
            v2: V2_CANDIDATES.join(" or "),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, FreezerError> {
        let path = self.procs_file();
        let text = fs::read_to_string(&path).map_err(|source| FreezerError::Io {
            op: "read",
            path,
            source,
        })?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Removes the cgroup; it must be empty. Missing is fine.
    pub fn remove(&self) -> Result<(), FreezerError> {
        match fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FreezerError::Io {
                op: "remove",
                path: self.dir.clone(),
                source,
            }),
        }
    }

    fn write(&self, file: &str, value: &str) -> Result<(), FreezerError> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|source| FreezerError::Io {
            op: "write",
            path,
            source,
        })
    }

    fn read(&self, file: &str) -> Result<String, FreezerError> {
        let path = self.dir.join(file);
        fs::read_to_string(&path).map_err(|source| FreezerError::Io {
            op: "read",
            path,
            source,
        })
    }

    fn is_frozen(&self) -> Result<(bool, String), FreezerError> {
        match self.version {
            Version::V1 => {
                let s = self.read("freezer.state")?.trim().to_string();
                Ok((s == "FROZEN", s))
            }
            Version::V2 => {
                let ev = self.read("cgroup.events")?;
                let frozen = ev.lines().any(|l| l.trim() == "frozen 1");
                Ok((frozen, ev.replace('\n', " ")))
            }
        }
    }
}

impl Freezer for CgroupFreezer {
    fn freeze(&self, timeout: Duration) -> Result<(), FreezerError> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            // v1 may stay FREEZING if a task is in an uninterruptible sleep;
            // writing FROZEN again retries the transition.
            match self.version {
                Version::V1 => self.write("freezer.state", "FROZEN")?,
                Version::V2 => self.write("cgroup.freeze", "1")?,
            }
            let (frozen, seen) = self.is_frozen()?;
            if frozen {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                let _ = self.thaw();
                return Err(FreezerError::Timeout {
                    path: self.dir.clone(),
                    want: "frozen",
                    seen,
                    waited: timeout,
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn thaw(&self) -> Result<(), FreezerError> {
        match self.version {
            Version::V1 => self.write("freezer.state", "THAWED"),
            Version::V2 => self.write("cgroup.freeze", "0"),
        }
    }

    fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn criu_path(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Removes the empty cgroups `<job>-<pid>` under `parent` whose supervisor
/// (`pid`) is gone: leftovers of supervisors that were killed. A cgroup
/// with tasks in it is never removed (rmdir refuses it anyway).
pub fn sweep_stale(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, p)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let empty =
            fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|t| t.trim().is_empty());
        if empty {
            let _ = fs::remove_dir(e.path());
        }
    }
}
