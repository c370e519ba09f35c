/*
 * activate.c - jump mode or dispatch mode, and activating a set of redirections in either.
 *
 * Jump mode (the default where code can be written): at start every fentry site of the
 * program becomes its unpatched form (a `test`, as cheap as a NOP: arch/x86_64/sites.h),
 * so unpatched functions cost nothing measurable; a patched function's site becomes a
 * jump to its replacement.  Dispatch mode never writes code:
 * sites keep calling __fentry__, which looks them up in the patch table (table.c).
 * Sites jump mode does not know (none of the program's, e.g. a shared library's) are
 * served by the table in either mode; the table holds jump sites' redirects as well.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arch/x86_64/poke.h"
#include "arch/x86_64/sites.h"
#include "core/activate.h"
#include "core/table.h"

/*
 * jump, reason and sites_state are written once, by fentry_mode_init() in the shim's
 * constructor, before fentry_control_start() creates the control thread (pthread_create()
 * orders them for it: status reads them) and before the program's threads can call
 * fentry_current_mode(); never written again.  The state further down is the loader's
 * (under its lock).
 */
static int jump;
static char reason[FENTRY_ERR_MAX] = "not initialised";

/* Redirections the table holds now, to restore them if a code rewrite fails. */
static struct fentry_redirect *table_now;
static size_t table_now_n;

static unsigned thread_count(void)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	unsigned n = 0;

	if (!d)
		return 2; /* unknown: assume other threads */
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

static void use_dispatch(const char *why)
{
	jump = 0;
	snprintf(reason, sizeof(reason), "%s", why);
}

/* What the program's sites hold (status): "prepared", "runtime" or "calls". */
static const char *sites_state = "calls";

/*
 * A program whose sites were prepared at build time (docs/how-it-works.md): jump mode
 * writes nothing at start.  Dispatch mode needs the calls, so they are put back from the
 * list the build left in the file; where code cannot be written, they cannot, and the
 * program's own functions cannot be patched (its libraries' still can).
 */
static void prepared_init(int dispatch_wanted, int live)
{
	char why[FENTRY_ERR_MAX];

	sites_state = "prepared";
	if (!dispatch_wanted) {
		if (fentry_poke_init(why) == 0) {
			jump = 1;
			reason[0] = '\0';
			return;
		}
		jump = 0;
		snprintf(reason, sizeof(reason), "%.300s; the program's sites were prepared at "
			 "build time, so its own functions cannot be patched in dispatch mode", why);
		return;
	}
	if (fentry_poke_init(why) < 0 || fentry_sites_load_prepared(why) < 0 ||
	    (fentry_poke_restore_calls(live) < 0 &&
	     fentry_fail(why, "the program's code could not be rewritten") < 0)) {
		jump = 0;
		snprintf(reason, sizeof(reason), "FENTRY_MODE=dispatch, but the calls of the "
			 "program's prepared sites could not be put back (%.300s): its own functions "
			 "cannot be patched", why);
		return;
	}
	/* The reason is the one every program gives; status's "sites" and costs.startup say
	 * that the calls were put back. */
	sites_state = "calls";
	use_dispatch("FENTRY_MODE=dispatch");
}

FENTRY_HIDDEN void fentry_mode_init(void)
{
	const char *want = secure_getenv("FENTRY_MODE");
	char why[FENTRY_ERR_MAX];
	int dispatch_wanted = want && strcmp(want, "dispatch") == 0;
	/*
	 * Normally no other thread exists yet and every site is written at once.  Otherwise
	 * sites change in two harmless one-byte steps, which `ff 15` sites do not allow:
	 * those stay calls, served by the table.
	 */
	int live = thread_count() != 1;

	if (want && *want && !dispatch_wanted && strcmp(want, "jump") != 0)
		fprintf(stderr, "fentry: FENTRY_MODE=%s is not jump or dispatch; using jump mode "
			"where possible\n", want);
	if (fentry_sites_prepared()) {
		prepared_init(dispatch_wanted, live);
		return;
	}
	if (dispatch_wanted) {
		use_dispatch("FENTRY_MODE=dispatch");
		return;
	}
	if (fentry_sites_load(live, why) < 0 || fentry_poke_init(why) < 0) {
		use_dispatch(why);
		return;
	}
	if (fentry_poke_prepare_all(live) < 0) {
		use_dispatch("the program's code could not be rewritten through /proc/self/mem");
		return;
	}
	sites_state = "runtime";
	jump = 1;
	reason[0] = '\0';
}

FENTRY_HIDDEN const char *fentry_sites_form(void)
{
	return sites_state;
}

FENTRY_HIDDEN const char *fentry_mode(void)
{
	return jump ? "jump" : "dispatch";
}

FENTRY_HIDDEN const char *fentry_mode_reason(void)
{
	return reason;
}

