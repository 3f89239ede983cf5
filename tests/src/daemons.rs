//! The real daemons on a [`TestCluster`]: `ckpt-coordinator` on node 0 and
//! a `ckpt-agent` on each node, each logging into a file of the test's
//! directory; they can be SIGKILLed and started again with the same
//! config. Every daemon is killed when its handle is dropped (the cluster's
//! drop then kills whatever the trees left in the nodes' namespaces).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ffi::OsString;
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
    program: PathBuf,
    args: Vec<OsString>,
    node_index: usize,
    child: Option<Child>,
    log: PathBuf,
    /// Length of the log when the current process started.
    log_start: usize,
}

impl Daemon {
    /// `binary` (one of ours) with `--config config`, logging at info into
    /// `dir/name.log`.
    pub fn start(node: &Node, dir: &Path, binary: &str, name: &str, config: &Path) -> Daemon {
        Daemon::start_program(
            node,
            &bin(binary),
            &["--config".into(), config.into()],
            name,
            &dir.join(format!("{name}.log")),
        )
    }

    /// Any program (e.g. sshd) on `node`, its stderr into `log`.
    pub fn start_program(
        node: &Node,
        program: &Path,
        args: &[OsString],
        name: &str,
        log: &Path,
    ) -> Daemon {
        let mut d = Daemon {
            name: name.into(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            node_index: node.index(),
            child: None,
            log: log.to_path_buf(),
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
        let mut cmd = node.command(&self.program);
        cmd.args(&self.args)
            .env("CKPT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = node.spawn(&mut cmd).unwrap_or_else(|e| {
            panic!(
                "spawning {} on {}: {e}",
                self.program.display(),
                node.name()
            )
        });
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
        self.wait_for_or(needles, &String::new);
    }

    /// [`Daemon::wait_for`], with `extra()` (other logs) in the failure.
    pub fn wait_for_or(&mut self, needles: &[&str], extra: &dyn Fn() -> String) {
        let t0 = Instant::now();
        loop {
            let log = self.current_log();
            if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "{} ended ({st}) before logging {needles:?}:\n{log}\n{}",
                    self.name,
                    extra()
                );
            }
            assert!(
                t0.elapsed() < WAIT,
                "{} logged no {needles:?} within {WAIT:?}:\n{log}\n{}",
                self.name,
                extra()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the process must exit with success (our daemons close
    /// their sessions and exit 0).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            panic!("{} is not running", self.name)
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let st = c.wait().unwrap();
        assert!(st.success(), "{} exited {st}:\n{}", self.name, self.log());
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

/// `ckpt-job` copied into `dir`: a tree maps the binary it runs, so a
/// rebuild during the test must not change the file CRIU restores.
pub fn ckpt_job_copy(dir: &Path) -> PathBuf {
    let p = dir.join("ckpt-job");
    fs::copy(bin("ckpt-job"), &p).unwrap();
    p
}

/// A fresh 32-byte cluster key (hex) at `path`, mode 0600.
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

    /// The control socket of `node`'s agent.
    pub fn sock(&self, node: &Node) -> &Path {
        &self.agents[node.hostname()].sock
    }

    /// Every daemon's log, and the non-empty stderr files of the trees the
    /// agents started (ckpt-init's and rsh-exec's complaints).
    pub fn logs(&self) -> String {
        let mut s = format!("--- coordinator:\n{}", self.coord.log());
        for (n, a) in &self.agents {
            s.push_str(&format!("--- agent {n}:\n{}", a.daemon.log()));
            for job in fs::read_dir(a.state.join("out"))
                .into_iter()
                .flatten()
                .flatten()
            {
                for f in fs::read_dir(job.path()).into_iter().flatten().flatten() {
                    let text = fs::read_to_string(f.path()).unwrap_or_default();
                    if f.path().extension().is_some_and(|e| e == "stderr") && !text.is_empty() {
                        s.push_str(&format!("--- {}:\n{text}", f.path().display()));
                    }
                }
            }
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
        self.spawn_net(node, job, argv, out, uid, true)
    }

    /// Starts a tree of `job` on `node` through its agent: in the node's
    /// network namespace (`host_network`), or in one of its own with a job
    /// address (the coordinator needs a `job_network` for that).
    pub fn spawn_net(
        &self,
        node: &Node,
        job: &str,
        argv: &[String],
        out: &Path,
        uid: Option<u32>,
        host_network: bool,
    ) -> pb::TreeSpawned {
        let req = pb::SpawnTreeRequest {
            job: job.into(),
            argv: argv.to_vec(),
            cwd: "/".into(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            host_network,
            uid,
            gid: uid,
            stdout: out.display().to_string(),
            stderr: out.with_extension("err").display().to_string(),
        };
        match call(self.sock(node), pb::request::Op::SpawnTree(req), CALL) {
            Ok(pb::response::Body::TreeSpawned(t)) => t,
            other => panic!(
                "spawn_tree on {}: {other:?}\n{}",
                node.hostname(),
                self.logs()
            ),
        }
    }

    /// The stdout files of the trees `node`'s agent restored, sorted.
    pub fn restored_outputs(&self, node: &Node) -> Vec<PathBuf> {
        let dir = self.agents[node.hostname()].state.join("output");
        let mut v: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().ends_with(".stdout"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
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
        self.checkpoint_on(job, &[], false)
    }

    /// Checkpoints `job` on `nodes` (none: the nodes the coordinator knows
    /// run it); `stop` ends the trees once the epoch is committed.
    pub fn checkpoint_on(
        &self,
        job: &str,
        nodes: &[&Node],
        stop: bool,
    ) -> Result<pb::ClusterCheckpointDone, CallError> {
        let op = pb::request::Op::ClusterCheckpoint(pb::ClusterCheckpointRequest {
            job: job.into(),
            nodes: nodes.iter().map(|n| n.hostname().to_owned()).collect(),
            stop,
        });
        match self.ask(op)? {
            pb::response::Body::ClusterCheckpoint(d) => Ok(d),
            other => panic!("checkpoint of {job}: unexpected {other:?}"),
        }
    }

    /// Restarts `job` from its last committed epoch, each (image node,
    /// node to restore it on) of `placement`.
    pub fn restart(
        &self,
        job: &str,
        placement: &[(&Node, &Node)],
    ) -> Result<pb::ClusterRestartDone, CallError> {
        let op = pb::request::Op::ClusterRestart(pb::ClusterRestartRequest {
            job: job.into(),
            epoch: 0,
            placement: placement
                .iter()
                .map(|(from, to)| (from.hostname().to_owned(), to.hostname().to_owned()))
                .collect(),
        });
        match self.ask(op)? {
            pb::response::Body::ClusterRestart(d) => Ok(d),
            other => panic!("restart of {job}: unexpected {other:?}"),
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

/// The contents of `p` ("" if it cannot be read yet).
pub fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// The highest `step N` of a workload's output.
pub fn last_step(out: &str) -> u32 {
    out.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Polls `ok` until it holds; after `limit`, fails with `what` and
/// `logs()`.
pub fn wait_until(what: &str, limit: Duration, logs: &dyn Fn() -> String, ok: &dyn Fn() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < limit,
            "timed out ({limit:?}) waiting for {what}\n{}",
            logs()
        );
        sleep(Duration::from_millis(50));
    }
}
