/*
 * switch_pair_patch.c - replaces switch_f and switch_g together (both return 1); its
 * callbacks, which run just before and after each switch, mark the switch for the
 * program's callers: switch_dir first, then switch_gen odd; switch_gen even after.
 */
#include <fentry.h>

FENTRY_REF(switch_gen, long);
FENTRY_REF(switch_dir, long);

static long f_new(void)
{
	return 1;
}

static long g_new(void)
{
	return 1;
}

static void mark(long dir)
{
	__atomic_store_n(&FENTRY_VAR(switch_dir), dir, __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&FENTRY_VAR(switch_gen), 1, __ATOMIC_SEQ_CST);
}

static int before_apply(char *why, size_t len)
{
	(void)why;
	(void)len;
	mark(1);
	return 0;
}

static void after_apply(void)
{
	__atomic_fetch_add(&FENTRY_VAR(switch_gen), 1, __ATOMIC_SEQ_CST);
}

static void before_revert(void)
{
	mark(2);
}

static void after_revert(void)
{
	__atomic_fetch_add(&FENTRY_VAR(switch_gen), 1, __ATOMIC_SEQ_CST);
}

FENTRY_REPLACE(switch_f, f_new);
FENTRY_REPLACE(switch_g, g_new);
FENTRY_PRE_PATCH(before_apply);
FENTRY_POST_PATCH(after_apply);
FENTRY_PRE_UNPATCH(before_revert);
FENTRY_POST_UNPATCH(after_revert);
