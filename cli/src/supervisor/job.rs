//! A supervised job: its state, and one epoch of it (dump, seal, commit).

use std::fs;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ckpt_agent::capture::CaptureRules;
use ckpt_agent::checkpoint::{self, DumpHooks, DumpRequest, Phase, TreeHandle};
use ckpt_agent::criu::{Criu, NoNotify};
use ckpt_agent::freezer::{CgroupFreezer, Freezer};
use ckpt_agent::restore::{self};
use ckpt_coordinator::store::{ImageStore, PendingEpoch};
use ckpt_protocol::manifest::{CheckpointMode, Key, Manifest, NodeImage, Timings};
use ckpt_protocol::pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::local::{init_dir, low_space_note};
use super::{lock, now_unix, JobSpec, ProgressFn};
use crate::config::Config;

pub(super) struct State {
    pub(super) phase: pb::JobPhase,
    pub(super) last_epoch: u64,
    pub(super) committed: u64,
    pub(super) failed: u64,
    pub(super) last_error: String,
    /// Set by a stop-mode checkpoint once its epoch is committed.
    pub(super) stopped_at: Option<u64>,
}

/// Shared between the waiting main thread, the control server, the timer.
pub struct Job {
    pub spec: JobSpec,
    pub node: String,
    pub(super) root_pid: i32,
    pub(super) started_unix: u64,
    pub(super) restored_from: u64,
    pub(super) cfg: Config,
    pub(super) criu: Criu,
    pub(super) key: Key,
    pub(super) store: ImageStore,
    pub(super) freezer: CgroupFreezer,
    /// Read ends of the tree's stdio pipes (drained before every dump).
    pub(super) outputs: Vec<RawFd>,
    pub(super) state: Mutex<State>,
    /// Held for the whole of an epoch: one checkpoint at a time.
    pub(super) epoch_lock: Mutex<()>,
    /// Serialises retention passes, which run after the reply (deleting a
    /// GiB-sized epoch can take longer than writing one).
    pub(super) retention: Arc<Mutex<()>>,
    pub(super) exited: AtomicBool,
    pub(super) exit_cv: (Mutex<bool>, Condvar),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.spec.name)
            .field("root_pid", &self.root_pid)
            .finish()
    }
}

/// Failure of a checkpoint request, as the client sees it.
#[derive(Debug)]
pub struct CheckpointFailure {
    pub kind: pb::ErrorKind,
    pub message: String,
}

impl Job {
    pub(super) fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn owner_uid(&self) -> u32 {
        self.spec.uid
    }

    pub fn socket_path(&self) -> PathBuf {
        self.cfg.socket_path(&self.spec.name)
    }

    pub fn status(&self) -> pb::JobStatus {
        let st = self.lock_state();
        pb::JobStatus {
            name: self.spec.name.clone(),
            owner_uid: self.spec.uid,
            root_pid: self.root_pid,
            phase: st.phase as i32,
            ckpt_dir: self.spec.ckpt_dir.display().to_string(),
            last_epoch: st.last_epoch,
            started_unix: self.started_unix,
            command: self
                .spec
                .command
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect(),
            interval_seconds: self.spec.interval.map(|d| d.as_secs()).unwrap_or(0),
            keep: self.spec.keep as u32,
            checkpoints_committed: st.committed,
            checkpoints_failed: st.failed,
            last_error: st.last_error.clone(),
            restored_from: self.restored_from,
            node: self.node.clone(),
        }
    }

    /// One epoch: dump, seal, commit. Fails closed: on any error the tree
    /// runs on untouched and the previous epoch stays the restart point.
    pub fn checkpoint(
        &self,
        stop: bool,
        progress: &mut ProgressFn<'_>,
    ) -> Result<pb::CheckpointDone, CheckpointFailure> {
        let Ok(_guard) = self.epoch_lock.try_lock() else {
            return Err(CheckpointFailure {
                kind: pb::ErrorKind::Busy,
                message: format!(
                    "a checkpoint of job {} is already in progress",
                    self.spec.name
                ),
            });
        };
        if self.exited.load(Ordering::SeqCst) || self.lock_state().stopped_at.is_some() {
            return Err(CheckpointFailure {
                kind: pb::ErrorKind::Failed,
                message: format!("job {} has already ended", self.spec.name),
            });
        }
        self.lock_state().phase = if stop {
            pb::JobPhase::Stopping
        } else {
            pb::JobPhase::Checkpointing
        };
        let result = self.checkpoint_locked(stop, progress);
        let mut st = self.lock_state();
        match &result {
            Ok(done) => {
                st.committed += 1;
                st.last_epoch = done.epoch;
                if stop {
                    st.stopped_at = Some(done.epoch);
                }
                st.phase = if stop {
                    pb::JobPhase::Stopping
                } else {
                    pb::JobPhase::Running
                };
            }
            Err(e) => {
                st.failed += 1;
                st.last_error = format!("{e:#}");
                st.phase = pb::JobPhase::Running;
            }
        }
        result.map_err(|e| CheckpointFailure {
            kind: pb::ErrorKind::Failed,
            message: format!("{e:#}"),
        })
    }

