//! Starting node agents over SSH, for clusters without a batch system.
//!
//! The coordinator reads a hostfile (one host per line, Open MPI style) and,
//! for each host, opens an SSH session (libssh2 through the `ssh2` crate),
//! checks the host key against a known_hosts file — an unknown or changed
//! key is refused, never accepted on first use — logs in with a private
//! key, and starts the agent detached from the session:
//!
//! ```text
//! setsid -f <agent_command> [--node NAME] </dev/null >>LOG 2>&1
//! ```
//!
//! then it checks, a moment later, that the agent is still alive (a bad
//! config or a second agent on the node makes `ckpt-agent` exit at once),
//! and returns the tail of the remote log if it is not. Whether the agent
//! then *connects* is the coordinator's business (it authenticates the agent
//! with the cluster key like any other).
//!
//! Hostfile syntax:
//!
//! ```text
//! # comment
//! n01                    # host, port 22, node name = the agent's default
//! n02 port=2222 node=n02
//! 10.0.0.3 slots=4       # slots= is accepted and ignored (Open MPI hostfiles)
//! ```

use std::fmt::Write as _;
use std::io::{self, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use ckpt_protocol::config_file::{at, check_absolute, check_node_name, check_positive, duration};
use serde::Deserialize;
use ssh2::{CheckResult, KnownHostFileKind, Session};

/// `[launch]` of coordinator.toml: start the agents over SSH.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchFile {
    /// One host per line (see the module docs).
    pub hostfile: PathBuf,
    #[serde(default = "default_user")]
    pub user: String,
    /// Private key the coordinator logs in with.
    pub identity: PathBuf,
    /// Host keys the coordinator trusts; unknown hosts are refused.
    pub known_hosts: PathBuf,
    #[serde(default = "default_agent_command")]
    pub agent_command: String,
    #[serde(default = "default_agent_log")]
    pub agent_log: String,
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_user() -> String {
    "root".into()
}
fn default_agent_command() -> String {
    "/usr/local/bin/ckpt-agent --config /etc/ckpt/agent.toml".into()
}
fn default_agent_log() -> String {
    "/var/log/ckpt-agent.log".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl LaunchFile {
    /// Checks what can be checked without reading files (the coordinator
    /// reads the hostfile when it starts).
    pub fn validate(&self, text: &str) -> Result<(), String> {
        check_absolute(
            text,
            &[
                ("launch.hostfile", &self.hostfile),
                ("launch.identity", &self.identity),
                ("launch.known_hosts", &self.known_hosts),
            ],
        )?;
        check_positive(text, &[("launch.timeout", self.timeout)])?;
        if self.user.is_empty() || self.user.contains(char::is_whitespace) {
            return Err(format!("{}: not a user name", at(text, "launch.user")));
        }
        if self.agent_command.trim().is_empty() {
            return Err(format!(
                "{}: empty command",
                at(text, "launch.agent_command")
            ));
        }
        if !self.agent_log.starts_with('/') {
            return Err(format!(
                "{}: must be an absolute path",
                at(text, "launch.agent_log")
            ));
        }
        Ok(())
    }

    pub fn launcher(&self) -> SshLauncher {
        SshLauncher {
            user: self.user.clone(),
            identity: self.identity.clone(),
            known_hosts: self.known_hosts.clone(),
            agent_command: self.agent_command.clone(),
            agent_log: self.agent_log.clone(),
            timeout: self.timeout,
            settle: Duration::from_millis(500),
        }
    }
}

/// One line of a hostfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub host: String,
    pub port: u16,
    /// Passed to the agent as `--node`; `None`: the agent's own default.
    pub node: Option<String>,
    /// 1-based line in the hostfile, for messages.
    pub line: usize,
}

impl Host {
    /// `host` or `host:port` for messages.
    pub fn label(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostfileError {
    #[error("reading hostfile {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: names no host")]
    Empty { path: PathBuf },
}

/// Reads and parses a hostfile.
pub fn read_hostfile(path: &Path) -> Result<Vec<Host>, HostfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostfileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_hostfile(&text, path)
}

/// Parses hostfile text (`path` only names it in errors).
pub fn parse_hostfile(text: &str, path: &Path) -> Result<Vec<Host>, HostfileError> {
    let mut hosts: Vec<Host> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| HostfileError::Syntax {
            path: path.to_owned(),
            line,
            message,
        };
        let content = raw.split('#').next().unwrap_or("").trim();
        let mut words = content.split_whitespace();
        let Some(host) = words.next() else { continue };
        if host.contains('=') || host.starts_with('-') {
            return Err(err(format!("`{host}` is not a host name")));
        }
        let mut entry = Host {
            host: host.to_owned(),
            port: 22,
            node: None,
            line,
        };
        for word in words {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| err(format!("`{word}`: expected key=value after the host")))?;
            match k {
                "port" => {
                    entry.port = v
                        .parse()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| err(format!("port `{v}` is not a TCP port")))?;
                }
                "node" => {
                    check_node_name(v).map_err(|m| err(format!("node `{v}`: {m}")))?;
                    entry.node = Some(v.to_owned());
                }
                "slots" | "max_slots" | "max-slots" => {}
                _ => return Err(err(format!("unknown key `{k}` (port, node, slots)"))),
            }
        }
        if let Some(prev) = hosts
            .iter()
            .find(|h| h.host == entry.host && h.port == entry.port)
        {
            return Err(err(format!(
                "{} is listed twice (first on line {})",
                entry.label(),
                prev.line
            )));
        }
        hosts.push(entry);
    }
    if hosts.is_empty() {
        return Err(HostfileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(hosts)
}

/// How the coordinator logs in and what it runs.
#[derive(Debug, Clone)]
pub struct SshLauncher {
    pub user: String,
    /// Private key (OpenSSH format, no passphrase).
    pub identity: PathBuf,
    /// Host keys the coordinator trusts (OpenSSH known_hosts format).
    pub known_hosts: PathBuf,
    /// The agent command line on the hosts (a shell command; `--node` is
    /// appended when the hostfile names a node).
    pub agent_command: String,
    /// Remote file the agent's stderr is appended to.
    pub agent_log: String,
    /// TCP connect, handshake and each remote command.
    pub timeout: Duration,
    /// How long after starting the agent must still be alive.
    pub settle: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{host}: cannot connect: {source}")]
    Connect { host: String, source: io::Error },
    #[error("{host}: SSH handshake failed: {source}")]
    Handshake { host: String, source: ssh2::Error },
    #[error(
        "{host}: host key is not in {known_hosts} (add it with ssh-keyscan after checking it)"
    )]
    UnknownHostKey { host: String, known_hosts: PathBuf },
    #[error(
        "{host}: HOST KEY MISMATCH with {known_hosts}: refusing to log in (the host was \
         reinstalled, or someone is in the middle)"
    )]
    HostKeyMismatch { host: String, known_hosts: PathBuf },
    #[error("{host}: reading known_hosts {known_hosts}: {source}")]
    KnownHosts {
        host: String,
        known_hosts: PathBuf,
        source: ssh2::Error,
    },
    #[error("{host}: login as {user} with key {identity} refused: {source}")]
    Auth {
        host: String,
        user: String,
        identity: PathBuf,
        source: ssh2::Error,
    },
    #[error("{host}: running `{command}`: {source}")]
    Exec {
        host: String,
        command: String,
        source: ssh2::Error,
    },
    #[error("{host}: reading the output of `{command}`: {source}")]
    Output {
        host: String,
        command: String,
        source: io::Error,
    },
    #[error("{host}: `{command}` exited with status {status}: {output}")]
    Failed {
        host: String,
        command: String,
        status: i32,
        output: String,
    },
    #[error("{host}: the agent exited right after starting; last lines of {log}:\n{tail}")]
    Died {
        host: String,
        log: String,
        tail: String,
    },
}

