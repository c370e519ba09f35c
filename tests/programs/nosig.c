/*
 * nosig.c - a program of one of the signal designs that a code rewrite relying on a
 * signal would crash (a thread with the signal blocked dies), kept busy while a test
 * applies and reverts patches of nosig_calc() from outside.
 *
 * Usage: nosig DESIGN, DESIGN one of
 *   blocked    workers created after sigfillset + pthread_sigmask(SIG_BLOCK); one thread
 *              takes the process's signals in sigwait() (the classic daemon design)
 *   handler    a SIGUSR1 handler installed with sa_mask = every signal calls nosig_calc();
 *              a thread signals the workers continuously
 *   inherited  the program changes nothing: the test starts it with every signal blocked
 *              (the mask survives exec); it prints whether SIGTRAP is blocked
 *   callback   like inherited but with nothing blocked: the load the shim's own threads add
 *              comes from the test's patch (tests/programs/nosig_cb_patch.c)
 * Prints "ready" (and "trap-blocked N" for the premise), then runs until a line "q" on
 * stdin; prints "calls=N new=N wrong=N handled=N cb_calls=N cb_wrong=N" and exits 0.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 3

/* The patched function: nosig_patch.c returns 2 * x + 1. */
__attribute__((noinline)) long nosig_calc(long x)
{
	return 2 * x;
}

/* Replaced by nosig_cb_patch.c, whose callback is the load (it never calls this). */
__attribute__((noinline)) void nosig_hook(void)
{
	__asm__ volatile("");
}

/* Written by nosig_cb_patch.c's callback thread (FENTRY_REF). */
long nosig_cb_calls, nosig_cb_wrong;

static atomic_int stop;
static atomic_long calls, seen_new, wrong, handled;
static pthread_t workers[WORKERS];

static int check(long x, long r)
{
	return r == 2 * x ? 0 : r == 2 * x + 1 ? 1 : -1;
}

static void *worker(void *arg)
{
	long x = (long)(intptr_t)arg, n = 0, bad = 0, newer = 0;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		int c = check(x, nosig_calc(x));

		bad += c < 0;
		newer += c > 0;
		x = (x * 1103515245 + 12345) & 0xffffff;
		n++;
	}
	atomic_fetch_add(&calls, n);
	atomic_fetch_add(&wrong, bad);
	atomic_fetch_add(&seen_new, newer);
	return NULL;
}

/* handler: every signal is blocked while it runs (sa_mask), and it calls the patched function. */
static void on_usr1(int sig)
{
	static _Thread_local long x = 17;

	(void)sig;
	if (check(x, nosig_calc(x)) < 0)
		atomic_fetch_add(&wrong, 1);
	x = (x * 1103515245 + 12345) & 0xffffff;
	atomic_fetch_add(&handled, 1);
}

static void *signaller(void *arg)
{
	struct timespec pause = { 0, 100000 }; /* 0.1 ms */
	unsigned i = 0;

	(void)arg;
	while (!atomic_load(&stop)) {
		pthread_kill(workers[i++ % WORKERS], SIGUSR1);
		nanosleep(&pause, NULL);
	}
	return NULL;
}

/* blocked: the one thread that takes signals, by sigwait(). */
static void *waiter(void *arg)
{
	sigset_t set;
	int sig;

	(void)arg;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	for (;;) {
		if (sigwait(&set, &sig) == 0)
			atomic_fetch_add(&handled, 1);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	const char *design = argc > 1 ? argv[1] : "";
	pthread_t helper;
	sigset_t now;
	char line[64];

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (strcmp(design, "blocked") == 0) {
		sigset_t all;

		sigfillset(&all);
		pthread_sigmask(SIG_BLOCK, &all, NULL); /* inherited by every thread below */
		pthread_create(&helper, NULL, waiter, NULL);
	} else if (strcmp(design, "handler") == 0) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_usr1;
		sigfillset(&sa.sa_mask);
		sa.sa_flags = SA_RESTART;
		sigaction(SIGUSR1, &sa, NULL);
	} else if (strcmp(design, "inherited") != 0 && strcmp(design, "callback") != 0) {
		fprintf(stderr, "usage: nosig blocked|handler|inherited|callback\n");
		return 2;
	}
	for (int i = 0; i < WORKERS; i++)
		pthread_create(&workers[i], NULL, worker, (void *)(intptr_t)(i + 1));
	if (strcmp(design, "handler") == 0)
		pthread_create(&helper, NULL, signaller, NULL);
	pthread_sigmask(SIG_SETMASK, NULL, &now);
	printf("trap-blocked %d\n", sigismember(&now, SIGTRAP));
	printf("ready\n");
	while (fgets(line, sizeof(line), stdin) && strcmp(line, "q\n") != 0)
		;
	atomic_store(&stop, 1);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(workers[i], NULL);
	if (strcmp(design, "handler") == 0)
		pthread_join(helper, NULL);
	printf("calls=%ld new=%ld wrong=%ld handled=%ld cb_calls=%ld cb_wrong=%ld\n",
	       atomic_load(&calls), atomic_load(&seen_new), atomic_load(&wrong),
	       atomic_load(&handled), __atomic_load_n(&nosig_cb_calls, __ATOMIC_RELAXED),
	       __atomic_load_n(&nosig_cb_wrong, __ATOMIC_RELAXED));
	return 0;
}
