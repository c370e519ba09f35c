/*
 * other_patch.c - replaces other(), never tiny(): applied in dispatch mode it makes the
 * patch table active, so every call of tiny() pays a lookup that misses.
 */
#include <fentry.h>

#include "tiny.h"

static long other_fast(long x)
{
	return OTHER_REPL_BODY(x);
}

FENTRY_REPLACE(other, other_fast);
