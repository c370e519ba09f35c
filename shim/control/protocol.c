/* protocol.c - the control protocol: one JSON request line in, one JSON reply line out. */

/*
 * docs/protocol.md is the description; this file is the implementation.  It knows
 * nothing of sockets (control.c feeds it lines and sends what it appends), so a request
 * is answered the same way whatever brought it.
 *
 *   {"op":"load","path":"/abs/x.so"} -> {"ok":true,"name":"x","functions":N}
 *   {"op":"revert","name":"x"}       -> {"ok":true,"name":"x"}
 *   {"op":"unload","name":"x"}       -> {"ok":true,"name":"x"}
 *   {"op":"list"}                    -> {"ok":true,"patches":[...]}
 *   {"op":"status"}                  -> {"ok":true,"protocol":2,"pid":N,...}
 *   {"op":"history"}                 -> {"ok":true,"history":[...],"dropped":N}
 *   any request may add "deadline": <unix time>; past it, nothing is done: "expired"
 *   anything wrong                   -> {"ok":false,"code":"<code>","error":"<one line>"}
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "control/protocol.h"
#include "core/activate.h"
#include "core/codes.h"
#include "core/costs.h"
#include "core/loader.h"
#include "core/module.h"

#define OPS "load, revert, unload, list, status, history"

#define PUT(b, lit) fentry_buf_put((b), (lit), sizeof(lit) - 1)

/* ---- replies ------------------------------------------------------------------------ */

