//! The MPI ABI (handle types, MPI_Status layout, constants) for the
//! implementation selected by the cargo feature, and the PMPI entry points
//! the shim forwards to. csrc/abi.c checks these facts against mpi.h at
//! build time.
#![allow(non_snake_case, dead_code)]

use std::ffi::{c_char, c_int, c_void};

#[cfg(feature = "openmpi")]
mod abi {
    use std::ffi::{c_int, c_void};
    pub type Handle = *mut c_void;
    pub const ANY_SOURCE: c_int = -1;
    pub const PROC_NULL: c_int = -2;
    /// Open MPI's public MPI_Status.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Status {
        pub source: c_int,
        pub tag: c_int,
        pub error: c_int,
        pub cancelled: c_int,
        pub ucount: usize,
    }
    pub const ZERO_STATUS: Status = Status {
        source: 0,
        tag: 0,
        error: 0,
        cancelled: 0,
        ucount: 0,
    };
    pub fn key(h: Handle) -> u64 {
        h as usize as u64
    }
}

#[cfg(feature = "mpich")]
mod abi {
    use std::ffi::c_int;
    pub type Handle = c_int;
    pub const ANY_SOURCE: c_int = -2;
    pub const PROC_NULL: c_int = -1;
    /// MPICH's MPI_Status.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Status {
        pub count_lo: c_int,
        pub count_hi_and_cancelled: c_int,
        pub source: c_int,
        pub tag: c_int,
        pub error: c_int,
    }
    pub const ZERO_STATUS: Status = Status {
        count_lo: 0,
        count_hi_and_cancelled: 0,
        source: 0,
        tag: 0,
        error: 0,
    };
    pub fn key(h: Handle) -> u64 {
        h as u32 as u64
    }
}

pub use abi::*;
pub type Comm = Handle;
pub type Datatype = Handle;
pub type Request = Handle;
pub type Op = Handle;
pub type Group = Handle;
pub type Message = Handle;
pub type Count = i64;
pub type Aint = isize;
pub const ANY_TAG: c_int = -1;
pub const SUCCESS: c_int = 0;
pub const THREAD_SERIALIZED: c_int = 2;
pub const THREAD_MULTIPLE: c_int = 3;

pub type GrequestQuery = unsafe extern "C" fn(*mut c_void, *mut Status) -> c_int;
pub type GrequestFree = unsafe extern "C" fn(*mut c_void) -> c_int;
pub type GrequestCancel = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
pub type DeleteFn = unsafe extern "C" fn(Comm, c_int, *mut c_void, *mut c_void) -> c_int;
pub type CopyFn =
    unsafe extern "C" fn(Comm, c_int, *mut c_void, *mut c_void, *mut c_void, *mut c_int) -> c_int;

