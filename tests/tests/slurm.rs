//! Slurm end-to-end: a real Slurm (munged, slurmctld, one slurmd per node)
//! on a [`TestCluster`] (tests/src/slurm.rs).
//!
//! Prerequisites: root, `ip`, `nsenter`, Slurm and munge; CRIU for the
//! checkpoint tests.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use ckpt_e2e::cluster::{leftovers, require_cluster, TestCluster};
use ckpt_e2e::slurm::{Slurm, SlurmOpts};
use ckpt_e2e::{require, Prereq};

const T_JOB: Duration = Duration::from_secs(40);

fn done(st: &str) -> bool {
    matches!(
        st,
        "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY"
    )
}

#[test]
fn sbatch_runs_on_both_nodes_and_the_harness_leaves_nothing() {
    let name = "sbatch_runs_on_both_nodes_and_the_harness_leaves_nothing";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Slurm]) {
        return;
    }
    let (dir, prefix, ids);
    {
        let cluster = TestCluster::new(3);
        prefix = cluster.prefix().to_owned();
        ids = cluster.namespace_ids();
        let slurm = Slurm::start(&cluster, &SlurmOpts::default());
        dir = slurm.dir.clone();
        let out = slurm.dir.join("hostname.%j.out");
        let id = slurm.sbatch(&[
            "-N2",
            "-o",
            out.to_str().unwrap(),
            "--wrap",
            "hostname; srun hostname | sort",
        ]);
        let st = slurm.wait_job(id, "end", T_JOB, &done);
        assert_eq!(st, "COMPLETED", "{:?}\n{}", slurm.job(id), slurm.logs());
        let got = fs::read_to_string(slurm.dir.join(format!("hostname.{id}.out"))).unwrap();
        let (a, b) = (cluster.node(1).hostname(), cluster.node(2).hostname());
        assert_eq!(got, format!("{a}\n{a}\n{b}\n"), "{}", slurm.logs());
        // The cluster is dropped after Slurm (declared first).
    }
    let left = Slurm::leftovers(&dir);
    assert!(left.is_empty(), "Slurm left behind: {left:?}");
    assert!(!dir.exists(), "{} was not removed", dir.display());
    let left = leftovers(&prefix, &ids);
    assert!(left.is_empty(), "the cluster left behind: {left:?}");
}

// ---------------------------------------------------------------------------
// ckpt-job submit: checkpoint on USR1, requeue, restart from the checkpoint.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::Instant;

use ckpt_e2e::cluster::Node;
use ckpt_e2e::daemons::{Daemons, ThawOnDrop};
use ckpt_e2e::{bin_dir, example, result_line, run_with_timeout, text};

/// 100 ms per step: the USR1 lands mid-run.
const STEPS: &str = "80";
const JOB_NETWORK: &str = "10.79.0.0/16";

/// The workload: a tcp_pair server in the job's first tree, its client on
/// the allocation's second node through `ckpt-job rsh`, each appending its
/// output to a file of WORK.
const JOB_SH: &str = r#"#!/bin/sh
#SBATCH -N 2
ckpt=$1 prog=$2 work=$3 steps=$4
set -- $CKPT_SLURM_NODES
peer=$2
addr=$(hostname -I | cut -d' ' -f1)
"$prog" server "$addr" 7000 "$steps" >>"$work/server.out" 2>>"$work/server.err" &
server=$!
"$ckpt" rsh "$peer" "$prog" client "$addr" 7000 "$steps" >>"$work/client.out" 2>>"$work/client.err"
c=$?
wait $server
echo "done client=$c server=$?"
"#;

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

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
        sleep(Duration::from_millis(100));
    }
}

/// Server and client output of an uninterrupted run (root namespace,
/// loopback).
fn reference(prog: &Path) -> (String, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let server = Command::new(prog)
        .args(["server", "127.0.0.1", &port, STEPS])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = Command::new(prog);
    c.args(["client", "127.0.0.1", &port, STEPS]);
    let client = run_with_timeout(c, Duration::from_secs(60));
    let server = server.wait_with_output().unwrap();
    assert!(
        server.status.success() && client.status.success(),
        "reference run failed"
    );
    (text(&server.stdout), text(&client.stdout))
}

