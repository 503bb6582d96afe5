/* SPDX-License-Identifier: MIT */
/*
 * test_mxnet.c - the cases of MXNet's kvstore tests
 * (tests/python/unittest/test_kvstore.py and test_kvstore_custom.py) in C:
 * on "local" with several ranks (and several local buffers standing for
 * devices), on the in-process "teststore", and through kv_register() with a
 * custom backend.  Also kv_is_capable() on "local".
 *
 * MXNet's integer keys become strings ("3", "5", ...); its shape (4, 4) is
 * 16 elements and its big shape (1200, 1200) is 1,440,000.  Without an
 * optimizer (which "local" does not offer yet), a push replaces the stored
 * value with the sum of the round's pushes, as MXNet's default updater does.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "harness.h"

#define SHAPE 16
#define BIG   (1200 * 1200)

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

static void set_all(float *v, size_t count, float x)
{
	for (size_t i = 0; i < count; i++)
		v[i] = x;
}

/* first index where v differs from x, or count */
static size_t diff_at(const float *v, size_t count, float x)
{
	size_t i = 0;

	while (i < count && v[i] == x)
		i++;
	return i;
}

#define CHECK_ALL(v, count, x, what)                                                          \
	do {                                                                                  \
		size_t at_ = diff_at((v), (count), (x));                                      \
		CHECK(at_ == (count), "%s: elem %zu is %g, want %g", (what), at_,             \
		      at_ < (count) ? (double)(v)[at_] : 0.0, (double)(x));                  \
	} while (0)

/* ---------------------------------------------------------------- local, N ranks */

/* test_init and test_single_kv_pair (shape and big shape, int and str keys) */
static int single_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *keys[] = { "3", "a" };
	static const size_t counts[] = { SHAPE, BIG };
	kv_store *kv = open_rank(30000);
	float *v = malloc(BIG * sizeof(float)), *out = malloc(BIG * sizeof(float));

	CHECK(kv && v && out, "open/malloc");
	for (int c = 0; c < 2; c++)
		for (int j = 0; j < 2; j++) {
			char key[16];
			snprintf(key, sizeof(key), "%s%s", keys[j], c ? "big" : "");
			set_all(v, counts[c], 1);
			CHECK_RC(kv_init(kv, key, v, counts[c], KV_FLOAT32), KV_OK);
			set_all(out, counts[c], 0);
			CHECK_RC(kv_pull(kv, key, out, counts[c], KV_FLOAT32, 0), KV_OK);
			CHECK_ALL(out, counts[c], 1.0f, "init then pull");
			set_all(v, counts[c], 4);
			CHECK_RC(kv_push(kv, key, v, counts[c], KV_FLOAT32, 0), KV_OK);
			set_all(out, counts[c], 0);
			CHECK_RC(kv_pull(kv, key, out, counts[c], KV_FLOAT32, 0), KV_OK);
			CHECK_ALL(out, counts[c], 4.0f * n, "push then pull");
		}
	CHECK_RC(kv_close(kv), KV_OK);
	free(v);
	free(out);
	return 0;
}

Test(mxnet, single_kv_pair, .timeout = 60) { run_job("mx-single", 2, single_rank, NULL, 50); }

