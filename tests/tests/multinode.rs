//! The multi-node end-to-end test: a TCP client/server pair on two nodes
//! of a [`TestCluster`], started through the real `ckpt-agent`s' control
//! sockets, checkpointed through the real `ckpt-coordinator`'s control
//! socket in continue mode and in stop mode, and restarted: the connection
//! is restored (CRIU tcp_established) and the pair finishes with the
//! RESULT of an uninterrupted run (every byte is checked by the program
//! itself).
//!
//! Each tree has a private network namespace with a job-stable address
//! from the coordinator's `job_network` (the supported multi-node mode):
//! the pair is restarted on the same nodes and then, after their agents
//! are gone, on two other nodes, where the connection goes on and a new
//! connection to the moved server works.
//!
//! Host-network trees (the node's own namespace) are not tested across
//! nodes: after a stop checkpoint the killed connections' FIN/TIME_WAIT
//! state stays in the node's namespace with the same 4-tuple as the
//! restored ones, so a restore on the same node soon after collides with
//! it (the agent then says so, see node-agent/src/daemon/restore.rs).
//!
//! Prerequisites: root, CRIU, `ip`, `nsenter`, `iptables`.

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{require_cluster, Node, TestCluster};
use ckpt_e2e::daemons::{last_step, read, wait_until, Daemons, WAIT};
use ckpt_e2e::{example, require, result_line, Prereq};
use ckpt_protocol::pb;

const JOB: &str = "pair";
/// The coordinator's job network (outside the clusters' 10.128.0.0/9).
const JOB_NETWORK: &str = "10.77.0.0/16";

fn checkpoint(d: &Daemons, nodes: &[&Node], stop: bool) -> pb::ClusterCheckpointDone {
    d.checkpoint_on(JOB, nodes, stop)
        .unwrap_or_else(|e| panic!("checkpoint (stop={stop}): {e}\n{}", d.logs()))
}

fn restart(d: &Daemons, placement: &[(&Node, &Node)]) -> pb::ClusterRestartDone {
    d.restart(JOB, placement)
        .unwrap_or_else(|e| panic!("restart: {e}\n{}", d.logs()))
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
    let mut d = Daemons::start(&cluster, dir, &format!("job_network = \"{JOB_NETWORK}\"\n"));
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
        JOB,
        &[
            p.clone(),
            "server".into(),
            "0.0.0.0".into(),
            port.to_string(),
            steps.clone(),
            "again".into(),
        ],
        &server_out,
        None,
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
        JOB,
        &[
            p,
            "client".into(),
            server_ip.to_string(),
            port.to_string(),
            steps,
        ],
        &client_out,
        None,
        false,
    );
    assert!(!client.address.is_empty() && client.address != server.address);
    assert_eq!(job_veths(n1).len(), 1, "{:?}", job_veths(n1));
    wait_until("step 10 of the client", WAIT, &logs, &|| {
        last_step(&read(&client_out)) >= 10
    });

    // Continue mode: both go on.
    let e1 = checkpoint(&d, &[n1, n2], false);
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
    let e2 = checkpoint(&d, &[n1, n2], true);
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
    let r = restart(&d, &[(n1, n1), (n2, n2)]);
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
    let e3 = checkpoint(&d, &[n1, n2], true);
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
    let r = restart(&d, &[(n1, n3), (n2, n4)]);
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
