/* SPDX-License-Identifier: MIT */
/*
 * reduce.c - elementwise sums of N buffers on the host, and the door to the
 * CUDA kernels.
 *
 * The workload is streaming: each input is read once, each output written
 * once, and for anything larger than the caches the memory bus sets the
 * pace.  So the shape of the loops matters more than the arithmetic:
 *  - nin == 2, nout == 1 (the daemon's pairwise and in-place reduce) is one
 *    tight loop over the three (or two) buffers;
 *  - anything else walks the buffers in blocks of BLOCK_BYTES: the block's
 *    sum builds up in a stack buffer that stays in L1, every input is read
 *    once per block, then the block goes to every output.  An output that is
 *    also an input is written only after every input of that block was read,
 *    which is what makes "out == ins[k]" safe for any k.
 *  - f16 and bf16 widen to f32, add in f32 (left to right), and round once.
 *
 * Each kernel exists in three variants: portable C that gcc vectorises for
 * the x86-64 baseline (SSE2) or whatever the target is, the same C compiled
 * for AVX2 and for AVX-512F, and for f16 and bf16 intrinsics (F16C for f16,
 * integer lanes for bf16) at those two widths.  The variant is picked once,
 * from what the CPU and OS support, through a table of function pointers,
 * so a binary built for any x86-64 runs everywhere.  Every variant gives the
 * same bits: the adds happen in the same order, and the conversions round
 * to nearest even (the f32 adds follow MXCSR, which kvd leaves at its
 * default).
 *
 * The inner loops run over CHUNK elements at a time: a trip count the
 * vectoriser knows, so gcc's -O2 cost model ("very cheap") vectorises them
 * without runtime alias checks (restrict covers aliasing) or a versioned
 * loop.  The scalar tail handles what is left.
 */
#include "reduce.h"

#include <stdbool.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define REDUCE_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define REDUCE_X86 0
#endif

#ifdef KV_HAVE_CUDA
#include "reduce_cuda.h"
#endif

#define CHUNK	      64   /* elements per inner loop */
#define BLOCK_BYTES   8192 /* the stack accumulator of the blocked path */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------ conversions */

static inline uint32_t f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float f32_from_bits(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

/* Integer only: the result does not depend on MXCSR (FTZ/DAZ, rounding). */
float half_to_float(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exp = (h >> 10) & 0x1fu;
	uint32_t man = h & 0x3ffu;

	if (exp == 0x1f) /* inf, or NaN made quiet (as VCVTPH2PS does) */
		return f32_from_bits(sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0));
	if (exp != 0)
		return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
	if (man == 0)
		return f32_from_bits(sign);
	/* subnormal: man * 2^-24; normalise so the leading 1 sits at bit 10 */
	int shift = __builtin_clz(man) - 21;
	return f32_from_bits(sign | ((uint32_t)(113 - shift) << 23) |
			     ((man << shift) & 0x3ffu) << 13);
}

uint16_t float_to_half(float f)
{
	uint32_t x = f32_bits(f);
	uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);

	x &= 0x7fffffffu;
	if (x > 0x7f800000u) /* NaN: quiet, top of the payload kept (as VCVTPS2PH does) */
		return sign | 0x7e00u | ((x >> 13) & 0x3ffu);
	if (x >= 0x477ff000u) /* >= 65520 (halfway past 65504) and inf: inf */
		return sign | 0x7c00u;
	if (x >= 0x38800000u) { /* >= 2^-14: normal half; a carry may bump the exponent */
		uint32_t r = x - (112u << 23);
		r += 0xfffu + ((r >> 13) & 1u);
		return sign | (uint16_t)(r >> 13);
	}
	if (x <= 0x33000000u) /* <= 2^-25: rounds to zero (2^-25 is a tie, to even) */
		return sign;
	/* subnormal half: round (mantissa * 2^(exp - 126)) to an integer */
	uint32_t exp = x >> 23;
	uint32_t man = (x & 0x7fffffu) | 0x800000u;
	uint32_t shift = 126 - exp; /* 14 .. 24 */
	uint32_t q = man >> shift;
	uint32_t rem = man & ((1u << shift) - 1);
	uint32_t half = 1u << (shift - 1);
	if (rem > half || (rem == half && (q & 1u)))
		q++; /* 0x400 is the smallest normal: still right */
	return sign | (uint16_t)q;
}

