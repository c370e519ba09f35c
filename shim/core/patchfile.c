/* patchfile.c - a patch file's sealed private copy (memfd), its SHA-256, and the object loaded from it. */
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "core/codes.h"
#include "core/patchfile.h"
#include "fentry.h"

#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U /* Linux 6.3: this memfd may be executed (vm.memfd_noexec) */
#endif

#define COPY_CHUNK (64 * 1024)
#define PATCH_SIZE_MAX ((uint64_t)1 << 30) /* no patch is a gigabyte */
#define NAME_SPELLINGS 64                    /* tries at a name no loaded object has */
#define FD_NAME_MIN 1000                     /* the copy's descriptor: see new_memfd() */

/* One line into err (whatever dlerror() or a path held); returns -code (core/codes.h). */
static int fail_as(char *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail_as(char *err, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, FENTRY_ERR_MAX, fmt, ap);
	va_end(ap);
	for (char *p = err; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	return -code;
}

/* Everything wrong with the file itself, or with reading it. */
#define fail(err, ...) fail_as(err, FENTRY_E_BAD_FILE, __VA_ARGS__)

/*
 * Open the patch file and check it through the descriptor: a regular file (not a
 * symlink, directory or FIFO), not writable by group or others, owned by us or root, on
 * a file system that allows executing it.
 */
static int open_checked(const char *path, struct stat *st, char *err)
{
	struct statvfs fs;
	int rc, fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);

	if (fd < 0) {
		if (errno == ELOOP)
			return fail(err, "%s: is a symbolic link; pass the path of the file itself", path);
		return fail(err, "%s: cannot open: %s", path, strerror(errno));
	}
	if (fstat(fd, st) < 0)
		rc = fail(err, "%s: cannot stat: %s", path, strerror(errno));
	else if (!S_ISREG(st->st_mode))
		rc = fail(err, "%s: not a regular file", path);
	else if (st->st_mode & (S_IWGRP | S_IWOTH))
		rc = fail(err, "%s: writable by group or others (mode %03o); chmod go-w it", path,
		     (unsigned)(st->st_mode & 0777));
	else if (st->st_uid != geteuid() && st->st_uid != 0)
		rc = fail(err, "%s: owned by uid %u, not by this process's uid %u or root", path,
		     (unsigned)st->st_uid, (unsigned)geteuid());
	else if (fstatvfs(fd, &fs) == 0 && (fs.f_flag & ST_NOEXEC))
		/* The private copy is executable wherever the file lies: keep the mount's word. */
		rc = fail(err, "%s: on a file system mounted noexec, where nothing may be executed; "
		     "keep patches elsewhere", path);
	else if ((uint64_t)st->st_size > PATCH_SIZE_MAX)
		rc = fail(err, "%s: %llu bytes is too large for a patch", path,
		     (unsigned long long)st->st_size);
	else
		return fd;
	close(fd);
	return rc;
}

static int new_memfd(const char *path, char *err)
{
	const char *base = strrchr(path, '/');
	char name[64];
	int fd, high;

	/* The name shows in /proc/PID/maps and /proc/PID/fd as "/memfd:fentry:fix.so". */
	snprintf(name, sizeof(name), "fentry:%.40s", base ? base + 1 : path);
	fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC);
	if (fd < 0 && errno == EINVAL) /* a kernel before 6.3 has no MFD_EXEC: exec is the default */
		fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return fail(err, "%s: cannot make its private copy: memfd_create: %s%s", path,
			    strerror(errno), errno == EACCES ? " (vm.memfd_noexec forbids executable "
			    "memfds: set it to 0 or 1)" : "");
	/* A high number, so that a debugger reading "/proc/self/fd/N" meets nothing: see
	 * show_as().  Where the descriptor limit is lower, the number memfd_create gave. */
	high = fcntl(fd, F_DUPFD_CLOEXEC, FD_NAME_MIN);
	if (high >= 0) {
		close(fd);
		fd = high;
	}
	return fd;
}

/*
 * Grow the descriptor table to FD_NAME_MIN now, while the process has one thread.  The
 * kernel grows a table shared by several threads only after an RCU grace period
 * (synchronize_rcu() in expand_fdtable(): 8 ms measured here), which the first
 * new_memfd() of a multi-threaded process - every process with the control thread -
 * would otherwise wait for.  A table never shrinks, so this is paid once, without the
 * wait; where the descriptor limit is lower, dup fails and nothing changes.
 */
