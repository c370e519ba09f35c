/*
 * poke.c - rewriting fentry sites in live code, with no signal involved: the spin
 * protocol, trampolines, and writing many sites at once.
 *
 * Writes go through /proc/self/mem, which writes read-only text without mprotect():
 * the code is never writable and executable at once (no W^X window, works under MDWE).
 *
 * The site forms are drawn in sites.h: unpatched (test), spin (a jump to itself) and
 * patched (jmp rel32) differ only in the opcode byte, and the operand byte after it is
 * the spin's rel8 in all three.  Changing the opcode is a one-byte write, which another
 * core sees whole (old or new byte); every form is a complete, harmless instruction
 * whatever the bytes after the operand hold, except `jmp rel32` - so those bytes are
 * only ever changed while the site spins (or tests), and a core sync separates that
 * from the opcode flip.
 *
 * A batch (any mix of unpatched -> patched, patched -> unpatched, patched(A) ->
 * patched(B)) takes three steps:
 *
 *   1. flip every site's opcode to the spin (eb);  sync cores
 *   2. write each site's new tail (rel32's upper three bytes);  sync cores
 *   3. flip every site's opcode to its final value (e9 or a9);  sync cores
 *
 * "sync cores" is membarrier(PRIVATE_EXPEDITED_SYNC_CORE): every thread of the process
 * executes a serialising instruction before it runs user code again, so none still runs
 * bytes it fetched before a write.  A thread that reaches a site of the batch between 1
 * and 3 spins there until the site's step 3, then runs the new instruction.  So once one
 * site of the batch runs its new code, every other site of the batch runs new code or
 * spins: no thread runs new f and then old g, and a patched function never runs neither
 * version (A -> B goes through the spin, never through the original).  No signal is
 * sent, so threads that block every signal, or run a handler, are as safe as any.
 *
 * One site alone needs less: unpatched -> patched writes the tail while the test ignores
 * it (2 and 3 only); patched -> unpatched is the opcode flip alone (3).
 *
 * The writing thread must not meet a spinning site itself: it blocks every signal for
 * the batch (a handler could call a patched function), and calls nothing instrumented
 * (no malloc between step 1 and step 3: a program may bring its own malloc).
 *
 * Trampolines.  A patched site's rel32 must keep the operand byte as its low byte, so
 * its target must lie at site_end + 0x..fd (6-byte sites) or 0x..fe (5-byte): a
 * trampoline placed at that address modulo 256, in pages mapped within +-2 GiB of the
 * program.  It is `e9 <rel32>` (5 bytes) when the replacement is within reach of it,
 * else `ff 25 00 00 00 00 <target:8>` (14 bytes: jmp *0(%rip), then the address).
 * Trampolines are immutable once written, one per (target, residue), reused, and
 * reclaimed only after an unload proved no thread can run them.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "arch/x86_64/poke.h"

/*
 * The state below is written at start (before the control thread exists: pthread_create()
 * orders it), in a fork child (one thread), or by callers holding the loader's lock;
 * fentry_poke_stats() is read under that lock (fentry_costs_snapshot()).
 */
static int mem_fd = -1; /* /proc/self/mem of this process */
static struct fentry_poke_stats stats;
/* Why live code cannot be rewritten any more ("" while it can): set when a call that worked
 * at start is refused later, e.g. by a seccomp filter the program installed (status shows it).
 * Written by fentry_poke_batch() under the loader's lock; read only under it, through
 * fentry_rewrite_error() (loader.c: fentry_loader_rewrite_error() copies it). */
static char rewrite_error[200];

/*
 * The barrier of every code write: each thread of the process executes a serialising
 * instruction before it runs user code again, and passes a full memory barrier.  Partner:
 * the instruction fetch of every thread that runs a site or trampoline written before it
 * (no load in our code: the processor's own fetch), and the loads of data written before
 * it (an indirect trampoline's 8-byte target, which its `jmp *0(%rip)` reads; a patch's
 * FENTRY_REF slots, loader.c: bind_references()).
 */
static int sync_cores(void)
{
	return (int)syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
}

/*
 * Code bytes other threads execute.  Another core sees the old or the new value of each
 * byte; which bytes change when, and the sync_cores() after each step that makes every
 * core fetch them anew, are run_protocol()'s (see the top).
 */
static int write_code(uintptr_t addr, const void *bytes, size_t len)
{
	return pwrite(mem_fd, bytes, len, (off_t)addr) == (ssize_t)len ? 0 : -1;
}

/*
 * A refusal of a call that worked at start.  The usual cause is a seccomp filter the
 * program installed after start (sandboxing once initialised is a common design), which
 * /proc/self/status shows; it cannot be lifted, so the reason stays for status to report.
 */
static int rewrite_refused(char *err, const char *call, int e)
{
	char line[128];
	const char *cause = "";
	int refused = e == EPERM || e == EACCES || e == ENOSYS;
	FILE *f;

	if (refused) {
		f = fopen("/proc/self/status", "re");
		while (f && fgets(line, sizeof line, f))
			if (strncmp(line, "Seccomp:", 8) == 0)
				cause = atoi(line + 8) == 2   ? " by a seccomp filter of this process"
					: atoi(line + 8) == 1 ? " by seccomp strict mode"
							      : "";
		if (f)
			fclose(f);
		snprintf(rewrite_error, sizeof rewrite_error, "%s is refused%s (%s)", call, cause,
			 strerror(e));
	}
	return fentry_fail(err, "cannot rewrite code in this process: %s %s%s (%s); nothing "
			   "changed (patches in effect stay; FENTRY_MODE=dispatch never rewrites code)",
			   call, refused ? "is refused" : "fails", cause, strerror(e));
}

