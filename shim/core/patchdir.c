/* patchdir.c - the patch directory: the program's patches under <dir>/<build-id>, loaded at start. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/module.h"
#include "core/patchdir.h"
#include "fentry.h"

/*
 * Where the directory is (the one rule; fentry_build/fleet/patchdir.py's rule() states the
 * same steps, held to fentry.h by tests/test_facts.py): FENTRY_PATCH_DIR; else, for root, FENTRY_PATCH_DIR_SYSTEM; else
 * $XDG_DATA_HOME/FENTRY_PATCH_DIR_NAME, or ~/.local/share/FENTRY_PATCH_DIR_NAME.  A
 * program running with AT_SECURE (setuid, setgid, capabilities) ignores the environment
 * of whoever started it: as root it uses FENTRY_PATCH_DIR_SYSTEM, as another user none.
 * 0 with the path in dir, -1 when there is none.
 */
FENTRY_HIDDEN int fentry_patchdir_path(char *dir, size_t size)
{
	const char *env = secure_getenv(FENTRY_PATCH_DIR_ENV);
	const char *xdg = secure_getenv("XDG_DATA_HOME"), *home = secure_getenv("HOME");
	int n;

	if (env && env[0] == '/')
		n = snprintf(dir, size, "%s", env);
	else if (env && env[0])
		return -1; /* relative: refused (fentry_patchdir_load says so) */
	else if (geteuid() == 0)
		n = snprintf(dir, size, "%s", FENTRY_PATCH_DIR_SYSTEM);
	else if (getauxval(AT_SECURE))
		return -1;
	else if (xdg && xdg[0] == '/')
		n = snprintf(dir, size, "%s/%s", xdg, FENTRY_PATCH_DIR_NAME);
	else if (home && home[0] == '/')
		n = snprintf(dir, size, "%s/.local/share/%s", home, FENTRY_PATCH_DIR_NAME);
	else
		return -1;
	return n > 0 && (size_t)n < size ? 0 : -1;
}

/* A directory a patch may come from: a real one of ours or root's, nobody else's to write. */
static int open_dir_checked(int at, const char *name, const char *shown, int *fd_out)
{
	struct stat st;
	int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0) {
		if (errno == ENOENT)
			return 1; /* none: nothing to load, nothing to say */
		fprintf(stderr, "fentry: patch directory %s not used: %s\n", shown,
			errno == ELOOP || errno == ENOTDIR ? "not a real directory (a symbolic link?)"
							 : strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0 || (st.st_uid != geteuid() && st.st_uid != 0) ||
	    (st.st_mode & (S_IWGRP | S_IWOTH))) {
		if (st.st_mode & (S_IWGRP | S_IWOTH))
			fprintf(stderr, "fentry: patch directory %s not used: writable by group or "
				"others (mode %03o); chmod go-w it\n", shown, (unsigned)(st.st_mode & 0777));
		else
			fprintf(stderr, "fentry: patch directory %s not used: owned by uid %u, not by "
				"this process's uid %u or root\n", shown, (unsigned)st.st_uid,
				(unsigned)geteuid());
		close(fd);
		return -1;
	}
	*fd_out = fd;
	return 0;
}

static int is_so(const struct dirent *d)
{
	size_t n = strlen(d->d_name);

	return d->d_name[0] != '.' && n > 3 && strcmp(d->d_name + n - 3, ".so") == 0;
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

FENTRY_HIDDEN void fentry_patchdir_load(void (*apply)(const char *path))
{
	const char *env = secure_getenv(FENTRY_PATCH_DIR_ENV);
	struct fentry_module main_module;
	char dir[PATH_MAX], sub[PATH_MAX], id[2 * FENTRY_BUILD_ID_MAX + 1], path[PATH_MAX];
	struct dirent **list = NULL;
	int top = -1, fd = -1, n;

	if (env && env[0] && env[0] != '/') {
		fprintf(stderr, "fentry: %s=%s is not an absolute path; no patch directory is "
			"loaded\n", FENTRY_PATCH_DIR_ENV, env);
		return;
	}
	if (fentry_patchdir_path(dir, sizeof(dir)) < 0)
		return;
	if (fentry_module_main(&main_module) < 0 || main_module.build_id_len == 0)
		return; /* no build-id: no patch can name this program */
	fentry_hex(main_module.build_id, main_module.build_id_len, id);
	if ((size_t)snprintf(sub, sizeof(sub), "%s/%s", dir, id) >= sizeof(sub))
		return;
	if (open_dir_checked(AT_FDCWD, dir, dir, &top) != 0 ||
	    open_dir_checked(top, id, sub, &fd) != 0)
		goto out;
	/* The files themselves are checked by the loader (O_NOFOLLOW, owner, mode). */
	n = scandirat(fd, ".", &list, is_so, by_name);
	for (int i = 0; i < n; i++) {
		if ((size_t)snprintf(path, sizeof(path), "%s/%s", sub, list[i]->d_name) < sizeof(path))
			apply(path);
		free(list[i]);
	}
	free(list);
out:
	if (fd >= 0)
		close(fd);
	if (top >= 0)
		close(top);
}