ALWAYS_INLINE float bf16_widen(uint16_t h)
{
	return f32_from_bits((uint32_t)h << 16);
}

ALWAYS_INLINE uint16_t bf16_narrow(float f)
{
	uint32_t x = f32_bits(f);
	uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16; /* overflow carries into inf */
	uint32_t q = (x >> 16) | 0x40u;			     /* NaN: keep it, quiet */
	return (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? q : r);
}

float bf16_to_float(uint16_t h)
{
	return bf16_widen(h);
}

uint16_t float_to_bf16(float f)
{
	return bf16_narrow(f);
}

/*
 * The f16 conversions again, without branches, for the portable kernels to
 * vectorise (on CPUs without F16C, and on other architectures).  Same bits
 * as half_to_float/float_to_half (the tests run both), except that the
 * subnormal case of float_to_half rounds with an f32 add: like every f32
 * sum in this file it assumes the default rounding mode.
 */
ALWAYS_INLINE float f16_widen(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t em = h & 0x7fffu;
	uint32_t normal = (em << 13) + (112u << 23);
	uint32_t special = (em << 13) | 0x7f800000u | (em > 0x7c00u) << 22;
	uint32_t sub = f32_bits((float)(int32_t)em * 0x1p-24f); /* exact: em < 1024 there */
	uint32_t is_special = -(uint32_t)(em >= 0x7c00u), is_sub = -(uint32_t)(em < 0x400u);
	uint32_t r = (special & is_special) | (normal & ~is_special);
	return f32_from_bits(sign | (sub & is_sub) | (r & ~is_sub));
}

ALWAYS_INLINE uint16_t f16_narrow(float f)
{
	uint32_t x = f32_bits(f);
	uint32_t sign = (x >> 16) & 0x8000u;
	uint32_t a = x & 0x7fffffffu;
	uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
	/* below 2^-14: 0.5 + a puts a's multiple of 2^-24, rounded to even, in the low bits */
	uint32_t sub = f32_bits(f32_from_bits(a) + 0.5f) - 0x3f000000u;
	uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
	uint32_t is_sub = -(uint32_t)(a < 0x38800000u), is_inf = -(uint32_t)(a >= 0x477ff000u);
	uint32_t is_nan = -(uint32_t)(a > 0x7f800000u);
	uint32_t r = (sub & is_sub) | (normal & ~is_sub);
	r = (0x7c00u & is_inf) | (r & ~is_inf);
	r = (nan & is_nan) | (r & ~is_nan);
	return (uint16_t)(sign | r);
}

/* bf: a constant after inlining, so each wrapper keeps one of the two */
ALWAYS_INLINE float h_widen(uint16_t h, bool bf)
{
	return bf ? bf16_widen(h) : f16_widen(h);
}

ALWAYS_INLINE uint16_t h_narrow(float f, bool bf)
{
	return bf ? bf16_narrow(f) : f16_narrow(f);
}

/* ------------------------------------------------------------ loop bodies */

/*
 * Each body is inlined into one wrapper per variant; the wrapper's target
 * attribute decides the instruction set the body is vectorised for.
 *   add(o, a, b):  o = a + b, o disjoint from a and b
 *   acc(io, b):    io = io + b, io disjoint from b
 * and for f16 and bf16 also the three steps of the blocked path:
 *   widen2(acc, a, b):  acc = a + b in f32
 *   widen_acc(acc, x):  acc += x
 *   narrow(o, acc):     o = acc rounded
 */
#define PLAIN_BODIES(sfx, T)                                                               \
	ALWAYS_INLINE void add_##sfx##_body(T *restrict o, const T *restrict a,            \
					    const T *restrict b, size_t n)                 \
	{                                                                                  \
		size_t i = 0;                                                              \
		for (; n - i >= CHUNK; i += CHUNK)                                         \
			for (size_t k = 0; k < CHUNK; k++)                                 \
				o[i + k] = a[i + k] + b[i + k];                            \
		for (; i < n; i++)                                                         \
			o[i] = a[i] + b[i];                                                \
	}                                                                                  \
	ALWAYS_INLINE void acc_##sfx##_body(T *restrict io, const T *restrict b, size_t n) \
	{                                                                                  \
		size_t i = 0;                                                              \
		for (; n - i >= CHUNK; i += CHUNK)                                         \
			for (size_t k = 0; k < CHUNK; k++)                                 \
				io[i + k] += b[i + k];                                     \
		for (; i < n; i++)                                                         \
			io[i] += b[i];                                                     \
	}

