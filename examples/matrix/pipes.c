/* pipes: a producer child streams a deterministic byte sequence into a pipe
 * (enlarged with F_SETPIPE_SZ) as fast as it can; the parent reads one chunk
 * per step and verifies every byte.  Because the producer is always ahead,
 * the pipe buffer is full (data in flight) whenever a checkpoint lands. */
#include "common.h"
#include <fcntl.h>

#define CHUNK 24000      /* bytes consumed per step (deliberately not page aligned) */
#define WBLOCK 3001      /* producer write size */
#define PIPE_SZ (128 * 1024)
#define SEED 0x5049504553ULL

int main(int argc, char **argv)
{
	const char *workdir;
	int steps;
	parse_args(argc, argv, &workdir, &steps);
	(void)workdir;

	int p[2];
	if (pipe(p) != 0)
		FAIL_ERRNO("pipe");
	if (fcntl(p[1], F_SETPIPE_SZ, PIPE_SZ) < 0)
		FAIL_ERRNO("F_SETPIPE_SZ");
	int pipe_sz = fcntl(p[0], F_GETPIPE_SZ);
	if (pipe_sz < PIPE_SZ)
		fail("pipe size %d < %d", pipe_sz, PIPE_SZ);
	uint64_t total = (uint64_t)steps * CHUNK;

	pid_t child = xfork();
	if (child == 0) {
		close(p[0]);
		unsigned char buf[WBLOCK];
		for (uint64_t pos = 0; pos < total;) {
			size_t n = total - pos < WBLOCK ? (size_t)(total - pos) : WBLOCK;
			stream_fill(SEED, pos, buf, n);
			writeall(p[1], buf, n, "producer");
			pos += n;
		}
		close(p[1]);
		_exit(0);
	}
	close(p[1]);

	static unsigned char buf[CHUNK];
	for (int n = 1; n <= steps; n++) {
		uint64_t pos = (uint64_t)(n - 1) * CHUNK;
		readall(p[0], buf, CHUNK, "consumer");
		long bad = stream_check(SEED, pos, buf, CHUNK);
		if (bad >= 0)
			fail("pipe data mismatch at stream offset %llu", (unsigned long long)(pos + (uint64_t)bad));
		if (fcntl(p[0], F_GETPIPE_SZ) != pipe_sz)
			fail("pipe size changed");
		step_line(n, fnv1a(0xcbf29ce484222325ULL, buf, CHUNK));
		step_pause();
	}
	char extra;
	if (readn(p[0], &extra, 1) != 0)
		fail("producer wrote more than expected");
	close(p[0]);
	wait_ok(child, "producer");
	result_line();
	return 0;
}
