/* shm: a POSIX shared-memory object (shm_open + mmap, named after a hash of
 * <workdir>, kept linked in /dev/shm until the end) and a SysV segment
 * (shmget/shmat) shared by parent and child.  Each process maps/attaches them
 * itself.  They take turns, passing a token over pipes: on its turn a process
 * checks that both regions exactly equal its private model of the history,
 * then increments its counters and scribbles on the regions.  So any lost or
 * stale shared page is caught by the other side.
 * Note: CRIU dumps SysV shm only as part of an IPC namespace, so run this in
 * its own IPC namespace when checkpointing. */
#include "common.h"
#include <fcntl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>

#define REGION (1024 * 1024)
#define NW (REGION / 8)
#define HDRW 4        /* words: [0]=turn, [1]=parent counter, [2]=child counter */
#define TOUCH 512     /* words changed per turn */

static uint64_t *model_px, *model_sv;

static void update(uint64_t *r, uint64_t turn, int who, uint64_t salt)
{
	r[0] = turn + 1;
	r[1 + who]++;
	for (uint64_t j = 0; j < TOUCH; j++) {
		uint64_t idx = HDRW + (turn * 131 + j * 4099 + salt) % (NW - HDRW);
		r[idx] += splitmix64(turn * NW + j + salt);
	}
}

static void verify(const uint64_t *r, const uint64_t *m, const char *what, uint64_t turn, const char *who)
{
	if (memcmp(r, m, REGION) != 0) {
		size_t i = 0;
		while (r[i] == m[i])
			i++;
		fail("%s: %s region differs from model at word %zu before turn %llu", who, what, i,
		     (unsigned long long)turn);
	}
}

/* One turn: check both regions, then modify them (and the model). */
static void my_turn(uint64_t *px, uint64_t *sv, uint64_t turn, int who, const char *name)
{
	verify(px, model_px, "POSIX shm", turn, name);
	verify(sv, model_sv, "SysV shm", turn, name);
	update(px, turn, who, 7);
	update(model_px, turn, who, 7);
	update(sv, turn, who, 11);
	update(model_sv, turn, who, 11);
}

/* Apply the peer's turn to our private model only. */
static void peer_turn(uint64_t turn, int who)
{
	update(model_px, turn, who, 7);
	update(model_sv, turn, who, 11);
}

static uint64_t *map_posix(const char *name, int create)
{
	int fd = shm_open(name, O_RDWR | (create ? O_CREAT | O_EXCL : 0), 0600);
	if (fd < 0)
		fail("shm_open %s: %s", name, strerror(errno));
	if (create && ftruncate(fd, REGION) != 0)
		FAIL_ERRNO("ftruncate shm");
	void *p = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		FAIL_ERRNO("mmap shm");
	/* the parent keeps its fd open (one more thing to restore); the child closes it */
	if (!create)
		close(fd);
	return p;
}

static uint64_t *attach_sysv(int id)
{
	void *p = shmat(id, NULL, 0);
	if (p == (void *)-1)
		FAIL_ERRNO("shmat");
	return p;
}

int main(int argc, char **argv)
{
	const char *wd;
	int steps;
	parse_args(argc, argv, &wd, &steps);

	char name[64];
	snprintf(name, sizeof name, "/ckpt-shm-%016llx",
	         (unsigned long long)fnv1a(0xcbf29ce484222325ULL, wd, strlen(wd)));
	shm_unlink(name); /* leftover from an earlier failed run in the same workdir */

	model_px = calloc(NW, 8);
	model_sv = calloc(NW, 8);
	if (!model_px || !model_sv)
		fail("calloc");

	int p2c[2], c2p[2];
	if (pipe(p2c) != 0 || pipe(c2p) != 0)
		FAIL_ERRNO("pipe");
	uint64_t *px = map_posix(name, 1);
	int shmid = shmget(IPC_PRIVATE, REGION, IPC_CREAT | 0600);
	if (shmid < 0)
		FAIL_ERRNO("shmget");

	pid_t child = xfork();
	if (child == 0) {
		close(p2c[1]);
		close(c2p[0]);
		munmap(px, REGION); /* map it again by name, independently */
		uint64_t *cpx = map_posix(name, 0);
		uint64_t *csv = attach_sysv(shmid);
		for (int n = 0; n < steps; n++) {
			uint32_t tok;
			readall(p2c[0], &tok, sizeof tok, "child token");
			if (tok != (uint32_t)n)
				fail("child: token %u, expected %d", tok, n);
			peer_turn(2 * (uint64_t)n, 0);
			my_turn(cpx, csv, 2 * (uint64_t)n + 1, 1, "child");
			writeall(c2p[1], &tok, sizeof tok, "child token");
		}
		if (shmdt(csv) != 0 || munmap(cpx, REGION) != 0)
			FAIL_ERRNO("child unmap");
		_exit(0);
	}
	close(p2c[0]);
	close(c2p[1]);
	uint64_t *sv = attach_sysv(shmid);

	for (int n = 0; n < steps; n++) {
		my_turn(px, sv, 2 * (uint64_t)n, 0, "parent");
		uint32_t tok = (uint32_t)n;
		writeall(p2c[1], &tok, sizeof tok, "parent token");
		readall(c2p[0], &tok, sizeof tok, "parent token");
		if (tok != (uint32_t)n)
			fail("parent: token %u, expected %d", tok, n);
		peer_turn(2 * (uint64_t)n + 1, 1);
		verify(px, model_px, "POSIX shm", 2 * (uint64_t)n + 2, "parent");
		verify(sv, model_sv, "SysV shm", 2 * (uint64_t)n + 2, "parent");
		if (px[1] != (uint64_t)n + 1 || px[2] != (uint64_t)n + 1 || sv[1] != (uint64_t)n + 1 ||
		    sv[2] != (uint64_t)n + 1)
			fail("counters wrong at step %d", n + 1);
		uint64_t h = fnv1a(fnv1a(0xcbf29ce484222325ULL, px, REGION), sv, REGION);
		step_line(n + 1, h);
		step_pause();
	}
	wait_ok(child, "child");
	struct shmid_ds ds;
	if (shmctl(shmid, IPC_STAT, &ds) != 0)
		FAIL_ERRNO("shmctl IPC_STAT");
	if (ds.shm_nattch != 1)
		fail("SysV segment has %lu attachments, expected 1", (unsigned long)ds.shm_nattch);
	if (shmdt(sv) != 0 || shmctl(shmid, IPC_RMID, NULL) != 0)
		FAIL_ERRNO("SysV cleanup");
	if (munmap(px, REGION) != 0 || shm_unlink(name) != 0)
		FAIL_ERRNO("POSIX shm cleanup");
	result_line();
	return 0;
}
