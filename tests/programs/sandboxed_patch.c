/* sandboxed_patch.c - the new sandboxed_calc. */
#include <fentry.h>

static long sandboxed_calc_new(long x)
{
	return 2 * x + 1;
}

FENTRY_REPLACE(sandboxed_calc, sandboxed_calc_new);
