/*
 * driver.c - main() of the scaling benchmark's generated programs (programs.py): N tiny
 * functions f_<i>(x) = x + i, 100 per file, and a table of them (fns[], N).
 *
 * Usage: scale COMMAND ...
 *   start                         exit at once: the cost of starting the program
 *   calls ROUNDS [PATCH.so ...]   apply the patches in-process, then call every function
 *                                 ROUNDS times; prints ns_per_call (the fastest of 10
 *                                 chunks, thread CPU time) and patched_seen (functions
 *                                 whose result was the replacement's: x + i + PATCHED)
 *   apply PATCH.so CYCLES         fentry_apply() + fentry_revert() CYCLES times; prints
 *                                 first_apply_us, apply_us_med, revert_us_med, and the
 *                                 shim's code rewriting alone: apply/revert_batch_us_med
 *   stack BASE.so TOP.so CYCLES   apply BASE, then TOP on top of it (first_top_us), then
 *                                 revert and apply TOP CYCLES times (top_apply_us_med)
 *   idle                          prints "ready", waits until stdin closes
 * Every command prints mode=<jump|dispatch|plain> first on its line of key=value pairs.
 * Built with -DFENTRY_SHIM when the shim is linked (instrumented builds).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef FENTRY_SHIM
#include <fentry.h>

/* The shim's own account of its code rewrites (hidden, but linked into this program). */
#include "arch/x86_64/poke.h"

static double batch_us(void)
{
	struct fentry_poke_stats st;

	fentry_poke_stats(&st);
	return (double)st.last_batch_ns / 1e3;
}
#endif

#define PATCHED 1000000 /* what every generated replacement adds */

extern long (*const fns[])(long);
extern const long nfns;

static const char *mode(void)
{
#ifdef FENTRY_SHIM
	return fentry_current_mode();
#else
	return "plain";
#endif
}

static double now_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int apply(const char *path)
{
#ifdef FENTRY_SHIM
	char err[512];

	if (fentry_apply(path, err, sizeof(err)) != 0) {
		fprintf(stderr, "apply %s: %s\n", path, err);
		return -1;
	}
	return 0;
#else
	fprintf(stderr, "apply %s: the plain build has no shim\n", path);
	return -1;
#endif
}

static int cmd_calls(long rounds, int npatches, char **patches)
{
	double best = 1e300;
	long seen = 0, bad = 0, sum = 0;

	for (int i = 0; i < npatches; i++)
		if (apply(patches[i]) < 0)
			return 1;
	for (long i = 0; i < nfns; i++) { /* which functions run a replacement (and warm up) */
		long r = fns[i](7);

		seen += r == 7 + i + PATCHED;
		bad += r != 7 + i && r != 7 + i + PATCHED;
	}
	for (int chunk = 0; chunk < 10; chunk++) {
		double t0 = now_ns(CLOCK_THREAD_CPUTIME_ID), t;
		long n = rounds / 10 > 0 ? rounds / 10 : 1;

		for (long r = 0; r < n; r++)
			for (long i = 0; i < nfns; i++)
				sum += fns[i](r);
		t = (now_ns(CLOCK_THREAD_CPUTIME_ID) - t0) / ((double)n * (double)nfns);
		if (t < best)
			best = t;
	}
	printf("mode=%s ns_per_call=%.4f patched_seen=%ld wrong=%ld sum=%ld\n", mode(), best, seen,
	       bad, sum & 0xff);
	return bad != 0;
}

