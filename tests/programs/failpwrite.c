/* failpwrite.c - an LD_PRELOAD library that makes the Nth write to /proc/self/mem fail
 * (EIO), N from FAILPWRITE_AT: a rewrite refused half-way, after earlier writes went in.
 * Each refusal is told on stderr ("failpwrite: refused write N"). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int is_mem(int fd)
{
	char link[64], target[64];
	ssize_t n;

	snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
	n = readlink(link, target, sizeof target - 1);
	if (n < 0)
		return 0;
	target[n] = '\0';
	return strncmp(target, "/proc/", 6) == 0 && n > 4 && strcmp(target + n - 4, "/mem") == 0;
}

static ssize_t refuse_or_write(const char *name, int fd, const void *buf, size_t len, off_t off)
{
	static unsigned writes;
	ssize_t (*real)(int, const void *, size_t, off_t) =
		(ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, name);
	const char *at = getenv("FAILPWRITE_AT");

	if (len > 0 && at && is_mem(fd) && ++writes == (unsigned)atoi(at)) {
		fprintf(stderr, "failpwrite: refused write %u\n", writes);
		errno = EIO;
		return -1;
	}
	return real(fd, buf, len, off);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
	return refuse_or_write("pwrite", fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
	return refuse_or_write("pwrite64", fd, buf, len, off);
}
