/* control.c - the control channel's connections and its thread: lines in, replies out, in time. */

/*
 * Why a thread.  The seed loaded a patch from __fentry__ itself once a global variable
 * was set.  But __fentry__ runs at the entry of any instrumented function: inside a
 * signal handler, inside code that holds malloc's or the dynamic loader's locks, in the
 * middle of the program's own critical sections.  dlopen() there takes those locks again
 * or re-enters malloc - a deadlock or a corrupted heap.  A thread of our own is ordinary
 * code: it may dlopen(), take the loader's mutex and sleep, and the program's threads
 * never stop or poll for it.
 *
 * The parts.  endpoint.c: the socket's folder and file.  protocol.c: what a request
 * line means and what the reply is.  Here: who may connect (SO_PEERCRED: the process's
 * euid or root), the connections, and the time they may take.  FENTRY_CONTROL=0
 * turns the channel off.
 *
 * The thread.  One poll() loop over the listening socket and up to CTL_MAX_CLIENTS
 * clients, all non-blocking: each client has an input buffer of one line and an output
 * buffer for its reply, so a slow or stalled client delays nobody.  More clients wait
 * in the listen backlog and are accepted in order as slots free.  Replies are sent with
 * MSG_NOSIGNAL (the program's SIGPIPE disposition is never touched), and the thread
 * blocks every signal so that the program's signals go to the program's threads.
 *
 * Time.  A connection has FENTRY_CONTROL_REQUEST_SECONDS (default 10) to send a complete
 * request line, counted from its acceptance or from the end of its previous reply - an
 * absolute deadline that bytes received do not extend - and as long again to read each
 * reply.  Past it the connection is closed (with a "timeout" error line if it sent part
 * of a line).  So a slot is never held longer than that per request, and a client
 * waiting in the backlog behind at most CTL_MAX_CLIENTS others is accepted within it.
 *
 * fork().  The child has no control thread.  It closes (never unlinks) the parent's
 * sockets and opens its own at its own pid.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "control/control.h"
#include "control/endpoint.h"
#include "control/json.h"
#include "control/protocol.h"
#include "core/audit.h"
#include "core/codes.h"

#define CTL_MAX_CLIENTS 16
#define CTL_REQUEST_SECONDS 10   /* default time for a request line, and for a reply */
#define CTL_ACCEPT_PAUSE_MS 1000 /* after accept() ran out of file descriptors */

struct ctl_client {
	int fd;                    /* -1: a free slot                                  */
	ino_t ino;                 /* the socket's inode: close fd only while it is ours */
	struct fentry_peer peer;   /* SO_PEERCRED at accept                            */
	int64_t deadline;          /* monotonic ms: the request line, or the reply's end */
	int eof;                   /* the client shut its side (or the connection broke) */
	int closing;               /* close as soon as `out` is sent                    */
	struct fentry_buf out;     /* the reply being sent ...                          */
	size_t out_off;            /* ... and how much of it went out already            */
	size_t in_len;
	char *in;                  /* received bytes (CTL_IN_SIZE): ctl.in[slot]         */
};

/* One line and its '\n' fit. */
#define CTL_IN_SIZE (FENTRY_LINE_MAX + 1)

/*
 * The connections of this process.  Written by fentry_control_start() before the thread
 * exists, then by the thread only; the fork child reads the snapshot fork() left
 * (fentry_control_after_fork_child(), on the thread that forked).  A slot's fd is set to
 * -1 before it is closed, so that a snapshot never names a closed (perhaps reused)
 * descriptor: the plain store precedes the close() system call (an external call: the
 * compiler keeps it before), whose locked update of the descriptor table makes it
 * visible; fork() copies that table under the same lock, before it copies memory.
 * 1 MiB of buffers: zero-initialised, so .bss, not .data in every program's file (the
 * listening descriptor, -1 when off, is endpoint.c's).  The slots are small and the
 * input buffers apart: marking every slot free writes one page, not one page per
 * slot, so an idle process keeps the untouched buffers shared with the zero page.
 */
static int ctl_listen_fd = -1;

static struct {
	int request_ms;
	int64_t accept_paused_until;
	struct ctl_client clients[CTL_MAX_CLIENTS];
	char in[CTL_MAX_CLIENTS][CTL_IN_SIZE];
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

static int request_ms_from_env(void)
{
	const char *s = secure_getenv("FENTRY_CONTROL_REQUEST_SECONDS");
	char *end;
	long v = s ? strtol(s, &end, 10) : 0;

	if (!s || *end || v <= 0 || v > 86400)
		v = CTL_REQUEST_SECONDS;
	return (int)v * 1000;
}

/* ---- clients ------------------------------------------------------------------------ */

/* A new window: for the next request line, or for reading the reply just made. */
static void start_window(struct ctl_client *c)
{
	c->deadline = now_ms() + ctl.request_ms;
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
		} else if (n < 0 && errno == EAGAIN) {
			return 0;
		} else if (n == 0 || errno != EINTR) {
			return -1;
		}
	}
	if (c->out.len > 0)
		start_window(c); /* the reply is out: the next request's time starts */
	fentry_buf_free(&c->out);
	c->out_off = 0;
	return 0;
}

