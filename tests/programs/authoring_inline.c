/*
 * authoring_inline.c - functions GCC inlines at -O2 and also keeps out of line:
 *   bump    static, inlined into add_two (its address is taken, so a body is kept too)
 *   square  global, inlined into sum_squares (global: its body is kept)
 *   tiny    static, inlined into its only caller and never kept out of line
 * A patch of bump or square alone misses the inlined copies: the generator says so.
 */
#include <stdio.h>
#include <stdlib.h>

static int bump(int x)
{
	return x + 1;
}
int (*volatile bump_ptr)(int) = bump;

__attribute__((noinline, noclone)) int add_two(int x)
{
	return bump(bump(x));
}

int square(int x)
{
	return x * x;
}

__attribute__((noinline, noclone)) int sum_squares(int a, int b)
{
	return square(a) + square(b);
}

static int tiny(int x)
{
	return x ^ 5;
}

__attribute__((noinline, noclone)) int use_tiny(int x)
{
	return tiny(x) * 2;
}

int main(int argc, char **argv)
{
	int x = argc > 1 ? atoi(argv[1]) : 3;

	printf("%d %d %d %d\n", add_two(x), sum_squares(x, x + 1), bump_ptr(x), use_tiny(x));
	return 0;
}
