/* forktree: a small process tree passing a token around a ring of pipes.
 *
 *   P (main) --a--> C1 (own process group) --b--> G (C1's child, in C1's group)
 *   --c--> C2 (own session, via setsid) --d--> P
 *
 * Every hop transforms the token; P checks the result against a model.  Each
 * process re-checks its pgid/sid relations every step, so a restore that gets
 * process groups or sessions wrong is caught. */
#include "common.h"

struct token {
	uint32_t step;
	uint32_t hop;
	uint64_t val;
};

#define STOP UINT32_MAX

static uint64_t hop_fn(uint64_t v, uint32_t hop) { return splitmix64(v ^ (0x1000ULL * (hop + 1))); }

/* Relay loop for a child at position `hop`; `check` validates identity. */
static void relay(int in, int out, uint32_t hop, void (*check)(void))
{
	for (uint32_t expect = 1;; expect++) {
		struct token t;
		readall(in, &t, sizeof t, "relay read");
		if (t.step == STOP) {
			writeall(out, &t, sizeof t, "relay forward stop");
			return;
		}
		if (t.step != expect || t.hop != hop)
			fail("hop %u: got token step %u hop %u, expected step %u", hop, t.step, t.hop, expect);
		check();
		t.val = hop_fn(t.val, hop);
		t.hop++;
		writeall(out, &t, sizeof t, "relay write");
	}
}

static pid_t c1_pid_seen_by_g;

static void check_c1(void)
{
	if (getpgid(0) != getpid())
		fail("C1 is no longer its process group leader");
	if (getsid(0) == getpid())
		fail("C1 unexpectedly a session leader");
}
static void check_g(void)
{
	if (getppid() != c1_pid_seen_by_g)
		fail("G lost its parent C1");
	if (getpgid(0) != c1_pid_seen_by_g)
		fail("G not in C1's process group");
}
static void check_c2(void)
{
	if (getsid(0) != getpid())
		fail("C2 is not its own session leader");
	if (getpgid(0) != getpid())
		fail("C2 is not its own process group leader");
}

static void mkpipe(int p[2])
{
	if (pipe(p) != 0)
		FAIL_ERRNO("pipe");
}

int main(int argc, char **argv)
{
	const char *workdir;
	int steps;
	parse_args(argc, argv, &workdir, &steps);
	(void)workdir;

	int a[2], b[2], c[2], d[2];
	mkpipe(a);
	mkpipe(b);
	mkpipe(c);
	mkpipe(d);
	pid_t my_sid = getsid(0);

	pid_t c1 = xfork();
	if (c1 == 0) {
		if (setpgid(0, 0) != 0)
			FAIL_ERRNO("C1 setpgid");
		pid_t g = xfork();
		if (g == 0) {
			c1_pid_seen_by_g = getppid();
			close(a[0]); close(a[1]); close(b[1]); close(c[0]);
			close(d[0]); close(d[1]);
			if (getsid(0) != my_sid)
				fail("G in a different session");
			relay(b[0], c[1], 1, check_g);
			_exit(0);
		}
		close(a[1]); close(b[0]); close(c[0]); close(c[1]);
		close(d[0]); close(d[1]);
		relay(a[0], b[1], 0, check_c1);
		wait_ok(g, "grandchild G");
		_exit(0);
	}
	/* avoid the race: P also puts C1 in its own group */
	if (setpgid(c1, c1) != 0 && errno != EACCES)
		FAIL_ERRNO("setpgid(C1)");

	pid_t c2 = xfork();
	if (c2 == 0) {
		if (setsid() < 0)
			FAIL_ERRNO("C2 setsid");
		close(a[0]); close(a[1]); close(b[0]); close(b[1]);
		close(c[1]); close(d[0]);
		relay(c[0], d[1], 2, check_c2);
		_exit(0);
	}
	close(a[0]); close(b[0]); close(b[1]); close(c[0]); close(c[1]); close(d[1]);

	for (int n = 1; n <= steps; n++) {
		struct token t = { (uint32_t)n, 0, splitmix64((uint64_t)n * 77) };
		uint64_t expect = t.val;
		for (uint32_t h = 0; h < 3; h++)
			expect = hop_fn(expect, h);
		writeall(a[1], &t, sizeof t, "P write token");
		readall(d[0], &t, sizeof t, "P read token");
		if (t.step != (uint32_t)n || t.hop != 3 || t.val != expect)
			fail("P: bad token back at step %d (step %u hop %u)", n, t.step, t.hop);
		if (getpgid(c1) != c1)
			fail("P: C1's pgid changed");
		if (getsid(c2) != c2)
			fail("P: C2's sid changed");
		if (getsid(c1) != my_sid)
			fail("P: C1 left P's session");
		step_line(n, t.val);
		step_pause();
	}
	struct token stop = { STOP, 0, 0 };
	writeall(a[1], &stop, sizeof stop, "P write stop");
	readall(d[0], &stop, sizeof stop, "P read stop");
	if (stop.step != STOP)
		fail("P: stop token mangled");
	wait_ok(c1, "child C1");
	wait_ok(c2, "child C2");
	result_line();
	return 0;
}
