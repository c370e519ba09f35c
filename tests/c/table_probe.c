/*
 * table_probe.c - how far __fentry__ probes in the patch table (shim/core/table.c) when K
 * of N neighbouring functions are patched: publishes the K keys, then walks the table the
 * way entry.S does (table_layout.h) for every one of the N keys.
 *
 * Usage: table_probe N K SPACING adjacent|spread
 * Keys are site_end addresses of functions SPACING bytes apart, as in a real program.
 * Prints "hit_p99=.. hit_max=.. miss_p99=.. miss_max=.. wrong=.." (probes = slots read).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arch/x86_64/table_layout.h"
#include "core/table.h"

extern void *_Atomic fentry_active_table;

static int cmp(const void *a, const void *b)
{
	unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;

	return x < y ? -1 : x > y;
}

/* Probes to find key (1 = its home slot); *found = the target, or 0. */
static unsigned probe(const char *t, uint64_t key, uint64_t *found)
{
	uint64_t mask = *(const uint64_t *)(t + TABLE_MASK);
	uint64_t off = ((key * (uint64_t)TABLE_HASH_MUL) >> TABLE_HASH_SHIFT) & mask;

	for (unsigned n = 1;; n++) {
		uint64_t k = *(const uint64_t *)(t + TABLE_SLOTS + off + SLOT_KEY);

		if (k == key || k == 0) {
			*found = k ? *(const uint64_t *)(t + TABLE_SLOTS + off + SLOT_TARGET) : 0;
			return n;
		}
		off = (off + SLOT_SIZE) & mask;
	}
}

int main(int argc, char **argv)
{
	long n = argc > 4 ? atol(argv[1]) : 0, k = argc > 4 ? atol(argv[2]) : 0;
	long spacing = argc > 4 ? atol(argv[3]) : 0;
	int spread = argc > 4 && strcmp(argv[4], "spread") == 0;
	struct fentry_redirect *r = calloc((size_t)k, sizeof(*r));
	unsigned *hit = calloc((size_t)k, sizeof(unsigned)), *miss = calloc((size_t)n, sizeof(unsigned));
	char *patched = calloc((size_t)n, 1);
	long nhit = 0, nmiss = 0, wrong = 0;
	const uint64_t base = 0x555555554000u + 0x1000u, site_end = 6;

	if (n <= 0 || k <= 0 || k > n || spacing <= 0 || !r || !hit || !miss || !patched)
		return 2;
	for (long i = 0; i < k; i++) {
		long f = spread ? i * n / k : i;

		patched[f] = 1;
		r[i].site_end = base + (uint64_t)f * (uint64_t)spacing + site_end;
		r[i].target = 0x7f0000000000u + (uint64_t)f;
	}
	if (fentry_table_publish(r, (size_t)k) < 0)
		return 3;
	for (long f = 0; f < n; f++) {
		uint64_t key = base + (uint64_t)f * (uint64_t)spacing + site_end, target;
		unsigned p = probe(fentry_active_table, key, &target);

		if (patched[f]) {
			hit[nhit++] = p;
			wrong += target != 0x7f0000000000u + (uint64_t)f;
		} else {
			miss[nmiss++] = p;
			wrong += target != 0;
		}
	}
	qsort(hit, (size_t)nhit, sizeof(unsigned), cmp);
	qsort(miss, (size_t)nmiss, sizeof(unsigned), cmp);
	printf("hit_p99=%u hit_max=%u miss_p99=%u miss_max=%u wrong=%ld\n", hit[nhit * 99 / 100],
	       hit[nhit - 1], nmiss ? miss[nmiss * 99 / 100] : 0, nmiss ? miss[nmiss - 1] : 0, wrong);
	return 0;
}
