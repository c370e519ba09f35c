/*
 * stackscan.c - proving that no thread can be running, or return into, a patch's code.
 *
 * A reverted patch is no longer reached by any call site, but a thread may still be
 * inside its replacement (or several frames below it) and will return there.  Before
 * dlclose() the loader asks: does any thread's program counter, registers, or any word
 * of its stack - from its stack pointer to the end of that stack's mapping - hold an
 * address inside the patch's code (and the trampolines that jump into it)?  A value
 * there counts as "maybe running it" - conservative: a stale return address left on a
 * stack also counts, and the answer is then "busy, retry", never a crash.
 *
 * Without disturbing the program:
 *
 * - A thread blocked in a system call (or stopped, or waiting on a fault) is never
 *   signalled: a signal would make its poll()/epoll_wait()/nanosleep() fail with EINTR
 *   or return early, whatever SA_RESTART says.  The kernel tells, without interrupting
 *   it, where such a thread is (/proc/self/task/TID/syscall: the call, its arguments,
 *   its stack pointer and program counter), and its stack cannot change while it stays
 *   blocked; this thread reads that stack through /proc/self/mem (a fault-safe read).
 *   The thread's context-switch counts (/proc/self/task/TID/status) are read before and
 *   after, and its state again: if it ran meanwhile, it is looked at again.
 *
 * - A thread seen running is looked at again, a millisecond apart, until it blocks
 *   (threads that wait for something block again soon) or it has been seen executing -
 *   its CPU time (its thread CPU clock) advancing - in LOOKS intervals: "running" also means
 *   runnable, and a thread woken from a blocking call that waits for a CPU is still
 *   inside that call.  Once more right before the signal; only then does it get the
 *   check signal (SIGRTMAX - 3, or FENTRY_UNLOAD_SIGNAL), whose handler checks its own
 *   registers and stack.  A thread running user code handles the signal before it can
 *   enter a system call.  What is left - it enters a blocking call in the instant
 *   between the last look and the signal - is measured in tests/test_unload_designs.py
 *   and stated in docs/security.md.  A thread that does not get a CPU within 3 s is
 *   left alone ("busy").
 *
 * - Alternate signal stacks: a thread running a handler on its sigaltstack has the
 *   interrupted frames on its ordinary stack.  When the stack pointer lies on an alternate
 *   stack (sigaltstack() says so in the handler; for a blocked thread, its stack pointer
 *   lies in a mapping that is not a thread stack), every word of that stack that points
 *   into another readable mapping is taken as a possible interrupted stack pointer, and
 *   that mapping is scanned from there - more "busy", never a miss.
 *
 * - Rounds carry a generation number in the signal's value: a handler that runs late,
 *   after its round timed out, never answers for a later round, and never touches memory
 *   a later round owns (it registers as in flight before it looks at the round).
 *
 * - The maps are read whole into a growable array before any signal (no cap); the
 *   handler allocates nothing and calls only async-signal-safe functions.
 *
 * - AddressSanitizer: the scan reads below other frames and other threads' stacks, so
 *   the functions that read are not instrumented.  ThreadSanitizer delays asynchronous
 *   signals to points of its own choosing and hands the handler a stale context, so in a
 *   process running it no thread is ever signalled: threads seen running make the answer
 *   "busy" with that reason (blocked threads are checked as above).
 *
 * The signal's handler is installed on first use; if the program has its own handler for
 * that signal, unloading is refused (a program's signal is never taken over).
 */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "arch/x86_64/stackscan.h"

/* The functions that read other frames and stacks are never instrumented (see top). */
#define NO_SANITIZE __attribute__((no_sanitize_address, no_sanitize_thread, noinline))

#define ANSWER_TIMEOUT_NS 1000000000L /* a signalled thread answers within this        */
#define LOOKS 3                        /* intervals a thread must be seen executing in    */
#define WAIT_FOR_CPU_NS 3000000000L    /* ... within this time, or it is left alone       */
#define LOOK_PAUSE_NS 1000000L         /* between looks                                  */
#define PASSIVE_TRIES 4                /* blocked-thread scans a thread may spoil by running */
#define NEW_THREAD_ROUNDS 3            /* rounds for threads created during the check    */
#define SCAN_BUDGET (256u << 20)       /* bytes the alternate-stack search may read      */
#define CANDIDATES 64                  /* mappings it may follow from one alternate stack */
#define CHUNK_WORDS 64                 /* words read per pread (a handler's stack buffer) */

