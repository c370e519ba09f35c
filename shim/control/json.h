/* json.h - the small, strict JSON reader and the reply writer of the control channel (json.c). */
#ifndef FENTRY_JSON_H
#define FENTRY_JSON_H

#include <stddef.h>

#include "core/util.h"

/* A growable output buffer for JSON replies. */
struct fentry_buf {
	char *data;
	size_t len, cap;
	int oom; /* set when an append failed; the reply is then replaced by an error */
};
FENTRY_HIDDEN void fentry_buf_put(struct fentry_buf *b, const char *s, size_t n);
FENTRY_HIDDEN void fentry_buf_printf(struct fentry_buf *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Append `s` as a JSON string literal, quotes included. */
FENTRY_HIDDEN void fentry_buf_json_string(struct fentry_buf *b, const char *s);
FENTRY_HIDDEN void fentry_buf_free(struct fentry_buf *b);

enum fentry_json_kind { FENTRY_JSON_STRING = 's', FENTRY_JSON_NUMBER = 'n' };

/*
 * Parse one JSON text that must be an object; for each top-level member whose value is
 * a string or a number, call `fn(key, kind, value, arg)` (NUL-terminated; a string
 * unescaped, a number as its JSON text).  Members of other types are accepted and
 * skipped.  Returns 0, or -1 with a one-line reason in err (and no call made).
 */
FENTRY_HIDDEN int fentry_json_object_members(const char *text, size_t len,
					     void (*fn)(const char *key, enum fentry_json_kind kind,
							const char *value, void *arg),
					     void *arg, char *err, size_t errlen);

#endif /* FENTRY_JSON_H */
