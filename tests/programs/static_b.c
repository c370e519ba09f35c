/* static_b.c - the other static `scale` (see static_a.c). */

/* noinline, noclone: see static_a.c. */
static __attribute__((noinline, noclone)) int scale(int x)
{
	return x * 20;
}

int b_scale(int x)
{
	return scale(x);
}
