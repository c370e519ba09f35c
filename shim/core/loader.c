/*
 * loader.c - validates, activates, reverts and unloads patches, and keeps their versions.
 *
 * Every way a patch arrives (FENTRY_PATCHES at start, the control socket, fentry_apply())
 * goes through fentry_apply_path(): the file's sealed private copy (patchfile.c), loaded,
 * validated against the running process, and only then the patch table changed in one
 * publish.  A patch that fails any step changes nothing.
 *
 * Patches of one function form a stack: the most recently activated patch is in
 * effect; reverting it uncovers the one below, or the original.  A reverted patch's
 * .so stays mapped (a thread may still be running its code or be about to return
 * into it) until `unload` proves no thread can.
 *
 * Versions.  A patch is named by its file name; applying a file whose contents (SHA-256)
 * differ from the loaded patch of that name is a new version: it replaces the old one in
 * the same publish (no moment where neither is in effect), and the old one is unloaded
 * at once if no thread can be running it, else kept ("replaced") for a later unload.
 * Applying the version that is already active changes nothing and succeeds.
 */
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "arch/x86_64/near.h"
#include "arch/x86_64/poke.h"
#include "arch/x86_64/sites.h"
#include "arch/x86_64/stackscan.h"
#include "core/activate.h"
#include "core/costs.h"
#include "core/loader.h"
#include "core/module.h"
#include "core/patchfile.h"
#include "core/table.h"

/* The loader's record of one patch. */
struct loaded_patch {
	char name[FENTRY_NAME_MAX];
	char path[4096];
	struct fentry_patchfile file;    /* the sealed copy loaded, its SHA-256       */
	const struct fentry_patch *desc; /* the descriptor inside the patch           */
	enum fentry_patch_state state;
	double applied_at;
	uint64_t order;                  /* activation order: higher is newer          */
	uintptr_t base;                  /* load base of the target module              */
	struct fentry_redirect *redirects; /* one per descriptor function              */
	char *in_effect;                 /* per function, for list                     */
	int stuck;                       /* a callback overran its time limit and may still
	                                    run the patch's code: never dlclose() it      */
	double apply_seconds;            /* how long the apply that activated it last took */
	int near;                        /* its code is within a rel32 jump of the program's */
};

/*
 * Serialises every change and every reader of the records below.  Callers come from any
 * thread (the control thread, a program thread's fentry_apply(), start-up): every store
 * to these records, and to the other units' state the verbs change (activate.c, table.c's
 * writer side, sites.c, poke.c, stackscan.c's stats), is made under this lock and read
 * under it - the mutex's unlock/lock is the barrier.  The stores other threads read
 * without it - the table (fentry_table_publish()), the code and trampolines (poke.c), a
 * patch's bindings (bind_references()), the unload check's round (stackscan.c) - each
 * name their partner where they are made.
 */
static pthread_mutex_t loader_lock = PTHREAD_MUTEX_INITIALIZER;
/* The frame of the verb being run: the calling thread's stack is checked from there up
 * (its caller may be a program thread; the shim's own frames below hold the ranges). */
static uintptr_t caller_frame;
/* The deadline of the request the calling thread carries out (unix time; 0: none). */
static _Thread_local double request_deadline;
/* What the last apply, revert and unload took (status's costs). */
static struct fentry_op_cost last_apply, last_revert, last_unload;
static struct loaded_patch **patches;
static size_t npatches;
static uint64_t next_order = 1;

