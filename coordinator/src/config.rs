//! `coordinator.toml`: how `ckpt-coordinator` listens, which key it
//! authenticates agents with, where the image sets live, and how long each
//! phase of an epoch may take. An unknown key or a bad value is an error
//! that names the file, the key and the line (`configs/coordinator.toml`
//! documents every key).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_protocol::auth::NodeExpectation;
use ckpt_protocol::cluster::DEFAULT_HEARTBEAT_INTERVAL;
use ckpt_protocol::config_file::{self, at, check_absolute, check_positive, duration};
use serde::Deserialize;

use crate::daemon::CoordinatorConfig;
use crate::epoch::Deadlines;

pub use ckpt_protocol::config_file::ConfigError;

/// Looked at when `--config` names no file.
pub const DEFAULT_PATH: &str = "/etc/ckpt/coordinator.toml";
/// Where agents connect unless `listen` says otherwise.
pub const DEFAULT_PORT: u16 = 7411;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorFile {
    /// Shown to agents in the handshake and in logs.
    pub name: String,
    /// Address and port agents connect to.
    pub listen: SocketAddr,
    /// The cluster key (0600), shared with every agent.
    pub key_file: PathBuf,
    /// Root of the image sets: `<ckpt_dir>/<job>/<epoch>/`.
    pub ckpt_dir: PathBuf,
    /// Proposed to every agent: both sides send a heartbeat this often.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// A node is lost after this many intervals without a frame from it.
    pub heartbeat_misses: u32,
    /// Only these nodes may connect; absent: any key holder.
    pub expected_nodes: Option<Vec<String>>,
    /// The local control socket (any local user; each may act on the jobs
    /// they own, root on all); absent: none.
    pub control_socket: Option<PathBuf>,
    /// Root's private directory for the job registry (`registry.json`);
    /// absent: the registry is not kept across restarts (the image store
    /// still gives every job's epochs).
    pub state_dir: Option<PathBuf>,
    pub deadlines: DeadlinesFile,
    /// The IPv4 network job-stable addresses come from, e.g.
    /// "10.211.0.0/16"; absent: trees with a private network get loopback
    /// only. Grants are kept in `<ckpt_dir>/.job-addresses.json`.
    pub job_network: Option<String>,
    /// `[launch]`: start the agents of a hostfile over SSH; absent: the
    /// agents are started by someone else (Slurm prolog, systemd, admin).
    pub launch: Option<crate::launch::LaunchFile>,
}

/// `[deadlines]`: how long each phase of an epoch may take.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadlinesFile {
    #[serde(deserialize_with = "duration")]
    pub prepare: Duration,
    #[serde(deserialize_with = "duration")]
    pub dump: Duration,
    #[serde(deserialize_with = "duration")]
    pub flush: Duration,
    #[serde(deserialize_with = "duration")]
    pub commit: Duration,
    #[serde(deserialize_with = "duration")]
    pub finish: Duration,
}

impl Default for DeadlinesFile {
    fn default() -> Self {
        let d = Deadlines::default();
        DeadlinesFile {
            prepare: d.prepare,
            dump: d.dump,
            flush: d.flush,
            commit: d.commit,
            finish: d.finish,
        }
    }
}

impl Default for CoordinatorFile {
    fn default() -> Self {
        let daemon = CoordinatorConfig::default();
        CoordinatorFile {
            name: daemon.name,
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            key_file: PathBuf::from("/etc/ckpt/cluster.key"),
            ckpt_dir: PathBuf::from("/var/lib/ckpt/images"),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_misses: daemon.heartbeat_misses,
            expected_nodes: None,
            control_socket: None,
            state_dir: None,
            deadlines: DeadlinesFile::default(),
            job_network: None,
            launch: None,
        }
    }
}

