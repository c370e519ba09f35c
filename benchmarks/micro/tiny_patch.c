/* tiny_patch.c - replaces tiny() with the same one-instruction body, plus one. */
#include <fentry.h>

#include "tiny.h"

static long tiny_fast(long x)
{
	return TINY_REPL_BODY(x);
}

FENTRY_REPLACE(tiny, tiny_fast);
