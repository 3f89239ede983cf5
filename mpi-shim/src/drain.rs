//! The drain: control socket thread and the rank-side protocol.
//!
//! A helper thread listens on `$CKPT_SHIM_DIR/<world rank>.sock`; a
//! `DRAIN` line sets a flag. The rank itself acts at its next MPI call or
//! in the poll loop of a blocking call (`Shim::poll`): every rank runs
//! rounds on the shim's communicator, each an all-to-all of its per-peer
//! send counts plus a MAX-reduction of "inside a collective". A round in
//! which nobody is inside a collective fixes the counts (no rank sends
//! again until RESUME); each rank then receives until it has what its
//! peers sent (early messages go to the stash), a barrier on the shim
//! communicator keeps senders progressing until everyone has, and the rank
//! answers READY and parks reading the socket until RESUME. A round in
//! which some rank is inside a collective sends every rank back to the
//! application (the drain stays pending), so the collective can finish.

use std::ffi::{c_int, c_void};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::ffi::*;
use crate::ledger;
use crate::reqtable::Tracked;
use crate::shim::{Shim, DISABLED};
use crate::stash::Stashed;
use crate::wire::Ready;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// Rounds of the pending drain so far (only the rank's thread uses it).
static ROUNDS: AtomicU64 = AtomicU64::new(0);
static FINALIZED: AtomicBool = AtomicBool::new(false);
/// The agent's connection of the pending drain.
static CONN: Mutex<Option<UnixStream>> = Mutex::new(None);
static SOCK_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);

#[inline(always)]
pub(crate) fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

fn conn() -> std::sync::MutexGuard<'static, Option<UnixStream>> {
    CONN.lock().unwrap_or_else(|e| e.into_inner())
}

fn reply(stream: &mut UnixStream, line: &str) {
    let _ = stream.write_all(line.as_bytes());
}

/// Start the control thread. `rank` None: the shim is disabled (thread
/// level MULTIPLE); the socket still answers, with FAIL.
pub(crate) fn start_control(rank: Option<c_int>) {
    let Some(dir) = std::env::var_os("CKPT_SHIM_DIR") else {
        return;
    };
    let rank = rank.unwrap_or_else(|| {
        let mut r = 0;
        // SAFETY: MPI is initialized.
        unsafe { PMPI_Comm_rank(ckpt_abi_comm_world(), &mut r) };
        r
    });
    let path = PathBuf::from(dir).join(format!("{rank}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "ckpt-mpi-shim: rank {rank}: cannot listen on {}: {e}; drains will not work",
                path.display()
            );
            return;
        }
    };
    *SOCK_PATH.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    let spawned = std::thread::Builder::new()
        .name("ckpt-shim-ctl".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                match line.trim_end() {
                    "DRAIN" if DISABLED.load(Ordering::Relaxed) => reply(
                        &mut stream,
                        "FAIL MPI_THREAD_MULTIPLE is not supported by the drain\n",
                    ),
                    "DRAIN" if FINALIZED.load(Ordering::Relaxed) => {
                        reply(&mut stream, "FAIL rank is finalizing\n")
                    }
                    "DRAIN" => {
                        let mut c = conn();
                        if c.is_some() {
                            reply(&mut stream, "FAIL a drain is already in progress\n");
                        } else {
                            *c = Some(stream);
                            REQUESTED.store(true, Ordering::Release);
                        }
                    }
                    other => reply(&mut stream, &format!("FAIL unknown command {other:?}\n")),
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("ckpt-mpi-shim: rank {rank}: cannot start the control thread: {e}");
    }
}

/// Progress during a drain: receive unexpected messages into the stash and
/// count receives that completed inside posted application requests.
fn progress(s: &Shim) {
    // SAFETY: inside an MPI call (the rank's own thread).
    let inner = unsafe { s.inner() };
    let comms = inner.comms.clone();
    for comm in comms {
        loop {
            let mut flag = 0;
            let mut st = ZERO_STATUS;
            // SAFETY: a live application communicator.
            unsafe { PMPI_Iprobe(ANY_SOURCE, ANY_TAG, comm, &mut flag, &mut st) };
            if flag == 0 {
                break;
            }
            let mut n = 0;
            // SAFETY: status from the probe; buffer of n bytes.
            unsafe { PMPI_Get_count(&st, s.byte, &mut n) };
            let mut data = vec![0u8; n.max(0) as usize];
            let mut rst = ZERO_STATUS;
            // SAFETY: as above; the probed message is received exactly.
            unsafe {
                PMPI_Recv(
                    data.as_mut_ptr() as *mut c_void,
                    n,
                    s.byte,
                    st.source,
                    st.tag,
                    comm,
                    &mut rst,
                )
            };
            s.count_recv(s.map_of(comm), st.source);
            // SAFETY: inside an MPI call.
            unsafe { s.inner() }.stash.push(Stashed {
                comm: key(comm),
                source: st.source,
                tag: st.tag,
                data,
            });
        }
    }
    // SAFETY: inside an MPI call.
    let inner = unsafe { s.inner() };
    let pending: Vec<(usize, Tracked)> = inner
        .reqs
        .iter()
        .map(|(k, w)| (k, Tracked::unpack(w)))
        .collect();
    for (k, t) in pending {
        let Tracked::Recv {
            world_src,
            map,
            counted: false,
        } = t
        else {
            continue;
        };
        let mut flag = 0;
        let mut st = ZERO_STATUS;
        // The request stays the application's: get_status does not free it.
        // SAFETY: a live request handle (removed from the table on completion).
        unsafe { PMPI_Request_get_status(handle(k), &mut flag, &mut st) };
        if flag == 0 {
            continue;
        }
        if st.source != PROC_NULL && !cancelled(&st) {
            if world_src >= 0 {
                s.count_recv(0, world_src);
            } else {
                s.count_recv(map, st.source);
            }
        }
        // SAFETY: inside an MPI call.
        if let Some(w) = unsafe { s.inner() }.reqs.get_mut(k) {
            *w = Tracked::Recv {
                world_src,
                map,
                counted: true,
            }
            .pack();
        }
    }
}

