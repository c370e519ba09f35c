/* protocol.h - the control protocol: one request line in, one reply line out (protocol.c). */
#ifndef FENTRY_PROTOCOL_H
#define FENTRY_PROTOCOL_H

#include <stddef.h>

#include "control/json.h"
#include "core/audit.h"
#include "core/util.h"

/*
 * docs/protocol.md describes it whole.  The version changes when a client must know
 * (a member's meaning changed, an op was removed); status reports it as "protocol".
 *   1  load, revert, unload, list, status; errors without "code"
 *   2  error "code"s (core/codes.h), "deadline", "history", status's "protocol"
 */
#define FENTRY_PROTOCOL_VERSION 2
#define FENTRY_LINE_MAX 65536 /* bytes of one request, its '\n' not counted */

/*
 * Answer one request line (without its '\n') from `peer`: append one reply line, '\n'
 * included, to `out`.  Carries out the request (the loader's verbs, audited); knows
 * nothing of sockets.  On out->oom the caller drops the reply.
 */
FENTRY_HIDDEN void fentry_protocol_answer(const char *line, size_t len,
					  const struct fentry_peer *peer, struct fentry_buf *out);

/* An error reply line, '\n' included: {"ok":false,"code":"<code>","error":"<fmt...>"}. */
FENTRY_HIDDEN void fentry_protocol_error(struct fentry_buf *out, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif /* FENTRY_PROTOCOL_H */
