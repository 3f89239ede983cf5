//! The MPI drain shim under ckpt, end to end: a 4-rank Open MPI job
//! (`examples/mpi/halo.c`: nonblocking halo exchange with many messages in
//! flight, eager and rendezvous sizes, three communicators,
//! `MPI_ANY_SOURCE`) over two nodes of a [`TestCluster`], launched by
//! `ckpt-job run --cluster` under real `ckpt-agent`s, with the shim
//! preloaded into every rank by ckpt (`OMPI_MCA_mca_base_env_list`) and its
//! sockets in each tree's `CKPT_SHIM_DIR` (set by rsh-exec).
//!
//! - checkpoint (continue) mid-run: every agent drains its two ranks
//!   (READY from each, logged with the counts) before it freezes; then a
//!   stop checkpoint, a restart on the same nodes and one on two other
//!   nodes: the output equals an uninterrupted run's.
//! - a rank stuck outside MPI (halo's `skew_us`: rank 0 sleeps) makes the
//!   PREPARE fail after the configured deadline: the epoch aborts, every
//!   rank is resumed and the job finishes with the right result.
//!
//! Prerequisites: root, CRIU, Open MPI, `ip`, `nsenter`; the shim is built
//! with scripts/build-shim.sh.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{require_cluster, Node, TestCluster};
use ckpt_e2e::daemons::{ckpt_job_copy, last_step, read, wait_until, Daemons, WAIT};
use ckpt_e2e::{example, require, result_line, text, Prereq};

const T: Duration = Duration::from_secs(90);
const JOB_NETWORK: &str = "10.79.0.0/16";

/// The Open MPI shim, built once per test process (the tests run in
/// parallel), copied next to `ckpt_job`.
fn install_shim(ckpt_job: &Path) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let st = Command::new(root.join("scripts/build-shim.sh"))
            .arg("openmpi")
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(st.success(), "scripts/build-shim.sh openmpi failed");
        root.join("target/shim/libckpt_mpi_shim_openmpi.so")
    });
    let to = ckpt_job
        .parent()
        .unwrap()
        .join("libckpt_mpi_shim_openmpi.so");
    fs::copy(built, &to).unwrap();
    to
}

struct Mpi {
    d: Daemons,
    ckpt_job: PathBuf,
}

impl Mpi {
    fn start(cluster: &TestCluster, dir: &Path, coord_extra: &str) -> Mpi {
        let d = Daemons::start(
            cluster,
            dir,
            &format!("job_network = \"{JOB_NETWORK}\"\n{coord_extra}"),
        );
        let ckpt_job = ckpt_job_copy(dir);
        install_shim(&ckpt_job);
        Mpi { d, ckpt_job }
    }

    fn run_cmd(&self, node: &Node, job: &str, io: &Path, cmd: &[String]) -> Command {
        let mut c = node.command(&self.ckpt_job);
        c.args([
            "run",
            "--cluster",
            "--net",
            "private",
            "--name",
            job,
            "--io-dir",
        ])
        .arg(io)
        .arg("--agent-socket")
        .arg(self.d.sock(node))
        .arg("--")
        .args(cmd)
        .current_dir(io.parent().unwrap())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null());
        c
    }
}

/// mpirun (resolved by ckpt to Open MPI) with 2 ranks on each of `a`, `b`.
fn halo_cmd(a: &Node, b: &Node, args: &[&str]) -> Vec<String> {
    let mut c: Vec<String> = [
        "mpirun.openmpi",
        "--allow-run-as-root",
        "-np",
        "4",
        "--host",
        &format!("{}:2,{}:2", a.hostname(), b.hostname()),
        "--mca",
        "btl",
        "self,vader,tcp",
        "--mca",
        "btl_tcp_if_include",
        JOB_NETWORK,
        "--mca",
        "oob_tcp_if_include",
        JOB_NETWORK,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    c.push(example("halo-openmpi").display().to_string());
    c.extend(args.iter().map(|s| s.to_string()));
    c
}

/// Runs a `run --cluster` to its end (killed after `T`).
fn finish(d: &Mpi, node: &Node, mut cmd: Command, io: &Path) -> Output {
    let (out, err) = (io.with_extension("stdout"), io.with_extension("stderr"));
    cmd.stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = node.spawn(&mut cmd).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > T {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {T:?}\n--- stdout:\n{}\n--- stderr:\n{}\n{}",
                read(&out),
                read(&err),
                d.d.logs()
            );
        }
        sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: fs::read(&out).unwrap(),
        stderr: fs::read(&err).unwrap(),
    }
}

