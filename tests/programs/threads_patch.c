/* threads_patch.c - replaces compute() of threads.c: x * 3. */
#include <fentry.h>

static long compute_triple(long x)
{
	return x * 3;
}
FENTRY_REPLACE(compute, compute_triple);
