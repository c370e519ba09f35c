/* control.c - the control channel: a Unix socket, one thread, one JSON request per line. */

/*
 * Why a thread.  The seed loaded a patch from __fentry__ itself once a global variable
 * was set.  But __fentry__ runs at the entry of any instrumented function: inside a
 * signal handler, inside code that holds malloc's or the dynamic loader's locks, in the
 * middle of the program's own critical sections.  dlopen() there takes those locks again
 * or re-enters malloc - a deadlock or a corrupted heap.  A thread of our own is ordinary
 * code: it may dlopen(), take the loader's mutex and sleep, and the program's threads
 * never stop or poll for it.
 *
 * The channel.  A Unix stream socket at $FENTRY_RUNTIME_DIR/<pid>.sock (default
 * $XDG_RUNTIME_DIR/fentry, else /tmp/fentry-<euid>).  The folder must be a real folder of
 * the process's effective uid that group and others cannot write; otherwise the program
 * runs without a channel and says so in one line on stderr.  The socket file is 0600 and
 * every peer is checked with SO_PEERCRED: only the same uid, or root, is served.
 * FENTRY_CONTROL=0 turns the channel off; FENTRY_CONTROL_IDLE_SECONDS (default 30) is
 * how long a client may stall before it is dropped.
 *
 * The protocol.  One JSON object per line, one reply line per request:
 *   {"op":"load","path":"/abs/x.so"} -> {"ok":true,"name":"x","functions":N}
 *   {"op":"revert","name":"x"}       -> {"ok":true,"name":"x"}
 *   {"op":"unload","name":"x"}       -> {"ok":true,"name":"x"} or "busy: ..." (retry)
 *   {"op":"list"}                    -> {"ok":true,"patches":[...]}
 *   {"op":"status"}                  -> {"ok":true,"pid":N,"program":...,...}
 *   anything wrong                   -> {"ok":false,"error":"<one line>"}
 *
 * The thread.  One poll() loop over the listening socket and up to CTL_MAX_CLIENTS
 * clients, all non-blocking: each client has an input buffer of one line and an output
 * buffer for its reply, so a slow or stalled client delays nobody.  More clients wait
 * in the listen backlog until a slot frees (a stalled one is dropped after the idle
 * time).  Replies are sent
 * with MSG_NOSIGNAL (the program's SIGPIPE disposition is never touched), and the
 * thread blocks every signal so that the program's signals go to the program's threads.
 *
 * fork().  The child has no control thread.  It closes (never unlinks) the parent's
 * sockets and opens its own at its own pid.  Only the process that bound a socket file
 * removes it at exit, so a child's exit never takes the parent's channel away.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "control/control.h"
#include "control/json.h"
#include "core/activate.h"
#include "core/loader.h"
#include "core/module.h"

#define CTL_MAX_CLIENTS 16
#define CTL_LINE_MAX 65536       /* bytes of one request, its '\n' not counted */
#define CTL_IDLE_SECONDS 30      /* default time a client may make no progress */
#define CTL_BACKLOG 64
#define CTL_ACCEPT_PAUSE_MS 1000 /* after accept() ran out of file descriptors */
#define CTL_OPS "load, revert, unload, list, status"
#define CTL_PATH_MAX sizeof(((struct sockaddr_un *)0)->sun_path)
#define CTL_DIR_MAX 200          /* longer cannot hold a socket path (107 bytes) anyway */

#define PUT(b, lit) fentry_buf_put((b), (lit), sizeof(lit) - 1)

struct ctl_client {
	int fd;                    /* -1: a free slot                                  */
	ino_t ino;                 /* the socket's inode: close fd only while it is ours */
	int64_t deadline;          /* monotonic ms by which the client must make progress */
	int eof;                   /* the client shut its side (or the connection broke) */
	int closing;               /* close as soon as `out` is sent                    */
	struct fentry_buf out;     /* the reply being sent ...                          */
	size_t out_off;            /* ... and how much of it went out already            */
	size_t in_len;
	char in[CTL_LINE_MAX + 1]; /* received bytes: one line and its '\n' fit          */
};

