/* SPDX-License-Identifier: MIT */
/*
 * test_pushpull.c - local aggregation end to end: every dtype, sizes from one
 * element to 64 MiB, 1, 2 and 4 ranks; in place and separate output;
 * several local buffers (kv_pushpullv); zero-copy buffers from kv_alloc.
 *
 * Expected values never come from the project's code: each rank computes
 * every rank's contribution with the same pure function and sums them in a
 * plain loop (double for floats, unsigned 64-bit for integers, which wraps as
 * the contract says).  f16 and bf16 go through this file's own conversion
 * helpers.  Tolerances follow the contract: f16/bf16 accumulate in f32 and
 * round once (half an ulp of the dtype, plus the f32 accumulation error,
 * which is zero for the inputs used here); f32 and f64 add in their own
 * precision ((n - 1) roundings at most).  Most inputs are small multiples of
 * 0.5, whose sums are exact; every fifth element is 1 + k ulp, whose sum needs
 * rounding in the dtype, and another is 1 on rank 0 and half an ulp of 1 on
 * the others: rounding after each addition would lose every half ulp (an
 * error above half an ulp of the result from 3 ranks on), rounding once
 * does not.
 */
#include <criterion/criterion.h>
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

/* ---------------------------------------------------------------- f16/bf16 */

static uint16_t my_f32_to_f16(float f)
{
	uint32_t x, ax, sign, e, m, h, rem;

	memcpy(&x, &f, 4);
	sign = (x >> 16) & 0x8000;
	ax = x & 0x7fffffff;
	if (ax > 0x7f800000)
		return (uint16_t)(sign | 0x7e00);
	if (ax >= 0x477ff000) /* >= 65520 rounds to infinity */
		return (uint16_t)(sign | 0x7c00);
	if (ax < 0x38800000) { /* below 2^-14: subnormal half, unit 2^-24 */
		float v;
		memcpy(&v, &ax, 4);
		return (uint16_t)(sign | (uint32_t)nearbyint((double)v * 16777216.0));
	}
	e = (ax >> 23) - 127 + 15;
	m = ax & 0x7fffff;
	h = (e << 10) | (m >> 13);
	rem = m & 0x1fff;
	if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
		h++;
	return (uint16_t)(sign | h);
}

static double my_f16_to_double(uint16_t h)
{
	int s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;

	if (e == 0)
		return s * ldexp(m, -24);
	if (e == 31)
		return m ? NAN : s * INFINITY;
	return s * ldexp(1024 + m, e - 25);
}

static uint16_t my_f32_to_bf16(float f)
{
	uint32_t x;

	memcpy(&x, &f, 4);
	if ((x & 0x7fffffff) > 0x7f800000)
		return (uint16_t)((x >> 16) | 0x40);
	x += 0x7fff + ((x >> 16) & 1);
	return (uint16_t)(x >> 16);
}

static double my_bf16_to_double(uint16_t b)
{
	uint32_t x = (uint32_t)b << 16;
	float f;

	memcpy(&f, &x, 4);
	return f;
}

/* ---------------------------------------------------------------- values */

static size_t esize(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT64:
	case KV_INT64:
		return 8;
	case KV_FLOAT32:
	case KV_INT32:
		return 4;
	default:
		return 2;
	}
}

static int is_int(kv_dtype t)
{
	return t == KV_INT32 || t == KV_INT64;
}

static const char *dname(kv_dtype t)
{
	static const char *n[] = { "f32", "f64", "f16", "bf16", "i32", "i64" };
	return n[t];
}

/* significand bits, implicit bit included */
static int sig_bits(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT16:
		return 11;
	case KV_BFLOAT16:
		return 8;
	case KV_FLOAT32:
		return 24;
	default:
		return 53;
	}
}

/* Rank r's contribution to element i in a round: exactly representable. */
static double fval(kv_dtype t, int r, size_t i, int round)
{
	if (i % 5 == 4)
		return 1.0 + ldexp((double)((i / 5 + 3 * (size_t)r + (size_t)round) % 8),
				   1 - sig_bits(t));
	if (i % 5 == 3) /* 1 + half-ulp + half-ulp...: rounding per addition loses them */
		return r == 0 ? 1.0 + round : ldexp(1.0, -sig_bits(t));
	return ((double)((i * 7 + (size_t)r * 13 + (size_t)round * 5 + 3) % 61) - 30.0) * 0.5;
}

