/* endpoint.h - the control socket's folder and file, and why there is none (endpoint.c). */
#ifndef FENTRY_ENDPOINT_H
#define FENTRY_ENDPOINT_H

#include "core/util.h"

/*
 * Work out the folder (FENTRY_RUNTIME_DIR, else $XDG_RUNTIME_DIR/fentry, else
 * /tmp/fentry-<euid>), create or check it, remove stale sockets of dead processes (when
 * `sweep`), bind <folder>/<pid>.sock, chmod it 0600 and listen.  Returns the listening
 * descriptor, or -1 with one line in `why` (FENTRY_ERR_MAX bytes) and nothing left behind.
 */
FENTRY_HIDDEN int fentry_endpoint_open(int sweep, char *why);
/* Close the listening socket and remove its file (only the process that bound it does). */
FENTRY_HIDDEN void fentry_endpoint_close(void);
/* Does this process serve a socket it bound itself? */
FENTRY_HIDDEN int fentry_endpoint_is_open(void);
/* Is `fd` still the listening socket we opened (the program may close our descriptors)? */
FENTRY_HIDDEN int fentry_endpoint_is_listener(int fd);
/* In a child after fork(): close the parent's listening socket, never unlink its file. */
FENTRY_HIDDEN void fentry_endpoint_forget_after_fork(void);
/*
 * Say why this process has no channel where a client can read it: a memfd named
 * "fentry-control-off: <why>" among the process's descriptors (readlink of
 * /proc/PID/fd/N shows "/memfd:fentry-control-off: ..."); only the process itself can
 * put a descriptor there.  Replaces an earlier one.
 */
FENTRY_HIDDEN void fentry_endpoint_publish_off(const char *why);

#endif /* FENTRY_ENDPOINT_H */
