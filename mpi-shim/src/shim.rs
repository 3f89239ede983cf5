//! The interposer: the shim's global state and the exported `MPI_*`
//! functions, each forwarding to `PMPI_*`.
//!
//! Fast path (no drain pending): a relaxed atomic load of the drain flag,
//! a counter bump per message, and for receive requests one insert/remove
//! in a preallocated direct-mapped table (see reqtable.rs). No allocation,
//! no lock.
//! Thread levels: SINGLE, FUNNELED and SERIALIZED (MPI calls are serialized,
//! so the shim's state is only ever touched by one thread at a time).
//! Under MULTIPLE the shim passes every call through untouched and refuses
//! drains (FAIL on the socket).

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::drain;
use crate::ffi::*;
use crate::reqtable::{ReqMap, Tracked};
use crate::stash::{Selector, Stash, Stashed};

/// Direct slots of the request map (16 KiB); more outstanding requests
/// than fit go to its overflow table.
const REQ_CAPACITY: usize = 1024;
/// Whether a polling MPI_Waitall spins on one request before each
/// MPI_Testall (see `testall_polling`): measured faster with MPICH 4.0,
/// slower with Open MPI 4.1 (whose MPI_Testall is cheap).
const SPIN_ON_ONE: bool = cfg!(feature = "mpich");
/// log2 of the distance between consecutive request handles (see
/// `ReqMap`): Open MPI's are pointers to 768-byte ob1 requests, MPICH's
/// carry an index in their low bits.
#[cfg(feature = "openmpi")]
const REQ_SHIFT: u32 = 7;
#[cfg(feature = "mpich")]
const REQ_SHIFT: u32 = 0;

/// Communicator rank -> world rank, cached as an MPI attribute.
struct CommMap {
    world: Box<[c_int]>,
}

pub(crate) struct Inner {
    pub reqs: ReqMap<u64>,
    pub stash: Stash,
    /// Application communicators the shim knows (probed during a drain).
    pub comms: Vec<Comm>,
    /// Keys of the requests of an array call, saved before MPI nulls them.
    scratch_reqs: Vec<usize>,
    scratch_status: Vec<Status>,
    /// Inside a blocking collective (converted to its I-variant + polling).
    pub in_collective: bool,
    /// Application nonblocking collectives not yet completed.
    pub pending_colls: u32,
    /// Tracked MPI_ANY_SOURCE receives (their completion needs a status).
    any_source: u32,
    /// MPI_Cancel was called at least once (completions need a status).
    cancel_seen: bool,
}

pub(crate) struct Shim {
    pub world: Comm,
    /// The shim's own duplicate of MPI_COMM_WORLD (drain traffic only).
    pub comm: Comm,
    pub req_null: Request,
    pub byte: Datatype,
    pub uint64: Datatype,
    pub int: Datatype,
    pub op_max: Op,
    pub status_ignore: *mut Status,
    pub statuses_ignore: *mut Status,
    pub rank: c_int,
    pub size: c_int,
    keyval: c_int,
    /// Blocking calls poll so that a drain can start while a rank waits
    /// (only when a control socket exists, i.e. CKPT_SHIM_DIR is set).
    pub drain_enabled: bool,
    pub sent: Box<[AtomicU64]>,
    pub received: Box<[AtomicU64]>,
    inner: UnsafeCell<Inner>,
}

// SAFETY: MPI handles are process-global values; `inner` is only touched
// from inside MPI calls, which the application serializes (the shim is
// disabled under MPI_THREAD_MULTIPLE). The control thread never touches it.
unsafe impl Sync for Shim {}
// SAFETY: as above.
unsafe impl Send for Shim {}

static SHIM: OnceLock<Shim> = OnceLock::new();
/// Set when the shim is disabled (MPI_THREAD_MULTIPLE).
pub(crate) static DISABLED: AtomicBool = AtomicBool::new(false);

#[inline(always)]
pub(crate) fn shim() -> Option<&'static Shim> {
    SHIM.get()
}

#[inline(always)]
fn bump(c: &AtomicU64) {
    // Single MPI thread at a time: a plain load/store, no locked RMW.
    c.store(c.load(Relaxed) + 1, Relaxed);
}

unsafe extern "C" fn no_copy(
    _c: Comm,
    _k: c_int,
    _extra: *mut c_void,
    _in: *mut c_void,
    _out: *mut c_void,
    flag: *mut c_int,
) -> c_int {
    // SAFETY: MPI passes a valid flag pointer.
    unsafe { *flag = 0 };
    SUCCESS
}

unsafe extern "C" fn free_map(_c: Comm, _k: c_int, val: *mut c_void, _extra: *mut c_void) -> c_int {
    if !val.is_null() {
        // SAFETY: the attribute value is a Box<CommMap> leaked by `map_of`.
        drop(unsafe { Box::from_raw(val as *mut CommMap) });
    }
    SUCCESS
}

fn die(msg: &str) -> ! {
    eprintln!("ckpt-mpi-shim: {msg}");
    // SAFETY: aborting the job is always allowed.
    unsafe { PMPI_Abort(ckpt_abi_comm_world(), 70) };
    std::process::exit(70)
}