/// The job's stdout, stderr, the remote trees' stderr and the daemons'
/// logs.
fn job_logs(d: &Mpi, io: &Path, run_err: &Path) -> String {
    let mut s = format!(
        "--- job stdout:\n{}\n--- job stderr:\n{}\n--- run stderr:\n{}\n",
        read(&io.join("main/stdout")),
        read(&io.join("main/stderr")),
        read(run_err)
    );
    for e in fs::read_dir(io.join("rsh")).into_iter().flatten().flatten() {
        s.push_str(&format!(
            "--- {}/stderr:\n{}\n",
            e.path().display(),
            read(&e.path().join("stderr"))
        ));
    }
    s + &d.d.logs()
}

/// The uninterrupted reference output of `args`.
fn reference(d: &Mpi, n1: &Node, n2: &Node, dir: &Path, args: &[&str]) -> String {
    let io = dir.join("ref");
    let o = finish(
        d,
        n1,
        d.run_cmd(n1, "halo-ref", &io, &halo_cmd(n1, n2, args)),
        &io,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "reference run: {}\n{}\n{}",
        text(&o.stdout),
        text(&o.stderr),
        d.d.logs()
    );
    let out = text(&o.stdout);
    assert!(result_line(&out).is_some(), "no RESULT: {out}");
    out
}

#[test]
fn openmpi_halo_drained_checkpoint_continue_stop_restart_same_and_other_nodes() {
    let name = "openmpi_halo_drained_checkpoint_continue_stop_restart_same_and_other_nodes";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::OpenMpi]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(5);
    let d = Mpi::start(&cluster, dir, "");
    let (n1, n2, n3, n4) = (
        cluster.node(1),
        cluster.node(2),
        cluster.node(3),
        cluster.node(4),
    );
    // 150 steps of >= 40 ms: room for two checkpoints.
    let args = ["150", "40000"];
    let expected = reference(&d, n1, n2, dir, &args);

    let job = "halo";
    let io = dir.join("job");
    let run_err = dir.join("run.stderr");
    let mut run = d.run_cmd(n1, job, &io, &halo_cmd(n1, n2, &args));
    run.stdout(fs::File::create(dir.join("run.stdout")).unwrap())
        .stderr(fs::File::create(&run_err).unwrap());
    let mut run = n1.spawn(&mut run).unwrap();
    let out = io.join("main/stdout");
    let logs = || job_logs(&d, &io, &run_err);
    wait_until("step 20", T, &logs, &|| last_step(&read(&out)) >= 20);

    let e1 =
        d.d.checkpoint_on(job, &[n1, n2], false)
            .unwrap_or_else(|e| panic!("checkpoint: {e}\n{}", logs()));
    assert!(!e1.stopped, "{e1:?}");
    // Each agent drained its two ranks before the freeze.
    let all = d.d.logs();
    let drained: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("rank drained") && l.contains(&format!("epoch={}", e1.epoch)))
        .collect();
    assert_eq!(
        drained.len(),
        4,
        "4 ranks drained in epoch {}\n{}",
        e1.epoch,
        logs()
    );
    for r in 0..4 {
        assert!(
            drained.iter().any(|l| l.contains(&format!("rank={r} "))),
            "rank {r} not drained\n{}",
            logs()
        );
    }
    // The manifest records every rank's counts, per node; globally, every
    // message sent was received (the cut is consistent).
    let manifest = read(
        &dir.join("images")
            .join(job)
            .join(format!("{:06}", e1.epoch))
            .join("MANIFEST"),
    );
    let m: serde_json::Value = serde_json::from_str(manifest.lines().nth(1).unwrap_or(""))
        .unwrap_or_else(|e| panic!("MANIFEST of epoch {}: {e}\n{manifest}", e1.epoch));
    let mut ranks = Vec::new();
    let (mut sent, mut received) = (0, 0);
    for n in m["nodes"].as_array().unwrap() {
        let drained = n["drained"].as_array().cloned().unwrap_or_default();
        assert_eq!(drained.len(), 2, "2 ranks per node: {n}");
        for r in drained {
            ranks.push(r["rank"].as_u64().unwrap());
            sent += r["sent"].as_u64().unwrap();
            received += r["received"].as_u64().unwrap();
        }
    }
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2, 3], "{manifest}");
    assert!(
        sent > 0 && sent == received,
        "sent {sent} received {received}: {manifest}"
    );
    let after = last_step(&read(&out));
    wait_until("halo to go on after the checkpoint", WAIT, &logs, &|| {
        last_step(&read(&out)) >= after + 10
    });

    let e2 =
        d.d.checkpoint_on(job, &[n1, n2], true)
            .unwrap_or_else(|e| panic!("stop checkpoint: {e}\n{}", logs()));
    assert!(e2.stopped && e2.epoch > e1.epoch, "{e2:?}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < WAIT,
            "run did not end after the stop\n{}",
            logs()
        );
        sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(75), "{}", logs());
    assert!(
        result_line(&read(&out)).is_none(),
        "finished before the stop\n{}",
        logs()
    );

    let exit = io.join("main/exit");
    for placement in [[(n1, n1), (n2, n2)], [(n1, n3), (n2, n4)]] {
        let _ = fs::remove_file(&exit);
        let r =
            d.d.restart(job, &placement)
                .unwrap_or_else(|e| panic!("restart: {e}\n{}", logs()));
        assert_eq!(r.epoch, e2.epoch, "{r:?}");
        wait_until("the restored job to finish", T, &logs, &|| exit.exists());
        assert_eq!(read(&exit).trim(), "0", "{}", logs());
        assert_eq!(
            read(&out),
            expected,
            "output after a restart on {:?} differs from an uninterrupted run\n{}",
            placement.map(|(_, to)| to.hostname().to_owned()),
            logs()
        );
    }
}