/* Integers add as uint32_t/uint64_t: wrapping is defined, and two's complement makes it
 * the same bits a signed wrap would give. */
PLAIN_BODIES(f32, float)
PLAIN_BODIES(f64, double)
PLAIN_BODIES(u32, uint32_t)
PLAIN_BODIES(u64, uint64_t)

ALWAYS_INLINE void add_h_body(uint16_t *restrict o, const uint16_t *restrict a,
			      const uint16_t *restrict b, size_t n, bool bf)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			o[i + k] = h_narrow(h_widen(a[i + k], bf) + h_widen(b[i + k], bf), bf);
	for (; i < n; i++)
		o[i] = h_narrow(h_widen(a[i], bf) + h_widen(b[i], bf), bf);
}

ALWAYS_INLINE void acc_h_body(uint16_t *restrict io, const uint16_t *restrict b, size_t n, bool bf)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			io[i + k] = h_narrow(h_widen(io[i + k], bf) + h_widen(b[i + k], bf), bf);
	for (; i < n; i++)
		io[i] = h_narrow(h_widen(io[i], bf) + h_widen(b[i], bf), bf);
}

ALWAYS_INLINE void widen2_h_body(float *restrict acc, const uint16_t *restrict a,
				 const uint16_t *restrict b, size_t n, bool bf)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			acc[i + k] = h_widen(a[i + k], bf) + h_widen(b[i + k], bf);
	for (; i < n; i++)
		acc[i] = h_widen(a[i], bf) + h_widen(b[i], bf);
}

ALWAYS_INLINE void widen_acc_h_body(float *restrict acc, const uint16_t *restrict x, size_t n,
				    bool bf)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			acc[i + k] += h_widen(x[i + k], bf);
	for (; i < n; i++)
		acc[i] += h_widen(x[i], bf);
}

ALWAYS_INLINE void narrow_h_body(uint16_t *restrict o, const float *restrict acc, size_t n, bool bf)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			o[i + k] = h_narrow(acc[i + k], bf);
	for (; i < n; i++)
		o[i] = h_narrow(acc[i], bf);
}

/* ------------------------------------------------------------ variants */

typedef void (*add_fn)(void *o, const void *a, const void *b, size_t n);
typedef void (*acc_fn)(void *io, const void *b, size_t n);
typedef void (*widen2_fn)(float *acc, const void *a, const void *b, size_t n);
typedef void (*widen_acc_fn)(float *acc, const void *x, size_t n);
typedef void (*narrow_fn)(void *o, const float *acc, size_t n);

/* One variant's kernels.  add/acc are indexed by kv_dtype; the widen/narrow
 * ones (the blocked path of f16 and bf16) by HALF_F16/HALF_BF16. */
struct cpu_kernels {
	add_fn add[6];
	acc_fn acc[6];
	widen2_fn widen2[2];
	widen_acc_fn widen_acc[2];
	narrow_fn narrow[2];
};
enum { HALF_F16 = 0, HALF_BF16 = 1 };

#define PLAIN_WRAPPERS(lvl, ATTR, sfx)                                                      \
	ATTR static void add_##sfx##_##lvl(void *o, const void *a, const void *b, size_t n) \
	{                                                                                   \
		add_##sfx##_body(o, a, b, n);                                               \
	}                                                                                   \
	ATTR static void acc_##sfx##_##lvl(void *io, const void *b, size_t n)               \
	{                                                                                   \
		acc_##sfx##_body(io, b, n);                                                 \
	}

#define PLAIN_VARIANT(lvl, ATTR)       \
	PLAIN_WRAPPERS(lvl, ATTR, f32) \
	PLAIN_WRAPPERS(lvl, ATTR, f64) \
	PLAIN_WRAPPERS(lvl, ATTR, u32) \
	PLAIN_WRAPPERS(lvl, ATTR, u64)

