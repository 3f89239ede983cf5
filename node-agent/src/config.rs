//! `agent.toml`: which node this is, where its coordinator listens, the
//! cluster key, and how the agent freezes, heartbeats and reconnects. An
//! unknown key or a bad value is an error that names the file, the key and
//! the line (`configs/agent.toml` documents every key).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_protocol::config_file::{self, at, check_absolute, check_positive, duration};
use ckpt_protocol::manifest::Key;
use serde::Deserialize;

use crate::criu::{Criu, CriuError};
use crate::daemon::AgentConfig;

pub use ckpt_protocol::config_file::ConfigError;

/// Looked at when `--config` names no file.
pub const DEFAULT_PATH: &str = "/etc/ckpt/agent.toml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentFile {
    /// This node's name; default: the hostname.
    pub node: Option<String>,
    /// `host:port` of the coordinator (required).
    pub coordinator: String,
    /// The cluster key (0600), shared with the coordinator.
    pub key_file: PathBuf,
    /// Root's private directory for the trees' state.
    pub state_dir: PathBuf,
    /// The CRIU binary; default: `/usr/local/sbin/criu`, else `criu` on PATH.
    pub criu: Option<PathBuf>,
    /// The `ckpt-init` binary; default: next to `ckpt-agent`.
    pub init_binary: Option<PathBuf>,
    /// Longest wait for a tree's cgroup to freeze.
    #[serde(deserialize_with = "duration")]
    pub freeze_timeout: Duration,
    /// The coordinator is lost after this many of its heartbeat intervals
    /// without a frame from it.
    pub heartbeat_misses: u32,
    /// Backoff between connection attempts: first and largest.
    #[serde(deserialize_with = "duration")]
    pub reconnect_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Duration,
    /// The local control socket; default: `control.sock` in `state_dir`.
    pub control_socket: Option<PathBuf>,
    /// `coordinator`, resolved when the file was parsed.
    #[serde(skip)]
    coordinator_addr: Option<SocketAddr>,
}

impl Default for AgentFile {
    fn default() -> Self {
        AgentFile {
            node: None,
            coordinator: String::new(),
            key_file: PathBuf::from("/etc/ckpt/cluster.key"),
            state_dir: PathBuf::from("/var/lib/ckpt/agent"),
            criu: None,
            init_binary: None,
            freeze_timeout: Duration::from_secs(10),
            heartbeat_misses: 3,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            control_socket: None,
            coordinator_addr: None,
        }
    }
}

impl AgentFile {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        config_file::load(path, Self::parse)
    }

    /// Parses and validates (resolving `coordinator`); the message names
    /// the key and the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut cfg: AgentFile =
            toml::from_str(text).map_err(|e| config_file::describe(text, e.message(), e.span()))?;
        cfg.validate(text)?;
        cfg.coordinator_addr = Some(
            resolve(&cfg.coordinator).map_err(|e| format!("{}: {e}", at(text, "coordinator")))?,
        );
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        if let Some(n) = &self.node {
            config_file::check_node_name(n).map_err(|e| format!("{}: {e}", at(text, "node")))?;
        }
        let mut paths = vec![
            ("key_file", &*self.key_file),
            ("state_dir", &*self.state_dir),
        ];
        paths.extend(self.criu.as_deref().map(|p| ("criu", p)));
        paths.extend(self.init_binary.as_deref().map(|p| ("init_binary", p)));
        check_absolute(text, &paths)?;
        check_positive(
            text,
            &[
                ("freeze_timeout", self.freeze_timeout),
                ("reconnect_min", self.reconnect_min),
                ("reconnect_max", self.reconnect_max),
            ],
        )?;
        if self.reconnect_min > self.reconnect_max {
            return Err(format!(
                "{}: reconnect_max must not be below reconnect_min",
                at(text, "reconnect_max")
            ));
        }
        if self.heartbeat_misses == 0 {
            return Err(format!(
                "{}: heartbeat_misses must be at least 1",
                at(text, "heartbeat_misses")
            ));
        }
        Ok(())
    }

    /// This node's name: `node`, else the hostname.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(default_node_name)
    }

    /// Where the coordinator listens (resolved by [`AgentFile::parse`]).
    /// Where the local control socket is.
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("control.sock"))
    }

    pub fn coordinator_addr(&self) -> Option<SocketAddr> {
        self.coordinator_addr
    }

    /// The configured CRIU, or the one [`Criu::locate`] finds.
    pub fn criu(&self) -> Result<Criu, CriuError> {
        match &self.criu {
            Some(p) => Ok(Criu::new(p)),
            None => Criu::locate(),
        }
    }

    /// `init_binary`, else `ckpt-init` in the directory of `exe`.
    pub fn init_binary(&self, exe: &Path) -> PathBuf {
        self.init_binary.clone().unwrap_or_else(|| {
            exe.parent()
                .unwrap_or_else(|| Path::new("/"))
                .join("ckpt-init")
        })
    }

    /// The daemon's settings, with the loaded key, the CRIU to run and the
    /// `ckpt-init` binary.
    pub fn agent_config(
        &self,
        coordinator: SocketAddr,
        key: Key,
        criu: Criu,
        init: PathBuf,
    ) -> AgentConfig {
        let mut cfg = AgentConfig::new(
            self.node_name(),
            coordinator,
            key,
            criu,
            init,
            self.state_dir.clone(),
        );
        cfg.freeze_timeout = self.freeze_timeout;
        cfg.heartbeat_misses = self.heartbeat_misses;
        cfg.reconnect_min = self.reconnect_min;
        cfg.reconnect_max = self.reconnect_max;
        cfg
    }
}

