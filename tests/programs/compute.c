/*
 * compute.c - a small program with one function to patch (compute) and one to leave
 * alone (other).  -DVERSION=n changes its output, and so its build-id.  The first line
 * says which mode the shim runs in ("none" when no shim is linked in).
 */
#include <stdio.h>
#include <stdlib.h>

/* Weak: some tests build this program without the shim (glibc's __fentry__). */
extern const char *fentry_current_mode(void) __attribute__((weak));

#ifndef VERSION
#define VERSION 1
#endif

/* noinline: at -O2 GCC would inline these into main, and an inlined copy never reaches
 * the fentry site; noclone: no .constprop copy for main to call instead. */
__attribute__((noinline, noclone)) int compute(int x)
{
	return x * 2;
}

__attribute__((noinline, noclone)) int other(int x)
{
	return x + 1;
}

int main(int argc, char **argv)
{
	int x = argc > 1 ? atoi(argv[1]) : 21;

	printf("mode: %s\n", fentry_current_mode ? fentry_current_mode() : "none");
	printf("v%d compute(%d) = %d\n", VERSION, x, compute(x));
	printf("other(%d) = %d\n", x, other(x));
	return 0;
}
