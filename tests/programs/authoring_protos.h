/* authoring_protos.h - types of authoring_protos.c that a patch includes from the program. */
#ifndef AUTHORING_PROTOS_H
#define AUTHORING_PROTOS_H

struct request {
	int id;
	const char *path;
};

typedef int (*visit_fn)(struct request *req, void *arg);

#endif
