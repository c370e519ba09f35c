/*
 * authoring_folded.c - a function GCC inlined at -O2 where DWARF records no inlined copy:
 *   scale   static, inlined into limit, where scale(4) folds to the constant 13: no code of the
 *           copy is left, so there is no DW_TAG_inlined_subroutine, yet scale's abstract
 *           instance says DW_AT_inline (inlined); its address is taken, so a body is kept too.
 * Patching scale changes scale_ptr(x) but limit() keeps returning 13: the generator warns.
 */
#include <stdio.h>
#include <stdlib.h>

static int scale(int x)
{
	return x * 3 + 1;
}
int (*volatile scale_ptr)(int) = scale;

__attribute__((noinline, noclone)) int limit(void)
{
	return scale(4);
}

int main(int argc, char **argv)
{
	int x = argc > 1 ? atoi(argv[1]) : 3;

	printf("%d %d\n", limit(), scale_ptr(x));
	return 0;
}
