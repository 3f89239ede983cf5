//! Control-path cost of a coordinated checkpoint with many simulated agents
//! over real loopback TCP, in one process.
//!
//! The coordinator (`ckpt_coordinator::daemon`) and N simulated agents
//! (`daemon::sim`) run in two tokio runtimes of this process; every agent
//! has its own TCP connection, did the authenticated handshake, sends
//! heartbeats, and answers PREPARE/DUMP/COMMIT like an agent without CRIU
//! (DUMPED carries a one-tree image, FLUSHED right after it its two file
//! digests). Each epoch is a
//! whole continue-mode epoch through the public API, with the manifest
//! encoded and MAC'd in memory (no disk).
//!
//! Reported per N, over the measured epochs (p50 / p99, ms):
//! - barrier round trip: PREPARE handed to the sessions → last READY taken
//!   by the state machine (`Outcome::timings.prepare`);
//! - full control path: `Coordinator::checkpoint` called → `Outcome`
//!   returned (PREPARE, READY, DUMP, DUMPED + FLUSHED, then COMMIT/RESUMED
//!   overlapping the manifest commit, COMMITTED): request → committed and
//!   every tree resumed;
//! - request → committed: the state machine's total minus its wait for the
//!   RESUMED still missing at the commit (`Outcome::timings.finish`).
//!
//! Each epoch is measured alone: the next starts once every agent took the
//! last COMMITTED, plus a pause. Where the time goes, per epoch (p50):
//! CPU time of the whole process and of the coordinator's threads (read
//! from `/proc/self/task/*/schedstat`; the rest is the simulated agents';
//! on loopback a sender's `write` also runs the receiver's TCP input, so
//! the kernel's share splits roughly evenly), and the TCP segments sent in
//! this network namespace per agent (data frames and bare ACKs; other
//! traffic in the namespace counts too).
//!
//! Then, per N, the manifest commit alone as the real daemon does it
//! ([`StoreWriter`] into an image store under `$CKPT_BENCH_DIR`, default
//! `/var/tmp`: validation, a stat of every image file, JSON + MAC, write,
//! fsync, rename), which the epochs above replace with an in-memory encode.
//!
//! Memory: a counting global allocator keeps live/peak heap per "side": each
//! runtime tags its threads (worker and blocking threads, via
//! `on_thread_start`) and an allocation or free is booked to the side of the
//! thread doing it. Coordinator and agents share no heap objects (they only
//! talk through sockets), so the books separate cleanly; the benchmark's
//! driver runs as a task of the coordinator's runtime and its small samples
//! vectors are booked there (negligible). Kernel socket buffers are not heap
//! and not counted; RSS is printed for the whole process.
//!
//! Usage: `ckpt-bench-control [EPOCHS_FOR_1000] [EPOCHS_FOR_10000]`
//! (release: `cargo run --release -p ckpt-coordinator --bin ckpt-bench-control`).
//! Environment: `CKPT_BENCH_COORD_THREADS`, `CKPT_BENCH_AGENT_THREADS`
//! (worker threads of each runtime; default 2 and 2),
//! `CKPT_BENCH_MANIFEST_REPS` (manifest commits per N, default 3; 0: none),
//! `CKPT_BENCH_DIR` (where those go).

mod bench_support;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bench_support::{
    live, pct, pct_count, peak, reset_peak, rss_kib, tag_thread, tcp_out_segments, thread_cpu,
};
use ckpt_coordinator::daemon::sim::{fake_image, SimAgent, SimConfig, SimStats};
use ckpt_coordinator::daemon::{
    bind, Coordinator, CoordinatorConfig, ManifestWriter, MemoryWriter, StoreWriter,
};
use ckpt_coordinator::epoch::Deadlines;
use ckpt_coordinator::store::ImageStore;
use ckpt_protocol::cluster::node_image_from_wire;
use ckpt_protocol::manifest::{CheckpointMode, Key, Manifest, Timings, FORMAT_VERSION};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Heap sides (see `bench_support`): the coordinator's runtime, the agents'.
const COORD: usize = 1;
const AGENTS: usize = 2;
/// Thread names of the two runtimes (per-side CPU time is read by name).
const COORD_THREADS: &str = "coord";
const AGENT_THREADS: &str = "agents";

