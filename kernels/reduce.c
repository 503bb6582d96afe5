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
 * Each kernel exists in up to three variants: portable C that gcc vectorises
 * for the x86-64 baseline (SSE2), the same C compiled for AVX2 (+F16C
 * intrinsics for f16), and for AVX-512F.  The variants are picked once, from
 * what the CPU and OS support, through a table of function pointers, so a
 * binary built for any x86-64 runs everywhere.  Every variant is bit-exact
 * with the others: the adds happen in the same order, and the conversions
 * round to nearest even whatever the MXCSR rounding mode says.
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

#define CHUNK 64           /* elements per inner loop */
#define BLOCK_BYTES 8192   /* the stack accumulator of the blocked path */
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
	return f32_from_bits(sign | ((uint32_t)(113 - shift) << 23) | ((man << shift) & 0x3ffu) << 13);
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
	uint32_t q = (x >> 16) | 0x40u;                     /* NaN: keep it, quiet */
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

/* ------------------------------------------------------------ loop bodies */

/*
 * Each body is inlined into one wrapper per variant; the wrapper's target
 * attribute decides the instruction set the body is vectorised for.
 *   add(o, a, b):  o = a + b, o disjoint from a and b
 *   acc(io, b):    io = io + b, io disjoint from b
 */
#define PLAIN_BODIES(sfx, T)                                                                       \
	ALWAYS_INLINE void add_##sfx##_body(T *restrict o, const T *restrict a,                    \
					    const T *restrict b, size_t n)                         \
	{                                                                                          \
		size_t i = 0;                                                                      \
		for (; n - i >= CHUNK; i += CHUNK)                                                 \
			for (size_t k = 0; k < CHUNK; k++)                                         \
				o[i + k] = a[i + k] + b[i + k];                                    \
		for (; i < n; i++)                                                                 \
			o[i] = a[i] + b[i];                                                        \
	}                                                                                          \
	ALWAYS_INLINE void acc_##sfx##_body(T *restrict io, const T *restrict b, size_t n)         \
	{                                                                                          \
		size_t i = 0;                                                                      \
		for (; n - i >= CHUNK; i += CHUNK)                                                 \
			for (size_t k = 0; k < CHUNK; k++)                                         \
				io[i + k] += b[i + k];                                             \
		for (; i < n; i++)                                                                 \
			io[i] += b[i];                                                             \
	}

/* Integers add as uint32_t/uint64_t: wrapping is defined, and two's complement makes it
 * the same bits a signed wrap would give. */
PLAIN_BODIES(f32, float)
PLAIN_BODIES(f64, double)
PLAIN_BODIES(u32, uint32_t)
PLAIN_BODIES(u64, uint64_t)

ALWAYS_INLINE void add_bf16_body(uint16_t *restrict o, const uint16_t *restrict a,
				 const uint16_t *restrict b, size_t n)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			o[i + k] = bf16_narrow(bf16_widen(a[i + k]) + bf16_widen(b[i + k]));
	for (; i < n; i++)
		o[i] = bf16_narrow(bf16_widen(a[i]) + bf16_widen(b[i]));
}

ALWAYS_INLINE void acc_bf16_body(uint16_t *restrict io, const uint16_t *restrict b, size_t n)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			io[i + k] = bf16_narrow(bf16_widen(io[i + k]) + bf16_widen(b[i + k]));
	for (; i < n; i++)
		io[i] = bf16_narrow(bf16_widen(io[i]) + bf16_widen(b[i]));
}

ALWAYS_INLINE void widen2_bf16_body(float *restrict acc, const uint16_t *restrict a,
				    const uint16_t *restrict b, size_t n)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			acc[i + k] = bf16_widen(a[i + k]) + bf16_widen(b[i + k]);
	for (; i < n; i++)
		acc[i] = bf16_widen(a[i]) + bf16_widen(b[i]);
}

ALWAYS_INLINE void widen_acc_bf16_body(float *restrict acc, const uint16_t *restrict x, size_t n)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			acc[i + k] += bf16_widen(x[i + k]);
	for (; i < n; i++)
		acc[i] += bf16_widen(x[i]);
}

