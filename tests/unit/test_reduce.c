/* SPDX-License-Identifier: MIT */
/*
 * test_reduce.c - reduce_sum(), reduce_copy() and the half conversions
 * (kernels/reduce.c), and the GPU path when a GPU is present.
 *
 * Expected values never come from the code under test.  Integer sums are
 * done in uint64_t; f64 sums in a plain double loop; f32 sums left to right
 * in float (the contract: "add in their own precision, left to right") and
 * also checked against the exact double sum within the f32 error bound.
 * f16 and bf16 are widened by this file's own conversions (ldexp), summed
 * left to right in float, and rounded by this file's own round-to-nearest-
 * even (frexp, nearbyint); the result must match bit for bit.
 *
 * Why not round the exact (double) sum instead?  A half has 11 significant
 * bits over exponents -24..15, so two halves can need 40 bits: the f32 sum
 * of 16 halves is not always exact, and rounding twice (to f32, then to f16)
 * can differ from rounding once.  1 + 2^-11 + 2^-24: exactly, it rounds to
 * 1 + 2^-10 (0x3c01); in f32 the 2^-24 is a tie that goes to even, leaving
 * 1 + 2^-11, which is a tie in f16 that goes to 1.0 (0x3c00).  The contract
 * says f32 then round once, so 0x3c00 is right (test reduce/f16_double_rounding).
 * The distance to the exact sum is still checked: it is within
 * (nin - 1) * 2^-24 * sum|x| (the f32 adds) plus half an ulp of the result.
 *
 * Every sum test runs each CPU variant this machine has (portable, AVX2,
 * AVX-512).  Buffers are malloc'd at exactly their size, so the sanitizer
 * build catches a kernel reading or writing past the end.
 */
#include <criterion/criterion.h>

#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/gpu.h"
#include "../../kernels/reduce.h"

#define NDTYPES 6
static const kv_dtype all_dtypes[NDTYPES] = {KV_FLOAT32,  KV_FLOAT64, KV_FLOAT16,
					     KV_BFLOAT16, KV_INT32,   KV_INT64};
static const char *const dtype_names[NDTYPES] = {"f32", "f64", "f16", "bf16", "i32", "i64"};

static size_t esize(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT16:
	case KV_BFLOAT16:
		return 2;
	case KV_FLOAT32:
	case KV_INT32:
		return 4;
	default:
		return 8;
	}
}

/* ------------------------------------------------------------ reference conversions */

static double ref_half(uint16_t h)
{
	int e = (h >> 10) & 31, m = h & 1023;
	double v = e == 31  ? (m ? NAN : INFINITY)
		   : e == 0 ? ldexp(m, -24)
			    : ldexp(1024 + m, e - 25);
	return (h & 0x8000) ? -v : v;
}

static double ref_bf16(uint16_t h)
{
	int e = (h >> 7) & 255, m = h & 127;
	double v = e == 255 ? (m ? NAN : INFINITY)
		   : e == 0 ? ldexp(m, -133)
			    : ldexp(128 + m, e - 134);
	return (h & 0x8000) ? -v : v;
}

/*
 * Round d to a binary format with `bits` significant bits (counting the
 * leading one), smallest normal exponent emin, ties to even; overflow at or
 * past `inf_at`.  Returns the encoding; NaN gives a quiet NaN (callers only
 * compare NaN-ness).
 */
static uint16_t ref_round(double d, int bits, int emin, int ebias, double inf_at)
{
	uint16_t s = signbit(d) ? 0x8000 : 0;
	int mbits = bits - 1, e;
	double a = fabs(d);

	if (isnan(d))
		return s | (uint16_t)(((2 * ebias + 1) << mbits) | (1 << (mbits - 1)));
	if (a >= inf_at)
		return s | (uint16_t)((2 * ebias + 1) << mbits);
	if (a == 0)
		return s;
	frexp(a, &e);
	int lead = e - 1 < emin ? emin : e - 1;
	double q = ldexp(1.0, lead - mbits); /* the spacing of representable values here */
	double m = nearbyint(a / q);	     /* the default rounding mode: to nearest, ties even */
	double v = m * q;
	if (v < ldexp(1.0, emin)) /* subnormal (m may have rounded up to the first normal) */
		return s | (uint16_t)m;
	frexp(v, &e);
	lead = e - 1;
	return s | (uint16_t)((lead + ebias) << mbits) |
	       (uint16_t)(ldexp(v, mbits - lead) - ldexp(1.0, mbits));
}

static uint16_t ref_to_half(double d)
{
	return ref_round(d, 11, -14, 15, 65520.0);
}

static uint16_t ref_to_bf16(double d)
{
	return ref_round(d, 8, -126, 127, ldexp(511, 119)); /* halfway from the max to 2^128 */
}

static uint32_t fbits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

static float bitsf(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

/* ------------------------------------------------------------ data */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
	uint64_t x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545f4914f6cdd1dull;
}

/* Finite values with mixed signs and exponents, some subnormal; sums of 16
 * stay finite (overflow and NaN have their own tests). */