/*
 * The channel of this process.  Written by fentry_control_start() before the thread
 * exists, then by the thread only; the fork child reads the snapshot fork() left.  A
 * slot's fd is set to -1 before it is closed, so that a snapshot never names a closed
 * (perhaps reused) descriptor.
 */
/* -1 when this process serves no channel.  Kept out of `ctl` so that `ctl` (1 MiB of
 * client buffers) is zero-initialised .bss, not .data in every program's file. */
static int ctl_listen_fd = -1;

static struct {
	ino_t listen_ino;         /* the listening socket's inode                      */
	pid_t owner;              /* the process that bound `path`; only it unlinks it */
	char path[CTL_PATH_MAX];
	dev_t file_dev;           /* the socket file bound (unlink only that file)     */
	ino_t file_ino;
	int idle_ms;
	int64_t accept_paused_until;
	struct ctl_client clients[CTL_MAX_CLIENTS];
} ctl;

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Close fd only if it is still the socket we opened (the program may close our fds). */
static void close_ours(int fd, ino_t ino)
{
	struct stat st;

	if (fd >= 0 && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == ino)
		close(fd);
}

/* ---- the folder and the socket file ------------------------------------------------- */

/* $FENTRY_RUNTIME_DIR, $XDG_RUNTIME_DIR/fentry or /tmp/fentry-<euid>, no trailing '/'. */
static int runtime_dir(char *dir, size_t size, char *why, size_t whylen)
{
	const char *env = secure_getenv("FENTRY_RUNTIME_DIR"), *xdg = secure_getenv("XDG_RUNTIME_DIR");
	size_t len;
	int n;

	if (env && env[0] && env[0] != '/') {
		snprintf(why, whylen, "FENTRY_RUNTIME_DIR=%.200s is not an absolute path; "
			 "set it to one", env);
		return -1;
	}
	if (env && env[0])
		n = snprintf(dir, size, "%s", env);
	else if (xdg && xdg[0] == '/')
		n = snprintf(dir, size, "%s/fentry", xdg);
	else
		n = snprintf(dir, size, "/tmp/fentry-%u", (unsigned)geteuid());
	if (n < 0 || (size_t)n >= size) {
		snprintf(why, whylen, "its folder name is too long for a socket path (%zu "
			 "bytes at most); set FENTRY_RUNTIME_DIR to a short absolute path",
			 CTL_PATH_MAX - 1);
		return -1;
	}
	/* "/x/" would make lstat() follow a symlink "/x". */
	for (len = (size_t)n; len > 1 && dir[len - 1] == '/'; len--)
		dir[len - 1] = '\0';
	return 0;
}

/* Create the folder (0700) if missing; refuse one another user could tamper with. */
static int check_dir(const char *dir, char *why, size_t n)
{
	struct stat st;

	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		snprintf(why, n, "cannot create %s: %s; create it (mode 0700) or set "
			 "FENTRY_RUNTIME_DIR", dir, strerror(errno));
		return -1;
	}
	if (lstat(dir, &st) < 0)
		snprintf(why, n, "cannot stat %s: %s; set FENTRY_RUNTIME_DIR", dir,
			 strerror(errno));
	else if (S_ISLNK(st.st_mode))
		snprintf(why, n, "%s is a symlink; remove it or set FENTRY_RUNTIME_DIR to a "
			 "real folder", dir);
	else if (!S_ISDIR(st.st_mode))
		snprintf(why, n, "%s is not a folder; remove it or set FENTRY_RUNTIME_DIR", dir);
	else if (st.st_uid != geteuid())
		snprintf(why, n, "%s belongs to uid %u, not to this process's uid %u; remove it "
			 "or set FENTRY_RUNTIME_DIR to a folder of uid %u", dir,
			 (unsigned)st.st_uid, (unsigned)geteuid(), (unsigned)geteuid());
	else if (st.st_mode & (S_IWGRP | S_IWOTH))
		snprintf(why, n, "%s is writable by group or others (mode %04o); chmod 700 it "
			 "or set FENTRY_RUNTIME_DIR", dir, (unsigned)(st.st_mode & 07777));
	else
		return 0;
	return -1;
}

