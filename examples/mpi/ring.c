/* ring <workdir> [steps]: MPI ring + allreduce.  Each step every rank sends
 * its vector of 1024 doubles to the next rank (MPI_Isend/MPI_Irecv +
 * MPI_Waitall), checks what it received against a local model of every
 * rank's vector, updates its vector deterministically, and all ranks
 * MPI_Allreduce the sum of their vectors.  All values are integers held
 * exactly in doubles (< 2^53), so results are bit-identical regardless of the
 * reduction order, i.e. the same for Open MPI and MPICH.  Rank 0 prints
 * `step <n> <sum>` and finally `RESULT <checksum>`; every rank sleeps 100 ms
 * per step.  Works with any number of ranks (1 included). */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N 1024
#define MOD 1000003.0

static int rank = 0;

__attribute__((noreturn, format(printf, 1, 2)))
static void die(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fprintf(stderr, "FAIL rank %d: %s\n", rank, msg);
	fflush(stderr);
	MPI_Abort(MPI_COMM_WORLD, 1);
	exit(1);
}

static void check_mpi(int rc, const char *what)
{
	if (rc != MPI_SUCCESS) {
		char s[MPI_MAX_ERROR_STRING];
		int len = 0;
		MPI_Error_string(rc, s, &len);
		die("%s: %s", what, s);
	}
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static uint64_t fnv_u64(uint64_t h, uint64_t v)
{
	unsigned char b[8];
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	return fnv(h, b, 8);
}

static void nap_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L }, rem;
	while (nanosleep(&ts, &rem) == -1) {
		if (errno != EINTR)
			die("nanosleep: %s", strerror(errno));
		ts = rem;
	}
}

static double upd(double x, int step, int r, int i)
{
	return fmod(x * 3.0 + (double)step * 7.0 + (double)r + (double)i, MOD);
}

int main(int argc, char **argv)
{
	MPI_Init(&argc, &argv);
	MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
	int size;
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	if (argc < 2 || argc > 3) {
		if (rank == 0)
			fprintf(stderr, "usage: %s <workdir> [steps]\n", argv[0]);
		MPI_Finalize();
		return 2;
	}
	int steps = 30;
	if (argc == 3) {
		char *end;
		long v = strtol(argv[2], &end, 10);
		if (*end || v < 1 || v > 1000000)
			die("bad step count %s", argv[2]);
		steps = (int)v;
	}
	int next = (rank + 1) % size, prev = (rank + size - 1) % size;

	/* model[r*N + i]: what rank r's vector must hold */
	double *model = malloc(sizeof(double) * N * (size_t)size);
	double *nmodel = malloc(sizeof(double) * N * (size_t)size);
	double *v = malloc(sizeof(double) * N), *r = malloc(sizeof(double) * N);
	if (!model || !nmodel || !v || !r)
		die("malloc");
	for (int k = 0; k < size; k++)
		for (int i = 0; i < N; i++)
			model[(size_t)k * N + i] = (double)(((uint64_t)k * 1315423911u + (uint64_t)i * 2654435761u) % 1000003u);
	memcpy(v, model + (size_t)rank * N, sizeof(double) * N);

	uint64_t ck = 0xcbf29ce484222325ULL;
	for (int step = 1; step <= steps; step++) {
		MPI_Request req[2];
		MPI_Status sts[2];
		check_mpi(MPI_Irecv(r, N, MPI_DOUBLE, prev, step % 32768, MPI_COMM_WORLD, &req[0]), "MPI_Irecv");
		check_mpi(MPI_Isend(v, N, MPI_DOUBLE, next, step % 32768, MPI_COMM_WORLD, &req[1]), "MPI_Isend");
		check_mpi(MPI_Waitall(2, req, sts), "MPI_Waitall");

		if (memcmp(r, model + (size_t)prev * N, sizeof(double) * N) != 0)
			die("step %d: vector received from rank %d differs from the model", step, prev);
		/* rank k's new vector is computed from what it received (rank k-1's) */
		double total = 0.0;
		for (int k = 0; k < size; k++) {
			int kp = (k + size - 1) % size;
			for (int i = 0; i < N; i++) {
				double x = upd(model[(size_t)kp * N + i], step, k, i);
				nmodel[(size_t)k * N + i] = x;
				total += x;
			}
		}
		double *t = model;
		model = nmodel;
		nmodel = t;
		double local = 0.0;
		for (int i = 0; i < N; i++) {
			v[i] = upd(r[i], step, rank, i);
			local += v[i];
		}
		if (memcmp(v, model + (size_t)rank * N, sizeof(double) * N) != 0)
			die("step %d: local update differs from the model", step);

		double global = 0.0;
		check_mpi(MPI_Allreduce(&local, &global, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
		if (global != total)
			die("step %d: allreduce gave %.0f, expected %.0f", step, global, total);
		uint64_t g = (uint64_t)global;
		ck = fnv_u64(fnv_u64(ck, (uint64_t)step), g);
		if (rank == 0) {
			printf("step %d %" PRIu64 "\n", step, g);
			fflush(stdout);
		}
		nap_ms(100);
	}

	/* every rank's final vector goes into the result */
	uint64_t mine = fnv_u64(fnv(0xcbf29ce484222325ULL, v, sizeof(double) * N), (uint64_t)rank), all = 0;
	check_mpi(MPI_Allreduce(&mine, &all, 1, MPI_UINT64_T, MPI_BXOR, MPI_COMM_WORLD), "MPI_Allreduce BXOR");
	if (rank == 0) {
		ck = fnv_u64(fnv_u64(ck, all), (uint64_t)size);
		printf("RESULT %016" PRIx64 "\n", ck);
		fflush(stdout);
	}
	free(model);
	free(nmodel);
	free(v);
	free(r);
	MPI_Finalize();
	return 0;
}