static void fill(kv_dtype t, void *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t r = rnd();
		switch (t) {
		case KV_FLOAT32: {
			uint32_t e = (r & 7) == 0 ? 0 : 100 + (uint32_t)((r >> 3) % 50);
			uint32_t u = (uint32_t)(r >> 32 & 0x807fffffu) | e << 23;
			memcpy((char *)p + 4 * i, &u, 4);
			break;
		}
		case KV_FLOAT64: {
			uint64_t e = (r & 7) == 0 ? 0 : 1000 + (r >> 3) % 50;
			uint64_t u = (rnd() & 0x800fffffffffffffull) | e << 52;
			memcpy((char *)p + 8 * i, &u, 8);
			break;
		}
		case KV_FLOAT16: /* exponent field 0..24: subnormals up to 1024 */
			((uint16_t *)p)[i] = (uint16_t)((r >> 16 & 0x83ffu) | (r % 25) << 10);
			break;
		case KV_BFLOAT16: {
			uint16_t e = (r & 7) == 0 ? 0 : 100 + (uint16_t)((r >> 3) % 50);
			((uint16_t *)p)[i] = (uint16_t)((r >> 16 & 0x807fu) | e << 7);
			break;
		}
		case KV_INT32: {
			uint32_t u = (uint32_t)(r >> 32);
			memcpy((char *)p + 4 * i, &u, 4);
			break;
		}
		case KV_INT64:
			memcpy((char *)p + 8 * i, &r, 8);
			break;
		}
	}
}

/* ------------------------------------------------------------ expected values */

/* Bits of the expected element i (integers, f32, f64, f16, bf16 as stored);
 * *isnan set when the expected value is a NaN of any payload. */
static uint64_t expect(kv_dtype t, const void *const *in, int nin, size_t i, bool *isnan_out)
{
	*isnan_out = false;
	switch (t) {
	case KV_INT32: {
		uint64_t s = 0;
		for (int k = 0; k < nin; k++) {
			int32_t v;
			memcpy(&v, (const char *)in[k] + 4 * i, 4);
			s += (uint64_t)(int64_t)v;
		}
		return (uint32_t)s;
	}
	case KV_INT64: {
		uint64_t s = 0;
		for (int k = 0; k < nin; k++) {
			uint64_t v;
			memcpy(&v, (const char *)in[k] + 8 * i, 8);
			s += v;
		}
		return s;
	}
	case KV_FLOAT64: {
		double s = ((const double *)in[0])[i];
		for (int k = 1; k < nin; k++)
			s += ((const double *)in[k])[i];
		uint64_t u;
		memcpy(&u, &s, 8);
		*isnan_out = isnan(s);
		return u;
	}
	case KV_FLOAT32: {
		float s = ((const float *)in[0])[i];
		for (int k = 1; k < nin; k++)
			s += ((const float *)in[k])[i];
		*isnan_out = isnan(s);
		return fbits(s);
	}
	case KV_FLOAT16:
	case KV_BFLOAT16: {
		double (*widen)(uint16_t) = t == KV_FLOAT16 ? ref_half : ref_bf16;
		float s = (float)widen(((const uint16_t *)in[0])[i]);
		for (int k = 1; k < nin; k++)
			s += (float)widen(((const uint16_t *)in[k])[i]);
		*isnan_out = isnan(s);
		return t == KV_FLOAT16 ? ref_to_half(s) : ref_to_bf16(s);
	}
	}
	return 0;
}

static uint64_t load_bits(kv_dtype t, const void *p, size_t i)
{
	uint64_t u = 0;
	memcpy(&u, (const char *)p + esize(t) * i, esize(t)); /* little endian */
	return u;
}

static bool bits_isnan(kv_dtype t, uint64_t u)
{
	switch (t) {
	case KV_FLOAT32:
		return isnan(bitsf((uint32_t)u));
	case KV_FLOAT64: {
		double d;
		memcpy(&d, &u, 8);
		return isnan(d);
	}
	case KV_FLOAT16:
		return isnan(ref_half((uint16_t)u));
	case KV_BFLOAT16:
		return isnan(ref_bf16((uint16_t)u));
	default:
		return false;
	}
}

/* For floats: the result is within the f32 (f64) summation bound plus half an ulp of the
 * stored format of the exact sum. */
static bool within_bound(kv_dtype t, const void *const *in, int nin, size_t i, uint64_t got)
{
	double s = 0, a = 0, g, u, halfulp;
	int e;

	for (int k = 0; k < nin; k++) {
		double x;
		switch (t) {
		case KV_FLOAT32:
			x = ((const float *)in[k])[i];
			break;
		case KV_FLOAT16:
			x = ref_half(((const uint16_t *)in[k])[i]);
			break;
		case KV_BFLOAT16:
			x = ref_bf16(((const uint16_t *)in[k])[i]);
			break;
		default:
			return true; /* integers and f64 are checked exactly */
		}
		s += x; /* exact: at most 16 values of at most 48 significant bits apart */
		a += fabs(x);
	}
	switch (t) {
	case KV_FLOAT32:
		g = bitsf((uint32_t)got);
		frexp(fmax(fabs(s), fabs(g)), &e);
		halfulp = ldexp(1.0, (e - 1 < -126 ? -126 : e - 1) - 24);
		break;
	case KV_FLOAT16:
		g = ref_half((uint16_t)got);
		frexp(fmax(fabs(s), fabs(g)), &e);
		halfulp = ldexp(1.0, (e - 1 < -14 ? -14 : e - 1) - 11);
		break;
	default:
		g = ref_bf16((uint16_t)got);
		frexp(fmax(fabs(s), fabs(g)), &e);
		halfulp = ldexp(1.0, (e - 1 < -126 ? -126 : e - 1) - 8);
		break;
	}
	if (!isfinite(g) || !isfinite(s))
		return true; /* overflow is checked exactly against the f32 emulation */
	u = ldexp(1.0, -24) *
	    1.000001; /* f32 unit roundoff, with slack for the bound's own rounding */
	return fabs(g - s) <= (nin - 1) * u * a + halfulp + ldexp(1.0, -149);
}

