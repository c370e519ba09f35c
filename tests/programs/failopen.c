/* failopen.c - an LD_PRELOAD library that makes opening /proc/self/mem fail (EACCES),
 * as a kernel with proc_mem.force_override=never or a hardened policy would. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>

int open(const char *path, int flags, ...)
{
	static int (*real_open)(const char *, int, ...);
	va_list ap;
	mode_t mode;

	if (strcmp(path, "/proc/self/mem") == 0) {
		errno = EACCES;
		return -1;
	}
	if (!real_open)
		real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
	va_start(ap, flags);
	mode = va_arg(ap, mode_t);
	va_end(ap);
	return real_open(path, flags, mode);
}
