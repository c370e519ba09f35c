/*
 * authoring_clones.c - IPA clones beside the function they copy (gcc -O3):
 *   scale   static; the calls with k == 7 go to scale.constprop.0, the other to scale
 *   lookup  global; its cold path is split off into lookup.part.0, which main calls
 *           directly after inlining lookup's hot head (partial inlining)
 * -flive-patching=inline-clone allows both (docs/measurements.md).
 */
#include <stdio.h>
#include <stdlib.h>

static __attribute__((noinline)) int scale(int x, int k)
{
	int s = 0;

	for (int i = 0; i < k; i++)
		s += (x >> i) ^ (i * k);
	return s;
}

int table[64];

int lookup(int x)
{
	if (__builtin_expect(x < 64, 1))
		return table[x];
	int s = 0;
	for (int i = 0; i < x; i++) {
		s += table[i & 63] * i;
		table[i & 63] ^= s;
		printf("%d\n", s);
	}
	return s;
}

int main(int argc, char **argv)
{
	int v = atoi(argv[argc - 1]), t = 0;

	for (int i = 0; i < 1000; i++)
		t += scale(v + i, 7);
	printf("%d %d %d %d\n", t, scale(v, argc), lookup(v), lookup(v + 1));
	return 0;
}
