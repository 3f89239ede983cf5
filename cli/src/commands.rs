//! The client-side commands: checkpoint (over the job's socket), list,
//! status, inspect and verify (over the socket and the image store).

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ckpt_coordinator::store::ImageStore;
use ckpt_protocol::manifest::{Key, Manifest};
use ckpt_protocol::pb;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::config::Config;
use crate::control::{self, CallError};

/// `NAME` or `NAME@EPOCH`.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub epoch: Option<u64>,
}

impl Target {
    pub fn parse(s: &str) -> Result<Self> {
        match s.rsplit_once('@') {
            Some((name, e)) => {
                let epoch = e
                    .parse()
                    .map_err(|_| anyhow!("bad epoch {e:?} in {s:?}: expected NAME@NUMBER"))?;
                Ok(Self {
                    name: name.to_string(),
                    epoch: Some(epoch),
                })
            }
            None => Ok(Self {
                name: s.to_string(),
                epoch: None,
            }),
        }
    }
}

/// A progress bar on a terminal, nothing otherwise.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        });
        Self { bar }
    }

    pub fn update(&mut self, phase: &str, done: u64, total: u64) {
        let Some(b) = &self.bar else { return };
        if total > 0 {
            if b.length() != Some(total) {
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_length(total);
            }
            b.set_position(done);
        } else {
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
        }
        b.set_message(phase.to_string());
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn no_such_job(cfg: &Config, name: &str) -> anyhow::Error {
    let running = running_jobs(cfg)
        .into_iter()
        .map(|s| s.name)
        .collect::<Vec<_>>();
    if running.is_empty() {
        anyhow!("no running job named {name:?} on this node (no jobs are running)")
    } else {
        anyhow!(
            "no running job named {name:?} on this node (running: {})",
            running.join(", ")
        )
    }
}

fn call(
    cfg: &Config,
    name: &str,
    op: pb::request::Op,
    progress: impl FnMut(&pb::Progress),
) -> Result<pb::response::Body> {
    let sock = cfg.socket_path(name);
    if !sock.exists() {
        return Err(no_such_job(cfg, name));
    }
    match control::call(&sock, op, progress) {
        Ok(b) => Ok(b),
        Err(CallError::Connect(..)) => Err(no_such_job(cfg, name)),
        Err(e) => Err(e.into()),
    }
}

/// `ckpt-job checkpoint [--stop] NAME`.
pub fn checkpoint(cfg: &Config, name: &str, stop: bool, json_out: bool) -> Result<i32> {
    let mut bar = if json_out {
        Progress { bar: None }
    } else {
        Progress::new()
    };
    let r = call(
        cfg,
        name,
        pb::request::Op::Checkpoint(pb::CheckpointRequest { stop }),
        |p| bar.update(&p.phase, p.done, p.total),
    );
    bar.finish();
    let done = match r? {
        pb::response::Body::Checkpoint(d) => d,
        other => bail!("unexpected reply from job {name}: {other:?}"),
    };
    if json_out {
        println!(
            "{}",
            json!({"job": name, "epoch": done.epoch, "path": done.path, "image_bytes": done.image_bytes,
                   "downtime_seconds": done.downtime_seconds, "total_seconds": done.total_seconds, "stopped": done.stopped})
        );
    } else {
        println!(
            "{name}: epoch {} committed ({}, downtime {:.0} ms, total {:.2} s){} -> {}",
            done.epoch,
            human_bytes(done.image_bytes),
            done.downtime_seconds * 1000.0,
            done.total_seconds,
            if done.stopped { ", job stopped" } else { "" },
            done.path
        );
    }
    Ok(0)
}

fn running_jobs(cfg: &Config) -> Vec<pb::JobStatus> {
    let Ok(entries) = std::fs::read_dir(cfg.jobs_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "sock") {
            if let Ok(pb::response::Body::Status(s)) =
                control::call(&p, pb::request::Op::Status(pb::StatusRequest {}), |_| {})
            {
                out.push(s);
            } else if let Some(stem) = p.file_stem() {
                // Not ours to query (permission) but running: show the name.
                if control::is_live(&p) {
                    out.push(pb::JobStatus {
                        name: stem.to_string_lossy().into_owned(),
                        phase: pb::JobPhase::Unspecified as i32,
                        ..Default::default()
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn phase_name(p: i32) -> &'static str {
    match pb::JobPhase::try_from(p).unwrap_or(pb::JobPhase::Unspecified) {
        pb::JobPhase::Running => "running",
        pb::JobPhase::Checkpointing => "checkpointing",
        pb::JobPhase::Stopping => "stopping",
        pb::JobPhase::Exited => "exited",
        pb::JobPhase::Unspecified => "running (not yours)",
    }
}

/// `ckpt-job list`.
pub fn list(cfg: &Config, ckpt_dir: Option<&Path>, json_out: bool) -> Result<i32> {
    let running = running_jobs(cfg);
    let cluster: Vec<pb::ClusterJob> = cluster_jobs(cfg)
        .into_iter()
        .filter(|c| !running.iter().any(|r| r.name == c.job))
        .collect();
    let store = ImageStore::new(ckpt_dir.unwrap_or(&cfg.ckpt_dir));
    let mut stored = Vec::new();
    for job in store.jobs().unwrap_or_default() {
        if running.iter().any(|r| r.name == job) || cluster.iter().any(|c| c.job == job) {
            continue;
        }
        let latest = store.latest_committed(&job).ok().flatten();
        stored.push((job, latest));
    }
    if json_out {
        let mut v: Vec<_> = running
            .iter()
            .map(|s| json!({"name": s.name, "state": phase_name(s.phase), "owner_uid": s.owner_uid, "pid": s.root_pid, "last_epoch": s.last_epoch, "ckpt_dir": s.ckpt_dir}))
            .collect();
        v.extend(cluster.iter().map(cluster_job_json));
        v.extend(stored.iter().map(|(n, l)| json!({"name": n, "state": "checkpointed", "last_epoch": l, "ckpt_dir": store.root()})));
        println!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    println!(
        "{:<24} {:<14} {:>6} {:>8} {:>6}  CKPT-DIR",
        "NAME", "STATE", "OWNER", "PID", "EPOCH"
    );
    for s in &running {
        println!(
            "{:<24} {:<14} {:>6} {:>8} {:>6}  {}",
            s.name,
            phase_name(s.phase),
            s.owner_uid,
            s.root_pid,
            epoch_str(s.last_epoch),
            s.ckpt_dir
        );
    }
    for c in &cluster {
        let nodes: Vec<&str> = c.nodes.iter().map(|n| n.node.as_str()).collect();
        println!(
            "{:<24} {:<14} {:>6} {:>8} {:>6}  nodes: {}",
            c.job,
            format!("cluster {}", c.phase),
            c.owner_uid,
            "-",
            epoch_str(c.last_epoch),
            nodes.join(",")
        );
    }
    for (n, l) in &stored {
        println!(
            "{:<24} {:<14} {:>6} {:>8} {:>6}  {}",
            n,
            "checkpointed",
            "-",
            "-",
            l.map(|e| e.to_string()).unwrap_or("-".into()),
            store.root().display()
        );
    }
    Ok(0)
}

fn epoch_str(e: u64) -> String {
    if e == 0 {
        "-".into()
    } else {
        e.to_string()
    }
}

/// `ckpt-job status NAME`.
pub fn status(cfg: &Config, ckpt_dir: Option<&Path>, name: &str, json_out: bool) -> Result<i32> {
    let sock = cfg.socket_path(name);
    if sock.exists() && control::is_live(&sock) {
        let s = match control::call(&sock, pb::request::Op::Status(pb::StatusRequest {}), |_| {})? {
            pb::response::Body::Status(s) => s,
            other => bail!("unexpected reply from job {name}: {other:?}"),
        };
        if json_out {
            println!(
                "{}",
                json!({"name": s.name, "node": s.node, "state": phase_name(s.phase), "owner_uid": s.owner_uid, "pid": s.root_pid,
                       "command": s.command, "ckpt_dir": s.ckpt_dir, "last_epoch": s.last_epoch, "restored_from": s.restored_from,
                       "interval_seconds": s.interval_seconds, "keep": s.keep, "checkpoints_committed": s.checkpoints_committed,
                       "checkpoints_failed": s.checkpoints_failed, "last_error": s.last_error, "started_unix": s.started_unix})
            );
        } else {
            println!(
                "job:          {} on {} ({})",
                s.name,
                s.node,
                phase_name(s.phase)
            );
            println!("command:      {}", s.command.join(" "));
            println!("owner uid:    {}   pid: {}", s.owner_uid, s.root_pid);
            println!(
                "checkpoints:  {} committed, {} failed; last epoch {}",
                s.checkpoints_committed,
                s.checkpoints_failed,
                epoch_str(s.last_epoch)
            );
            if s.restored_from > 0 {
                println!("restored from epoch {}", s.restored_from);
            }
            if s.interval_seconds > 0 {
                println!(
                    "interval:     every {}, keep {}",
                    humantime::format_duration(std::time::Duration::from_secs(s.interval_seconds)),
                    s.keep
                );
            }
            if !s.last_error.is_empty() {
                println!("last error:   {}", s.last_error);
            }
            println!("ckpt dir:     {}", s.ckpt_dir);
        }
        return Ok(0);
    }
    if let Some(code) = cluster_status(cfg, name, json_out)? {
        return Ok(code);
    }
    let store = ImageStore::new(ckpt_dir.unwrap_or(&cfg.ckpt_dir));
    let epochs = store.epochs(name).unwrap_or_default();
    if epochs.is_empty() {
        return Err(no_such_job(cfg, name).context(format!(
            "and no checkpoints of it in {}",
            store.root().display()
        )));
    }
    let latest = store.latest_committed(name)?;
    if json_out {
        let list: Vec<_> = epochs
            .iter()
            .map(|e| json!({"epoch": e.epoch, "committed": e.committed}))
            .collect();
        println!(
            "{}",
            json!({"name": name, "state": "not running", "last_epoch": latest, "epochs": list, "ckpt_dir": store.root()})
        );
    } else {
        println!("job:          {name} (not running on this node)");
        for e in &epochs {
            println!(
                "epoch {:>6}:  {}",
                e.epoch,
                if e.committed {
                    "committed"
                } else {
                    "incomplete (never restored)"
                }
            );
        }
        match latest {
            Some(l) => println!("restart with: ckpt-job restart {name}   (epoch {l})"),
            None => println!("no committed epoch: nothing to restart from"),
        }
    }
    Ok(0)
}

fn resolve_epoch(store: &ImageStore, t: &Target) -> Result<u64> {
    match t.epoch {
        Some(e) => Ok(e),
        None => store.latest_committed(&t.name)?.ok_or_else(|| {
            anyhow!(
                "job {:?} has no committed checkpoint in {}",
                t.name,
                store.root().display()
            )
        }),
    }
}

fn try_key(cfg: &Config) -> Option<Key> {
    Key::load(&cfg.key_file).ok()
}

/// `ckpt-job inspect NAME[@EPOCH]`.
pub fn inspect(cfg: &Config, ckpt_dir: Option<&Path>, t: &Target, json_out: bool) -> Result<i32> {
    let store = ImageStore::new(ckpt_dir.unwrap_or(&cfg.ckpt_dir));
    let epoch = resolve_epoch(&store, t)?;
    let key = try_key(cfg);
    let m = store
        .load_manifest(&t.name, epoch, key.as_ref())
        .with_context(|| format!("reading epoch {epoch} of job {}", t.name))?;
    let mac = if key.is_some() {
        "verified"
    } else {
        "not checked (key not readable)"
    };
    if json_out {
        let mut v = serde_json::to_value(&m)?;
        v["mac"] = json!(mac);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    print_manifest(&m, mac);
    Ok(0)
}

fn print_manifest(m: &Manifest, mac: &str) {
    let total: u64 = m.nodes.iter().flat_map(|n| &n.files).map(|f| f.size).sum();
    println!(
        "job {} epoch {} ({:?} mode), manifest MAC {mac}",
        m.job, m.epoch, m.mode
    );
    println!(
        "  created      {} (unix {})",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.created_unix)
        ),
        m.created_unix
    );
    println!("  owner        uid {} gid {}", m.owner_uid, m.owner_gid);
    println!("  command      {}  (cwd {})", m.command.join(" "), m.cwd);
    println!("  criu         {}", m.criu_version);
    println!(
        "  timings      freeze {:.1} ms, capture {:.1} ms, dump {:.1} ms, downtime {:.1} ms, commit {:.1} ms, total {:.1} ms",
        m.timings.freeze_ms, m.timings.capture_ms, m.timings.dump_ms, m.timings.downtime_ms, m.timings.commit_ms, m.timings.total_ms
    );
    println!("  size         {}", human_bytes(total));
    for n in &m.nodes {
        println!("  node {}", n.node);
        for r in &n.drained {
            println!(
                "    MPI rank {}: drained, sent {} received {} stashed {} ({} rounds)",
                r.rank, r.sent, r.received, r.stashed, r.rounds
            );
        }
        for t in &n.trees {
            println!(
                "    tree {}: root pid {} at dump, network {:?}",
                t.id, t.root_pid, t.net
            );
            for w in &t.writable_files {
                println!("      output file {} ({} bytes at dump)", w.path, w.size);
            }
            for c in &t.captured {
                println!("      node-local   {c}");
            }
        }
        for f in &n.files {
            println!(
                "    {:<40} {:>12}  blake3 {}",
                f.name,
                human_bytes(f.size),
                &f.blake3[..16.min(f.blake3.len())]
            );
        }
    }
}

/// `ckpt-job verify NAME[@EPOCH]`: exit status 0 only if everything matches.
pub fn verify(cfg: &Config, ckpt_dir: Option<&Path>, t: &Target, json_out: bool) -> Result<i32> {
    let store = ImageStore::new(ckpt_dir.unwrap_or(&cfg.ckpt_dir));
    let epoch = resolve_epoch(&store, t)?;
    let key = Key::load(&cfg.key_file)
        .with_context(|| format!("verify needs the manifest key {}", cfg.key_file.display()))?;
    let mut bar = if json_out {
        Progress { bar: None }
    } else {
        Progress::new()
    };
    bar.update(&format!("verifying {}@{epoch}", t.name), 0, 0);
    let result = store.verify(&t.name, epoch, &key);
    bar.finish();
    match result {
        Ok(r) => {
            let (files, bytes) = (r.files, r.bytes);
            if json_out {
                println!(
                    "{}",
                    json!({"job": t.name, "epoch": epoch, "ok": true, "files": files, "bytes": bytes})
                );
            } else {
                println!(
                    "{}@{epoch}: OK ({files} files, {} verified)",
                    t.name,
                    human_bytes(bytes)
                );
            }
            Ok(0)
        }
        Err(e) => {
            if json_out {
                println!(
                    "{}",
                    json!({"job": t.name, "epoch": epoch, "ok": false, "error": e.to_string()})
                );
            } else {
                eprintln!("{}@{epoch}: FAILED: {e}", t.name);
            }
            Ok(1)
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

// ------------------------------------------------------------ cluster jobs

/// Longest wait for the coordinator's answer (an epoch or a restart).
const CLUSTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Calls the coordinator's control socket (`coordinator_socket`).
fn cluster_call(sock: &Path, op: pb::request::Op) -> Result<pb::response::Body, ClusterError> {
    use ckpt_protocol::local_control::{call, CallError as C};
    match call(sock, op, CLUSTER_TIMEOUT) {
        Ok(b) => Ok(b),
        Err(C::Remote(e)) => Err(ClusterError::Refused(e)),
        Err(e @ C::Connect(..)) => Err(ClusterError::Unreachable(e.to_string())),
        Err(e) => Err(ClusterError::Other(e.to_string())),
    }
}

#[derive(Debug)]
enum ClusterError {
    Unreachable(String),
    Refused(pb::Error),
    Other(String),
}

impl ClusterError {
    fn into_anyhow(self, sock: &Path) -> anyhow::Error {
        match self {
            ClusterError::Unreachable(e) | ClusterError::Other(e) => {
                anyhow!("{e} (the coordinator, key `coordinator_socket` of the config)")
            }
            ClusterError::Refused(e) => anyhow!("coordinator {}: {}", sock.display(), e.message),
        }
    }

    /// The coordinator does not know the job (as opposed to any other refusal).
    fn is_unknown_job(&self) -> bool {
        matches!(self, ClusterError::Refused(e) if e.message.contains("knows no job named"))
    }
}

/// Whether `name` runs under a local `ckpt-job run` on this node.
pub fn is_local(cfg: &Config, name: &str) -> bool {
    let sock = cfg.socket_path(name);
    sock.exists() && control::is_live(&sock)
}

/// Whether the coordinator (if configured) knows `name` (or refuses to
/// tell this user about it: it exists).
pub fn is_cluster_job(cfg: &Config, name: &str) -> bool {
    let Some(sock) = &cfg.coordinator_socket else {
        return false;
    };
    let op = pb::request::Op::ClusterStatus(pb::ClusterStatusRequest { job: name.into() });
    match cluster_call(sock, op) {
        Ok(_) => true,
        Err(e @ ClusterError::Refused(_)) => !e.is_unknown_job(),
        Err(_) => false,
    }
}

/// `ckpt-job checkpoint` of a job that does not run locally: through the
/// coordinator if one is configured.
pub fn checkpoint_any(cfg: &Config, name: &str, stop: bool, json_out: bool) -> Result<i32> {
    match &cfg.coordinator_socket {
        Some(sock) if !is_local(cfg, name) => cluster_checkpoint(cfg, sock, name, stop, json_out),
        _ => checkpoint(cfg, name, stop, json_out),
    }
}

fn cluster_refusal(cfg: &Config, sock: &Path, name: &str, e: ClusterError) -> anyhow::Error {
    if e.is_unknown_job() {
        no_such_job(cfg, name).context(format!(
            "and the coordinator ({}) knows no cluster job of that name",
            sock.display()
        ))
    } else {
        e.into_anyhow(sock)
    }
}

fn cluster_checkpoint(
    cfg: &Config,
    sock: &Path,
    name: &str,
    stop: bool,
    json_out: bool,
) -> Result<i32> {
    let op = pb::request::Op::ClusterCheckpoint(pb::ClusterCheckpointRequest {
        job: name.into(),
        nodes: Vec::new(),
        stop,
    });
    let done = match cluster_call(sock, op).map_err(|e| cluster_refusal(cfg, sock, name, e))? {
        pb::response::Body::ClusterCheckpoint(d) => d,
        other => bail!("unexpected reply from the coordinator: {other:?}"),
    };
    if json_out {
        println!(
            "{}",
            json!({"job": name, "epoch": done.epoch, "path": done.path, "downtime_seconds": done.downtime_seconds,
                   "total_seconds": done.total_seconds, "stopped": done.stopped, "after_commit": done.after_commit})
        );
    } else {
        println!(
            "{name}: epoch {} committed (downtime {:.0} ms, total {:.2} s){} -> {}",
            done.epoch,
            done.downtime_seconds * 1000.0,
            done.total_seconds,
            if done.stopped { ", job stopped" } else { "" },
            done.path
        );
        for p in &done.after_commit {
            println!("  after the commit: {p}");
        }
    }
    Ok(0)
}

/// `ckpt-job checkpoint --interval D [--keep K] NAME`: periodic checkpoints
/// of a cluster job by the coordinator (an interval of 0 stops them).
pub fn cluster_schedule(
    cfg: &Config,
    name: &str,
    interval: std::time::Duration,
    keep: Option<usize>,
    json_out: bool,
) -> Result<i32> {
    let Some(sock) = &cfg.coordinator_socket else {
        bail!(
            "--interval of `checkpoint` schedules a cluster job's checkpoints, and the config has \
             no `coordinator_socket` (a local job takes --interval at `ckpt-job run`)"
        );
    };
    if is_local(cfg, name) {
        bail!("job {name} runs locally under `ckpt-job run`: give it --interval there");
    }
    let keep = u32::try_from(keep.unwrap_or(cfg.keep)).context("--keep is too large")?;
    let op = pb::request::Op::ClusterSchedule(pb::ClusterScheduleRequest {
        job: name.into(),
        interval_seconds: interval.as_secs(),
        keep,
    });
    let done = match cluster_call(sock, op).map_err(|e| e.into_anyhow(sock))? {
        pb::response::Body::ClusterSchedule(d) => d,
        other => bail!("unexpected reply from the coordinator: {other:?}"),
    };
    if json_out {
        println!(
            "{}",
            json!({"job": done.job, "interval_seconds": done.interval_seconds, "keep": done.keep})
        );
    } else if done.interval_seconds == 0 {
        println!("{name}: periodic checkpoints off");
    } else {
        println!(
            "{name}: checkpointed every {}, keeping {} committed epochs",
            humantime::format_duration(std::time::Duration::from_secs(done.interval_seconds)),
            done.keep
        );
    }
    Ok(0)
}

fn cluster_job_json(j: &pb::ClusterJob) -> serde_json::Value {
    let nodes: Vec<_> = j
        .nodes
        .iter()
        .map(|n| {
            json!({"node": n.node, "connected": n.connected, "trees": n.trees, "phase": n.phase,
                   "bytes_done": n.bytes_done, "bytes_total": n.bytes_total})
        })
        .collect();
    json!({"name": j.job, "cluster": true, "state": j.phase, "owner_uid": j.owner_uid, "owner_gid": j.owner_gid,
           "nodes": nodes, "last_epoch": j.last_epoch, "running_epoch": j.running_epoch,
           "interval_seconds": j.interval_seconds, "keep": j.keep,
           "checkpoints_committed": j.checkpoints_committed, "checkpoints_failed": j.checkpoints_failed,
           "last_error": j.last_error})
}

/// `ckpt-job status NAME` of a cluster job; `Ok(None)` if the coordinator
/// is not configured or does not know the job.
pub fn cluster_status(cfg: &Config, name: &str, json_out: bool) -> Result<Option<i32>> {
    let Some(sock) = &cfg.coordinator_socket else {
        return Ok(None);
    };
    let op = pb::request::Op::ClusterStatus(pb::ClusterStatusRequest { job: name.into() });
    let j = match cluster_call(sock, op) {
        Ok(pb::response::Body::ClusterJob(j)) => j,
        Ok(other) => bail!("unexpected reply from the coordinator: {other:?}"),
        Err(e) if e.is_unknown_job() => return Ok(None),
        Err(ClusterError::Unreachable(e)) => {
            tracing::warn!(error = %e, "the coordinator is unreachable");
            return Ok(None);
        }
        Err(e) => return Err(e.into_anyhow(sock)),
    };
    if json_out {
        println!("{}", cluster_job_json(&j));
        return Ok(Some(0));
    }
    println!("job:          {} (cluster, {})", j.job, j.phase);
    println!("owner uid:    {}", j.owner_uid);
    println!(
        "checkpoints:  {} committed, {} failed; last epoch {}",
        j.checkpoints_committed,
        j.checkpoints_failed,
        epoch_str(j.last_epoch)
    );
    if j.running_epoch > 0 {
        println!("in flight:    epoch {}", j.running_epoch);
    }
    if j.interval_seconds > 0 {
        println!(
            "interval:     every {}, keep {}",
            humantime::format_duration(std::time::Duration::from_secs(j.interval_seconds)),
            j.keep
        );
    }
    if !j.last_error.is_empty() {
        println!("last error:   {}", j.last_error);
    }
    println!(
        "{:<16} {:<10} {:<12} {:>8}  PROGRESS",
        "NODE", "AGENT", "PHASE", "TREES"
    );
    for n in &j.nodes {
        let progress = if n.bytes_total > 0 {
            format!(
                "{} / {} ({:.0}%)",
                human_bytes(n.bytes_done),
                human_bytes(n.bytes_total),
                n.bytes_done as f64 * 100.0 / n.bytes_total as f64
            )
        } else if n.bytes_done > 0 {
            human_bytes(n.bytes_done)
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:<10} {:<12} {:>8}  {}",
            n.node,
            if n.connected { "connected" } else { "down" },
            n.phase,
            n.trees.len(),
            progress
        );
    }
    Ok(Some(0))
}

/// The coordinator's jobs this user may see (empty without a coordinator
/// or when it is unreachable, with a warning).
fn cluster_jobs(cfg: &Config) -> Vec<pb::ClusterJob> {
    let Some(sock) = &cfg.coordinator_socket else {
        return Vec::new();
    };
    match cluster_call(
        sock,
        pb::request::Op::ClusterList(pb::ClusterListRequest {}),
    ) {
        Ok(pb::response::Body::ClusterJobs(l)) => l.jobs,
        Ok(other) => {
            eprintln!("ckpt-job: warning: unexpected reply from the coordinator: {other:?}");
            Vec::new()
        }
        Err(e) => {
            eprintln!(
                "ckpt-job: warning: cluster jobs not listed: {}",
                e.into_anyhow(sock)
            );
            Vec::new()
        }
    }
}

/// `ckpt-job restart [--epoch E] [--place n1=n3,...] NAME` of a cluster job.
pub fn cluster_restart(
    cfg: &Config,
    name: &str,
    epoch: Option<u64>,
    place: &[(String, String)],
    json_out: bool,
) -> Result<i32> {
    let Some(sock) = &cfg.coordinator_socket else {
        bail!("restarting cluster job {name} needs `coordinator_socket` in the config");
    };
    let op = pb::request::Op::ClusterRestart(pb::ClusterRestartRequest {
        job: name.into(),
        epoch: epoch.unwrap_or(0),
        placement: place.iter().cloned().collect(),
    });
    let done = match cluster_call(sock, op).map_err(|e| e.into_anyhow(sock))? {
        pb::response::Body::ClusterRestart(d) => d,
        other => bail!("unexpected reply from the coordinator: {other:?}"),
    };
    if json_out {
        println!(
            "{}",
            json!({"job": name, "epoch": done.epoch, "restored": done.restored, "total_seconds": done.total_seconds})
        );
    } else {
        println!(
            "{name}: restarted from epoch {} in {:.2} s ({})",
            done.epoch,
            done.total_seconds,
            done.restored.join(", ")
        );
    }
    Ok(0)
}

/// Parses `--place n1=n3,n2=n4` (image node = agent node).
pub fn parse_placement(s: &str) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let Some((from, to)) = item.split_once('=') else {
            bail!("--place {s:?}: {item:?} is not IMAGE_NODE=AGENT_NODE");
        };
        for n in [from, to] {
            ckpt_protocol::config_file::check_node_name(n)
                .map_err(|e| anyhow!("--place {s:?}: {e}"))?;
        }
        if out.iter().any(|(f, _)| f == from) {
            bail!("--place {s:?}: node {from} is placed twice");
        }
        out.push((from.to_owned(), to.to_owned()));
    }
    if out.is_empty() {
        bail!("--place {s:?}: no IMAGE_NODE=AGENT_NODE pair");
    }
    Ok(out)
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    #[test]
    fn placement_parses_and_bad_ones_are_named() {
        assert_eq!(
            parse_placement("n1=n3,n2=n4").unwrap(),
            vec![("n1".into(), "n3".into()), ("n2".into(), "n4".into())]
        );
        let e = parse_placement("n1").unwrap_err().to_string();
        assert!(
            e.contains("\"n1\"") && e.contains("IMAGE_NODE=AGENT_NODE"),
            "{e}"
        );
        let e = parse_placement("n1=n2,n1=n3").unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let e = parse_placement("n1=a/b").unwrap_err().to_string();
        assert!(e.contains("a/b"), "{e}");
        assert!(parse_placement("").is_err());
    }
}
