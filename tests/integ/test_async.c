/* SPDX-License-Identifier: MIT */
/*
 * test_async.c - kv_pushpull_async end to end: ranks issuing keys in
 * different orders, 256 ops in flight on 256 keys, and 256 rounds in flight
 * on one key (each op has its own buffers, so round i's result must be the
 * sum of round i's contributions).
 *
 * Values are small integers held in f64 (or i64), so sums are exact and the
 * expected value is a plain loop over ranks.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

static void run_job(const char *job, int n, rank_fn fn, void *arg, int timeout_s)
{
	struct kvd_proc k;
	char why[256];
	int rc;

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	rc = run_ranks(&k, job, n, fn, arg, timeout_s, why, sizeof(why));
	if (rc) {
		char cmd[256];
		snprintf(cmd, sizeof(cmd), "echo '--- kvd log ---' >&2; tail -n 40 %s >&2", k.log);
		if (system(cmd) != 0)
			fprintf(stderr, "(no log)\n");
	}
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

/* contribution of rank r, to key j, element i, in round `round` */
static double val(int r, int j, size_t i, int round)
{
	return (double)((r + 1) * 1000 + j * 10 + (int)(i % 9) + round * 100000);
}

static double want(int n, int j, size_t i, int round)
{
	double s = 0;

	for (int r = 0; r < n; r++)
		s += val(r, j, i, round);
	return s;
}

/* ---------------------------------------------------------------- different orders */

#define NKEYS_ORDER 32
#define COUNT_ORDER 100

static int order_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	static double v[NKEYS_ORDER][COUNT_ORDER], out[NKEYS_ORDER][COUNT_ORDER];
	kv_ticket tk[NKEYS_ORDER];
	int order[NKEYS_ORDER];
	char key[32];

	CHECK(kv, "open");
	for (int j = 0; j < NKEYS_ORDER; j++) {
		snprintf(key, sizeof(key), "ord%02d", j);
		memset(v[j], 0, sizeof(v[j]));
		CHECK_RC(kv_init(kv, key, v[j], COUNT_ORDER, KV_FLOAT64), KV_OK);
	}
	/* a rank-dependent permutation: odd stride, rank-dependent offset; rank 1 reversed */
	for (int s = 0; s < NKEYS_ORDER; s++)
		order[s] = (s * (2 * rank + 1) + 5 * rank) % NKEYS_ORDER;
	if (rank == 1)
		for (int s = 0; s < NKEYS_ORDER; s++)
			order[s] = NKEYS_ORDER - 1 - s;
	for (int round = 0; round < 2; round++) {
		for (int s = 0; s < NKEYS_ORDER; s++) {
			int j = order[s];
			snprintf(key, sizeof(key), "ord%02d", j);
			for (size_t i = 0; i < COUNT_ORDER; i++) {
				v[j][i] = val(rank, j, i, round);
				out[j][i] = -1;
			}
			CHECK_RC(kv_pushpull_async(kv, key, v[j], out[j], COUNT_ORDER, KV_FLOAT64,
						   0, &tk[s]),
				 KV_OK);
		}
		for (int s = 0; s < NKEYS_ORDER; s++)
			CHECK_RC(kv_wait(kv, tk[s]), KV_OK);
		for (int j = 0; j < NKEYS_ORDER; j++)
			for (size_t i = 0; i < COUNT_ORDER; i++)
				CHECK(out[j][i] == want(n, j, i, round),
				      "round %d key %d elem %zu: got %g, want %g", round, j, i,
				      out[j][i], want(n, j, i, round));
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(async, different_orders, .timeout = 60) { run_job("order", 4, order_rank, NULL, 50); }

/* ---------------------------------------------------------------- 256 keys in flight */

#define INFLIGHT  256
#define COUNT_256 64

static int keys256_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	double *v = calloc((size_t)INFLIGHT * COUNT_256, sizeof(double));
	double *out = malloc((size_t)INFLIGHT * COUNT_256 * sizeof(double));
	kv_ticket tk;
	char key[32];

	CHECK(kv && v && out, "open/malloc");
	for (int j = 0; j < INFLIGHT; j++) {
		snprintf(key, sizeof(key), "k256.%d", j);
		CHECK_RC(kv_init(kv, key, v, COUNT_256, KV_FLOAT64), KV_OK);
	}
	for (int round = 0; round < 2; round++) {
		for (int j = 0; j < INFLIGHT; j++)
			for (size_t i = 0; i < COUNT_256; i++) {
				v[(size_t)j * COUNT_256 + i] = val(rank, j, i, round);
				out[(size_t)j * COUNT_256 + i] = -1;
			}
		for (int s = 0; s < INFLIGHT; s++) {
			/* rank-dependent start, so ranks are never in lock step */
			int j = (s + rank * 37) % INFLIGHT;
			snprintf(key, sizeof(key), "k256.%d", j);
			CHECK_RC(kv_pushpull_async(kv, key, v + (size_t)j * COUNT_256,
						   out + (size_t)j * COUNT_256, COUNT_256,
						   KV_FLOAT64, 0, &tk),
				 KV_OK);
		}
		CHECK_RC(kv_wait_all(kv), KV_OK);
		for (int j = 0; j < INFLIGHT; j++)
			for (size_t i = 0; i < COUNT_256; i++)
				CHECK(out[(size_t)j * COUNT_256 + i] == want(n, j, i, round),
				      "round %d key %d elem %zu: got %g, want %g", round, j, i,
				      out[(size_t)j * COUNT_256 + i], want(n, j, i, round));
	}
	CHECK_RC(kv_close(kv), KV_OK);
	free(v);
	free(out);
	return 0;
}

