//! The coordinator's local control socket (`control_socket` in
//! coordinator.toml): checkpoint, restart, status, list and schedule
//! requests for multi-node jobs, one framed [`pb::Request`] per connection
//! answered by one [`pb::Response`].
//!
//! Any local user may connect; the caller is its SO_PEERCRED uid. A job is
//! owned by the uid its agents reported for its trees (registry.rs): its
//! owner and root may act on it, anyone else is refused with an error that
//! names the job and its owner. Only root may name a job's nodes itself
//! (a job the registry does not know yet).
//!
//! [`Coordinator::run_scheduler`] starts the periodic checkpoints of the
//! registry's schedules, and applies each job's retention after every
//! committed epoch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ckpt_protocol::async_framing::{read_frame_timeout, write_frame};
use ckpt_protocol::local_control::{bind_socket, error_reply, MAX_REQUEST};
use ckpt_protocol::manifest::CheckpointMode;
use ckpt_protocol::pb;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::registry::JobView;
use super::{Coordinator, JobCheckpointError, JobOwner, RestartTimeouts, StoreWriter};
use crate::epoch::{Deadlines, Outcome, PostCommitProblem};

/// A running control socket; dropping it does not stop it, call
/// [`ControlServer::shutdown`].
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl ControlServer {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting (requests in flight finish on their own) and
    /// removes the socket.
    pub fn shutdown(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, Clone)]
struct Ctx {
    coord: Coordinator,
    writer: Arc<StoreWriter>,
    deadlines: Deadlines,
    restart: RestartTimeouts,
}

impl Coordinator {
    /// Serves the local control socket at `path` (inside a tokio runtime);
    /// epochs go into `writer`'s store (the writer this coordinator was
    /// started with).
    pub fn serve_control(
        &self,
        path: &Path,
        writer: Arc<StoreWriter>,
        deadlines: Deadlines,
        restart: RestartTimeouts,
    ) -> std::io::Result<ControlServer> {
        let std_listener = bind_socket(path)?;
        std_listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std_listener)?;
        let ctx = Ctx {
            coord: self.clone(),
            writer,
            deadlines,
            restart,
        };
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            if let Err(e) = handle(&ctx, conn).await {
                                tracing::debug!(error = %e, "control connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        Ok(ControlServer {
            path: path.to_path_buf(),
            task,
        })
    }
}

async fn handle(ctx: &Ctx, mut conn: UnixStream) -> Result<(), ckpt_protocol::framing::FrameError> {
    let cred = conn.peer_cred()?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let req: pb::Request =
        match read_frame_timeout(&mut conn, MAX_REQUEST, Duration::from_secs(30)).await {
            Ok(r) => r,
            Err(e) => {
                let _ = write_frame(
                    &mut conn,
                    &error_reply(
                        pb::ErrorKind::BadRequest,
                        format!("unreadable request: {e}"),
                    ),
                )
                .await;
                return Ok(());
            }
        };
    let reply = if req.version != pb::Version::Version1 as i32 {
        error_reply(
            pb::ErrorKind::BadRequest,
            format!(
                "unsupported protocol version {} (this coordinator speaks 1)",
                req.version
            ),
        )
    } else if let Some(bad) = bad_job_name(&req.op) {
        error_reply(
            pb::ErrorKind::BadRequest,
            format!(
                "invalid job name {:?}: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
                super::wire::clean(bad)
            ),
        )
    } else {
        match req.op {
            Some(pb::request::Op::ClusterCheckpoint(c)) => checkpoint(ctx, uid, gid, c).await,
            Some(pb::request::Op::ClusterRestart(r)) => restart(ctx, uid, r).await,
            Some(pb::request::Op::ClusterStatus(s)) => match authorize(ctx, uid, &s.job).await {
                Ok(Some(v)) => pb::Response {
                    body: Some(pb::response::Body::ClusterJob(v.status)),
                },
                Ok(None) => unknown_job(&s.job),
                Err(e) => e,
            },
            Some(pb::request::Op::ClusterList(_)) => {
                let jobs = ctx
                    .coord
                    .jobs()
                    .await
                    .into_iter()
                    .filter(|v| uid == 0 || v.record.owner_uid == uid)
                    .map(|v| v.status)
                    .collect();
                pb::Response {
                    body: Some(pb::response::Body::ClusterJobs(pb::ClusterJobList { jobs })),
                }
            }
            Some(pb::request::Op::ClusterSchedule(s)) => schedule(ctx, uid, s).await,
            Some(_) => error_reply(
                pb::ErrorKind::BadRequest,
                "the coordinator takes cluster_checkpoint, cluster_restart, cluster_status, \
                 cluster_list and cluster_schedule requests",
            ),
            None => error_reply(pb::ErrorKind::BadRequest, "empty request"),
        }
    };
    write_frame(&mut conn, &reply).await
}

