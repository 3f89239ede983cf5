//! `ckpt-job`: transparent checkpoint/restart of a job.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ckpt_agent::tree::NetMode;
use ckpt_cli::commands::{self, Target};
use ckpt_cli::config::Config;
use ckpt_cli::supervisor::{self, JobSpec};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "ckpt-job",
    version,
    about = "Checkpoint and restart jobs transparently (CRIU underneath)"
)]
struct Cli {
    /// Configuration file (default: $CKPT_CONFIG, else /etc/ckpt/ckpt.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Net {
    Private,
    Host,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run CMD as a checkpointable job in the foreground; exits with its status
    /// (75 if it was stopped by `checkpoint --stop`).
    Run {
        /// Job name (default: the command's name and this process's pid).
        #[arg(long)]
        name: Option<String>,
        /// Where checkpoints go (default: ckpt_dir of the config).
        #[arg(long, value_name = "DIR")]
        ckpt_dir: Option<PathBuf>,
        /// Checkpoint periodically, e.g. 30m, 1h, 90s.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Committed epochs to keep (default: keep of the config).
        #[arg(long, value_name = "K")]
        keep: Option<usize>,
        /// Network of the job: its own namespace with loopback only, or the host's.
        #[arg(long, value_enum)]
        net: Option<Net>,
        /// Run the job as this user (root only); the user then owns the job and its images.
        #[arg(long)]
        user: Option<String>,
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Checkpoint a running job; returns when the epoch is committed.
    Checkpoint {
        /// End the job once the epoch is committed.
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        json: bool,
        name: String,
    },
    /// Restore a job from its newest committed epoch (or --epoch) and supervise it like `run`.
    Restart {
        #[arg(long)]
        epoch: Option<u64>,
        #[arg(long, value_name = "DIR")]
        ckpt_dir: Option<PathBuf>,
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        #[arg(long, value_name = "K")]
        keep: Option<usize>,
        name: String,
    },
    /// Running jobs on this node and jobs with checkpoints.
    List {
        #[arg(long, value_name = "DIR")]
        ckpt_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// State of one job: live state if running, else its checkpoints.
    Status {
        #[arg(long, value_name = "DIR")]
        ckpt_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        name: String,
    },
    /// What an epoch holds (default: the newest committed one).
    Inspect {
        #[arg(long, value_name = "DIR")]
        ckpt_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// NAME or NAME@EPOCH
        target: String,
    },
    /// Check an epoch's MAC and every file's size and digest.
    Verify {
        #[arg(long, value_name = "DIR")]
        ckpt_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// NAME or NAME@EPOCH
        target: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ckpt-job: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> Result<i32> {
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.cmd {
        Cmd::Run {
            name,
            ckpt_dir,
            interval,
            keep,
            net,
            user,
            command,
        } => {
            let (uid, gid, groups) = owner(user.as_deref())?;
            let name = match name {
                Some(n) => n,
                None => default_name(&command),
            };
            let spec = JobSpec {
                name,
                ckpt_dir: ckpt_dir.unwrap_or_else(|| cfg.ckpt_dir.clone()),
                interval,
                keep: keep_arg(keep, &cfg)?,
                net: match net {
                    Some(Net::Host) => NetMode::Host,
                    Some(Net::Private) => NetMode::Private,
                    None => cfg.network,
                },
                uid,
                gid,
                groups,
                command,
                cwd: std::env::current_dir().context("reading the current directory")?,
            };
            supervisor::run(&cfg, spec)
        }
        Cmd::Checkpoint { stop, json, name } => commands::checkpoint(&cfg, &name, stop, json),
        Cmd::Restart {
            epoch,
            ckpt_dir,
            interval,
            keep,
            name,
        } => {
            let spec = JobSpec {
                name,
                ckpt_dir: ckpt_dir.unwrap_or_else(|| cfg.ckpt_dir.clone()),
                interval,
                keep: keep_arg(keep, &cfg)?,
                net: cfg.network,
                uid: 0,
                gid: 0,
                groups: Vec::new(),
                command: Vec::new(),
                cwd: PathBuf::from("/"),
            };
            let mut bar = commands::Progress::new();
            let r = supervisor::restart(&cfg, spec, epoch, &mut |phase, done, total| {
                bar.update(phase, done, total)
            });
            bar.finish();
            r
        }
        Cmd::List { ckpt_dir, json } => commands::list(&cfg, ckpt_dir.as_deref(), json),
        Cmd::Status {
            ckpt_dir,
            json,
            name,
        } => commands::status(&cfg, ckpt_dir.as_deref(), &name, json),
        Cmd::Inspect {
            ckpt_dir,
            json,
            target,
        } => commands::inspect(&cfg, ckpt_dir.as_deref(), &Target::parse(&target)?, json),
        Cmd::Verify {
            ckpt_dir,
            json,
            target,
        } => commands::verify(&cfg, ckpt_dir.as_deref(), &Target::parse(&target)?, json),
    }
}

fn keep_arg(keep: Option<usize>, cfg: &Config) -> Result<usize> {
    match keep {
        Some(0) => bail!("--keep must be at least 1"),
        Some(k) => Ok(k),
        None => Ok(cfg.keep),
    }
}

fn default_name(command: &[OsString]) -> String {
    let base = command
        .first()
        .map(|c| {
            PathBuf::from(c)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(40)
        .collect();
    let base = if base.is_empty() || base.starts_with('.') {
        "job".to_string()
    } else {
        base
    };
    format!("{base}-{}", std::process::id())
}

/// The job's owner: the caller, or `--user` (root only).
fn owner(user: Option<&str>) -> Result<(u32, u32, Vec<u32>)> {
    use nix::unistd::{getegid, geteuid, getgroups, Uid, User};
    match user {
        None => Ok((
            geteuid().as_raw(),
            getegid().as_raw(),
            getgroups()
                .map(|g| g.iter().map(|g| g.as_raw()).collect())
                .unwrap_or_default(),
        )),
        Some(u) => {
            if !geteuid().is_root() {
                bail!("--user needs root");
            }
            let user = match u.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n))?,
                Err(_) => User::from_name(u)?,
            }
            .with_context(|| format!("no such user: {u}"))?;
            let name = std::ffi::CString::new(user.name.clone())?;
            let groups = nix::unistd::getgrouplist(&name, user.gid)
                .map(|g| g.iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![user.gid.as_raw()]);
            Ok((user.uid.as_raw(), user.gid.as_raw(), groups))
        }
    }
}
