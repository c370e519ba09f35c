/* near.h - loading a patch within reach of a rel32 jump from the program's code (near.c). */
#ifndef FENTRY_NEAR_H
#define FENTRY_NEAR_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/* A rel32 reaches 2 GiB each way; this much of it is used (the rest is slack). */
#define FENTRY_NEAR_REACH ((uintptr_t)0x7ff00000u)

/*
 * One load steered near [lo, hi): fentry_near_hold() before dlopen(), and
 * fentry_near_release() right after it, whatever dlopen() did.
 */
struct fentry_near {
	uintptr_t lo, hi;     /* the code the object must be reachable from              */
	size_t span;          /* address space the object maps (its PT_LOADs, whole pages) */
	uintptr_t (*held)[2]; /* the reservations made, [start, end)                    */
	size_t nheld;
};

/*
 * Reserve, for the length of one dlopen(), every free gap between the program and the
 * mmap area's top that could hold `span` bytes, so that the kernel places the object in
 * the first gap below the program.  NULL when held, else why not (a constant string;
 * nothing is held then).
 */
FENTRY_HIDDEN const char *fentry_near_hold(struct fentry_near *n);
/* Give the reservations back. */
FENTRY_HIDDEN void fentry_near_release(struct fentry_near *n);
/* Is every byte of [a, b) within a rel32 jump of every byte of [lo, hi)? */
FENTRY_HIDDEN int fentry_near_reaches(uintptr_t lo, uintptr_t hi, uintptr_t a, uintptr_t b);

#endif /* FENTRY_NEAR_H */
