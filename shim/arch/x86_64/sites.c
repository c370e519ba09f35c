/*
 * sites.c - the main program's fentry sites: the list gcc records in __mcount_loc, and
 * the records of the sites jump mode has rewritten.
 *
 * -mrecord-mcount (added by dependency('fentry')) makes gcc list the address of every
 * call to __fentry__ it emitted; the linker gathers the lists into one section bounded
 * by __start___mcount_loc / __stop___mcount_loc (arch/x86_64/entry.S keeps that section
 * writable, so it is relocated like data).  A recorded address is trusted only after
 * the bytes there are checked to be a call to this shim's __fentry__.
 *
 * The list is kept compact - 4 bytes a site: the offset from the program's load base,
 * with the top bit set for 6-byte sites - sorted, and searched by bisection.  Per-site
 * state (struct fentry_site, sites.h) exists only for the sites a patch has named, in a
 * hash table keyed by address; a process that patches nothing holds none.
 */
#include <stdlib.h>
#include <string.h>

#include "arch/x86_64/sites.h"
#include "core/module.h"

extern const uintptr_t __start___mcount_loc[] __attribute__((weak, visibility("hidden")));
extern const uintptr_t __stop___mcount_loc[] __attribute__((weak, visibility("hidden")));
extern void __fentry__(void);

#define LEN6_BIT 0x80000000u /* in a list entry: the site is 6 bytes long */
#define OFFSET_MASK 0x7fffffffu

static uint32_t *list; /* sorted by offset */
static size_t nlist;
static uintptr_t base; /* the main program's load base */

/* Records: allocated in chunks (they never move), found through an address hash. */
#define CHUNK 256
struct chunk {
	struct chunk *next;
	struct fentry_site site[CHUNK];
};
static struct chunk *chunks;
static size_t chunk_used = CHUNK; /* records used in the newest chunk */
static struct fentry_site **map;  /* open addressing, capacity a power of two */
static size_t map_cap, map_n, nchunks;

