/* scale_b_patch.c - replaces the static scale() of static_b.c only. */
#include <fentry.h>

static int scale_b_fixed(int x)
{
	return -x * 2;
}
FENTRY_REPLACE(scale, scale_b_fixed, "static_b.c");
