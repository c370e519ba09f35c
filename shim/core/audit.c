/* audit.c - the audit trail: every apply, revert and unload, accepted or refused, and who asked. */

/*
 * Each entry says when, who (how the request came: the socket's peer uid and pid from
 * SO_PEERCRED, or the process itself through fentry_apply() or FENTRY_PATCHES), the
 * operation, the patch's name and path, the SHA-256 of the file as loaded (the loader
 * reports it), and the result: accepted, or the refusal's code and line.
 *
 * It goes to two places:
 * - memory: the newest FENTRY_AUDIT_KEEP entries (older ones are dropped and counted),
 *   which the protocol's "history" op returns (`fentry-build list --history`);
 * - syslog, facility LOG_DAEMON, under the program's own ident (openlog() is never
 *   called: the program's settings stay as they are); or, when FENTRY_AUDIT_LOG names
 *   a file, one JSON line per entry appended to it.  The file is opened for each entry
 *   (so log rotation just works) with O_APPEND | O_NOFOLLOW and the checks the loader
 *   makes for patch files: a regular file of this process's euid or root that group and
 *   others cannot write.  A file that fails them is not written; the entry goes to
 *   syslog with the reason.
 *
 * Entries are written after the operation returned, outside the loader's lock; the
 * trail has a lock of its own (taken around fork() like the loader's).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "control/json.h"
#include "core/audit.h"
#include "core/codes.h"

struct stored {
	struct fentry_audit_entry e;
	char text[]; /* the entry's strings, back to back */
};

/* ring, last_seq and dropped: written and read only under this lock (the control thread,
 * program threads' fentry_apply()); log_path is written once, at start, before either. */
static pthread_mutex_t audit_lock = PTHREAD_MUTEX_INITIALIZER;
static struct stored *ring[FENTRY_AUDIT_KEEP]; /* entry seq lives at (seq - 1) % KEEP */
static uint64_t last_seq;                      /* entries recorded so far              */
static uint64_t dropped;                       /* older entries no longer in `ring`    */
static char log_path[PATH_MAX];                /* FENTRY_AUDIT_LOG at start, or ""     */

static double unix_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

FENTRY_HIDDEN struct fentry_peer fentry_peer_self(enum fentry_via via)
{
	struct fentry_peer me = {.via = via, .uid = geteuid(), .pid = getpid()};

	return me;
}

static const char *via_name(enum fentry_via via)
{
	return via == FENTRY_VIA_SOCKET ? "socket" : via == FENTRY_VIA_API ? "api" : "start";
}

/* ---- the sinks ----------------------------------------------------------------------- */

/* The log file, opened for one entry; -1 with a reason when it must not be written. */
static int open_log(char *why, size_t n)
{
	int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK,
		      0600);
	struct stat st;

	if (fd < 0) {
		snprintf(why, n, "cannot open %.300s: %s", log_path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0)
		snprintf(why, n, "cannot stat %.300s: %s", log_path, strerror(errno));
	else if (!S_ISREG(st.st_mode))
		snprintf(why, n, "%.300s is not a regular file", log_path);
	else if (st.st_uid != geteuid() && st.st_uid != 0)
		snprintf(why, n, "%.300s is owned by uid %u, not by this process's uid %u or root",
			 log_path, (unsigned)st.st_uid, (unsigned)geteuid());
	else if (st.st_mode & (S_IWGRP | S_IWOTH))
		snprintf(why, n, "%.300s is writable by group or others (mode %03o); chmod go-w it",
			 log_path, (unsigned)(st.st_mode & 0777));
	else
		return fd;
	close(fd);
	return -1;
}

static void put_string(struct fentry_buf *b, const char *key, const char *value)
{
	fentry_buf_printf(b, ",\"%s\":", key);
	fentry_buf_json_string(b, value);
}

