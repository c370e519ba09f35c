/*
 * fleet_prefork.c - a pre-forking server: a master that forks its workers after start
 * (as lighttpd does with server.max-worker), for the fleet tests (tests/test_fleet.py).
 *
 * Usage: fleet_prefork WORKERS STATE_DIR
 * The master listens on 127.0.0.1 (a port the kernel picks) and prints "port P", then
 * forks WORKERS workers, printing "worker PID" for each.  Every worker accepts on the
 * shared socket and answers each line with "PID VALUE", VALUE = fleet_answer(1); it also
 * records fleet_answer(1) in STATE_DIR/PID every 10 ms (written whole, then renamed), so
 * the test reads what each worker computes now.  When a worker dies the master forks a
 * new one (and prints "worker PID"): that one inherits the master's patches.  SIGTERM:
 * the master stops its workers and exits 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WORKERS_MAX 16

__attribute__((noinline)) int fleet_answer(int x)
{
	return x + 1; /* fleet_prefork_patch.c: x + 100 */
}

static volatile sig_atomic_t stopping;
static const char *state_dir;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

static void record(void)
{
	char path[4096], tmp[4200];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%d", state_dir, (int)getpid());
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f)
		return;
	fprintf(f, "%d\n", fleet_answer(1));
	if (fclose(f) == 0)
		rename(tmp, path);
}

static void serve_one(int conn)
{
	char line[256], reply[64];
	ssize_t n = read(conn, line, sizeof(line));

	if (n > 0) {
		int len = snprintf(reply, sizeof(reply), "%d %d\n", (int)getpid(), fleet_answer(1));
		if (write(conn, reply, (size_t)len) < 0)
			perror("write");
	}
	close(conn);
}

static void worker(int listener)
{
	struct sigaction sa = {.sa_handler = SIG_DFL};

	sigaction(SIGTERM, &sa, NULL);
	for (;;) {
		fd_set fds;
		struct timeval tv = {.tv_sec = 0, .tv_usec = 10000};

		record();
		FD_ZERO(&fds);
		FD_SET(listener, &fds);
		/* Every worker waits on the one listener: all wake for a connection and one gets
		 * it.  The listener is non-blocking, so the others' accept() fails (EAGAIN)
		 * instead of blocking them, without recording, until the next connection. */
		if (select(listener + 1, &fds, NULL, NULL, &tv) > 0) {
			int conn = accept(listener, NULL, NULL);
			if (conn >= 0)
				serve_one(conn);
		}
		if (getppid() == 1)
			_exit(0); /* the master is gone */
	}
}

static pid_t spawn(int listener)
{
	pid_t pid;

	fflush(stdout);
	pid = fork();
	if (pid == 0)
		worker(listener);
	if (pid > 0)
		printf("worker %d\n", (int)pid);
	fflush(stdout);
	return pid;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = {.sin_family = AF_INET};
	socklen_t len = sizeof(addr);
	struct sigaction sa = {.sa_handler = on_term};
	pid_t workers[WORKERS_MAX];
	int n, listener, one = 1;

	if (argc < 3 || (n = atoi(argv[1])) < 1 || n > WORKERS_MAX) {
		fprintf(stderr, "usage: fleet_prefork WORKERS(1-%d) STATE_DIR\n", WORKERS_MAX);
		return 2;
	}
	state_dir = argv[2];
	sigaction(SIGTERM, &sa, NULL);
	listener = socket(AF_INET, SOCK_STREAM, 0);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (listener < 0 || fcntl(listener, F_SETFL, O_NONBLOCK) != 0 ||
	    bind(listener, (struct sockaddr *)&addr, sizeof(addr)) != 0 ||
	    listen(listener, 64) != 0 || getsockname(listener, (struct sockaddr *)&addr, &len) != 0) {
		perror("listen");
		return 1;
	}
	printf("port %d\n", ntohs(addr.sin_port));
	for (int i = 0; i < n; i++)
		workers[i] = spawn(listener);
	while (!stopping) {
		/* Polled: SIGTERM may be handled by another thread (the shim's control thread),
		 * which would not interrupt a blocking waitpid() here. */
		struct timespec tick = {.tv_sec = 0, .tv_nsec = 10000000};
		int status;
		pid_t dead = waitpid(-1, &status, WNOHANG);

		if (dead < 0 && errno != EINTR)
			break;
		if (dead == 0)
			nanosleep(&tick, NULL);
		for (int i = 0; i < n && dead > 0 && !stopping; i++)
			if (workers[i] == dead)
				workers[i] = spawn(listener);
	}
	for (int i = 0; i < n; i++)
		if (workers[i] > 0)
			kill(workers[i], SIGTERM);
	while (wait(NULL) > 0)
		;
	printf("stopped\n");
	return 0;
}
