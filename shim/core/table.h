/* table.h - the patch table __fentry__ reads in dispatch mode (table.c). */
#ifndef FENTRY_TABLE_H
#define FENTRY_TABLE_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/* One redirection: a call of __fentry__ that returns to `site_end` goes to `target`. */
struct fentry_redirect {
	uintptr_t site_end; /* address just after the call instruction of the site */
	uintptr_t target;   /* the replacement's entry                              */
};

/*
 * Replace the whole set of redirections with `redirects[0..n)` in one publish.
 * Callers serialise (the loader's mutex).  Returns 0, or -1 with errno (ENOMEM).
 */
FENTRY_HIDDEN int fentry_table_publish(const struct fentry_redirect *redirects, size_t n);

/* Bytes the tables hold, the pairs kept for stale readers included (callers serialise). */
FENTRY_HIDDEN size_t fentry_table_memory(void);

#endif /* FENTRY_TABLE_H */