/// What the job left on `node`: its processes (besides the daemons), its
/// cgroups, job veths, scratch dirs.
fn node_leftovers(node: &Node, job: &str) -> Vec<String> {
    let mut out = Vec::new();
    for p in node.pids() {
        let comm = read(Path::new(&format!("/proc/{p}/comm")));
        let comm = comm.trim();
        if !["slurmd", "ckpt-agent"].contains(&comm) {
            out.push(format!("process {p} ({comm})"));
        }
    }
    for root in [
        "/sys/fs/cgroup/freezer/ckpt",
        "/sys/fs/cgroup/unified/ckpt",
        "/sys/fs/cgroup/ckpt",
    ] {
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("agent.{}.", node.hostname()))
                && n.contains(&format!(".{job}.t"))
            {
                out.push(format!("cgroup {n}"));
            }
        }
    }
    let links = node
        .command("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    for l in text(&links.stdout).lines() {
        if l.split(':')
            .nth(1)
            .is_some_and(|n| n.trim().starts_with("cj"))
        {
            out.push(format!("link {l}"));
        }
    }
    for d in [
        format!("/tmp/ckpt-job.{job}"),
        format!("/dev/shm/ckpt-job.{job}"),
    ] {
        if Path::new(&d).exists() {
            out.push(d);
        }
    }
    out
}

/// The test's ckpt config, hooks and job script in `dir`.
fn setup(dir: &Path, d: &Daemons) -> (PathBuf, SlurmOpts) {
    let (cfg, opts) = ckpt_e2e::slurm::ckpt_setup(dir, d);
    let script = dir.join("job.sh");
    fs::write(&script, JOB_SH).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (cfg, opts)
}

/// A cluster (node 0: slurmctld and the coordinator; the others: slurmd
/// and an agent each), Slurm with the ckpt prolog and epilog, a ckpt
/// config. Fields drop in order: Slurm, daemons, thaw, cluster, files.
struct Rig {
    slurm: Slurm,
    d: Daemons,
    _thaw: Vec<ThawOnDrop>,
    cluster: TestCluster,
    cfg: PathBuf,
    work: PathBuf,
    tmp: tempfile::TempDir,
}

/// One submitted job of a [`Rig`].
struct Submitted {
    id: u32,
    job: String,
}

impl Rig {
    fn new(nodes: usize) -> Rig {
        Self::with(nodes, |_, _| {})
    }

