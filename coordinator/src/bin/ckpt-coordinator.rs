//! `ckpt-coordinator --config FILE`: serves the node agents of a cluster
//! (the work is in `ckpt_coordinator::daemon`). Runs until SIGTERM or
//! SIGINT, then closes every session and exits 0. Logs go to stderr; the
//! filter is `CKPT_LOG` (default `info`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ckpt_coordinator::config::{CoordinatorFile, DEFAULT_PATH};
use ckpt_coordinator::daemon::{bind, registry, Coordinator, RestartTimeouts, StoreWriter};
use ckpt_coordinator::launch::{read_hostfile, Host, SshLauncher};
use ckpt_coordinator::store::ImageStore;
use ckpt_protocol::manifest::Key;
use ckpt_protocol::report::error_chain;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "ckpt coordinator: drives coordinated checkpoints of multi-node jobs"
)]
struct Args {
    /// The coordinator's config (see configs/coordinator.toml).
    #[arg(long, short, default_value = DEFAULT_PATH)]
    config: PathBuf,
}

/// Room for every agent of a large cluster connecting at once.
const BACKLOG: u32 = 4096;
/// How often the periodic-checkpoint schedules are looked at.
const SCHEDULER_PERIOD: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckpt-coordinator: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let cfg = CoordinatorFile::from_file(&args.config)?;
    let key = Key::load(&cfg.key_file).context("loading the cluster key")?;
    // A bad hostfile stops the start, before anything listens.
    let launch = match &cfg.launch {
        Some(l) => Some((l.launcher(), read_hostfile(&l.hostfile)?)),
        None => None,
    };
    std::fs::create_dir_all(&cfg.ckpt_dir)
        .with_context(|| format!("creating ckpt_dir {}", cfg.ckpt_dir.display()))?;
    let store = ImageStore::new(&cfg.ckpt_dir);
    let jobs = match &cfg.state_dir {
        Some(dir) => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| {
                    format!(
                        "creating state_dir {} (key `state_dir` of {})",
                        dir.display(),
                        args.config.display()
                    )
                })?;
            registry::load(Some(dir), &store, &key).context("loading the job registry")?
        }
        None => registry::load(None, &store, &key).context("reading the image store")?,
    };
    tracing::info!(jobs = jobs.len(), "job registry loaded");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
        let listener = bind(cfg.listen, BACKLOG).with_context(|| {
            format!(
                "listening on {} (key `listen` of {})",
                cfg.listen,
                args.config.display()
            )
        })?;
        let writer = Arc::new(StoreWriter::new(store, key.clone()));
        let mut daemon_cfg = cfg.daemon_config();
        if let Some(net) = cfg.job_network() {
            let file = cfg.address_file();
            let a = ckpt_coordinator::daemon::Addresses::open(net, &file)
                .with_context(|| format!("key `job_network` of {}", args.config.display()))?;
            daemon_cfg.addresses = Some(Arc::new(a));
        }
        let coord = Coordinator::start_with_registry(
            listener,
            key,
            daemon_cfg,
            writer.clone(),
            jobs,
            cfg.state_dir.clone(),
        )?;
        let scheduler = coord.run_scheduler(writer.clone(), cfg.deadlines(), SCHEDULER_PERIOD);
        let control = match &cfg.control_socket {
            Some(path) => Some(
                coord
                    .serve_control(path, writer, cfg.deadlines(), RestartTimeouts::default())
                    .with_context(|| {
                        format!(
                            "serving the control socket {} (key `control_socket` of {})",
                            path.display(),
                            args.config.display()
                        )
                    })?,
            ),
            None => None,
        };
        tracing::info!(
            listen = %coord.local_addr(),
            config = %args.config.display(),
            ckpt_dir = %cfg.ckpt_dir.display(),
            expected_nodes = cfg.expected_nodes.as_ref().map_or(0, Vec::len),
            control_socket = cfg
                .control_socket
                .as_ref()
                .map_or_else(|| "none".to_owned(), |p| p.display().to_string()),
            "ckpt-coordinator started"
        );
        if let Some((launcher, hosts)) = launch {
            // Agents connect back on their own; the launch only logs.
            tokio::task::spawn_blocking(move || launch_agents(&launcher, &hosts));
        }
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = why, "shutting down");
        if let Some(c) = control {
            c.shutdown();
        }
        scheduler.abort();
        coord.shutdown().await;
        tracing::info!("ckpt-coordinator stopped");
        Ok(())
    })
}

/// Starts the agents of the hostfile over SSH and logs what happened on
/// each host.
fn launch_agents(launcher: &SshLauncher, hosts: &[Host]) {
    tracing::info!(hosts = hosts.len(), "starting agents over SSH");
    let results = launcher.start_all(hosts);
    let mut failed = 0;
    for (h, r) in hosts.iter().zip(results) {
        match r {
            Ok(started) => tracing::info!(
                host = %h.label(),
                node = h.node.as_deref().unwrap_or("(agent default)"),
                pid = started.pid,
                "agent started over SSH"
            ),
            Err(e) => {
                failed += 1;
                tracing::error!(host = %h.label(), "agent not started: {}", error_chain(&e));
            }
        }
    }
    tracing::info!(started = hosts.len() - failed, failed, "SSH launch done");
}
