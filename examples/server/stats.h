/* stats.h - the counters the server reports for STATS. */
#ifndef SERVER_STATS_H
#define SERVER_STATS_H

struct server_stats {
	unsigned long requests; /* request lines answered, STATS not counted  */
	unsigned long errors;   /* of those, refused with ERR                  */
};

#endif
