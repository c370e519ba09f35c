/*
 * rel_loadclient.c - clients of the server example (examples/server) that check every
 * answer while the test applies and reverts fix_parse over the control socket
 * (tests/test_reliability.py).
 *
 * Usage: rel_loadclient PORT THREADS PHASE_FILE MAX_SECONDS
 *
 * PHASE_FILE holds two native uint64 that the test rewrites in place (mmap):
 *   [0] phase: 4k+1 while apply runs, 4k+2 once it returned (the patch is in effect),
 *       4k+3 while revert runs, 4k+4 once it returned (the original is in effect);
 *   [1] non-zero: stop.
 * Each thread sends pipelined requests (DEPTH per round trip) on one connection, or a
 * new connection per round trip (every third thread), and checks each answer:
 *   - it must be the old or the new behaviour of the request ("wrong" otherwise);
 *   - if the phase was the same when the request was sent and when its answer came,
 *     and it was "in effect" for one side, the answer must be that side's ("stale");
 *   - a connection that fails or closes counts as "failed".
 * Prints: requests=N old=N new=N wrong=N stale=N failed=N
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define DEPTH 4
#define THREADS_MAX 32

/* A request, and its answers from the original parse_request and from fix_parse. */
struct exchange {
	const char *request, *old_answer, *new_answer;
};

static const struct exchange exchanges[] = {
	{"SUM 1 2 3 4 5 6 7 8", "ERR too many numbers (at most 8)", "OK 36"},
	{"SUM 1 2 3", "OK 6", "OK 6"},
	{"PING", "PONG", "PONG"},
	{"SUM 1 2 3 4 5 6 7 8 9", "ERR too many numbers (at most 8)",
	 "ERR too many numbers (at most 8)"},
	{"SUM 1 x", "ERR not a number: 'x'", "ERR not a number: 'x'"},
	{"SUM -5 8 -1 2 2 2 2 2", "ERR too many numbers (at most 8)", "OK 12"},
};
#define NEXCHANGES (sizeof exchanges / sizeof exchanges[0])

static int port;
static double max_seconds, start;
static volatile uint64_t *shared; /* [0] phase, [1] stop */
static atomic_long requests, olds, news, wrong, stale, failed;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int stopping(void)
{
	return shared[1] != 0 || now_s() - start > max_seconds;
}

static int connect_server(void)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	struct timeval tv = {.tv_sec = 10}; /* a stuck server fails the run, never hangs it */
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

/* Read one answer line (without '\n') into line; buffered in buf/len. */
static int read_answer(int fd, char *buf, size_t *len, char *line, size_t size)
{
	for (;;) {
		char *nl = memchr(buf, '\n', *len);
		ssize_t n;

		if (nl) {
			size_t l = (size_t)(nl - buf);

			if (l >= size)
				return -1;
			memcpy(line, buf, l);
			line[l] = '\0';
			*len -= l + 1;
			memmove(buf, nl + 1, *len);
			return 0;
		}
		if (*len >= 4096)
			return -1;
		n = recv(fd, buf + *len, 4096 - *len, 0);
		if (n <= 0)
			return -1;
		*len += (size_t)n;
	}
}

static void judge(const struct exchange *e, uint64_t before, uint64_t after, const char *got)
{
	int is_old = strcmp(got, e->old_answer) == 0, is_new = strcmp(got, e->new_answer) == 0;

	atomic_fetch_add(&requests, 1);
	if (!is_old && !is_new) {
		if (atomic_fetch_add(&wrong, 1) < 5)
			fprintf(stderr, "wrong: %s -> %s\n", e->request, got);
		return;
	}
	if (is_old != is_new) {
		atomic_fetch_add(is_new ? &news : &olds, 1);
		/* The phase did not move while this request was in flight: only one answer fits. */
		if (before == after && ((before % 4 == 2 && !is_new) || (before % 4 == 0 && !is_old)))
			if (atomic_fetch_add(&stale, 1) < 5)
				fprintf(stderr, "stale: phase %llu: %s -> %s\n",
					(unsigned long long)before, e->request, got);
	}
}

static void *client(void *arg)
{
	long id = (long)arg;
	int reconnect = id % 3 == 2, fd = -1;
	unsigned next = (unsigned)id;
	char buf[4096], line[512], out[DEPTH * 64];

	while (!stopping()) {
		const struct exchange *batch[DEPTH];
		uint64_t before[DEPTH];
		size_t len = 0, off = 0;

		if (fd < 0 && (fd = connect_server()) < 0) {
			atomic_fetch_add(&failed, 1);
			return NULL;
		}
		for (int i = 0; i < DEPTH; i++) {
			batch[i] = &exchanges[next++ % NEXCHANGES];
			off += (size_t)snprintf(out + off, sizeof out - off, "%s\n", batch[i]->request);
		}
		before[0] = shared[0];
		for (int i = 1; i < DEPTH; i++)
			before[i] = before[0];
		if (send(fd, out, off, MSG_NOSIGNAL) != (ssize_t)off) {
			atomic_fetch_add(&failed, 1);
			return NULL;
		}
		for (int i = 0; i < DEPTH; i++) {
			if (read_answer(fd, buf, &len, line, sizeof line) < 0) {
				atomic_fetch_add(&failed, 1);
				return NULL;
			}
			judge(batch[i], before[i], shared[0], line);
		}
		if (reconnect) {
			close(fd);
			fd = -1;
		}
	}
	if (fd >= 0)
		close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[THREADS_MAX];
	int nthreads, fd;

	if (argc < 5)
		return 2;
	port = atoi(argv[1]);
	nthreads = atoi(argv[2]);
	max_seconds = atof(argv[4]);
	if (nthreads < 1 || nthreads > THREADS_MAX)
		return 2;
	fd = open(argv[3], O_RDONLY);
	if (fd < 0)
		return 2;
	shared = mmap(NULL, 16, PROT_READ, MAP_SHARED, fd, 0);
	if (shared == MAP_FAILED)
		return 2;
	start = now_s();
	for (long i = 0; i < nthreads; i++)
		pthread_create(&t[i], NULL, client, (void *)i);
	printf("started\n");
	fflush(stdout);
	for (int i = 0; i < nthreads; i++)
		pthread_join(t[i], NULL);
	printf("requests=%ld old=%ld new=%ld wrong=%ld stale=%ld failed=%ld\n",
	       atomic_load(&requests), atomic_load(&olds), atomic_load(&news), atomic_load(&wrong),
	       atomic_load(&stale), atomic_load(&failed));
	return 0;
}