static int vfail(char *err, int code, const char *fmt, va_list ap)
{
	vsnprintf(err, FENTRY_ERR_MAX, fmt, ap);
	/* Keep messages to one line whatever dlerror() or a path contained. */
	for (char *p = err; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	return -code;
}

/* One line into err; returns -code (core/codes.h) for the caller to pass on. */
static int fail_as(char *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail_as(char *err, int code, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = vfail(err, code, fmt, ap);
	va_end(ap);
	return rc;
}

/* fail_as() without a more precise code than FENTRY_E_FAILED: returns -1. */
static int fail(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int fail(char *err, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = vfail(err, FENTRY_E_FAILED, fmt, ap);
	va_end(ap);
	return rc;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

FENTRY_HIDDEN void fentry_loader_deadline(double unix_time)
{
	request_deadline = unix_time;
}

/*
 * A request is never carried out after its deadline: its sender has given up and said
 * so.  Checked once the loader's lock is held (another change may have kept it waiting)
 * and right before the step that cannot be taken back.
 */
static int expired(char *err)
{
	double late = request_deadline > 0 ? now() - request_deadline : 0;

	if (late <= 0)
		return 0;
	return fail_as(err, FENTRY_E_EXPIRED, "request expired: its deadline passed %.3f s ago, "
		       "while it waited for another change to this process's patches; nothing was "
		       "done", late);
}

static void record(struct fentry_op_cost *c, const char *name, uint64_t start, int rc)
{
	c->seconds = (double)(mono_ns() - start) / 1e9;
	c->at = now();
	c->ok = rc == 0;
	snprintf(c->name, sizeof(c->name), "%s", name ? name : "");
}

/* The current version of patch `name` (active or reverted; not one it replaced), or NULL. */
static struct loaded_patch *find(const char *name)
{
	for (size_t i = 0; i < npatches; i++)
		if (patches[i]->state != FENTRY_REPLACED && strcmp(patches[i]->name, name) == 0)
			return patches[i];
	return NULL;
}

static const char *state_name(enum fentry_patch_state s)
{
	return s == FENTRY_ACTIVE ? "active" : s == FENTRY_REVERTED ? "reverted" : "replaced";
}

/* "loaded: a (active), b (reverted)" - what an unknown name is answered with. */
static void describe_loaded(char *buf, size_t size)
{
	size_t len = 0;

	if (npatches == 0) {
		snprintf(buf, size, "no patch is loaded");
		return;
	}
	len = (size_t)snprintf(buf, size, "loaded:");
	for (size_t i = 0; i < npatches && len < size; i++) {
		int n = snprintf(buf + len, size - len, "%s %s (%s)", i ? "," : "", patches[i]->name,
				 state_name(patches[i]->state));

		if (n < 0 || (size_t)n >= size - len) {
			snprintf(buf + (size > 4 ? size - 4 : 0), size > 4 ? 4 : size, "...");
			break;
		}
		len += (size_t)n;
	}
}

/* A patch's name is its file name without ".so". */
static int name_of(const char *path, char *name, char *err)
{
	const char *base = strrchr(path, '/');
	size_t len;

	base = base ? base + 1 : path;
	len = strlen(base);
	if (len > 3 && strcmp(base + len - 3, ".so") == 0)
		len -= 3;
	if (len == 0 || len >= FENTRY_NAME_MAX)
		return fail_as(err, FENTRY_E_BAD_FILE, "%s: not a patch file name (expected NAME.so)",
			       path);
	memcpy(name, base, len);
	name[len] = '\0';
	return 0;
}

/*
 * The patch a revert or unload names, spelled as its name ("fix"), its file name
 * ("fix.so") or the path it was applied from: its name, or -FENTRY_E_NO_SUCH_PATCH with
 * what is loaded in err.  Callers hold the lock.
 */
static int resolve(const char *spelled, char *name, char *err)
{
	char loaded[FENTRY_ERR_MAX / 2];
	int by_path = strchr(spelled, '/') != NULL;

	if (name_of(spelled, name, err) < 0)
		name[0] = '\0'; /* no patch can have it */
	for (size_t i = 0; name[0] && i < npatches; i++)
		if (strcmp(patches[i]->name, name) == 0 &&
		    (!by_path || strcmp(patches[i]->path, spelled) == 0))
			return 0;
	describe_loaded(loaded, sizeof(loaded));
	if (by_path)
		return fail_as(err, FENTRY_E_NO_SUCH_PATCH, "no patch was applied from %s; %s",
			       spelled, loaded);
	return fail_as(err, FENTRY_E_NO_SUCH_PATCH, "no patch named %s is loaded; %s", spelled,
		       loaded);
}

/*
 * Does the function's entry differ from what the generator saw?  In jump mode the site
 * itself holds one of the shim's forms: check that it is the site the generator saw
 * (sites.c) and that it still holds exactly what the shim wrote there.
 */
static int entry_differs(const struct fentry_func *f, uintptr_t addr)
{
	const struct fentry_site *s = fentry_jump_mode() ? fentry_site_at(addr + f->site_offset)
							 : NULL;

	if (s == NULL && (f->site_form == FENTRY_SITE_PREPARED_6 ||
			  f->site_form == FENTRY_SITE_PREPARED_5)) /* the calls were put back */
		return memcmp((const void *)addr, f->entry, f->site_offset) != 0 ||
		       !fentry_site_bytes_match((const uint8_t *)addr + f->site_offset,
						f->entry + f->site_offset, f->site_len);
	if (s == NULL)
		return memcmp((const void *)addr, f->entry, f->entry_len) != 0;
	return s->len != f->site_len ||
	       memcmp((const void *)addr, f->entry, f->site_offset) != 0 ||
	       !fentry_site_matches(s, f->entry + f->site_offset, s->len) ||
	       !fentry_poke_site_is_ours(s);
}

/*
 * A set of site addresses (site_end values, never 0): open addressing with linear
 * probing, at most half full, so checking K functions costs O(K) - never all pairs.
 */
struct site_set {
	uintptr_t *slot;
	size_t mask;
};

static int site_set_init(struct site_set *set, size_t n)
{
	size_t cap = 16;

	while (cap < 2 * n)
		cap *= 2;
	set->slot = calloc(cap, sizeof(*set->slot));
	set->mask = cap - 1;
	return set->slot ? 0 : -1;
}

/* Add key; 1 if it was in the set already. */
static int site_set_add(struct site_set *set, uintptr_t key)
{
	size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 24) & set->mask;

	for (; set->slot[i] != 0; i = (i + 1) & set->mask)
		if (set->slot[i] == key)
			return 1;
	set->slot[i] = key;
	return 0;
}

/* The patch's own executable segments: where replacements normally are. */
struct own_code {
	uintptr_t range[8][2];
	size_t n;
};

static int in_own_code(const struct own_code *c, uintptr_t a)
{
	for (size_t i = 0; i < c->n && i < 8; i++)
		if (a >= c->range[i][0] && a < c->range[i][1])
			return 1;
	return 0;
}

static int validate_func(const struct fentry_func *f, const struct fentry_module *mod,
			 const struct own_code *own, const char *pname, struct fentry_redirect *r,
			 char *err)
{
	uintptr_t addr = mod->base + (uintptr_t)f->addr;
	Dl_info info;

	if (f->name == NULL || f->replacement == NULL || *f->replacement == NULL)
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: a function entry has no name or "
			       "replacement", pname);
	if ((f->site_offset != 0 && f->site_offset != 4) || (f->site_len != 5 && f->site_len != 6) ||
	    f->entry_len != f->site_offset + f->site_len)
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: %s: malformed site description",
			       pname, f->name);
	if (!fentry_module_contains_code(mod, addr, f->entry_len))
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: %s: address 0x%llx is outside "
			       "%s's code", pname, f->name, (unsigned long long)f->addr, mod->path);
	if (entry_differs(f, addr))
		return fail_as(err, FENTRY_E_ENTRY_CHANGED, "patch %s: %s: the bytes at its entry "
			       "differ from the build the patch was made for (a breakpoint or "
			       "another tool changed them?)", pname, f->name);
	if (!in_own_code(own, (uintptr_t)*f->replacement) && dladdr(*f->replacement, &info) == 0)
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: %s: replacement is not inside "
			       "any loaded object", pname, f->name);
	r->site_end = addr + f->site_offset + f->site_len;
	r->target = (uintptr_t)*f->replacement;
	return 0;
}