#define HALF_WRAPPERS(lvl, ATTR, sfx, bf)                                                         \
	ATTR static void add_##sfx##_##lvl(void *o, const void *a, const void *b, size_t n)       \
	{                                                                                         \
		add_h_body(o, a, b, n, bf);                                                       \
	}                                                                                         \
	ATTR static void acc_##sfx##_##lvl(void *io, const void *b, size_t n)                     \
	{                                                                                         \
		acc_h_body(io, b, n, bf);                                                         \
	}                                                                                         \
	ATTR static void widen2_##sfx##_##lvl(float *acc, const void *a, const void *b, size_t n) \
	{                                                                                         \
		widen2_h_body(acc, a, b, n, bf);                                                  \
	}                                                                                         \
	ATTR static void widen_acc_##sfx##_##lvl(float *acc, const void *x, size_t n)             \
	{                                                                                         \
		widen_acc_h_body(acc, x, n, bf);                                                  \
	}                                                                                         \
	ATTR static void narrow_##sfx##_##lvl(void *o, const float *acc, size_t n)                \
	{                                                                                         \
		narrow_h_body(o, acc, n, bf);                                                     \
	}

PLAIN_VARIANT(portable, )
HALF_WRAPPERS(portable, , f16, false)
HALF_WRAPPERS(portable, , bf16, true)

#if REDUCE_X86
#define TARGET_AVX2   __attribute__((target("avx2,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx2,f16c")))

PLAIN_VARIANT(avx2, TARGET_AVX2)
PLAIN_VARIANT(avx512, TARGET_AVX512)

/*
 * f16 and bf16 with intrinsics: F16C converts f16 (rounding to nearest even
 * by the immediate, not by MXCSR); bf16 is the bit arithmetic of
 * bf16_narrow on 8 or 16 lanes.  Tails go through a zero-padded copy so
 * that they take the same instructions as the body.  o may equal a or b:
 * each step loads before it stores, element for element.
 */
#define RN _MM_FROUND_TO_NEAREST_INT

TARGET_AVX2 ALWAYS_INLINE __m256 ld8(const uint16_t *p, bool bf)
{
	__m128i v = _mm_loadu_si128((const __m128i *)p);
	if (bf)
		return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
	return _mm256_cvtph_ps(v);
}

TARGET_AVX2 ALWAYS_INLINE void st8(uint16_t *p, __m256 v, bool bf)
{
	if (!bf) {
		_mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, RN));
		return;
	}
	__m256i u = _mm256_castps_si256(v);
	__m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
	__m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
	__m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
	__m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
	r = _mm256_srli_epi32(_mm256_blendv_epi8(r, q, nan), 16);
	/* every lane fits 16 bits: the unsigned saturation never bites */
	_mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r),
							_mm256_extracti128_si256(r, 1)));
}

TARGET_AVX512 ALWAYS_INLINE __m512 ld16(const uint16_t *p, bool bf)
{
	__m256i v = _mm256_loadu_si256((const __m256i *)p);
	if (bf)
		return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
	return _mm512_cvtph_ps(v);
}

TARGET_AVX512 ALWAYS_INLINE void st16(uint16_t *p, __m512 v, bool bf)
{
	if (!bf) {
		_mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, RN));
		return;
	}
	__m512i u = _mm512_castps_si512(v);
	__m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
	__m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
	__mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
	r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
	_mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

/*
 * The same five kernels for both widths.  W: lanes; VEC/LD/ST/ADD/LDF/STF:
 * the vector type and its operations.
 */
