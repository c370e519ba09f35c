/* scale_a_patch.c - replaces the static scale() of static_a.c only. */
#include <fentry.h>

static int scale_a_fixed(int x)
{
	return -x;
}
FENTRY_REPLACE(scale, scale_a_fixed, "static_a.c");