/* Check the descriptor against the running process; fill the patch's redirects. */
static int validate(struct loaded_patch *p, char *err)
{
	const struct fentry_patch *d = p->desc;
	struct fentry_module mod, main_mod;
	char want[2 * FENTRY_BUILD_ID_MAX + 1], have[2 * FENTRY_BUILD_ID_MAX + 1];
	struct own_code own;
	struct site_set seen;
	int rc = 0;

	if (d->abi_version != FENTRY_ABI_VERSION)
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: descriptor ABI version %u, this "
			       "shim reads %u; rebuild the patch with this fentry_build", p->name,
			       (unsigned)d->abi_version, (unsigned)FENTRY_ABI_VERSION);
	if (d->nfuncs == 0 || d->nfuncs > 65536 || d->funcs == NULL ||
	    d->build_id_len == 0 || d->build_id_len > FENTRY_BUILD_ID_MAX)
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: malformed descriptor", p->name);
	if (fentry_module_by_build_id(d->build_id, d->build_id_len, &mod) < 0) {
		fentry_hex(d->build_id, d->build_id_len, want);
		have[0] = '\0';
		if (fentry_module_main(&main_mod) == 0)
			fentry_hex(main_mod.build_id, main_mod.build_id_len, have);
		return fail_as(err, FENTRY_E_WRONG_BUILD, "patch %s was built for another build of "
			       "%s (build-id %s; the running program's is %s); rebuild the patch "
			       "against the running binary", p->name,
			       d->target ? d->target : "its program", want, have[0] ? have : "unknown");
	}
	p->redirects = calloc(d->nfuncs, sizeof(*p->redirects));
	p->in_effect = calloc(d->nfuncs, 1);
	if (!p->redirects || !p->in_effect)
		return fail(err, "patch %s: out of memory", p->name);
	if (d->nrefs > 65536 || (d->nrefs && d->refs == NULL))
		return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: malformed descriptor "
			       "(references)", p->name);
	for (uint32_t i = 0; i < d->nrefs; i++) {
		const struct fentry_ref *r = &d->refs[i];

		if (r->name == NULL || r->slot == NULL)
			return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: a reference has no name "
				       "or slot", p->name);
		if (!fentry_module_contains(&mod, mod.base + (uintptr_t)r->addr, r->size ? r->size : 1))
			return fail_as(err, FENTRY_E_BAD_PATCH, "patch %s: reference %s at 0x%llx is "
				       "outside %s", p->name, r->name, (unsigned long long)r->addr,
				       mod.path);
	}
	p->base = mod.base;
	own.n = fentry_patchfile_code(&p->file, own.range, 8);
	if (site_set_init(&seen, d->nfuncs) < 0)
		return fail(err, "patch %s: out of memory", p->name);
	for (uint32_t i = 0; i < d->nfuncs; i++) {
		rc = validate_func(&d->funcs[i], &mod, &own, p->name, &p->redirects[i], err);
		if (rc == 0 && site_set_add(&seen, p->redirects[i].site_end))
			rc = fail_as(err, FENTRY_E_BAD_PATCH, "patch %s replaces %s twice", p->name,
				     d->funcs[i].name);
		if (rc < 0)
			break;
	}
	free(seen.slot);
	return rc;
}

