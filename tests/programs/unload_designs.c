/*
 * unload_designs.c - program designs the unload check must neither miss nor disturb
 * (tests/test_unload_designs.py).
 *
 * Usage: unload_designs DESIGN PATCH.so [ARG]
 *
 * A "parker" thread calls park(); the patch's replacement (unload_designs_patch.c)
 * announces "inside" and waits until the file $PARK_RELEASE exists.  Designs:
 *
 *   maps N         the parker is started first, then N more mappings are made (their
 *                  addresses lie below its stack: /proc/self/maps lists them first)
 *   altstack-wait  inside the replacement the parker gets SIGUSR1, whose handler runs on
 *                  an alternate signal stack (SA_ONSTACK) and waits there (nanosleep)
 *   altstack-spin  the same, but the handler spins
 *   hot            no parker: a thread calls park() all the time (never blocks)
 *   window N       no parker: the residual window measured - 4 threads in poll() with a
 *                  1 ms timeout (awake often: the worst case), 4 with 20 ms, a thread calling
 *                  park(); N cycles as for blockers, then it prints how many poll() calls
 *                  each group made and how many returned early (EINTR), and waits for
 *                  stdin to close (the test reads status meanwhile)
 *   blockers N     no parker: threads blocked in sleep(), poll(), epoll_wait(), select()
 *                  and nanosleep() (measuring that each returns as it should), one thread
 *                  calling park() all the time; main applies, reverts and unloads the
 *                  patch N times in process and prints the figures
 *
 * For the parker designs, main reads commands on stdin, one per line, and answers one
 * line each: "apply" -> "apply ok|failed: why", "revert", "unload" -> "unload ok|busy:
 * ...|failed: ...", "signal" (SIGUSR1 to the parker), "quit".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#include <fentry.h>

/* noinline: the threads must call it, not an inlined copy. */
__attribute__((noinline)) int park(int x)
{
	return x; /* the patch waits for $PARK_RELEASE inside the replacement */
}

static const char *design, *patch;
static char name[256];
static pthread_t parker_thread;
static atomic_int handler_entered, stop;

/* ---- the program's own signal handler, on an alternate stack ------------------------- */

static void on_usr1(int sig)
{
	const char *release = getenv("PARK_RELEASE");

	(void)sig;
	atomic_store(&handler_entered, 1);
	if (strcmp(design, "altstack-spin") == 0) {
		while (access(release, F_OK) != 0)
			for (volatile int i = 0; i < 100000; i++)
				;
	} else {
		struct timespec t = { 0, 20 * 1000 * 1000 };

		while (access(release, F_OK) != 0)
			nanosleep(&t, NULL);
	}
}

static void *parker(void *arg)
{
	(void)arg;
	if (strncmp(design, "altstack", 8) == 0) {
		stack_t ss = { .ss_sp = malloc(64 * 1024), .ss_size = 64 * 1024 };
		struct sigaction sa;

		sigaltstack(&ss, NULL);
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_usr1;
		sa.sa_flags = SA_ONSTACK | SA_RESTART;
		sigaction(SIGUSR1, &sa, NULL);
	}
	for (;;) {
		int r = park(1);

		printf("park returned %d\n", r);
		fflush(stdout);
		usleep(100 * 1000);
	}
	return NULL;
}

static void command_loop(void)
{
	char line[64], err[512];

	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = '\0';
		if (strcmp(line, "apply") == 0) {
			if (fentry_apply(patch, err, sizeof(err)) == 0)
				printf("apply ok\n");
			else
				printf("apply failed: %s\n", err);
		} else if (strcmp(line, "revert") == 0) {
			if (fentry_revert(name, err, sizeof(err)) == 0)
				printf("revert ok\n");
			else
				printf("revert failed: %s\n", err);
		} else if (strcmp(line, "unload") == 0) {
			if (fentry_unload(name, err, sizeof(err)) == 0)
				printf("unload ok\n");
			else
				printf("unload %s\n", strncmp(err, "busy", 4) == 0 ? err : "failed");
		} else if (strcmp(line, "signal") == 0) {
			pthread_kill(parker_thread, SIGUSR1);
			while (!atomic_load(&handler_entered))
				usleep(1000);
			printf("handler entered\n");
		} else if (strcmp(line, "quit") == 0) {
			exit(0);
		} else {
			printf("unknown command %s\n", line);
		}
		fflush(stdout);
	}
}

/* ---- blocked threads that must not notice anything ------------------------------------ */

struct blocker {
	const char *what;
	atomic_long calls, wrong;
};

static struct blocker blockers[] = {
	{ "sleep" }, { "poll" }, { "epoll_wait" }, { "select" }, { "nanosleep" },
};
#define NBLOCKERS (sizeof(blockers) / sizeof(blockers[0]))
#define WAIT_MS 50

static long now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Each call must block for its whole time and return its normal result. */
static void *blocked(void *arg)
{
	struct blocker *b = arg;
	int ep = epoll_create1(0);

	while (!atomic_load(&stop)) {
		long start = now_ms(), took;
		int ok;

		if (strcmp(b->what, "sleep") == 0) {
			ok = sleep(1) == 0;
		} else if (strcmp(b->what, "poll") == 0) {
			ok = poll(NULL, 0, WAIT_MS) == 0;
		} else if (strcmp(b->what, "epoll_wait") == 0) {
			struct epoll_event e;

			ok = epoll_wait(ep, &e, 1, WAIT_MS) == 0;
		} else if (strcmp(b->what, "select") == 0) {
			struct timeval tv = { 0, WAIT_MS * 1000 };

			ok = select(0, NULL, NULL, NULL, &tv) == 0;
		} else {
			struct timespec t = { 0, WAIT_MS * 1000 * 1000 }, left = { 0, 0 };

			ok = nanosleep(&t, &left) == 0;
		}
		took = now_ms() - start;
		if (!ok || took < (strcmp(b->what, "sleep") == 0 ? 1000 : WAIT_MS) - 1) {
			atomic_fetch_add(&b->wrong, 1);
			fprintf(stderr, "%s: returned early or failed (%ld ms, errno %d)\n", b->what,
				took, errno);
		}
		atomic_fetch_add(&b->calls, 1);
	}
	return NULL;
}

