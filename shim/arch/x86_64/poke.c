/*
 * poke.c - rewriting fentry sites in live code: NOPs, jumps, and the protocol that
 * keeps other threads safe while they run the bytes being changed.
 *
 * Writes go through /proc/self/mem, which writes read-only text without mprotect():
 * the code is never writable and executable at once (no W^X window, works under MDWE).
 *
 * A site is 5 or 6 bytes.  Its forms (bytes before -> after):
 *
 *   call    e8 <rel32>                 |  67 e8 <rel32>
 *   nop     0f 1f 44 00 00             |  67 0f 1f 44 00 00      (unpatched)
 *   jump    e9 <rel32 to trampoline>   |  67 e9 <rel32 to tramp> (patched)
 *
 * The 6-byte forms keep gcc's first byte (the addr32 prefix 67, which the linker put
 * there and which changes nothing for these instructions).  That is for uprobes: a
 * uprobe on a function's entry saves the *file's* first byte and writes it back when it
 * is removed, over whatever the process has there.  With 67 first, what it writes back
 * is what we wrote; and while it is there it runs the file's `67 e8` out of line, which
 * reaches __fentry__, and the dispatch table (which holds jump-mode redirects too, see
 * core/activate.c) sends the call on to the replacement.  A 5-byte site's first byte is e8, which
 * no NOP starts with: in a non-PIE program, use dispatch mode where entry uprobes are
 * placed (docs/security.md).
 *
 * A trampoline (in a page mapped within +-2 GiB of the program) reaches the
 * replacement wherever the patch .so was loaded - usually more than 2 GiB away:
 *
 *   ff 25 00 00 00 00 <target:8>  cc cc     jmp *0(%rip); the 8 bytes ("slot") are
 *                                           the target
 *
 * (A 6-byte `jmp *slot(%rip)` through the trampoline's slot would save one branch -
 * 1.8x -> 1.6x a direct call in benchmarks/ - but its first byte is ff, which a removed
 * uprobe would overwrite with 67, turning the jump into `and $imm32,%eax`.)
 *
 * Trampolines are written once and never changed, one per target, so a thread that
 * has just jumped to one can never find it half-rewritten.
 *
 * Changing live sites (the protocol of text_poke_bp in Linux, for user space):
 *
 *   1. write int3 (cc) over the first byte of every site of the batch; sync cores
 *   2. write the rest of each site's new bytes;                         sync cores
 *   3. write each site's new first byte;                                sync cores
 *
 * "sync cores" is membarrier(PRIVATE_EXPEDITED_SYNC_CORE): every thread of the process
 * executes a serialising instruction before it runs user code again, so none still
 * runs bytes it fetched before the write.  A thread that reaches a site between 1 and
 * 3 executes int3; the SIGTRAP handler sees that the trap address is a known site and
 * rewinds the thread to the site's first byte, so it runs the site again - int3 again
 * until step 3, then the new instruction whole.  The handler never decodes or
 * emulates the bytes (a delayed handler could meet a half-updated copy); it only
 * rewinds, which is right whatever the site holds by then.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/membarrier.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include "arch/x86_64/poke.h"

#define OP_INT3 0xcc
#define OP_JMP_REL32 0xe9
#define TRAMPOLINE_SIZE 16
static const uint8_t NOP5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };       /* nopl 0(%rax,%rax) */
static const uint8_t NOP6[6] = { 0x67, 0x0f, 0x1f, 0x44, 0x00, 0x00 }; /* addr32 nopl 0(%eax,%eax) */
#define OP_ADDR32 0x67
static const uint8_t JMP_RIP_INDIRECT[6] = { 0xff, 0x25, 0x00, 0x00, 0x00, 0x00 };

static int mem_fd = -1;                /* /proc/self/mem of this process            */
static struct sigaction previous_trap; /* the program's SIGTRAP action, chained to  */

/* Trampoline pages: bump-allocated slots, and a small cache from target to slot. */
struct trampoline {
	uintptr_t target, slot;
};
static uintptr_t tramp_page, tramp_next;
static int tramp_written; /* a trampoline was written since the last core sync */
static struct trampoline *tramps;
static size_t ntramps, captramps;

static int sync_cores(void)
{
	return (int)syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
}

static int write_code(uintptr_t addr, const void *bytes, size_t len)
{
	return pwrite(mem_fd, bytes, len, (off_t)addr) == (ssize_t)len ? 0 : -1;
}

