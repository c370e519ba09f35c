/* json_driver.c - runs json.c's reader and string writer over records on stdin, for tests. */

/*
 * Records on stdin, back to back: a mode letter, 8 hex digits of length, the bytes.
 *   P  parse as a request: prints "ERR <reason>" or "OK" followed by " <key hex>=<value
 *      hex>" for each string member and " <key hex>#<number text>" for each number, in
 *      order
 *   E  write as a JSON string literal with fentry_buf_json_string: prints it
 * One output line per record.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/json.h"

static void put_hex(struct fentry_buf *out, const char *s)
{
	for (; *s; s++)
		fentry_buf_printf(out, "%02x", (unsigned char)*s);
}

static void on_member(const char *key, enum fentry_json_kind kind, const char *value, void *arg)
{
	struct fentry_buf *out = arg;

	fentry_buf_put(out, " ", 1);
	put_hex(out, key);
	if (kind == FENTRY_JSON_STRING) {
		fentry_buf_put(out, "=", 1);
		put_hex(out, value);
	} else {
		fentry_buf_printf(out, "#%s", value);
	}
}

/* A failing parse must not have called back at all: that prints "BUG". */
static void parse(const char *text, size_t len)
{
	struct fentry_buf members = {0};
	char err[FENTRY_ERR_MAX];

	if (fentry_json_object_members(text, len, on_member, &members, err, sizeof err) < 0)
		printf("%s %s\n", members.len ? "BUG" : "ERR", err);
	else
		printf("OK%s\n", members.len ? members.data : "");
	fentry_buf_free(&members);
}

static void escape(const char *text, size_t len)
{
	struct fentry_buf b = {0};
	char *s = malloc(len + 1);

	if (!s)
		exit(2);
	memcpy(s, text, len);
	s[len] = '\0';
	fentry_buf_json_string(&b, s);
	if (b.oom)
		exit(2);
	fwrite(b.data, 1, b.len, stdout);
	putchar('\n');
	fentry_buf_free(&b);
	free(s);
}

int main(void)
{
	char head[10];
	size_t len;
	char *text;

	while (fread(head, 1, 9, stdin) == 9) {
		head[9] = '\0';
		len = strtoul(head + 1, NULL, 16);
		/* Exactly len bytes, no terminator: the reader must not read past them. */
		text = malloc(len ? len : 1);
		if (!text || fread(text, 1, len, stdin) != len)
			return 2;
		if (head[0] == 'P')
			parse(text, len);
		else
			escape(text, len);
		free(text);
		fflush(stdout);
	}
	return 0;
}
