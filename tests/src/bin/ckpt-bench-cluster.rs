//! `ckpt-bench-cluster [MIB] [ROUNDS]`: application downtime of a
//! coordinated checkpoint of a 2-node job vs the slowest raw `criu dump` of
//! the same trees, measured in the same run (issue: multi-node coordinated
//! checkpoint). Run through `scripts/bench-cluster.sh` (release binaries).
//!
//! A [`TestCluster`] of 3 nodes: the real `ckpt-coordinator` on node 0, the
//! real `ckpt-agent` on every node, one tree per node (1 and 2) of one job,
//! each a `memhog` with MIB MiB of touched memory. Each round, in
//! alternating order:
//!
//! - **ckpt**: one coordinated epoch in continue mode through the
//!   coordinator's control socket; the downtime is the coordinator's
//!   `downtime_seconds` (the longest time any node's tree stayed frozen,
//!   measured by each agent from its freeze to its thaw: network lock,
//!   freeze, barrier, CRIU dump, digests, commit round trip).
//! - **raw**: `criu dump --leave-running` of both trees at once, with the
//!   options ckpt uses, each in its node's network namespace; the downtime
//!   is the slower CRIU's wall time (CRIU freezes at its start and thaws
//!   at its end).
//!
//! Before every measurement: `sync` and drop caches. Images go to the bench
//! directory (`BENCH_DIR`, default /var/tmp/ckpt-bench-cluster: a disk,
//! not tmpfs); old epochs are removed after each round.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ckpt_e2e::cluster::{require_cluster, TestCluster};
use ckpt_e2e::daemons::Daemons;
use ckpt_e2e::{example, require, Prereq};

const JOB: &str = "bench";

use ckpt_e2e::bench::{median, settle};
use ckpt_e2e::criu_bin as criu;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u32 = args.get(1).map_or(1024, |a| a.parse().expect("MIB"));
    let rounds: u32 = args.get(2).map_or(5, |a| a.parse().expect("ROUNDS"));
    let name = "ckpt-bench-cluster";
    if !require_cluster(name) || !require(name, &[Prereq::Root, Prereq::Criu]) {
        std::process::exit(1);
    }
    let base = PathBuf::from(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp/ckpt-bench-cluster".into()),
    );
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let dir = base.as_path();
    let memhog = example("memhog");
    let cluster = TestCluster::new(3);
    let d = Daemons::start(&cluster, dir, "");
    let nodes = [cluster.node(1), cluster.node(2)];
    let mut roots = Vec::new();
    for n in nodes {
        let out = dir.join(format!("{}.out", n.hostname()));
        let t = d.spawn(
            n,
            JOB,
            &[
                memhog.display().to_string(),
                mib.to_string(),
                "36000".into(),
            ],
            &out,
            None,
        );
        let t0 = Instant::now();
        while !fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("READY")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "memhog on {} did not get READY:\n{}",
                n.hostname(),
                d.logs()
            );
            sleep(Duration::from_millis(100));
        }
        roots.push(t.root_pid);
    }
    println!(
        "2 nodes x {mib} MiB, {rounds} rounds, images in {} (criu {})",
        dir.display(),
        criu()
    );
    let (mut ckpt, mut raw) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            settle();
            if which == 0 {
                let done = d.checkpoint(JOB).unwrap_or_else(|e| {
                    panic!("coordinated checkpoint failed: {e:?}\n{}", d.logs())
                });
                ckpt.push(done.downtime_seconds);
                println!(
                    "round {round}: ckpt epoch {} downtime {:.3} s (total {:.3} s)",
                    done.epoch, done.downtime_seconds, done.total_seconds
                );
                // Keep the disk from filling up: only the newest epoch stays.
                let job_dir = d.images.join(JOB);
                for e in fs::read_dir(&job_dir).unwrap().flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.chars().all(|c| c.is_ascii_digit())
                        && n.parse::<u64>().ok() != Some(done.epoch)
                    {
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            } else {
                let handles: Vec<_> = nodes
                    .iter()
                    .zip(&roots)
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
                                "-o",
                                "dump.log",
                                "-v4",
                            ]);
                        let t0 = Instant::now();
                        let child = cmd.spawn().unwrap();
                        (n.hostname().to_owned(), out, t0, child)
                    })
                    .collect();
                let mut slowest: f64 = 0.0;
                for (host, out, t0, mut child) in handles {
                    let st = child.wait().unwrap();
                    let s = t0.elapsed().as_secs_f64();
                    assert!(
                        st.success(),
                        "raw criu dump on {host} failed ({st}):\n{}",
                        fs::read_to_string(out.join("dump.log")).unwrap_or_default()
                    );
                    slowest = slowest.max(s);
                    let _ = fs::remove_dir_all(&out);
                }
                raw.push(slowest);
                println!("round {round}: raw criu dump, slowest node {slowest:.3} s");
            }
        }
    }
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        for (n, a) in &d.agents {
            for l in a
                .daemon
                .log()
                .lines()
                .filter(|l| l.contains("dumped") || l.contains("ready") || l.contains("resum"))
            {
                println!("{n}: {l}");
            }
        }
    }
    let (c, r) = (median(&mut ckpt), median(&mut raw));
    println!();
    println!("median application downtime over {rounds} rounds:");
    println!("  ckpt coordinated checkpoint (2 nodes)   {c:8.3} s");
    println!("  raw criu dump, slowest of the 2 nodes   {r:8.3} s");
    println!("  ratio                                   {:8.2}", c / r);
    drop(d);
    drop(cluster);
    let _ = fs::remove_dir_all(&base);
}
