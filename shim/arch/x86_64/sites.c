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
 *
 * Sites prepared at build time (fentry_build/build/prepare.py) are already in their
 * unpatched form in the file, and the program has no __mcount_loc: no list is read at
 * start.  A site is then recognised by its form where a validated patch says a function's
 * site is; the list the build wrote into the non-loaded section .fentry_sites is read
 * from the program's file only when the calls must come back (dispatch mode).
 */
#include <elf.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "arch/x86_64/sites.h"
#include "core/module.h"

extern const uintptr_t __start___mcount_loc[] __attribute__((weak, visibility("hidden")));
extern const uintptr_t __stop___mcount_loc[] __attribute__((weak, visibility("hidden")));
extern void __fentry__(void);
extern void fentry_probe_site(void); /* entry.S: a site that build-time preparation changes */

#define LEN6_BIT 0x80000000u /* in a list entry: the site is 6 bytes long */
#define OFFSET_MASK 0x7fffffffu

static uint32_t *list; /* sorted by offset */
static size_t nlist;
static uintptr_t base; /* the main program's load base */
static int prepared;   /* the sites were prepared at build time */
static unsigned ncode; /* the main program's executable segments */
static struct { uintptr_t start, end; } code[FENTRY_MODULE_SEGMENTS];

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

/*
 * Sort the list by offset.  It comes nearly sorted: gcc lists each object's sites in
 * order and the linker keeps objects in order, except the few functions it moves to
 * other output sections (main() in .text.startup: one descent in a generated program of
 * 50,000 functions, whose qsort() was a sixth of its start-up).  So each entry that
 * breaks the order is moved into place (bisection + memmove); many breaks: qsort().
 */
enum { FEW_DESCENTS = 64 };

static void sort_sites(void)
{
	size_t descents = 0;

	for (size_t i = 1; i < nlist; i++)
		descents += (list[i] & OFFSET_MASK) < (list[i - 1] & OFFSET_MASK);
	if (descents > FEW_DESCENTS) {
		qsort(list, nlist, sizeof(*list), by_offset);
		return;
	}
	for (size_t i = 1; i < nlist; i++) {
		uint32_t v = list[i];
		size_t lo = 0, hi = i;

		if ((v & OFFSET_MASK) >= (list[i - 1] & OFFSET_MASK))
			continue;
		/* [0, i) is sorted: the first entry above v. */
		while (lo < hi) {
			size_t mid = lo + (hi - lo) / 2;

			if ((list[mid] & OFFSET_MASK) <= (v & OFFSET_MASK))
				lo = mid + 1;
			else
				hi = mid;
		}
		memmove(&list[lo + 1], &list[lo], (i - lo) * sizeof(*list));
		list[lo] = v;
	}
}

static int in_code(uintptr_t addr, size_t len)
{
	for (unsigned i = 0; i < ncode; i++)
		if (addr >= code[i].start && addr + len <= code[i].end && addr + len > addr)
			return 1;
	return 0;
}

/* The length of the unpatched form at p (6 or 5), or 0. */
static unsigned unpatched_length(const uint8_t *p)
{
	if (p[0] == SITE_OP_ADDR32 && p[1] == SITE_OP_TEST && p[2] == SITE_REL8_6)
		return 6;
	if (p[0] == SITE_OP_TEST && p[1] == SITE_REL8_5)
		return 5;
	return 0;
}

/* The main program's code, and whether its sites were prepared; once. */
static int learn_program(char *err)
{
	static int learnt;
	struct fentry_module main_mod;

	if (learnt)
		return 0;
	if (fentry_module_main(&main_mod) < 0)
		return fentry_fail(err, "the main program's segments were not found");
	if (!fentry_module_contains_code(&main_mod, (uintptr_t)&__fentry__, 1))
		return fentry_fail(err, "the shim is not linked into the program (preloaded or "
				   "attached); jump mode needs the program built with dependency('fentry')");
	base = main_mod.base;
	ncode = main_mod.nexec;
	for (unsigned i = 0; i < ncode; i++) {
		code[i].start = main_mod.exec[i].start;
		code[i].end = main_mod.exec[i].end;
	}
	/* entry.S's probe site: a call, unless the build prepared every site. */
	prepared = unpatched_length((const uint8_t *)(uintptr_t)&fentry_probe_site) == 5;
	learnt = 1;
	return 0;
}

