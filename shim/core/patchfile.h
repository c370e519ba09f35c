/* patchfile.h - a patch file's sealed private copy, its SHA-256, and the object loaded from it (patchfile.c). */
#ifndef FENTRY_PATCHFILE_H
#define FENTRY_PATCHFILE_H

#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "arch/x86_64/near.h"
#include "core/sha256.h"
#include "core/util.h"

/*
 * One patch file as the loader holds it: the bytes checked are the bytes that run.
 *
 * fentry_patchfile_copy() opens the file (checked through its descriptor), copies it
 * into a sealed memfd while hashing it, and checks the copy: an x86-64 shared object
 * whose segments lie inside it and whose dynamic symbol table defines fentry_patch.
 * fentry_patchfile_load() dlopen()s that copy under a name no loaded object has, and
 * proves that the object it got is a new one.  Nothing done to the file afterwards
 * (overwritten, truncated, deleted) changes what runs.
 */
struct fentry_patchfile {
	int memfd;                                /* the sealed copy; -1 when none          */
	uint64_t size;                            /* bytes in it                            */
	uint8_t sha256[FENTRY_SHA256_BYTES];      /* of the copy                            */
	char sha256_hex[FENTRY_SHA256_HEX + 1];
	struct timespec mtime;                    /* of the file when it was copied: when it
	                                             was built (or installed)              */
	uint64_t span;                            /* address space its PT_LOADs map (pages)  */
	void *handle;                             /* dlopen()'s, once loaded                 */
	uintptr_t base;                           /* the object's load base                  */
	char *shown_name;                         /* the link map's name while loaded (what
	                                             debuggers open): the path applied      */
	char *loader_name;                        /* the name glibc gave it, put back before
	                                             dlclose()                              */
};

/* At start, before any thread of the shim: makes the first copy's descriptor cheap. */
FENTRY_HIDDEN void fentry_patchfile_init(void);
/*
 * Check the file at the absolute `path` and make its sealed copy in pf (memfd, size,
 * sha256, mtime; handle NULL).  -code (core/codes.h) with one line in err: nothing kept.
 */
FENTRY_HIDDEN int fentry_patchfile_copy(const char *path, struct fentry_patchfile *pf, char *err);
/*
 * dlopen() the copy (this runs the patch's constructors) under a fresh name; `path`
 * names the patch in messages and becomes the link map's name for debuggers.  With
 * `near` (its lo, hi: the code to reach), the load is steered within reach of a rel32 jump
 * from there (arch/x86_64/near.c); *near_why is then NULL, or why it was not steered.
 * -code with one line in err; the copy is kept either way.
 */
FENTRY_HIDDEN int fentry_patchfile_load(struct fentry_patchfile *pf, const char *path,
					struct fentry_near *near, const char **near_why, char *err);
/* Unload (dlclose) and drop the copy; pf is empty afterwards.  Callers made sure no
 * thread can run the object's code. */
FENTRY_HIDDEN void fentry_patchfile_close(struct fentry_patchfile *pf);
/*
 * The executable segments of the loaded object, as [lo, hi) pairs in out[0..max);
 * returns how many it has (0 if it is not loaded).
 */
FENTRY_HIDDEN size_t fentry_patchfile_code(const struct fentry_patchfile *pf, uintptr_t (*out)[2],
					   size_t max);
/* Bytes of address space the loaded object maps (its PT_LOAD segments, in pages). */
FENTRY_HIDDEN uint64_t fentry_patchfile_mapped_bytes(const struct fentry_patchfile *pf);

#endif /* FENTRY_PATCHFILE_H */