/* ------------------------------------------------------------ one case */

enum alias {
	ALIAS_NONE,  /* every output its own buffer */
	ALIAS_IN0,   /* outs[0] == ins[0] */
	ALIAS_IN1,   /* outs[0] == ins[1] */
	ALIAS_EVERY, /* outs[j] == ins[j] for every j < min(nin, nout) */
	ALIAS_LAST,  /* outs[0] == ins[nin - 1] */
};
static const char *const alias_names[] = {"none", "out0=in0", "out0=in1", "outj=inj",
					  "out0=inlast"};

struct buf {
	void *base;
	void *p;
};

static struct buf buf_new(kv_dtype t, size_t n, size_t off)
{
	size_t bytes = (n + off) * esize(t);
	struct buf b = {.base = malloc(bytes ? bytes : 1)};
	cr_assert_not_null(b.base);
	b.p = (char *)b.base + off * esize(t);
	return b;
}

/* Sums nin random inputs into nout outputs and checks every element. */
static void check_sum(kv_dtype t, int nin, int nout, size_t n, enum alias al, size_t off)
{
	struct buf in[REDUCE_MAX_INPUTS], out[REDUCE_MAX_INPUTS];
	void *saved[REDUCE_MAX_INPUTS];
	const void *ins[REDUCE_MAX_INPUTS];
	void *outs[REDUCE_MAX_INPUTS];
	bool owned[REDUCE_MAX_INPUTS];
	size_t es = esize(t), bytes = n * es;

	for (int k = 0; k < nin; k++) {
		in[k] = buf_new(t, n, off);
		fill(t, in[k].p, n);
		saved[k] = malloc(bytes ? bytes : 1);
		memcpy(saved[k], in[k].p, bytes);
		ins[k] = in[k].p;
	}
	for (int j = 0; j < nout; j++) {
		int src = -1;
		if (al == ALIAS_IN0 && j == 0)
			src = 0;
		if (al == ALIAS_IN1 && j == 0 && nin > 1)
			src = 1;
		if (al == ALIAS_EVERY && j < nin)
			src = j;
		if (al == ALIAS_LAST && j == 0)
			src = nin - 1;
		owned[j] = src < 0;
		if (owned[j]) {
			out[j] = buf_new(t, n, off);
			memset(out[j].p, 0xa5, bytes);
			outs[j] = out[j].p;
		} else {
			outs[j] = in[src].p;
		}
	}

	int rc = reduce_sum(REDUCE_CPU, NULL, t, outs, nout, ins, nin, n);
	cr_assert_eq(rc, 0, "reduce_sum %s nin=%d nout=%d n=%zu: rc %d", dtype_names[t], nin, nout,
		     n, rc);

	for (int j = 0; j < nout; j++) {
		for (size_t i = 0; i < n; i++) {
			bool nan;
			uint64_t want = expect(t, (const void *const *)saved, nin, i, &nan);
			uint64_t got = load_bits(t, outs[j], i);
			bool ok = nan ? bits_isnan(t, got) : got == want;
			if (ok)
				ok = within_bound(t, (const void *const *)saved, nin, i, got);
			if (!ok)
				cr_assert_fail("%s [%s] nin=%d nout=%d n=%zu alias=%s off=%zu: "
					       "out %d [%zu] = %#llx, want %#llx",
					       dtype_names[t],
					       reduce_cpu_isa_name(reduce_cpu_isa()), nin, nout, n,
					       alias_names[al], off, j, i, (unsigned long long)got,
					       (unsigned long long)want);
		}
	}
	/* inputs that are not outputs are left alone */
	for (int k = 0; k < nin; k++) {
		bool is_out = false;
		for (int j = 0; j < nout; j++)
			is_out = is_out || outs[j] == ins[k];
		if (!is_out)
			cr_assert(memcmp(ins[k], saved[k], bytes) == 0, "input %d modified", k);
	}

	for (int k = 0; k < nin; k++) {
		free(in[k].base);
		free(saved[k]);
	}
	for (int j = 0; j < nout; j++)
		if (owned[j])
			free(out[j].base);
}

static const int nins[] = {1, 2, 3, 4, 8, 16};
static const int nouts[] = {1, 2, 3};
static const size_t sizes[] = {0, 1, 3, 7, 15, 16, 17, 63, 64, 65, 1023, 2049, 4096};

/* The whole matrix for one dtype, on every CPU variant. */
static void sum_matrix(kv_dtype t)
{
	int best = reduce_cpu_isa_limit(REDUCE_ISA_AVX512);

	for (int lvl = REDUCE_ISA_PORTABLE; lvl <= best; lvl++) {
		cr_assert_eq(reduce_cpu_isa_limit(lvl), lvl);
		for (size_t a = 0; a < sizeof(nins) / sizeof(nins[0]); a++)
			for (size_t b = 0; b < sizeof(nouts) / sizeof(nouts[0]); b++)
				for (size_t c = 0; c < sizeof(sizes) / sizeof(sizes[0]); c++)
					for (int al = ALIAS_NONE; al <= ALIAS_LAST; al++)
						for (size_t off = 0; off <= 1; off++)
							check_sum(t, nins[a], nouts[b], sizes[c],
								  (enum alias)al, off);
		/* large: many blocks and a tail; the common shapes only */
		size_t big = ((size_t)1 << 20) + 3;
		check_sum(t, 2, 1, big, ALIAS_IN0, 0);
		check_sum(t, 2, 1, big, ALIAS_IN1, 1);
		check_sum(t, 2, 1, big, ALIAS_NONE, 1);
		check_sum(t, 3, 2, big, ALIAS_EVERY, 1);
		check_sum(t, 1, 2, big, ALIAS_NONE, 0);
	}
}

