//! The first multi-node end-to-end test: a TCP client/server pair on two
//! nodes of a [`TestCluster`], started through the real `ckpt-agent`s'
//! control sockets, checkpointed through the real `ckpt-coordinator`'s
//! control socket in continue mode and in stop mode, and restarted on the
//! same nodes: the connection is restored (CRIU tcp_established) and the
//! pair finishes with the RESULT of an uninterrupted run (every byte is
//! checked by the program itself).
//!
//! The first test runs the trees in their node's network namespace (host
//! network mode of the agent): their addresses are the nodes' addresses,
//! so they can only come back on the nodes they were dumped on. The second
//! gives each tree a private namespace with a job-stable address from the
//! coordinator's `job_network`: the pair is restarted on the same nodes
//! and then, after their agents are gone, on two other nodes, where the
//! connection goes on and a new connection to the moved server works.
//!
//! Prerequisites: root, CRIU, `ip`, `nsenter`, `iptables`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{require_cluster, Node, TestCluster};
use ckpt_e2e::{bin_dir, example, require, result_line, Prereq};
use ckpt_protocol::local_control::call;
use ckpt_protocol::pb;

const WAIT: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(180);
/// 100 ms per step: long enough for two checkpoints and a restart.
const STEPS: u32 = 40;
const JOB: &str = "pair";
/// The coordinator's job network (outside the clusters' 10.128.0.0/9).
const JOB_NETWORK: &str = "10.77.0.0/16";

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A daemon on a node, its stderr (log) in a file.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(node: &Node, dir: &Path, binary: &str, name: &str, config: &Path) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = node.command(bin(binary));
        cmd.arg("--config")
            .arg(config)
            .env("CKPT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let child = node
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawning {binary} on {}: {e}", node.name()));
        Daemon {
            name: name.into(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&mut self, needles: &[&str]) {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_key(path: &Path) {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(path, format!("{hex}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// The coordinator on node 0 and an agent on every node, all connected.
struct Daemons {
    coord: Daemon,
    coord_sock: PathBuf,
    /// By node name.
    agents: HashMap<String, (Daemon, PathBuf, PathBuf)>,
}

impl Daemons {
    fn start(cluster: &TestCluster, dir: &Path) -> Daemons {
        let key = dir.join("cluster.key");
        write_key(&key);
        let n0 = cluster.node(0);
        let listen = n0.addr(n0.free_port());
        let coord_sock = dir.join("coordinator.sock");
        let cfg = dir.join("coordinator.toml");
        fs::write(
            &cfg,
            format!(
                "listen = \"{listen}\"\nkey_file = \"{}\"\nckpt_dir = \"{}\"\n\
                 heartbeat_interval = \"200ms\"\ncontrol_socket = \"{}\"\n\
                 job_network = \"{JOB_NETWORK}\"\n",
                key.display(),
                dir.join("images").display(),
                coord_sock.display()
            ),
        )
        .unwrap();
        let mut coord = Daemon::start(n0, dir, "ckpt-coordinator", "coordinator", &cfg);
        coord.wait_for(&["ckpt-coordinator started"]);
        let mut agents = HashMap::new();
        for node in cluster.nodes() {
            let name = node.hostname().to_owned();
            let state = dir.join(format!("{name}.state"));
            let sock = dir.join(format!("{name}.sock"));
            let cfg = dir.join(format!("{name}.toml"));
            fs::write(
                &cfg,
                format!(
                    "node = \"{name}\"\ncoordinator = \"{listen}\"\nkey_file = \"{}\"\n\
                     state_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
                     reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n",
                    key.display(),
                    state.display(),
                    sock.display()
                ),
            )
            .unwrap();
            let mut a = Daemon::start(node, dir, "ckpt-agent", &name, &cfg);
            a.wait_for(&["ckpt-agent started"]);
            coord.wait_for(&["agent connected", &format!("node={name}")]);
            agents.insert(name, (a, sock, state));
        }
        Daemons {
            coord,
            coord_sock,
            agents,
        }
    }

    fn logs(&self) -> String {
        let mut s = format!("--- coordinator:\n{}", self.coord.log());
        for (n, (a, _, _)) in &self.agents {
            s.push_str(&format!("--- agent {n}:\n{}", a.log()));
        }
        s
    }

    fn spawn(&self, node: &Node, argv: &[String], out: &Path) -> pb::TreeSpawned {
        self.spawn_net(node, argv, out, true)
    }

    fn spawn_net(&self, node: &Node, argv: &[String], out: &Path, host: bool) -> pb::TreeSpawned {
        let sock = &self.agents[node.hostname()].1;
        let req = pb::SpawnTreeRequest {
            job: JOB.into(),
            argv: argv.to_vec(),
            cwd: "/".into(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            host_network: host,
            uid: None,
            gid: None,
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

    fn checkpoint(&self, nodes: &[&Node], stop: bool) -> pb::ClusterCheckpointDone {
        let req = pb::ClusterCheckpointRequest {
            job: JOB.into(),
            nodes: nodes.iter().map(|n| n.hostname().to_owned()).collect(),
            stop,
        };
        match call(
            &self.coord_sock,
            pb::request::Op::ClusterCheckpoint(req),
            CALL,
        ) {
            Ok(pb::response::Body::ClusterCheckpoint(d)) => d,
            other => panic!("checkpoint (stop={stop}): {other:?}\n{}", self.logs()),
        }
    }

    fn restart(&self, placement: &[(&Node, &Node)]) -> pb::ClusterRestartDone {
        let req = pb::ClusterRestartRequest {
            job: JOB.into(),
            epoch: 0,
            placement: placement
                .iter()
                .map(|(from, to)| (from.hostname().to_owned(), to.hostname().to_owned()))
                .collect(),
        };
        match call(&self.coord_sock, pb::request::Op::ClusterRestart(req), CALL) {
            Ok(pb::response::Body::ClusterRestart(d)) => d,
            other => panic!("restart: {other:?}\n{}", self.logs()),
        }
    }

    /// The stdout files of the trees `node`'s agent restored.
    fn restored_outputs(&self, node: &Node) -> Vec<PathBuf> {
        let dir = self.agents[node.hostname()].2.join("output");
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
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// The highest `step N` in `out`.
fn last_step(out: &str) -> u32 {
    out.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_until(what: &str, limit: Duration, logs: &dyn Fn() -> String, ok: &dyn Fn() -> bool) {
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

/// RESULT of an uninterrupted run, in the root namespace over loopback.
fn reference(prog: &Path, steps: u32) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let steps = steps.to_string();
    let mut server = Command::new(prog)
        .args(["server", "127.0.0.1", &port, &steps])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client = Command::new(prog)
        .args(["client", "127.0.0.1", &port, &steps])
        .output()
        .unwrap();
    let mut s_out = String::new();
    server
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut s_out)
        .unwrap();
    assert!(server.wait().unwrap().success(), "reference server failed");
    assert!(client.status.success(), "reference client failed");
    let c = result_line(std::str::from_utf8(&client.stdout).unwrap())
        .unwrap()
        .to_owned();
    assert_eq!(result_line(&s_out), Some(c.as_str()));
    c
}

#[test]
fn tcp_pair_across_nodes_checkpoint_continue_stop_and_restart_same_nodes() {
    let name = "tcp_pair_across_nodes_checkpoint_continue_stop_and_restart_same_nodes";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let prog = example("tcp_pair");
    let reference = std::thread::spawn({
        let prog = prog.clone();
        move || reference(&prog, STEPS)
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(4);
    let d = Daemons::start(&cluster, dir);
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let port = n1.free_port().to_string();
    let steps = STEPS.to_string();
    let p = prog.display().to_string();
    let server_out = dir.join("server.out");
    let client_out = dir.join("client.out");
    let server = d.spawn(
        n1,
        &[
            p.clone(),
            "server".into(),
            n1.ip().to_string(),
            port.clone(),
            steps.clone(),
        ],
        &server_out,
    );
    let logs = || {
        format!(
            "--- server:\n{}\n--- client:\n{}\n{}",
            read(&server_out),
            read(&client_out),
            d.logs()
        )
    };
    wait_until("the server to listen", WAIT, &logs, &|| {
        read(&server_out).contains("listening")
    });
    let client = d.spawn(
        n2,
        &[p, "client".into(), n1.ip().to_string(), port, steps],
        &client_out,
    );
    assert!(server.root_pid > 0 && client.root_pid > 0);
    wait_until("step 10 of the client", WAIT, &logs, &|| {
        last_step(&read(&client_out)) >= 10
    });

    // Continue mode: both trees keep running.
    let e1 = d.checkpoint(&[n1, n2], false);
    assert!(e1.epoch >= 1 && !e1.stopped, "{e1:?}");
    let after = last_step(&read(&client_out));
    wait_until(
        "the pair to go on after the checkpoint",
        WAIT,
        &logs,
        &|| {
            last_step(&read(&client_out)) >= after + 5 && last_step(&read(&server_out)) >= after + 5
        },
    );

    // Stop mode: committed, then both trees are gone.
    let e2 = d.checkpoint(&[n1, n2], true);
    assert!(e2.epoch > e1.epoch && e2.stopped, "{e2:?}");
    let (s_at, c_at) = (read(&server_out), read(&client_out));
    assert!(
        result_line(&c_at).is_none(),
        "finished before the stop: raise STEPS"
    );
    sleep(Duration::from_millis(500));
    for pid in [server.root_pid, client.root_pid] {
        let alive =
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "tree {pid} still runs after the stop checkpoint");
    }
    assert_eq!(read(&server_out), s_at, "the server ran on after the stop");
    assert_eq!(read(&client_out), c_at, "the client ran on after the stop");
    let (s_last, c_last) = (last_step(&s_at), last_step(&c_at));

    // Restart on the same nodes: the connection comes back and the pair
    // finishes byte-exact.
    let r = d.restart(&[(n1, n1), (n2, n2)]);
    assert_eq!(r.epoch, e2.epoch, "{r:?}");
    let (s_outs, c_outs) = (d.restored_outputs(n1), d.restored_outputs(n2));
    assert_eq!(s_outs.len(), 1, "{s_outs:?}");
    assert_eq!(c_outs.len(), 1, "{c_outs:?}");
    let (s_new, c_new) = (s_outs[0].clone(), c_outs[0].clone());
    let logs2 = || {
        format!(
            "--- restored server {s_new:?}:\n{}\n--- restored client {c_new:?}:\n{}\n{}",
            read(&s_new),
            read(&c_new),
            d.logs()
        )
    };
    // Generous: a step is 100 ms of sleep, but this machine may be slow.
    let limit = Duration::from_millis(u64::from(STEPS) * 1500) + WAIT;
    wait_until("both restored trees to finish", limit, &logs2, &|| {
        result_line(&read(&s_new)).is_some() && result_line(&read(&c_new)).is_some()
    });
    let reference = reference.join().unwrap();
    let (s_res, c_res) = (read(&s_new), read(&c_new));
    assert_eq!(result_line(&s_res), Some(reference.as_str()), "{}", logs2());
    assert_eq!(result_line(&c_res), Some(reference.as_str()), "{}", logs2());
    // The restored output picks up right after the checkpoint's last step
    // (the stop epoch was taken after it) and reaches the last one.
    for (out, last) in [(&s_res, s_last), (&c_res, c_last)] {
        let first: u32 = out
            .lines()
            .filter_map(|l| l.strip_prefix("step "))
            .find_map(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert_eq!(first, last + 1, "{out}");
        assert_eq!(last_step(out), STEPS, "{out}");
    }
    assert!(!read(&s_new.with_extension("stderr")).contains("FAIL"));
}

/// Steps of the moving pair: two stop checkpoints and two restarts fit.
const MOVE_STEPS: u32 = 90;

/// The first `step N` in `out`.
fn first_step(out: &str) -> u32 {
    out.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The job-network veths (`cj…`) on `node`.
fn job_veths(node: &Node) -> Vec<String> {
    let out = node.command("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .filter(|n| n.starts_with("cj"))
        .collect()
}

#[test]
fn tcp_pair_with_job_addresses_restarts_on_the_same_and_then_on_other_nodes() {
    let name = "tcp_pair_with_job_addresses_restarts_on_the_same_and_then_on_other_nodes";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        return;
    }
    let prog = example("tcp_pair");
    let reference = std::thread::spawn({
        let prog = prog.clone();
        move || reference(&prog, MOVE_STEPS)
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(5);
    let mut d = Daemons::start(&cluster, dir);
    let (n1, n2, n3, n4) = (
        cluster.node(1),
        cluster.node(2),
        cluster.node(3),
        cluster.node(4),
    );
    let port: u16 = 7100;
    let steps = MOVE_STEPS.to_string();
    let p = prog.display().to_string();
    let server_out = dir.join("server.out");
    let client_out = dir.join("client.out");
    let server = d.spawn_net(
        n1,
        &[
            p.clone(),
            "server".into(),
            "0.0.0.0".into(),
            port.to_string(),
            steps.clone(),
            "again".into(),
        ],
        &server_out,
        false,
    );
    let server_ip: std::net::Ipv4Addr = server
        .address
        .parse()
        .unwrap_or_else(|_| panic!("no job address for the server: {server:?}\n{}", d.logs()));
    assert!(server.address.starts_with("10.77."), "{server:?}");
    let logs = || {
        format!(
            "--- server:\n{}\n--- client:\n{}\n{}",
            read(&server_out),
            read(&client_out),
            d.logs()
        )
    };
    wait_until("the server to listen", WAIT, &logs, &|| {
        read(&server_out).contains("listening")
    });
    let client = d.spawn_net(
        n2,
        &[
            p,
            "client".into(),
            server_ip.to_string(),
            port.to_string(),
            steps,
        ],
        &client_out,
        false,
    );
    assert!(!client.address.is_empty() && client.address != server.address);
    assert_eq!(job_veths(n1).len(), 1, "{:?}", job_veths(n1));
    wait_until("step 10 of the client", WAIT, &logs, &|| {
        last_step(&read(&client_out)) >= 10
    });

    // Continue mode: both go on.
    let e1 = d.checkpoint(&[n1, n2], false);
    assert!(!e1.stopped, "{e1:?}");
    let after = last_step(&read(&client_out));
    wait_until(
        "the pair to go on after the checkpoint",
        WAIT,
        &logs,
        &|| {
            last_step(&read(&client_out)) >= after + 5 && last_step(&read(&server_out)) >= after + 5
        },
    );

    // Stop, then restart on the same nodes.
    let e2 = d.checkpoint(&[n1, n2], true);
    assert!(e2.stopped, "{e2:?}");
    let (s_last, c_last) = (last_step(&read(&server_out)), last_step(&read(&client_out)));
    let exits = |n: usize| {
        move |d: &Daemons| {
            d.coord
                .log()
                .lines()
                .filter(|l| l.contains("tree exit reported"))
                .count()
                >= n
        }
    };
    // The agents have reaped the stopped trees (and removed their veths).
    wait_until("the stopped trees to be reaped", WAIT, &logs, &|| {
        exits(2)(&d)
    });
    assert!(job_veths(n1).is_empty() && job_veths(n2).is_empty());
    let r = d.restart(&[(n1, n1), (n2, n2)]);
    assert_eq!(r.epoch, e2.epoch, "{r:?}");
    let (s1, c1) = (d.restored_outputs(n1), d.restored_outputs(n2));
    assert_eq!((s1.len(), c1.len()), (1, 1), "{s1:?} {c1:?}");
    let (s1, c1) = (s1[0].clone(), c1[0].clone());
    let logs1 = || {
        format!(
            "--- server (restart 1):\n{}\n--- client (restart 1):\n{}\n{}",
            read(&s1),
            read(&c1),
            d.logs()
        )
    };
    wait_until("the pair to go on after the restart", WAIT, &logs1, &|| {
        last_step(&read(&c1)) >= c_last + 5 && last_step(&read(&s1)) >= s_last + 5
    });
    assert_eq!(first_step(&read(&s1)), s_last + 1, "{}", logs1());
    assert_eq!(first_step(&read(&c1)), c_last + 1, "{}", logs1());

    // Stop again, lose nodes 1 and 2 (their agents), restart on 3 and 4.
    let e3 = d.checkpoint(&[n1, n2], true);
    assert!(e3.stopped && e3.epoch > e2.epoch, "{e3:?}");
    let (s_last, c_last) = (last_step(&read(&s1)), last_step(&read(&c1)));
    assert!(
        result_line(&read(&c1)).is_none(),
        "finished before the second stop: raise MOVE_STEPS"
    );
    wait_until("the stopped trees to be reaped", WAIT, &logs1, &|| {
        exits(4)(&d)
    });
    assert!(job_veths(n1).is_empty() && job_veths(n2).is_empty());
    for n in [n1, n2] {
        drop(d.agents.remove(n.hostname()));
        d.coord.wait_for(&["agent disconnected", n.hostname()]);
    }
    let t0 = Instant::now();
    let r = d.restart(&[(n1, n3), (n2, n4)]);
    assert_eq!(r.epoch, e3.epoch, "{r:?}");
    let (s2, c2) = (d.restored_outputs(n3), d.restored_outputs(n4));
    assert_eq!((s2.len(), c2.len()), (1, 1), "{s2:?} {c2:?}");
    let (s2, c2) = (s2[0].clone(), c2[0].clone());
    let logs2 = || {
        format!(
            "--- server (on {}):\n{}\n--- client (on {}):\n{}\n{}",
            n3.hostname(),
            read(&s2),
            n4.hostname(),
            read(&c2),
            d.logs()
        )
    };
    let limit = Duration::from_millis(u64::from(MOVE_STEPS) * 1500) + WAIT;
    wait_until("both moved trees to finish", limit, &logs2, &|| {
        result_line(&read(&s2)).is_some() && result_line(&read(&c2)).is_some()
    });
    let ran = t0.elapsed();
    let reference = reference.join().unwrap();
    let (s_res, c_res) = (read(&s2), read(&c2));
    assert_eq!(result_line(&s_res), Some(reference.as_str()), "{}", logs2());
    assert_eq!(result_line(&c_res), Some(reference.as_str()), "{}", logs2());
    assert_eq!(first_step(&s_res), s_last + 1, "{}", logs2());
    assert_eq!(first_step(&c_res), c_last + 1, "{}", logs2());
    assert_eq!(last_step(&s_res), MOVE_STEPS, "{}", logs2());
    eprintln!(
        "moved pair: {} steps in {:.2} s after the restart",
        MOVE_STEPS - c_last,
        ran.as_secs_f64()
    );

    // A new connection from node 4 to the server's address, now on node 3.
    let target = std::net::SocketAddr::from((server_ip, port));
    let echoed = n4.in_netns(|| {
        let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::io::Write::write_all(&mut s, b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    assert_eq!(&echoed, b"ping");
    wait_until("the server to end", WAIT, &logs2, &|| {
        read(&s2).contains("again done")
    });
    assert!(!read(&s2.with_extension("stderr")).contains("FAIL"));
    // Nothing of the job's network is left once its trees are gone.
    wait_until("the moved trees' veths to go", WAIT, &logs2, &|| {
        job_veths(n3).is_empty() && job_veths(n4).is_empty()
    });
}