impl CoordinatorFile {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        config_file::load(path, Self::parse)
    }

    /// Parses and validates; the message names the key and the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: CoordinatorFile =
            toml::from_str(text).map_err(|e| config_file::describe(text, e.message(), e.span()))?;
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        if let Some(launch) = &self.launch {
            launch.validate(text)?;
        }
        config_file::check_node_name(&self.name)
            .map_err(|e| format!("{}: {e}", at(text, "name")))?;
        check_absolute(
            text,
            &[("key_file", &self.key_file), ("ckpt_dir", &self.ckpt_dir)],
        )?;
        if let Some(dir) = &self.state_dir {
            check_absolute(text, &[("state_dir", dir)])?;
            if dir == &self.ckpt_dir || dir.starts_with(&self.ckpt_dir) {
                return Err(format!(
                    "{}: state_dir must not be inside ckpt_dir ({})",
                    at(text, "state_dir"),
                    self.ckpt_dir.display()
                ));
            }
        }
        if let Some(n) = &self.job_network {
            n.parse::<ckpt_protocol::jobnet::JobNetwork>()
                .map_err(|e| format!("{}: {e}", at(text, "job_network")))?;
        }
        if let Some(sock) = &self.control_socket {
            check_absolute(text, &[("control_socket", sock)])?;
        }
        let d = &self.deadlines;
        check_positive(
            text,
            &[
                ("heartbeat_interval", self.heartbeat_interval),
                ("deadlines.prepare", d.prepare),
                ("deadlines.dump", d.dump),
                ("deadlines.flush", d.flush),
                ("deadlines.commit", d.commit),
                ("deadlines.finish", d.finish),
            ],
        )?;
        if self.heartbeat_interval.as_millis() > u128::from(u32::MAX) {
            return Err(format!(
                "{}: heartbeat_interval must be under {} ms",
                at(text, "heartbeat_interval"),
                u32::MAX
            ));
        }
        if self.heartbeat_misses == 0 {
            return Err(format!(
                "{}: heartbeat_misses must be at least 1",
                at(text, "heartbeat_misses")
            ));
        }
        if let Some(nodes) = &self.expected_nodes {
            let key = at(text, "expected_nodes");
            if nodes.is_empty() {
                return Err(format!(
                    "{key}: an empty list would refuse every agent (leave the key out to accept \
                     any key holder)"
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for n in nodes {
                config_file::check_node_name(n).map_err(|e| format!("{key}: {e}"))?;
                if !seen.insert(n) {
                    return Err(format!("{key}: node {n:?} is listed twice"));
                }
            }
        }
        Ok(())
    }

    /// The network core's settings (the others keep their defaults).
    pub fn daemon_config(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            name: self.name.clone(),
            expect: match &self.expected_nodes {
                Some(nodes) => NodeExpectation::one_of(nodes.iter().cloned()),
                None => NodeExpectation::Any,
            },
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_misses: self.heartbeat_misses,
            ..CoordinatorConfig::default()
        }
    }

    /// `job_network`, parsed (validated at load).
    pub fn job_network(&self) -> Option<ckpt_protocol::jobnet::JobNetwork> {
        self.job_network.as_ref().and_then(|n| n.parse().ok())
    }

    /// Where the job address grants are kept.
    pub fn address_file(&self) -> PathBuf {
        self.ckpt_dir.join(".job-addresses.json")
    }

    pub fn deadlines(&self) -> Deadlines {
        let d = &self.deadlines;
        Deadlines {
            prepare: d.prepare,
            dump: d.dump,
            flush: d.flush,
            commit: d.commit,
            finish: d.finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        CoordinatorFile::parse(text).unwrap_err()
    }

    #[test]
    fn empty_config_gives_defaults() {
        let c = CoordinatorFile::parse("").unwrap();
        assert_eq!(c, CoordinatorFile::default());
        assert_eq!(c.deadlines(), Deadlines::default());
        assert!(matches!(c.daemon_config().expect, NodeExpectation::Any));
    }

    #[test]
    fn values_are_read() {
        let c = CoordinatorFile::parse(
            "listen = \"127.0.0.1:9000\"\nheartbeat_interval = \"250ms\"\nheartbeat_misses = 5\n\
             expected_nodes = [\"n1\", \"n2\"]\n[deadlines]\nprepare = \"5s\"\nfinish = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.deadlines().prepare, Duration::from_secs(5));
        assert_eq!(c.deadlines().finish, Duration::from_secs(60));
        assert_eq!(c.deadlines().dump, Deadlines::default().dump);
        let d = c.daemon_config();
        assert_eq!(d.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(d.heartbeat_misses, 5);
        assert_eq!(d.expect, NodeExpectation::one_of(["n1", "n2"]));
        let c = CoordinatorFile::parse("state_dir = \"/var/lib/ckpt/coordinator\"\n").unwrap();
        assert_eq!(
            c.state_dir,
            Some(PathBuf::from("/var/lib/ckpt/coordinator"))
        );
    }

    #[test]
    fn malformed_values_name_key_and_line() {
        let e = err("heartbeat_misses = 2\nlisten_addr = \"0.0.0.0:1\"\n");
        assert!(e.contains("line 2") && e.contains("listen_addr"), "{e}");
        let e = err("\n[deadlines]\nprepar = \"1s\"\n");
        assert!(e.contains("line 3") && e.contains("prepar"), "{e}");
        let e = err("\nheartbeat_misses = \"three\"\n");
        assert!(
            e.contains("line 2") && e.contains("heartbeat_misses"),
            "{e}"
        );
        let e = err("[deadlines]\ndump = \"soon\"\n");
        assert!(
            e.contains("line 2") && e.contains("soon") && e.contains("dump"),
            "{e}"
        );
        let e = err("\n\nlisten = \"localhost\"\n");
        assert!(e.contains("line 3") && e.contains("listen"), "{e}");
        let e = err("name = \"c\"\nckpt_dir = \"images\"\n");
        assert!(
            e.contains("`ckpt_dir` at line 2") && e.contains("absolute"),
            "{e}"
        );
        let e = err("key_file = \"k\"\n");
        assert!(e.contains("`key_file` at line 1"), "{e}");
        let e = err("[deadlines]\nprepare = \"1s\"\ncommit = \"0s\"\n");
        assert!(e.contains("`deadlines.commit` at line 3"), "{e}");
        let e = err("heartbeat_misses = 0\n");
        assert!(e.contains("`heartbeat_misses` at line 1"), "{e}");
        let e = err("\nexpected_nodes = []\n");
        assert!(e.contains("`expected_nodes` at line 2"), "{e}");
        let e = err("expected_nodes = [\"n1\", \"n/2\"]\n");
        assert!(
            e.contains("`expected_nodes` at line 1") && e.contains("n/2"),
            "{e}"
        );
        let e = err("expected_nodes = [\"n1\", \"n1\"]\n");
        assert!(e.contains("twice"), "{e}");
        let e = err("name = \"c\"\njob_network = \"10.211.0.1/16\"\n");
        assert!(
            e.contains("`job_network` at line 2") && e.contains("host bits"),
            "{e}"
        );
        let c = CoordinatorFile::parse("job_network = \"10.211.0.0/16\"\n").unwrap();
        assert_eq!(
            c.job_network().map(|n| n.to_string()).as_deref(),
            Some("10.211.0.0/16")
        );
        let e = err("state_dir = \"state\"\n");
        assert!(
            e.contains("`state_dir` at line 1") && e.contains("absolute"),
            "{e}"
        );
        let e = err("ckpt_dir = \"/srv/img\"\nstate_dir = \"/srv/img/state\"\n");
        assert!(
            e.contains("`state_dir` at line 2") && e.contains("inside"),
            "{e}"
        );
        let e = err("control_socket = \"c.sock\"\n");
        assert!(e.contains("`control_socket` at line 1"), "{e}");
        let e = err("name = \"a b\"\n");
        assert!(e.contains("`name` at line 1"), "{e}");
    }

    #[test]
    fn errors_from_a_file_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("coordinator.toml");
        std::fs::write(&p, "listen = 7\n").unwrap();
        let e = CoordinatorFile::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("line 1") && e.contains("listen"),
            "{e}"
        );
        let e = CoordinatorFile::from_file(&dir.path().join("none.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    #[test]
    fn example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/coordinator.toml");
        CoordinatorFile::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
    }
}
