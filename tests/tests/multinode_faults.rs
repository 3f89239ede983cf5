//! Faults with the real daemons on a [`TestCluster`]: the coordinator's
//! job registry (agents report their trees; a restarted coordinator
//! relearns jobs and epochs), an agent or the coordinator SIGKILLed in the
//! middle of an epoch, per-user authorization through the real `ckpt-job`
//! run as another uid, a wrong-key agent, and malformed frames sent to the
//! coordinator's TCP port and control socket.
//!
//! Workloads: a shell loop that prints `step N` every 100 ms (its progress
//! shows whether it runs), and `memhog` (hundreds of MiB, so that CRIU's
//! dump lasts long enough to be interrupted).
//!
//! Prerequisites: root, CRIU, `ip`, `nsenter`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{require_cluster, Node, TestCluster};
use ckpt_e2e::daemons::{self, read, wait_until, Daemon, Daemons, ThawOnDrop, WAIT};
use ckpt_e2e::{ckpt_job_bin, example, require, Prereq};
use ckpt_protocol::local_control::CallError;
use ckpt_protocol::pb;

/// `nobody`.
const OTHER_UID: u32 = 65534;

fn loop_argv() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "i=0; while :; do i=$((i+1)); echo step $i; sleep 0.1; done".into(),
    ]
}

fn last_step(p: &Path) -> u32 {
    daemons::last_step(&read(p))
}

/// Waits until the loop writing `out` has made `n` more steps.
fn assert_runs(out: &Path, n: u32, limit: Duration, logs: &dyn Fn() -> String) {
    let from = last_step(out);
    wait_until(
        &format!("{} to go on from step {from}", out.display()),
        limit,
        logs,
        &|| last_step(out) >= from + n,
    );
}

fn node_names(j: &pb::ClusterJob) -> Vec<&str> {
    j.nodes.iter().map(|n| n.node.as_str()).collect()
}

fn node_phase<'a>(j: &'a pb::ClusterJob, node: &Node) -> Option<&'a str> {
    j.nodes
        .iter()
        .find(|n| n.node == node.hostname())
        .map(|n| n.phase.as_str())
}

fn remote_message(e: &CallError) -> String {
    match e {
        CallError::Remote(e) => e.message.clone(),
        other => other.to_string(),
    }
}

/// `memhog MiB` on `node` as a tree of `job`; waits for READY.
fn start_memhog(d: &Daemons, node: &Node, job: &str, mib: u32, out: &Path) -> u32 {
    let argv = vec![example("memhog").display().to_string(), mib.to_string()];
    let t = d.spawn(node, job, &argv, out, None);
    wait_until(
        "memhog to fill its memory",
        Duration::from_secs(120),
        &|| d.logs(),
        &|| read(out).contains("READY"),
    );
    t.root_pid as u32
}

/// Whether the tree rooted at `pid` is thawed: its freezer cgroup (v1
/// `freezer.state`, or v2 `cgroup.events`) says so.
fn thawed(pid: u32) -> bool {
    let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    for l in cg.lines() {
        let mut parts = l.splitn(3, ':');
        let (_, ctrl, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        if ctrl.split(',').any(|c| c == "freezer") {
            let state = read(Path::new(&format!(
                "/sys/fs/cgroup/freezer{path}/freezer.state"
            )));
            return state.trim() == "THAWED";
        }
    }
    let Some(path) = cg.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|root| {
            read(Path::new(&format!("{root}{path}/cgroup.events")))
                .lines()
                .any(|l| l == "frozen 0")
        })
}

