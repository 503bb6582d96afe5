/* SPDX-License-Identifier: MIT */
/*
 * optim.c - optimizer updates on the host (MXNet 1.9's SGD, SGD with
 * momentum, NAG, Adam and AdamW; formulas in optim.h), and the door to the
 * CUDA kernels.
 *
 * The workload is streaming, like reduce.c's: per element a few f32 loads
 * (weight, gradient, one or two states), a dozen flops, and the same arrays
 * stored back, so the memory bus sets the pace for anything past the
 * caches.  The common case is one pass: an f32 gradient and no rounded copy
 * of the weights.  An f16/bf16 gradient, or a rounded copy (out), goes in
 * blocks of BLOCK elements that stay in L1: the block's gradient is widened
 * once into a stack buffer, the block is updated, and the new weights are
 * rounded from L1 into out (the conversions of reduce.c, same bits).
 *
 * Each rule is a plain C loop over CHUNK elements that gcc vectorises, in
 * the three variants of reduce.c (portable, AVX2, AVX-512F, picked by
 * reduce_cpu_isa()).  Every variant gives the same bits, and the CUDA
 * kernels (optim_cuda.cu) give the same bits too, because:
 *  - the f32 operations are exactly those optim.h writes, in its order, and
 *    each rounds to nearest even (MXCSR at its default, no FTZ/DAZ);
 *  - no multiply-add is fused.  gcc's default for GNU C is
 *    -ffp-contract=fast, which would fuse a*b+c across statements wherever
 *    the target has FMA (the AVX-512F variant does, and so do most non-x86
 *    targets), so this file turns contraction off (the pragmas below; clang
 *    honours the standard one).  The CUDA side writes every operation as an
 *    __fmul_rn/__fadd_rn/__fsub_rn/__fdiv_rn/__fsqrt_rn intrinsic, which
 *    nvcc never contracts either;
 *  - the per-call constants (1 - beta, 1 - lr * wd, lr * wd, lr_t) are
 *    computed here once, in f32 (lr_t in double, then rounded) and handed
 *    to both sides (struct optim_coef);
 *  - clipping is two compare-and-selects, min(max(x, -c), c), through which
 *    a NaN passes (MXNet's clip does the same); no clipping is clipping to
 *    +-inf, which leaves every value, NaN included, as it is.
 * Division and sqrt are IEEE (correctly rounded) on both sides, so Adam and
 * AdamW agree bit for bit as well, although optim.h only promises 1e-6.
 *
 * sqrt: gcc 12 does not vectorise sqrtf without -fno-math-errno (the errno
 * path is a call), which neither the Makefile nor an optimize pragma can
 * give this file.  So the Adam rules compute a chunk's moments in one
 * vectorised loop, take the square roots with the variant's vector sqrt
 * instruction (SSE, AVX, AVX-512: correctly rounded, like sqrtf), and
 * update the weights in a second vectorised loop; the tail goes through a
 * zero-padded chunk.  This also keeps libm out of libkv (lr_t's power and
 * square root are done here too); only targets without SSE fall back to
 * __builtin_sqrt, whose errno path calls libm.
 */
#include "optim.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "optim_cuda.h"
#include "reduce.h"

#if defined(__x86_64__) || defined(__i386__)
#define OPTIM_X86 1
#include <immintrin.h>
#else
#define OPTIM_X86 0
#endif

/* No fused multiply-add anywhere below: see the top of the file. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define CHUNK	      64   /* elements per inner loop */
#define BLOCK	      2048 /* elements per block when widening or rounding (8 KiB of f32) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------ loop bodies */

/* min(max(x, lo), hi) as compare-and-select: a NaN x stays NaN (maxps/minps with x second). */
ALWAYS_INLINE float clip1(float x, float lo, float hi)
{
	x = x < lo ? lo : x;
	return x > hi ? hi : x;
}

