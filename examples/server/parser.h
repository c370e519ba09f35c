/* parser.h - the request of the server's line protocol, and the parser that reads one. */
#ifndef SERVER_PARSER_H
#define SERVER_PARSER_H

#include <stddef.h>

#define MAX_NUMBERS 8   /* SUM takes 1 to MAX_NUMBERS numbers             */
#define VERB_MAX 15     /* longest verb; a longer first word is unknown    */

enum verb {
	VERB_PING, /* PING          -> PONG                                   */
	VERB_SUM,  /* SUM n1 .. nk  -> OK <n1 + .. + nk>, 1 <= k <= MAX_NUMBERS */
	VERB_QUIT, /* QUIT          -> BYE, and the server closes the connection */
};

struct request {
	enum verb verb;
	int nnumbers;                   /* numbers used in numbers[]          */
	long long numbers[MAX_NUMBERS];
};

/*
 * Parse one request line (no '\n') into *req.  Returns 0, or -1 with a one-line reason
 * in err[0..errlen) (the server answers "ERR <reason>").
 */
int parse_request(const char *line, struct request *req, char *err, size_t errlen);

#endif /* SERVER_PARSER_H */