/* Rank r's contribution as the unsigned bit pattern of the integer. */
static uint64_t ival(kv_dtype t, int r, size_t i, int round)
{
	int wide = t == KV_INT64;
	uint64_t max = wide ? (uint64_t)INT64_MAX : (uint64_t)INT32_MAX;
	uint64_t min = wide ? (uint64_t)INT64_MIN : (uint64_t)(int64_t)INT32_MIN;

	switch (i % 4) {
	case 0: /* INT_MAX + 1 + ... : wraps to negative */
		return r == 0 ? max - (uint64_t)round : (uint64_t)(r + round);
	case 1: /* INT_MIN - 1 - ... : wraps to positive */
		return r == 0 ? min : (uint64_t)-(int64_t)(r + round);
	case 2:
		return (uint64_t) - (int64_t)(i * (size_t)(r + 1) + (size_t)round);
	default: {
		uint64_t h = (i + 1) * 0x9e3779b97f4a7c15ull;
		h ^= (uint64_t)(r + 1) * 0xbf58476d1ce4e5b9ull;
		h ^= (uint64_t)round * 0x94d049bb133111ebull;
		return h ^ (h >> 31);
	}
	}
}

static uint64_t imask(kv_dtype t)
{
	return t == KV_INT64 ? ~0ull : 0xffffffffull;
}

static void put(kv_dtype t, void *b, size_t i, int r, int round)
{
	switch (t) {
	case KV_FLOAT32:
		((float *)b)[i] = (float)fval(t, r, i, round);
		break;
	case KV_FLOAT64:
		((double *)b)[i] = fval(t, r, i, round);
		break;
	case KV_FLOAT16:
		((uint16_t *)b)[i] = my_f32_to_f16((float)fval(t, r, i, round));
		break;
	case KV_BFLOAT16:
		((uint16_t *)b)[i] = my_f32_to_bf16((float)fval(t, r, i, round));
		break;
	case KV_INT32:
		((uint32_t *)b)[i] = (uint32_t)ival(t, r, i, round);
		break;
	case KV_INT64:
		((uint64_t *)b)[i] = ival(t, r, i, round);
		break;
	}
}

static void fill(kv_dtype t, void *b, size_t count, int r, int round)
{
	for (size_t i = 0; i < count; i++)
		put(t, b, i, r, round);
}

static double getf(kv_dtype t, const void *b, size_t i)
{
	switch (t) {
	case KV_FLOAT32:
		return ((const float *)b)[i];
	case KV_FLOAT64:
		return ((const double *)b)[i];
	case KV_FLOAT16:
		return my_f16_to_double(((const uint16_t *)b)[i]);
	default:
		return my_bf16_to_double(((const uint16_t *)b)[i]);
	}
}

static uint64_t geti(kv_dtype t, const void *b, size_t i)
{
	return t == KV_INT64 ? ((const uint64_t *)b)[i] : ((const uint32_t *)b)[i];
}

/* Largest error the contract allows between the result and the exact sum. */
static double tolerance(kv_dtype t, double exact, double sumabs, int n)
{
	double acc = (n - 1) * ldexp(sumabs, -24); /* f32 accumulation */
	int e;

	switch (t) {
	case KV_FLOAT16:
	case KV_BFLOAT16:
		if (exact == 0)
			return acc;
		e = ilogb(exact);
		if (t == KV_FLOAT16 && e < -14)
			e = -14;
		return acc + ldexp(1.0, e - (sig_bits(t) - 1) - 1); /* half an ulp */
	case KV_FLOAT32:
		return acc;
	default: /* the reference loop itself rounds in double */
		return 2 * (n - 1) * ldexp(sumabs, -53);
	}
}

/*
 * Check that got holds the sum over contributors (r, round) for r in
 * [0, n): nbuf contributions per rank, buffer b of rank r being the
 * contribution of "rank" r * nbuf + b.
 */
