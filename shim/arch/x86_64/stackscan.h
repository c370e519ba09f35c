/* stackscan.h - the signal-based check that no thread runs or returns into a patch (stackscan.c). */
#ifndef FENTRY_STACKSCAN_H
#define FENTRY_STACKSCAN_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/*
 * Ask every other thread whether its registers or stack hold an address inside one of
 * `ranges` ([lo, hi) pairs).  0 if none does; -1 with "busy: ..." (or why the check
 * could not run) in err.  `what` names the patch in messages.
 */
FENTRY_HIDDEN int fentry_threads_clear_of(const uintptr_t (*ranges)[2], size_t nranges,
					  const char *what, char *err);

#endif /* FENTRY_STACKSCAN_H */
