/*
 * fix_stats.c - fixes answer() of server.c: requests the parser refused were not
 * counted as errors, so STATS always said errors=0.  The fix also remembers the last
 * error and reports it with STATS - a new field of struct server_stats that a live
 * patch cannot add to the running program's layout, so it is a shadow variable
 * attached to the program's `stats` object.
 *
 * answer(), stats, stats_lock and the helpers are static in server.c: FENTRY_REF binds
 * the patch to the running program's own instances (not copies).  A request that parses
 * goes on to the original answer(), which counts it and executes it: the patch needs no
 * reference to execute_request(), which GCC inlines into answer() at -O2.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <fentry.h>

#include "parser.h"
#include "stats.h"

#define SHADOW_LAST_ERROR 1 /* our id for the shadow variable */

struct last_error {
	char text[128];
};

FENTRY_REF(stats, struct server_stats, "server.c");
FENTRY_REF(stats_lock, pthread_mutex_t, "server.c");
FENTRY_REF(parse_request, int(const char *, struct request *, char *, size_t));
FENTRY_DECLARE_ORIGINAL(answer);

static void count(const char *error)
{
	struct last_error *last;

	pthread_mutex_lock(&FENTRY_VAR(stats_lock));
	FENTRY_VAR(stats).requests++;
	if (error) {
		FENTRY_VAR(stats).errors++;
		last = fentry_shadow_get_or_alloc(&FENTRY_VAR(stats), SHADOW_LAST_ERROR,
						  sizeof(*last), NULL, NULL);
		if (last)
			snprintf(last->text, sizeof(last->text), "%s", error);
	}
	pthread_mutex_unlock(&FENTRY_VAR(stats_lock));
}

static void report(char *reply, size_t size)
{
	struct last_error *last;

	pthread_mutex_lock(&FENTRY_VAR(stats_lock));
	last = fentry_shadow_get(&FENTRY_VAR(stats), SHADOW_LAST_ERROR);
	snprintf(reply, size, "OK requests=%lu errors=%lu%s%s", FENTRY_VAR(stats).requests,
		 FENTRY_VAR(stats).errors, last ? " last_error=" : "", last ? last->text : "");
	pthread_mutex_unlock(&FENTRY_VAR(stats_lock));
}

static int answer_fixed(const char *line, size_t len, char *reply, size_t size)
{
	struct request req;
	char err[128];

	if (strlen(line) != len) {
		count("request contains a NUL byte");
		snprintf(reply, size, "ERR request contains a NUL byte");
		return 1;
	}
	if (strcmp(line, "STATS") == 0) {
		report(reply, size);
		return 1;
	}
	/* Through the program's parse_request: a patch of it (fix_parse) applies here too. */
	if (FENTRY_VAR(parse_request)(line, &req, err, sizeof err) < 0) {
		count(err);
		snprintf(reply, size, "ERR %s", err);
		return 1;
	}
	/* A valid request: the original answer() counts it and executes it. */
	return FENTRY_ORIGINAL(answer, int (*)(const char *, size_t, char *, size_t))(line, len,
										reply, size);
}

FENTRY_REPLACE(answer, answer_fixed, "server.c");
