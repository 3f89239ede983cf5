//! Slurm: `ckpt-job submit [OPTS] [SBATCH OPTIONS…] SCRIPT [ARGS…]` and the
//! batch side, `ckpt-job slurm-run -- CMD…`.
//!
//! `submit` runs `sbatch --requeue --open-mode=append
//! --signal=B:USR1@GRACE … --wrap "ckpt-job slurm-run -- SCRIPT ARGS"`.
//! It registers nothing: the job becomes known to the coordinator when its
//! first tree starts, inside the allocation.
//!
//! `slurm-run`, in the batch step (first node of the allocation):
//! - names the job `slurm-<ClusterName>-<SLURM_JOB_ID>` (the same on every
//!   requeued run; the prolog and epilog derive it the same way);
//! - with `--interval`: has the coordinator checkpoint the job
//!   periodically once its first tree runs, and again after a restart;
//! - on USR1 (Slurm's pre-walltime signal, a preemption, or `scancel
//!   --signal=USR1 --batch`): switches the periodic checkpoints off, then
//!   decides ([`final_checkpoint`]) whether a final checkpoint would be
//!   committed before the walltime; if so (or without a committed epoch,
//!   or on preemption) checkpoints the job in stop mode through the
//!   coordinator and, once the epoch is committed, `scontrol requeue`s it;
//!   if not, requeues it at once to restart from the last committed epoch
//!   and says so. A failed checkpoint is reported and tried again (3
//!   attempts), then the job is requeued from its last committed epoch, or
//!   without one runs on (no requeue, since nothing would come back);
//! - on a requeued run (`SLURM_RESTART_COUNT` > 0) with a committed epoch:
//!   restarts it with each image node placed on itself if it is in the new
//!   allocation, else on a node of the new allocation that holds no image,
//!   then follows the job's output; without a committed epoch it starts
//!   fresh and says so;
//! - otherwise starts `CMD` like `ckpt-job run --cluster`, with
//!   `CKPT_SLURM_NODES` (the allocation's hostnames, space-separated) in
//!   its environment.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ckpt_agent::tree::NetMode;
use ckpt_protocol::local_control::{call, CallError};
use ckpt_protocol::pb;

use crate::config::Config;
use crate::rsh::{self, IoDir, EX_TEMPFAIL};

/// Default time between Slurm's USR1 and the end of the walltime.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);
/// Checkpoint attempts on USR1 before giving up.
const CHECKPOINT_ATTEMPTS: u32 = 3;
/// Environment variable with the allocation's hostnames.
pub const NODES_ENV: &str = "CKPT_SLURM_NODES";

/// sbatch's short options that take a value (as a separate word or glued).
const SHORT_WITH_VALUE: &str = "AabcDdeFGiJLMmNnopqStwx";

/// What `ckpt-job submit` was asked.
#[derive(Debug, Clone)]
pub struct SubmitArgs {
    pub grace: Duration,
    /// Periodic checkpoints (`slurm-run --interval`), and how many to keep.
    pub interval: Option<Duration>,
    pub keep: Option<usize>,
    /// Passed on to slurm-run.
    pub agent_socket: Option<String>,
    pub net: Option<NetMode>,
    pub config: Option<PathBuf>,
    /// sbatch options, then SCRIPT and its arguments.
    pub rest: Vec<OsString>,
}

/// Splits `[SBATCH OPTIONS…] SCRIPT [ARGS…]`. Long options must be given
/// as `--opt=value` (a bare `--opt` is a flag); `--` ends the options.
pub fn split_sbatch_args(rest: &[OsString]) -> Result<(Vec<String>, PathBuf, Vec<OsString>)> {
    let mut opts = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i]
            .to_str()
            .with_context(|| format!("sbatch option {:?} is not UTF-8", rest[i]))?;
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        for bad in ["--signal", "--no-requeue", "--wrap"] {
            if a == bad || a.starts_with(&format!("{bad}=")) {
                bail!("sbatch option {a}: ckpt-job submit sets it itself (use --grace for the signal)");
            }
        }
        opts.push(a.to_owned());
        let b = a.as_bytes();
        if b.len() == 2 && b[0] == b'-' && SHORT_WITH_VALUE.as_bytes().contains(&b[1]) {
            let Some(v) = rest.get(i + 1) else {
                bail!("sbatch option {a} needs a value");
            };
            opts.push(
                v.to_str()
                    .with_context(|| format!("value of {a} ({v:?}) is not UTF-8"))?
                    .to_owned(),
            );
            i += 1;
        }
        i += 1;
    }
    let Some(script) = rest.get(i) else {
        bail!("no SCRIPT given: ckpt-job submit [SBATCH OPTIONS…] SCRIPT [ARGS…]");
    };
    Ok((opts, PathBuf::from(script), rest[i + 1..].to_vec()))
}