extern "C" {
    // csrc/abi.c
    pub fn ckpt_abi_comm_world() -> Comm;
    pub fn ckpt_abi_comm_null() -> Comm;
    pub fn ckpt_abi_request_null() -> Request;
    pub fn ckpt_abi_byte() -> Datatype;
    pub fn ckpt_abi_uint64() -> Datatype;
    pub fn ckpt_abi_int() -> Datatype;
    pub fn ckpt_abi_op_max() -> Op;
    pub fn ckpt_abi_status_ignore() -> *mut Status;
    pub fn ckpt_abi_statuses_ignore() -> *mut Status;
    pub fn ckpt_abi_undefined() -> c_int;

    pub fn PMPI_Init(argc: *mut c_int, argv: *mut *mut *mut c_char) -> c_int;
    pub fn PMPI_Init_thread(
        argc: *mut c_int,
        argv: *mut *mut *mut c_char,
        required: c_int,
        provided: *mut c_int,
    ) -> c_int;
    pub fn PMPI_Finalize() -> c_int;
    pub fn PMPI_Abort(comm: Comm, code: c_int) -> c_int;
    pub fn PMPI_Comm_rank(comm: Comm, rank: *mut c_int) -> c_int;
    pub fn PMPI_Comm_size(comm: Comm, size: *mut c_int) -> c_int;
    pub fn PMPI_Comm_group(comm: Comm, g: *mut Group) -> c_int;
    pub fn PMPI_Comm_remote_group(comm: Comm, g: *mut Group) -> c_int;
    pub fn PMPI_Comm_test_inter(comm: Comm, flag: *mut c_int) -> c_int;
    pub fn PMPI_Group_size(g: Group, size: *mut c_int) -> c_int;
    pub fn PMPI_Group_translate_ranks(
        g1: Group,
        n: c_int,
        r1: *const c_int,
        g2: Group,
        r2: *mut c_int,
    ) -> c_int;
    pub fn PMPI_Group_free(g: *mut Group) -> c_int;
    pub fn PMPI_Comm_create_keyval(
        copy: Option<CopyFn>,
        delete: Option<DeleteFn>,
        keyval: *mut c_int,
        extra: *mut c_void,
    ) -> c_int;
    pub fn PMPI_Comm_set_attr(comm: Comm, keyval: c_int, val: *mut c_void) -> c_int;
    pub fn PMPI_Comm_get_attr(
        comm: Comm,
        keyval: c_int,
        val: *mut c_void,
        flag: *mut c_int,
    ) -> c_int;

    pub fn PMPI_Send(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
    ) -> c_int;
    pub fn PMPI_Ssend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
    ) -> c_int;
    pub fn PMPI_Bsend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
    ) -> c_int;
    pub fn PMPI_Rsend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
    ) -> c_int;
    pub fn PMPI_Isend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Issend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Ibsend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Irsend(
        b: *const c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        tag: c_int,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Recv(
        b: *mut c_void,
        n: c_int,
        t: Datatype,
        s: c_int,
        tag: c_int,
        c: Comm,
        st: *mut Status,
    ) -> c_int;
    pub fn PMPI_Irecv(
        b: *mut c_void,
        n: c_int,
        t: Datatype,
        s: c_int,
        tag: c_int,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Sendrecv(
        sb: *const c_void,
        sn: c_int,
        st: Datatype,
        d: c_int,
        stag: c_int,
        rb: *mut c_void,
        rn: c_int,
        rt: Datatype,
        s: c_int,
        rtag: c_int,
        c: Comm,
        status: *mut Status,
    ) -> c_int;
    pub fn PMPI_Sendrecv_replace(
        b: *mut c_void,
        n: c_int,
        t: Datatype,
        d: c_int,
        stag: c_int,
        s: c_int,
        rtag: c_int,
        c: Comm,
        status: *mut Status,
    ) -> c_int;
    pub fn PMPI_Probe(s: c_int, tag: c_int, c: Comm, st: *mut Status) -> c_int;
    pub fn PMPI_Iprobe(s: c_int, tag: c_int, c: Comm, flag: *mut c_int, st: *mut Status) -> c_int;
    pub fn PMPI_Test(r: *mut Request, flag: *mut c_int, st: *mut Status) -> c_int;
    pub fn PMPI_Testall(n: c_int, r: *mut Request, flag: *mut c_int, st: *mut Status) -> c_int;
    pub fn PMPI_Testany(
        n: c_int,
        r: *mut Request,
        idx: *mut c_int,
        flag: *mut c_int,
        st: *mut Status,
    ) -> c_int;
    pub fn PMPI_Testsome(
        n: c_int,
        r: *mut Request,
        outn: *mut c_int,
        idx: *mut c_int,
        st: *mut Status,
    ) -> c_int;
    pub fn PMPI_Wait(r: *mut Request, st: *mut Status) -> c_int;
    pub fn PMPI_Waitall(n: c_int, r: *mut Request, st: *mut Status) -> c_int;
    pub fn PMPI_Waitany(n: c_int, r: *mut Request, idx: *mut c_int, st: *mut Status) -> c_int;
    pub fn PMPI_Waitsome(
        n: c_int,
        r: *mut Request,
        outn: *mut c_int,
        idx: *mut c_int,
        st: *mut Status,
    ) -> c_int;
    pub fn PMPI_Request_get_status(r: Request, flag: *mut c_int, st: *mut Status) -> c_int;
    pub fn PMPI_Cancel(r: *mut Request) -> c_int;
    pub fn PMPI_Request_free(r: *mut Request) -> c_int;
    pub fn PMPI_Test_cancelled(st: *const Status, flag: *mut c_int) -> c_int;
    pub fn PMPI_Get_count(st: *const Status, t: Datatype, n: *mut c_int) -> c_int;
    pub fn PMPI_Status_set_elements_x(st: *mut Status, t: Datatype, n: Count) -> c_int;
    pub fn PMPI_Status_set_cancelled(st: *mut Status, flag: c_int) -> c_int;
    pub fn PMPI_Unpack(
        inbuf: *const c_void,
        insize: c_int,
        pos: *mut c_int,
        out: *mut c_void,
        outcount: c_int,
        t: Datatype,
        c: Comm,
    ) -> c_int;
    pub fn PMPI_Grequest_start(
        q: GrequestQuery,
        f: GrequestFree,
        c: GrequestCancel,
        extra: *mut c_void,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Grequest_complete(r: Request) -> c_int;

    pub fn PMPI_Comm_dup(c: Comm, out: *mut Comm) -> c_int;
    pub fn PMPI_Comm_split(c: Comm, color: c_int, key: c_int, out: *mut Comm) -> c_int;
    pub fn PMPI_Comm_create(c: Comm, g: Group, out: *mut Comm) -> c_int;
    pub fn PMPI_Comm_free(c: *mut Comm) -> c_int;

    pub fn PMPI_Ialltoall(
        sb: *const c_void,
        sn: c_int,
        st: Datatype,
        rb: *mut c_void,
        rn: c_int,
        rt: Datatype,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Iallreduce(
        sb: *const c_void,
        rb: *mut c_void,
        n: c_int,
        t: Datatype,
        op: Op,
        c: Comm,
        r: *mut Request,
    ) -> c_int;
    pub fn PMPI_Ibarrier(c: Comm, r: *mut Request) -> c_int;
}

extern "C" {
    pub fn PMPI_Type_size(t: Datatype, size: *mut c_int) -> c_int;
}
