/* SPDX-License-Identifier: MIT */
/*
 * test_optim.c - optim_nstates() and optim_update() (kernels/optim.c), and
 * the CUDA path when a GPU is present.
 *
 * Expected values never come from the code under test.  Every update is
 * replayed by a plain double-precision loop that implements optim.h's
 * formulas (they are MXNet 1.9's: sgd_update, sgd_mom_update,
 * nag_mom_update, adam_update with the Adam optimizer's bias-corrected lr,
 * and AdamW's decoupled decay), with its own clip and its own lr_t (libm's
 * pow and sqrt).  f16/bf16 gradients are widened, and f16/bf16 outs
 * rounded, by this file's own conversions (ldexp, frexp, nearbyint).
 *
 * How close f32 can be to the double replay: each f32 operation rounds by
 * at most 2^-24 of its result, so an element's error is a few 2^-24 of the
 * size of the terms that built it, not of the result itself: w - lr * g
 * with the two nearly equal is exact in double and off by 2^-24 * |w| in
 * f32, arbitrarily many times the result.  So next to every reference value
 * the replay carries its magnitude: the same recurrence run on absolute
 * values (|w| + lr * |g| where the formula has w - lr * g, and so on),
 * never below |value|.  An element passes when it is within 1e-6 of its
 * magnitude: 1e-6 relative for the usual element, and an absolute floor of
 * 1e-6 times the terms' size for one that cancelled towards 0.  That is
 * some 16.8 roundings (2^-24 each) of slack, over 10 steps of 4 to 8
 * operations each; the worst seen is 9.5 of them (AdamW; each sweep logs
 * its worst with cr_log_info).
 *
 * The data keep Adam well conditioned (|rescale * g| >= 0.0625, wd * |w|
 * far below it): near g = 0 Adam's first step is lr * sign(g), which no
 * precision pins down.
 *
 * Every sweep runs each CPU variant this machine has (portable, AVX2,
 * AVX-512) from the same data, and the variants must also agree bit for
 * bit.  Buffers are malloc'd at exactly their size, shifted by a few
 * elements (each array by its own amount), so that vector loops run
 * misaligned and the sanitizer build catches a read or write past the end.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/gpu.h"
#include "../../kernels/optim.h"
#include "../../kernels/reduce.h"

#define NSTEPS 10
#define TOL    1e-6

/* ------------------------------------------------------------ conversions */

/* The value of a binary16-like encoding: p significant bits, ebits of exponent. */
static double ref_widen(uint16_t h, int p, int ebits)
{
	int mbits = p - 1, bias = (1 << (ebits - 1)) - 1;
	int e = (h >> mbits) & ((1 << ebits) - 1), m = h & ((1 << mbits) - 1);
	double v = e == (1 << ebits) - 1 ? (m ? NAN : INFINITY)
		   : e == 0		 ? ldexp(m, 1 - bias - mbits)
					 : ldexp(m + (1 << mbits), e - bias - mbits);
	return (h & 0x8000) ? -v : v;
}

/* d rounded to nearest (ties to even) into that encoding; past the largest: inf. */
static uint16_t ref_round(double d, int p, int ebits)
{
	int mbits = p - 1, bias = (1 << (ebits - 1)) - 1, emin = 1 - bias, e;
	uint16_t sign = signbit(d) ? 0x8000 : 0;
	uint16_t inf = (uint16_t)(((1 << ebits) - 1) << mbits);
	double a = fabs(d);

	if (isnan(d))
		return sign | inf | (uint16_t)(1 << (mbits - 1));
	if (a == 0)
		return sign;
	frexp(a, &e);
	e = e - 1 < emin ? emin : e - 1;	   /* a's binade, or the subnormal one */
	double m = nearbyint(ldexp(a, mbits - e)); /* exact scaling; rounds to even */
	if (m >= ldexp(1, p)) {			   /* carried into the next binade */
		m /= 2;
		e++;
	}
	if (a == INFINITY || e > bias)
		return sign | inf;
	if (m < ldexp(1, mbits)) /* subnormal */
		return sign | (uint16_t)m;
	return sign | (uint16_t)((e + bias) << mbits) | (uint16_t)(m - ldexp(1, mbits));
}

static double ref_half(uint16_t h)
{
	return ref_widen(h, 11, 5);
}

static double ref_bf16(uint16_t h)
{
	return ref_widen(h, 8, 8);
}

static uint16_t ref_to_half(double d)
{
	return ref_round(d, 11, 5);
}

static uint16_t ref_to_bf16(double d)
{
	return ref_round(d, 8, 8);
}

static uint32_t fbits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

static size_t esize(kv_dtype t)
{
	return t == KV_FLOAT32 ? 4 : 2;
}

static const char *dname(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT32:
		return "f32";
	case KV_FLOAT16:
		return "f16";
	case KV_BFLOAT16:
		return "bf16";
	default:
		return "?";
	}
}

/* Element i of a gradient or out of dtype t, as a double (exact). */
static double load_d(kv_dtype t, const void *p, size_t i)
{
	switch (t) {
	case KV_FLOAT32:
		return ((const float *)p)[i];
	case KV_FLOAT16:
		return ref_half(((const uint16_t *)p)[i]);
	default:
		return ref_bf16(((const uint16_t *)p)[i]);
	}
}

/* v rounded into element i of t. */
static void store_d(kv_dtype t, void *p, size_t i, double v)
{
	switch (t) {
	case KV_FLOAT32:
		((float *)p)[i] = (float)v;
		break;
	case KV_FLOAT16:
		((uint16_t *)p)[i] = ref_to_half(v);
		break;
	default:
		((uint16_t *)p)[i] = ref_to_bf16(v);
		break;
	}
}

/* ------------------------------------------------------------ data */

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint64_t rnd(void)
{
	uint64_t x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545f4914f6cdd1dull;
}

static double uniform(double lo, double hi)
{
	return lo + (hi - lo) * (double)(rnd() >> 11) * 0x1p-53;
}

/* |g| in [0.25, 4.25), either sign: past any clip of the sweep for some elements */
static double rand_grad(void)
{
	double g = uniform(0.25, 4.25);
	return rnd() & 1 ? g : -g;
}

/* ------------------------------------------------------------ the double replay */

struct refel {
	double w, s0, s1;  /* the values */
	double mw, m0, m1; /* their magnitudes: the recurrence on absolute values */
};