/*
 * SGD, SGD with momentum, NAG (rule a constant after inlining): element i.
 * No restrict here: plain_body's covers the loop (a restrict parameter of a
 * function inlined once per element makes gcc 12 give up on the loop).
 */
ALWAYS_INLINE void plain_one(const struct optim_coef *c, int rule, float *w, const float *g,
			     float *s0, size_t i)
{
	float x = clip1(c->rescale * g[i], -c->clip, c->clip);
	float s;

	switch (rule) {
	case RULE_SGD:
		w[i] = c->decay * w[i] - c->lr * x;
		break;
	default: { /* RULE_SGD_MOM, RULE_NAG: the same momentum, lr inside it */
		float m = c->momentum * s0[i];
		x = x + c->wd * w[i];
		s = m - c->lr * x;
		s0[i] = s;
		w[i] = rule == RULE_NAG ? w[i] - m + (c->momentum + 1.0f) * s : w[i] + s;
		break;
	}
	}
}

ALWAYS_INLINE void plain_body(const struct optim_coef *cp, int rule, float *restrict w,
			      const float *restrict g, float *restrict s0, size_t n)
{
	const struct optim_coef c = *cp; /* a local: stores through w cannot change it */
	size_t i = 0;

	for (; n - i >= CHUNK; i += CHUNK)
		for (size_t k = 0; k < CHUNK; k++)
			plain_one(&c, rule, w, g, s0, i + k);
	for (; i < n; i++)
		plain_one(&c, rule, w, g, s0, i);
}

/* Adam, first half of a chunk: the moments, and num = lr_t * s0. */
ALWAYS_INLINE void adam_moments(const struct optim_coef *c, bool decoupled, const float *restrict w,
				const float *restrict g, float *restrict s0, float *restrict s1,
				float *restrict num)
{
	for (size_t k = 0; k < CHUNK; k++) {
		float x = decoupled ? clip1(c->rescale * g[k], -c->clip, c->clip)
				    : clip1(c->rescale * g[k] + c->wd * w[k], -c->clip, c->clip);
		float m = c->beta1 * s0[k] + c->one_m_beta1 * x;
		float v = c->beta2 * s1[k] + c->one_m_beta2 * x * x;
		s0[k] = m;
		s1[k] = v;
		num[k] = c->lr_t * m;
	}
}

/* Adam, second half: den holds sqrt(s1). */
ALWAYS_INLINE void adam_weights(const struct optim_coef *c, bool decoupled, float *restrict w,
				const float *restrict num, const float *restrict den)
{
	for (size_t k = 0; k < CHUNK; k++) {
		float d = num[k] / (den[k] + c->epsilon);
		w[k] = decoupled ? w[k] - d - c->lr_wd * w[k] : w[k] - d;
	}
}

/* One chunk's square roots, with the vector instruction of the variant. */
#if defined(__SSE__)
ALWAYS_INLINE void sqrt_chunk_portable(float *restrict d, const float *restrict s)
{
	for (size_t k = 0; k < CHUNK; k += 4)
		_mm_storeu_ps(d + k, _mm_sqrt_ps(_mm_loadu_ps(s + k)));
}
#else
ALWAYS_INLINE void sqrt_chunk_portable(float *restrict d, const float *restrict s)
{
	for (size_t k = 0; k < CHUNK; k++)
		d[k] = __builtin_sqrtf(s[k]);
}
#endif

/*
 * Adam and AdamW for one variant: whole chunks, then the tail through a
 * zero-padded chunk (zeros give zeros: sqrt(0) = 0, 0 / (0 + epsilon) = 0),
 * so every element takes the same instructions.
 */
