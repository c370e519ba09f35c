/*
 * parked.c - a thread parks inside a patched function while the test reverts and tries
 * to unload the patch over the control socket (the replacement waits for the file
 * named by $PARK_RELEASE).  Prints "ready <pid>" and then the results of its calls.
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

/* noinline: the thread must call it, not an inlined copy. */
__attribute__((noinline)) int park(int x)
{
	return x; /* the patch waits for $PARK_RELEASE inside the replacement */
}

static void *parker(void *arg)
{
	(void)arg;
	for (;;) {
		printf("park returned %d\n", park(1));
		fflush(stdout);
		sleep(1);
	}
	return NULL;
}

int main(void)
{
	pthread_t t;

	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	pthread_create(&t, NULL, parker, NULL);
	for (;;)
		pause();
}