static double clip_d(double x, double c)
{
	return c >= 0 ? fmin(fmax(x, -c), c) : x;
}

/* One step of optim.h on one element, in double.  *clipped counts clipping. */
static void ref_step(const struct opt_params *p, uint64_t t, double g, struct refel *e,
		     size_t *clipped)
{
	const double lr = p->lr, wd = p->wd, rs = p->rescale_grad, c = p->clip_gradient;
	const double mom = p->momentum, b1 = p->beta1, b2 = p->beta2, eps = p->epsilon;
	const double w = e->w, mw = e->mw;
	double x, mx;

	if (p->kind == OPT_ADAM || p->kind == OPT_ADAMW) {
		double lr_t = lr * sqrt(1 - pow(b2, (double)t)) / (1 - pow(b1, (double)t));
		double pre = p->kind == OPT_ADAM ? rs * g + wd * w : rs * g;
		x = clip_d(pre, c);
		mx = p->kind == OPT_ADAM ? fabs(rs * g) + wd * mw : fabs(rs * g);
		*clipped += x != pre;
		e->s0 = b1 * e->s0 + (1 - b1) * x;
		e->m0 = b1 * e->m0 + (1 - b1) * mx;
		e->s1 = b2 * e->s1 + (1 - b2) * x * x;
		e->m1 = b2 * e->m1 + (1 - b2) * mx * mx;
		double den = sqrt(e->s1) + eps;
		e->w = w - lr_t * e->s0 / den;
		e->mw = mw + lr_t * e->m0 / den;
		if (p->kind == OPT_ADAMW) {
			e->w -= lr * wd * w;
			e->mw += lr * wd * mw;
		}
		return;
	}
	x = clip_d(rs * g, c);
	mx = fabs(rs * g);
	*clipped += x != rs * g;
	if (p->kind == OPT_SGD && p->momentum == 0) {
		e->w = (1 - lr * wd) * w - lr * x;
		e->mw = fabs(1 - lr * wd) * mw + lr * mx;
		return;
	}
	x += wd * w;
	mx += wd * mw;
	if (p->kind == OPT_SGD) {
		e->s0 = mom * e->s0 - lr * x;
		e->m0 = mom * e->m0 + lr * mx;
		e->w = w + e->s0;
		e->mw = mw + e->m0;
	} else { /* NAG: MXNet's nag_mom_update, lr inside the momentum */
		double m = mom * e->s0, mm = mom * e->m0;
		e->s0 = m - lr * x;
		e->m0 = mm + lr * mx;
		e->w = w - m + (mom + 1) * e->s0;
		e->mw = mw + mm + (mom + 1) * e->m0;
	}
}

static double worst_ratio; /* largest |error| / (2^-24 * magnitude) seen, for the log */

static bool close_to(float got, double want, double mag)
{
	double m = fmax(fabs(want), mag), err = fabs((double)got - want);
	if (m > 0 && err / (m * 0x1p-24) > worst_ratio)
		worst_ratio = err / (m * 0x1p-24);
	return err <= TOL * m;
}

/* ------------------------------------------------------------ one sweep case */

struct ocase {
	struct opt_params p;
	kv_dtype gt, ot;
	bool has_out;
	size_t n;
	size_t off[5]; /* element shifts of weight, grad, s0, s1, out */
};

struct arrays {
	void *base[5];
	float *w, *s0, *s1;
	void *g, *out;
};

static void *alloc_at(size_t n, size_t es, size_t off, void **base)
{
	*base = malloc((n + off) * es);
	cr_assert_not_null(*base);
	return (char *)*base + off * es;
}

static void arrays_new(struct arrays *a, const struct ocase *oc, int nstates)
{
	size_t n = oc->n;

	memset(a, 0, sizeof(*a));
	a->w = alloc_at(n, 4, oc->off[0], &a->base[0]);
	a->g = alloc_at(n, esize(oc->gt), oc->off[1], &a->base[1]);
	if (nstates >= 1)
		a->s0 = alloc_at(n, 4, oc->off[2], &a->base[2]);
	if (nstates >= 2)
		a->s1 = alloc_at(n, 4, oc->off[3], &a->base[3]);
	if (oc->has_out)
		a->out = alloc_at(n, esize(oc->ot), oc->off[4], &a->base[4]);
}

static void arrays_free(struct arrays *a)
{
	for (int k = 0; k < 5; k++)
		free(a->base[k]);
}

/* What one run leaves: the f32 arrays and the last out, to compare variants. */
struct result {
	float *w, *s0, *s1;
	void *out;
};

static const char *kind_name(const struct opt_params *p)
{
	static const char *const names[] = {"none", "sgd", "nag", "adam", "adamw"};
	if (p->kind == OPT_SGD && p->momentum > 0)
		return "sgd+momentum";
	return p->kind >= 0 && p->kind <= OPT_ADAMW ? names[p->kind] : "?";
}

/*
 * NSTEPS updates of one case on the CPU variant in use, each checked against
 * the replay; the gradients come from a seed so that every variant sees the
 * same.  Returns the final arrays in *res (caller frees).
 */
