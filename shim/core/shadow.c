/*
 * shadow.c - shadow variables: data patches attach to the program's existing objects.
 *
 * A patch that needs a new field in a struct cannot change the struct's layout in a
 * running process; it attaches the field as a shadow keyed by (object address, id)
 * instead, as the kernel's livepatch shadow API does.  One mutex guards a chained hash
 * table; shadows are rare and small, and correctness matters more than speed here.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/util.h"
#include "fentry.h"

#define SHADOW_BUCKETS 1024

struct shadow {
	struct shadow *next;
	void *obj;
	unsigned long id;
	size_t size;
	max_align_t data[]; /* what fentry_shadow_* return: aligned for any type */
};

/* Every store to the chains and every read of them is made under this lock (any thread:
 * the patches' code); a shadow's data is published with its link, under the lock. */
static pthread_mutex_t shadow_lock = PTHREAD_MUTEX_INITIALIZER;
static struct shadow *buckets[SHADOW_BUCKETS];

static struct shadow **bucket(void *obj, unsigned long id)
{
	uintptr_t h = (uintptr_t)obj ^ (id * 0x9e3779b97f4a7c15u);

	return &buckets[(h ^ (h >> 17)) % SHADOW_BUCKETS];
}

/* The link pointing at (obj, id)'s node, or at the NULL that ends its chain. */
static struct shadow **find(void *obj, unsigned long id)
{
	struct shadow **p = bucket(obj, id);

	while (*p && !((*p)->obj == obj && (*p)->id == id))
		p = &(*p)->next;
	return p;
}

void *fentry_shadow_get(void *obj, unsigned long id)
{
	struct shadow *s;

	pthread_mutex_lock(&shadow_lock);
	s = *find(obj, id);
	pthread_mutex_unlock(&shadow_lock);
	return s ? s->data : NULL;
}

/* Allocate under the lock; `existing` says whether to return a present shadow. */
static void *alloc(void *obj, unsigned long id, size_t size, fentry_shadow_ctor ctor, void *arg,
		   int existing)
{
	struct shadow **p, *s;
	void *data = NULL;

	pthread_mutex_lock(&shadow_lock);
	p = find(obj, id);
	if (*p) {
		data = existing ? (*p)->data : NULL;
		goto out;
	}
	s = calloc(1, sizeof(*s) + size);
	if (!s)
		goto out;
	s->obj = obj;
	s->id = id;
	s->size = size;
	/* The constructor runs before the shadow is visible to others (under the lock). */
	if (ctor && ctor(obj, s->data, arg) != 0) {
		free(s);
		goto out;
	}
	*p = s;
	data = s->data;
out:
	pthread_mutex_unlock(&shadow_lock);
	return data;
}

void *fentry_shadow_alloc(void *obj, unsigned long id, size_t size, fentry_shadow_ctor ctor,
			  void *arg)
{
	return alloc(obj, id, size, ctor, arg, 0);
}

void *fentry_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
				 fentry_shadow_ctor ctor, void *arg)
{
	return alloc(obj, id, size, ctor, arg, 1);
}

void fentry_shadow_free(void *obj, unsigned long id, fentry_shadow_dtor dtor)
{
	struct shadow **p, *s;

	pthread_mutex_lock(&shadow_lock);
	p = find(obj, id);
	s = *p;
	if (s) {
		*p = s->next;
		if (dtor)
			dtor(s->obj, s->data);
		free(s);
	}
	pthread_mutex_unlock(&shadow_lock);
}

void fentry_shadow_free_all(unsigned long id, fentry_shadow_dtor dtor)
{
	pthread_mutex_lock(&shadow_lock);
	for (size_t b = 0; b < SHADOW_BUCKETS; b++) {
		struct shadow **p = &buckets[b];

		while (*p) {
			struct shadow *s = *p;

			if (s->id != id) {
				p = &s->next;
				continue;
			}
			*p = s->next;
			if (dtor)
				dtor(s->obj, s->data);
			free(s);
		}
	}
	pthread_mutex_unlock(&shadow_lock);
}