static int by_order(const void *a, const void *b)
{
	const struct loaded_patch *x = *(struct loaded_patch *const *)a;
	const struct loaded_patch *y = *(struct loaded_patch *const *)b;

	return x->order < y->order ? -1 : x->order > y->order;
}

/*
 * Collect the redirects of every active patch, newest last, plus `extra` (being
 * activated, the newest of all), and make them the set in effect; then recompute which
 * function of which patch is in effect.  Linear in the number of redirects: a site's
 * newest patch is found with a set, never by comparing patches pairwise.
 */
static int publish(struct loaded_patch *extra, char *err)
{
	struct loaded_patch **order = calloc(npatches + 1, sizeof(*order));
	struct fentry_redirect *all;
	struct site_set covered;
	size_t n = 0, nr = 0;
	int rc;

	if (!order)
		return fail(err, "out of memory");
	for (size_t i = 0; i < npatches; i++)
		if (patches[i]->state == FENTRY_ACTIVE && patches[i] != extra)
			order[n++] = patches[i];
	qsort(order, n, sizeof(*order), by_order);
	if (extra)
		order[n++] = extra;
	for (size_t i = 0; i < n; i++)
		nr += order[i]->desc->nfuncs;
	all = calloc(nr ? nr : 1, sizeof(*all));
	if (!all || site_set_init(&covered, nr) < 0) {
		free(all);
		free(order);
		return fail(err, "out of memory");
	}
	nr = 0;
	for (size_t i = 0; i < n; i++) {
		memcpy(all + nr, order[i]->redirects, order[i]->desc->nfuncs * sizeof(*all));
		nr += order[i]->desc->nfuncs; /* later entries win in the table */
	}
	rc = fentry_activate(all, nr, err);
	if (rc == 0) {
		/* A function's patch is in effect if no newer active patch covers its site. */
		for (size_t i = 0; i < npatches; i++)
			memset(patches[i]->in_effect, 0, patches[i]->desc->nfuncs);
		for (size_t i = n; i-- > 0;)
			for (uint32_t k = 0; k < order[i]->desc->nfuncs; k++)
				order[i]->in_effect[k] =
					!site_set_add(&covered, order[i]->redirects[k].site_end);
	}
	free(covered.slot);
	free(all);
	free(order);
	return rc;
}

/*
 * Before a patch's code can run: let replacements reach the original bodies (the
 * instruction after each site) and bind FENTRY_REF references to the running program.
 * Plain stores into the patch's data, read by its replacements on program threads (and
 * by its callbacks' threads, created after: pthread_create() orders them).  Published
 * with the activation that follows: in dispatch mode by the release store of
 * fentry_active_table (table.c: fentry_table_publish()), whose partner is __fentry__'s
 * load; in jump mode also by sync_cores()'s barrier before any site jumps (poke.c).  No
 * thread can run the replacement before then: it is reachable only through them.
 */
static void bind_references(const struct loaded_patch *p)
{
	for (uint32_t i = 0; i < p->desc->nfuncs; i++)
		if (p->desc->funcs[i].original)
			*p->desc->funcs[i].original = (void *)p->redirects[i].site_end;
	for (uint32_t i = 0; i < p->desc->nrefs; i++)
		*p->desc->refs[i].slot = (void *)(p->base + (uintptr_t)p->desc->refs[i].addr);
}

/*
 * Callbacks run on a thread of their own with a time limit (FENTRY_CALLBACK_TIMEOUT_MS,
 * default 5000): a callback that hangs must not wedge the loader or the control
 * channel.  A thread that overruns is abandoned, still running; the patch's code then
 * stays mapped forever (see `stuck`).
 */
struct callback_call {
	pthread_mutex_t lock;
	pthread_cond_t done_cv;
	int done, abandoned, rc;   /* under `lock`: the callback's thread writes, the loader reads */
	fentry_pre_patch_fn pre;   /* either this (may veto) ...            */
	fentry_callback_fn plain;  /* ... or this                            */
	char why[FENTRY_ERR_MAX / 2];
};

static void *callback_thread(void *arg)
{
	struct callback_call *c = arg;
	char why[sizeof(c->why)] = "";
	int rc = 0, abandoned;

	if (c->pre)
		rc = c->pre(why, sizeof(why));
	else
		c->plain();
	pthread_mutex_lock(&c->lock);
	c->rc = rc;
	memcpy(c->why, why, sizeof(why));
	c->why[sizeof(c->why) - 1] = '\0';
	c->done = 1;
	abandoned = c->abandoned;
	pthread_cond_signal(&c->done_cv);
	pthread_mutex_unlock(&c->lock);
	if (abandoned) /* the loader gave up waiting: the last one out frees */
		free(c);
	return NULL;
}

static long callback_timeout_ms(void)
{
	const char *env = secure_getenv("FENTRY_CALLBACK_TIMEOUT_MS");
	long ms = env && *env ? atol(env) : 5000;

	return ms > 0 ? ms : 5000;
}