#[test]
fn openmpi_rank_stuck_outside_mpi_aborts_the_epoch_and_the_job_finishes() {
    let name = "openmpi_rank_stuck_outside_mpi_aborts_the_epoch_and_the_job_finishes";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::OpenMpi]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cluster = TestCluster::new(3);
    // The agents' drain gets 3/4 of PREPARE: 1.125 s.
    let d = Mpi::start(&cluster, dir, "[deadlines]\nprepare = \"1500ms\"\n");
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    // Rank 0 sleeps 3 s outside MPI at each step start and before each
    // allreduce (the result does not depend on it).
    let expected = reference(&d, n1, n2, dir, &["10", "1000"]);
    let job = "stuck";
    let io = dir.join("job");
    let run_err = dir.join("run.stderr");
    let mut cmd = d.run_cmd(n1, job, &io, &halo_cmd(n1, n2, &["10", "1000", "3000000"]));
    cmd.stdout(fs::File::create(dir.join("run.stdout")).unwrap())
        .stderr(fs::File::create(&run_err).unwrap());
    let mut run = n1.spawn(&mut cmd).unwrap();
    let logs = || job_logs(&d, &io, &run_err);
    // Until MPI_Init is done on every rank (the sockets are there).
    let socks = || {
        let mut n = fs::read_dir(io.join("main/shim")).map_or(0, |d| d.count());
        for e in fs::read_dir(io.join("rsh")).into_iter().flatten().flatten() {
            n += fs::read_dir(e.path().join("shim")).map_or(0, |d| d.count());
        }
        n
    };
    wait_until("4 rank sockets", T, &logs, &|| socks() == 4);
    // Rank 0 is outside MPI nearly all the time: a drain must time out. A
    // request that happens to meet it less than 1.125 s before it calls MPI
    // again succeeds (about one in three); six tries.
    let mut aborted = None;
    for _ in 0..6 {
        match d.d.checkpoint_on(job, &[n1, n2], false) {
            Err(e) => {
                aborted = Some(e.to_string());
                break;
            }
            Ok(done) => assert!(!done.stopped),
        }
    }
    let why = aborted.unwrap_or_else(|| panic!("no epoch aborted\n{}", logs()));
    // The agent's drain deadline, or (on a loaded machine) the
    // coordinator's PREPARE deadline just before it: the epoch aborts
    // while preparing either way.
    assert!(
        why.contains("did not reach a drain point") || why.contains("preparing"),
        "abort reason: {why}\n{}",
        logs()
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < T, "the job did not finish\n{}", logs());
        sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "{}", logs());
    assert_eq!(read(&io.join("main/stdout")), expected, "{}", logs());
}