struct range {
	uintptr_t lo, hi;
};

/* One mapping of /proc/self/maps. */
struct map {
	uintptr_t lo, hi;
	unsigned char readable, anon, stack_like;
};

/* Per-thread answers of a round: written by handlers, read by the checker. */
enum { ANSWER_NONE = 0, ANSWER_CLEAR = 1, ANSWER_HIT = 2, ANSWER_UNSURE = 3 };

/*
 * What a round's handlers read.  Set up before the first signal; freed only when no
 * handler is in flight and the round is closed (gen 0), else kept forever (see top).
 * Plain fields, written by the checker (under the loader's lock) while no round is open
 * and published by its store of round_gen; a handler reads them only after it loaded
 * that gen (on_check()), and the checker changes them only after the round is closed
 * and no handler is in flight (or, in check_threads(), after every handler of the round
 * answered: the answer's store orders the handler's reads before the checker's writes).
 */
struct round {
	const struct range *code;
	size_t ncode;
	const struct map *maps;
	size_t nmaps;
	int mem_fd;            /* /proc/self/mem, for fault-safe reads */
	_Atomic unsigned char *answers;
	size_t nanswers;
};

/* Written by the checker under the loader's lock; read under it (fentry_costs_snapshot()). */
static struct fentry_check_stats stats;
static struct round round;
static struct round leftover;      /* a round's memory a late handler may still read */
/*
 * round_gen and in_flight: the checker and the handlers (signal handlers on program
 * threads) meet here, Dekker-style - the checker stores round_gen = 0 then loads
 * in_flight; a handler increments in_flight then loads round_gen.  All four are
 * seq_cst (the atomic_* defaults), so at least one side sees the other's store: the
 * handler leaves without touching the round, or the checker waits for it.
 */
static _Atomic unsigned round_gen; /* 0: no round open                               */
static atomic_int in_flight;       /* handlers between their gen check and their exit */
static unsigned last_gen;          /* the checker's alone, as is installed_sig        */
static int installed_sig;

/* ---- reading memory and checking words (async-signal-safe) ----------------------------- */

NO_SANITIZE static int in_code(const struct round *r, uintptr_t v)
{
	for (size_t i = 0; i < r->ncode; i++)
		if (v >= r->code[i].lo && v < r->code[i].hi)
			return 1;
	return 0;
}

/* The mapping holding addr, or NULL (binary search; maps are sorted). */
NO_SANITIZE static const struct map *map_of(const struct round *r, uintptr_t addr)
{
	size_t lo = 0, hi = r->nmaps;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (addr < r->maps[mid].lo)
			hi = mid;
		else if (addr >= r->maps[mid].hi)
			lo = mid + 1;
		else
			return &r->maps[mid];
	}
	return NULL;
}

/*
 * Scan the words of [from, to).  `direct`: read them in place (the calling thread's own
 * live stack, which cannot go away under it); otherwise through /proc/self/mem, so that a
 * mapping unmapped meanwhile ends the scan instead of faulting.  With `cand`, words that
 * point into another readable anonymous mapping are collected as possible interrupted
 * stack pointers.  1 if a word lies in the code; -1 if the scan could not finish.
 */
struct candidates {
	const struct map *map[CANDIDATES];
	uintptr_t from[CANDIDATES];
	size_t n;
	int overflow;
};

NO_SANITIZE static void note_candidate(const struct round *r, struct candidates *c,
				       const struct map *self, uintptr_t w)
{
	const struct map *m = map_of(r, w);
	size_t i;

	if (!m || m == self || !m->readable || !m->anon)
		return;
	for (i = 0; i < c->n; i++)
		if (c->map[i] == m) {
			if (w < c->from[i])
				c->from[i] = w;
			return;
		}
	if (c->n == CANDIDATES) {
		c->overflow = 1;
		return;
	}
	c->map[c->n] = m;
	c->from[c->n++] = w;
}

NO_SANITIZE static int scan_words(const struct round *r, uintptr_t from, uintptr_t to, int direct,
				  struct candidates *cand, const struct map *self)
{
	uintptr_t buf[CHUNK_WORDS];

