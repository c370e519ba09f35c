/*
 * lib_main.c - loads an instrumented shared library after start (dlopen), calls its
 * plugin_value(), applies a patch built against the library (not the program), and
 * calls it again.  Usage: lib_main LIBRARY.so PATCH.so
 */
#include <dlfcn.h>
#include <stdio.h>

#include <fentry.h>

int main(int argc, char **argv)
{
	char err[512];
	void *lib;
	int (*value)(int);

	if (argc < 3)
		return 2;
	lib = dlopen(argv[1], RTLD_NOW);
	if (!lib) {
		printf("dlopen: %s\n", dlerror());
		return 1;
	}
	value = (int (*)(int))dlsym(lib, "plugin_value");
	printf("before %d\n", value(5));
	if (fentry_apply(argv[2], err, sizeof(err)) != 0) {
		printf("apply failed: %s\n", err);
		return 1;
	}
	printf("patched %d\n", value(5));
	if (fentry_revert("lib_plugin_patch", err, sizeof(err)) != 0) {
		printf("revert failed: %s\n", err);
		return 1;
	}
	printf("reverted %d\n", value(5));
	return 0;
}
