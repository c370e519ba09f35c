/* compute_plus.c - replaces compute() of compute.c: x * 2 + 1. */
#include <fentry.h>

static int compute_plus(int x)
{
	return x * 2 + 1;
}
FENTRY_REPLACE(compute, compute_plus);
