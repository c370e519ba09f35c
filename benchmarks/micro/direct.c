/*
 * direct.c - the replacement's code as an ordinary function of the plain build: the
 * "direct call to the replacement" that a patched call is compared with.
 */
#include "tiny.h"

long tiny_direct(long x)
{
	return TINY_REPL_BODY(x);
}