static void run_case(const struct ocase *oc, uint64_t seed, struct result *res, size_t *clipped,
		     size_t *elements)
{
	const struct opt_params *p = &oc->p;
	int nstates = optim_nstates(p);
	size_t n = oc->n;
	struct arrays a;
	struct refel *ref = calloc(n, sizeof(*ref));

	cr_assert(nstates >= 0 && ref);
	arrays_new(&a, oc, nstates);
	rng_state = seed;
	for (size_t i = 0; i < n; i++) {
		a.w[i] = (float)uniform(-2, 2);
		ref[i].w = a.w[i];
		ref[i].mw = fabs(ref[i].w);
		if (a.s0)
			a.s0[i] = 0; /* as MXNet creates them */
		if (a.s1)
			a.s1[i] = 0;
	}
	for (uint64_t t = 1; t <= NSTEPS; t++) {
		for (size_t i = 0; i < n; i++)
			store_d(oc->gt, a.g, i, rand_grad());
		if (a.out)
			memset(a.out, 0xa5, n * esize(oc->ot));
		int rc = optim_update(REDUCE_CPU, NULL, p, t, a.w, a.g, oc->gt, a.s0, a.s1, a.out,
				      oc->ot, n);
		cr_assert_eq(rc, 0, "%s: rc %d", kind_name(p), rc);
		for (size_t i = 0; i < n; i++) {
			struct refel *e = &ref[i];
			ref_step(p, t, load_d(oc->gt, a.g, i), e, clipped);
			bool ok = close_to(a.w[i], e->w, e->mw);
			if (ok && nstates >= 1)
				ok = close_to(a.s0[i], e->s0, e->m0);
			if (ok && nstates >= 2)
				ok = close_to(a.s1[i], e->s1, e->m1);
			if (!ok)
				cr_assert_fail("%s [%s] lr=%g wd=%g rescale=%g clip=%g mom=%g "
					       "grad %s n=%zu step %llu [%zu]: w %.9g want %.9g "
					       "(mag %.3g), s0 %.9g want %.9g, s1 %.9g want %.9g",
					       kind_name(p), reduce_cpu_isa_name(reduce_cpu_isa()),
					       p->lr, p->wd, p->rescale_grad, p->clip_gradient,
					       p->momentum, dname(oc->gt), n, (unsigned long long)t,
					       i, a.w[i], e->w, e->mw, a.s0 ? a.s0[i] : 0, e->s0,
					       a.s1 ? a.s1[i] : 0, e->s1);
			if (!a.out)
				continue;
			uint32_t got, want;
			switch (oc->ot) {
			case KV_FLOAT32:
				got = fbits(((float *)a.out)[i]);
				want = fbits(a.w[i]);
				break;
			case KV_FLOAT16:
				got = ((uint16_t *)a.out)[i];
				want = ref_to_half(a.w[i]);
				break;
			default:
				got = ((uint16_t *)a.out)[i];
				want = ref_to_bf16(a.w[i]);
				break;
			}
			if (got != want)
				cr_assert_fail("%s out %s n=%zu step %llu [%zu]: %#x, want %#x "
					       "(weight %.9g)",
					       kind_name(p), dname(oc->ot), n,
					       (unsigned long long)t, i, got, want, a.w[i]);
		}
		*elements += n;
	}
	res->w = malloc(n * 4);
	res->s0 = malloc(n * 4);
	res->s1 = malloc(n * 4);
	res->out = malloc(n * 4);
	memcpy(res->w, a.w, n * 4);
	if (a.s0)
		memcpy(res->s0, a.s0, n * 4);
	if (a.s1)
		memcpy(res->s1, a.s1, n * 4);
	if (a.out)
		memcpy(res->out, a.out, n * esize(oc->ot));
	arrays_free(&a);
	free(ref);
}

static void result_free(struct result *r)
{
	free(r->w);
	free(r->s0);
	free(r->s1);
	free(r->out);
}

static const size_t sizes[] = {1, 7, 64, 1000, 4099};

/* The knobs of the sweep: decay, rescale and clipping (on and off). */
struct knobs {
	float wd, rescale, clip;
};
static const struct knobs knob_sets[] = {
	{0, 1, -1},	   /* plain */
	{0.01f, 0.5f, 1},  /* all on: |rescale * g| up to 2.1 against 1 */
	{0.01f, 0.5f, -1}, /* decay and rescale, no clipping */
	{0, 0.25f, 0.5f},  /* clipping without decay */
};
#define NKNOBS (sizeof(knob_sets) / sizeof(knob_sets[0]))

/*
 * Every size, gradient dtype, out dtype (none, f32, f16, bf16) and knob
 * set for one kind, on every CPU variant; the variants must agree bit for
 * bit.  Clipping must have happened for some elements and not for others.
 */
static void sweep(struct opt_params base)
{
	static const kv_dtype dts[] = {KV_FLOAT32, KV_FLOAT16, KV_BFLOAT16};
	int best = reduce_cpu_isa_limit(REDUCE_ISA_AVX512);
	size_t clipped = 0, elements = 0, clip_elements = 0, ncase = 0;
	int nstates = optim_nstates(&base);

	for (size_t kn = 0; kn < NKNOBS; kn++) {
		struct opt_params p = base;
		p.wd = knob_sets[kn].wd;
		p.rescale_grad = knob_sets[kn].rescale;
		p.clip_gradient = knob_sets[kn].clip;
		size_t clipped_here = 0, elements_here = 0;
		for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++)
			for (int gi = 0; gi < 3; gi++)
				for (int oi = -1; oi < 3; oi++) {
					struct ocase oc = {
						.p = p,
						.gt = dts[gi],
						.ot = oi < 0 ? KV_FLOAT32 : dts[oi],
						.has_out = oi >= 0,
						.n = sizes[s],
					};
					for (int k = 0; k < 5;
					     k++) /* 0..3 elements, each its own */
						oc.off[k] = (ncase + (size_t)k * 3) % 4;
					uint64_t seed = 0x9e3779b97f4a7c15ull * (ncase + 1);
					struct result first = {0};
					for (int lvl = REDUCE_ISA_PORTABLE; lvl <= best; lvl++) {
						struct result r;
						size_t c0 = 0, e0 = 0;
						cr_assert_eq(reduce_cpu_isa_limit(lvl), lvl);
						run_case(&oc, seed, &r, &c0, &e0);
						if (lvl == REDUCE_ISA_PORTABLE) {
							first = r;
							clipped_here += c0;
							elements_here += e0;
							continue;
						}
						size_t n = oc.n;
						bool same = memcmp(r.w, first.w, n * 4) == 0;
						if (nstates >= 1)
							same = same &&
							       memcmp(r.s0, first.s0, n * 4) == 0;
						if (nstates >= 2)
							same = same &&
							       memcmp(r.s1, first.s1, n * 4) == 0;
						if (oc.has_out)
							same = same &&
							       memcmp(r.out, first.out,
								      n * esize(oc.ot)) == 0;
						cr_assert(same,
							  "%s grad %s n=%zu: %s differs from "
							  "portable",
							  kind_name(&p), dname(oc.gt), n,
							  reduce_cpu_isa_name(lvl));
						result_free(&r);
					}
					result_free(&first);
					ncase++;
				}
		if (p.clip_gradient >= 0) {
			cr_assert(clipped_here > 0 && clipped_here < elements_here,
				  "%s clip %g: %zu of %zu element updates clipped", kind_name(&p),
				  p.clip_gradient, clipped_here, elements_here);
			clip_elements += elements_here;
			clipped += clipped_here;
		} else {
			cr_assert_eq(clipped_here, 0);
		}
		elements += elements_here;
	}
	reduce_cpu_isa_limit(REDUCE_ISA_AVX512);
	cr_log_info("optim %s: %zu cases x %d CPU variants, %zu element updates, %zu of %zu "
		    "clipped; worst error %.2f x 2^-24 of the magnitude",
		    kind_name(&base), ncase, best + 1, elements, clipped, clip_elements,
		    worst_ratio);
}