Test(async, in_flight_256_keys, .timeout = 60) { run_job("k256", 3, keys256_rank, NULL, 50); }

/* ---------------------------------------------------------------- 256 rounds, one key */

#define COUNT_1K 16

static int rounds256_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	int64_t *v = calloc((size_t)INFLIGHT * COUNT_1K, sizeof(int64_t));
	int64_t *out = malloc((size_t)INFLIGHT * COUNT_1K * sizeof(int64_t));
	kv_ticket tk[INFLIGHT];

	CHECK(kv && v && out, "open/malloc");
	CHECK_RC(kv_init(kv, "one", v, COUNT_1K, KV_INT64), KV_OK);
	for (int op = 0; op < INFLIGHT; op++)
		for (size_t i = 0; i < COUNT_1K; i++) {
			v[(size_t)op * COUNT_1K + i] = (int64_t)val(rank, 0, i, op);
			out[(size_t)op * COUNT_1K + i] = -1;
		}
	/* op i of every rank is round i of key "one" */
	for (int op = 0; op < INFLIGHT; op++)
		CHECK_RC(kv_pushpull_async(kv, "one", v + (size_t)op * COUNT_1K,
					   out + (size_t)op * COUNT_1K, COUNT_1K, KV_INT64, 0,
					   &tk[op]),
			 KV_OK);
	CHECK_RC(kv_wait_all(kv), KV_OK);
	for (int op = 0; op < INFLIGHT; op++)
		for (size_t i = 0; i < COUNT_1K; i++)
			CHECK(out[(size_t)op * COUNT_1K + i] == (int64_t)want(n, 0, i, op),
			      "round %d elem %zu: got %lld, want %lld", op, i,
			      (long long)out[(size_t)op * COUNT_1K + i],
			      (long long)want(n, 0, i, op));
	CHECK_RC(kv_close(kv), KV_OK);
	free(v);
	free(out);
	return 0;
}

Test(async, in_flight_256_rounds_one_key, .timeout = 60)
{
	run_job("r256", 3, rounds256_rank, NULL, 50);
}
