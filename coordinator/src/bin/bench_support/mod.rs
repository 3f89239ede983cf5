//! What the `ckpt-bench-*` binaries share: a counting global allocator that
//! books heap per "side" (the thread's tag), percentiles, and process and
//! kernel counters. Included by each benchmark binary as `mod bench_support;`
//! (a directory without `main.rs` is not a binary of its own).

// Each binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

/// Sides heap is booked to. Untagged threads (the main thread, tokio's
/// blocking pool of an untagged runtime) book to [`OTHER`].
pub const OTHER: usize = 0;
pub const SIDES: usize = 3;

thread_local! {
    static SIDE: Cell<usize> = const { Cell::new(OTHER) };
}

static LIVE: [AtomicIsize; SIDES] = [
    AtomicIsize::new(0),
    AtomicIsize::new(0),
    AtomicIsize::new(0),
];
static PEAK: [AtomicIsize; SIDES] = [
    AtomicIsize::new(0),
    AtomicIsize::new(0),
    AtomicIsize::new(0),
];

/// Books this thread's allocations and frees to `side` from now on (e.g.
/// from a runtime's `on_thread_start`).
pub fn tag_thread(side: usize) {
    SIDE.with(|s| s.set(side.min(SIDES - 1)));
}

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

/// Counts heap per side; the memory itself is the system allocator's. An
/// object freed by another side's thread than the one that allocated it is
/// booked there; the benchmarks keep sides that share no heap objects.
pub struct Counting;

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

/// Heap bytes live on `side` now.
pub fn live(side: usize) -> isize {
    LIVE[side].load(Ordering::Relaxed)
}

/// Restarts `side`'s peak from its live size; returns that size.
pub fn reset_peak(side: usize) -> isize {
    let l = live(side);
    PEAK[side].store(l, Ordering::Relaxed);
    l
}

/// The most heap `side` held since the last [`reset_peak`].
pub fn peak(side: usize) -> isize {
    PEAK[side].load(Ordering::Relaxed)
}

/// Index of the `p` quantile (0..=1, nearest rank) in `len` sorted values.
fn rank(len: usize, p: f64) -> usize {
    ((len as f64 * p).ceil() as usize).clamp(1, len) - 1
}

/// The `p` quantile (0..=1, nearest rank) of `v`, in milliseconds; NaN if
/// empty. Sorts `v`.
pub fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    v[rank(v.len(), p)].as_secs_f64() * 1000.0
}

/// The `p` quantile (nearest rank) of counts `v`; NaN if empty. Sorts `v`.
pub fn pct_count(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    v[rank(v.len(), p)] as f64
}

/// This process's resident set now and at its peak, KiB.
pub fn rss_kib() -> (u64, u64) {
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

/// TCP segments sent so far in this network namespace (`Tcp: OutSegs` of
/// `/proc/net/snmp`), or `None` if it cannot be read. Counts every
/// process's segments in the namespace, pure ACKs included.
pub fn tcp_out_segments() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let at = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// CPU time used so far by this process's live threads whose name
/// (`comm`) is `name`, or by all of them if `name` is `None`; from each
/// thread's `schedstat` (nanoseconds on a CPU, user and system).
pub fn thread_cpu(name: Option<&str>) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = entry.ok()?.path();
        if let Some(name) = name {
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            if comm.trim_end() != name {
                continue;
            }
        }
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            total += Duration::from_nanos(ns);
        }
    }
    Some(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // as the library's tests (lib.rs)
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(pct(&mut v, 0.5), 50.0);
        assert_eq!(pct(&mut v, 0.99), 99.0);
        assert_eq!(pct(&mut v, 1.0), 100.0);
        assert_eq!(pct(&mut v, 0.0), 1.0);
        assert!(pct(&mut [], 0.5).is_nan());
        let mut c = vec![7, 3, 5];
        assert_eq!(pct_count(&mut c, 0.5), 5.0);
        assert!(pct_count(&mut [], 0.5).is_nan());
    }

    #[test]
    fn process_counters_are_read() {
        assert!(
            tcp_out_segments().is_some(),
            "/proc/net/snmp has no Tcp OutSegs"
        );
        // Burn a little CPU so this thread's schedstat is not zero.
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(std::hint::black_box(x), 1);
        let all = thread_cpu(None).unwrap();
        assert!(all > Duration::ZERO);
        assert_eq!(
            thread_cpu(Some("no such thread name")),
            Some(Duration::ZERO)
        );
        let (rss, hwm) = rss_kib();
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
    }

    #[test]
    fn heap_is_booked_to_the_thread_side() {
        let side = SIDES - 1;
        let before = std::thread::spawn(move || {
            tag_thread(side);
            let base = reset_peak(side);
            let v = std::hint::black_box(vec![0u8; 1 << 20]);
            let grown = live(side) - base;
            drop(v);
            (grown, peak(side) - base, live(side) - base)
        })
        .join()
        .unwrap();
        // Other test threads may allocate on other sides, never on this one.
        assert!(before.0 >= 1 << 20, "{before:?}");
        assert!(before.1 >= 1 << 20, "{before:?}");
        assert!(before.2 < 1 << 20, "{before:?}");
    }
}
