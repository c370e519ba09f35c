/*
 * sitebytes.c - prints the bytes at the entry of entry_probe() before and after an
 * in-process apply and revert, the mode, and what the calls return.
 * Usage: sitebytes PATCH.so
 */
#include <stdio.h>
#include <string.h>

#include <fentry.h>

__attribute__((noinline)) int entry_probe(int x)
{
	return x + 1; /* the patch returns x + 100 */
}

/* Read through a volatile pointer so the compiler cannot assume the bytes. */
static void show(const char *when)
{
	const volatile unsigned char *p = (const volatile unsigned char *)(void *)&entry_probe;

	printf("%s", when);
	for (int i = 0; i < 10; i++)
		printf(" %02x", p[i]);
	printf(" -> %d\n", entry_probe(1));
}

int main(int argc, char **argv)
{
	char err[512];

	if (argc < 2)
		return 2;
	printf("mode %s\n", fentry_current_mode());
	show("start");
	if (fentry_apply(argv[1], err, sizeof(err)) != 0) {
		printf("apply failed: %s\n", err);
		return 1;
	}
	show("applied");
	if (fentry_revert("sitebytes_patch", err, sizeof(err)) != 0) {
		printf("revert failed: %s\n", err);
		return 1;
	}
	show("reverted");
	return 0;
}
