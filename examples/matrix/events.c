/* events: eventfd, a pipe, signalfd and inotify, all watched through one epoll
 * instance.  Each step "arms" state that then sits pending across the sleep
 * (where a checkpoint is likely to land): an eventfd counter, bytes in the
 * pipe, a SIGUSR1 queued with sigqueue (carrying a value) and three queued
 * SIGRTMIN signals, all blocked and consumed through signalfd.  The next step
 * checks that epoll reports all of them and that every value is intact.
 * inotify watches <workdir>; each step creates a file and expects IN_CREATE
 * and IN_CLOSE_WRITE for it.  CRIU does not save events queued in an inotify
 * instance, so these are produced and consumed within one step; should a
 * checkpoint land in that tiny window and the events be lost, the step
 * retries with a second file (the watch itself must still work). */
#include "common.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>

#define TAG_EFD 1u
#define TAG_PIPE 2u
#define TAG_SFD 4u
#define TAG_ALL (TAG_EFD | TAG_PIPE | TAG_SFD)
#define NRT 3
#define PREFIX "ev-"

static int efd, pfd[2], sfd, ifd, epfd, wd_watch;
static const char *workdir;

static uint64_t efd_val(int n, int k) { return (uint64_t)n * 1000 + 7 + (uint64_t)k; }

static void pipe_msg(int n, unsigned char m[16]) { stream_fill(0xe7e27, (uint64_t)n * 16, m, 16); }

static void sigq(int sig, int val)
{
	union sigval sv = { .sival_int = val };
	if (sigqueue(getpid(), sig, sv) != 0)
		FAIL_ERRNO("sigqueue");
}

static void arm(int n)
{
	for (int k = 0; k < 2; k++) {
		uint64_t v = efd_val(n, k);
		if (write(efd, &v, sizeof v) != sizeof v)
			FAIL_ERRNO("eventfd write");
	}
	unsigned char m[16];
	pipe_msg(n, m);
	writeall(pfd[1], m, sizeof m, "pipe");
	sigq(SIGUSR1, n);
	for (int k = 0; k < NRT; k++)
		sigq(SIGRTMIN, n * 10 + k);
}

static uint64_t check(int n)
{
	unsigned seen = 0;
	for (int tries = 0; seen != TAG_ALL && tries < 50; tries++) {
		struct epoll_event ev[8];
		int r = epoll_wait(epfd, ev, 8, 100);
		if (r < 0 && errno != EINTR)
			FAIL_ERRNO("epoll_wait");
		for (int i = 0; i < r; i++) {
			if (!(ev[i].events & EPOLLIN))
				fail("epoll: unexpected events 0x%x", ev[i].events);
			seen |= ev[i].data.u32;
		}
	}
	if (seen != TAG_ALL)
		fail("epoll reported 0x%x, expected 0x%x at step %d", seen, TAG_ALL, n);

	uint64_t v;
	if (read(efd, &v, sizeof v) != sizeof v)
		FAIL_ERRNO("eventfd read");
	if (v != efd_val(n, 0) + efd_val(n, 1))
		fail("eventfd value %llu at step %d", (unsigned long long)v, n);

	unsigned char m[16], e[16];
	readall(pfd[0], m, sizeof m, "pipe");
	pipe_msg(n, e);
	if (memcmp(m, e, sizeof m) != 0)
		fail("pipe message wrong at step %d", n);

	/* SIGUSR1 (lower number) first, then the RT signals in queue order */
	struct signalfd_siginfo si[1 + NRT];
	size_t got = 0;
	while (got < 1 + NRT) {
		ssize_t r = read(sfd, &si[got], sizeof si - got * sizeof si[0]);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0 || r % (ssize_t)sizeof si[0])
			fail("signalfd read: %s", r < 0 ? strerror(errno) : "odd size");
		got += (size_t)r / sizeof si[0];
	}
	if (si[0].ssi_signo != SIGUSR1 || si[0].ssi_code != SI_QUEUE || si[0].ssi_int != n)
		fail("signalfd: got sig %u code %d int %d, expected SIGUSR1 %d at step %d", si[0].ssi_signo,
		     si[0].ssi_code, si[0].ssi_int, n, n);
	for (int k = 0; k < NRT; k++)
		if ((int)si[1 + k].ssi_signo != SIGRTMIN || si[1 + k].ssi_int != n * 10 + k)
			fail("signalfd: RT signal %d wrong (sig %u int %d) at step %d", k, si[1 + k].ssi_signo,
			     si[1 + k].ssi_int, n);
	/* nothing else may be pending */
	struct pollfd p[3] = { { efd, POLLIN, 0 }, { pfd[0], POLLIN, 0 }, { sfd, POLLIN, 0 } };
	if (poll(p, 3, 0) != 0)
		fail("leftover events after step %d", n);
	return fnv1a_u64(fnv1a(v, m, sizeof m), (uint64_t)si[0].ssi_int);
}