    /// Like [`Rig::new`], with `more` changing the Slurm options.
    fn with(nodes: usize, more: impl FnOnce(&TestCluster, &mut SlurmOpts)) -> Rig {
        let tmp = tempfile::Builder::new()
            .prefix("ckpt-slurm-e2e-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let cluster = TestCluster::new(nodes);
        let thaw: Vec<ThawOnDrop> = cluster.nodes().iter().map(ThawOnDrop::new).collect();
        let d = Daemons::start(
            &cluster,
            &dir,
            &format!("job_network = \"{JOB_NETWORK}\"\n"),
        );
        let (cfg, mut opts) = setup(&dir, &d);
        more(&cluster, &mut opts);
        let slurm = Slurm::start(&cluster, &opts);
        let work = dir.join("work");
        fs::create_dir_all(&work).unwrap();
        Rig {
            slurm,
            d,
            _thaw: thaw,
            cluster,
            cfg,
            work,
            tmp,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `ckpt-job submit` of job.sh (2 nodes, grace 60 s), as root.
    fn submit(&self) -> Submitted {
        self.submit_as(None)
    }

    /// `ckpt-job submit` of job.sh (2 nodes, grace 60 s) from the work dir
    /// (Slurm output and `.ckpt/` go there), as `uid` (its group = uid) if
    /// given: the work dir is then made theirs.
    fn submit_as(&self, uid: Option<u32>) -> Submitted {
        self.submit_opts(uid, &[])
    }

    /// [`Rig::submit_as`] with more `ckpt-job submit` options.
    fn submit_opts(&self, uid: Option<u32>, opts: &[&str]) -> Submitted {
        let ckpt = bin_dir().join("ckpt-job");
        let prog = example("tcp_pair");
        let script = self.dir().join("job.sh");
        let args = [
            ckpt.into_os_string(),
            prog.into_os_string(),
            self.work.clone().into_os_string(),
            STEPS.into(),
        ];
        self.submit_script(uid, opts, &script, &args)
    }

    /// `ckpt-job submit SCRIPT ARGS` (grace 60 s) from the work dir, as
    /// `uid` if given.
    fn submit_script(
        &self,
        uid: Option<u32>,
        opts: &[&str],
        script: &Path,
        args: &[std::ffi::OsString],
    ) -> Submitted {
        let dir = self.dir();
        let ckpt = bin_dir().join("ckpt-job");
        let mut c = match uid {
            Some(u) => {
                let st = Command::new("chown")
                    .arg(format!("{u}:{u}"))
                    .arg(&self.work)
                    .status()
                    .unwrap();
                assert!(st.success(), "chown of the work dir");
                let mut c = self.slurm.command("setpriv");
                c.args([
                    format!("--reuid={u}"),
                    format!("--regid={u}"),
                    "--clear-groups".into(),
                ])
                .arg(&ckpt);
                c
            }
            None => self.slurm.command(ckpt.to_str().unwrap()),
        };
        c.arg("--config")
            .arg(&self.cfg)
            .args(["submit", "--grace", "60s"])
            .args(opts)
            .arg("--agent-socket")
            .arg(format!("{}/%n.sock", dir.display()))
            .arg(format!("--output={}/slurm-%j.out", self.work.display()))
            .arg(script)
            .args(args)
            .current_dir(&self.work);
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "submit failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let id: u32 = text(&out.stdout)
            .trim()
            .strip_prefix("Submitted batch job ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("submit printed {:?}", text(&out.stdout)));
        Submitted {
            id,
            job: format!("slurm-{}-{id}", self.slurm.name),
        }
    }

    fn server_out(&self) -> PathBuf {
        self.work.join("server.out")
    }

    fn slurm_out(&self, s: &Submitted) -> PathBuf {
        self.work.join(format!("slurm-{}.out", s.id))
    }

    fn logs(&self, s: &Submitted) -> String {
        let w = &self.work;
        format!(
            "--- slurm output:\n{}\n--- server:\n{}{}\n--- client:\n{}{}\n--- hooks:\n{}\n{}\n{}",
            read(&self.slurm_out(s)),
            read(&w.join("server.out")),
            read(&w.join("server.err")),
            read(&w.join("client.out")),
            read(&w.join("client.err")),
            read(&self.dir().join("hooks.log")),
            self.slurm.logs(),
            self.d.logs()
        )
    }

    /// Waits until `n` epilogs have finished.
    fn wait_epilogs(&self, s: &Submitted, n: usize) {
        let log = self.dir().join("hooks.log");
        wait_until("the epilogs", T_JOB, &|| self.logs(s), &|| {
            read(&log)
                .lines()
                .filter(|l| l.contains(" epilog ") && l.contains(&format!("job={}:", s.job)))
                .filter(|l| l.ends_with(": clean") || l.ends_with("NOT clean"))
                .count()
                >= n
        });
        let hooks = read(&log);
        assert!(!hooks.contains("NOT clean"), "{}", self.logs(s));
    }

    fn assert_clean(&self, s: &Submitted, nodes: &[usize]) {
        for i in nodes {
            let n = self.cluster.node(*i);
            let left = node_leftovers(n, &s.job);
            assert!(
                left.is_empty(),
                "{} after the job: {left:?}\n{}",
                n.hostname(),
                self.logs(s)
            );
        }
    }

    /// USR1 to the batch step once the job is at step 10; waits for the
    /// requeue, then for the end; checks the output against `reference`.
    fn usr1_requeue_restart(&self, s: &Submitted, reference: (String, String)) {
        let logs = || self.logs(s);
        let s_out = self.server_out();
        wait_until("step 10", T_JOB, &logs, &|| last_step(&read(&s_out)) >= 10);
        let t0 = Instant::now();
        self.slurm
            .run("scancel", &["--signal=USR1", "--batch", &s.id.to_string()]);
        wait_until("the requeue", T_JOB, &logs, &|| {
            self.slurm
                .job_field(s.id, "Restarts")
                .is_some_and(|r| r != "0")
        });
        let requeued = t0.elapsed();
        let at_stop = read(&s_out);
        assert!(
            result_line(&at_stop).is_none(),
            "finished before the stop: raise STEPS\n{}",
            logs()
        );
        wait_until("the restarted job's next step", T_JOB, &logs, &|| {
            last_step(&read(&s_out)) > last_step(&at_stop)
        });
        // For the record (not a benchmark: tiny trees, a busy machine).
        eprintln!(
            "{}: USR1 -> requeued {:.2} s, requeued -> running again {:.2} s",
            s.job,
            requeued.as_secs_f64(),
            (t0.elapsed() - requeued).as_secs_f64()
        );
        let st = self
            .slurm
            .wait_job(s.id, "end", Duration::from_secs(90), &done);
        assert_eq!(st, "COMPLETED", "{}", logs());
        let (want_s, want_c) = reference;
        // Identical but for the address the server listens on.
        let strip = |s: &str| -> String {
            s.lines()
                .filter(|l| !l.starts_with("listening "))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert!(result_line(&want_s).is_some(), "reference: {want_s}");
        assert_eq!(
            strip(&read(&s_out)),
            strip(&want_s),
            "server output differs\n{}",
            logs()
        );
        assert_eq!(
            strip(&read(&self.work.join("client.out"))),
            strip(&want_c),
            "client output differs\n{}",
            logs()
        );
        let so = read(&self.slurm_out(s));
        assert!(
            so.contains("USR1: checkpointing job") && so.contains("requeued"),
            "{}",
            logs()
        );
        assert!(
            so.contains("restarting from its newest epoch"),
            "{}",
            logs()
        );
        assert!(so.contains("done client=0 server=0"), "{}", logs());
    }
}

fn reference_thread() -> std::thread::JoinHandle<(String, String)> {
    let prog = example("tcp_pair");
    std::thread::spawn(move || reference(&prog))
}

#[test]
fn submit_usr1_checkpoints_requeues_and_restarts_to_the_uninterrupted_output() {
    let name = "submit_usr1_checkpoints_requeues_and_restarts_to_the_uninterrupted_output";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let reference = reference_thread();
    let rig = Rig::new(3);
    let s = rig.submit();
    rig.usr1_requeue_restart(&s, reference.join().unwrap());
    // Every node's epilog ran, after the first run and the second.
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2]);
}

#[test]
fn requeued_job_restarts_on_another_node_when_one_is_drained() {
    let name = "requeued_job_restarts_on_another_node_when_one_is_drained";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let reference = reference_thread();
    let rig = Rig::new(4);
    let s = rig.submit();
    let (n1, n2, n3) = (
        rig.cluster.node(1),
        rig.cluster.node(2),
        rig.cluster.node(3),
    );
    wait_until("the job to run", T_JOB, &|| rig.logs(&s), &|| {
        rig.slurm.job_field(s.id, "JobState").as_deref() == Some("RUNNING")
    });
    let nodes = rig.slurm.job_field(s.id, "NodeList").unwrap_or_default();
    let expanded = rig.slurm.run("scontrol", &["show", "hostnames", &nodes]);
    assert_eq!(
        expanded.split_whitespace().collect::<Vec<_>>(),
        [n1.hostname(), n2.hostname()],
        "first allocation"
    );
    rig.slurm.run(
        "scontrol",
        &[
            "update",
            &format!("NodeName={}", n2.hostname()),
            "State=DRAIN",
            "Reason=ckpt-test",
        ],
    );
    rig.usr1_requeue_restart(&s, reference.join().unwrap());
    let so = read(&rig.slurm_out(&s));
    assert!(
        so.contains(&format!("{}={}", n2.hostname(), n3.hostname()))
            && so.contains(&format!("{}={}", n1.hostname(), n1.hostname())),
        "placement n1=n1,n2=n3 not used\n{}",
        rig.logs(&s)
    );
    // First run: n1, n2; second: n1, n3.
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2, 3]);
}

#[test]
fn epilog_kills_the_trees_of_a_cancelled_job_and_leaves_the_nodes_clean() {
    let name = "epilog_kills_the_trees_of_a_cancelled_job_and_leaves_the_nodes_clean";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let rig = Rig::new(3);
    let s = rig.submit();
    let logs = || rig.logs(&s);
    wait_until("step 5", T_JOB, &logs, &|| {
        last_step(&read(&rig.server_out())) >= 5
    });
    // The trees run under the agents, not under slurmstepd: scancel alone
    // does not end them.
    rig.slurm.run("scancel", &[&s.id.to_string()]);
    let st = rig.slurm.wait_job(s.id, "end", T_JOB, &done);
    assert_eq!(st, "CANCELLED", "{}", logs());
    rig.wait_epilogs(&s, 2);
    let hooks = read(&rig.dir().join("hooks.log"));
    assert!(
        hooks.contains("killing the job's processes"),
        "the epilog found no tree to end\n{}",
        logs()
    );
    rig.assert_clean(&s, &[1, 2]);
    // Nothing runs on: the output stopped growing.
    let at = read(&rig.server_out());
    sleep(Duration::from_millis(500));
    assert_eq!(read(&rig.server_out()), at, "the job ran on\n{}", logs());
    assert!(result_line(&at).is_none(), "{}", logs());
}

#[test]
fn prolog_drains_a_node_whose_agent_is_down_and_the_job_waits() {
    let name = "prolog_drains_a_node_whose_agent_is_down_and_the_job_waits";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let mut rig = Rig::new(3);
    let n2 = rig.cluster.node(2).hostname().to_owned();
    // SIGKILLed: its socket file stays, nobody listens on it.
    rig.d.agents.get_mut(&n2).unwrap().daemon.kill();
    let s = rig.submit();
    let logs = || rig.logs(&s);
    rig.slurm
        .wait_nodes("drained", std::slice::from_ref(&n2), T_JOB);
    let hooks = read(&rig.dir().join("hooks.log"));
    assert!(
        hooks.contains(&format!("prolog node={n2}"))
            && hooks.contains("nobody listens on the ckpt-agent control socket"),
        "{}",
        logs()
    );
    let node = rig.slurm.run("scontrol", &["show", "node", "-o", &n2]);
    assert!(node.to_lowercase().contains("prolog"), "reason: {node}");
    // Requeued held (after its epilogs): nothing of it ran.
    rig.slurm
        .wait_job(s.id, "requeued, held", T_JOB, &|st| st == "PENDING");
    let reason = rig.slurm.job_field(s.id, "Reason").unwrap_or_default();
    assert!(
        reason.to_lowercase().contains("held"),
        "reason {reason:?}\n{}",
        logs()
    );
    assert!(!rig.server_out().exists(), "{}", logs());
}

// ---------------------------------------------------------------------------
// The harness of a crashed test run is swept.

/// Does nothing in a normal run. With `CKS_HELPER=crash`: builds a
/// 2-node cluster with a Slurm on it, prints `HELPER DIR <slurm dir>
/// <cluster prefix> <ns ids>` and waits to be SIGKILLed.
#[test]
fn slurm_helper() {
    let Ok(mode) = std::env::var("CKS_HELPER") else {
        return;
    };
    assert_eq!(mode, "crash", "unknown CKS_HELPER mode");
    let c = TestCluster::new(2);
    let s = Slurm::start(&c, &SlurmOpts::default());
    let ids: Vec<String> = c.namespace_ids().iter().map(|i| i.encode()).collect();
    println!(
        "HELPER DIR {} {} {}",
        s.dir.display(),
        c.prefix(),
        ids.join(",")
    );
    loop {
        sleep(Duration::from_secs(1));
    }
}

#[test]
fn the_slurm_of_a_killed_test_run_is_swept() {
    let name = "the_slurm_of_a_killed_test_run_is_swept";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Slurm]) {
        return;
    }
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args(["slurm_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env("CKS_HELPER", "crash")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(i) = l.find("HELPER DIR ") {
                let _ = tx.send(l[i + 11..].to_owned());
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(60));
    let got = match got {
        Ok(g) => g,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the helper printed no DIR line: {e}");
        }
    };
    let mut it = got.split_whitespace();
    let dir = PathBuf::from(it.next().unwrap());
    let prefix = it.next().unwrap().to_owned();
    let ids: Vec<ckpt_e2e::cluster::NsId> = it
        .next()
        .unwrap()
        .split(',')
        .map(|i| ckpt_e2e::cluster::NsId::decode(i).unwrap())
        .collect();
    let guard = TestCluster::sweep_lock();
    child.kill().unwrap();
    child.wait().unwrap();
    // munged (a child of the killed run) and the daemons outlive it.
    let before = Slurm::leftovers(&dir);
    assert!(
        before.iter().any(|l| l.contains("munged"))
            && before.iter().any(|l| l.contains("slurmctld")),
        "{before:#?}"
    );
    let swept = Slurm::sweep_stale();
    let dname = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(swept.contains(&dname), "{swept:?} lacks {dname}");
    TestCluster::sweep_stale_with(&guard);
    drop(guard);
    let left = Slurm::leftovers(&dir);
    assert!(left.is_empty(), "after the sweep: {left:?}");
    assert!(!dir.exists(), "{} not removed", dir.display());
    let left = leftovers(&prefix, &ids);
    assert!(left.is_empty(), "cluster after the sweep: {left:?}");
}

