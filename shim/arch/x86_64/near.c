/*
 * near.c - loading a patch within reach of a rel32 jump from the program's code.
 *
 * A patched site is `jmp rel32` (sites.h): it reaches 2 GiB each way.  glibc's dlopen()
 * lets the kernel choose where an object goes (it passes no address hint for an object
 * loaded into a position-independent program), and the kernel's top-down search puts it
 * just below the other shared objects - terabytes above a PIE program.  The site's jump
 * then goes through a trampoline's indirect jump: two taken branches, one of them
 * indirect (benchmarks/RESULTS.md, site forms: 2.00x a direct call; a direct jump to code
 * within reach, 1.20x).
 *
 * So, for the length of one dlopen(), every free gap between the program and the top of
 * the mmap area that could hold the object is reserved - PROT_NONE, MAP_NORESERVE: address
 * space, no memory - and the kernel's search, which takes the highest gap that fits, comes
 * down past them to the first gap below the program.  The reservations are given back as
 * soon as dlopen() returns.  The object is the same object glibc always loads (the sealed
 * copy, checked before), only placed elsewhere.
 *
 * What the window does to the rest of the process (it lasts one dlopen(), about a
 * millisecond), and the rules that keep that harmless:
 *   - Another thread's mmap() in the window lands below the program instead of below the
 *     libraries.  There must be room there: at least NEAR_MIN_ROOM free below the program
 *     (a PIE program sits above tens of terabytes of free space; a non-PIE one at 4 MiB
 *     has none: not steered).
 *   - Reservations count against RLIMIT_AS: not steered when it is set.
 *   - Each reservation is a mapping: not steered when vm.max_map_count is near.
 *   - The gap under [stack] is the stack's room to grow and lies above the mmap area: it
 *     is never reserved, nor anything above the highest mapping under the stack.
 *   - MAP_FIXED_NOREPLACE: a reservation never replaces anything; a gap another thread
 *     filled meanwhile is skipped (the object may then land farther: checked after).
 *   - The gap above [heap] is reserved too: a brk() inside the window (another thread's,
 *     or a malloc() of dlopen() itself) fails, and glibc's malloc then takes that memory
 *     from mmap() (it handles a failed brk, and later brk() calls work again).
 * Whether the object did land within reach is checked after the load, site by site
 * (poke.c): a site it does not reach goes through the trampoline, as before.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "arch/x86_64/near.h"

#define NEAR_MIN_ROOM ((uintptr_t)1 << 40) /* free below the program: 1 TiB          */
#define MAP_COUNT_SLACK 1024                /* mappings left for the rest of the process */

struct maps {
	uintptr_t (*v)[2]; /* [start, end), in address order */
	size_t n;
	uintptr_t stack_lo; /* start of [stack]; UINTPTR_MAX if none */
};

/* All of a /proc file (its size is unknown until read); NUL-terminated, or NULL. */
static char *slurp(const char *path, size_t *len)
{
	size_t cap = 64 * 1024, used = 0;
	char *buf = malloc(cap), *grown;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t got;

	if (fd < 0 || !buf)
		goto fail;
	while ((got = read(fd, buf + used, cap - used - 1)) != 0) {
		if (got < 0) {
			if (errno == EINTR)
				continue;
			goto fail;
		}
		used += (size_t)got;
		if (cap - used - 1 == 0) {
			grown = realloc(buf, 2 * cap);
			if (!grown)
				goto fail;
			buf = grown;
			cap *= 2;
		}
	}
	close(fd);
	buf[used] = '\0';
	*len = used;
	return buf;
fail:
	if (fd >= 0)
		close(fd);
	free(buf);
	return NULL;
}

/* This process's mappings, as /proc/self/maps lists them (in address order). */
static int read_maps(struct maps *m)
{
	size_t len, lines = 0;
	char *text = slurp("/proc/self/maps", &len), *line, *next;

	m->v = NULL;
	m->n = 0;
	m->stack_lo = UINTPTR_MAX;
	if (!text)
		return -1;
	for (size_t i = 0; i < len; i++)
		lines += text[i] == '\n';
	m->v = malloc((lines + 1) * sizeof(*m->v));
	if (!m->v) {
		free(text);
		return -1;
	}
	for (line = text; *line; line = next) {
		char *end = strchr(line, '\n'), *dash;

		next = end ? end + 1 : line + strlen(line);
		if (end)
			*end = '\0';
		m->v[m->n][0] = (uintptr_t)strtoull(line, &dash, 16);
		if (*dash != '-')
			continue;
		m->v[m->n][1] = (uintptr_t)strtoull(dash + 1, NULL, 16);
		if (strstr(line, " [stack]"))
			m->stack_lo = m->v[m->n][0];
		m->n++;
	}
	free(text);
	return 0;
}

