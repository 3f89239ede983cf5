/* tcp_pair: the two ends of one TCP connection as two programs, for running
 * them on two different nodes.
 *
 *   tcp_pair server <ip> <port> <steps>   bind ip:port, accept one client
 *   tcp_pair client <ip> <port> <steps>   connect to ip:port (retrying for
 *                                         up to 30 s while it is refused)
 *   tcp_pair server <ip> <port> <steps> again
 *                                         as server, but keep listening and,
 *                                         after RESULT, echo 4 bytes to one
 *                                         more client (a new connection
 *                                         after a restart elsewhere)
 *
 * Both directions stream deterministic data with a lag of LAG chunks and
 * both sides sleep every step, so bytes are in flight both ways whenever a
 * checkpoint lands.  Every byte is verified (a mismatch fails the program).
 * Each side prints `step N <hash>` per step; at the end they exchange their
 * stream hashes and both print the same `RESULT <checksum>` of (client
 * hash, server hash): equal to an uninterrupted run's only if every byte
 * arrived exactly once, in order. */
#include "matrix/common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#define LAG 4
#define MAXCHUNK 8192

static size_t chunk_len(int n) { return 3000 + (size_t)((n * 7919) % 5000); }
static uint64_t chunk_pos(int n) { return (uint64_t)n * MAXCHUNK; }

static void send_chunk(int fd, uint64_t seed, int n)
{
	static unsigned char buf[MAXCHUNK];
	size_t len = chunk_len(n);
	stream_fill(seed, chunk_pos(n), buf, len);
	writeall(fd, buf, len, "tcp send");
}

static uint64_t recv_chunk(int fd, uint64_t seed, int n, const char *who)
{
	static unsigned char buf[MAXCHUNK];
	size_t len = chunk_len(n);
	readall(fd, buf, len, "tcp recv");
	long bad = stream_check(seed, chunk_pos(n), buf, len);
	if (bad >= 0)
		fail("%s: tcp data mismatch in chunk %d at byte %ld", who, n, bad);
	return fnv1a((uint64_t)n, buf, len);
}

static uint64_t converse(int fd, uint64_t my_seed, uint64_t peer_seed, int steps, const char *who)
{
	uint64_t h = 0;
	for (int n = 0; n < LAG && n < steps; n++)
		send_chunk(fd, my_seed, n);
	for (int n = 0; n < steps; n++) {
		if (n + LAG < steps)
			send_chunk(fd, my_seed, n + LAG);
		uint64_t v = recv_chunk(fd, peer_seed, n, who);
		h = fnv1a_u64(h, v);
		/* not folded into the checksum: the two sides print different
		 * values; RESULT covers both hashes */
		if (printf("step %d %016llx\n", n + 1, (unsigned long long)v) < 0 || fflush(stdout) != 0)
			FAIL_ERRNO("write stdout");
		step_pause();
	}
	return h;
}

static void usage(const char *argv0)
{
	fprintf(stderr, "usage: %s server|client <ip> <port> <steps>\n", argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	if (argc != 5 && !(argc == 6 && strcmp(argv[5], "again") == 0))
		usage(argv[0]);
	int again = argc == 6;
	int server = strcmp(argv[1], "server") == 0;
	if (!server && strcmp(argv[1], "client") != 0)
		usage(argv[0]);
	struct sockaddr_in sa = { .sin_family = AF_INET };
	if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1)
		usage(argv[0]);
	char *end;
	long port = strtol(argv[3], &end, 10);
	if (*end || port < 1 || port > 65535)
		usage(argv[0]);
	long steps = strtol(argv[4], &end, 10);
	if (*end || steps < 1 || steps > 1000000)
		usage(argv[0]);
	sa.sin_port = htons((uint16_t)port);
	const uint64_t CSEED = 0xc11e27, SSEED = 0x5e27e2;
	int one = 1, fd, listener = -1;

	if (server) {
		int ls = socket(AF_INET, SOCK_STREAM, 0);
		if (ls < 0)
			FAIL_ERRNO("server socket");
		if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
			FAIL_ERRNO("SO_REUSEADDR");
		if (bind(ls, (struct sockaddr *)&sa, sizeof sa) != 0)
			FAIL_ERRNO("bind");
		if (listen(ls, 4) != 0)
			FAIL_ERRNO("listen");
		if (printf("listening %s:%ld\n", argv[2], port) < 0 || fflush(stdout) != 0)
			FAIL_ERRNO("write stdout");
		do
			fd = accept(ls, NULL, NULL);
		while (fd < 0 && errno == EINTR);
		if (fd < 0)
			FAIL_ERRNO("accept");
		if (!again)
			close(ls);
		else
			listener = ls;
	} else {
		for (int tries = 0;; tries++) {
			fd = socket(AF_INET, SOCK_STREAM, 0);
			if (fd < 0)
				FAIL_ERRNO("client socket");
			if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
				break;
			if ((errno != ECONNREFUSED && errno != EINTR) || tries >= 300)
				FAIL_ERRNO("connect");
			close(fd);
			nap_ms(100);
		}
	}
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
		FAIL_ERRNO("TCP_NODELAY");
	if (printf("connected\n") < 0 || fflush(stdout) != 0)
		FAIL_ERRNO("write stdout");

	uint64_t mine = converse(fd, server ? SSEED : CSEED, server ? CSEED : SSEED, (int)steps,
				 server ? "server" : "client");
	uint64_t theirs;
	writeall(fd, &mine, sizeof mine, "hash send");
	readall(fd, &theirs, sizeof theirs, "hash recv");
	ck_u64(server ? theirs : mine);
	ck_u64(server ? mine : theirs);
	if (shutdown(fd, SHUT_WR) != 0)
		FAIL_ERRNO("shutdown");
	char c;
	if (readn(fd, &c, 1) != 0)
		fail("unexpected extra data");
	close(fd);
	result_line();
	if (listener >= 0) {
		char buf[4];
		do
			fd = accept(listener, NULL, NULL);
		while (fd < 0 && errno == EINTR);
		if (fd < 0)
			FAIL_ERRNO("accept again");
		readall(fd, buf, sizeof buf, "again recv");
		writeall(fd, buf, sizeof buf, "again send");
		close(fd);
		if (printf("again done\n") < 0 || fflush(stdout) != 0)
			FAIL_ERRNO("write stdout");
	}
	return 0;
}
