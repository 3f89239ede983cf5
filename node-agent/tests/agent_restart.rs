//! Multi-node restart with real CRIU: agents restore their node image of a
//! committed epoch frozen, and the coordinator resumes them only once every
//! node is restored. Agents (n1, n2, later n3, n4 on this host) run in one
//! process with a real coordinator and the real image store (a tempdir).
//!
//! Prerequisites: root and a `criu` binary. Missing ones make every test
//! print a skip note and pass, or fail under `CI=true`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ckpt_agent::criu::Criu;
use ckpt_agent::daemon::{AgentConfig, AgentDaemon, TreeArgs, TreeInfo, TreeState};
use ckpt_coordinator::daemon::{
    bind, Coordinator, CoordinatorConfig, JobOwner, RestartError, RestartTimeouts, StoreWriter,
};
use ckpt_coordinator::epoch::Deadlines;
use ckpt_coordinator::store::ImageStore;
use ckpt_protocol::manifest::{CheckpointMode, Key};

static SERIAL: Mutex<()> = Mutex::new(());

const JOB: &str = "rj";

fn prerequisites(test: &str) -> Option<(MutexGuard<'static, ()>, Criu)> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let why = if !nix::unistd::Uid::effective().is_root() {
        "not running as root".to_string()
    } else {
        match Criu::locate() {
            Ok(criu) => return Some((guard, criu)),
            Err(e) => e.to_string(),
        }
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: prerequisites missing under CI=true: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Counts forever, a number every 40 ms, on stdout and into `count` (an
/// fd held open, so the file is part of the image).
fn counter(count: &Path) -> String {
    format!(
        "exec 3>>{}; i=0; while :; do echo $i; echo $i >&3; i=$((i+1)); sleep 0.04; done",
        count.display()
    )
}

struct Cluster {
    root: tempfile::TempDir,
    key: Key,
    criu: Criu,
    coord: Coordinator,
    writer: Arc<StoreWriter>,
    agents: Vec<AgentDaemon>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Killing each namespace's init ends its whole tree.
        for a in &self.agents {
            for t in a.trees() {
                if t.state == TreeState::Running {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(t.root_pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

fn owner() -> JobOwner {
    JobOwner {
        uid: 0,
        gid: 0,
        command: vec!["sh".into(), "-c".into(), "counter".into()],
        cwd: "/".into(),
    }
}

impl Cluster {
    async fn start(criu: &Criu, nodes: &[&str]) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let key = Key::from_bytes([11; 32]);
        let listener = bind("127.0.0.1:0".parse::<SocketAddr>().unwrap(), 64).unwrap();
        let cfg = CoordinatorConfig {
            heartbeat_interval: Duration::from_millis(200),
            ..Default::default()
        };
        let writer = Arc::new(StoreWriter::new(
            ImageStore::new(root.path().join("store")),
            key.clone(),
        ));
        let coord = Coordinator::start(listener, key.clone(), cfg, writer.clone()).unwrap();
        let mut c = Cluster {
            root,
            key,
            criu: criu.clone(),
            coord,
            writer,
            agents: Vec::new(),
        };
        c.add_agents(nodes).await;
        c
    }

    async fn add_agents(&mut self, nodes: &[&str]) {
        for node in nodes {
            let mut cfg = AgentConfig::new(
                *node,
                self.coord.local_addr(),
                self.key.clone(),
                self.criu.clone(),
                PathBuf::from(env!("CARGO_BIN_EXE_ckpt-init")),
                self.root.path().join(format!("{node}.state")),
            );
            cfg.reconnect_min = Duration::from_millis(50);
            self.agents.push(AgentDaemon::start(cfg).unwrap());
        }
        let t0 = Instant::now();
        while self.coord.nodes().await.len() < self.agents.len() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "agents did not connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn agent(&self, node: &str) -> &AgentDaemon {
        self.agents.iter().find(|a| a.node() == node).unwrap()
    }

    fn count_file(&self, image_node: &str) -> PathBuf {
        self.root.path().join(format!("{image_node}.count"))
    }

    /// Starts the counting tree of `node`; returns its stdout file.
    fn spawn(&self, node: &str) -> PathBuf {
        let out = self.root.path().join(format!("{node}.out"));
        std::fs::create_dir_all(&out).unwrap();
        let script = counter(&self.count_file(node));
        let args = TreeArgs::new(["sh", "-c", script.as_str()], &out);
        self.agent(node).spawn_tree(JOB, &args).unwrap();
        out.join("stdout")
    }

    async fn checkpoint_stop(&self, nodes: &[&str]) -> u64 {
        let out = self
            .coord
            .checkpoint_job(
                &self.writer,
                JOB,
                &owner(),
                CheckpointMode::Stop,
                nodes.iter().map(|n| (*n).to_owned()).collect(),
                Deadlines::default(),
            )
            .await
            .unwrap();
        assert!(out.committed(), "stop epoch: {out:?}");
        // Stop mode: every tree of the job is killed after the commit.
        for a in &self.agents {
            for t in a.trees() {
                wait_exited(a, &t).await;
            }
        }
        assert_eq!(
            self.writer.store().latest_committed(JOB).unwrap(),
            Some(out.epoch)
        );
        out.epoch
    }

    async fn restart(
        &self,
        epoch: u64,
        placement: &[(&str, &str)],
    ) -> Result<ckpt_coordinator::daemon::RestartOutcome, RestartError> {
        let placement: BTreeMap<String, String> = placement
            .iter()
            .map(|(i, a)| ((*i).to_owned(), (*a).to_owned()))
            .collect();
        let timeouts = RestartTimeouts {
            restore: Duration::from_secs(60),
            resume: Duration::from_secs(10),
            abort: Duration::from_secs(60),
        };
        self.coord
            .restart(&self.writer, JOB, Some(epoch), placement, timeouts)
            .await
    }

    /// The running tree restored from `image_node`'s image on agent `node`.
    fn restored(&self, node: &str, image_node: &str, epoch: u64) -> TreeInfo {
        let trees: Vec<TreeInfo> = self
            .agent(node)
            .trees()
            .into_iter()
            .filter(|t| {
                t.restored_from
                    .as_ref()
                    .is_some_and(|r| r.image_node == image_node && r.epoch == epoch)
            })
            .collect();
        assert_eq!(trees.len(), 1, "{trees:?}");
        trees.into_iter().next().unwrap()
    }

    fn running(&self) -> Vec<(String, TreeInfo)> {
        self.agents
            .iter()
            .flat_map(|a| {
                a.trees()
                    .into_iter()
                    .filter(|t| t.state == TreeState::Running)
                    .map(|t| (a.node().to_owned(), t))
            })
            .collect()
    }
}

async fn wait_exited(a: &AgentDaemon, t: &TreeInfo) -> TreeState {
    let t0 = Instant::now();
    loop {
        let st = a.tree(t.id).unwrap().state;
        if st != TreeState::Running {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "tree {} on {} still runs",
            t.id,
            a.node()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn numbers(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// The concatenation of `files` counts 0, 1, 2, ... without a gap or a
/// repeat; returns how far.
fn assert_counts(what: &str, files: &[&Path]) -> usize {
    let all: Vec<u64> = files.iter().flat_map(|f| numbers(f)).collect();
    for (i, n) in all.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64,
            "{what}: position {i} holds {n} (files {files:?}); around it: {:?}",
            &all[i.saturating_sub(3)..(i + 3).min(all.len())]
        );
    }
    all.len()
}

async fn grows(path: &Path, more: usize) {
    let before = numbers(path).len();
    let t0 = Instant::now();
    while numbers(path).len() < before + more {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} does not grow ({before} lines)",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stays(path: &Path) {
    let before = numbers(path).len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        numbers(path).len(),
        before,
        "{} still grows",
        path.display()
    );
}

#[test]
fn stop_checkpoint_then_restart_on_the_same_and_on_other_nodes() {
    let Some((_guard, criu)) =
        prerequisites("stop_checkpoint_then_restart_on_the_same_and_on_other_nodes")
    else {
        return;
    };
    runtime().block_on(async {
        let mut c = Cluster::start(&criu, &["n1", "n2"]).await;
        let orig = [c.spawn("n1"), c.spawn("n2")];
        for f in &orig {
            grows(f, 5).await;
        }
        let e1 = c.checkpoint_stop(&["n1", "n2"]).await;
        for f in &orig {
            stays(f).await;
        }

        // Same nodes.
        let out = c.restart(e1, &[("n1", "n1"), ("n2", "n2")]).await.unwrap();
        assert_eq!(out.nodes.len(), 2);
        let r1 = [c.restored("n1", "n1", e1), c.restored("n2", "n2", e1)];
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            grows(&r1[i].stdout, 5).await;
            grows(&c.count_file(node), 5).await;
        }
        // Held until everybody restored, then resumed: stop them again at
        // one cut (the restored trees are ordinary, checkpointable trees).
        let e2 = c.checkpoint_stop(&["n1", "n2"]).await;
        assert!(e2 > e1);
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            let n = assert_counts(node, &[&orig[i], &r1[i].stdout]);
            let m = assert_counts(node, &[&c.count_file(node)]);
            // The cut may fall between the two echos of one number.
            assert!(n == m || n == m + 1, "{node}: {n} on stdout, {m} counted");
        }

        // Other nodes: the images of n1 and n2 on fresh agents n3 and n4.
        c.add_agents(&["n3", "n4"]).await;
        let out = c.restart(e2, &[("n1", "n3"), ("n2", "n4")]).await.unwrap();
        let agents: Vec<&str> = out.nodes.iter().map(|n| n.agent.as_str()).collect();
        assert_eq!(agents, ["n3", "n4"]);
        let r2 = [c.restored("n3", "n1", e2), c.restored("n4", "n2", e2)];
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            grows(&r2[i].stdout, 5).await;
            grows(&c.count_file(node), 5).await;
            assert_counts(node, &[&orig[i], &r1[i].stdout, &r2[i].stdout]);
            assert_counts(node, &[&c.count_file(node)]);
        }
        let running = c.running();
        assert_eq!(running.len(), 2, "{running:?}");
        assert!(running.iter().all(|(n, _)| n == "n3" || n == "n4"));
    });
}

#[test]
fn a_flipped_page_byte_refuses_the_restart_and_nothing_runs() {
    let Some((_guard, criu)) =
        prerequisites("a_flipped_page_byte_refuses_the_restart_and_nothing_runs")
    else {
        return;
    };
    runtime().block_on(async {
        let c = Cluster::start(&criu, &["n1", "n2"]).await;
        let orig = [c.spawn("n1"), c.spawn("n2")];
        for f in &orig {
            grows(f, 5).await;
        }
        let e1 = c.checkpoint_stop(&["n1", "n2"]).await;

        // Flip one byte in the middle of n2's (largest) page file.
        let manifest = c
            .writer
            .store()
            .load_manifest(JOB, e1, Some(&c.key))
            .unwrap();
        let n2 = manifest.nodes.iter().find(|n| n.node == "n2").unwrap();
        let page = n2
            .files
            .iter()
            .filter(|f| f.name.contains(".pages-"))
            .max_by_key(|f| f.size)
            .unwrap();
        let path = c.writer.store().epoch_dir(JOB, e1).join(&page.name);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();

        let counts = [c.count_file("n1"), c.count_file("n2")];
        let before: Vec<usize> = counts.iter().map(|f| numbers(f).len()).collect();
        let err = c
            .restart(e1, &[("n1", "n1"), ("n2", "n2")])
            .await
            .unwrap_err();
        match &err {
            RestartError::Failed {
                node,
                reason,
                unconfirmed,
                ..
            } => {
                assert_eq!(node.as_deref(), Some("n2"), "{err}");
                assert!(reason.contains(&page.name), "{err}");
                assert!(unconfirmed.is_empty(), "{err}");
            }
            other => panic!("expected the restart to fail on n2, got {other:?}"),
        }
        // n1's tree was restored (or was being restored): it is killed, and
        // nothing of the job runs anywhere.
        let t0 = Instant::now();
        while !c.running().is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "still running: {:?}",
                c.running()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in c.agent("n1").trees() {
            if t.restored_from.is_some() {
                assert_eq!(t.state, TreeState::Exited(128 + 9), "{t:?}");
            }
        }
        for (f, b) in counts.iter().zip(&before) {
            stays(f).await;
            // Nothing counted on after the restore: a killed restored tree
            // never ran (its count file was only cut back to the dump).
            assert_eq!(numbers(f).len(), *b, "{}", f.display());
        }
        assert_counts("n1", &[&counts[0]]);
    });
}

/// Reads frames from the agent until one that is not a heartbeat.
async fn next_reply(s: &mut tokio::net::TcpStream) -> ckpt_protocol::cluster::pb::Frame {
    use ckpt_protocol::cluster::pb::{self, frame::Body};
    loop {
        let f: pb::Frame = tokio::time::timeout(
            Duration::from_secs(30),
            ckpt_protocol::async_framing::read_frame(s, 1 << 20),
        )
        .await
        .expect("no reply from the agent")
        .unwrap();
        // Heartbeats and the job-registry reports (tree list, started,
        // exited) come at any time; the epoch replies are what is asked.
        if !matches!(
            f.body,
            Some(
                Body::Heartbeat(_) | Body::TreeList(_) | Body::TreeStarted(_) | Body::TreeExited(_)
            )
        ) {
            return f;
        }
    }
}

/// Driven by hand from a fake coordinator: a restored tree does not run
/// before RESUME, and a tree still held when the coordinator is lost is
/// killed (fail closed); the agent then reconnects and restores again.
#[test]
fn restored_trees_stay_frozen_until_resume_and_die_with_the_coordinator() {
    let Some((_guard, criu)) =
        prerequisites("restored_trees_stay_frozen_until_resume_and_die_with_the_coordinator")
    else {
        return;
    };
    use ckpt_protocol::auth::{handshake_server, NodeExpectation, ServerConfig};
    use ckpt_protocol::cluster::pb::{self, frame::Body};
    runtime().block_on(async {
        let c = Cluster::start(&criu, &["n1"]).await;
        let orig = c.spawn("n1");
        grows(&orig, 5).await;
        let e1 = c.checkpoint_stop(&["n1"]).await;
        let count = c.count_file("n1");
        let dumped = numbers(&count).len();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = AgentConfig::new(
            "n5",
            listener.local_addr().unwrap(),
            c.key.clone(),
            criu.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_ckpt-init")),
            c.root.path().join("n5.state"),
        );
        cfg.reconnect_min = Duration::from_millis(50);
        let agent = AgentDaemon::start(cfg).unwrap();
        let server = ServerConfig::new("fake-coordinator", NodeExpectation::Any);
        let restore_tree: pb::Frame = pb::RestoreTree {
            job: JOB.into(),
            epoch: e1,
            epoch_dir: c.writer.store().epoch_dir(JOB, e1).display().to_string(),
            image_node: "n1".into(),
            restore_ms: 60_000,
        }
        .into();
        let running = |agent: &AgentDaemon| -> Vec<TreeInfo> {
            agent
                .trees()
                .into_iter()
                .filter(|t| t.state == TreeState::Running)
                .collect()
        };

        // Restored, then the coordinator is lost: the held tree is killed.
        let (mut s, _) = listener.accept().await.unwrap();
        handshake_server(&mut s, &c.key, &server).await.unwrap();
        ckpt_protocol::async_framing::write_frame(&mut s, &restore_tree)
            .await
            .unwrap();
        let f = next_reply(&mut s).await;
        match &f.body {
            Some(Body::Restored(r)) => assert_eq!(r.image_node, "n1"),
            other => panic!("expected RESTORED, got {other:?}"),
        }
        assert_eq!(running(&agent).len(), 1);
        stays(&count).await;
        assert_eq!(numbers(&count).len(), dumped, "a held tree ran");
        drop(s);
        let t0 = Instant::now();
        while !running(&agent).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "a held tree survived the coordinator"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(numbers(&count).len(), dumped, "the killed tree ran");

        // Reconnected: restored again, held, then RESUME lets it count on.
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the agent did not reconnect")
            .unwrap();
        handshake_server(&mut s, &c.key, &server).await.unwrap();
        ckpt_protocol::async_framing::write_frame(&mut s, &restore_tree)
            .await
            .unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Restored(_))), "{f:?}");
        stays(&count).await;
        let resume: pb::Frame = pb::Resume {
            job: JOB.into(),
            epoch: e1,
        }
        .into();
        ckpt_protocol::async_framing::write_frame(&mut s, &resume)
            .await
            .unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Resumed(_))), "{f:?}");
        grows(&count, 5).await;
        let t = running(&agent).pop().unwrap();
        assert_counts("n1", &[&orig, &t.stdout]);
        assert_counts("n1", &[&count]);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(t.root_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
}