static void verror(struct fentry_buf *out, int code, const char *fmt, va_list ap)
{
	char msg[2 * FENTRY_ERR_MAX];

	vsnprintf(msg, sizeof msg, fmt, ap);
	/* One line whatever the request echoed back contained. */
	for (char *c = msg; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = ' ';
	PUT(out, "{\"ok\":false,\"code\":");
	fentry_buf_json_string(out, fentry_code_name(code));
	PUT(out, ",\"error\":");
	fentry_buf_json_string(out, msg);
	PUT(out, "}\n");
}

FENTRY_HIDDEN void fentry_protocol_error(struct fentry_buf *out, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verror(out, code, fmt, ap);
	va_end(ap);
}

/* `"key":"value"` (or null), with a leading comma: never the first member. */
static void put_string_member(struct fentry_buf *out, const char *key, const char *value)
{
	fentry_buf_printf(out, ",\"%s\":", key);
	fentry_buf_json_string(out, value);
}

/* A verb's failure: its code (-rc) and its line. */
static void verb_error(struct fentry_buf *out, int rc, const char *err)
{
	fentry_protocol_error(out, -rc, "%s", err[0] ? err : "the loader gave no reason");
}

static void count_loaded(const struct fentry_patch_info *p, void *arg)
{
	(void)p;
	++*(unsigned *)arg;
}

static void list_function(struct fentry_buf *out, const struct fentry_patch_info *p,
			  uint32_t i)
{
	const struct fentry_func *f = &p->funcs[i];
	int in_effect = p->func_state ? p->func_state[i] != 0 : p->state == FENTRY_ACTIVE;

	PUT(out, "{\"name\":");
	fentry_buf_json_string(out, f->name);
	put_string_member(out, "file", f->file);
	fentry_buf_printf(out, ",\"in_effect\":%s}", in_effect ? "true" : "false");
}

struct list_ctx {
	struct fentry_buf *out;
	unsigned n;
};

static void list_patch(const struct fentry_patch_info *p, void *arg)
{
	struct list_ctx *l = arg;
	double at = isfinite(p->applied_at) ? p->applied_at : 0.0;
	uint32_t i;

	if (l->n++)
		PUT(l->out, ",");
	PUT(l->out, "{\"name\":");
	fentry_buf_json_string(l->out, p->name);
	put_string_member(l->out, "path", p->path);
	put_string_member(l->out, "state", p->state == FENTRY_ACTIVE     ? "active"
					   : p->state == FENTRY_REVERTED ? "reverted"
									 : "replaced");
	put_string_member(l->out, "sha256", p->sha256[0] ? p->sha256 : NULL);
	fentry_buf_printf(l->out, ",\"built_at\":%.6f", isfinite(p->built_at) ? p->built_at : 0.0);
	fentry_buf_printf(l->out, ",\"apply_seconds\":%.6f,\"copy_bytes\":%llu,\"mapped_bytes\":%llu",
			  isfinite(p->apply_seconds) ? p->apply_seconds : 0.0,
			  (unsigned long long)p->copy_bytes, (unsigned long long)p->mapped_bytes);
	fentry_buf_printf(l->out, ",\"near\":%s", p->near ? "true" : "false");
	fentry_buf_printf(l->out, ",\"applied_at\":%.6f,\"functions\":[", at);
	for (i = 0; p->funcs && i < p->nfuncs; i++) {
		if (i)
			PUT(l->out, ",");
		list_function(l->out, p, i);
	}
	PUT(l->out, "]}");
}

static void history_entry(const struct fentry_audit_entry *e, void *arg)
{
	struct list_ctx *l = arg;

	if (l->n++)
		PUT(l->out, ",");
	fentry_audit_entry_json(l->out, e, 0);
}

/* ---- requests ----------------------------------------------------------------------- */

enum { REQ_OP = 1, REQ_PATH = 2, REQ_NAME = 4, REQ_DEADLINE = 8 };

struct request {
	unsigned seen, twice, too_long, wrong_kind; /* REQ_* bits */
	char op[16];
	char path[4096];
	char name[FENTRY_NAME_MAX];
	char deadline[64];
};

static const char *member_name(unsigned bit)
{
	return bit & REQ_OP ? "op" : bit & REQ_PATH ? "path" : bit & REQ_NAME ? "name" : "deadline";
}

/* fentry_json_object_members() callback: keep the members we know, ignore the rest. */
static void take_member(const char *key, enum fentry_json_kind kind, const char *value, void *arg)
{
	struct request *q = arg;
	enum fentry_json_kind want = FENTRY_JSON_STRING;
	size_t len = strlen(value), size;
	unsigned bit;
	char *dst;

	if (strcmp(key, "op") == 0)
		bit = REQ_OP, dst = q->op, size = sizeof q->op;
	else if (strcmp(key, "path") == 0)
		bit = REQ_PATH, dst = q->path, size = sizeof q->path;
	else if (strcmp(key, "name") == 0)
		bit = REQ_NAME, dst = q->name, size = sizeof q->name;
	else if (strcmp(key, "deadline") == 0)
		bit = REQ_DEADLINE, dst = q->deadline, size = sizeof q->deadline,
		want = FENTRY_JSON_NUMBER;
	else
		return;
	if (kind != want) {
		q->wrong_kind |= bit;
		return;
	}
	q->twice |= q->seen & bit;
	q->seen |= bit;
	if (len >= size)
		q->too_long |= bit;
	else
		memcpy(dst, value, len + 1);
}

static double unix_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int changes_code(const char *op)
{
	return strcmp(op, "load") == 0 || strcmp(op, "revert") == 0 || strcmp(op, "unload") == 0;
}

/* A request whose deadline passed is refused, never carried out late. */
static int expired(const struct request *q, const struct fentry_peer *peer,
		   struct fentry_buf *out)
{
	double deadline, now;
	char msg[FENTRY_ERR_MAX];

	if (!(q->seen & REQ_DEADLINE))
		return 0;
	deadline = strtod(q->deadline, NULL);
	now = unix_now();
	if (now <= deadline)
		return 0;
	snprintf(msg, sizeof msg, "request expired: its deadline passed %.3f s before process %d "
		 "came to it; nothing was done", now - deadline, (int)getpid());
	fentry_protocol_error(out, FENTRY_E_EXPIRED, "%s", msg);
	if (changes_code(q->op))
		fentry_audit_refusal(peer, q->op, q->seen & REQ_NAME ? q->name : NULL,
				     q->seen & REQ_PATH ? q->path : NULL, FENTRY_E_EXPIRED, msg);
	return 1;
}

static void op_load(const struct request *q, const struct fentry_peer *peer,
		    struct fentry_buf *out)
{
	struct fentry_load_report report;
	char err[FENTRY_ERR_MAX];
	int rc;

	if (!(q->seen & REQ_PATH)) {
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "load needs a string member "
				      "\"path\": the patch .so's absolute path");
		return;
	}
	if (q->path[0] != '/') {
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "load: the path must be absolute, "
				      "not \"%.300s\"", q->path);
		return;
	}
	rc = fentry_audited_apply(peer, q->path, &report, err);
	if (rc < 0) {
		verb_error(out, rc, err);
		return;
	}
	PUT(out, "{\"ok\":true");
	put_string_member(out, "name", report.name);
	put_string_member(out, "sha256", report.sha256[0] ? report.sha256 : NULL);
	fentry_buf_printf(out, ",\"functions\":%u,\"changed\":%s", (unsigned)report.functions,
			  report.changed ? "true" : "false");
	if (report.replaced_sha256[0]) { /* a new version of the patch replaced this one */
		PUT(out, ",\"replaced\":{\"sha256\":");
		fentry_buf_json_string(out, report.replaced_sha256);
		fentry_buf_printf(out, ",\"unloaded\":%s", report.replaced_unloaded ? "true" : "false");
		put_string_member(out, "why", report.replaced_unloaded ? NULL : report.replaced_why);
		PUT(out, "}");
	}
	PUT(out, "}\n");
}

/* revert and unload: one patch, by name. */
static void op_by_name(const struct request *q, const struct fentry_peer *peer,
		       struct fentry_buf *out,
		       int (*verb)(const struct fentry_peer *, const char *, char *))
{
	char err[FENTRY_ERR_MAX];
	int rc;

	if (!(q->seen & REQ_NAME)) {
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "%s needs a string member "
				      "\"name\": the patch's name", q->op);
		return;
	}
	rc = verb(peer, q->name, err);
	if (rc < 0) {
		verb_error(out, rc, err);
		return;
	}
	PUT(out, "{\"ok\":true");
	put_string_member(out, "name", q->name);
	PUT(out, "}\n");
}

