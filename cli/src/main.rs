//! `ckpt-job`: transparent checkpoint/restart of a job.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ckpt_agent::tree::NetMode;
use ckpt_cli::commands::{self, Target};
use ckpt_cli::config::Config;
use ckpt_cli::rsh;
use ckpt_cli::submit;
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
        /// A multi-node job: start its first tree under this node's ckpt-agent,
        /// with mpirun (Open MPI) and hydra (MPICH) launching through
        /// `ckpt-job rsh`; checkpoints go through the coordinator. Network
        /// (default private): each tree gets a job-stable address from the
        /// coordinator's job_network, so the job can restart on other
        /// nodes; --net host keeps the nodes' own network (restart on the
        /// same nodes only, once the old connections are gone).
        #[arg(long, conflicts_with_all = ["ckpt_dir", "interval", "keep", "user"])]
        cluster: bool,
        /// With --cluster: where the job's output, exit status and rsh files
        /// go, on a filesystem all nodes share (default: ./.ckpt/NAME).
        #[arg(long, value_name = "DIR", requires = "cluster")]
        io_dir: Option<PathBuf>,
        /// With --cluster: the local agent's control socket (default:
        /// $CKPT_AGENT_SOCKET, else /var/lib/ckpt/agent/control.sock).
        #[arg(long, value_name = "PATH", requires = "cluster")]
        agent_socket: Option<PathBuf>,
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Start CMD on node HOST as part of the calling job (for mpirun's rsh
    /// launcher; also installed as `ckpt-rsh`). Runs only inside a job tree.
    Rsh {
        /// [-x] HOST CMD...
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "HOST CMD"
        )]
        args: Vec<OsString>,
    },
    /// Internal: runs inside a tree started by rsh or run --cluster.
    #[command(hide = true)]
    RshExec {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Checkpoint a running job; returns when the epoch is committed. A job
    /// not running locally goes to the coordinator (`coordinator_socket`).
    Checkpoint {
        /// End the job once the epoch is committed.
        #[arg(long)]
        stop: bool,
        /// Cluster jobs: have the coordinator checkpoint the job this often
        /// (e.g. 10m; 0s turns it off) instead of checkpointing it now.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "stop")]
        interval: Option<Duration>,
        /// With --interval: committed epochs to keep (default: keep of the config).
        #[arg(long, value_name = "K", requires = "interval")]
        keep: Option<usize>,
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
        /// Cluster jobs: which agent restores which node's image, e.g.
        /// n1=n3,n2=n4 (default: every image on the node it came from).
        #[arg(long, value_name = "IMAGE=AGENT,...")]
        place: Option<String>,
        #[arg(long)]
        json: bool,
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
    /// Submit SCRIPT to Slurm (sbatch) as a checkpointable, requeueable job:
    /// USR1 GRACE before the walltime checkpoints and requeues it, the
    /// requeued run restarts from the checkpoint. Long sbatch options as
    /// --opt=value.
    Submit {
        /// Time between Slurm's USR1 and the walltime (10s..65535s).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "120s")]
        grace: Duration,
        /// Periodic checkpoints of the running job (whole seconds).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// With --interval: committed epochs to keep (default: keep of the config).
        #[arg(long, value_name = "K", requires = "interval")]
        keep: Option<usize>,
        /// Passed to slurm-run.
        #[arg(long, value_name = "PATH")]
        agent_socket: Option<String>,
        #[arg(long, value_enum)]
        net: Option<Net>,
        /// [SBATCH OPTIONS...] SCRIPT [ARGS...]
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        rest: Vec<OsString>,
    },
    /// Inside a Slurm batch job (what submit runs): start CMD across the
    /// allocation, or restart it after a requeue; USR1 checkpoints and requeues.
    SlurmRun {
        /// Time between Slurm's USR1 and the walltime, as submitted.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "120s")]
        grace: Duration,
        /// Periodic checkpoints, registered with the coordinator once the job runs.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        #[arg(long, value_name = "K", requires = "interval")]
        keep: Option<usize>,
        /// The node agent's control socket; %n = this node's name.
        #[arg(long, value_name = "PATH")]
        agent_socket: Option<String>,
        #[arg(long, value_enum)]
        net: Option<Net>,
        #[arg(long, value_name = "DIR")]
        io_dir: Option<PathBuf>,
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
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
    // `ckpt-rsh HOST CMD...`: MPICH's -launcher-exec takes one executable.
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    if PathBuf::from(&argv0).file_name() == Some(std::ffi::OsStr::new(rsh::RSH_NAME)) {
        let rest: Vec<OsString> = args.collect();
        return ExitCode::from(rsh::rsh(&rest).clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    // Inside job trees: no configuration file is needed or read.
    match cli.cmd {
        Cmd::Rsh { args } => return ExitCode::from(rsh::rsh(&args).clamp(0, 255) as u8),
        Cmd::RshExec { dir, command } => {
            return match rsh::exec(&dir, &command) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("ckpt-job rsh-exec: error: {e:#}");
                    ExitCode::from(127)
                }
            }
        }
        _ => {}
    }
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
    let net_mode = |n: Option<Net>| match n {
        Some(Net::Host) => NetMode::Host,
        Some(Net::Private) | None => NetMode::Private,
    };
    match cli.cmd {
        Cmd::Submit {
            grace,
            interval,
            keep,
            agent_socket,
            net,
            rest,
        } => submit::submit(&submit::SubmitArgs {
            grace,
            interval,
            keep,
            agent_socket,
            net: net.map(|n| net_mode(Some(n))),
            config: cli.config.clone(),
            rest,
        }),
        Cmd::SlurmRun {
            grace,
            interval,
            keep,
            agent_socket,
            net,
            io_dir,
            command,
        } => submit::slurm_run(
            &cfg,
            submit::SlurmRun {
                grace,
                interval,
                keep,
                agent_socket,
                net: net_mode(net),
                io_dir,
                command,
            },
        ),
        Cmd::Run {
            name,
            ckpt_dir,
            interval,
            keep,
            net,
            user,
            cluster,
            io_dir,
            agent_socket,
            command,
        } => {
            if cluster {
                return rsh::run_cluster(rsh::ClusterRun {
                    job: name.unwrap_or_else(|| default_name(&command)),
                    io_dir,
                    net: match net {
                        Some(Net::Private) | None => NetMode::Private,
                        Some(Net::Host) => NetMode::Host,
                    },
                    agent_socket: agent_socket.unwrap_or_else(rsh::agent_socket),
                    command,
                    cwd: std::env::current_dir().context("reading the current directory")?,
                });
            }
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
        Cmd::Checkpoint {
            stop,
            interval: Some(interval),
            keep,
            json,
            name,
        } => {
            let _ = stop;
            commands::cluster_schedule(&cfg, &name, interval, keep, json)
        }
        Cmd::Checkpoint {
            stop, json, name, ..
        } => commands::checkpoint_any(&cfg, &name, stop, json),
        Cmd::Restart {
            epoch,
            place: Some(place),
            json,
            name,
            ..
        } => {
            let place = commands::parse_placement(&place)?;
            commands::cluster_restart(&cfg, &name, epoch, &place, json)
        }
        Cmd::Restart {
            epoch, json, name, ..
        } if commands::is_cluster_job(&cfg, &name) => {
            commands::cluster_restart(&cfg, &name, epoch, &[], json)
        }
        Cmd::Restart {
            epoch,
            ckpt_dir,
            interval,
            keep,
            name,
            ..
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
        // Run by main() before the configuration is read.
        Cmd::Rsh { .. } | Cmd::RshExec { .. } => bail!("rsh and rsh-exec are handled before"),
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
