//! The real daemons on a [`TestCluster`]: `ckpt-coordinator` on node 0 and
//! a `ckpt-agent` on each node, each logging into a file of the test's
//! directory; they can be SIGKILLed and started again with the same
//! config. Every daemon is killed when its handle is dropped (the cluster's
//! drop then kills whatever the trees left in the nodes' namespaces).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_protocol::local_control::{call, CallError};
use ckpt_protocol::pb;

use crate::bin_dir;
use crate::cluster::{Node, TestCluster};

/// Longest wait for a daemon's log line.
pub const WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a control-socket answer (an epoch, a restart).
pub const CALL: Duration = Duration::from_secs(180);

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A daemon on a node, its stderr (log) in a file (appended across
/// restarts).
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    binary: String,
    config: PathBuf,
    node_index: usize,
    child: Option<Child>,
    log: PathBuf,
    /// Length of the log when the current process started.
    log_start: usize,
}

impl Daemon {
    pub fn start(node: &Node, dir: &Path, binary: &str, name: &str, config: &Path) -> Daemon {
        let mut d = Daemon {
            name: name.into(),
            binary: binary.into(),
            config: config.to_path_buf(),
            node_index: node.index(),
            child: None,
            log: dir.join(format!("{name}.log")),
            log_start: 0,
        };
        d.spawn(node);
        d
    }