	from &= ~(uintptr_t)7;
	while (from + sizeof(uintptr_t) <= to) {
		size_t n = (to - from) / sizeof(uintptr_t);
		const uintptr_t *w;

		if (n > CHUNK_WORDS)
			n = CHUNK_WORDS;
		if (direct) {
			w = (const uintptr_t *)from;
		} else {
			ssize_t got = pread(r->mem_fd, buf, n * sizeof(uintptr_t), (off_t)from);

			if (got <= 0)
				return -1;
			n = (size_t)got / sizeof(uintptr_t);
			w = buf;
		}
		for (size_t i = 0; i < n; i++) {
			if (in_code(r, w[i]))
				return 1;
			if (cand)
				note_candidate(r, cand, self, w[i] & ~(uintptr_t)7);
		}
		from += n * sizeof(uintptr_t);
	}
	return 0;
}

/*
 * The stack at sp: from sp to the end of its mapping.  `own`: sp is the calling thread's
 * own regular stack.  `alt` = [alt_lo, alt_hi) when sp is known to lie on an alternate
 * signal stack ({0, 0}: unknown - then a mapping that is not a thread stack is treated
 * as possibly one).  ANSWER_HIT, ANSWER_CLEAR, or ANSWER_UNSURE (could not finish).
 */
NO_SANITIZE static int check_stack(const struct round *r, uintptr_t sp, int own, uintptr_t alt_lo,
				   uintptr_t alt_hi)
{
	const struct map *m = map_of(r, sp);
	struct candidates cand;
	uintptr_t end;
	uint64_t budget = SCAN_BUDGET;
	int on_alt, rc;

	if (!m)
		return ANSWER_UNSURE; /* a stack outside every mapping read: look again later */
	on_alt = alt_hi ? (sp >= alt_lo && sp < alt_hi) : !m->stack_like;
	if (!on_alt) {
		rc = scan_words(r, sp, m->hi, own && m->stack_like, NULL, NULL);
		return rc > 0 ? ANSWER_HIT : rc < 0 ? ANSWER_UNSURE : ANSWER_CLEAR;
	}
	/* An alternate stack: its used part, then every stack it may have interrupted. */
	end = alt_hi ? alt_hi : m->hi;
	cand.n = 0;
	cand.overflow = 0;
	rc = scan_words(r, sp, end, own && alt_hi != 0, &cand, m);
	if (rc > 0)
		return ANSWER_HIT;
	if (rc < 0 || cand.overflow)
		return ANSWER_UNSURE;
	for (size_t i = 0; i < cand.n; i++) {
		uint64_t len = cand.map[i]->hi - cand.from[i];

		if (len > budget)
			return ANSWER_UNSURE;
		budget -= len;
		rc = scan_words(r, cand.from[i], cand.map[i]->hi, 0, NULL, NULL);
		if (rc > 0)
			return ANSWER_HIT;
		if (rc < 0)
			return ANSWER_UNSURE;
	}
	return ANSWER_CLEAR;
}

/* ---- the signal handler ----------------------------------------------------------------- */

NO_SANITIZE static void on_check(int sig, siginfo_t *info, void *ctx)
{
	uintptr_t value = (uintptr_t)info->si_value.sival_ptr;
	unsigned gen = (unsigned)(value >> 32);
	size_t slot = (size_t)(value & 0xffffffffu);
	ucontext_t *uc = ctx;
	int saved_errno = errno, answer = ANSWER_CLEAR;
	stack_t ss;

	(void)sig;
	if (info->si_code != SI_QUEUE || gen == 0)
		return;
	/*
	 * Partner: the checker's store of round_gen = 0, then its load of in_flight
	 * (check_threads(), fentry_threads_clear_of()); seq_cst on both sides (see
	 * round_gen).  The load of round_gen is also the acquire that pairs with the
	 * checker's store opening the round: round's plain fields are read after it.
	 */
	atomic_fetch_add(&in_flight, 1);
	if (atomic_load(&round_gen) != gen || slot >= round.nanswers)
		goto out;
	for (int r = 0; r < NGREG; r++)
		if (in_code(&round, (uintptr_t)uc->uc_mcontext.gregs[r]))
			answer = ANSWER_HIT;
	if (answer != ANSWER_HIT) {
		uintptr_t sp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP], lo = 0, hi = 0;

		/* On an alternate stack (ours runs there too, SA_ONSTACK): its bounds. */
		if (sigaltstack(NULL, &ss) == 0 && (ss.ss_flags & SS_ONSTACK)) {
			lo = (uintptr_t)ss.ss_sp;
			hi = lo + ss.ss_size;
			if (sp < lo || sp >= hi) /* the interrupted code ran on the ordinary stack */
				lo = hi = 0;
		}
		answer = hi ? check_stack(&round, sp, 1, lo, hi) : check_stack(&round, sp, 1, 1, 1);
	}
	/* Release (seq_cst); partner: check_threads()'s loads of answers.  Nothing of round
	 * is read after it, so a checker that sees it may reuse round's fields. */
	atomic_store(&round.answers[slot], (unsigned char)answer);
