/* sites.h - the main program's fentry sites, from gcc's __mcount_loc list (sites.c). */
#ifndef FENTRY_SITES_H
#define FENTRY_SITES_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/* One fentry site of the main program (jump mode). */
struct fentry_site {
	uintptr_t addr;   /* the call to __fentry__ (after endbr64, if any)              */
	uintptr_t target; /* the replacement the site jumps to (via a trampoline); 0: NOP */
	uintptr_t want;   /* fentry_activate()'s scratch: the target being computed     */
	unsigned mark;    /* fentry_activate()'s scratch: `want` is for this activation */
	uint8_t len;      /* 5 or 6                                                     */
	uint8_t orig[6];  /* the call instruction gcc emitted, for validation           */
};

/* Read and check __mcount_loc; -1 with why jump mode cannot use it in err. */
FENTRY_HIDDEN int fentry_sites_load(char *err);
/* The site at exactly addr, or NULL.  Async-signal-safe. */
FENTRY_HIDDEN struct fentry_site *fentry_site_at(uintptr_t addr);
/* All sites, sorted by address. */
FENTRY_HIDDEN struct fentry_site *fentry_sites(size_t *n);

#endif /* FENTRY_SITES_H */