/// What [`SshLauncher::start`] found on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The agent's pid on the host.
    pub pid: u32,
}

impl SshLauncher {
    /// Starts the agent on every host, up to 32 at a time; one result per
    /// host, in hostfile order.
    pub fn start_all(&self, hosts: &[Host]) -> Vec<Result<Started, LaunchError>> {
        let mut results = Vec::with_capacity(hosts.len());
        for chunk in hosts.chunks(32) {
            thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|h| s.spawn(move || self.start(h)))
                    .collect();
                for (h, handle) in chunk.iter().zip(handles) {
                    results.push(handle.join().unwrap_or_else(|_| {
                        Err(LaunchError::Output {
                            host: h.label(),
                            command: "start".into(),
                            source: io::Error::other("launcher thread panicked"),
                        })
                    }));
                }
            });
        }
        results
    }

    /// Starts the agent on one host.
    pub fn start(&self, h: &Host) -> Result<Started, LaunchError> {
        let session = self.login(h)?;
        let mut command = self.agent_command.clone();
        if let Some(node) = &h.node {
            let _ = write!(command, " --node {}", quote(node));
        }
        // `echo $!` of a backgrounded setsid would be setsid's pid; run the
        // agent in a subshell that execs it, detached, and report that pid.
        let log = quote(&self.agent_log);
        let script = format!(
            "(umask 077; exec setsid {command} </dev/null >>{log} 2>&1) & echo $!; \
             sleep {settle}; kill -0 $! 2>/dev/null || {{ echo DIED; exit 0; }}",
            settle = self.settle.as_secs_f64(),
        );
        let out = self.exec(&session, h, &script)?;
        let mut lines = out.lines();
        let pid = lines
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
            .ok_or_else(|| LaunchError::Failed {
                host: h.label(),
                command: script.clone(),
                status: 0,
                output: out.clone(),
            })?;
        if lines.any(|l| l.trim() == "DIED") {
            let tail = self
                .exec(&session, h, &format!("tail -n 20 {log}"))
                .unwrap_or_else(|e| format!("(cannot read it: {e})"));
            return Err(LaunchError::Died {
                host: h.label(),
                log: self.agent_log.clone(),
                tail,
            });
        }
        Ok(Started { pid })
    }

    /// Connects, checks the host key strictly and logs in.
    fn login(&self, h: &Host) -> Result<Session, LaunchError> {
        let host = h.label();
        let addr = (h.host.as_str(), h.port)
            .to_socket_addrs()
            .and_then(|mut a| {
                a.next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
            })
            .map_err(|source| LaunchError::Connect {
                host: host.clone(),
                source,
            })?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout).map_err(|source| {
            LaunchError::Connect {
                host: host.clone(),
                source,
            }
        })?;
        let mut session = Session::new().map_err(|source| LaunchError::Handshake {
            host: host.clone(),
            source,
        })?;
        session.set_tcp_stream(tcp);
        session.set_timeout(u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX));
        session
            .handshake()
            .map_err(|source| LaunchError::Handshake {
                host: host.clone(),
                source,
            })?;
        self.check_host_key(&session, h)?;
        session
            .userauth_pubkey_file(&self.user, None, &self.identity, None)
            .map_err(|source| LaunchError::Auth {
                host: host.clone(),
                user: self.user.clone(),
                identity: self.identity.clone(),
                source,
            })?;
        Ok(session)
    }

    fn check_host_key(&self, session: &Session, h: &Host) -> Result<(), LaunchError> {
        let host = h.label();
        let kh_err = |source| LaunchError::KnownHosts {
            host: host.clone(),
            known_hosts: self.known_hosts.clone(),
            source,
        };
        let mut known = session.known_hosts().map_err(kh_err)?;
        known
            .read_file(&self.known_hosts, KnownHostFileKind::OpenSSH)
            .map_err(kh_err)?;
        let (key, _) = session.host_key().ok_or_else(|| LaunchError::Handshake {
            host: host.clone(),
            source: ssh2::Error::from_errno(ssh2::ErrorCode::Session(-1)),
        })?;
        match known.check_port(&h.host, h.port, key) {
            CheckResult::Match => Ok(()),
            CheckResult::Mismatch => Err(LaunchError::HostKeyMismatch {
                host,
                known_hosts: self.known_hosts.clone(),
            }),
            CheckResult::NotFound | CheckResult::Failure => Err(LaunchError::UnknownHostKey {
                host,
                known_hosts: self.known_hosts.clone(),
            }),
        }
    }

    /// Runs a shell command; its stdout (stderr appended) if it exits 0.
    fn exec(&self, session: &Session, h: &Host, command: &str) -> Result<String, LaunchError> {
        let exec_err = |source| LaunchError::Exec {
            host: h.label(),
            command: command.to_owned(),
            source,
        };
        let mut channel = session.channel_session().map_err(exec_err)?;
        channel.exec(command).map_err(exec_err)?;
        let mut out = String::new();
        let read_err = |source| LaunchError::Output {
            host: h.label(),
            command: command.to_owned(),
            source,
        };
        channel.read_to_string(&mut out).map_err(read_err)?;
        let mut err = String::new();
        channel
            .stderr()
            .read_to_string(&mut err)
            .map_err(read_err)?;
        channel.wait_close().map_err(exec_err)?;
        let status = channel.exit_status().map_err(exec_err)?;
        if status != 0 {
            out.push_str(&err);
            return Err(LaunchError::Failed {
                host: h.label(),
                command: command.to_owned(),
                status,
                output: out.trim().to_owned(),
            });
        }
        Ok(out)
    }
}

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Host>, HostfileError> {
        parse_hostfile(text, Path::new("/etc/ckpt/hostfile"))
    }

    #[test]
    fn hostfile_lines_comments_and_keys() {
        let hosts =
            parse("# cluster\n\nn01\n n02 port=2222 node=n02  # second\n10.0.0.3 slots=4\n")
                .unwrap();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0].host, "n01");
        assert_eq!(hosts[0].port, 22);
        assert_eq!(hosts[0].node, None);
        assert_eq!(hosts[0].line, 3);
        assert_eq!(hosts[1].port, 2222);
        assert_eq!(hosts[1].node.as_deref(), Some("n02"));
        assert_eq!(hosts[1].label(), "n02:2222");
        assert_eq!(hosts[2].host, "10.0.0.3");
    }

    #[test]
    fn hostfile_errors_name_file_and_line() {
        let e = parse("n01\nn02 port=x\n").unwrap_err().to_string();
        assert_eq!(e, "/etc/ckpt/hostfile:2: port `x` is not a TCP port");
        let e = parse("n01 colour=red\n").unwrap_err().to_string();
        assert!(e.contains(":1: unknown key `colour`"), "{e}");
        let e = parse("n01 node=bad/name\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ckpt/hostfile:1: node `bad/name`"),
            "{e}"
        );
        let e = parse("n01\nn01\n").unwrap_err().to_string();
        assert!(
            e.contains(":2: n01 is listed twice (first on line 1)"),
            "{e}"
        );
        let e = parse("n01 lonely\n").unwrap_err().to_string();
        assert!(e.contains("expected key=value"), "{e}");
        let e = parse("# nothing\n\n").unwrap_err().to_string();
        assert_eq!(e, "/etc/ckpt/hostfile: names no host");
        let e = parse("port=22\n").unwrap_err().to_string();
        assert!(e.contains("is not a host name"), "{e}");
    }

    #[test]
    fn launch_section_is_validated_with_key_and_line() {
        use crate::config::CoordinatorFile;
        let ok = "[launch]\nhostfile = \"/etc/h\"\nidentity = \"/k\"\nknown_hosts = \"/kh\"\n";
        let cfg = CoordinatorFile::parse(ok).unwrap();
        let l = cfg.launch.unwrap();
        assert_eq!(l.user, "root");
        assert_eq!(l.timeout, Duration::from_secs(10));
        assert!(l.agent_command.contains("ckpt-agent"));
        let e = CoordinatorFile::parse(&ok.replace("\"/k\"", "\"k\"")).unwrap_err();
        assert!(e.contains("`launch.identity` at line 3"), "{e}");
        let e = CoordinatorFile::parse(&format!("{ok}timeout = \"0s\"\n")).unwrap_err();
        assert!(e.contains("launch.timeout"), "{e}");
        let e = CoordinatorFile::parse(&format!("{ok}password = \"x\"\n")).unwrap_err();
        assert!(e.contains("password"), "{e}");
        let e = CoordinatorFile::parse("[launch]\nhostfile = \"/h\"\n").unwrap_err();
        assert!(e.contains("identity"), "{e}");
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn unreachable_host_is_a_clear_error() {
        // Port 1 on loopback: nothing listens there.
        let l = SshLauncher {
            user: "root".into(),
            identity: "/nonexistent/id".into(),
            known_hosts: "/nonexistent/known_hosts".into(),
            agent_command: "ckpt-agent".into(),
            agent_log: "/tmp/x.log".into(),
            timeout: Duration::from_secs(2),
            settle: Duration::from_millis(100),
        };
        let h = Host {
            host: "127.0.0.1".into(),
            port: 1,
            node: None,
            line: 1,
        };
        let e = l.start(&h).unwrap_err().to_string();
        assert!(e.starts_with("127.0.0.1:1: cannot connect:"), "{e}");
    }
}