FENTRY_HIDDEN void fentry_audit_entry_json(struct fentry_buf *b, const struct fentry_audit_entry *e,
					   int with_process)
{
	fentry_buf_printf(b, "{\"seq\":%llu,\"time\":%.6f", (unsigned long long)e->seq, e->time);
	if (with_process) {
		char exe[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);

		exe[n > 0 ? n : 0] = '\0';
		fentry_buf_printf(b, ",\"process\":%d", (int)getpid());
		put_string(b, "program", n > 0 ? exe : NULL);
	}
	put_string(b, "via", via_name(e->peer.via));
	fentry_buf_printf(b, ",\"peer_uid\":%u,\"peer_pid\":%d", (unsigned)e->peer.uid,
			  (int)e->peer.pid);
	put_string(b, "op", e->op);
	put_string(b, "name", e->name);
	put_string(b, "path", e->path);
	put_string(b, "sha256", e->sha256);
	fentry_buf_printf(b, ",\"ok\":%s", e->code == FENTRY_OK ? "true" : "false");
	if (e->code != FENTRY_OK) {
		put_string(b, "code", fentry_code_name(e->code));
		put_string(b, "error", e->error);
	}
	fentry_buf_put(b, "}", 1);
}

static void to_syslog(const struct fentry_audit_entry *e, const char *note)
{
	char sha[32] = "", result[FENTRY_ERR_MAX + 64];

	if (e->sha256)
		snprintf(sha, sizeof sha, ", sha256 %.16s...", e->sha256);
	if (e->code == FENTRY_OK)
		snprintf(result, sizeof result, "done");
	else
		snprintf(result, sizeof result, "refused (%s): %s", fentry_code_name(e->code),
			 e->error ? e->error : "");
	syslog(LOG_DAEMON | (e->code == FENTRY_OK ? LOG_NOTICE : LOG_WARNING),
	       "fentry: process %d: %s %s (%s%s) asked by uid %u pid %d via %s: %s%s%s",
	       (int)getpid(), e->op, e->name ? e->name : "-", e->path ? e->path : "no file", sha,
	       (unsigned)e->peer.uid, (int)e->peer.pid, via_name(e->peer.via), result,
	       note[0] ? "; " : "", note);
}

static void write_out(const struct fentry_audit_entry *e)
{
	struct fentry_buf b = {0};
	char why[FENTRY_ERR_MAX] = "";
	int fd;

	if (!log_path[0]) {
		to_syslog(e, "");
		return;
	}
	fd = open_log(why, sizeof why);
	if (fd >= 0) {
		fentry_audit_entry_json(&b, e, 1);
		fentry_buf_put(&b, "\n", 1);
		/* One write() with O_APPEND: lines of several processes never interleave. */
		if (b.oom || write(fd, b.data, b.len) != (ssize_t)b.len)
			snprintf(why, sizeof why, "cannot write %.300s: %s", log_path,
				 b.oom ? "out of memory" : strerror(errno));
		close(fd);
		fentry_buf_free(&b);
	}
	if (why[0]) {
		char note[FENTRY_ERR_MAX + 32];

		snprintf(note, sizeof note, "FENTRY_AUDIT_LOG not written: %s", why);
		to_syslog(e, note);
	}
}

/* ---- memory -------------------------------------------------------------------------- */

static char *keep_string(char **at, const char *s)
{
	char *start = *at;

	if (!s)
		return NULL;
	strcpy(start, s);
	*at += strlen(s) + 1;
	return start;
}

static size_t size_of(const char *s)
{
	return s ? strlen(s) + 1 : 0;
}

static void record(struct fentry_audit_entry *e)
{
	struct stored *s;
	size_t slot;

	if (e->sha256 && !e->sha256[0])
		e->sha256 = NULL;
	s = malloc(sizeof(*s) + size_of(e->op) + size_of(e->name) + size_of(e->path) +
		   size_of(e->sha256) + size_of(e->error));
	e->time = unix_now();
	pthread_mutex_lock(&audit_lock);
	e->seq = ++last_seq;
	slot = (size_t)((e->seq - 1) % FENTRY_AUDIT_KEEP);
	if (ring[slot]) {
		free(ring[slot]);
		ring[slot] = NULL;
		dropped++;
	}
	if (s) {
		char *at = s->text;

		s->e = *e;
		s->e.op = keep_string(&at, e->op);
		s->e.name = keep_string(&at, e->name);
		s->e.path = keep_string(&at, e->path);
		s->e.sha256 = keep_string(&at, e->sha256);
		s->e.error = keep_string(&at, e->error);
		ring[slot] = s;
	} else {
		dropped++; /* out of memory: the sink still gets it */
	}
	pthread_mutex_unlock(&audit_lock);
	write_out(e);
}

