/*
 * modes_waiter.c - every thread waits inside the C library, forever: two threads in
 * pthread_cond_wait(), the main thread in pthread_join().  No thread is ever at a point
 * where `fentry-build attach` may run dlopen(), so attach must give up, in bounded time,
 * and leave the process as it was.  Prints "pid N" once the threads exist.
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static int started;

__attribute__((noinline, noclone)) static void *wait_forever(void *arg)
{
	pthread_mutex_lock(&lock);
	started++;
	for (;;)
		pthread_cond_wait(&never, &lock);
	return arg;
}

int main(void)
{
	pthread_t t[2];

	for (int i = 0; i < 2; i++)
		if (pthread_create(&t[i], NULL, wait_forever, NULL) != 0)
			return 1;
	for (;;) {
		pthread_mutex_lock(&lock);
		int n = started;
		pthread_mutex_unlock(&lock);
		if (n == 2)
			break;
		usleep(1000);
	}
	printf("pid %d\n", (int)getpid());
	fflush(stdout);
	pthread_join(t[0], NULL);
	return 0;
}
