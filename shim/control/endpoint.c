/* endpoint.c - the control socket's folder and file: where it is, who may own it, its life. */

/*
 * The folder: $FENTRY_RUNTIME_DIR, else $XDG_RUNTIME_DIR/fentry, else /tmp/fentry-<euid>
 * (read with secure_getenv: a setuid program ignores the user's variables).  Created
 * 0700 if missing; an existing one must be a real folder (not a symlink) of this
 * process's effective uid that group and others cannot write.  Otherwise there is no
 * channel, and the reason is printed on stderr and published (fentry_endpoint_publish_off).
 *
 * The file: <folder>/<pid>.sock, with the pid as this process sees it (in a pid
 * namespace, its pid there).  chmod 0600 before listen(): until listen() a connect()
 * is refused, so there is no moment in which another user could connect.  Only the
 * process that bound it removes it, at exit; a fork child never removes its parent's.
 * Sockets of processes that are gone are swept by the next process that starts.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "control/endpoint.h"

#define CTL_BACKLOG 64
#define CTL_PATH_MAX sizeof(((struct sockaddr_un *)0)->sun_path)
#define CTL_DIR_MAX 200 /* longer cannot hold a socket path (107 bytes) anyway */
#define OFF_PREFIX "fentry-control-off: "
#define MEMFD_NAME_MAX 249 /* NAME_MAX minus the kernel's "memfd:" */

/*
 * Written at start (before the control thread exists), in a fork child (one thread) and,
 * for the "off" marker, by the control thread as it stops; read by the thread that
 * calls exit() (unlink_at_exit(): ep.owner and ep.path, written before the control
 * thread and the program's threads were created) and by a fork child (the snapshot, as
 * control.c's `ctl`).  No reader runs concurrently with a writer.
 */
/* -1 when this process serves no channel (kept out of `ep`: see control.c's `ctl`). */
static int listen_fd = -1;
static int off_fd = -1; /* the memfd saying why there is no channel, or -1 */

static struct {
	ino_t listen_ino; /* the listening socket's inode                      */
	pid_t owner;      /* the process that bound `path`; only it unlinks it */
	char path[CTL_PATH_MAX];
	dev_t file_dev;   /* the socket file bound (unlink only that file)     */
	ino_t file_ino;
	ino_t off_ino;    /* the marker memfd's inode                          */
} ep;

/* Close fd only if it is still the descriptor we opened (the program may close ours). */
static void close_if(int fd, ino_t ino, int sock)
{
	struct stat st;

	if (fd >= 0 && fstat(fd, &st) == 0 && st.st_ino == ino &&
	    (sock ? S_ISSOCK(st.st_mode) : S_ISREG(st.st_mode)))
		close(fd);
}