static void unix_address(struct sockaddr_un *a, const char *path)
{
	memset(a, 0, sizeof *a);
	a->sun_family = AF_UNIX;
	memcpy(a->sun_path, path, strlen(path) + 1); /* callers checked the length */
}

/* Is `path` a socket file nobody listens on (left by a process that is gone)? */
static int socket_is_stale(const char *path)
{
	struct sockaddr_un a;
	struct stat st;
	int fd, stale;

	if (lstat(path, &st) < 0 || !S_ISSOCK(st.st_mode))
		return 0;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	unix_address(&a, path);
	stale = connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno == ECONNREFUSED;
	close(fd);
	return stale;
}

/*
 * Remove the sockets of processes that are gone: killed ones, and fork() children that
 * exec()ed (exit handlers do not run then).  Only "<pid>.sock" files whose pid does not
 * exist and on which nobody listens.
 */
static void sweep_stale(const char *dir)
{
	char path[CTL_PATH_MAX], *end;
	struct dirent *e;
	DIR *d = opendir(dir);
	long pid;

	if (!d)
		return;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] < '1' || e->d_name[0] > '9')
			continue;
		pid = strtol(e->d_name, &end, 10);
		if (strcmp(end, ".sock") != 0 || pid > INT_MAX || pid == getpid())
			continue;
		if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
			continue;
		if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= sizeof path)
			continue;
		if (socket_is_stale(path))
			unlink(path);
	}
	closedir(d);
}

/* Make way for our socket: a stale one at our path goes, anything else is not ours. */
static int clear_path(const char *path, char *why, size_t n)
{
	struct stat st;

	if (lstat(path, &st) < 0 && errno == ENOENT)
		return 0;
	if (socket_is_stale(path) && (unlink(path) == 0 || errno == ENOENT))
		return 0;
	snprintf(why, n, "%s exists and is not a stale socket; remove it or set "
		 "FENTRY_RUNTIME_DIR", path);
	return -1;
}

/* Bind and listen at ctl.path; on success ctl_listen_fd and ctl.owner are set. */
static int bind_socket(char *why, size_t n)
{
	struct sockaddr_un a;
	struct stat st;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		snprintf(why, n, "socket(): %s", strerror(errno));
		return -1;
	}
	unix_address(&a, ctl.path);
	if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		snprintf(why, n, "cannot bind %s: %s", ctl.path, strerror(errno));
		close(fd);
		return -1;
	}
	ctl.owner = getpid();
	ctl_listen_fd = fd;
	if (lstat(ctl.path, &st) == 0) {
		ctl.file_dev = st.st_dev;
		ctl.file_ino = st.st_ino;
	}
	if (fstat(fd, &st) == 0)
		ctl.listen_ino = st.st_ino;
	/* Before listen(): until then a connect() is refused, so 0600 has no window. */
	if (chmod(ctl.path, 0600) < 0 || listen(fd, CTL_BACKLOG) < 0) {
		snprintf(why, n, "cannot listen on %s: %s", ctl.path, strerror(errno));
		return -1;
	}
	return 0;
}

static void unlink_at_exit(void)
{
	struct stat st;

	if (ctl.owner != getpid() || !ctl.path[0])
		return;
	if (lstat(ctl.path, &st) == 0 && st.st_dev == ctl.file_dev && st.st_ino == ctl.file_ino)
		unlink(ctl.path);
}

