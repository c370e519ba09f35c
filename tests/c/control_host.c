/* control_host.c - a program that runs only the control channel, driven by lines on stdin. */

/*
 * stdin commands, one per line; each answer is one line on stdout:
 *   fork   fork a child that has its own channel and waits for SIGUSR1, then exit(0)s
 *          ("child <pid>")
 *   spawn  fork a child that execs /bin/true at once, and reap it ("spawned <pid>")
 *   wait   reap one child ("reaped <pid> <status>")
 *   clearenv, setenv NAME VALUE
 *          change the environment, as daemons do ("env"); a fork child's channel then
 *          follows the new one, while /proc/PID/environ still shows the one at start
 *   clobber
 *          overwrite the environment strings of the start with 'x' where they lie, as
 *          programs that set their process title do ("clobbered")
 *   exit   exit(0) (atexit handlers run); EOF on stdin does the same
 * At start it prints "ready <pid>" once fentry_control_start() returned.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "control/control.h"
#include "core/audit.h"

extern char **environ;

static volatile sig_atomic_t released;
static char **start_environ;

static void on_usr1(int sig)
{
	(void)sig;
	released = 1;
}

static void child_wait_for_usr1(const sigset_t *unblocked)
{
	while (!released)
		sigsuspend(unblocked);
	exit(0);
}

int main(void)
{
	struct sigaction sa;
	sigset_t usr1, old;
	char line[512], name[128], value[384];
	pid_t pid;
	int status;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, &old);
	start_environ = environ;
	pthread_atfork(NULL, NULL, fentry_control_after_fork_child);
	fentry_audit_init();
	fentry_control_start();
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		if (strcmp(line, "fork\n") == 0) {
			pid = fork();
			if (pid == 0)
				child_wait_for_usr1(&old);
			printf("child %d\n", (int)pid);
		} else if (strcmp(line, "spawn\n") == 0) {
			pid = fork();
			if (pid == 0) {
				execl("/bin/true", "true", (char *)NULL);
				_exit(127);
			}
			waitpid(pid, &status, 0);
			printf("spawned %d\n", (int)pid);
		} else if (strcmp(line, "wait\n") == 0) {
			pid = wait(&status);
			printf("reaped %d %d\n", (int)pid, status);
		} else if (strcmp(line, "clearenv\n") == 0) {
			clearenv();
			printf("env\n");
		} else if (sscanf(line, "setenv %127s %383s", name, value) == 2) {
			setenv(name, value, 1);
			printf("env\n");
		} else if (strcmp(line, "clobber\n") == 0) {
			for (char **e = start_environ; *e; e++)
				memset(*e, 'x', strlen(*e));
			printf("clobbered\n");
		} else if (strcmp(line, "exit\n") == 0) {
			break;
		}
		fflush(stdout);
	}
	return 0;
}