#define HALF_SIMD(lvl, ATTR, W, VEC, LD, ST, ADD, LDF, STF)                                      \
	ATTR ALWAYS_INLINE void add_h_##lvl(uint16_t *o, const uint16_t *a, const uint16_t *b,   \
					    size_t n, bool bf)                                   \
	{                                                                                        \
		size_t i = 0;                                                                    \
		for (; n - i >= 2 * W; i += 2 * W) {                                             \
			VEC x0 = LD(a + i, bf), x1 = LD(a + i + W, bf);                          \
			VEC y0 = LD(b + i, bf), y1 = LD(b + i + W, bf);                          \
			ST(o + i, ADD(x0, y0), bf);                                              \
			ST(o + i + W, ADD(x1, y1), bf);                                          \
		}                                                                                \
		for (; i < n; i += W) {                                                          \
			uint16_t ta[W] = {0}, tb[W] = {0}, to[W];                                \
			size_t m = n - i < W ? n - i : W;                                        \
			memcpy(ta, a + i, m * 2);                                                \
			memcpy(tb, b + i, m * 2);                                                \
			ST(to, ADD(LD(ta, bf), LD(tb, bf)), bf);                                 \
			memcpy(o + i, to, m * 2);                                                \
		}                                                                                \
	}                                                                                        \
	ATTR ALWAYS_INLINE void widen2_h_##lvl(float *acc, const uint16_t *a, const uint16_t *b, \
					       size_t n, bool bf)                                \
	{                                                                                        \
		size_t i = 0;                                                                    \
		for (; n - i >= W; i += W)                                                       \
			STF(acc + i, ADD(LD(a + i, bf), LD(b + i, bf)));                         \
		if (i < n) {                                                                     \
			uint16_t ta[W] = {0}, tb[W] = {0};                                       \
			float to[W];                                                             \
			memcpy(ta, a + i, (n - i) * 2);                                          \
			memcpy(tb, b + i, (n - i) * 2);                                          \
			STF(to, ADD(LD(ta, bf), LD(tb, bf)));                                    \
			memcpy(acc + i, to, (n - i) * 4);                                        \
		}                                                                                \
	}                                                                                        \
	ATTR ALWAYS_INLINE void widen_acc_h_##lvl(float *acc, const uint16_t *x, size_t n,       \
						  bool bf)                                       \
	{                                                                                        \
		size_t i = 0;                                                                    \
		for (; n - i >= W; i += W)                                                       \
			STF(acc + i, ADD(LDF(acc + i), LD(x + i, bf)));                          \
		if (i < n) {                                                                     \
			uint16_t tx[W] = {0};                                                    \
			float ta[W] = {0};                                                       \
			memcpy(tx, x + i, (n - i) * 2);                                          \
			memcpy(ta, acc + i, (n - i) * 4);                                        \
			STF(ta, ADD(LDF(ta), LD(tx, bf)));                                       \
			memcpy(acc + i, ta, (n - i) * 4);                                        \
		}                                                                                \
	}                                                                                        \
	ATTR ALWAYS_INLINE void narrow_h_##lvl(uint16_t *o, const float *acc, size_t n, bool bf) \
	{                                                                                        \
		size_t i = 0;                                                                    \
		for (; n - i >= W; i += W)                                                       \
			ST(o + i, LDF(acc + i), bf);                                             \
		if (i < n) {                                                                     \
			float ta[W] = {0};                                                       \
			uint16_t to[W];                                                          \
			memcpy(ta, acc + i, (n - i) * 4);                                        \
			ST(to, LDF(ta), bf);                                                     \
			memcpy(o + i, to, (n - i) * 2);                                          \
		}                                                                                \
	}

HALF_SIMD(avx2, TARGET_AVX2, 8, __m256, ld8, st8, _mm256_add_ps, _mm256_loadu_ps, _mm256_storeu_ps)
HALF_SIMD(avx512, TARGET_AVX512, 16, __m512, ld16, st16, _mm512_add_ps, _mm512_loadu_ps,
	  _mm512_storeu_ps)

#define HALF_SIMD_WRAPPERS(lvl, ATTR, sfx, bf)                                                    \
	ATTR static void add_##sfx##_##lvl(void *o, const void *a, const void *b, size_t n)       \
	{                                                                                         \
		add_h_##lvl(o, a, b, n, bf);                                                      \
	}                                                                                         \
	ATTR static void acc_##sfx##_##lvl(void *io, const void *b, size_t n)                     \
	{                                                                                         \
		add_h_##lvl(io, io, b, n, bf);                                                    \
	}                                                                                         \
	ATTR static void widen2_##sfx##_##lvl(float *acc, const void *a, const void *b, size_t n) \
	{                                                                                         \
		widen2_h_##lvl(acc, a, b, n, bf);                                                 \
	}                                                                                         \
	ATTR static void widen_acc_##sfx##_##lvl(float *acc, const void *x, size_t n)             \
	{                                                                                         \
		widen_acc_h_##lvl(acc, x, n, bf);                                                 \
	}                                                                                         \
	ATTR static void narrow_##sfx##_##lvl(void *o, const float *acc, size_t n)                \
	{                                                                                         \
		narrow_h_##lvl(o, acc, n, bf);                                                    \
	}