Test(optim, sgd_matches_reference, .timeout = 120)
{
	sweep((struct opt_params){.kind = OPT_SGD, .lr = 0.1f});
}

Test(optim, sgd_momentum_matches_reference, .timeout = 120)
{
	sweep((struct opt_params){.kind = OPT_SGD, .lr = 0.1f, .momentum = 0.9f});
}

Test(optim, nag_matches_reference, .timeout = 120)
{
	sweep((struct opt_params){.kind = OPT_NAG, .lr = 0.05f, .momentum = 0.9f});
}

Test(optim, nag_zero_momentum_matches_reference, .timeout = 120)
{
	sweep((struct opt_params){.kind = OPT_NAG, .lr = 0.05f, .momentum = 0});
}

Test(optim, adam_matches_reference, .timeout = 120)
{
	sweep((struct opt_params){
		.kind = OPT_ADAM, .lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.999f, .epsilon = 1e-8f});
}

Test(optim, adamw_matches_reference, .timeout = 120)
{
	sweep((struct opt_params){
		.kind = OPT_ADAMW, .lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.999f, .epsilon = 1e-8f});
}

/* ------------------------------------------------------------ MXNet's own numbers */

/* Two ranks push 1 each: the sum (through reduce_sum, as kvd does it) is 2. */
static void two_rank_grad(kv_dtype t, void *g, size_t n)
{
	void *one = malloc(n * esize(t));
	for (size_t i = 0; i < n; i++)
		store_d(t, one, i, 1.0);
	const void *ins[2] = {one, one};
	void *outs[1] = {g};
	cr_assert_eq(reduce_sum(REDUCE_CPU, NULL, t, outs, 1, ins, 2, n), 0);
	free(one);
}

Test(optim, mxnet_sgd_two_ranks)
{
	static const kv_dtype dts[] = {KV_FLOAT32, KV_FLOAT16, KV_BFLOAT16};
	struct opt_params p = {.kind = OPT_SGD, .lr = 1, .rescale_grad = 1, .clip_gradient = -1};
	size_t n = 70; /* a chunk and a tail */

	for (int d = 0; d < 3; d++) {
		float *w = calloc(n, 4);
		void *g = malloc(n * esize(dts[d]));
		two_rank_grad(dts[d], g, n);
		cr_assert_eq(optim_nstates(&p), 0);
		cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, g, dts[d], NULL, NULL, NULL,
					  KV_FLOAT32, n),
			     0);
		for (size_t i = 0; i < n; i++)
			cr_assert(w[i] == -2.0f, "grad %s [%zu]: %g", dname(dts[d]), i, w[i]);
		free(w);
		free(g);
	}
}

Test(optim, mxnet_sgd_momentum_two_steps)
{
	struct opt_params p = {
		.kind = OPT_SGD, .lr = 1, .rescale_grad = 1, .clip_gradient = -1, .momentum = 0.5f};
	size_t n = 70;
	float *w = calloc(n, 4), *mom = calloc(n, 4), *g = malloc(n * 4);

	two_rank_grad(KV_FLOAT32, g, n);
	cr_assert_eq(optim_nstates(&p), 1);
	cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, mom, NULL, NULL,
				  KV_FLOAT32, n),
		     0);
	for (size_t i = 0; i < n; i++)
		cr_assert(mom[i] == -2.0f && w[i] == -2.0f, "step 1 [%zu]: mom %g w %g", i, mom[i],
			  w[i]);
	cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 2, w, g, KV_FLOAT32, mom, NULL, NULL,
				  KV_FLOAT32, n),
		     0);
	for (size_t i = 0; i < n; i++) /* mom = 0.5 * -2 - 2 = -3; w = -2 + -3 */
		cr_assert(mom[i] == -3.0f && w[i] == -5.0f, "step 2 [%zu]: mom %g w %g", i, mom[i],
			  w[i]);
	free(w);
	free(mom);
	free(g);
}

Test(optim, mxnet_nag_two_steps)
{
	struct opt_params p = {
		.kind = OPT_NAG, .lr = 1, .rescale_grad = 1, .clip_gradient = -1, .momentum = 0.5f};
	float w[3] = {0}, mom[3] = {0}, g[3] = {2, 2, 2};

	/* MXNet 1.9's nag_mom_update: m = 0.5 * mom; mom = m - lr * g;
	 * w = w - m + 1.5 * mom (mxnet.nd.nag_mom_update gives these numbers) */
	cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, mom, NULL, NULL,
				  KV_FLOAT32, 3),
		     0);
	cr_assert(mom[0] == -2.0f && w[0] == -3.0f, "step 1: mom %g w %g", mom[0], w[0]);
	cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 2, w, g, KV_FLOAT32, mom, NULL, NULL,
				  KV_FLOAT32, 3),
		     0);
	cr_assert(mom[2] == -3.0f && w[2] == -6.5f, "step 2: mom %g w %g", mom[2], w[2]);
	/* a learning rate that changes acts inside the momentum: lr 0.1, 0.1,
	 * 0.02 with g = 1, momentum 0.9 from w = 1 (mxnet 1.9.1 printed 0.81,
	 * 0.539, 0.34710002 and momentum -0.1, -0.19, -0.19099998) */
	struct opt_params q = {
		.kind = OPT_NAG, .rescale_grad = 1, .clip_gradient = -1, .momentum = 0.9f};
	float w1 = 1, m1 = 0, g1 = 1;
	const float lrs[3] = {0.1f, 0.1f, 0.02f}, ws[3] = {0.81f, 0.539f, 0.34710002f},
		    ms[3] = {-0.1f, -0.19f, -0.19099998f};
	for (int s = 0; s < 3; s++) {
		q.lr = lrs[s];
		cr_assert_eq(optim_update(REDUCE_CPU, NULL, &q, (uint64_t)s + 1, &w1, &g1,
					  KV_FLOAT32, &m1, NULL, NULL, KV_FLOAT32, 1),
			     0);
		cr_assert(w1 == ws[s] && m1 == ms[s], "lr step %d: w %.9g (want %.9g) mom %.9g "
			  "(want %.9g)", s, w1, ws[s], m1, ms[s]);
	}
}

