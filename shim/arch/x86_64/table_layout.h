/*
 * table_layout.h - byte offsets of the patch table, shared by table.c and the assembly.
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

#endif
