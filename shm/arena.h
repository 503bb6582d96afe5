/* SPDX-License-Identifier: MIT */
/*
 * arena.h - an allocator over shared segments.
 *
 * An arena hands out 64-byte aligned blocks from a list of segments and asks
 * its owner for a new segment (the grow callback) when none has room.  All
 * bookkeeping (free lists, the sizes of live blocks) lives in private memory:
 * nothing is ever read back from the shared bytes, which the other party may
 * scribble on.  Free blocks are kept sorted by offset and coalesced; the
 * search is first fit.  Not thread-safe: the owner serialises calls.
 */
#ifndef KV_SHM_ARENA_H
#define KV_SHM_ARENA_H

#include <stddef.h>
#include <stdint.h>

#define ARENA_ALIGN 64

struct arena_blk {
	size_t off, size;
	struct arena_blk *next;
};

struct arena_seg {
	uint32_t id; /* the owner's name for the segment (kvd's segment id) */
	uint8_t *base;
	size_t size;
	size_t used;
	struct arena_blk *free; /* sorted by offset, coalesced */
};

struct arena_live {
	uintptr_t addr; /* 0: empty, 1: tombstone */
	size_t size;
	uint32_t seg; /* index into segs */
};

/* Called for a new segment of at least min bytes; fills id, base and size. */
typedef int (*arena_grow_fn)(void *ctx, size_t min, struct arena_seg *seg);

struct arena {
	struct arena_seg *segs;
	uint32_t nsegs, cap;
	struct arena_live *live; /* open-addressing map: block address -> size */
	size_t live_cap, live_n, live_dead;
	size_t bytes_live;
	arena_grow_fn grow;
	void *ctx;
};

void arena_init(struct arena *a, arena_grow_fn grow, void *ctx);
/* Frees the bookkeeping only; the owner unmaps the segments (arena->segs). */
void arena_fini(struct arena *a);

/* A block of at least bytes (> 0), or NULL with errno set (ENOMEM, or the grow error). */
void *arena_alloc(struct arena *a, size_t bytes);
/*
 * Taking back an arena whose blocks are known (a job re-adopted after kvd
 * restarts): add a segment the owner mapped under its id, then reserve each
 * block at its offset.  arena_reserve returns 0 with *p, -EINVAL for a range
 * outside the segment (or unaligned), -EEXIST when it overlaps a block
 * reserved before, -ENOMEM.
 */
int arena_add_seg(struct arena *a, uint32_t id, uint8_t *base, size_t size);
int arena_reserve(struct arena *a, uint32_t id, uint64_t off, size_t bytes, void **p);
/* Returns 0, or -EINVAL when p is not a live block of this arena. */
int arena_free(struct arena *a, void *p);
/* Size of the live block at p, or 0. */
size_t arena_block_size(const struct arena *a, const void *p);

/*
 * Where [p, p+len) lies: 0 with *seg_id and *off set when the range is inside
 * one segment of the arena (live block or not), -1 otherwise.
 */
int arena_locate(const struct arena *a, const void *p, size_t len, uint32_t *seg_id,
		 uint64_t *off);

#endif /* KV_SHM_ARENA_H */
