/*
 * server.c - a small multi-threaded TCP service: one request per line, one answer per line.
 *
 *   PING             -> PONG
 *   SUM 1 2 3        -> OK 6        (1 to 8 integers; "ERR sum out of range" on overflow)
 *   QUIT             -> BYE         (and the connection is closed)
 *   STATS            -> OK requests=<n> errors=<n>   (counted since start)
 *   anything else    -> ERR <reason>
 *
 * Usage: server [PORT]   (0 or none: any free port).  It listens on 127.0.0.1, prints
 * "listening on 127.0.0.1:<port>" once it accepts connections, serves them with WORKERS
 * threads and exits cleanly on SIGTERM or SIGINT.  Built with dependency('fentry'), it
 * can be patched while it runs: see README.md.
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "parser.h"
#include "stats.h"

#define WORKERS 4
#define REQUEST_MAX 1024   /* bytes of one request line, its '\n' not counted        */
#define REPLY_MAX 256      /* bytes of one answer line                               */
#define IDLE_MS 60000      /* a client that sends nothing for this long is dropped    */

/* Read end of a pipe whose write end main() closes to stop the workers: once it is
 * closed, poll() reports this descriptor to every worker. */
static int stop_fd = -1;

/* Wait until fd has `events`: 1; 0 when the server stops or `timeout_ms` passed. */
static int wait_for(int fd, short events, int timeout_ms)
{
	struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = stop_fd, .events = POLLIN}};
	int n;

	do
		n = poll(p, 2, timeout_ms);
	while (n < 0 && errno == EINTR);
	return n > 0 && p[1].revents == 0;
}

/* Send `line` and a '\n'; 0 if the client is gone or stopped reading. */
static int send_line(int fd, const char *line)
{
	char out[REPLY_MAX + 1];
	int len = snprintf(out, sizeof out, "%.*s\n", REPLY_MAX - 1, line);
	size_t off = 0;

	while (off < (size_t)len) {
		ssize_t n = send(fd, out + off, (size_t)len - off, MSG_NOSIGNAL);

		if (n > 0)
			off += (size_t)n;
		else if (n < 0 && errno == EINTR)
			continue;
		else if (n < 0 && errno == EAGAIN && wait_for(fd, POLLOUT, IDLE_MS))
			continue;
		else
			return 0;
	}
	return 1;
}

/* What STATS reports (stats.h); a patch reaches both with FENTRY_REF. */
static struct server_stats stats;
static pthread_mutex_t stats_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Count one request.  The second bug of this example: answer() below passes 0 for
 * requests the parser refused, so STATS always says errors=0 (patches/fix_stats.c).
 */
static void count_request(int failed)
{
	pthread_mutex_lock(&stats_lock);
	stats.requests++;
	if (failed)
		stats.errors++;
	pthread_mutex_unlock(&stats_lock);
}

static void report_stats(char *reply, size_t size)
{
	pthread_mutex_lock(&stats_lock);
	snprintf(reply, size, "OK requests=%lu errors=%lu", stats.requests, stats.errors);
	pthread_mutex_unlock(&stats_lock);
}

/* Carry out a parsed request; 0 when the connection should close afterwards. */
static int execute_request(const struct request *req, char *reply, size_t size)
{
	long long total = 0;

	switch (req->verb) {
	case VERB_PING:
		snprintf(reply, size, "PONG");
		return 1;
	case VERB_QUIT:
		snprintf(reply, size, "BYE");
		return 0;
	case VERB_SUM:
		for (int i = 0; i < req->nnumbers; i++)
			if (__builtin_add_overflow(total, req->numbers[i], &total)) {
				snprintf(reply, size, "ERR sum out of range");
				return 1;
			}
		snprintf(reply, size, "OK %lld", total);
		return 1;
	}
	snprintf(reply, size, "ERR internal error: unknown verb");
	return 1;
}

/*
 * One request line (NUL-terminated, `len` bytes before the NUL) into one answer.
 * noinline, noclone: at -O2 gcc would inline this static function into serve_client(),
 * or call a copy of it with `size` folded in (answer.constprop.0) instead of answer(),
 * and a patch of answer() (patches/fix_stats.c) would reach neither (the generator says
 * so when it happens).
 */
__attribute__((noinline, noclone)) static int answer(const char *line, size_t len, char *reply,
					    size_t size)
{
	struct request req;
	char err[128];

	if (strlen(line) != len) {
		count_request(1);
		snprintf(reply, size, "ERR request contains a NUL byte");
		return 1;
	}
	if (strcmp(line, "STATS") == 0) {
		report_stats(reply, size);
		return 1;
	}
	if (parse_request(line, &req, err, sizeof err) < 0) {
		count_request(0); /* the bug: should be count_request(1) */
		snprintf(reply, size, "ERR %s", err);
		return 1;
	}
	count_request(0);
	return execute_request(&req, reply, size);
}