ALWAYS_INLINE void narrow_bf16_body(uint16_t *restrict o, const float *restrict acc, size_t n)
{
	size_t i = 0;
	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			o[i + k] = bf16_narrow(acc[i + k]);
	for (; i < n; i++)
		o[i] = bf16_narrow(acc[i]);
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

#define GENERIC_WRAPPERS(lvl, ATTR)                                                                \
	ATTR static void add_f32_##lvl(void *o, const void *a, const void *b, size_t n)            \
	{                                                                                          \
		add_f32_body(o, a, b, n);                                                          \
	}                                                                                          \
	ATTR static void add_f64_##lvl(void *o, const void *a, const void *b, size_t n)            \
	{                                                                                          \
		add_f64_body(o, a, b, n);                                                          \
	}                                                                                          \
	ATTR static void add_u32_##lvl(void *o, const void *a, const void *b, size_t n)            \
	{                                                                                          \
		add_u32_body(o, a, b, n);                                                          \
	}                                                                                          \
	ATTR static void add_u64_##lvl(void *o, const void *a, const void *b, size_t n)            \
	{                                                                                          \
		add_u64_body(o, a, b, n);                                                          \
	}                                                                                          \
	ATTR static void add_bf16_##lvl(void *o, const void *a, const void *b, size_t n)           \
	{                                                                                          \
		add_bf16_body(o, a, b, n);                                                         \
	}                                                                                          \
	ATTR static void acc_f32_##lvl(void *io, const void *b, size_t n)                          \
	{                                                                                          \
		acc_f32_body(io, b, n);                                                            \
	}                                                                                          \
	ATTR static void acc_f64_##lvl(void *io, const void *b, size_t n)                          \
	{                                                                                          \
		acc_f64_body(io, b, n);                                                            \
	}                                                                                          \
	ATTR static void acc_u32_##lvl(void *io, const void *b, size_t n)                          \
	{                                                                                          \
		acc_u32_body(io, b, n);                                                            \
	}                                                                                          \
	ATTR static void acc_u64_##lvl(void *io, const void *b, size_t n)                          \
	{                                                                                          \
		acc_u64_body(io, b, n);                                                            \
	}                                                                                          \
	ATTR static void acc_bf16_##lvl(void *io, const void *b, size_t n)                         \
	{                                                                                          \
		acc_bf16_body(io, b, n);                                                           \
	}                                                                                          \
	ATTR static void widen2_bf16_##lvl(float *acc, const void *a, const void *b, size_t n)     \
	{                                                                                          \
		widen2_bf16_body(acc, a, b, n);                                                    \
	}                                                                                          \
	ATTR static void widen_acc_bf16_##lvl(float *acc, const void *x, size_t n)                 \
	{                                                                                          \
		widen_acc_bf16_body(acc, x, n);                                                    \
	}                                                                                          \
	ATTR static void narrow_bf16_##lvl(void *o, const float *acc, size_t n)                    \
	{                                                                                          \
		narrow_bf16_body(o, acc, n);                                                       \
	}

GENERIC_WRAPPERS(portable, )

/* f16 without F16C: the integer conversions, one element at a time. */
static void add_f16_portable(void *o_, const void *a_, const void *b_, size_t n)
{
	uint16_t *o = o_;
	const uint16_t *a = a_, *b = b_;
	for (size_t i = 0; i < n; i++)
		o[i] = float_to_half(half_to_float(a[i]) + half_to_float(b[i]));
}

static void acc_f16_portable(void *io, const void *b, size_t n)
{
	add_f16_portable(io, io, b, n);
}

static void widen2_f16_portable(float *acc, const void *a_, const void *b_, size_t n)
{
	const uint16_t *a = a_, *b = b_;
	for (size_t i = 0; i < n; i++)
		acc[i] = half_to_float(a[i]) + half_to_float(b[i]);
}

static void widen_acc_f16_portable(float *acc, const void *x_, size_t n)
{
	const uint16_t *x = x_;
	for (size_t i = 0; i < n; i++)
		acc[i] += half_to_float(x[i]);
}

static void narrow_f16_portable(void *o_, const float *acc, size_t n)
{
	uint16_t *o = o_;
	for (size_t i = 0; i < n; i++)
		o[i] = float_to_half(acc[i]);
}

#if REDUCE_X86
#define TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx2,f16c")))

GENERIC_WRAPPERS(avx2, TARGET_AVX2)
GENERIC_WRAPPERS(avx512, TARGET_AVX512)

/*
 * f16 with F16C.  The conversions round to nearest even by the immediate,
 * not by MXCSR.  Tails go through a zero-padded copy so that they take the
 * same instructions as the body.  o may equal a or b: each step loads
 * before it stores, element for element.
 */
#define RN _MM_FROUND_TO_NEAREST_INT

TARGET_AVX2 static inline __m256 ld8h(const uint16_t *p)
{
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

TARGET_AVX2 static inline void st8h(uint16_t *p, __m256 v)
{
	_mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, RN));
}

