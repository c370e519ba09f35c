/*
 * loadgen.c - the macro benchmark's client: CONNS connections to the example server on
 * 127.0.0.1, each sending DEPTH pipelined "SUM 1 2 3 4 5 6 7" requests per round trip and
 * checking every answer, until MAX_REQUESTS answers or SECONDS have passed (whichever
 * comes first).  Bounded in count and in time; loopback only.
 *
 * Before the load, one probe "SUM 1 2 3 4 5 6 7 8" tells which parse_request() runs:
 * the original refuses 8 numbers ("ERR too many numbers"), the fix_parse patch answers
 * "OK 36".  EXPECT is "original" or "patched".
 *
 * Usage: loadgen PORT CONNS SECONDS MAX_REQUESTS DEPTH EXPECT
 * Prints: requests=N seconds=S rps=R errors=E probe=original|patched
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define REQUEST "SUM 1 2 3 4 5 6 7\n"
#define ANSWER "OK 28"
#define DEPTH_MAX 256

static int port, depth;
static long max_requests;
static double seconds, start;
static atomic_long answered, errors;
static pthread_barrier_t ready;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int connect_server(void)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	struct timeval tv = {.tv_sec = 5}; /* a stuck server fails the run, never hangs it */
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static int send_all(int fd, const char *p, size_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read `lines` answer lines into buf (NUL-separated in place); -1 on error or timeout. */
static int read_lines(int fd, char *buf, size_t cap, int lines)
{
	size_t len = 0;
	int seen = 0;

	while (seen < lines) {
		ssize_t n = recv(fd, buf + len, cap - len - 1, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		for (ssize_t i = 0; i < n; i++)
			if (buf[len + (size_t)i] == '\n')
				seen++;
		len += (size_t)n;
		if (len + 1 >= cap)
			return -1;
	}
	buf[len] = '\0';
	return seen == lines ? 0 : -1;
}

static void *client(void *arg)
{
	static const char one[] = REQUEST;
	char *out = malloc(sizeof(one) * DEPTH_MAX), *in = malloc(64 * DEPTH_MAX);
	size_t out_len = 0;
	int fd = connect_server();

	(void)arg;
	if (fd < 0 || !out || !in) {
		atomic_fetch_add(&errors, 1);
		pthread_barrier_wait(&ready);
		return NULL;
	}
	for (int i = 0; i < depth; i++) {
		memcpy(out + out_len, one, sizeof(one) - 1);
		out_len += sizeof(one) - 1;
	}
	pthread_barrier_wait(&ready);
	for (;;) {
		char *line;

		if (atomic_load_explicit(&answered, memory_order_relaxed) >= max_requests ||
		    now_s() - start >= seconds)
			break;
		if (send_all(fd, out, out_len) < 0 || read_lines(fd, in, 64 * DEPTH_MAX, depth) < 0) {
			atomic_fetch_add(&errors, 1);
			break;
		}
		line = in;
		for (int i = 0; i < depth; i++) {
			char *nl = strchr(line, '\n');

			*nl = '\0';
			if (strcmp(line, ANSWER) != 0)
				atomic_fetch_add(&errors, 1);
			line = nl + 1;
		}
		atomic_fetch_add_explicit(&answered, depth, memory_order_relaxed);
	}
	close(fd);
	free(out);
	free(in);
	return NULL;
}

/* Which parse_request() answers: "original", "patched", or NULL on a wrong answer. */
static const char *probe(void)
{
	char buf[256];
	int fd = connect_server();
	const char *what = NULL;

	if (fd < 0)
		return NULL;
	if (send_all(fd, "SUM 1 2 3 4 5 6 7 8\n", 20) == 0 && read_lines(fd, buf, sizeof buf, 1) == 0) {
		if (strncmp(buf, "OK 36\n", 6) == 0)
			what = "patched";
		else if (strncmp(buf, "ERR too many numbers", 20) == 0)
			what = "original";
	}
	close(fd);
	return what;
}

int main(int argc, char **argv)
{
	pthread_t t[64];
	int conns;
	const char *seen;
	double elapsed;

	if (argc < 7 || (port = atoi(argv[1])) <= 0 || (conns = atoi(argv[2])) <= 0 || conns > 64 ||
	    (seconds = atof(argv[3])) <= 0 || (max_requests = atol(argv[4])) <= 0 ||
	    (depth = atoi(argv[5])) <= 0 || depth > DEPTH_MAX) {
		fprintf(stderr, "usage: loadgen PORT CONNS SECONDS MAX_REQUESTS DEPTH EXPECT\n");
		return 2;
	}
	seen = probe();
	if (!seen || strcmp(seen, argv[6]) != 0) {
		fprintf(stderr, "loadgen: the probe found %s parse_request(), expected %s\n",
			seen ? seen : "a wrong answer from", argv[6]);
		return 1;
	}
	pthread_barrier_init(&ready, NULL, (unsigned)conns + 1);
	for (int i = 0; i < conns; i++)
		if (pthread_create(&t[i], NULL, client, NULL) != 0)
			return 2;
	start = now_s();
	pthread_barrier_wait(&ready); /* every connection open: go (start is set before) */
	for (int i = 0; i < conns; i++)
		pthread_join(t[i], NULL);
	elapsed = now_s() - start;
	printf("requests=%ld seconds=%.4f rps=%.1f errors=%ld probe=%s\n", atomic_load(&answered),
	       elapsed, (double)atomic_load(&answered) / elapsed, atomic_load(&errors), seen);
	return atomic_load(&errors) == 0 ? 0 : 1;
}
