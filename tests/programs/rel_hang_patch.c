/*
 * rel_hang_patch.c - a patch of the server example whose pre-patch callback never
 * returns: the loader must give up after FENTRY_CALLBACK_TIMEOUT_MS, apply nothing and
 * keep serving the control channel.  Had it been applied, every request would be
 * answered "ERR rel_hang_patch ran".
 */
#include <stdio.h>
#include <unistd.h>

#include <fentry.h>

#include "parser.h"

static int parse_request_hung(const char *line, struct request *req, char *err,
			      size_t errlen)
{
	(void)line;
	(void)req;
	snprintf(err, errlen, "rel_hang_patch ran");
	return -1;
}

static int wait_forever(char *why, size_t whylen)
{
	(void)why;
	(void)whylen;
	for (;;)
		sleep(1000);
	return 0;
}

FENTRY_REPLACE(parse_request, parse_request_hung);
FENTRY_PRE_PATCH(wait_forever);
