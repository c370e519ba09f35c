/*
 * stackscan.c - proving that no thread can be running, or return into, a patch's code.
 *
 * A reverted patch is no longer reached by any call site, but a thread may still be
 * inside its replacement (or several frames below it) and will return there.  Before
 * dlclose() the loader asks every other thread, by a signal, to look at itself: the
 * handler checks the interrupted registers and every word of its stack from the
 * interrupted stack pointer to the end of that stack's mapping.  A value inside the
 * patch's code counts as "maybe running it" - conservative: a stale return address
 * left on the stack also counts, and the answer is then "busy, retry", never a crash.
 * Threads that do not answer within the timeout (signal blocked, stopped) count as busy.
 *
 * The signal is SIGRTMAX - 3 unless FENTRY_UNLOAD_SIGNAL names another; if the program
 * has its own handler for it, unloading is refused (never steal a program's signal).
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "arch/x86_64/stackscan.h"

#define MAX_RANGES 64
#define MAX_MAPS 4096
#define MAX_THREADS 4096
#define ANSWER_TIMEOUT_NS 1000000000L

struct range {
	uintptr_t lo, hi;
};

/* Written by the checker before signalling, read by the handlers. */
static struct range code[MAX_RANGES];
static size_t ncode;
static struct range maps[MAX_MAPS]; /* readable mappings: bounds of each stack */
static size_t nmaps;
/* Written by the handlers. */
static atomic_int answers, hits;
static atomic_long hit_tid;

static int in_code(uintptr_t v)
{
	for (size_t i = 0; i < ncode; i++)
		if (v >= code[i].lo && v < code[i].hi)
			return 1;
	return 0;
}

/* Runs in each checked thread; async-signal-safe (reads only the snapshots above). */
static void on_check(int sig, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = ctx;
	uintptr_t sp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
	int hit = 0;

	(void)sig;
	(void)info;
	for (int r = 0; r < NGREG && !hit; r++)
		hit = in_code((uintptr_t)uc->uc_mcontext.gregs[r]);
	for (size_t m = 0; m < nmaps && !hit; m++) {
		if (sp < maps[m].lo || sp >= maps[m].hi)
			continue;
		for (const uintptr_t *w = (const uintptr_t *)(sp & ~(uintptr_t)7);
		     (uintptr_t)(w + 1) <= maps[m].hi && !hit; w++)
			hit = in_code(*w);
		break;
	}
	if (hit) {
		atomic_fetch_add(&hits, 1);
		atomic_store(&hit_tid, (long)syscall(SYS_gettid));
	}
	atomic_fetch_add(&answers, 1);
}

static void read_maps(void)
{
	FILE *f = fopen("/proc/self/maps", "re");
	char line[512];

	nmaps = 0;
	if (!f)
		return;
	while (nmaps < MAX_MAPS && fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		char perms[8];

		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) == 3 && perms[0] == 'r') {
			maps[nmaps].lo = lo;
			maps[nmaps++].hi = hi;
		}
	}
	fclose(f);
}

/* The ids of this process's threads other than the caller; -1 if too many. */
static int list_threads(pid_t *tids, size_t *n)
{
	DIR *d = opendir("/proc/self/task");
	pid_t self = (pid_t)syscall(SYS_gettid);
	struct dirent *e;

	*n = 0;
	if (!d)
		return -1;
	while ((e = readdir(d)) != NULL) {
		pid_t tid = (pid_t)atoi(e->d_name);

		if (tid <= 0 || tid == self)
			continue;
		if (*n == MAX_THREADS) {
			closedir(d);
			return -1;
		}
		tids[(*n)++] = tid;
	}
	closedir(d);
	return 0;
}

static int check_signal(void)
{
	const char *env = secure_getenv("FENTRY_UNLOAD_SIGNAL");
	int sig = env && *env ? atoi(env) : SIGRTMAX - 3;

	return sig >= SIGRTMIN && sig <= SIGRTMAX ? sig : -1;
}

static int install(int sig, char *err)
{
	struct sigaction sa, old;

	if (sigaction(sig, NULL, &old) < 0)
		return fentry_fail(err, "signal %d: %s", sig, strerror(errno));
	if ((old.sa_flags & SA_SIGINFO) ? old.sa_sigaction != on_check
					: old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)
		return fentry_fail(err, "signal %d has a handler of the program's; "
				"set FENTRY_UNLOAD_SIGNAL to a free real-time signal", sig);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_check;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigfillset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL) < 0
		       ? fentry_fail(err, "signal %d: %s", sig, strerror(errno))
		       : 0;
}

static long elapsed_ns(const struct timespec *since)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

static int same_threads(const pid_t *a, size_t na, const pid_t *b, size_t nb)
{
	if (na != nb)
		return 0;
	for (size_t i = 0; i < na; i++) {
		size_t j = 0;

		while (j < nb && b[j] != a[i])
			j++;
		if (j == nb)
			return 0;
	}
	return 1;
}

FENTRY_HIDDEN int fentry_threads_clear_of(const uintptr_t (*ranges)[2], size_t nranges,
					  const char *what, char *err)
{
	static pid_t before[MAX_THREADS], after[MAX_THREADS];
	size_t nbefore, nafter, sent = 0;
	int sig = check_signal();
	pid_t pid = getpid();
	struct timespec start;

	if (sig < 0)
		return fentry_fail(err, "FENTRY_UNLOAD_SIGNAL is not a real-time signal "
				"number (%d..%d)", SIGRTMIN, SIGRTMAX);
	if (nranges > MAX_RANGES)
		return fentry_fail(err, "%s has too many segments", what);
	for (size_t i = 0; i < nranges; i++) {
		code[i].lo = ranges[i][0];
		code[i].hi = ranges[i][1];
	}
	ncode = nranges;
	read_maps();
	if (install(sig, err) < 0)
		return -1;
	atomic_store(&answers, 0);
	atomic_store(&hits, 0);
	if (list_threads(before, &nbefore) < 0)
		return fentry_fail(err, "cannot list the process's threads");
	for (size_t i = 0; i < nbefore; i++)
		if (syscall(SYS_tgkill, pid, before[i], sig) == 0)
			sent++;
	clock_gettime(CLOCK_MONOTONIC, &start);
	while ((size_t)atomic_load(&answers) < sent && elapsed_ns(&start) < ANSWER_TIMEOUT_NS) {
		struct timespec pause = {0, 200000};

		nanosleep(&pause, NULL);
	}
	if ((size_t)atomic_load(&answers) < sent)
		return fentry_fail(err, "busy: %zu thread(s) did not answer the stack "
				"check within 1 s (signal %d blocked?); %s stays loaded, retry later",
				sent - (size_t)atomic_load(&answers), sig, what);
	if (atomic_load(&hits) > 0)
		return fentry_fail(err, "busy: thread %ld may be running %s's code (its "
				"registers or stack hold an address in it); it stays loaded, retry later",
				atomic_load(&hit_tid), what);
	/* A thread created meanwhile was not checked: let the caller retry. */
	if (list_threads(after, &nafter) < 0 || !same_threads(before, nbefore, after, nafter))
		return fentry_fail(err, "busy: threads were created during the stack "
				"check; %s stays loaded, retry later", what);
	return 0;
}