FENTRY_HIDDEN void fentry_patchfile_init(void)
{
	int fd = -1, own = -1;

	for (int std = 0; std <= 2 && fd < 0; std++)
		fd = fcntl(std, F_DUPFD_CLOEXEC, FD_NAME_MIN);
	if (fd < 0 && errno == EBADF) { /* no standard descriptor open: borrow one */
		own = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (own >= 0)
			fd = fcntl(own, F_DUPFD_CLOEXEC, FD_NAME_MIN);
	}
	if (fd >= 0)
		close(fd);
	if (own >= 0)
		close(own);
}

/* Writes change a file's size or mtime (links and chmod change only its ctime). */
static int same_contents_state(const struct stat *a, const struct stat *b)
{
	return a->st_size == b->st_size && a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
	       a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/*
 * Copy the file behind `fd` (st: its state when checked) into memfd, hashing each chunk
 * while it is in the cache: `h` ends as the SHA-256 of exactly the bytes written, which the
 * seal then fixes (nobody else holds the memfd; whoever could write it through
 * /proc/PID/fd may ptrace the process anyway).  -1 if the file changed meanwhile.
 */
static int copy_into(int fd, const struct stat *st, int memfd, struct fentry_sha256 *h,
		     const char *path, char *err)
{
	char *buf = malloc(COPY_CHUNK);
	uint64_t done = 0;
	struct stat after;
	ssize_t n;

	if (!buf)
		return fail(err, "%s: out of memory", path);
	while ((n = pread(fd, buf, COPY_CHUNK, (off_t)done)) > 0) {
		fentry_sha256_update(h, buf, (size_t)n);
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(memfd, buf + off, (size_t)(n - off));

			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				free(buf);
				return fail(err, "%s: cannot write its private copy: %s", path,
					    strerror(errno));
			}
			off += w;
		}
		done += (uint64_t)n;
		if (done > PATCH_SIZE_MAX)
			break;
	}
	free(buf);
	if (n < 0)
		return fail(err, "%s: cannot read: %s", path, strerror(errno));
	/* A file rewritten while we read it gives a copy of neither version: refuse it. */
	if (fstat(fd, &after) < 0 || !same_contents_state(st, &after) || done != (uint64_t)st->st_size)
		return fail(err, "%s: the file changed while it was being read (a build or copy "
			    "still writing it?); apply it again once it is complete", path);
	return 0;
}

/* ---- checks on the copy ---------------------------------------------------------------- */

/* [off, off + len) lies inside a file of `size` bytes. */
static int inside(uint64_t off, uint64_t len, uint64_t size)
{
	return off <= size && len <= size - off;
}

/*
 * An x86-64 shared object whose segments lie inside the file: dlopen() maps segments as
 * their headers say, and a segment running past the end of a (truncated) file would
 * kill the process with SIGBUS on first touch.
 */
static int check_headers(const uint8_t *m, uint64_t size, const char *path, char *err)
{
	const Elf64_Ehdr *eh = (const Elf64_Ehdr *)m;

	if (size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0)
		return fail(err, "%s: not an ELF file", path);
	if (eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64 ||
	    eh->e_type != ET_DYN)
		return fail(err, "%s: not an x86-64 shared object", path);
	if (eh->e_phentsize != sizeof(Elf64_Phdr) || eh->e_phnum == 0 ||
	    !inside(eh->e_phoff, (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr), size) ||
	    eh->e_phoff % 8 != 0)
		return fail(err, "%s: truncated or corrupt: its program headers lie past the end "
			    "of the file", path);
	for (unsigned i = 0; i < eh->e_phnum; i++) {
		const Elf64_Phdr *ph = (const Elf64_Phdr *)(m + eh->e_phoff) + i;

		if (ph->p_type == PT_LOAD && !inside(ph->p_offset, ph->p_filesz, size))
			return fail(err, "%s: truncated: a segment ends at byte %llu but the file "
				    "has %llu bytes; rebuild or copy the patch again", path,
				    (unsigned long long)(ph->p_offset + ph->p_filesz),
				    (unsigned long long)size);
	}
	return 0;
}

