/* fleet_prefork_patch.c - fleet_prefork's fleet_answer(x) returns x + 100 (tests/test_fleet.py). */
#include <fentry.h>

static int fleet_answer_fixed(int x)
{
	return x + 100;
}

FENTRY_REPLACE(fleet_answer, fleet_answer_fixed);
