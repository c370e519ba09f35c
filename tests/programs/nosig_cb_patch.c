/*
 * nosig_cb_patch.c - a post-patch callback that never returns: the shim abandons its
 * thread (which runs with every signal blocked) after FENTRY_CALLBACK_TIMEOUT_MS, and it
 * keeps calling the program's nosig_calc() - the function the test patches and reverts
 * meanwhile - counting calls and wrong results into the program's counters.
 */
#include <fentry.h>

FENTRY_REF(nosig_calc, long(long));
FENTRY_REF(nosig_cb_calls, long);
FENTRY_REF(nosig_cb_wrong, long);

static void hook_new(void)
{
}

static void forever(void)
{
	for (long x = 3;; x = (x * 1103515245 + 12345) & 0xffffff) {
		long r = FENTRY_VAR(nosig_calc)(x);

		if (r != 2 * x && r != 2 * x + 1)
			__atomic_fetch_add(&FENTRY_VAR(nosig_cb_wrong), 1, __ATOMIC_RELAXED);
		__atomic_fetch_add(&FENTRY_VAR(nosig_cb_calls), 1, __ATOMIC_RELAXED);
	}
}

FENTRY_REPLACE(nosig_hook, hook_new);
FENTRY_POST_PATCH(forever);