    fn checkpoint_locked(
        &self,
        stop: bool,
        progress: &mut ProgressFn<'_>,
    ) -> Result<pb::CheckpointDone> {
        let t0 = Instant::now();
        let name = &self.spec.name;
        let pending = self
            .store
            .begin_epoch(name, self.spec.uid, self.spec.gid)
            .with_context(|| format!("starting a checkpoint of job {name}"))?;
        let epoch = pending.epoch;
        tracing::info!(job = %name, epoch, node = %self.node, stop, "checkpoint begins");
        let init_dir = init_dir(&self.cfg, &self.spec.name);
        let handle = TreeHandle {
            id: 0,
            root_pid: self.root_pid,
            net: self.spec.net,
            init_binary: Some(init_dir.join(restore::INIT_NAME)),
            init_dir: Some(init_dir),
        };
        let rules = CaptureRules::default();
        let req = DumpRequest {
            criu: &self.criu,
            tree: &handle,
            freezer: &self.freezer,
            epoch_dir: &pending.dir,
            prefix: format!("{}.t0", self.node),
            stop,
            freeze_timeout: self.cfg.freeze_timeout,
            rules: &rules,
            hash_while_dumping: true,
        };
        let mut hooks = Hooks {
            job: self,
            progress: &mut *progress,
        };
        let dumped = checkpoint::dump_tree(&req, &mut hooks, &mut NoNotify);
        // In stop mode a dumped tree is still frozen: it is killed only after
        // the commit, and thawed (the job goes on) if anything fails.
        let result = match dumped {
            Ok(d) => self.seal_and_commit(pending, &d, stop, t0, progress),
            Err(e) => {
                let dir = pending.dir.clone();
                let note = low_space_note(&dir);
                if let Err(rm) = pending.abort() {
                    eprintln!(
                        "ckpt: warning: could not remove aborted epoch {}: {rm}",
                        dir.display()
                    );
                }
                let e = anyhow::Error::from(e);
                Err(match note {
                    Some(n) => e.context(n),
                    None => e,
                })
            }
        };
        match result {
            Ok(done) => {
                if stop {
                    self.kill_frozen_tree();
                }
                tracing::info!(job = %name, epoch, "epoch committed");
                Ok(done)
            }
            Err(e) => {
                if stop {
                    let _ = self.freezer.thaw();
                }
                tracing::warn!(job = %name, epoch, error = %format!("{e:#}"), "epoch aborted");
                Err(e.context(format!(
                    "checkpoint of job {name} (epoch {epoch}) aborted; the job continues"
                )))
            }
        }
    }