impl Shim {
    /// # Safety
    /// Only from inside an MPI call (see the Sync impl).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn inner(&self) -> &mut Inner {
        // SAFETY: callers are serialized MPI calls and never hold two.
        unsafe { &mut *self.inner.get() }
    }

    fn setup() -> Shim {
        // SAFETY: plain MPI calls right after a successful init.
        unsafe {
            let world = ckpt_abi_comm_world();
            let (mut rank, mut size) = (0, 0);
            PMPI_Comm_rank(world, &mut rank);
            PMPI_Comm_size(world, &mut size);
            let mut comm = ckpt_abi_comm_null();
            if PMPI_Comm_dup(world, &mut comm) != SUCCESS {
                die("MPI_Comm_dup(MPI_COMM_WORLD) failed");
            }
            let mut keyval = 0;
            if PMPI_Comm_create_keyval(Some(no_copy), Some(free_map), &mut keyval, ptr::null_mut())
                != SUCCESS
            {
                die("MPI_Comm_create_keyval failed");
            }
            let counters = |n: c_int| (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
            Shim {
                world,
                comm,
                req_null: ckpt_abi_request_null(),
                byte: ckpt_abi_byte(),
                uint64: ckpt_abi_uint64(),
                int: ckpt_abi_int(),
                op_max: ckpt_abi_op_max(),
                status_ignore: ckpt_abi_status_ignore(),
                statuses_ignore: ckpt_abi_statuses_ignore(),
                rank,
                size,
                keyval,
                drain_enabled: std::env::var_os("CKPT_SHIM_DIR").is_some(),
                sent: counters(size),
                received: counters(size),
                inner: UnsafeCell::new(Inner {
                    reqs: ReqMap::new(REQ_CAPACITY, REQ_SHIFT),
                    stash: Stash::default(),
                    comms: vec![world],
                    scratch_reqs: Vec::new(),
                    scratch_status: Vec::new(),
                    in_collective: false,
                    pending_colls: 0,
                    any_source: 0,
                    cancel_seen: false,
                }),
            }
        }
    }

    /// The world-rank map of `comm` (0 for MPI_COMM_WORLD): cached as an
    /// attribute; built (allocation) on first use of a communicator.
    #[inline(always)]
    pub(crate) fn map_of(&self, comm: Comm) -> usize {
        if comm == self.world {
            return 0;
        }
        self.map_of_slow(comm)
    }

    #[inline(never)]
    fn map_of_slow(&self, comm: Comm) -> usize {
        let mut val: *mut c_void = ptr::null_mut();
        let mut flag = 0;
        // SAFETY: valid communicator (the application's), our keyval.
        unsafe {
            PMPI_Comm_get_attr(
                comm,
                self.keyval,
                &mut val as *mut *mut c_void as *mut c_void,
                &mut flag,
            );
        }
        if flag != 0 && !val.is_null() {
            return val as usize;
        }
        self.register(comm)
    }

    fn register(&self, comm: Comm) -> usize {
        // SAFETY: group queries on a valid communicator; buffers sized by
        // the group size.
        unsafe {
            let mut inter = 0;
            PMPI_Comm_test_inter(comm, &mut inter);
            let mut g: Group = std::mem::zeroed();
            if inter != 0 {
                PMPI_Comm_remote_group(comm, &mut g);
            } else {
                PMPI_Comm_group(comm, &mut g);
            }
            let mut wg: Group = std::mem::zeroed();
            PMPI_Comm_group(self.world, &mut wg);
            let mut n = 0;
            PMPI_Group_size(g, &mut n);
            let ranks: Vec<c_int> = (0..n).collect();
            let mut world = vec![0; n as usize].into_boxed_slice();
            PMPI_Group_translate_ranks(g, n, ranks.as_ptr(), wg, world.as_mut_ptr());
            PMPI_Group_free(&mut g);
            PMPI_Group_free(&mut wg);
            let map = Box::into_raw(Box::new(CommMap { world })) as usize;
            PMPI_Comm_set_attr(comm, self.keyval, map as *mut c_void);
            let inner = self.inner();
            if !inner.comms.contains(&comm) {
                inner.comms.push(comm);
            }
            map
        }
    }

    #[inline(always)]
    pub(crate) fn world_rank(&self, map: usize, rank: c_int) -> Option<usize> {
        if rank < 0 {
            return None;
        }
        if map == 0 {
            return Some(rank as usize);
        }
        // SAFETY: `map` is a live CommMap (freed only with its communicator).
        let m = unsafe { &*(map as *const CommMap) };
        m.world
            .get(rank as usize)
            .and_then(|&w| (w >= 0).then_some(w as usize))
    }

    #[inline(always)]
    fn count_send(&self, comm: Comm, dest: c_int) {
        if dest == PROC_NULL || dest < 0 {
            return;
        }
        if let Some(w) = self.world_rank(self.map_of(comm), dest) {
            bump(&self.sent[w]);
        }
    }

    #[inline(always)]
    pub(crate) fn count_recv(&self, map: usize, src: c_int) {
        if let Some(w) = self.world_rank(map, src) {
            bump(&self.received[w]);
        }
    }

    #[inline(always)]
    fn track_recv(&self, req: Request, comm: Comm, src: c_int) {
        if src == PROC_NULL || req == self.req_null {
            return;
        }
        let map = self.map_of(comm);
        let world_src = if src == ANY_SOURCE {
            -1
        } else {
            self.world_rank(map, src).map_or(-1, |w| w as i32)
        };
        self.track(
            req,
            Tracked::Recv {
                world_src,
                map,
                counted: false,
            },
        );
    }

    #[inline(always)]
    fn track(&self, req: Request, t: Tracked) {
        // SAFETY: inside an MPI call.
        let inner = unsafe { self.inner() };
        match t {
            Tracked::Coll => inner.pending_colls += 1,
            Tracked::Recv { world_src, .. } if world_src < 0 => inner.any_source += 1,
            Tracked::Recv { .. } => {}
        }
        inner.reqs.insert(key(req) as usize, t.pack());
    }

    /// A request completed (its handle before completion, its status; None
    /// only when no MPI_ANY_SOURCE receive is tracked and MPI_Cancel was
    /// never called, see `prepare_many`).
    #[inline(always)]
    fn completed(&self, req: Request, st: Option<&Status>) {
        self.completed_key(key(req) as usize, st)
    }

    #[inline(always)]
    fn completed_key(&self, req: usize, st: Option<&Status>) {
        // SAFETY: inside an MPI call.
        let inner = unsafe { self.inner() };
        if inner.reqs.is_empty() {
            return;
        }
        match inner.reqs.remove(req).map(Tracked::unpack) {
            None => {}
            Some(Tracked::Coll) => inner.pending_colls -= 1,
            Some(Tracked::Recv {
                world_src,
                map,
                counted,
            }) => {
                if world_src < 0 {
                    inner.any_source -= 1;
                }
                if counted {
                    return;
                }
                if let Some(st) = st {
                    if st.source == PROC_NULL || is_cancelled(st) {
                        return;
                    }
                }
                if world_src >= 0 {
                    bump(&self.received[world_src as usize]);
                } else if let Some(st) = st {
                    self.count_recv(map, st.source);
                }
            }
        }
    }

    /// The i-th status of an array, or None for MPI_STATUSES_IGNORE.
    #[inline(always)]
    unsafe fn status_at<'a>(&self, st: *mut Status, i: usize) -> Option<&'a Status> {
        if st == self.statuses_ignore || st.is_null() {
            None
        } else {
            // SAFETY: the caller's array has at least i+1 statuses.
            Some(unsafe { &*st.add(i) })
        }
    }

    /// Whether any tracked request needs its status at completion.
    fn needs_scan(&self) -> bool {
        // SAFETY: inside an MPI call.
        !unsafe { self.inner() }.reqs.is_empty()
    }

    /// Drain point: a relaxed load unless a drain is pending.
    #[inline(always)]
    pub(crate) fn poll(&self) {
        if drain::requested() {
            drain::run(self);
        }
    }

    fn sel(&self, comm: Comm, src: c_int, tag: c_int) -> Selector {
        Selector {
            comm: key(comm),
            source: (src != ANY_SOURCE).then_some(src),
            tag: (tag != ANY_TAG).then_some(tag),
        }
    }

    /// A message for this receive from the stash, if any (rarely non-empty:
    /// only after a drain received messages nobody had asked for yet).
    #[inline(always)]
    fn take_stashed(&self, comm: Comm, src: c_int, tag: c_int) -> Option<Stashed> {
        // SAFETY: inside an MPI call.
        let inner = unsafe { self.inner() };
        if inner.stash.is_empty() || src == PROC_NULL {
            return None;
        }
        self.take_stashed_slow(comm, src, tag)
    }

    #[cold]
    #[inline(never)]
    fn take_stashed_slow(&self, comm: Comm, src: c_int, tag: c_int) -> Option<Stashed> {
        // SAFETY: inside an MPI call.
        let inner = unsafe { self.inner() };
        inner.stash.take(&self.sel(comm, src, tag))
    }

    fn peek_stash(&self, comm: Comm, src: c_int, tag: c_int) -> Option<Status> {
        // SAFETY: inside an MPI call.
        let inner = unsafe { self.inner() };
        if inner.stash.is_empty() {
            return None;
        }
        inner
            .stash
            .peek(&self.sel(comm, src, tag))
            .map(|m| self.status_of(m))
    }

    fn status_of(&self, m: &Stashed) -> Status {
        let mut st = ZERO_STATUS;
        st.source = m.source;
        st.tag = m.tag;
        // SAFETY: a valid status and datatype.
        unsafe { PMPI_Status_set_elements_x(&mut st, self.byte, m.data.len() as Count) };
        st
    }

    /// Copy a stashed message into the application's buffer.
    unsafe fn deliver(
        &self,
        m: &Stashed,
        buf: *mut c_void,
        count: c_int,
        dt: Datatype,
        comm: Comm,
        status: *mut Status,
    ) -> c_int {
        let mut tsize = 0;
        // SAFETY: the application's buffer and datatype, as for a receive.
        unsafe {
            PMPI_Type_size(dt, &mut tsize);
            let n = if tsize > 0 {
                (m.data.len() / tsize as usize).min(count as usize)
            } else {
                0
            };
            let mut pos = 0;
            let rc = if n > 0 {
                PMPI_Unpack(
                    m.data.as_ptr() as *const c_void,
                    m.data.len() as c_int,
                    &mut pos,
                    buf,
                    n as c_int,
                    dt,
                    comm,
                )
            } else {
                SUCCESS
            };
            if !status.is_null() && status != self.status_ignore {
                *status = self.status_of(m);
            }
            rc
        }
    }

    /// Poll `req` to completion (a blocking call while drains are enabled).
    unsafe fn wait_one(&self, req: *mut Request, st: *mut Status) -> c_int {
        loop {
            let mut flag = 0;
            // SAFETY: the caller's request and status.
            let rc = unsafe { self.test_one(req, &mut flag, st) };
            if rc != SUCCESS || flag != 0 {
                return rc;
            }
            self.poll();
        }
    }

    /// MPI_Test with counting; `st` may be MPI_STATUS_IGNORE.
    #[inline(always)]
    unsafe fn test_one(&self, req: *mut Request, flag: *mut c_int, st: *mut Status) -> c_int {
        // SAFETY: the caller's pointers, as for MPI_Test.
        unsafe {
            if !self.needs_scan() {
                return PMPI_Test(req, flag, st);
            }
            let before = *req;
            let mut local = ZERO_STATUS;
            let stp = if st == self.status_ignore || st.is_null() {
                &mut local as *mut Status
            } else {
                st
            };
            let rc = PMPI_Test(req, flag, stp);
            if rc == SUCCESS && *flag != 0 {
                self.completed(before, Some(&*stp));
            }
            rc
        }
    }

    /// Save the handles of an array call (they are nulled on completion)
    /// and point `st` at usable statuses, unless none is needed: no tracked
    /// MPI_ANY_SOURCE receive (its source) and no MPI_Cancel ever (the
    /// cancelled flag), then MPI_STATUSES_IGNORE stays.
    unsafe fn prepare_many(&self, n: c_int, reqs: *const Request, st: *mut Status) -> *mut Status {
        // SAFETY: inside an MPI call; `reqs` holds n handles.
        unsafe {
            let inner = self.inner();
            let n = n.max(0) as usize;
            inner.scratch_reqs.clear();
            inner.scratch_reqs.extend(
                std::slice::from_raw_parts(reqs, n)
                    .iter()
                    .map(|&r| key(r) as usize),
            );
            if (st == self.statuses_ignore || st.is_null())
                && inner.any_source == 0
                && !inner.cancel_seen
            {
                st
            } else if st == self.statuses_ignore || st.is_null() {
                if inner.scratch_status.len() < n {
                    inner.scratch_status.resize(n, ZERO_STATUS);
                }
                inner.scratch_status.as_mut_ptr()
            } else {
                st
            }
        }
    }

    #[inline(always)]
    fn saved(&self, i: usize) -> usize {
        // SAFETY: inside an MPI call.
        unsafe { self.inner() }.scratch_reqs[i]
    }

    /// All `n` requests saved by `prepare_many` completed (MPI_Waitall, a
    /// successful MPI_Testall); `stp` as returned by `prepare_many`.
    #[inline(always)]
    unsafe fn completed_all(&self, n: c_int, stp: *mut Status) {
        let n = n.max(0) as usize;
        // SAFETY: inside an MPI call.
        let inner = unsafe { self.inner() };
        if (stp == self.statuses_ignore || stp.is_null()) && inner.any_source == 0 {
            // No status needed (see `prepare_many`): every tracked receive
            // has a known source, and none was cancelled. One pass over
            // the table with its geometry in registers.
            let Inner {
                reqs,
                scratch_reqs,
                pending_colls,
                any_source,
                ..
            } = inner;
            let received = &self.received;
            reqs.remove_each(&scratch_reqs[..n], |_, w| {
                if w & Tracked::FLAGS == 0 {
                    // An uncounted receive from a known world rank.
                    bump(&received[w as usize]);
                    return;
                }
                match Tracked::unpack(w) {
                    Tracked::Coll => *pending_colls -= 1,
                    Tracked::Recv {
                        world_src, counted, ..
                    } => {
                        if world_src < 0 {
                            // None is tracked when any_source == 0 (this
                            // path's condition): unreachable, kept safe.
                            *any_source = any_source.saturating_sub(1);
                        } else if !counted {
                            bump(&received[world_src as usize]);
                        }
                    }
                }
            });
            return;
        }
        for i in 0..n {
            // SAFETY: `stp` has n statuses unless it is MPI_STATUSES_IGNORE.
            self.completed_key(self.saved(i), unsafe { self.status_at(stp, i) });
        }
    }

    /// MPI_Waitall as MPI_Testall + drain polling (a blocking MPI_Waitall
    /// could wait forever for a peer parked in a drain). With MPICH 4.0
    /// every MPI_Testall converts and scans all n handles, so spinning on
    /// it costs O(n) per progress step where MPI_Waitall costs O(1): there
    /// (`SPIN_ON_ONE`) the loop first spins on the last request not waited
    /// for yet with MPI_Request_get_status (progress, completes nothing),
    /// then checks them all with one MPI_Testall — usually the only one,
    /// as messages mostly complete in order.
    #[inline(always)]
    unsafe fn testall_polling(&self, n: c_int, r: *mut Request, st: *mut Status) -> c_int {
        let mut j = n.max(0) as usize;
        loop {
            if SPIN_ON_ONE && j > 0 {
                // Wait for the last request not waited for yet (messages
                // mostly complete in order), then check them all.
                j -= 1;
                loop {
                    let mut flag = 0;
                    // SAFETY: r has n requests; get_status leaves them intact.
                    let rc = unsafe {
                        PMPI_Request_get_status(*r.add(j), &mut flag, self.status_ignore)
                    };
                    if rc != SUCCESS || flag != 0 {
                        break; // an error: MPI_Testall reports it
                    }
                    self.poll();
                }
            }
            self.poll();
            let mut flag = 0;
            // SAFETY: the caller's arrays, as for MPI_Waitall.
            let rc = unsafe { PMPI_Testall(n, r, &mut flag, st) };
            if rc != SUCCESS || flag != 0 {
                return rc;
            }
        }
    }

    unsafe fn testall(
        &self,
        n: c_int,
        reqs: *mut Request,
        flag: *mut c_int,
        st: *mut Status,
    ) -> c_int {
        // SAFETY: the caller's arrays, as for MPI_Testall.
        unsafe {
            if !self.needs_scan() {
                return PMPI_Testall(n, reqs, flag, st);
            }
            let stp = self.prepare_many(n, reqs, st);
            let rc = PMPI_Testall(n, reqs, flag, stp);
            if rc == SUCCESS && *flag != 0 {
                self.completed_all(n, stp);
            }
            rc
        }
    }

    unsafe fn testany(
        &self,
        n: c_int,
        reqs: *mut Request,
        idx: *mut c_int,
        flag: *mut c_int,
        st: *mut Status,
    ) -> c_int {
        // SAFETY: the caller's arrays, as for MPI_Testany.
        unsafe {
            if !self.needs_scan() {
                return PMPI_Testany(n, reqs, idx, flag, st);
            }
            let _ = self.prepare_many(n, reqs, self.statuses_ignore);
            let mut local = ZERO_STATUS;
            let stp = if st == self.status_ignore || st.is_null() {
                &mut local as *mut Status
            } else {
                st
            };
            let rc = PMPI_Testany(n, reqs, idx, flag, stp);
            if rc == SUCCESS && *flag != 0 && *idx >= 0 {
                self.completed_key(self.saved(*idx as usize), Some(&*stp));
            }
            rc
        }
    }

    unsafe fn testsome(
        &self,
        n: c_int,
        reqs: *mut Request,
        outn: *mut c_int,
        idx: *mut c_int,
        st: *mut Status,
    ) -> c_int {
        // SAFETY: the caller's arrays, as for MPI_Testsome.
        unsafe {
            if !self.needs_scan() {
                return PMPI_Testsome(n, reqs, outn, idx, st);
            }
            let stp = self.prepare_many(n, reqs, st);
            let rc = PMPI_Testsome(n, reqs, outn, idx, stp);
            if rc == SUCCESS && *outn > 0 {
                for k in 0..*outn as usize {
                    self.completed_key(self.saved(*idx.add(k) as usize), self.status_at(stp, k));
                }
            }
            rc
        }
    }

    /// Run a blocking collective as its nonblocking variant, polling, so a
    /// drain can see that this rank is inside a collective.
    pub(crate) unsafe fn wait_collective(&self, req: *mut Request) -> c_int {
        // SAFETY: inside an MPI call.
        unsafe { self.inner() }.in_collective = true;
        let rc = loop {
            let mut flag = 0;
            // SAFETY: the request we just started.
            let rc = unsafe { PMPI_Test(req, &mut flag, self.status_ignore) };
            if rc != SUCCESS || flag != 0 {
                break rc;
            }
            self.poll();
        };
        // SAFETY: inside an MPI call.
        unsafe { self.inner() }.in_collective = false;
        rc
    }
}

