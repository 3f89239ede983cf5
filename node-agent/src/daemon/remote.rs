//! Remote spawn, the agent's part of `ckpt-job rsh`: a process inside one
//! of this agent's trees asks (on the control socket) for a tree of the
//! same job on another node; the request goes to the coordinator, which
//! hands it to that node's agent; the answer comes back the same way.
//!
//! The caller is judged by its SO_PEERCRED pid, never by what it claims:
//! it must be in the freezer cgroup of one of our running trees, which
//! names the job; the remote tree runs as the caller's user and groups, in
//! its working directory, with its environment (process-specific MPI and
//! shell variables dropped, `CKPT_AGENT_SOCKET` pointed at the remote
//! agent's own socket).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_protocol::cluster::pb as cpb;
use ckpt_protocol::local_control::error_reply;
use ckpt_protocol::pb;

use super::control::{start_tree, TreeOrder};
use super::trees::{lock, TreeState};
use super::Shared;
use crate::tree::NetMode;

/// How long the caller waits for the remote agent's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable that names an agent's control socket to the
/// processes of its trees (and to `ckpt-job rsh`).
pub const AGENT_SOCKET_ENV: &str = "CKPT_AGENT_SOCKET";

/// Requests of ours waiting for an answer, and our control socket's path.
#[derive(Debug, Default)]
pub(crate) struct Remote {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, SyncSender<cpb::RemoteSpawned>>>,
    socket: Mutex<Option<PathBuf>>,
}

impl Remote {
    pub fn set_socket(&self, path: &Path) {
        *lock(&self.socket) = Some(path.to_path_buf());
    }
}

/// What the caller's process tells about itself through /proc.
#[derive(Debug)]
struct Caller {
    cwd: String,
    env: Vec<String>,
    groups: Vec<u32>,
}

fn caller(pid: i32) -> Result<Caller, String> {
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map_err(|e| format!("reading the working directory of pid {pid}: {e}"))?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| format!("reading the environment of pid {pid}: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let groups = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let env = environ
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    Ok(Caller {
        cwd: cwd.to_string_lossy().into_owned(),
        env: filter_env(env),
        groups,
    })
}

/// Variables that describe the calling process or its shell rather than the
/// job: MPI launchers give them to each rank and daemon themselves.
/// `CKPT_SHIM_DIR` names the calling tree's drain-socket directory: a
/// remote tree gets its own (`ckpt-job rsh-exec` sets it when `CKPT_SHIM`
/// says the job runs the MPI drain shim).
const DROPPED: &[&str] = &["HOSTNAME", "PWD", "OLDPWD", "SHLVL", "_", "CKPT_SHIM_DIR"];
const DROPPED_PREFIXES: &[&str] = &[
    "OMPI_COMM_WORLD_",
    "OMPI_MCA_ess_",
    "OMPI_MCA_orte_ess_",
    "OMPI_MCA_orte_hnp_",
    "OMPI_MCA_orte_local_daemon_uri",
    "OMPI_MCA_pmix",
    "OMPI_APP_CTX_",
    "OMPI_FIRST_RANKS",
    "OMPI_NUM_APP_CTX",
    "OMPI_UNIVERSE_SIZE",
    "OMPI_FILE_LOCATION",
    "PMIX_",
    "PMI_",
    "HYDI_",
];

/// The caller's environment as the remote tree gets it.
pub(crate) fn filter_env(env: Vec<String>) -> Vec<String> {
    env.into_iter()
        .filter(|e| {
            let Some((name, _)) = e.split_once('=') else {
                return false;
            };
            !DROPPED.contains(&name) && !DROPPED_PREFIXES.iter().any(|p| name.starts_with(p))
        })
        .collect()
}

/// Sets `name=value` in `env`, replacing an earlier value.
fn set_env(env: &mut Vec<String>, name: &str, value: &str) {
    env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(name));
    env.push(format!("{name}={value}"));
}