Test(reduce, sum_f32, .timeout = 120)
{
	sum_matrix(KV_FLOAT32);
}

Test(reduce, sum_f64, .timeout = 120)
{
	sum_matrix(KV_FLOAT64);
}

Test(reduce, sum_f16, .timeout = 120)
{
	sum_matrix(KV_FLOAT16);
}

Test(reduce, sum_bf16, .timeout = 120)
{
	sum_matrix(KV_BFLOAT16);
}

Test(reduce, sum_i32, .timeout = 120)
{
	sum_matrix(KV_INT32);
}

Test(reduce, sum_i64, .timeout = 120)
{
	sum_matrix(KV_INT64);
}

/* ------------------------------------------------------------ hand-computed cases */

/* Sums columns: vals[k * n + i] is input k, element i; want[i] the bits, on every variant. */
static void check_bits(kv_dtype t, int nin, size_t n, const void *vals, const void *want)
{
	size_t es = esize(t);
	int best = reduce_cpu_isa_limit(REDUCE_ISA_AVX512);

	for (int lvl = REDUCE_ISA_PORTABLE; lvl <= best; lvl++) {
		reduce_cpu_isa_limit(lvl);
		/* out of place, in place, and through the blocked path (two outputs) */
		for (int mode = 0; mode < 3; mode++) {
			const void *ins[REDUCE_MAX_INPUTS];
			void *copies[REDUCE_MAX_INPUTS];
			for (int k = 0; k < nin; k++) {
				copies[k] = malloc(n * es);
				memcpy(copies[k], (const char *)vals + k * n * es, n * es);
				ins[k] = copies[k];
			}
			void *o0 = malloc(n * es), *o1 = malloc(n * es);
			void *outs[2] = {mode == 1 ? copies[0] : o0, o1};
			cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, t, outs, mode == 2 ? 2 : 1, ins,
						nin, n),
				     0);
			for (int j = 0; j < (mode == 2 ? 2 : 1); j++)
				for (size_t i = 0; i < n; i++) {
					uint64_t got = load_bits(t, outs[j], i);
					uint64_t w = load_bits(t, want, i);
					bool ok = bits_isnan(t, w) ? bits_isnan(t, got) : got == w;
					cr_assert(ok,
						  "%s [%s] mode %d out %d [%zu]: %#llx, want %#llx",
						  dtype_names[t], reduce_cpu_isa_name(lvl), mode, j,
						  i, (unsigned long long)got,
						  (unsigned long long)w);
				}
			for (int k = 0; k < nin; k++)
				free(copies[k]);
			free(o0);
			free(o1);
		}
	}
}

Test(reduce, int_wraparound)
{
	int32_t a32[2][4] = {{INT32_MAX, INT32_MIN, -1, INT32_MAX}, {1, -1, 1, INT32_MAX}};
	int32_t w32[4] = {INT32_MIN, INT32_MAX, 0, -2};
	check_bits(KV_INT32, 2, 4, a32, w32);

	int64_t a64[2][3] = {{INT64_MAX, INT64_MIN, -5}, {1, -1, 5}};
	int64_t w64[3] = {INT64_MIN, INT64_MAX, 0};
	check_bits(KV_INT64, 2, 3, a64, w64);

	/* 16 * (2^31 - 1) = 2^35 - 16, which is -16 modulo 2^32 */
	int32_t many[16][1];
	for (int k = 0; k < 16; k++)
		many[k][0] = INT32_MAX;
	int32_t wm[1] = {-16};
	check_bits(KV_INT32, 16, 1, many, wm);
}

Test(reduce, f16_specials)
{
	/* each column: a + b -> want */
	uint16_t in[2][12] = {
		{0x7bff, 0x7bff, 0x7bff, 0xfbff, 0x7e00, 0x7c00, 0x7c00, 0x0001, 0x03ff, 0x8001,
		 0x3c00, 0x3c01},
		{0x7bff, 0x4c00, 0x4800, 0xfbff, 0x3c00, 0xfc00, 0x3c00, 0x0001, 0x0001, 0x0001,
		 0x1000, 0x1000},
	};
	uint16_t want[12] = {
		0x7c00, /* 65504 + 65504: overflow to inf */
		0x7c00, /* 65504 + 16 = 65520: a tie, to even (the odd 65504 rounds up to inf) */
		0x7bff, /* 65504 + 8 = 65512: below the tie */
		0xfc00, /* -inf */
		0x7e00, /* NaN + 1 = NaN */
		0x7e00, /* inf + -inf = NaN */
		0x7c00, /* inf + 1 */
		0x0002, /* subnormals: 2^-24 + 2^-24 */
		0x0400, /* largest subnormal + 2^-24 = smallest normal */
		0x0000, /* -2^-24 + 2^-24 = +0 */
		0x3c00, /* 1 + 2^-11: a tie, to even (1.0) */
		0x3c02, /* (1 + 2^-10) + 2^-11: a tie, to even (1 + 2^-9) */
	};
	check_bits(KV_FLOAT16, 2, 12, in, want);
}

