/* sha256_ni.h - SHA-256 blocks with the x86 SHA extensions (sha256_ni.c), for core/sha256.c. */
#ifndef FENTRY_SHA256_NI_H
#define FENTRY_SHA256_NI_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

/* Whether this CPU has the SHA extensions (and SSE4.1, SSSE3); asked once. */
FENTRY_HIDDEN int fentry_sha256_ni_usable(void);
/* Compress `n` 64-byte blocks at `p` into the state `h`; only when usable. */
FENTRY_HIDDEN void fentry_sha256_blocks_ni(uint32_t h[8], const uint8_t *p, size_t n);

#endif /* FENTRY_SHA256_NI_H */