/* sgd_update: w = (1 - lr * wd) * w - lr * clip(rescale * g). */
Test(optim, mxnet_sgd_decay_rescale_clip)
{
	struct opt_params p = {
		.kind = OPT_SGD, .lr = 0.5f, .wd = 0.5f, .rescale_grad = 0.5f, .clip_gradient = 1};
	float w[5] = {4, 4, 4, 4, 4}, g[5] = {1, -1, 6, -6, NAN};

	cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, NULL, NULL, NULL,
				  KV_FLOAT32, 5),
		     0);
	/* 0.75 * 4 - 0.5 * {0.5, -0.5, 1 (clipped from 3), -1 (from -3)} */
	cr_assert(w[0] == 2.75f && w[1] == 3.25f && w[2] == 2.5f && w[3] == 3.5f, "%g %g %g %g",
		  w[0], w[1], w[2], w[3]);
	cr_assert(isnan(w[4]), "a NaN gradient passes the clip: %g", w[4]);
}

/*
 * Adam's first step moves each weight by about lr against the gradient's
 * sign (MXNet's lr_t = lr * sqrt(1 - beta2) / (1 - beta1) cancels the
 * moments' (1 - beta) factors); Adam's wd joins the gradient, AdamW's
 * takes lr * wd * w off the weight.
 */
Test(optim, mxnet_adam_first_step)
{
	struct opt_params p = {.kind = OPT_ADAM,
			       .lr = 0.1f,
			       .rescale_grad = 1,
			       .clip_gradient = -1,
			       .beta1 = 0.9f,
			       .beta2 = 0.999f,
			       .epsilon = 1e-8f};
	float w[2] = {1, 1}, m[2] = {0}, v[2] = {0}, g[2] = {0.5f, -0.5f};

	cr_assert_eq(optim_nstates(&p), 2);
	cr_assert_eq(
		optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, m, v, NULL, KV_FLOAT32, 2),
		0);
	cr_assert(fabs(w[0] - 0.9) < 1e-6 && fabs(w[1] - 1.1) < 1e-6, "%.9g %.9g", w[0], w[1]);
	/* the f32 betas are not 0.9 and 0.999 exactly: 1 - beta2 is 0.00100004673 */
	cr_assert(fabs(m[0] - (1 - (double)p.beta1) * 0.5) < 1e-6 * 0.05, "mean %.9g", m[0]);
	cr_assert(fabs(v[0] - (1 - (double)p.beta2) * 0.25) < 1e-6 * 0.00025, "variance %.9g",
		  v[0]);

	p.wd = 0.1f; /* Adam: the gradient becomes 0.5 + 0.1 * 1: still a step of lr */
	w[0] = w[1] = 1;
	memset(m, 0, sizeof(m));
	memset(v, 0, sizeof(v));
	cr_assert_eq(
		optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, m, v, NULL, KV_FLOAT32, 2),
		0);
	cr_assert(fabs(w[0] - 0.9) < 1e-6 && fabs(m[0] - 0.06) < 1e-7, "%.9g %.9g", w[0], m[0]);
	/* -0.5 + 0.1 = -0.4: still a step of lr upwards */
	cr_assert(fabs(w[1] - 1.1) < 1e-6, "%.9g", w[1]);

	p.kind = OPT_ADAMW; /* the same step, then lr * wd * w = 0.01 off */
	w[0] = w[1] = 1;
	memset(m, 0, sizeof(m));
	memset(v, 0, sizeof(v));
	cr_assert_eq(
		optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, m, v, NULL, KV_FLOAT32, 2),
		0);
	cr_assert(fabs(w[0] - 0.89) < 1e-6 && fabs(w[1] - 1.09) < 1e-6, "%.9g %.9g", w[0], w[1]);
	cr_assert(fabs(m[0] - 0.05) < 1e-7, "AdamW's moments see no decay: %.9g", m[0]);
}

/* lr_t follows t: at step t with zero states and a constant g, the step is
 * lr * sqrt(1 - beta2^t) / (1 - beta1^t) * (1 - beta1) / sqrt(1 - beta2). */
Test(optim, adam_bias_correction_by_step)
{
	struct opt_params p = {.kind = OPT_ADAM,
			       .lr = 0.01f,
			       .rescale_grad = 1,
			       .clip_gradient = -1,
			       .beta1 = 0.9f,
			       .beta2 = 0.999f,
			       .epsilon = 0};
	static const uint64_t steps[] = {1, 2, 3, 10, 1000, 1000000, UINT64_MAX};

	for (size_t k = 0; k < sizeof(steps) / sizeof(steps[0]); k++) {
		float w = 0, m = 0, v = 0, g = 1;
		double b1 = p.beta1, b2 = p.beta2, t = (double)steps[k];
		double want = -(double)p.lr * sqrt(1 - pow(b2, t)) / (1 - pow(b1, t)) * (1 - b1) /
			      sqrt(1 - b2);
		cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, steps[k], &w, &g, KV_FLOAT32, &m,
					  &v, NULL, KV_FLOAT32, 1),
			     0);
		cr_assert(fabs(w - want) <= 1e-6 * fabs(want), "t=%llu: %.9g want %.9g",
			  (unsigned long long)steps[k], w, want);
	}
}

/* ------------------------------------------------------------ outs */