FENTRY_HIDDEN void fentry_audit_foreach(void (*fn)(const struct fentry_audit_entry *, void *),
					void *arg, uint64_t *dropped_out)
{
	uint64_t first, seq;

	pthread_mutex_lock(&audit_lock);
	first = last_seq > FENTRY_AUDIT_KEEP ? last_seq - FENTRY_AUDIT_KEEP + 1 : 1;
	for (seq = first; seq <= last_seq; seq++) {
		const struct stored *s = ring[(seq - 1) % FENTRY_AUDIT_KEEP];

		if (s && s->e.seq == seq)
			fn(&s->e, arg);
	}
	if (dropped_out)
		*dropped_out = dropped;
	pthread_mutex_unlock(&audit_lock);
}

/* ---- the audited verbs --------------------------------------------------------------- */

/* The SHA-256 of a loaded patch, as the loader knows it ("" if it does not). */
struct sha_lookup {
	const char *name;
	char sha256[FENTRY_SHA256_HEX + 1];
};

static void find_sha(const struct fentry_patch_info *p, void *arg)
{
	struct sha_lookup *l = arg;

	if (strcmp(p->name, l->name) == 0)
		memcpy(l->sha256, p->sha256, sizeof(l->sha256));
}

static void record_verb(const struct fentry_peer *who, const char *op, const char *name,
			const char *path, const char *sha256, int rc, const char *err)
{
	struct fentry_audit_entry e = {
		.peer = *who,
		.op = op,
		.name = name && name[0] ? name : NULL,
		.path = path,
		.sha256 = sha256,
		.code = rc < 0 ? -rc : FENTRY_OK,
		.error = rc < 0 ? err : NULL,
	};

	record(&e);
}

FENTRY_HIDDEN int fentry_audited_apply(const struct fentry_peer *who, const char *path,
				       struct fentry_load_report *report, char *err)
{
	struct fentry_load_report mine;
	int rc;

	if (!report)
		report = &mine;
	err[0] = '\0';
	rc = fentry_apply_path(path, report, err);
	err[FENTRY_ERR_MAX - 1] = '\0';
	record_verb(who, "load", report->name, path, report->sha256, rc, err);
	return rc;
}

/* revert and unload: the patch's SHA-256 is looked up before (unload forgets it). */
static int by_name(const struct fentry_peer *who, const char *op, const char *name, char *err,
		   int (*verb)(const char *, char *))
{
	struct sha_lookup l = {.name = name};
	int rc;

	fentry_foreach_patch(find_sha, &l);
	err[0] = '\0';
	rc = verb(name, err);
	err[FENTRY_ERR_MAX - 1] = '\0';
	record_verb(who, op, name, NULL, l.sha256, rc, err);
	return rc;
}

FENTRY_HIDDEN int fentry_audited_revert(const struct fentry_peer *who, const char *name, char *err)
{
	return by_name(who, "revert", name, err, fentry_revert_name);
}

FENTRY_HIDDEN int fentry_audited_unload(const struct fentry_peer *who, const char *name, char *err)
{
	return by_name(who, "unload", name, err, fentry_unload_name);
}

FENTRY_HIDDEN void fentry_audit_refusal(const struct fentry_peer *who, const char *op,
					const char *name, const char *path, int code,
					const char *error)
{
	record_verb(who, op, name, path, NULL, code > 0 ? -code : code, error);
}

/* ---- start-up and fork ------------------------------------------------------------- */

FENTRY_HIDDEN void fentry_audit_init(void)
{
	const char *env = secure_getenv("FENTRY_AUDIT_LOG");
	char why[FENTRY_ERR_MAX];
	int fd;

	log_path[0] = '\0';
	if (!env || !env[0])
		return;
	if (env[0] != '/' || strlen(env) >= sizeof log_path) {
		fprintf(stderr, "fentry: FENTRY_AUDIT_LOG=%.200s is not an absolute path; the audit "
			"trail goes to syslog\n", env);
		return;
	}
	strcpy(log_path, env);
	fd = open_log(why, sizeof why);
	if (fd < 0)
		fprintf(stderr, "fentry: FENTRY_AUDIT_LOG: %s; the audit trail goes to syslog "
			"until it is fixed\n", why);
	else
		close(fd);
}

FENTRY_HIDDEN void fentry_audit_lock_for_fork(void)
{
	pthread_mutex_lock(&audit_lock);
}

FENTRY_HIDDEN void fentry_audit_unlock_after_fork(void)
{
	pthread_mutex_unlock(&audit_lock);
}
