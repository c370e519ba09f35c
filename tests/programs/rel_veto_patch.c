/*
 * rel_veto_patch.c - a patch of the server example (examples/server) whose pre-patch
 * callback refuses it.  Had it been applied, every request would be answered
 * "ERR rel_veto_patch ran" - the test checks that never happens.
 */
#include <stdio.h>

#include <fentry.h>

#include "parser.h"

static int parse_request_vetoed(const char *line, struct request *req, char *err,
				size_t errlen)
{
	(void)line;
	(void)req;
	snprintf(err, errlen, "rel_veto_patch ran");
	return -1;
}

static int not_now(char *why, size_t whylen)
{
	snprintf(why, whylen, "rel_veto_patch: the service is draining, try later");
	return 1;
}

FENTRY_REPLACE(parse_request, parse_request_vetoed);
FENTRY_PRE_PATCH(not_now);
