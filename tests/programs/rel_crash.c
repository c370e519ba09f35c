/*
 * rel_crash.c - a program whose patch crashes (tests/test_reliability.py): the patch
 * author's fault, but the report must name the replacement and its .so.
 * rel_crash_patch.c replaces rel_lookup with one that dereferences NULL.
 */
#include <stdio.h>

__attribute__((noinline)) int rel_lookup(const int *p)
{
	return p ? *p : -1;
}

__attribute__((noinline)) int rel_caller(const int *p)
{
	return rel_lookup(p) + 1;
}

int main(void)
{
	printf("result %d\n", rel_caller(NULL));
	return 0;
}
