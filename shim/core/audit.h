/* audit.h - who changed this process's code, when, and to what: the audit trail (audit.c). */
#ifndef FENTRY_AUDIT_H
#define FENTRY_AUDIT_H

#include <stdint.h>
#include <sys/types.h>

#include "control/json.h"
#include "core/loader.h"
#include "core/util.h"

/* How a request reached the runtime. */
enum fentry_via {
	FENTRY_VIA_SOCKET = 1, /* the control socket                       */
	FENTRY_VIA_API,        /* fentry_apply()/... called by the program  */
	FENTRY_VIA_START,      /* FENTRY_PATCHES, before main()             */
};

/* Who asked: for the socket the peer's SO_PEERCRED, otherwise this process itself. */
struct fentry_peer {
	enum fentry_via via;
	uid_t uid;
	pid_t pid; /* as this process's pid namespace sees it; 0 when it cannot */
};

/* This process, as the peer of what it does itself (via API or START). */
FENTRY_HIDDEN struct fentry_peer fentry_peer_self(enum fentry_via via);

/*
 * The loader's verbs, recorded: each call - accepted or refused - becomes one entry of
 * the trail (memory, and syslog or FENTRY_AUDIT_LOG).  Same results as the loader's
 * (0 or -code with one line in err).
 */
FENTRY_HIDDEN int fentry_audited_apply(const struct fentry_peer *who, const char *path,
				       struct fentry_load_report *report, char *err);
FENTRY_HIDDEN int fentry_audited_revert(const struct fentry_peer *who, const char *name,
					char *err);
FENTRY_HIDDEN int fentry_audited_unload(const struct fentry_peer *who, const char *name,
					char *err);
/*
 * A refusal that happened before any verb ran (a peer of another uid, an expired
 * request): recorded the same way.  `op` is "load", "revert", "unload" or "connect";
 * name and path may be NULL.
 */
FENTRY_HIDDEN void fentry_audit_refusal(const struct fentry_peer *who, const char *op,
					const char *name, const char *path, int code,
					const char *error);

/* One entry of the trail, as fentry_audit_foreach() shows it. */
struct fentry_audit_entry {
	uint64_t seq;          /* 1, 2, ... since the process started      */
	double time;           /* unix time                                 */
	struct fentry_peer peer;
	const char *op;        /* "load", "revert", "unload", "connect"     */
	const char *name;      /* NULL when unknown                         */
	const char *path;      /* the file asked for (load), else NULL      */
	const char *sha256;    /* of the file as loaded, NULL when unknown   */
	int code;              /* FENTRY_OK, or why it was refused          */
	const char *error;     /* the refusal's line, NULL when accepted    */
};

/*
 * Call `fn` for each entry kept in memory, oldest first (the newest FENTRY_AUDIT_KEEP);
 * *dropped receives how many older ones were dropped.  Holds the trail's lock.
 */
#define FENTRY_AUDIT_KEEP 1000
FENTRY_HIDDEN void fentry_audit_foreach(void (*fn)(const struct fentry_audit_entry *, void *),
					void *arg, uint64_t *dropped);

/*
 * The entry as one JSON object - what the protocol's "history" op returns; with
 * `with_process`, also this process's pid and program (a line of FENTRY_AUDIT_LOG).
 */
FENTRY_HIDDEN void fentry_audit_entry_json(struct fentry_buf *b, const struct fentry_audit_entry *e,
					   int with_process);

/* At start: check FENTRY_AUDIT_LOG once and say on stderr if it cannot be used. */
FENTRY_HIDDEN void fentry_audit_init(void);
/* pthread_atfork handlers: the trail's lock is never inherited held. */
FENTRY_HIDDEN void fentry_audit_lock_for_fork(void);
FENTRY_HIDDEN void fentry_audit_unlock_after_fork(void);

#endif /* FENTRY_AUDIT_H */