#[test]
fn a_non_root_users_job_is_theirs_through_checkpoint_requeue_and_restart() {
    let name = "a_non_root_users_job_is_theirs_through_checkpoint_requeue_and_restart";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    const NOBODY: u32 = 65534;
    const OTHER: u32 = 65533;
    let reference = reference_thread();
    let rig = Rig::new(3);
    let s = rig.submit_as(Some(NOBODY));
    let logs = || rig.logs(&s);
    assert_eq!(
        rig.slurm.job_field(s.id, "UserId").unwrap_or_default(),
        format!("nobody({NOBODY})"),
        "{}",
        logs()
    );
    wait_until("step 5", T_JOB, &logs, &|| {
        last_step(&read(&rig.server_out())) >= 5
    });
    // Both ends run as nobody, on their nodes.
    for i in [1, 2] {
        let pids: Vec<i32> = rig
            .cluster
            .node(i)
            .pids()
            .into_iter()
            .filter(|p| {
                // The programs themselves (argv[0]), not their parents.
                fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .is_some_and(|a| a.ends_with(b"/tcp_pair"))
                })
            })
            .collect();
        assert!(!pids.is_empty(), "no tcp_pair on node {i}\n{}", logs());
        for p in pids {
            assert_eq!(ckpt_e2e::proc_uid(p), Some(NOBODY), "pid {p} on node {i}");
        }
    }
    // Another user may neither checkpoint nor see the job.
    let ckpt = bin_dir().join("ckpt-job");
    for args in [vec!["checkpoint", "--stop"], vec!["status"]] {
        let mut c = ckpt_e2e::as_user(OTHER, OTHER, &ckpt);
        c.arg("--config").arg(&rig.cfg).args(&args).arg(&s.job);
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(
            !out.status.success(),
            "uid {OTHER} `ckpt-job {args:?}` of nobody's job succeeded:\n{}",
            text(&out.stdout)
        );
    }
    rig.usr1_requeue_restart(&s, reference.join().unwrap());
    // The images are nobody's, and private.
    let jobdir = rig.d.images.join(&s.job);
    let m = fs::metadata(&jobdir).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.uid(), NOBODY, "{} owner", jobdir.display());
    assert_eq!(
        m.mode() & 0o077,
        0,
        "{} mode {:o}",
        jobdir.display(),
        m.mode()
    );
    let mut ls = ckpt_e2e::as_user(OTHER, OTHER, Path::new("/bin/ls"));
    ls.arg(&jobdir);
    let out = run_with_timeout(ls, Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "uid {OTHER} can list {}",
        jobdir.display()
    );
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2]);
}

