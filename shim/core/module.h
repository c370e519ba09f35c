/* module.h - the modules of the running process: their build-ids and load bases (module.c). */
#ifndef FENTRY_MODULE_H
#define FENTRY_MODULE_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"
#include "fentry.h"

#define FENTRY_MODULE_SEGMENTS 8

struct fentry_module {
	uintptr_t base;                  /* load bias: runtime address = base + st_value */
	char path[4096];                 /* file name; the main program's from /proc/self/exe */
	uint8_t build_id[FENTRY_BUILD_ID_MAX];
	uint32_t build_id_len;
	unsigned nexec;                  /* executable PT_LOAD segments, for bounds checks */
	struct { uintptr_t start, end; } exec[FENTRY_MODULE_SEGMENTS];
	unsigned nload;                  /* every PT_LOAD segment (data references)       */
	struct { uintptr_t start, end; } load[FENTRY_MODULE_SEGMENTS];
};

/* Find the loaded module whose GNU build-id is `id`; 0 when found, -1 otherwise. */
FENTRY_HIDDEN int fentry_module_by_build_id(const uint8_t *id, uint32_t len,
					    struct fentry_module *out);
/* The main program. */
FENTRY_HIDDEN int fentry_module_main(struct fentry_module *out);
/* 1 if [addr, addr+len) lies inside one executable segment of m. */
FENTRY_HIDDEN int fentry_module_contains_code(const struct fentry_module *m, uintptr_t addr,
					      size_t len);
/* 1 if [addr, addr+len) lies inside one loaded segment of m. */
FENTRY_HIDDEN int fentry_module_contains(const struct fentry_module *m, uintptr_t addr,
					 size_t len);
/* Hex of a build-id into buf (at least 2*len+1 bytes). */
FENTRY_HIDDEN void fentry_hex(const uint8_t *id, uint32_t len, char *buf);

#endif /* FENTRY_MODULE_H */