static int check_sum(kv_dtype t, const void *got, size_t count, int n, int nbuf, int round,
		     const char *what)
{
	for (size_t i = 0; i < count; i++) {
		if (is_int(t)) {
			uint64_t want = 0, g = geti(t, got, i);
			for (int c = 0; c < n * nbuf; c++)
				want += ival(t, c, i, round);
			want &= imask(t);
			CHECK(g == want, "%s: %s elem %zu of %zu round %d: got %#" PRIx64
			      ", want %#" PRIx64, what, dname(t), i, count, round, g, want);
		} else {
			double exact = 0, sumabs = 0, g = getf(t, got, i), tol;
			for (int c = 0; c < n * nbuf; c++) {
				double x = fval(t, c, i, round);
				exact += x;
				sumabs += fabs(x);
			}
			tol = tolerance(t, exact, sumabs, n * nbuf);
			CHECK(fabs(g - exact) <= tol,
			      "%s: %s elem %zu of %zu round %d: got %.17g, want %.17g (tol %g)",
			      what, dname(t), i, count, round, g, exact, tol);
		}
	}
	return 0;
}

static void run_job(const char *job, int n, rank_fn fn, void *arg, int timeout_s)
{
	struct kvd_proc k;
	char why[256];
	int rc;

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	rc = run_ranks(&k, job, n, fn, arg, timeout_s, why, sizeof(why));
	if (rc) {
		char cmd[256];
		fprintf(stderr, "--- kvd log (%s) ---\n", job);
		snprintf(cmd, sizeof(cmd), "tail -n 40 %s >&2", k.log);
		if (system(cmd) != 0)
			fprintf(stderr, "(no log)\n");
	}
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

/* ---------------------------------------------------------------- dtypes x sizes */

struct dt_arg {
	kv_dtype t;
	size_t counts[8];
	int ncounts;
	int rounds;
};

static int dtype_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const struct dt_arg *a = arg;
	kv_store *kv = open_rank(60000);

	CHECK(kv, "open");
	for (int c = 0; c < a->ncounts; c++) {
		size_t count = a->counts[c], bytes = count * esize(a->t);
		char key[64], what[96];
		unsigned char *v = malloc(bytes), *init = malloc(bytes);

		CHECK(v && init, "malloc %zu", bytes);
		/* rank 0's init value is stored; pushpull's result does not depend on it */
		memset(init, rank == 0 ? 0 : 0x5a, bytes);
		snprintf(key, sizeof(key), "pp.%s.%zu", dname(a->t), count);
		CHECK_RC(kv_init(kv, key, init, count, a->t), KV_OK);
		for (int round = 0; round < a->rounds; round++) {
			fill(a->t, v, count, rank, round);
			CHECK_RC(kv_pushpull(kv, key, v, NULL, count, a->t, 0), KV_OK);
			snprintf(what, sizeof(what), "key %s n=%d", key, n);
			if (check_sum(a->t, v, count, n, 1, round, what))
				return 1;
		}
		free(v);
		free(init);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

static void dtype_case(kv_dtype t, int n)
{
	struct dt_arg a = { .t = t, .counts = { 1, 3, 1023, 4096 }, .ncounts = 4, .rounds = 2 };
	char job[32];

	snprintf(job, sizeof(job), "dt-%s-%d", dname(t), n);
	run_job(job, n, dtype_rank, &a, 60);
}

Test(pushpull, f32_n1, .timeout = 60) { dtype_case(KV_FLOAT32, 1); }
Test(pushpull, f32_n2, .timeout = 60) { dtype_case(KV_FLOAT32, 2); }
Test(pushpull, f32_n4, .timeout = 60) { dtype_case(KV_FLOAT32, 4); }
Test(pushpull, f64_n1, .timeout = 60) { dtype_case(KV_FLOAT64, 1); }
Test(pushpull, f64_n2, .timeout = 60) { dtype_case(KV_FLOAT64, 2); }
Test(pushpull, f64_n4, .timeout = 60) { dtype_case(KV_FLOAT64, 4); }
Test(pushpull, f16_n1, .timeout = 60) { dtype_case(KV_FLOAT16, 1); }
Test(pushpull, f16_n2, .timeout = 60) { dtype_case(KV_FLOAT16, 2); }
Test(pushpull, f16_n4, .timeout = 60) { dtype_case(KV_FLOAT16, 4); }
Test(pushpull, bf16_n1, .timeout = 60) { dtype_case(KV_BFLOAT16, 1); }
Test(pushpull, bf16_n2, .timeout = 60) { dtype_case(KV_BFLOAT16, 2); }
Test(pushpull, bf16_n4, .timeout = 60) { dtype_case(KV_BFLOAT16, 4); }
Test(pushpull, i32_n1, .timeout = 60) { dtype_case(KV_INT32, 1); }
Test(pushpull, i32_n2, .timeout = 60) { dtype_case(KV_INT32, 2); }
Test(pushpull, i32_n4, .timeout = 60) { dtype_case(KV_INT32, 4); }
Test(pushpull, i64_n1, .timeout = 60) { dtype_case(KV_INT64, 1); }
Test(pushpull, i64_n2, .timeout = 60) { dtype_case(KV_INT64, 2); }
Test(pushpull, i64_n4, .timeout = 60) { dtype_case(KV_INT64, 4); }

/* The reference helpers themselves, on values whose encodings are known. */
Test(pushpull, reference_helpers)
{
	cr_assert_eq(my_f32_to_f16(1.0f), 0x3c00);
	cr_assert_eq(my_f32_to_f16(-2.0f), 0xc000);
	cr_assert_eq(my_f32_to_f16(65504.0f), 0x7bff);
	cr_assert_eq(my_f32_to_f16(65520.0f), 0x7c00);
	cr_assert_eq(my_f32_to_f16(1.0f + 1.0f / 2048), 0x3c00);     /* tie to even */
	cr_assert_eq(my_f32_to_f16(1.0f + 3.0f / 2048), 0x3c02);     /* tie to even */
	cr_assert_eq(my_f32_to_f16(5.960464477539063e-08f), 0x0001); /* 2^-24 */
	cr_assert_eq(my_f16_to_double(0x0001), ldexp(1, -24));
	cr_assert_eq(my_f16_to_double(0x3555), 0.25 * (1 + 0x155 / 1024.0));
	cr_assert_eq(my_f32_to_bf16(1.0f), 0x3f80);
	cr_assert_eq(my_f32_to_bf16(1.0f + 1.0f / 256), 0x3f80); /* tie to even */
	cr_assert_eq(my_f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
	cr_assert_eq(my_bf16_to_double(0xc040), -3.0);
	/* inputs are exact in their dtype */
	for (size_t i = 0; i < 100; i++)
		for (int t = KV_FLOAT32; t <= KV_BFLOAT16; t++) {
			unsigned char b[8 * 100];
			put((kv_dtype)t, b, i, 2, 1);
			cr_assert_eq(getf((kv_dtype)t, b, i), fval((kv_dtype)t, 2, i, 1), "%s %zu",
				     dname((kv_dtype)t), i);
		}
	/* INT32_MAX + 1 wraps to INT32_MIN */
	cr_assert_eq((uint32_t)(ival(KV_INT32, 0, 0, 0) + ival(KV_INT32, 1, 0, 0)), 0x80000000u);
}

static void big_case(int n)
{
	struct dt_arg a = { .t = KV_FLOAT32, .counts = { 16u << 20 }, .ncounts = 1, .rounds = 1 };
	char job[32];

	snprintf(job, sizeof(job), "big-%d", n);
	run_job(job, n, dtype_rank, &a, 100);
}

Test(pushpull, f32_64mib_n2, .timeout = 120) { big_case(2); }
Test(pushpull, f32_64mib_n4, .timeout = 120) { big_case(4); }

/* ---------------------------------------------------------------- output placement */

enum { OUT_NULL, OUT_IS_VALUE, OUT_SEPARATE };

static const kv_dtype place_types[] = { KV_FLOAT32, KV_FLOAT16, KV_INT64, KV_FLOAT64 };

static int place_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	int mode = *(int *)arg;
	kv_store *kv = open_rank(30000);
	const size_t count = 1000;

	CHECK(kv, "open");
	for (size_t ti = 0; ti < sizeof(place_types) / sizeof(place_types[0]); ti++) {
		kv_dtype t = place_types[ti];
		size_t bytes = count * esize(t);
		unsigned char *v = malloc(bytes), *orig = malloc(bytes), *out = malloc(bytes);
		char key[32];

		CHECK(v && orig && out, "malloc");
		snprintf(key, sizeof(key), "place.%s", dname(t));
		memset(v, 0, bytes);
		CHECK_RC(kv_init(kv, key, v, count, t), KV_OK);
		for (int round = 0; round < 3; round++) {
			fill(t, v, count, rank, round);
			memcpy(orig, v, bytes);
			memset(out, 0xff, bytes); /* NaN / -1: must all be overwritten */
			switch (mode) {
			case OUT_NULL:
				CHECK_RC(kv_pushpull(kv, key, v, NULL, count, t, 0), KV_OK);
				if (check_sum(t, v, count, n, 1, round, "out NULL"))
					return 1;
				break;
			case OUT_IS_VALUE:
				CHECK_RC(kv_pushpull(kv, key, v, v, count, t, 0), KV_OK);
				if (check_sum(t, v, count, n, 1, round, "out == value"))
					return 1;
				break;
			default:
				CHECK_RC(kv_pushpull(kv, key, v, out, count, t, 0), KV_OK);
				if (check_sum(t, out, count, n, 1, round, "separate out"))
					return 1;
				CHECK(memcmp(v, orig, bytes) == 0, "%s: value changed by pushpull",
				      dname(t));
				break;
			}
		}
		free(v);
		free(orig);
		free(out);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(pushpull, in_place_out_null, .timeout = 60)
{
	int mode = OUT_NULL;
	run_job("place-null", 3, place_rank, &mode, 50);
}

Test(pushpull, in_place_out_is_value, .timeout = 60)
{
	int mode = OUT_IS_VALUE;
	run_job("place-same", 3, place_rank, &mode, 50);
}

Test(pushpull, separate_out_value_unchanged, .timeout = 60)
{
	int mode = OUT_SEPARATE;
	run_job("place-sep", 3, place_rank, &mode, 50);
}

/* ---------------------------------------------------------------- kv_pushpullv */

struct ppv_arg {
	int nouts;
	int in_place; /* outs are the value buffers themselves */
};

static int ppv_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const struct ppv_arg *a = arg;
	const kv_dtype types[] = { KV_FLOAT32, KV_INT32, KV_BFLOAT16 };
	const size_t count = 777;
	kv_store *kv = open_rank(30000);

	CHECK(kv, "open");
	for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
		kv_dtype t = types[ti];
		size_t bytes = count * esize(t);
		unsigned char *vals[3], *origs[3], *outs[3];
		char key[32];

		snprintf(key, sizeof(key), "ppv.%s", dname(t));
		for (int b = 0; b < 3; b++) {
			vals[b] = malloc(bytes);
			origs[b] = malloc(bytes);
			outs[b] = a->in_place ? vals[b] : malloc(bytes);
			CHECK(vals[b] && origs[b] && outs[b], "malloc");
		}
		memset(vals[0], 0, bytes);
		CHECK_RC(kv_init(kv, key, vals[0], count, t), KV_OK);
		for (int round = 0; round < 2; round++) {
			char what[64];
			/* buffer b of rank r is contributor r * 3 + b */
			for (int b = 0; b < 3; b++) {
				fill(t, vals[b], count, rank * 3 + b, round);
				memcpy(origs[b], vals[b], bytes);
				if (!a->in_place)
					memset(outs[b], 0xff, bytes);
			}
			/* outs NULL with nouts > 0 is a mistake, not "in place" */
			CHECK_RC(kv_pushpullv(kv, key, (const void *const *)vals, 3, NULL, 1,
					      count, t, 0),
				 KV_ERR_INVALID);
			CHECK_RC(kv_pushpullv(kv, key, (const void *const *)vals, 3,
					      (void *const *)outs, a->nouts, count, t, 0),
				 KV_OK);
			for (int o = 0; o < a->nouts; o++) {
				snprintf(what, sizeof(what), "out %d of %d", o, a->nouts);
				if (check_sum(t, outs[o], count, n, 3, round, what))
					return 1;
			}
			if (!a->in_place)
				for (int b = 0; b < 3; b++)
					CHECK(memcmp(vals[b], origs[b], bytes) == 0,
					      "%s: value %d changed", dname(t), b);
			for (int o = a->nouts; o < 3 && !a->in_place; o++)
				CHECK(outs[o][0] == 0xff && outs[o][bytes - 1] == 0xff,
				      "out %d beyond nouts was written", o);
		}
		for (int b = 0; b < 3; b++) {
			if (!a->in_place)
				free(outs[b]);
			free(vals[b]);
			free(origs[b]);
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(pushpull, pushpullv_nouts1, .timeout = 60)
{
	struct ppv_arg a = { .nouts = 1 };
	run_job("ppv-1", 2, ppv_rank, &a, 50);
}

Test(pushpull, pushpullv_nouts3, .timeout = 60)
{
	struct ppv_arg a = { .nouts = 3 };
	run_job("ppv-3", 3, ppv_rank, &a, 50);
}

/* outs are the value buffers (MXNet's pushpull of a list with out=None) */
Test(pushpull, pushpullv_in_place, .timeout = 60)
{
	struct ppv_arg a = { .nouts = 3, .in_place = 1 };
	run_job("ppv-ip", 2, ppv_rank, &a, 50);
}

/* ---------------------------------------------------------------- zero-copy */

static int zc_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const size_t counts[] = { 1000, 1u << 20 };
	kv_store *kv = open_rank(30000);

	CHECK(kv, "open");
	for (int ci = 0; ci < 2; ci++) {
		size_t count = counts[ci], bytes = count * sizeof(float);
		float *v = kv_alloc(kv, bytes), *out = kv_alloc(kv, bytes);
		float *orig = malloc(bytes), *plain = malloc(bytes);
		char key[32];

		CHECK(v && out, "kv_alloc(%zu) failed: %s", bytes, kv_last_error(kv));
		CHECK(v != out, "kv_alloc returned the same block twice");
		CHECK((uintptr_t)v % 8 == 0 && (uintptr_t)out % 8 == 0, "kv_alloc misaligned");
		CHECK(orig && plain, "malloc");
		snprintf(key, sizeof(key), "zc.%zu", count);
		memset(v, 0, bytes);
		CHECK_RC(kv_init(kv, key, v, count, KV_FLOAT32), KV_OK);

		/* in place, out == NULL */
		fill(KV_FLOAT32, v, count, rank, 0);
		CHECK_RC(kv_pushpull(kv, key, v, NULL, count, KV_FLOAT32, 0), KV_OK);
		if (check_sum(KV_FLOAT32, v, count, n, 1, 0, "zero-copy out NULL"))
			return 1;
		/* in place, out == value */
		fill(KV_FLOAT32, v, count, rank, 1);
		CHECK_RC(kv_pushpull(kv, key, v, v, count, KV_FLOAT32, 0), KV_OK);
		if (check_sum(KV_FLOAT32, v, count, n, 1, 1, "zero-copy out == value"))
			return 1;
		/* separate, both zero-copy */
		fill(KV_FLOAT32, v, count, rank, 2);
		memcpy(orig, v, bytes);
		memset(out, 0xff, bytes);
		CHECK_RC(kv_pushpull(kv, key, v, out, count, KV_FLOAT32, 0), KV_OK);
		if (check_sum(KV_FLOAT32, out, count, n, 1, 2, "zero-copy separate"))
			return 1;
		CHECK(memcmp(v, orig, bytes) == 0, "zero-copy value changed");
		/* mixed: zero-copy value, malloc'd out */
		fill(KV_FLOAT32, v, count, rank, 3);
		CHECK_RC(kv_pushpull(kv, key, v, plain, count, KV_FLOAT32, 0), KV_OK);
		if (check_sum(KV_FLOAT32, plain, count, n, 1, 3, "zero-copy value, plain out"))
			return 1;
		kv_free(kv, v);
		kv_free(kv, out);
		/* freed memory can be handed out again and still works */
		v = kv_alloc(kv, bytes);
		CHECK(v, "kv_alloc after kv_free: %s", kv_last_error(kv));
		fill(KV_FLOAT32, v, count, rank, 4);
		CHECK_RC(kv_pushpull(kv, key, v, NULL, count, KV_FLOAT32, 0), KV_OK);
		if (check_sum(KV_FLOAT32, v, count, n, 1, 4, "zero-copy after free"))
			return 1;
		kv_free(kv, v);
		free(orig);
		free(plain);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(pushpull, zero_copy, .timeout = 60) { run_job("zc", 2, zc_rank, NULL, 50); }
