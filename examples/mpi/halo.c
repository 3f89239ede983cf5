/* halo [steps] [sleep_us] [skew_us]: nonblocking halo exchange with many messages in
 * flight.  Ranks form a ring; every step each rank posts LANES sends to each
 * neighbour (tags 0..LANES-1, sizes from 8 bytes to 256 KiB, so both eager
 * and rendezvous protocols are used), sleeps `sleep_us` (so most messages
 * arrive before their receive is posted: unexpected messages), then posts
 * the matching receives and waits for all of them with one MPI_Waitall.
 * Each rank folds what it received into its state with integer arithmetic,
 * so the result is bit-identical for any MPI and any timing.  The lanes use
 * MPI_COMM_WORLD, a duplicate and a rank-reversed split, and MPI_ANY_SOURCE
 * on odd lanes, so a drain sees every kind of matching.  Every 10 steps
 * the ranks MPI_Allreduce their state checksums; rank 0 prints
 * `step <n> <sum>` and finally `RESULT <checksum>`.  `skew_us`: rank 0
 * alone also sleeps that long at the start of every step and before every
 * MPI_Allreduce, so the others wait in receives and inside the collective
 * (the result does not change).  Defaults: 200 steps, 2000 us, 0 us. */
#define _GNU_SOURCE
#include <inttypes.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LANES 16
#define MAXWORDS (256 * 1024 / 8)

static int rank, size;

static void check(int rc, const char *what)
{
	if (rc != MPI_SUCCESS) {
		char s[MPI_MAX_ERROR_STRING];
		int len = 0;
		MPI_Error_string(rc, s, &len);
		fprintf(stderr, "FAIL rank %d: %s: %s\n", rank, what, s);
		MPI_Abort(MPI_COMM_WORLD, 1);
	}
}

/* words in lane l: 1, 2, 4, ... capped at MAXWORDS */
static int lane_words(int l)
{
	long w = 1L << l;
	return w > MAXWORDS ? MAXWORDS : (int)w;
}

/* rank of world rank w in lane l's communicator */
static int crank(int l, int w)
{
	return l % 3 == 2 ? size - 1 - w : w;
}

/* tag of what arrives from direction d in lane l: the sender sent it the
 * other way (tag = lane + LANES * sending direction) */
static int rtag(int l, int d)
{
	return l + (1 - d) * LANES;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	return x;
}

int main(int argc, char **argv)
{
	long steps = argc > 1 ? atol(argv[1]) : 200;
	long sleep_us = argc > 2 ? atol(argv[2]) : 2000;
	long skew_us = argc > 3 ? atol(argv[3]) : 0;
	check(MPI_Init(&argc, &argv), "MPI_Init");
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	int left = (rank + size - 1) % size, right = (rank + 1) % size;
	/* Lanes use three communicators: MPI_COMM_WORLD, a duplicate, and a
	 * split with the ranks reversed (comm rank = size-1-world rank); odd
	 * lanes receive with MPI_ANY_SOURCE.  Tags tell the directions apart. */
	MPI_Comm comms[3] = {MPI_COMM_WORLD, MPI_COMM_NULL, MPI_COMM_NULL};
	check(MPI_Comm_dup(MPI_COMM_WORLD, &comms[1]), "MPI_Comm_dup");
	check(MPI_Comm_split(MPI_COMM_WORLD, 0, size - 1 - rank, &comms[2]), "MPI_Comm_split");

	/* sendbuf[dir][lane], recvbuf[dir][lane]; dir 0 = to/from left */
	uint64_t *sbuf[2][LANES], *rbuf[2][LANES];
	for (int d = 0; d < 2; d++)
		for (int l = 0; l < LANES; l++) {
			sbuf[d][l] = calloc(MAXWORDS, 8);
			rbuf[d][l] = calloc(MAXWORDS, 8);
			if (!sbuf[d][l] || !rbuf[d][l]) {
				fprintf(stderr, "FAIL rank %d: out of memory\n", rank);
				MPI_Abort(MPI_COMM_WORLD, 1);
			}
		}
	uint64_t state = mix((uint64_t)rank + 1);

	for (long step = 1; step <= steps; step++) {
		MPI_Request req[4 * LANES];
		int nr = 0;
		if (rank == 0 && skew_us > 0)
			usleep((useconds_t)skew_us);
		for (int d = 0; d < 2; d++)
			for (int l = 0; l < LANES; l++) {
				int n = lane_words(l);
				for (int i = 0; i < n; i++)
					sbuf[d][l][i] = mix(state + (uint64_t)(d * LANES + l) * 1000003u + (uint64_t)i);
				check(MPI_Isend(sbuf[d][l], n, MPI_UINT64_T, crank(l, d == 0 ? left : right),
						l + d * LANES, comms[l % 3], &req[nr++]), "MPI_Isend");
			}
		if (sleep_us > 0)
			usleep((useconds_t)sleep_us);
		for (int d = 0; d < 2; d++)
			for (int l = 0; l < LANES; l++)
				/* from the left comes what the left sent rightwards */
				check(MPI_Irecv(rbuf[d][l], lane_words(l), MPI_UINT64_T,
						l % 2 ? MPI_ANY_SOURCE : crank(l, d == 0 ? left : right),
						rtag(l, d), comms[l % 3], &req[nr++]), "MPI_Irecv");
		MPI_Status st[4 * LANES];
		check(MPI_Waitall(nr, req, st), "MPI_Waitall");
		for (int d = 0; d < 2; d++)
			for (int l = 0; l < LANES; l++) {
				MPI_Status *s = &st[2 * LANES + d * LANES + l];
				int cnt = -1;
				MPI_Get_count(s, MPI_UINT64_T, &cnt);
				if (s->MPI_SOURCE != crank(l, d == 0 ? left : right) || s->MPI_TAG != rtag(l, d) ||
				    cnt != lane_words(l)) {
					fprintf(stderr, "FAIL rank %d: step %ld lane %d: status source %d tag %d count %d\n",
						rank, step, l, s->MPI_SOURCE, s->MPI_TAG, cnt);
					MPI_Abort(MPI_COMM_WORLD, 1);
				}
			}
		for (int d = 0; d < 2; d++)
			for (int l = 0; l < LANES; l++) {
				int n = lane_words(l);
				uint64_t acc = 0;
				for (int i = 0; i < n; i++)
					acc += rbuf[d][l][i] * (uint64_t)(i + 1);
				state = mix(state ^ acc ^ ((uint64_t)(d * LANES + l) << 40));
			}
		if (step % 10 == 0 || step == steps) {
			uint64_t sum = 0;
			if (rank == 0 && skew_us > 0)
				usleep((useconds_t)skew_us);
			check(MPI_Allreduce(&state, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD),
			      "MPI_Allreduce");
			if (rank == 0) {
				printf("step %ld %" PRIu64 "\n", step, sum);
				fflush(stdout);
			}
			if (step == steps && rank == 0)
				printf("RESULT %016" PRIx64 "\n", sum);
		}
	}
	fflush(stdout);
	MPI_Comm_free(&comms[1]);
	MPI_Comm_free(&comms[2]);
	MPI_Finalize();
	return 0;
}