static int idle_ms_from_env(void)
{
	const char *s = secure_getenv("FENTRY_CONTROL_IDLE_SECONDS");
	char *end;
	long v = s ? strtol(s, &end, 10) : 0;

	if (!s || *end || v <= 0 || v > 86400)
		v = CTL_IDLE_SECONDS;
	return (int)v * 1000;
}

/* Folder, stale files, bind, listen: everything but the thread. */
static int open_channel(int sweep, char *why, size_t n)
{
	static int exit_handler;
	char dir[CTL_DIR_MAX];
	int i;

	if (runtime_dir(dir, sizeof dir, why, n) < 0 || check_dir(dir, why, n) < 0)
		return -1;
	if ((size_t)snprintf(ctl.path, sizeof ctl.path, "%s/%d.sock", dir, (int)getpid()) >=
	    sizeof ctl.path) {
		snprintf(why, n, "the socket path in %s would be longer than %zu bytes; set "
			 "FENTRY_RUNTIME_DIR to a shorter folder", dir, CTL_PATH_MAX - 1);
		ctl.path[0] = '\0';
		return -1;
	}
	if (sweep)
		sweep_stale(dir);
	if (!exit_handler && atexit(unlink_at_exit) == 0)
		exit_handler = 1; /* inherited by fork children, like the flag */
	for (i = 0; i < CTL_MAX_CLIENTS; i++)
		ctl.clients[i].fd = -1;
	ctl.idle_ms = idle_ms_from_env();
	ctl.accept_paused_until = 0;
	if (clear_path(ctl.path, why, n) < 0)
		return -1;
	return bind_socket(why, n);
}

/* Undo open_channel() after a failure (the thread is not running). */
static void close_channel(void)
{
	int fd = ctl_listen_fd;

	unlink_at_exit();
	ctl_listen_fd = -1;
	if (fd >= 0)
		close(fd);
	ctl.owner = 0;
	ctl.path[0] = '\0';
}

/* ---- replies ------------------------------------------------------------------------ */