static void on_sigtrap(int sig, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = ctx;
	uintptr_t ip = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];

	/* int3 leaves ip after itself: one of our sites being rewritten?  Run it again. */
	if (fentry_site_at(ip - 1) != NULL) {
		uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(ip - 1);
		return;
	}
	/* Not ours: behave as the program asked. */
	if (previous_trap.sa_flags & SA_SIGINFO) {
		previous_trap.sa_sigaction(sig, info, ctx);
	} else if (previous_trap.sa_handler != SIG_IGN && previous_trap.sa_handler != SIG_DFL) {
		previous_trap.sa_handler(sig);
	} else if (previous_trap.sa_handler == SIG_DFL) {
		signal(SIGTRAP, SIG_DFL); /* re-raised when this handler returns: dump core */
		raise(SIGTRAP);
	}
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
	struct sigaction sa;
	long cmds = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);

	if (cmds < 0 || !(cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE))
		return fentry_fail(err, "membarrier(SYNC_CORE) is not available, so live code cannot be "
				   "rewritten safely");
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) < 0)
		return fentry_fail(err, "membarrier registration failed: %s", strerror(errno));
	if (open_mem() < 0)
		return fentry_fail(err, "/proc/self/mem cannot be opened for writing: %s",
				   strerror(errno));
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigtrap;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTRAP, &sa, &previous_trap) < 0)
		return fentry_fail(err, "the SIGTRAP handler could not be installed");
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

static const uint8_t *nop_for(unsigned len)
{
	return len == 5 ? NOP5 : NOP6;
}

/* The bytes a site should hold: its NOP, or a jump to the trampoline at `to`. */
static int site_bytes(const struct fentry_site *s, uintptr_t to, uint8_t out[6])
{
	int64_t rel;
	int32_t rel32;
	unsigned op = s->len == 6 ? 1 : 0; /* 6 bytes: the addr32 prefix first */

	if (to == 0) {
		memcpy(out, nop_for(s->len), s->len);
		return 0;
	}
	rel = (int64_t)to - (int64_t)(s->addr + s->len);
	if (rel < INT32_MIN || rel > INT32_MAX)
		return -1;
	rel32 = (int32_t)rel;
	if (op)
		out[0] = OP_ADDR32;
	out[op] = OP_JMP_REL32;
	memcpy(out + op + 1, &rel32, 4);
	return 0;
}

/*
 * At start, before the program's threads exist: every site becomes its NOP.  Sites are
 * written in runs (one pwrite per run of nearby sites) because nothing else executes
 * them yet; with other threads alive, the batch protocol below is used instead.
 */
FENTRY_HIDDEN int fentry_poke_nop_all_single_threaded(void)
{
	size_t n, i = 0;
	struct fentry_site *s = fentry_sites(&n);
	enum { RUN_MAX = 64 * 1024 };
	uint8_t *buf = malloc(RUN_MAX);

	if (!buf)
		return -1;
	while (i < n) {
		uintptr_t start = s[i].addr;
		size_t j = i;

		while (j < n && s[j].addr + s[j].len - start <= RUN_MAX)
			j++;
		memcpy(buf, (const void *)start, s[j - 1].addr + s[j - 1].len - start);
		for (size_t k = i; k < j; k++)
			memcpy(buf + (s[k].addr - start), nop_for(s[k].len), s[k].len);
		if (write_code(start, buf, s[j - 1].addr + s[j - 1].len - start) < 0) {
			free(buf);
			return -1;
		}
		i = j;
	}
	free(buf);
	return sync_cores();
}

