/* files: regular-file state that a restore must reproduce exactly:
 *   input.dat   - created at start, reopened O_RDONLY and read progressively
 *                 (the file offset is checked every step);
 *   out.dat     - O_WRONLY, written sequentially with lseek+write, with a
 *                 header patched in place by pwrite every step;
 *   log.txt     - O_APPEND, one line per step (size checked with fstat);
 *   scratch.dat - created, unlinked, kept open O_RDWR; written with pwrite and
 *                 read back in full every step (CRIU must carry its content).
 * At the end the written files are re-read and their checksums printed. */
#include "common.h"
#include <fcntl.h>
#include <sys/stat.h>

#define IN_CHUNK 5000
#define OUT_CHUNK 6007
#define HDR 16
#define U_CHUNK 4219
#define SEED_IN 0x1f11eULL
#define SEED_OUT 0x0f11eULL
#define SEED_U 0x5c2a7cULL

static char *path(const char *dir, const char *name)
{
	char *p;
	if (asprintf(&p, "%s/%s", dir, name) < 0)
		fail("asprintf");
	return p;
}

static off_t cur(int fd, const char *what)
{
	off_t o = lseek(fd, 0, SEEK_CUR);
	if (o < 0)
		fail("lseek %s: %s", what, strerror(errno));
	return o;
}

static void pwriteall(int fd, const void *buf, size_t n, off_t off, const char *what)
{
	ssize_t w = pwrite(fd, buf, n, off);
	if (w != (ssize_t)n)
		fail("pwrite %s: %s", what, w < 0 ? strerror(errno) : "short");
}

static void preadall(int fd, void *buf, size_t n, off_t off, const char *what)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = pread(fd, (char *)buf + got, n - got, off + (off_t)got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			fail("pread %s: %s", what, r < 0 ? strerror(errno) : "EOF");
		got += (size_t)r;
	}
}

static unsigned char *slurp(const char *p, size_t *len)
{
	int fd = open(p, O_RDONLY);
	if (fd < 0)
		fail("open %s: %s", p, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) != 0)
		FAIL_ERRNO("fstat");
	unsigned char *buf = malloc((size_t)st.st_size + 1);
	if (!buf)
		fail("malloc");
	readall(fd, buf, (size_t)st.st_size, p);
	close(fd);
	*len = (size_t)st.st_size;
	return buf;
}

static void put_le64(unsigned char *b, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
}

