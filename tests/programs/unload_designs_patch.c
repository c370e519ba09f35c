/* unload_designs_patch.c - park()'s replacement for unload_designs.c: it says "inside"
 * and waits until the file named by $PARK_RELEASE exists (none: it returns at once). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <fentry.h>

static int park_patched(int x)
{
	const char *release = getenv("PARK_RELEASE");

	if (release && access(release, F_OK) != 0) {
		printf("inside\n");
		fflush(stdout);
		while (access(release, F_OK) != 0)
			usleep(10000);
	}
	return x + 100;
}

FENTRY_REPLACE(park, park_patched);
