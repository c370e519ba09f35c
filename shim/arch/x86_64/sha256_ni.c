/*
 * sha256_ni.c - SHA-256 blocks with the x86 SHA extensions (SHA-NI), where the CPU has them.
 *
 * A patch's identity is the SHA-256 of its private copy (core/patchfile.c), computed on
 * every first load: for a patch of 10,000 functions (4.8 MiB) the portable compression of
 * core/sha256.c was half of the whole apply (perf, benchmarks/RESULTS.md).  The SHA
 * instructions do two rounds per sha256rnds2 and the message schedule in two more
 * instructions, several times faster; core/sha256.c calls fentry_sha256_blocks_ni() when
 * fentry_sha256_ni_usable() says the CPU has them, and tests/test_patchfile.py checks the
 * digests of both against hashlib.
 *
 * Register layout (the instructions' own): the state is split as ABEF and CDGH, A in the
 * highest lane; sha256rnds2(cdgh, abef, wk) runs two rounds with the low two lanes of wk
 * (message word + round constant, fentry_sha256_k) and returns the new ABEF, the old ABEF
 * becoming CDGH.
 * Only this file is compiled for the SHA and SSE4.1 instruction sets (the target attribute),
 * so the rest of the shim runs on any x86-64.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>

#include "arch/x86_64/sha256_ni.h"
#include "core/sha256.h"

#define NI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* 0: not asked yet; 1: usable; -1: not.  Any thread may set it; every one sets the same. */
static int ni_state;

FENTRY_HIDDEN int fentry_sha256_ni_usable(void)
{
	int state = __atomic_load_n(&ni_state, __ATOMIC_RELAXED);
	unsigned int a, b, c, d;

	if (state == 0) {
		/* CPUID leaf 7: EBX bit 29 is SHA; leaf 1: ECX bit 19 SSE4.1, bit 9 SSSE3. */
		int sha = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29));
		int sse = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 19)) && (c & (1u << 9));

		state = sha && sse ? 1 : -1;
		__atomic_store_n(&ni_state, state, __ATOMIC_RELAXED);
	}
	return state > 0;
}

/* Rounds 4g..4g+3: the message words m (bytes already swapped) plus their constants. */
#define ROUNDS4(m, g)                                                                      \
	do {                                                                               \
		const __m128i *k4 = (const __m128i *)&fentry_sha256_k[4 * (g)];            \
		__m128i wk = _mm_add_epi32((m), _mm_load_si128(k4));                       \
		cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);                               \
		abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(wk, 0x0e));       \
	} while (0)

/*
 * W[t..t+3] from the four previous groups: w0 = W[t-16..t-13], w1 = W[t-12..t-9],
 * w2 = W[t-8..t-5], w3 = W[t-4..t-1].  msg1 adds sigma0 of the next word to w0, the
 * alignr picks W[t-7..t-4] out of w2:w3, msg2 adds sigma1 of W[t-2], W[t-1] and of the two
 * words it has just made.
 */
#define SCHEDULE(w0, w1, w2, w3) \
	_mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32((w0), (w1)), \
					   _mm_alignr_epi8((w3), (w2), 4)), (w3))

/* Rounds 4g..4g+3 after computing their words into w0 (the oldest of the four groups). */
#define STEP(g, w0, w1, w2, w3)                      \
	do {                                         \
		(w0) = SCHEDULE(w0, w1, w2, w3);     \
		ROUNDS4(w0, g);                      \
	} while (0)

/* Groups g..g+3: each step's new words replace the oldest group, m0 to m3 in turn. */
#define STEP4(g)                                     \
	do {                                         \
		STEP((g), m0, m1, m2, m3);           \
		STEP((g) + 1, m1, m2, m3, m0);       \
		STEP((g) + 2, m2, m3, m0, m1);       \
		STEP((g) + 3, m3, m0, m1, m2);       \
	} while (0)

/*
 * The sixteen groups are written out, the four message registers rotating by name: a loop
 * indexing w[g % 4] kept them in memory, and the store-to-load forwarding that put into the
 * schedule's chain made it longer than the rounds' (sha256rnds2 after sha256rnds2), the chain
 * the block's time should be.  Unrolled, 5 MiB hash in 4.3 ms instead of 5.2 ms on this
 * machine, as fast as OpenSSL's SHA256() measured in the same program.
 */
NI_TARGET FENTRY_HIDDEN void fentry_sha256_blocks_ni(uint32_t h[8], const uint8_t *p, size_t n)
{
	/* Swaps the bytes of each 32-bit word: the message is big-endian. */
	const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
	__m128i abef, cdgh, t, m0, m1, m2, m3;

	/* h[0..3] = A B C D, h[4..7] = E F G H (lane 0 first) into ABEF and CDGH. */
	t = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xb1);    /* B A D C */
	cdgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1b); /* H G F E */
	abef = _mm_alignr_epi8(t, cdgh, 8);                                      /* F E B A */
	cdgh = _mm_blend_epi16(cdgh, t, 0xf0);                                   /* H G D C */

	for (; n > 0; n--, p += 64) {
		__m128i abef0 = abef, cdgh0 = cdgh;

		m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 0)), bswap);
		ROUNDS4(m0, 0);
		m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16)), bswap);
		ROUNDS4(m1, 1);
		m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 32)), bswap);
		ROUNDS4(m2, 2);
		m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 48)), bswap);
		ROUNDS4(m3, 3);
		STEP4(4);
		STEP4(8);
		STEP4(12);
	abef = _mm_add_epi32(abef, abef0);
		cdgh = _mm_add_epi32(cdgh, cdgh0);
	}

	/* Back to h[0..7]. */
	t = _mm_shuffle_epi32(abef, 0x1b);                     /* A B E F */
	cdgh = _mm_shuffle_epi32(cdgh, 0xb1);                  /* G H C D */
	_mm_storeu_si128((__m128i *)&h[0], _mm_blend_epi16(t, cdgh, 0xf0)); /* A B C D */
	_mm_storeu_si128((__m128i *)&h[4], _mm_alignr_epi8(cdgh, t, 8));    /* E F G H */
}