/// The control-socket request of a process `pid` (uid, gid from
/// SO_PEERCRED): start `r.argv` on node `r.host` as part of its tree's job.
pub(super) fn request(
    shared: &Shared,
    pid: i32,
    uid: u32,
    gid: u32,
    r: pb::RemoteSpawnRequest,
) -> pb::Response {
    let node = &shared.cfg.node;
    let tree = shared.registry.all().into_iter().find(|t| {
        t.state() == TreeState::Running && t.freezer.pids().is_ok_and(|p| p.contains(&pid))
    });
    let Some(tree) = tree else {
        tracing::warn!(%node, pid, uid, host = %r.host, "remote spawn refused: caller in no tree");
        return error_reply(
            pb::ErrorKind::Permission,
            format!(
                "permission denied: remote spawn is only for processes inside a job tree of \
                 this node's agent ({node}); pid {pid} is in none (start the job with \
                 `ckpt-job run --cluster`)"
            ),
        );
    };
    if r.host.is_empty() {
        return error_reply(pb::ErrorKind::BadRequest, "remote spawn: no host named");
    }
    if r.argv.is_empty() {
        return error_reply(pb::ErrorKind::BadRequest, "remote spawn: empty argv");
    }
    let c = match caller(pid) {
        Ok(c) => c,
        Err(e) => return error_reply(pb::ErrorKind::Failed, format!("remote spawn: {e}")),
    };
    if !shared.connected.load(Ordering::SeqCst) {
        return error_reply(
            pb::ErrorKind::Failed,
            format!(
                "remote spawn to {}: the agent of {node} is not connected to the coordinator",
                r.host
            ),
        );
    }
    let id = shared.remote.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, rx) = sync_channel(1);
    lock(&shared.remote.waiting).insert(id, tx);
    let job = tree.job.clone();
    tracing::info!(%node, job, tree = tree.id, pid, host = %r.host, request = id, "remote spawn asked");
    shared.send(
        cpb::RemoteSpawn {
            request: id,
            node: r.host.clone(),
            job: job.clone(),
            argv: r.argv,
            cwd: c.cwd,
            env: c.env,
            uid,
            gid,
            groups: c.groups,
            host_network: tree.handle.net == NetMode::Host,
        }
        .into(),
    );
    let answer = rx.recv_timeout(ANSWER_TIMEOUT);
    lock(&shared.remote.waiting).remove(&id);
    match answer {
        Ok(a) if a.error.is_empty() => pb::Response {
            body: Some(pb::response::Body::RemoteSpawned(pb::RemoteSpawnDone {
                node: a.node,
                job,
                tree_id: a.tree_id,
                root_pid: a.root_pid,
            })),
        },
        Ok(a) => error_reply(
            pb::ErrorKind::Failed,
            format!("remote spawn to {}: {}", r.host, a.error),
        ),
        Err(_) => error_reply(
            pb::ErrorKind::Failed,
            format!(
                "remote spawn to {}: no answer within {} s",
                r.host,
                ANSWER_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// An answer to one of our requests (from the coordinator).
pub(super) fn answered(shared: &Shared, a: cpb::RemoteSpawned) {
    match lock(&shared.remote.waiting).remove(&a.request) {
        Some(tx) => {
            let _ = tx.try_send(a);
        }
        None => {
            tracing::debug!(node = %shared.cfg.node, request = a.request, "late remote spawn answer dropped")
        }
    }
}

/// The coordinator asks us to start a tree for node `s.node`: the same path
/// as a spawn_tree request, in a thread (clone + exec block), answered with
/// RemoteSpawned.
pub(super) fn spawn_for(shared: Arc<Shared>, s: cpb::RemoteSpawn) {
    std::thread::spawn(move || {
        let node = shared.cfg.node.clone();
        let mut env = s.env;
        if let Some(sock) = lock(&shared.remote.socket).clone() {
            set_env(&mut env, AGENT_SOCKET_ENV, &sock.to_string_lossy());
        }
        let order = TreeOrder {
            job: s.job.clone(),
            argv: s.argv,
            cwd: s.cwd,
            env,
            uid: s.uid,
            gid: s.gid,
            groups: s.groups,
            host_network: s.host_network,
            stdout: String::new(),
            stderr: String::new(),
        };
        let answer = match start_tree(&shared, order) {
            Ok(t) => {
                tracing::info!(%node, job = %s.job, from = %s.node, tree = t.tree_id, pid = t.root_pid, "remote spawn started");
                cpb::RemoteSpawned {
                    request: s.request,
                    node: node.clone(),
                    tree_id: t.tree_id,
                    root_pid: t.root_pid,
                    error: String::new(),
                }
            }
            Err(error) => {
                tracing::warn!(%node, job = %s.job, from = %s.node, %error, "remote spawn failed");
                cpb::RemoteSpawned {
                    request: s.request,
                    node: node.clone(),
                    error: format!("on node {node}: {error}"),
                    ..Default::default()
                }
            }
        };
        shared.send(answer.into());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_filter_drops_process_specific_variables_only() {
        let env = [
            "PATH=/usr/bin",
            "OMPI_MCA_orte_tmpdir_base=/tmp/ckpt-job.j",
            "OMPI_COMM_WORLD_RANK=0",
            "PMIX_RANK=0",
            "PWD=/x",
            "HOSTNAME=n1",
            "OMPI_MCA_orte_ess_num_procs=2",
            "junk",
            "CKPT_AGENT_SOCKET=/s",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            filter_env(env),
            [
                "PATH=/usr/bin",
                "OMPI_MCA_orte_tmpdir_base=/tmp/ckpt-job.j",
                "CKPT_AGENT_SOCKET=/s"
            ]
        );
    }

    #[test]
    fn set_env_replaces() {
        let mut env = vec!["A=1".to_string(), "AB=2".to_string()];
        set_env(&mut env, "A", "3");
        assert_eq!(env, ["AB=2", "A=3"]);
    }
}
