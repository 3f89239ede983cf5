//! `ckpt-coordinator --config FILE`: serves the node agents of a cluster
//! (the work is in `ckpt_coordinator::daemon`). Runs until SIGTERM or
//! SIGINT, then closes every session and exits 0. Logs go to stderr; the
//! filter is `CKPT_LOG` (default `info`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use ckpt_coordinator::config::{CoordinatorFile, DEFAULT_PATH};
use ckpt_coordinator::daemon::{bind, Coordinator, RestartTimeouts, StoreWriter};
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
    std::fs::create_dir_all(&cfg.ckpt_dir)
        .with_context(|| format!("creating ckpt_dir {}", cfg.ckpt_dir.display()))?;
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
        let writer = Arc::new(StoreWriter::new(
            ImageStore::new(&cfg.ckpt_dir),
            key.clone(),
        ));
        let coord = Coordinator::start(listener, key, cfg.daemon_config(), writer.clone())?;
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
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = why, "shutting down");
        if let Some(c) = control {
            c.shutdown();
        }
        coord.shutdown().await;
        tracing::info!("ckpt-coordinator stopped");
        Ok(())
    })
}