out:
	/* Partner: the checker's loads of in_flight before it frees or reuses round's memory. */
	atomic_fetch_sub(&in_flight, 1);
	errno = saved_errno;
}

static int check_signal(void)
{
	const char *env = secure_getenv("FENTRY_UNLOAD_SIGNAL");
	int sig = env && *env ? atoi(env) : SIGRTMAX - 3;

	return sig >= SIGRTMIN && sig <= SIGRTMAX ? sig : -1;
}

static int install(int sig, char *err)
{
	struct sigaction sa, old;

	if (sigaction(sig, NULL, &old) < 0)
		return fentry_fail(err, "signal %d: %s", sig, strerror(errno));
	if ((old.sa_flags & SA_SIGINFO) ? old.sa_sigaction != on_check
					: old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)
		return fentry_fail(err, "signal %d has a handler of the program's; set "
				   "FENTRY_UNLOAD_SIGNAL to a free real-time signal", sig);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_check;
	/* SA_ONSTACK: a thread with a small stack and an alternate one answers from there. */
	sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
	sigfillset(&sa.sa_mask);
	if (sigaction(sig, &sa, NULL) < 0)
		return fentry_fail(err, "signal %d: %s", sig, strerror(errno));
	installed_sig = sig;
	return 0;
}

/* ---- the checker's view of the process ------------------------------------------------ */

/* Append to a growable array of `size`-byte elements. */
static void *grow(void *v, size_t *cap, size_t n, size_t size)
{
	size_t c = *cap ? 2 * *cap : 64;
	void *g;

	if (n < *cap)
		return v;
	g = realloc(v, c * size);
	if (g)
		*cap = c;
	return g;
}

/* Every mapping, in address order; a stack-like one is [stack] or an anonymous mapping
 * right above an inaccessible one (a thread stack's guard page). */
static int read_maps(struct map **out, size_t *nout)
{
	FILE *f = fopen("/proc/self/maps", "re");
	struct map *maps = NULL;
	size_t n = 0, cap = 0;
	char line[4096 + 128];
	uintptr_t prev_hi = 0;
	int prev_none = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi, inode;
		char perms[8], path[16] = "";
		int got = sscanf(line, "%lx-%lx %7s %*s %*s %lu %15s", &lo, &hi, perms, &inode, path);
		struct map *m;

		if (!strchr(line, '\n')) { /* a path longer than the buffer: skip its rest */
			int ch;

			while ((ch = fgetc(f)) != EOF && ch != '\n')
				;
		}
		if (got < 4)
			continue;
		m = grow(maps, &cap, n, sizeof(*maps));
		if (!m) {
			free(maps);
			fclose(f);
			return -1;
		}
		maps = m;
		m = &maps[n++];
		m->lo = lo;
		m->hi = hi;
		m->readable = perms[0] == 'r';
		m->anon = inode == 0 && (path[0] != '/' || got < 5);
		m->stack_like = strcmp(path, "[stack]") == 0 ||
				(m->anon && path[0] == '\0' && prev_none && prev_hi == lo);
		prev_none = strncmp(perms, "---", 3) == 0;
		prev_hi = hi;
	}
	fclose(f);
	*out = maps;
	*nout = n;
	return 0;
}

static int read_small(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	return 0;
}

/* What /proc/self/task/TID/syscall says about a thread. */
struct look {
	int gone;            /* it exited                                     */
	int running;         /* on a CPU or runnable: only a signal can tell  */
	long nr;             /* blocked: the system call (-1: not in one)     */
	uintptr_t reg[8];    /* blocked: its arguments (nr >= 0), sp, pc      */
	unsigned nreg;
	unsigned long switches; /* voluntary + nonvoluntary context switches  */
	uint64_t exec_ns;    /* CPU time so far, when exec_known               */
	int exec_known;
};

