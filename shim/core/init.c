/*
 * init.c - start-up: the patch directory and FENTRY_PATCHES, the control thread, fork().
 */
#include <dirent.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arch/x86_64/poke.h"
#include "control/control.h"
#include "core/activate.h"
#include "core/audit.h"
#include "core/loader.h"
#include "core/patchdir.h"
#include "core/patchfile.h"

static void apply_one(const char *path)
{
	struct fentry_peer me = fentry_peer_self(FENTRY_VIA_START);
	char resolved[PATH_MAX], err[FENTRY_ERR_MAX];
	const char *use = path;

	/* A relative entry is taken relative to the current directory, made absolute so
	 * that list shows where each patch came from.  The file itself is not resolved:
	 * the loader refuses a symbolic link. */
	if (path[0] != '/') {
		if (!getcwd(resolved, sizeof(resolved)) ||
		    strlen(resolved) + 1 + strlen(path) >= sizeof(resolved)) {
			fprintf(stderr, "fentry: patch %s not loaded: path too long\n", path);
			return;
		}
		strcat(resolved, "/");
		strcat(resolved, path);
		use = resolved;
	}
	if (fentry_audited_apply(&me, use, NULL, err) < 0)
		fprintf(stderr, "fentry: patch %s not loaded: %s\n", path, err);
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

static int is_so(const struct dirent *d)
{
	size_t n = strlen(d->d_name);

	return n > 3 && strcmp(d->d_name + n - 3, ".so") == 0;
}

/* A directory entry of FENTRY_PATCHES: its *.so files, in name order. */
static void apply_dir(const char *dir)
{
	struct dirent **list;
	int n = scandir(dir, &list, is_so, by_name);
	char path[PATH_MAX];

	if (n < 0) {
		fprintf(stderr, "fentry: patch directory %s not read\n", dir);
		return;
	}
	for (int i = 0; i < n; i++) {
		if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, list[i]->d_name) < sizeof(path))
			apply_one(path);
		free(list[i]);
	}
	free(list);
}

/* FENTRY_PATCHES: colon-separated .so files or directories of them. */
static void apply_env_patches(void)
{
	const char *env = secure_getenv("FENTRY_PATCHES");
	char *copy, *save = NULL;
	struct stat st;

	if (!env || !*env)
		return;
	copy = strdup(env);
	if (!copy)
		return;
	for (char *tok = strtok_r(copy, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
		if (stat(tok, &st) == 0 && S_ISDIR(st.st_mode))
			apply_dir(tok);
		else
			apply_one(tok);
	}
	free(copy);
}

static void before_fork(void)
{
	fentry_loader_lock_for_fork();
	fentry_audit_lock_for_fork();
}

static void after_fork_parent(void)
{
	fentry_audit_unlock_after_fork();
	fentry_loader_unlock_after_fork();
}

static void after_fork_child(void)
{
	fentry_audit_unlock_after_fork();
	fentry_loader_unlock_after_fork();
	fentry_poke_after_fork_child();
	fentry_control_after_fork_child();
}

/*
 * Runs before main().  Instrumented code that runs earlier (other constructors) calls
 * __fentry__ with no table published, which simply returns.
 */
__attribute__((constructor)) static void fentry_init(void)
{
	pthread_atfork(before_fork, after_fork_parent, after_fork_child);
	fentry_patchfile_init();
	fentry_audit_init();
	fentry_mode_init();
	fentry_patchdir_load(apply_one); /* the installed patches first ...      */
	apply_env_patches();             /* ... then FENTRY_PATCHES, on top of them */
	/* Last: what the calls above wrote without a lock (the mode, audit.c's log_path)
	 * reaches the control thread through the pthread_create() in here, as control.c's
	 * `ctl` does. */
	fentry_control_start();
}