static void read_input(struct ctl_client *c)
{
	ssize_t n;

	while (c->in_len < CTL_IN_SIZE) {
		n = recv(c->fd, c->in + c->in_len, CTL_IN_SIZE - c->in_len, 0);
		if (n > 0) {
			c->in_len += (size_t)n; /* never extends the deadline */
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

	if (!nl && c->in_len <= FENTRY_LINE_MAX)
		return 0;
	if (!nl) {
		fentry_protocol_error(&c->out, FENTRY_E_BAD_REQUEST, "request line longer than %d "
				      "bytes", FENTRY_LINE_MAX);
		c->closing = 1;
	} else {
		len = (size_t)(nl - c->in);
		fentry_protocol_answer(c->in, len, &c->peer, &c->out);
		c->in_len -= len + 1;
		memmove(c->in, nl + 1, c->in_len);
	}
	if (c->out.oom) {
		fentry_buf_free(&c->out);
		c->closing = 1;
	}
	c->out_off = 0;
	start_window(c); /* the time to read the reply */
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
static void refuse(int fd, int code, const char *why)
{
	struct fentry_buf b = {0};

	fentry_protocol_error(&b, code, "%s", why);
	if (!b.oom) /* best effort: the connection is closed next anyway */
		send(fd, b.data, b.len, MSG_NOSIGNAL | MSG_DONTWAIT);
	fentry_buf_free(&b);
}

/* Same uid as the process, or root; -1 with a reason (and an audit entry) otherwise. */
static int check_peer(int fd, struct fentry_peer *peer, char *why, size_t n)
{
	struct ucred cred;
	socklen_t len = sizeof cred;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		snprintf(why, n, "cannot read the peer's credentials: %s", strerror(errno));
		return -1;
	}
	peer->via = FENTRY_VIA_SOCKET;
	peer->uid = cred.uid;
	peer->pid = cred.pid;
	if (cred.uid == geteuid() || cred.uid == 0)
		return 0;
	snprintf(why, n, "permission denied: uid %u may not control process %d (uid %u)",
		 (unsigned)cred.uid, (int)getpid(), (unsigned)geteuid());
	fentry_audit_refusal(peer, "connect", NULL, NULL, FENTRY_E_NOT_PERMITTED, why);
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
	struct fentry_peer peer;
	struct stat st;
	char why[256] = "";

	if (check_peer(fd, &peer, why, sizeof why) < 0 || fstat(fd, &st) < 0) {
		refuse(fd, FENTRY_E_NOT_PERMITTED, why[0] ? why : "cannot serve this connection");
		close(fd);
		return;
	}
	c->ino = st.st_ino;
	c->peer = peer;
	c->in_len = 0;
	c->eof = c->closing = 0;
	c->out_off = 0;
	memset(&c->out, 0, sizeof c->out);
	start_window(c);
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

/* A client past its deadline goes: a request line not complete, or a reply not read. */
static void expire(void)
{
	int64_t now = now_ms();
	int i;

	for (i = 0; i < CTL_MAX_CLIENTS; i++) {
		struct ctl_client *c = &ctl.clients[i];

		if (c->fd < 0 || c->deadline > now)
			continue;
		if (c->in_len > 0 && c->out.len == 0) {
			char why[96];

			snprintf(why, sizeof why, "no complete request line within %d s; closing",
				 ctl.request_ms / 1000);
			refuse(c->fd, FENTRY_E_TIMEOUT, why);
		}
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

static void *serve(void *unused)
{
	struct pollfd pfd[1 + CTL_MAX_CLIENTS];
	int slot[1 + CTL_MAX_CLIENTS], n, k, timeout;
	const char *why = "the program closed its socket; start the program without closing "
			  "inherited descriptors to keep it";

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
		expire();
		if (pfd[0].fd >= 0 && pfd[0].revents) {
			if (!fentry_endpoint_is_listener(ctl_listen_fd))
				break;
			accept_clients();
		}
	}
	/* The program closed our listening socket (a daemon closing every fd, say). */
	dprintf(STDERR_FILENO, "fentry: control channel off: %s\n", why);
	fentry_endpoint_publish_off(why);
	ctl_listen_fd = -1;
	for (k = 0; k < CTL_MAX_CLIENTS; k++)
		if (ctl.clients[k].fd >= 0)
			drop(&ctl.clients[k]);
	return NULL;
}

static int start_thread(char *why)
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
		snprintf(why, FENTRY_ERR_MAX, "cannot start its thread: %s", strerror(rc));
		return -1;
	}
	return 0;
}

static void start(int sweep)
{
	const char *setting = secure_getenv("FENTRY_CONTROL");
	char why[FENTRY_ERR_MAX];
	int i;

	if (setting && strcmp(setting, "0") == 0) {
		fentry_endpoint_publish_off("FENTRY_CONTROL=0 (the program runs without a channel)");
		return;
	}
	if (fentry_endpoint_is_open())
		return;
	for (i = 0; i < CTL_MAX_CLIENTS; i++) {
		ctl.clients[i].fd = -1;
		ctl.clients[i].in = ctl.in[i];
	}
	ctl.request_ms = request_ms_from_env();
	ctl.accept_paused_until = 0;
	ctl_listen_fd = fentry_endpoint_open(sweep, why);
	if (ctl_listen_fd < 0 || start_thread(why) < 0) {
		fentry_endpoint_close();
		ctl_listen_fd = -1;
		dprintf(STDERR_FILENO, "fentry: control channel off: %s\n", why);
		fentry_endpoint_publish_off(why);
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
	int had = ctl_listen_fd >= 0, fd, i;

	fentry_endpoint_forget_after_fork(); /* first: nothing may unlink the parent's file */
	ctl_listen_fd = -1;
	if (!had)
		return;
	for (i = 0; i < CTL_MAX_CLIENTS; i++) {
		fd = ctl.clients[i].fd;
		ctl.clients[i].fd = -1;
		close_ours(fd, ctl.clients[i].ino);
		memset(&ctl.clients[i].out, 0, sizeof ctl.clients[i].out);
	}
	start(0);
}