static void look_at(pid_t tid, struct look *l, int with_switches)
{
	char path[64], buf[2048], *p, *end;
	struct timespec cpu;

	memset(l, 0, sizeof(*l));
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", (int)tid);
	if (read_small(path, buf, sizeof(buf)) < 0) {
		l->gone = 1;
		return;
	}
	if (strncmp(buf, "running", 7) == 0) {
		l->running = 1;
	} else {
		l->nr = strtol(buf, &p, 10);
		while (l->nreg < 8) {
			unsigned long long v = strtoull(p, &end, 16);

			if (end == p)
				break;
			l->reg[l->nreg++] = (uintptr_t)v;
			p = end;
		}
		if (l->nreg < 2) /* sp and pc at least: otherwise ask it */
			l->running = 1;
	}
	if (!with_switches)
		return;
	/* The thread's CPU clock (the kernel's MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)):
	 * exact, also while it runs, unlike schedstat (updated at ticks). */
	if (clock_gettime((clockid_t)((~(unsigned)tid << 3) | 6), &cpu) == 0) {
		l->exec_ns = (uint64_t)cpu.tv_sec * 1000000000u + (uint64_t)cpu.tv_nsec;
		l->exec_known = 1;
	}
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)tid);
	if (read_small(path, buf, sizeof(buf)) < 0) {
		l->gone = 1;
		return;
	}
	for (const char *k = buf; (k = strstr(k, "ctxt_switches:")) != NULL; k++)
		l->switches += strtoul(k + strlen("ctxt_switches:"), NULL, 10);
}

static int same_block(const struct look *a, const struct look *b)
{
	return !a->running && !b->running && !a->gone && !b->gone && a->nr == b->nr &&
	       a->nreg == b->nreg && memcmp(a->reg, b->reg, a->nreg * sizeof(a->reg[0])) == 0 &&
	       a->switches == b->switches;
}

/*
 * A blocked thread, from here: its registers the kernel shows, then its stack, then proof
 * it did not run meanwhile.  ANSWER_* ; ANSWER_NONE if it ran (look again).
 */
static int check_blocked(const struct round *r, pid_t tid, const struct look *before)
{
	struct look after;
	int answer = ANSWER_CLEAR;

	for (unsigned i = 0; i < before->nreg; i++)
		if (in_code(r, before->reg[i]))
			answer = ANSWER_HIT;
	if (answer != ANSWER_HIT) /* sp is the next-to-last value */
		answer = check_stack(r, before->reg[before->nreg - 2], 0, 0, 0);
	look_at(tid, &after, 1);
	if (after.gone)
		return ANSWER_CLEAR; /* it exited: it runs nothing any more */
	return same_block(before, &after) ? answer : ANSWER_NONE;
}

static long elapsed_ns(const struct timespec *since)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

static void pause_ns(long ns)
{
	struct timespec t = { 0, ns };

	nanosleep(&t, NULL);
}

static int by_tid(const void *a, const void *b)
{
	pid_t x = *(const pid_t *)a, y = *(const pid_t *)b;

	return x < y ? -1 : x > y;
}

/* The process's threads other than the caller, sorted; -1 if they cannot be listed. */
static int list_threads(pid_t **out, size_t *nout)
{
	DIR *d = opendir("/proc/self/task");
	pid_t self = (pid_t)syscall(SYS_gettid), *tids = NULL;
	size_t n = 0, cap = 0;
	struct dirent *e;

	if (!d)
		return -1;
	while ((e = readdir(d)) != NULL) {
		pid_t tid = (pid_t)atoi(e->d_name), *g;

		if (tid <= 0 || tid == self)
			continue;
		g = grow(tids, &cap, n, sizeof(*tids));
		if (!g) {
			free(tids);
			closedir(d);
			return -1;
		}
		tids = g;
		tids[n++] = tid;
	}
	closedir(d);
	qsort(tids, n, sizeof(*tids), by_tid);
	*out = tids;
	*nout = n;
	return 0;
}

/* Does the process run ThreadSanitizer (which delays asynchronous signals)? */
static int under_tsan(void)
{
	return dlsym(RTLD_DEFAULT, "__tsan_init") != NULL;
}

/* ---- one check -------------------------------------------------------------------------- */

struct verdict {
	pid_t tid;      /* a thread that may run the code, or that could not be checked */
	int answer;     /* ANSWER_HIT or ANSWER_UNSURE; ANSWER_CLEAR when all are clear  */
	int blocked;    /* it was checked from here (blocked), not signalled             */
	long nr;        /* its system call, when blocked                                 */
	const char *why; /* why it could not be checked                                  */
};

/* Check the threads tids[0..n); the first that may run the code (or cannot be checked)
 * ends it. */
