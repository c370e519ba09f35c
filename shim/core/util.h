/* util.h - what every unit of the shim shares: symbol visibility and the error convention. */
#ifndef FENTRY_UTIL_H
#define FENTRY_UTIL_H

#include <stdarg.h>
#include <stdio.h>

/* Everything the shim's units share stays inside the program (or libfentry.so). */
#define FENTRY_HIDDEN __attribute__((visibility("hidden")))

/*
 * Errors.  A function that can fail for a reason a person must read returns 0 on success
 * and -1 on failure, and writes that reason - one line, no newline - into `char *err`, a
 * buffer of FENTRY_ERR_MAX bytes owned by the caller (the control channel sends it back
 * as the reply's "error"; FENTRY_PATCHES prints it).  The public calls of fentry.h take
 * (err, errlen) instead and copy that line into the caller's buffer, and json.c keeps an
 * explicit length because its callers pass buffers of their own.  Where a caller acts on
 * the kind of failure (the loader's verbs, the control protocol), the return value is
 * -code instead, a code of core/codes.h; -1 is its FENTRY_E_FAILED.
 */
#define FENTRY_ERR_MAX 512

/* The convention in one call: `return fentry_fail(err, "no such %s", what);` */
__attribute__((format(printf, 2, 3)))
static inline int fentry_fail(char *err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, FENTRY_ERR_MAX, fmt, ap);
	va_end(ap);
	return -1;
}

#endif /* FENTRY_UTIL_H */