/* test_list_kv_pair */
static int list_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *keys[] = { "5", "7", "11", "b", "c", "d" };
	kv_store *kv = open_rank(30000);
	float v[SHAPE], out[SHAPE];

	CHECK(kv, "open");
	set_all(v, SHAPE, 1);
	for (int j = 0; j < 6; j++)
		CHECK_RC(kv_init(kv, keys[j], v, SHAPE, KV_FLOAT32), KV_OK);
	set_all(v, SHAPE, 4);
	for (int j = 0; j < 6; j++)
		CHECK_RC(kv_push(kv, keys[j], v, SHAPE, KV_FLOAT32, 0), KV_OK);
	for (int j = 0; j < 6; j++) {
		set_all(out, SHAPE, 0);
		CHECK_RC(kv_pull(kv, keys[j], out, SHAPE, KV_FLOAT32, 0), KV_OK);
		CHECK_ALL(out, SHAPE, 4.0f * n, keys[j]);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(mxnet, list_kv_pair, .timeout = 30) { run_job("mx-list", 2, list_rank, NULL, 25); }

/* test_aggregator: push from several devices (local buffers) gives their sum */
#define NDEV 4

static int aggregator_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *keys[] = { "3", "b" };
	kv_store *kv = open_rank(30000);
	float dev[NDEV][SHAPE], out[NDEV][SHAPE];
	const void *vals[NDEV];
	void *outs[NDEV];

	CHECK(kv, "open");
	for (int d = 0; d < NDEV; d++) {
		vals[d] = dev[d];
		outs[d] = out[d];
	}
	for (int j = 0; j < 2; j++) {
		set_all(dev[0], SHAPE, 1);
		CHECK_RC(kv_init(kv, keys[j], dev[0], SHAPE, KV_FLOAT32), KV_OK);
		/* round 1: every device pushes ones; round 2: device d pushes d + 1 */
		for (int round = 0; round < 2; round++) {
			float want = round == 0 ? (float)(NDEV * n)
						: (float)(NDEV * (NDEV + 1) / 2 * n);
			for (int d = 0; d < NDEV; d++) {
				set_all(dev[d], SHAPE, round == 0 ? 1.0f : (float)(d + 1));
				set_all(out[d], SHAPE, -1);
			}
			CHECK_RC(kv_pushpullv(kv, keys[j], vals, NDEV, outs, NDEV, SHAPE,
					      KV_FLOAT32, 0),
				 KV_OK);
			for (int d = 0; d < NDEV; d++)
				CHECK_ALL(out[d], SHAPE, want, "aggregated out");
			/* and the store holds the sum */
			set_all(out[0], SHAPE, -1);
			CHECK_RC(kv_pull(kv, keys[j], out[0], SHAPE, KV_FLOAT32, 0), KV_OK);
			CHECK_ALL(out[0], SHAPE, want, "pull after pushpullv");
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(mxnet, aggregator, .timeout = 30) { run_job("mx-agg", 2, aggregator_rank, NULL, 25); }

/* test_broadcast_single_kv_pair / _list_kv_pair: every rank is an output */
static int bcast_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *keys[] = { "3", "5", "7", "a", "b" };
	kv_store *kv = open_rank(30000);
	float v[SHAPE], out[SHAPE];

	CHECK(kv, "open");
	for (int j = 0; j < 5; j++) {
		set_all(v, SHAPE, rank == 0 ? (float)(j + 1) : 100.0f);
		set_all(out, SHAPE, 0);
		CHECK_RC(kv_broadcast(kv, keys[j], v, out, SHAPE, KV_FLOAT32, 0), KV_OK);
		CHECK_ALL(out, SHAPE, (float)(j + 1), keys[j]);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(mxnet, broadcast, .timeout = 30) { run_job("mx-bcast", 3, bcast_rank, NULL, 25); }

/* test_pushpull_single_kv_pair / _list_kv_pair: with out, and in place */
static int pushpull_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *keys[] = { "3", "5", "a" };
	kv_store *kv = open_rank(30000);
	float v[SHAPE], out[SHAPE];

	CHECK(kv, "open");
	for (int j = 0; j < 3; j++) {
		set_all(v, SHAPE, 0);
		CHECK_RC(kv_init(kv, keys[j], v, SHAPE, KV_FLOAT32), KV_OK);
		set_all(v, SHAPE, 1);
		set_all(out, SHAPE, 0);
		CHECK_RC(kv_pushpull(kv, keys[j], v, out, SHAPE, KV_FLOAT32, 0), KV_OK);
		CHECK_ALL(out, SHAPE, (float)n, "pushpull out");
		CHECK_ALL(v, SHAPE, 1.0f, "value after pushpull with out");
		CHECK_RC(kv_pushpull(kv, keys[j], v, NULL, SHAPE, KV_FLOAT32, 0), KV_OK);
		CHECK_ALL(v, SHAPE, (float)n, "pushpull in place");
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(mxnet, pushpull, .timeout = 30) { run_job("mx-pp", 2, pushpull_rank, NULL, 25); }

/* test_get_type, kv.rank, kv.num_workers; test_invalid_pull; duplicate init */
static int misc_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(30000);
	float v[SHAPE];

	CHECK(kv, "open");
	CHECK(kv_type(kv) && strcmp(kv_type(kv), "local") == 0, "type %s", kv_type(kv));
	CHECK(kv_rank(kv) == rank, "kv_rank %d, want %d", kv_rank(kv), rank);
	CHECK(kv_num_workers(kv) == n, "kv_num_workers %d, want %d", kv_num_workers(kv), n);
	CHECK_RC(kv_pull(kv, "never", v, SHAPE, KV_FLOAT32, 0), KV_ERR_NOKEY);
	set_all(v, SHAPE, 1);
	CHECK_RC(kv_init(kv, "9", v, SHAPE, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_init(kv, "9", v, SHAPE, KV_FLOAT32), KV_ERR_EXISTS);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(mxnet, type_rank_invalid_pull_duplicate_init, .timeout = 30)
{
	run_job("mx-misc", 2, misc_rank, NULL, 25);
}

/* is_capable on local */
static int capable_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *known[] = { "gradient_compression", "sparse", "device", "priority",
				       "zero_copy" };
	kv_store *kv = open_rank(30000);

	CHECK(kv, "open");
	CHECK_RC(kv_is_capable(kv, "async"), 1);
	CHECK_RC(kv_is_capable(kv, "optimizer"), 1); /* the optimizer runs in kvd */
	CHECK_RC(kv_is_capable(kv, "no_such_capability"), KV_ERR_INVALID);
	CHECK_RC(kv_is_capable(kv, ""), KV_ERR_INVALID);
	for (int i = 0; i < 5; i++) {
		int c = kv_is_capable(kv, known[i]);
		CHECK(c == 0 || c == 1, "is_capable(%s) = %d, want 0 or 1", known[i], c);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(mxnet, local_is_capable, .timeout = 30) { run_job("mx-cap", 1, capable_rank, NULL, 25); }

/* ---------------------------------------------------------------- teststore */

Test(mxnet, teststore, .timeout = 20)
{
	kv_store *kv = NULL;
	float a[SHAPE], b[SHAPE], c[SHAPE], o1[SHAPE], o2[SHAPE], o3[SHAPE];
	const void *vals[3] = { a, b, c };
	void *outs[3] = { o1, o2, o3 };

	cr_assert_eq(kv_create("teststore", NULL, &kv), KV_OK, "%s", kv_last_error(NULL));
	cr_assert_str_eq(kv_type(kv), "teststore");
	cr_assert_eq(kv_rank(kv), 0);
	cr_assert_eq(kv_num_workers(kv), 1);

	/* broadcast copies value to out */
	for (int i = 0; i < SHAPE; i++) {
		a[i] = (float)i * 0.5f;
		o1[i] = -1;
	}
	cr_assert_eq(kv_broadcast(kv, "3", a, o1, SHAPE, KV_FLOAT32, 0), KV_OK);
	cr_assert_arr_eq(o1, a, sizeof(a));
	cr_assert_eq(kv_broadcast(kv, "str", a, o1, SHAPE, KV_FLOAT32, 0), KV_OK);
	cr_assert_arr_eq(o1, a, sizeof(a));

	/* pushpull of one buffer: out gets it; in place leaves it */
	set_all(o1, SHAPE, -1);
	set_all(a, SHAPE, 1);
	cr_assert_eq(kv_pushpull(kv, "3", a, o1, SHAPE, KV_FLOAT32, 0), KV_OK);
	cr_assert_eq(diff_at(o1, SHAPE, 1), SHAPE);
	cr_assert_eq(kv_pushpull(kv, "3", a, NULL, SHAPE, KV_FLOAT32, 0), KV_OK);
	cr_assert_eq(diff_at(a, SHAPE, 1), SHAPE);

	/* pushpullv sums the local buffers into every out */
	for (int i = 0; i < SHAPE; i++) {
		a[i] = (float)i;
		b[i] = 10.0f * (float)i;
		c[i] = 1;
	}
	set_all(o1, SHAPE, -1);
	set_all(o2, SHAPE, -1);
	set_all(o3, SHAPE, -1);
	cr_assert_eq(kv_pushpullv(kv, "5", vals, 3, outs, 3, SHAPE, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < SHAPE; i++) {
		float want = 11.0f * (float)i + 1;
		cr_assert_eq(o1[i], want, "o1[%d] = %g, want %g", i, o1[i], want);
		cr_assert_eq(o2[i], want, "o2[%d] = %g, want %g", i, o2[i], want);
		cr_assert_eq(o3[i], want, "o3[%d] = %g, want %g", i, o3[i], want);
		cr_assert_eq(a[i], (float)i, "value a changed");
	}
	set_all(o1, SHAPE, -1);
	cr_assert_eq(kv_pushpullv(kv, "5", vals, 3, outs, 1, SHAPE, KV_FLOAT32, 0), KV_OK);
	cr_assert_eq(o1[7], 78.0f);

	/* no optimizer */
	cr_assert_eq(kv_is_capable(kv, "optimizer"), 0);
	cr_assert_eq(kv_is_capable(kv, "no_such_capability"), KV_ERR_INVALID);
	cr_assert_eq(kv_set_optimizer(kv, "sgd lr=0.1"), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_close(kv), KV_OK);
}

/* ---------------------------------------------------------------- kv_register */

static struct {
	int created, destroyed, pushpulls;
	char key[64];
	int nvalues, nouts;
	size_t count;
	kv_dtype t;
	int priority;
	int got_options;
} my;
static int my_state_word;

static int my_create(const struct kv_options *o, void **state)
{
	my.created++;
	my.got_options = o != NULL;
	*state = &my_state_word;
	return KV_OK;
}

static void my_destroy(void *state)
{
	if (state == &my_state_word)
		my.destroyed++;
}

/* sums the float buffers, adds 100, writes every out */
static int my_pushpull(void *state, const char *key, const void *const *values, int nvalues,
		       void *const *outs, int nouts, size_t count, kv_dtype t, int priority)
{
	float tmp[64];

	if (state != &my_state_word || t != KV_FLOAT32 || count > 64)
		return KV_ERR_INVALID;
	my.pushpulls++;
	snprintf(my.key, sizeof(my.key), "%s", key);
	my.nvalues = nvalues;
	my.nouts = nouts;
	my.count = count;
	my.t = t;
	my.priority = priority;
	for (size_t i = 0; i < count; i++) {
		tmp[i] = 100;
		for (int v = 0; v < nvalues; v++)
			tmp[i] += ((const float *)values[v])[i];
	}
	for (int o = 0; o < nouts; o++)
		memcpy(outs[o], tmp, count * sizeof(float));
	return KV_OK;
}

static const struct kv_backend my_backend = {
	.name = "MyTestStore",
	.create = my_create,
	.destroy = my_destroy,
	.pushpull = my_pushpull,
};

Test(mxnet, register_custom_backend, .timeout = 20)
{
	static const struct kv_backend again = {
		.name = "MYTESTSTORE",
		.create = my_create,
		.destroy = my_destroy,
		.pushpull = my_pushpull,
	};
	kv_store *kv = NULL;
	float v[8], w[8], out[8], out2[8];
	const void *vals[2] = { v, w };
	void *outs[2] = { out, out2 };

	cr_assert_eq(kv_register(&my_backend), 0);
	cr_assert_eq(kv_create("mytESTstore", NULL, &kv), KV_OK, "%s", kv_last_error(NULL));
	cr_assert_eq(my.created, 1);
	cr_assert_str_eq(kv_type(kv), "MyTestStore");

	for (int i = 0; i < 8; i++) {
		v[i] = (float)i;
		w[i] = 1000;
		out[i] = -1;
	}
	cr_assert_eq(kv_pushpull(kv, "k", v, out, 8, KV_FLOAT32, 3), KV_OK);
	cr_assert_eq(my.pushpulls, 1);
	cr_assert_str_eq(my.key, "k");
	cr_assert_eq(my.nvalues, 1);
	cr_assert_eq(my.nouts, 1);
	cr_assert_eq(my.count, 8);
	cr_assert_eq(my.priority, 3);
	for (int i = 0; i < 8; i++) {
		cr_assert_eq(out[i], (float)i + 100, "out[%d] = %g", i, out[i]);
		cr_assert_eq(v[i], (float)i, "value changed");
	}
	/* in place: the backend's out is the value */
	cr_assert_eq(kv_pushpull(kv, "k", v, NULL, 8, KV_FLOAT32, 0), KV_OK);
	cr_assert_eq(v[5], 105.0f);
	/* several buffers are passed through as they are */
	cr_assert_eq(kv_pushpullv(kv, "k2", vals, 2, outs, 2, 8, KV_FLOAT32, 0), KV_OK);
	cr_assert_eq(my.nvalues, 2);
	cr_assert_eq(my.nouts, 2);
	cr_assert_eq(out[1], 101.0f + 1100.0f);
	cr_assert_eq(out2[1], 101.0f + 1100.0f);

	/* members left NULL */
	cr_assert_eq(kv_pull(kv, "k", out, 8, KV_FLOAT32, 0), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_set_optimizer(kv, "sgd lr=0.1"), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_init(kv, "k", v, 8, KV_FLOAT32), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_push(kv, "k", v, 8, KV_FLOAT32, 0), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_broadcast(kv, "k", v, out, 8, KV_FLOAT32, 0), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_save_optimizer_states(kv, "/tmp/none", 0), KV_ERR_UNSUPPORTED);
	cr_assert_eq(kv_load_optimizer_states(kv, "/tmp/none"), KV_ERR_UNSUPPORTED);

	cr_assert_eq(kv_close(kv), KV_OK);
	cr_assert_eq(my.destroyed, 1);

	/* the same name again replaces it; names match without regard to case */
	cr_assert_eq(kv_register(&my_backend), 1);
	cr_assert_eq(kv_register(&again), 1);
	cr_assert_eq(kv_create("MyTestStore", NULL, &kv), KV_OK, "%s", kv_last_error(NULL));
	cr_assert_eq(my.created, 2);
	cr_assert_eq(kv_close(kv), KV_OK);
	cr_assert_eq(my.destroyed, 2);
}
