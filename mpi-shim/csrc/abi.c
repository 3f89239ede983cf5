/* ABI facts for the Rust side of the shim, compiled with the MPI's own
 * headers: handle constants that are link-time symbols (Open MPI) and
 * compile-time checks of every layout/value the Rust code hard-codes. */
#include <mpi.h>
#include <stddef.h>

#if defined(OPEN_MPI)
_Static_assert(sizeof(MPI_Comm) == sizeof(void *), "Open MPI handles are pointers");
_Static_assert(sizeof(MPI_Status) == 24, "Open MPI MPI_Status is 24 bytes");
_Static_assert(offsetof(MPI_Status, MPI_SOURCE) == 0, "MPI_SOURCE offset");
_Static_assert(offsetof(MPI_Status, MPI_TAG) == 4, "MPI_TAG offset");
_Static_assert(MPI_ANY_SOURCE == -1 && MPI_PROC_NULL == -2, "Open MPI rank constants");
#elif defined(MPICH)
_Static_assert(sizeof(MPI_Comm) == sizeof(int), "MPICH handles are ints");
_Static_assert(sizeof(MPI_Status) == 20, "MPICH MPI_Status is 20 bytes");
_Static_assert(offsetof(MPI_Status, MPI_SOURCE) == 8, "MPI_SOURCE offset");
_Static_assert(offsetof(MPI_Status, MPI_TAG) == 12, "MPI_TAG offset");
_Static_assert(MPI_ANY_SOURCE == -2 && MPI_PROC_NULL == -1, "MPICH rank constants");
#else
#error "ckpt-mpi-shim supports Open MPI and MPICH only"
#endif
_Static_assert(MPI_ANY_TAG == -1, "MPI_ANY_TAG");
_Static_assert(MPI_THREAD_SINGLE == 0 && MPI_THREAD_FUNNELED == 1 &&
	       MPI_THREAD_SERIALIZED == 2 && MPI_THREAD_MULTIPLE == 3, "thread levels");
_Static_assert(MPI_SUCCESS == 0, "MPI_SUCCESS");

MPI_Comm ckpt_abi_comm_world(void) { return MPI_COMM_WORLD; }
MPI_Comm ckpt_abi_comm_null(void) { return MPI_COMM_NULL; }
MPI_Request ckpt_abi_request_null(void) { return MPI_REQUEST_NULL; }
MPI_Datatype ckpt_abi_byte(void) { return MPI_BYTE; }
MPI_Datatype ckpt_abi_uint64(void) { return MPI_UINT64_T; }
MPI_Datatype ckpt_abi_int(void) { return MPI_INT; }
MPI_Op ckpt_abi_op_max(void) { return MPI_MAX; }
MPI_Status *ckpt_abi_status_ignore(void) { return MPI_STATUS_IGNORE; }
MPI_Status *ckpt_abi_statuses_ignore(void) { return MPI_STATUSES_IGNORE; }
int ckpt_abi_undefined(void) { return MPI_UNDEFINED; }
