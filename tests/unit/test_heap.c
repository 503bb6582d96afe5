/* SPDX-License-Identifier: MIT */
/*
 * test_heap.c - the engine's ready rounds come out highest priority first,
 * equal priorities in arrival order, and a job's entries can be purged.
 */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "../../daemon/kvd.h"

Test(heap, priority_then_arrival)
{
	struct ready_heap h = { 0 };
	struct job *ja = (struct job *)0x1000, *jb = (struct job *)0x2000;
	int32_t prio[] = { 0, 5, -3, 5, 10, 0, 5 };
	int n = (int)(sizeof(prio) / sizeof(prio[0]));

	for (int i = 0; i < n; i++)
		cr_assert_eq(ready_push(&h, prio[i], i % 2 ? jb : ja, NULL, (uint32_t)i), 0);
	/* expected: 10 (#4), 5 (#1, #3, #6 in arrival order), 0 (#0, #5), -3 (#2) */
	uint32_t want[] = { 4, 1, 3, 6, 0, 5, 2 };
	for (int i = 0; i < n; i++) {
		struct ready r = ready_pop(&h);
		cr_assert_eq(r.part, want[i], "pop %d gave #%u, want #%u", i, r.part, want[i]);
	}
	cr_assert_eq(h.n, 0);
	free(h.v);
}

Test(heap, random_against_sort_and_purge)
{
	struct ready_heap h = { 0 };
	unsigned seed = 3;
	struct job *jobs[3] = { (struct job *)0x10, (struct job *)0x20, (struct job *)0x30 };
	int count[3] = { 0 };

	for (uint32_t i = 0; i < 5000; i++) {
		int j = rand_r(&seed) % 3;
		count[j]++;
		cr_assert_eq(ready_push(&h, rand_r(&seed) % 50 - 25, jobs[j], NULL, i), 0);
	}
	ready_purge(&h, jobs[1]);
	cr_assert_eq(h.n, (size_t)(count[0] + count[2]));
	struct ready prev = ready_pop(&h);
	cr_assert_neq(prev.job, jobs[1]);
	while (h.n) {
		struct ready r = ready_pop(&h);
		cr_assert_neq(r.job, jobs[1], "purged entries are gone");
		cr_assert(r.prio < prev.prio || (r.prio == prev.prio && r.seq > prev.seq),
			  "order broken: (%d,%llu) after (%d,%llu)", r.prio,
			  (unsigned long long)r.seq, prev.prio, (unsigned long long)prev.seq);
		prev = r;
	}
	free(h.v);
}
