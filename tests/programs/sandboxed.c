/*
 * sandboxed.c - a program that sandboxes itself after start, as many services do once
 * initialised: a seccomp filter, on every thread (TSYNC), makes one system call fail with
 * EPERM.  Worker threads call sandboxed_calc() all along, checking each result.
 *
 * Commands on stdin, one per line:
 *   forbid membarrier | forbid pwrite64   install the filter; prints "forbidden NAME"
 *   forbid mmap-noreplace                 the same for mmap() with MAP_FIXED_NOREPLACE (what
 *                                         the shim reserves address space with)
 *   show                                 prints "calc N": sandboxed_calc(20) now
 *   q                                    prints "calls=N new=N wrong=N" and exits 0
 * Prints "ready" first.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define WORKERS 2

/* The patched function: sandboxed_patch.c returns 2 * x + 1. */
__attribute__((noinline)) long sandboxed_calc(long x)
{
	return 2 * x;
}

static atomic_int stop;
static atomic_long calls, seen_new, wrong;

static void *worker(void *arg)
{
	long x = (long)(intptr_t)arg, n = 0, bad = 0, newer = 0;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		long r = sandboxed_calc(x);

		bad += r != 2 * x && r != 2 * x + 1;
		newer += r == 2 * x + 1;
		x = (x * 1103515245 + 12345) & 0xffffff;
		n++;
	}
	atomic_fetch_add(&calls, n);
	atomic_fetch_add(&wrong, bad);
	atomic_fetch_add(&seen_new, newer);
	return NULL;
}

/* Install `code` for every thread of the process (TSYNC). */
static int install(struct sock_filter *code, unsigned short len)
{
	struct sock_fprog prog = {.len = len, .filter = code};

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return -1;
	return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
}

/* Not x86-64's system call numbers: allowed.  The rest of a filter follows it. */
#define ARCH_X86_64_ONLY                                                              \
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),          \
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),                     \
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

/* Every thread of the process: `nr` fails with EPERM from now on, the rest is allowed. */
static int forbid(long nr)
{
	struct sock_filter code[] = {
		ARCH_X86_64_ONLY,
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};

	return install(code, sizeof code / sizeof code[0]);
}

/* Every thread: mmap() with MAP_FIXED_NOREPLACE in its flags fails with EPERM from now on. */
static int forbid_mmap_noreplace(void)
{
	struct sock_filter code[] = {
		ARCH_X86_64_ONLY,
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[3])),
		BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, MAP_FIXED_NOREPLACE, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};

	return install(code, sizeof code / sizeof code[0]);
}

int main(void)
{
	pthread_t t[WORKERS];
	char line[128];

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 0; i < WORKERS; i++)
		pthread_create(&t[i], NULL, worker, (void *)(intptr_t)(i * 1000 + 7));
	printf("ready\n");
	while (fgets(line, sizeof line, stdin)) {
		line[strcspn(line, "\n")] = '\0';
		if (strcmp(line, "forbid membarrier") == 0 || strcmp(line, "forbid pwrite64") == 0) {
			long nr = line[7] == 'm' ? SYS_membarrier : SYS_pwrite64;

			if (forbid(nr) != 0) {
				printf("seccomp failed: %s\n", strerror(errno));
				return 2;
			}
			printf("forbidden %s\n", line + 7);
		} else if (strcmp(line, "forbid mmap-noreplace") == 0) {
			if (forbid_mmap_noreplace() != 0) {
				printf("seccomp failed: %s\n", strerror(errno));
				return 2;
			}
			printf("forbidden %s\n", line + 7);
		} else if (strcmp(line, "show") == 0) {
			printf("calc %ld\n", sandboxed_calc(20));
		} else if (strcmp(line, "q") == 0) {
			break;
		}
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(t[i], NULL);
	printf("calls=%ld new=%ld wrong=%ld\n", atomic_load(&calls), atomic_load(&seen_new),
	       atomic_load(&wrong));
	return 0;
}