#[cfg(feature = "openmpi")]
fn handle(k: usize) -> Request {
    k as Request
}
#[cfg(feature = "mpich")]
fn handle(k: usize) -> Request {
    k as u32 as Request
}
#[cfg(feature = "openmpi")]
fn cancelled(st: &Status) -> bool {
    st.cancelled != 0
}
#[cfg(feature = "mpich")]
fn cancelled(st: &Status) -> bool {
    st.count_hi_and_cancelled & 1 != 0
}

/// Poll `reqs` (on the shim communicator) to completion, making progress.
fn wait_progress(s: &Shim, reqs: &mut [Request]) {
    loop {
        let mut flag = 0;
        // SAFETY: our own requests.
        unsafe {
            PMPI_Testall(
                reqs.len() as c_int,
                reqs.as_mut_ptr(),
                &mut flag,
                s.statuses_ignore,
            )
        };
        if flag != 0 {
            return;
        }
        progress(s);
    }
}

fn fail(line: String) {
    ROUNDS.store(0, Ordering::Relaxed);
    if let Some(mut c) = conn().take() {
        reply(&mut c, &format!("FAIL {line}\n"));
    }
    REQUESTED.store(false, Ordering::Release);
}

/// One drain attempt from a drain point. Returns when the rank may go on:
/// after RESUME, or at once when a round found a rank inside a collective.
pub(crate) fn run(s: &Shim) {
    let n = s.size as usize;
    let busy: c_int = {
        // SAFETY: inside an MPI call.
        let inner = unsafe { s.inner() };
        (inner.in_collective || inner.pending_colls > 0) as c_int
    };
    let sent: Vec<u64> = s.sent.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let mut sent_to_me = vec![0u64; n];
    let mut any_busy: c_int = 0;
    let mut reqs = [s.req_null, s.req_null];
    // SAFETY: buffers live until wait_progress returns; shim communicator.
    unsafe {
        PMPI_Ialltoall(
            sent.as_ptr() as *const c_void,
            1,
            s.uint64,
            sent_to_me.as_mut_ptr() as *mut c_void,
            1,
            s.uint64,
            s.comm,
            &mut reqs[0],
        );
        PMPI_Iallreduce(
            &busy as *const c_int as *const c_void,
            &mut any_busy as *mut c_int as *mut c_void,
            1,
            s.int,
            s.op_max,
            s.comm,
            &mut reqs[1],
        );
    }
    wait_progress(s, &mut reqs);
    ROUNDS.fetch_add(1, Ordering::Relaxed);
    if any_busy != 0 {
        return; // the drain stays requested: next drain point, next round
    }
    // Counts are final: nobody sends until RESUME.
    loop {
        let received: Vec<u64> = s
            .received
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        match ledger::missing(&sent_to_me, &received) {
            Ok(0) => break,
            Ok(_) => progress(s),
            Err(e) => {
                // Keep the collective sequence intact: still join the barrier.
                let mut r = [s.req_null];
                // SAFETY: shim communicator.
                unsafe { PMPI_Ibarrier(s.comm, &mut r[0]) };
                wait_progress(s, &mut r);
                fail(format!("rank {}: inconsistent counts: {e}", s.rank));
                return;
            }
        }
    }
    let mut r = [s.req_null];
    // SAFETY: shim communicator.
    unsafe { PMPI_Ibarrier(s.comm, &mut r[0]) };
    wait_progress(s, &mut r);

    let ready = Ready {
        sent: sent.iter().sum(),
        received: s.received.iter().map(|c| c.load(Ordering::Relaxed)).sum(),
        // SAFETY: inside an MPI call.
        stashed: unsafe { s.inner() }.stash.len() as u64,
        rounds: ROUNDS.swap(0, Ordering::Relaxed),
    };
    let Some(mut stream) = conn().take() else {
        REQUESTED.store(false, Ordering::Release);
        return;
    };
    reply(&mut stream, &ready.line());
    // Park: the rank's thread blocks here until the agent says RESUME (or
    // goes away, which also resumes: an aborted epoch must not hang the job).
    let mut line = String::new();
    let _ = BufReader::new(&stream).read_line(&mut line);
    if line.trim_end() == "RESUME" {
        reply(&mut stream, "RESUMED\n");
    }
    REQUESTED.store(false, Ordering::Release);
}

/// At MPI_Finalize: meet every rank (serving drains meanwhile), then refuse
/// further drains.
pub(crate) fn finalize(s: &Shim) {
    if s.drain_enabled {
        let mut r = s.req_null;
        // SAFETY: shim communicator.
        unsafe { PMPI_Ibarrier(s.comm, &mut r) };
        loop {
            let mut flag = 0;
            // SAFETY: our own request.
            unsafe { PMPI_Test(&mut r, &mut flag, s.status_ignore) };
            if flag != 0 {
                break;
            }
            s.poll();
        }
    }
    finalize_disabled();
}

pub(crate) fn finalize_disabled() {
    FINALIZED.store(true, Ordering::Release);
    if requested() {
        fail("rank is finalizing".into());
    }
    if let Some(p) = SOCK_PATH.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_file(p);
    }
}