/// Descriptors per agent in this process: both ends of its connection.
const FDS_PER_AGENT: u64 = 2;
/// Descriptors for everything else: what is open at start (stdio) plus two
/// runtimes' epoll and eventfd, the listener, /proc reads; a dozen in
/// practice, so this is ample.
const FD_RESERVE: u64 = 64;

/// Raises RLIMIT_NOFILE's soft limit to the hard limit, and the hard limit
/// too if it is below `want` and we may (CAP_SYS_RESOURCE). Returns the
/// soft limit in force.
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(NOFILE)")?;
    println!("RLIMIT_NOFILE: soft {soft}, hard {hard}; {want} wanted for the largest run");
    if hard < want {
        match setrlimit(Resource::RLIMIT_NOFILE, want, want) {
            Ok(()) => {
                println!("  raised soft and hard to {want} (allowed: CAP_SYS_RESOURCE)");
                return Ok(want);
            }
            Err(e) => println!("  cannot raise the hard limit to {want}: {e}"),
        }
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(NOFILE)")?;
        println!("  raised soft to the hard limit {hard}");
    }
    Ok(hard)
}

fn runtime(side_tag: usize, threads: usize, name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .on_thread_start(move || tag_thread(side_tag))
        .enable_all()
        .build()
        .with_context(|| format!("building the {name} runtime"))
}

