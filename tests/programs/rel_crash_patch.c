/* rel_crash_patch.c - a broken replacement of rel_lookup: it forgets the NULL check. */
#include <fentry.h>

static int rel_lookup_broken(const int *p)
{
	return *(const volatile int *)p + 1;
}

FENTRY_REPLACE(rel_lookup, rel_lookup_broken);
