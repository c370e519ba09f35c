/*
 * module.c - the modules of the running process: their build-ids and load bases.
 */
#include <elf.h>
#include <limits.h>
#include <link.h>
#include <string.h>
#include <unistd.h>

#include "core/module.h"

struct search {
	const uint8_t *id; /* build-id wanted, or NULL for the main program */
	uint32_t len;
	struct fentry_module *out;
	int found;
};

/* Copy the GNU build-id note of one loaded object into m; 0 if it has one. */
static int read_build_id(const struct dl_phdr_info *info, struct fentry_module *m)
{
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		const char *p, *end;

		if (ph->p_type != PT_NOTE)
			continue;
		p = (const char *)(info->dlpi_addr + ph->p_vaddr);
		end = p + ph->p_memsz;
		while (p + sizeof(ElfW(Nhdr)) <= end) {
			const ElfW(Nhdr) *n = (const ElfW(Nhdr) *)p;
			size_t name_sz = (n->n_namesz + 3u) & ~3u;
			size_t desc_sz = (n->n_descsz + 3u) & ~3u;
			const char *name = p + sizeof(*n);
			const uint8_t *desc = (const uint8_t *)name + name_sz;

			if ((const char *)desc + desc_sz > end)
				break;
			if (n->n_type == NT_GNU_BUILD_ID && n->n_namesz == 4 &&
			    memcmp(name, "GNU", 4) == 0 && n->n_descsz <= FENTRY_BUILD_ID_MAX) {
				memcpy(m->build_id, desc, n->n_descsz);
				m->build_id_len = n->n_descsz;
				return 0;
			}
			p = (const char *)desc + desc_sz;
		}
	}
	return -1;
}

static int visit(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct search *s = arg;
	struct fentry_module m;
	int is_main = info->dlpi_name == NULL || info->dlpi_name[0] == '\0';

	(void)size;
	if (s->id == NULL && !is_main)
		return 0;
	memset(&m, 0, sizeof(m));
	if (read_build_id(info, &m) < 0 && s->id != NULL)
		return 0;
	if (s->id != NULL && (m.build_id_len != s->len || memcmp(m.build_id, s->id, s->len) != 0))
		return 0;
	m.base = info->dlpi_addr;
	if (is_main) {
		ssize_t n = readlink("/proc/self/exe", m.path, sizeof(m.path) - 1);
		m.path[n > 0 ? n : 0] = '\0';
	} else {
		strncpy(m.path, info->dlpi_name, sizeof(m.path) - 1);
	}
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t start = info->dlpi_addr + ph->p_vaddr, end = start + ph->p_memsz;

		if (ph->p_type != PT_LOAD)
			continue;
		if (m.nload < FENTRY_MODULE_SEGMENTS) {
			m.load[m.nload].start = start;
			m.load[m.nload++].end = end;
		}
		if ((ph->p_flags & PF_X) && m.nexec < FENTRY_MODULE_SEGMENTS) {
			m.exec[m.nexec].start = start;
			m.exec[m.nexec++].end = end;
		}
	}
	*s->out = m;
	s->found = 1;
	return 1;
}

FENTRY_HIDDEN int fentry_module_by_build_id(const uint8_t *id, uint32_t len,
					    struct fentry_module *out)
{
	struct search s = { .id = id, .len = len, .out = out, .found = 0 };

	if (len == 0)
		return -1;
	dl_iterate_phdr(visit, &s);
	return s.found ? 0 : -1;
}

FENTRY_HIDDEN int fentry_module_main(struct fentry_module *out)
{
	struct search s = { .id = NULL, .len = 0, .out = out, .found = 0 };

	dl_iterate_phdr(visit, &s);
	return s.found ? 0 : -1;
}

FENTRY_HIDDEN int fentry_module_contains_code(const struct fentry_module *m, uintptr_t addr,
					      size_t len)
{
	for (unsigned i = 0; i < m->nexec; i++)
		if (addr >= m->exec[i].start && addr + len <= m->exec[i].end && addr + len > addr)
			return 1;
	return 0;
}

FENTRY_HIDDEN int fentry_module_contains(const struct fentry_module *m, uintptr_t addr,
					 size_t len)
{
	for (unsigned i = 0; i < m->nload; i++)
		if (addr >= m->load[i].start && addr + len <= m->load[i].end && addr + len >= addr)
			return 1;
	return 0;
}

FENTRY_HIDDEN void fentry_hex(const uint8_t *id, uint32_t len, char *buf)
{
	static const char digits[] = "0123456789abcdef";

	for (uint32_t i = 0; i < len; i++) {
		buf[2 * i] = digits[id[i] >> 4];
		buf[2 * i + 1] = digits[id[i] & 15];
	}
	buf[2 * len] = '\0';
}
