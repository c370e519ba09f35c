/* switch_h4_patch.c - switch_h returns 4; cumulative: applying it reverts every other
 * patch of the program in the same publish (an atomic replace of the patch version). */
#include <fentry.h>

static long h_new(void)
{
	return 4;
}

FENTRY_REPLACE(switch_h, h_new);
FENTRY_REPLACE_ALL();
