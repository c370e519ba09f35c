/*
 * near.c - the program of tests/test_near.py: patches loaded near the program.
 *
 *   near serve                 prints "ready", then answers lines on stdin:
 *                                c   prints compute(21) (42; the patch near_patch.c: 63)
 *                                q   exits 0
 *   near churn PATCH CYCLES    applies, reverts and unloads PATCH CYCLES times (fentry.h's
 *                              in-process API) while other threads change the address
 *                              space all the time - mmap/munmap of 4 KiB to 32 MiB, malloc
 *                              of small and large blocks (brk and mmap), threads started and
 *                              joined - and two threads call compute().  Each load reserves
 *                              the address space above the program for a moment (near.c of
 *                              the shim): no allocation of the others may fail meanwhile,
 *                              no call may return anything but the old or the new result.
 *                              Prints "cycles=N wrong=W failed=F patched_seen=P".
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <fentry.h>

/* noinline, noclone: calls must reach the site (no inlined copy, no .constprop clone). */
__attribute__((noinline, noclone)) int compute(int x)
{
	return x * 2;
}

static atomic_int stop;
static atomic_long wrong, failed, patched_seen;

static unsigned long next_random(unsigned long *s)
{
	*s = *s * 6364136223846793005ul + 1442695040888963407ul;
	return *s >> 33;
}

static void *caller(void *arg)
{
	long bad = 0, seen = 0;

	(void)arg;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		int r = compute(21);

		seen += r == 63;
		bad += r != 42 && r != 63;
	}
	atomic_fetch_add(&wrong, bad);
	atomic_fetch_add(&patched_seen, seen);
	return NULL;
}

static void *mapper(void *arg)
{
	unsigned long s = (unsigned long)(uintptr_t)arg;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		size_t len = ((size_t)1 << (12 + next_random(&s) % 14)); /* 4 KiB .. 32 MiB */
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED) {
			atomic_fetch_add(&failed, 1);
			continue;
		}
		p[0] = 1;
		p[len - 1] = 1;
		munmap(p, len);
	}
	return NULL;
}

static void *allocator(void *arg)
{
	unsigned long s = (unsigned long)(uintptr_t)arg;
	char *keep[64] = { 0 };

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		unsigned slot = (unsigned)(next_random(&s) % 64);
		/* 16 bytes .. 1 MiB: the main arena's brk() below 128 KiB, mmap() above. */
		size_t len = (size_t)16 << (next_random(&s) % 17);

		free(keep[slot]);
		keep[slot] = malloc(len);
		if (!keep[slot])
			atomic_fetch_add(&failed, 1);
		else
			memset(keep[slot], 1, len < 4096 ? len : 4096);
	}
	for (unsigned i = 0; i < 64; i++)
		free(keep[i]);
	return NULL;
}

static void *nothing(void *arg)
{
	return arg;
}

static void *spawner(void *arg)
{
	(void)arg;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		pthread_t t;

		if (pthread_create(&t, NULL, nothing, NULL) != 0)
			atomic_fetch_add(&failed, 1);
		else
			pthread_join(t, NULL);
	}
	return NULL;
}

static int churn(const char *patch, long cycles)
{
	void *(*fns[])(void *) = { caller, caller, mapper, mapper, allocator, allocator, spawner };
	enum { N = sizeof(fns) / sizeof(fns[0]) };
	pthread_t t[N];
	char err[512];
	const char *name = strrchr(patch, '/') ? strrchr(patch, '/') + 1 : patch;
	char base[256];
	long done = 0;

	snprintf(base, sizeof base, "%.*s", (int)(strcspn(name, ".")), name);
	for (unsigned i = 0; i < N; i++)
		pthread_create(&t[i], NULL, fns[i], (void *)(uintptr_t)(i * 7919 + 1));
	for (; done < cycles; done++) {
		if (fentry_apply(patch, err, sizeof err) != 0 ||
		    fentry_revert(base, err, sizeof err) != 0) {
			fprintf(stderr, "cycle %ld: %s\n", done, err);
			break;
		}
		/* Unload may find a caller still inside the replacement: retried next cycle. */
		fentry_unload(base, err, sizeof err);
	}
	atomic_store(&stop, 1);
	for (unsigned i = 0; i < N; i++)
		pthread_join(t[i], NULL);
	printf("cycles=%ld wrong=%ld failed=%ld patched_seen=%ld\n", done, atomic_load(&wrong),
	       atomic_load(&failed), atomic_load(&patched_seen));
	return done == cycles ? 0 : 1;
}

int main(int argc, char **argv)
{
	char line[64];

	if (argc == 4 && strcmp(argv[1], "churn") == 0)
		return churn(argv[2], atol(argv[3]));
	if (argc != 2 || strcmp(argv[1], "serve") != 0) {
		fprintf(stderr, "usage: near serve | near churn PATCH CYCLES\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof line, stdin)) {
		if (line[0] == 'c')
			printf("%d\n", compute(21));
		else if (line[0] == 'q')
			return 0;
	}
	return 0;
}
