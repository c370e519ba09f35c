/* slow_callback_patch.c - a patch of unload_designs.c's park() whose pre-patch callback
 * takes two seconds: while it runs, the loader is busy with this patch. */
#include <stddef.h>
#include <unistd.h>

#include <fentry.h>

static int park_slow(int x)
{
	return x + 300;
}

static int take_two_seconds(char *why, size_t whylen)
{
	(void)why;
	(void)whylen;
	sleep(2);
	return 0;
}

FENTRY_PRE_PATCH(take_two_seconds);
FENTRY_REPLACE(park, park_slow);
