/* memhog <MiB> [seconds]: fill MiB of anonymous memory with a deterministic
 * pattern, print READY, then keep checking the pattern (a tenth of it every
 * ~100 ms tick, so all of it once per second) for <seconds> (default 3600,
 * counted in ticks, not wall-clock time, so a checkpoint/restore does not
 * shorten the run).  Prints only READY and a final `RESULT <checksum>`;
 * exits 1 with `FAIL ...` on stderr if the pattern is ever wrong. */
#include "matrix/common.h"
#include <sys/mman.h>

#define TICKS_PER_PASS 10

static inline uint64_t pattern(uint64_t i) { return splitmix64(i ^ 0xc0ffee0000000000ULL); }

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s <MiB> [seconds]\n", argv[0]);
		return 2;
	}
	char *end;
	long mib = strtol(argv[1], &end, 10);
	if (*end || mib < 1 || mib > (1L << 22)) {
		fprintf(stderr, "bad MiB: %s\n", argv[1]);
		return 2;
	}
	long seconds = 3600;
	if (argc == 3) {
		seconds = strtol(argv[2], &end, 10);
		if (*end || seconds < 0) {
			fprintf(stderr, "bad seconds: %s\n", argv[2]);
			return 2;
		}
	}
	size_t bytes = (size_t)mib << 20, nw = bytes / 8;
	uint64_t *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		FAIL_ERRNO("mmap");
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < nw; i++) {
		m[i] = pattern(i);
		h = (h ^ m[i]) * 0x100000001b3ULL;
	}
	printf("READY\n");
	fflush(stdout);

	size_t slice = (nw + TICKS_PER_PASS - 1) / TICKS_PER_PASS;
	long ticks = seconds * 10;
	for (long t = 0; t < ticks; t++) {
		size_t lo = (size_t)(t % TICKS_PER_PASS) * slice;
		size_t hi = lo + slice < nw ? lo + slice : nw;
		for (size_t i = lo; i < hi; i++)
			if (m[i] != pattern(i))
				fail("memhog: pattern wrong at byte offset %zu", i * 8);
		nap_ms(100);
	}
	/* final full pass, folded into the checksum */
	uint64_t h2 = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < nw; i++) {
		if (m[i] != pattern(i))
			fail("memhog: pattern wrong at byte offset %zu", i * 8);
		h2 = (h2 ^ m[i]) * 0x100000001b3ULL;
	}
	if (h2 != h)
		fail("memhog: checksum changed");
	printf("RESULT %016llx\n", (unsigned long long)fnv1a_u64(fnv1a_u64(0, h), (uint64_t)mib));
	fflush(stdout);
	return 0;
}
