/* rel_gdb_patch.c - replaces rel_target of rel_gdb.c (x + 1 becomes x + 100). */
#include <fentry.h>

static int rel_target_new(int x)
{
	return x + 100;
}

FENTRY_REPLACE(rel_target, rel_target_new);
