//! Control-path cost of a coordinated checkpoint with many simulated agents
//! over real loopback TCP, in one process.
//!
//! The coordinator (`ckpt_coordinator::daemon`) and N simulated agents
//! (`daemon::sim`) run in two tokio runtimes of this process; every agent
//! has its own TCP connection, did the authenticated handshake, sends
//! heartbeats, and answers PREPARE/DUMP/COMMIT like an agent without CRIU
//! (DUMPED carries a one-tree image with two file digests). Each epoch is a
//! whole continue-mode epoch through the public API, with the manifest
//! encoded and MAC'd in memory (no disk).
//!
//! Reported per N, over the measured epochs (p50 / p99, ms):
//! - barrier round trip: PREPARE handed to the sessions → last READY taken
//!   by the state machine (`Outcome::timings.prepare`);
//! - full control path: `Coordinator::checkpoint` called → `Outcome`
//!   returned (PREPARE, READY, DUMP, DUMPED, COMMIT, RESUMED, FLUSHED,
//!   manifest commit, COMMITTED).
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
//! (worker threads of each runtime; default 2 and 2).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::ExitCode;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_coordinator::daemon::sim::{SimAgent, SimConfig};
use ckpt_coordinator::daemon::{bind, Coordinator, CoordinatorConfig, MemoryWriter};
use ckpt_coordinator::epoch::Deadlines;
use ckpt_protocol::manifest::{CheckpointMode, Key};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

const OTHER: usize = 0;
const COORD: usize = 1;
const AGENTS: usize = 2;

thread_local! {
    static SIDE: Cell<usize> = const { Cell::new(OTHER) };
}

static LIVE: [AtomicIsize; 3] = [
    AtomicIsize::new(0),
    AtomicIsize::new(0),
    AtomicIsize::new(0),
];
static PEAK: [AtomicIsize; 3] = [
    AtomicIsize::new(0),
    AtomicIsize::new(0),
    AtomicIsize::new(0),
];

fn side() -> usize {
    // Const-initialised and without a destructor: always accessible.
    SIDE.try_with(Cell::get).unwrap_or(OTHER)
}

fn grew(bytes: usize) {
    let s = side();
    let live = LIVE[s].fetch_add(bytes as isize, Ordering::Relaxed) + bytes as isize;
    PEAK[s].fetch_max(live, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE[side()].fetch_sub(bytes as isize, Ordering::Relaxed);
}

/// Counts heap per side; the memory itself is the system allocator's.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System` upholds the GlobalAlloc contract; the counters are
// bookkeeping only (atomics and a const thread-local that never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (valid, non-zero-size) layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from an earlier allocation of ours;
        // `new_size` is the caller's, forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live(s: usize) -> isize {
    LIVE[s].load(Ordering::Relaxed)
}

fn reset_peak(s: usize) {
    PEAK[s].store(live(s), Ordering::Relaxed);
}

fn peak(s: usize) -> isize {
    PEAK[s].load(Ordering::Relaxed)
}

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
        .on_thread_start(move || SIDE.with(|s| s.set(side_tag)))
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

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Samples {
    barrier: Vec<Duration>,
    total: Vec<Duration>,
    api: Vec<Duration>,
    dump: Vec<Duration>,
    flush: Vec<Duration>,
    commit: Vec<Duration>,
    coord_peak: isize,
}

const WARMUP: usize = 2;
/// Pause between epochs, so COMMITTED of one epoch has reached every agent
/// before the next PREPARE (each epoch is measured alone).
const PAUSE: Duration = Duration::from_millis(50);

fn bench(
    n: usize,
    epochs: usize,
    coord_threads: usize,
    agent_threads: usize,
) -> anyhow::Result<()> {
    let key = Key::from_bytes([7; 32]);
    let coord_rt = runtime(COORD, coord_threads, "coord")?;
    let agent_rt = runtime(AGENTS, agent_threads, "agents")?;
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
                if !o.committed() {
                    bail!("epoch {} did not commit: {:?}", e + 1, o.verdict);
                }
                if e >= WARMUP {
                    s.coord_peak = s.coord_peak.max(peak(COORD) - base);
                    s.api.push(api);
                    s.total.push(o.timings.total);
                    let t = &o.timings;
                    for (v, d) in [
                        (&mut s.barrier, t.prepare),
                        (&mut s.dump, t.dump),
                        (&mut s.flush, t.flush),
                        (&mut s.commit, t.commit),
                    ] {
                        v.push(d.unwrap_or_default());
                    }
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
        "      phases p50: dump {:.2}, flush {:.2}, manifest commit {:.2}",
        pct(&mut s.dump, 0.5),
        pct(&mut s.flush, 0.5),
        pct(&mut s.commit, 0.5)
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
    for (n, epochs) in runs {
        if epochs == 0 {
            continue;
        }
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
    }
    ExitCode::SUCCESS
}
