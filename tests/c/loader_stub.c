/* loader_stub.c - a stand-in for the shim's loader and modules, to test the control channel alone. */

/*
 * It keeps an in-memory list of "patches" and loads nothing.  apply: the file must
 * exist; its name is the file name without ".so"; a name containing "refuse" fails
 * with a loader-style message; every patch "replaces" compute() and parse() of
 * parser.c, so the newest active patch is the one in effect.  The main module's
 * build-id is 01 02 .. 14.  Every file's "SHA-256" is STUB_SHA256 (the real one is the
 * loader's business); the verbs return -code like the loader's.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "core/activate.h"
#include "core/costs.h"
#include "core/loader.h"
#include "core/module.h"

#define STUB_MAX 64
#define STUB_SHA256 "5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b"

static const struct fentry_func stub_funcs[] = {
	{.name = "compute", .file = NULL},
	{.name = "parse", .file = "parser.c"},
};

static struct fentry_patch_info patches[STUB_MAX];
static unsigned npatches;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double unix_now(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

static void patch_name(const char *path, char *name)
{
	const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
	size_t len = strlen(base);

	if (len > 3 && strcmp(base + len - 3, ".so") == 0)
		len -= 3;
	if (len >= FENTRY_NAME_MAX)
		len = FENTRY_NAME_MAX - 1;
	memcpy(name, base, len);
	name[len] = '\0';
}

int fentry_apply_path(const char *path, struct fentry_load_report *report, char *err)
{
	struct fentry_patch_info *p;
	int rc = -FENTRY_E_FAILED;

	pthread_mutex_lock(&lock);
	memset(report, 0, sizeof *report);
	patch_name(path, report->name);
	if (access(path, F_OK) != 0) {
		snprintf(err, FENTRY_ERR_MAX, "cannot open %s: no such file", path);
		rc = -FENTRY_E_BAD_FILE;
	} else if (strstr(report->name, "refuse")) {
		snprintf(report->sha256, sizeof report->sha256, "%s", STUB_SHA256);
		snprintf(err, FENTRY_ERR_MAX, "patch %s was built for another build of the program "
			 "(build-id differs); rebuild it", report->name);
		rc = -FENTRY_E_WRONG_BUILD;
	} else if (npatches == STUB_MAX) {
		snprintf(err, FENTRY_ERR_MAX, "too many patches");
	} else {
		p = &patches[npatches++];
		snprintf(p->name, sizeof p->name, "%s", report->name);
		snprintf(p->path, sizeof p->path, "%s", path);
		snprintf(p->sha256, sizeof p->sha256, "%s", STUB_SHA256);
		snprintf(report->sha256, sizeof report->sha256, "%s", STUB_SHA256);
		p->state = FENTRY_ACTIVE;
		p->applied_at = unix_now();
		p->built_at = p->applied_at - 60; /* a stand-in for the file's mtime */
		p->nfuncs = 2;
		p->funcs = stub_funcs;
		report->functions = 2;
		report->changed = 1;
		rc = 0;
	}
	pthread_mutex_unlock(&lock);
	return rc;
}

int fentry_revert_name(const char *name, char *err)
{
	int i, rc = -FENTRY_E_NO_SUCH_PATCH;

	pthread_mutex_lock(&lock);
	for (i = (int)npatches - 1; i >= 0 && rc < 0; i--)
		if (patches[i].state == FENTRY_ACTIVE && strcmp(patches[i].name, name) == 0) {
			patches[i].state = FENTRY_REVERTED;
			rc = 0;
		}
	if (rc < 0)
		snprintf(err, FENTRY_ERR_MAX, "no active patch named %s", name);
	pthread_mutex_unlock(&lock);
	return rc;
}

void fentry_foreach_patch(void (*fn)(const struct fentry_patch_info *, void *), void *arg)
{
	static const char in_effect[2] = {1, 1}, shadowed[2] = {0, 0};
	int i, top = -1;

	pthread_mutex_lock(&lock);
	for (i = 0; i < (int)npatches; i++)
		if (patches[i].state == FENTRY_ACTIVE)
			top = i;
	for (i = 0; i < (int)npatches; i++) {
		patches[i].func_state = i == top ? in_effect : shadowed;
		fn(&patches[i], arg);
	}
	pthread_mutex_unlock(&lock);
}

unsigned fentry_active_count(void)
{
	unsigned i, n = 0;

	pthread_mutex_lock(&lock);
	for (i = 0; i < npatches; i++)
		n += patches[i].state == FENTRY_ACTIVE;
	pthread_mutex_unlock(&lock);
	return n;
}

/* The stub never waits: a deadline that passed was refused before it is called. */
void fentry_loader_deadline(double unix_time)
{
	(void)unix_time;
}

/* Nothing costs anything in the stub: status's "costs" are all zeros. */
void fentry_costs_snapshot(struct fentry_costs *out)
{
	memset(out, 0, sizeof(*out));
}

int fentry_unload_name(const char *name, char *err)
{
	snprintf(err, FENTRY_ERR_MAX, "busy: the stub loader never unloads %s", name);
	return -FENTRY_E_BUSY;
}

const char *fentry_mode(void)
{
	return "dispatch";
}

const char *fentry_mode_reason(void)
{
	return "stub loader";
}

const char *fentry_loader_rewrite_error(char *buf, size_t size)
{
	(void)buf;
	(void)size;
	return NULL;
}

const char *fentry_loader_far_reason(char *buf, size_t size)
{
	(void)buf;
	(void)size;
	return NULL;
}

const char *fentry_sites_form(void)
{
	return "calls";
}

int fentry_module_main(struct fentry_module *out)
{
	uint32_t i;

	memset(out, 0, sizeof *out);
	out->build_id_len = 20;
	for (i = 0; i < out->build_id_len; i++)
		out->build_id[i] = (uint8_t)(i + 1);
	return 0;
}

void fentry_hex(const uint8_t *id, uint32_t len, char *buf)
{
	static const char digits[] = "0123456789abcdef";
	uint32_t i;

	for (i = 0; i < len; i++) {
		buf[2 * i] = digits[id[i] >> 4];
		buf[2 * i + 1] = digits[id[i] & 15];
	}
	buf[2 * len] = '\0';
}