static int32_t rel32_at(const uint8_t *p)
{
	int32_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

/*
 * The length of the call to __fentry__ at p, or 0 if p holds something else:
 *   e8 <rel32>         call __fentry__                    (-fno-pie)
 *   67 e8 <rel32>      addr32 call __fentry__             (PIE, relaxed by the linker)
 *   ff 15 <rel32>      call *__fentry__@GOTPCREL(%rip)    (GOT slot holds __fentry__)
 */
static unsigned call_length(const uint8_t *p, int direct_only)
{
	uintptr_t fentry = (uintptr_t)&__fentry__;

	if (p[0] == SITE_OP_CALL && (uintptr_t)(p + 5) + (intptr_t)rel32_at(p + 1) == fentry)
		return 5;
	if (p[0] == SITE_OP_ADDR32 && p[1] == SITE_OP_CALL &&
	    (uintptr_t)(p + 6) + (intptr_t)rel32_at(p + 2) == fentry)
		return 6;
	if (!direct_only && p[0] == SITE_OP_CALL_IND && p[1] == SITE_MODRM_CALL_RIP) {
		const uintptr_t *slot = (const uintptr_t *)(p + 6 + rel32_at(p + 2));
		if (*slot == fentry)
			return 6;
	}
	return 0;
}

static int by_offset(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a & OFFSET_MASK, y = *(const uint32_t *)b & OFFSET_MASK;

	return x < y ? -1 : x > y;
}

FENTRY_HIDDEN int fentry_sites_load(int direct_only, char *err)
{
	size_t n = (size_t)(__stop___mcount_loc - __start___mcount_loc);
	struct fentry_module main_mod;

	if (fentry_module_main(&main_mod) < 0)
		return fentry_fail(err, "the main program's segments were not found");
	if (!fentry_module_contains_code(&main_mod, (uintptr_t)&__fentry__, 1))
		return fentry_fail(err, "the shim is not linked into the program (preloaded or "
				   "attached); jump mode needs the program built with dependency('fentry')");
	if (__start___mcount_loc == NULL || n == 0)
		return fentry_fail(err, "the program has no fentry site list (build it with "
				   "dependency('fentry'), which adds -mrecord-mcount)");
	base = main_mod.base;
	list = malloc(n * sizeof(*list));
	if (!list)
		return fentry_fail(err, "out of memory");
	nlist = 0;
	for (size_t i = 0; i < n; i++) {
		uintptr_t a = __start___mcount_loc[i];
		unsigned len;

		/* Only sites inside the program's own code, checked byte by byte. */
		if (!fentry_module_contains_code(&main_mod, a, SITE_MAX_LEN) || a - base > OFFSET_MASK)
			continue;
		len = call_length((const uint8_t *)a, direct_only);
		if (len == 0)
			continue;
		list[nlist++] = (uint32_t)(a - base) | (len == 6 ? LEN6_BIT : 0);
	}
	if (nlist == 0) {
		free(list);
		list = NULL;
		return fentry_fail(err, "no recorded site calls this shim's __fentry__");
	}
	/* gcc lists each object's sites in order and the linker keeps objects in order. */
	for (size_t i = 1; i < nlist; i++)
		if ((list[i] & OFFSET_MASK) < (list[i - 1] & OFFSET_MASK)) {
			qsort(list, nlist, sizeof(*list), by_offset);
			break;
		}
	return 0;
}

FENTRY_HIDDEN size_t fentry_sites_count(void)
{
	return nlist;
}

FENTRY_HIDDEN uintptr_t fentry_sites_addr(size_t i, unsigned *len)
{
	*len = list[i] & LEN6_BIT ? 6 : 5;
	return base + (list[i] & OFFSET_MASK);
}

/* The list entry of the site starting at addr, or -1. */
static long find(uintptr_t addr)
{
	size_t lo = 0, hi = nlist;
	uintptr_t off;

	if (addr < base || addr - base > OFFSET_MASK)
		return -1;
	off = addr - base;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		uintptr_t m = list[mid] & OFFSET_MASK;

		if (m == off)
			return (long)mid;
		if (m < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

/* Fibonacci hashing: the high bits of addr * 2^64/phi spread neighbouring sites. */
static size_t slot_of(uintptr_t addr, size_t cap)
{
	unsigned bits = (unsigned)__builtin_ctzl(cap);

	return (size_t)(((uint64_t)addr * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

static struct fentry_site **map_find(uintptr_t addr)
{
	size_t i = slot_of(addr, map_cap);

	while (map[i] && map[i]->addr != addr)
		i = (i + 1) & (map_cap - 1);
	return &map[i];
}

static int map_grow(void)
{
	size_t cap = map_cap ? 2 * map_cap : 64;
	struct fentry_site **old = map, **fresh = calloc(cap, sizeof(*fresh));
	size_t old_cap = map_cap;

	if (!fresh)
		return -1;
	map = fresh;
	map_cap = cap;
	for (size_t i = 0; i < old_cap; i++)
		if (old[i])
			*map_find(old[i]->addr) = old[i];
	free(old);
	return 0;
}

static struct fentry_site *new_record(void)
{
	if (chunk_used == CHUNK) {
		struct chunk *c = calloc(1, sizeof(*c));

		if (!c)
			return NULL;
		c->next = chunks;
		chunks = c;
		chunk_used = 0;
		nchunks++;
	}
	return &chunks->site[chunk_used++];
}

/* The unpatched form of a site of len bytes whose tail is `tail`. */
static void unpatched(unsigned len, const uint8_t *tail, uint8_t *out)
{
	if (len == 6)
		out[0] = SITE_OP_ADDR32;
	out[site_op_at(len)] = SITE_OP_TEST;
	out[site_op_at(len) + 1] = site_rel8(len);
	memcpy(out + site_tail_at(len), tail, SITE_TAIL_LEN);
}

FENTRY_HIDDEN struct fentry_site *fentry_site_at(uintptr_t addr)
{
	struct fentry_site **slot, *s;
	long i = find(addr);
	unsigned len;

	if (i < 0)
		return NULL;
	if (map_cap && *(slot = map_find(addr)))
		return *slot;
	if ((2 * (map_n + 1) > map_cap && map_grow() < 0) || (s = new_record()) == NULL)
		return NULL;
	fentry_sites_addr((size_t)i, &len);
	s->addr = addr;
	s->len = (uint8_t)len;
	/*
	 * Never written by the shim since start-up made it unpatched: it holds the unpatched
	 * form with the call's tail, which is what start-up wrote.  (If someone wrote over
	 * its first bytes since - a debugger's int3 - the record still says what the shim
	 * wrote, and fentry_poke_site_is_ours() sees the difference.)
	 */
	memcpy(s->orig_tail, (const uint8_t *)addr + site_tail_at(len), SITE_TAIL_LEN);
	unpatched(len, s->orig_tail, s->bytes);
	*map_find(addr) = s;
	map_n++;
	return s;
}

FENTRY_HIDDEN struct fentry_site *fentry_site_ending_at(uintptr_t site_end, int *oom)
{
	for (unsigned len = 6; len >= 5; len--) {
		long i = find(site_end - len);
		unsigned l;
		struct fentry_site *s;

		if (i < 0 || (fentry_sites_addr((size_t)i, &l), l != len))
			continue;
		s = fentry_site_at(site_end - len);
		*oom = s == NULL;
		return s;
	}
	*oom = 0;
	return NULL;
}

FENTRY_HIDDEN void fentry_site_unpatched_form(const uint8_t *call, unsigned len, uint8_t *out)
{
	unpatched(len, call + site_tail_at(len), out);
}

/* Is `b` (len bytes) one of the call forms, or the unpatched form? */
static int known_form(const uint8_t *b, unsigned len)
{
	unsigned op = site_op_at(len);

	if (len == 6 && b[0] == SITE_OP_CALL_IND && b[1] == SITE_MODRM_CALL_RIP)
		return 1;
	if (len == 6 && b[0] != SITE_OP_ADDR32)
		return 0;
	return b[op] == SITE_OP_CALL || (b[op] == SITE_OP_TEST && b[op + 1] == site_rel8(len));
}

FENTRY_HIDDEN int fentry_site_matches(const struct fentry_site *s, const uint8_t *bytes,
				      unsigned len)
{
	/* Every form keeps the last three bytes from the call: they identify the site. */
	return len == s->len && known_form(bytes, len) &&
	       memcmp(bytes + site_tail_at(len), s->orig_tail, SITE_TAIL_LEN) == 0;
}

FENTRY_HIDDEN size_t fentry_sites_memory(void)
{
	return nlist * sizeof(*list) + map_cap * sizeof(*map) + nchunks * sizeof(struct chunk);
}
