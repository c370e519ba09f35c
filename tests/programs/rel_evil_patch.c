/*
 * rel_evil_patch.c - the file an attacker would like the server to load.  Its
 * constructor runs at dlopen(), before any validation, and appends a line to the file
 * named by $REL_EVIL_MARKER: if that file ever exists, the evil code ran.  The tests
 * make this file one the loader must refuse (world-writable, owned by another user,
 * reached through a symlink) and race it against a good patch.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fentry.h>

#include "parser.h"

__attribute__((constructor)) static void evil_constructor(void)
{
	const char *marker = getenv("REL_EVIL_MARKER");
	int fd = marker ? open(marker, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;

	if (fd >= 0) {
		(void)!write(fd, "evil code ran\n", strlen("evil code ran\n"));
		close(fd);
	}
}

static int parse_request_evil(const char *line, struct request *req, char *err,
			      size_t errlen)
{
	(void)line;
	(void)req;
	snprintf(err, errlen, "rel_evil_patch ran");
	return -1;
}

FENTRY_REPLACE(parse_request, parse_request_evil);
