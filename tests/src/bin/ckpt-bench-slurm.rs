//! `ckpt-bench-slurm [MIB] [ROUNDS]`: a 2-node job under Slurm, MIB MiB
//! of touched memory per node (issue 5's benchmark). Run through
//! `scripts/bench-slurm.sh` (release binaries).
//!
//! A [`TestCluster`] of 3 nodes: slurmctld and the real
//! `ckpt-coordinator` on node 0, a slurmd and the real `ckpt-agent` on
//! nodes 1 and 2, the ckpt prolog and epilog. Each round submits a job with
//! `ckpt-job submit -N 2` whose script runs `memhog MIB` on its node and,
//! through `ckpt-job rsh`, on the other one; once both are READY:
//!
//! - **raw dump**: `criu dump --leave-running` of both trees at once, with
//!   the options ckpt uses (the tree's network namespace external), each
//!   in its node's network namespace; the slower CRIU's wall time.
//! - **raw restore**: `criu restore -d` of those images, both at once, into
//!   the running trees' network namespaces (memhog has no sockets); the
//!   slower CRIU's wall time; the copies are killed afterwards.
//! - **USR1 → requeued**: `scancel --signal=USR1 --batch` until Slurm shows
//!   the job requeued (`Restarts` ≥ 1 and not RUNNING): the batch side's
//!   stop checkpoint (committed: fsynced on disk), the trees' end, the
//!   requeue.
//! - **start → running again**: from the requeued job seen RUNNING on its
//!   new allocation until its output says `restarted from epoch` (the
//!   coordinator answers the restart once every node's tree is restored,
//!   verified and resumed).
//!
//! Before each raw dump and before the USR1: `sync` and drop caches (not
//! before the raw restore: both restores read images just written).
//! Images go to the bench directory (`BENCH_DIR`, default
//! /var/tmp/ckpt-bench-slurm: a disk, not tmpfs).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{require_cluster, Node, TestCluster};
use ckpt_e2e::daemons::{Daemons, ThawOnDrop};
use ckpt_e2e::slurm::{ckpt_setup, Slurm};
use ckpt_e2e::{bin_dir, example, require, run_with_timeout, text, Prereq};

const JOB_SH: &str = r#"#!/bin/sh
#SBATCH -N 2 -t 60
ckpt=$1 memhog=$2 work=$3 mib=$4
set -- $CKPT_SLURM_NODES
"$memhog" "$mib" 36000 >>"$work/$1.out" &
"$ckpt" rsh "$2" "$memhog" "$mib" 36000 >>"$work/$2.out"
wait
"#;

const T_WAIT: Duration = Duration::from_secs(300);

use ckpt_e2e::bench::{median, settle};
use ckpt_e2e::criu_bin as criu;

fn wait_until(what: &str, logs: &dyn Fn() -> String, ok: &mut dyn FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < T_WAIT,
            "timed out waiting for {what}\n{}",
            logs()
        );
        sleep(Duration::from_millis(50));
    }
}

/// The root (ckpt-init, PID 1 of its namespace) of each tree of `job` on
/// the node: from the agent's freezer cgroups `ckpt/agent.<node>.*.<job>.t*`.
fn tree_roots(node: &Node, job: &str) -> Vec<u32> {
    let mut roots = Vec::new();
    for base in ["/sys/fs/cgroup/ckpt", "/sys/fs/cgroup/freezer/ckpt"] {
        let Ok(rd) = fs::read_dir(base) else { continue };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !(n.starts_with(&format!("agent.{}.", node.hostname()))
                && n.contains(&format!(".{job}.t")))
            {
                continue;
            }
            let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let init = st
                    .lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .is_some_and(|v| v.split_whitespace().last() == Some("1"));
                if init {
                    roots.push(pid);
                }
            }
        }
    }
    roots
}

fn netns_inode(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino()
}

