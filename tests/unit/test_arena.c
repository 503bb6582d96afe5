/* SPDX-License-Identifier: MIT */
/*
 * test_arena.c - the segment allocator: blocks never overlap, stay inside
 * their segment, coalesce when freed, and locate() names the right segment.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "../../shm/arena.h"

struct pool {
	int grows;
	size_t seg_size;
	uint8_t *mem[64];
};

static int grow(void *ctx, size_t min, struct arena_seg *s)
{
	struct pool *p = ctx;
	size_t size = min > p->seg_size ? min : p->seg_size;

	if (p->grows == 64)
		return ENOMEM;
	p->mem[p->grows] = aligned_alloc(4096, size);
	s->id = 100 + (uint32_t)p->grows;
	s->base = p->mem[p->grows++];
	s->size = size;
	return 0;
}

static void pool_free(struct pool *p)
{
	for (int i = 0; i < p->grows; i++)
		free(p->mem[i]);
}

Test(arena, aligned_and_located)
{
	struct pool p = { .seg_size = 1 << 16 };
	struct arena a;
	uint32_t id;
	uint64_t off;

	arena_init(&a, grow, &p);
	uint8_t *x = arena_alloc(&a, 1);
	uint8_t *y = arena_alloc(&a, 100);
	cr_assert_not_null(x);
	cr_assert_not_null(y);
	cr_assert_eq((uintptr_t)x % 64, 0);
	cr_assert_eq((uintptr_t)y % 64, 0);
	cr_assert_geq(y - x, 64, "blocks do not overlap");
	cr_assert_eq(arena_block_size(&a, y), 128);
	cr_assert_eq(arena_locate(&a, y + 10, 50, &id, &off), 0);
	cr_assert_eq(id, 100);
	cr_assert_eq(off, (uint64_t)(y + 10 - p.mem[0]));
	cr_assert_eq(arena_locate(&a, p.mem[0] + (1 << 16) - 8, 16, &id, &off), -1,
		     "a range running off the end is not inside");
	int local;
	cr_assert_eq(arena_locate(&a, &local, 4, &id, &off), -1);
	cr_assert_eq(arena_free(&a, y + 64), -EINVAL, "not the start of a block");
	cr_assert_eq(arena_free(&a, y), 0);
	cr_assert_eq(arena_free(&a, y), -EINVAL, "double free refused");
	arena_fini(&a);
	pool_free(&p);
}

Test(arena, grows_and_coalesces)
{
	struct pool p = { .seg_size = 1 << 16 };
	struct arena a;
	void *big;

	arena_init(&a, grow, &p);
	void *blocks[16];
	for (int i = 0; i < 16; i++)
		blocks[i] = arena_alloc(&a, 4096);
	cr_assert_eq(p.grows, 1, "16 x 4 KiB fit one 64 KiB segment");
	/* free them in a scattered order: they must coalesce back to one block */
	for (int i = 0; i < 16; i += 2)
		cr_assert_eq(arena_free(&a, blocks[i]), 0);
	for (int i = 15; i > 0; i -= 2)
		cr_assert_eq(arena_free(&a, blocks[i]), 0);
	int grows = p.grows;
	big = arena_alloc(&a, 1 << 16);
	cr_assert_not_null(big);
	cr_assert_eq(p.grows, grows, "the whole first segment is reusable after coalescing");
	cr_assert_eq(big, (void *)p.mem[0]);
	/* a request larger than the default segment gets a segment of its own */
	void *huge = arena_alloc(&a, 1 << 20);
	cr_assert_not_null(huge);
	cr_assert_eq(p.grows, grows + 1);
	arena_fini(&a);
	pool_free(&p);
}