    fn spawn(&mut self, node: &Node) {
        assert_eq!(node.index(), self.node_index, "{} moved nodes", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.log_start = fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let mut cmd = node.command(bin(&self.binary));
        cmd.arg("--config")
            .arg(&self.config)
            .env("CKPT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = node
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawning {} on {}: {e}", self.binary, node.name()));
        self.child = Some(child);
    }

    /// The whole log (every process of this daemon).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log of the current process.
    pub fn current_log(&self) -> String {
        let log = self.log();
        log.get(self.log_start..).unwrap_or("").to_owned()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the current process logs a line with every needle.
    pub fn wait_for(&mut self, needles: &[&str]) {
        let t0 = Instant::now();
        loop {
            let log = self.current_log();
            if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "{} ended ({st}) before logging {needles:?}:\n{log}",
                    self.name
                );
            }
            assert!(
                t0.elapsed() < WAIT,
                "{} logged no {needles:?} within {WAIT:?}:\n{log}",
                self.name
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again with the same config.
    pub fn restart(&mut self, node: &Node) {
        self.kill();
        self.spawn(node);
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn write_key(path: &Path) {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(path, format!("{hex}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// One agent: the daemon, its control socket, its state dir.
#[derive(Debug)]
pub struct Agent {
    pub daemon: Daemon,
    pub sock: PathBuf,
    pub state: PathBuf,
}

/// The coordinator on node 0 and an agent on every node, all connected.
#[derive(Debug)]
pub struct Daemons {
    pub coord: Daemon,
    pub coord_sock: PathBuf,
    pub coord_state: PathBuf,
    pub images: PathBuf,
    pub key: PathBuf,
    pub listen: std::net::SocketAddr,
    /// By node name.
    pub agents: BTreeMap<String, Agent>,
}

impl Daemons {
    /// `coord_extra` is appended to the coordinator's config (e.g. a
    /// `[deadlines]` table).
    pub fn start(cluster: &TestCluster, dir: &Path, coord_extra: &str) -> Daemons {
        let key = dir.join("cluster.key");
        write_key(&key);
        let n0 = cluster.node(0);
        let listen = n0.addr(n0.free_port());
        let coord_sock = dir.join("coordinator.sock");
        let coord_state = dir.join("coordinator.state");
        let images = dir.join("images");
        // The control socket must be reachable by other users (the
        // wrong-user test): a world-searchable directory.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = dir.join("coordinator.toml");
        fs::write(
            &cfg,
            format!(
                "listen = \"{listen}\"\nkey_file = \"{}\"\nckpt_dir = \"{}\"\n\
                 heartbeat_interval = \"200ms\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\
                 {coord_extra}",
                key.display(),
                images.display(),
                coord_sock.display(),
                coord_state.display()
            ),
        )
        .unwrap();
        let mut coord = Daemon::start(n0, dir, "ckpt-coordinator", "coordinator", &cfg);
        coord.wait_for(&["ckpt-coordinator started"]);
        let mut d = Daemons {
            coord,
            coord_sock,
            coord_state,
            images,
            key,
            listen,
            agents: BTreeMap::new(),
        };
        for node in cluster.nodes() {
            d.add_agent(node, dir);
        }
        d
    }

    fn add_agent(&mut self, node: &Node, dir: &Path) {
        let name = node.hostname().to_owned();
        let state = dir.join(format!("{name}.state"));
        let sock = dir.join(format!("{name}.sock"));
        let cfg = dir.join(format!("{name}.toml"));
        fs::write(
            &cfg,
            format!(
                "node = \"{name}\"\ncoordinator = \"{}\"\nkey_file = \"{}\"\n\
                 state_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
                 reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n",
                self.listen,
                self.key.display(),
                state.display(),
                sock.display()
            ),
        )
        .unwrap();
        let mut a = Daemon::start(node, dir, "ckpt-agent", &name, &cfg);
        a.wait_for(&["ckpt-agent started"]);
        self.coord
            .wait_for(&["agent connected", &format!("node={name}")]);
        self.agents.insert(
            name,
            Agent {
                daemon: a,
                sock,
                state,
            },
        );
    }

    pub fn agent(&mut self, node: &Node) -> &mut Agent {
        self.agents.get_mut(node.hostname()).unwrap()
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- coordinator:\n{}", self.coord.log());
        for (n, a) in &self.agents {
            s.push_str(&format!("--- agent {n}:\n{}", a.daemon.log()));
        }
        s
    }

    /// Starts a host-network tree of `job` on `node` through its agent.
    pub fn spawn(
        &self,
        node: &Node,
        job: &str,
        argv: &[String],
        out: &Path,
        uid: Option<u32>,
    ) -> pb::TreeSpawned {
        let sock = &self.agents[node.hostname()].sock;
        let req = pb::SpawnTreeRequest {
            job: job.into(),
            argv: argv.to_vec(),
            cwd: "/".into(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            host_network: true,
            uid,
            gid: uid,
            stdout: out.display().to_string(),
            stderr: out.with_extension("err").display().to_string(),
        };
        match call(sock, pb::request::Op::SpawnTree(req), CALL) {
            Ok(pb::response::Body::TreeSpawned(t)) => t,
            other => panic!(
                "spawn_tree on {}: {other:?}\n{}",
                node.hostname(),
                self.logs()
            ),
        }
    }

    /// A request to the coordinator's control socket.
    pub fn ask(&self, op: pb::request::Op) -> Result<pb::response::Body, CallError> {
        call(&self.coord_sock, op, CALL)
    }

    /// The coordinator's view of `job` (panics if it has none).
    pub fn status(&self, job: &str) -> pb::ClusterJob {
        let op = pb::request::Op::ClusterStatus(pb::ClusterStatusRequest { job: job.into() });
        match self.ask(op) {
            Ok(pb::response::Body::ClusterJob(j)) => j,
            other => panic!("status of {job}: {other:?}\n{}", self.logs()),
        }
    }

    /// Checkpoints `job` on the nodes the coordinator knows run it.
    pub fn checkpoint(&self, job: &str) -> Result<pb::ClusterCheckpointDone, CallError> {
        let op = pb::request::Op::ClusterCheckpoint(pb::ClusterCheckpointRequest {
            job: job.into(),
            nodes: Vec::new(),
            stop: false,
        });
        match self.ask(op)? {
            pb::response::Body::ClusterCheckpoint(d) => Ok(d),
            other => panic!("checkpoint of {job}: unexpected {other:?}"),
        }
    }

    /// Waits until the coordinator's view of `job` satisfies `ok`.
    pub fn wait_status(
        &self,
        job: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&pb::ClusterJob) -> bool,
    ) -> pb::ClusterJob {
        let t0 = Instant::now();
        loop {
            let op = pb::request::Op::ClusterStatus(pb::ClusterStatusRequest { job: job.into() });
            if let Ok(pb::response::Body::ClusterJob(j)) = self.ask(op) {
                if ok(&j) {
                    return j;
                }
                assert!(
                    t0.elapsed() < limit,
                    "timed out ({limit:?}) waiting for {what}; last status {j:?}\n{}",
                    self.logs()
                );
            } else {
                assert!(
                    t0.elapsed() < limit,
                    "timed out ({limit:?}) waiting for {what}; no status\n{}",
                    self.logs()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }
}

/// Thaws, when dropped, every freezer cgroup the agents of `node` made
/// (`agent.<node>.*`, cgroup v1 or v2): an agent SIGKILLed while its tree
/// is frozen leaves it frozen (fail closed), and a frozen task cannot die,
/// so the cluster's cleanup could not end it. Create it after the
/// [`TestCluster`], so that it is dropped (and thaws) first.
#[derive(Debug)]
pub struct ThawOnDrop {
    prefix: String,
}

impl ThawOnDrop {
    pub fn new(node: &Node) -> Self {
        ThawOnDrop {
            prefix: format!("agent.{}.", node.hostname()),
        }
    }

    fn thaw_under(&self, dir: &Path, depth: u32) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                if p.join("freezer.state").exists() {
                    let _ = fs::write(p.join("freezer.state"), "THAWED");
                } else if p.join("cgroup.freeze").exists() {
                    let _ = fs::write(p.join("cgroup.freeze"), "0");
                }
            } else if depth > 0 {
                self.thaw_under(&p, depth - 1);
            }
        }
    }
}

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        for root in [
            "/sys/fs/cgroup/freezer",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ] {
            self.thaw_under(Path::new(root), 2);
        }
    }
}
