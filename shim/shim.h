/*
 * shim.h - interfaces between the parts of the shim (not for patch authors: see fentry.h).
 *
 *   entry_x86_64.S  __fentry__: looks the call site up in the active patch table
 *   table.c         the patch table: lock-free readers, one-store publish
 *   module.c        the running process's modules: build-ids and load bases
 *   loader.c        checks, dlopens, validates and activates/reverts patches
 *   control.c       the control socket thread (JSON lines)
 *   json.c          the small JSON reader/writer control.c needs
 *   init.c          start-up: FENTRY_PATCHES, the control thread, fork handling
 */
#ifndef FENTRY_SHIM_H
#define FENTRY_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fentry.h"

#define FENTRY_HIDDEN __attribute__((visibility("hidden")))
#define FENTRY_ERR_MAX 512

/* ---- table.c ---------------------------------------------------------------------- */

/* One redirection: a call of __fentry__ that returns to `site_end` goes to `target`. */
struct fentry_redirect {
	uintptr_t site_end; /* address just after the call instruction of the site */
	uintptr_t target;   /* the replacement's entry                              */
};

/*
 * Replace the whole set of redirections with `redirects[0..n)` in one publish.
 * Callers serialise (the loader's mutex).  Returns 0, or -1 with errno (ENOMEM).
 */
FENTRY_HIDDEN int fentry_table_publish(const struct fentry_redirect *redirects, size_t n);

/* ---- sites.c ---------------------------------------------------------------------- */

/* One fentry site of the main program (jump mode). */
struct fentry_site {
	uintptr_t addr;   /* the call to __fentry__ (after endbr64, if any)              */
	uintptr_t target; /* the replacement the site jumps to (via a trampoline); 0: NOP */
	uintptr_t want;   /* fentry_activate()'s scratch: the target being computed     */
	unsigned mark;    /* fentry_activate()'s scratch: `want` is for this activation */
	uint8_t len;      /* 5 or 6                                                     */
	uint8_t orig[6];  /* the call instruction gcc emitted, for validation           */
};

/* Read and check __mcount_loc; -1 with a reason if jump mode cannot use it. */
FENTRY_HIDDEN int fentry_sites_load(const char **why);
/* The site at exactly addr, or NULL.  Async-signal-safe. */
FENTRY_HIDDEN struct fentry_site *fentry_site_at(uintptr_t addr);
/* All sites, sorted by address. */
FENTRY_HIDDEN struct fentry_site *fentry_sites(size_t *n);

/* ---- poke.c ----------------------------------------------------------------------- */

/* membarrier registration, /proc/self/mem, the SIGTRAP handler; -1 with a reason. */
FENTRY_HIDDEN int fentry_poke_init(const char **why);
/* Turn every site into its NOP; only while no other thread can run them. */
FENTRY_HIDDEN int fentry_poke_nop_all_single_threaded(void);
/* Rewrite batch[i] to jump to next[i] (0: NOP) with the int3 protocol; all or nothing. */
FENTRY_HIDDEN int fentry_poke_batch(struct fentry_site **batch, const uintptr_t *next, size_t n,
				    char *err);
/* 1 if the site holds exactly what this shim last wrote there. */
FENTRY_HIDDEN int fentry_poke_site_is_ours(const struct fentry_site *s);
FENTRY_HIDDEN void fentry_poke_after_fork_child(void);

/* ---- mode.c ----------------------------------------------------------------------- */

/* Choose jump or dispatch mode (FENTRY_MODE); in jump mode, NOP every site. */
FENTRY_HIDDEN void fentry_mode_init(void);
/* "jump" or "dispatch". */
FENTRY_HIDDEN const char *fentry_mode(void);
/* Why the process runs in dispatch mode ("" in jump mode). */
FENTRY_HIDDEN const char *fentry_mode_reason(void);
/* 1 in jump mode. */
FENTRY_HIDDEN int fentry_jump_mode(void);
/*
 * Make `redirects` the complete set in effect: jump sites are rewritten, the others go
 * to the dispatch table.  All or nothing; callers hold the loader's lock.
 */
FENTRY_HIDDEN int fentry_activate(const struct fentry_redirect *redirects, size_t n, char *err);

/* ---- module.c --------------------------------------------------------------------- */

#define FENTRY_MODULE_SEGMENTS 8

struct fentry_module {
	uintptr_t base;                  /* load bias: runtime address = base + st_value */
	char path[4096];                 /* file name; the main program's from /proc/self/exe */
	uint8_t build_id[FENTRY_BUILD_ID_MAX];
	uint32_t build_id_len;
	unsigned nexec;                  /* executable PT_LOAD segments, for bounds checks */
	struct { uintptr_t start, end; } exec[FENTRY_MODULE_SEGMENTS];
	unsigned nload;                  /* every PT_LOAD segment (data references)       */
	struct { uintptr_t start, end; } load[FENTRY_MODULE_SEGMENTS];
};