int main(int argc, char **argv)
{
	const char *wd;
	int steps;
	parse_args(argc, argv, &wd, &steps);
	char *p_in = path(wd, "input.dat"), *p_out = path(wd, "out.dat");
	char *p_log = path(wd, "log.txt"), *p_u = path(wd, "scratch.dat");
	size_t in_total = (size_t)steps * IN_CHUNK;
	size_t u_total = (size_t)steps * U_CHUNK;
	unsigned char *big = malloc(in_total > u_total ? in_total : u_total);
	unsigned char *ubuf = malloc(u_total);
	if (!big || !ubuf)
		fail("malloc");

	/* create the input file, then reopen it read-only */
	int fd = open(p_in, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		fail("create %s: %s", p_in, strerror(errno));
	stream_fill(SEED_IN, 0, big, in_total);
	writeall(fd, big, in_total, "input.dat");
	if (fsync(fd) != 0 || close(fd) != 0)
		FAIL_ERRNO("close input.dat");
	int fin = open(p_in, O_RDONLY);
	int fout = open(p_out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	int flog = open(p_log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	int fu = open(p_u, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fin < 0 || fout < 0 || flog < 0 || fu < 0)
		FAIL_ERRNO("open work files");
	if (unlink(p_u) != 0)
		FAIL_ERRNO("unlink scratch.dat");

	char *logmodel = malloc((size_t)steps * 64 + 1);
	if (!logmodel)
		fail("malloc");
	size_t loglen = 0;
	uint64_t running = 0;

	for (int n = 0; n < steps; n++) {
		unsigned char chunk[OUT_CHUNK > IN_CHUNK ? OUT_CHUNK : IN_CHUNK];

		/* progressive read; the offset must be where we left it */
		if (cur(fin, "input.dat") != (off_t)n * IN_CHUNK)
			fail("input.dat offset wrong at step %d", n + 1);
		readall(fin, chunk, IN_CHUNK, "input.dat");
		if (stream_check(SEED_IN, (uint64_t)n * IN_CHUNK, chunk, IN_CHUNK) >= 0)
			fail("input.dat content wrong at step %d", n + 1);
		uint64_t hin = fnv1a(0, chunk, IN_CHUNK);

		/* sequential write + in-place header */
		off_t want = n == 0 ? 0 : HDR + (off_t)n * OUT_CHUNK;
		if (cur(fout, "out.dat") != want)
			fail("out.dat offset wrong at step %d", n + 1);
		if (lseek(fout, HDR + (off_t)n * OUT_CHUNK, SEEK_SET) != HDR + (off_t)n * OUT_CHUNK)
			FAIL_ERRNO("lseek out.dat");
		stream_fill(SEED_OUT, (uint64_t)n * OUT_CHUNK, chunk, OUT_CHUNK);
		writeall(fout, chunk, OUT_CHUNK, "out.dat");
		running = fnv1a(running, chunk, OUT_CHUNK);
		unsigned char hdr[HDR];
		put_le64(hdr, (uint64_t)n + 1);
		put_le64(hdr + 8, running);
		pwriteall(fout, hdr, HDR, 0, "out.dat header");

		/* append-only log */
		char line[64];
		int ll = snprintf(line, sizeof line, "step %d %016llx\n", n + 1, (unsigned long long)(hin ^ running));
		writeall(flog, line, (size_t)ll, "log.txt");
		memcpy(logmodel + loglen, line, (size_t)ll);
		loglen += (size_t)ll;
		struct stat st;
		if (fstat(flog, &st) != 0 || st.st_size != (off_t)loglen)
			fail("log.txt size wrong at step %d", n + 1);

		/* unlinked file: write the next chunk, read everything back */
		if (fstat(fu, &st) != 0 || st.st_nlink != 0 || st.st_size != (off_t)n * U_CHUNK)
			fail("unlinked scratch file state wrong at step %d", n + 1);
		stream_fill(SEED_U, (uint64_t)n * U_CHUNK, big, U_CHUNK);
		pwriteall(fu, big, U_CHUNK, (off_t)n * U_CHUNK, "scratch.dat");
		preadall(fu, ubuf, (size_t)(n + 1) * U_CHUNK, 0, "scratch.dat");
		if (stream_check(SEED_U, 0, ubuf, (size_t)(n + 1) * U_CHUNK) >= 0)
			fail("unlinked file content wrong at step %d", n + 1);

		step_line(n + 1, hin ^ running ^ fnv1a(0, ubuf, (size_t)(n + 1) * U_CHUNK));
		step_pause();
	}

	/* final verification of the written files' contents */
	unsigned char uhash_buf[8];
	uint64_t hu = fnv1a(0xcbf29ce484222325ULL, ubuf, u_total);
	put_le64(uhash_buf, hu);
	if (close(fin) || close(fout) || close(flog) || close(fu))
		FAIL_ERRNO("close");
	size_t len;
	unsigned char *out = slurp(p_out, &len);
	if (len != HDR + (size_t)steps * OUT_CHUNK)
		fail("out.dat has size %zu", len);
	unsigned char hdr[HDR];
	put_le64(hdr, (uint64_t)steps);
	put_le64(hdr + 8, running);
	if (memcmp(out, hdr, HDR) != 0 || stream_check(SEED_OUT, 0, out + HDR, len - HDR) >= 0)
		fail("out.dat content wrong");
	uint64_t hout = fnv1a(0xcbf29ce484222325ULL, out, len);
	unsigned char *log = slurp(p_log, &len);
	if (len != loglen || memcmp(log, logmodel, len) != 0)
		fail("log.txt content wrong");
	uint64_t hlog = fnv1a(0xcbf29ce484222325ULL, log, len);
	printf("file out.dat %016llx\n", (unsigned long long)hout);
	printf("file log.txt %016llx\n", (unsigned long long)hlog);
	printf("file scratch.dat(unlinked) %016llx\n", (unsigned long long)hu);
	ck_u64(hout);
	ck_u64(hlog);
	ck_bytes(uhash_buf, 8);
	result_line();
	free(out);
	free(log);
	return 0;
}
