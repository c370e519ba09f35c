/* stress_patch.c - the new stress_target. */
#include <fentry.h>

static long stress_target_new(long x)
{
	return 2 * x + 1;
}

FENTRY_REPLACE(stress_target, stress_target_new);
