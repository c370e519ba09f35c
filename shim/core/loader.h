/* loader.h - validating, activating, reverting and unloading patches, and their versions (loader.c). */
#ifndef FENTRY_LOADER_H
#define FENTRY_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "core/codes.h"
#include "core/sha256.h"
#include "core/util.h"
#include "fentry.h"

/* A patch's state; a replaced patch is an older version a newer one of its name replaced. */
enum fentry_patch_state { FENTRY_ACTIVE = 1, FENTRY_REVERTED = 2, FENTRY_REPLACED = 3 };

#define FENTRY_NAME_MAX 256

/* What `list` reports of one loaded patch.  A snapshot; owned by the caller. */
struct fentry_patch_info {
	char name[FENTRY_NAME_MAX];
	char path[4096];
	enum fentry_patch_state state;
	double applied_at;       /* unix time of the last activation              */
	char sha256[FENTRY_SHA256_HEX + 1]; /* of the file's contents as loaded         */
	double built_at;         /* unix time: the file's mtime when it was loaded   */
	double apply_seconds;    /* how long the apply that last activated it took   */
	uint64_t copy_bytes;     /* its private copy (memory the process holds)      */
	uint64_t mapped_bytes;   /* address space its segments map                   */
	uint32_t nfuncs;
	const struct fentry_func *funcs; /* valid while the patch stays loaded (always) */
	const char *func_state;  /* per function: 1 if this patch's replacement is the one in
	                            effect (top of that function's stack), else 0 */
	int near;                /* its code is within a rel32 jump of the program's code */
};

/*
 * What a load tells its caller besides success or failure - the reply's members and the
 * audit trail's (core/audit.c).  Filled as far as the load got, also when it fails.
 */
struct fentry_load_report {
	char name[FENTRY_NAME_MAX];         /* the patch's name; "" if the path has none  */
	char sha256[FENTRY_SHA256_HEX + 1]; /* of the file's contents as loaded; "" when
	                                       they were not read                         */
	uint32_t functions;                 /* on success: the functions it replaces      */
	int changed;                        /* 0: this very version was active already    */
	char replaced_sha256[FENTRY_SHA256_HEX + 1]; /* the version of the same name this
	                                       one replaced, or ""                        */
	int replaced_unloaded;              /* 1: that version was unloaded at once       */
	char replaced_why[FENTRY_ERR_MAX];  /* else why it stays loaded ("busy: ...")     */
};

/*
 * The verbs below return 0, or -code (core/codes.h: FENTRY_E_WRONG_BUILD, ...; a plain -1
 * is FENTRY_E_FAILED) with one line in `err`.
 *
 * Check the file at `path`, copy it into a sealed private copy, dlopen that, validate
 * its descriptor against the running process, and activate all its functions in one
 * publish.  On failure nothing changes.  `report` may be NULL.  Contents that differ
 * from the loaded patch of the same name are its new version: it replaces that one in
 * the same publish (which is then unloaded if it can be).  The version active already:
 * 0, report->changed = 0, nothing done.
 */
FENTRY_HIDDEN int fentry_apply_path(const char *path, struct fentry_load_report *report,
				    char *err);
/*
 * Revert and unload name a patch by its name ("fix"), its file name ("fix.so") or the
 * path it was applied from; an unknown one: -FENTRY_E_NO_SUCH_PATCH, err lists what is
 * loaded.
 *
 * Deactivate the patch; its functions fall back to the patch below or the original.
 */
FENTRY_HIDDEN int fentry_revert_name(const char *name, char *err);
/*
 * Unload (dlclose) every loaded version of the patch that is not active - reverted, or
 * replaced by a newer one - once no thread can be running its code; otherwise
 * -FENTRY_E_BUSY with "busy: ..." and that version stays loaded.
 */
FENTRY_HIDDEN int fentry_unload_name(const char *name, char *err);
/*
 * The deadline (unix time; 0: none) of the request the calling thread is about to carry
 * out with the verbs above: past it they refuse with -FENTRY_E_EXPIRED and do nothing,
 * also when they had to wait for the loader.  The control protocol sets it per request.
 */
FENTRY_HIDDEN void fentry_loader_deadline(double unix_time);
/* Call `fn` for each loaded patch, oldest first, under the loader's lock. */
FENTRY_HIDDEN void fentry_foreach_patch(void (*fn)(const struct fentry_patch_info *, void *),
					void *arg);
/* pthread_atfork handlers keeping loader_lock consistent across fork(). */
FENTRY_HIDDEN void fentry_loader_lock_for_fork(void);
FENTRY_HIDDEN void fentry_loader_unlock_after_fork(void);
/* Number of patches in state FENTRY_ACTIVE. */
FENTRY_HIDDEN unsigned fentry_active_count(void);
/*
 * fentry_rewrite_error() copied into buf (size bytes) under the loader's lock - a code
 * rewrite on another thread (a program's fentry_apply()) may be writing it meanwhile -
 * and buf returned; NULL while code can be rewritten (or in dispatch mode).
 */
FENTRY_HIDDEN const char *fentry_loader_rewrite_error(char *buf, size_t size);
/*
 * Why the newest patch's code was not placed within a rel32 jump of the program's code
 * (arch/x86_64/near.c), copied into buf under the loader's lock; NULL when it was (or no
 * patch was loaded yet).
 */
FENTRY_HIDDEN const char *fentry_loader_far_reason(char *buf, size_t size);

#endif /* FENTRY_LOADER_H */
