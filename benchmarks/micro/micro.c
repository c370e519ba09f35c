/*
 * micro.c - the micro benchmark's driver: call a tiny function N times in a loop, print
 * the nanoseconds per call, and check the results say which code ran.
 *
 * One source, built four ways by benchmarks/run.py (the flags pick the flavour):
 *   plain          gcc -O2, no instrumentation, no shim; calls tiny()
 *   -DCALL_DIRECT  the same, but calls tiny_direct(): the replacement's code, called directly
 *   -DFENTRY_SHIM  gcc -pg -mfentry ... with the shim; argv[3] (optional) is a patch that
 *                  is applied in-process (fentry_apply) before the loop
 *   -DBENCH_XRAY   clang -fxray-instrument; argv[3] = "patch" patches every sled
 *                  (__xray_patch) with a handler that counts tiny()'s entries
 *
 * Usage: micro N EXPECT [PATCH.so | patch]
 *   EXPECT is "tiny" (the sum must be the original tiny()'s) or "repl" (the replacement's).
 * Prints one line of key=value pairs; exits 1 if the sum is not the expected one.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tiny.h"

#ifdef FENTRY_SHIM
#include <fentry.h>
#endif

#ifdef CALL_DIRECT
#define CALL tiny_direct
#else
#define CALL tiny
#endif

#ifdef BENCH_XRAY
/* compiler-rt's XRay interface, declared for C (xray/xray_interface.h is C++ only). */
enum xray_entry_type { XRAY_ENTRY = 0, XRAY_EXIT = 1, XRAY_TAIL = 2 };
enum { XRAY_PATCH_SUCCESS = 1 };
extern int __xray_set_handler(void (*entry)(int32_t, enum xray_entry_type));
extern int __xray_patch(void);
extern uintptr_t __xray_function_address(int32_t id);
extern size_t __xray_max_function_id(void);

static int32_t tiny_id = -1;
static long tiny_entries;

/* Called from XRay's trampoline on every entry and exit of a patched function. */
__attribute__((xray_never_instrument)) static void count_tiny(int32_t id,
							      enum xray_entry_type type)
{
	if (id == tiny_id && type == XRAY_ENTRY)
		tiny_entries++;
}

__attribute__((xray_never_instrument)) static int xray_patch_all(void)
{
	for (size_t id = 1; id <= __xray_max_function_id(); id++)
		if (__xray_function_address((int32_t)id) == (uintptr_t)&tiny)
			tiny_id = (int32_t)id;
	if (tiny_id < 0) {
		fprintf(stderr, "micro: tiny() has no XRay function id\n");
		return -1;
	}
	if (__xray_set_handler(count_tiny) != 1 || __xray_patch() != XRAY_PATCH_SUCCESS) {
		fprintf(stderr, "micro: __xray_set_handler/__xray_patch failed\n");
		return -1;
	}
	return 0;
}
#endif

#define CHUNKS 10 /* the timed calls are made in this many chunks, each timed */

/* noinline: the timed loop is one function whatever main() becomes. */
__attribute__((noinline)) static long run(long from, long to)
{
	long acc = 0;

	for (long i = from; i < to; i++)
		acc += CALL(i);
	return acc;
}

/*
 * The thread's own CPU time: on a shared 2-core machine the wall clock also counts the
 * time other processes had the core, which is not a cost of the call being measured.
 * The wall clock is reported beside it.
 */
static double now_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long n, warm, sum, want;
	const char *expect, *mode = "plain";
	double t0, t1, w0, w1, best, total = 0;

	if (argc < 3 || (n = atol(argv[1])) <= 0 ||
	    (strcmp(argv[2], "tiny") != 0 && strcmp(argv[2], "repl") != 0)) {
		fprintf(stderr, "usage: micro N tiny|repl [PATCH.so | patch]\n");
		return 2;
	}
	expect = argv[2];
#ifdef FENTRY_SHIM
	mode = fentry_current_mode();
	if (argc > 3) {
		char err[512];

		if (fentry_apply(argv[3], err, sizeof(err)) != 0) {
			fprintf(stderr, "micro: apply %s: %s\n", argv[3], err);
			return 3;
		}
	}
#elif defined(BENCH_XRAY)
	mode = "xray";
	if (argc > 3 && strcmp(argv[3], "patch") == 0 && xray_patch_all() < 0)
		return 3;
#endif
	warm = n / 20 > 1000 ? n / 20 : 1000;
	run(0, warm); /* caches, branch predictors, the CPU's clock */
	/*
	 * CHUNKS chunks of n / CHUNKS calls, each timed: the figure is the fastest chunk (a
	 * chunk that an interrupt, another process or the hypervisor slowed down says nothing
	 * about the call); the total is kept for the wall clock and the result check.
	 */
	sum = 0;
	best = 1e300;
	w0 = now_ns(CLOCK_MONOTONIC);
	for (long c = 0; c < CHUNKS; c++) {
		long from = c * (n / CHUNKS), to = c == CHUNKS - 1 ? n : from + n / CHUNKS;

		t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		sum += run(from, to);
		t1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		total += t1 - t0;
		if (to > from && (t1 - t0) / (double)(to - from) < best)
			best = (t1 - t0) / (double)(to - from);
	}
	w1 = now_ns(CLOCK_MONOTONIC);

	/* sum of 3i+1 (or 3i+2) for i in [0, n) */
	want = 3 * (n * (n - 1) / 2) + n + (strcmp(expect, "repl") == 0 ? n : 0);
	printf("mode=%s calls=%ld ns_per_call=%.4f cpu_ns_per_call=%.4f wall_ns_per_call=%.4f "
	       "sum_ok=%d other5=%ld", mode, n, best, total / n, (w1 - w0) / n, sum == want,
	       other(5));
#ifdef BENCH_XRAY
	printf(" xray_tiny_entries=%ld warm_calls=%ld", tiny_entries, warm);
#endif
	printf("\n");
	if (sum != want) {
		fprintf(stderr, "micro: sum %ld, expected %ld (the %s function's)\n", sum, want,
			expect);
		return 1;
	}
	return 0;
}