/// Committed epochs of `job` in the image directory (with a MANIFEST).
fn committed_epochs(images: &Path, job: &str) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(images.join(job))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("MANIFEST").is_file())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

#[test]
fn submit_interval_checkpoints_periodically_before_and_after_the_requeue() {
    let name = "submit_interval_checkpoints_periodically_before_and_after_the_requeue";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let reference = reference_thread();
    let rig = Rig::new(3);
    let s = rig.submit_opts(None, &["--interval=1s", "--keep=2"]);
    let logs = || rig.logs(&s);
    let images = rig.d.images.clone();
    // The batch side registered the schedule: epochs come without asking.
    wait_until("two periodic epochs", T_JOB, &logs, &|| {
        committed_epochs(&images, &s.job).last().copied() >= Some(2)
    });
    assert!(
        result_line(&read(&rig.server_out())).is_none(),
        "finished before the stop: raise STEPS\n{}",
        logs()
    );
    rig.slurm
        .run("scancel", &["--signal=USR1", "--batch", &s.id.to_string()]);
    wait_until("the requeue", T_JOB, &logs, &|| {
        rig.slurm
            .job_field(s.id, "Restarts")
            .is_some_and(|r| r != "0")
    });
    let so = read(&rig.slurm_out(&s));
    assert!(
        so.contains("is checkpointed every 1s, keeping 2 epochs"),
        "{}",
        logs()
    );
    // Far from the walltime: the final checkpoint is taken.
    assert!(so.contains("USR1: checkpointing job"), "{}", logs());
    let stop_epoch = *committed_epochs(&images, &s.job).last().unwrap();
    // ... and after the restart the schedule is set again.
    wait_until("a periodic epoch after the restart", T_JOB, &logs, &|| {
        committed_epochs(&images, &s.job).last().copied() > Some(stop_epoch)
            || result_line(&read(&rig.server_out())).is_some()
    });
    let st = rig
        .slurm
        .wait_job(s.id, "end", Duration::from_secs(90), &done);
    assert_eq!(st, "COMPLETED", "{}", logs());
    let after = committed_epochs(&images, &s.job);
    assert!(
        after.last().copied() > Some(stop_epoch),
        "no periodic epoch after the restart (stop epoch {stop_epoch}, now {after:?})\n{}",
        logs()
    );
    // Retention keeps 2.
    wait_until("retention to keep 2", T_JOB, &logs, &|| {
        committed_epochs(&images, &s.job).len() <= 2
    });
    let so = read(&rig.slurm_out(&s));
    assert_eq!(
        so.matches("is checkpointed every 1s").count(),
        2,
        "{}",
        logs()
    );
    let (want_s, _) = reference.join().unwrap();
    assert_eq!(
        result_line(&read(&rig.server_out())),
        result_line(&want_s),
        "{}",
        logs()
    );
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2]);
}