static long max_map_count(void)
{
	size_t len;
	char *text = slurp("/proc/sys/vm/max_map_count", &len);
	long v = text ? strtol(text, NULL, 10) : 0;

	free(text);
	return v > 0 ? v : 65530; /* the kernel's default */
}

FENTRY_HIDDEN int fentry_near_reaches(uintptr_t lo, uintptr_t hi, uintptr_t a, uintptr_t b)
{
	uintptr_t from = a < lo ? a : lo, to = b > hi ? b : hi;

	return to - from <= FENTRY_NEAR_REACH;
}

/* The reason, with everything made so far given back. */
static const char *give_up(struct fentry_near *n, struct maps *m, const char *why)
{
	fentry_near_release(n);
	free(m->v);
	return why;
}

FENTRY_HIDDEN const char *fentry_near_hold(struct fentry_near *n)
{
	struct rlimit as;
	struct maps m;
	uintptr_t top = 0, room = 0;
	size_t want = 0;

	n->held = NULL;
	n->nheld = 0;
	if (n->hi == 0 || n->span == 0)
		return "the program's code is not known";
	if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY)
		return "RLIMIT_AS is set: reserving address space to steer the load could make "
		       "another thread's mmap() fail";
	if (read_maps(&m) < 0)
		return "/proc/self/maps cannot be read";
	if (m.stack_lo == UINTPTR_MAX)
		return give_up(n, &m, "/proc/self/maps shows no [stack]: the top of the mmap area "
			       "is not known");
	for (size_t i = 0; i < m.n; i++) {
		uintptr_t gap_lo = i ? m.v[i - 1][1] : 0, gap_hi = m.v[i][0];

		if (m.v[i][1] <= m.stack_lo && m.v[i][1] > top)
			top = m.v[i][1];
		if (gap_hi <= n->lo && gap_hi - gap_lo > room)
			room = gap_hi - gap_lo;
	}
	if (room < NEAR_MIN_ROOM)
		return give_up(n, &m, "the program lies low in the address space (not PIE?): no "
			       "room below it for other threads' mappings while the patch loads");
	for (size_t i = 1; i < m.n; i++)
		want += m.v[i - 1][1] >= n->lo && m.v[i][0] <= top &&
			m.v[i][0] - m.v[i - 1][1] >= n->span;
	if (m.n + want + MAP_COUNT_SLACK > (size_t)max_map_count())
		return give_up(n, &m, "the process has too many mappings (vm.max_map_count) to "
			       "reserve the address space that steers the load");
	n->held = malloc((want ? want : 1) * sizeof(*n->held));
	if (!n->held)
		return give_up(n, &m, "out of memory");
	for (size_t i = 1; i < m.n; i++) {
		uintptr_t lo = m.v[i - 1][1], hi = m.v[i][0];
		void *p;

		if (lo < n->lo || hi > top || hi - lo < n->span)
			continue;
		p = mmap((void *)lo, hi - lo, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
		if (p == MAP_FAILED && errno == EEXIST)
			continue; /* filled meanwhile: where the object lands is checked after */
		if (p == MAP_FAILED)
			return give_up(n, &m, "mmap() of address space to steer the load is refused "
				       "(a seccomp filter, or no memory for the mapping)");
		if ((uintptr_t)p != lo) { /* a kernel older than 4.17 took it as a hint */
			munmap(p, hi - lo);
			return give_up(n, &m, "this kernel has no MAP_FIXED_NOREPLACE");
		}
		n->held[n->nheld][0] = lo;
		n->held[n->nheld][1] = hi;
		n->nheld++;
	}
	free(m.v);
	return NULL;
}

FENTRY_HIDDEN void fentry_near_release(struct fentry_near *n)
{
	for (size_t i = 0; i < n->nheld; i++)
		munmap((void *)n->held[i][0], n->held[i][1] - n->held[i][0]);
	free(n->held);
	n->held = NULL;
	n->nheld = 0;
}
