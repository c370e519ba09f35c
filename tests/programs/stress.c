/*
 * stress.c - 8 threads call a patched and an unpatched function in a tight loop while
 * the main thread applies and reverts a patch N times (in-process API of fentry.h).
 * Every result must be the old or the new function's; anything else is counted.
 * Usage: stress PATCH.so CYCLES
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fentry.h>

#define THREADS 8

/* noinline: the loop below must call them, not an inlined copy a patch cannot reach. */
__attribute__((noinline)) long stress_target(long x)
{
	return 2 * x; /* the patch returns 2 * x + 1 */
}

__attribute__((noinline)) long stress_bystander(long x)
{
	return x + 7;
}

static atomic_int stop;
static atomic_long calls, wrong, seen_new;

static void *worker(void *arg)
{
	long x = (long)(intptr_t)arg, n = 0, bad = 0, newer = 0;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		long r = stress_target(x), b = stress_bystander(x);

		if (r == 2 * x + 1)
			newer++;
		else if (r != 2 * x)
			bad++;
		if (b != x + 7)
			bad++;
		x = (x * 1103515245 + 12345) & 0xffffff;
		n++;
	}
	atomic_fetch_add(&calls, n);
	atomic_fetch_add(&wrong, bad);
	atomic_fetch_add(&seen_new, newer);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[THREADS];
	char err[512];
	long cycles = argc > 2 ? atol(argv[2]) : 1000;
	const char *name;

	if (argc < 3)
		return 2;
	name = strrchr(argv[1], '/') ? strrchr(argv[1], '/') + 1 : argv[1];
	for (int i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(intptr_t)(i + 1));
	for (long c = 0; c < cycles; c++) {
		char pname[256];

		snprintf(pname, sizeof(pname), "%.*s", (int)(strlen(name) - 3), name);
		if (fentry_apply(argv[1], err, sizeof(err)) != 0) {
			fprintf(stderr, "apply %ld: %s\n", c, err);
			return 3;
		}
		if (fentry_revert(pname, err, sizeof(err)) != 0) {
			fprintf(stderr, "revert %ld: %s\n", c, err);
			return 3;
		}
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	printf("mode=%s cycles=%ld calls=%ld new=%ld wrong=%ld\n", fentry_current_mode(), cycles,
	       atomic_load(&calls), atomic_load(&seen_new), atomic_load(&wrong));
	return atomic_load(&wrong) == 0 ? 0 : 1;
}