Test(reduce, f16_double_rounding)
{
	/* see the top of this file: f32 sum, then one rounding, gives 0x3c00, not 0x3c01 */
	uint16_t in[3][1] = {{0x3c00}, {0x1000}, {0x0001}};
	uint16_t want[1] = {0x3c00};
	check_bits(KV_FLOAT16, 3, 1, in, want);
	cr_assert_eq(ref_to_half(1.0 + ldexp(1, -11) + ldexp(1, -24)), 0x3c01);
}

Test(reduce, bf16_specials)
{
	uint16_t in[2][8] = {
		{0x7f7f, 0x7fc0, 0x7f80, 0x0001, 0x3f80, 0x3f81, 0x8000, 0xff7f},
		{0x7f7f, 0x3f80, 0xff80, 0x0001, 0x3b80, 0x3b80, 0x8000, 0xff7f},
	};
	uint16_t want[8] = {
		0x7f80, /* max + max: inf */
		0x7fc0, /* NaN + 1 */
		0x7fc0, /* inf + -inf: NaN */
		0x0002, /* subnormals add exactly */
		0x3f80, /* 1 + 2^-8: a tie, to even (1.0) */
		0x3f82, /* (1 + 2^-7) + 2^-8: a tie, to even (1 + 2^-6) */
		0x8000, /* -0 + -0 = -0 */
		0xff80, /* -max + -max: -inf */
	};
	check_bits(KV_BFLOAT16, 2, 8, in, want);
}

Test(reduce, f32_f64_specials)
{
	float fin[2][5] = {{NAN, INFINITY, -0.0f, FLT_MAX, 1.0f},
			   {1.0f, -INFINITY, -0.0f, FLT_MAX, 0x1p-24f}};
	float fw[5] = {NAN, NAN, -0.0f, INFINITY, 1.0f}; /* 1 + 2^-24: a tie, to even */
	check_bits(KV_FLOAT32, 2, 5, fin, fw);

	double din[2][4] = {{NAN, 0.0, DBL_MAX, 1.0}, {1.0, -0.0, DBL_MAX, 0x1p-53}};
	double dw[4] = {NAN, 0.0, INFINITY, 1.0};
	check_bits(KV_FLOAT64, 2, 4, din, dw);
}

Test(reduce, same_input_twice)
{
	/* ins[0] == ins[1] == out: x + x in place */
	float x[5] = {1, 2, -3, 0.5f, 1e30f};
	const void *ins[2] = {x, x};
	void *outs[1] = {x};
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, ins, 2, 5), 0);
	cr_assert(x[0] == 2 && x[1] == 4 && x[2] == -6 && x[3] == 1 && x[4] == 2e30f);

	/* two outputs that are the same buffer */
	float a[3] = {1, 2, 3}, b[3] = {10, 20, 30}, o[3] = {0};
	const void *ins2[2] = {a, b};
	void *outs2[2] = {o, o};
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs2, 2, ins2, 2, 3), 0);
	cr_assert(o[0] == 11 && o[1] == 22 && o[2] == 33);
}

/* ------------------------------------------------------------ conversions */