/* The address space dlopen() maps for it: from its first PT_LOAD's page to its last's end. */
static uint64_t load_span(const uint8_t *m)
{
	const Elf64_Ehdr *eh = (const Elf64_Ehdr *)m;
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), lo = UINT64_MAX, hi = 0;

	for (unsigned i = 0; i < eh->e_phnum; i++) {
		const Elf64_Phdr *ph = (const Elf64_Phdr *)(m + eh->e_phoff) + i;

		if (ph->p_type != PT_LOAD || ph->p_vaddr + ph->p_memsz < ph->p_vaddr)
			continue;
		lo = ph->p_vaddr < lo ? ph->p_vaddr : lo;
		hi = ph->p_vaddr + ph->p_memsz > hi ? ph->p_vaddr + ph->p_memsz : hi;
	}
	if (hi <= lo || hi > UINT64_MAX - page)
		return 0;
	return ((hi + page - 1) & ~(page - 1)) - (lo & ~(page - 1));
}

/*
 * The dynamic symbol table defines the descriptor FENTRY_PATCH_SYMBOL.  Checked before
 * dlopen(), so that a mistaken `apply libc.so.6` never runs the library's constructors.
 */
static int check_descriptor_symbol(const uint8_t *m, uint64_t size, const char *path, char *err)
{
	const Elf64_Ehdr *eh = (const Elf64_Ehdr *)m;
	const Elf64_Shdr *sh;
	static const char want[] = FENTRY_PATCH_SYMBOL;

	if (eh->e_shnum == 0 || eh->e_shentsize != sizeof(Elf64_Shdr) || eh->e_shoff % 8 != 0 ||
	    !inside(eh->e_shoff, (uint64_t)eh->e_shnum * sizeof(Elf64_Shdr), size))
		return fail(err, "%s: no readable section headers; build patches with the fentry "
			    "generator", path);
	sh = (const Elf64_Shdr *)(m + eh->e_shoff);
	for (unsigned i = 0; i < eh->e_shnum; i++) {
		const Elf64_Shdr *symtab = &sh[i], *strtab;
		const char *strings;

		if (symtab->sh_type != SHT_DYNSYM)
			continue;
		if (symtab->sh_entsize != sizeof(Elf64_Sym) || symtab->sh_offset % 8 != 0 ||
		    !inside(symtab->sh_offset, symtab->sh_size, size) || symtab->sh_link >= eh->e_shnum)
			break;
		strtab = &sh[symtab->sh_link];
		if (strtab->sh_type != SHT_STRTAB || !inside(strtab->sh_offset, strtab->sh_size, size))
			break;
		strings = (const char *)m + strtab->sh_offset;
		for (uint64_t k = 0; k < symtab->sh_size / sizeof(Elf64_Sym); k++) {
			const Elf64_Sym *s = (const Elf64_Sym *)(m + symtab->sh_offset) + k;

			if (s->st_shndx == SHN_UNDEF || ELF64_ST_TYPE(s->st_info) != STT_OBJECT ||
			    s->st_name >= strtab->sh_size ||
			    strtab->sh_size - s->st_name < sizeof(want))
				continue;
			if (memcmp(strings + s->st_name, want, sizeof(want)) == 0)
				return 0;
		}
		break;
	}
	return fail_as(err, FENTRY_E_BAD_PATCH, "%s: not a fentry patch: its dynamic symbols "
		       "define no %s; build patches with the fentry generator", path,
		       FENTRY_PATCH_SYMBOL);
}

/* Check the sealed copy (it cannot change or shrink any more). */
static int check_copy(struct fentry_patchfile *pf, const char *path, char *err)
{
	const uint8_t *m;
	int rc;

	if (pf->size == 0)
		return fail(err, "%s: not an ELF file (it is empty)", path);
	m = mmap(NULL, pf->size, PROT_READ, MAP_PRIVATE, pf->memfd, 0);
	if (m == MAP_FAILED)
		return fail(err, "%s: cannot map its private copy: %s", path, strerror(errno));
	rc = check_headers(m, pf->size, path, err);
	if (rc == 0)
		rc = check_descriptor_symbol(m, pf->size, path, err);
	if (rc == 0)
		pf->span = load_span(m);
	munmap((void *)m, pf->size);
	return rc;
}