static void op_list(struct fentry_buf *out)
{
	struct list_ctx l = {.out = out};

	PUT(out, "{\"ok\":true,\"patches\":[");
	fentry_foreach_patch(list_patch, &l);
	PUT(out, "]}\n");
}

static void op_history(struct fentry_buf *out)
{
	struct list_ctx l = {.out = out};
	uint64_t dropped = 0;

	PUT(out, "{\"ok\":true,\"history\":[");
	fentry_audit_foreach(history_entry, &l, &dropped);
	fentry_buf_printf(out, "],\"dropped\":%llu,\"kept\":%d}\n", (unsigned long long)dropped,
			  FENTRY_AUDIT_KEEP);
}

static void op_status(struct fentry_buf *out)
{
	static struct fentry_module main_module; /* 4 KiB: only one thread answers requests */
	char exe[4096], id[2 * FENTRY_BUILD_ID_MAX + 1], rewrite[FENTRY_ERR_MAX];
	char far[FENTRY_ERR_MAX];
	unsigned loaded = 0;
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	int have_id = fentry_module_main(&main_module) == 0 && main_module.build_id_len > 0 &&
		      main_module.build_id_len <= FENTRY_BUILD_ID_MAX;

	if (n >= 0)
		exe[n] = '\0';
	if (have_id)
		fentry_hex(main_module.build_id, main_module.build_id_len, id);
	fentry_foreach_patch(count_loaded, &loaded);
	fentry_buf_printf(out, "{\"ok\":true,\"protocol\":%d,\"pid\":%d", FENTRY_PROTOCOL_VERSION,
			  (int)getpid());
	put_string_member(out, "program", n >= 0 ? exe : NULL);
	put_string_member(out, "build_id", have_id ? id : NULL);
	put_string_member(out, "mode", fentry_mode());
	put_string_member(out, "mode_reason", fentry_mode_reason()[0] ? fentry_mode_reason() : NULL);
	put_string_member(out, "rewrite_error",
			  fentry_loader_rewrite_error(rewrite, sizeof rewrite));
	put_string_member(out, "sites", fentry_sites_form());
	put_string_member(out, "far_reason", fentry_loader_far_reason(far, sizeof far));
	fentry_buf_printf(out, ",\"patches_active\":%u,\"patches_loaded\":%u",
			  fentry_active_count(), loaded);
	fentry_costs_json(out); /* core/costs.c */
	PUT(out, "}\n");
}

/* load, revert, unload: the loader refuses them too once their deadline passed (it may
 * have to wait for a change the program itself makes). */
static void change(const struct request *q, const struct fentry_peer *peer, struct fentry_buf *out)
{
	fentry_loader_deadline(q->seen & REQ_DEADLINE ? strtod(q->deadline, NULL) : 0);
	if (strcmp(q->op, "load") == 0)
		op_load(q, peer, out);
	else if (strcmp(q->op, "revert") == 0)
		op_by_name(q, peer, out, fentry_audited_revert);
	else
		op_by_name(q, peer, out, fentry_audited_unload);
	fentry_loader_deadline(0);
}

FENTRY_HIDDEN void fentry_protocol_answer(const char *line, size_t len,
					  const struct fentry_peer *peer, struct fentry_buf *out)
{
	static struct request q; /* 4 KiB: only one thread answers requests */
	char err[FENTRY_ERR_MAX];

	memset(&q, 0, sizeof q);
	if (fentry_json_object_members(line, len, take_member, &q, err, sizeof err) < 0)
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "bad request: %s", err);
	else if (q.twice)
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "bad request: member \"%s\" given "
				      "twice", member_name(q.twice));
	else if (q.too_long)
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "bad request: member \"%s\" is too "
				      "long", member_name(q.too_long));
	else if (q.wrong_kind & REQ_DEADLINE)
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "bad request: \"deadline\" must be "
				      "a number (unix time in seconds)");
	else if (!(q.seen & REQ_OP))
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "bad request: no string member "
				      "\"op\" (one of: " OPS ")");
	else if (expired(&q, peer, out))
		return;
	else if (strcmp(q.op, "load") == 0 || strcmp(q.op, "revert") == 0 ||
		 strcmp(q.op, "unload") == 0)
		change(&q, peer, out);
	else if (strcmp(q.op, "list") == 0)
		op_list(out);
	else if (strcmp(q.op, "status") == 0)
		op_status(out);
	else if (strcmp(q.op, "history") == 0)
		op_history(out);
	else
		fentry_protocol_error(out, FENTRY_E_BAD_REQUEST, "unknown op \"%s\": known ops are "
				      OPS, q.op);
}
