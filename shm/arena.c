/* SPDX-License-Identifier: MIT */
/*
 * arena.c - first-fit allocation over shared segments, bookkeeping private.
 */
#include "arena.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define LIVE_EMPTY 0
#define LIVE_DEAD 1

void arena_init(struct arena *a, arena_grow_fn grow, void *ctx)
{
	memset(a, 0, sizeof(*a));
	a->grow = grow;
	a->ctx = ctx;
}

void arena_fini(struct arena *a)
{
	for (uint32_t i = 0; i < a->nsegs; i++) {
		struct arena_blk *b = a->segs[i].free;
		while (b) {
			struct arena_blk *n = b->next;
			free(b);
			b = n;
		}
	}
	free(a->segs);
	free(a->live);
	memset(a, 0, sizeof(*a));
}

static size_t hash_addr(uintptr_t p, size_t cap)
{
	uint64_t x = (uint64_t)p >> 6;
	x *= 0x9e3779b97f4a7c15ull;
	return (size_t)(x >> 17) & (cap - 1);
}

static struct arena_live *live_find(const struct arena *a, uintptr_t p)
{
	if (!a->live_cap)
		return NULL;
	for (size_t i = hash_addr(p, a->live_cap);; i = (i + 1) & (a->live_cap - 1)) {
		struct arena_live *e = &a->live[i];
		if (e->addr == p)
			return e;
		if (e->addr == LIVE_EMPTY)
			return NULL;
	}
}

static int live_grow(struct arena *a)
{
	size_t cap = a->live_cap ? a->live_cap * 2 : 64;
	struct arena_live *old = a->live, *n;
	size_t ocap = a->live_cap;

	if (a->live_n * 4 < a->live_cap) /* mostly tombstones: rehash at the same size */
		cap = a->live_cap;
	n = calloc(cap, sizeof(*n));
	if (!n)
		return -ENOMEM;
	a->live = n;
	a->live_cap = cap;
	a->live_dead = 0;
	for (size_t i = 0; i < ocap; i++) {
		if (old[i].addr > LIVE_DEAD) {
			size_t j = hash_addr(old[i].addr, cap);
			while (n[j].addr != LIVE_EMPTY)
				j = (j + 1) & (cap - 1);
			n[j] = old[i];
		}
	}
	free(old);
	return 0;
}

static int live_add(struct arena *a, uintptr_t p, size_t size, uint32_t seg)
{
	size_t i;

	if ((a->live_n + a->live_dead + 1) * 4 > a->live_cap * 3 && live_grow(a))
		return -ENOMEM;
	for (i = hash_addr(p, a->live_cap); a->live[i].addr > LIVE_DEAD;
	     i = (i + 1) & (a->live_cap - 1))
		;
	if (a->live[i].addr == LIVE_DEAD)
		a->live_dead--;
	a->live[i] = (struct arena_live){ p, size, seg };
	a->live_n++;
	return 0;
}

/* Take size bytes from seg's free list, first fit; returns the offset or SIZE_MAX. */
static size_t seg_take(struct arena_seg *s, size_t size)
{
	struct arena_blk **pp = &s->free;

	for (struct arena_blk *b = *pp; b; pp = &b->next, b = *pp) {
		if (b->size < size)
			continue;
		size_t off = b->off;
		if (b->size == size) {
			*pp = b->next;
			free(b);
		} else {
			b->off += size;
			b->size -= size;
		}
		s->used += size;
		return off;
	}
	return SIZE_MAX;
}

static int seg_give(struct arena_seg *s, size_t off, size_t size)
{
	struct arena_blk **pp = &s->free, *prev = NULL, *b;

	while (*pp && (*pp)->off < off) {
		prev = *pp;
		pp = &(*pp)->next;
	}
	s->used -= size;
	if (prev && prev->off + prev->size == off) { /* merge with the block before */
		prev->size += size;
		if (*pp && prev->off + prev->size == (*pp)->off) {
			b = *pp;
			prev->size += b->size;
			prev->next = b->next;
			free(b);
		}
		return 0;
	}
	if (*pp && off + size == (*pp)->off) { /* merge with the block after */
		(*pp)->off = off;
		(*pp)->size += size;
		return 0;
	}
	b = malloc(sizeof(*b));
	if (!b) {
		s->used += size; /* leak the range rather than corrupt the list */
		return -ENOMEM;
	}
	b->off = off;
	b->size = size;
	b->next = *pp;
	*pp = b;
	return 0;
}

