/* static_a.c - a static `scale` (static_b.c has another) and a static `bias`. */

/* noinline: at -O2 GCC would inline these small statics into their callers, and an
 * inlined copy never reaches the fentry site; noclone: no .constprop copy either. */
static __attribute__((noinline, noclone)) int scale(int x)
{
	return x * 10;
}

static __attribute__((noinline, noclone)) int bias(int x)
{
	return x + 1000;
}

int a_scale(int x)
{
	return scale(x);
}

int a_bias(int x)
{
	return bias(x);
}
