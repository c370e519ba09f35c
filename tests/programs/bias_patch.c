/* bias_patch.c - replaces bias(), a static function of static_a.c (its only one). */
#include <fentry.h>

static int bias_fixed(int x)
{
	return x - 1000;
}
FENTRY_REPLACE(bias, bias_fixed);