/// (a) An agent SIGKILLed while CRIU dumps its tree: the epoch aborts, the
/// job's tree on the other node runs on, the restarted agent reports no
/// tree of the job (its old one died with the old process's knowledge), and
/// the next checkpoint of the job (its remaining node) commits.
#[test]
fn agent_killed_during_dump_aborts_the_epoch_and_the_job_runs_on() {
    let name = "agent_killed_during_dump_aborts_the_epoch_and_the_job_runs_on";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(3);
    // n1's agent dies with its tree frozen: thaw it before the cluster's
    // cleanup kills it.
    let _thaw = ThawOnDrop::new(cluster.node(1));
    let mut d = Daemons::start(&cluster, dir, "[deadlines]\ndump = \"5m\"\n");
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let job = "hog";
    let hog_out = dir.join("hog.out");
    let loop_out = dir.join("loop.out");
    start_memhog(&d, n1, job, 1536, &hog_out);
    d.spawn(n2, job, &loop_argv(), &loop_out, None);
    let logs = || format!("--- loop:\n{}\n{}", read(&loop_out), d.logs());
    assert_runs(&loop_out, 3, Duration::from_secs(120), &logs);
    let j = d.wait_status(job, "both nodes to report the job", WAIT, |j| {
        node_names(j) == [n1.hostname(), n2.hostname()]
    });
    assert_eq!(
        (j.phase.as_str(), j.owner_uid, j.last_epoch),
        ("running", 0, 0)
    );

    // SIGKILL the agent of n1 while CRIU dumps its tree.
    let pid = d.agents[n1.hostname()].daemon.pid().unwrap();
    let r = std::thread::scope(|s| {
        let ck = s.spawn(|| d.checkpoint(job));
        // The heartbeats carry the dump's progress: bytes CRIU wrote of the
        // tree's resident memory (1.5 GiB).
        let j = d.wait_status(job, "n1 to report DUMPING", Duration::from_secs(120), |j| {
            node_phase(j, n1) == Some("DUMPING")
                && j.nodes.iter().any(|n| n.bytes_total >= 1400 << 20)
        });
        let n = j.nodes.iter().find(|n| n.node == n1.hostname()).unwrap();
        assert!(n.bytes_done <= n.bytes_total + (64 << 20), "{n:?}");
        sigkill(pid);
        ck.join().unwrap()
    });
    let e = r.expect_err("the epoch survived its agent's death");
    let msg = remote_message(&e);
    assert!(
        msg.contains("aborted") && msg.contains(n1.hostname()),
        "{msg}\n{}",
        logs()
    );
    let j = d.status(job);
    assert_eq!((j.checkpoints_failed, j.last_epoch), (1, 0), "{j:?}");
    assert!(j.last_error.contains("aborted"), "{j:?}");
    // n2 was told to abort and resumed its tree: its agent logs the abort
    // and thaws because of it, not on its own (fail-closed timeout). The
    // limits are generous: under a full parallel run a 1.5 GiB dump on the
    // other node and other tests' CRIU runs share the 2 cores and the disk,
    // and the abort reaches n2 only once its job task is done with the
    // frame before (its own dump of the loop).
    let slow = Duration::from_secs(120);
    wait_until("n2's agent to take the abort", slow, &logs, &|| {
        d.agents[n2.hostname()]
            .daemon
            .log()
            .lines()
            .any(|l| l.contains("abort") && l.contains("job=hog"))
    });
    assert_runs(&loop_out, 5, slow, &logs);
    assert!(
        !d.agents[n2.hostname()]
            .daemon
            .log()
            .contains("thawing the job's trees on our own"),
        "n2 resumed on its own, not because of the abort\n{}",
        logs()
    );

    // A new agent process on n1 reports no tree of the job: n1 leaves it.
    d.agent(n1).daemon.restart(n1);
    d.agent(n1).daemon.wait_for(&["ckpt-agent started"]);
    let logs = || format!("--- loop:\n{}\n{}", read(&loop_out), d.logs());
    let j = d.wait_status(job, "the job to run on n2 only", WAIT, |j| {
        node_names(j) == [n2.hostname()] && j.nodes[0].connected
    });
    assert_eq!(j.phase, "running");
    let done = d
        .checkpoint(job)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(done.epoch >= 2, "{done:?}");
    assert_eq!(d.status(job).last_epoch, done.epoch);
    assert_runs(&loop_out, 3, WAIT, &logs);
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// (b) The coordinator SIGKILLed while CRIU dumps: every agent aborts and
/// thaws its tree well within `frozen_max`; a restarted coordinator (same
/// state_dir and image store) lists the job with its last committed epoch,
/// relearns its trees from the reconnecting agents, and checkpoints it
/// again.
#[test]
fn coordinator_killed_mid_checkpoint_agents_resume_and_a_new_one_knows_the_job() {
    let name = "coordinator_killed_mid_checkpoint_agents_resume_and_a_new_one_knows_the_job";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(3);
    // frozen_max = prepare + dump + prepare = 80 s.
    let mut d = Daemons::start(
        &cluster,
        dir,
        "[deadlines]\nprepare = \"10s\"\ndump = \"60s\"\n",
    );
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let job = "sim";
    let hog_out = dir.join("hog.out");
    let loop_out = dir.join("loop.out");
    let hog_pid = start_memhog(&d, n1, job, 1536, &hog_out);
    d.wait_status(job, "n1 to report its tree", WAIT, |j| {
        node_names(j) == [n1.hostname()]
    });
    let looper = d.spawn(n2, job, &loop_argv(), &loop_out, None);
    d.wait_status(job, "both nodes to report the job", WAIT, |j| {
        node_names(j) == [n1.hostname(), n2.hostname()]
    });
    // Checkpoint only once the loop runs: a tree frozen before its init's
    // setsid() cannot be dumped (tree.rs joins the cgroup first).
    assert_runs(&loop_out, 2, WAIT, &|| d.logs());
    let e1 = d
        .checkpoint(job)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.logs()));
    assert_eq!(d.status(job).last_epoch, e1.epoch);

    // Kill the coordinator while n1 dumps.
    let pid = d.coord.pid().unwrap();
    let t_kill = std::thread::scope(|s| {
        let ck = s.spawn(|| d.checkpoint(job));
        d.wait_status(job, "n1 to report DUMPING", Duration::from_secs(120), |j| {
            node_phase(j, n1) == Some("DUMPING")
        });
        sigkill(pid);
        let t = Instant::now();
        let r = ck.join().unwrap();
        assert!(r.is_err(), "{r:?}");
        t
    });
    let logs = || format!("--- loop:\n{}\n{}", read(&loop_out), d.logs());
    // Both agents notice the loss and resume their trees, far within
    // frozen_max (80 s).
    let frozen_max = Duration::from_secs(80);
    assert_runs(&loop_out, 3, frozen_max, &logs);
    wait_until("the memhog tree to be thawed", frozen_max, &logs, &|| {
        let log = d.agents[n1.hostname()].daemon.log();
        log.contains("lost the coordinator")
            && log.contains("thawing the job's trees on our own")
            && thawed(hog_pid)
    });
    assert!(
        t_kill.elapsed() < frozen_max,
        "resumed only after {:?}",
        t_kill.elapsed()
    );
    assert!(thawed(looper.root_pid as u32), "{}", logs());

    // A new coordinator process: the job and its epoch come back from the
    // state dir and the store, its trees from the agents.
    d.coord.restart(cluster.node(0));
    d.coord.wait_for(&["ckpt-coordinator started"]);
    let logs = || format!("--- loop:\n{}\n{}", read(&loop_out), d.logs());
    let j = d.status(job);
    assert_eq!((j.last_epoch, j.owner_uid), (e1.epoch, 0), "{j:?}");
    let list = match d.ask(pb::request::Op::ClusterList(pb::ClusterListRequest {})) {
        Ok(pb::response::Body::ClusterJobs(l)) => l,
        other => panic!("{other:?}\n{}", logs()),
    };
    assert!(list.jobs.iter().any(|j| j.job == job), "{list:?}");
    d.wait_status(job, "the agents to report the job again", WAIT, |j| {
        j.phase == "running"
            && node_names(j) == [n1.hostname(), n2.hostname()]
            && j.nodes.iter().all(|n| n.connected && !n.trees.is_empty())
    });
    let e3 = d
        .checkpoint(job)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    // Epoch numbers are never reused: the interrupted one's stays taken.
    assert!(e3.epoch > e1.epoch + 1, "{e3:?} after {e1:?}");
    let j = d.status(job);
    assert_eq!(j.last_epoch, e3.epoch, "{j:?}");
    assert!(d.coord_state.join("registry.json").exists());
    assert_runs(&loop_out, 3, WAIT, &logs);
}

