/* codes.h - why an operation failed: the one list of error codes (the protocol sends their names). */
#ifndef FENTRY_CODES_H
#define FENTRY_CODES_H

/*
 * Every refusal of the runtime has one of these codes; the control protocol sends its
 * name as the reply's "code" (docs/protocol.md), and the Python client reads the same
 * list (fentry_build/client/protocol.py; tests/test_protocol_doc.py fails when the
 * two differ).  A code names the kind of failure a program may act on; the message
 * beside it says what exactly and how to fix it.
 *
 * The loader's verbs return 0 or -code (core/util.h: the error convention); a plain -1
 * is FENTRY_E_FAILED.  New codes go at the end: their numbers never reach the wire,
 * but keeping them stable keeps old logs readable.
 */
#define FENTRY_CODES(X)                                                                    \
	X(FAILED, "failed")                   /* nothing more precise: out of memory, ... */  \
	X(BAD_REQUEST, "bad_request")         /* not a request: JSON, members, unknown op */  \
	X(NOT_PERMITTED, "not_permitted")     /* the peer's uid may not control us         */ \
	X(TIMEOUT, "timeout")                 /* no complete request line in time          */ \
	X(EXPIRED, "expired")                 /* the request's deadline had passed         */ \
	X(NO_SUCH_PATCH, "no_such_patch")     /* no patch of that name is loaded           */ \
	X(WRONG_STATE, "wrong_state")         /* already applied, not applied, ...         */ \
	X(BUSY, "busy")                       /* unload: a thread may run its code; retry  */ \
	X(BAD_FILE, "bad_file")               /* the file: missing, symlink, mode, not ELF  */ \
	X(BAD_PATCH, "bad_patch")             /* no or malformed descriptor, ABI version    */ \
	X(WRONG_BUILD, "wrong_build")         /* built for another build (build-id)        */ \
	X(ENTRY_CHANGED, "entry_changed")     /* a function's entry bytes differ           */ \
	X(CALLBACK_REFUSED, "callback_refused") /* a pre-patch callback vetoed or hung     */

enum fentry_code {
	FENTRY_OK = 0,
#define FENTRY_CODE_ENUM(id, name) FENTRY_E_##id,
	FENTRY_CODES(FENTRY_CODE_ENUM)
#undef FENTRY_CODE_ENUM
	FENTRY_CODE_COUNT
};

/* The name of a code, or of -code ("busy"); "failed" for anything out of range. */
static inline const char *fentry_code_name(int code)
{
	static const char *const names[] = {
		"ok",
#define FENTRY_CODE_NAME(id, name) name,
		FENTRY_CODES(FENTRY_CODE_NAME)
#undef FENTRY_CODE_NAME
	};

	if (code < 0)
		code = -code;
	return code < FENTRY_CODE_COUNT ? names[code] : "failed";
}

#endif /* FENTRY_CODES_H */