/// Runs one CRIU per (node, root) at once; returns the slowest wall time.
fn both(runs: Vec<(String, PathBuf, Command)>, log: &str) -> f64 {
    let started: Vec<(String, PathBuf, Instant, Child)> = runs
        .into_iter()
        .map(|(h, d, mut c)| {
            let t0 = Instant::now();
            let child = c.spawn().unwrap();
            (h, d, t0, child)
        })
        .collect();
    let mut slowest: f64 = 0.0;
    for (host, dir, t0, mut child) in started {
        let st = child.wait().unwrap();
        let s = t0.elapsed().as_secs_f64();
        assert!(
            st.success(),
            "raw criu on {host} failed ({st}):\n{}",
            fs::read_to_string(dir.join(log)).unwrap_or_default()
        );
        slowest = slowest.max(s);
    }
    slowest
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u32 = args.get(1).map_or(1024, |a| a.parse().expect("MIB"));
    let rounds: u32 = args.get(2).map_or(3, |a| a.parse().expect("ROUNDS"));
    let name = "ckpt-bench-slurm";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu, Prereq::Slurm]) {
        std::process::exit(1);
    }
    let base = PathBuf::from(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp/ckpt-bench-slurm".into()),
    );
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let dir = base.as_path();
    let memhog = example("memhog");
    let cluster = TestCluster::new(3);
    let thaw: Vec<ThawOnDrop> = cluster.nodes().iter().map(ThawOnDrop::new).collect();
    let d = Daemons::start(&cluster, dir, "job_network = \"10.78.0.0/16\"\n");
    let (cfg, opts) = ckpt_setup(dir, &d);
    let slurm = Slurm::start(&cluster, &opts);
    let script = dir.join("job.sh");
    fs::write(&script, JOB_SH).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let nodes = [cluster.node(1), cluster.node(2)];
    let ckpt = bin_dir().join("ckpt-job");
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "2 nodes x {mib} MiB, {rounds} rounds, images in {} (criu {}), load {}",
        dir.display(),
        criu(),
        load.trim()
    );
    let (mut rdump, mut rrest, mut requeue, mut running) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let work = dir.join(format!("work.{round}"));
        fs::create_dir_all(&work).unwrap();
        let mut c = slurm.command(ckpt.to_str().unwrap());
        c.arg("--config")
            .arg(&cfg)
            .args(["submit", "--grace", "60s", "--agent-socket"])
            .arg(format!("{}/%n.sock", dir.display()))
            .arg(format!("--output={}/slurm.out", work.display()))
            .arg(&script)
            .arg(&ckpt)
            .arg(&memhog)
            .arg(&work)
            .arg(mib.to_string())
            .current_dir(&work);
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(out.status.success(), "submit: {}", text(&out.stderr));
        let id: u32 = text(&out.stdout)
            .trim()
            .strip_prefix("Submitted batch job ")
            .and_then(|s| s.parse().ok())
            .unwrap();
        let job = format!("slurm-{}-{id}", slurm.name);
        let sout = work.join("slurm.out");
        let logs = || {
            format!(
                "--- slurm output:\n{}\n{}\n{}",
                fs::read_to_string(&sout).unwrap_or_default(),
                slurm.logs(),
                d.logs()
            )
        };
        wait_until("both memhogs READY", &logs, &mut || {
            nodes.iter().all(|n| {
                fs::read_to_string(work.join(format!("{}.out", n.hostname())))
                    .unwrap_or_default()
                    .contains("READY")
            })
        });
        let roots: Vec<(&Node, u32)> = nodes
            .iter()
            .map(|n| {
                let r = tree_roots(n, &job);
                assert_eq!(r.len(), 1, "trees of {job} on {}: {r:?}", n.hostname());
                (*n, r[0])
            })
            .collect();

        // Raw CRIU dump of both trees, then raw restore of those images.
        settle();
        let dumps = roots
            .iter()
            .map(|(n, pid)| {
                let out = dir.join(format!("raw.{}", n.hostname()));
                let _ = fs::remove_dir_all(&out);
                fs::create_dir_all(&out).unwrap();
                let mut cmd = n.command(criu());
                cmd.args(["dump", "-t", &pid.to_string(), "-D"])
                    .arg(&out)
                    .args([
                        "--leave-running",
                        "--tcp-established",
                        "--file-locks",
                        "--manage-cgroups=ignore",
                        "--ghost-limit",
                        "256M",
                        "--external",
                        &format!("net[{}]:extnet", netns_inode(*pid)),
                        "-o",
                        "dump.log",
                    ]);
                (n.hostname().to_owned(), out, cmd)
            })
            .collect();
        let dump_s = both(dumps, "dump.log");
        // No cache drop: like the requeued run's restart, which reads the
        // images its stop checkpoint has just written.
        let restores = roots
            .iter()
            .map(|(n, pid)| {
                let out = dir.join(format!("raw.{}", n.hostname()));
                let mut cmd = n.command("sh");
                cmd.arg("-c").arg(format!(
                    "exec {} restore -d -D {} --tcp-established --file-locks \
                         --manage-cgroups=ignore --pidfile {} -o restore.log \
                         --inherit-fd 'fd[9]:extnet' 9</proc/{pid}/ns/net",
                    criu(),
                    out.display(),
                    out.join("pid").display()
                ));
                (n.hostname().to_owned(), out, cmd)
            })
            .collect();
        let restore_s = both(restores, "restore.log");
        for n in &nodes {
            let out = dir.join(format!("raw.{}", n.hostname()));
            if let Ok(p) = fs::read_to_string(out.join("pid")) {
                let _ = Command::new("kill").args(["-9", p.trim()]).status();
            }
        }
        sleep(Duration::from_millis(500));
        for n in &nodes {
            let _ = fs::remove_dir_all(dir.join(format!("raw.{}", n.hostname())));
        }

        // ckpt under Slurm: USR1 -> requeued, start -> running again.
        settle();
        let t0 = Instant::now();
        slurm.run("scancel", &["--signal=USR1", "--batch", &id.to_string()]);
        wait_until("the requeue", &logs, &mut || {
            let j = slurm.job(id);
            let f = |k: &str| j.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
            f("Restarts").is_some_and(|r| r != "0") && f("JobState").is_some_and(|s| s != "RUNNING")
        });
        let rq = t0.elapsed().as_secs_f64();
        wait_until("the requeued job RUNNING", &logs, &mut || {
            slurm.job_field(id, "JobState").as_deref() == Some("RUNNING")
        });
        let t1 = Instant::now();
        wait_until("the restart", &logs, &mut || {
            fs::read_to_string(&sout)
                .unwrap_or_default()
                .contains("restarted from epoch")
        });
        let run = t1.elapsed().as_secs_f64();
        println!(
            "round {round}: raw dump {dump_s:.2} s, raw restore {restore_s:.2} s, \
             USR1 -> requeued {rq:.2} s, start -> running again {run:.2} s"
        );
        // Where the time went, from slurm-run's output.
        for l in fs::read_to_string(&sout).unwrap_or_default().lines() {
            if l.contains(" committed (downtime") || l.contains("restarted from epoch") {
                println!("  {l}");
            }
        }
        rdump.push(dump_s);
        rrest.push(restore_s);
        requeue.push(rq);
        running.push(run);
        slurm.run("scancel", &[&id.to_string()]);
        let st = slurm.wait_job(id, "end", Duration::from_secs(120), &|s| {
            !matches!(s, "RUNNING" | "PENDING" | "COMPLETING" | "REQUEUED")
        });
        assert_eq!(st, "CANCELLED", "{}", logs());
        let _ = fs::remove_dir_all(d.images.join(&job));
    }
    let (a, b, c, e) = (
        median(&mut requeue),
        median(&mut rdump),
        median(&mut running),
        median(&mut rrest),
    );
    println!();
    println!("medians over {rounds} rounds (2 nodes x {mib} MiB):");
    println!("  USR1 -> requeued (stop checkpoint, committed)  {a:8.2} s");
    println!("  raw criu dump, slowest of the 2 nodes          {b:8.2} s");
    println!(
        "  ratio                                          {:8.2}",
        a / b
    );
    println!("  requeued start -> running again                {c:8.2} s");
    println!("  raw criu restore, slowest of the 2 nodes       {e:8.2} s");
    println!(
        "  ratio                                          {:8.2}",
        c / e
    );
    drop(slurm);
    drop(d);
    drop(thaw);
    drop(cluster);
    let _ = fs::remove_dir_all(&base);
}