/* Map a page for trampolines within reach of a rel32 jump from every site. */
static int trampoline_page(void)
{
	size_t n;
	struct fentry_site *s = fentry_sites(&n);
	uintptr_t lo = s[0].addr, hi = s[n - 1].addr + 6;
	long page = sysconf(_SC_PAGESIZE);
	const uintptr_t step = 1u << 20, reach = (uintptr_t)1 << 30;

	/* Try 1 MiB steps above the code, then below it, up to 1 GiB away. */
	for (int dir = 0; dir < 2; dir++)
		for (uintptr_t d = step; d < reach; d += step) {
			uintptr_t hint = dir == 0 ? ((hi + d) & ~(uintptr_t)(page - 1))
						  : ((lo - d) & ~(uintptr_t)(page - 1));
			void *p;

			if (dir == 1 && lo < d)
				break;
			p = mmap((void *)hint, (size_t)page, PROT_READ | PROT_EXEC,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
			if (p == MAP_FAILED)
				continue;
			tramp_page = (uintptr_t)p;
			tramp_next = tramp_page;
			return 0;
		}
	return -1;
}

/* The trampoline already written for `target`, or 0; never writes one. */
static uintptr_t trampoline_written_for(uintptr_t target)
{
	for (size_t i = 0; i < ntramps; i++)
		if (tramps[i].target == target)
			return tramps[i].slot;
	return 0;
}

/* The trampoline jumping to `target`: reused if it exists, written once otherwise. */
static uintptr_t trampoline_for(uintptr_t target)
{
	uint8_t code[TRAMPOLINE_SIZE];
	long page = sysconf(_SC_PAGESIZE);

	uintptr_t slot = trampoline_written_for(target);

	if (slot != 0)
		return slot;
	if (ntramps == captramps) {
		size_t cap = captramps ? 2 * captramps : 64;
		struct trampoline *t = realloc(tramps, cap * sizeof(*t));

		if (!t)
			return 0;
		tramps = t;
		captramps = cap;
	}
	if (tramp_page == 0 || tramp_next + TRAMPOLINE_SIZE > tramp_page + (uintptr_t)page)
		if (trampoline_page() < 0)
			return 0;
	memcpy(code, JMP_RIP_INDIRECT, sizeof(JMP_RIP_INDIRECT));
	memcpy(code + 6, &target, 8);
	code[14] = code[15] = OP_INT3;
	if (write_code(tramp_next, code, sizeof(code)) < 0)
		return 0;
	tramp_written = 1;
	tramps[ntramps].target = target;
	tramps[ntramps].slot = tramp_next;
	ntramps++;
	tramp_next += TRAMPOLINE_SIZE;
	return tramp_next - TRAMPOLINE_SIZE;
}

/*
 * What the site is expected to hold now: its NOP, or our jump to its current target.
 * A pure check: a site with a target jumps through the trampoline written when it was
 * pointed there (trampolines are never freed), so none is ever made here.
 */
FENTRY_HIDDEN int fentry_poke_site_is_ours(const struct fentry_site *s)
{
	uint8_t want[6];
	uintptr_t to = s->target ? trampoline_written_for(s->target) : 0;

	if ((s->target && to == 0) || site_bytes(s, to, want) < 0)
		return 0;
	return memcmp((const void *)s->addr, want, s->len) == 0;
}

/*
 * Point every site of `batch` at its `next` target (0 = the NOP) with the three-step
 * protocol above.  Validation happened before: a failure here is an I/O error of
 * /proc/self/mem, after which the sites are put back as they were.
 */
FENTRY_HIDDEN int fentry_poke_batch(struct fentry_site **batch, const uintptr_t *next, size_t n,
				    char *err)
{
	uint8_t (*want)[6] = calloc(n ? n : 1, sizeof(*want));
	static const uint8_t int3 = OP_INT3;
	size_t i;

	if (!want)
		return fentry_fail(err, "out of memory");
	for (i = 0; i < n; i++) {
		uintptr_t to = next[i] ? trampoline_for(next[i]) : 0;

		if ((next[i] && to == 0) || site_bytes(batch[i], to, want[i]) < 0) {
			free(want);
			return fentry_fail(err, "no trampoline within reach of %s's "
					"site (jump mode); use FENTRY_MODE=dispatch", "a function");
		}
	}
	/* New trampolines are visible to every core before any site jumps there. */
	if (tramp_written && sync_cores() < 0)
		goto io_error;
	tramp_written = 0;
	for (i = 0; i < n; i++)
		if (write_code(batch[i]->addr, &int3, 1) < 0)
			goto undo;
	if (sync_cores() < 0)
		goto undo;
	for (i = 0; i < n; i++)
		if (write_code(batch[i]->addr + 1, want[i] + 1, batch[i]->len - 1u) < 0)
			goto undo;
	if (sync_cores() < 0)
		goto undo;
	for (i = 0; i < n; i++)
		if (write_code(batch[i]->addr, want[i], 1) < 0)
			goto undo;
	sync_cores();
	for (i = 0; i < n; i++)
		batch[i]->target = next[i];
	free(want);
	return 0;
undo:
	/* Put every site of the batch back to its old bytes with the same protocol. */
	for (i = 0; i < n; i++) {
		uintptr_t to = batch[i]->target ? trampoline_for(batch[i]->target) : 0;

		site_bytes(batch[i], to, want[i]);
		write_code(batch[i]->addr, &int3, 1);
	}
	sync_cores();
	for (i = 0; i < n; i++)
		write_code(batch[i]->addr + 1, want[i] + 1, batch[i]->len - 1u);
	sync_cores();
	for (i = 0; i < n; i++)
		write_code(batch[i]->addr, want[i], 1);
	sync_cores();
io_error:
	free(want);
	return fentry_fail(err, "cannot rewrite code through /proc/self/mem: %s",
			strerror(errno));
}