#[test]
fn a_job_requeued_before_any_checkpoint_starts_fresh_and_says_so() {
    let name = "a_job_requeued_before_any_checkpoint_starts_fresh_and_says_so";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let reference = reference_thread();
    let rig = Rig::new(3);
    let s = rig.submit();
    let logs = || rig.logs(&s);
    wait_until("step 5", T_JOB, &logs, &|| {
        last_step(&read(&rig.server_out())) >= 5
    });
    // An admin's requeue: no checkpoint was taken.
    rig.slurm.run("scontrol", &["requeue", &s.id.to_string()]);
    let st = rig
        .slurm
        .wait_job(s.id, "end", Duration::from_secs(90), &done);
    assert_eq!(st, "COMPLETED", "{}", logs());
    let so = read(&rig.slurm_out(&s));
    assert!(
        so.contains("no committed epoch, starting fresh") && so.contains("done client=0 server=0"),
        "{}",
        logs()
    );
    // The first run's files were moved aside, and the job ran from the
    // start again: its output follows the first run's partial one.
    let moved = fs::read_dir(rig.work.join(".ckpt"))
        .unwrap()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}.old.", s.job))
        });
    assert!(
        moved,
        "the first run's files were not moved aside\n{}",
        logs()
    );
    let (want_s, _) = reference.join().unwrap();
    let got = read(&rig.server_out());
    assert_eq!(got.matches("\nstep 1 ").count(), 2, "{}", logs());
    assert_eq!(result_line(&got), result_line(&want_s), "{}", logs());
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2]);
}

