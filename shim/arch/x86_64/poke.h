/* poke.h - rewriting fentry sites in live code: NOPs, jumps, trampolines (poke.c). */
#ifndef FENTRY_POKE_H
#define FENTRY_POKE_H

#include <stddef.h>
#include <stdint.h>

#include "arch/x86_64/sites.h"
#include "core/util.h"

/* membarrier registration, /proc/self/mem, the SIGTRAP handler; -1 with why in err. */
FENTRY_HIDDEN int fentry_poke_init(char *err);
/* Turn every site into its NOP; only while no other thread can run them. */
FENTRY_HIDDEN int fentry_poke_nop_all_single_threaded(void);
/*
 * Rewrite batch[i] to jump to next[i] (0: NOP) with the int3 protocol; all or nothing.
 * Writes the trampolines the new targets need.
 */
FENTRY_HIDDEN int fentry_poke_batch(struct fentry_site **batch, const uintptr_t *next, size_t n,
				    char *err);
/*
 * 1 if the site holds exactly what this shim last wrote there (its NOP, or the jump to
 * the trampoline of its target).  A pure check: it writes nothing, not even a trampoline.
 */
FENTRY_HIDDEN int fentry_poke_site_is_ours(const struct fentry_site *s);
FENTRY_HIDDEN void fentry_poke_after_fork_child(void);

#endif /* FENTRY_POKE_H */