Test(reduce, half_to_float_bits)
{
	static const struct {
		uint16_t h;
		uint32_t f;
	} cases[] = {
		{0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x3c00, 0x3f800000},
		{0xc000, 0xc0000000}, {0x7bff, 0x477fe000}, {0x0001, 0x33800000},
		{0x03ff, 0x387fc000}, {0x0400, 0x38800000}, {0x7c00, 0x7f800000},
		{0xfc00, 0xff800000}, {0x7e00, 0x7fc00000}, {0x7c01, 0x7fc02000},
		{0x3555, 0x3eaaa000}, {0x8200, 0xb8000000},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		cr_assert_eq(fbits(half_to_float(cases[i].h)), cases[i].f, "%#x -> %#x, want %#x",
			     cases[i].h, fbits(half_to_float(cases[i].h)), cases[i].f);
}

Test(reduce, float_to_half_bits)
{
	static const struct {
		uint32_t f;
		uint16_t h;
	} cases[] = {
		{0x3f800000, 0x3c00}, /* 1 */
		{0x80000000, 0x8000}, /* -0 */
		{0x477fe000, 0x7bff}, /* 65504 */
		{0x477fefff, 0x7bff}, /* just below 65520 */
		{0x477ff000, 0x7c00}, /* 65520: a tie, to even = inf */
		{0x501502f9, 0x7c00}, /* 1e10 */
		{0x7f800000, 0x7c00}, {0xff800000, 0xfc00}, {0x7fc00000, 0x7e00}, /* NaN */
		{0xffc00001, 0xfe00}, /* NaN, low payload bits lost */
		{0x7f802000, 0x7e01}, /* signalling NaN: made quiet, payload kept */
		{0x33800000, 0x0001}, /* 2^-24 */
		{0x33000000, 0x0000}, /* 2^-25: a tie, to even = 0 */
		{0x33000001, 0x0001}, /* just above 2^-25 */
		{0x33c00000, 0x0002}, /* 1.5 * 2^-24: a tie, to even */
		{0x34200000, 0x0002}, /* 2.5 * 2^-24: a tie, to even */
		{0x387fc000, 0x03ff}, /* largest subnormal */
		{0x387fe000, 0x0400}, /* 1023.5 * 2^-24: a tie, to even = smallest normal */
		{0x38800000, 0x0400}, /* 2^-14 */
		{0x3f801000, 0x3c00}, /* 1 + 2^-11: a tie, to even */
		{0x3f803000, 0x3c02}, /* 1 + 3 * 2^-11: a tie, to even */
		{0x3f801001, 0x3c01}, /* just above the tie */
		{0x00000001, 0x0000}, /* f32 subnormal */
		{0x3eaaaaab, 0x3555}, /* 1/3 */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		cr_assert_eq(float_to_half(bitsf(cases[i].f)), cases[i].h, "%#x -> %#x, want %#x",
			     cases[i].f, float_to_half(bitsf(cases[i].f)), cases[i].h);
}

Test(reduce, bf16_bits)
{
	static const struct {
		uint32_t f;
		uint16_t b;
	} cases[] = {
		{0x3f800000, 0x3f80}, {0x3f808000, 0x3f80}, /* 1 + 2^-8: a tie, to even */
		{0x3f818000, 0x3f82},			    /* a tie, to even (up) */
		{0x3f808001, 0x3f81}, {0x7f7fffff, 0x7f80}, /* FLT_MAX rounds to inf */
		{0x7f7f7fff, 0x7f7f}, {0x7fc00000, 0x7fc0}, {0x7f800001, 0x7fc0}, /* sNaN: quiet */
		{0xff810000, 0xffc1}, /* sNaN, payload kept */
		{0x00008000, 0x0000}, /* subnormal tie, to even */
		{0x00018000, 0x0002}, {0x80000000, 0x8000}, {0xff800000, 0xff80},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		cr_assert_eq(float_to_bf16(bitsf(cases[i].f)), cases[i].b, "%#x -> %#x, want %#x",
			     cases[i].f, float_to_bf16(bitsf(cases[i].f)), cases[i].b);
	cr_assert_eq(fbits(bf16_to_float(0x3f80)), 0x3f800000);
	cr_assert_eq(fbits(bf16_to_float(0x0001)), 0x00010000);
	cr_assert_eq(fbits(bf16_to_float(0xff80)), 0xff800000);
}

Test(reduce, conversions_all_halves)
{
	for (uint32_t h = 0; h < 65536; h++) {
		double r = ref_half((uint16_t)h);
		float f = half_to_float((uint16_t)h);
		if (isnan(r)) {
			cr_assert(isnan(f), "half %#x", h);
			cr_assert_eq(float_to_half(f) & 0x7e00, 0x7e00, "half %#x", h);
		} else {
			cr_assert((double)f == r && !signbit(f) == !signbit(r), "half %#x", h);
			cr_assert_eq(float_to_half(f), h, "half %#x round trip", h);
		}
		r = ref_bf16((uint16_t)h);
		f = bf16_to_float((uint16_t)h);
		if (isnan(r)) {
			cr_assert(isnan(f), "bf16 %#x", h);
		} else {
			cr_assert((double)f == r && !signbit(f) == !signbit(r), "bf16 %#x", h);
			cr_assert_eq(float_to_bf16(f), h, "bf16 %#x round trip", h);
		}
	}
}

Test(reduce, conversions_float_sweep, .timeout = 60)
{
	/* every 251st float bit pattern, and every float near the f16 range */
	for (uint64_t u = 0; u < ((uint64_t)1 << 32); u += 251) {
		float f = bitsf((uint32_t)u);
		if (isnan(f))
			continue;
		cr_assert_eq(float_to_half(f), ref_to_half(f), "%#x", (unsigned)u);
		cr_assert_eq(float_to_bf16(f), ref_to_bf16(f), "%#x", (unsigned)u);
	}
	for (uint32_t u = 0x33000000u - 16; u <= 0x38800010u; u++)
		cr_assert_eq(float_to_half(bitsf(u)), ref_to_half(bitsf(u)), "%#x", u);
	for (uint32_t u = 0x477f0000u; u <= 0x47800010u; u++)
		cr_assert_eq(float_to_half(bitsf(u)), ref_to_half(bitsf(u)), "%#x", u);
}

/* ------------------------------------------------------------ copy */

Test(reduce, copy)
{
	for (int d = 0; d < NDTYPES; d++) {
		kv_dtype t = all_dtypes[d];
		size_t es = esize(t);
		for (size_t c = 0; c < sizeof(sizes) / sizeof(sizes[0]); c++) {
			size_t n = sizes[c];
			for (int nout = 1; nout <= 3; nout++) {
				struct buf in = buf_new(t, n, 1), out[3];
				void *outs[3];
				/* random bits: NaN payloads included, copied as they are */
				for (size_t i = 0; i < n * es; i++)
					((unsigned char *)in.p)[i] = (unsigned char)rnd();
				for (int j = 0; j < nout; j++) {
					out[j] = buf_new(t, n, (size_t)j & 1);
					outs[j] = out[j].p;
				}
				if (nout == 3)
					outs[2] = in.p; /* a copy onto itself */
				cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, t, outs, nout, in.p, n),
					     0);
				for (int j = 0; j < nout; j++)
					cr_assert(memcmp(outs[j], in.p, n * es) == 0,
						  "%s n=%zu out %d", dtype_names[t], n, j);
				/* a sum of one input is a copy too, bit for bit */
				const void *ins[1] = {in.p};
				memset(out[0].p, 0, n * es);
				cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, t, outs, 1, ins, 1, n),
					     0);
				cr_assert(memcmp(outs[0], in.p, n * es) == 0);
				free(in.base);
				for (int j = 0; j < nout; j++)
					free(out[j].base);
			}
		}
	}
}

