/* json.c - the small, strict JSON reader and the reply writer of the control channel. */

/*
 * The reader accepts exactly RFC 8259 JSON (any value may nest inside the object, up
 * to JSON_DEPTH_MAX levels) and reports only what the protocol needs: the top-level
 * members of an object whose values are strings or numbers (numbers as their text).  Strings are validated as UTF-8,
 * escapes are decoded (surrogate pairs into one code point); "\u0000" is refused
 * because the callback receives NUL-terminated C strings.
 *
 * It reads the text twice: a first pass only validates, the second decodes and calls
 * back, so a malformed request never reaches the callback half-way.  Recursion is
 * bounded by the depth limit and every read is bounded by `end`: no input crashes it.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/json.h"

#define JSON_DEPTH_MAX 32

/* ---- the writer -------------------------------------------------------------------- */

/* Make room for `extra` more bytes plus the terminating NUL; -1 (and oom set) if not. */
static int buf_reserve(struct fentry_buf *b, size_t extra)
{
	size_t need, cap;
	char *data;

	if (b->oom)
		return -1;
	if (extra > SIZE_MAX / 2 - b->len - 1)
		goto fail;
	need = b->len + extra + 1;
	if (need <= b->cap)
		return 0;
	for (cap = b->cap ? b->cap : 256; cap < need; cap *= 2)
		;
	data = realloc(b->data, cap);
	if (!data)
		goto fail;
	b->data = data;
	b->cap = cap;
	return 0;
fail:
	b->oom = 1;
	return -1;
}

void fentry_buf_put(struct fentry_buf *b, const char *s, size_t n)
{
	if (buf_reserve(b, n) < 0)
		return;
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
}

void fentry_buf_printf(struct fentry_buf *b, const char *fmt, ...)
{
	va_list ap, again;
	int n;

	va_start(ap, fmt);
	va_copy(again, ap);
	n = vsnprintf(NULL, 0, fmt, ap);
	if (n < 0)
		b->oom = 1;
	else if (buf_reserve(b, (size_t)n) == 0) {
		vsnprintf(b->data + b->len, (size_t)n + 1, fmt, again);
		b->len += (size_t)n;
	}
	va_end(again);
	va_end(ap);
}

/*
 * Length of the valid UTF-8 sequence (RFC 3629: no overlong forms, no surrogates,
 * nothing above U+10FFFF) at s[0..n), or 0 if the bytes there are not one.
 */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
	unsigned char lo = 0x80, hi = 0xbf;
	size_t len, i;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		len = 2;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		len = 3;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		len = 4;
	else
		return 0;
	if (s[0] == 0xe0)
		lo = 0xa0; /* overlong below U+0800 */
	else if (s[0] == 0xed)
		hi = 0x9f; /* U+D800..U+DFFF are surrogates */
	else if (s[0] == 0xf0)
		lo = 0x90; /* overlong below U+10000 */
	else if (s[0] == 0xf4)
		hi = 0x8f; /* above U+10FFFF */
	if (n < len || s[1] < lo || s[1] > hi)
		return 0;
	for (i = 2; i < len; i++)
		if (s[i] < 0x80 || s[i] > 0xbf)
			return 0;
	return len;
}

/*
 * Quotes and backslashes are escaped, control characters (and DEL) become \u00XX, and a
 * byte that does not start valid UTF-8 becomes U+FFFD: a file name is any bytes, a
 * reply must be valid JSON.  NULL is written as null.
 */
void fentry_buf_json_string(struct fentry_buf *b, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n, len;
	char esc[8];

	if (!s) {
		fentry_buf_put(b, "null", 4);
		return;
	}
	fentry_buf_put(b, "\"", 1);
	for (n = strlen(s); n > 0; p += len, n -= len) {
		len = 1;
		if (*p == '"' || *p == '\\') {
			esc[0] = '\\';
			esc[1] = (char)*p;
			fentry_buf_put(b, esc, 2);
		} else if (*p == '\n' || *p == '\t' || *p == '\r') {
			esc[0] = '\\';
			esc[1] = *p == '\n' ? 'n' : *p == '\t' ? 't' : 'r';
			fentry_buf_put(b, esc, 2);
		} else if (*p < 0x20 || *p == 0x7f) {
			snprintf(esc, sizeof esc, "\\u%04x", *p);
			fentry_buf_put(b, esc, 6);
		} else if ((len = utf8_seq_len(p, n)) == 0) {
			fentry_buf_put(b, "\\ufffd", 6);
			len = 1;
		} else {
			fentry_buf_put(b, (const char *)p, len);
		}
	}
	fentry_buf_put(b, "\"", 1);
}

