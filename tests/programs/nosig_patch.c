/* nosig_patch.c - the new nosig_calc. */
#include <fentry.h>

static long nosig_calc_new(long x)
{
	return 2 * x + 1;
}

FENTRY_REPLACE(nosig_calc, nosig_calc_new);