/// `ip:port`, `[ip6]:port` or `host:port` (looked up now).
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if addr.is_empty() {
        return Err("the coordinator's address is required (`host:port`)".into());
    }
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = |why: String| format!("coordinator address {addr:?}: {why}");
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad("expected `host:port`".into()));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad(
            "expected `host:port` with a port from 0 to 65535".into()
        ));
    }
    addr.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name has no address".into()))
}

/// The hostname, made safe as a node name (`node` if it has none).
pub fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.replace(
                |c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "_",
            )
        })
        .unwrap_or_else(|| "node".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "coordinator = \"127.0.0.1:7411\"\n";

    fn err(text: &str) -> String {
        AgentFile::parse(text).unwrap_err()
    }

    #[test]
    fn minimal_config_gives_defaults() {
        let c = AgentFile::parse(MINIMAL).unwrap();
        assert_eq!(
            c.coordinator_addr(),
            Some("127.0.0.1:7411".parse().unwrap())
        );
        let d = AgentFile::default();
        assert_eq!(
            (c.key_file.clone(), c.state_dir.clone()),
            (d.key_file, d.state_dir)
        );
        assert_eq!(c.node_name(), default_node_name());
        assert_eq!(
            c.init_binary(Path::new("/opt/ckpt/bin/ckpt-agent")),
            PathBuf::from("/opt/ckpt/bin/ckpt-init")
        );
    }

    #[test]
    fn values_are_read() {
        let c = AgentFile::parse(
            "node = \"n7\"\ncoordinator = \"localhost:9\"\nfreeze_timeout = \"2s\"\n\
             heartbeat_misses = 4\nreconnect_min = \"10ms\"\nreconnect_max = \"1s\"\n\
             criu = \"/opt/criu\"\ninit_binary = \"/opt/ckpt-init\"\n",
        )
        .unwrap();
        assert_eq!(c.coordinator_addr().map(|a| a.port()), Some(9));
        let cfg = c.agent_config(
            "127.0.0.1:9".parse().unwrap(),
            Key::from_bytes([1; 32]),
            c.criu().unwrap(),
            c.init_binary(Path::new("/x/ckpt-agent")),
        );
        assert_eq!(cfg.node, "n7");
        assert_eq!(cfg.criu.bin(), Path::new("/opt/criu"));
        assert_eq!(cfg.init_binary, PathBuf::from("/opt/ckpt-init"));
        assert_eq!(cfg.freeze_timeout, Duration::from_secs(2));
        assert_eq!(cfg.heartbeat_misses, 4);
        assert_eq!(cfg.reconnect_min, Duration::from_millis(10));
        assert_eq!(cfg.reconnect_max, Duration::from_secs(1));
    }

    #[test]
    fn malformed_values_name_key_and_line() {
        let e = err(&format!("{MINIMAL}nodename = \"n1\"\n"));
        assert!(e.contains("line 2") && e.contains("nodename"), "{e}");
        let e = err(&format!("{MINIMAL}heartbeat_misses = \"3\"\n"));
        assert!(
            e.contains("line 2") && e.contains("heartbeat_misses"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\nfreeze_timeout = \"soon\"\n"));
        assert!(e.contains("line 3") && e.contains("soon"), "{e}");
        let e = err("node = \"n1\"\n");
        assert!(e.contains("`coordinator`") && e.contains("required"), "{e}");
        for bad in ["127.0.0.1", "127.0.0.1:99999", ":80", "a b:1"] {
            let e = err(&format!("\ncoordinator = \"{bad}\"\n"));
            assert!(e.contains("`coordinator` at line 2"), "{bad}: {e}");
        }
        let e = err(&format!("{MINIMAL}state_dir = \"var/ckpt\"\n"));
        assert!(
            e.contains("`state_dir` at line 2") && e.contains("absolute"),
            "{e}"
        );
        let e = err(&format!("criu = \"criu\"\n{MINIMAL}"));
        assert!(
            e.contains("`criu` at line 1") && e.contains("absolute"),
            "{e}"
        );
        let e = err(&format!(
            "{MINIMAL}reconnect_min = \"10s\"\nreconnect_max = \"1s\"\n"
        ));
        assert!(e.contains("`reconnect_max` at line 3"), "{e}");
        let e = err(&format!("{MINIMAL}freeze_timeout = \"0s\"\n"));
        assert!(e.contains("`freeze_timeout` at line 2"), "{e}");
        let e = err(&format!("{MINIMAL}heartbeat_misses = 0\n"));
        assert!(e.contains("`heartbeat_misses` at line 2"), "{e}");
        let e = err(&format!("{MINIMAL}node = \"../x\"\n"));
        assert!(e.contains("`node` at line 2"), "{e}");
    }

    #[test]
    fn errors_from_a_file_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, format!("{MINIMAL}key_file = 3\n")).unwrap();
        let e = AgentFile::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("line 2") && e.contains("key_file"),
            "{e}"
        );
    }

    #[test]
    fn example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/agent.toml");
        AgentFile::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
    }
}