fn is_cancelled(st: &Status) -> bool {
    #[cfg(feature = "openmpi")]
    {
        st.cancelled != 0
    }
    #[cfg(feature = "mpich")]
    {
        st.count_hi_and_cancelled & 1 != 0
    }
}

fn init_done(rc: c_int, provided: c_int) -> c_int {
    if rc != SUCCESS {
        return rc;
    }
    if provided >= THREAD_MULTIPLE {
        DISABLED.store(true, Relaxed);
        if std::env::var_os("CKPT_SHIM_DIR").is_some() {
            drain::start_control(None);
        }
        return rc;
    }
    let s = SHIM.get_or_init(Shim::setup);
    if s.drain_enabled {
        drain::start_control(Some(s.rank));
    }
    rc
}

// ---------------------------------------------------------------- exports

#[no_mangle]
pub unsafe extern "C" fn MPI_Init(argc: *mut c_int, argv: *mut *mut *mut c_char) -> c_int {
    // SAFETY: the application's arguments, passed through.
    let rc = unsafe { PMPI_Init(argc, argv) };
    init_done(rc, 0)
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Init_thread(
    argc: *mut c_int,
    argv: *mut *mut *mut c_char,
    required: c_int,
    provided: *mut c_int,
) -> c_int {
    // SAFETY: the application's arguments, passed through.
    let rc = unsafe { PMPI_Init_thread(argc, argv, required, provided) };
    let p = if rc == SUCCESS {
        // SAFETY: MPI wrote *provided.
        unsafe { *provided }
    } else {
        0
    };
    // The application uses at most what it asked for.
    init_done(rc, p.min(required))
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Finalize() -> c_int {
    if let Some(s) = shim() {
        drain::finalize(s);
        let mut c = s.comm;
        // SAFETY: our own communicator.
        unsafe { PMPI_Comm_free(&mut c) };
    } else {
        drain::finalize_disabled();
    }
    // SAFETY: passed through.
    unsafe { PMPI_Finalize() }
}

macro_rules! blocking_send {
    ($name:ident, $pname:ident) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            b: *const c_void,
            n: c_int,
            t: Datatype,
            d: c_int,
            tag: c_int,
            c: Comm,
        ) -> c_int {
            if let Some(s) = shim() {
                s.poll();
                s.count_send(c, d);
            }
            // SAFETY: passed through.
            unsafe { $pname(b, n, t, d, tag, c) }
        }
    };
}
blocking_send!(MPI_Send, PMPI_Send);
blocking_send!(MPI_Ssend, PMPI_Ssend);
blocking_send!(MPI_Bsend, PMPI_Bsend);
blocking_send!(MPI_Rsend, PMPI_Rsend);

