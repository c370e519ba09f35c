/*
 * threads.c - four threads call a patched function (compute) and an unpatched one
 * (other) in a loop while the main thread does the same; each prints its sums.  A patch
 * from FENTRY_PATCHES is applied before main: in dispatch mode every call then takes
 * the table lookup of __fentry__, hits and misses in all five threads at once; in jump
 * mode they run the rewritten sites.  The first line names the mode.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <fentry.h>

#define NTHREADS 4
#define CALLS 1000000L

/* noinline: at -O2 GCC would inline these into the loops, and an inlined copy never
 * reaches the fentry site; noclone: no .constprop copy for the loops to call instead. */
__attribute__((noinline, noclone)) long compute(long x)
{
	return x * 2;
}

__attribute__((noinline, noclone)) long other(long x)
{
	return x + 1;
}

struct sums { long id, compute, other; };

static void *loop(void *arg)
{
	struct sums *s = arg;

	for (long i = 0; i < CALLS; i++) {
		s->compute += compute(s->id * CALLS + i);
		s->other += other(s->id * CALLS + i);
	}
	return NULL;
}

int main(void)
{
	pthread_t tid[NTHREADS];
	struct sums sums[NTHREADS + 1];

	printf("mode: %s\n", fentry_current_mode());
	for (long t = 0; t <= NTHREADS; t++)
		sums[t] = (struct sums){ t, 0, 0 };
	for (long t = 0; t < NTHREADS; t++)
		if (pthread_create(&tid[t], NULL, loop, &sums[t]) != 0)
			return 2;
	loop(&sums[NTHREADS]); /* the main thread is the fifth caller */
	for (long t = 0; t < NTHREADS; t++)
		pthread_join(tid[t], NULL);
	for (long t = 0; t <= NTHREADS; t++)
		printf("%ld %ld %ld\n", sums[t].id, sums[t].compute, sums[t].other);
	return 0;
}
