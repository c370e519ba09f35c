/*
 * authoring_refs.c - a program whose own variables and functions patches reach with
 * FENTRY_REF: a static counter, a global, a static function, a function's static local
 * (symbol calls.0), a thread-local (refused) and a constant GCC folds away (no symbol).
 * authoring_refs_b.c has another static `state`.  The first line says the shim's mode.
 */
#include <stdio.h>
#include <stdlib.h>

/* Weak: some tests build this program without the shim. */
extern const char *fentry_current_mode(void) __attribute__((weak));
int state_b(int x);

static long served;          /* FENTRY_REF(served, long)                      */
int limit = 10;              /* a global                                       */
__thread int per_thread;     /* thread-local: FENTRY_REF refuses it            */
static const int folded = 42; /* folded into the code: it has no symbol        */
static int state = 1;        /* authoring_refs_b.c has a static `state` too    */

/* noinline, noclone: patches call it through FENTRY_REF, so it must stay whole. */
static __attribute__((noinline, noclone)) void log_line(const char *s)
{
	printf("log: %s\n", s);
}

__attribute__((noinline, noclone)) int handle(int x)
{
	static int calls;

	calls++;
	served += x;
	per_thread++;
	state += x;
	if (x > limit)
		log_line("big");
	return x + folded + calls;
}

__attribute__((noinline, noclone)) int other(int x)
{
	return x - 1;
}

int main(int argc, char **argv)
{
	int x = argc > 1 ? atoi(argv[1]) : 5;

	printf("mode: %s\n", fentry_current_mode ? fentry_current_mode() : "none");
	printf("handle(%d) = %d\n", x, handle(x));
	printf("handle(%d) = %d\n", x, handle(x));
	printf("other(%d) = %d\n", x, other(x));
	printf("served %ld, state %d, state_b %d, threads %d\n", served, state, state_b(x), per_thread);
	return 0;
}