macro_rules! nonblocking_send {
    ($name:ident, $pname:ident) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            b: *const c_void,
            n: c_int,
            t: Datatype,
            d: c_int,
            tag: c_int,
            c: Comm,
            r: *mut Request,
        ) -> c_int {
            if let Some(s) = shim() {
                s.poll();
                s.count_send(c, d);
            }
            // SAFETY: passed through.
            unsafe { $pname(b, n, t, d, tag, c, r) }
        }
    };
}
nonblocking_send!(MPI_Isend, PMPI_Isend);
nonblocking_send!(MPI_Issend, PMPI_Issend);
nonblocking_send!(MPI_Ibsend, PMPI_Ibsend);
nonblocking_send!(MPI_Irsend, PMPI_Irsend);

unsafe extern "C" fn greq_query(extra: *mut c_void, st: *mut Status) -> c_int {
    // SAFETY: `extra` is the Box<Status> given to Grequest_start.
    unsafe { *st = *(extra as *const Status) };
    SUCCESS
}
unsafe extern "C" fn greq_free(extra: *mut c_void) -> c_int {
    // SAFETY: leaked by MPI_Irecv below; freed exactly once by MPI.
    drop(unsafe { Box::from_raw(extra as *mut Status) });
    SUCCESS
}
unsafe extern "C" fn greq_cancel(_extra: *mut c_void, _complete: c_int) -> c_int {
    SUCCESS
}

