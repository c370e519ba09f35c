/*
 * shadow.c - the shadow-variable API of fentry.h: every call, and 8 threads racing to
 * get-or-allocate the same shadows.  Prints one "ok ..." line per check or "FAIL ...".
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <fentry.h>

#define CHECK(cond)                                                                   \
	do {                                                                          \
		if (!(cond)) {                                                        \
			printf("FAIL %s:%d %s\n", __FILE__, __LINE__, #cond);          \
			return 1;                                                     \
		}                                                                     \
	} while (0)

struct object {
	int value;
};

static atomic_int constructed, destroyed;
static struct object objects[64];

static int ctor(void *obj, void *data, void *arg)
{
	*(int *)data = ((struct object *)obj)->value + *(int *)arg;
	atomic_fetch_add(&constructed, 1);
	return 0;
}

static int refuse(void *obj, void *data, void *arg)
{
	(void)obj, (void)data, (void)arg;
	return -1;
}

static void dtor(void *obj, void *data)
{
	(void)obj;
	(void)data;
	atomic_fetch_add(&destroyed, 1);
}

static void *racer(void *arg)
{
	int add = 1000;

	(void)arg;
	for (int round = 0; round < 2000; round++)
		for (int i = 0; i < 64; i++) {
			int *v = fentry_shadow_get_or_alloc(&objects[i], 7, sizeof(int), ctor, &add);

			if (!v || *v != objects[i].value + 1000)
				return (void *)1;
		}
	return NULL;
}

int main(void)
{
	pthread_t t[8];
	int add = 10, *a, *b;

	for (int i = 0; i < 64; i++)
		objects[i].value = i;
	CHECK(fentry_shadow_get(&objects[0], 1) == NULL);
	a = fentry_shadow_alloc(&objects[0], 1, sizeof(int), ctor, &add);
	CHECK(a && *a == 10);
	CHECK(fentry_shadow_alloc(&objects[0], 1, sizeof(int), ctor, &add) == NULL);
	CHECK(fentry_shadow_get(&objects[0], 1) == a);
	CHECK(fentry_shadow_get(&objects[0], 2) == NULL); /* another id */
	CHECK(fentry_shadow_get(&objects[1], 1) == NULL); /* another object */
	b = fentry_shadow_get_or_alloc(&objects[0], 1, sizeof(int), ctor, &add);
	CHECK(b == a);
	CHECK(fentry_shadow_alloc(&objects[2], 1, 64, refuse, NULL) == NULL);
	CHECK(fentry_shadow_get(&objects[2], 1) == NULL); /* a refusing ctor leaves nothing */
	fentry_shadow_free(&objects[0], 1, dtor);
	CHECK(fentry_shadow_get(&objects[0], 1) == NULL && destroyed == 1);
	printf("ok get alloc get_or_alloc free\n");

	constructed = 0;
	for (int i = 0; i < 8; i++)
		pthread_create(&t[i], NULL, racer, NULL);
	for (int i = 0; i < 8; i++) {
		void *r;

		pthread_join(t[i], &r);
		CHECK(r == NULL);
	}
	CHECK(constructed == 64); /* one shadow per object, whoever asked first */
	printf("ok 8 threads, 64 objects: %d constructed\n", atomic_load(&constructed));

	destroyed = 0;
	fentry_shadow_alloc(&objects[5], 8, sizeof(int), NULL, NULL); /* another id survives */
	fentry_shadow_free_all(7, dtor);
	CHECK(destroyed == 64);
	for (int i = 0; i < 64; i++)
		CHECK(fentry_shadow_get(&objects[i], 7) == NULL);
	CHECK(fentry_shadow_get(&objects[5], 8) != NULL);
	printf("ok free_all: %d destroyed\n", atomic_load(&destroyed));
	return 0;
}
