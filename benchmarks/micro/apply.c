/*
 * apply.c - how long fentry_apply() and fentry_revert() take in-process, and the parts
 * a jump-mode change is made of (membarrier SYNC_CORE, a pwrite to /proc/self/mem).
 *
 * Usage: apply PATCH.so CYCLES BUSY
 *   PATCH.so replaces tiny() (tiny.c); CYCLES apply+revert cycles are timed one call at
 *   a time with clock_gettime; BUSY = 1 starts a thread that calls tiny() without pause
 *   meanwhile (the program at work: its core must take part in every core sync) and
 *   checks every result is the old or the new function's.
 * Prints key=value pairs: medians and 90th percentiles in microseconds.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <fentry.h>

#include "tiny.h"

static atomic_int stop, busy_running;
static atomic_long busy_calls, busy_new, busy_wrong;

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* The q-quantile of v[0..n) (sorts v). */
static double quantile(double *v, long n, double q)
{
	qsort(v, (size_t)n, sizeof(*v), by_value);
	return v[(long)(q * (double)(n - 1) + 0.5)];
}

static void *busy(void *arg)
{
	long x = 1, n = 0, newer = 0, bad = 0;

	(void)arg;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		long r = tiny(x);

		if (r == TINY_REPL_BODY(x))
			newer++;
		else if (r != TINY_BODY(x))
			bad++;
		x = (x * 1103515245 + 12345) & 0xffffff;
		if (n++ == 0)
			atomic_store(&busy_running, 1);
	}
	atomic_store(&busy_calls, n);
	atomic_store(&busy_new, newer);
	atomic_store(&busy_wrong, bad);
	return NULL;
}

static void report(const char *key, double *v, long n)
{
	printf(" %s_med=%.3f %s_p90=%.3f", key, quantile(v, n, 0.5), key, quantile(v, n, 0.9));
}

int main(int argc, char **argv)
{
	char err[512], name[256];
	const char *base;
	long cycles, i;
	int with_busy, fd;
	double *apply_us, *revert_us, *part_us, t0, t1, t2, first_apply;
	pthread_t thread;
	uint8_t byte;

	if (argc < 4 || (cycles = atol(argv[2])) <= 0) {
		fprintf(stderr, "usage: apply PATCH.so CYCLES BUSY\n");
		return 2;
	}
	with_busy = atoi(argv[3]);
	base = strrchr(argv[1], '/') ? strrchr(argv[1], '/') + 1 : argv[1];
	snprintf(name, sizeof(name), "%.*s", (int)strlen(base) - 3, base); /* minus ".so" */
	apply_us = calloc((size_t)cycles, sizeof(double));
	revert_us = calloc((size_t)cycles, sizeof(double));
	part_us = calloc((size_t)cycles, sizeof(double));
	if (!apply_us || !revert_us || !part_us)
		return 2;
	if (with_busy && pthread_create(&thread, NULL, busy, NULL) != 0)
		return 2;
	/* The busy thread must be calling tiny() before the first apply (10 s at most on a
	 * loaded machine). */
	for (int waited = 0; with_busy && !atomic_load(&busy_running); waited++) {
		if (waited == 10000) {
			fprintf(stderr, "apply: the busy thread did not start\n");
			return 2;
		}
		usleep(1000);
	}

	/* The first apply also opens, dlopens and validates the patch. */
	t0 = now_us();
	if (fentry_apply(argv[1], err, sizeof(err)) != 0) {
		fprintf(stderr, "apply: %s\n", err);
		return 3;
	}
	first_apply = now_us() - t0;
	if (tiny(1) != TINY_REPL_BODY(1) || fentry_revert(name, err, sizeof(err)) != 0 ||
	    tiny(1) != TINY_BODY(1)) {
		fprintf(stderr, "apply: the first apply/revert did not take effect: %s\n", err);
		return 3;
	}
	/* Later applies re-activate the loaded patch, as a user's re-apply does. */
	for (i = 0; i < cycles; i++) {
		t0 = now_us();
		if (fentry_apply(argv[1], err, sizeof(err)) != 0) {
			fprintf(stderr, "apply %ld: %s\n", i, err);
			return 3;
		}
		t1 = now_us();
		if (fentry_revert(name, err, sizeof(err)) != 0) {
			fprintf(stderr, "revert %ld: %s\n", i, err);
			return 3;
		}
		t2 = now_us();
		apply_us[i] = t1 - t0;
		revert_us[i] = t2 - t1;
	}
	printf("mode=%s cycles=%ld busy=%d first_apply_us=%.3f", fentry_current_mode(), cycles,
	       with_busy, first_apply);
	report("apply_us", apply_us, cycles);
	report("revert_us", revert_us, cycles);

	/* The parts.  membarrier: registered again here (dispatch mode never registers). */
	syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
	for (i = 0; i < cycles; i++) {
		t0 = now_us();
		if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) < 0)
			return 4;
		part_us[i] = now_us() - t0;
	}
	report("membarrier_us", part_us, cycles);
	/* One byte of tiny()'s code written back unchanged, as poke.c writes a site byte. */
	fd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
	memcpy(&byte, (const void *)(uintptr_t)&tiny, 1);
	for (i = 0; fd >= 0 && i < cycles; i++) {
		t0 = now_us();
		if (pwrite(fd, &byte, 1, (off_t)(uintptr_t)&tiny) != 1)
			return 4;
		part_us[i] = now_us() - t0;
	}
	report("pwrite_us", part_us, cycles);
	/* What the loader does before it takes its lock: open the file and check it. */
	for (i = 0; i < cycles; i++) {
		struct stat st;

		t0 = now_us();
		fd = open(argv[1], O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
		if (fd < 0 || fstat(fd, &st) < 0)
			return 4;
		close(fd);
		part_us[i] = now_us() - t0;
	}
	report("open_check_us", part_us, cycles);

	if (with_busy) {
		atomic_store(&stop, 1);
		pthread_join(thread, NULL);
		printf(" busy_calls=%ld busy_new=%ld busy_wrong=%ld", atomic_load(&busy_calls),
		       atomic_load(&busy_new), atomic_load(&busy_wrong));
	}
	printf("\n");
	return with_busy && atomic_load(&busy_wrong) != 0 ? 1 : 0;
}
