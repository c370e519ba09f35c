/*
 * compute_clamp.c - wraps compute() of compute.c: clamps the argument to at most 100,
 * then runs the original body through FENTRY_ORIGINAL (which enters the old code after
 * its fentry site, so the call does not come back here).
 */
#include <stdio.h>

#include <fentry.h>

FENTRY_DECLARE_ORIGINAL(compute);

static int compute_clamped(int x)
{
	int (*orig)(int) = FENTRY_ORIGINAL(compute, int (*)(int));
	int clamped = x > 100 ? 100 : x;

	printf("compute_clamped(%d): calling the original with %d\n", x, clamped);
	return orig(clamped);
}
FENTRY_REPLACE(compute, compute_clamped);
