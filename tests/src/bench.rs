//! Helpers shared by the benchmark binaries in `src/bin`.

use std::fs;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

/// Dirty data written back and the page cache emptied, so every
/// measurement starts from the same state.
pub fn settle() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3\n");
    sleep(Duration::from_millis(200));
}

/// The median (sorts `v`).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
