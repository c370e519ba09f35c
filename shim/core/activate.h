/* activate.h - jump or dispatch mode, and making a set of redirections the one in effect (activate.c). */
#ifndef FENTRY_ACTIVATE_H
#define FENTRY_ACTIVATE_H

#include <stddef.h>

#include "core/table.h"
#include "core/util.h"

/* Choose jump or dispatch mode (FENTRY_MODE); in jump mode, every site becomes unpatched. */
FENTRY_HIDDEN void fentry_mode_init(void);
/* "jump" or "dispatch". */
FENTRY_HIDDEN const char *fentry_mode(void);
/* Why the process runs in dispatch mode ("" in jump mode). */
FENTRY_HIDDEN const char *fentry_mode_reason(void);
/* Jump mode only: why code cannot be rewritten any more (a seccomp filter installed
 * after start...), so apply and revert are refused; NULL while it can.  Callers hold the
 * loader's lock (the text changes with every batch): fentry_loader_rewrite_error(). */
FENTRY_HIDDEN const char *fentry_rewrite_error(void);
/*
 * What the program's fentry sites hold: "prepared" (their unpatched form, written into the
 * file by the build), "runtime" (written at start) or "calls" (dispatch mode).
 */
FENTRY_HIDDEN const char *fentry_sites_form(void);
/* 1 in jump mode. */
FENTRY_HIDDEN int fentry_jump_mode(void);
/*
 * Make `redirects` the complete set in effect: jump sites are rewritten, the others go
 * to the dispatch table.  All or nothing; callers hold the loader's lock.
 */
FENTRY_HIDDEN int fentry_activate(const struct fentry_redirect *redirects, size_t n, char *err);

#endif /* FENTRY_ACTIVATE_H */
