//! Control-path cost of the coordinator's epoch state machine with many
//! simulated agents, in one process.
//!
//! This is only the pure-logic part of the barrier benchmark: no
//! sockets, no framing or prost decoding, no CRIU, no disk. It drives
//! `ckpt_coordinator::epoch::Epoch` through whole continue-mode epochs
//! (PREPARE, N×READY, DUMP, N×DUMPED, COMMIT, N×RESUMED, N×FLUSHED, manifest,
//! commit, COMMITTED) with the agents' replies in random order, and measures
//! heap with a counting global allocator.
//!
//! Usage: `ckpt-bench-barrier [EPOCHS_FOR_1000] [EPOCHS_FOR_10000]`
//! (release build: `cargo run --release -p ckpt-coordinator --bin ckpt-bench-barrier`).

mod bench_support;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_support::{pct, OTHER};
use ckpt_coordinator::epoch::{
    Action, AgentMsg, Command, Deadlines, Epoch, EpochSpec, Event, NodeDump, NodeId, Roster,
};
use ckpt_protocol::manifest::{
    CheckpointMode, FileDigest, Key, NetMode, NodeImage, Timings, TreeImage,
};

/// Heap live now (one thread: everything is booked to `OTHER`).
fn live() -> usize {
    bench_support::live(OTHER).max(0) as usize
}

/// Resets the peak to the current live size, which it returns.
fn reset_peak() -> usize {
    bench_support::reset_peak(OTHER).max(0) as usize
}

fn peak() -> usize {
    bench_support::peak(OTHER).max(0) as usize
}

/// splitmix64, for shuffling reply orders.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn shuffle(&mut self, v: &mut [u32]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// What a node's DUMPED carries: one tree, a meta pack, a page image.
fn payload(node: &str, hex: &str) -> Box<NodeDump> {
    let meta = format!("{node}.t0.meta.pack");
    let pages = format!("{node}.t0.pages-1.img");
    let digest = |name: &String| FileDigest {
        name: name.clone(),
        size: 1 << 30,
        blake3: hex.to_owned(),
    };
    Box::new(NodeDump {
        image: NodeImage {
            node: node.to_owned(),
            ranks: vec![0, 1],
            drained: Vec::new(),
            trees: vec![TreeImage {
                id: 0,
                root_pid: 1,
                net: NetMode::Private { key: "net0".into() },
                stdio: Vec::new(),
                writable_files: Vec::new(),
                captured: Vec::new(),
                meta_pack: meta.clone(),
                pages: vec![pages.clone()],
                local_pack: None,
                init_dir: None,
                init_binary: None,
            }],
            files: vec![digest(&meta), digest(&pages)],
        },
        criu_version: "4.1.1".into(),
        timings: Timings::default(),
    })
}

#[derive(Default)]
struct Samples {
    barrier: Vec<Duration>,
    control: Vec<Duration>,
    encode: Vec<Duration>,
    total: Vec<Duration>,
}

struct Memory {
    roster: usize,
    machine: usize,
    machine_peak: usize,
    payload: usize,
    encode_peak: usize,
    manifest_bytes: usize,
}

fn fail(n: usize, what: &str) -> String {
    format!("{n} agents: {what}")
}

