/* parked_patch.c - the replacement of park() waits until the file named by
 * $PARK_RELEASE exists, so a thread stays inside the patch's code for as long as the
 * test wants.  It returns x + PARK_ADD (100; built with -DPARK_ADD=200 for a second
 * version of the patch). */
#include <stdlib.h>
#include <unistd.h>

#include <fentry.h>

#ifndef PARK_ADD
#define PARK_ADD 100
#endif

static int park_patched(int x)
{
	const char *release = getenv("PARK_RELEASE");

	while (release && access(release, F_OK) != 0)
		usleep(10000);
	return x + PARK_ADD;
}

FENTRY_REPLACE(park, park_patched);
