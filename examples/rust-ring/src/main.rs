//! rust-ring [steps]: an MPI ring + allreduce in Rust with rsmpi, the
//! counterpart of examples/mpi/ring.c. Each step every rank sends its
//! vector of 1024 integers to the next rank (immediate send and receive),
//! checks what it received against a local model of every rank's vector,
//! updates its vector from what it received, and all ranks allreduce (sum)
//! their vector sums. Rank 0 prints `step <n> <sum>` and finally
//! `RESULT <checksum>`; every rank sleeps 50 ms per step, so a checkpoint
//! can land anywhere. Integer arithmetic: identical results for any MPI,
//! any number of ranks' timing, with or without the drain shim.

use mpi::collective::SystemOperation;
use mpi::request::WaitGuard;
use mpi::traits::*;
use std::process::ExitCode;
use std::time::Duration;

const N: usize = 1024;
const MOD: u64 = 1_000_003;

fn initial(rank: usize) -> Vec<u64> {
    (0..N)
        .map(|i| ((rank * N + i) as u64 * 7919) % MOD)
        .collect()
}

/// The next value of a rank's vector from what its predecessor sent.
fn advance(v: &mut [u64], got: &[u64], step: u64) {
    for (i, x) in v.iter_mut().enumerate() {
        *x = (*x * 31 + got[i] + step + i as u64) % MOD;
    }
}

fn main() -> ExitCode {
    let steps: u64 = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 100,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("rust-ring: bad step count (first argument): {e}");
            return ExitCode::from(2);
        }
    };
    let Some(universe) = mpi::initialize() else {
        eprintln!("rust-ring: MPI initialization failed");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let next = world.process_at_rank(((rank + 1) % size) as i32);
    let prev = world.process_at_rank(((rank + size - 1) % size) as i32);
    // Every rank's vector, as every rank computes it.
    let mut model: Vec<Vec<u64>> = (0..size).map(initial).collect();
    let mut mine = initial(rank);
    let mut checksum: u64 = 0xcbf2_9ce4_8422_2325;
    for step in 1..=steps {
        let mut got = vec![0u64; N];
        mpi::request::scope(|scope| {
            let _r = WaitGuard::from(prev.immediate_receive_into(scope, &mut got[..]));
            let _s = WaitGuard::from(next.immediate_send(scope, &mine[..]));
        });
        if got != model[(rank + size - 1) % size] {
            eprintln!("FAIL rank {rank}: step {step}: received vector differs from the model");
            world.abort(1);
        }
        advance(&mut mine, &got, step);
        let before = model.clone();
        for (q, v) in model.iter_mut().enumerate() {
            advance(v, &before[(q + size - 1) % size], step);
        }
        if mine != model[rank] {
            eprintln!("FAIL rank {rank}: step {step}: own vector differs from the model");
            world.abort(1);
        }
        let local: u64 = mine.iter().sum();
        let mut total: u64 = 0;
        world.all_reduce_into(&local, &mut total, SystemOperation::sum());
        for b in total.to_le_bytes() {
            checksum = (checksum ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        if rank == 0 {
            println!("step {step} {total}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if rank == 0 {
        println!("RESULT {checksum:016x}");
    }
    ExitCode::SUCCESS
}