/* Create PREFIX<name> and wait for its IN_CREATE and IN_CLOSE_WRITE.
 * Returns 1 if both arrived, 0 on timeout. */
static int inotify_round(const char *name)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", workdir, name);
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
	if (fd < 0)
		fail("create %s: %s", path, strerror(errno));
	writeall(fd, name, strlen(name), path);
	close(fd);

	int state = 0; /* 0: want IN_CREATE, 1: want IN_CLOSE_WRITE, 2: done */
	while (state < 2) {
		struct pollfd p = { ifd, POLLIN, 0 };
		int r = poll(&p, 1, 2000);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			FAIL_ERRNO("poll inotify");
		if (r == 0)
			return 0;
		char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
		ssize_t len = read(ifd, buf, sizeof buf);
		if (len < 0 && errno == EINTR)
			continue;
		if (len <= 0)
			FAIL_ERRNO("inotify read");
		for (char *q = buf; q < buf + len;) {
			struct inotify_event *ev = (struct inotify_event *)q;
			q += sizeof *ev + ev->len;
			if (ev->mask & (IN_Q_OVERFLOW | IN_IGNORED))
				fail("inotify: watch lost or queue overflow (mask 0x%x)", ev->mask);
			if (ev->wd != wd_watch)
				fail("inotify: unknown watch descriptor %d", ev->wd);
			if (!ev->len || strncmp(ev->name, PREFIX, strlen(PREFIX)) != 0)
				continue; /* somebody else's file in the workdir */
			if (strcmp(ev->name, name) != 0)
				fail("inotify: event for %s while expecting %s", ev->name, name);
			if (state == 0 && (ev->mask & IN_CREATE))
				state = 1;
			else if (state == 1 && (ev->mask & IN_CLOSE_WRITE))
				state = 2;
			else
				fail("inotify: unexpected mask 0x%x for %s", ev->mask, name);
		}
	}
	return 1;
}

int main(int argc, char **argv)
{
	int steps;
	parse_args(argc, argv, &workdir, &steps);

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGRTMIN);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0)
		FAIL_ERRNO("sigprocmask");
	efd = eventfd(0, EFD_CLOEXEC);
	if (efd < 0)
		FAIL_ERRNO("eventfd");
	if (pipe(pfd) != 0)
		FAIL_ERRNO("pipe");
	sfd = signalfd(-1, &mask, SFD_CLOEXEC);
	if (sfd < 0)
		FAIL_ERRNO("signalfd");
	ifd = inotify_init1(IN_CLOEXEC);
	if (ifd < 0)
		FAIL_ERRNO("inotify_init1");
	wd_watch = inotify_add_watch(ifd, workdir, IN_CREATE | IN_CLOSE_WRITE);
	if (wd_watch < 0)
		FAIL_ERRNO("inotify_add_watch");
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		FAIL_ERRNO("epoll_create1");
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.u32 = TAG_EFD;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev))
		FAIL_ERRNO("epoll_ctl efd");
	ev.data.u32 = TAG_PIPE;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, pfd[0], &ev))
		FAIL_ERRNO("epoll_ctl pipe");
	ev.data.u32 = TAG_SFD;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &ev))
		FAIL_ERRNO("epoll_ctl signalfd");

	arm(1);
	for (int n = 1; n <= steps; n++) {
		uint64_t v = check(n);
		char name[64];
		snprintf(name, sizeof name, PREFIX "%06d", n);
		if (!inotify_round(name)) {
			snprintf(name, sizeof name, PREFIX "%06d.retry", n);
			if (!inotify_round(name))
				fail("inotify: no events for created files at step %d", n);
		}
		v = fnv1a(v, PREFIX, strlen(PREFIX));
		step_line(n, v);
		if (n < steps)
			arm(n + 1);
		step_pause();
	}
	if (inotify_rm_watch(ifd, wd_watch) != 0)
		FAIL_ERRNO("inotify_rm_watch");
	close(epfd);
	close(ifd);
	close(sfd);
	close(efd);
	close(pfd[0]);
	close(pfd[1]);
	result_line();
	return 0;
}
