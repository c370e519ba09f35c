/*
 * calc.c - the program tests/test_fromdiff.py fixes with diffs and patches while it runs.
 * It prints "ready", then reads one command a line on stdin and prints one answer a line:
 *
 *   add N     the running total after adding N (a global function and a static variable)
 *   scale N   N clamped, times SCALE (a static function with a body of its own)
 *   bound N   N clamped, plus one (a static function GCC inlines into answer)
 *   word W    util.c's class of W and how many words it has seen (a static local)
 *   sum W     a checksum of W (a function built without an fentry site)
 *   stats     commands and errors counted so far (a struct)
 *   name N    the name of N (a table of constant data)
 *
 * main's loop runs for the whole life of the process, so it only calls answer(): a
 * patch reaches the next command through it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calc.h"

#define SCALE 3

struct stats {
	long commands;
	long errors;
};

static struct stats stats;
static long total;
static int limit = 100;

static inline int clamp(int x)
{
	return x > limit ? limit : x;
}

__attribute__((noinline, noclone)) static int scale(int x)
{
	return clamp(x) * SCALE;
}

long add(long x)
{
	if (x > 0)
		total += x;
	return total;
}

static int bound(int x)
{
	return clamp(x) + 1;
}

__attribute__((no_instrument_function)) int checksum(const char *s)
{
	int sum = 0;

	while (*s)
		sum = sum * 31 + *s++;
	return sum & 0xffff;
}

static const char *const names[] = {"zero", "one", "two"};

static const char *name_of(long n)
{
	return n >= 0 && n < 3 ? names[n] : "many";
}

#define COUNT_ERROR() (stats.errors++)

static void count(int failed)
{
	stats.commands++;
	if (failed)
		COUNT_ERROR();
}

__attribute__((noinline, noclone)) static void answer(const char *cmd, const char *arg, char *out,
						      size_t size)
{
	long n = strtol(arg, NULL, 10);

	if (strcmp(cmd, "add") == 0)
		snprintf(out, size, "%ld", add(n));
	else if (strcmp(cmd, "scale") == 0)
		snprintf(out, size, "%d", scale((int)n));
	else if (strcmp(cmd, "bound") == 0)
		snprintf(out, size, "%d", bound((int)n));
	else if (strcmp(cmd, "word") == 0 && strlen(arg) <= WORD_MAX)
		snprintf(out, size, "%d", word_class(arg));
	else if (strcmp(cmd, "sum") == 0)
		snprintf(out, size, "%d", checksum(arg));
	else if (strcmp(cmd, "name") == 0)
		snprintf(out, size, "%s", name_of(n));
	else if (strcmp(cmd, "stats") == 0)
		snprintf(out, size, "commands=%ld errors=%ld", stats.commands, stats.errors);
	else {
		snprintf(out, size, "error: %s", cmd);
		count(1);
		return;
	}
	count(0);
}

int main(void)
{
	char line[256], out[128];

	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		char *cmd = strtok(line, " \n"), *arg = strtok(NULL, " \n");

		if (cmd == NULL)
			continue;
		if (strcmp(cmd, "quit") == 0)
			break;
		answer(cmd, arg ? arg : "", out, sizeof out);
		printf("%s\n", out);
		fflush(stdout);
	}
	return 0;
}
