/* cycles_patch.c - the new cycle_target. */
#include <fentry.h>

static long cycle_target_new(long x)
{
	return x * 3 + 1;
}

FENTRY_REPLACE(cycle_target, cycle_target_new);