/// `#SBATCH` lines at the top of a script (before its first command).
pub fn script_directives(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if n == 0 && l.starts_with("#!") {
            continue;
        }
        if let Some(d) = l.strip_prefix("#SBATCH") {
            out.extend(d.split_whitespace().map(str::to_owned));
        } else if !(l.is_empty() || l.starts_with('#')) {
            break;
        }
    }
    out
}

/// Validates the grace time: whole seconds, 10 s to 65535 s (Slurm's limit).
pub fn grace_seconds(grace: Duration) -> Result<u64> {
    let s = grace.as_secs();
    if grace.subsec_nanos() != 0 || !(10..=65535).contains(&s) {
        bail!(
            "--grace {}: give whole seconds from 10s to 65535s (time to checkpoint before the walltime)",
            humantime::format_duration(grace)
        );
    }
    Ok(s)
}

/// Single-quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The sbatch command line `submit` runs (without the program name).
pub fn sbatch_argv(a: &SubmitArgs, exe: &Path) -> Result<Vec<String>> {
    let secs = grace_seconds(a.grace)?;
    let (user_opts, script, args) = split_sbatch_args(&a.rest)?;
    let script =
        fs::canonicalize(&script).with_context(|| format!("SCRIPT {}", script.display()))?;
    let meta = fs::metadata(&script).with_context(|| format!("SCRIPT {}", script.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            bail!("SCRIPT {} is not an executable file", script.display());
        }
    }
    let text = fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let mut argv = vec!["--parsable".to_owned()];
    argv.extend(script_directives(&String::from_utf8_lossy(&text)));
    argv.extend(user_opts);
    argv.push("--requeue".into());
    argv.push("--open-mode=append".into());
    argv.push(format!("--signal=B:USR1@{secs}"));
    let mut wrap = vec![sh_quote(&exe.to_string_lossy())];
    if let Some(c) = &a.config {
        let c = fs::canonicalize(c).with_context(|| format!("--config {}", c.display()))?;
        wrap.push("--config".into());
        wrap.push(sh_quote(&c.to_string_lossy()));
    }
    wrap.push("slurm-run".into());
    wrap.push(format!("--grace={secs}s"));
    if let Some(i) = a.interval {
        if i.as_secs() == 0 || i.subsec_nanos() != 0 {
            bail!(
                "--interval {}: give whole seconds, at least 1s",
                humantime::format_duration(i)
            );
        }
        wrap.push(format!("--interval={}s", i.as_secs()));
    }
    if let Some(k) = a.keep {
        if k == 0 {
            bail!("--keep must be at least 1");
        }
        wrap.push(format!("--keep={k}"));
    }
    if let Some(s) = &a.agent_socket {
        wrap.push("--agent-socket".into());
        wrap.push(sh_quote(s));
    }
    if let Some(n) = a.net {
        wrap.push("--net".into());
        wrap.push(
            if n == NetMode::Host {
                "host"
            } else {
                "private"
            }
            .into(),
        );
    }
    wrap.push("--".into());
    wrap.push(sh_quote(&script.to_string_lossy()));
    for w in &args {
        let w = w
            .to_str()
            .with_context(|| format!("script argument {w:?} is not UTF-8"))?;
        wrap.push(sh_quote(w));
    }
    argv.push(format!("--wrap=exec {}", wrap.join(" ")));
    Ok(argv)
}