static void reply_error(struct fentry_buf *out, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void reply_error(struct fentry_buf *out, const char *fmt, ...)
{
	char msg[2 * FENTRY_ERR_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	/* One line whatever the request echoed back contained. */
	for (char *c = msg; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = ' ';
	PUT(out, "{\"ok\":false,\"error\":");
	fentry_buf_json_string(out, msg);
	PUT(out, "}");
}

/* `"key":"value"` (or null), with a leading comma unless it is the first member. */
static void put_string_member(struct fentry_buf *out, const char *key, const char *value)
{
	fentry_buf_printf(out, ",\"%s\":", key);
	fentry_buf_json_string(out, value);
}

struct patch_count {
	const char *name;    /* count functions of this patch ... */
	uint32_t nfuncs;
	unsigned loaded;     /* ... and all loaded patches        */
};

static void count_patch(const struct fentry_patch_info *p, void *arg)
{
	struct patch_count *c = arg;

	c->loaded++;
	if (c->name && strcmp(p->name, c->name) == 0)
		c->nfuncs = p->nfuncs;
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
	put_string_member(l->out, "state", p->state == FENTRY_ACTIVE ? "active" : "reverted");
	fentry_buf_printf(l->out, ",\"applied_at\":%.6f,\"functions\":[", at);
	for (i = 0; p->funcs && i < p->nfuncs; i++) {
		if (i)
			PUT(l->out, ",");
		list_function(l->out, p, i);
	}
	PUT(l->out, "]}");
}

/* ---- requests ----------------------------------------------------------------------- */

enum { REQ_OP = 1, REQ_PATH = 2, REQ_NAME = 4 };

struct request {
	unsigned seen, twice, too_long; /* REQ_* bits */
	char op[16];
	char path[4096];
	char name[FENTRY_NAME_MAX];
};

static const char *member_name(unsigned bit)
{
	return bit & REQ_OP ? "op" : bit & REQ_PATH ? "path" : "name";
}

/* fentry_json_object_strings() callback: keep the members we know, ignore the rest. */
static void take_member(const char *key, const char *value, void *arg)
{
	struct request *q = arg;
	size_t len = strlen(value), size;
	unsigned bit;
	char *dst;

	if (strcmp(key, "op") == 0)
		bit = REQ_OP, dst = q->op, size = sizeof q->op;
	else if (strcmp(key, "path") == 0)
		bit = REQ_PATH, dst = q->path, size = sizeof q->path;
	else if (strcmp(key, "name") == 0)
		bit = REQ_NAME, dst = q->name, size = sizeof q->name;
	else
		return;
	q->twice |= q->seen & bit;
	q->seen |= bit;
	if (len >= size)
		q->too_long |= bit;
	else
		memcpy(dst, value, len + 1);
}

static void op_load(const struct request *q, struct fentry_buf *out)
{
	char name[FENTRY_NAME_MAX] = "", err[FENTRY_ERR_MAX] = "";
	struct patch_count count = {.name = name};

	if (!(q->seen & REQ_PATH)) {
		reply_error(out, "load needs a string member \"path\": the patch .so's "
			    "absolute path");
		return;
	}
	if (q->path[0] != '/') {
		reply_error(out, "load: the path must be absolute, not \"%.300s\"", q->path);
		return;
	}
	if (fentry_apply_path(q->path, name, err) < 0) {
		err[FENTRY_ERR_MAX - 1] = '\0';
		reply_error(out, "%s", err[0] ? err : "the loader gave no reason");
		return;
	}
	name[FENTRY_NAME_MAX - 1] = '\0';
	fentry_foreach_patch(count_patch, &count);
	PUT(out, "{\"ok\":true");
	put_string_member(out, "name", name);
	fentry_buf_printf(out, ",\"functions\":%u}", (unsigned)count.nfuncs);
}

/* revert and unload: one patch, by name. */
static void op_by_name(const struct request *q, struct fentry_buf *out,
		       int (*action)(const char *, char *))
{
	char err[FENTRY_ERR_MAX] = "";

	if (!(q->seen & REQ_NAME)) {
		reply_error(out, "%s needs a string member \"name\": the patch's name", q->op);
		return;
	}
	if (action(q->name, err) < 0) {
		err[FENTRY_ERR_MAX - 1] = '\0';
		reply_error(out, "%s", err[0] ? err : "the loader gave no reason");
		return;
	}
	PUT(out, "{\"ok\":true");
	put_string_member(out, "name", q->name);
	PUT(out, "}");
}

static void op_list(struct fentry_buf *out)
{
	struct list_ctx l = {.out = out};

	PUT(out, "{\"ok\":true,\"patches\":[");
	fentry_foreach_patch(list_patch, &l);
	PUT(out, "]}");
}

static void op_status(struct fentry_buf *out)
{
	static struct fentry_module main_module; /* 4 KiB: only this thread uses it */
	char exe[4096], id[2 * FENTRY_BUILD_ID_MAX + 1];
	struct patch_count count = {0};
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	int have_id = fentry_module_main(&main_module) == 0 && main_module.build_id_len > 0 &&
		      main_module.build_id_len <= FENTRY_BUILD_ID_MAX;

	if (n >= 0)
		exe[n] = '\0';
	if (have_id)
		fentry_hex(main_module.build_id, main_module.build_id_len, id);
	fentry_foreach_patch(count_patch, &count);
	fentry_buf_printf(out, "{\"ok\":true,\"pid\":%d", (int)getpid());
	put_string_member(out, "program", n >= 0 ? exe : NULL);
	put_string_member(out, "build_id", have_id ? id : NULL);
	put_string_member(out, "mode", fentry_mode());
	put_string_member(out, "mode_reason", fentry_mode_reason());
	fentry_buf_printf(out, ",\"patches_active\":%u,\"patches_loaded\":%u}",
			  fentry_active_count(), count.loaded);
}

/* One request line (without its '\n') into one reply line in `out`. */
static void handle_request(const char *line, size_t len, struct fentry_buf *out)
{
	static struct request q; /* 4 KiB: only this thread uses it */
	char err[FENTRY_ERR_MAX];

	memset(&q, 0, sizeof q);
	if (fentry_json_object_strings(line, len, take_member, &q, err, sizeof err) < 0)
		reply_error(out, "bad request: %s", err);
	else if (q.twice)
		reply_error(out, "bad request: member \"%s\" given twice", member_name(q.twice));
	else if (q.too_long)
		reply_error(out, "bad request: member \"%s\" is too long",
			    member_name(q.too_long));
	else if (!(q.seen & REQ_OP))
		reply_error(out, "bad request: no string member \"op\" (one of: " CTL_OPS ")");
	else if (strcmp(q.op, "load") == 0)
		op_load(&q, out);
	else if (strcmp(q.op, "revert") == 0)
		op_by_name(&q, out, fentry_revert_name);
	else if (strcmp(q.op, "unload") == 0)
		op_by_name(&q, out, fentry_unload_name);
	else if (strcmp(q.op, "list") == 0)
		op_list(out);
	else if (strcmp(q.op, "status") == 0)
		op_status(out);
	else
		reply_error(out, "unknown op \"%s\": known ops are " CTL_OPS, q.op);
	PUT(out, "\n");
}

/* ---- clients ------------------------------------------------------------------------ */

static void touch(struct ctl_client *c)
{
	c->deadline = now_ms() + ctl.idle_ms;
}

static void drop(struct ctl_client *c)
{
	int fd = c->fd;

	c->fd = -1; /* before close(): see the comment at `ctl` */
	close_ours(fd, c->ino);
	fentry_buf_free(&c->out);
	c->out_off = 0;
}

/* Send what fits without blocking; -1 if the connection is gone. */
static int flush(struct ctl_client *c)
{
	ssize_t n;

	while (c->out_off < c->out.len) {
		n = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
		if (n > 0) {
			c->out_off += (size_t)n;
			touch(c);
		} else if (n < 0 && errno == EAGAIN) {
			return 0;
		} else if (n == 0 || errno != EINTR) {
			return -1;
		}
	}
	fentry_buf_free(&c->out);
	c->out_off = 0;
	return 0;
}

static void read_input(struct ctl_client *c)
{
	ssize_t n;

	while (c->in_len < sizeof c->in) {
		n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
		if (n > 0) {
			c->in_len += (size_t)n;
			touch(c);
		} else if (n < 0 && errno == EAGAIN) {
			return;
		} else if (n == 0 || errno != EINTR) {
			c->eof = 1; /* shut down by the client, or broken */
			return;
		}
	}
}

/* Answer the first complete line in c->in; 0 if there is none yet. */
static int answer_line(struct ctl_client *c)
{
	char *nl = memchr(c->in, '\n', c->in_len);
	size_t len;

	if (!nl && c->in_len <= CTL_LINE_MAX)
		return 0;
	if (!nl) {
		reply_error(&c->out, "request line longer than %d bytes", CTL_LINE_MAX);
		PUT(&c->out, "\n");
		c->closing = 1;
	} else {
		len = (size_t)(nl - c->in);
		handle_request(c->in, len, &c->out);
		c->in_len -= len + 1;
		memmove(c->in, nl + 1, c->in_len);
	}
	if (c->out.oom) {
		fentry_buf_free(&c->out);
		c->closing = 1;
	}
	c->out_off = 0;
	return 1;
}

/* Answer and send until the client has to wait for input or for room to send. */
static void progress(struct ctl_client *c)
{
	for (;;) {
		if (flush(c) < 0 || (c->out.len == 0 && c->closing)) {
			drop(c);
			return;
		}
		if (c->out.len > 0)
			return; /* the rest when poll() says POLLOUT */
		if (!answer_line(c)) {
			if (c->eof) /* a partial line at the end is dropped with the client */
				drop(c);
			return;
		}
	}
}

static void client_io(struct ctl_client *c, short revents)
{
	if (revents & POLLNVAL) { /* the program closed our fd: it is not ours any more */
		c->fd = -1;
		fentry_buf_free(&c->out);
		return;
	}
	if (revents & (POLLIN | POLLHUP | POLLERR))
		read_input(c);
	progress(c);
}

/* One reply line to a connection we will not serve, without waiting. */
static void refuse(int fd, const char *why)
{
	struct fentry_buf b = {0};

	reply_error(&b, "%s", why);
	PUT(&b, "\n");
	if (!b.oom) /* best effort: the connection is closed next anyway */
		send(fd, b.data, b.len, MSG_NOSIGNAL | MSG_DONTWAIT);
	fentry_buf_free(&b);
}

/* Same uid as the process, or root; -1 with a reason otherwise. */
static int check_peer(int fd, char *why, size_t n)
{
	struct ucred cred;
	socklen_t len = sizeof cred;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		snprintf(why, n, "cannot read the peer's credentials: %s", strerror(errno));
		return -1;
	}
	if (cred.uid == geteuid() || cred.uid == 0)
		return 0;
	snprintf(why, n, "permission denied: uid %u may not control process %d (uid %u)",
		 (unsigned)cred.uid, (int)getpid(), (unsigned)geteuid());
	return -1;
}

static struct ctl_client *free_slot(void)
{
	int i;

	for (i = 0; i < CTL_MAX_CLIENTS; i++)
		if (ctl.clients[i].fd < 0)
			return &ctl.clients[i];
	return NULL;
}

static void admit(int fd, struct ctl_client *c)
{
	struct stat st;
	char why[256] = "";

	if (check_peer(fd, why, sizeof why) < 0 || fstat(fd, &st) < 0) {
		refuse(fd, why[0] ? why : "cannot serve this connection");
		close(fd);
		return;
	}
	c->ino = st.st_ino;
	c->in_len = 0;
	c->eof = c->closing = 0;
	c->out_off = 0;
	memset(&c->out, 0, sizeof c->out);
	touch(c);
	c->fd = fd;
}

/* Accept while there are free slots; the others wait in the listen backlog. */
static void accept_clients(void)
{
	struct ctl_client *c;
	int fd;

	while ((c = free_slot()) != NULL) {
		fd = accept4(ctl_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd >= 0)
			admit(fd, c);
		else if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
			ctl.accept_paused_until = now_ms() + CTL_ACCEPT_PAUSE_MS;
		if (fd < 0 && errno != EINTR && errno != ECONNABORTED)
			return;
	}
}

/* A client that sent part of a line and stalled, or stopped reading its reply, goes. */
static void expire_idle(void)
{
	int64_t now = now_ms();
	int i;

	for (i = 0; i < CTL_MAX_CLIENTS; i++) {
		struct ctl_client *c = &ctl.clients[i];

		if (c->fd < 0 || c->deadline > now)
			continue;
		if (c->in_len > 0 && c->out.len == 0)
			refuse(c->fd, "no complete request line in time; closing");
		drop(c);
	}
}

/* ---- the thread ---------------------------------------------------------------------- */

/*
 * pfd[0] is the listener: fd -1 while all slots are taken or accepting is paused.
 * slot[k] is the client of pfd[k].
 */
static int fill_pollfds(struct pollfd *pfd, int *slot, int *timeout)
{
	int64_t now = now_ms(), wake = -1;
	int i, n = 1;

	pfd[0].fd = free_slot() ? ctl_listen_fd : -1;
	pfd[0].events = POLLIN;
	if (now < ctl.accept_paused_until) {
		pfd[0].fd = -1;
		wake = ctl.accept_paused_until;
	}
	for (i = 0; i < CTL_MAX_CLIENTS; i++) {
		struct ctl_client *c = &ctl.clients[i];

		if (c->fd < 0)
			continue;
		pfd[n].fd = c->fd;
		pfd[n].events = c->out_off < c->out.len ? POLLOUT : c->eof ? 0 : POLLIN;
		slot[n++] = i;
		if (wake < 0 || c->deadline < wake)
			wake = c->deadline;
	}
	*timeout = wake < 0 ? -1 : wake <= now ? 0 : (int)(wake - now);
	return n;
}

static int listener_is_ours(void)
{
	struct stat st;

	return fstat(ctl_listen_fd, &st) == 0 && S_ISSOCK(st.st_mode) &&
	       st.st_ino == ctl.listen_ino;
}

static void *serve(void *unused)
{
	struct pollfd pfd[1 + CTL_MAX_CLIENTS];
	int slot[1 + CTL_MAX_CLIENTS], n, k, timeout;

	(void)unused;
	pthread_setname_np(pthread_self(), "fentry-ctl");
	for (;;) {
		n = fill_pollfds(pfd, slot, &timeout);
		if (poll(pfd, (nfds_t)n, timeout) < 0) {
			if (errno != EINTR)
				usleep(100 * 1000); /* ENOMEM: try again later */
			continue;
		}
		for (k = 1; k < n; k++) /* first: clients that are gone free their slots */
			if (pfd[k].revents)
				client_io(&ctl.clients[slot[k]], pfd[k].revents);
		expire_idle();
		if (pfd[0].fd >= 0 && pfd[0].revents) {
			if (!listener_is_ours())
				break;
			accept_clients();
		}
	}
	/* The program closed our listening socket (a daemon closing every fd, say). */
	dprintf(STDERR_FILENO, "fentry: control channel off: the program closed its socket; "
		"start the program without closing inherited descriptors to keep it\n");
	ctl_listen_fd = -1;
	for (k = 0; k < CTL_MAX_CLIENTS; k++)
		if (ctl.clients[k].fd >= 0)
			drop(&ctl.clients[k]);
	return NULL;
}

static int start_thread(char *why, size_t n)
{
	pthread_attr_t attr;
	pthread_t thread;
	sigset_t all, old;
	int rc;

	sigfillset(&all);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* The thread inherits this mask: it never runs the program's signal handlers. */
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&thread, &attr, serve, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (rc != 0) {
		snprintf(why, n, "cannot start its thread: %s", strerror(rc));
		return -1;
	}
	return 0;
}

static void start(int sweep)
{
	const char *setting = secure_getenv("FENTRY_CONTROL");
	char why[FENTRY_ERR_MAX];

	if ((setting && strcmp(setting, "0") == 0) || ctl.owner == getpid())
		return;
	if (open_channel(sweep, why, sizeof why) < 0 || start_thread(why, sizeof why) < 0) {
		close_channel();
		dprintf(STDERR_FILENO, "fentry: control channel off: %s\n", why);
	}
}

void fentry_control_start(void)
{
	start(1);
}

/*
 * In the child of fork(), from a pthread_atfork() handler: only the forking thread
 * exists.  The parent's thread may have been anywhere, so its buffers are forgotten,
 * not freed (it may have been inside realloc()); its descriptors are closed, never
 * the parent's socket file unlinked.  A channel is started only if the parent had one,
 * and without the sweep (a pre-forking server would sweep once per worker).
 */
void fentry_control_after_fork_child(void)
{
	int had = ctl.owner != 0, fd, i;

	ctl.owner = 0; /* first: nothing below may unlink the parent's file */
	ctl.path[0] = '\0';
	if (!had)
		return;
	fd = ctl_listen_fd;
	ctl_listen_fd = -1;
	close_ours(fd, ctl.listen_ino);
	for (i = 0; i < CTL_MAX_CLIENTS; i++) {
		fd = ctl.clients[i].fd;
		ctl.clients[i].fd = -1;
		close_ours(fd, ctl.clients[i].ino);
		memset(&ctl.clients[i].out, 0, sizeof ctl.clients[i].out);
	}
	start(0);
}
