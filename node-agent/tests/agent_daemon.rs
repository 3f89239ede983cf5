//! The agent daemon against a real coordinator, with real trees and real
//! CRIU: two agents (nodes n1 and n2, both on this host) in one process,
//! one tree each, a coordinator on 127.0.0.1.
//!
//! Prerequisites: root and a `criu` binary. Missing ones make every test
//! print a skip note and pass, or fail under `CI=true`.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ckpt_agent::criu::Criu;
use ckpt_agent::daemon::{AgentConfig, AgentDaemon, TreeArgs, TreeId, TreeState};
use ckpt_coordinator::daemon::{
    bind, CheckpointRequest, Coordinator, CoordinatorConfig, ManifestWriter,
};
use ckpt_coordinator::epoch::{AbortReason, Deadlines, Outcome};
use ckpt_protocol::manifest::{CheckpointMode, Key, Manifest};

static SERIAL: Mutex<()> = Mutex::new(());

const JOB: &str = "j";
/// About 30 s of output, a line every 50 ms.
const COUNTER: &str = "i=0; while [ $i -lt 600 ]; do echo $i; i=$((i+1)); sleep 0.05; done";

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

/// Keeps every committed manifest whole.
#[derive(Default)]
struct KeepWriter(Mutex<Vec<Manifest>>);

impl ManifestWriter for KeepWriter {
    fn commit(&self, manifest: &Manifest) -> Result<(), String> {
        manifest.validate().map_err(|e| e.to_string())?;
        self.0.lock().unwrap().push(manifest.clone());
        Ok(())
    }
    fn revoke(&self, job: &str, epoch: u64) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .retain(|m| !(m.job == job && m.epoch == epoch));
        Ok(())
    }
}

struct Cluster {
    root: tempfile::TempDir,
    coord: Coordinator,
    writer: Arc<KeepWriter>,
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

/// SIGKILLs a tree's init when dropped (ends its whole namespace).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Cluster {
    fn kill_on_drop(a: &AgentDaemon, id: TreeId) -> KillOnDrop {
        KillOnDrop(a.tree(id).unwrap().root_pid)
    }

