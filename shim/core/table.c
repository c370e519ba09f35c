/*
 * table.c - the patch table __fentry__ reads: lock-free readers, one-store publish.
 *
 * Two tables of equal capacity alternate.  A change rewrites the one that is not
 * published, then publishes it with one atomic store of fentry_active_table: a reader
 * sees the old or the new set of redirections, never a mix.
 *
 * Reclaiming: a reader may still be looking into the previously published table
 * when the writer starts rewriting it one publish later.  Each table carries a
 * sequence number, odd while it is rewritten; readers (arch/x86_64/entry.S) compare it
 * before and after their lookup and start again on any change, so a stale table is
 * safe to reuse without knowing when readers left it.  When a change needs a larger
 * capacity, a new pair is allocated and the old pair is kept forever (a stale reader
 * may still hold it): the memory kept is bounded by the largest pair ever used, since
 * capacities double.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "arch/x86_64/table_layout.h"
#include "core/table.h"

struct fentry_table {
	_Atomic uint64_t seq;
	uint64_t mask;
	struct fentry_redirect slot[];
};

_Static_assert(offsetof(struct fentry_table, seq) == TABLE_SEQ, "layout");
_Static_assert(offsetof(struct fentry_table, mask) == TABLE_MASK, "layout");
_Static_assert(offsetof(struct fentry_table, slot) == TABLE_SLOTS, "layout");
_Static_assert(sizeof(struct fentry_redirect) == SLOT_SIZE, "layout");
_Static_assert(offsetof(struct fentry_redirect, site_end) == SLOT_KEY, "layout");
_Static_assert(offsetof(struct fentry_redirect, target) == SLOT_TARGET, "layout");

/*
 * Read by __fentry__ on every instrumented call, on any program thread (and in signal
 * handlers); NULL when nothing is patched.  Written only by fentry_table_publish(), with
 * release stores; the partner loads are entry.S's two `movq fentry_active_table(%rip)`
 * (a plain x86-64 load has acquire semantics).
 */
FENTRY_HIDDEN struct fentry_table *_Atomic fentry_active_table;

/* Everything below is the writer's alone: callers of fentry_table_publish() and
 * fentry_table_memory() hold the loader's lock, and no reader looks at these. */
static struct fentry_table *tables[2]; /* the pair in use; tables[cur] is published */
static int cur;
static size_t capacity; /* slots per table, a power of two */
static size_t bytes_held; /* every pair allocated (old pairs are kept): status's costs */

static size_t slot_offset(uintptr_t key, uint64_t mask)
{
	/* The hash of table_layout.h, as arch/x86_64/entry.S computes it. */
	return (size_t)((((uint64_t)key * (uint64_t)TABLE_HASH_MUL) >> TABLE_HASH_SHIFT) & mask);
}

static struct fentry_table *table_new(size_t cap)
{
	struct fentry_table *t = calloc(1, sizeof(*t) + cap * sizeof(struct fentry_redirect));

	if (t)
		t->mask = (uint64_t)(cap - 1) * SLOT_SIZE;
	return t;
}

/* Keep the load factor at or below one half so every probe sequence meets a hole. */
static int ensure_capacity(size_t n)
{
	size_t cap = capacity ? capacity : 16;
	struct fentry_table *a, *b;

	while (cap < 2 * n && cap <= TABLE_MAX_SLOTS)
		cap *= 2;
	if (cap > TABLE_MAX_SLOTS) {
		errno = ENOMEM; /* 8 million redirections: far beyond any patch set */
		return -1;
	}
	if (cap == capacity)
		return 0;
	a = table_new(cap);
	b = table_new(cap);
	if (!a || !b) {
		free(a);
		free(b);
		errno = ENOMEM;
		return -1;
	}
	/* The old pair is deliberately not freed: see the comment at the top. */
	bytes_held += 2 * (sizeof(*a) + cap * sizeof(struct fentry_redirect));
	tables[0] = a;
	tables[1] = b;
	cur = 1; /* so that the next table written is tables[0] */
	capacity = cap;
	return 0;
}

static void insert(struct fentry_table *t, const struct fentry_redirect *r)
{
	size_t off = slot_offset(r->site_end, t->mask);
	struct fentry_redirect *s;

	for (;;) {
		s = (struct fentry_redirect *)((char *)t->slot + off);
		if (s->site_end == 0 || s->site_end == r->site_end)
			break;
		off = (off + SLOT_SIZE) & t->mask;
	}
	s->target = r->target;
	s->site_end = r->site_end;
}

FENTRY_HIDDEN int fentry_table_publish(const struct fentry_redirect *redirects, size_t n)
{
	struct fentry_table *next;
	uint64_t seq;

	if (n == 0) {
		/* Readers (__fentry__) that load NULL return at once; one still inside the
		 * table published last keeps a table nobody rewrites before the next publish. */
		atomic_store_explicit(&fentry_active_table, NULL, memory_order_release);
		return 0;
	}
	if (ensure_capacity(n) < 0)
		return -1;
	next = tables[cur ^ 1];

	/*
	 * Mark the table odd before touching a slot and even after the last one.  On
	 * x86-64 stores are not reordered with other stores, and the readers' loads are
	 * not reordered with other loads, so the release/acquire pairs below only need
	 * to stop the compiler; the reader's partner is the seq check in __fentry__.
	 *
	 * Who reads these stores: only a stale reader - a program thread in __fentry__
	 * that loaded this table's pointer one publish ago and is still looking into it
	 * (entry.S: the seq load before its lookup, the slot loads, the seq load after).
	 * Seeing any slot written here, it sees seq odd or changed, and starts again.
	 */
	seq = atomic_load_explicit(&next->seq, memory_order_relaxed); /* ours: no other writer */
	/* Odd: relaxed is enough, the fence below keeps the slot stores after it. */
	atomic_store_explicit(&next->seq, seq + 1, memory_order_relaxed);
	/* For the compiler (GCC emits it as a compiler barrier, no instruction): the plain
	 * slot stores below stay after the odd store; x86-64 keeps them in that order. */
	atomic_thread_fence(memory_order_release);
	memset(next->slot, 0, capacity * sizeof(struct fentry_redirect));
	for (size_t i = 0; i < n; i++)
		insert(next, &redirects[i]);
	/* Even again; release: every slot store above is visible before it.  Partner: the
	 * seq loads of entry.S's quick miss, .Lprobe, .Lhit and .Lmiss. */
	atomic_store_explicit(&next->seq, seq + 2, memory_order_release);

	/*
	 * The one store that switches every reader to the new set.  Release: the table's
	 * slots and its even seq are written before the pointer, so a thread that loads
	 * the new pointer (entry.S, `movq fentry_active_table(%rip)`) reads the new set.
	 * It also publishes what the loader wrote before calling here - a patch's
	 * FENTRY_REF slots and FENTRY_ORIGINAL pointers (loader.c: bind_references()),
	 * which the replacement reads once __fentry__ sent a program thread to it.
	 */
	atomic_store_explicit(&fentry_active_table, next, memory_order_release);
	cur ^= 1;
	return 0;
}

FENTRY_HIDDEN size_t fentry_table_memory(void)
{
	return bytes_held;
}