/* 0 when the callback returned 0 (or there is none), 1 on a veto, -1 on a timeout. */
static int call_with_timeout(fentry_pre_patch_fn pre, fentry_callback_fn plain, char *why,
			     size_t whylen)
{
	struct callback_call *c = calloc(1, sizeof(*c));
	struct timespec deadline;
	sigset_t all, old;
	pthread_attr_t attr;
	pthread_t t;
	long ms = callback_timeout_ms();
	int rc, started;

	if (!c)
		return snprintf(why, whylen, "out of memory"), 1;
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->done_cv, NULL);
	c->pre = pre;
	c->plain = plain;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += ms / 1000;
	deadline.tv_nsec += (ms % 1000) * 1000000L;
	if (deadline.tv_nsec >= 1000000000L) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000L;
	}
	/* Like the control thread, the callback's thread takes none of the program's signals. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	started = pthread_create(&t, &attr, callback_thread, c) == 0;
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (!started) {
		free(c);
		return snprintf(why, whylen, "cannot start the callback's thread"), 1;
	}
	pthread_mutex_lock(&c->lock);
	while (!c->done && pthread_cond_timedwait(&c->done_cv, &c->lock, &deadline) == 0)
		;
	if (!c->done) {
		c->abandoned = 1;
		pthread_mutex_unlock(&c->lock);
		snprintf(why, whylen, "did not return within %ld ms", ms);
		return -1;
	}
	pthread_mutex_unlock(&c->lock);
	rc = c->rc ? 1 : 0;
	if (rc)
		snprintf(why, whylen, "%s", c->why[0] ? c->why : "no reason given");
	free(c);
	return rc;
}

/* A post/unpatch callback: its patch's state has changed already, so a timeout is
 * reported and the patch marked stuck, nothing else. */
static void run_callback(struct loaded_patch *p, const fentry_callback_fn *cb, const char *which)
{
	char why[FENTRY_ERR_MAX / 2];

	if (cb && *cb && call_with_timeout(NULL, *cb, why, sizeof(why)) < 0) {
		p->stuck = 1;
		fprintf(stderr, "fentry: patch %s: its %s callback %s; it stays loaded\n", p->name,
			which, why);
	}
}

static int same_target(const struct loaded_patch *a, const struct loaded_patch *b)
{
	return a->desc->build_id_len == b->desc->build_id_len &&
	       memcmp(a->desc->build_id, b->desc->build_id, a->desc->build_id_len) == 0;
}

/*
 * Activate p (new, or reverted before) in one publish that also drops `old` (the version
 * p replaces, when it is active) and, for a cumulative patch (FENTRY_PATCH_REPLACE_ALL),
 * every other active patch of the same module.  p's pre-patch callback may veto; then the
 * post callbacks run.  Callbacks run under the loader's lock, so they must not apply or
 * revert patches themselves.
 */
static int activate(struct loaded_patch *p, struct loaded_patch *old, char *err)
{
	struct loaded_patch **replaced = NULL;
	size_t nreplaced = 0;
	char why[FENTRY_ERR_MAX / 2] = "";
	int rc;

	if (p->desc->pre_patch && *p->desc->pre_patch) {
		rc = call_with_timeout(*p->desc->pre_patch, NULL, why, sizeof(why));

		if (rc < 0)
			p->stuck = 1; /* its code is still running: never unmap it */
		if (rc != 0)
			return fail_as(err, FENTRY_E_CALLBACK_REFUSED, "patch %s: its pre-patch "
				       "callback %s%s; nothing applied", p->name,
				       rc > 0 ? "refused: " : "", why);
	}
	rc = expired(err);
	if (rc < 0)
		return rc;
	replaced = calloc(npatches + 1, sizeof(*replaced));
	if (!replaced)
		return fail(err, "out of memory");
	for (size_t i = 0; i < npatches; i++)
		if (patches[i] != p && patches[i]->state == FENTRY_ACTIVE &&
		    (patches[i] == old ||
		     ((p->desc->flags & FENTRY_PATCH_REPLACE_ALL) && same_target(patches[i], p))))
			replaced[nreplaced++] = patches[i];
	for (size_t i = 0; i < nreplaced; i++) {
		run_callback(replaced[i], replaced[i]->desc->pre_unpatch, "pre-unpatch");
		replaced[i]->state = FENTRY_REVERTED;
	}
	p->order = next_order++;
	rc = publish(p, err);
	if (rc < 0) {
		for (size_t i = 0; i < nreplaced; i++)
			replaced[i]->state = FENTRY_ACTIVE;
		free(replaced);
		return rc;
	}
	p->state = FENTRY_ACTIVE;
	p->applied_at = now();
	run_callback(p, p->desc->post_patch, "post-patch");
	for (size_t i = 0; i < nreplaced; i++)
		run_callback(replaced[i], replaced[i]->desc->post_unpatch, "post-unpatch");
	free(replaced);
	return 0;
}

static void discard(struct loaded_patch *p)
{
	if (p->stuck) /* deliberately leaked: a callback thread may still run its code */
		return;
	fentry_patchfile_close(&p->file);
	free(p->redirects);
	free(p->in_effect);
	free(p);
}

