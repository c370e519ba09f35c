/* modes_patch.c - the patch the preload and attach tests apply: compute returns 3*x. */
#include <fentry.h>

static long compute_tripled(long x)
{
	return 3 * x;
}

FENTRY_REPLACE(compute, compute_tripled);