/// `ckpt-job submit`: returns sbatch's status; prints the Slurm job id and
/// the ckpt job name.
pub fn submit(a: &SubmitArgs) -> Result<i32> {
    let exe = std::env::current_exe().context("finding this program (/proc/self/exe)")?;
    let argv = sbatch_argv(a, &exe)?;
    let out = Command::new("sbatch")
        .args(&argv)
        .output()
        .context("running sbatch (is Slurm installed?)")?;
    io::stderr().write_all(&out.stderr)?;
    if !out.status.success() {
        bail!("sbatch failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.trim().split(';');
    let id = parts.next().unwrap_or_default().trim().to_owned();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch printed no job id: {text:?}");
    }
    println!("Submitted batch job {id}");
    Ok(0)
}

/// `slurm-<cluster>-<jobid>`, or `slurm-<jobid>` without a cluster name.
pub fn job_name(cluster: Option<&str>, job_id: &str) -> String {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    match cluster.filter(|c| !c.is_empty()) {
        Some(c) => format!("slurm-{}-{}", safe(c), safe(job_id)),
        None => format!("slurm-{}", safe(job_id)),
    }
}

/// Where each image node of a checkpoint goes in a new allocation: to
/// itself if it is allocated again, else to an allocated node that holds
/// no image, in order.
pub fn placement(images: &[String], alloc: &[String]) -> Result<Vec<(String, String)>> {
    let mut free: Vec<&String> = alloc.iter().filter(|n| !images.contains(n)).collect();
    free.reverse();
    let mut out = Vec::new();
    for i in images {
        if alloc.contains(i) {
            out.push((i.clone(), i.clone()));
        } else if let Some(n) = free.pop() {
            out.push((i.clone(), n.clone()));
        } else {
            bail!(
                "the checkpoint has images of {} nodes ({}), the allocation has {} ({}): \
                 submit with as many nodes",
                images.len(),
                images.join(", "),
                alloc.len(),
                alloc.join(", ")
            );
        }
    }
    Ok(out)
}

/// What `slurm-run` was asked.
#[derive(Debug)]
pub struct SlurmRun {
    /// Time between Slurm's USR1 and the walltime (as submitted).
    pub grace: Duration,
    /// Periodic checkpoints registered with the coordinator once the job runs.
    pub interval: Option<Duration>,
    pub keep: Option<usize>,
    /// `%n` is replaced by the node's name (SLURMD_NODENAME).
    pub agent_socket: Option<String>,
    pub net: NetMode,
    pub io_dir: Option<PathBuf>,
    pub command: Vec<OsString>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `scontrol show hostnames LIST`.
fn hostnames(list: &str) -> Result<Vec<String>> {
    let out = Command::new("scontrol")
        .args(["show", "hostnames", list])
        .output()
        .context("running scontrol show hostnames")?;
    if !out.status.success() {
        bail!(
            "scontrol show hostnames {list}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// The coordinator's view of `job` (`None`: it knows no such job).
fn cluster_job(cfg: &Config, job: &str) -> Result<Option<pb::ClusterJob>> {
    let Some(sock) = &cfg.coordinator_socket else {
        bail!("slurm-run needs `coordinator_socket` in the config");
    };
    let op = pb::request::Op::ClusterStatus(pb::ClusterStatusRequest { job: job.into() });
    match call(sock, op, Duration::from_secs(30)) {
        Ok(pb::response::Body::ClusterJob(j)) => Ok(Some(j)),
        Ok(other) => bail!("unexpected reply from the coordinator: {other:?}"),
        Err(CallError::Remote(e)) if e.message.contains("knows no job named") => Ok(None),
        Err(e) => Err(anyhow::anyhow!(
            "asking the coordinator ({}) about job {job}: {e}",
            sock.display()
        )),
    }
}

/// The coordinator's last committed epoch of `job` (0: none, or unknown job).
fn last_epoch(cfg: &Config, job: &str) -> Result<u64> {
    Ok(cluster_job(cfg, job)?.map_or(0, |j| j.last_epoch))
}

/// `ckpt-job slurm-run`: see the module doc. Returns the exit status.
pub fn slurm_run(cfg: &Config, o: SlurmRun) -> Result<i32> {
    use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
    let Some(id) = env("SLURM_JOB_ID") else {
        bail!("slurm-run runs inside a Slurm batch job (SLURM_JOB_ID is not set); use ckpt-job submit");
    };
    let job = job_name(env("SLURM_CLUSTER_NAME").as_deref(), &id);
    let restarts: u32 = match env("SLURM_RESTART_COUNT") {
        Some(s) => s
            .parse()
            .with_context(|| format!("SLURM_RESTART_COUNT={s:?} is not a number"))?,
        None => 0,
    };
    let node = env("SLURMD_NODENAME").unwrap_or_else(|| cfg.node_name());
    let list = env("SLURM_JOB_NODELIST").context("SLURM_JOB_NODELIST is not set")?;
    let alloc = hostnames(&list)?;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let io_root = match o.io_dir {
        Some(d) if d.is_absolute() => d,
        Some(d) => cwd.join(d),
        None => env("SLURM_SUBMIT_DIR")
            .map_or_else(|| cwd.clone(), PathBuf::from)
            .join(".ckpt")
            .join(&job),
    };
    let agent_socket = match &o.agent_socket {
        Some(t) => PathBuf::from(t.replace("%n", &node)),
        None => rsh::agent_socket(),
    };

    // For the job's trees (run_cluster passes our environment on); set
    // while this process has one thread.
    std::env::set_var(NODES_ENV, alloc.join(" "));
    // Inside an allocation Open MPI would launch its daemons with srun,
    // outside the job's trees: have it use ckpt's rsh launcher.
    if std::env::var_os("OMPI_MCA_plm").is_none() {
        std::env::set_var("OMPI_MCA_plm", "rsh");
    }

    // USR1 (and nothing else) is handled by a thread of its own.
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("sigprocmask")?;
    let stopped = Arc::new(AtomicBool::new(false));
    {
        let (cfg, job, id, stopped) = (cfg.clone(), job.clone(), id.clone(), stopped.clone());
        let (grace, periodic) = (o.grace, o.interval.is_some());
        std::thread::spawn(move || loop {
            if set.wait() != Ok(Signal::SIGUSR1) {
                continue;
            }
            on_usr1(&cfg, &job, &id, grace, periodic, &stopped);
        });
    }
    let epoch = if restarts > 0 {
        last_epoch(cfg, &job)?
    } else {
        0
    };
    let schedule = o.interval.map(|i| (i, o.keep.unwrap_or(cfg.keep)));
    if epoch > 0 {
        return restart(cfg, &job, &io_root, &alloc, restarts, &stopped, schedule);
    }
    if restarts > 0 {
        eprintln!("ckpt-job: requeued run {restarts} of {job}: no committed epoch, starting fresh");
        if io_root.exists() {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut old = io_root.clone().into_os_string();
            old.push(format!(".old.{ts}"));
            let old = PathBuf::from(old);
            fs::rename(&io_root, &old)
                .with_context(|| format!("moving the last run's {} aside", io_root.display()))?;
            eprintln!("ckpt-job: the last run's files are in {}", old.display());
        }
    }
    if let Some((interval, keep)) = schedule {
        // The coordinator learns the job when its first tree starts.
        let (cfg, job) = (cfg.clone(), job.clone());
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_secs(120) {
                if let Ok(Some(j)) = cluster_job(&cfg, &job) {
                    if j.phase == "running" {
                        register_schedule(&cfg, &job, interval, keep);
                        return;
                    }
                }
                sleep(Duration::from_millis(500));
            }
            eprintln!("ckpt-job: job {job} did not start within 120 s: no periodic checkpoints");
        });
    }
    let code = rsh::run_cluster(rsh::ClusterRun {
        job,
        io_dir: Some(io_root),
        net: o.net,
        agent_socket,
        command: o.command,
        cwd,
    })?;
    Ok(if stopped.load(Ordering::SeqCst) {
        EX_TEMPFAIL
    } else {
        code
    })
}

/// What `slurm-run` does on USR1.
#[derive(Debug, Clone, PartialEq)]
pub enum FinalCheckpoint {
    /// Checkpoint in stop mode, then requeue.
    Take,
    /// Requeue from the committed `epoch`: a new checkpoint, estimated to
    /// take `estimate`, would not be committed in the `left` before the
    /// walltime.
    UseLast {
        epoch: u64,
        estimate: Duration,
        left: Duration,
    },
}

/// Margin on top of the last epoch's duration: an estimate, not a promise.
const ESTIMATE_SLACK: Duration = Duration::from_secs(5);

/// The final-checkpoint decision on USR1. `left`: time before the
/// walltime (`None`: unknown or unlimited); `preempted`: Slurm preempts the
/// job; `last`: the newest committed epoch and how long it took
/// (`None` for the duration: unknown). A preemption, a signal well before
/// the walltime's grace (`scancel --signal=USR1`), an unknown time left or
/// duration, or no committed epoch: checkpoint. Otherwise checkpoint only
/// if 1.25 × the last epoch's duration + 5 s fits in the time left.
pub fn final_checkpoint(
    left: Option<Duration>,
    grace: Duration,
    preempted: bool,
    last: Option<(u64, Option<Duration>)>,
) -> FinalCheckpoint {
    let (Some(left), Some((epoch, Some(took))), false) = (left, last, preempted) else {
        return FinalCheckpoint::Take;
    };
    // Not the pre-walltime signal: a user's or an admin's.
    if left > grace + Duration::from_secs(60) {
        return FinalCheckpoint::Take;
    }
    let estimate = took + took / 4 + ESTIMATE_SLACK;
    if estimate <= left {
        FinalCheckpoint::Take
    } else {
        FinalCheckpoint::UseLast {
            epoch,
            estimate,
            left,
        }
    }
}

/// Parses squeue's `%L` (time left): `SS`, `MM:SS`, `H:MM:SS`,
/// `D-HH:MM:SS`; `None` for `UNLIMITED`, `NOT_SET`, `INVALID` or anything
/// else.
pub fn parse_time_left(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = match parts[..] {
        [sec] => (0, 0, sec),
        [m, sec] => (0, m, sec),
        [h, m, sec] => (h, m, sec),
        _ => return None,
    };
    Some(Duration::from_secs(((days * 24 + h) * 60 + m) * 60 + sec))
}

/// Time left before the walltime of Slurm job `id` (squeue `%L`).
fn time_left(id: &str) -> Option<Duration> {
    let out = Command::new("squeue")
        .args(["-h", "-j", id, "-o", "%L"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse_time_left(&String::from_utf8_lossy(&out.stdout)))
        .flatten()
}

/// Whether Slurm preempts job `id` (`scontrol show job`: `PreemptTime` set).
fn preempted(id: &str) -> bool {
    let Ok(out) = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("PreemptTime="))
        .is_some_and(|v| !matches!(v, "None" | "Unknown" | ""))
}

/// The coordinator's newest committed epoch of `job` and its duration
/// (from the manifest's timings; `None` if unreadable).
fn last_committed(cfg: &Config, job: &str) -> Option<(u64, Option<Duration>)> {
    let epoch = last_epoch(cfg, job).ok().filter(|&e| e > 0)?;
    let store = ckpt_coordinator::store::ImageStore::new(&cfg.ckpt_dir);
    let took = store
        .load_manifest(job, epoch, None)
        .ok()
        .map(|m| m.timings.total_ms)
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1e3));
    Some((epoch, took))
}

/// Sets (or, with an interval of 0, clears) the coordinator's periodic
/// checkpoints of `job`; reports on stderr, never fails the job.
fn register_schedule(cfg: &Config, job: &str, interval: Duration, keep: usize) {
    let Some(sock) = &cfg.coordinator_socket else {
        return;
    };
    let op = pb::request::Op::ClusterSchedule(pb::ClusterScheduleRequest {
        job: job.into(),
        interval_seconds: interval.as_secs(),
        keep: u32::try_from(keep).unwrap_or(u32::MAX),
    });
    match call(sock, op, Duration::from_secs(30)) {
        Ok(pb::response::Body::ClusterSchedule(d)) if d.interval_seconds > 0 => eprintln!(
            "ckpt-job: job {job} is checkpointed every {}, keeping {} epochs",
            humantime::format_duration(Duration::from_secs(d.interval_seconds)),
            d.keep
        ),
        Ok(pb::response::Body::ClusterSchedule(_)) => {}
        Ok(other) => eprintln!("ckpt-job: unexpected reply from the coordinator: {other:?}"),
        Err(e) => eprintln!(
            "ckpt-job: setting job {job}'s periodic checkpoints at {}: {e}",
            sock.display()
        ),
    }
}

/// USR1: the final checkpoint (or the last committed epoch), then requeue.
fn on_usr1(
    cfg: &Config,
    job: &str,
    id: &str,
    grace: Duration,
    periodic: bool,
    stopped: &AtomicBool,
) {
    if periodic {
        // No periodic tick may start now; the final decision is ours.
        register_schedule(cfg, job, Duration::ZERO, cfg.keep);
    }
    let decision = final_checkpoint(
        time_left(id),
        grace,
        preempted(id),
        last_committed(cfg, job),
    );
    match decision {
        FinalCheckpoint::UseLast {
            epoch,
            estimate,
            left,
        } => eprintln!(
            "ckpt-job: USR1: a checkpoint of {job} would take ~{} and {} are left before the \
             walltime: no final checkpoint; requeueing Slurm job {id} to restart from epoch {epoch}",
            humantime::format_duration(Duration::from_secs(estimate.as_secs())),
            humantime::format_duration(left)
        ),
        FinalCheckpoint::Take => {
            eprintln!("ckpt-job: USR1: checkpointing job {job} (stop mode), then requeueing Slurm job {id}");
            // A failed epoch is aborted (the trees run on untouched): try again.
            let mut done = false;
            for attempt in 1..=CHECKPOINT_ATTEMPTS {
                match crate::commands::checkpoint_any(cfg, job, true, false) {
                    Ok(_) => {
                        done = true;
                        break;
                    }
                    Err(e) => eprintln!(
                        "ckpt-job: checkpoint {attempt}/{CHECKPOINT_ATTEMPTS} of {job} failed: {e:#}"
                    ),
                }
                sleep(Duration::from_secs(2));
            }
            if !done {
                match last_committed(cfg, job) {
                    Some((epoch, _)) => eprintln!(
                        "ckpt-job: no final checkpoint of {job}: requeueing Slurm job {id} to \
                         restart from epoch {epoch}"
                    ),
                    None => {
                        eprintln!("ckpt-job: no checkpoint of {job}: it runs on and is not requeued");
                        return;
                    }
                }
            }
        }
    }
    stopped.store(true, Ordering::SeqCst);
    match Command::new("scontrol").args(["requeue", id]).status() {
        Ok(s) if s.success() => eprintln!("ckpt-job: Slurm job {id} requeued"),
        Ok(s) => eprintln!("ckpt-job: scontrol requeue {id} failed ({s})"),
        Err(e) => eprintln!("ckpt-job: running scontrol requeue {id}: {e}"),
    }
}

fn restart(
    cfg: &Config,
    job: &str,
    io_root: &Path,
    alloc: &[String],
    restarts: u32,
    stopped: &AtomicBool,
    schedule: Option<(Duration, usize)>,
) -> Result<i32> {
    let store = ckpt_coordinator::store::ImageStore::new(&cfg.ckpt_dir);
    let images: Vec<String> = (|| -> Result<Vec<String>> {
        let e = store
            .latest_committed(job)?
            .context("no committed epoch there")?;
        let m = store.load_manifest(job, e, None)?;
        Ok(m.nodes.iter().map(|n| n.node.clone()).collect())
    })()
    .with_context(|| {
        format!(
            "reading job {job}'s newest manifest under ckpt_dir {} (it must be the coordinator's)",
            cfg.ckpt_dir.display()
        )
    })?;
    let place = placement(&images, alloc)?;
    eprintln!(
        "ckpt-job: requeued run {restarts} of {job}: restarting from its newest epoch ({})",
        place
            .iter()
            .map(|(a, b)| format!("{a}={b}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let main = IoDir(io_root.join("main"));
    // What the last run printed (the stop came at the checkpoint).
    let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
    let mut offs = [size(&main.stdout()), size(&main.stderr())];
    crate::commands::cluster_restart(cfg, job, None, &place, false)?;
    if let Some((interval, keep)) = schedule {
        register_schedule(cfg, job, interval, keep);
    }
    let mut pause = Duration::from_millis(20);
    // A restored job writes its exit status before its trees end; trees
    // that are all gone without one were killed (e.g. on a failed node).
    let mut asked = std::time::Instant::now();
    let mut gone_since: Option<std::time::Instant> = None;
    loop {
        let status = main.exit_status()?;
        let mut moved = false;
        for (k, p) in [main.stdout(), main.stderr()].iter().enumerate() {
            let n = if k == 0 {
                copy_from(p, &mut offs[k], &mut io::stdout().lock())
            } else {
                copy_from(p, &mut offs[k], &mut io::stderr().lock())
            };
            moved |= n.with_context(|| format!("copying {}", p.display()))? > 0;
        }
        if let Some(code) = status {
            return Ok(code);
        }
        if stopped.load(Ordering::SeqCst) {
            return Ok(EX_TEMPFAIL);
        }
        if asked.elapsed() >= Duration::from_secs(2) {
            asked = std::time::Instant::now();
            let exited = cluster_job(cfg, job)
                .ok()
                .flatten()
                .is_some_and(|j| j.phase == "exited");
            match (exited, gone_since) {
                (false, _) => gone_since = None,
                (true, None) => gone_since = Some(asked),
                (true, Some(t)) if t.elapsed() >= Duration::from_secs(2) => {
                    if main.exit_status()?.is_none() && !stopped.load(Ordering::SeqCst) {
                        bail!(
                            "job {job}: every tree ended without an exit status (killed?); \
                             its output is in {}",
                            main.0.display()
                        );
                    }
                }
                (true, Some(_)) => {}
            }
        }
        pause = if moved {
            Duration::from_millis(20)
        } else {
            (pause * 2).min(Duration::from_millis(250))
        };
        sleep(pause);
    }
}

/// Copies `path` from `*off` on into `to`; returns the bytes copied. A
/// file shorter than `*off` (restored to an earlier size) is followed
/// from its end.
fn copy_from(path: &Path, off: &mut u64, to: &mut dyn Write) -> io::Result<u64> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len < *off {
        *off = len;
    }
    f.seek(SeekFrom::Start(*off))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    to.write_all(&buf)?;
    to.flush()?;
    *off += buf.len() as u64;
    Ok(buf.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn sbatch_options_and_script_are_split() {
        let (o, s, a) = split_sbatch_args(&os(&[
            "-N",
            "2",
            "-t5",
            "--exclusive",
            "--mem=1G",
            "job.sh",
            "-x",
        ]))
        .unwrap();
        assert_eq!(o, ["-N", "2", "-t5", "--exclusive", "--mem=1G"]);
        assert_eq!(s, PathBuf::from("job.sh"));
        assert_eq!(a, os(&["-x"]));
        let (o, s, _) = split_sbatch_args(&os(&["-N2", "--", "-weird"])).unwrap();
        assert_eq!((o, s), (vec!["-N2".to_owned()], PathBuf::from("-weird")));
        let e = split_sbatch_args(&os(&["-N"])).unwrap_err().to_string();
        assert!(e.contains("-N needs a value"), "{e}");
        let e = split_sbatch_args(&os(&["-N2"])).unwrap_err().to_string();
        assert!(e.contains("no SCRIPT"), "{e}");
        let e = split_sbatch_args(&os(&["--signal=USR2@60", "a"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--grace"), "{e}");
    }

    #[test]
    fn directives_stop_at_the_first_command() {
        let t = "#!/bin/sh\n#SBATCH -N 2\n# note\n\n#SBATCH --time=5\necho hi\n#SBATCH -p x\n";
        assert_eq!(script_directives(t), ["-N", "2", "--time=5"]);
    }

    #[test]
    fn grace_is_validated() {
        assert_eq!(grace_seconds(DEFAULT_GRACE).unwrap(), 120);
        for bad in [
            Duration::from_secs(5),
            Duration::from_millis(15_500),
            Duration::from_secs(70_000),
        ] {
            let e = grace_seconds(bad).unwrap_err().to_string();
            assert!(e.contains("--grace") && e.contains("10s to 65535s"), "{e}");
        }
    }

    #[test]
    fn names_and_placements() {
        assert_eq!(job_name(Some("c1"), "42"), "slurm-c1-42");
        assert_eq!(job_name(None, "42"), "slurm-42");
        assert_eq!(job_name(Some("a b"), "7"), "slurm-a_b-7");
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = placement(&s(&["n1", "n2"]), &s(&["n2", "n3"])).unwrap();
        assert_eq!(p, [("n1".into(), "n3".into()), ("n2".into(), "n2".into())]);
        let p = placement(&s(&["n1", "n2"]), &s(&["n1", "n2"])).unwrap();
        assert_eq!(p, [("n1".into(), "n1".into()), ("n2".into(), "n2".into())]);
        let e = placement(&s(&["n1", "n2"]), &s(&["n3"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 nodes") && e.contains("has 1"), "{e}");
    }

    #[test]
    fn sbatch_command_line() {
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("job's.sh");
        fs::write(&script, "#!/bin/sh\n#SBATCH -N 2\necho\n").unwrap();
        let a = SubmitArgs {
            grace: Duration::from_secs(60),
            interval: None,
            keep: None,
            agent_socket: Some("/run/%n.sock".into()),
            net: None,
            config: None,
            rest: vec![
                "-t".into(),
                "10".into(),
                script.clone().into(),
                "x y".into(),
            ],
        };
        let e = format!(
            "{:#}",
            sbatch_argv(&a, Path::new("/bin/ckpt-job")).unwrap_err()
        );
        assert!(e.contains("not an executable"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let v = sbatch_argv(&a, Path::new("/bin/ckpt-job")).unwrap();
        let script = fs::canonicalize(&script).unwrap();
        assert_eq!(
            v,
            [
                "--parsable".to_owned(),
                "-N".into(),
                "2".into(),
                "-t".into(),
                "10".into(),
                "--requeue".into(),
                "--open-mode=append".into(),
                "--signal=B:USR1@60".into(),
                format!(
                    "--wrap=exec '/bin/ckpt-job' slurm-run --grace=60s --agent-socket '/run/%n.sock' -- {} 'x y'",
                    sh_quote(&script.to_string_lossy())
                ),
            ]
        );
        assert!(sh_quote("job's").contains("'\\''"));
        let mut a = a;
        a.interval = Some(Duration::from_secs(90));
        a.keep = Some(2);
        let v = sbatch_argv(&a, Path::new("/bin/ckpt-job")).unwrap();
        let wrap = v.last().unwrap();
        assert!(
            wrap.contains("slurm-run --grace=60s --interval=90s --keep=2 --agent-socket"),
            "{wrap}"
        );
        a.interval = Some(Duration::from_millis(1500));
        let e = sbatch_argv(&a, Path::new("/bin/ckpt-job"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--interval 1s 500ms"), "{e}");
    }

    #[test]
    fn squeue_time_left_is_parsed() {
        let s = Duration::from_secs;
        assert_eq!(parse_time_left("45"), Some(s(45)));
        assert_eq!(parse_time_left("2:05\n"), Some(s(125)));
        assert_eq!(parse_time_left("1:00:01"), Some(s(3601)));
        assert_eq!(parse_time_left("2-01:00:00"), Some(s(2 * 86400 + 3600)));
        for bad in ["UNLIMITED", "NOT_SET", "INVALID", "", "1:2:3:4", "x-1:00"] {
            assert_eq!(parse_time_left(bad), None, "{bad}");
        }
    }

    #[test]
    fn final_checkpoint_only_if_it_fits() {
        let s = Duration::from_secs;
        let grace = s(120);
        // Last epoch took 100 s: estimate 100 + 25 + 5 = 130 s.
        let last = Some((4, Some(s(100))));
        assert_eq!(
            final_checkpoint(Some(s(110)), grace, false, last),
            FinalCheckpoint::UseLast {
                epoch: 4,
                estimate: s(130),
                left: s(110)
            }
        );
        assert_eq!(
            final_checkpoint(Some(s(129)), grace, false, last),
            FinalCheckpoint::UseLast {
                epoch: 4,
                estimate: s(130),
                left: s(129)
            }
        );
        assert_eq!(
            final_checkpoint(Some(s(130)), grace, false, last),
            FinalCheckpoint::Take
        );
        // A quick last epoch fits.
        assert_eq!(
            final_checkpoint(Some(s(110)), grace, false, Some((4, Some(s(2))))),
            FinalCheckpoint::Take
        );
        // No committed epoch: try anyway.
        assert_eq!(
            final_checkpoint(Some(s(1)), grace, false, None),
            FinalCheckpoint::Take
        );
        // A preemption always checkpoints.
        assert_eq!(
            final_checkpoint(Some(s(1)), grace, true, last),
            FinalCheckpoint::Take
        );
        // Unknown time left, or unknown duration: checkpoint.
        assert_eq!(
            final_checkpoint(None, grace, false, last),
            FinalCheckpoint::Take
        );
        assert_eq!(
            final_checkpoint(Some(s(1)), grace, false, Some((4, None))),
            FinalCheckpoint::Take
        );
        // Far from the walltime (scancel --signal=USR1): not the walltime's signal.
        assert_eq!(
            final_checkpoint(Some(s(3600)), s(10), false, Some((4, Some(s(5000))))),
            FinalCheckpoint::Take
        );
        assert!(matches!(
            final_checkpoint(Some(s(70)), s(10), false, Some((4, Some(s(5000))))),
            FinalCheckpoint::UseLast { .. }
        ));
    }
}