void fentry_buf_free(struct fentry_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
	b->oom = 0;
}

/* ---- the reader -------------------------------------------------------------------- */

struct json_reader {
	const unsigned char *start, *p, *end;
	int depth;
	char *err;
	size_t errlen;
	/* second pass only: where decoded strings go, and the callback */
	char *scratch;
	void (*fn)(const char *key, enum fentry_json_kind kind, const char *value, void *arg);
	void *arg;
};

static int fail(struct json_reader *r, const char *what)
{
	if (r->err && r->errlen > 0)
		snprintf(r->err, r->errlen, "invalid JSON at byte %zu: %s",
			 (size_t)(r->p - r->start), what);
	return -1;
}

static void skip_ws(struct json_reader *r)
{
	while (r->p < r->end &&
	       (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
		r->p++;
}

static int expect(struct json_reader *r, char c, const char *what)
{
	skip_ws(r);
	if (r->p >= r->end || *r->p != (unsigned char)c)
		return fail(r, what);
	r->p++;
	return 0;
}

static int parse_value(struct json_reader *r);

/* Four hex digits after "\u"; -1 if they are not. */
static long hex4(struct json_reader *r)
{
	long v = 0;
	int i;

	if (r->end - r->p < 4)
		return -1;
	for (i = 0; i < 4; i++) {
		unsigned char c = r->p[i];
		int d = c >= '0' && c <= '9'   ? c - '0'
			: c >= 'a' && c <= 'f' ? c - 'a' + 10
			: c >= 'A' && c <= 'F' ? c - 'A' + 10
					       : -1;
		if (d < 0)
			return -1;
		v = v * 16 + d;
	}
	r->p += 4;
	return v;
}

/* Write code point `cp` as UTF-8 at *out (when out is not NULL). */
static void put_utf8(char **out, unsigned long cp)
{
	char *o = *out;

	if (!o)
		return;
	if (cp < 0x80) {
		*o++ = (char)cp;
	} else if (cp < 0x800) {
		*o++ = (char)(0xc0 | cp >> 6);
		*o++ = (char)(0x80 | (cp & 0x3f));
	} else if (cp < 0x10000) {
		*o++ = (char)(0xe0 | cp >> 12);
		*o++ = (char)(0x80 | ((cp >> 6) & 0x3f));
		*o++ = (char)(0x80 | (cp & 0x3f));
	} else {
		*o++ = (char)(0xf0 | cp >> 18);
		*o++ = (char)(0x80 | ((cp >> 12) & 0x3f));
		*o++ = (char)(0x80 | ((cp >> 6) & 0x3f));
		*o++ = (char)(0x80 | (cp & 0x3f));
	}
	*out = o;
}

/* After the backslash of "\uXXXX": one code point, a surrogate pair taking two escapes. */
static int parse_u_escape(struct json_reader *r, char **out)
{
	long hi, lo;

	r->p++; /* the 'u' */
	hi = hex4(r);
	if (hi < 0)
		return fail(r, "\\u must be followed by four hex digits");
	if (hi == 0)
		return fail(r, "\\u0000 is not allowed");
	if (hi >= 0xdc00 && hi <= 0xdfff)
		return fail(r, "unpaired low surrogate");
	if (hi < 0xd800 || hi > 0xdbff) {
		put_utf8(out, (unsigned long)hi);
		return 0;
	}
	if (r->end - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u')
		return fail(r, "high surrogate not followed by a low surrogate");
	r->p += 2;
	lo = hex4(r);
	if (lo < 0xdc00 || lo > 0xdfff)
		return fail(r, "high surrogate not followed by a low surrogate");
	put_utf8(out, 0x10000 + (((unsigned long)hi - 0xd800) << 10) + ((unsigned long)lo - 0xdc00));
	return 0;
}

/* After a backslash. */
static int parse_escape(struct json_reader *r, char **out)
{
	static const char from[] = "\"\\/bfnrt";
	static const char to[] = "\"\\/\b\f\n\r\t";
	const char *hit;

	r->p++; /* the backslash */
	if (r->p >= r->end)
		return fail(r, "unterminated string");
	if (*r->p == 'u')
		return parse_u_escape(r, out);
	hit = memchr(from, *r->p, sizeof from - 1);
	if (!hit)
		return fail(r, "invalid escape in string");
	if (*out)
		*(*out)++ = to[hit - from];
	r->p++;
	return 0;
}

/*
 * A string, from its opening quote.  Decoded into `out` (NUL-terminated; never longer
 * than the text it came from) when out is not NULL, else only validated.
 */
static int parse_string(struct json_reader *r, char *out)
{
	size_t len;

	r->p++; /* the opening quote */
	for (;;) {
		if (r->p >= r->end)
			return fail(r, "unterminated string");
		if (*r->p == '"')
			break;
		if (*r->p == '\\') {
			if (parse_escape(r, &out) < 0)
				return -1;
			continue;
		}
		if (*r->p < 0x20)
			return fail(r, "control character in string");
		len = utf8_seq_len(r->p, (size_t)(r->end - r->p));
		if (len == 0)
			return fail(r, "invalid UTF-8 in string");
		if (out) {
			memcpy(out, r->p, len);
			out += len;
		}
		r->p += len;
	}
	r->p++; /* the closing quote */
	if (out)
		*out = '\0';
	return 0;
}

static int digits(struct json_reader *r)
{
	const unsigned char *from = r->p;

	while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
		r->p++;
	return r->p > from ? 0 : fail(r, "digit expected in number");
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?  - validated, never converted. */
static int parse_number(struct json_reader *r)
{
	if (*r->p == '-')
		r->p++;
	if (r->p < r->end && *r->p == '0')
		r->p++;
	else if (digits(r) < 0)
		return -1;
	if (r->p < r->end && *r->p == '.') {
		r->p++;
		if (digits(r) < 0)
			return -1;
	}
	if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
		r->p++;
		if (r->p < r->end && (*r->p == '+' || *r->p == '-'))
			r->p++;
		if (digits(r) < 0)
			return -1;
	}
	return 0;
}

static int parse_literal(struct json_reader *r, const char *word)
{
	size_t n = strlen(word);

	if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
		return fail(r, "unexpected character");
	r->p += n;
	return 0;
}

static int enter(struct json_reader *r)
{
	if (++r->depth > JSON_DEPTH_MAX)
		return fail(r, "nested deeper than 32 levels");
	r->p++; /* the opening bracket */
	return 0;
}

/* After '[' or '{' (and its first member): does a ',' or the closing `close` follow? */
static int more(struct json_reader *r, char close, int *again)
{
	skip_ws(r);
	if (r->p < r->end && *r->p == ',') {
		r->p++;
		*again = 1;
		return 0;
	}
	if (r->p < r->end && *r->p == (unsigned char)close) {
		r->p++;
		*again = 0;
		r->depth--;
		return 0;
	}
	return fail(r, close == ']' ? "expected ',' or ']'" : "expected ',' or '}'");
}

static int parse_array(struct json_reader *r)
{
	int again = 1;

	if (enter(r) < 0)
		return -1;
	skip_ws(r);
	if (r->p < r->end && *r->p == ']') {
		r->p++;
		r->depth--;
		return 0;
	}
	while (again)
		if (parse_value(r) < 0 || more(r, ']', &again) < 0)
			return -1;
	return 0;
}

/*
 * One "key": value member.  At the top level of the second pass the key and a string
 * value (decoded) or a number (its text) go into the scratch buffer (key first, value
 * after its NUL) and to the callback.
 */
static int parse_member(struct json_reader *r, int top)
{
	char *key = top ? r->scratch : NULL, *value = NULL;
	const unsigned char *from;

	skip_ws(r);
	if (r->p >= r->end || *r->p != '"')
		return fail(r, "expected a string as object key");
	if (parse_string(r, key) < 0 || expect(r, ':', "expected ':' after object key") < 0)
		return -1;
	skip_ws(r);
	if (!key || !r->fn || r->p >= r->end)
		return parse_value(r);
	value = key + strlen(key) + 1;
	if (*r->p == '"') {
		if (parse_string(r, value) < 0)
			return -1;
		r->fn(key, FENTRY_JSON_STRING, value, r->arg);
		return 0;
	}
	if (*r->p != '-' && (*r->p < '0' || *r->p > '9'))
		return parse_value(r);
	from = r->p;
	if (parse_number(r) < 0)
		return -1;
	memcpy(value, from, (size_t)(r->p - from));
	value[r->p - from] = '\0';
	r->fn(key, FENTRY_JSON_NUMBER, value, r->arg);
	return 0;
}

static int parse_object(struct json_reader *r, int top)
{
	int again = 1;

	if (enter(r) < 0)
		return -1;
	skip_ws(r);
	if (r->p < r->end && *r->p == '}') {
		r->p++;
		r->depth--;
		return 0;
	}
	while (again)
		if (parse_member(r, top) < 0 || more(r, '}', &again) < 0)
			return -1;
	return 0;
}

static int parse_value(struct json_reader *r)
{
	skip_ws(r);
	if (r->p >= r->end)
		return fail(r, "value expected");
	switch (*r->p) {
	case '{':
		return parse_object(r, 0);
	case '[':
		return parse_array(r);
	case '"':
		return parse_string(r, NULL);
	case 't':
		return parse_literal(r, "true");
	case 'f':
		return parse_literal(r, "false");
	case 'n':
		return parse_literal(r, "null");
	default:
		if (*r->p == '-' || (*r->p >= '0' && *r->p <= '9'))
			return parse_number(r);
		return fail(r, "unexpected character");
	}
}

/* What a top-level value that is not an object is, for the message. */
static const char *kind_of(unsigned char c)
{
	if (c == '[')
		return "expected a JSON object, found an array";
	if (c == '"')
		return "expected a JSON object, found a string";
	if (c == 't' || c == 'f')
		return "expected a JSON object, found a boolean";
	if (c == 'n')
		return "expected a JSON object, found null";
	if (c == '-' || (c >= '0' && c <= '9'))
		return "expected a JSON object, found a number";
	return "expected a JSON object";
}

/* One pass over the whole text; calls back only when r->scratch is set. */
static int read_text(struct json_reader *r)
{
	r->p = r->start;
	r->depth = 0;
	skip_ws(r);
	if (r->p >= r->end)
		return fail(r, "empty request");
	if (*r->p != '{')
		return fail(r, kind_of(*r->p));
	if (parse_object(r, 1) < 0)
		return -1;
	skip_ws(r);
	if (r->p < r->end)
		return fail(r, "unexpected data after the object");
	return 0;
}

int fentry_json_object_members(const char *text, size_t len,
			       void (*fn)(const char *key, enum fentry_json_kind kind,
					  const char *value, void *arg),
			       void *arg, char *err, size_t errlen)
{
	struct json_reader r = {
		.start = (const unsigned char *)text,
		.end = (const unsigned char *)text + len,
		.err = err,
		.errlen = errlen,
		.fn = fn,
		.arg = arg,
	};
	int rc;

	if (err && errlen > 0)
		err[0] = '\0';
	if (!text)
		r.start = r.end = (const unsigned char *)"";
	if (read_text(&r) < 0)
		return -1;
	/* Decoded key + value are never longer than their quoted text: len + 2 is enough. */
	r.scratch = malloc(len + 2);
	if (!r.scratch) {
		if (err && errlen > 0)
			snprintf(err, errlen, "out of memory reading the request");
		return -1;
	}
	rc = read_text(&r);
	free(r.scratch);
	return rc;
}
