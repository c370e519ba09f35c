/*
 * switch.c - callers that would notice a batch switching its functions one at a time,
 * or a patched function running the original for a moment while A -> B switches.
 *
 * Usage: switch pair | switch gap
 *   pair  switch_f() and switch_g() return 0; switch_pair_patch.c replaces both (1), and
 *         its callbacks mark each switch in switch_gen (odd while it runs) and switch_dir
 *         (1 apply, 2 revert).  Half the threads call f then g, half g then f.  A call pair
 *         inside one switch must never see the new function first and the old one after
 *         it; outside a switch both must be the same version.
 *   gap   switch_h() returns 0; the test applies patches over it (1, 2, 3, 4) and then
 *         sends "arm": from then on switch_h() must never return 0.
 * Prints "ready"; reads lines: "arm" (answers "armed"), "q" (prints the counts, exits).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define THREADS 4

__attribute__((noinline)) long switch_f(void)
{
	return 0;
}

__attribute__((noinline)) long switch_g(void)
{
	return 0;
}

__attribute__((noinline)) long switch_h(void)
{
	return 0;
}

/* Written by switch_pair_patch.c's callbacks (FENTRY_REF). */
long switch_gen, switch_dir;

static atomic_int stop, armed;
static atomic_long calls, inside, wrong, seen[5];

static void *pair(void *arg)
{
	int g_first = (int)(intptr_t)arg & 1;
	long n = 0, in = 0, bad = 0;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		long gen1 = __atomic_load_n(&switch_gen, __ATOMIC_SEQ_CST);
		long dir = __atomic_load_n(&switch_dir, __ATOMIC_SEQ_CST);
		long first = g_first ? switch_g() : switch_f();
		long second = g_first ? switch_f() : switch_g();
		long gen2 = __atomic_load_n(&switch_gen, __ATOMIC_SEQ_CST);

		n++;
		if (first < 0 || first > 1 || second < 0 || second > 1)
			bad++;
		else if (gen1 != gen2)
			; /* the pair straddles a switch's edge: nothing to say */
		else if (!(gen1 & 1))
			bad += first != second; /* no switch running: one version */
		else {
			in++;
			/* inside one switch: new (1 on apply, 0 on revert) then old is the mix */
			bad += dir == 1 ? (first == 1 && second == 0) : (first == 0 && second == 1);
		}
	}
	atomic_fetch_add(&calls, n);
	atomic_fetch_add(&inside, in);
	atomic_fetch_add(&wrong, bad);
	return NULL;
}

static void *gap(void *arg)
{
	long n = 0, bad = 0, count[5] = { 0 };

	(void)arg;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		int was_armed = atomic_load(&armed);
		long r = switch_h();

		n++;
		if (r < 0 || r > 4 || (was_armed && r == 0))
			bad++;
		else
			count[r]++;
	}
	atomic_fetch_add(&calls, n);
	atomic_fetch_add(&wrong, bad);
	for (int i = 0; i < 5; i++)
		atomic_fetch_add(&seen[i], count[i]);
	return NULL;
}

int main(int argc, char **argv)
{
	int is_pair = argc > 1 && strcmp(argv[1], "pair") == 0;
	pthread_t t[THREADS];
	char line[64];

	if (argc < 2 || (!is_pair && strcmp(argv[1], "gap") != 0)) {
		fprintf(stderr, "usage: switch pair|gap\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, is_pair ? pair : gap, (void *)(intptr_t)i);
	printf("ready\n");
	while (fgets(line, sizeof(line), stdin) && strcmp(line, "q\n") != 0)
		if (strcmp(line, "arm\n") == 0) {
			atomic_store(&armed, 1);
			printf("armed\n");
		}
	atomic_store(&stop, 1);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	printf("calls=%ld inside=%ld wrong=%ld seen=%ld,%ld,%ld,%ld,%ld\n", atomic_load(&calls),
	       atomic_load(&inside), atomic_load(&wrong), atomic_load(&seen[0]),
	       atomic_load(&seen[1]), atomic_load(&seen[2]), atomic_load(&seen[3]),
	       atomic_load(&seen[4]));
	return 0;
}
