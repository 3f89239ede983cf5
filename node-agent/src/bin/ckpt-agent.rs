//! `ckpt-agent --config FILE`: this node's agent (the work is in
//! `ckpt_agent::daemon`). Connects to the coordinator and keeps
//! reconnecting until SIGTERM or SIGINT; then it drops the connection,
//! thaws anything frozen and exits 0 (job trees keep running). Logs go to
//! stderr; the filter is `CKPT_LOG` (default `info`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use ckpt_agent::config::{AgentFile, DEFAULT_PATH};
use ckpt_agent::daemon::AgentDaemon;
use ckpt_protocol::config_file::check_node_name;
use ckpt_protocol::manifest::Key;
use ckpt_protocol::report::error_chain;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "ckpt node agent: checkpoints this node's part of a job"
)]
struct Args {
    /// The agent's config (see configs/agent.toml).
    #[arg(long, short, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// This node's name; overrides the config's `node` (the SSH launcher
    /// passes the hostfile's `node=`).
    #[arg(long)]
    node: Option<String>,
}

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
            eprintln!("ckpt-agent: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let mut file = AgentFile::from_file(&args.config)?;
    if let Some(node) = args.node {
        check_node_name(&node).map_err(|e| anyhow::anyhow!("--node {node:?}: {e}"))?;
        file.node = Some(node);
    }
    // One agent per node: a second one (a repeated SSH launch, an admin's
    // mistake) would fight the first over the trees and the coordinator's
    // session for the node.
    let _lock = lock_state_dir(&file.state_dir)?;
    let coordinator = file
        .coordinator_addr()
        .context("the config names no coordinator address")?;
    let key = Key::load(&file.key_file).context("loading the cluster key")?;
    let criu = file.criu().context("finding CRIU (key `criu`)")?;
    let exe = std::env::current_exe().context("locating the ckpt-agent binary")?;
    let init = file.init_binary(&exe);
    let cfg = file.agent_config(coordinator, key, criu, init);
    let node = cfg.node.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
        let daemon = AgentDaemon::start(cfg)?;
        let control_path = file.control_socket_path();
        let control = daemon.serve_control(&control_path).with_context(|| {
            format!(
                "serving the control socket {} (key `control_socket`)",
                control_path.display()
            )
        })?;
        tracing::info!(
            %node,
            %coordinator,
            config = %args.config.display(),
            state_dir = %file.state_dir.display(),
            control_socket = %control_path.display(),
            "ckpt-agent started"
        );
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(%node, signal = why, "shutting down");
        control.shutdown();
        daemon.shutdown().await;
        tracing::info!(%node, "ckpt-agent stopped");
        Ok(())
    })
}

/// Takes `<state_dir>/agent.lock` (flock, held for the process's life) and
/// writes our pid into it; fails, naming the holder, if another agent runs.
fn lock_state_dir(state_dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state_dir {}", state_dir.display()))?;
    let path = state_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(locked) => locked,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "another ckpt-agent (pid {}) is running with state_dir {}",
                holder.trim(),
                state_dir.display()
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}
