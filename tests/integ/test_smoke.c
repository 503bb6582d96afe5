/* SPDX-License-Identifier: MIT */
/*
 * test_smoke.c - the shortest end-to-end path: ranks sum a key through kvd.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static int smoke_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	size_t count = *(size_t *)arg;
	kv_store *kv = open_rank(10000);
	float *v, *init;

	CHECK(kv, "open");
	v = malloc(count * sizeof(float));
	init = calloc(count, sizeof(float));
	CHECK_RC(kv_init(kv, "w", init, count, KV_FLOAT32), KV_OK);
	for (int round = 0; round < 3; round++) {
		for (size_t i = 0; i < count; i++)
			v[i] = (float)(rank + 1) * (float)(i % 7) + (float)round;
		CHECK_RC(kv_pushpull(kv, "w", v, NULL, count, KV_FLOAT32, 0), KV_OK);
		for (size_t i = 0; i < count; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (double)(r + 1) * (double)(i % 7) + round;
			CHECK(v[i] == (float)want, "round %d elem %zu: %g, want %g", round, i,
			      (double)v[i], want);
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	free(v);
	free(init);
	return 0;
}

static void smoke(int n, size_t count)
{
	struct kvd_proc k;
	char why[256];

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	int rc = run_ranks(&k, "smoke", n, smoke_rank, &count, 60, why, sizeof(why));
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

Test(smoke, one_rank) { smoke(1, 10); }
Test(smoke, two_ranks) { smoke(2, 1000); }
Test(smoke, four_ranks_multipart) { smoke(4, 3 * 262144 + 5); }