#define ADAM_VARIANT(lvl, ATTR, SQRT)                                                             \
	ATTR ALWAYS_INLINE void adam_chunk_##lvl(const struct optim_coef *c, bool decoupled,      \
						 float *restrict w, const float *restrict g,      \
						 float *restrict s0, float *restrict s1)          \
	{                                                                                         \
		float num[CHUNK], den[CHUNK];                                                     \
		adam_moments(c, decoupled, w, g, s0, s1, num);                                    \
		SQRT(den, s1);                                                                    \
		adam_weights(c, decoupled, w, num, den);                                          \
	}                                                                                         \
	ATTR ALWAYS_INLINE void adam_body_##lvl(const struct optim_coef *cp, bool decoupled,      \
						float *restrict w, const float *restrict g,       \
						float *restrict s0, float *restrict s1, size_t n) \
	{                                                                                         \
		const struct optim_coef c = *cp;                                                  \
		size_t i = 0;                                                                     \
		for (; n - i >= CHUNK; i += CHUNK)                                                \
			adam_chunk_##lvl(&c, decoupled, w + i, g + i, s0 + i, s1 + i);            \
		if (i < n) {                                                                      \
			float tw[CHUNK] = {0}, tg[CHUNK] = {0}, t0[CHUNK] = {0}, t1[CHUNK] = {0}; \
			size_t m = (n - i) * sizeof(float);                                       \
			memcpy(tw, w + i, m);                                                     \
			memcpy(tg, g + i, m);                                                     \
			memcpy(t0, s0 + i, m);                                                    \
			memcpy(t1, s1 + i, m);                                                    \
			adam_chunk_##lvl(&c, decoupled, tw, tg, t0, t1);                          \
			memcpy(w + i, tw, m);                                                     \
			memcpy(s0 + i, t0, m);                                                    \
			memcpy(s1 + i, t1, m);                                                    \
		}                                                                                 \
	}

/* ------------------------------------------------------------ variants */

typedef void (*update_fn)(const struct optim_coef *c, float *w, const float *g, float *s0,
			  float *s1, size_t n);

#define UPDATE_WRAPPERS(lvl, ATTR)                                                           \
	ATTR static void sgd_##lvl(const struct optim_coef *c, float *w, const float *g,     \
				   float *s0, float *s1, size_t n)                           \
	{                                                                                    \
		plain_body(c, RULE_SGD, w, g, s0, n);                                        \
	}                                                                                    \
	ATTR static void sgd_mom_##lvl(const struct optim_coef *c, float *w, const float *g, \
				       float *s0, float *s1, size_t n)                       \
	{                                                                                    \
		plain_body(c, RULE_SGD_MOM, w, g, s0, n);                                    \
	}                                                                                    \
	ATTR static void nag_##lvl(const struct optim_coef *c, float *w, const float *g,     \
				   float *s0, float *s1, size_t n)                           \
	{                                                                                    \
		plain_body(c, RULE_NAG, w, g, s0, n);                                        \
	}                                                                                    \
	ATTR static void adam_##lvl(const struct optim_coef *c, float *w, const float *g,    \
				    float *s0, float *s1, size_t n)                          \
	{                                                                                    \
		adam_body_##lvl(c, false, w, g, s0, s1, n);                                  \
	}                                                                                    \
	ATTR static void adamw_##lvl(const struct optim_coef *c, float *w, const float *g,   \
				     float *s0, float *s1, size_t n)                         \
	{                                                                                    \
		adam_body_##lvl(c, true, w, g, s0, s1, n);                                   \
	}

ADAM_VARIANT(portable, , sqrt_chunk_portable)
UPDATE_WRAPPERS(portable, )

#if OPTIM_X86
#define TARGET_AVX2   __attribute__((target("avx2,f16c")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx2,f16c")))

TARGET_AVX2 ALWAYS_INLINE void sqrt_chunk_avx2(float *restrict d, const float *restrict s)
{
	for (size_t k = 0; k < CHUNK; k += 8)
		_mm256_storeu_ps(d + k, _mm256_sqrt_ps(_mm256_loadu_ps(s + k)));
}

TARGET_AVX512 ALWAYS_INLINE void sqrt_chunk_avx512(float *restrict d, const float *restrict s)
{
	for (size_t k = 0; k < CHUNK; k += 16)
		_mm512_storeu_ps(d + k, _mm512_sqrt_ps(_mm512_loadu_ps(s + k)));
}