/* The rounded copy at the edges: overflow, subnormals, ties, NaN, -0. */
Test(optim, out_rounding_edges)
{
	static const float vals[] = {
		0.0f,		-0.0f,	1.0f,	  65504.0f,	  65519.99f, 65520.0f,
		-1e6f,		6e-8f,	3e-8f,	  2.9802322e-08f, /* 2^-25: a tie, to even (0) */
		1.00048828125f,					  /* 1 + 2^-11: a tie in f16 */
		1.0f + 0x1p-8f,					  /* a tie in bf16 */
		3.3895314e38f,	1e-40f, INFINITY, -INFINITY,	  NAN};
	enum { N = sizeof(vals) / sizeof(vals[0]) };
	struct opt_params p = {.kind = OPT_SGD, .lr = 0, .rescale_grad = 1, .clip_gradient = -1};
	float w[N], g[N] = {0};
	uint16_t h[N];
	float f[N];

	int best = reduce_cpu_isa_limit(REDUCE_ISA_AVX512);

	for (int lvl = REDUCE_ISA_PORTABLE; lvl <= best; lvl++) {
		cr_assert_eq(reduce_cpu_isa_limit(lvl), lvl);
		/* lr = 0: w = 1 * w - 0 * 0 keeps every weight, -0, inf and NaN included */
		memcpy(w, vals, sizeof(w));
		cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, NULL, NULL, f,
					  KV_FLOAT32, N),
			     0);
		for (int i = 0; i < N; i++)
			cr_assert(fbits(f[i]) == fbits(vals[i]) || (isnan(f[i]) && isnan(vals[i])),
				  "f32 [%d] %g", i, f[i]);
		for (int b = 0; b < 2; b++) {
			kv_dtype t = b ? KV_BFLOAT16 : KV_FLOAT16;
			memcpy(w, vals, sizeof(w));
			cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, g, KV_FLOAT32, NULL,
						  NULL, h, t, N),
				     0);
			for (int i = 0; i < N; i++) {
				double back = b ? ref_bf16(h[i]) : ref_half(h[i]);
				uint16_t want = b ? ref_to_bf16(vals[i]) : ref_to_half(vals[i]);
				if (isnan(vals[i]))
					cr_assert(isnan(back), "%s [%d] NaN became %#x", dname(t),
						  i, h[i]);
				else
					cr_assert_eq(h[i], want, "%s [%d] %.9g: %#x want %#x",
						     dname(t), i, vals[i], h[i], want);
			}
		}
	}
	reduce_cpu_isa_limit(REDUCE_ISA_AVX512);
}

/* f16/bf16 gradients at the edges widen exactly (subnormals, inf, NaN). */
Test(optim, half_gradient_edges)
{
	static const uint16_t hg[] = {0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff,
				      0x7c00, 0xfc00, 0x7e00, 0x3c00, 0x8000, 0x0000};
	enum { N = sizeof(hg) / sizeof(hg[0]) };
	struct opt_params p = {.kind = OPT_SGD, .lr = 1, .rescale_grad = 1, .clip_gradient = -1};

	for (int b = 0; b < 2; b++) {
		kv_dtype t = b ? KV_BFLOAT16 : KV_FLOAT16;
		float w[N] = {0};
		cr_assert_eq(optim_update(REDUCE_CPU, NULL, &p, 1, w, hg, t, NULL, NULL, NULL,
					  KV_FLOAT32, N),
			     0);
		for (int i = 0; i < N; i++) {
			double g = b ? ref_bf16(hg[i]) : ref_half(hg[i]);
			double want = 0.0 - g; /* 1 * 0 - 1 * g: exact in f32 */
			cr_assert((isnan(want) && isnan(w[i])) || (double)w[i] == want,
				  "%s %#x: %g want %g", dname(t), hg[i], w[i], want);
		}
	}
}

/* ------------------------------------------------------------ arguments */

Test(optim, nstates)
{
	struct opt_params p = {0};

	cr_assert_eq(optim_nstates(NULL), KV_ERR_INVALID);
	cr_assert_eq(optim_nstates(&p), 0); /* OPT_NONE */
	p.kind = OPT_SGD;
	cr_assert_eq(optim_nstates(&p), 0);
	p.momentum = 0.9f;
	cr_assert_eq(optim_nstates(&p), 1);
	p.momentum = -0.5f;
	cr_assert_eq(optim_nstates(&p), KV_ERR_INVALID);
	p.momentum = NAN;
	cr_assert_eq(optim_nstates(&p), KV_ERR_INVALID);
	p.momentum = 0;
	p.kind = OPT_NAG;
	cr_assert_eq(optim_nstates(&p), 1);
	p.kind = OPT_ADAM;
	cr_assert_eq(optim_nstates(&p), 2);
	p.kind = OPT_ADAMW;
	cr_assert_eq(optim_nstates(&p), 2);
	p.kind = 5;
	cr_assert_eq(optim_nstates(&p), KV_ERR_INVALID);
	p.kind = -1;
	cr_assert_eq(optim_nstates(&p), KV_ERR_INVALID);
}