FENTRY_HIDDEN const char *fentry_rewrite_error(void)
{
	return jump ? fentry_poke_rewrite_error() : NULL;
}

FENTRY_HIDDEN int fentry_jump_mode(void)
{
	return jump;
}

static int publish_table(const struct fentry_redirect *r, size_t n, char *err)
{
	struct fentry_redirect *copy = malloc((n ? n : 1) * sizeof(*copy));

	if (!copy || fentry_table_publish(r, n) < 0) {
		free(copy);
		return fentry_fail(err, "out of memory publishing the patch table");
	}
	memcpy(copy, r, n * sizeof(*copy));
	free(table_now);
	table_now = copy;
	table_now_n = n;
	return 0;
}

/* Sites whose target is not 0 (jump mode): the only ones a change may have to reset. */
static struct fentry_site **patched;
static size_t npatched;

FENTRY_HIDDEN int fentry_activate(const struct fentry_redirect *r, size_t n, char *err)
{
	static unsigned epoch;
	size_t ntouched = 0, nbatch = 0, ntable = 0, cap = n + npatched + 1;
	struct fentry_site **touched = NULL, **batch = NULL;
	struct fentry_redirect *table = NULL, *old_table = NULL;
	uintptr_t *next = NULL;
	size_t old_n = table_now_n;
	int rc = -1;

	if (!jump) {
		/* A site prepared at build time whose call was not put back never reaches the table. */
		for (size_t i = 0; i < n; i++)
			if (fentry_sites_unpatched_ending_at(r[i].site_end))
				return fentry_fail(err, "the function whose site ends at %p cannot be "
						   "patched: its site was prepared at build time and this "
						   "process runs in dispatch mode without the calls (see "
						   "status's mode_reason)", (void *)r[i].site_end);
		return publish_table(r, n, err);
	}

	/*
	 * Only the sites named by the new set or patched now can change: mark each with
	 * this activation's epoch and the target it should get (later redirects win: they
	 * are the newer patches), so that no pass over every site is needed.
	 */
	touched = calloc(cap, sizeof(*touched));
	batch = calloc(cap, sizeof(*batch));
	next = calloc(cap, sizeof(*next));
	table = calloc(n + 1, sizeof(*table));
	if (!touched || !batch || !next || !table) {
		snprintf(err, FENTRY_ERR_MAX, "out of memory");
		goto out;
	}
	epoch++;
	for (size_t i = 0; i < n; i++) {
		int oom;
		struct fentry_site *s = fentry_site_ending_at(r[i].site_end, &oom);

		/*
		 * Every redirect goes to the table too: jump sites never call __fentry__, but a
		 * uprobe on a site runs the file's original call out of line, and the table then
		 * still sends it to the replacement (poke.c).
		 */
		table[ntable++] = r[i];
		if (oom) {
			fentry_fail(err, "out of memory");
			goto out;
		}
		if (!s)
			continue;
		if (s->mark != epoch)
			touched[ntouched++] = s;
		s->mark = epoch;
		s->want = r[i].target;
	}
	for (size_t i = 0; i < npatched; i++)
		if (patched[i]->mark != epoch) {
			patched[i]->mark = epoch;
			patched[i]->want = 0;
			touched[ntouched++] = patched[i];
		}
	for (size_t i = 0; i < ntouched; i++)
		if (touched[i]->target != touched[i]->want) {
			batch[nbatch] = touched[i];
			next[nbatch++] = touched[i]->want;
		}
	/* Never overwrite bytes someone else put there (a debugger's int3, a uprobe). */
	for (size_t i = 0; i < nbatch; i++)
		if (!fentry_poke_site_is_ours(batch[i])) {
			snprintf(err, FENTRY_ERR_MAX, "the fentry site at %p holds bytes this shim did "
				 "not write (a debugger's breakpoint or a uprobe?); remove it and retry",
				 (void *)batch[i]->addr);
			goto out;
		}

	/* Table first (it can be put back exactly), then the code. */
	old_table = table_now;
	table_now = NULL;
	if (publish_table(table, ntable, err) < 0) {
		table_now = old_table;
		old_table = NULL;
		goto out;
	}
	if (fentry_poke_batch(batch, next, nbatch, err) < 0) {
		char ignored[FENTRY_ERR_MAX];

		publish_table(old_table, old_table ? old_n : 0, ignored);
		goto out;
	}
	/* Every site patched now was touched: keep those that still jump. */
	npatched = 0;
	for (size_t i = 0; i < ntouched; i++)
		if (touched[i]->target != 0)
			touched[npatched++] = touched[i];
	free(patched);
	patched = touched;
	touched = NULL;
	rc = 0;
out:
	free(old_table);
	free(touched);
	free(table);
	free(batch);
	free(next);
	return rc;
}