FENTRY_HIDDEN int fentry_sites_load(int direct_only, char *err)
{
	size_t n = (size_t)(__stop___mcount_loc - __start___mcount_loc);

	if (learn_program(err) < 0)
		return -1;
	if (prepared)
		return 0;
	if (__start___mcount_loc == NULL || n == 0)
		return fentry_fail(err, "the program has no fentry site list (build it with "
				   "dependency('fentry'), which adds -mrecord-mcount)");
	list = malloc(n * sizeof(*list));
	if (!list)
		return fentry_fail(err, "out of memory");
	nlist = 0;
	for (size_t i = 0; i < n; i++) {
		uintptr_t a = __start___mcount_loc[i];
		unsigned len;

		/* Only sites inside the program's own code, checked byte by byte. */
		if (!in_code(a, SITE_MAX_LEN) || a - base > OFFSET_MASK)
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
	sort_sites();
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

FENTRY_HIDDEN int fentry_sites_prepared(void)
{
	char ignored[FENTRY_ERR_MAX];

	return learn_program(ignored) == 0 && prepared;
}

FENTRY_HIDDEN void fentry_sites_code(uintptr_t *lo, uintptr_t *hi)
{
	*lo = ncode ? code[0].start : 0;
	*hi = ncode ? code[0].end : 0;
	for (unsigned i = 1; i < ncode; i++) {
		*lo = code[i].start < *lo ? code[i].start : *lo;
		*hi = code[i].end > *hi ? code[i].end : *hi;
	}
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

/* The length of the site starting at addr (known to have no record yet), or 0. */
static unsigned site_length(uintptr_t addr)
{
	long i;
	unsigned len;

	if (prepared) /* recognised by its form, inside the program's code */
		return in_code(addr, SITE_MAX_LEN) ? unpatched_length((const uint8_t *)addr) : 0;
	i = find(addr);
	if (i < 0)
		return 0;
	fentry_sites_addr((size_t)i, &len);
	return len;
}

FENTRY_HIDDEN struct fentry_site *fentry_site_at(uintptr_t addr)
{
	struct fentry_site **slot, *s;
	unsigned len;

	if (map_cap && *(slot = map_find(addr)))
		return *slot;
	len = site_length(addr);
	if (len == 0)
		return NULL;
	if ((2 * (map_n + 1) > map_cap && map_grow() < 0) || (s = new_record()) == NULL)
		return NULL;
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
		struct fentry_site **slot = map_cap ? map_find(site_end - len) : NULL;
		struct fentry_site *s;

		if (slot && *slot && (*slot)->len == len)
			return *oom = 0, *slot;
		if (site_length(site_end - len) != len)
			continue;
		s = fentry_site_at(site_end - len);
		*oom = s == NULL;
		return s;
	}
	*oom = 0;
	return NULL;
}

/*
 * The list a build wrote into .fentry_sites (prepare.py: "FENTSITE", version, count, then
 * count entries as our list's), read from the program's file, which must be the build
 * that runs (same build-id).  For dispatch mode only, which needs every call back.
 */
#define SITES_SECTION ".fentry_sites"
#define SITES_MAGIC "FENTSITE"

static int read_at(int fd, void *buf, size_t len, off_t off)
{
	return pread(fd, buf, len, off) == (ssize_t)len ? 0 : -1;
}

static int file_build_id_matches(int fd, const Elf64_Shdr *sh, const struct fentry_module *m)
{
	uint8_t note[sizeof(Elf64_Nhdr) + 4 + FENTRY_BUILD_ID_MAX];
	Elf64_Nhdr nh;

	if (sh->sh_size < sizeof(nh) + 4 || sh->sh_size > sizeof(note) ||
	    read_at(fd, note, sh->sh_size, (off_t)sh->sh_offset) < 0)
		return 0;
	memcpy(&nh, note, sizeof(nh));
	return nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && nh.n_descsz == m->build_id_len &&
	       sizeof(nh) + 4 + nh.n_descsz <= sh->sh_size &&
	       memcmp(note + sizeof(nh) + 4, m->build_id, m->build_id_len) == 0;
}

FENTRY_HIDDEN int fentry_sites_load_prepared(char *err)
{
	struct fentry_module m;
	Elf64_Ehdr eh;
	Elf64_Shdr *sh = NULL;
	char *names = NULL;
	int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC), rc = -1, id_ok = 0;
	uint32_t head[2];
	const Elf64_Shdr *found = NULL;

	if (fd < 0)
		return fentry_fail(err, "the program's file cannot be read (/proc/self/exe)");
	if (fentry_module_main(&m) < 0 || read_at(fd, &eh, sizeof(eh), 0) < 0 ||
	    eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shnum == 0 || eh.e_shnum > 4096 ||
	    eh.e_shstrndx >= eh.e_shnum) {
		fentry_fail(err, "the program's file is not the ELF file expected");
		goto out;
	}
	sh = calloc(eh.e_shnum, sizeof(*sh));
	if (!sh || read_at(fd, sh, eh.e_shnum * sizeof(*sh), (off_t)eh.e_shoff) < 0 ||
	    sh[eh.e_shstrndx].sh_size > (1u << 20) ||
	    (names = calloc(1, sh[eh.e_shstrndx].sh_size + 1)) == NULL ||
	    read_at(fd, names, sh[eh.e_shstrndx].sh_size, (off_t)sh[eh.e_shstrndx].sh_offset) < 0) {
		fentry_fail(err, "the program's section headers cannot be read");
		goto out;
	}
	for (unsigned i = 0; i < eh.e_shnum; i++) {
		const char *name = sh[i].sh_name < sh[eh.e_shstrndx].sh_size ? names + sh[i].sh_name : "";

		if (strcmp(name, SITES_SECTION) == 0)
			found = &sh[i];
		else if (sh[i].sh_type == SHT_NOTE && strcmp(name, ".note.gnu.build-id") == 0)
			id_ok = file_build_id_matches(fd, &sh[i], &m);
	}
	if (!id_ok) {
		fentry_fail(err, "the program's file on disk is not the build that runs (build-id)");
		goto out;
	}
	if (!found || found->sh_size < 16) {
		fentry_fail(err, "the program has no " SITES_SECTION " section (stripped?)");
		goto out;
	}
	{
		char magic[8];

		if (read_at(fd, magic, 8, (off_t)found->sh_offset) < 0 ||
		    memcmp(magic, SITES_MAGIC, 8) != 0 ||
		    read_at(fd, head, sizeof(head), (off_t)found->sh_offset + 8) < 0 || head[0] != 1 ||
		    (uint64_t)head[1] * 4 + 16 > found->sh_size) {
			fentry_fail(err, "the program's " SITES_SECTION " section is not one this shim reads");
			goto out;
		}
	}
	free(list);
	list = malloc((head[1] ? head[1] : 1) * sizeof(*list));
	if (!list || read_at(fd, list, head[1] * sizeof(*list), (off_t)found->sh_offset + 16) < 0) {
		fentry_fail(err, "out of memory");
		goto out;
	}
	nlist = head[1];
	for (size_t i = 0; i < nlist; i++) { /* only sites in the code, in their unpatched form */
		unsigned len = list[i] & LEN6_BIT ? 6 : 5;
		uintptr_t a = base + (list[i] & OFFSET_MASK);

		if ((i && (list[i] & OFFSET_MASK) <= (list[i - 1] & OFFSET_MASK)) ||
		    !in_code(a, len) || unpatched_length((const uint8_t *)a) != len) {
			fentry_fail(err, "the program's " SITES_SECTION " does not match its code");
			nlist = 0;
			goto out;
		}
	}
	rc = 0;
out:
	free(sh);
	free(names);
	close(fd);
	return rc;
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

FENTRY_HIDDEN int fentry_site_bytes_match(const uint8_t *a, const uint8_t *b, unsigned len)
{
	return (len == 5 || len == 6) && known_form(a, len) && known_form(b, len) &&
	       memcmp(a + site_tail_at(len), b + site_tail_at(len), SITE_TAIL_LEN) == 0;
}

FENTRY_HIDDEN int fentry_sites_unpatched_ending_at(uintptr_t site_end)
{
	if (!prepared)
		return 0;
	for (unsigned len = 6; len >= 5; len--)
		if (in_code(site_end - len, len) &&
		    unpatched_length((const uint8_t *)(site_end - len)) == len)
			return 1;
	return 0;
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