/// MPI_Irecv served from the stash: an already complete (generalized)
/// request carrying the stashed message's status. Out of line: the stash
/// is empty except after a drain.
#[cold]
#[inline(never)]
unsafe fn irecv_stashed(
    s: &Shim,
    m: Stashed,
    b: *mut c_void,
    n: c_int,
    t: Datatype,
    c: Comm,
    r: *mut Request,
) -> c_int {
    let mut st = ZERO_STATUS;
    // SAFETY: the application's receive arguments.
    unsafe {
        let rc = s.deliver(&m, b, n, t, c, &mut st);
        let extra = Box::into_raw(Box::new(st)) as *mut c_void;
        let rc2 = PMPI_Grequest_start(greq_query, greq_free, greq_cancel, extra, r);
        if rc2 != SUCCESS {
            drop(Box::from_raw(extra as *mut Status));
            return rc2;
        }
        PMPI_Grequest_complete(*r);
        rc
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Irecv(
    b: *mut c_void,
    n: c_int,
    t: Datatype,
    src: c_int,
    tag: c_int,
    c: Comm,
    r: *mut Request,
) -> c_int {
    let Some(s) = shim() else {
        // SAFETY: passed through.
        return unsafe { PMPI_Irecv(b, n, t, src, tag, c, r) };
    };
    s.poll();
    if let Some(m) = s.take_stashed(c, src, tag) {
        // SAFETY: the application's receive arguments.
        return unsafe { irecv_stashed(s, m, b, n, t, c, r) };
    }
    // SAFETY: passed through.
    let rc = unsafe { PMPI_Irecv(b, n, t, src, tag, c, r) };
    if rc == SUCCESS {
        // SAFETY: MPI wrote *r.
        s.track_recv(unsafe { *r }, c, src);
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Recv(
    b: *mut c_void,
    n: c_int,
    t: Datatype,
    src: c_int,
    tag: c_int,
    c: Comm,
    st: *mut Status,
) -> c_int {
    let Some(s) = shim() else {
        // SAFETY: passed through.
        return unsafe { PMPI_Recv(b, n, t, src, tag, c, st) };
    };
    s.poll();
    if let Some(m) = s.take_stashed(c, src, tag) {
        // SAFETY: the application's receive arguments.
        return unsafe { s.deliver(&m, b, n, t, c, st) };
    }
    if s.drain_enabled {
        let mut r = s.req_null;
        // SAFETY: the application's arguments; our request.
        unsafe {
            let rc = PMPI_Irecv(b, n, t, src, tag, c, &mut r);
            if rc != SUCCESS {
                return rc;
            }
            s.track_recv(r, c, src);
            return s.wait_one(&mut r, st);
        }
    }
    let mut local = ZERO_STATUS;
    let stp = if st == s.status_ignore || st.is_null() {
        &mut local as *mut Status
    } else {
        st
    };
    // SAFETY: passed through with a usable status.
    let rc = unsafe { PMPI_Recv(b, n, t, src, tag, c, stp) };
    // SAFETY: MPI filled the status.
    let source = unsafe { (*stp).source };
    if rc == SUCCESS && source != PROC_NULL {
        s.count_recv(s.map_of(c), source);
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Sendrecv(
    sb: *const c_void,
    sn: c_int,
    stype: Datatype,
    d: c_int,
    stag: c_int,
    rb: *mut c_void,
    rn: c_int,
    rt: Datatype,
    src: c_int,
    rtag: c_int,
    c: Comm,
    st: *mut Status,
) -> c_int {
    let Some(s) = shim() else {
        // SAFETY: passed through.
        return unsafe { PMPI_Sendrecv(sb, sn, stype, d, stag, rb, rn, rt, src, rtag, c, st) };
    };
    // As Irecv + Isend + Wait on both, through the counting wrappers.
    let mut reqs = [s.req_null, s.req_null];
    // SAFETY: the application's arguments; our requests.
    unsafe {
        let rc = MPI_Irecv(rb, rn, rt, src, rtag, c, &mut reqs[0]);
        if rc != SUCCESS {
            return rc;
        }
        let rc = MPI_Isend(sb, sn, stype, d, stag, c, &mut reqs[1]);
        if rc != SUCCESS {
            return rc;
        }
        let rc = s.wait_one(&mut reqs[0], st);
        let rc2 = s.wait_one(&mut reqs[1], s.status_ignore);
        if rc != SUCCESS {
            rc
        } else {
            rc2
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Sendrecv_replace(
    b: *mut c_void,
    n: c_int,
    t: Datatype,
    d: c_int,
    stag: c_int,
    src: c_int,
    rtag: c_int,
    c: Comm,
    st: *mut Status,
) -> c_int {
    let Some(s) = shim() else {
        // SAFETY: passed through.
        return unsafe { PMPI_Sendrecv_replace(b, n, t, d, stag, src, rtag, c, st) };
    };
    s.poll();
    s.count_send(c, d);
    let mut local = ZERO_STATUS;
    let stp = if st == s.status_ignore || st.is_null() {
        &mut local as *mut Status
    } else {
        st
    };
    // SAFETY: passed through with a usable status.
    let rc = unsafe { PMPI_Sendrecv_replace(b, n, t, d, stag, src, rtag, c, stp) };
    // SAFETY: MPI filled the status.
    let source = unsafe { (*stp).source };
    if rc == SUCCESS && source != PROC_NULL {
        s.count_recv(s.map_of(c), source);
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Iprobe(
    src: c_int,
    tag: c_int,
    c: Comm,
    flag: *mut c_int,
    st: *mut Status,
) -> c_int {
    if let Some(s) = shim() {
        s.poll();
        if let Some(m) = s.peek_stash(c, src, tag) {
            // SAFETY: the application's pointers.
            unsafe {
                *flag = 1;
                if st != s.status_ignore && !st.is_null() {
                    *st = m;
                }
            }
            return SUCCESS;
        }
    }
    // SAFETY: passed through.
    unsafe { PMPI_Iprobe(src, tag, c, flag, st) }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Probe(src: c_int, tag: c_int, c: Comm, st: *mut Status) -> c_int {
    match shim() {
        Some(s) if s.drain_enabled => loop {
            let mut flag = 0;
            // SAFETY: the application's arguments.
            let rc = unsafe { MPI_Iprobe(src, tag, c, &mut flag, st) };
            if rc != SUCCESS || flag != 0 {
                return rc;
            }
        },
        Some(s) => {
            if let Some(m) = s.peek_stash(c, src, tag) {
                if st != s.status_ignore && !st.is_null() {
                    // SAFETY: the application's status.
                    unsafe { *st = m };
                }
                return SUCCESS;
            }
            // SAFETY: passed through.
            unsafe { PMPI_Probe(src, tag, c, st) }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Probe(src, tag, c, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Test(r: *mut Request, flag: *mut c_int, st: *mut Status) -> c_int {
    match shim() {
        Some(s) => {
            s.poll();
            // SAFETY: the application's arguments.
            unsafe { s.test_one(r, flag, st) }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Test(r, flag, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Testall(
    n: c_int,
    r: *mut Request,
    flag: *mut c_int,
    st: *mut Status,
) -> c_int {
    match shim() {
        Some(s) => {
            s.poll();
            // SAFETY: the application's arguments.
            unsafe { s.testall(n, r, flag, st) }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Testall(n, r, flag, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Testany(
    n: c_int,
    r: *mut Request,
    idx: *mut c_int,
    flag: *mut c_int,
    st: *mut Status,
) -> c_int {
    match shim() {
        Some(s) => {
            s.poll();
            // SAFETY: the application's arguments.
            unsafe { s.testany(n, r, idx, flag, st) }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Testany(n, r, idx, flag, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Testsome(
    n: c_int,
    r: *mut Request,
    outn: *mut c_int,
    idx: *mut c_int,
    st: *mut Status,
) -> c_int {
    match shim() {
        Some(s) => {
            s.poll();
            // SAFETY: the application's arguments.
            unsafe { s.testsome(n, r, outn, idx, st) }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Testsome(n, r, outn, idx, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Wait(r: *mut Request, st: *mut Status) -> c_int {
    match shim() {
        Some(s) if s.drain_enabled => {
            s.poll();
            // SAFETY: the application's arguments.
            unsafe { s.wait_one(r, st) }
        }
        Some(s) => {
            // SAFETY: the application's arguments.
            unsafe {
                if !s.needs_scan() {
                    return PMPI_Wait(r, st);
                }
                let before = *r;
                let mut local = ZERO_STATUS;
                let stp = if st == s.status_ignore || st.is_null() {
                    &mut local as *mut Status
                } else {
                    st
                };
                let rc = PMPI_Wait(r, stp);
                if rc == SUCCESS {
                    s.completed(before, Some(&*stp));
                }
                rc
            }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Wait(r, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Waitall(n: c_int, r: *mut Request, st: *mut Status) -> c_int {
    match shim() {
        Some(s) if s.drain_enabled => {
            // SAFETY: the application's arguments. MPI_Testall modifies no
            // request until all are complete, so the handles are saved once.
            unsafe {
                if !s.needs_scan() {
                    // Nothing tracked among them (a drain tracks nothing new).
                    return s.testall_polling(n, r, st);
                }
                let stp = s.prepare_many(n, r, st);
                let rc = s.testall_polling(n, r, stp);
                if rc == SUCCESS {
                    s.completed_all(n, stp);
                }
                rc
            }
        }
        Some(s) => {
            // SAFETY: the application's arguments.
            unsafe {
                if !s.needs_scan() {
                    return PMPI_Waitall(n, r, st);
                }
                let stp = s.prepare_many(n, r, st);
                let rc = PMPI_Waitall(n, r, stp);
                if rc == SUCCESS {
                    s.completed_all(n, stp);
                }
                rc
            }
        }
        // SAFETY: passed through.
        None => unsafe { PMPI_Waitall(n, r, st) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Waitany(
    n: c_int,
    r: *mut Request,
    idx: *mut c_int,
    st: *mut Status,
) -> c_int {
    let Some(s) = shim() else {
        // SAFETY: passed through.
        return unsafe { PMPI_Waitany(n, r, idx, st) };
    };
    loop {
        s.poll();
        let mut flag = 0;
        // SAFETY: the application's arguments.
        let rc = unsafe { s.testany(n, r, idx, &mut flag, st) };
        if rc != SUCCESS || flag != 0 {
            return rc;
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Waitsome(
    n: c_int,
    r: *mut Request,
    outn: *mut c_int,
    idx: *mut c_int,
    st: *mut Status,
) -> c_int {
    let Some(s) = shim() else {
        // SAFETY: passed through.
        return unsafe { PMPI_Waitsome(n, r, outn, idx, st) };
    };
    loop {
        s.poll();
        // SAFETY: the application's arguments.
        let rc = unsafe { s.testsome(n, r, outn, idx, st) };
        // SAFETY: MPI wrote *outn.
        if rc != SUCCESS || unsafe { *outn } != 0 {
            return rc;
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Request_free(r: *mut Request) -> c_int {
    if let Some(s) = shim() {
        // A freed receive request still completes; it can no longer be
        // counted at completion, so count it when freed would be wrong:
        // forget it (documented limitation: do not free pending receives).
        // SAFETY: inside an MPI call; the application's request.
        unsafe {
            match s.inner().reqs.remove(key(*r) as usize).map(Tracked::unpack) {
                Some(Tracked::Coll) => s.inner().pending_colls -= 1,
                Some(Tracked::Recv { world_src, .. }) if world_src < 0 => s.inner().any_source -= 1,
                _ => {}
            }
        }
    }
    // SAFETY: passed through.
    unsafe { PMPI_Request_free(r) }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Cancel(r: *mut Request) -> c_int {
    // Cancellation shows in the completion status, which `completed` checks
    // from now on.
    if let Some(s) = shim() {
        // SAFETY: inside an MPI call.
        unsafe { s.inner() }.cancel_seen = true;
    }
    // SAFETY: passed through.
    unsafe { PMPI_Cancel(r) }
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Comm_dup(c: Comm, out: *mut Comm) -> c_int {
    // SAFETY: passed through.
    let rc = unsafe { PMPI_Comm_dup(c, out) };
    if let (Some(s), SUCCESS) = (shim(), rc) {
        // SAFETY: MPI wrote *out.
        s.map_of(unsafe { *out });
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Comm_split(c: Comm, color: c_int, k: c_int, out: *mut Comm) -> c_int {
    if let Some(s) = shim() {
        s.poll();
    }
    // SAFETY: passed through.
    let rc = unsafe { PMPI_Comm_split(c, color, k, out) };
    if let (Some(s), SUCCESS) = (shim(), rc) {
        // SAFETY: MPI wrote *out.
        let o = unsafe { *out };
        // SAFETY: plain value.
        if o != unsafe { ckpt_abi_comm_null() } {
            s.map_of(o);
        }
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Comm_create(c: Comm, g: Group, out: *mut Comm) -> c_int {
    if let Some(s) = shim() {
        s.poll();
    }
    // SAFETY: passed through.
    let rc = unsafe { PMPI_Comm_create(c, g, out) };
    if let (Some(s), SUCCESS) = (shim(), rc) {
        // SAFETY: MPI wrote *out.
        let o = unsafe { *out };
        // SAFETY: plain value.
        if o != unsafe { ckpt_abi_comm_null() } {
            s.map_of(o);
        }
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn MPI_Comm_free(c: *mut Comm) -> c_int {
    if let Some(s) = shim() {
        // SAFETY: inside an MPI call; the application's communicator.
        unsafe {
            let inner = s.inner();
            let comm = *c;
            inner.comms.retain(|&x| x != comm);
            inner.stash.forget_comm(key(comm));
        }
    }
    // SAFETY: passed through (the attribute's delete callback frees the map).
    unsafe { PMPI_Comm_free(c) }
}

/// Blocking collective `$name` (run as `$piname` + polling while drains are
/// enabled) and its nonblocking variant `$iname` (tracked as pending).
macro_rules! collective {
    ($name:ident, $pname:ident, $iname:ident, $piname:ident, ($($a:ident : $t:ty),*)) => {
        extern "C" {
            fn $pname($($a: $t),*) -> c_int;
            fn $piname($($a: $t,)* r: *mut Request) -> c_int;
        }
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> c_int {
            match shim() {
                Some(s) if s.drain_enabled => {
                    s.poll();
                    let mut r = s.req_null;
                    // SAFETY: the application's arguments; our request.
                    unsafe {
                        let rc = $piname($($a,)* &mut r);
                        if rc != SUCCESS {
                            return rc;
                        }
                        s.wait_collective(&mut r)
                    }
                }
                // SAFETY: passed through.
                _ => unsafe { $pname($($a),*) },
            }
        }
        #[no_mangle]
        pub unsafe extern "C" fn $iname($($a: $t,)* r: *mut Request) -> c_int {
            if let Some(s) = shim() {
                s.poll();
            }
            // SAFETY: passed through.
            let rc = unsafe { $piname($($a,)* r) };
            if let (Some(s), SUCCESS) = (shim(), rc) {
                // SAFETY: MPI wrote *r.
                s.track(unsafe { *r }, Tracked::Coll);
            }
            rc
        }
    };
}

type Buf = *const c_void;
type MBuf = *mut c_void;
type Ints = *const c_int;

collective!(MPI_Barrier, PMPI_Barrier, MPI_Ibarrier, PMPI_Ibarrier, (c: Comm));
collective!(MPI_Bcast, PMPI_Bcast, MPI_Ibcast, PMPI_Ibcast,
    (b: MBuf, n: c_int, t: Datatype, root: c_int, c: Comm));
collective!(MPI_Reduce, PMPI_Reduce, MPI_Ireduce, PMPI_Ireduce,
    (sb: Buf, rb: MBuf, n: c_int, t: Datatype, op: Op, root: c_int, c: Comm));
collective!(MPI_Allreduce, PMPI_Allreduce, MPI_Iallreduce, PMPI_Iallreduce,
    (sb: Buf, rb: MBuf, n: c_int, t: Datatype, op: Op, c: Comm));
collective!(MPI_Gather, PMPI_Gather, MPI_Igather, PMPI_Igather,
    (sb: Buf, sn: c_int, st: Datatype, rb: MBuf, rn: c_int, rt: Datatype, root: c_int, c: Comm));
collective!(MPI_Gatherv, PMPI_Gatherv, MPI_Igatherv, PMPI_Igatherv,
    (sb: Buf, sn: c_int, st: Datatype, rb: MBuf, rns: Ints, displs: Ints, rt: Datatype, root: c_int, c: Comm));
collective!(MPI_Scatter, PMPI_Scatter, MPI_Iscatter, PMPI_Iscatter,
    (sb: Buf, sn: c_int, st: Datatype, rb: MBuf, rn: c_int, rt: Datatype, root: c_int, c: Comm));
collective!(MPI_Scatterv, PMPI_Scatterv, MPI_Iscatterv, PMPI_Iscatterv,
    (sb: Buf, sns: Ints, displs: Ints, st: Datatype, rb: MBuf, rn: c_int, rt: Datatype, root: c_int, c: Comm));
collective!(MPI_Allgather, PMPI_Allgather, MPI_Iallgather, PMPI_Iallgather,
    (sb: Buf, sn: c_int, st: Datatype, rb: MBuf, rn: c_int, rt: Datatype, c: Comm));
collective!(MPI_Allgatherv, PMPI_Allgatherv, MPI_Iallgatherv, PMPI_Iallgatherv,
    (sb: Buf, sn: c_int, st: Datatype, rb: MBuf, rns: Ints, displs: Ints, rt: Datatype, c: Comm));
collective!(MPI_Alltoall, PMPI_Alltoall, MPI_Ialltoall, PMPI_Ialltoall,
    (sb: Buf, sn: c_int, st: Datatype, rb: MBuf, rn: c_int, rt: Datatype, c: Comm));
collective!(MPI_Alltoallv, PMPI_Alltoallv, MPI_Ialltoallv, PMPI_Ialltoallv,
    (sb: Buf, sns: Ints, sd: Ints, st: Datatype, rb: MBuf, rns: Ints, rd: Ints, rt: Datatype, c: Comm));
collective!(MPI_Reduce_scatter, PMPI_Reduce_scatter, MPI_Ireduce_scatter, PMPI_Ireduce_scatter,
    (sb: Buf, rb: MBuf, rns: Ints, t: Datatype, op: Op, c: Comm));
collective!(MPI_Scan, PMPI_Scan, MPI_Iscan, PMPI_Iscan,
    (sb: Buf, rb: MBuf, n: c_int, t: Datatype, op: Op, c: Comm));

/// Open MPI's Fortran bindings (mpif.h, `use mpi`, `use mpi_f08`) call
/// `PMPI_*` directly, so the shim would neither count nor drain a Fortran
/// rank: refuse at MPI_INIT with a clear message instead of producing an
/// unsafe checkpoint. (MPICH's Fortran bindings call the C `MPI_*`
/// functions, which the shim interposes: nothing to do there.)
#[cfg(feature = "openmpi")]
mod fortran {
    fn refuse() -> ! {
        eprintln!(
            "ckpt-mpi-shim: this is a Fortran MPI program on Open MPI, whose Fortran \
             bindings call PMPI_* directly and bypass the drain shim; ckpt cannot \
             checkpoint it consistently. Run it without the shim (no checkpoints of \
             in-flight MPI traffic) or build it with MPICH."
        );
        std::process::exit(70)
    }
    macro_rules! refuse_fortran {
        ($($name:ident),*) => {$(
            #[no_mangle]
            pub extern "C" fn $name() {
                refuse()
            }
        )*};
    }
    refuse_fortran!(
        mpi_init,
        mpi_init_,
        mpi_init__,
        MPI_INIT,
        mpi_init_thread,
        mpi_init_thread_,
        mpi_init_thread__,
        MPI_INIT_THREAD,
        ompi_init_f,
        ompi_init_thread_f
    );
}