TARGET_AVX2 static void add_f16_avx2(void *o_, const void *a_, const void *b_, size_t n)
{
	uint16_t *o = o_;
	const uint16_t *a = a_, *b = b_;
	size_t i = 0;

	for (; n - i >= 16; i += 16) {
		__m256 x0 = ld8h(a + i), x1 = ld8h(a + i + 8);
		__m256 y0 = ld8h(b + i), y1 = ld8h(b + i + 8);
		st8h(o + i, _mm256_add_ps(x0, y0));
		st8h(o + i + 8, _mm256_add_ps(x1, y1));
	}
	for (; i < n; i += 8) {
		uint16_t ta[8] = {0}, tb[8] = {0}, to[8];
		size_t m = n - i < 8 ? n - i : 8;
		memcpy(ta, a + i, m * 2);
		memcpy(tb, b + i, m * 2);
		st8h(to, _mm256_add_ps(ld8h(ta), ld8h(tb)));
		memcpy(o + i, to, m * 2);
	}
}

TARGET_AVX2 static void acc_f16_avx2(void *io, const void *b, size_t n)
{
	add_f16_avx2(io, io, b, n);
}

TARGET_AVX2 static void widen2_f16_avx2(float *acc, const void *a_, const void *b_, size_t n)
{
	const uint16_t *a = a_, *b = b_;
	size_t i = 0;

	for (; n - i >= 8; i += 8)
		_mm256_storeu_ps(acc + i, _mm256_add_ps(ld8h(a + i), ld8h(b + i)));
	if (i < n) {
		uint16_t ta[8] = {0}, tb[8] = {0};
		float to[8];
		memcpy(ta, a + i, (n - i) * 2);
		memcpy(tb, b + i, (n - i) * 2);
		_mm256_storeu_ps(to, _mm256_add_ps(ld8h(ta), ld8h(tb)));
		memcpy(acc + i, to, (n - i) * 4);
	}
}

TARGET_AVX2 static void widen_acc_f16_avx2(float *acc, const void *x_, size_t n)
{
	const uint16_t *x = x_;
	size_t i = 0;

	for (; n - i >= 8; i += 8)
		_mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), ld8h(x + i)));
	if (i < n) {
		uint16_t tx[8] = {0};
		float ta[8] = {0};
		memcpy(tx, x + i, (n - i) * 2);
		memcpy(ta, acc + i, (n - i) * 4);
		_mm256_storeu_ps(ta, _mm256_add_ps(_mm256_loadu_ps(ta), ld8h(tx)));
		memcpy(acc + i, ta, (n - i) * 4);
	}
}

TARGET_AVX2 static void narrow_f16_avx2(void *o_, const float *acc, size_t n)
{
	uint16_t *o = o_;
	size_t i = 0;

	for (; n - i >= 8; i += 8)
		st8h(o + i, _mm256_loadu_ps(acc + i));
	if (i < n) {
		float ta[8] = {0};
		uint16_t to[8];
		memcpy(ta, acc + i, (n - i) * 4);
		st8h(to, _mm256_loadu_ps(ta));
		memcpy(o + i, to, (n - i) * 2);
	}
}

TARGET_AVX512 static inline __m512 ld16h(const uint16_t *p)
{
	return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

TARGET_AVX512 static inline void st16h(uint16_t *p, __m512 v)
{
	_mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, RN));
}