/* $FENTRY_RUNTIME_DIR, $XDG_RUNTIME_DIR/fentry or /tmp/fentry-<euid>, no trailing '/'. */
static int runtime_dir(char *dir, size_t size, char *why)
{
	const char *env = secure_getenv("FENTRY_RUNTIME_DIR"), *xdg = secure_getenv("XDG_RUNTIME_DIR");
	size_t len;
	int n;

	if (env && env[0] && env[0] != '/') {
		snprintf(why, FENTRY_ERR_MAX, "FENTRY_RUNTIME_DIR=%.200s is not an absolute path; "
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
		snprintf(why, FENTRY_ERR_MAX, "its folder name is too long for a socket path (%zu "
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
static int check_dir(const char *dir, char *why)
{
	struct stat st;

	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		snprintf(why, FENTRY_ERR_MAX, "cannot create %s: %s; create it (mode 0700) or set "
			 "FENTRY_RUNTIME_DIR", dir, strerror(errno));
		return -1;
	}
	if (lstat(dir, &st) < 0)
		snprintf(why, FENTRY_ERR_MAX, "cannot stat %s: %s; set FENTRY_RUNTIME_DIR", dir,
			 strerror(errno));
	else if (S_ISLNK(st.st_mode))
		snprintf(why, FENTRY_ERR_MAX, "%s is a symlink; remove it or set "
			 "FENTRY_RUNTIME_DIR to a real folder", dir);
	else if (!S_ISDIR(st.st_mode))
		snprintf(why, FENTRY_ERR_MAX, "%s is not a folder; remove it or set "
			 "FENTRY_RUNTIME_DIR", dir);
	else if (st.st_uid != geteuid())
		snprintf(why, FENTRY_ERR_MAX, "%s belongs to uid %u, not to this process's uid %u; "
			 "remove it or set FENTRY_RUNTIME_DIR to a folder of uid %u", dir,
			 (unsigned)st.st_uid, (unsigned)geteuid(), (unsigned)geteuid());
	else if (st.st_mode & (S_IWGRP | S_IWOTH))
		snprintf(why, FENTRY_ERR_MAX, "%s is writable by group or others (mode %04o); "
			 "chmod 700 it or set FENTRY_RUNTIME_DIR", dir,
			 (unsigned)(st.st_mode & 07777));
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
static int clear_path(const char *path, char *why)
{
	struct stat st;

	if (lstat(path, &st) < 0 && errno == ENOENT)
		return 0;
	if (socket_is_stale(path) && (unlink(path) == 0 || errno == ENOENT))
		return 0;
	snprintf(why, FENTRY_ERR_MAX, "%s exists and is not a stale socket; remove it or set "
		 "FENTRY_RUNTIME_DIR", path);
	return -1;
}

/* Bind and listen at ep.path; on success listen_fd and ep.owner are set. */
static int bind_socket(char *why)
{
	struct sockaddr_un a;
	struct stat st;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		snprintf(why, FENTRY_ERR_MAX, "socket(): %s", strerror(errno));
		return -1;
	}
	unix_address(&a, ep.path);
	if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		snprintf(why, FENTRY_ERR_MAX, "cannot bind %s: %s", ep.path, strerror(errno));
		close(fd);
		return -1;
	}
	ep.owner = getpid();
	listen_fd = fd;
	if (lstat(ep.path, &st) == 0) {
		ep.file_dev = st.st_dev;
		ep.file_ino = st.st_ino;
	}
	if (fstat(fd, &st) == 0)
		ep.listen_ino = st.st_ino;
	/* Before listen(): until then a connect() is refused, so 0600 has no window. */
	if (chmod(ep.path, 0600) < 0 || listen(fd, CTL_BACKLOG) < 0) {
		snprintf(why, FENTRY_ERR_MAX, "cannot listen on %s: %s", ep.path, strerror(errno));
		return -1;
	}
	return 0;
}

static void unlink_at_exit(void)
{
	struct stat st;

	if (ep.owner != getpid() || !ep.path[0])
		return;
	if (lstat(ep.path, &st) == 0 && st.st_dev == ep.file_dev && st.st_ino == ep.file_ino)
		unlink(ep.path);
}

static void close_off_marker(void)
{
	int fd = off_fd;

	off_fd = -1;
	close_if(fd, ep.off_ino, 0);
}

FENTRY_HIDDEN int fentry_endpoint_open(int sweep, char *why)
{
	static int exit_handler;
	char dir[CTL_DIR_MAX];

	if (runtime_dir(dir, sizeof dir, why) < 0 || check_dir(dir, why) < 0)
		return -1;
	if ((size_t)snprintf(ep.path, sizeof ep.path, "%s/%d.sock", dir, (int)getpid()) >=
	    sizeof ep.path) {
		snprintf(why, FENTRY_ERR_MAX, "the socket path in %s would be longer than %zu "
			 "bytes; set FENTRY_RUNTIME_DIR to a shorter folder", dir, CTL_PATH_MAX - 1);
		ep.path[0] = '\0';
		return -1;
	}
	if (sweep)
		sweep_stale(dir);
	if (!exit_handler && atexit(unlink_at_exit) == 0)
		exit_handler = 1; /* inherited by fork children, like the flag */
	if (clear_path(ep.path, why) < 0 || bind_socket(why) < 0) {
		fentry_endpoint_close();
		return -1;
	}
	close_off_marker(); /* a fork child's channel replaces the parent's reason */
	return listen_fd;
}

FENTRY_HIDDEN void fentry_endpoint_close(void)
{
	int fd = listen_fd;

	unlink_at_exit();
	listen_fd = -1;
	close_if(fd, ep.listen_ino, 1);
	ep.owner = 0;
	ep.path[0] = '\0';
}

FENTRY_HIDDEN int fentry_endpoint_is_open(void)
{
	return ep.owner == getpid();
}

FENTRY_HIDDEN int fentry_endpoint_is_listener(int fd)
{
	struct stat st;

	return fd >= 0 && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == ep.listen_ino;
}

FENTRY_HIDDEN void fentry_endpoint_forget_after_fork(void)
{
	int fd = listen_fd;

	ep.owner = 0; /* first: nothing below may unlink the parent's file */
	ep.path[0] = '\0';
	listen_fd = -1;
	close_if(fd, ep.listen_ino, 1);
}

FENTRY_HIDDEN void fentry_endpoint_publish_off(const char *why)
{
	char name[MEMFD_NAME_MAX + 1];
	struct stat st;
	int fd;

	snprintf(name, sizeof name, OFF_PREFIX "%s", why);
	/* One line, and nothing readlink() would show differently. */
	for (char *c = name; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = ' ';
	close_off_marker();
	fd = memfd_create(name, MFD_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		if (fd >= 0)
			close(fd);
		return; /* best effort: the reason is on stderr too */
	}
	ep.off_ino = st.st_ino;
	off_fd = fd;
}
