/* parked_patch.c - the replacement of park() waits until the file named by
 * $PARK_RELEASE exists, so a thread stays inside the patch's code for as long as the
 * test wants (with $PARK_ANNOUNCE set, it first prints "inside version N").  It returns
 * x + PARK_ADD (100; built with -DPARK_ADD=200 for a second
 * version of the patch). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <fentry.h>

#ifndef PARK_ADD
#define PARK_ADD 100
#endif

static int park_patched(int x)
{
	const char *release = getenv("PARK_RELEASE");

	if (getenv("PARK_ANNOUNCE")) { /* a line the test can wait for */
		printf("inside version %d\n", PARK_ADD / 100);
		fflush(stdout);
	}

	while (release && access(release, F_OK) != 0)
		usleep(10000);
	return x + PARK_ADD;
}

FENTRY_REPLACE(park, park_patched);