/// Runs the real `ckpt-job` with `cfg` as `uid` (root: None).
fn ckpt_job(cfg: &Path, uid: Option<u32>, args: &[&str]) -> Output {
    let mut cmd = Command::new(ckpt_job_bin());
    cmd.arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("CKPT_CONFIG");
    if let Some(uid) = uid {
        // std drops the supplementary groups (setgroups(0)) before setuid.
        cmd.uid(uid).gid(uid);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout:\n{}\n--- stderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Committed epochs of `job` in the store.
fn committed(images: &Path, job: &str) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(images.join(job))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("MANIFEST").exists())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// (c) Per-user authorization through the real CLI run as `nobody`, the
/// CLI's cluster commands (status, list, checkpoint, --interval with
/// retention, stop and restart), and an agent with the wrong key refused.
#[test]
fn cluster_jobs_through_the_cli_per_user_authorization_and_a_wrong_key_agent() {
    let name = "cluster_jobs_through_the_cli_per_user_authorization_and_a_wrong_key_agent";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(2);
    let mut d = Daemons::start(&cluster, dir, "");
    let n1 = cluster.node(1);
    let (root_out, other_out) = (dir.join("roots.out"), dir.join("others.out"));
    fs::write(&other_out, "").unwrap();
    d.spawn(n1, "roots", &loop_argv(), &root_out, None);
    let n0 = cluster.node(0);
    d.spawn(n0, "others", &loop_argv(), &other_out, Some(OTHER_UID));
    let logs = || {
        format!(
            "--- others.err:\n{}\n{}",
            read(&other_out.with_extension("err")),
            d.logs()
        )
    };
    assert_runs(&root_out, 2, WAIT, &logs);
    assert_runs(&other_out, 2, WAIT, &logs);
    d.wait_status("others", "the agent to report the job", WAIT, |j| {
        j.owner_uid == OTHER_UID && node_names(j) == [n0.hostname()]
    });
    let cfg = dir.join("ckpt.toml");
    fs::create_dir(dir.join("run")).unwrap();
    fs::write(
        &cfg,
        format!(
            "coordinator_socket = \"{}\"\nrun_dir = \"{}\"\nckpt_dir = \"{}\"\n",
            d.coord_sock.display(),
            dir.join("run").display(),
            d.images.display()
        ),
    )
    .unwrap();

    // nobody may not touch root's job; the error names the job and owner.
    for args in [
        &["status", "roots"][..],
        &["checkpoint", "roots"],
        &["checkpoint", "--interval", "10m", "roots"],
        &["restart", "roots"],
    ] {
        let o = ckpt_job(&cfg, Some(OTHER_UID), args);
        let t = text(&o);
        assert!(!o.status.success(), "{args:?}: {t}");
        assert!(
            t.contains("permission denied: job roots is owned by uid 0")
                && t.contains(&format!("you are uid {OTHER_UID}")),
            "{args:?}: {t}"
        );
    }
    // ... sees only its own job, and checkpoints it.
    let o = ckpt_job(&cfg, Some(OTHER_UID), &["list", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["name"].as_str())
        .collect();
    assert!(
        names.contains(&"others") && !names.contains(&"roots"),
        "{}",
        text(&o)
    );
    let o = ckpt_job(&cfg, Some(OTHER_UID), &["checkpoint", "--json", "others"]);
    assert!(o.status.success(), "{}\n{}", text(&o), logs());
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let epoch = done["epoch"].as_u64().unwrap();
    assert!(epoch >= 1, "{done}");
    let o = ckpt_job(&cfg, Some(OTHER_UID), &["status", "--json", "others"]);
    assert!(o.status.success(), "{}", text(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["last_epoch"].as_u64(), Some(epoch), "{st}");
    assert_eq!(st["owner_uid"].as_u64(), Some(u64::from(OTHER_UID)), "{st}");
    assert_eq!(st["nodes"][0]["node"].as_str(), Some(n0.hostname()), "{st}");
    assert_eq!(st["nodes"][0]["phase"].as_str(), Some("RUNNING"), "{st}");
    assert_eq!(st["nodes"][0]["connected"].as_bool(), Some(true), "{st}");
    assert_runs(&other_out, 3, WAIT, &logs);

    // Root: periodic checkpoints every second, keeping 2.
    let o = ckpt_job(
        &cfg,
        None,
        &["checkpoint", "--interval", "1s", "--keep", "2", "roots"],
    );
    assert!(o.status.success(), "{}", text(&o));
    d.wait_status(
        "roots",
        "three periodic checkpoints",
        Duration::from_secs(60),
        |j| j.checkpoints_committed >= 3 && j.interval_seconds == 1,
    );
    let o = ckpt_job(&cfg, None, &["checkpoint", "--interval", "0s", "roots"]);
    assert!(o.status.success(), "{}", text(&o));
    let j = d.wait_status("roots", "the last periodic checkpoint to end", WAIT, |j| {
        j.running_epoch == 0
    });
    let kept = committed(&d.images, "roots");
    assert_eq!(kept.len(), 2, "{kept:?} {j:?}");
    assert_eq!(kept.last().copied(), Some(j.last_epoch), "{kept:?} {j:?}");
    assert_runs(&root_out, 3, WAIT, &logs);

    // Stop, then restart from the newest epoch on the same node.
    let o = ckpt_job(&cfg, None, &["checkpoint", "--stop", "roots"]);
    assert!(o.status.success(), "{}\n{}", text(&o), logs());
    let stopped_at = last_step(&root_out);
    d.wait_status("roots", "the stopped tree to be reported gone", WAIT, |j| {
        j.phase == "exited"
    });
    let o = ckpt_job(&cfg, None, &["restart", "roots"]);
    assert!(o.status.success(), "{}\n{}", text(&o), logs());
    assert!(text(&o).contains("restarted from epoch"), "{}", text(&o));
    let j = d.wait_status("roots", "the restored tree to be reported", WAIT, |j| {
        j.phase == "running"
    });
    assert_eq!(node_names(&j), [n1.hostname()]);
    let restored: Vec<PathBuf> = fs::read_dir(d.agents[n1.hostname()].state.join("output"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".stdout"))
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    wait_until("the restored loop to go on", WAIT, &logs, &|| {
        last_step(&restored[0]) > stopped_at + 2
    });
    let o = ckpt_job(&cfg, None, &["restart", "--place", "n9=n1", "roots"]);
    assert!(!o.status.success(), "{}", text(&o));

    // An agent with another key is refused and never becomes a node.
    let key2 = dir.join("other.key");
    ckpt_e2e::daemons::write_key(&key2);
    let icfg = dir.join("intruder.toml");
    fs::write(
        &icfg,
        format!(
            "node = \"intruder\"\ncoordinator = \"{}\"\nkey_file = \"{}\"\n\
             state_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
            d.listen,
            key2.display(),
            dir.join("intruder.state").display(),
            dir.join("intruder.sock").display()
        ),
    )
    .unwrap();
    let mut intruder = Daemon::start(n1, dir, "ckpt-agent", "intruder", &icfg);
    d.coord.wait_for(&["refused an agent connection"]);
    intruder.wait_for(&["cannot reach the coordinator"]);
    intruder.kill();
    let o = ckpt_job(&cfg, None, &["list", "--json"]);
    assert!(!text(&o).contains("intruder"), "{}", text(&o));
}

/// Writes `bytes` to a fresh connection (then half-closes it) and waits
/// for the peer to answer and close; returns what it sent back.
fn send_raw_tcp(node: &Node, addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let bytes = bytes.to_vec();
    node.in_netns(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The peer may close before taking everything: ignore EPIPE.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        match s.read_to_end(&mut back) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the coordinator neither answered nor closed: {e}"),
        }
        back
    })
}

fn send_raw_unix(sock: &Path, bytes: &[u8]) -> pb::Response {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    ckpt_protocol::framing::read_frame(&mut s, 1 << 20)
        .unwrap_or_else(|e| panic!("no answer from the control socket: {e}"))
}

fn frame_bytes(len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// (d) Truncated, oversized and undecodable frames sent to the
/// coordinator's TCP port and to its control socket are answered with an
/// error or a close, never a crash; the coordinator keeps serving its
/// agents and clients.
#[test]
fn bad_frames_to_the_coordinator_are_refused_and_it_serves_on() {
    let name = "bad_frames_to_the_coordinator_are_refused_and_it_serves_on";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(2);
    let d = Daemons::start(&cluster, dir, "");
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let out = dir.join("loop.out");
    d.spawn(n1, "steady", &loop_argv(), &out, None);
    let logs = || d.logs();
    assert_runs(&out, 2, WAIT, &logs);

    // TCP, before any handshake: each is refused and closed.
    let cases: [(&str, Vec<u8>); 4] = [
        ("oversized", frame_bytes(0xffff_fff0, b"")),
        ("truncated", frame_bytes(100, &[0x0a; 10])),
        ("undecodable", frame_bytes(5, &[0xff; 5])),
        ("half a header", vec![0, 0]),
    ];
    for (what, bytes) in &cases {
        let back = send_raw_tcp(n0, d.listen, bytes);
        assert!(back.len() < 4096, "{what}: {} bytes back", back.len());
    }
    // From an authenticated agent's point of view nothing changed.
    let coord_pid = d.coord.pid().unwrap();
    assert!(alive(coord_pid), "{}", logs());
    wait_until("the refusals to be logged", WAIT, &logs, &|| {
        d.coord.log().matches("refused an agent connection").count() >= cases.len()
    });

    // The control socket: an error reply each time.
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "oversized",
            frame_bytes(0x7fff_ffff, b""),
            "unreadable request",
        ),
        (
            "truncated",
            frame_bytes(100, &[0x08; 10]),
            "unreadable request",
        ),
        (
            "undecodable",
            frame_bytes(5, &[0xff; 5]),
            "unreadable request",
        ),
        (
            "empty",
            frame_bytes(0, b""),
            "unsupported protocol version 0",
        ),
        ("no op", frame_bytes(2, &[0x08, 0x01]), "empty request"),
    ];
    for (what, bytes, expect) in &cases {
        let r = send_raw_unix(&d.coord_sock, bytes);
        match &r.body {
            Some(pb::response::Body::Error(e)) => {
                assert!(e.message.contains(expect), "{what}: {e:?}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A job name that could escape the image store.
    let e = d.checkpoint("../etc").unwrap_err();
    assert!(remote_message(&e).contains("invalid job name"), "{e}");
    // A request for a job nobody has.
    let e = d.checkpoint("nope").unwrap_err();
    assert!(
        remote_message(&e).contains("knows no job named \"nope\""),
        "{e}"
    );

    // Still serving: the job is listed and checkpointed, its agent never
    // dropped.
    assert!(alive(coord_pid), "{}", logs());
    let done = d
        .checkpoint("steady")
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(done.epoch >= 1);
    let log = d.coord.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.matches("agent connected").count(),
        2,
        "an agent was dropped:\n{log}"
    );
    assert_runs(&out, 2, WAIT, &logs);
}

/// Whether `pid` runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}