static void forget(struct loaded_patch *p)
{
	size_t i = 0;

	while (i < npatches && patches[i] != p)
		i++;
	if (i < npatches) {
		memmove(&patches[i], &patches[i + 1], (npatches - i - 1) * sizeof(*patches));
		npatches--;
	}
	discard(p);
}

/*
 * Unload p (not active) if no thread can be running its code - its segments, or a
 * jump-mode trampoline that jumps into them: 0, or -code with why it stays loaded.
 * Callers hold the lock.
 */
static int try_unload(struct loaded_patch *p, char *err)
{
	uintptr_t seg[16][2], (*ranges)[2];
	size_t nseg, n, total;
	int rc;

	if (p->stuck)
		return fail_as(err, FENTRY_E_WRONG_STATE, "patch %s: a callback of it overran its "
			       "time limit and may still be running; it stays loaded", p->name);
	nseg = fentry_patchfile_code(&p->file, seg, 16);
	if (nseg == 0 || nseg > 16)
		return fail(err, "patch %s: its code segments were not found; it stays loaded",
			    p->name);
	total = nseg;
	for (size_t i = 0; i < nseg; i++)
		total += fentry_poke_trampolines_into(seg[i][0], seg[i][1], NULL, 0);
	ranges = calloc(total, sizeof(*ranges));
	if (!ranges)
		return fail(err, "out of memory");
	memcpy(ranges, seg, nseg * sizeof(*ranges));
	n = nseg;
	for (size_t i = 0; i < nseg; i++)
		n += fentry_poke_trampolines_into(seg[i][0], seg[i][1], ranges + n, total - n);
	/* Every failure of the check leaves the patch loaded: "busy, retry". */
	rc = fentry_threads_clear_of((const uintptr_t (*)[2])ranges, n, caller_frame, p->name, err);
	free(ranges);
	if (rc < 0)
		return -FENTRY_E_BUSY;
	rc = expired(err); /* the check may take a while */
	if (rc < 0)
		return rc;
	forget(p); /* dlclose() and close the copy */
	/* No site jumps to those trampolines (p is not active) and no thread runs them. */
	for (size_t i = 0; i < nseg; i++)
		fentry_poke_trampolines_release(seg[i][0], seg[i][1]);
	return 0;
}

/*
 * Why the newest patch's code is not within a rel32 jump of the program's ("" when it is,
 * or before any patch loaded).  Under loader_lock (status copies it).
 */
static char far_reason[FENTRY_ERR_MAX];

/*
 * dlopen() the patch's copy; in jump mode steered near the program's code, so that its
 * sites can jump straight to the replacements (arch/x86_64/near.c).  Where it landed is
 * checked: p->near, and far_reason for status.
 */
static int load_near(struct loaded_patch *p, const char *path, char *err)
{
	struct fentry_near near = { 0 };
	const char *why = NULL;
	uintptr_t code[FENTRY_MODULE_SEGMENTS][2];
	size_t ncode;
	int rc;

	if (!fentry_jump_mode()) {
		snprintf(far_reason, sizeof far_reason, "dispatch mode: replacements are called "
			 "through the table");
		return fentry_patchfile_load(&p->file, path, NULL, NULL, err);
	}
	fentry_sites_code(&near.lo, &near.hi);
	rc = fentry_patchfile_load(&p->file, path, &near, &why, err);
	if (rc < 0)
		return rc;
	ncode = fentry_patchfile_code(&p->file, code, FENTRY_MODULE_SEGMENTS);
	p->near = ncode > 0 && ncode <= FENTRY_MODULE_SEGMENTS && near.hi != 0;
	for (size_t i = 0; p->near && i < ncode; i++)
		p->near = fentry_near_reaches(near.lo, near.hi, code[i][0], code[i][1]);
	if (p->near)
		far_reason[0] = '\0';
	else
		snprintf(far_reason, sizeof far_reason, "%s: %s", p->name,
			 why ? why : "the kernel placed it out of reach of the program (a gap "
				     "was filled while it loaded?)");
	return 0;
}

/*
 * Load, validate and activate a patch not loaded before, replacing `old` (the current
 * version of the same name, or NULL); takes over the copy in pf.
 */
static int load_new(const char *path, struct fentry_patchfile *pf, const char *name,
		    struct loaded_patch *old, char *err)
{
	struct loaded_patch *p = calloc(1, sizeof(*p)), **grown;
	int rc;

	if (!p) {
		fentry_patchfile_close(pf);
		return fail(err, "out of memory");
	}
	p->file = *pf; /* owned by the record from here on */
	snprintf(p->name, sizeof(p->name), "%s", name);
	snprintf(p->path, sizeof(p->path), "%s", path);