fn env_threads(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

#[derive(Default)]
struct Samples {
    barrier: Vec<Duration>,
    total: Vec<Duration>,
    /// Begin → commit result (before waiting for the last RESUMED).
    committed: Vec<Duration>,
    finish: Vec<Duration>,
    api: Vec<Duration>,
    dump: Vec<Duration>,
    flush: Vec<Duration>,
    commit: Vec<Duration>,
    coord_peak: isize,
    /// CPU time of the whole process (both sides) per epoch.
    cpu: Vec<Duration>,
    /// CPU time of the coordinator's threads per epoch.
    coord_cpu: Vec<Duration>,
    /// TCP segments sent in this network namespace per epoch (data and
    /// pure ACKs, both directions).
    segments: Vec<u64>,
}

const WARMUP: usize = 2;
/// Each epoch is measured alone: the next PREPARE goes out only once every
/// agent has taken the last epoch's COMMITTED (it is broadcast as the
/// epoch completes, after the measurement), and then after this pause for
/// the kernel's delayed ACKs of that broadcast (40 ms on Linux).
const PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for every agent to take COMMITTED.
const COMMITTED_WAIT: Duration = Duration::from_secs(10);

fn bench(
    n: usize,
    epochs: usize,
    coord_threads: usize,
    agent_threads: usize,
) -> anyhow::Result<()> {
    let key = Key::from_bytes([7; 32]);
    let coord_rt = runtime(COORD, coord_threads, COORD_THREADS)?;
    let agent_rt = runtime(AGENTS, agent_threads, AGENT_THREADS)?;
    let (c0, a0) = (live(COORD), live(AGENTS));

    let coordinator = {
        let key = key.clone();
        coord_rt.block_on(coord_rt.spawn(async move {
            let listener = bind("127.0.0.1:0".parse()?, 4096)?;
            let writer = Arc::new(MemoryWriter::encoding(key.clone()));
            let config = CoordinatorConfig::default();
            anyhow::Ok(Coordinator::start(listener, key, config, writer)?)
        }))??
    };
    let addr = coordinator.local_addr();
    let c_started = live(COORD);

    let t_connect = Instant::now();
    let agents: Vec<SimAgent> = agent_rt.block_on(agent_rt.spawn(async move {
        const PARALLEL: usize = 500;
        let mut agents = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let batch: Vec<_> = (i..(i + PARALLEL).min(n))
                .map(|k| {
                    let cfg = SimConfig::new(format!("node{k:05}"), key.clone());
                    tokio::spawn(SimAgent::connect(addr, cfg))
                })
                .collect();
            for h in batch {
                agents.push(h.await??);
            }
            i += PARALLEL;
        }
        anyhow::Ok(agents)
    }))??;
    let names: Vec<String> = agents.iter().map(|a| a.node.clone()).collect();
    let stats: Vec<Arc<SimStats>> = agents.iter().map(|a| a.stats.clone()).collect();
    let connected = {
        let c = coordinator.clone();
        coord_rt.block_on(coord_rt.spawn(async move {
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                let k = c.nodes().await.len();
                if k == n || Instant::now() > until {
                    return k;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }))?
    };
    if connected != n {
        bail!("only {connected} of {n} agents registered");
    }
    let connect_time = t_connect.elapsed();
    // Let every session settle (first heartbeats both ways).
    std::thread::sleep(Duration::from_millis(2500));
    let c_idle = live(COORD);
    let a_idle = live(AGENTS);

    let samples = {
        let c = coordinator.clone();
        coord_rt.block_on(coord_rt.spawn(async move {
            let mut s = Samples::default();
            for e in 0..(epochs + WARMUP) {
                let base = live(COORD);
                reset_peak(COORD);
                let (cpu0, segs0) = (thread_cpu(None), tcp_out_segments());
                let coord0 = thread_cpu(Some(COORD_THREADS));
                let t0 = Instant::now();
                let o = c
                    .checkpoint(
                        "bench",
                        e as u64 + 1,
                        CheckpointMode::Continue,
                        names.clone(),
                        Deadlines::default(),
                    )
                    .await?;
                let api = t0.elapsed();
                let (cpu1, segs1) = (thread_cpu(None), tcp_out_segments());
                let coord1 = thread_cpu(Some(COORD_THREADS));
                if !o.committed() {
                    bail!("epoch {} did not commit: {:?}", e + 1, o.verdict);
                }
                if e >= WARMUP {
                    s.coord_peak = s.coord_peak.max(peak(COORD) - base);
                    s.api.push(api);
                    if let (Some(a), Some(b)) = (cpu0, cpu1) {
                        s.cpu.push(b.saturating_sub(a));
                    }
                    if let (Some(a), Some(b)) = (coord0, coord1) {
                        s.coord_cpu.push(b.saturating_sub(a));
                    }
                    if let (Some(a), Some(b)) = (segs0, segs1) {
                        s.segments.push(b.saturating_sub(a));
                    }
                    s.total.push(o.timings.total);
                    let t = &o.timings;
                    let finish = t.finish.unwrap_or_default();
                    s.committed.push(t.total.saturating_sub(finish));
                    s.finish.push(finish);
                    for (v, d) in [
                        (&mut s.barrier, t.prepare),
                        (&mut s.dump, t.dump),
                        (&mut s.flush, t.flush),
                        (&mut s.commit, t.commit),
                    ] {
                        v.push(d.unwrap_or_default());
                    }
                }
                let until = Instant::now() + COMMITTED_WAIT;
                let done = e as u32 + 1;
                while stats.iter().any(|st| SimStats::get(&st.committed) < done) {
                    if Instant::now() > until {
                        bail!("epoch {done}: not every agent took COMMITTED within {COMMITTED_WAIT:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(PAUSE).await;
            }
            anyhow::Ok(s)
        }))??
    };
    let mut s = samples;
    let (rss, hwm) = rss_kib();

    let per = |b: isize| b as f64 / n as f64;
    println!();
    println!(
        "{n} agents over loopback TCP, {epochs} epochs (+{WARMUP} warm-up), \
         coordinator {coord_threads} + agents {agent_threads} worker threads on {} cores",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!(
        "  connect + handshake of all agents: {:.0} ms",
        connect_time.as_secs_f64() * 1e3
    );
    println!("  ms, p50 / p99:");
    println!(
        "    barrier round trip (PREPARE -> all READY):  {:8.2} / {:8.2}",
        pct(&mut s.barrier, 0.5),
        pct(&mut s.barrier, 0.99)
    );
    println!(
        "    full control path (checkpoint() -> Outcome): {:8.2} / {:8.2}",
        pct(&mut s.api, 0.5),
        pct(&mut s.api, 0.99)
    );
    println!(
        "      epoch total as the state machine saw it:  {:8.2} / {:8.2}",
        pct(&mut s.total, 0.5),
        pct(&mut s.total, 0.99)
    );
    println!(
        "      request -> committed (state machine):     {:8.2} / {:8.2}",
        pct(&mut s.committed, 0.5),
        pct(&mut s.committed, 0.99)
    );
    println!(
        "      phases p50: dump {:.2}, flush {:.2}, manifest commit {:.2}, last RESUMED after commit {:.2}",
        pct(&mut s.dump, 0.5),
        pct(&mut s.flush, 0.5),
        pct(&mut s.commit, 0.5),
        pct(&mut s.finish, 0.5)
    );
    let wall = pct(&mut s.api, 0.5);
    let cpu = pct(&mut s.cpu, 0.5);
    println!(
        "      process CPU per epoch p50: {cpu:.0} ms = {:.2} cores busy; {:.1} us per agent",
        cpu / wall,
        cpu * 1e3 / n as f64
    );
    println!(
        "        of which the coordinator's threads: {:.0} ms (the rest: simulated agents)",
        pct(&mut s.coord_cpu, 0.5)
    );
    println!(
        "      TCP segments sent per epoch per agent p50 (both sides, this netns): {:.1}",
        pct_count(&mut s.segments, 0.5) / n as f64
    );
    println!("  heap, bytes per agent:");
    println!(
        "    coordinator, idle sessions:                 {:8.0}",
        per(c_idle - c_started)
    );
    println!(
        "    coordinator, extra at the epoch peak:       {:8.0}   (epoch state, images, manifest + encoding)",
        per(s.coord_peak)
    );
    let total = per(c_idle - c_started) + per(s.coord_peak);
    println!(
        "    coordinator total at peak:                  {:8.0}   = {:.2} KiB (target < 20 KiB)",
        total,
        total / 1024.0
    );
    println!(
        "    simulated agents (not the coordinator's):   {:8.0}",
        per(a_idle - a0)
    );
    println!(
        "    coordinator fixed cost (listener, actor):  {:9} bytes",
        c_started - c0
    );
    println!("  process RSS now {rss} KiB, peak {hwm} KiB (both sides, all runs so far)");

    coord_rt.block_on(coordinator.shutdown());
    drop(agents);
    agent_rt.shutdown_timeout(Duration::from_secs(2));
    coord_rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Removes a directory tree when dropped (also when the benchmark fails).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("ckpt-bench-control: removing {}: {e}", self.0.display());
            }
        }
    }
}

/// The manifest commit of an `n`-node epoch alone, as the real daemon does
/// it: [`StoreWriter`] over an image store in `dir` (validation, a stat of
/// every image file, JSON + keyed-BLAKE3 MAC, write, fsync, rename,
/// `LATEST`). The image files exist with their manifest sizes (sparse,
/// created before the clock starts). `reps` commits.
fn manifest_commit(n: usize, reps: usize, dir: &Path) -> anyhow::Result<()> {
    let root = dir.join(format!("ckpt-bench-manifest-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(root.clone());
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let key = Key::from_bytes([7; 32]);
    let writer = StoreWriter::new(ImageStore::new(&root), key.clone());
    let images = (0..n)
        .map(|k| {
            let node = format!("node{k:05}");
            node_image_from_wire(fake_image(&node), &node)
                .with_context(|| format!("the simulated image of {node}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mut validate, mut encode, mut commit, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..reps {
        let begun = writer.begin("bench", 0, 0).context("beginning an epoch")?;
        for f in images.iter().flat_map(|i| &i.files) {
            let path = begun.dir.join(&f.name);
            std::fs::File::create(&path)
                .and_then(|file| file.set_len(f.size))
                .with_context(|| format!("creating {}", path.display()))?;
        }
        let manifest = Manifest {
            format: FORMAT_VERSION,
            job: "bench".into(),
            epoch: begun.epoch,
            created_unix: 1_700_000_000,
            owner_uid: 0,
            owner_gid: 0,
            criu_version: "4.1.1".into(),
            command: vec!["mpirun".into(), "./app".into()],
            cwd: "/".into(),
            mode: CheckpointMode::Continue,
            nodes: images.clone(),
            timings: Timings::default(),
        };
        let t = Instant::now();
        manifest.validate().context("validating the manifest")?;
        validate.push(t.elapsed());
        let t = Instant::now();
        bytes = manifest.encode(&key).len();
        encode.push(t.elapsed());
        let t = Instant::now();
        writer
            .commit(&manifest)
            .map_err(anyhow::Error::msg)
            .context("committing")?;
        commit.push(t.elapsed());
    }
    println!(
        "  manifest of {n} nodes ({:.1} MiB) alone, {reps} commits into {} (ms p50):",
        bytes as f64 / (1 << 20) as f64,
        dir.display()
    );
    println!(
        "    validation alone (names, digests, duplicates):          {:8.2}",
        pct(&mut validate, 0.5)
    );
    println!(
        "    encode + MAC alone, in memory:                          {:8.2}",
        pct(&mut encode, 0.5)
    );
    println!(
        "    StoreWriter commit (+ validation, {} stats, write, fsync, rename): {:8.2}",
        2 * n,
        pct(&mut commit, 0.5)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or(0))
        .collect();
    let runs = [
        (1_000, args.first().copied().unwrap_or(100)),
        (10_000, args.get(1).copied().unwrap_or(30)),
    ];
    let coord_threads = env_threads("CKPT_BENCH_COORD_THREADS", 2);
    let agent_threads = env_threads("CKPT_BENCH_AGENT_THREADS", 2);
    println!("ckpt-bench-control: coordinator + simulated agents over loopback TCP, one process.");
    println!("Measured: handshake'd sessions, framing, prost, heartbeats, the actor, the");
    println!("state machine, manifest encode + MAC in memory. Not measured: CRIU, disk.");
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; use --release for figures.");
    }
    let largest = runs.iter().map(|r| r.0).max().unwrap_or(0) as u64;
    let limit = match raise_nofile(largest * FDS_PER_AGENT + FD_RESERVE) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ckpt-bench-control: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let open_now = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    println!("  descriptors open at start: {open_now}; {FD_RESERVE} reserved besides the agents'");
    let fit = (limit.saturating_sub(FD_RESERVE) / FDS_PER_AGENT) as usize;
    // 0 skips the manifest measurement.
    let manifest_reps = std::env::var("CKPT_BENCH_MANIFEST_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let manifest_dir =
        std::env::var_os("CKPT_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    for (n, epochs) in runs {
        if epochs == 0 {
            continue;
        }
        let nominal = n;
        let n = if n > fit {
            println!(
                "\n{n} agents need {} descriptors; the limit is {limit}: measuring {fit} instead",
                n as u64 * FDS_PER_AGENT + FD_RESERVE
            );
            fit
        } else {
            n
        };
        if let Err(e) = bench(n, epochs, coord_threads, agent_threads) {
            eprintln!("ckpt-bench-control: {n} agents: {e:#}");
            return ExitCode::FAILURE;
        }
        if manifest_reps > 0 {
            if let Err(e) = manifest_commit(nominal, manifest_reps, &manifest_dir) {
                eprintln!("ckpt-bench-control: manifest of {nominal} nodes: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
