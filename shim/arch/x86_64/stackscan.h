/* stackscan.h - the check that no thread runs or returns into a patch (stackscan.c). */
#ifndef FENTRY_STACKSCAN_H
#define FENTRY_STACKSCAN_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/*
 * Does any thread's program counter, registers or stack hold an address inside one of
 * `ranges` ([lo, hi) pairs: a patch's code and the trampolines into it)?  Blocked
 * threads are looked at from here, running ones get a signal (stackscan.c).  The calling
 * thread's own stack is checked from `self_from` up (0: not at all) - the frame where
 * the program called in, above the shim's own frames.  0 if no thread can be running the
 * code; -1 with "busy: ..." (or why the check could not run) in err.  `what` names the
 * patch in messages.
 */
FENTRY_HIDDEN int fentry_threads_clear_of(const uintptr_t (*ranges)[2], size_t nranges,
					  uintptr_t self_from, const char *what, char *err);

/* How the checks went so far (status's costs); callers serialise with the checks. */
struct fentry_check_stats {
	uint64_t checks;            /* fentry_threads_clear_of() calls                       */
	uint64_t threads_blocked;   /* threads checked from outside, blocked (no signal)     */
	uint64_t threads_signalled; /* threads that got the check signal (seen running)      */
};
FENTRY_HIDDEN void fentry_threads_check_stats(struct fentry_check_stats *out);

#endif /* FENTRY_STACKSCAN_H */
