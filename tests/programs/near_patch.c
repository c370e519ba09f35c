/* near_patch.c - compute(x) of near.c returns x * 3 instead of x * 2. */
#include <fentry.h>

static int compute_new(int x)
{
	return x * 3;
}

FENTRY_REPLACE(compute, compute_new);
