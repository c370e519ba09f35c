/*
 * siteforms.c - what the bytes of a patched site cost, measured apart from the shim:
 * the forms a jump-mode site could take to reach a replacement.  Not instrumented; the
 * site is a 6-byte NOP at the entry of site_fn() (as the shim leaves an unpatched PIE
 * site), rewritten here once, before the timed loop, with mprotect (single-threaded).
 *
 *   local   no site at all: call local_repl(), the replacement's code in the program
 *   near    site = e9 <rel32> 90 straight to local_repl() (a replacement within 2 GiB, at
 *           the residue its site reaches: a placed patch loaded near, what poke.c writes)
 *   near2   site = e9 <rel32> 90 to a trampoline e9 <rel32> to local_repl() (a patch loaded
 *           near but not placed)
 *   tramp   site = e9 <rel32> 90 to a trampoline ff 25 00000000 <target:8> that reaches
 *           tiny_direct() in a shared library (a patch poke.c could not load near)
 *   mem     site = ff 25 <rel32>: jmp *slot(%rip), the slot being the trampoline's
 *           8-byte target word: one indirect jump instead of a jump and an indirect jump
 *
 * Usage: siteforms N local|near|near2|tramp|mem.  Prints key=value pairs like micro.c.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "tiny.h"

#define TRAMP_AT (1 << 20) /* the trampoline page: 1 MiB after the code, as poke.c tries */
#define NEAR2_AT 512       /* near2's trampoline, in that page                        */

/* The unpatched site: the 6-byte NOP jump mode writes over `67 e8 <rel32>`. */
__attribute__((noinline, aligned(64))) long site_fn(long x)
{
	__asm__ volatile(".byte 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00");
	return TINY_BODY(x);
}

__attribute__((noinline, aligned(64))) long local_repl(long x)
{
	return TINY_REPL_BODY(x);
}

#define CHUNKS 10 /* as in micro.c: the figure is the fastest of CHUNKS timed chunks */

__attribute__((noinline)) static long run_site(long from, long to)
{
	long acc = 0;

	for (long i = from; i < to; i++)
		acc += site_fn(i);
	return acc;
}

__attribute__((noinline)) static long run_local(long from, long to)
{
	long acc = 0;

	for (long i = from; i < to; i++)
		acc += local_repl(i);
	return acc;
}

static int write_text(void *at, const void *bytes, size_t len)
{
	long page = sysconf(_SC_PAGESIZE);
	uintptr_t start = (uintptr_t)at & ~(uintptr_t)(page - 1);
	size_t span = (size_t)((uintptr_t)at + len - start);

	if (mprotect((void *)start, span, PROT_READ | PROT_WRITE | PROT_EXEC) < 0)
		return -1;
	memcpy(at, bytes, len);
	return mprotect((void *)start, span, PROT_READ | PROT_EXEC);
}

static int32_t rel32(uintptr_t from_end, uintptr_t to)
{
	return (int32_t)((intptr_t)to - (intptr_t)from_end);
}

static double now_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long n, sum, want, warm;
	long (*run)(long, long) = run_site;
	const char *form;
	uint8_t site[6], tramp[16] = {0xff, 0x25, 0, 0, 0, 0};
	uintptr_t far = (uintptr_t)&tiny_direct, fn = (uintptr_t)&site_fn;
	uint8_t *page;
	int32_t r;
	double t0, t1, w0, w1, best = 1e300, total = 0;

	if (argc < 3 || (n = atol(argv[1])) <= 0) {
		fprintf(stderr, "usage: siteforms N local|near|near2|tramp|mem\n");
		return 2;
	}
	form = argv[2];
	page = mmap((void *)((fn + TRAMP_AT) & ~(uintptr_t)4095), 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (page == MAP_FAILED) {
		perror("siteforms: trampoline page");
		return 2;
	}
	memcpy(tramp + 6, &far, 8);
	memcpy(page, tramp, sizeof(tramp));
	/* near2's trampoline, further on in the same page: e9 <rel32> to local_repl(). */
	r = rel32((uintptr_t)page + NEAR2_AT + 5, (uintptr_t)&local_repl);
	page[NEAR2_AT] = 0xe9;
	memcpy(page + NEAR2_AT + 1, &r, 4);
	mprotect(page, 4096, PROT_READ | PROT_EXEC);

	if (strcmp(form, "local") == 0) {
		run = run_local;
	} else if (strcmp(form, "near") == 0 || strcmp(form, "near2") == 0 ||
		   strcmp(form, "tramp") == 0) {
		r = rel32(fn + 5, strcmp(form, "near") == 0    ? (uintptr_t)&local_repl
				  : strcmp(form, "near2") == 0 ? (uintptr_t)page + NEAR2_AT
							       : (uintptr_t)page);
		site[0] = 0xe9;
		memcpy(site + 1, &r, 4);
		site[5] = 0x90;
	} else if (strcmp(form, "mem") == 0) {
		r = rel32(fn + 6, (uintptr_t)page + 6);
		site[0] = 0xff;
		site[1] = 0x25;
		memcpy(site + 2, &r, 4);
	} else {
		fprintf(stderr, "siteforms: unknown form %s\n", form);
		return 2;
	}
	if (run == run_site && write_text((void *)fn, site, sizeof(site)) < 0) {
		perror("siteforms: mprotect");
		return 2;
	}
	warm = n / 20 > 1000 ? n / 20 : 1000;
	run(0, warm);
	sum = 0;
	w0 = now_ns(CLOCK_MONOTONIC);
	for (long c = 0; c < CHUNKS; c++) {
		long from = c * (n / CHUNKS), to = c == CHUNKS - 1 ? n : from + n / CHUNKS;

		t0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		sum += run(from, to);
		t1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		total += t1 - t0;
		if (to > from && (t1 - t0) / (double)(to - from) < best)
			best = (t1 - t0) / (double)(to - from);
	}
	w1 = now_ns(CLOCK_MONOTONIC);
	want = 3 * (n * (n - 1) / 2) + 2 * n;
	printf("mode=%s calls=%ld ns_per_call=%.4f cpu_ns_per_call=%.4f wall_ns_per_call=%.4f "
	       "sum_ok=%d\n", form, n, best, total / n, (w1 - w0) / n, sum == want);
	return sum == want ? 0 : 1;
}
