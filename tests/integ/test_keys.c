/* SPDX-License-Identifier: MIT */
/*
 * test_keys.c - keys end to end: 10,000 keys, init then pull, push then
 * pull, several keys, string keys of odd bytes and their length limit, and
 * broadcast (to every rank, creating and replacing the stored value).
 *
 * Values are small integers in f32/f64, so every sum is exact.
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

/* ---------------------------------------------------------------- 10,000 keys */

#define MANY     10000
#define MANY_CNT 16

static int many_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(30000);
	float v[MANY_CNT];
	char key[32];

	CHECK(kv, "open");
	for (int j = 0; j < MANY; j++) {
		snprintf(key, sizeof(key), "many.%05d", j);
		for (int i = 0; i < MANY_CNT; i++)
			v[i] = rank == 0 ? (float)(j + i) : -1.0f;
		CHECK_RC(kv_init(kv, key, v, MANY_CNT, KV_FLOAT32), KV_OK);
	}
	for (int j = 0; j < MANY; j++) {
		snprintf(key, sizeof(key), "many.%05d", j);
		for (int i = 0; i < MANY_CNT; i++)
			v[i] = (float)((rank + 1) * (j % 1000) + i);
		CHECK_RC(kv_pushpull(kv, key, v, NULL, MANY_CNT, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < MANY_CNT; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (double)((r + 1) * (j % 1000) + i);
			CHECK(v[i] == want, "key %s elem %d: got %g, want %g", key, i, (double)v[i],
			      want);
		}
	}
	/* every key still holds its own value: pull them all */
	for (int j = 0; j < MANY; j += 7) {
		snprintf(key, sizeof(key), "many.%05d", j);
		CHECK_RC(kv_pull(kv, key, v, MANY_CNT, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < MANY_CNT; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (double)((r + 1) * (j % 1000) + i);
			CHECK(v[i] == want, "pull %s elem %d: got %g, want %g", key, i,
			      (double)v[i], want);
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(keys, ten_thousand_keys, .timeout = 90) { run_job("many", 2, many_rank, NULL, 80); }

/* ---------------------------------------------------------------- init, push, pull */

static int init_pull_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	double v[50], out[50];

	CHECK(kv, "open");
	for (int i = 0; i < 50; i++)
		v[i] = rank == 0 ? 0.5 * i - 3 : 1000.0 + rank; /* only rank 0's is stored */
	CHECK_RC(kv_init(kv, "ip", v, 50, KV_FLOAT64), KV_OK);
	for (int rep = 0; rep < 2; rep++) {
		for (int i = 0; i < 50; i++)
			out[i] = -7;
		CHECK_RC(kv_pull(kv, "ip", out, 50, KV_FLOAT64, 0), KV_OK);
		for (int i = 0; i < 50; i++)
			CHECK(out[i] == 0.5 * i - 3, "pull %d elem %d: got %g, want %g", rep, i,
			      out[i], 0.5 * i - 3);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(keys, init_then_pull, .timeout = 30) { run_job("initpull", 3, init_pull_rank, NULL, 25); }

static int push_pull_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	float v[33], out[33];

	CHECK(kv, "open");
	for (int i = 0; i < 33; i++)
		v[i] = 1;
	CHECK_RC(kv_init(kv, "pp", v, 33, KV_FLOAT32), KV_OK);
	for (int round = 0; round < 3; round++) {
		for (int i = 0; i < 33; i++)
			v[i] = (float)((rank + 1) * (i + 1) + 10 * round);
		CHECK_RC(kv_push(kv, "pp", v, 33, KV_FLOAT32, 0), KV_OK);
		/* the pull sees this rank's push applied: the sum of every rank's push */
		for (int i = 0; i < 33; i++)
			out[i] = -1;
		CHECK_RC(kv_pull(kv, "pp", out, 33, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 33; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (double)((r + 1) * (i + 1) + 10 * round);
			CHECK(out[i] == want, "round %d elem %d: got %g, want %g", round, i,
			      (double)out[i], want);
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(keys, push_then_pull, .timeout = 30) { run_job("pushpull", 3, push_pull_rank, NULL, 25); }

/* several keys, each its own value */
static int list_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *keys[] = { "5", "7", "11", "13" };
	kv_store *kv = open_rank(20000);
	float v[16], out[16];

	CHECK(kv, "open");
	for (int j = 0; j < 4; j++) {
		for (int i = 0; i < 16; i++)
			v[i] = (float)(j * 100 + i);
		CHECK_RC(kv_init(kv, keys[j], v, 16, KV_FLOAT32), KV_OK);
	}
	for (int j = 0; j < 4; j++) {
		CHECK_RC(kv_pull(kv, keys[j], out, 16, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 16; i++)
			CHECK(out[i] == (float)(j * 100 + i), "init key %s elem %d: %g", keys[j], i,
			      (double)out[i]);
	}
	for (int j = 0; j < 4; j++) {
		for (int i = 0; i < 16; i++)
			v[i] = (float)(rank + 1) * (float)(j + 2);
		CHECK_RC(kv_push(kv, keys[j], v, 16, KV_FLOAT32, 0), KV_OK);
	}
	for (int j = 3; j >= 0; j--) {
		CHECK_RC(kv_pull(kv, keys[j], out, 16, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 16; i++)
			CHECK(out[i] == (float)(n * (n + 1) / 2 * (j + 2)), "key %s elem %d: %g",
			      keys[j], i, (double)out[i]);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(keys, list_of_keys, .timeout = 30) { run_job("list", 2, list_rank, NULL, 25); }

/* ---------------------------------------------------------------- string keys */

static int strkey_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	char k255[256], k254[256], k256[257];
	const char *keys[] = {
		"a",
		"a b",
		"a/b",
		"/a/b/",
		" ",
		"layer.0/weight:grad",
		"caf\xc3\xa9 \xe6\xa2\xaf\xe5\xba\xa6 \xf0\x9f\x94\xa5", /* café 梯度 🔥 */
		"tab\there\nnewline",
		"\x7f\x01\xff",
		k254,
		k255,
	};
	const int nk = sizeof(keys) / sizeof(keys[0]);
	kv_store *kv = open_rank(20000);
	float v[4], out[4];

	CHECK(kv, "open");
	memset(k254, 'x', 254);
	k254[254] = 0;
	for (int i = 0; i < 255; i++)
		k255[i] = "/ \xc3\xa9z"[i % 5];
	k255[255] = 0;
	memset(k256, 'y', 256);
	k256[256] = 0;
	CHECK(strlen(k255) == 255 && strlen(k256) == 256, "key lengths");

	for (int j = 0; j < nk; j++) {
		for (int i = 0; i < 4; i++)
			v[i] = (float)(j * 10 + i);
		CHECK_RC(kv_init(kv, keys[j], v, 4, KV_FLOAT32), KV_OK);
	}
	/* each key holds its own value: no two keys were folded together */
	for (int j = 0; j < nk; j++) {
		CHECK_RC(kv_pull(kv, keys[j], out, 4, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 4; i++)
			CHECK(out[i] == (float)(j * 10 + i), "key %d elem %d: %g, want %d", j, i,
			      (double)out[i], j * 10 + i);
	}
	for (int j = nk - 1; j >= 0; j--) {
		for (int i = 0; i < 4; i++)
			v[i] = (float)((rank + 1) * (j + 1) + i);
		CHECK_RC(kv_pushpull(kv, keys[j], v, out, 4, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 4; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (double)((r + 1) * (j + 1) + i);
			CHECK(out[i] == want, "key %d elem %d: %g, want %g", j, i, (double)out[i],
			      want);
		}
	}
	/* 256 bytes is one too many, for every op */
	CHECK_RC(kv_init(kv, k256, v, 4, KV_FLOAT32), KV_ERR_INVALID);
	CHECK(kv_last_error(kv) && *kv_last_error(kv), "no detail after INVALID key");
	CHECK_RC(kv_pushpull(kv, k256, v, NULL, 4, KV_FLOAT32, 0), KV_ERR_INVALID);
	CHECK_RC(kv_pull(kv, k256, out, 4, KV_FLOAT32, 0), KV_ERR_INVALID);
	/* and the store still works afterwards */
	for (int i = 0; i < 4; i++)
		v[i] = (float)(rank + i);
	CHECK_RC(kv_pushpull(kv, k255, v, NULL, 4, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 4; i++)
		CHECK(v[i] == (float)(n * (n - 1) / 2 + n * i), "after INVALID: elem %d %g", i,
		      (double)v[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(keys, odd_string_keys, .timeout = 30) { run_job("strkeys", 2, strkey_rank, NULL, 25); }

/* ---------------------------------------------------------------- broadcast */

static int bcast_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	enum { C = 300 };
	double v[C], out[C];

	CHECK(kv, "open");
	/* first broadcast creates the key; only rank 0's value counts */
	for (int gen = 0; gen < 3; gen++) {
		for (int i = 0; i < C; i++) {
			v[i] = rank == 0 ? (double)(gen * 1000 + i) : -1.0 - rank;
			out[i] = -99;
		}
		CHECK_RC(kv_broadcast(kv, "bc", v, out, C, KV_FLOAT64, 0), KV_OK);
		for (int i = 0; i < C; i++)
			CHECK(out[i] == (double)(gen * 1000 + i), "gen %d elem %d: got %g, want %d",
			      gen, i, out[i], gen * 1000 + i);
		if (rank != 0)
			for (int i = 0; i < C; i++)
				CHECK(v[i] == -1.0 - rank, "broadcast wrote into value of rank %d",
				      rank);
		/* the stored value is the latest broadcast one */
		for (int i = 0; i < C; i++)
			out[i] = -99;
		CHECK_RC(kv_pull(kv, "bc", out, C, KV_FLOAT64, 0), KV_OK);
		for (int i = 0; i < C; i++)
			CHECK(out[i] == (double)(gen * 1000 + i),
			      "pull after broadcast %d elem %d: got %g", gen, i, out[i]);
	}
	/* broadcast over an init'd key replaces its value too */
	for (int i = 0; i < C; i++)
		v[i] = rank == 0 ? 1 : 2;
	CHECK_RC(kv_init(kv, "bc2", v, C, KV_FLOAT64), KV_OK);
	for (int i = 0; i < C; i++)
		v[i] = rank == 0 ? 7.0 * i : 0;
	CHECK_RC(kv_broadcast(kv, "bc2", v, out, C, KV_FLOAT64, 0), KV_OK);
	CHECK_RC(kv_pull(kv, "bc2", out, C, KV_FLOAT64, 0), KV_OK);
	for (int i = 0; i < C; i++)
		CHECK(out[i] == 7.0 * i, "bc2 elem %d: got %g", i, out[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(keys, broadcast, .timeout = 30) { run_job("bcast", 3, bcast_rank, NULL, 25); }