    async fn start(criu: &Criu) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let key = Key::from_bytes([7; 32]);
        let listener = bind("127.0.0.1:0".parse::<SocketAddr>().unwrap(), 64).unwrap();
        let cfg = CoordinatorConfig {
            heartbeat_interval: Duration::from_millis(200),
            ..Default::default()
        };
        let writer = Arc::new(KeepWriter::default());
        let coord = Coordinator::start(listener, key.clone(), cfg, writer.clone()).unwrap();
        let mut agents = Vec::new();
        for node in ["n1", "n2"] {
            let mut cfg = AgentConfig::new(
                node,
                coord.local_addr(),
                key.clone(),
                criu.clone(),
                PathBuf::from(env!("CARGO_BIN_EXE_ckpt-init")),
                root.path().join(format!("{node}.state")),
            );
            cfg.reconnect_min = Duration::from_millis(50);
            agents.push(AgentDaemon::start(cfg).unwrap());
        }
        let t0 = Instant::now();
        while coord.nodes().await.len() < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "agents did not connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Cluster {
            root,
            coord,
            writer,
            agents,
        }
    }

    fn out_dir(&self, node: &str) -> PathBuf {
        let d = self.root.path().join(format!("{node}.out"));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spawn(&self, i: usize, script: &str) -> TreeId {
        let node = self.agents[i].node().to_owned();
        let args = TreeArgs::new(["sh", "-c", script], &self.out_dir(&node));
        self.agents[i].spawn_tree(JOB, &args).unwrap()
    }

    fn lines(&self, i: usize) -> usize {
        let node = self.agents[i].node();
        std::fs::read_to_string(self.out_dir(node).join("stdout"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn epoch_dir(&self, epoch: u64) -> PathBuf {
        self.root
            .path()
            .join("store")
            .join(JOB)
            .join(epoch.to_string())
    }

    async fn checkpoint(&self, epoch: u64, mode: CheckpointMode) -> Outcome {
        let mut req = CheckpointRequest::new(
            JOB,
            epoch,
            mode,
            vec!["n1".into(), "n2".into()],
            Deadlines::default(),
        );
        req.epoch_dir = self.epoch_dir(epoch).display().to_string();
        self.coord.run_epoch(req).await.unwrap()
    }

    /// Waits until both trees printed `more` lines beyond what they had.
    async fn both_progress(&self, more: usize) {
        let before = [self.lines(0), self.lines(1)];
        let t0 = Instant::now();
        while self.lines(0) < before[0] + more || self.lines(1) < before[1] + more {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "a tree made no progress: {before:?} -> {} {}",
                self.lines(0),
                self.lines(1)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The committed manifest of `epoch` lists each node's files, and each
    /// file in the epoch dir has the listed size and BLAKE3.
    fn check_digests(&self, epoch: u64) {
        let manifests = self.writer.0.lock().unwrap();
        let m = manifests.iter().find(|m| m.epoch == epoch).unwrap();
        let dir = self.epoch_dir(epoch);
        let mut nodes: Vec<_> = m.nodes.iter().map(|n| n.node.as_str()).collect();
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2"]);
        let mut listed = Vec::new();
        for n in &m.nodes {
            assert_eq!(n.trees.len(), 1, "node {}", n.node);
            assert!(!n.trees[0].pages.is_empty(), "node {} has no pages", n.node);
            for f in &n.files {
                assert!(f.name.starts_with(&format!("{}.t", n.node)), "{}", f.name);
                let bytes = std::fs::read(dir.join(&f.name)).unwrap();
                assert_eq!(bytes.len() as u64, f.size, "size of {}", f.name);
                assert_eq!(
                    blake3::hash(&bytes).to_hex().as_str(),
                    f.blake3,
                    "{}",
                    f.name
                );
                listed.push(f.name.clone());
            }
        }
        let mut present: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        listed.sort();
        assert_eq!(
            present, listed,
            "the epoch dir holds exactly the listed files"
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn wait_exited(a: &AgentDaemon, id: TreeId) -> TreeState {
    let t0 = Instant::now();
    loop {
        let st = a.tree(id).unwrap().state;
        if st != TreeState::Running {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "tree {id} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn continue_then_stop_commit_on_two_nodes() {
    let Some((_guard, criu)) = prerequisites("continue_then_stop_commit_on_two_nodes") else {
        return;
    };
    runtime().block_on(async {
        let c = Cluster::start(&criu).await;
        let ids = [c.spawn(0, COUNTER), c.spawn(1, COUNTER)];
        c.both_progress(3).await;

        let out = c.checkpoint(1, CheckpointMode::Continue).await;
        assert!(out.committed(), "continue epoch: {out:?}");
        assert!(out.max_downtime.is_some());
        for (a, id) in c.agents.iter().zip(ids) {
            assert_eq!(a.tree(id).unwrap().state, TreeState::Running);
        }
        c.both_progress(5).await;
        c.check_digests(1);

        let out = c.checkpoint(2, CheckpointMode::Stop).await;
        assert!(out.committed(), "stop epoch: {out:?}");
        for (a, id) in c.agents.iter().zip(ids) {
            assert_eq!(wait_exited(a, id).await, TreeState::Exited(128 + 9));
        }
        // Nothing ran between the dump and the kill.
        let after = [c.lines(0), c.lines(1)];
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(after, [c.lines(0), c.lines(1)]);
        c.check_digests(2);
        assert!(c.agents.iter().all(AgentDaemon::is_connected));
    });
}

/// A tree's init has PR_SET_PDEATHSIG, which Linux fires when the parent
/// *thread* exits: a tree started from a thread that ends right after
/// (a control-socket connection thread) must not die with that thread.
#[test]
fn a_tree_started_from_a_short_lived_thread_outlives_it() {
    let Some((_guard, criu)) =
        prerequisites("a_tree_started_from_a_short_lived_thread_outlives_it")
    else {
        return;
    };
    runtime().block_on(async {
        let c = Cluster::start(&criu).await;
        let ids: Vec<TreeId> = (0..3)
            .map(|_| std::thread::scope(|s| s.spawn(|| c.spawn(0, COUNTER)).join().unwrap()))
            .collect();
        // The spawning threads are gone; the trees keep counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = c.lines(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        for id in &ids {
            let st = c.agents[0].tree(*id).unwrap().state;
            assert_eq!(
                st,
                TreeState::Running,
                "tree {id} died with its spawning thread"
            );
        }
        assert!(c.lines(0) > before, "the trees stopped printing");
    });
}

#[test]
fn failed_prepare_aborts_and_leaves_the_other_tree_running() {
    let Some((_guard, criu)) =
        prerequisites("failed_prepare_aborts_and_leaves_the_other_tree_running")
    else {
        return;
    };
    runtime().block_on(async {
        let c = Cluster::start(&criu).await;
        let live = c.spawn(0, COUNTER);
        let gone = c.spawn(1, "echo bye");
        assert_eq!(wait_exited(&c.agents[1], gone).await, TreeState::Exited(0));

        let out = c.checkpoint(1, CheckpointMode::Continue).await;
        match out.abort_reason() {
            Some(AbortReason::AgentFailed { node, reason, .. }) => {
                assert_eq!(node, "n2");
                assert!(reason.contains("exited"), "{reason}");
            }
            other => panic!("expected n2 to fail PREPARE, got {other:?}"),
        }
        assert!(c.writer.0.lock().unwrap().is_empty());
        // n1 was frozen (READY) or about to be: it must be thawed and run on.
        assert_eq!(c.agents[0].tree(live).unwrap().state, TreeState::Running);
        let before = c.lines(0);
        let t0 = Instant::now();
        while c.lines(0) < before + 5 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "n1's tree stays frozen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dir = c.epoch_dir(1);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "aborted epoch left {left:?} in {}",
            dir.display()
        );

        // A later epoch fails the same way and still leaves n1 running.
        let out = c.checkpoint(2, CheckpointMode::Continue).await;
        assert!(!out.committed());
        assert_eq!(c.agents[0].tree(live).unwrap().state, TreeState::Running);
    });
}

/// Reads frames from the agent until one that is not a heartbeat.
async fn next_reply(s: &mut tokio::net::TcpStream) -> ckpt_protocol::cluster::pb::Frame {
    use ckpt_protocol::cluster::pb::{self, frame::Body};
    loop {
        let f: pb::Frame = tokio::time::timeout(
            Duration::from_secs(20),
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

/// Fail closed without a coordinator: a coordinator that goes silent after
/// READY has the tree thawed at `frozen_max` (with a FAIL), one whose
/// connection drops after READY has it thawed at once; the agent then
/// reconnects.
#[test]
fn lost_or_silent_coordinator_thaws_the_tree() {
    let Some((_guard, criu)) = prerequisites("lost_or_silent_coordinator_thaws_the_tree") else {
        return;
    };
    use ckpt_protocol::auth::{handshake_server, NodeExpectation, ServerConfig};
    use ckpt_protocol::cluster::pb::{self, frame::Body};
    runtime().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let key = Key::from_bytes([9; 32]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = AgentConfig::new(
            "n1",
            listener.local_addr().unwrap(),
            key.clone(),
            criu.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_ckpt-init")),
            root.path().join("state"),
        );
        cfg.reconnect_min = Duration::from_millis(50);
        let agent = AgentDaemon::start(cfg).unwrap();
        let out = root.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let id = agent
            .spawn_tree(JOB, &TreeArgs::new(["sh", "-c", COUNTER], &out))
            .unwrap();
        let guard = Cluster::kill_on_drop(&agent, id);
        let lines = || {
            std::fs::read_to_string(out.join("stdout"))
                .unwrap_or_default()
                .lines()
                .count()
        };
        let progresses = |what: &'static str| {
            let before = lines();
            async move {
                let t0 = Instant::now();
                while lines() < before + 3 {
                    assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let server = ServerConfig::new("fake-coordinator", NodeExpectation::Any);
        let prepare = |epoch: u64, frozen_max_ms: u32| -> pb::Frame {
            pb::Prepare {
                job: JOB.into(),
                epoch,
                mode: pb::CheckpointMode::Continue as i32,
                deadlines: Some(pb::Deadlines {
                    prepare_ms: 5000,
                    dump_ms: 5000,
                    frozen_max_ms,
                    flush_ms: 5000,
                }),
                epoch_dir: root.path().join("store").display().to_string(),
            }
            .into()
        };
        let (mut s, _) = listener.accept().await.unwrap();
        handshake_server(&mut s, &key, &server).await.unwrap();
        progresses("the tree does not run").await;

        // Silent after READY: thawed at frozen_max, and a FAIL says so.
        ckpt_protocol::async_framing::write_frame(&mut s, &prepare(1, 400))
            .await
            .unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Ready(_))), "{f:?}");
        let f = next_reply(&mut s).await;
        match f.body {
            Some(Body::Fail(fail)) => assert!(fail.reason.contains("frozen_max"), "{fail:?}"),
            other => panic!("expected FAIL after frozen_max, got {other:?}"),
        }
        progresses("still frozen after frozen_max").await;

        // Connection lost after READY: thawed without waiting for frozen_max.
        ckpt_protocol::async_framing::write_frame(&mut s, &prepare(2, 600_000))
            .await
            .unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Ready(_))), "{f:?}");
        let frozen = lines();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(lines(), frozen, "READY but the tree still runs");
        drop(s);
        progresses("still frozen after the coordinator was lost").await;

        // And the agent comes back.
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the agent did not reconnect")
            .unwrap();
        let sess = handshake_server(&mut s, &key, &server).await.unwrap();
        assert_eq!(sess.peer, "n1");
        drop(guard);
    });
}

/// A tree with 256 MiB of non-zero memory that prints a line every 50 ms:
/// its digest takes far longer than a loopback round trip.
const BIG: &str = "import time\nb = bytes(range(256)) * (1 << 20)\nfor i in range(2400):\n    print(i, flush=True)\n    time.sleep(0.05)\n";

/// The flush runs on its own after DUMPED, against a scripted coordinator:
/// DUMPED carries no digests and FLUSHED comes without any COMMIT, with a
/// digest of every file of the image, while the tree stays frozen; a COMMIT
/// right after DUMPED thaws the tree before the digests are done (RESUMED
/// before FLUSHED); an ABORT while the flush runs answers ABORTED, no
/// FLUSHED follows, and the node's files are gone.
#[test]
fn the_flush_follows_dumped_on_its_own() {
    let Some((_guard, criu)) = prerequisites("the_flush_follows_dumped_on_its_own") else {
        return;
    };
    let python = PathBuf::from("/usr/bin/python3");
    assert!(python.exists(), "this test needs {}", python.display());
    use ckpt_protocol::async_framing::write_frame;
    use ckpt_protocol::auth::{handshake_server, NodeExpectation, ServerConfig};
    use ckpt_protocol::cluster::pb::{self, frame::Body};
    use ckpt_protocol::cluster::{undigested_node_image_from_wire, with_digests};
    runtime().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let key = Key::from_bytes([9; 32]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = AgentConfig::new(
            "n1",
            listener.local_addr().unwrap(),
            key.clone(),
            criu.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_ckpt-init")),
            root.path().join("state"),
        );
        let agent = AgentDaemon::start(cfg).unwrap();
        let out = root.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let args = TreeArgs::new([python.to_str().unwrap(), "-c", BIG], &out);
        let id = agent.spawn_tree(JOB, &args).unwrap();
        let _guard = Cluster::kill_on_drop(&agent, id);
        let lines = || {
            std::fs::read_to_string(out.join("stdout"))
                .unwrap_or_default()
                .lines()
                .count()
        };
        let progresses = |what: &'static str| {
            let before = lines();
            async move {
                let t0 = Instant::now();
                while lines() < before + 3 {
                    assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let dir = |epoch: u64| root.path().join("store").join(epoch.to_string());
        let prepare = |epoch: u64| -> pb::Frame {
            pb::Prepare {
                job: JOB.into(),
                epoch,
                mode: pb::CheckpointMode::Continue as i32,
                deadlines: Some(pb::Deadlines {
                    prepare_ms: 10_000,
                    dump_ms: 30_000,
                    frozen_max_ms: 60_000,
                    flush_ms: 30_000,
                }),
                epoch_dir: dir(epoch).display().to_string(),
            }
            .into()
        };
        let dump = |epoch: u64| {
            pb::Frame::from(pb::Dump {
                job: JOB.into(),
                epoch,
            })
        };
        let commit = |epoch: u64| {
            pb::Frame::from(pb::Commit {
                job: JOB.into(),
                epoch,
                action: pb::CommitAction::Resume as i32,
            })
        };
        let server = ServerConfig::new("fake-coordinator", NodeExpectation::Any);
        let (mut s, _) = listener.accept().await.unwrap();
        handshake_server(&mut s, &key, &server).await.unwrap();
        progresses("the tree does not run").await;
        // The tree has its 256 MiB once it prints.

        // Epoch 1: DUMPED without digests, then FLUSHED with no COMMIT sent;
        // the tree stays frozen until COMMIT.
        write_frame(&mut s, &prepare(1)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Ready(_))), "{f:?}");
        write_frame(&mut s, &dump(1)).await.unwrap();
        let image = match next_reply(&mut s).await.body {
            Some(Body::Dumped(d)) => {
                assert_eq!(d.epoch, 1);
                let image = d.image.unwrap();
                assert!(image.files.is_empty(), "DUMPED carries digests");
                undigested_node_image_from_wire(image, "n1").unwrap()
            }
            other => panic!("expected DUMPED, got {other:?}"),
        };
        let frozen = lines();
        let flushed = match next_reply(&mut s).await.body {
            Some(Body::Flushed(f)) => f,
            other => panic!("expected FLUSHED before any COMMIT, got {other:?}"),
        };
        assert_eq!(flushed.epoch, 1);
        let files = flushed.file_digests("n1").unwrap();
        let full = with_digests(image, files).unwrap();
        let mut bytes = 0;
        for f in &full.files {
            let data = std::fs::read(dir(1).join(&f.name)).unwrap();
            assert_eq!(data.len() as u64, f.size, "{}", f.name);
            assert_eq!(
                blake3::hash(&data).to_hex().as_str(),
                f.blake3,
                "{}",
                f.name
            );
            bytes += f.size;
        }
        assert_eq!(flushed.bytes, bytes);
        assert!(bytes > 200 << 20, "only {bytes} bytes dumped");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(lines(), frozen, "thawed before COMMIT");
        write_frame(&mut s, &commit(1)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(
            matches!(f.body, Some(Body::Resumed(ref r)) if r.epoch == 1),
            "{f:?}"
        );
        progresses("not running after COMMIT").await;
        let committed = pb::Frame::from(pb::EpochCommitted {
            job: JOB.into(),
            epoch: 1,
        });
        write_frame(&mut s, &committed).await.unwrap();

        // Epoch 2: COMMIT at once after DUMPED: the tree runs again before
        // the digests are done.
        write_frame(&mut s, &prepare(2)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Ready(_))), "{f:?}");
        write_frame(&mut s, &dump(2)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Dumped(_))), "{f:?}");
        write_frame(&mut s, &commit(2)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(
            matches!(f.body, Some(Body::Resumed(ref r)) if r.epoch == 2),
            "expected RESUMED before FLUSHED: {f:?}"
        );
        let f = next_reply(&mut s).await;
        match f.body {
            Some(Body::Flushed(fl)) => {
                assert_eq!(fl.epoch, 2);
                assert!(!fl.files.is_empty());
            }
            other => panic!("expected FLUSHED, got {other:?}"),
        }
        progresses("not running after epoch 2").await;

        // Epoch 3: ABORT while the flush runs.
        write_frame(&mut s, &prepare(3)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Ready(_))), "{f:?}");
        write_frame(&mut s, &dump(3)).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(matches!(f.body, Some(Body::Dumped(_))), "{f:?}");
        let abort = pb::Frame::from(pb::Abort {
            job: JOB.into(),
            epoch: 3,
            reason: "test".into(),
        });
        write_frame(&mut s, &abort).await.unwrap();
        let f = next_reply(&mut s).await;
        assert!(
            matches!(f.body, Some(Body::Aborted(ref a)) if a.epoch == 3),
            "expected ABORTED (and no FLUSHED first): {f:?}"
        );
        progresses("not running after ABORT").await;
        // Nothing of epoch 3 follows (heartbeats only), and its files are
        // gone.
        let quiet = tokio::time::timeout(Duration::from_millis(1500), next_reply(&mut s)).await;
        assert!(quiet.is_err(), "a frame after ABORTED: {quiet:?}");
        let left: Vec<_> = std::fs::read_dir(dir(3))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "files of an aborted epoch: {left:?}");
    });
}