HALF_SIMD_WRAPPERS(avx2, TARGET_AVX2, f16, false)
HALF_SIMD_WRAPPERS(avx2, TARGET_AVX2, bf16, true)
HALF_SIMD_WRAPPERS(avx512, TARGET_AVX512, f16, false)
HALF_SIMD_WRAPPERS(avx512, TARGET_AVX512, bf16, true)
#endif /* REDUCE_X86 */

#define KERNEL_TABLE(lvl)                                                             \
	{                                                                             \
		.add = {[KV_FLOAT32] = add_f32_##lvl, [KV_FLOAT64] = add_f64_##lvl,   \
			[KV_FLOAT16] = add_f16_##lvl, [KV_BFLOAT16] = add_bf16_##lvl, \
			[KV_INT32] = add_u32_##lvl,   [KV_INT64] = add_u64_##lvl},    \
		.acc = {[KV_FLOAT32] = acc_f32_##lvl, [KV_FLOAT64] = acc_f64_##lvl,   \
			[KV_FLOAT16] = acc_f16_##lvl, [KV_BFLOAT16] = acc_bf16_##lvl, \
			[KV_INT32] = acc_u32_##lvl,   [KV_INT64] = acc_u64_##lvl},    \
		.widen2 = {widen2_f16_##lvl, widen2_bf16_##lvl},                      \
		.widen_acc = {widen_acc_f16_##lvl, widen_acc_bf16_##lvl},             \
		.narrow = {narrow_f16_##lvl, narrow_bf16_##lvl},                      \
	}

static const struct cpu_kernels cpu_kernels[] = {
	[REDUCE_ISA_PORTABLE] = KERNEL_TABLE(portable),
#if REDUCE_X86
	[REDUCE_ISA_AVX2] = KERNEL_TABLE(avx2),
	[REDUCE_ISA_AVX512] = KERNEL_TABLE(avx512),
#endif
};

/* ------------------------------------------------------------ dispatch */

static int isa_best(void)
{
#if REDUCE_X86
	unsigned int eax, ebx, ecx, edx;
	bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);

	/* __builtin_cpu_supports checks XCR0 too: the OS saves the wide registers */
	__builtin_cpu_init();
	if (!f16c || !__builtin_cpu_supports("avx2"))
		return REDUCE_ISA_PORTABLE;
	if (__builtin_cpu_supports("avx512f"))
		return REDUCE_ISA_AVX512;
	return REDUCE_ISA_AVX2;
#else
	return REDUCE_ISA_PORTABLE;
#endif
}

/* -1 until first use.  Relaxed is enough: every thread that races here
 * computes the same value, and the tables are constant. */
static int isa_level = -1;

int reduce_cpu_isa(void)
{
	int l = __atomic_load_n(&isa_level, __ATOMIC_RELAXED);
	if (l < 0) {
		l = isa_best();
		__atomic_store_n(&isa_level, l, __ATOMIC_RELAXED);
	}
	return l;
}

int reduce_cpu_isa_limit(int max_level)
{
	int l = isa_best();
	if (max_level < l)
		l = max_level < REDUCE_ISA_PORTABLE ? REDUCE_ISA_PORTABLE : max_level;
	__atomic_store_n(&isa_level, l, __ATOMIC_RELAXED);
	return l;
}

const char *reduce_cpu_isa_name(int level)
{
	switch (level) {
	case REDUCE_ISA_PORTABLE:
		return "portable";
	case REDUCE_ISA_AVX2:
		return "avx2+f16c";
	case REDUCE_ISA_AVX512:
		return "avx512f";
	}
	return "unknown";
}

static size_t dtype_size(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT32:
	case KV_INT32:
		return 4;
	case KV_FLOAT64:
	case KV_INT64:
		return 8;
	case KV_FLOAT16:
	case KV_BFLOAT16:
		return 2;
	}
	return 0;
}

static bool ptr_ok(const void *p, size_t es, size_t bytes)
{
	uintptr_t u = (uintptr_t)p;
	return p && (u & (es - 1)) == 0 && u <= UINTPTR_MAX - bytes;
}

/* Partial overlap only: the same start is the in-place case, and allowed. */
static bool overlaps(const void *a, const void *b, size_t bytes)
{
	uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
	return x != y && x < y + bytes && y < x + bytes;
}

static int check_args(int device, kv_dtype t, void *const *outs, int nout, const void *const *ins,
		      int nin, size_t n)
{
	size_t es = dtype_size(t);

	if (device < REDUCE_CPU || es == 0 || nin < 1 || nin > REDUCE_MAX_INPUTS || nout < 1 ||
	    nout > REDUCE_MAX_INPUTS)
		return KV_ERR_INVALID;
	if (n == 0)
		return 0;
	if (n > PTRDIFF_MAX / es || !outs || !ins)
		return KV_ERR_INVALID;
	size_t bytes = n * es;
	for (int k = 0; k < nin; k++)
		if (!ptr_ok(ins[k], es, bytes))
			return KV_ERR_INVALID;
	for (int j = 0; j < nout; j++) {
		if (!ptr_ok(outs[j], es, bytes))
			return KV_ERR_INVALID;
		for (int k = 0; k < nin; k++)
			if (overlaps(outs[j], ins[k], bytes))
				return KV_ERR_INVALID;
	}
	return 0;
}

static void copy_cpu(void *const *outs, int nout, const void *in, size_t bytes)
{
	for (int j = 0; j < nout; j++)
		if (outs[j] != in)
			memcpy(outs[j], in, bytes);
}

/* nin >= 2: the general case, one L1-sized block at a time. */
static void sum_blocked(const struct cpu_kernels *kk, kv_dtype t, size_t es, void *const *outs,
			int nout, const void *const *ins, int nin, size_t n)
{
	_Alignas(64) union {
		float f32[BLOCK_BYTES / 4];
		double f64[BLOCK_BYTES / 8];
		uint32_t u32[BLOCK_BYTES / 4];
		uint64_t u64[BLOCK_BYTES / 8];
	} buf;
	bool half = t == KV_FLOAT16 || t == KV_BFLOAT16;
	int h = t == KV_FLOAT16 ? HALF_F16 : HALF_BF16;
	size_t blk = half ? BLOCK_BYTES / sizeof(float) : BLOCK_BYTES / es;
	/* one output that is not the last input: the last add goes straight to it */
	bool fuse = !half && nin > 2 && nout == 1 && outs[0] != ins[nin - 1];
	int last = fuse ? nin - 1 : nin;

	for (size_t i = 0; i < n; i += blk) {
		size_t len = n - i < blk ? n - i : blk;
		size_t off = i * es;
#define AT(p) ((const char *)(p) + off)
		if (half) {
			kk->widen2[h](buf.f32, AT(ins[0]), AT(ins[1]), len);
			for (int k = 2; k < nin; k++)
				kk->widen_acc[h](buf.f32, AT(ins[k]), len);
			for (int j = 0; j < nout; j++)
				kk->narrow[h]((char *)outs[j] + off, buf.f32, len);
		} else {
			kk->add[t](&buf, AT(ins[0]), AT(ins[1]), len);
			for (int k = 2; k < last; k++)
				kk->acc[t](&buf, AT(ins[k]), len);
			if (fuse)
				kk->add[t]((char *)outs[0] + off, &buf, AT(ins[last]), len);
			else
				for (int j = 0; j < nout; j++)
					memcpy((char *)outs[j] + off, &buf, len * es);
		}
#undef AT
	}
}

static void sum_cpu(kv_dtype t, void *const *outs, int nout, const void *const *ins, int nin,
		    size_t n)
{
	const struct cpu_kernels *kk = &cpu_kernels[reduce_cpu_isa()];
	size_t es = dtype_size(t);

	if (nin == 1) {
		copy_cpu(outs, nout, ins[0], n * es);
		return;
	}
	if (nin == 2 && nout == 1) {
		void *o = outs[0];
		const void *a = ins[0], *b = ins[1];
		/* a + b and b + a are the same bits (but for which NaN survives) */
		if (o == a && o != b) {
			kk->acc[t](o, b, n);
			return;
		}
		if (o == b && o != a) {
			kk->acc[t](o, a, n);
			return;
		}
		if (o != a && o != b) {
			kk->add[t](o, a, b, n);
			return;
		}
	}
	sum_blocked(kk, t, es, outs, nout, ins, nin, n);
}

int reduce_sum(int device, void *stream, kv_dtype t, void *const *outs, int nout,
	       const void *const *ins, int nin, size_t n)
{
	int rc = check_args(device, t, outs, nout, ins, nin, n);

	if (rc)
		return rc;
	if (device != REDUCE_CPU) {
#ifdef KV_HAVE_CUDA
		return reduce_sum_cuda(device, stream, t, outs, nout, ins, nin, n);
#else
		return KV_ERR_UNSUPPORTED;
#endif
	}
	if (n)
		sum_cpu(t, outs, nout, ins, nin, n);
	return 0;
}

int reduce_copy(int device, void *stream, kv_dtype t, void *const *outs, int nout, const void *in,
		size_t n)
{
	const void *ins[1] = {in};
	int rc = check_args(device, t, outs, nout, ins, 1, n);

	if (rc)
		return rc;
	if (device != REDUCE_CPU) {
#ifdef KV_HAVE_CUDA
		return reduce_copy_cuda(device, stream, t, outs, nout, in, n);
#else
		return KV_ERR_UNSUPPORTED;
#endif
	}
	if (n)
		copy_cpu(outs, nout, in, n * dtype_size(t));
	return 0;
}

/* ------------------------------------------------------------ f32 conversions (optim.c) */

/*
 * Whole buffers between f32 and f32/f16/bf16, for the optimizer's blocks
 * (kernels/optim.c): widen the summed gradient once, round the new weights
 * once.  Same variants and the same bits as the sums above; the widening
 * is exact, so which variant runs never shows.
 */
ALWAYS_INLINE void widen_h_body(float *restrict o, const uint16_t *restrict x, size_t n, bool bf)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			o[i + k] = h_widen(x[i + k], bf);
	for (; i < n; i++)
		o[i] = h_widen(x[i], bf);
}

typedef void (*widen_fn)(float *o, const uint16_t *x, size_t n);

static void widen_f16_portable(float *o, const uint16_t *x, size_t n)
{
	widen_h_body(o, x, n, false);
}

static void widen_bf16_portable(float *o, const uint16_t *x, size_t n)
{
	widen_h_body(o, x, n, true);
}

#if REDUCE_X86
#define WIDEN_SIMD(lvl, ATTR, W, LD, STF)                                                     \
	ATTR ALWAYS_INLINE void widen_h_##lvl(float *o, const uint16_t *x, size_t n, bool bf) \
	{                                                                                     \
		size_t i = 0;                                                                 \
		for (; n - i >= W; i += W)                                                    \
			STF(o + i, LD(x + i, bf));                                            \
		if (i < n) {                                                                  \
			uint16_t tx[W] = {0};                                                 \
			float to[W];                                                          \
			memcpy(tx, x + i, (n - i) * 2);                                       \
			STF(to, LD(tx, bf));                                                  \
			memcpy(o + i, to, (n - i) * 4);                                       \
		}                                                                             \
	}                                                                                     \
	ATTR static void widen_f16_##lvl(float *o, const uint16_t *x, size_t n)               \
	{                                                                                     \
		widen_h_##lvl(o, x, n, false);                                                \
	}                                                                                     \
	ATTR static void widen_bf16_##lvl(float *o, const uint16_t *x, size_t n)              \
	{                                                                                     \
		widen_h_##lvl(o, x, n, true);                                                 \
	}

WIDEN_SIMD(avx2, TARGET_AVX2, 8, ld8, _mm256_storeu_ps)
WIDEN_SIMD(avx512, TARGET_AVX512, 16, ld16, _mm512_storeu_ps)
#endif

static const widen_fn widen_kernels[][2] = {
	[REDUCE_ISA_PORTABLE] = {widen_f16_portable, widen_bf16_portable},
#if REDUCE_X86
	[REDUCE_ISA_AVX2] = {widen_f16_avx2, widen_bf16_avx2},
	[REDUCE_ISA_AVX512] = {widen_f16_avx512, widen_bf16_avx512},
#endif
};

void reduce_to_f32(float *dst, const void *src, kv_dtype t, size_t n)
{
	if (t == KV_FLOAT32)
		memcpy(dst, src, n * sizeof(float));
	else
		widen_kernels[reduce_cpu_isa()][t == KV_BFLOAT16 ? HALF_BF16 : HALF_F16](dst, src,
											 n);
}

void reduce_from_f32(void *dst, kv_dtype t, const float *src, size_t n)
{
	if (t == KV_FLOAT32)
		memcpy(dst, src, n * sizeof(float));
	else
		cpu_kernels[reduce_cpu_isa()].narrow[t == KV_BFLOAT16 ? HALF_BF16 : HALF_F16](
			dst, src, n);
}
