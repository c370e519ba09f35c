/*
 * sites.c - the main program's fentry sites, from the list gcc records in __mcount_loc.
 *
 * -mrecord-mcount (added by dependency('fentry')) makes gcc list the address of every
 * call to __fentry__ it emitted; the linker gathers the lists into one section bounded
 * by __start___mcount_loc / __stop___mcount_loc (arch/x86_64/entry.S keeps that section
 * writable, so it is relocated like data).  A recorded address is trusted only after
 * the bytes there are checked to be a call to this shim's __fentry__, in one of the
 * forms of fentry.h.  The table built here is immutable once jump mode starts: the
 * SIGTRAP handler of poke.c searches it without taking any lock.
 */
#include <stdlib.h>
#include <string.h>

#include "arch/x86_64/sites.h"
#include "core/module.h"

extern const uintptr_t __start___mcount_loc[] __attribute__((weak, visibility("hidden")));
extern const uintptr_t __stop___mcount_loc[] __attribute__((weak, visibility("hidden")));
extern void __fentry__(void);

static struct fentry_site *sites;
static size_t nsites;

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
static unsigned site_length(const uint8_t *p)
{
	uintptr_t fentry = (uintptr_t)&__fentry__;

	if (p[0] == 0xe8 && (uintptr_t)(p + 5) + (intptr_t)rel32_at(p + 1) == fentry)
		return 5;
	if (p[0] == 0x67 && p[1] == 0xe8 &&
	    (uintptr_t)(p + 6) + (intptr_t)rel32_at(p + 2) == fentry)
		return 6;
	if (p[0] == 0xff && p[1] == 0x15) {
		const uintptr_t *slot = (const uintptr_t *)(p + 6 + rel32_at(p + 2));
		if (*slot == fentry)
			return 6;
	}
	return 0;
}

static int by_addr(const void *a, const void *b)
{
	uintptr_t x = ((const struct fentry_site *)a)->addr;
	uintptr_t y = ((const struct fentry_site *)b)->addr;

	return x < y ? -1 : x > y;
}

FENTRY_HIDDEN int fentry_sites_load(char *err)
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
	sites = calloc(n, sizeof(*sites));
	if (!sites)
		return fentry_fail(err, "out of memory");
	for (size_t i = 0; i < n; i++) {
		uintptr_t a = __start___mcount_loc[i];
		unsigned len;

		/* Only sites inside the program's own code, checked byte by byte. */
		if (!fentry_module_contains_code(&main_mod, a, 6))
			continue;
		len = site_length((const uint8_t *)a);
		if (len == 0)
			continue;
		sites[nsites].addr = a;
		sites[nsites].len = (uint8_t)len;
		memcpy(sites[nsites].orig, (const void *)a, len);
		nsites++;
	}
	if (nsites == 0)
		return fentry_fail(err, "no recorded site calls this shim's __fentry__");
	qsort(sites, nsites, sizeof(*sites), by_addr);
	return 0;
}

/* Binary search; async-signal-safe (reads only the immutable addresses). */
FENTRY_HIDDEN struct fentry_site *fentry_site_at(uintptr_t addr)
{
	size_t lo = 0, hi = nsites;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (sites[mid].addr == addr)
			return &sites[mid];
		if (sites[mid].addr < addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

FENTRY_HIDDEN struct fentry_site *fentry_sites(size_t *n)
{
	*n = nsites;
	return sites;
}
