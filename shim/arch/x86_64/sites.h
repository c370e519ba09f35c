/*
 * sites.h - the main program's fentry sites: where they are, their byte forms, and the
 * state jump mode keeps for the ones it has rewritten (sites.c).
 *
 * A site is the 5- or 6-byte call to __fentry__ at a function's entry.  In jump mode it
 * always holds one of three forms that differ in ONE byte, the opcode; the byte after it
 * (the operand) never changes while the process runs:
 *
 *   6 bytes (PIE: gcc's `67 e8 <rel32>`, also `ff 15 <rel32>`)   5 bytes (`e8 <rel32>`)
 *   unpatched 67 a9 fd t1 t2 t3  addr32 test $imm32,%eax    |   a9 fe t1 t2 t3  test $imm32,%eax
 *   spin      67 eb fd .. .. ..  addr32 jmp .  (to itself)  |   eb fe .. .. ..  jmp .
 *   patched   67 e9 fd r1 r2 r3  addr32 jmp rel32           |   e9 fe r1 r2 r3  jmp rel32
 *
 * The test only sets flags (dead at a function's entry).  The operand byte is the spin's
 * rel8 (-3 / -2: back to the site's first byte), so a patched site's rel32 has that low
 * byte too: its jump target lies at site_end + 0x..fd / 0x..fe (poke.c places trampolines
 * there).  t1..t3 are dead while the opcode is the test; they start as the call's rel32
 * bytes 1..3 and later hold whatever rel32 the site last jumped with.
 */
#ifndef FENTRY_SITES_H
#define FENTRY_SITES_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

#define SITE_MAX_LEN 6
#define SITE_OP_ADDR32 0x67    /* first byte of every 6-byte form (uprobes write it back) */
#define SITE_OP_CALL 0xe8      /* call rel32: the form gcc emits                           */
#define SITE_OP_CALL_IND 0xff  /* with SITE_MODRM_CALL_RIP: call *rel32(%rip) (GOT)       */
#define SITE_MODRM_CALL_RIP 0x15
#define SITE_OP_TEST 0xa9      /* test $imm32,%eax: unpatched                              */
#define SITE_OP_SPIN 0xeb      /* jmp rel8: with the operand byte, a jump to the site       */
#define SITE_OP_JMP 0xe9       /* jmp rel32: patched                                       */
#define SITE_REL8_6 0xfd       /* the operand byte of 6-byte sites: -3                     */
#define SITE_REL8_5 0xfe       /* the operand byte of 5-byte sites: -2                     */
#define SITE_TAIL_LEN 3        /* bytes after the operand: rel32's (or imm32's) upper three */

/* Where the parts of a site of `len` bytes lie. */
static inline unsigned site_op_at(unsigned len) { return len - 5u; }       /* opcode  */
static inline unsigned site_tail_at(unsigned len) { return len - 3u; }     /* tail    */
static inline uint8_t site_rel8(unsigned len) { return len == 6 ? SITE_REL8_6 : SITE_REL8_5; }

/*
 * A site jump mode has looked at (records exist only for those: a process that patches
 * nothing keeps none).  Records never move or go away; they are read and written only
 * under the loader's lock (or before main, single-threaded).
 */
struct fentry_site {
	uintptr_t addr;   /* the site's first byte (after endbr64, if any)                   */
	uintptr_t target; /* what the site jumps to (through a trampoline); 0: unpatched       */
	uintptr_t want;   /* fentry_activate()'s scratch: the target being computed           */
	unsigned mark;    /* fentry_activate()'s scratch: `want` is for this activation       */
	uint8_t len;      /* 5 or 6                                                          */
	uint8_t bytes[SITE_MAX_LEN];        /* exactly what the shim last wrote (or found)   */
	uint8_t orig_tail[SITE_TAIL_LEN];   /* the unpatched form's tail at start: identity  */
};

/*
 * Learn the main program's code and whether its sites were prepared at build time; if not,
 * read and check __mcount_loc: keep each recorded address that holds a call to this
 * shim's __fentry__ (e8, 67 e8; ff 15 too unless `direct_only`).  Writes nothing.
 * -1 with why in err if jump mode cannot use the list.
 */
FENTRY_HIDDEN int fentry_sites_load(int direct_only, char *err);
/* 1 if the build prepared the sites (fentry_build/build/prepare.py): nothing to write at start. */
FENTRY_HIDDEN int fentry_sites_prepared(void);
/*
 * For a prepared program: read the site list its build wrote into the file (section
 * .fentry_sites, checked against the running build and code), so that the calls can be
 * put back (dispatch mode).  -1 with why in err.
 */
FENTRY_HIDDEN int fentry_sites_load_prepared(char *err);
/* The lowest and highest address of the main program's code (trampolines go near it). */
FENTRY_HIDDEN void fentry_sites_code(uintptr_t *lo, uintptr_t *hi);
/* Number of sites, and the i-th (sorted by address) with its length. */
FENTRY_HIDDEN size_t fentry_sites_count(void);
FENTRY_HIDDEN uintptr_t fentry_sites_addr(size_t i, unsigned *len);
/*
 * The record of the site starting at addr (made on first use, from the bytes there:
 * callers use it after start-up turned every site into its unpatched form), or NULL if
 * no site starts there.  Callers hold the loader's lock.
 */
FENTRY_HIDDEN struct fentry_site *fentry_site_at(uintptr_t addr);
/* The same for the site whose instruction ends at site_end; *oom = 1 if it is a site
 * but its record could not be made. */
FENTRY_HIDDEN struct fentry_site *fentry_site_ending_at(uintptr_t site_end, int *oom);
/*
 * 1 if `bytes` (len bytes: a site as a patch's generator saw it in the file - the call
 * gcc emitted, or its unpatched form) describe site s.
 */
FENTRY_HIDDEN int fentry_site_matches(const struct fentry_site *s, const uint8_t *bytes,
				      unsigned len);
/*
 * 1 if a and b (len bytes each, any of the call forms or the unpatched form) are the same
 * site: the call gcc emitted and what the shim or the build made of it keep its last three
 * bytes.  For comparing a site with what a generator saw in a prepared file.
 */
FENTRY_HIDDEN int fentry_site_bytes_match(const uint8_t *a, const uint8_t *b, unsigned len);
/* 1 if the main program's sites were prepared and the site ending at site_end holds its
 * unpatched form (it never calls __fentry__).  Reads only. */
FENTRY_HIDDEN int fentry_sites_unpatched_ending_at(uintptr_t site_end);
/* The unpatched form of a call site `call` of len bytes (any of the call forms). */
FENTRY_HIDDEN void fentry_site_unpatched_form(const uint8_t *call, unsigned len, uint8_t *out);
/* Heap bytes the site list and records hold. */
FENTRY_HIDDEN size_t fentry_sites_memory(void);

#endif /* FENTRY_SITES_H */