static atomic_long hot_calls, hot_wrong;

static void *hot(void *arg)
{
	(void)arg;
	while (!atomic_load(&stop)) {
		int r = park(1);

		if (r != 1 && r != 101)
			atomic_fetch_add(&hot_wrong, 1);
		atomic_fetch_add(&hot_calls, 1);
	}
	return NULL;
}

/* The residual window: poll() loops that are awake often. */
struct poller {
	int ms;
	atomic_long calls, early;
};

static void *polling(void *arg)
{
	struct poller *p = arg;

	while (!atomic_load(&stop)) {
		if (poll(NULL, 0, p->ms) != 0)
			atomic_fetch_add(&p->early, 1);
		atomic_fetch_add(&p->calls, 1);
	}
	return NULL;
}

static int run_window(int cycles)
{
	static struct poller fast = { 1 }, slow = { 20 };
	pthread_t t[9];
	char err[512], buf[16];
	long busy = 0;

	for (int i = 0; i < 8; i++)
		pthread_create(&t[i], NULL, polling, i < 4 ? &fast : &slow);
	pthread_create(&t[8], NULL, hot, NULL);
	usleep(100 * 1000);
	for (int c = 0; c < cycles; c++) {
		if (fentry_apply(patch, err, sizeof(err)) != 0 || fentry_revert(name, err, sizeof(err)) != 0) {
			fprintf(stderr, "cycle %d: %s\n", c, err);
			return 1;
		}
		while (fentry_unload(name, err, sizeof(err)) != 0) {
			if (strncmp(err, "busy", 4) != 0) {
				fprintf(stderr, "cycle %d: %s\n", c, err);
				return 1;
			}
			busy++;
		}
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < 9; i++)
		pthread_join(t[i], NULL);
	printf("unloads=%d busy=%ld poll1ms_calls=%ld poll1ms_eintr=%ld poll20ms_calls=%ld "
	       "poll20ms_eintr=%ld hot_calls=%ld hot_wrong=%ld\n", cycles, busy,
	       atomic_load(&fast.calls), atomic_load(&fast.early), atomic_load(&slow.calls),
	       atomic_load(&slow.early), atomic_load(&hot_calls), atomic_load(&hot_wrong));
	while (read(0, buf, sizeof(buf)) > 0)
		;
	return 0;
}

static int run_blockers(int cycles)
{
	pthread_t t[NBLOCKERS + 1];
	char err[512];
	long unloaded = 0, busy = 0, failed = 0;

	for (size_t i = 0; i < NBLOCKERS; i++)
		pthread_create(&t[i], NULL, blocked, &blockers[i]);
	pthread_create(&t[NBLOCKERS], NULL, hot, NULL);
	usleep(100 * 1000);
	for (int c = 0; c < cycles; c++) {
		if (fentry_apply(patch, err, sizeof(err)) != 0 || fentry_revert(name, err, sizeof(err)) != 0) {
			fprintf(stderr, "cycle %d: %s\n", c, err);
			failed++;
			break;
		}
		while (fentry_unload(name, err, sizeof(err)) != 0) {
			if (strncmp(err, "busy", 4) != 0) {
				fprintf(stderr, "cycle %d: %s\n", c, err);
				failed++;
				break;
			}
			busy++;
		}
		unloaded++;
	}
	atomic_store(&stop, 1);
	for (size_t i = 0; i <= NBLOCKERS; i++)
		pthread_join(t[i], NULL);
	printf("unloads=%ld busy=%ld failed=%ld hot_calls=%ld hot_wrong=%ld", unloaded, busy, failed,
	       atomic_load(&hot_calls), atomic_load(&hot_wrong));
	for (size_t i = 0; i < NBLOCKERS; i++)
		printf(" %s_calls=%ld %s_wrong=%ld", blockers[i].what, atomic_load(&blockers[i].calls),
		       blockers[i].what, atomic_load(&blockers[i].wrong));
	printf("\n");
	return 0;
}

int main(int argc, char **argv)
{
	const char *base;
	size_t len;

	if (argc < 3)
		return 2;
	design = argv[1];
	patch = argv[2];
	base = strrchr(patch, '/') ? strrchr(patch, '/') + 1 : patch;
	len = strlen(base) > 3 ? strlen(base) - 3 : strlen(base);
	snprintf(name, sizeof(name), "%.*s", (int)len, base);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (strcmp(design, "blockers") == 0)
		return run_blockers(argc > 3 ? atoi(argv[3]) : 1000);
	if (strcmp(design, "window") == 0)
		return run_window(argc > 3 ? atoi(argv[3]) : 1000);
	if (strcmp(design, "hot") == 0)
		pthread_create(&parker_thread, NULL, hot, NULL);
	else
		pthread_create(&parker_thread, NULL, parker, NULL);
	if (strcmp(design, "maps") == 0) {
		/* Alternating protections keep the kernel from merging them into one. */
		long page = sysconf(_SC_PAGESIZE);
		int n = argc > 3 ? atoi(argv[3]) : 6000;

		for (int i = 0; i < n; i++)
			if (mmap(NULL, (size_t)page, i % 2 ? PROT_READ : PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
				return 3;
	}
	printf("ready\n");
	command_loop();
	return 0;
}
