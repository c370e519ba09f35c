/*
 * modes_tracer.c - become the tracer of process PID (PTRACE_SEIZE: it keeps running)
 * and wait until killed; the kernel detaches when we exit.  Prints "traced" once done.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	pid_t pid = argc > 1 ? (pid_t)atoi(argv[1]) : 0;

	if (pid <= 0 || ptrace(PTRACE_SEIZE, pid, NULL, NULL) < 0) {
		perror("modes_tracer: PTRACE_SEIZE");
		return 1;
	}
	printf("traced\n");
	fflush(stdout);
	for (;;)
		pause();
}