TARGET_AVX512 static void add_f16_avx512(void *o_, const void *a_, const void *b_, size_t n)
{
	uint16_t *o = o_;
	const uint16_t *a = a_, *b = b_;
	size_t i = 0;

	for (; n - i >= 32; i += 32) {
		__m512 x0 = ld16h(a + i), x1 = ld16h(a + i + 16);
		__m512 y0 = ld16h(b + i), y1 = ld16h(b + i + 16);
		st16h(o + i, _mm512_add_ps(x0, y0));
		st16h(o + i + 16, _mm512_add_ps(x1, y1));
	}
	for (; i < n; i += 16) {
		uint16_t ta[16] = {0}, tb[16] = {0}, to[16];
		size_t m = n - i < 16 ? n - i : 16;
		memcpy(ta, a + i, m * 2);
		memcpy(tb, b + i, m * 2);
		st16h(to, _mm512_add_ps(ld16h(ta), ld16h(tb)));
		memcpy(o + i, to, m * 2);
	}
}

TARGET_AVX512 static void acc_f16_avx512(void *io, const void *b, size_t n)
{
	add_f16_avx512(io, io, b, n);
}

TARGET_AVX512 static void widen2_f16_avx512(float *acc, const void *a_, const void *b_, size_t n)
{
	const uint16_t *a = a_, *b = b_;
	size_t i = 0;

	for (; n - i >= 16; i += 16)
		_mm512_storeu_ps(acc + i, _mm512_add_ps(ld16h(a + i), ld16h(b + i)));
	if (i < n) {
		uint16_t ta[16] = {0}, tb[16] = {0};
		float to[16];
		memcpy(ta, a + i, (n - i) * 2);
		memcpy(tb, b + i, (n - i) * 2);
		_mm512_storeu_ps(to, _mm512_add_ps(ld16h(ta), ld16h(tb)));
		memcpy(acc + i, to, (n - i) * 4);
	}
}

TARGET_AVX512 static void widen_acc_f16_avx512(float *acc, const void *x_, size_t n)
{
	const uint16_t *x = x_;
	size_t i = 0;

	for (; n - i >= 16; i += 16)
		_mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), ld16h(x + i)));
	if (i < n) {
		uint16_t tx[16] = {0};
		float ta[16] = {0};
		memcpy(tx, x + i, (n - i) * 2);
		memcpy(ta, acc + i, (n - i) * 4);
		_mm512_storeu_ps(ta, _mm512_add_ps(_mm512_loadu_ps(ta), ld16h(tx)));
		memcpy(acc + i, ta, (n - i) * 4);
	}
}

TARGET_AVX512 static void narrow_f16_avx512(void *o_, const float *acc, size_t n)
{
	uint16_t *o = o_;
	size_t i = 0;

	for (; n - i >= 16; i += 16)
		st16h(o + i, _mm512_loadu_ps(acc + i));
	if (i < n) {
		float ta[16] = {0};
		uint16_t to[16];
		memcpy(ta, acc + i, (n - i) * 4);
		st16h(to, _mm512_loadu_ps(ta));
		memcpy(o + i, to, (n - i) * 2);
	}
}
#endif /* REDUCE_X86 */

#define KERNEL_TABLE(lvl)                                                                          \
	{                                                                                          \
		.add = {[KV_FLOAT32] = add_f32_##lvl,                                              \
			[KV_FLOAT64] = add_f64_##lvl,                                              \
			[KV_FLOAT16] = add_f16_##lvl,                                              \
			[KV_BFLOAT16] = add_bf16_##lvl,                                            \
			[KV_INT32] = add_u32_##lvl,                                                \
			[KV_INT64] = add_u64_##lvl},                                               \
		.acc = {[KV_FLOAT32] = acc_f32_##lvl,                                              \
			[KV_FLOAT64] = acc_f64_##lvl,                                              \
			[KV_FLOAT16] = acc_f16_##lvl,                                              \
			[KV_BFLOAT16] = acc_bf16_##lvl,                                            \
			[KV_INT32] = acc_u32_##lvl,                                                \
			[KV_INT64] = acc_u64_##lvl},                                               \
		.widen2 = {widen2_f16_##lvl, widen2_bf16_##lvl},                                   \
		.widen_acc = {widen_acc_f16_##lvl, widen_acc_bf16_##lvl},                          \
		.narrow = {narrow_f16_##lvl, narrow_bf16_##lvl},                                   \
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

static int check_args(int device, kv_dtype t, void *const *outs, int nout,
		      const void *const *ins, int nin, size_t n)
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
			for (int k = 2; k < nin; k++)
				kk->acc[t](&buf, AT(ins[k]), len);
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

int reduce_copy(int device, void *stream, kv_dtype t, void *const *outs, int nout,
		const void *in, size_t n)
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