/* Random alloc/free against a byte map of who owns what. */
Test(arena, random_against_model, .timeout = 60)
{
	struct pool p = { .seg_size = 1 << 20 };
	struct arena a;
	struct {
		uint8_t *ptr;
		size_t len;
		uint8_t tag;
	} live[512] = { 0 };
	unsigned seed = 7;

	arena_init(&a, grow, &p);
	for (int it = 0; it < 20000; it++) {
		int k = rand_r(&seed) % 512;
		if (live[k].ptr) {
			for (size_t i = 0; i < live[k].len; i++)
				cr_assert_eq(live[k].ptr[i], live[k].tag, "block %d was overwritten", k);
			cr_assert_eq(arena_free(&a, live[k].ptr), 0);
			live[k].ptr = NULL;
		} else {
			size_t len = 1 + (size_t)rand_r(&seed) % 20000;
			live[k].ptr = arena_alloc(&a, len);
			cr_assert_not_null(live[k].ptr);
			live[k].len = len;
			live[k].tag = (uint8_t)(k + 1);
			memset(live[k].ptr, live[k].tag, len);
		}
	}
	cr_assert_lt(p.grows, 10, "reuse keeps the footprint bounded (%d segments)", p.grows);
	arena_fini(&a);
	pool_free(&p);
}

/* Taking an arena back: blocks reserved at their offsets are what they were,
 * overlaps and ranges outside a segment are refused, and what is left free
 * is handed out as before (no block overlaps a reserved one). */
Test(arena, reserve_takes_back_known_blocks)
{
	static uint8_t mem[2][1 << 16] __attribute__((aligned(64)));
	struct arena a;
	void *p, *q[4];
	uint64_t offs[4] = { 0, 640, 4096, 65536 - 128 };
	size_t sizes[4] = { 100, 3000, 64, 128 };

	arena_init(&a, NULL, NULL);
	cr_assert_eq(arena_add_seg(&a, 7, mem[0], sizeof(mem[0])), 0);
	cr_assert_eq(arena_add_seg(&a, 9, mem[1], sizeof(mem[1])), 0);
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(arena_reserve(&a, 7, offs[i], sizes[i], &q[i]), 0, "block %d", i);
		cr_assert_eq(q[i], mem[0] + offs[i]);
	}
	/* overlapping a reserved block, by its start, middle or end */
	cr_assert_eq(arena_reserve(&a, 7, 0, 64, &p), -EEXIST);
	cr_assert_eq(arena_reserve(&a, 7, 576, 128, &p), -EEXIST);
	cr_assert_eq(arena_reserve(&a, 7, 3584, 64, &p), -EEXIST);
	/* unaligned, outside the segment, an unknown segment, nothing */
	cr_assert_eq(arena_reserve(&a, 7, 8, 64, &p), -EINVAL);
	cr_assert_eq(arena_reserve(&a, 7, 65536 - 64, 128, &p), -EINVAL);
	cr_assert_eq(arena_reserve(&a, 7, UINT64_MAX - 63, 128, &p), -EINVAL);
	cr_assert_eq(arena_reserve(&a, 8, 0, 64, &p), -EINVAL);
	cr_assert_eq(arena_reserve(&a, 9, 0, 0, &p), -EINVAL);
	cr_assert_eq(arena_block_size(&a, q[1]), 3008);
	/* the gaps are free: 128..640 holds 512 bytes, and no more than that */
	p = arena_alloc(&a, 512);
	cr_assert_eq(p, mem[0] + 128);
	/* everything handed out stays clear of the reserved blocks */
	for (int n = 0; (p = arena_alloc(&a, 192)); n++) {
		uint8_t *b = p;
		for (int i = 0; i < 4; i++)
			cr_assert(b + 192 <= (uint8_t *)q[i] ||
				  b >= (uint8_t *)q[i] + ((sizes[i] + 63) & ~(size_t)63),
				  "block %p overlaps reserved block %d", p, i);
		cr_assert(n < 1000);
	}
	cr_assert_eq(arena_free(&a, q[2]), 0);
	cr_assert_eq(arena_reserve(&a, 7, offs[2], sizes[2], &p), 0, "a freed range is free again");
	arena_fini(&a);
}