/*
 * Before a batch writes anything: are the two calls it makes still allowed?  Both probes
 * change nothing and cost no cross-core work: membarrier's QUERY and a zero-length pwrite
 * reach a seccomp filter (it sees the system call, not what it would do) and the
 * descriptor checks, so a batch never finds out half-way that it cannot go on.
 */
static int rewrite_allowed(char *err)
{
	static const uint8_t none[1];

	if (syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) < 0)
		return rewrite_refused(err, "membarrier", errno);
	if (pwrite(mem_fd, none, 0, 0) < 0)
		return rewrite_refused(err, "pwrite to /proc/self/mem", errno);
	rewrite_error[0] = '\0';
	return 0;
}

FENTRY_HIDDEN const char *fentry_poke_rewrite_error(void)
{
	return rewrite_error[0] ? rewrite_error : NULL;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int open_mem(void)
{
	if (mem_fd >= 0)
		close(mem_fd);
	mem_fd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
	return mem_fd < 0 ? -1 : 0;
}

FENTRY_HIDDEN int fentry_poke_init(char *err)
{
	long cmds = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);

	if (cmds < 0 || !(cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE))
		return fentry_fail(err, "membarrier(SYNC_CORE) is not available, so live code cannot be "
				   "rewritten safely");
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) < 0)
		return fentry_fail(err, "membarrier registration failed: %s", strerror(errno));
	if (open_mem() < 0)
		return fentry_fail(err, "/proc/self/mem cannot be opened for writing: %s",
				   strerror(errno));
	return 0;
}

/* After fork(): our /proc/self/mem descriptor still names the parent's memory. */
FENTRY_HIDDEN void fentry_poke_after_fork_child(void)
{
	if (mem_fd < 0)
		return;
	syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
	if (open_mem() < 0)
		fprintf(stderr, "fentry: child %d cannot reopen /proc/self/mem; patching "
			"in this process will fail\n", (int)getpid());
}

/* ---- writing many sites: one pwrite per run of nearby sites ---------------------------- */

/* One site in a batch: what memory holds, what this step writes, what it ends as. */
struct site_op {
	uintptr_t addr;
	struct fentry_site *s;       /* its record (NULL at start-up)                       */
	uintptr_t target;            /* what it jumps to in the end; 0: unpatched           */
	uint8_t len;
	uint8_t first;               /* the first byte we may write: a 6-byte site's 67 is
	                                never written by a batch (see holds())               */
	uint8_t lost;                /* it held bytes we did not write: never touched again   */
	uint8_t now[SITE_MAX_LEN];   /* what the site holds (what we wrote last)              */
	uint8_t next[SITE_MAX_LEN];  /* this step's bytes                                    */
	uint8_t to[SITE_MAX_LEN];    /* the bytes it should end with                         */
};

enum {
	RUN_MAX = 64 * 1024, /* bytes one pwrite covers at most                            */
	RUN_GAP = 2048,      /* unchanged bytes worth rewriting to save a system call       */
	FEW_SITES = 4,       /* up to this many sites changed in a step: one pwrite each,
	                        touching only their changed bytes                          */
};

/* a[from..to) == b[from..to).  A loop, not memcmp(): a batch compares a few bytes of each
 * site a dozen times, and the library call was a tenth of a 10,000-site apply (perf). */
