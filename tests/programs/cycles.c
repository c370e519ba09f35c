/*
 * cycles.c - apply, revert and unload a patch N times in process while 2 threads call
 * the patched function; report RSS and open descriptors after a warm-up and at the end.
 * Usage: cycles PATCH.so N
 */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fentry.h>

__attribute__((noinline)) long cycle_target(long x)
{
	return x * 3; /* the patch returns x * 3 + 1 */
}

static atomic_int stop;
static atomic_long wrong;

static void *caller(void *arg)
{
	long x = (long)(intptr_t)arg;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		long r = cycle_target(x);

		if (r != 3 * x && r != 3 * x + 1)
			atomic_fetch_add(&wrong, 1);
		x = (x + 1) & 0xfffff;
	}
	return NULL;
}

static long rss_kib(void)
{
	long pages = 0, resident = 0;
	FILE *f = fopen("/proc/self/statm", "r");

	if (f) {
		if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
			resident = 0;
		fclose(f);
	}
	return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	while (d && (e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	if (d)
		closedir(d);
	return n - 1; /* the directory stream itself */
}

static int cycle(const char *path, long i)
{
	char err[512];

	if (fentry_apply(path, err, sizeof(err)) != 0 ||
	    fentry_revert("cycles_patch", err, sizeof(err)) != 0) {
		fprintf(stderr, "cycle %ld: %s\n", i, err);
		return -1;
	}
	/* A caller may briefly hold a return address into the patch: retry "busy". */
	for (int tries = 0; fentry_unload("cycles_patch", err, sizeof(err)) != 0; tries++) {
		if (strncmp(err, "busy", 4) != 0 || tries == 1000) {
			fprintf(stderr, "cycle %ld: %s\n", i, err);
			return -1;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	pthread_t t[2];
	long n = argc > 2 ? atol(argv[2]) : 1000, warm = n / 10, rss0 = 0;
	int fds0 = 0;

	if (argc < 3)
		return 2;
	for (int i = 0; i < 2; i++)
		pthread_create(&t[i], NULL, caller, (void *)(intptr_t)(i + 1));
	for (long i = 0; i < n; i++) {
		if (i == warm) {
			rss0 = rss_kib();
			fds0 = open_fds();
		}
		if (cycle(argv[1], i) < 0)
			return 3;
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	printf("mode=%s cycles=%ld warm=%ld rss_kib_after_warmup=%ld rss_kib_end=%ld "
	       "fds_after_warmup=%d fds_end=%d wrong=%ld\n", fentry_current_mode(), n, warm, rss0,
	       rss_kib(), fds0, open_fds(), atomic_load(&wrong));
	return 0;
}