/*
 * Serve one connection until the client closes it, says QUIT, stays idle for IDLE_MS
 * or the server stops.  A line longer than REQUEST_MAX is skipped up to its '\n' and
 * answered with one error; a partial line at the end of the connection is dropped.
 */
static void serve_client(int fd)
{
	char buf[REQUEST_MAX + 1], reply[REPLY_MAX];
	size_t len = 0;
	int too_long = 0;

	for (;;) {
		char *start = buf, *nl;
		ssize_t n;

		if (!wait_for(fd, POLLIN, IDLE_MS))
			return;
		n = recv(fd, buf + len, sizeof buf - len, 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return;
		if (n < 0)
			continue;
		len += (size_t)n;
		while ((nl = memchr(start, '\n', len - (size_t)(start - buf))) != NULL) {
			size_t line_len = (size_t)(nl - start);
			int keep = 1;

			if (line_len > 0 && start[line_len - 1] == '\r') /* telnet, nc -C */
				line_len--;
			start[line_len] = '\0';
			if (too_long)
				snprintf(reply, sizeof reply, "ERR request longer than %d bytes",
					 REQUEST_MAX);
			else
				keep = answer(start, line_len, reply, sizeof reply);
			too_long = 0;
			if (!send_line(fd, reply) || !keep)
				return;
			start = nl + 1;
		}
		len -= (size_t)(start - buf);
		memmove(buf, start, len);
		if (len == sizeof buf) { /* no '\n' in REQUEST_MAX + 1 bytes */
			too_long = 1;
			len = 0;
		}
	}
}

static void *worker(void *arg)
{
	int listen_fd = *(const int *)arg;

	while (wait_for(listen_fd, POLLIN, -1)) {
		int fd = accept(listen_fd, NULL, NULL);

		if (fd < 0)
			continue; /* another worker took it (EAGAIN), or the client left */
		/* Answers are small and sent one by one: without TCP_NODELAY a client that
		 * pipelines requests waits for delayed ACKs (~40 ms a batch). */
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));
		if (fcntl(fd, F_SETFL, O_NONBLOCK) == 0)
			serve_client(fd);
		close(fd);
	}
	return NULL;
}

/* A non-blocking socket listening on 127.0.0.1:port; *bound gets the actual port. */
static int open_listener(int port, int *bound)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	socklen_t addr_len = sizeof addr;
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
	    bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0 ||
	    fcntl(fd, F_SETFL, O_NONBLOCK) < 0 ||
	    getsockname(fd, (struct sockaddr *)&addr, &addr_len) < 0) {
		fprintf(stderr, "server: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	*bound = ntohs(addr.sin_port);
	return fd;
}

static int parse_port(int argc, char **argv)
{
	char *end;
	long port;

	if (argc < 2)
		return 0;
	errno = 0;
	port = strtol(argv[1], &end, 10);
	if (argc > 2 || errno || end == argv[1] || *end || port < 0 || port > 65535) {
		fprintf(stderr, "usage: server [PORT]   (0 or none: any free port)\n");
		return -1;
	}
	return (int)port;
}

int main(int argc, char **argv)
{
	pthread_t workers[WORKERS];
	int port = parse_port(argc, argv), listen_fd, stop_pipe[2], sig, i;
	sigset_t stop_signals;

	if (port < 0)
		return 2;
	/* Blocked here, so in every worker too: only sigwait() below receives them. */
	sigemptyset(&stop_signals);
	sigaddset(&stop_signals, SIGINT);
	sigaddset(&stop_signals, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
	signal(SIGPIPE, SIG_IGN); /* a reader gone from stdout must not kill us at exit */

	listen_fd = open_listener(port, &port);
	if (listen_fd < 0)
		return 1;
	if (pipe(stop_pipe) < 0) {
		perror("server: pipe");
		return 1;
	}
	stop_fd = stop_pipe[0];
	for (i = 0; i < WORKERS; i++)
		if (pthread_create(&workers[i], NULL, worker, &listen_fd) != 0) {
			fprintf(stderr, "server: cannot start worker %d\n", i);
			return 1;
		}
	printf("listening on 127.0.0.1:%d\n", port);
	fflush(stdout);

	sigwait(&stop_signals, &sig);
	close(stop_pipe[1]); /* wakes every worker: see stop_fd */
	for (i = 0; i < WORKERS; i++)
		pthread_join(workers[i], NULL);
	close(listen_fd);
	close(stop_pipe[0]);
	printf("stopped (%s)\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
	return 0;
}
