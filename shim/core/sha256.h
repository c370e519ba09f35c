/* sha256.h - SHA-256 (FIPS 180-4) of a patch file as the loader copies it (sha256.c). */
#ifndef FENTRY_SHA256_H
#define FENTRY_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "core/util.h"

#define FENTRY_SHA256_BYTES 32
#define FENTRY_SHA256_HEX 64 /* hex digits of a SHA-256 */

struct fentry_sha256 {
	uint32_t h[8];
	uint64_t length;     /* bytes hashed so far */
	uint8_t block[64];   /* a partial block      */
	size_t used;
};

/* The round constants (FIPS 180-4 section 4.2.2), for both implementations. */
FENTRY_HIDDEN extern const uint32_t fentry_sha256_k[64];

FENTRY_HIDDEN void fentry_sha256_init(struct fentry_sha256 *s);
FENTRY_HIDDEN void fentry_sha256_update(struct fentry_sha256 *s, const void *data, size_t len);
/* The digest; `s` must be initialised again before reuse. */
FENTRY_HIDDEN void fentry_sha256_final(struct fentry_sha256 *s, uint8_t out[FENTRY_SHA256_BYTES]);

#endif /* FENTRY_SHA256_H */