	rc = load_near(p, path, err);
	if (rc < 0)
		goto bad;
	p->desc = dlsym(p->file.handle, FENTRY_PATCH_SYMBOL);
	if (!p->desc) {
		rc = fail_as(err, FENTRY_E_BAD_PATCH, "%s: no %s descriptor; build patches with "
			     "the fentry generator", path, FENTRY_PATCH_SYMBOL);
		goto bad;
	}
	rc = validate(p, err);
	if (rc < 0)
		goto bad;
	grown = realloc(patches, (npatches + 1) * sizeof(*patches));
	if (!grown) {
		rc = fail(err, "out of memory");
		goto bad;
	}
	patches = grown;
	bind_references(p);
	rc = activate(p, old, err);
	if (rc < 0)
		goto bad;
	patches[npatches++] = p;
	return 0;
bad:
	discard(p);
	return rc;
}

/* An older version of `name` with these contents that is still loaded, or NULL. */
static struct loaded_patch *loaded_version(const char *name, const uint8_t *sha256)
{
	for (size_t i = 0; i < npatches; i++)
		if (strcmp(patches[i]->name, name) == 0 &&
		    memcmp(patches[i]->file.sha256, sha256, FENTRY_SHA256_BYTES) == 0)
			return patches[i];
	return NULL;
}

/* Under the lock: apply the copy pf of `path`; fills report (changed, replaced...). */
static int apply_locked(const char *path, struct fentry_patchfile *pf,
			struct fentry_load_report *report, char *err)
{
	struct loaded_patch *cur = find(report->name), *same;
	int rc;

	same = loaded_version(report->name, pf->sha256);
	if (same) {
		/* These very bytes are loaded already: never load them twice. */
		fentry_patchfile_close(pf);
		if (same == cur && same->state == FENTRY_ACTIVE)
			return 0; /* already applied: nothing to do, report->changed stays 0 */
		rc = activate(same, cur == same ? NULL : cur, err);
		if (rc < 0)
			return rc;
		snprintf(same->path, sizeof(same->path), "%s", path);
		same->state = FENTRY_ACTIVE;
	} else {
		rc = load_new(path, pf, report->name, cur, err); /* takes pf */
		if (rc < 0)
			return rc;
	}
	report->changed = 1;
	if (!cur || cur == same)
		return 0;
	/* A new version replaced cur: it stays loaded as "replaced" unless it can go now. */
	cur->state = FENTRY_REPLACED;
	memcpy(report->replaced_sha256, cur->file.sha256_hex, sizeof(report->replaced_sha256));
	report->replaced_unloaded = try_unload(cur, report->replaced_why) == 0;
	return 0;
}

FENTRY_HIDDEN int fentry_apply_path(const char *path, struct fentry_load_report *report,
				    char *err)
{
	struct fentry_load_report unused;
	struct fentry_patchfile pf;
	struct loaded_patch *p;
	uint64_t start = mono_ns();
	int rc;

	if (!report)
		report = &unused;
	memset(report, 0, sizeof(*report));
	if (path == NULL || path[0] != '/')
		rc = fail_as(err, FENTRY_E_BAD_FILE, "%s: the patch path must be absolute",
			     path ? path : "(null)");
	else
		rc = name_of(path, report->name, err);
	/* The file is read once, into a sealed copy: what is checked below is what runs. */
	if (rc == 0)
		rc = fentry_patchfile_copy(path, &pf, err);
	pthread_mutex_lock(&loader_lock);
	if (rc == 0 && (rc = expired(err)) < 0)
		fentry_patchfile_close(&pf);
	if (rc == 0) {
		memcpy(report->sha256, pf.sha256_hex, sizeof(report->sha256));
		caller_frame = (uintptr_t)__builtin_frame_address(0);
		rc = apply_locked(path, &pf, report, err);
		p = find(report->name);
		if (rc == 0 && p) {
			report->functions = p->desc->nfuncs;
			if (report->changed)
				p->apply_seconds = (double)(mono_ns() - start) / 1e9;
		}
	}
	record(&last_apply, report->name[0] ? report->name : path, start, rc);
	pthread_mutex_unlock(&loader_lock);
	return rc;
}

FENTRY_HIDDEN int fentry_revert_name(const char *spelled, char *err)
{
	char name[FENTRY_NAME_MAX];
	struct loaded_patch *p;
	uint64_t start = mono_ns();
	int rc;

	pthread_mutex_lock(&loader_lock);
	rc = expired(err);
	if (rc == 0)
		rc = resolve(spelled, name, err);
	p = rc == 0 ? find(name) : NULL;
	if (rc < 0) {
		/* err says what is loaded */
	} else if (!p || p->state != FENTRY_ACTIVE) {
		rc = fail_as(err, FENTRY_E_WRONG_STATE, "patch %s is not applied (already "
			     "reverted)", name);
	} else {
		run_callback(p, p->desc->pre_unpatch, "pre-unpatch");
		p->state = FENTRY_REVERTED;
		rc = publish(NULL, err);
		if (rc < 0)
			p->state = FENTRY_ACTIVE;
		else
			run_callback(p, p->desc->post_unpatch, "post-unpatch");
	}
	record(&last_revert, spelled, start, rc);
	pthread_mutex_unlock(&loader_lock);
	return rc;
}

/*
 * Unload every loaded version of the patch that is not active: a reverted one, and
 * older versions a newer one replaced.  One that may still be running stays ("busy").
 */
