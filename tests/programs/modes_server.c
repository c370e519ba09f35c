/*
 * modes_server.c - a multi-threaded TCP server for the preload and attach tests.
 *
 * Usage: modes_server [BUSY_THREADS]
 * Listens on 127.0.0.1 (a free port), prints "port N" and "pid N" on stdout, then serves
 * every connection in its own thread, one request per line:
 *   "c X"  -> compute(X)          (the function the tests patch: 2*X, patched 3*X)
 *   "s"    -> one line: for each busy thread "calls:last" separated by spaces, where
 *             last is what compute(thread number + 1) returned most recently; then
 *             "bad=N", the results that were neither 2*X nor 3*X (must stay 0)
 *   "u"    -> how many SIGUSR1 the process has handled (SA_RESTART handler)
 *   "q"    -> exit(0)
 * BUSY_THREADS threads (default 8) call compute() and malloc()/free() in a tight loop,
 * so a debugger that stops the process finds threads inside the allocator and inside
 * __fentry__ as often as in the program's own code.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_BUSY 64

/* noinline, noclone: callers must reach compute's own fentry site. */
__attribute__((noinline, noclone)) long compute(long x)
{
	return 2 * x;
}

struct busy {
	atomic_long calls;
	atomic_long last;
};

static struct busy busy[MAX_BUSY];
static int nbusy;
static atomic_long bad;
static atomic_long usr1;

static void on_usr1(int sig)
{
	(void)sig;
	atomic_fetch_add(&usr1, 1);
}

static void *busy_loop(void *arg)
{
	long id = (long)(intptr_t)arg, x = id + 1;

	for (;;) {
		long r = compute(x);
		char *p;

		if (r != 2 * x && r != 3 * x)
			atomic_fetch_add(&bad, 1);
		atomic_store_explicit(&busy[id].last, r, memory_order_relaxed);
		atomic_fetch_add_explicit(&busy[id].calls, 1, memory_order_relaxed);
		p = malloc(16 + (size_t)(r & 255));
		if (p) {
			p[0] = (char)r;
			free(p);
		}
	}
	return NULL;
}

static void reply_stats(FILE *out)
{
	for (int i = 0; i < nbusy; i++)
		fprintf(out, "%ld:%ld ", atomic_load(&busy[i].calls), atomic_load(&busy[i].last));
	fprintf(out, "bad=%ld\n", atomic_load(&bad));
}

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	FILE *in = fdopen(fd, "r"), *out = fdopen(dup(fd), "w");
	char line[256];
	long x;

	if (!in || !out)
		return NULL;
	while (fgets(line, sizeof(line), in)) {
		if (sscanf(line, "c %ld", &x) == 1)
			fprintf(out, "%ld\n", compute(x));
		else if (line[0] == 's')
			reply_stats(out);
		else if (line[0] == 'u')
			fprintf(out, "%ld\n", atomic_load(&usr1));
		else if (line[0] == 'q')
			exit(0);
		else
			fprintf(out, "?\n");
		fflush(out);
	}
	fclose(in);
	fclose(out);
	return NULL;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t len = sizeof(addr);
	pthread_attr_t detached;
	pthread_t tid;
	int lfd, one = 1;

	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };

	sigaction(SIGUSR1, &sa, NULL);
	nbusy = argc > 1 ? atoi(argv[1]) : 8;
	if (nbusy < 0 || nbusy > MAX_BUSY)
		return 2;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 128) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&addr, &len) < 0) {
		perror("modes_server: listen");
		return 1;
	}
	pthread_attr_init(&detached);
	pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
	for (long i = 0; i < nbusy; i++)
		if (pthread_create(&tid, &detached, busy_loop, (void *)(intptr_t)i) != 0)
			return 1;
	printf("port %d\npid %d\n", ntohs(addr.sin_port), (int)getpid());
	fflush(stdout);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0)
			continue;
		if (pthread_create(&tid, &detached, serve, (void *)(intptr_t)fd) != 0)
			close(fd);
	}
}
