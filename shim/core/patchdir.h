/* patchdir.h - the patch directory loaded at start: where it is and loading it (patchdir.c). */
#ifndef FENTRY_PATCHDIR_H
#define FENTRY_PATCHDIR_H

#include <stddef.h>

#include "core/util.h"

/* The patch directory of this process (not yet with the build-id); -1 if it has none. */
FENTRY_HIDDEN int fentry_patchdir_path(char *dir, size_t size);
/*
 * Before main: `apply` each .so file of <dir>/<build-id of the program>, in name order, after
 * checking both directories (ours or root's, not writable by group or others, not a
 * symbolic link).  A directory that is refused is said on stderr, in one line.
 */
FENTRY_HIDDEN void fentry_patchdir_load(void (*apply)(const char *path));

#endif /* FENTRY_PATCHDIR_H */
