/* timers: a periodic timerfd (10 ms), setitimer(ITIMER_REAL, 20 ms) with a
 * SIGALRM handler counting ticks, and a POSIX timer (timer_create,
 * CLOCK_MONOTONIC, 30 ms, SIGUSR2) with a handler counting ticks.  Every step
 * checks that the timerfd becomes readable, that both tick counters advanced
 * (monotonic, never backwards) and that the armed intervals read back
 * unchanged.  Tick counts depend on timing, so only deterministic facts are
 * printed and checksummed. */
#include "common.h"
#include <poll.h>
#include <sys/time.h>
#include <sys/timerfd.h>

#define TFD_NS 10000000L
#define ALRM_US 20000L
#define PT_NS 30000000L

static volatile sig_atomic_t alrm_ticks, pt_ticks;

static void on_alrm(int sig) { (void)sig; alrm_ticks++; }
static void on_usr2(int sig) { (void)sig; pt_ticks++; }

static void install(int sig, void (*h)(int))
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = h;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(sig, &sa, NULL) != 0)
		FAIL_ERRNO("sigaction");
}

/* Wait until the tick counter moves past `prev` (bounded, ~5 s). */
static long wait_tick(volatile sig_atomic_t *c, long prev, const char *what, int n)
{
	for (int i = 0; i < 500 && *c <= prev; i++)
		nap_ms(10);
	long now = *c;
	if (now < prev)
		fail("%s tick counter went backwards at step %d", what, n);
	if (now == prev)
		fail("%s stopped ticking at step %d", what, n);
	return now;
}

int main(int argc, char **argv)
{
	const char *wd;
	int steps;
	parse_args(argc, argv, &wd, &steps);
	(void)wd;

	install(SIGALRM, on_alrm);
	install(SIGUSR2, on_usr2);

	int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
	if (tfd < 0)
		FAIL_ERRNO("timerfd_create");
	struct itimerspec its = { { 0, TFD_NS }, { 0, TFD_NS } };
	if (timerfd_settime(tfd, 0, &its, NULL) != 0)
		FAIL_ERRNO("timerfd_settime");

	struct itimerval itv = { { 0, ALRM_US }, { 0, ALRM_US } };
	if (setitimer(ITIMER_REAL, &itv, NULL) != 0)
		FAIL_ERRNO("setitimer");

	timer_t pt;
	struct sigevent sev;
	memset(&sev, 0, sizeof sev);
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SIGUSR2;
	if (timer_create(CLOCK_MONOTONIC, &sev, &pt) != 0)
		FAIL_ERRNO("timer_create");
	struct itimerspec pts = { { 0, PT_NS }, { 0, PT_NS } };
	if (timer_settime(pt, 0, &pts, NULL) != 0)
		FAIL_ERRNO("timer_settime");

	long prev_alrm = 0, prev_pt = 0;
	for (int n = 1; n <= steps; n++) {
		/* timerfd: must become readable, expirations >= 1 */
		struct pollfd pfd = { tfd, POLLIN, 0 };
		int r;
		do
			r = poll(&pfd, 1, 5000);
		while (r < 0 && errno == EINTR);
		if (r != 1 || !(pfd.revents & POLLIN))
			fail("timerfd not readable at step %d", n);
		uint64_t exp;
		if (read(tfd, &exp, sizeof exp) != sizeof exp || exp < 1)
			fail("timerfd read at step %d", n);

		prev_alrm = wait_tick(&alrm_ticks, prev_alrm, "ITIMER_REAL", n);
		prev_pt = wait_tick(&pt_ticks, prev_pt, "POSIX timer", n);

		/* the armed intervals must survive unchanged */
		struct itimerspec cur;
		if (timerfd_gettime(tfd, &cur) != 0)
			FAIL_ERRNO("timerfd_gettime");
		if (cur.it_interval.tv_sec != 0 || cur.it_interval.tv_nsec != TFD_NS)
			fail("timerfd interval changed at step %d", n);
		if (cur.it_value.tv_sec == 0 && cur.it_value.tv_nsec == 0)
			fail("timerfd disarmed at step %d", n);
		struct itimerval civ;
		if (getitimer(ITIMER_REAL, &civ) != 0)
			FAIL_ERRNO("getitimer");
		if (civ.it_interval.tv_sec != 0 || civ.it_interval.tv_usec != ALRM_US)
			fail("ITIMER_REAL interval changed at step %d", n);
		if (timer_gettime(pt, &cur) != 0)
			FAIL_ERRNO("timer_gettime");
		if (cur.it_interval.tv_sec != 0 || cur.it_interval.tv_nsec != PT_NS)
			fail("POSIX timer interval changed at step %d", n);

		uint64_t v = splitmix64(((uint64_t)n << 32) ^ (uint64_t)TFD_NS ^ ((uint64_t)ALRM_US << 8) ^
		                        ((uint64_t)PT_NS << 1));
		step_line(n, v);
		step_pause();
	}

	/* disarm everything */
	struct itimerspec zero = { { 0, 0 }, { 0, 0 } };
	struct itimerval zv = { { 0, 0 }, { 0, 0 } };
	if (timerfd_settime(tfd, 0, &zero, NULL) || setitimer(ITIMER_REAL, &zv, NULL) ||
	    timer_settime(pt, 0, &zero, NULL) || timer_delete(pt))
		FAIL_ERRNO("disarm timers");
	close(tfd);
	result_line();
	return 0;
}
