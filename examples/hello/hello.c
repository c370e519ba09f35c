/* hello.c - the smallest live-patchable program: my_function is replaced by a patch. */
#include <stdio.h>

/*
 * noinline: at -O2 gcc would inline this small function into main(), and an inlined
 * copy has no fentry site of its own, so a patch of my_function would not reach it.
 * (The generator warns about inlined copies; see docs/how-it-works.md, Limits.)
 */
__attribute__((noinline)) void my_function(int x)
{
	printf("my function: %d!\n", x);
}

int main(void)
{
	my_function(123);
	return 0;
}