/* ------------------------------------------------------------ arguments */

Test(reduce, invalid_arguments)
{
	float a[8] = {0}, b[8] = {0}, o[8] = {0};
	const void *ins[17] = {a, b};
	void *outs[17] = {o};
	const void *null_in[2] = {a, NULL};
	void *null_out[1] = {NULL};

	for (int k = 2; k < 17; k++)
		ins[k] = a;
	for (int k = 1; k < 17; k++)
		outs[k] = o;

	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, ins, 0, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, ins, 17, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, ins, -1, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 0, ins, 2, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 17, ins, 2, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, (kv_dtype)6, outs, 1, ins, 2, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, (kv_dtype)-1, outs, 1, ins, 2, 8),
		     KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(-2, NULL, KV_FLOAT32, outs, 1, ins, 2, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, NULL, 1, ins, 2, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, NULL, 2, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, null_in, 2, 8),
		     KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, null_out, 1, ins, 2, 8),
		     KV_ERR_INVALID);
	/* not aligned to the element */
	const void *odd_in[2] = {(const char *)a + 1, b};
	void *odd_out[1] = {(char *)o + 2};
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, odd_in, 2, 4),
		     KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, odd_out, 1, ins, 2, 4),
		     KV_ERR_INVALID);
	/* an output partially over an input */
	void *over[1] = {a + 1};
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, over, 1, ins, 2, 4), KV_ERR_INVALID);
	/* n * size past the address space */
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT64, outs, 1, ins, 2, SIZE_MAX / 4),
		     KV_ERR_INVALID);
	/* the same rules for copy */
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, KV_FLOAT32, outs, 0, a, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, KV_FLOAT32, outs, 17, a, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, (kv_dtype)9, outs, 1, a, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, KV_FLOAT32, outs, 1, NULL, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, KV_FLOAT32, null_out, 1, a, 8), KV_ERR_INVALID);
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, KV_FLOAT32, over, 1, a, 4), KV_ERR_INVALID);
	/* nothing was written */
	for (int i = 0; i < 8; i++)
		cr_assert(a[i] == 0 && b[i] == 0 && o[i] == 0);

	/* the largest counts are fine */
	for (int i = 0; i < 8; i++)
		a[i] = 1;
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT32, outs, 16, ins + 1, 16, 8), 0);
	cr_assert(o[7] == 15); /* b + 15 * a */
}

Test(reduce, zero_length)
{
	void *null_out[2] = {NULL, NULL};
	const void *null_in[2] = {NULL, NULL};

	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT16, null_out, 2, null_in, 2, 0), 0);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_INT64, NULL, 1, NULL, 1, 0), 0);
	cr_assert_eq(reduce_copy(REDUCE_CPU, NULL, KV_FLOAT32, null_out, 1, NULL, 0), 0);
	/* counts and dtype are still checked */
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, KV_FLOAT16, null_out, 2, null_in, 0, 0),
		     KV_ERR_INVALID);
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, (kv_dtype)7, null_out, 1, null_in, 1, 0),
		     KV_ERR_INVALID);
}

Test(reduce, device_without_gpu)
{
	float a[4] = {1, 2, 3, 4};
	const void *ins[2] = {a, a};
	void *outs[1] = {a};

	if (gpu_count() > 0)
		cr_skip_test("a GPU is present: %s", gpu_status());
	cr_assert_eq(reduce_sum(0, NULL, KV_FLOAT32, outs, 1, ins, 2, 4), KV_ERR_UNSUPPORTED);
	cr_assert_eq(reduce_sum(0, NULL, KV_FLOAT32, outs, 1, ins, 2, 0), KV_ERR_UNSUPPORTED);
	cr_assert_eq(reduce_copy(3, NULL, KV_FLOAT32, outs, 1, a, 4), KV_ERR_UNSUPPORTED);
	cr_assert(a[0] == 1 && a[3] == 4);
	cr_assert_null(gpu_alloc(0, 64));
	cr_assert_neq(gpu_sync(0), 0);
}

Test(reduce, gpu_status_string)
{
	const char *s = gpu_status();
	cr_assert_not_null(s);
	cr_assert(strlen(s) > 0);
	cr_assert(gpu_count() >= 0);
	if (gpu_count() == 0)
		cr_assert(strncmp(s, "no GPU (", 8) == 0, "%s", s);
#ifndef KV_HAVE_CUDA
	cr_assert_str_eq(s, "no GPU (built without CUDA)");
#endif
}

Test(reduce, isa_levels)
{
	int best = reduce_cpu_isa_limit(REDUCE_ISA_AVX512);

	cr_assert(best >= REDUCE_ISA_PORTABLE && best <= REDUCE_ISA_AVX512);
	cr_assert_eq(reduce_cpu_isa(), best);
	cr_assert_eq(reduce_cpu_isa_limit(-5), REDUCE_ISA_PORTABLE);
	cr_assert_eq(reduce_cpu_isa(), REDUCE_ISA_PORTABLE);
	cr_assert_eq(reduce_cpu_isa_limit(100), best);
	cr_assert_str_eq(reduce_cpu_isa_name(REDUCE_ISA_PORTABLE), "portable");
	cr_assert_str_eq(reduce_cpu_isa_name(42), "unknown");
}

/* ------------------------------------------------------------ GPU */