/* Find the loaded module whose GNU build-id is `id`; 0 when found, -1 otherwise. */
FENTRY_HIDDEN int fentry_module_by_build_id(const uint8_t *id, uint32_t len,
					    struct fentry_module *out);
/* The main program. */
FENTRY_HIDDEN int fentry_module_main(struct fentry_module *out);
/* 1 if [addr, addr+len) lies inside one executable segment of m. */
FENTRY_HIDDEN int fentry_module_contains_code(const struct fentry_module *m, uintptr_t addr,
					      size_t len);
/* 1 if [addr, addr+len) lies inside one loaded segment of m. */
FENTRY_HIDDEN int fentry_module_contains(const struct fentry_module *m, uintptr_t addr,
					 size_t len);
/* Hex of a build-id into buf (at least 2*len+1 bytes). */
FENTRY_HIDDEN void fentry_hex(const uint8_t *id, uint32_t len, char *buf);

/* ---- loader.c --------------------------------------------------------------------- */

enum fentry_patch_state { FENTRY_ACTIVE = 1, FENTRY_REVERTED = 2 };

#define FENTRY_NAME_MAX 256

/* What `list` reports of one loaded patch.  A snapshot; owned by the caller. */
struct fentry_patch_info {
	char name[FENTRY_NAME_MAX];
	char path[4096];
	enum fentry_patch_state state;
	double applied_at;       /* unix time of the last activation              */
	uint32_t nfuncs;
	const struct fentry_func *funcs; /* valid while the patch stays loaded (always) */
	const char *func_state;  /* per function: 1 if this patch's replacement is the one in
	                            effect (top of that function's stack), else 0 */
};

/*
 * Check the file at `path`, dlopen it, validate its descriptor against the running
 * process, and activate all its functions in one publish.  On failure nothing changes
 * and `err` holds one line.  `name_out` (FENTRY_NAME_MAX) receives the patch's name.
 */
FENTRY_HIDDEN int fentry_apply_path(const char *path, char *name_out, char *err);
/* Deactivate the patch `name`; its functions fall back to the patch below or the original. */
FENTRY_HIDDEN int fentry_revert_name(const char *name, char *err);
/*
 * Unload the reverted patch `name` (dlclose) once no thread can be running its code;
 * otherwise -1 with "busy: ..." and the patch stays loaded.
 */
FENTRY_HIDDEN int fentry_unload_name(const char *name, char *err);
/* Call `fn` for each loaded patch, oldest first, under the loader's lock. */
FENTRY_HIDDEN void fentry_foreach_patch(void (*fn)(const struct fentry_patch_info *, void *),
					void *arg);
/* pthread_atfork handlers keeping loader_lock consistent across fork(). */
FENTRY_HIDDEN void fentry_loader_lock_for_fork(void);
FENTRY_HIDDEN void fentry_loader_unlock_after_fork(void);
/* Number of patches in state FENTRY_ACTIVE. */
FENTRY_HIDDEN unsigned fentry_active_count(void);

/* ---- unload.c --------------------------------------------------------------------- */

/*
 * Ask every other thread whether its registers or stack hold an address inside one of
 * `ranges` ([lo, hi) pairs).  0 if none does; -1 with "busy: ..." (or why the check
 * could not run) in err.  `what` names the patch in messages.
 */
FENTRY_HIDDEN int fentry_threads_clear_of(const uintptr_t (*ranges)[2], size_t nranges,
					  const char *what, char *err);

/* ---- control.c -------------------------------------------------------------------- */

/* Start the control thread (honours FENTRY_CONTROL=0).  Safe to call again after fork. */
FENTRY_HIDDEN void fentry_control_start(void);
/* In a child after fork(): forget the parent's socket (never unlink it) and restart. */
FENTRY_HIDDEN void fentry_control_after_fork_child(void);

/* ---- json.c ----------------------------------------------------------------------- */

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

/*
 * Parse one JSON text that must be an object; for each top-level member whose value is
 * a string, call `fn(key, value, arg)` (both NUL-terminated, unescaped).  Members of
 * other types are accepted and skipped.  Returns 0, or -1 with a one-line reason in err.
 */
FENTRY_HIDDEN int fentry_json_object_strings(const char *text, size_t len,
					     void (*fn)(const char *key, const char *value,
							void *arg),
					     void *arg, char *err, size_t errlen);

#endif /* FENTRY_SHIM_H */