ADAM_VARIANT(avx2, TARGET_AVX2, sqrt_chunk_avx2)
ADAM_VARIANT(avx512, TARGET_AVX512, sqrt_chunk_avx512)
UPDATE_WRAPPERS(avx2, TARGET_AVX2)
UPDATE_WRAPPERS(avx512, TARGET_AVX512)
#endif

#define UPDATE_TABLE(lvl)                                                                       \
	{                                                                                       \
		[RULE_SGD] = sgd_##lvl, [RULE_SGD_MOM] = sgd_mom_##lvl, [RULE_NAG] = nag_##lvl, \
		[RULE_ADAM] = adam_##lvl, [RULE_ADAMW] = adamw_##lvl,                           \
	}

static const update_fn update_kernels[][RULE_COUNT] = {
	[REDUCE_ISA_PORTABLE] = UPDATE_TABLE(portable),
#if OPTIM_X86
	[REDUCE_ISA_AVX2] = UPDATE_TABLE(avx2),
	[REDUCE_ISA_AVX512] = UPDATE_TABLE(avx512),
#endif
};

/* ------------------------------------------------------------ per call */

static void update_cpu(const struct optim_coef *c, float *w, const void *grad, kv_dtype gt,
		       float *s0, float *s1, void *out, kv_dtype ot, size_t n)
{
	update_fn f = update_kernels[reduce_cpu_isa()][c->rule];
	size_t ges = gt == KV_FLOAT32 ? 4 : 2, oes = ot == KV_FLOAT32 ? 4 : 2;
	_Alignas(64) float gbuf[BLOCK];

	if (gt == KV_FLOAT32 && !out) { /* the hot path: one pass over everything */
		f(c, w, grad, s0, s1, n);
		return;
	}
	for (size_t i = 0; i < n; i += BLOCK) {
		size_t len = n - i < BLOCK ? n - i : BLOCK;
		const float *g = gbuf;
		if (gt == KV_FLOAT32)
			g = (const float *)grad + i;
		else
			reduce_to_f32(gbuf, (const char *)grad + i * ges, gt, len);
		f(c, w + i, g, s0 ? s0 + i : NULL, s1 ? s1 + i : NULL, len);
		if (out)
			reduce_from_f32((char *)out + i * oes, ot, w + i, len);
	}
}

/* ------------------------------------------------------------ arguments */

static size_t elem_size(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT32:
		return 4;
	case KV_FLOAT16:
	case KV_BFLOAT16:
		return 2;
	default:
		return 0; /* integers and f64 are not gradients here */
	}
}

int optim_nstates(const struct opt_params *p)
{
	if (!p)
		return KV_ERR_INVALID;
	switch (p->kind) {
	case OPT_NONE:
		return 0;
	case OPT_SGD:
		/* optim.h defines momentum == 0 and > 0; a negative or NaN one is refused */
		if (p->momentum > 0)
			return 1;
		return p->momentum == 0 ? 0 : KV_ERR_INVALID;
	case OPT_NAG:
		return 1;
	case OPT_ADAM:
	case OPT_ADAMW:
		return 2;
	}
	return KV_ERR_INVALID;
}

struct span {
	uintptr_t at;
	size_t bytes;
};

/* Not NULL, aligned to its element, not past the end of the address space. */
static bool span_ok(const void *p, size_t es, size_t n, struct span *s)
{
	uintptr_t u = (uintptr_t)p;

	s->at = u;
	s->bytes = n * es;
	return p && (u & (es - 1)) == 0 && u <= UINTPTR_MAX - s->bytes;
}

/* b^e by squaring, in double: no libm in libkv (and t is an integer anyway). */
static double pow_u64(double b, uint64_t e)
{
	double r = 1.0;

	for (; e; e >>= 1) {
		if (e & 1)
			r *= b;
		b *= b;
	}
	return r;
}