    fn seal_and_commit(
        &self,
        pending: PendingEpoch,
        dumped: &checkpoint::DumpResult,
        stop: bool,
        t0: Instant,
        progress: &mut ProgressFn<'_>,
    ) -> Result<pb::CheckpointDone> {
        let tc = Instant::now();
        let presealed: u64 = dumped.sealed.iter().map(|d| d.size).sum();
        let total: u64 = presealed
            + dumped
                .files
                .iter()
                .map(|f| {
                    fs::metadata(pending.dir.join(f))
                        .map(|m| m.len())
                        .unwrap_or(0)
                })
                .sum::<u64>();
        let mut done_bytes = presealed;
        let mut files = dumped.sealed.clone();
        for f in &dumped.files {
            progress("sealing images", done_bytes, total);
            match pending.seal_file(f) {
                Ok(d) => {
                    done_bytes += d.size;
                    files.push(d);
                }
                Err(e) => {
                    let _ = pending.abort();
                    return Err(e.into());
                }
            }
        }
        progress("committing", total, total);
        let criu_version = self
            .criu
            .version()
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "unknown".into());
        let mut manifest = Manifest {
            format: ckpt_protocol::manifest::FORMAT_VERSION,
            job: self.spec.name.clone(),
            epoch: pending.epoch,
            created_unix: now_unix(),
            owner_uid: self.spec.uid,
            owner_gid: self.spec.gid,
            criu_version,
            command: self
                .spec
                .command
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect(),
            cwd: self.spec.cwd.display().to_string(),
            mode: if stop {
                CheckpointMode::Stop
            } else {
                CheckpointMode::Continue
            },
            nodes: vec![NodeImage {
                node: self.node.clone(),
                ranks: Vec::new(),
                drained: Vec::new(),
                trees: vec![dumped.image.clone()],
                files,
            }],
            timings: Timings {
                freeze_ms: dumped.freeze_ms,
                dump_ms: dumped.dump_ms,
                capture_ms: dumped.capture_ms,
                commit_ms: 0.0,
                downtime_ms: dumped.downtime_ms,
                total_ms: 0.0,
            },
        };
        manifest.timings.commit_ms = checkpoint_ms(tc.elapsed());
        manifest.timings.total_ms = checkpoint_ms(t0.elapsed());
        let epoch = pending.epoch;
        let dir = pending.commit(&manifest, &self.key)?;
        self.retain_in_background();
        Ok(pb::CheckpointDone {
            epoch,
            path: dir.display().to_string(),
            image_bytes: total,
            downtime_seconds: dumped.downtime_ms / 1000.0,
            total_seconds: t0.elapsed().as_secs_f64(),
            stopped: stop,
        })
    }

    /// Ends a frozen tree without letting any of it run again. Every task
    /// gets SIGKILL while still frozen, then the cgroup is thawed: a task
    /// dies before it returns to user space. (Killing only the namespace's
    /// init would let the others run between the thaw and the kernel's
    /// namespace teardown, and print output the image already holds.)
    fn kill_frozen_tree(&self) {
        let mut pids = self.freezer.pids().unwrap_or_default();
        if !pids.contains(&self.root_pid) {
            pids.push(self.root_pid);
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.freezer.thaw();
    }

    /// Deletes epochs beyond `keep` without delaying the checkpoint's
    /// reply. Safe beside a new epoch: retention never touches an epoch newer
    /// than the newest committed one, and uncommits (removes MANIFEST) before
    /// it deletes.
    fn retain_in_background(&self) {
        let (store, name, keep, lock) = (
            self.store.clone(),
            self.spec.name.clone(),
            self.spec.keep,
            self.retention.clone(),
        );
        thread::spawn(move || {
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = store.retain(&name, keep) {
                eprintln!("ckpt: warning: retention for job {name}: {e}");
            }
        });
    }

    /// Waits until every byte the tree wrote to its stdio pipes has been
    /// read by our pumps (the tree is frozen, so no more arrives).
    fn drain_outputs(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        for fd in &self.outputs {
            loop {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD on a descriptor we own writes one int.
                let r = unsafe { libc::ioctl(*fd, libc::FIONREAD, &mut n) };
                if r < 0 || n == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{n} bytes of the job's output are still unread after 5 s (is our stdout blocked?)"));
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Sleeps up to `d`; true if the job exited meanwhile.
    fn sleep_or_exit(&self, d: Duration) -> bool {
        let (m, cv) = &self.exit_cv;
        let guard = lock(m);
        let (guard, _) = cv
            .wait_timeout_while(guard, d, |exited| !*exited)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

fn checkpoint_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Hooks<'a, 'b> {
    job: &'a Job,
    progress: &'a mut ProgressFn<'b>,
}

impl DumpHooks for Hooks<'_, '_> {
    fn frozen(&mut self) -> Result<(), String> {
        self.job.drain_outputs()
    }
    fn phase(&mut self, phase: Phase) {
        (self.progress)(phase.name(), 0, 0);
    }
}

impl std::fmt::Display for CheckpointFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub(super) fn periodic(job: &Job, every: Duration) {
    loop {
        if job.sleep_or_exit(every) {
            return;
        }
        match job.checkpoint(false, &mut |_, _, _| {}) {
            Ok(done) => eprintln!(
                "ckpt: periodic checkpoint of job {}: epoch {} committed",
                job.spec.name, done.epoch
            ),
            // A checkpoint still running: skip this tick.
            Err(e) if e.kind == pb::ErrorKind::Busy => {}
            Err(e) if job.exited.load(Ordering::SeqCst) => return drop(e),
            Err(e) => eprintln!(
                "ckpt: periodic checkpoint of job {} failed: {e}",
                job.spec.name
            ),
        }
    }
}
