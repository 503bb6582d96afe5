/* SPDX-License-Identifier: MIT */
/*
 * pin.c - page-locking kvd's shared segments for GPU DMA.
 *
 * When a GPU is usable, every segment kvd maps (client arenas, key values,
 * direct keys) is registered with cudaHostRegister (portable, mapped) on a
 * background thread, in pieces of PIN_PIECE bytes, as long as the node-wide
 * total stays within --pinned-limit.  Pinning is per process: clients pin
 * their own mappings of the same pages.  A segment is unpinned before it is
 * unmapped; the pieces are registered and released under one mutex, so a
 * release waits at most for one piece, never for a whole segment.
 */
#include <stdlib.h>
#include <string.h>

#include "kvd.h"
#include "../kernels/gpu.h"

#define PIN_PIECE (64u << 20)

struct pin_seg {
	struct pin_seg *next; /* pin_all's order */
	uint8_t *base;
	uint64_t size;
	uint64_t done; /* bytes registered so far (whole pieces) */
};

static pthread_mutex_t pin_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pin_cond = PTHREAD_COND_INITIALIZER;
static struct pin_seg *pin_all, **pin_tail = &pin_all; /* every segment, oldest first */
static struct pin_seg *pin_todo; /* the first one not fully pinned yet */
static bool pin_on, pin_stop;
static pthread_t pin_thread;
static struct kvd *pin_d;

static void *pin_main(void *arg)
{
	pthread_mutex_lock(&pin_lock);
	for (;;) {
		while (!pin_todo && !pin_stop)
			pthread_cond_wait(&pin_cond, &pin_lock);
		if (pin_stop)
			break;
		struct pin_seg *s = pin_todo;
		uint64_t n = s->size - s->done < PIN_PIECE ? s->size - s->done : PIN_PIECE;
		uint64_t total = __atomic_load_n(&pin_d->pinned_bytes, __ATOMIC_RELAXED);

		if (s->done == s->size ||
		    (pin_d->cfg.pinned_limit && total + n > pin_d->cfg.pinned_limit)) {
			pin_todo = s->next; /* finished, released, or over the limit: stop here */
			continue;
		}
		/* one piece under the lock: a release waits for this piece at most */
		if (gpu_host_register(s->base + s->done, n) == 0) {
			s->done += n;
			__atomic_add_fetch(&pin_d->pinned_bytes, n, __ATOMIC_RELAXED);
		} else {
			pin_todo = s->next;
		}
	}
	pthread_mutex_unlock(&pin_lock);
	return NULL;
}

int pin_start(struct kvd *d)
{
	if (gpu_count() == 0 || d->cfg.pinned_limit == 0)
		return 0;
	pin_d = d;
	pin_on = true;
	return -pthread_create(&pin_thread, NULL, pin_main, NULL);
}

void pin_stop_all(void)
{
	if (!pin_on)
		return;
	pthread_mutex_lock(&pin_lock);
	pin_stop = true;
	pthread_cond_signal(&pin_cond);
	pthread_mutex_unlock(&pin_lock);
	pthread_join(pin_thread, NULL);
	pin_on = false;
}

void pin_segment(void *base, uint64_t size)
{
	struct pin_seg *s;

	if (!pin_on || !(s = calloc(1, sizeof(*s))))
		return;
	s->base = base;
	s->size = size;
	pthread_mutex_lock(&pin_lock);
	*pin_tail = s;
	pin_tail = &s->next;
	if (!pin_todo)
		pin_todo = s;
	pthread_cond_signal(&pin_cond);
	pthread_mutex_unlock(&pin_lock);
}

void pin_release(void *base)
{
	if (!pin_on)
		return;
	pthread_mutex_lock(&pin_lock);
	for (struct pin_seg **pp = &pin_all; *pp; pp = &(*pp)->next) {
		struct pin_seg *s = *pp;
		if (s->base != base)
			continue;
		for (uint64_t off = 0; off < s->done; off += PIN_PIECE)
			gpu_host_unregister(s->base + off);
		__atomic_sub_fetch(&pin_d->pinned_bytes, s->done, __ATOMIC_RELAXED);
		if (pin_todo == s)
			pin_todo = s->next;
		if (pin_tail == &s->next)
			pin_tail = pp;
		*pp = s->next;
		free(s);
		break;
	}
	pthread_mutex_unlock(&pin_lock);
}