__attribute__((unused)) static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int cmd_apply(const char *path, long cycles)
{
#ifdef FENTRY_SHIM
	double *ap = calloc((size_t)cycles, sizeof(double)), *rv = calloc((size_t)cycles, sizeof(double));
	double *bap = calloc((size_t)cycles, sizeof(double)), *brv = calloc((size_t)cycles, sizeof(double));
	double t0, first;
	char err[512], name[256];
	const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;

	snprintf(name, sizeof(name), "%.*s", (int)(strlen(base) - 3), base);
	t0 = now_ns(CLOCK_MONOTONIC);
	if (apply(path) < 0)
		return 1;
	first = (now_ns(CLOCK_MONOTONIC) - t0) / 1e3;
	for (long c = 0; c < cycles; c++) {
		t0 = now_ns(CLOCK_MONOTONIC);
		if (fentry_revert(name, err, sizeof(err)) != 0) {
			fprintf(stderr, "revert: %s\n", err);
			return 1;
		}
		rv[c] = (now_ns(CLOCK_MONOTONIC) - t0) / 1e3;
		brv[c] = batch_us();
		t0 = now_ns(CLOCK_MONOTONIC);
		if (apply(path) < 0)
			return 1;
		ap[c] = (now_ns(CLOCK_MONOTONIC) - t0) / 1e3;
		bap[c] = batch_us();
	}
	qsort(ap, (size_t)cycles, sizeof(double), by_value);
	qsort(rv, (size_t)cycles, sizeof(double), by_value);
	qsort(bap, (size_t)cycles, sizeof(double), by_value);
	qsort(brv, (size_t)cycles, sizeof(double), by_value);
	/* batch: the code rewriting alone (jump mode; 0 in dispatch mode, which writes none) */
	printf("mode=%s first_apply_us=%.1f apply_us_med=%.2f revert_us_med=%.2f "
	       "apply_batch_us_med=%.2f revert_batch_us_med=%.2f\n", mode(), first,
	       ap[cycles / 2], rv[cycles / 2], bap[cycles / 2], brv[cycles / 2]);
	return 0;
#else
	(void)path;
	(void)cycles;
	fprintf(stderr, "apply: the plain build has no shim\n");
	return 1;
#endif
}

/* TOP applied on top of BASE (its functions among BASE's): what stacking costs. */
static int cmd_stack(const char *base_path, const char *top_path, long cycles)
{
#ifdef FENTRY_SHIM
	double *ap = calloc((size_t)cycles, sizeof(double)), t0, first;
	char err[512], name[256];
	const char *base = strrchr(top_path, '/') ? strrchr(top_path, '/') + 1 : top_path;

	snprintf(name, sizeof(name), "%.*s", (int)(strlen(base) - 3), base);
	if (apply(base_path) < 0)
		return 1;
	t0 = now_ns(CLOCK_MONOTONIC);
	if (apply(top_path) < 0)
		return 1;
	first = (now_ns(CLOCK_MONOTONIC) - t0) / 1e3;
	for (long c = 0; c < cycles; c++) {
		if (fentry_revert(name, err, sizeof(err)) != 0) {
			fprintf(stderr, "revert: %s\n", err);
			return 1;
		}
		t0 = now_ns(CLOCK_MONOTONIC);
		if (apply(top_path) < 0)
			return 1;
		ap[c] = (now_ns(CLOCK_MONOTONIC) - t0) / 1e3;
	}
	qsort(ap, (size_t)cycles, sizeof(double), by_value);
	printf("mode=%s first_top_us=%.1f top_apply_us_med=%.2f\n", mode(), first, ap[cycles / 2]);
	return 0;
#else
	(void)base_path;
	(void)top_path;
	(void)cycles;
	fprintf(stderr, "stack: the plain build has no shim\n");
	return 1;
#endif
}

int main(int argc, char **argv)
{
	char buf[64];

	if (argc >= 2 && strcmp(argv[1], "start") == 0)
		return 0;
	if (argc >= 3 && strcmp(argv[1], "calls") == 0)
		return cmd_calls(atol(argv[2]), argc - 3, argv + 3);
	if (argc == 4 && strcmp(argv[1], "apply") == 0)
		return cmd_apply(argv[2], atol(argv[3]));
	if (argc == 5 && strcmp(argv[1], "stack") == 0)
		return cmd_stack(argv[2], argv[3], atol(argv[4]));
	if (argc == 2 && strcmp(argv[1], "idle") == 0) {
		printf("mode=%s ready=1\n", mode());
		fflush(stdout);
		while (read(0, buf, sizeof(buf)) > 0)
			;
		return 0;
	}
	fprintf(stderr, "usage: scale start | calls ROUNDS [PATCH.so...] | apply PATCH.so CYCLES | "
		"stack BASE.so TOP.so CYCLES | idle\n");
	return 2;
}
