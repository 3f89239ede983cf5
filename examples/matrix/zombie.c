/* zombie: two children exit right away and stay zombies until the last step:
 * one exits with a computed status, one is killed by SIGUSR2.  Every step the
 * parent peeks at both with waitid(WNOWAIT) and checks they are still
 * unreaped zombies with the right status; at the last step it reaps them and
 * checks their exit statuses. */
#include "common.h"

static uint64_t compute(void)
{
	uint64_t x = 12345;
	for (int i = 0; i < 100000; i++)
		x = splitmix64(x + (uint64_t)i);
	return x;
}

static void peek(pid_t pid, int code, int status, const char *what)
{
	siginfo_t si;
	memset(&si, 0, sizeof si);
	if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0)
		fail("waitid(WNOWAIT) %s: %s", what, strerror(errno));
	if (si.si_pid != pid)
		fail("%s is no longer a zombie (waitid reported nothing)", what);
	if (si.si_code != code || si.si_status != status)
		fail("%s: zombie status changed: code %d status %d, expected %d %d", what, si.si_code,
		     si.si_status, code, status);
}

int main(int argc, char **argv)
{
	const char *workdir;
	int steps;
	parse_args(argc, argv, &workdir, &steps);
	(void)workdir;

	int p[2];
	if (pipe(p) != 0)
		FAIL_ERRNO("pipe");
	uint64_t expect = compute();
	int code = 3 + (int)(expect % 100);

	pid_t z1 = xfork();
	if (z1 == 0) {
		close(p[0]);
		uint64_t v = compute();
		writeall(p[1], &v, sizeof v, "zombie write");
		_exit(3 + (int)(v % 100));
	}
	pid_t z2 = xfork();
	if (z2 == 0) {
		close(p[0]);
		close(p[1]);
		signal(SIGUSR2, SIG_DFL);
		raise(SIGUSR2);
		_exit(99);
	}
	close(p[1]);
	uint64_t v;
	readall(p[0], &v, sizeof v, "parent read");
	if (v != expect)
		fail("child computed a different value");
	ck_u64(v);
	close(p[0]);

	/* wait (without reaping) until both really are zombies */
	siginfo_t si;
	if (waitid(P_PID, (id_t)z1, &si, WEXITED | WNOWAIT) != 0)
		FAIL_ERRNO("waitid z1");
	if (waitid(P_PID, (id_t)z2, &si, WEXITED | WNOWAIT) != 0)
		FAIL_ERRNO("waitid z2");

	for (int n = 1; n <= steps; n++) {
		peek(z1, CLD_EXITED, code, "zombie 1");
		peek(z2, CLD_KILLED, SIGUSR2, "zombie 2");
		if (n == steps) {
			int st;
			if (waitpid(z1, &st, 0) != z1)
				FAIL_ERRNO("waitpid z1");
			if (!WIFEXITED(st) || WEXITSTATUS(st) != code)
				fail("zombie 1 reaped with wrong status 0x%x", st);
			if (waitpid(z2, &st, 0) != z2)
				FAIL_ERRNO("waitpid z2");
			if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGUSR2)
				fail("zombie 2 reaped with wrong status 0x%x", st);
			if (waitpid(-1, &st, WNOHANG) != -1 || errno != ECHILD)
				fail("children left after reaping");
			ck_u64((uint64_t)st);
		}
		step_line(n, splitmix64(((uint64_t)n << 16) ^ (uint64_t)code ^ ((uint64_t)SIGUSR2 << 8)));
		step_pause();
	}
	result_line();
	return 0;
}