static void check_threads(const pid_t *tids, size_t n, int sig, int tsan, struct verdict *v)
{
	struct look *looks = calloc(n ? n : 1, sizeof(*looks));
	_Atomic unsigned char *answers = calloc(n ? n : 1, sizeof(*answers));
	size_t *pending = calloc(n ? n : 1, sizeof(*pending)), npending = 0;
	char *blocked_answer = calloc(n ? n : 1, 1);
	int *runs = calloc(n ? n : 1, sizeof(*runs)); /* intervals seen executing */
	struct timespec start;
	pid_t pid = getpid();
	unsigned gen;

	v->answer = ANSWER_CLEAR;
	if (!looks || !answers || !pending || !blocked_answer || !runs) {
		v->answer = ANSWER_UNSURE;
		v->why = "out of memory";
		goto out;
	}
	/* Blocked threads first, from here; the others are pending. */
	for (size_t i = 0; i < n && v->answer == ANSWER_CLEAR; i++) {
		int a = ANSWER_NONE;

		for (int t = 0; t < PASSIVE_TRIES && a == ANSWER_NONE; t++) {
			look_at(tids[i], &looks[i], 1);
			if (looks[i].gone) {
				a = ANSWER_CLEAR;
			} else if (looks[i].running) {
				break;
			} else {
				a = check_blocked(&round, tids[i], &looks[i]);
				stats.threads_blocked += a != ANSWER_NONE;
			}
		}
		if (a == ANSWER_NONE) {
			pending[npending++] = i;
		} else if (a != ANSWER_CLEAR) {
			v->answer = a;
			v->tid = tids[i];
			v->blocked = 1;
			v->nr = looks[i].nr;
		}
	}
	/*
	 * Running threads: look again, a millisecond apart, until each has blocked (checked
	 * from here) or has been seen running - really executing, its CPU time advancing -
	 * in LOOKS intervals.  "Running" also means runnable: a thread woken from a blocking
	 * call that waits for a CPU is still inside that call, and a signal now would make it
	 * fail with EINTR; its intervals without CPU time do not count.
	 */
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (npending && v->answer == ANSWER_CLEAR) {
		size_t still = 0, ready = 0;

		pause_ns(LOOK_PAUSE_NS);
		for (size_t k = 0; k < npending && v->answer == ANSWER_CLEAR; k++) {
			size_t i = pending[k];
			uint64_t before = looks[i].exec_ns;
			int a = ANSWER_NONE;

			look_at(tids[i], &looks[i], 1);
			if (looks[i].gone)
				a = ANSWER_CLEAR;
			else if (!looks[i].running)
				a = check_blocked(&round, tids[i], &looks[i]);
			stats.threads_blocked += !looks[i].gone && !looks[i].running && a != ANSWER_NONE;
			if (a == ANSWER_NONE) {
				runs[i] += !looks[i].exec_known || looks[i].exec_ns != before;
				ready += runs[i] >= LOOKS;
				pending[still++] = i;
			} else if (a != ANSWER_CLEAR) {
				v->answer = a;
				v->tid = tids[i];
				v->blocked = 1;
				v->nr = looks[i].nr;
			}
		}
		npending = still;
		if (ready == npending)
			break;
		if (elapsed_ns(&start) >= WAIT_FOR_CPU_NS) {
			for (size_t k = 0; k < npending; k++)
				if (runs[pending[k]] < LOOKS) {
					v->answer = ANSWER_UNSURE;
					v->tid = tids[pending[k]];
					v->why = "it stayed runnable without getting a CPU (an overloaded "
						 "machine); it was not interrupted";
					break;
				}
			break;
		}
	}
	if (v->answer != ANSWER_CLEAR || npending == 0)
		goto out;
	if (tsan) {
		v->answer = ANSWER_UNSURE;
		v->tid = tids[pending[0]];
		v->why = "it keeps running, and under ThreadSanitizer running threads cannot be "
			 "checked (it delays signals); retry when it waits";
		goto out;
	}
	/* Open the round: the handlers' view is complete before the first signal. */
	gen = ++last_gen ? last_gen : ++last_gen;
	round.answers = answers;
	round.nanswers = n;
	/* Opens the round.  Release (seq_cst): round's fields, written above and by
	 * fentry_threads_clear_of(), are visible to a handler that loads this gen;
	 * partner: on_check()'s load of round_gen.  The signal is sent after it. */
	atomic_store(&round_gen, gen);
	for (size_t k = 0; k < npending; k++) {
		size_t i = pending[k];
		siginfo_t si;
		struct look again;

		/* One last look: a thread that blocked by now is checked from here. */
		look_at(tids[i], &again, 1);
		if (again.gone) {
			/* The checker's own answers: no handler writes slot i (not signalled). */
			atomic_store(&answers[i], ANSWER_CLEAR);
			continue;
		}
		if (!again.running) {
			int a = check_blocked(&round, tids[i], &again);

			stats.threads_blocked += a != ANSWER_NONE;
			if (a != ANSWER_NONE) {
				atomic_store(&answers[i], (unsigned char)a);
				if (a != ANSWER_CLEAR) {
					looks[i] = again;
					blocked_answer[i] = 1;
				}
				continue;
			}
		}
		memset(&si, 0, sizeof(si));
		si.si_signo = sig;
		si.si_code = SI_QUEUE;
		si.si_pid = pid;
		si.si_uid = getuid();
		si.si_value.sival_ptr = (void *)(((uintptr_t)gen << 32) | i);
		if (syscall(SYS_rt_tgsigqueueinfo, pid, tids[i], sig, &si) < 0)
			atomic_store(&answers[i], ANSWER_CLEAR); /* ESRCH: it exited */
		else
			stats.threads_signalled++;
	}
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		size_t answered = 0;

		for (size_t k = 0; k < npending; k++) /* partner: on_check()'s answer store */
			answered += atomic_load(&answers[pending[k]]) != ANSWER_NONE;
		if (answered == npending || elapsed_ns(&start) >= ANSWER_TIMEOUT_NS)
			break;
		pause_ns(200000);
	}
	/* Close the round; partner: the handler's increment of in_flight, then its load of
	 * round_gen (on_check()).  seq_cst: this store precedes the loads of in_flight below
	 * and in fentry_threads_clear_of() - no handler that missed it is left uncounted. */
	atomic_store(&round_gen, 0);
	for (size_t k = 0; k < npending && v->answer == ANSWER_CLEAR; k++) {
		size_t i = pending[k];
		int a = atomic_load(&answers[i]);

		if (a == ANSWER_CLEAR)
			continue;
		v->answer = a == ANSWER_NONE ? ANSWER_UNSURE : a;
		v->tid = tids[i];
		v->blocked = blocked_answer[i];
		v->nr = looks[i].nr;
		v->why = a == ANSWER_NONE ? "it did not answer the check signal within 1 s "
					    "(signal blocked, or stopped?)" : NULL;
	}
