/*
 * tiny.c - the called functions, in their own translation unit so that the caller in
 * micro.c cannot inline them: every iteration is a real call (and, when instrumented,
 * a real fentry site).
 */
#include "tiny.h"

long tiny(long x)
{
	return TINY_BODY(x);
}

long other(long x)
{
	return OTHER_BODY(x);
}
