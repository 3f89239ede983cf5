/* tcp_loopback: a server (child) and a client (parent) on 127.0.0.1.  The
 * server binds port 0 and passes the port to the client over a pipe.  Both
 * directions stream deterministic data with a lag of LAG chunks, and both
 * sides sleep every step, so bytes are in flight both ways (send and receive
 * queues) whenever a checkpoint lands.  Every byte is verified.  The server's
 * listening socket stays open for the whole run. */
#include "common.h"
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

static uint64_t converse(int fd, uint64_t my_seed, uint64_t peer_seed, int steps, int print, const char *who)
{
	uint64_t h = 0;
	for (int n = 0; n < LAG && n < steps; n++)
		send_chunk(fd, my_seed, n);
	for (int n = 0; n < steps; n++) {
		if (n + LAG < steps)
			send_chunk(fd, my_seed, n + LAG);
		uint64_t v = recv_chunk(fd, peer_seed, n, who);
		h = fnv1a_u64(h, v);
		if (print)
			step_line(n + 1, v);
		step_pause();
	}
	return h;
}

int main(int argc, char **argv)
{
	const char *workdir;
	int steps;
	parse_args(argc, argv, &workdir, &steps);
	(void)workdir;

	int portp[2], resp[2];
	if (pipe(portp) != 0 || pipe(resp) != 0)
		FAIL_ERRNO("pipe");
	const uint64_t CSEED = 0xc11e27, SSEED = 0x5e27e2;

	pid_t server = xfork();
	if (server == 0) {
		close(portp[0]);
		close(resp[0]);
		int ls = socket(AF_INET, SOCK_STREAM, 0);
		if (ls < 0)
			FAIL_ERRNO("server socket");
		int one = 1;
		if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
			FAIL_ERRNO("SO_REUSEADDR");
		struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = 0 };
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (bind(ls, (struct sockaddr *)&sa, sizeof sa) != 0)
			FAIL_ERRNO("bind 127.0.0.1:0");
		if (listen(ls, 4) != 0)
			FAIL_ERRNO("listen");
		socklen_t sl = sizeof sa;
		if (getsockname(ls, (struct sockaddr *)&sa, &sl) != 0)
			FAIL_ERRNO("getsockname");
		uint16_t port = ntohs(sa.sin_port);
		writeall(portp[1], &port, sizeof port, "port pipe");
		close(portp[1]);
		int fd;
		do
			fd = accept(ls, NULL, NULL);
		while (fd < 0 && errno == EINTR);
		if (fd < 0)
			FAIL_ERRNO("accept");
		uint64_t h = converse(fd, SSEED, CSEED, steps, 0, "server");
		writeall(resp[1], &h, sizeof h, "result pipe");
		char c;
		if (readn(fd, &c, 1) != 0)
			fail("server: unexpected extra data");
		close(fd);
		close(ls);
		_exit(0);
	}
	close(portp[1]);
	close(resp[1]);
	uint16_t port;
	readall(portp[0], &port, sizeof port, "port pipe");
	close(portp[0]);

	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		FAIL_ERRNO("client socket");
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
		FAIL_ERRNO("connect");
	int one = 1;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
		FAIL_ERRNO("TCP_NODELAY");

	uint64_t h = converse(fd, CSEED, SSEED, steps, 1, "client");
	uint64_t hs;
	readall(resp[0], &hs, sizeof hs, "result pipe");
	ck_u64(h);
	ck_u64(hs);
	if (shutdown(fd, SHUT_WR) != 0)
		FAIL_ERRNO("shutdown");
	char c;
	if (readn(fd, &c, 1) != 0)
		fail("client: unexpected extra data");
	close(fd);
	wait_ok(server, "server");
	result_line();
	return 0;
}
