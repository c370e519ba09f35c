/*
 * args.c - functions of many signatures, called with values that must arrive exactly.
 *
 * Each `f` has a twin `f_kept` with the same signature that no patch replaces: while a
 * patch table is active every instrumented call goes through the slow path of
 * __fentry__ (the table lookup), so the twins check that a lookup that misses leaves
 * every argument register (rdi rsi rdx rcx r8 r9, xmm0-7, al for varargs) and the stack
 * arguments intact.  The patch (args_patch.c) replaces the `f`s and prints the same lines
 * with "patched" instead of the name of the original.  The first line says which mode
 * the shim runs in: "dispatch" (every call through the table lookup) or "jump".
 */
#include <stdarg.h>
#include <stdio.h>

#include <fentry.h>

/*
 * TARGET: noinline so that -O2 keeps a real call of each function (an inlined copy
 * never reaches the fentry site, so patching the function would not reach it);
 * noclone so that GCC does not make a .constprop/.isra copy for these constant
 * arguments, which main would call instead of the named function.
 */
#define TARGET __attribute__((noinline, noclone))

struct small { int x, y; double z; }; /* 16 bytes: one INTEGER and one SSE eightbyte */
struct big { long v[5]; };            /* 40 bytes: passed and returned in memory */

#define SIX_INTS(name) \
	TARGET long name(long a, int b, long long c, unsigned long d, short e, signed char f) \
	{ \
		printf("%s: %ld %d %lld %lu %d %d\n", #name, a, b, c, d, e, f); \
		return a + e; \
	}
SIX_INTS(six_ints)
SIX_INTS(six_ints_kept)

#define EIGHT_INTS(name) \
	TARGET long name(long a, long b, long c, long d, long e, long f, long g, long h) \
	{ \
		printf("%s: %ld %ld %ld %ld %ld %ld %ld %ld\n", #name, a, b, c, d, e, f, g, h); \
		return g - h; \
	}
EIGHT_INTS(eight_ints) /* g and h are passed on the stack */
EIGHT_INTS(eight_ints_kept)

#define EIGHT_DOUBLES(name) \
	TARGET double name(double a, double b, double c, double d, double e, double f, \
			   double g, double h) \
	{ \
		printf("%s: %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g\n", #name, \
		       a, b, c, d, e, f, g, h); \
		return a + h; \
	}
EIGHT_DOUBLES(eight_doubles)
EIGHT_DOUBLES(eight_doubles_kept)

#define MIXED(name) \
	TARGET double name(int a, double b, long c, float d, char e, double f) \
	{ \
		printf("%s: %d %.17g %ld %.9g %c %.17g\n", #name, a, b, c, (double)d, e, f); \
		return b * 2; \
	}
MIXED(mixed)
MIXED(mixed_kept)

/* Varargs: al holds the number of vector registers used; if __fentry__ lost it, the
 * callee's prologue would skip saving xmm0-7 and the doubles would print wrong. */
#define VARARGS(name) \
	TARGET int name(const char *fmt, ...) \
	{ \
		va_list ap; \
		int n; \
		printf("%s: ", #name); \
		va_start(ap, fmt); \
		n = vprintf(fmt, ap); \
		va_end(ap); \
		return n; \
	}
VARARGS(varargs)
VARARGS(varargs_kept)

#define BY_STRUCT(name) \
	TARGET long name(struct small s, struct big b, int tail) \
	{ \
		printf("%s: %d %d %.17g %ld %ld %ld %ld %ld %d\n", #name, s.x, s.y, s.z, \
		       b.v[0], b.v[1], b.v[2], b.v[3], b.v[4], tail); \
		return b.v[4] + tail; \
	}
BY_STRUCT(by_struct)
BY_STRUCT(by_struct_kept)

/* Returned in memory: rdi carries the hidden pointer to the caller's result. */
#define MAKE_BIG(name) \
	TARGET struct big name(long seed, struct small s) \
	{ \
		struct big r = { { seed, s.x, s.y, (long)s.z, -seed } }; \
		return r; \
	}
MAKE_BIG(make_big)
MAKE_BIG(make_big_kept)

#define VARARGS_FMT "%d %.17g %ld %.17g %.17g %d %.17g %.17g %.17g %.17g %.17g %.17g %s\n"
#define VARARGS_VALUES -42, 0.1, -9000000000000000000L, -2.5, 1e-310, 7, 3.0, 4.5, \
	-1e300, 6.25, 7.125, 8.0625, "end"

#define CALL_ALL(sfx) do { \
	struct small s = { -3, 2147483647, -0.375 }; \
	struct big b = { { 1, -2, 3000000000L, -4000000000L, 5 } }; \
	struct big r; \
	printf("=> %ld\n", six_ints##sfx(-1L, -2147483647 - 1, 0x123456789abcdef0LL, \
					 18364758544493064720UL, -12345, -7)); \
	printf("=> %ld\n", eight_ints##sfx(1, -2, 3, -4, 5, -6, 9223372036854775807L, \
					   -9223372036854775807L - 1)); \
	printf("=> %.17g\n", eight_doubles##sfx(-0.0, 1e-310, 3.141592653589793, -2.5e300, \
						1.0 / 3, 7, -1e-5, 1.7976931348623157e308)); \
	printf("=> %.17g\n", mixed##sfx(-5, 0.1, 1L << 40, 1.5f, 'Z', -0.0625)); \
	printf("=> %d\n", varargs##sfx(VARARGS_FMT, VARARGS_VALUES)); \
	printf("=> %ld\n", by_struct##sfx(s, b, -99)); \
	r = make_big##sfx(-77, s); \
	printf("%s => %ld %ld %ld %ld %ld\n", "make_big" #sfx, r.v[0], r.v[1], r.v[2], r.v[3], r.v[4]); \
} while (0)

int main(void)
{
	printf("mode: %s\n", fentry_current_mode());
	CALL_ALL();
	CALL_ALL(_kept);
	return 0;
}
