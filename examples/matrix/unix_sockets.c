/* unix_sockets: parent and child talk over a SOCK_STREAM socketpair and a
 * SOCK_DGRAM socketpair.  Both sides send ahead of what the other has read
 * (a lag of LAG_S stream messages and LAG_D datagrams) and both sleep every
 * step, so messages are queued in both directions on both sockets when a
 * checkpoint lands.  Every byte and every datagram boundary is verified. */
#include "common.h"
#include <sys/socket.h>

#define LAG_S 3
#define LAG_D 4

struct hdr {
	uint32_t len;
	uint32_t seq;
};

static size_t smsg_len(uint32_t seq) { return 100 + (seq * 37u) % 900; }
static size_t dmsg_len(uint32_t seq) { return 64 + (seq * 53u) % 400; }

static void send_stream(int fd, uint64_t seed, uint32_t seq)
{
	unsigned char buf[sizeof(struct hdr) + 1024];
	struct hdr h = { (uint32_t)smsg_len(seq), seq };
	memcpy(buf, &h, sizeof h);
	stream_fill(seed, (uint64_t)seq << 12, buf + sizeof h, h.len);
	writeall(fd, buf, sizeof h + h.len, "stream send");
}

static uint64_t recv_stream(int fd, uint64_t seed, uint32_t seq, const char *who)
{
	unsigned char buf[1024];
	struct hdr h;
	readall(fd, &h, sizeof h, "stream recv header");
	if (h.seq != seq || h.len != smsg_len(seq))
		fail("%s: stream message seq %u len %u, expected seq %u len %zu", who, h.seq, h.len, seq,
		     smsg_len(seq));
	readall(fd, buf, h.len, "stream recv body");
	if (stream_check(seed, (uint64_t)seq << 12, buf, h.len) >= 0)
		fail("%s: stream message %u corrupted", who, seq);
	return fnv1a(seq, buf, h.len);
}

static void send_dgram(int fd, uint64_t seed, uint32_t seq)
{
	unsigned char buf[512];
	size_t len = dmsg_len(seq);
	memcpy(buf, &seq, sizeof seq);
	stream_fill(seed, (uint64_t)seq << 12, buf + sizeof seq, len - sizeof seq);
	for (;;) {
		ssize_t w = send(fd, buf, len, 0);
		if (w < 0 && errno == EINTR)
			continue;
		if (w != (ssize_t)len)
			fail("dgram send: %s", w < 0 ? strerror(errno) : "short");
		return;
	}
}

static uint64_t recv_dgram(int fd, uint64_t seed, uint32_t seq, const char *who)
{
	unsigned char buf[2048];
	ssize_t r;
	do
		r = recv(fd, buf, sizeof buf, 0);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		fail("%s: dgram recv: %s", who, strerror(errno));
	uint32_t got;
	memcpy(&got, buf, sizeof got);
	if ((size_t)r != dmsg_len(seq) || got != seq)
		fail("%s: datagram seq %u len %zd, expected seq %u len %zu", who, got, r, seq, dmsg_len(seq));
	if (stream_check(seed, (uint64_t)seq << 12, buf + sizeof got, (size_t)r - sizeof got) >= 0)
		fail("%s: datagram %u corrupted", who, seq);
	return fnv1a(seq, buf, (size_t)r);
}

/* One side of the conversation. Returns the hash of everything received. */
static uint64_t converse(int sfd, int dfd, uint64_t my_seed, uint64_t peer_seed, int steps, int print,
                         const char *who)
{
	uint64_t h = 0;
	for (uint32_t s = 0; s < LAG_S && (int)s < steps; s++)
		send_stream(sfd, my_seed, s);
	for (uint32_t s = 0; s < LAG_D && (int)s < steps; s++)
		send_dgram(dfd, my_seed + 1, s);
	for (int n = 0; n < steps; n++) {
		if (n + LAG_S < steps)
			send_stream(sfd, my_seed, (uint32_t)(n + LAG_S));
		if (n + LAG_D < steps)
			send_dgram(dfd, my_seed + 1, (uint32_t)(n + LAG_D));
		uint64_t a = recv_stream(sfd, peer_seed, (uint32_t)n, who);
		uint64_t b = recv_dgram(dfd, peer_seed + 1, (uint32_t)n, who);
		h = fnv1a_u64(fnv1a_u64(h, a), b);
		if (print)
			step_line(n + 1, a ^ b);
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

	int ss[2], ds[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, ss) != 0)
		FAIL_ERRNO("socketpair(SOCK_STREAM)");
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, ds) != 0)
		FAIL_ERRNO("socketpair(SOCK_DGRAM)");
	const uint64_t PSEED = 0x1111, CSEED = 0x2222;

	pid_t child = xfork();
	if (child == 0) {
		close(ss[0]);
		close(ds[0]);
		uint64_t h = converse(ss[1], ds[1], CSEED, PSEED, steps, 0, "child");
		writeall(ss[1], &h, sizeof h, "child result");
		char c;
		if (readn(ss[1], &c, 1) != 0) /* wait for the parent to close */
			fail("child: unexpected extra stream data");
		_exit(0);
	}
	close(ss[1]);
	close(ds[1]);
	uint64_t h = converse(ss[0], ds[0], PSEED, CSEED, steps, 1, "parent");
	uint64_t hc;
	readall(ss[0], &hc, sizeof hc, "child result");
	ck_u64(h);
	ck_u64(hc);
	close(ss[0]);
	close(ds[0]);
	wait_ok(child, "child");
	result_line();
	return 0;
}
