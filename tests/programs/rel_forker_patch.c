/* rel_forker_patch.c - replaces rel_value of rel_forker.c (x + 1 becomes x + 100). */
#include <fentry.h>

static int rel_value_new(int x)
{
	return x + 100;
}

FENTRY_REPLACE(rel_value, rel_value_new);