/// The job a request names, if that is not a valid job name.
fn bad_job_name(op: &Option<pb::request::Op>) -> Option<&str> {
    let job = match op.as_ref()? {
        pb::request::Op::ClusterCheckpoint(c) => &c.job,
        pb::request::Op::ClusterRestart(r) => &r.job,
        pb::request::Op::ClusterStatus(s) => &s.job,
        pb::request::Op::ClusterSchedule(s) => &s.job,
        _ => return None,
    };
    (!crate::store::valid_job_name(job)).then_some(job.as_str())
}

fn unknown_job(job: &str) -> pb::Response {
    error_reply(
        pb::ErrorKind::BadRequest,
        format!("the coordinator knows no job named {job:?}"),
    )
}

/// The job `uid` asks about, if it may act on it. `Ok(None)`: unknown job,
/// asked by root (who may name its nodes); an unknown job asked by anyone
/// else is an error.
async fn authorize(ctx: &Ctx, uid: u32, job: &str) -> Result<Option<JobView>, pb::Response> {
    match ctx.coord.job(job).await {
        Some(v) if uid == 0 || v.record.owner_uid == uid => Ok(Some(v)),
        Some(v) => {
            tracing::warn!(
                uid,
                job,
                owner = v.record.owner_uid,
                "refused a request for another user's job"
            );
            Err(error_reply(
                pb::ErrorKind::Permission,
                format!(
                    "permission denied: job {job} is owned by uid {}, and you are uid {uid}",
                    v.record.owner_uid
                ),
            ))
        }
        None if uid == 0 => Ok(None),
        None => Err(unknown_job(job)),
    }
}

async fn schedule(ctx: &Ctx, uid: u32, s: pb::ClusterScheduleRequest) -> pb::Response {
    match authorize(ctx, uid, &s.job).await {
        Ok(Some(_)) => {}
        Ok(None) => return unknown_job(&s.job),
        Err(e) => return e,
    }
    if s.interval_seconds != 0 && s.interval_seconds < MIN_INTERVAL.as_secs() {
        return error_reply(
            pb::ErrorKind::BadRequest,
            format!(
                "interval of {} s for job {}: the shortest is {} s",
                s.interval_seconds,
                s.job,
                MIN_INTERVAL.as_secs()
            ),
        );
    }
    let interval = Duration::from_secs(s.interval_seconds);
    if !ctx.coord.schedule(&s.job, interval, s.keep).await {
        return unknown_job(&s.job);
    }
    tracing::info!(job = %s.job, interval_s = s.interval_seconds, keep = s.keep, "schedule set");
    pb::Response {
        body: Some(pb::response::Body::ClusterSchedule(
            pb::ClusterScheduleDone {
                job: s.job,
                interval_seconds: s.interval_seconds,
                keep: s.keep,
            },
        )),
    }
}

/// Shortest periodic-checkpoint interval.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Runs one epoch of `job` into the store, then applies `keep` (0: keep
/// every committed epoch).
#[allow(clippy::too_many_arguments)]
async fn run_checkpoint(
    coord: &Coordinator,
    writer: &Arc<StoreWriter>,
    job: &str,
    owner: &JobOwner,
    mode: CheckpointMode,
    nodes: Vec<String>,
    deadlines: Deadlines,
    keep: u32,
) -> Result<Outcome, JobCheckpointError> {
    let o = match coord
        .checkpoint_job(writer, job, owner, mode, nodes, deadlines)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            coord.checkpoint_not_started(job, e.to_string()).await;
            return Err(e);
        }
    };
    if o.committed() && keep > 0 {
        let (w, j) = (writer.clone(), job.to_owned());
        let r = tokio::task::spawn_blocking(move || w.store().retain(&j, keep as usize)).await;
        match r {
            Ok(Ok(deleted)) if !deleted.is_empty() => {
                tracing::info!(job, keep, ?deleted, "retention: old epochs deleted");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(job, error = %e, "retention failed"),
            Err(e) => tracing::warn!(job, error = %e, "retention failed"),
        }
    }
    Ok(o)
}

