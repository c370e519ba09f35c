/* switch_h3_patch.c - switch_h returns 3; cumulative: applying it reverts every other
 * patch of the program in the same publish (an atomic replace of the patch version). */
#include <fentry.h>

static long h_new(void)
{
	return 3;
}

FENTRY_REPLACE(switch_h, h_new);
FENTRY_REPLACE_ALL();