out:
	/* What handlers may read is freed only once none is left in flight (see top);
	 * partner: on_check()'s decrement of in_flight, its last access. */
	for (int t = 0; t < 100 && atomic_load(&in_flight) != 0; t++)
		pause_ns(1000000);
	if (atomic_load(&in_flight) == 0)
		free((void *)answers);
	else
		leftover.answers = answers; /* a handler still runs (stopped?): freed later */
	free(looks);
	free(pending);
	free(blocked_answer);
	free(runs);
}

/* The caller's own stack above `from` (a program thread may call fentry_unload()). */
NO_SANITIZE static int check_self(const struct round *r, uintptr_t from)
{
	return from && check_stack(r, from, 1, 1, 1) == ANSWER_HIT;
}

/* An earlier round's memory, once no handler is in flight any more. */
static void free_leftover(void)
{
	free((void *)leftover.code);
	free((void *)leftover.maps);
	free((void *)leftover.answers);
	if (leftover.mem_fd > 0)
		close(leftover.mem_fd);
	memset(&leftover, 0, sizeof(leftover));
}

static int contains(const pid_t *v, size_t n, pid_t x)
{
	return bsearch(&x, v, n, sizeof(*v), by_tid) != NULL;
}

FENTRY_HIDDEN int fentry_threads_clear_of(const uintptr_t (*ranges)[2], size_t nranges,
					  uintptr_t self_from, const char *what, char *err)
{
	struct range *code = calloc(nranges ? nranges : 1, sizeof(*code));
	pid_t *seen = NULL, *tids = NULL, *fresh = NULL;
	size_t nseen = 0, ntids = 0, nfresh = 0;
	struct map *maps = NULL;
	size_t nmaps = 0;
	struct verdict v = { 0 };
	int sig = check_signal(), tsan = under_tsan(), rc = -1;

	if (!code)
		return fentry_fail(err, "out of memory");
	/* Partner: on_check()'s increment of in_flight; a handler of an earlier round that
	 * has not incremented yet will find round_gen changed and touch nothing. */
	if (atomic_load(&in_flight) != 0) {
		free(code);
		return fentry_fail(err, "busy: a thread is still answering an earlier check "
				   "(stopped in its handler?); %s stays loaded, retry later", what);
	}
	free_leftover();
	if (sig < 0) {
		free(code);
		return fentry_fail(err, "FENTRY_UNLOAD_SIGNAL is not a real-time signal number "
				   "(%d..%d)", SIGRTMIN, SIGRTMAX);
	}
	for (size_t i = 0; i < nranges; i++) {
		code[i].lo = ranges[i][0];
		code[i].hi = ranges[i][1];
	}
	if (!tsan && installed_sig != sig && install(sig, err) < 0) {
		free(code);
		return -1;
	}
	stats.checks++;
	if (read_maps(&maps, &nmaps) < 0) {
		free(code);
		return fentry_fail(err, "busy: cannot read /proc/self/maps; %s stays loaded, retry "
				   "later", what);
	}
	round.code = code;
	round.ncode = nranges;
	round.maps = maps;
	round.nmaps = nmaps;
	round.mem_fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
	if (round.mem_fd < 0) {
		fentry_fail(err, "busy: cannot open /proc/self/mem: %s; %s stays loaded, retry later",
			    strerror(errno), what);
		goto out;
	}
	if (check_self(&round, self_from)) {
		fentry_fail(err, "busy: the calling thread itself may be running %s's code; it "
			    "stays loaded", what);
		goto out;
	}
	/* Threads created during the check are checked too, for a few rounds. */
	for (int r = 0; r <= NEW_THREAD_ROUNDS; r++) {
		free(tids);
		tids = NULL;
		if (list_threads(&tids, &ntids) < 0) {
			fentry_fail(err, "busy: cannot list the process's threads; %s stays loaded, "
				    "retry later", what);
			goto out;
		}
		nfresh = 0;
		free(fresh);
		fresh = calloc(ntids ? ntids : 1, sizeof(*fresh));
		if (!fresh) {
			fentry_fail(err, "out of memory");
			goto out;
		}
		for (size_t i = 0; i < ntids; i++)
			if (!contains(seen, nseen, tids[i]))
				fresh[nfresh++] = tids[i];
		if (nfresh == 0) {
			rc = 0;
			goto out;
		}
		if (r == NEW_THREAD_ROUNDS)
			break;
		check_threads(fresh, nfresh, sig, tsan, &v);
		if (v.answer != ANSWER_CLEAR)
			break;
		free(seen);
		seen = tids; /* every thread listed now has been checked */
		nseen = ntids;
		tids = NULL;
	}
	if (v.answer == ANSWER_HIT && v.blocked && v.nr >= 0)
		fentry_fail(err, "busy: thread %d (blocked in system call %ld) may be running %s's "
			    "code (its stack holds an address in it); it stays loaded, retry later",
			    (int)v.tid, v.nr, what);
	else if (v.answer == ANSWER_HIT && v.blocked)
		fentry_fail(err, "busy: thread %d (stopped) may be running %s's code (its program "
			    "counter or stack holds an address in it); it stays loaded, retry later",
			    (int)v.tid, what);
	else if (v.answer == ANSWER_HIT)
		fentry_fail(err, "busy: thread %d may be running %s's code (its registers or stack "
			    "hold an address in it); it stays loaded, retry later", (int)v.tid, what);
	else if (v.answer == ANSWER_UNSURE)
		fentry_fail(err, "busy: thread %d could not be checked: %s; %s stays loaded, retry "
			    "later", (int)v.tid, v.why ? v.why : "its stack could not be read whole",
			    what);
	else
		fentry_fail(err, "busy: threads kept being created during the check; %s stays "
			    "loaded, retry later", what);
out:
	/* The round is closed (check_threads()); partner: on_check()'s decrement. */
	if (atomic_load(&in_flight) == 0) {
		if (round.mem_fd >= 0)
			close(round.mem_fd);
		free(code);
		free(maps);
	} else { /* a handler still runs: nothing it reads changes until it is done */
		leftover.code = code;
		leftover.maps = maps;
		leftover.mem_fd = round.mem_fd;
	}
	free(seen);
	free(tids);
	free(fresh);
	return rc;
}

FENTRY_HIDDEN void fentry_threads_check_stats(struct fentry_check_stats *out)
{
	*out = stats;
}
