/* poke.h - rewriting fentry sites in live code without signals; trampolines (poke.c). */
#ifndef FENTRY_POKE_H
#define FENTRY_POKE_H

#include <stddef.h>
#include <stdint.h>

#include "arch/x86_64/sites.h"
#include "core/util.h"

/* membarrier registration and /proc/self/mem; -1 with why in err. */
FENTRY_HIDDEN int fentry_poke_init(char *err);
/*
 * At start: turn every site of the list (still the call gcc emitted) into its unpatched
 * form.  `live` = other threads may run the sites now (then in two one-byte steps, each
 * harmless: e8 -> a9, then the operand byte; the list must hold no ff 15 site).
 */
FENTRY_HIDDEN int fentry_poke_prepare_all(int live);
/*
 * The reverse, for a program whose sites were prepared at build time and that must run
 * in dispatch mode: every site of the list (fentry_sites_load_prepared()) becomes the call
 * of __fentry__ again (`live`: in two harmless one-byte steps, operand then opcode).
 */
FENTRY_HIDDEN int fentry_poke_restore_calls(int live);
/*
 * Point batch[i] at next[i] (0: unpatched), all or nothing, with the spin protocol of
 * poke.c; writes the trampolines the new targets need.  Blocks every signal in the
 * calling thread meanwhile.  Callers hold the loader's lock.  -1 with one line in err
 * (nothing changed; a site that holds someone else's bytes is never written).
 */
FENTRY_HIDDEN int fentry_poke_batch(struct fentry_site **batch, const uintptr_t *next, size_t n,
				    char *err);
/* 1 if the site holds exactly what this shim last wrote there.  Writes nothing. */
FENTRY_HIDDEN int fentry_poke_site_is_ours(const struct fentry_site *s);
FENTRY_HIDDEN void fentry_poke_after_fork_child(void);

/*
 * For the unload check: the code of every trampoline whose jump lands in [lo, hi) (a
 * patch's code), as [start, end) pairs in out[0..max).  Returns how many there are (may
 * be more than max: call again with room for all).  Callers hold the loader's lock.
 */
FENTRY_HIDDEN size_t fentry_poke_trampolines_into(uintptr_t lo, uintptr_t hi,
						  uintptr_t (*out)[2], size_t max);
/*
 * After [lo, hi) was unloaded - no site jumps to it (its patch is reverted) and no
 * thread runs its trampolines (the unload check covered them) - their bytes may be
 * reused for new trampolines.  Callers hold the loader's lock.
 */
FENTRY_HIDDEN void fentry_poke_trampolines_release(uintptr_t lo, uintptr_t hi);

/* What code rewriting has cost so far (status --json). */
struct fentry_poke_stats {
	uint64_t sites_written;     /* site rewrites by batches since start (one per site per batch) */
	uint64_t batches;           /* fentry_poke_batch() calls that changed something        */
	uint64_t last_batch_ns;     /* wall time of the last such batch                        */
	uint64_t startup_ns;        /* wall time of fentry_poke_prepare_all()                  */
	uint64_t startup_sites;     /* sites it wrote (0 when none needed writing)             */
	uint64_t trampolines;       /* trampolines in use                                      */
	uint64_t sites_direct;      /* patched sites jumping straight to their replacement     */
	uint64_t trampoline_bytes;  /* address space mapped for them (pages written are private) */
	uint64_t heap_bytes;        /* the shim's bookkeeping of sites and trampolines         */
};
FENTRY_HIDDEN void fentry_poke_stats(struct fentry_poke_stats *out);
/* Why live code cannot be rewritten any more (a call that worked at start is refused now,
 * e.g. by a seccomp filter), or NULL while it can. */
FENTRY_HIDDEN const char *fentry_poke_rewrite_error(void);

#endif /* FENTRY_POKE_H */
