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
//! - on USR1 (Slurm's pre-walltime signal, or `scancel --signal=USR1
//!   --batch`): checkpoints the job in stop mode through the coordinator
//!   and, once the epoch is committed, `scontrol requeue`s it; a failed
//!   checkpoint is reported and tried again (3 attempts), then the job
//!   runs on (no requeue, since nothing would come back);
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
        std::thread::spawn(move || loop {
            if set.wait() != Ok(Signal::SIGUSR1) {
                continue;
            }
            eprintln!("ckpt-job: USR1: checkpointing job {job} (stop mode), then requeueing Slurm job {id}");
            // A failed epoch is aborted (the trees run on untouched): try again.
            let mut done = false;
            for attempt in 1..=CHECKPOINT_ATTEMPTS {
                match crate::commands::checkpoint_any(&cfg, &job, true, false) {
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
                eprintln!("ckpt-job: no checkpoint of {job}: it runs on and is not requeued");
                continue;
            }
            stopped.store(true, Ordering::SeqCst);
            match Command::new("scontrol").args(["requeue", &id]).status() {
                Ok(s) if s.success() => eprintln!("ckpt-job: Slurm job {id} requeued"),
                Ok(s) => eprintln!("ckpt-job: scontrol requeue {id} failed ({s})"),
                Err(e) => eprintln!("ckpt-job: running scontrol requeue {id}: {e}"),
            }
        });
    }

    let epoch = if restarts > 0 {
        last_epoch(cfg, &job)?
    } else {
        0
    };
    if epoch > 0 {
        return restart(cfg, &job, &io_root, &alloc, restarts, &stopped);
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

fn restart(
    cfg: &Config,
    job: &str,
    io_root: &Path,
    alloc: &[String],
    restarts: u32,
    stopped: &AtomicBool,
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
                    "--wrap=exec '/bin/ckpt-job' slurm-run --agent-socket '/run/%n.sock' -- {} 'x y'",
                    sh_quote(&script.to_string_lossy())
                ),
            ]
        );
        assert!(sh_quote("job's").contains("'\\''"));
    }
}