FENTRY_HIDDEN int fentry_unload_name(const char *spelled, char *err)
{
	char name[FENTRY_NAME_MAX], why[FENTRY_ERR_MAX];
	struct loaded_patch *cur;
	uint64_t start = mono_ns();
	int rc, first = 0, unloaded = 0;

	pthread_mutex_lock(&loader_lock);
	caller_frame = (uintptr_t)__builtin_frame_address(0);
	rc = expired(err);
	if (rc == 0)
		rc = resolve(spelled, name, err);
	if (rc < 0)
		goto out;
	cur = find(name);
	for (size_t i = 0; i < npatches;) {
		struct loaded_patch *p = patches[i];

		if (strcmp(p->name, name) != 0 || p->state == FENTRY_ACTIVE) {
			i++;
			continue;
		}
		rc = try_unload(p, why);
		if (rc == 0) {
			unloaded++; /* patches[i] is the next one now */
			continue;
		}
		if (!first) { /* the first reason is the answer; the version stays loaded */
			first = rc;
			memcpy(err, why, FENTRY_ERR_MAX);
		}
		i++;
	}
	rc = first;
	if (!first && !unloaded && cur && cur->state == FENTRY_ACTIVE)
		rc = fail_as(err, FENTRY_E_WRONG_STATE, "patch %s is applied; revert it before "
			     "unloading it", name);
out:
	record(&last_unload, spelled, start, rc);
	pthread_mutex_unlock(&loader_lock);
	return rc;
}

FENTRY_HIDDEN const char *fentry_loader_far_reason(char *buf, size_t size)
{
	pthread_mutex_lock(&loader_lock);
	snprintf(buf, size, "%s", far_reason);
	pthread_mutex_unlock(&loader_lock);
	return buf[0] ? buf : NULL;
}

FENTRY_HIDDEN void fentry_foreach_patch(void (*fn)(const struct fentry_patch_info *, void *),
					void *arg)
{
	struct fentry_patch_info *info = malloc(sizeof(*info));

	if (!info)
		return;
	pthread_mutex_lock(&loader_lock);
	for (size_t i = 0; i < npatches; i++) {
		const struct loaded_patch *p = patches[i];

		memcpy(info->name, p->name, sizeof(info->name));
		memcpy(info->path, p->path, sizeof(info->path));
		info->state = p->state;
		info->applied_at = p->applied_at;
		info->apply_seconds = p->apply_seconds;
		info->copy_bytes = p->file.size;
		info->mapped_bytes = fentry_patchfile_mapped_bytes(&p->file);
		memcpy(info->sha256, p->file.sha256_hex, sizeof(info->sha256));
		info->built_at = (double)p->file.mtime.tv_sec + (double)p->file.mtime.tv_nsec / 1e9;
		info->nfuncs = p->desc->nfuncs;
		info->funcs = p->desc->funcs;
		info->func_state = p->in_effect;
		info->near = p->near;
		fn(info, arg);
	}
	pthread_mutex_unlock(&loader_lock);
	free(info);
}

/*
 * fork() while another thread holds loader_lock would leave it locked forever in the
 * child, whose new control thread would then hang: take it around fork (init.c
 * registers these with pthread_atfork, before the control thread's child handler).
 */
FENTRY_HIDDEN void fentry_loader_lock_for_fork(void)
{
	pthread_mutex_lock(&loader_lock);
}

FENTRY_HIDDEN void fentry_loader_unlock_after_fork(void)
{
	pthread_mutex_unlock(&loader_lock);
}

FENTRY_HIDDEN void fentry_costs_snapshot(struct fentry_costs *out)
{
	pthread_mutex_lock(&loader_lock);
	out->apply = last_apply;
	out->revert = last_revert;
	out->unload = last_unload;
	fentry_poke_stats(&out->poke);
	fentry_threads_check_stats(&out->checks);
	out->table_bytes = fentry_table_memory();
	out->loaded = (unsigned)npatches;
	for (size_t i = 0; i < npatches; i++) {
		out->copy_bytes += patches[i]->file.size;
		out->mapped_bytes += fentry_patchfile_mapped_bytes(&patches[i]->file);
	}
	pthread_mutex_unlock(&loader_lock);
}

FENTRY_HIDDEN const char *fentry_loader_rewrite_error(char *buf, size_t size)
{
	const char *why;

	/* Partner: fentry_poke_batch() writes the text under this lock (poke.c). */
	pthread_mutex_lock(&loader_lock);
	why = fentry_rewrite_error();
	if (why)
		snprintf(buf, size, "%s", why);
	pthread_mutex_unlock(&loader_lock);
	return why ? buf : NULL;
}

FENTRY_HIDDEN unsigned fentry_active_count(void)
{
	unsigned n = 0;

	pthread_mutex_lock(&loader_lock);
	for (size_t i = 0; i < npatches; i++)
		n += patches[i]->state == FENTRY_ACTIVE;
	pthread_mutex_unlock(&loader_lock);
	return n;
}
