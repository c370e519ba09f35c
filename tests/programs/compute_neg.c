/* compute_neg.c - replaces compute() of compute.c: -x. */
#include <fentry.h>

static int compute_neg(int x)
{
	return -x;
}
FENTRY_REPLACE(compute, compute_neg);