#[test]
fn a_preempted_job_is_checkpointed_requeued_and_comes_back() {
    let name = "a_preempted_job_is_checkpointed_requeued_and_comes_back";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        return;
    }
    let reference = reference_thread();
    // Partition `high` preempts `test` by requeue; the preempted job gets
    // its --signal (USR1) at once and 30 s of grace.
    let rig = Rig::with(3, |c, o| {
        let nodes = format!("{},{}", c.node(1).hostname(), c.node(2).hostname());
        o.extra = format!(
            "PreemptType=preempt/partition_prio\nPreemptMode=REQUEUE\n\
             PartitionName=high Nodes={nodes} PriorityTier=10 PreemptMode=OFF State=UP\n"
        );
        o.partition_extra = "PriorityTier=1 GraceTime=30".into();
        o.extra
            .push_str("SlurmctldParameters=preempt_send_user_signal\n");
    });
    let s = rig.submit();
    let logs = || rig.logs(&s);
    let s_out = rig.server_out();
    wait_until("step 10", T_JOB, &logs, &|| last_step(&read(&s_out)) >= 10);
    let hi_out = rig.work.join("high.out");
    let hi = rig.slurm.sbatch(&[
        "-p",
        "high",
        "-N2",
        "-o",
        hi_out.to_str().unwrap(),
        "--wrap",
        "echo high ran on $(hostname)",
    ]);
    let st = rig
        .slurm
        .wait_job(hi, "end", Duration::from_secs(60), &done);
    assert_eq!(st, "COMPLETED", "high-priority job\n{}", logs());
    assert!(
        result_line(&read(&s_out)).is_none(),
        "the preempted job finished anyway: raise STEPS\n{}",
        logs()
    );
    let st = rig
        .slurm
        .wait_job(s.id, "end", Duration::from_secs(90), &done);
    assert_eq!(st, "COMPLETED", "{}", logs());
    let (want_s, want_c) = reference.join().unwrap();
    let strip = |s: &str| -> String {
        s.lines()
            .filter(|l| !l.starts_with("listening "))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_eq!(
        strip(&read(&s_out)),
        strip(&want_s),
        "server output\n{}",
        logs()
    );
    assert_eq!(
        strip(&read(&rig.work.join("client.out"))),
        strip(&want_c),
        "client output\n{}",
        logs()
    );
    let so = read(&rig.slurm_out(&s));
    assert!(
        so.contains("USR1: checkpointing job") && so.contains("restarting from its newest epoch"),
        "{}",
        logs()
    );
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2]);
}

/// Open MPI over the allocation: 2 ranks per node, TCP between the nodes
/// on the job network only (mpirun starts the second node's orted through
/// `ckpt-job rsh`).
const MPI_SH: &str = r#"#!/bin/sh
#SBATCH -N 2
ring=$1 work=$2 steps=$3
set -- $CKPT_SLURM_NODES
exec mpirun.openmpi --allow-run-as-root --oversubscribe -np 4 --host "$1:2,$2:2" \
    --mca btl self,vader,tcp --mca btl_tcp_if_include 10.79.0.0/16 \
    --mca oob_tcp_if_include 10.79.0.0/16 "$ring" "$work" "$steps"
"#;
const MPI_STEPS: &str = "60";