static int bytes_equal(const uint8_t *a, const uint8_t *b, unsigned from, unsigned to)
{
	for (unsigned i = from; i < to; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

/* a[first..len) == b[first..len) */
static int same(const struct site_op *o, const uint8_t *a, const uint8_t *b)
{
	return bytes_equal(a, b, o->first, o->len);
}

static int changed(const struct site_op *o)
{
	return !o->lost && !same(o, o->now, o->next);
}

/*
 * Does the site (its bytes at p) hold what we last wrote?  Strictly: every byte.  When
 * putting sites back after a failure, a 6-byte site's first byte is left out: it is 67 in
 * every form a batch writes, and a uprobe or breakpoint put there meanwhile (an int3)
 * runs the instruction from elsewhere and writes 67 back later - so the bytes after it
 * must not be left spinning.
 */
static int holds(const struct site_op *o, const uint8_t *p, int strict)
{
	return same(o, p, o->now) && (!strict || bytes_equal(p, o->now, 0, o->first));
}

/* A site's own changed bytes, [*from, *to). */
static void changed_span(const struct site_op *o, unsigned *from, unsigned *to)
{
	unsigned a = o->first, b = o->len;

	while (a < b && o->now[a] == o->next[a])
		a++;
	while (b > a && o->now[b - 1] == o->next[b - 1])
		b--;
	*from = a;
	*to = b;
}

static void take_next(struct site_op *o)
{
	memcpy(o->now + o->first, o->next + o->first, o->len - o->first);
}

/*
 * After a failed or short write the sites hold what we wrote, or part of it (only we
 * write there: sites that held anything else were left alone); the rollback starts from
 * what memory holds.
 */
static void written_anyway(struct site_op *ops, size_t n)
{
	int saved = errno;

	for (size_t k = 0; k < n; k++)
		if (changed(&ops[k]))
			memcpy(ops[k].now + ops[k].first, (const uint8_t *)ops[k].addr + ops[k].first,
			       ops[k].len - ops[k].first);
	errno = saved;
}

/*
 * Write every op's `next` where it differs from `now`.  Immediately before writing, each
 * site's bytes are compared with `now`: a site that holds anything else (someone wrote
 * there since we did) is left alone - `strict`: the step stops with *mismatch set;
 * otherwise it is marked lost and the others go on.  ops are sorted by address.  `buf`
 * holds RUN_MAX bytes (or is NULL: one pwrite per site).  Returns -1 on an
 * I/O error or a strict mismatch; `now` follows what was written.
 */
static int write_step(struct site_op *ops, size_t n, uint8_t *buf, int strict, int *mismatch)
{
	size_t nchanged = 0, i = 0;

	*mismatch = 0;
	for (size_t k = 0; k < n; k++)
		nchanged += (size_t)changed(&ops[k]);
	if (nchanged == 0)
		return 0;
	if (nchanged <= FEW_SITES || buf == NULL) {
		for (size_t k = 0; k < n; k++) {
			struct site_op *o = &ops[k];
			unsigned a, b;

			if (!changed(o))
				continue;
			if (!holds(o, (const uint8_t *)o->addr, strict)) {
				if (strict)
					return *mismatch = 1, -1;
				o->lost = 1;
				continue;
			}
			changed_span(o, &a, &b);
			if (write_code(o->addr + a, o->next + a, b - a) < 0) {
				written_anyway(o, 1);
				return -1;
			}
			take_next(o);
		}
		return 0;
	}
	while (i < n) {
		uintptr_t start, end;
		size_t j;

		if (!changed(&ops[i])) {
			i++;
			continue;
		}
		start = ops[i].addr;
		end = start + ops[i].len;
		for (j = i + 1; j < n; j++) {
			if (ops[j].addr + ops[j].len - start > RUN_MAX)
				break;
			if (!changed(&ops[j]))
				continue;
			if (ops[j].addr > end + RUN_GAP)
				break;
			end = ops[j].addr + ops[j].len;
		}
		/* [start, end) covers ops i..j-1; unchanged bytes are written with their value. */
		memcpy(buf, (const void *)start, end - start);
		for (size_t k = i; k < j; k++) {
			struct site_op *o = &ops[k];
			uint8_t *at = buf + (o->addr - start);

			if (!changed(o))
				continue;
			if (!holds(o, at, strict)) {
				if (strict)
					return *mismatch = 1, -1;
				o->lost = 1;
				continue;
			}
			memcpy(at + o->first, o->next + o->first, o->len - o->first);
		}
		if (write_code(start, buf, end - start) < 0) {
			written_anyway(&ops[i], j - i);
			return -1;
		}
		for (size_t k = i; k < j; k++)
			if (changed(&ops[k]))
				take_next(&ops[k]);
		i = j;
	}
	return 0;
}

/* For each op still to change: next = now with `f` applied; the others: next = now. */
static size_t plan(struct site_op *ops, size_t n, void (*f)(struct site_op *))
{
	size_t active = 0;

	for (size_t k = 0; k < n; k++) {
		struct site_op *o = &ops[k];

		memcpy(o->next, o->now, o->len);
		if (!o->lost && !same(o, o->now, o->to)) {
			f(o);
			active++;
		}
	}
	return active;
}

static void to_spin(struct site_op *o)
{
	o->next[site_op_at(o->len)] = SITE_OP_SPIN;
}

static void to_tail(struct site_op *o)
{
	memcpy(o->next + site_tail_at(o->len), o->to + site_tail_at(o->len), SITE_TAIL_LEN);
}

static int tails_change(const struct site_op *ops, size_t n)
{
	for (size_t k = 0; k < n; k++)
		if (!ops[k].lost && memcmp(ops[k].now + site_tail_at(ops[k].len),
					   ops[k].to + site_tail_at(ops[k].len), SITE_TAIL_LEN) != 0)
			return 1;
	return 0;
}

static void to_final(struct site_op *o)
{
	memcpy(o->next, o->to, o->len);
}

/*
 * Take every op from `now` to `to` with the three steps (or the one-site shortcuts).
 * `strict`: stop at the first site found holding someone else's bytes, or at a refused
 * sync.  Putting sites back after a failure (not strict) goes on when a sync is refused:
 * the bytes still reach every core, only later - a site left spinning would be worse.
 * -1 on failure
 * with *what naming the failing call; the ops' `now` say where each site stands.
 */
static int run_protocol(struct site_op *ops, size_t n, uint8_t *buf, int strict,
			int *mismatch, const char **what)
{
	size_t active = plan(ops, n, to_final);
	struct site_op *one = NULL;

	*mismatch = 0;
	if (active == 0)
		return 0;
	if (active == 1) {
		for (size_t k = 0; k < n && !one; k++)
			if (!ops[k].lost && !same(&ops[k], ops[k].now, ops[k].to))
				one = &ops[k];
	}
	/*
	 * One site from unpatched: its tail is dead while the opcode is the test, so write
	 * it, sync, flip.    67 a9 fd t1 t2 t3  ->  67 a9 fd r1 r2 r3  ->  67 e9 fd r1 r2 r3
	 */
	if (one && one->now[site_op_at(one->len)] == SITE_OP_TEST) {
		plan(ops, n, to_tail);
		if (write_step(ops, n, buf, strict, mismatch) < 0)
			return *what = "pwrite", -1;
		if (sync_cores() < 0 && strict)
			return *what = "membarrier", -1;
	}
	/*
	 * One site to unpatched (its tail stays): the opcode flip alone.
	 *   67 e9 fd r1 r2 r3  ->  67 a9 fd r1 r2 r3
	 * Otherwise, every site first spins:  67 e9 fd r1 r2 r3  ->  67 eb fd r1 r2 r3
	 * then gets its new tail:             67 eb fd r1 r2 r3  ->  67 eb fd s1 s2 s3
	 */
	if (!one || (one->now[site_op_at(one->len)] != SITE_OP_TEST &&
		     memcmp(one->now + site_tail_at(one->len), one->to + site_tail_at(one->len),
			    SITE_TAIL_LEN) != 0)) {
		plan(ops, n, to_spin);
		if (write_step(ops, n, buf, strict, mismatch) < 0)
			return *what = "pwrite", -1;
		if (sync_cores() < 0 && strict)
			return *what = "membarrier", -1;
		if (tails_change(ops, n)) {
			plan(ops, n, to_tail);
			if (write_step(ops, n, buf, strict, mismatch) < 0)
				return *what = "pwrite", -1;
			if (sync_cores() < 0 && strict)
				return *what = "membarrier", -1;
		}
	}
	/* Last, the opcodes:  67 eb fd s1 s2 s3  ->  67 e9 fd s1 s2 s3  (or 67 a9 ...).
	 * After this sync no thread executes a site's old instruction any more (one that
	 * spins there takes the new one). */
	plan(ops, n, to_final);
	if (write_step(ops, n, buf, strict, mismatch) < 0)
		return *what = "pwrite", -1;
	if (sync_cores() < 0 && strict)
		return *what = "membarrier", -1;
	return 0;
}

/* ---- trampolines ---------------------------------------------------------------------- */

#define TRAMP_AREA (16 * 1024) /* mapped at once near the program           */
#define TRAMP_ROW 256          /* addresses repeat their residue every row   */
#define TRAMP_ROWS (TRAMP_AREA / TRAMP_ROW)
#define TRAMP_DIRECT_LEN 5     /* e9 <rel32>                                 */
#define TRAMP_INDIRECT_LEN 14  /* ff 25 00000000 <target:8>                  */
#define OP_JMP_REL32 0xe9
static const uint8_t JMP_RIP_INDIRECT[6] = { 0xff, 0x25, 0x00, 0x00, 0x00, 0x00 };

struct tramp_area {
	struct tramp_area *next;
	uintptr_t base;
	uint8_t hint[TRAMP_ROW];             /* per residue: rows below are taken there */
	uint64_t used[TRAMP_AREA / 64];      /* one bit per byte                         */
};

struct tramp {
	uintptr_t target; /* 0: empty slot */
	uintptr_t addr;   /* the trampoline; its residue is addr % TRAMP_ROW */
	uint8_t len;
	uint8_t written;  /* its bytes are in place: no site may jump there before */
};

/*
 * Trampolines made by one batch, written together by write_trampolines() before any site
 * of the batch changes: one pwrite per run of nearby ones instead of one each (10,000 new
 * trampolines cost 10,000 system calls, a third of a jump-mode first apply).
 */
struct tramp_write {
	uintptr_t target;
	uintptr_t at;
	uint8_t len;
};

static struct tramp_write *pending;
static size_t npending, pending_cap;

static struct tramp_area *areas;
static size_t nareas;
static struct tramp *tmap; /* (target, residue) -> trampoline; open addressing */
static size_t tmap_cap, tmap_n;

static size_t tramp_slot(uintptr_t target, unsigned residue, size_t cap)
{
	unsigned bits = (unsigned)__builtin_ctzl(cap);

	return (size_t)(((uint64_t)(target ^ ((uintptr_t)residue << 48)) * 0x9E3779B97F4A7C15ull) >>
			(64 - bits));
}

static struct tramp *tmap_find(uintptr_t target, unsigned residue)
{
	size_t i = tramp_slot(target, residue, tmap_cap);

	while (tmap[i].target && !(tmap[i].target == target && tmap[i].addr % TRAMP_ROW == residue))
		i = (i + 1) & (tmap_cap - 1);
	return &tmap[i];
}

/* Rebuild at `cap` slots, dropping the entries whose target lies in [drop_lo, drop_hi). */
static int tmap_rebuild(size_t cap, uintptr_t drop_lo, uintptr_t drop_hi)
{
	struct tramp *old = tmap, *fresh = calloc(cap, sizeof(*fresh));
	size_t old_cap = tmap_cap;

	if (!fresh)
		return -1;
	tmap = fresh;
	tmap_cap = cap;
	tmap_n = 0;
	for (size_t i = 0; i < old_cap; i++)
		if (old[i].target && !(old[i].target >= drop_lo && old[i].target < drop_hi)) {
			*tmap_find(old[i].target, (unsigned)(old[i].addr % TRAMP_ROW)) = old[i];
			tmap_n++;
		}
	free(old);
	return 0;
}

static int bits_free(const struct tramp_area *a, size_t off, size_t len)
{
	for (size_t b = off; b < off + len; b++)
		if (a->used[b / 64] & (1ull << (b % 64)))
			return 0;
	return 1;
}

static void bits_set(struct tramp_area *a, size_t off, size_t len, int on)
{
	for (size_t b = off; b < off + len; b++) {
		if (on)
			a->used[b / 64] |= 1ull << (b % 64);
		else
			a->used[b / 64] &= ~(1ull << (b % 64));
	}
}

/* Map a new area within reach of a rel32 jump from every site. */
static struct tramp_area *new_area(void)
{
	uintptr_t lo, hi;
	const uintptr_t step = 1u << 20, reach = (uintptr_t)1 << 30;
	struct tramp_area *a = calloc(1, sizeof(*a));

	fentry_sites_code(&lo, &hi);
	if (!a || hi == 0)
		return free(a), NULL;
	/* Try 1 MiB steps above the code, then below it, up to 1 GiB away. */
	for (int dir = 0; dir < 2; dir++)
		for (uintptr_t d = step; d < reach; d += step) {
			uintptr_t hint = dir == 0 ? ((hi + d) & ~(uintptr_t)(TRAMP_AREA - 1))
						  : ((lo - d) & ~(uintptr_t)(TRAMP_AREA - 1));
			void *p;

			if (dir == 1 && lo < d)
				break;
			p = mmap((void *)hint, TRAMP_AREA, PROT_READ | PROT_EXEC,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
			if (p == MAP_FAILED && errno != EEXIST) {
				/* The flag refused (a seccomp filter, a kernel before 4.17): the
				 * address as a hint, kept only if the kernel took it. */
				p = mmap((void *)hint, TRAMP_AREA, PROT_READ | PROT_EXEC,
					 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			}
			if (p != MAP_FAILED && (uintptr_t)p != hint) { /* a hint not taken */
				munmap(p, TRAMP_AREA);
				p = MAP_FAILED;
			}
			if (p == MAP_FAILED)
				continue;
			a->base = (uintptr_t)p;
			a->next = areas;
			areas = a;
			nareas++;
			return a;
		}
	free(a);
	return NULL;
}

/* Room for len bytes at an address = residue (mod 256), or 0. */
static uintptr_t tramp_alloc(unsigned residue, size_t len)
{
	for (int fresh = 0; fresh < 2; fresh++) {
		for (struct tramp_area *a = areas; a; a = a->next)
			for (size_t row = a->hint[residue]; row < TRAMP_ROWS; row++) {
				size_t off = row * TRAMP_ROW + residue;

				if (off + len > TRAMP_AREA)
					break;
				if (!bits_free(a, off, 1)) {
					if (row == a->hint[residue])
						a->hint[residue] = (uint8_t)(row + 1 < TRAMP_ROWS ? row + 1 : row);
					continue;
				}
				if (!bits_free(a, off, len))
					continue;
				bits_set(a, off, len, 1);
				return a->base + off;
			}
		if (fresh || new_area() == NULL)
			break;
	}
	return 0;
}

/* Give the bytes back; each freed byte may again start a trampoline of its residue. */
static void tramp_free(uintptr_t at, size_t len)
{
	for (struct tramp_area *a = areas; a; a = a->next)
		if (at >= a->base && at < a->base + TRAMP_AREA) {
			size_t off = at - a->base;

			bits_set(a, off, len, 0);
			for (size_t b = off; b < off + len; b++)
				if (a->hint[b % TRAMP_ROW] > b / TRAMP_ROW)
					a->hint[b % TRAMP_ROW] = (uint8_t)(b / TRAMP_ROW);
		}
}

/* A staged trampoline's bytes (the jump's form is its length). */
static void tramp_code(const struct tramp_write *w, uint8_t *code)
{
	if (w->len == TRAMP_DIRECT_LEN) {
		int32_t rel = (int32_t)((int64_t)w->target - (int64_t)(w->at + TRAMP_DIRECT_LEN));

		code[0] = OP_JMP_REL32;
		memcpy(code + 1, &rel, 4);
	} else {
		memcpy(code, JMP_RIP_INDIRECT, sizeof(JMP_RIP_INDIRECT));
		memcpy(code + sizeof(JMP_RIP_INDIRECT), &w->target, 8);
	}
}

/* To be written by write_trampolines(), before any site jumps there. */
static int stage(const struct tramp *t)
{
	if (npending == pending_cap) {
		size_t cap = pending_cap ? 2 * pending_cap : 64;
		struct tramp_write *p = realloc(pending, cap * sizeof(*p));

		if (!p)
			return -1;
		pending = p;
		pending_cap = cap;
	}
	pending[npending].target = t->target;
	pending[npending].at = t->addr;
	pending[npending].len = t->len;
	npending++;
	return 0;
}

static int by_at(const void *a, const void *b)
{
	uintptr_t x = ((const struct tramp_write *)a)->at, y = ((const struct tramp_write *)b)->at;

	return x < y ? -1 : x > y;
}

/*
 * Write the staged trampolines, a run of nearby ones (inside one area) with one pwrite
 * holding the bytes between them as they are: those are free bytes, or trampolines other
 * threads may run, rewritten with their own value (as write_step() does for sites).
 * Each one written is marked so; on a refusal the rest stay unwritten, and the next
 * batch that needs one stages it again.  `buf` holds RUN_MAX bytes.
 */
static int write_trampolines(uint8_t *buf)
{
	size_t i = 0;
	int rc = 0;

	if (npending == 0)
		return 0;
	qsort(pending, npending, sizeof(*pending), by_at);
	while (i < npending && rc == 0) {
		uintptr_t start = pending[i].at, area = start & ~(uintptr_t)(TRAMP_AREA - 1);
		uintptr_t end = start + pending[i].len;
		size_t j;

		for (j = i + 1; j < npending; j++) {
			uintptr_t at = pending[j].at, stop = at + pending[j].len;

			if ((at & ~(uintptr_t)(TRAMP_AREA - 1)) != area || stop - start > RUN_MAX ||
			    at > end + RUN_GAP)
				break;
			end = stop > end ? stop : end;
		}
		memcpy(buf, (const void *)start, end - start);
		for (size_t k = i; k < j; k++)
			tramp_code(&pending[k], buf + (pending[k].at - start));
		rc = write_code(start, buf, end - start);
		for (size_t k = i; k < j && rc == 0; k++)
			tmap_find(pending[k].target, (unsigned)(pending[k].at % TRAMP_ROW))->written = 1;
		i = j;
	}
	npending = 0;
	return rc;
}

/*
 * The trampoline to `target` at `residue` (mod 256): reused if it exists, staged for
 * write_trampolines() otherwise.  0 if none can be made.  Written bytes reach other cores
 * before any site jumps there: fentry_poke_batch() writes every staged trampoline before
 * run_protocol(), which calls sync_cores() at least once (after the spin step, or after
 * the tail of a lone site) before any site's final opcode flip - the partner is the fetch
 * of the thread that takes that jump.  A reused address held a trampoline no thread runs
 * any more (fentry_poke_trampolines_release(): after the unload check).
 */
static uintptr_t trampoline_for(uintptr_t target, unsigned residue)
{
	struct tramp *t;
	uintptr_t at;
	size_t len = TRAMP_INDIRECT_LEN;
	int64_t rel;

	if ((2 * (tmap_n + 1) > tmap_cap) && tmap_rebuild(tmap_cap ? 2 * tmap_cap : 64, 0, 0) < 0)
		return 0;
	t = tmap_find(target, residue);
	if (t->target)
		/* Staged again if a batch that failed made it and never wrote it. */
		return t->written || stage(t) == 0 ? t->addr : 0;
	/*
	 * Direct when the replacement is within reach of the trampoline (a patch loaded near
	 * the program: near.c); else through the 8-byte slot.  The first trampoline maps the
	 * first area, so the reach is judged from the place it got.
	 */
	at = tramp_alloc(residue, TRAMP_DIRECT_LEN);
	if (at == 0)
		return 0;
	rel = (int64_t)target - (int64_t)(at + TRAMP_DIRECT_LEN);
	if (rel >= INT32_MIN && rel <= INT32_MAX)
		len = TRAMP_DIRECT_LEN;
	else
		tramp_free(at, TRAMP_DIRECT_LEN);
	if (len == TRAMP_INDIRECT_LEN && (at = tramp_alloc(residue, len)) == 0)
		return 0;
	t->target = target;
	t->addr = at;
	t->len = (uint8_t)len;
	t->written = 0;
	tmap_n++;
	stats.trampolines++;
	return stage(t) == 0 ? at : 0;
}

FENTRY_HIDDEN size_t fentry_poke_trampolines_into(uintptr_t lo, uintptr_t hi,
						  uintptr_t (*out)[2], size_t max)
{
	size_t n = 0;

	for (size_t i = 0; i < tmap_cap; i++)
		if (tmap[i].target >= lo && tmap[i].target < hi && tmap[i].target) {
			if (n < max) {
				out[n][0] = tmap[i].addr;
				out[n][1] = tmap[i].addr + tmap[i].len;
			}
			n++;
		}
	return n;
}

FENTRY_HIDDEN void fentry_poke_trampolines_release(uintptr_t lo, uintptr_t hi)
{
	size_t freed = 0;

	for (size_t i = 0; i < tmap_cap; i++) {
		struct tramp *t = &tmap[i];

		if (!t->target || t->target < lo || t->target >= hi)
			continue;
		tramp_free(t->addr, t->len);
		freed++;
	}
	if (freed && tmap_rebuild(tmap_cap, lo, hi) == 0)
		stats.trampolines -= freed;
}

/* ---- sites ------------------------------------------------------------------------------ */

/* The bytes a site has when it jumps to the trampoline at `to` (its tail: rel32's top). */
static int jump_bytes(const struct fentry_site *s, uintptr_t to, uint8_t *out)
{
	int64_t rel = (int64_t)to - (int64_t)(s->addr + s->len);
	int32_t rel32;
	unsigned op = site_op_at(s->len);

	if (rel < INT32_MIN || rel > INT32_MAX)
		return -1;
	rel32 = (int32_t)rel;
	memcpy(out, s->bytes, s->len);
	out[op] = SITE_OP_JMP;
	memcpy(out + op + 1, &rel32, 4);
	return out[op + 1] == site_rel8(s->len) ? 0 : -1; /* the invariant: never fails */
}

/* Does a site holding `bytes` (and jumping to `target`, 0: unpatched) jump straight there? */
static int straight(const struct fentry_site *s, const uint8_t *bytes, uintptr_t target)
{
	unsigned op = site_op_at(s->len);
	int32_t rel;

	if (target == 0 || bytes[op] != SITE_OP_JMP)
		return 0;
	memcpy(&rel, bytes + op + 1, 4);
	return s->addr + s->len + (uintptr_t)(intptr_t)rel == target;
}

FENTRY_HIDDEN int fentry_poke_site_is_ours(const struct fentry_site *s)
{
	return memcmp((const void *)s->addr, s->bytes, s->len) == 0;
}

static int by_addr(const void *a, const void *b)
{
	uintptr_t x = ((const struct site_op *)a)->addr, y = ((const struct site_op *)b)->addr;

	return x < y ? -1 : x > y;
}

FENTRY_HIDDEN int fentry_poke_batch(struct fentry_site **batch, const uintptr_t *next, size_t n,
				    char *err)
{
	struct site_op *ops;
	uint8_t *buf = NULL;
	sigset_t all, saved;
	const char *what = NULL;
	int mismatch = 0, rc = 0, saved_errno;
	uint64_t t0 = now_ns();

	if (n == 0)
		return 0;
	if (rewrite_allowed(err) < 0)
		return -1;
	ops = calloc(n, sizeof(*ops));
	buf = malloc(RUN_MAX);
	if (!ops || !buf) {
		free(ops);
		free(buf);
		return fentry_fail(err, "out of memory");
	}
	npending = 0; /* what a batch that failed staged may have been released since */
	for (size_t i = 0; i < n; i++) {
		struct fentry_site *s = batch[i];
		struct site_op *o = &ops[i];

		o->addr = s->addr;
		o->s = s;
		o->len = s->len;
		o->first = (uint8_t)(s->len - 5u);
		o->target = next[i];
		memcpy(o->now, s->bytes, s->len);
		memcpy(o->to, s->bytes, s->len);
		if (next[i] == 0) {
			/* Unpatched: the test, keeping the tail (dead bytes). */
			o->to[site_op_at(s->len)] = SITE_OP_TEST;
		} else {
			unsigned residue = (unsigned)((s->addr + s->len + site_rel8(s->len)) % TRAMP_ROW);
			uintptr_t to;

			/*
			 * Straight to the replacement when it lies within reach (the patch was
			 * loaded near: near.c) at the address residue the site's jump can take (the
			 * generator placed it there: FENTRY_PLACE in fentry.h): one direct jump.
			 * Else through a trampoline at that residue.
			 */
			if (next[i] % TRAMP_ROW == residue && jump_bytes(s, next[i], o->to) == 0)
				continue;
			to = trampoline_for(next[i], residue);
			if (to == 0 || jump_bytes(s, to, o->to) < 0) {
				free(ops);
				free(buf);
				return fentry_fail(err, "no trampoline within reach of the site at %p "
						   "(jump mode); use FENTRY_MODE=dispatch", (void *)s->addr);
			}
		}
	}
	if (write_trampolines(buf) < 0) {
		saved_errno = errno;
		free(ops);
		free(buf);
		return rewrite_refused(err, "pwrite", saved_errno);
	}
	qsort(ops, n, sizeof(*ops), by_addr);

	/* Nothing below may call instrumented code or take a signal (see the top). */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &saved);
	if (run_protocol(ops, n, buf, 1, &mismatch, &what) < 0) {
		int again;
		const char *ignored;

		saved_errno = errno;
		/* Put every site we changed back as it was, with the same protocol. */
		for (size_t i = 0; i < n; i++)
			memcpy(ops[i].to, ops[i].s->bytes, ops[i].len);
		if (run_protocol(ops, n, buf, 0, &again, &ignored) < 0)
			fprintf(stderr, "fentry: could not restore every site after a failed rewrite: "
				"%s\n", strerror(errno));
		rc = -1;
	}
	pthread_sigmask(SIG_SETMASK, &saved, NULL);

	if (rc == 0) {
		/* Site records: read and written only under the loader's lock (sites.h). */
		for (size_t i = 0; i < n; i++) {
			struct site_op *o = &ops[i];

			stats.sites_direct -= (uint64_t)straight(o->s, o->s->bytes, o->s->target);
			stats.sites_direct += (uint64_t)straight(o->s, o->to, o->target);
			memcpy(o->s->bytes, o->to, o->len);
			o->s->target = o->target;
		}
		stats.sites_written += n;
		stats.batches++;
		stats.last_batch_ns = now_ns() - t0;
	} else if (mismatch) {
		fentry_fail(err, "an fentry site changed while it was being rewritten (a debugger or "
			    "uprobe wrote there?); nothing changed, retry");
	} else {
		rewrite_refused(err, what ? what : "pwrite", saved_errno);
	}
	free(ops);
	free(buf);
	return rc;
}

/* ---- start-up --------------------------------------------------------------------------- */

static void to_test_opcode(struct site_op *o)
{
	o->next[site_op_at(o->len)] = SITE_OP_TEST;
}

static void to_rel8(struct site_op *o)
{
	o->next[site_op_at(o->len) + 1] = site_rel8(o->len);
}

static void back_operand(struct site_op *o)
{
	o->next[site_op_at(o->len) + 1] = o->to[site_op_at(o->len) + 1];
}

/*
 * Take every site from `now` to `to` the way start-up may: at once when no other thread
 * runs them; otherwise opcode first, then operand, each a whole instruction alone:
 *   67 e8 r0 r1 r2 r3  ->  67 a9 r0 r1 r2 r3  (a test)  ->  67 a9 fd r1 r2 r3
 * and back in the reverse order (operand while the opcode is the test, then opcode).
 */
static int convert(struct site_op *ops, size_t n, uint8_t *buf, int live, int forward)
{
	int mismatch;

	if (!live) {
		plan(ops, n, to_final);
		return write_step(ops, n, buf, 1, &mismatch);
	}
	plan(ops, n, forward ? to_test_opcode : back_operand);
	/* The sync: no thread still runs the first step's old bytes when the second step
	 * changes the next byte (partner: the fetch of threads running the sites). */
	if (write_step(ops, n, buf, 1, &mismatch) < 0 || sync_cores() < 0)
		return -1;
	plan(ops, n, forward ? to_rel8 : to_final);
	return write_step(ops, n, buf, 1, &mismatch);
}

/*
 * Start-up with no other thread: each run of nearby sites (up to RUN_MAX bytes) is copied,
 * its sites given their unpatched form in the copy, and written back with one pwrite - no
 * per-site records (a batch's site_op is 50 bytes: 2.4 MB of fresh pages for 50,000 sites,
 * a sixth of such a program's start-up).  `orig` keeps each site's bytes for the way back.
 * Unchanged bytes between sites are written with their own value, as write_step() does
 * (up to RUN_GAP of them: a page with no site is not copied).  0, or -1 with *touched the
 * number of sites whose bytes may have changed.
 */
static int prepare_quiet(size_t n, uint8_t (*orig)[SITE_MAX_LEN], uint8_t *buf, size_t *touched)
{
	size_t i = 0;

	while (i < n) {
		unsigned len;
		uintptr_t start = fentry_sites_addr(i, &len), end = start + len;
		size_t j = i + 1;

		while (j < n) {
			unsigned l;
			uintptr_t a = fentry_sites_addr(j, &l);

			if (a + l - start > RUN_MAX || a > end + RUN_GAP)
				break;
			end = a + l;
			j++;
		}
		memcpy(buf, (const void *)start, end - start);
		for (size_t k = i; k < j; k++) {
			uint8_t *at = buf + (fentry_sites_addr(k, &len) - start);

			memcpy(orig[k], at, len);
			fentry_site_unpatched_form(orig[k], len, at);
		}
		*touched = j;
		if (write_code(start, buf, end - start) < 0)
			return -1;
		i = j;
	}
	*touched = n;
	return 0;
}

/*
 * Put the first `done` sites back as `orig` holds them (a quiet start-up that failed); last
 * to first, so that a site listed twice ends with the bytes its first entry found.
 */
static int unprepare_quiet(size_t done, uint8_t (*orig)[SITE_MAX_LEN])
{
	int rc = 0;

	for (size_t k = done; k-- > 0;) {
		unsigned len;
		uintptr_t a = fentry_sites_addr(k, &len);

		if (write_code(a, orig[k], len) < 0)
			rc = -1;
	}
	return rc;
}

FENTRY_HIDDEN int fentry_poke_prepare_all(int live)
{
	size_t n = fentry_sites_count();
	struct site_op *ops = live ? calloc(n ? n : 1, sizeof(*ops)) : NULL;
	uint8_t (*orig)[SITE_MAX_LEN] = malloc((n ? n : 1) * sizeof(*orig));
	uint8_t *buf = malloc(RUN_MAX);
	uint64_t t0 = now_ns();
	int rc = -1;

	if ((live && !ops) || !orig || !buf)
		goto out;
	if (!live) {
		size_t done = 0;

		if (prepare_quiet(n, orig, buf, &done) < 0 || sync_cores() < 0) {
			/* Dispatch mode from here on: every site must call __fentry__ again. */
			if (unprepare_quiet(done, orig) < 0 || sync_cores() < 0)
				fprintf(stderr, "fentry: some functions' entries could not be restored "
					"after a failed start-up rewrite; they cannot be patched\n");
			goto out;
		}
		stats.startup_sites = n;
		rc = 0;
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		unsigned len;

		ops[i].addr = fentry_sites_addr(i, &len);
		ops[i].len = (uint8_t)len;
		memcpy(ops[i].now, (const void *)ops[i].addr, len);
		memcpy(orig[i], ops[i].now, len);
		fentry_site_unpatched_form(ops[i].now, len, ops[i].to);
	}
	if (convert(ops, n, buf, live, 1) < 0 || sync_cores() < 0) {
		/*
		 * The process goes on in dispatch mode, where every site must call __fentry__:
		 * put back the calls already changed.
		 */
		for (size_t i = 0; i < n; i++)
			memcpy(ops[i].to, orig[i], ops[i].len);
		if (convert(ops, n, buf, live, 0) < 0 || sync_cores() < 0)
			fprintf(stderr, "fentry: some functions' entries could not be restored after a "
				"failed start-up rewrite; they cannot be patched\n");
		goto out;
	}
	stats.startup_sites = n;
	rc = 0;
out:
	stats.startup_ns = now_ns() - t0;
	free(ops);
	free(orig);
	free(buf);
	return rc;
}

/*
 * A prepared program in dispatch mode: every site becomes the call gcc emitted again (its
 * rel32 computed: the call of this shim's __fentry__), the reverse of prepare_all.
 */
extern void __fentry__(void);

FENTRY_HIDDEN int fentry_poke_restore_calls(int live)
{
	size_t n = fentry_sites_count();
	struct site_op *ops = calloc(n ? n : 1, sizeof(*ops));
	uint8_t *buf = malloc(RUN_MAX);
	uint64_t t0 = now_ns();
	int rc = -1;

	if (!ops || !buf)
		goto out;
	for (size_t i = 0; i < n; i++) {
		unsigned len;
		struct site_op *o = &ops[i];
		int32_t rel;

		o->addr = fentry_sites_addr(i, &len);
		o->len = (uint8_t)len;
		memcpy(o->now, (const void *)o->addr, len);
		memcpy(o->to, o->now, len);
		rel = (int32_t)((intptr_t)(uintptr_t)&__fentry__ - (intptr_t)(o->addr + len));
		o->to[site_op_at(len)] = SITE_OP_CALL;
		memcpy(o->to + site_op_at(len) + 1, &rel, 4);
		/* Its tail must already be the call's (prepare.py kept it); else leave it be. */
		if (memcmp(o->to + site_tail_at(len), o->now + site_tail_at(len), SITE_TAIL_LEN) != 0)
			memcpy(o->to, o->now, len);
	}
	if (convert(ops, n, buf, live, 0) < 0 || sync_cores() < 0)
		goto out;
	stats.startup_sites = n;
	rc = 0;
out:
	stats.startup_ns = now_ns() - t0;
	free(ops);
	free(buf);
	return rc;
}

FENTRY_HIDDEN void fentry_poke_stats(struct fentry_poke_stats *out)
{
	*out = stats;
	out->trampoline_bytes = (uint64_t)nareas * TRAMP_AREA;
	out->heap_bytes = (uint64_t)(nareas * sizeof(struct tramp_area) + tmap_cap * sizeof(*tmap) +
				     fentry_sites_memory());
}
