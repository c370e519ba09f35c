/*
 * parser.c - reads one request line of the server's protocol.
 *
 * parse_request() lives in a file of its own, so gcc cannot inline it into its caller
 * in server.c (there is no LTO here).  That matters for live patching: a patch replaces
 * the function's own body, reached through its __fentry__ call; a copy inlined into a
 * caller would keep running the old code.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parser.h"

static int fail(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return -1;
}

static const char *skip_spaces(const char *p)
{
	while (*p == ' ' || *p == '\t')
		p++;
	return p;
}

static size_t word_length(const char *p)
{
	size_t n = 0;

	while (p[n] && p[n] != ' ' && p[n] != '\t')
		n++;
	return n;
}

/* The decimal integer p[0..n), the whole of it; -1 if it is not one or out of range. */
static int parse_number(const char *p, size_t n, long long *out)
{
	char buf[32], *end;

	if (n == 0 || n >= sizeof buf)
		return -1;
	memcpy(buf, p, n);
	buf[n] = '\0';
	if (!isdigit((unsigned char)buf[buf[0] == '-' || buf[0] == '+']))
		return -1;
	errno = 0;
	*out = strtoll(buf, &end, 10);
	return errno == 0 && *end == '\0' ? 0 : -1;
}

static int parse_verb(const char *p, size_t n, enum verb *verb)
{
	static const struct { const char *name; enum verb verb; } verbs[] = {
		{"PING", VERB_PING}, {"SUM", VERB_SUM}, {"QUIT", VERB_QUIT},
	};

	for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++)
		if (strlen(verbs[i].name) == n && memcmp(verbs[i].name, p, n) == 0) {
			*verb = verbs[i].verb;
			return 0;
		}
	return -1;
}

int parse_request(const char *line, struct request *req, char *err, size_t errlen)
{
	const char *p = skip_spaces(line);
	size_t n = word_length(p);

	memset(req, 0, sizeof *req);
	if (n == 0)
		return fail(err, errlen, "empty request");
	if (parse_verb(p, n, &req->verb) < 0)
		return fail(err, errlen, "unknown command '%.*s' (try PING, SUM or QUIT)",
			    (int)(n > VERB_MAX ? VERB_MAX : n), p);
	for (p = skip_spaces(p + n); *p; p = skip_spaces(p + n)) {
		n = word_length(p);
		if (req->verb != VERB_SUM)
			return fail(err, errlen, "%s takes no arguments",
				    req->verb == VERB_PING ? "PING" : "QUIT");
		if (parse_number(p, n, &req->numbers[req->nnumbers]) < 0)
			return fail(err, errlen, "not a number: '%.*s'", (int)(n > 24 ? 24 : n), p);
		req->nnumbers++;
		/* The array is full: there is no room for another number. */
		if (req->nnumbers == MAX_NUMBERS)
			return fail(err, errlen, "too many numbers (at most %d)", MAX_NUMBERS);
	}
	if (req->verb == VERB_SUM && req->nnumbers == 0)
		return fail(err, errlen, "SUM needs at least one number");
	return 0;
}