static double sqrt_d(double x)
{
#if defined(__SSE2__)
	return _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(x)));
#else
	return __builtin_sqrt(x);
#endif
}

static void coef_init(struct optim_coef *c, const struct opt_params *p, int nstates, uint64_t t)
{
	memset(c, 0, sizeof(*c));
	switch (p->kind) {
	case OPT_SGD:
		c->rule = nstates ? RULE_SGD_MOM : RULE_SGD;
		break;
	case OPT_NAG:
		c->rule = RULE_NAG;
		break;
	case OPT_ADAM:
		c->rule = RULE_ADAM;
		break;
	default:
		c->rule = RULE_ADAMW;
		break;
	}
	c->lr = p->lr;
	c->wd = p->wd;
	c->rescale = p->rescale_grad;
	c->clip = p->clip_gradient >= 0 ? p->clip_gradient : INFINITY;
	c->momentum = p->momentum;
	c->beta1 = p->beta1;
	c->beta2 = p->beta2;
	c->epsilon = p->epsilon;
	c->one_m_beta1 = 1.0f - p->beta1;
	c->one_m_beta2 = 1.0f - p->beta2;
	c->decay = 1.0f - p->lr * p->wd;
	c->lr_wd = p->lr * p->wd;
	if (c->rule == RULE_ADAM || c->rule == RULE_ADAMW) {
		double b1t = pow_u64(p->beta1, t), b2t = pow_u64(p->beta2, t);
		c->lr_t = (float)((double)p->lr * sqrt_d(1.0 - b2t) / (1.0 - b1t));
	}
}

int optim_update(int device, void *stream, const struct opt_params *p, uint64_t t, float *weight,
		 const void *grad, kv_dtype gt, float *s0, float *s1, void *out, kv_dtype ot,
		 size_t n)
{
	int nstates = optim_nstates(p);
	size_t ges = elem_size(gt), oes = out ? elem_size(ot) : 4;
	struct optim_coef c;

	if (device < REDUCE_CPU || nstates < 0 || p->kind == OPT_NONE || !ges || !oes)
		return KV_ERR_INVALID;
	if ((p->kind == OPT_ADAM || p->kind == OPT_ADAMW) && t == 0)
		return KV_ERR_INVALID;
	if (nstates < 1)
		s0 = NULL; /* not used: not checked, not touched */
	if (nstates < 2)
		s1 = NULL;
	if (n > 0) {
		struct span sp[5];
		int ns = 0;
		if (n > PTRDIFF_MAX / sizeof(float))
			return KV_ERR_INVALID;
		if (!span_ok(weight, 4, n, &sp[ns++]) || !span_ok(grad, ges, n, &sp[ns++]))
			return KV_ERR_INVALID;
		if (nstates >= 1 && !span_ok(s0, 4, n, &sp[ns++]))
			return KV_ERR_INVALID;
		if (nstates >= 2 && !span_ok(s1, 4, n, &sp[ns++]))
			return KV_ERR_INVALID;
		if (out && !span_ok(out, oes, n, &sp[ns++]))
			return KV_ERR_INVALID;
		/* no two arrays may share a byte: each is read and written element by element */
		for (int a = 0; a < ns; a++)
			for (int b = a + 1; b < ns; b++)
				if (sp[a].at < sp[b].at + sp[b].bytes &&
				    sp[b].at < sp[a].at + sp[a].bytes)
					return KV_ERR_INVALID;
	}
	coef_init(&c, p, nstates, t);
	if (device != REDUCE_CPU) {
#ifdef KV_HAVE_CUDA
		return optim_update_cuda(device, stream, &c, weight, grad, gt, s0, s1, out, ot, n);
#else
		return KV_ERR_UNSUPPORTED;
#endif
	}
	if (n)
		update_cpu(&c, weight, grad, gt, s0, s1, out, ot, n);
	return 0;
}
