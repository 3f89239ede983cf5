//! The coordinator's local control socket (`control_socket` in
//! coordinator.toml): checkpoint and restart requests for multi-node jobs,
//! one framed [`pb::Request`] per connection answered by one
//! [`pb::Response`]. Root only (SO_PEERCRED): jobs started through the
//! agents' control sockets have no per-user registry on the coordinator
//! yet, so it cannot tell whose job a name is.

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

use super::{Coordinator, JobOwner, RestartTimeouts, StoreWriter};
use crate::epoch::{Deadlines, PostCommitProblem};

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
    let uid = conn.peer_cred()?.uid();
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
    } else if uid != 0 {
        tracing::warn!(uid, "refused a control request from a non-root user");
        error_reply(
            pb::ErrorKind::Permission,
            format!("permission denied: the coordinator's control socket is for root, you are uid {uid}"),
        )
    } else {
        match req.op {
            Some(pb::request::Op::ClusterCheckpoint(c)) => checkpoint(ctx, c).await,
            Some(pb::request::Op::ClusterRestart(r)) => restart(ctx, r).await,
            Some(_) => error_reply(
                pb::ErrorKind::BadRequest,
                "the coordinator takes cluster_checkpoint and cluster_restart requests",
            ),
            None => error_reply(pb::ErrorKind::BadRequest, "empty request"),
        }
    };
    write_frame(&mut conn, &reply).await
}

async fn checkpoint(ctx: &Ctx, c: pb::ClusterCheckpointRequest) -> pb::Response {
    if c.nodes.is_empty() {
        return error_reply(pb::ErrorKind::BadRequest, "cluster_checkpoint: no nodes");
    }
    let mode = if c.stop {
        CheckpointMode::Stop
    } else {
        CheckpointMode::Continue
    };
    tracing::info!(job = %c.job, nodes = ?c.nodes, stop = c.stop, "checkpoint requested");
    let owner = JobOwner::default();
    let r = ctx
        .coord
        .checkpoint_job(&ctx.writer, &c.job, &owner, mode, c.nodes, ctx.deadlines)
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

fn problem(p: &PostCommitProblem) -> String {
    format!("{p:?}")
}

async fn restart(ctx: &Ctx, r: pb::ClusterRestartRequest) -> pb::Response {
    let placement: BTreeMap<String, String> = r.placement.into_iter().collect();
    let epoch = (r.epoch != 0).then_some(r.epoch);
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
