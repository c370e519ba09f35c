/* costs.h - what the runtime's work has cost: durations, sites written, memory held (costs.c). */
#ifndef FENTRY_COSTS_H
#define FENTRY_COSTS_H

#include <stdint.h>

#include "arch/x86_64/poke.h"
#include "arch/x86_64/stackscan.h"
#include "control/json.h"
#include "core/loader.h"
#include "core/util.h"

/* The last apply, revert or unload (accepted or refused). */
struct fentry_op_cost {
	double seconds;              /* from the request to its end; 0 when there was none */
	double at;                   /* unix time it ended                                 */
	int ok;                      /* 1: done                                            */
	char name[FENTRY_NAME_MAX];  /* the patch, as named in the request                 */
};

struct fentry_costs {
	struct fentry_op_cost apply, revert, unload;
	struct fentry_poke_stats poke; /* code rewriting: start-up, batches, trampolines    */
	struct fentry_check_stats checks; /* unload's checks: threads looked at, signalled  */
	uint64_t table_bytes;          /* the dispatch tables, the pairs kept included      */
	uint64_t copy_bytes;           /* the patches' private copies (memfds)              */
	uint64_t mapped_bytes;         /* address space the loaded patches map              */
	unsigned loaded;
};

/* A consistent snapshot (taken under the loader's lock: loader.c). */
FENTRY_HIDDEN void fentry_costs_snapshot(struct fentry_costs *out);
/* status's "costs" member: `,"costs":{...}` (docs/protocol.md). */
FENTRY_HIDDEN void fentry_costs_json(struct fentry_buf *out);

#endif /* FENTRY_COSTS_H */