async fn checkpoint(
    ctx: &Ctx,
    uid: u32,
    gid: u32,
    c: pb::ClusterCheckpointRequest,
) -> pb::Response {
    let view = match authorize(ctx, uid, &c.job).await {
        Ok(v) => v,
        Err(e) => return e,
    };
    if !c.nodes.is_empty() && uid != 0 {
        return error_reply(
            pb::ErrorKind::Permission,
            format!(
                "permission denied: only root may name the nodes of job {}; leave them out to \
                 checkpoint the nodes that run it",
                c.job
            ),
        );
    }
    let (nodes, owner, keep) = match &view {
        Some(v) => {
            if let Some((node, tree, tuid)) = v.foreign.first() {
                return error_reply(
                    pb::ErrorKind::Permission,
                    format!(
                        "cannot checkpoint job {}: tree {tree} on node {node} belongs to uid \
                         {tuid}, not to the job's owner uid {}",
                        c.job, v.record.owner_uid
                    ),
                );
            }
            let nodes = if c.nodes.is_empty() {
                v.nodes.clone()
            } else {
                c.nodes.clone()
            };
            let owner = JobOwner {
                uid: v.record.owner_uid,
                gid: v.record.owner_gid,
                ..JobOwner::default()
            };
            (nodes, owner, v.record.keep)
        }
        None => {
            if c.nodes.is_empty() {
                return unknown_job(&c.job);
            }
            ctx.coord
                .ensure_job(&c.job, uid, gid, c.nodes.clone())
                .await;
            let owner = JobOwner {
                uid,
                gid,
                ..JobOwner::default()
            };
            (c.nodes.clone(), owner, 0)
        }
    };
    if nodes.is_empty() {
        return error_reply(
            pb::ErrorKind::Failed,
            format!("cannot checkpoint job {}: no node runs it", c.job),
        );
    }
    let mode = if c.stop {
        CheckpointMode::Stop
    } else {
        CheckpointMode::Continue
    };
    tracing::info!(job = %c.job, ?nodes, stop = c.stop, uid, "checkpoint requested");
    let r = run_checkpoint(
        &ctx.coord,
        &ctx.writer,
        &c.job,
        &owner,
        mode,
        nodes,
        ctx.deadlines,
        keep,
    )
    .await;
    match r {
        Ok(o) if o.committed() => pb::Response {
            body: Some(pb::response::Body::ClusterCheckpoint(
                pb::ClusterCheckpointDone {
                    epoch: o.epoch,
                    path: ctx
                        .writer
                        .store()
                        .epoch_dir(&c.job, o.epoch)
                        .display()
                        .to_string(),
                    downtime_seconds: o.max_downtime.map_or(0.0, |d| d.as_secs_f64()),
                    total_seconds: o.timings.total.as_secs_f64(),
                    stopped: c.stop,
                    after_commit: o.after_commit.iter().map(problem).collect(),
                },
            )),
        },
        Ok(o) => error_reply(
            pb::ErrorKind::Failed,
            format!(
                "epoch {} of job {} aborted: {}",
                o.epoch,
                c.job,
                o.abort_reason()
                    .map_or_else(|| "unknown".to_owned(), ToString::to_string)
            ),
        ),
        Err(e) => error_reply(pb::ErrorKind::Failed, e.to_string()),
    }
}