Test(optim, invalid_arguments)
{
	float w[8] = {1, 2, 3, 4, 5, 6, 7, 8}, g[8] = {1}, s0[8] = {0}, s1[8] = {0};
	uint16_t h[8] = {0};
	struct opt_params sgd = {
		.kind = OPT_SGD, .lr = 0.1f, .rescale_grad = 1, .clip_gradient = -1};
	struct opt_params mom = sgd, nag = sgd, adam = sgd, adamw = sgd, p;
	const int E = KV_ERR_INVALID;

	mom.momentum = 0.9f;
	nag.kind = OPT_NAG;
	nag.momentum = 0.9f;
	adam.kind = OPT_ADAM;
	adam.beta1 = 0.9f;
	adam.beta2 = 0.999f;
	adam.epsilon = 1e-8f;
	adamw = adam;
	adamw.kind = OPT_ADAMW;

#define UPD(pp, t, w_, g_, gt, a, b, o, ot, n) \
	optim_update(REDUCE_CPU, NULL, pp, t, w_, g_, gt, a, b, o, ot, n)
	/* params and kind */
	cr_assert_eq(UPD(NULL, 1, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	p = sgd;
	p.kind = OPT_NONE; /* no formula: the caller stores the sum itself */
	cr_assert_eq(UPD(&p, 1, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	p.kind = 5;
	cr_assert_eq(UPD(&p, 1, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	p.kind = -3;
	cr_assert_eq(UPD(&p, 1, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	p = sgd;
	p.momentum = -0.1f;
	cr_assert_eq(UPD(&p, 1, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	/* dtypes: integers, f64, out of range; for out only when there is one */
	static const int bad[] = {KV_FLOAT64, KV_INT32, KV_INT64, 6, -1};
	for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
		cr_assert_eq(UPD(&sgd, 1, w, g, (kv_dtype)bad[k], NULL, NULL, NULL, KV_FLOAT32, 8),
			     E);
		cr_assert_eq(UPD(&sgd, 1, w, g, KV_FLOAT32, NULL, NULL, s0, (kv_dtype)bad[k], 8),
			     E);
		cr_assert_eq(UPD(&sgd, 1, w, g, (kv_dtype)bad[k], NULL, NULL, NULL, KV_FLOAT32, 0),
			     E);
	}
	/* NULL arrays when n > 0 */
	cr_assert_eq(UPD(&sgd, 1, NULL, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&sgd, 1, w, NULL, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 8), E);
	/* missing states */
	cr_assert_eq(UPD(&mom, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&nag, 1, w, g, KV_FLOAT32, NULL, s1, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&adam, 1, w, g, KV_FLOAT32, NULL, s1, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&adam, 1, w, g, KV_FLOAT32, s0, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&adamw, 1, w, g, KV_FLOAT32, s0, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&adamw, 1, w, g, KV_FLOAT32, NULL, s1, NULL, KV_FLOAT32, 8), E);
	/* t == 0 for Adam and AdamW (bias correction divides by 1 - beta1^0 = 0) */
	cr_assert_eq(UPD(&adam, 0, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&adamw, 0, w, g, KV_FLOAT32, s0, s1, NULL, KV_FLOAT32, 8), E);
	/* misaligned, overlapping, too long */
	cr_assert_eq(UPD(&sgd, 1, (float *)((char *)w + 2), g, KV_FLOAT32, NULL, NULL, NULL,
			 KV_FLOAT32, 4),
		     E);
	cr_assert_eq(UPD(&sgd, 1, w, (char *)h + 1, KV_FLOAT16, NULL, NULL, NULL, KV_FLOAT32, 4),
		     E);
	cr_assert_eq(UPD(&mom, 1, w, g, KV_FLOAT32, w, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&mom, 1, w, g, KV_FLOAT32, w + 4, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&adam, 1, w, g, KV_FLOAT32, s0, s0 + 7, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&sgd, 1, w, g, KV_FLOAT32, NULL, NULL, w, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&sgd, 1, w, g, KV_FLOAT32, NULL, NULL, g + 1, KV_FLOAT16, 8), E);
	cr_assert_eq(UPD(&sgd, 1, w, w, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 8), E);
	cr_assert_eq(UPD(&sgd, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, SIZE_MAX / 2), E);
	cr_assert_eq(
		optim_update(-2, NULL, &sgd, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 8),
		E);
	/* nothing was touched */
	for (int i = 0; i < 8; i++)
		cr_assert(w[i] == i + 1 && s0[i] == 0 && s1[i] == 0);

	/* n == 0: nothing to do, NULLs and missing states included */
	cr_assert_eq(UPD(&adam, 1, NULL, NULL, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 0), 0);
	cr_assert_eq(UPD(&mom, 1, NULL, NULL, KV_BFLOAT16, NULL, NULL, NULL, KV_FLOAT16, 0), 0);
	/* states a kind does not use are neither checked nor touched */
	cr_assert_eq(UPD(&sgd, 1, w, g, KV_FLOAT32, w, w, NULL, KV_FLOAT32, 8), 0);
	cr_assert_eq(UPD(&nag, 1, w, g, KV_FLOAT32, s0, w, NULL, KV_FLOAT32, 8), 0);
	cr_assert(s1[0] == 0);
	/* an out dtype is ignored without an out */
	cr_assert_eq(UPD(&sgd, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_INT64, 8), 0);
	/* t does not matter to SGD */
	cr_assert_eq(UPD(&sgd, 0, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 8), 0);
#undef UPD
}

Test(optim, device_without_gpu)
{
	float w[4] = {1, 2, 3, 4}, g[4] = {1, 1, 1, 1};
	struct opt_params p = {.kind = OPT_SGD, .lr = 1, .rescale_grad = 1, .clip_gradient = -1};

	if (gpu_count() > 0)
		cr_skip_test("a GPU is present: %s", gpu_status());
	cr_assert_eq(
		optim_update(0, NULL, &p, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 4),
		KV_ERR_UNSUPPORTED);
	cr_assert_eq(
		optim_update(0, NULL, &p, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 0),
		KV_ERR_UNSUPPORTED);
	cr_assert(w[0] == 1 && w[3] == 4);
}

/* ------------------------------------------------------------ GPU */

/*
 * One case on device 0 against the CPU: NSTEPS updates of the same data,
 * every device pointer shifted by off elements.  SGD and NAG must agree bit
 * for bit (optim.h); Adam and AdamW within 1e-6 relative (the mismatching
 * bits are counted and logged).  The device's out must be its own weights
 * rounded.
 */
static void gpu_case(const struct opt_params *p, kv_dtype gt, int oi, size_t n, size_t off,
		     size_t *adam_diff)
{
	static const kv_dtype dts[] = {KV_FLOAT32, KV_FLOAT16, KV_BFLOAT16};
	bool exact = p->kind != OPT_ADAM && p->kind != OPT_ADAMW;
	int ns = optim_nstates(p);
	kv_dtype ot = oi < 0 ? KV_FLOAT32 : dts[oi];
	size_t ges = esize(gt), oes = esize(ot);
	float *hw = malloc(n * 4), *hs[2] = {calloc(n, 4), calloc(n, 4)};
	float *bw = malloc(n * 4), *bs[2] = {malloc(n * 4), malloc(n * 4)};
	void *hg = malloc(n * ges), *hout = oi >= 0 ? malloc(n * oes) : NULL;
	void *bout = malloc(n * oes);
	void *dbase[5] = {0};
	char *d[5];
	size_t es[5] = {4, ges, 4, 4, oes};

	for (int k = 0; k < 5; k++) {
		dbase[k] = gpu_alloc(0, (n + off) * es[k]);
		cr_assert_not_null(dbase[k]);
		d[k] = (char *)dbase[k] + off * es[k];
	}
	rng_state = 0x1234567ull + n + off;
	for (size_t i = 0; i < n; i++) {
		hw[i] = (float)uniform(-2, 2);
		if (ns >= 1) /* states mid-run: any momentum, a positive variance */
			hs[0][i] = (float)uniform(-0.5, 0.5);
		if (ns >= 2)
			hs[1][i] = (float)uniform(0.01, 1);
	}
	cr_assert_eq(gpu_memcpy_h2d(0, d[0], hw, n * 4), 0);
	cr_assert_eq(gpu_memcpy_h2d(0, d[2], hs[0], n * 4), 0);
	cr_assert_eq(gpu_memcpy_h2d(0, d[3], hs[1], n * 4), 0);
	for (uint64_t t = 1; t <= NSTEPS; t++) {
		for (size_t i = 0; i < n; i++)
			store_d(gt, hg, i, rand_grad());
		cr_assert_eq(gpu_memcpy_h2d(0, d[1], hg, n * ges), 0);
		cr_assert_eq(optim_update(0, NULL, p, t, (float *)d[0], d[1], gt,
					  ns >= 1 ? (float *)d[2] : NULL,
					  ns >= 2 ? (float *)d[3] : NULL, oi >= 0 ? d[4] : NULL, ot,
					  n),
			     0);
		cr_assert_eq(optim_update(REDUCE_CPU, NULL, p, t, hw, hg, gt,
					  ns >= 1 ? hs[0] : NULL, ns >= 2 ? hs[1] : NULL, hout, ot,
					  n),
			     0);
	}
	cr_assert_eq(gpu_sync(0), 0);
	cr_assert_eq(gpu_memcpy_d2h(0, bw, d[0], n * 4), 0);
	cr_assert_eq(gpu_memcpy_d2h(0, bs[0], d[2], n * 4), 0);
	cr_assert_eq(gpu_memcpy_d2h(0, bs[1], d[3], n * 4), 0);
	if (oi >= 0)
		cr_assert_eq(gpu_memcpy_d2h(0, bout, d[4], n * oes), 0);
	for (size_t i = 0; i < n; i++) {
		const float *cpu[3] = {hw, hs[0], hs[1]}, *dev[3] = {bw, bs[0], bs[1]};
		for (int k = 0; k <= ns; k++) {
			float a = cpu[k][i], b = dev[k][i];
			if (fbits(a) == fbits(b))
				continue;
			if (exact)
				cr_assert_fail("gpu %s grad %s n=%zu off=%zu: array %d [%zu] = "
					       "%.9g, cpu %.9g",
					       kind_name(p), dname(gt), n, off, k, i, b, a);
			(*adam_diff)++;
			cr_assert(fabs((double)a - b) <= TOL * fmax(fabs(a), fabs(b)),
				  "gpu %s grad %s n=%zu: array %d [%zu] = %.9g, cpu %.9g",
				  kind_name(p), dname(gt), n, k, i, b, a);
		}
		if (oi < 0)
			continue;
		uint32_t got = ot == KV_FLOAT32 ? fbits(((float *)bout)[i]) : ((uint16_t *)bout)[i];
		uint32_t want = ot == KV_FLOAT32   ? fbits(bw[i])
				: ot == KV_FLOAT16 ? ref_to_half(bw[i])
						   : ref_to_bf16(bw[i]);
		cr_assert_eq(got, want, "gpu %s out %s n=%zu [%zu]: %#x want %#x", kind_name(p),
			     dname(ot), n, i, got, want);
	}
	for (int k = 0; k < 5; k++)
		gpu_free(0, dbase[k]);
	free(hw);
	free(bw);
	for (int k = 0; k < 2; k++) {
		free(hs[k]);
		free(bs[k]);
	}
	free(hg);
	free(hout);
	free(bout);
}

Test(optim_gpu, matches_cpu, .timeout = 300)
{
	static const kv_dtype dts[] = {KV_FLOAT32, KV_FLOAT16, KV_BFLOAT16};
	static const size_t gsizes[] = {1, 7, 1000, 4099, ((size_t)1 << 20) + 3};
	const struct opt_params kinds[] = {
		{.kind = OPT_SGD,
		 .lr = 0.1f,
		 .wd = 0.01f,
		 .rescale_grad = 0.5f,
		 .clip_gradient = 1},
		{.kind = OPT_SGD,
		 .lr = 0.1f,
		 .wd = 0.01f,
		 .rescale_grad = 0.5f,
		 .clip_gradient = 1,
		 .momentum = 0.9f},
		{.kind = OPT_SGD,
		 .lr = 0.1f,
		 .rescale_grad = 1,
		 .clip_gradient = -1,
		 .momentum = 0.5f},
		{.kind = OPT_NAG,
		 .lr = 0.05f,
		 .wd = 0.01f,
		 .rescale_grad = 0.5f,
		 .clip_gradient = 1,
		 .momentum = 0.9f},
		{.kind = OPT_ADAM,
		 .lr = 0.01f,
		 .wd = 0.01f,
		 .rescale_grad = 0.5f,
		 .clip_gradient = 1,
		 .beta1 = 0.9f,
		 .beta2 = 0.999f,
		 .epsilon = 1e-8f},
		{.kind = OPT_ADAMW,
		 .lr = 0.01f,
		 .wd = 0.01f,
		 .rescale_grad = 0.5f,
		 .clip_gradient = -1,
		 .beta1 = 0.9f,
		 .beta2 = 0.999f,
		 .epsilon = 1e-8f},
	};
	size_t adam_diff = 0;

	if (gpu_count() == 0)
		cr_skip_test("%s", gpu_status());
	for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++)
		for (int gi = 0; gi < 3; gi++)
			for (int oi = -1; oi < 3; oi++)
				for (size_t s = 0; s < sizeof(gsizes) / sizeof(gsizes[0]); s++)
					for (size_t off = 0; off < 2; off++) {
						/* the big one (many grid strides): fewer
						 * combinations */
						if (s == 4 && (off == 0 || (oi >= 0 && oi != gi)))
							continue;
						gpu_case(&kinds[k], dts[gi], oi, gsizes[s],
							 off * (1 + (size_t)gi), &adam_diff);
					}
	cr_log_info("optim_gpu: Adam/AdamW elements not bit-identical to the CPU: %zu", adam_diff);
}

Test(optim_gpu, invalid_device_and_zero_length)
{
	struct opt_params p = {.kind = OPT_SGD, .lr = 1, .rescale_grad = 1, .clip_gradient = -1};

	if (gpu_count() == 0)
		cr_skip_test("%s", gpu_status());
	float *w = gpu_alloc(0, 64), *g = gpu_alloc(0, 64);
	cr_assert(w && g);
	cr_assert_eq(
		optim_update(0, NULL, &p, 1, w, g, KV_FLOAT32, NULL, NULL, NULL, KV_FLOAT32, 0), 0);
	cr_assert_eq(optim_update(gpu_count() + 7, NULL, &p, 1, w, g, KV_FLOAT32, NULL, NULL, NULL,
				  KV_FLOAT32, 16),
		     KV_ERR_INVALID);
	cr_assert_eq(gpu_sync(0), 0);
	gpu_free(0, w);
	gpu_free(0, g);
}
