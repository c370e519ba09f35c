/*
 * rel_forker.c - forks, execs and exits in a loop while the test applies and reverts
 * rel_forker_patch.so over the control socket (tests/test_reliability.py).
 *
 * Usage: rel_forker SECONDS PROGRAM_TO_EXEC
 * A second thread calls rel_value() all the time, so every fork() happens while other
 * threads run (and, in jump mode, while sites are being rewritten).  Children, in turn:
 *   - call rel_value() 1000 times and return from a function that calls exit(0): atexit
 *     handlers and the destructors of loaded patches run;
 *   - exec PROGRAM_TO_EXEC (e.g. /bin/true);
 *   - fork a grandchild that calls rel_value(), then _exit().
 * Every child arms alarm(20): a child that deadlocks dies of SIGALRM and is counted.
 * At the end main() returns (exit() while the test may still be applying) after one
 * line: "forks=N execs=N exits=N bad_children=N wrong=N calls=N new=N".
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int rel_value(int x)
{
	return x + 1; /* rel_forker_patch.c: x + 100 */
}

static atomic_int stop;
static atomic_long calls, wrong, seen_new;

static int check(int r)
{
	if (r == 101)
		atomic_fetch_add_explicit(&seen_new, 1, memory_order_relaxed);
	else if (r != 2)
		return 0;
	return 1;
}

static void *caller(void *arg)
{
	(void)arg;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		if (!check(rel_value(1)))
			atomic_fetch_add(&wrong, 1);
		atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
	}
	return NULL;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void child_calls_then_exits(void)
{
	for (int i = 0; i < 1000; i++)
		if (!check(rel_value(1)))
			exit(1);
	exit(0);
}

static void child_forks_again(void)
{
	pid_t g = fork();
	int status;

	if (g == 0) {
		alarm(20);
		_exit(check(rel_value(1)) ? 0 : 1);
	}
	if (g < 0 || waitpid(g, &status, 0) != g)
		_exit(1);
	_exit(WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1);
}

int main(int argc, char **argv)
{
	long forks = 0, execs = 0, exits = 0, bad = 0;
	double seconds = argc > 2 ? atof(argv[1]) : 0, end;
	pthread_t t;

	if (argc < 3)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (pthread_create(&t, NULL, caller, NULL) != 0)
		return 1;
	printf("ready %d\n", (int)getpid());
	end = now() + seconds;
	while (now() < end) {
		int kind = (int)(forks % 3), status;
		pid_t child;

		fflush(stdout);
		child = fork();
		if (child < 0) {
			bad++;
			break;
		}
		if (child == 0) {
			alarm(20);
			if (kind == 0)
				child_calls_then_exits();
			if (kind == 1) {
				execl(argv[2], argv[2], (char *)NULL);
				_exit(127);
			}
			child_forks_again();
		}
		forks++;
		execs += kind == 1;
		exits += kind != 1;
		if (waitpid(child, &status, 0) != child || !WIFEXITED(status) ||
		    WEXITSTATUS(status) != 0)
			bad++;
		if (!check(rel_value(1)))
			atomic_fetch_add(&wrong, 1);
	}
	atomic_store(&stop, 1);
	pthread_join(t, NULL);
	printf("forks=%ld execs=%ld exits=%ld bad_children=%ld wrong=%ld calls=%ld new=%ld\n",
	       forks, execs, exits, bad, atomic_load(&wrong), atomic_load(&calls),
	       atomic_load(&seen_new));
	return 0;
}
