/* parked_patch.c - the replacement of park() waits until the file named by
 * $PARK_RELEASE exists, so a thread stays inside the patch's code for as long as the
 * test wants. */
#include <stdlib.h>
#include <unistd.h>

#include <fentry.h>

static int park_patched(int x)
{
	const char *release = getenv("PARK_RELEASE");

	while (release && access(release, F_OK) != 0)
		usleep(10000);
	return x + 100;
}

FENTRY_REPLACE(park, park_patched);
