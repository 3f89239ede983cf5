//! `ckpt.toml`: where images, keys and sockets live, and checkpoint
//! defaults. Every key is optional; an unknown key or a bad value is an
//! error that names the file, the key and the line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_agent::tree::NetMode;
use ckpt_protocol::config_file::{self, at, check_absolute, duration};
use serde::Deserialize;

pub use ckpt_protocol::config_file::ConfigError;

/// Looked at when neither `--config` nor `CKPT_CONFIG` names a file.
pub const DEFAULT_PATH: &str = "/etc/ckpt/ckpt.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of the image sets: `<ckpt_dir>/<job>/<epoch>/`.
    pub ckpt_dir: PathBuf,
    /// The key that MACs every manifest (0600, root's). Created if missing.
    pub key_file: PathBuf,
    /// Control sockets of running jobs.
    pub run_dir: PathBuf,
    /// Node-local scratch space for restores.
    pub staging_dir: PathBuf,
    /// The CRIU binary; default: `criu` on PATH.
    pub criu: Option<PathBuf>,
    /// Committed epochs kept per job.
    pub keep: usize,
    /// `private` (own network namespace, loopback only) or `host`.
    pub network: NetMode,
    /// How long freezing a job may take before the epoch is aborted.
    #[serde(deserialize_with = "duration")]
    pub freeze_timeout: Duration,
    /// Name of this node in manifests; default: the hostname.
    pub node_name: Option<String>,
    /// The coordinator's control socket: `checkpoint`, `status`, `list`
    /// and `restart` reach it for cluster jobs (jobs not running under a
    /// local `ckpt-job run`). Absent: local jobs only.
    pub coordinator_socket: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ckpt_dir: PathBuf::from("/var/lib/ckpt/images"),
            key_file: PathBuf::from("/etc/ckpt/cluster.key"),
            run_dir: PathBuf::from("/run/ckpt"),
            staging_dir: PathBuf::from("/var/tmp/ckpt"),
            criu: None,
            keep: 3,
            network: NetMode::Private,
            freeze_timeout: Duration::from_secs(10),
            node_name: None,
            coordinator_socket: None,
        }
    }
}

impl Config {
    /// `explicit` (from `--config`), else `CKPT_CONFIG`, else
    /// [`DEFAULT_PATH`] if it exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::var_os("CKPT_CONFIG").map(PathBuf::from);
        match explicit.map(Path::to_path_buf).or(env) {
            Some(p) => Self::from_file(&p),
            None if Path::new(DEFAULT_PATH).exists() => Self::from_file(Path::new(DEFAULT_PATH)),
            None => Ok(Self::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        config_file::load(path, Self::parse)
    }

    /// Parses and validates; the message names the key and the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| config_file::describe(text, e.message(), e.span()))?;
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        let at = |key: &str| at(text, key);
        if self.keep == 0 {
            return Err(format!(
                "{}: keep must be at least 1 (0 would delete every checkpoint)",
                at("keep")
            ));
        }
        if self.freeze_timeout.is_zero() {
            return Err(format!(
                "{}: freeze_timeout must be positive",
                at("freeze_timeout")
            ));
        }
        check_absolute(
            text,
            &[
                ("ckpt_dir", &self.ckpt_dir),
                ("key_file", &self.key_file),
                ("run_dir", &self.run_dir),
                ("staging_dir", &self.staging_dir),
            ],
        )?;
        if let Some(p) = &self.coordinator_socket {
            check_absolute(text, &[("coordinator_socket", p)])?;
        }
        if let Some(n) = &self.node_name {
            config_file::check_node_name(n).map_err(|e| format!("{}: {e}", at("node_name")))?;
        }
        Ok(())
    }

    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .unwrap_or_else(ckpt_agent::config::default_node_name)
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.run_dir.join("jobs")
    }

    pub fn socket_path(&self, job: &str) -> PathBuf {
        self.jobs_dir().join(format!("{job}.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "ckpt_dir = \"/x\"\nkeep = 5\nnetwork = \"host\"\nfreeze_timeout = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(c.ckpt_dir, PathBuf::from("/x"));
        assert_eq!(c.keep, 5);
        assert_eq!(c.network, NetMode::Host);
        assert_eq!(c.freeze_timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse("keep = 2\nckpt_dri = \"/x\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("ckpt_dri"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let e = Config::parse("keep = \"three\"\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("keep"), "{e}");
        let e = Config::parse("\nfreeze_timeout = \"soon\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("soon"), "{e}");
        let e = Config::parse("network = \"ethernet\"\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("ethernet"), "{e}");
        let e = Config::parse("\n\nkeep = 0\n").unwrap_err();
        assert!(e.contains("`keep` at line 3"), "{e}");
        let e = Config::parse("ckpt_dir = \"relative\"\n").unwrap_err();
        assert!(e.contains("ckpt_dir") && e.contains("absolute"), "{e}");
        let e = Config::parse("\ncoordinator_socket = \"c.sock\"\n").unwrap_err();
        assert!(e.contains("`coordinator_socket` at line 2"), "{e}");
        let e = Config::parse("keep = [").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }

    /// Every `configs/*.toml` is loaded with the loader its name picks:
    /// `coordinator.toml` and `agent.toml` with the daemons', anything else
    /// as a `ckpt.toml`.
    #[test]
    fn example_configs_load() {
        use ckpt_agent::config::AgentFile;
        use ckpt_coordinator::config::CoordinatorFile;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut loaded = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let r = match name.as_str() {
                "coordinator.toml" => CoordinatorFile::from_file(&p).map(drop),
                "agent.toml" => AgentFile::from_file(&p).map(drop),
                _ => Config::from_file(&p).map(drop),
            };
            r.unwrap_or_else(|e| panic!("{e}"));
            loaded.push(name);
        }
        loaded.sort();
        for expected in ["agent.toml", "ckpt.toml", "coordinator.toml"] {
            assert!(
                loaded.iter().any(|n| n == expected),
                "{expected} missing from {}",
                dir.display()
            );
        }
    }
}