FENTRY_HIDDEN int fentry_patchfile_copy(const char *path, struct fentry_patchfile *pf, char *err)
{
	struct fentry_sha256 h;
	struct stat st;
	int fd, rc;

	memset(pf, 0, sizeof(*pf));
	pf->memfd = -1;
	fd = open_checked(path, &st, err);
	if (fd < 0)
		return fd;
	rc = pf->memfd = new_memfd(path, err);
	fentry_sha256_init(&h);
	if (rc >= 0)
		rc = copy_into(fd, &st, pf->memfd, &h, path, err);
	close(fd);
	if (rc < 0)
		goto bad;
	/* From here on the copy can change no more: not written, not shrunk, not grown. */
	if (fcntl(pf->memfd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		rc = fail(err, "%s: cannot seal its private copy: %s", path, strerror(errno));
		goto bad;
	}
	pf->size = (uint64_t)st.st_size;
	pf->mtime = st.st_mtim;
	fentry_sha256_final(&h, pf->sha256);
	for (int i = 0; i < FENTRY_SHA256_BYTES; i++)
		snprintf(pf->sha256_hex + 2 * i, 3, "%02x", pf->sha256[i]);
	rc = check_copy(pf, path, err);
	if (rc < 0)
		goto bad;
	return 0;
bad:
	fentry_patchfile_close(pf);
	return rc;
}

/* ---- loading the copy --------------------------------------------------------------- */

struct bases {
	uintptr_t *v;
	size_t n, cap;
	int oom;
};

static int collect_base(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct bases *b = arg;

	(void)size;
	if (b->n == b->cap) {
		size_t cap = b->cap ? 2 * b->cap : 64;
		uintptr_t *v = realloc(b->v, cap * sizeof(*v));

		if (!v) {
			b->oom = 1;
			return 1;
		}
		b->v = v;
		b->cap = cap;
	}
	b->v[b->n++] = info->dlpi_addr;
	return 0;
}

static int has_base(const struct bases *b, uintptr_t base)
{
	for (size_t i = 0; i < b->n; i++)
		if (b->v[i] == base)
			return 1;
	return 0;
}

/*
 * A name for dlopen() that names our copy and that no loaded object answers to.  glibc
 * matches a name against every name a loaded object was opened by, even after that
 * object's descriptor is closed: an object that outlived dlclose() (-z nodelete,
 * STB_GNU_UNIQUE symbols, a library the program uses) would be handed back instead of
 * our copy.  So the name is /proc/self/fd/N spelled with as many "./" as it takes to be
 * new.  (Never /proc/<pid>/...: in a pid namespace that shares its parent's /proc, that
 * names another process.)
 */
static int fresh_name(int fd, char *name, size_t size)
{
	for (int k = 0; k < NAME_SPELLINGS; k++) {
		size_t len = (size_t)snprintf(name, size, "/proc/self/fd/");
		void *old;

		for (int i = 0; i < k && len + 2 < size; i++)
			len += (size_t)snprintf(name + len, size - len, "./");
		snprintf(name + len, size - len, "%d", fd);
		old = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
		if (!old)
			return 0;
		dlclose(old); /* RTLD_NOLOAD counted a reference */
	}
	return -1;
}

/*
 * What debuggers see.  gdb reads each object's link-map name (struct link_map l_name,
 * <link.h>) and opens that path in *its own* process, where /proc/self/fd/N is one of
 * gdb's own descriptors (a pipe it would block on forever).  So once the object is
 * loaded its l_name becomes the path the patch was applied from: a gdb that attaches
 * later, a core file, dladdr() and backtrace_symbols() name and read the real file.
 * glibc keeps matching later dlopen() names against the name it opened the object by
 * (kept apart, in l_libname).  A gdb already attached while the patch loads reads the
 * name once, at the dynamic linker's event, as /proc/self/fd/N: N is at least
 * FD_NAME_MIN, a descriptor gdb does not have, so it warns instead of hanging, and its
 * `sharedlibrary` command reads the new name.  The pointer store is atomic: readers see
 * the old or the new string, both valid.  Readers: any thread in dladdr(),
 * dl_iterate_phdr() (dlpi_name) or backtrace_symbols() - glibc loads l_name under its
 * own locks, which we do not take - and debuggers while the process is stopped.
 * Release: the string is written (strdup) before the pointer; glibc's plain load of
 * l_name then of the string is ordered on x86-64 (and by the address dependency).
 */
static void show_as(struct fentry_patchfile *pf, struct link_map *lm, const char *path)
{
	char *shown = strdup(path);

	if (!shown)
		return;
	pf->loader_name = lm->l_name;
	pf->shown_name = shown;
	__atomic_store_n(&lm->l_name, shown, __ATOMIC_RELEASE);
}

FENTRY_HIDDEN int fentry_patchfile_load(struct fentry_patchfile *pf, const char *path,
					struct fentry_near *near, const char **near_why, char *err)
{
	struct bases before = { 0 };
	struct link_map *lm = NULL;
	char name[64 + 2 * NAME_SPELLINGS];
	const char *why;

	if (fresh_name(pf->memfd, name, sizeof(name)) < 0)
		return fail(err, "%s: cannot load: every spelling of /proc/self/fd/%d names an object "
			    "loaded before", path, pf->memfd);
	dl_iterate_phdr(collect_base, &before);
	if (before.oom) {
		free(before.v);
		return fail(err, "%s: out of memory", path);
	}
	if (near) {
		near->span = pf->span;
		*near_why = fentry_near_hold(near);
	}
	pf->handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
	if (near)
		fentry_near_release(near); /* an empty hold when it was not steered */
	if (!pf->handle) {
		const char *s;

		why = dlerror();
		s = why ? strstr(why, name) : NULL;
		/* dlerror() names our /proc path; skip it, the message names the patch. */
		if (s && (s = strstr(s, ": ")) != NULL)
			why = s + 2;
		free(before.v);
		return fail(err, "%s: cannot load: %s", path, why ? why : "unknown error");
	}
	/* Prove it is our copy, not an object the process had already. */
	if (dlinfo(pf->handle, RTLD_DI_LINKMAP, &lm) < 0 || lm == NULL || lm->l_addr == 0 ||
	    has_base(&before, lm->l_addr)) {
		free(before.v);
		dlclose(pf->handle);
		pf->handle = NULL;
		return fail(err, "%s: cannot load: the dynamic linker returned an object loaded "
			    "before instead of this file's copy", path);
	}
	free(before.v);
	pf->base = lm->l_addr;
	show_as(pf, lm, path);
	return 0;
}

FENTRY_HIDDEN void fentry_patchfile_close(struct fentry_patchfile *pf)
{
	struct link_map *lm = NULL;

	if (pf->handle) {
		/* glibc frees l_name in dlclose(): give it back its own string first (release,
		 * for the same readers as show_as(); glibc's string was written long before). */
		if (pf->loader_name && dlinfo(pf->handle, RTLD_DI_LINKMAP, &lm) == 0 && lm)
			__atomic_store_n(&lm->l_name, pf->loader_name, __ATOMIC_RELEASE);
		dlclose(pf->handle);
	}
	free(pf->shown_name); /* readers under glibc's locks are done: dlclose() took them */
	if (pf->memfd >= 0)
		close(pf->memfd);
	memset(pf, 0, sizeof(*pf));
	pf->memfd = -1;
}

struct segments {
	uintptr_t base;
	uintptr_t (*out)[2];
	size_t max, n;
	uint64_t mapped;
};

static int find_segments(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct segments *c = arg;
	long page = sysconf(_SC_PAGESIZE);

	(void)size;
	if (info->dlpi_addr != c->base)
		return 0;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;

		if (ph->p_type != PT_LOAD)
			continue;
		c->mapped += ((hi + (uintptr_t)page - 1) & ~((uintptr_t)page - 1)) -
			     (lo & ~((uintptr_t)page - 1));
		if (!(ph->p_flags & PF_X))
			continue;
		if (c->n < c->max) {
			c->out[c->n][0] = lo;
			c->out[c->n][1] = hi;
		}
		c->n++;
	}
	return 1;
}

FENTRY_HIDDEN size_t fentry_patchfile_code(const struct fentry_patchfile *pf, uintptr_t (*out)[2],
					   size_t max)
{
	struct segments c = { .base = pf->base, .out = out, .max = max };

	if (pf->handle)
		dl_iterate_phdr(find_segments, &c);
	return c.n;
}

FENTRY_HIDDEN uint64_t fentry_patchfile_mapped_bytes(const struct fentry_patchfile *pf)
{
	struct segments c = { .base = pf->base };

	if (pf->handle)
		dl_iterate_phdr(find_segments, &c);
	return c.mapped;
}
