/* Shared helpers for the ckpt test workloads.
 *
 * Contract (see examples/README.md): `prog <workdir> [steps]`, one line
 * `step <n> <value>` per step on stdout (flushed), ~100 ms sleep per step,
 * `RESULT <16 hex digits>` at the end, exit 0.  Any self-check failure prints
 * `FAIL <what>` to stderr and exits 1.  Stdout never depends on PIDs, time,
 * addresses or scheduling, so it is byte-identical however the run is
 * checkpointed and restored.
 */
#ifndef CKPT_EXAMPLES_COMMON_H
#define CKPT_EXAMPLES_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STEP_MS 100
#define DEFAULT_STEPS 30

static uint64_t g_ck = 0xcbf29ce484222325ULL; /* FNV-1a offset basis */

static inline uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* Endian-independent: hash the little-endian bytes of v. */
static inline uint64_t fnv1a_u64(uint64_t h, uint64_t v)
{
	unsigned char b[8];
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	return fnv1a(h, b, 8);
}

static inline void ck_bytes(const void *p, size_t n) { g_ck = fnv1a(g_ck, p, n); }
static inline void ck_u64(uint64_t v) { g_ck = fnv1a_u64(g_ck, v); }

static inline uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* A deterministic byte stream: byte at position pos of stream `seed`. */
static inline unsigned char stream_byte(uint64_t seed, uint64_t pos)
{
	uint64_t w = splitmix64(seed * 0x9e3779b97f4a7c15ULL + (pos >> 3));
	return (unsigned char)(w >> (8 * (pos & 7)));
}

static inline void stream_fill(uint64_t seed, uint64_t pos, void *buf, size_t n)
{
	unsigned char *b = buf;
	size_t i = 0;
	while (i < n) {
		uint64_t p = pos + i;
		uint64_t w = splitmix64(seed * 0x9e3779b97f4a7c15ULL + (p >> 3));
		for (unsigned k = (unsigned)(p & 7); k < 8 && i < n; k++, i++)
			b[i] = (unsigned char)(w >> (8 * k));
	}
}

/* Returns the offset of the first mismatch, or -1 if buf matches the stream. */
static inline long stream_check(uint64_t seed, uint64_t pos, const void *buf, size_t n)
{
	unsigned char tmp[4096];
	const unsigned char *b = buf;
	for (size_t off = 0; off < n; off += sizeof tmp) {
		size_t len = n - off < sizeof tmp ? n - off : sizeof tmp;
		stream_fill(seed, pos + off, tmp, len);
		if (memcmp(tmp, b + off, len) != 0) {
			for (size_t i = 0; i < len; i++)
				if (tmp[i] != b[off + i])
					return (long)(off + i);
		}
	}
	return -1;
}

__attribute__((noreturn, format(printf, 1, 2)))
static void fail(const char *fmt, ...)
{
	va_list ap;
	fputs("FAIL ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
	/* stdout is flushed after every line; _exit is safe in children too */
	_exit(1);
}

#define FAIL_ERRNO(what) fail("%s: %s", (what), strerror(errno))

/* Sleep ms milliseconds of (monotonic, relative) time; robust to EINTR. */
static inline void nap_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L }, rem;
	while (nanosleep(&ts, &rem) == -1) {
		if (errno != EINTR)
			FAIL_ERRNO("nanosleep");
		ts = rem;
	}
}

static inline void step_pause(void) { nap_ms(STEP_MS); }

static inline void parse_args(int argc, char **argv, const char **workdir, int *steps)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s <workdir> [steps]\n", argv[0]);
		exit(2);
	}
	*workdir = argv[1];
	*steps = DEFAULT_STEPS;
	if (argc == 3) {
		char *end;
		long v = strtol(argv[2], &end, 10);
		if (*end || v < 1 || v > 1000000) {
			fprintf(stderr, "bad step count: %s\n", argv[2]);
			exit(2);
		}
		*steps = (int)v;
	}
}

/* Print `step <n> <value>` (value as 16 hex digits) and fold it into the checksum. */
static inline void step_line(int n, uint64_t v)
{
	ck_u64((uint64_t)n);
	ck_u64(v);
	if (printf("step %d %016llx\n", n, (unsigned long long)v) < 0 || fflush(stdout) != 0)
		FAIL_ERRNO("write stdout");
}

static inline void result_line(void)
{
	if (printf("RESULT %016llx\n", (unsigned long long)g_ck) < 0 || fflush(stdout) != 0)
		FAIL_ERRNO("write stdout");
}

/* Full read: returns bytes read, short only on EOF. */
static inline size_t readn(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, (char *)buf + got, n - got);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			FAIL_ERRNO("read");
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return got;
}

static inline void readall(int fd, void *buf, size_t n, const char *what)
{
	size_t got = readn(fd, buf, n);
	if (got != n)
		fail("%s: short read (%zu of %zu bytes, EOF)", what, got, n);
}

static inline void writeall(int fd, const void *buf, size_t n, const char *what)
{
	size_t done = 0;
	while (done < n) {
		ssize_t w = write(fd, (const char *)buf + done, n - done);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			fail("%s: write: %s", what, strerror(errno));
		}
		done += (size_t)w;
	}
}

/* fork with stdio flushed; the child dies with its parent (PDEATHSIG survives CRIU). */
static inline pid_t xfork(void)
{
	fflush(NULL);
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid < 0)
		FAIL_ERRNO("fork");
	if (pid == 0) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
			FAIL_ERRNO("prctl(PR_SET_PDEATHSIG)");
		if (getppid() != parent)
			_exit(1);
	}
	return pid;
}

/* Wait for pid and require a clean exit 0. */
static inline void wait_ok(pid_t pid, const char *what)
{
	int st;
	while (waitpid(pid, &st, 0) < 0) {
		if (errno != EINTR)
			fail("waitpid %s: %s", what, strerror(errno));
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		if (WIFSIGNALED(st))
			fail("%s killed by signal %d", what, WTERMSIG(st));
		fail("%s exited with status %d", what, WEXITSTATUS(st));
	}
}

#endif
