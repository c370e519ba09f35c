/* control.h - the control channel: a Unix socket served by one thread (control.c). */
#ifndef FENTRY_CONTROL_H
#define FENTRY_CONTROL_H

#include "core/util.h"

/* Start the control thread (honours FENTRY_CONTROL=0).  Safe to call again after fork. */
FENTRY_HIDDEN void fentry_control_start(void);
/* In a child after fork(): forget the parent's socket (never unlink it) and restart. */
FENTRY_HIDDEN void fentry_control_after_fork_child(void);

#endif /* FENTRY_CONTROL_H */