/// `asked` completed with "each image restored on the node it came from"
/// for every node image of the epoch it does not place.
async fn default_placement(
    ctx: &Ctx,
    job: &str,
    epoch: Option<u64>,
    asked: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, pb::Response> {
    let mut placement: BTreeMap<String, String> = asked.into_iter().collect();
    let (w, j) = (ctx.writer.clone(), job.to_owned());
    let images = tokio::task::spawn_blocking(move || {
        let e = match epoch {
            Some(e) => Some(e),
            None => w.store().latest_committed(&j)?,
        };
        let Some(e) = e else { return Ok(None) };
        let m = w.store().load_manifest(&j, e, Some(w.key()))?;
        Ok::<_, crate::store::StoreError>(Some(
            m.nodes.iter().map(|n| n.node.clone()).collect::<Vec<_>>(),
        ))
    })
    .await;
    match images {
        Ok(Ok(Some(nodes))) => {
            let taken: Vec<String> = placement.values().cloned().collect();
            for n in nodes {
                if !placement.contains_key(&n) && !taken.contains(&n) {
                    placement.insert(n.clone(), n);
                }
            }
            Ok(placement)
        }
        // Coordinator::restart reports these with the job's name.
        Ok(Ok(None)) | Ok(Err(_)) => Ok(placement),
        Err(e) => Err(error_reply(pb::ErrorKind::Failed, e.to_string())),
    }
}

impl Coordinator {
    /// Starts the periodic checkpoints: every `period` the registry says
    /// which jobs are due, and each runs in its own task.
    pub fn run_scheduler(
        &self,
        writer: Arc<StoreWriter>,
        deadlines: Deadlines,
        period: Duration,
    ) -> JoinHandle<()> {
        let coord = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for due in coord.due().await {
                    let (coord, writer) = (coord.clone(), writer.clone());
                    tokio::spawn(async move {
                        tracing::info!(job = %due.job, nodes = ?due.nodes, "periodic checkpoint");
                        let owner = JobOwner {
                            uid: due.owner_uid,
                            gid: due.owner_gid,
                            ..JobOwner::default()
                        };
                        let r = run_checkpoint(
                            &coord,
                            &writer,
                            &due.job,
                            &owner,
                            CheckpointMode::Continue,
                            due.nodes,
                            deadlines,
                            due.keep,
                        )
                        .await;
                        match r {
                            Ok(o) if o.committed() => {
                                tracing::info!(job = %due.job, epoch = o.epoch, "periodic checkpoint committed");
                            }
                            Ok(o) => {
                                tracing::warn!(job = %due.job, epoch = o.epoch, "periodic checkpoint aborted")
                            }
                            Err(e) => {
                                tracing::warn!(job = %due.job, error = %e, "periodic checkpoint failed")
                            }
                        }
                    });
                }
            }
        })
    }
}

fn problem(p: &PostCommitProblem) -> String {
    format!("{p:?}")
}

async fn restart(ctx: &Ctx, uid: u32, r: pb::ClusterRestartRequest) -> pb::Response {
    let view = match authorize(ctx, uid, &r.job).await {
        Ok(v) => v,
        Err(e) => return e,
    };
    if view.is_none() {
        // Root restarting a job this coordinator never saw: the store's
        // manifest says whose it is.
        let (w, j) = (ctx.writer.clone(), r.job.clone());
        let owner = tokio::task::spawn_blocking(move || {
            let e = w.store().latest_committed(&j).ok().flatten()?;
            let m = w.store().load_manifest(&j, e, Some(w.key())).ok()?;
            Some((
                m.owner_uid,
                m.owner_gid,
                m.nodes.iter().map(|n| n.node.clone()).collect(),
            ))
        })
        .await
        .ok()
        .flatten();
        if let Some((uid, gid, nodes)) = owner {
            ctx.coord.ensure_job(&r.job, uid, gid, nodes).await;
        }
    }
    let epoch = (r.epoch != 0).then_some(r.epoch);
    let placement = match default_placement(ctx, &r.job, epoch, r.placement).await {
        Ok(p) => p,
        Err(e) => return e,
    };
    tracing::info!(job = %r.job, ?epoch, ?placement, "restart requested");
    match ctx
        .coord
        .restart(&ctx.writer, &r.job, epoch, placement, ctx.restart)
        .await
    {
        Ok(o) => pb::Response {
            body: Some(pb::response::Body::ClusterRestart(pb::ClusterRestartDone {
                epoch: o.epoch,
                restored: o
                    .nodes
                    .iter()
                    .map(|n| format!("{} -> {}", n.image_node, n.agent))
                    .collect(),
                total_seconds: o.total.as_secs_f64(),
            })),
        },
        Err(e) => error_reply(pb::ErrorKind::Failed, e.to_string()),
    }
}
