/* SPDX-License-Identifier: MIT */
/*
 * heap.c - the engine's ready rounds: a binary max-heap ordered by priority,
 * ties broken by arrival (a sequence number), so equal priorities run first
 * come, first served.
 */
#include <errno.h>
#include <stdlib.h>

#include "kvd.h"

static bool before(const struct ready *a, const struct ready *b)
{
	return a->prio > b->prio || (a->prio == b->prio && a->seq < b->seq);
}

static void sift_up(struct ready *v, size_t i, struct ready r)
{
	while (i > 0 && before(&r, &v[(i - 1) / 2])) {
		v[i] = v[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	v[i] = r;
}

int ready_push(struct ready_heap *h, int32_t prio, struct job *j, struct key *k, uint32_t part)
{
	if (h->n == h->cap) {
		size_t cap = h->cap ? h->cap * 2 : 256;
		struct ready *n = realloc(h->v, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		h->v = n;
		h->cap = cap;
	}
	sift_up(h->v, h->n++, (struct ready){ prio, h->seq++, j, k, part });
	return 0;
}

struct ready ready_pop(struct ready_heap *h)
{
	struct ready top = h->v[0], last = h->v[--h->n];
	size_t i = 0;

	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		const struct ready *best = &last;

		if (l < h->n && before(&h->v[l], best)) {
			m = l;
			best = &h->v[l];
		}
		if (r < h->n && before(&h->v[r], best))
			m = r;
		if (m == i)
			break;
		h->v[i] = h->v[m];
		i = m;
	}
	if (h->n)
		h->v[i] = last;
	return top;
}

void ready_purge(struct ready_heap *h, const struct job *j)
{
	size_t n = h->n;

	/* rebuild in place: entry k is written only after entry k was read */
	h->n = 0;
	for (size_t i = 0; i < n; i++)
		if (h->v[i].job != j)
			sift_up(h->v, h->n++, h->v[i]);
}