void *arena_alloc(struct arena *a, size_t bytes)
{
	size_t size, off = SIZE_MAX;
	uint32_t i;

	if (bytes == 0 || bytes > SIZE_MAX / 2) {
		errno = EINVAL;
		return NULL;
	}
	size = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
	for (i = 0; i < a->nsegs; i++) {
		if (a->segs[i].size - a->segs[i].used < size)
			continue;
		off = seg_take(&a->segs[i], size);
		if (off != SIZE_MAX)
			break;
	}
	if (off == SIZE_MAX) {
		struct arena_seg s = { 0 };
		int err;

		if (!a->grow) {
			errno = ENOMEM;
			return NULL;
		}
		if (a->nsegs == a->cap) {
			uint32_t cap = a->cap ? a->cap * 2 : 8;
			struct arena_seg *n = realloc(a->segs, cap * sizeof(*n));
			if (!n) {
				errno = ENOMEM;
				return NULL;
			}
			a->segs = n;
			a->cap = cap;
		}
		err = a->grow(a->ctx, size, &s);
		if (err) {
			errno = err < 0 ? -err : err;
			return NULL;
		}
		s.used = 0;
		s.free = malloc(sizeof(*s.free));
		if (!s.free) {
			errno = ENOMEM;
			return NULL; /* the segment stays with its owner, unused */
		}
		*s.free = (struct arena_blk){ 0, s.size & ~(size_t)(ARENA_ALIGN - 1), NULL };
		i = a->nsegs++;
		a->segs[i] = s;
		off = seg_take(&a->segs[i], size);
		if (off == SIZE_MAX) {
			errno = ENOMEM; /* grow gave less than asked */
			return NULL;
		}
	}
	if (live_add(a, (uintptr_t)(a->segs[i].base + off), size, i)) {
		seg_give(&a->segs[i], off, size);
		errno = ENOMEM;
		return NULL;
	}
	a->bytes_live += size;
	return a->segs[i].base + off;
}

int arena_add_seg(struct arena *a, uint32_t id, uint8_t *base, size_t size)
{
	struct arena_seg s = { .id = id, .base = base, .size = size };

	if (a->nsegs == a->cap) {
		uint32_t cap = a->cap ? a->cap * 2 : 8;
		struct arena_seg *n = realloc(a->segs, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		a->segs = n;
		a->cap = cap;
	}
	s.free = malloc(sizeof(*s.free));
	if (!s.free)
		return -ENOMEM;
	*s.free = (struct arena_blk){ 0, size & ~(size_t)(ARENA_ALIGN - 1), NULL };
	a->segs[a->nsegs++] = s;
	return 0;
}

/* Take [off, off + size) out of seg's free list; -EEXIST when any of it is taken. */
static int seg_take_at(struct arena_seg *s, size_t off, size_t size)
{
	struct arena_blk **pp = &s->free;

	for (struct arena_blk *b = *pp; b; pp = &b->next, b = *pp) {
		if (b->off > off)
			break;
		if (off - b->off > b->size || size > b->size - (off - b->off))
			continue;
		if (b->off == off) { /* from the front */
			b->off += size;
			b->size -= size;
			if (!b->size) {
				*pp = b->next;
				free(b);
			}
		} else if (off + size == b->off + b->size) { /* from the back */
			b->size -= size;
		} else { /* from the middle: two blocks */
			struct arena_blk *t = malloc(sizeof(*t));
			if (!t)
				return -ENOMEM;
			t->off = off + size;
			t->size = b->off + b->size - t->off;
			t->next = b->next;
			b->size = off - b->off;
			b->next = t;
		}
		s->used += size;
		return 0;
	}
	return -EEXIST;
}

int arena_reserve(struct arena *a, uint32_t id, uint64_t off, size_t bytes, void **p)
{
	size_t size = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
	uint32_t i;
	int rc;

	for (i = 0; i < a->nsegs && a->segs[i].id != id; i++)
		;
	if (i == a->nsegs || bytes == 0 || off % ARENA_ALIGN || off > a->segs[i].size ||
	    size > a->segs[i].size - off)
		return -EINVAL;
	rc = seg_take_at(&a->segs[i], (size_t)off, size);
	if (rc)
		return rc;
	if (live_add(a, (uintptr_t)(a->segs[i].base + off), size, i)) {
		seg_give(&a->segs[i], (size_t)off, size);
		return -ENOMEM;
	}
	a->bytes_live += size;
	*p = a->segs[i].base + off;
	return 0;
}

int arena_free(struct arena *a, void *p)
{
	struct arena_live *e = p ? live_find(a, (uintptr_t)p) : NULL;
	struct arena_seg *s;

	if (!e)
		return -EINVAL;
	s = &a->segs[e->seg];
	seg_give(s, (size_t)((uint8_t *)p - s->base), e->size);
	a->bytes_live -= e->size;
	e->addr = LIVE_DEAD;
	a->live_n--;
	a->live_dead++;
	return 0;
}

size_t arena_block_size(const struct arena *a, const void *p)
{
	struct arena_live *e = p ? live_find(a, (uintptr_t)p) : NULL;

	return e ? e->size : 0;
}

int arena_locate(const struct arena *a, const void *p, size_t len, uint32_t *seg_id,
		 uint64_t *off)
{
	uintptr_t x = (uintptr_t)p;

	for (uint32_t i = 0; i < a->nsegs; i++) {
		uintptr_t b = (uintptr_t)a->segs[i].base;
		if (x >= b && x - b <= a->segs[i].size && len <= a->segs[i].size - (x - b)) {
			*seg_id = a->segs[i].id;
			*off = x - b;
			return 0;
		}
	}
	return -1;
}