fn bench(n: usize, epochs: usize, rng: &mut Rng) -> Result<(Samples, Memory), String> {
    let names: Vec<String> = (0..n).map(|i| format!("node{i:05}")).collect();
    let base = live();
    let roster = Arc::new(Roster::new(names.iter().cloned()).map_err(|e| e.to_string())?);
    let roster_bytes = live() - base;
    let key = Key::from_bytes([7; 32]);
    let hex = "ab".repeat(32);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut out = Vec::with_capacity(4);
    let mut samples = Samples::default();
    let mut mem = Memory {
        roster: roster_bytes,
        machine: 0,
        machine_peak: 0,
        payload: 0,
        encode_peak: 0,
        manifest_bytes: 0,
    };
    for e in 0..epochs {
        let epoch = e as u64 + 1;
        // The agents' side, built before the clock starts.
        let before = live();
        // DUMPED carries the image, FLUSHED its digests.
        let mut digests = Vec::with_capacity(names.len());
        let mut payloads: Vec<Option<Box<NodeDump>>> = names
            .iter()
            .map(|nm| {
                let mut p = payload(nm, &hex);
                digests.push(Some(std::mem::take(&mut p.image.files)));
                Some(p)
            })
            .collect();
        mem.payload = (live() - before) / n;
        rng.shuffle(&mut order);
        let spec = EpochSpec {
            job: "bench".into(),
            epoch,
            mode: CheckpointMode::Continue,
            owner_uid: 1000,
            owner_gid: 1000,
            command: vec!["mpirun".into(), "./app".into()],
            cwd: "/home/u".into(),
            created_unix: 1_700_000_000,
            deadlines: Deadlines::default(),
        };

        let base = reset_peak();
        let t0 = Instant::now();
        out.clear();
        let mut ep = Epoch::begin(spec, roster.clone(), t0, &mut out)
            .map_err(|e| fail(n, &e.to_string()))?;
        mem.machine = mem.machine.max(live() - base);
        let feed = |ep: &mut Epoch, out: &mut Vec<Action>, node: u32, msg: AgentMsg| {
            out.clear();
            let ev = Event::Agent {
                node: NodeId(node),
                epoch,
                msg,
            };
            let _ = ep.handle(Instant::now(), ev, out);
        };
        for &i in &order {
            feed(&mut ep, &mut out, i, AgentMsg::Ready);
        }
        if !matches!(
            out.as_slice(),
            [Action::Broadcast {
                command: Command::Dump,
                ..
            }]
        ) {
            return Err(fail(n, "no DUMP after the last READY"));
        }
        let t_barrier = Instant::now();
        for &i in order.iter().rev() {
            let Some(p) = payloads[i as usize].take() else {
                return Err(fail(n, "payload used twice"));
            };
            feed(&mut ep, &mut out, i, AgentMsg::Dumped(p));
        }
        for &i in &order {
            let downtime = Duration::from_millis(1);
            feed(&mut ep, &mut out, i, AgentMsg::Resumed { downtime });
        }
        for &i in order.iter().rev() {
            let Some(files) = digests[i as usize].take() else {
                return Err(fail(n, "digests used twice"));
            };
            feed(&mut ep, &mut out, i, AgentMsg::Flushed { files });
        }
        let manifest = match out.pop() {
            Some(Action::WriteManifest(m)) => m,
            other => return Err(fail(n, &format!("expected the manifest, got {other:?}"))),
        };
        let t_manifest = Instant::now();
        let peak_machine = peak() - base;
        let encoded = manifest.encode(&key);
        let t_encoded = Instant::now();
        mem.encode_peak = mem.encode_peak.max(peak() - base);
        mem.manifest_bytes = encoded.len();
        out.clear();
        let _ = ep.handle(Instant::now(), Event::CommitSucceeded, &mut out);
        let t_end = Instant::now();
        match out.last() {
            Some(Action::Done(o)) if o.committed() => {}
            other => return Err(fail(n, &format!("epoch did not commit: {other:?}"))),
        }
        mem.machine_peak = mem.machine_peak.max(peak_machine);
        let encode = t_encoded - t_manifest;
        samples.barrier.push(t_barrier - t0);
        samples.control.push(t_end - t0 - encode);
        samples.encode.push(encode);
        samples.total.push(t_end - t0);
        drop((ep, manifest, encoded));
    }
    Ok((samples, mem))
}

fn main() -> ExitCode {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or(0))
        .collect();
    let runs = [
        (1_000, args.first().copied().unwrap_or(400)),
        (10_000, args.get(1).copied().unwrap_or(100)),
    ];
    println!("ckpt-bench-barrier: the epoch state machine alone, in one process.");
    println!("NOT measured here: sockets, framing, prost decoding, heartbeats, CRIU, disk.");
    println!("One epoch = PREPARE, N READY, DUMP, N DUMPED, COMMIT, N RESUMED, N FLUSHED,");
    println!("manifest built and encoded (JSON + keyed BLAKE3 MAC, in memory), COMMITTED.");
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; use --release for figures.");
    }
    let mut rng = Rng(0x5eed);
    for (n, epochs) in runs {
        if epochs == 0 {
            continue;
        }
        let (mut s, m) = match bench(n, epochs, &mut rng) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("ckpt-bench-barrier: {e}");
                return ExitCode::FAILURE;
            }
        };
        let events = 4 * n;
        let ns_per_event = pct(&mut s.control, 0.5) * 1e6 / events as f64;
        println!();
        println!("{n} agents, {epochs} epochs (ms, p50 / p99):");
        println!(
            "  barrier (PREPARE .. last READY -> DUMP):  {:8.3} / {:8.3}",
            pct(&mut s.barrier, 0.5),
            pct(&mut s.barrier, 0.99)
        );
        println!(
            "  state machine, whole epoch:               {:8.3} / {:8.3}   ({ns_per_event:.0} ns per agent event)",
            pct(&mut s.control, 0.5),
            pct(&mut s.control, 0.99)
        );
        println!(
            "  manifest encode + MAC ({:.1} MiB):         {:8.3} / {:8.3}",
            m.manifest_bytes as f64 / (1 << 20) as f64,
            pct(&mut s.encode, 0.5),
            pct(&mut s.encode, 0.99)
        );
        println!(
            "  full control path (both):                 {:8.3} / {:8.3}",
            pct(&mut s.total, 0.5),
            pct(&mut s.total, 0.99)
        );
        let per = |b: usize| b as f64 / n as f64;
        println!("  heap per agent (bytes):");
        println!(
            "    roster (per job, name -> id):          {:8.0}",
            per(m.roster)
        );
        println!(
            "    epoch state at begin:                  {:8.0}",
            per(m.machine)
        );
        println!(
            "    epoch peak, excluding DUMPED payloads: {:8.0}   (state + manifest node list)",
            per(m.machine_peak)
        );
        println!(
            "    DUMPED payload held until the manifest: {:7}   (an agent's image record; size varies)",
            m.payload
        );
        println!(
            "    peak incl. manifest encoding:          {:8.0}",
            per(m.encode_peak)
        );
        println!(
            "    total (roster + peak + payload):       {:8.0}   = {:.2} KiB (target < 20 KiB)",
            per(m.roster) + per(m.encode_peak) + m.payload as f64,
            (per(m.roster) + per(m.encode_peak) + m.payload as f64) / 1024.0
        );
    }
    ExitCode::SUCCESS
}
