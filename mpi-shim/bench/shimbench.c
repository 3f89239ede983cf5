/* shimbench rate|bw <seconds>: 2-rank point-to-point benchmark for the
 * shim's overhead.  `rate`: rank 0 sends windows of 64 8-byte messages
 * (MPI_Isend, receiver MPI_Irecv, both MPI_Waitall), then waits for a 4-byte
 * ack: prints `rate <messages per second>`.  `bw`: the same with windows of
 * 16 1 MiB messages: prints `bw <MiB per second>`.  Runs windows for about
 * <seconds> after a warm-up (rank 0 decides, tells rank 1 through the
 * ack). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
	MPI_Init(&argc, &argv);
	int rank, size;
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	if (argc < 3 || size != 2 || (strcmp(argv[1], "rate") && strcmp(argv[1], "bw"))) {
		if (rank == 0)
			fprintf(stderr, "usage: mpirun -np 2 shimbench rate|bw <seconds>\n");
		MPI_Abort(MPI_COMM_WORLD, 2);
	}
	int bw = strcmp(argv[1], "bw") == 0;
	double secs = atof(argv[2]);
	int window = bw ? 16 : 64;
	int len = bw ? 1 << 20 : 8;
	char *buf = malloc((size_t)window * (size_t)len);
	memset(buf, rank, (size_t)window * (size_t)len);
	MPI_Request req[64];
	long windows = 0;
	int go = 1;
	/* warm-up (rank 0 decides, rank 1 follows window by window): 20% of the
	 * run, at least 50 ms, so that free lists, caches and the shim's table
	 * are in their steady state before timing starts */
	double warm = secs / 5 > 0.05 ? secs / 5 : 0.05;
	double tw = MPI_Wtime(), t0 = 0;
	int timing = 0;
	for (;;) {
		if (rank == 0 && !timing && MPI_Wtime() - tw >= warm) {
			timing = 1;
			t0 = MPI_Wtime();
			windows = 0;
		}
		for (int i = 0; i < window; i++) {
			if (rank == 0)
				MPI_Isend(buf + (size_t)i * len, len, MPI_BYTE, 1, i, MPI_COMM_WORLD, &req[i]);
			else
				MPI_Irecv(buf + (size_t)i * len, len, MPI_BYTE, 0, i, MPI_COMM_WORLD, &req[i]);
		}
		MPI_Waitall(window, req, MPI_STATUSES_IGNORE);
		windows++;
		if (rank == 0) {
			go = !timing || MPI_Wtime() - t0 < secs;
			MPI_Recv(&go, 0, MPI_INT, 1, 999, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			MPI_Send(&go, 1, MPI_INT, 1, 998, MPI_COMM_WORLD);
		} else {
			MPI_Send(&go, 0, MPI_INT, 0, 999, MPI_COMM_WORLD);
			MPI_Recv(&go, 1, MPI_INT, 0, 998, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
		}
		if (!go)
			break;
	}
	double dt = MPI_Wtime() - t0;
	if (rank == 0) {
		if (bw)
			printf("bw %.1f\n", (double)windows * window * (len / 1048576.0) / dt);
		else
			printf("rate %.0f\n", (double)windows * window / dt);
	}
	free(buf);
	MPI_Finalize();
	return 0;
}