/* One case on device 0: every pointer shifted by its own offset (in elements). */
static void gpu_case(kv_dtype t, int nin, int nout, size_t n, const size_t *offs, bool inplace)
{
	size_t es = esize(t), bytes = n * es;
	void *host[REDUCE_MAX_INPUTS], *dbase[2 * REDUCE_MAX_INPUTS];
	const void *ins[REDUCE_MAX_INPUTS];
	void *outs[REDUCE_MAX_INPUTS];
	void *got = malloc(bytes ? bytes : 1);
	int nb = 0;

	for (int k = 0; k < nin; k++) {
		size_t off = offs[k % 3];
		host[k] = malloc(bytes ? bytes : 1);
		fill(t, host[k], n);
		dbase[nb] = gpu_alloc(0, (n + off) * es);
		cr_assert_not_null(dbase[nb]);
		ins[k] = (char *)dbase[nb++] + off * es;
		cr_assert_eq(gpu_memcpy_h2d(0, (void *)ins[k], host[k], bytes), 0);
	}
	for (int j = 0; j < nout; j++) {
		if (inplace && j == 0) {
			outs[0] = (void *)ins[0];
			continue;
		}
		size_t off = offs[(j + 1) % 3];
		dbase[nb] = gpu_alloc(0, (n + off) * es);
		cr_assert_not_null(dbase[nb]);
		outs[j] = (char *)dbase[nb++] + off * es;
		cr_assert_eq(gpu_memset(0, outs[j], 0xa5, bytes), 0);
	}
	cr_assert_eq(reduce_sum(0, NULL, t, outs, nout, ins, nin, n), 0);
	cr_assert_eq(gpu_sync(0), 0);
	for (int j = 0; j < nout; j++) {
		cr_assert_eq(gpu_memcpy_d2h(0, got, outs[j], bytes), 0);
		for (size_t i = 0; i < n; i++) {
			bool nan;
			uint64_t want = expect(t, (const void *const *)host, nin, i, &nan);
			uint64_t g = load_bits(t, got, i);
			bool ok = nin == 1 ? g == load_bits(t, host[0], i)
				  : nan	   ? bits_isnan(t, g)
					   : g == want;
			if (!ok)
				cr_assert_fail(
					"gpu %s nin=%d nout=%d n=%zu offs=%zu,%zu,%zu%s: out %d "
					"[%zu] = %#llx, want %#llx",
					dtype_names[t], nin, nout, n, offs[0], offs[1], offs[2],
					inplace ? " in place" : "", j, i, (unsigned long long)g,
					(unsigned long long)want);
		}
	}
	for (int k = 0; k < nin; k++)
		free(host[k]);
	for (int b = 0; b < nb; b++)
		gpu_free(0, dbase[b]);
	free(got);
}

Test(reduce_gpu, sum_matches_cpu_reference, .timeout = 300)
{
	static const size_t gsizes[] = {1, 7, 17, 1000, 4099, 65536 + 5};
	static const int gnins[] = {1, 2, 3, 8, 16};
	/* alike (vector body, with a head when shifted) and unlike (all scalar) */
	static const size_t offsets[][3] = {{0, 0, 0}, {1, 1, 1}, {0, 1, 3}};
	const size_t big = ((size_t)1 << 22) + 3; /* many grid strides */

	if (gpu_count() == 0)
		cr_skip_test("%s", gpu_status());
	for (int d = 0; d < NDTYPES; d++) {
		kv_dtype t = all_dtypes[d];
		for (size_t a = 0; a < sizeof(gnins) / sizeof(gnins[0]); a++)
			for (int nout = 1; nout <= 3; nout += 2)
				for (size_t c = 0; c < sizeof(gsizes) / sizeof(gsizes[0]); c++)
					for (size_t o = 0; o < 3; o++)
						for (int inplace = 0; inplace <= 1; inplace++)
							gpu_case(t, gnins[a], nout, gsizes[c],
								 offsets[o], inplace);
		gpu_case(t, 2, 1, big, offsets[0], true);
		gpu_case(t, 2, 1, big, offsets[1], false);
		gpu_case(t, 16, 2, big, offsets[2], false);
	}
}

Test(reduce_gpu, copy_and_zero_length)
{
	if (gpu_count() == 0)
		cr_skip_test("%s", gpu_status());
	size_t n = 1000;
	uint16_t *h = malloc(n * 2), *back = malloc(n * 2);
	for (size_t i = 0; i < n; i++)
		h[i] = (uint16_t)rnd(); /* NaN payloads too: a copy keeps them */
	void *src = gpu_alloc(0, n * 2), *dst = gpu_alloc(0, n * 2 + 2);
	cr_assert(src && dst);
	cr_assert_eq(gpu_memcpy_h2d(0, src, h, n * 2), 0);
	void *outs[1] = {(char *)dst + 2};
	cr_assert_eq(reduce_copy(0, NULL, KV_FLOAT16, outs, 1, src, n), 0);
	cr_assert_eq(reduce_copy(0, NULL, KV_FLOAT16, outs, 1, src, 0), 0);
	cr_assert_eq(gpu_sync(0), 0);
	cr_assert_eq(gpu_memcpy_d2h(0, back, outs[0], n * 2), 0);
	cr_assert(memcmp(back, h, n * 2) == 0);
	/* a device that does not exist */
	cr_assert_eq(reduce_copy(gpu_count() + 7, NULL, KV_FLOAT16, outs, 1, src, n),
		     KV_ERR_INVALID);
	gpu_free(0, src);
	gpu_free(0, dst);
	free(h);
	free(back);
}
