/*
 * table_layout.h - the patch table as __fentry__ reads it: byte offsets and the hash, shared
 * by table.c and the assembly (entry.S).
 *
 * struct fentry_table in table.c must match; it checks these with _Static_assert.
 */
#ifndef FENTRY_TABLE_LAYOUT_H
#define FENTRY_TABLE_LAYOUT_H

#define TABLE_SEQ 0     /* uint64_t seq: even when stable, odd while rewritten    */
#define TABLE_MASK 8    /* uint64_t mask: (capacity - 1) * SLOT_SIZE              */
#define TABLE_SLOTS 16  /* struct fentry_redirect slot[capacity]                  */
#define SLOT_SIZE 16
#define SLOT_KEY 0      /* uintptr_t site_end; 0 = empty                          */
#define SLOT_TARGET 8   /* uintptr_t target                                       */

/*
 * The home slot of a key, as a byte offset into slot[]:
 *
 *     ((key * TABLE_HASH_MUL) >> TABLE_HASH_SHIFT) & mask
 *
 * Multiplicative (Fibonacci) hashing: the multiplier is 2^64 / golden ratio, and the bits
 * taken (40 and up: 36 + 4 for SLOT_SIZE) depend on every key bit below them, so
 * neighbouring functions' keys land far apart.  The shift is fixed so that the assembly
 * needs no register for a shift count; it allows up to TABLE_MAX_SLOTS slots.
 */
#define TABLE_HASH_MUL 0x9E3779B97F4A7C15
#define TABLE_HASH_SHIFT 36
#define TABLE_MAX_SLOTS (1 << (64 - TABLE_HASH_SHIFT - 4)) /* 2^24 */

#endif