/// Open MPI under Slurm: mpirun and orted would give every local rank a
/// pty, whose index is machine-wide on this one-machine test cluster; the
/// agents ban ptys in their trees (devices cgroup), so the ranks use pipes
/// and two trees restoring at once cannot take each other's indices.
#[test]
fn an_open_mpi_job_is_checkpointed_requeued_and_restarted_on_another_node() {
    let name = "an_open_mpi_job_is_checkpointed_requeued_and_restarted_on_another_node";
    if !require_cluster(name)
        || !require(
            name,
            &[Prereq::Root, Prereq::Criu, Prereq::Slurm, Prereq::OpenMpi],
        )
    {
        return;
    }
    let ring = example("ring-openmpi");
    // Uninterrupted, 4 ranks on this machine (the ring's output does not
    // depend on where the ranks run).
    let rig = Rig::new(4);
    let ref_work = rig.dir().join("ref.work");
    fs::create_dir_all(&ref_work).unwrap();
    let mut c = Command::new("mpirun.openmpi");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", "4"])
        .arg(&ring)
        .arg(&ref_work)
        .arg(MPI_STEPS)
        .stdin(Stdio::null());
    let reference = run_with_timeout(c, Duration::from_secs(60));
    assert!(
        reference.status.success(),
        "reference: {}",
        text(&reference.stderr)
    );
    let expected = text(&reference.stdout);
    assert!(result_line(&expected).is_some(), "reference: {expected}");

    let script = rig.dir().join("mpi.sh");
    fs::write(&script, MPI_SH).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let job_work = rig.work.join("ring");
    fs::create_dir_all(&job_work).unwrap();
    let s = rig.submit_script(
        None,
        &[],
        &script,
        &[
            ring.into_os_string(),
            job_work.into_os_string(),
            MPI_STEPS.into(),
        ],
    );
    let out = rig
        .work
        .join(".ckpt")
        .join(&s.job)
        .join("main")
        .join("stdout");
    let logs = || format!("--- job stdout:\n{}\n{}", read(&out), rig.logs(&s));
    wait_until("step 10", T_JOB, &logs, &|| last_step(&read(&out)) >= 10);
    let (n1, n2, n3) = (
        rig.cluster.node(1),
        rig.cluster.node(2),
        rig.cluster.node(3),
    );
    rig.slurm.run(
        "scontrol",
        &[
            "update",
            &format!("NodeName={}", n2.hostname()),
            "State=DRAIN",
            "Reason=ckpt-test",
        ],
    );
    rig.slurm
        .run("scancel", &["--signal=USR1", "--batch", &s.id.to_string()]);
    wait_until("the requeue", T_JOB, &logs, &|| {
        rig.slurm
            .job_field(s.id, "Restarts")
            .is_some_and(|r| r != "0")
    });
    assert!(
        result_line(&read(&out)).is_none(),
        "finished before the stop\n{}",
        logs()
    );
    let st = rig
        .slurm
        .wait_job(s.id, "end", Duration::from_secs(90), &done);
    assert_eq!(st, "COMPLETED", "{}", logs());
    assert_eq!(
        read(&out),
        expected,
        "output differs from an uninterrupted run\n{}",
        logs()
    );
    let so = read(&rig.slurm_out(&s));
    assert!(
        so.contains(&format!("{}={}", n2.hostname(), n3.hostname()))
            && so.contains(&format!("{}={}", n1.hostname(), n1.hostname())),
        "placement n1=n1,n2=n3 not used\n{}",
        logs()
    );
    rig.wait_epilogs(&s, 4);
    rig.assert_clean(&s, &[1, 2, 3]);
}

#[test]
fn submit_refuses_bad_input_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("job.sh");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    let submit = |args: &[&str]| {
        let mut c = Command::new(bin_dir().join("ckpt-job"));
        c.arg("submit").args(args).stdin(Stdio::null());
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(!out.status.success(), "submit {args:?} succeeded");
        text(&out.stderr)
    };
    let s = script.to_str().unwrap();
    let e = submit(&["--grace", "5s", s]);
    assert!(
        e.contains("--grace 5s") && e.contains("10s to 65535s"),
        "{e}"
    );
    let e = submit(&["-N", "2", s]);
    assert!(
        e.contains("not an executable file") && e.contains("job.sh"),
        "{e}"
    );
    let e = submit(&["-N2", "/nonexistent/job.sh"]);
    assert!(e.contains("/nonexistent/job.sh"), "{e}");
    let e = submit(&["--signal=USR2@30", s]);
    assert!(e.contains("--signal") && e.contains("--grace"), "{e}");
    let e = submit(&["-N"]);
    assert!(e.contains("-N needs a value"), "{e}");
    // slurm-run outside Slurm.
    let mut c = Command::new(bin_dir().join("ckpt-job"));
    c.args(["slurm-run", "--", "true"])
        .env_remove("SLURM_JOB_ID")
        .stdin(Stdio::null());
    let out = run_with_timeout(c, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("SLURM_JOB_ID"),
        "{}",
        text(&out.stderr)
    );
}
