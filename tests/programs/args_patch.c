/* args_patch.c - replaces the functions of args.c that have no _kept suffix. */
#include <stdarg.h>
#include <stdio.h>

#include <fentry.h>

struct small { int x, y; double z; };
struct big { long v[5]; };

static long six_ints_fixed(long a, int b, long long c, unsigned long d, short e, signed char f)
{
	printf("patched six_ints: %ld %d %lld %lu %d %d\n", a, b, c, d, e, f);
	return a - e;
}
FENTRY_REPLACE(six_ints, six_ints_fixed);

static long eight_ints_fixed(long a, long b, long c, long d, long e, long f, long g, long h)
{
	printf("patched eight_ints: %ld %ld %ld %ld %ld %ld %ld %ld\n", a, b, c, d, e, f, g, h);
	return a + h;
}
FENTRY_REPLACE(eight_ints, eight_ints_fixed);

static double eight_doubles_fixed(double a, double b, double c, double d, double e, double f,
				  double g, double h)
{
	printf("patched eight_doubles: %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g\n",
	       a, b, c, d, e, f, g, h);
	return g * 2;
}
FENTRY_REPLACE(eight_doubles, eight_doubles_fixed);

static double mixed_fixed(int a, double b, long c, float d, char e, double f)
{
	printf("patched mixed: %d %.17g %ld %.9g %c %.17g\n", a, b, c, (double)d, e, f);
	return f * 4;
}
FENTRY_REPLACE(mixed, mixed_fixed);

static int varargs_fixed(const char *fmt, ...)
{
	va_list ap;
	int n;

	printf("patched varargs: ");
	va_start(ap, fmt);
	n = vprintf(fmt, ap);
	va_end(ap);
	return -n;
}
FENTRY_REPLACE(varargs, varargs_fixed);

static long by_struct_fixed(struct small s, struct big b, int tail)
{
	printf("patched by_struct: %d %d %.17g %ld %ld %ld %ld %ld %d\n", s.x, s.y, s.z,
	       b.v[0], b.v[1], b.v[2], b.v[3], b.v[4], tail);
	return b.v[3] - tail;
}
FENTRY_REPLACE(by_struct, by_struct_fixed);

static struct big make_big_fixed(long seed, struct small s)
{
	struct big r = { { -seed, s.y, s.x, (long)(s.z * 8), seed * 2 } };
	return r;
}
FENTRY_REPLACE(make_big, make_big_fixed);
