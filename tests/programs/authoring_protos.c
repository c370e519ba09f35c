/*
 * authoring_protos.c - functions with the signatures `fentry-build new-patch` must write
 * back exactly from DWARF: base types and qualifiers, pointers, arrays (decayed),
 * function pointers, typedefs of the program's header and of system headers, struct /
 * union / enum by name and by value, variadic functions, no parameters, a function
 * returning a function pointer, and a static function.  noinline, noclone: each stays
 * one whole function with its own fentry site.  Prints one line of results.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "authoring_protos.h"

#define KEEP __attribute__((noinline, noclone))

struct point {
	int x, y;
};
union number {
	long i;
	double d;
};
enum shade { DARK, LIGHT = 4 };
typedef unsigned long count_t;

KEEP int plain(int a, long b, unsigned char c)
{
	return a + (int)b + c;
}

KEEP const char *const *qualified(const char *s, char *const p, volatile int *v,
				  const volatile unsigned *cv)
{
	static const char *names[2];

	names[0] = s;
	names[1] = p;
	return *v + *cv ? names : NULL;
}

KEEP size_t arrays(int rows[4], int (*grid)[3], const char *lines[])
{
	return (size_t)rows[0] + (size_t)grid[0][1] + strlen(lines[0]);
}

KEEP int callbacks(int (*cmp)(const void *, const void *), void (*done)(void), visit_fn visit)
{
	return (cmp != NULL) + (done != NULL) + (visit != NULL);
}

KEEP struct point by_value(struct point p, union number n, enum shade s, count_t c)
{
	p.x += (int)n.i + (int)s + (int)c;
	return p;
}

KEEP int with_types(struct request *req, uint32_t flags, FILE *out)
{
	return req->id + (int)flags + (out != NULL);
}

KEEP int logf_(int level, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap) + level;
	va_end(ap);
	return n;
}

KEEP int vlogf_(const char *fmt, va_list ap)
{
	return vsnprintf(NULL, 0, fmt, ap);
}

KEEP void nothing(void)
{
	puts("nothing");
}

static int twice(int x)
{
	return 2 * x;
}

KEEP int (*pick(int which))(int)
{
	return which ? twice : abs;
}

static KEEP int secret(int x)
{
	return x * 7 + 1;
}

int main(int argc, char **argv)
{
	int x = argc > 1 ? atoi(argv[1]) : 6;
	int rows[4] = { x }, grid[1][3] = { { 0, x } };
	const char *lines[] = { "abc" };
	volatile int v = 1;
	unsigned cv = 0;
	struct request req = { x, "/" };
	struct point p = by_value((struct point){ 1, 2 }, (union number){ .i = 3 }, LIGHT, 5);

	nothing();
	printf("plain %d qualified %d arrays %zu callbacks %d by_value %d with_types %d "
	       "logf %d pick %d secret %d\n",
	       plain(x, 2, 3), qualified("a", "b", &v, &cv) != NULL, arrays(rows, grid, lines),
	       callbacks(NULL, NULL, NULL), p.x, with_types(&req, 1, stdout),
	       logf_(x, "%d", x), pick(1)(x), secret(x));
	return 0;
}
