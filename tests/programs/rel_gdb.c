/*
 * rel_gdb.c - a program run under gdb: a debugger's breakpoint and a live patch at the
 * same function entry (tests/test_reliability.py).
 *
 * Usage: rel_gdb STEPS PATCH.so
 * STEPS is a string of one-letter steps, run in order:
 *   a  fentry_apply(PATCH.so), print "apply ok" or "apply failed: <why>"
 *   r  fentry_revert(<its name>), print "revert ok" or "revert failed: <why>"
 *   s  rel_stop(): a function the test puts a gdb breakpoint on (changes nothing)
 *   c  print "result <rel_caller(1)>": 4 unpatched, 202 patched (rel_gdb_patch.c)
 *   n  print the names the dynamic linker knows the loaded objects by ("object <name>")
 *   w  print "waiting" and wait for a line on stdin (the test changes something meanwhile)
 */
#define _GNU_SOURCE
#include <link.h>
#include <stdio.h>
#include <string.h>

#include <fentry.h>

/* noinline: calls must reach the function's own entry, where the breakpoint is. */
__attribute__((noinline)) int rel_target(int x)
{
	return x + 1; /* rel_gdb_patch.c: x + 100 */
}

__attribute__((noinline)) int rel_caller(int x)
{
	return rel_target(x) * 2;
}

__attribute__((noinline)) void rel_stop(void)
{
	__asm__ volatile("" ::: "memory");
}

static int print_object(struct dl_phdr_info *info, size_t size, void *arg)
{
	(void)size;
	(void)arg;
	if (info->dlpi_name && info->dlpi_name[0])
		printf("object %s\n", info->dlpi_name);
	return 0;
}

static void patch_name(const char *path, char *name, size_t size)
{
	const char *base = strrchr(path, '/');
	size_t len;

	base = base ? base + 1 : path;
	len = strlen(base);
	if (len > 3 && strcmp(base + len - 3, ".so") == 0)
		len -= 3;
	snprintf(name, size, "%.*s", (int)len, base);
}

int main(int argc, char **argv)
{
	char err[512], name[256];

	if (argc < 3)
		return 2;
	patch_name(argv[2], name, sizeof(name));
	setvbuf(stdout, NULL, _IONBF, 0);
	for (const char *step = argv[1]; *step; step++) {
		switch (*step) {
		case 'a':
			if (fentry_apply(argv[2], err, sizeof(err)) == 0)
				printf("apply ok\n");
			else
				printf("apply failed: %s\n", err);
			break;
		case 'r':
			if (fentry_revert(name, err, sizeof(err)) == 0)
				printf("revert ok\n");
			else
				printf("revert failed: %s\n", err);
			break;
		case 's':
			rel_stop();
			break;
		case 'c':
			printf("result %d\n", rel_caller(1));
			break;
		case 'n':
			dl_iterate_phdr(print_object, NULL);
			break;
		case 'w':
			printf("waiting\n");
			if (!fgets(err, sizeof(err), stdin))
				return 3;
			break;
		default:
			return 2;
		}
	}
	printf("done\n");
	return 0;
}
