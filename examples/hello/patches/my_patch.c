/* my_patch.c - replaces my_function of hello.c. */
#include <stdio.h>

#include <fentry.h>

static void my_patch(int x)
{
	printf("my_patch: %d\n", x);
}

FENTRY_REPLACE(my_function, my_patch);
