//! Node-local directories and environment of one job.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::JobSpec;
use crate::config::Config;

/// Node-local scratch dirs of one job, named after it (job names are unique
/// on a node while the job lives): `/tmp/ckpt-job.<job>` and
/// `/dev/shm/ckpt-job.<job>`. Created at run and restart, owned by the job's
/// owner, and removed (whole) when the tree is gone: the prefix is ckpt's.
pub(super) fn job_local_dirs(name: &str) -> [PathBuf; 2] {
    [
        PathBuf::from(format!("/tmp/ckpt-job.{name}")),
        PathBuf::from(format!("/dev/shm/ckpt-job.{name}")),
    ]
}

/// Environment that keeps MPI runtimes of different jobs on one node apart
/// and restorable. Each variable is set only if the user did not set it.
///
/// - Inside the job's PID namespace mpirun always has the same small pid, so
///   Open MPI's job family (a hash of host name and mpirun's pid), its
///   session dir `/tmp/ompi.<host>.<uid>/pid.<pid>` and its shared-memory
///   segments `/dev/shm/vader_segment.<host>.<jobid>.<rank>` would be the
///   same for every job on the node: two jobs would share (and corrupt) one
///   another's segments, and a restore would overwrite a live job's files.
///   The session dir goes below `/tmp/ckpt-job.<job>` (`orte_tmpdir_base`; the
///   capture finds it through `OMPI_MCA_orte_jobfam_session_dir`), the vader
///   segments into `/dev/shm/ckpt-job.<job>`.
/// - UCX (MPICH ch4:ucx) shares POSIX shared memory through
///   `/proc/<pid>/fd/<fd>` of the peer by default; `/proc` is the host's,
///   where the namespace's pids name other processes, so MPI_Init fails
///   (`open(/proc/4/fd/21) failed`). By path instead, the segment stays
///   linked while in use, in `/dev/shm/ckpt-job.<job>`, and is captured like
///   Open MPI's. UCX 1.13 then calls posix unreachable between processes
///   outside the initial PID namespace, so ranks on one node talk through
///   UCX's SysV transport, in the tree's own IPC namespace, which CRIU dumps
///   whole. Jobs must not turn SysV off (`UCX_TLS=^sysv`): the ranks would
///   talk TCP on loopback instead, where MPICH 4.0's MPI_Finalize hangs in
///   about one run of five, checkpointed or not (a rank waits for its peer's
///   ack of a flush while that peer already sits in the PMI barrier).
pub(super) fn job_local_env(spec: &JobSpec) -> Result<Vec<(OsString, OsString)>> {
    let [tmp, shm] = job_local_dirs(&spec.name);
    let wanted: [(&str, &Path, bool); 4] = [
        ("OMPI_MCA_orte_tmpdir_base", &tmp, true),
        ("OMPI_MCA_btl_vader_backing_directory", &shm, true),
        ("UCX_POSIX_USE_PROC_LINK", Path::new("n"), false),
        ("UCX_POSIX_DIR", &shm, true),
    ];
    let mut env = Vec::new();
    for (var, value, is_dir) in wanted {
        if std::env::var_os(var).is_some() {
            continue;
        }
        if is_dir {
            prepare_job_dir(value, spec.uid, spec.gid)?;
        }
        env.push((OsString::from(var), value.as_os_str().to_owned()));
    }
    Ok(env)
}

/// Creates `dir` (mode 0700) for the job's owner, or takes over a leftover
/// of an earlier run of the same job. Refuses a symlink or a dir owned by
/// somebody else (`/tmp` and `/dev/shm` are world-writable).
pub(super) fn prepare_job_dir(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::{fstat, Mode};
    use std::os::fd::FromRawFd;

    match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => bail!("creating the job's scratch dir {}: {e}", dir.display()),
    }
    let fd = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| {
        format!(
            "opening the job's scratch dir {} (a symlink?)",
            dir.display()
        )
    })?;
    // SAFETY: fresh descriptor from open, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(fd.as_raw_fd()).with_context(|| format!("stat {}", dir.display()))?;
    if st.st_uid != 0 && st.st_uid != uid {
        bail!(
            "{} belongs to uid {}, not to the job's owner; remove it",
            dir.display(),
            st.st_uid
        );
    }
    nix::unistd::fchown(
        fd.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .with_context(|| format!("chown {}", dir.display()))?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    Ok(())
}

/// The init's private directory: `<run_dir>/trees/<job>`.
pub(super) fn init_dir(cfg: &Config, name: &str) -> PathBuf {
    cfg.run_dir.join("trees").join(name)
}

pub(super) fn remove_job_local_dirs(name: &str) {
    for dir in job_local_dirs(name) {
        // remove_dir_all never follows symlinks.
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("ckpt: warning: could not remove {}: {e}", dir.display());
            }
        }
    }
}

/// Removes an (empty) directory when dropped, unless disarmed by taking
/// the path out: the job's freezer cgroup while no tree is in it yet.
pub(super) struct RemoveDirOnDrop(pub(super) Option<PathBuf>);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = fs::remove_dir(&d);
        }
    }
}

/// When a dump fails on a (nearly) full filesystem, CRIU's own message is
/// often about something else (it cannot even write its log there), so say
/// what the real problem probably is. Looked at before the aborted epoch's
/// files are removed.
pub(super) fn low_space_note(dir: &Path) -> Option<String> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = st.blocks_free() * st.fragment_size();
    if free < 1 << 20 {
        Some(format!(
            "no space left on device: only {free} bytes are free on the filesystem of {}",
            dir.display()
        ))
    } else if st.files_free() == 0 && st.files() > 0 {
        Some(format!(
            "no space left on device: no free inodes on the filesystem of {}",
            dir.display()
        ))
    } else {
        None
    }
}
