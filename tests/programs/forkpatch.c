/*
 * forkpatch.c - a child made by fork() patches itself; the parent must stay unpatched
 * (in jump mode the child must write its own code, not the parent's).  Then the parent
 * patches itself and a second child inherits the patch.
 * Usage: forkpatch PATCH.so
 */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fentry.h>

__attribute__((noinline)) int entry_probe(int x)
{
	return x + 1; /* sitebytes_patch makes it x + 100 */
}

int main(int argc, char **argv)
{
	char err[512];
	pid_t child;
	int status;

	if (argc < 2)
		return 2;
	fflush(stdout);
	child = fork();
	if (child == 0) {
		if (fentry_apply(argv[1], err, sizeof(err)) != 0) {
			printf("child apply failed: %s\n", err);
			_exit(1);
		}
		printf("child patched %d\n", entry_probe(1));
		fflush(stdout);
		_exit(0);
	}
	waitpid(child, &status, 0);
	printf("parent after child %d\n", entry_probe(1));
	if (fentry_apply(argv[1], err, sizeof(err)) != 0) {
		printf("parent apply failed: %s\n", err);
		return 1;
	}
	fflush(stdout);
	child = fork();
	if (child == 0) {
		printf("second child inherits %d\n", entry_probe(1));
		fflush(stdout);
		_exit(0);
	}
	waitpid(child, &status, 0);
	printf("parent patched %d\n", entry_probe(1));
	return 0;
}
