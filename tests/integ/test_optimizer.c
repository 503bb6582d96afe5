/* SPDX-License-Identifier: MIT */
/*
 * test_optimizer.c - the optimizer in the store and optimizer-state
 * checkpoints, end to end (issue "Optimizer in the store, and
 * optimizer-state checkpoints"; the design's optimizer and checkpoint contract).
 *
 *  - kv_set_optimizer: the spec grammar and its errors (KV_ERR_INVALID with
 *    the offending word in kv_last_error: the whole "param=value" word when
 *    the word is malformed or its value is not a finite number or out of
 *    range, the name when the optimizer or parameter is unknown or a
 *    parameter is repeated), its collective behaviour (returns
 *    once every rank called it; a rank with another spec gets
 *    KV_ERR_MISMATCH), setting the same optimizer again keeps the per-key
 *    states, another optimizer starts fresh ones.
 *  - values: SGD (momentum 0, momentum 0.9, Nesterov), Adam and AdamW with
 *    wd, rescale_grad != 1 and clip_gradient (which triggers for part of the
 *    elements), 10 rounds, 2 and 4 ranks, on f32 keys of a few hundred
 *    elements and of 300,000 elements (> 1 MiB: kvd's engine path), and on
 *    one f16 and one bf16 key (f32 master weights, the value returned is the
 *    master weight rounded to the key's dtype).  MXNet's own expected values
 *    (two ranks, gradient 1: "sgd lr=1" gives -2; momentum 0.5 gives -2, -5).
 *    push then pull returns the updated weight.
 *  - checkpoints: save after 5 rounds, run 5 more, load, rerun the same 5:
 *    bit-identical weights (dump 1 and 0); a truncated file, a flipped byte,
 *    another job's file with other keys, a file that is no checkpoint, a
 *    missing file, a save into a missing directory - each an error that
 *    leaves the job's state untouched; no temp file left after a save;
 *    kill -9 of kvd during a save never leaves a torn file.
 *
 * Expected values never come from the project's code: a plain double loop
 * applies the formulas of kernels/optim.h (MXNet 1.9's) to the sum of every
 * rank's gradient, which each rank computes with the same pure function.
 * Gradients are multiples of 1/1024 (f32 keys) or 1/32 (f16, bf16 keys)
 * small enough that every sum over ranks is exact in the key's dtype, so the
 * reduce adds no error and it does not matter whether kvd rounds the sum to
 * f16/bf16 before the update.  The parameters are those kvd holds: each
 * value of the spec read as a double and rounded to f32.
 *
 * Tolerance.  kvd computes in f32, the reference in double.  The issue asks
 * for 1e-6 relative; an implementation that follows optim.h exactly can be
 * further off than that where a value comes out of a cancellation, and
 * rounding errors add up over 10 rounds (SGD without momentum rounds
 * (1 - lr*wd), its product with w and the difference each round: up to
 * 30 u |w| = 1.8e-6 |w| after 10 rounds, u = 2^-24).  So along with the
 * reference the test carries a first-order bound of the error of f32
 * arithmetic done in optim.h's order (each operation adds u times its
 * result; errors of operands propagate through the operation's partial
 * derivatives; sqrt near 0 through sqrt(e)), and accepts
 *     |got - ref| <= max(1e-6 |ref|, 1e-7, 1.25 * bound)
 * for f32 keys (1.25: headroom for FMA contraction and reordering of the
 * same operations).  Weights start in +-[1, 2) and move less than 1 over
 * the 10 rounds, so the bound stays close to 1e-6 |ref| and the 1e-7 floor
 * never decides; a wrong formula (a missing wd, clip at the wrong place, no
 * bias correction, a reset momentum) is off by 1e-4 or more.  For f16/bf16
 * keys the returned value must lie within one ulp (of the dtype) of the
 * reference rounded to that dtype to nearest even.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define U_F32 (1.0 / 16777216.0) /* unit roundoff of f32, 2^-24 */

/* ---------------------------------------------------------------- small helpers */

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t hash4(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
	return mix64(mix64(mix64(mix64(a) ^ b) ^ c) ^ d);
}

static uint64_t fnv64(const void *p, size_t n)
{
	const unsigned char *c = p;
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++)
		h = (h ^ c[i]) * 0x100000001b3ull;
	return h;
}

/* A case-insensitive "does s contain any of these words" for error messages. */
static int mentions(const char *s, const char *a, const char *b, const char *c, const char *d)
{
	const char *w[4] = { a, b, c, d };

	for (int i = 0; i < 4; i++)
		if (s && w[i] && strcasestr(s, w[i]))
			return 1;
	return 0;
}

static void dump_log(const struct kvd_proc *k)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "echo '--- kvd log ---' >&2; tail -n 40 %s >&2", k->log);
	if (system(cmd) != 0)
		fprintf(stderr, "(no log)\n");
}

static void run_job(const char *job, int n, rank_fn fn, void *arg, int timeout_s)
{
	struct kvd_proc k;
	char why[256];
	int rc;

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	rc = run_ranks(&k, job, n, fn, arg, timeout_s, why, sizeof(why));
	if (rc)
		dump_log(&k);
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

/* An out-of-band barrier for forked ranks: nothing is pending in kvd while
 * ranks wait here. */
struct shared {
	pthread_barrier_t bar;
	uint64_t h1, h2;  /* kill test: hashes of the weights in the old/new file */
	int saved2_rc;    /* kill test: what the interrupted save returned */
	int saved2_done;
	int which;        /* kill test: 1 old file loaded, 2 new file */
	double save_s;    /* kill test: how long the first save took */
};

static struct shared *shared_new(int n)
{
	struct shared *s = mmap(NULL, sizeof(*s), PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pthread_barrierattr_t a;

	cr_assert(s != MAP_FAILED, "mmap");
	memset(s, 0, sizeof(*s));
	pthread_barrierattr_init(&a);
	pthread_barrierattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
	cr_assert_eq(pthread_barrier_init(&s->bar, &a, (unsigned)n), 0);
	pthread_barrierattr_destroy(&a);
	return s;
}

static void shared_free(struct shared *s)
{
	pthread_barrier_destroy(&s->bar);
	munmap(s, sizeof(*s));
}

static void rm_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	char p[512];

	if (!d)
		return;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
		unlink(p);
	}
	closedir(d);
	rmdir(dir);
}

/* ---------------------------------------------------------------- f16 / bf16 */

/* x rounded to `bits` significant bits, to nearest even (normal range only) */
static double round_sig(double x, int bits)
{
	int e;
	double m;

	if (x == 0 || !isfinite(x))
		return x;
	m = frexp(x, &e);
	return ldexp(nearbyint(ldexp(m, bits)), e - bits);
}

/* one ulp of a value of `bits` significant bits (normal range) */
static double ulp_of(double x, int bits)
{
	int e;

	if (x == 0)
		return ldexp(1, -24);
	frexp(x, &e);
	return ldexp(1, e - bits);
}

/* x must be exactly representable as a normal f16 (or zero) */
static uint16_t f16_bits(double x)
{
	uint16_t s = 0;
	int e;
	double m;

	if (x == 0)
		return 0;
	if (x < 0) {
		s = 0x8000;
		x = -x;
	}
	m = frexp(x, &e); /* x = m 2^e = (2m) 2^(e-1), 2m in [1, 2) */
	return (uint16_t)(s | (uint16_t)((e - 1 + 15) << 10) | (uint16_t)((2 * m - 1) * 1024));
}

static double f16_value(uint16_t h)
{
	int s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;

	if (e == 0)
		return s * ldexp(m, -24);
	if (e == 31)
		return m ? NAN : s * INFINITY;
	return s * ldexp(1024 + m, e - 25);
}

/* x must be exactly representable as bf16 */
static uint16_t bf16_bits(double x)
{
	float f = (float)x;
	uint32_t u;

	memcpy(&u, &f, 4);
	return (uint16_t)(u >> 16);
}

static double bf16_value(uint16_t b)
{
	uint32_t u = (uint32_t)b << 16;
	float f;

	memcpy(&f, &u, 4);
	return f;
}

static size_t dsize(kv_dtype t) { return t == KV_FLOAT32 ? 4 : 2; }

static void put_val(void *buf, kv_dtype t, size_t i, double v)
{
	if (t == KV_FLOAT32)
		((float *)buf)[i] = (float)v;
	else if (t == KV_FLOAT16)
		((uint16_t *)buf)[i] = f16_bits(v);
	else
		((uint16_t *)buf)[i] = bf16_bits(v);
}

static double get_val(const void *buf, kv_dtype t, size_t i)
{
	if (t == KV_FLOAT32)
		return ((const float *)buf)[i];
	if (t == KV_FLOAT16)
		return f16_value(((const uint16_t *)buf)[i]);
	return bf16_value(((const uint16_t *)buf)[i]);
}

static const char *dname(kv_dtype t)
{
	return t == KV_FLOAT32 ? "f32" : t == KV_FLOAT16 ? "f16" : "bf16";
}

/* ---------------------------------------------------------------- the reference */

enum { K_SGD = 1, K_NAG, K_ADAM, K_ADAMW };

struct optp {
	int kind;
	double lr, wd, rg, clip, mom, b1, b2, eps; /* each the f32 value kvd holds */
};

static double as_f32(const char *s) { return (double)(float)strtod(s, NULL); }

/* The test's own reading of a (valid) spec; defaults as MXNet's. */
static void parse_spec(const char *spec, struct optp *p)
{
	char buf[256], *save = NULL, *w;
	int nesterov = 0;

	memset(p, 0, sizeof(*p));
	p->lr = (float)0.01;
	p->rg = 1;
	p->clip = -1;
	p->b1 = (float)0.9;
	p->b2 = (float)0.999;
	p->eps = (float)1e-8;
	snprintf(buf, sizeof(buf), "%s", spec);
	w = strtok_r(buf, " ", &save);
	p->kind = !strcmp(w, "sgd") ? K_SGD : !strcmp(w, "adam") ? K_ADAM : K_ADAMW;
	while ((w = strtok_r(NULL, " ", &save))) {
		char *eq = strchr(w, '=');
		double v;

		*eq = 0;
		v = as_f32(eq + 1);
		if (!strcmp(w, "lr"))
			p->lr = v;
		else if (!strcmp(w, "wd"))
			p->wd = v;
		else if (!strcmp(w, "rescale_grad"))
			p->rg = v;
		else if (!strcmp(w, "clip_gradient"))
			p->clip = v;
		else if (!strcmp(w, "momentum"))
			p->mom = v;
		else if (!strcmp(w, "nesterov"))
			nesterov = v != 0;
		else if (!strcmp(w, "beta1"))
			p->b1 = v;
		else if (!strcmp(w, "beta2"))
			p->b2 = v;
		else if (!strcmp(w, "epsilon"))
			p->eps = v;
	}
	if (p->kind == K_SGD && nesterov)
		p->kind = K_NAG;
}

/* one element's exact value and error bound of an f32 computation */
struct el {
	double w, s0, s1;    /* reference */
	double ew, es0, es1; /* bound of |f32 - reference| */
};

static double clipv(double x, double c, int *clipped)
{
	if (c < 0)
		return x;
	if (x > c || x < -c) {
		(*clipped)++;
		return x > c ? c : -c;
	}
	return x;
}

/* Error bounds of the operations, first order: result r of a op b. */
#define RND(r) (U_F32 * fabs(r))
static double e_mul(double a, double ea, double b, double eb)
{
	return fabs(a) * eb + fabs(b) * ea + RND(a * b);
}
static double e_add(double ea, double eb, double r) { return ea + eb + RND(r); }

/* (lr_t * s0) / (sqrt(s1) + eps), with bound */
static double adam_step(double lrt, double s0, double es0, double s1, double es1, double eps,
			double *e)
{
	double sq = sqrt(s1), esq, den, eden, num, enm, q, lo;

	esq = (s1 > 0 ? fmin(es1 / (2 * sq), sqrt(es1)) : sqrt(es1)) + RND(sq);
	den = sq + eps;
	eden = esq + RND(den);
	num = lrt * s0;
	enm = lrt * es0 + RND(num);
	q = num / den;
	lo = den - eden > 0 ? den - eden : den * 0.5;
	*e = enm / lo + fabs(num) * eden / (den * lo) + RND(q);
	return q;
}

/* One update of one element with summed gradient graw at step t (>= 1). */
static void ref_step(const struct optp *p, uint64_t t, struct el *x, double graw, int *clipped)
{
	double w = x->w, ew = x->ew;
	double g = p->rg * graw, eg = RND(g); /* rescale_grad * g */

	switch (p->kind) {
	case K_SGD:
		if (p->mom == 0) {
			double lw = p->lr * p->wd, elw = RND(lw);
			double a = 1 - lw, ea = e_add(elw, 0, a);
			double aw = a * w, eaw = e_mul(a, ea, w, ew);
			double lg, elg;

			g = clipv(g, p->clip, clipped);
			lg = p->lr * g;
			elg = p->lr * eg + RND(lg);
			x->w = aw - lg;
			x->ew = e_add(eaw, elg, x->w);
			break;
		}
		/* SGD's momentum is NAG's (lr inside it) */
		__attribute__((fallthrough));
	case K_NAG: {
		/* s0 = mom * s0 - lr * g2; SGD: w = w + s0; MXNet's nag_mom_update:
		 * w = w - m + (mom + 1) * s0, with m = mom * s0 before */
		double wdw, ewdw, g2, eg2, ms, ems, lg, elg;

		g = clipv(g, p->clip, clipped);
		wdw = p->wd * w;
		ewdw = p->wd * ew + RND(wdw);
		g2 = g + wdw;
		eg2 = e_add(eg, ewdw, g2);
		ms = p->mom * x->s0;
		ems = p->mom * x->es0 + RND(ms);
		lg = p->lr * g2;
		elg = p->lr * eg2 + RND(lg);
		x->s0 = ms - lg;
		x->es0 = e_add(ems, elg, x->s0);
		if (p->kind == K_SGD) {
			x->w = w + x->s0;
			x->ew = e_add(ew, x->es0, x->w);
		} else {
			double d = w - ms, ed = e_add(ew, ems, d), c = p->mom + 1, ec = RND(c);
			double cs = c * x->s0, ecs = e_mul(c, ec, x->s0, x->es0);

			x->w = d + cs;
			x->ew = e_add(ed, ecs, x->w);
		}
		break;
	}
	case K_ADAM:
	case K_ADAMW: {
		double lrt = (double)(float)(p->lr * sqrt(1 - pow(p->b2, (double)t)) /
					     (1 - pow(p->b1, (double)t)));
		double c1 = 1 - p->b1, ec1 = RND(c1), c2 = 1 - p->b2, ec2 = RND(c2);
		double b1s, eb1s, c1g, ec1g, b2s, eb2s, c2g, ec2g, c2gg, ec2gg, q, eq;

		if (p->kind == K_ADAM) {
			double wdw = p->wd * w, ewdw = p->wd * ew + RND(wdw);
			g = g + wdw;
			eg = e_add(eg, ewdw, g);
		}
		g = clipv(g, p->clip, clipped);
		b1s = p->b1 * x->s0;
		eb1s = p->b1 * x->es0 + RND(b1s);
		c1g = c1 * g;
		ec1g = e_mul(c1, ec1, g, eg);
		x->s0 = b1s + c1g;
		x->es0 = e_add(eb1s, ec1g, x->s0);
		b2s = p->b2 * x->s1;
		eb2s = p->b2 * x->es1 + RND(b2s);
		c2g = c2 * g;
		ec2g = e_mul(c2, ec2, g, eg);
		c2gg = c2g * g;
		ec2gg = e_mul(c2g, ec2g, g, eg);
		x->s1 = b2s + c2gg;
		x->es1 = e_add(eb2s, ec2gg, x->s1);
		q = adam_step(lrt, x->s0, x->es0, x->s1, x->es1, p->eps, &eq);
		if (p->kind == K_ADAM) {
			x->w = w - q;
			x->ew = e_add(ew, eq, x->w);
		} else {
			double w1 = w - q, ew1 = e_add(ew, eq, w1);
			double lw = p->lr * p->wd, elw = RND(lw);
			double d = lw * w, ed = e_mul(lw, elw, w, ew);
			x->w = w1 - d;
			x->ew = e_add(ew1, ed, x->w);
		}
		break;
	}
	}
}

/* ---------------------------------------------------------------- keys */

struct keyspec {
	const char *name;
	size_t count;
	kv_dtype t;
};

struct key {
	const struct keyspec *ks;
	uint64_t seed;
	uint64_t t; /* updates so far (Adam's step) */
	struct el *e;
	void *grad, *out;
	double max_rel; /* largest |got - ref| / (1e-6 |ref|) seen, f32 keys */
	int clipped;    /* elements clipped (reference), all rounds */
};

/* This rank's gradient of element i in round `round` (from 1): exact sums. */
static double grad_val(const struct key *K, int rank, int round, size_t i)
{
	uint64_t h = hash4(K->seed, (uint64_t)rank + 1, (uint64_t)round, i);

	if (K->ks->t == KV_FLOAT32)
		return (double)((int)(h % 2049) - 1024) / 1024.0;
	return (double)((int)(h % 63) - 31) / 32.0;
}

/* The initial weight: +-[1, 2), exact in the key's dtype. */
static double init_val(const struct key *K, size_t i)
{
	uint64_t h = hash4(K->seed, 0xabcdef, 0, i);
	double s = (h & 1) ? -1 : 1;

	if (K->ks->t == KV_FLOAT32)
		return s * (1 + (double)((h >> 8) & 0x7fffff) / 8388608.0);
	if (K->ks->t == KV_FLOAT16)
		return s * (1 + (double)((h >> 8) & 1023) / 1024.0);
	return s * (1 + (double)((h >> 8) & 127) / 128.0);
}

static int key_setup(struct key *K, const struct keyspec *ks, uint64_t seed)
{
	memset(K, 0, sizeof(*K));
	K->ks = ks;
	K->seed = seed;
	K->e = calloc(ks->count, sizeof(*K->e));
	K->grad = malloc(ks->count * dsize(ks->t));
	K->out = malloc(ks->count * dsize(ks->t));
	if (!K->e || !K->grad || !K->out)
		return -1;
	for (size_t i = 0; i < ks->count; i++)
		K->e[i].w = init_val(K, i);
	return 0;
}

static void key_free(struct key *K)
{
	free(K->e);
	free(K->grad);
	free(K->out);
}

/* Fresh optimizer states (another optimizer was set). */
static void key_reset_states(struct key *K)
{
	K->t = 0;
	for (size_t i = 0; i < K->ks->count; i++) {
		K->e[i].s0 = K->e[i].s1 = 0;
		K->e[i].es0 = K->e[i].es1 = 0;
	}
}

/* kv_init with rank 0's value the initial weight (other ranks pass junk). */
static int key_init(kv_store *kv, struct key *K, int rank)
{
	for (size_t i = 0; i < K->ks->count; i++)
		put_val(K->grad, K->ks->t, i, rank == 0 ? K->e[i].w : 8.0 + rank);
	CHECK_RC(kv_init(kv, K->ks->name, K->grad, K->ks->count, K->ks->t), KV_OK);
	return 0;
}

static void key_fill_grad(struct key *K, int rank, int round)
{
	for (size_t i = 0; i < K->ks->count; i++)
		put_val(K->grad, K->ks->t, i, grad_val(K, rank, round, i));
}

/* The reference's update for round `round` (sum over n ranks). */
static void key_ref_round(struct key *K, const struct optp *p, int n, int round)
{
	K->t++;
	for (size_t i = 0; i < K->ks->count; i++) {
		double g = 0;
		for (int r = 0; r < n; r++)
			g += grad_val(K, r, round, i);
		ref_step(p, K->t, &K->e[i], g, &K->clipped);
	}
}

/* out (the key's dtype) against the reference */
static int key_check(struct key *K, const void *out, const char *what, int round)
{
	kv_dtype t = K->ks->t;

	for (size_t i = 0; i < K->ks->count; i++) {
		double ref = K->e[i].w, got = get_val(out, t, i);

		if (t == KV_FLOAT32) {
			double tol = fmax(fmax(1e-6 * fabs(ref), 1e-7), 1.25 * K->e[i].ew);
			double err = fabs(got - ref);
			CHECK(err <= tol,
			      "%s: key %s (f32, %zu elems) round %d elem %zu: got %.9g, want %.9g "
			      "(|diff| %.3g, tolerance %.3g)",
			      what, K->ks->name, K->ks->count, round, i, got, ref, err, tol);
			if (err / (1e-6 * fabs(ref)) > K->max_rel)
				K->max_rel = err / (1e-6 * fabs(ref));
		} else {
			int bits = t == KV_FLOAT16 ? 11 : 8;
			double rr = round_sig(ref, bits);
			CHECK(fabs(got - rr) <= ulp_of(rr, bits),
			      "%s: key %s (%s) round %d elem %zu: got %.9g, want %.9g (reference "
			      "%.9g rounded to %s), more than one ulp apart",
			      what, K->ks->name, dname(t), round, i, got, rr, ref, dname(t));
		}
	}
	return 0;
}

/* One pushpull round on K: the gradient in, the updated weight out. */
static int key_round(kv_store *kv, struct key *K, const struct optp *p, int rank, int n,
		     int round, int check)
{
	key_fill_grad(K, rank, round);
	memset(K->out, 0xff, K->ks->count * dsize(K->ks->t));
	CHECK_RC(kv_pushpull(kv, K->ks->name, K->grad, K->out, K->ks->count, K->ks->t, 0),
		 KV_OK);
	if (!check)
		return 0;
	key_ref_round(K, p, n, round);
	return key_check(K, K->out, "pushpull", round);
}

/* kv_pull of K equals its last pushpull result, bit for bit. */
static int key_pull_same(kv_store *kv, struct key *K, const char *what)
{
	size_t bytes = K->ks->count * dsize(K->ks->t);
	void *v = malloc(bytes);

	CHECK(v, "malloc");
	memset(v, 0xa5, bytes);
	CHECK_RC(kv_pull(kv, K->ks->name, v, K->ks->count, K->ks->t, 0), KV_OK);
	for (size_t i = 0; i < K->ks->count; i++)
		CHECK(!memcmp((char *)v + i * dsize(K->ks->t), (char *)K->out + i * dsize(K->ks->t),
			      dsize(K->ks->t)),
		      "%s: kv_pull of %s elem %zu is %.9g, the last pushpull gave %.9g", what,
		      K->ks->name, i, get_val(v, K->ks->t, i), get_val(K->out, K->ks->t, i));
	free(v);
	return 0;
}

/* ---------------------------------------------------------------- values: 10 rounds */

static const struct keyspec value_keys[] = {
	{ "small", 333, KV_FLOAT32 },
	{ "large", 300000, KV_FLOAT32 }, /* 1.2 MB: more than 1 MiB */
	{ "half", 257, KV_FLOAT16 },
	{ "brain", 259, KV_BFLOAT16 },
};
#define NVKEYS (sizeof(value_keys) / sizeof(value_keys[0]))

static int values_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const char *spec = arg;
	struct optp p;
	struct key K[NVKEYS];
	kv_store *kv = open_rank(30000);

	CHECK(kv, "open");
	parse_spec(spec, &p);
	for (size_t j = 0; j < NVKEYS; j++) {
		CHECK(!key_setup(&K[j], &value_keys[j], 1000 + j), "malloc");
		if (key_init(kv, &K[j], rank))
			return 1;
	}
	CHECK_RC(kv_is_capable(kv, "optimizer"), 1);
	{
		int rc = kv_set_optimizer(kv, spec);
		CHECK(rc == KV_OK, "kv_set_optimizer(\"%s\"): %d (%s): %s", spec, rc,
		      kv_strerror(rc), kv_last_error(kv));
	}
	for (int round = 1; round <= 10; round++)
		for (size_t j = 0; j < NVKEYS; j++)
			if (key_round(kv, &K[j], &p, rank, n, round, 1))
				return 1;
	for (size_t j = 0; j < NVKEYS; j++) {
		if (key_pull_same(kv, &K[j], "after 10 rounds"))
			return 1;
		/* the data must exercise the clip (some elements, not all) */
		CHECK(K[j].clipped > 0 && (size_t)K[j].clipped < 10 * K[j].ks->count,
		      "test data: key %s clipped %d of %zu element-rounds", K[j].ks->name,
		      K[j].clipped, 10 * K[j].ks->count);
	}
	if (rank == 0 && getenv("KVTEST_VERBOSE"))
		fprintf(stderr, "optimizer \"%s\", %d ranks: max |err| / (1e-6 |ref|): small %.3f "
			"large %.3f\n", spec, n, K[0].max_rel, K[1].max_rel);
	for (size_t j = 0; j < NVKEYS; j++)
		key_free(&K[j]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

#define SPEC_SGD  "sgd lr=0.05 wd=0.1 rescale_grad=0.7 clip_gradient=1"
#define SPEC_MOM  "sgd lr=0.02 momentum=0.9 wd=0.1 rescale_grad=0.7 clip_gradient=1"
#define SPEC_NAG  "sgd lr=0.02 momentum=0.9 nesterov=1 wd=0.1 rescale_grad=0.7 clip_gradient=1"
#define SPEC_ADAM "adam lr=0.01 beta1=0.9 beta2=0.99 epsilon=1e-3 wd=0.1 rescale_grad=0.7 clip_gradient=1"
#define SPEC_ADAMW \
	"adamw lr=0.01 beta1=0.8 beta2=0.995 epsilon=1e-4 wd=0.05 rescale_grad=0.7 clip_gradient=1"

Test(optimizer, values_sgd_n2, .timeout = 60) { run_job("v-sgd2", 2, values_rank, SPEC_SGD, 50); }
Test(optimizer, values_sgd_n4, .timeout = 60) { run_job("v-sgd4", 4, values_rank, SPEC_SGD, 50); }
Test(optimizer, values_sgd_momentum_n2, .timeout = 60)
{
	run_job("v-mom2", 2, values_rank, SPEC_MOM, 50);
}
Test(optimizer, values_sgd_momentum_n4, .timeout = 60)
{
	run_job("v-mom4", 4, values_rank, SPEC_MOM, 50);
}
Test(optimizer, values_nesterov_n2, .timeout = 60) { run_job("v-nag2", 2, values_rank, SPEC_NAG, 50); }
Test(optimizer, values_nesterov_n4, .timeout = 60) { run_job("v-nag4", 4, values_rank, SPEC_NAG, 50); }
Test(optimizer, values_adam_n2, .timeout = 60) { run_job("v-adam2", 2, values_rank, SPEC_ADAM, 50); }
Test(optimizer, values_adam_n4, .timeout = 60) { run_job("v-adam4", 4, values_rank, SPEC_ADAM, 50); }
Test(optimizer, values_adamw_n2, .timeout = 60)
{
	run_job("v-adamw2", 2, values_rank, SPEC_ADAMW, 50);
}
Test(optimizer, values_adamw_n4, .timeout = 60)
{
	run_job("v-adamw4", 4, values_rank, SPEC_ADAMW, 50);
}

/* The reference itself, against numbers worked by hand (no kvd). */
Test(optimizer, reference_by_hand)
{
	struct optp p;
	struct el x = { .w = 0 };
	int c = 0;

	parse_spec("sgd lr=1 momentum=0.5", &p);
	ref_step(&p, 1, &x, 2, &c);
	cr_assert_eq(x.w, -2);
	ref_step(&p, 2, &x, 2, &c);
	cr_assert_eq(x.w, -5);
	parse_spec("sgd lr=0.5 wd=0.5 rescale_grad=2 clip_gradient=1", &p);
	x = (struct el){ .w = 1 };
	ref_step(&p, 1, &x, 3, &c); /* (1 - 0.25) * 1 - 0.5 * clip(6) = 0.25 */
	cr_assert_eq(x.w, 0.25);
	cr_assert_eq(c, 1);
	parse_spec("adam lr=1 beta1=0.5 beta2=0.75 epsilon=1", &p);
	x = (struct el){ .w = 0 };
	/* t=1: s0 = 0.5*2 = 1, s1 = 0.25*4 = 1, lr_t = sqrt(0.25)/0.5 = 1:
	 * w = -1 * 1 / (1 + 1) = -0.5 */
	ref_step(&p, 1, &x, 2, &c);
	cr_assert_float_eq(x.w, -0.5, 1e-7);
	cr_assert_eq(round_sig(1.0 + 3.0 / 2048, 11), 1.0 + 2.0 / 1024); /* tie to even */
	cr_assert_eq(f16_value(f16_bits(-1.5)), -1.5);
	cr_assert_eq(bf16_value(bf16_bits(1.0078125)), 1.0078125);
}

/* ---------------------------------------------------------------- MXNet's values */

static int mx_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	int momentum = *(int *)arg;
	kv_store *kv = open_rank(20000);
	float v[16], one[16];

	CHECK(kv, "open");
	for (int i = 0; i < 16; i++) {
		v[i] = 0;
		one[i] = 1;
	}
	CHECK_RC(kv_init(kv, "3", v, 16, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_set_optimizer(kv, momentum ? "sgd lr=1 momentum=0.5" : "sgd lr=1"), KV_OK);
	for (int round = 1; round <= (momentum ? 2 : 1); round++) {
		float want = round == 1 ? -2.0f : -5.0f;
		CHECK_RC(kv_pushpull(kv, "3", one, v, 16, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 16; i++)
			CHECK(v[i] == want, "round %d: pushpull gave %g, want %g", round,
			      (double)v[i], (double)want);
		memset(v, 0, sizeof(v));
		CHECK_RC(kv_pull(kv, "3", v, 16, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 16; i++)
			CHECK(v[i] == want, "round %d: pull gave %g, want %g", round, (double)v[i],
			      (double)want);
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, mxnet_sgd_values, .timeout = 30)
{
	int no = 0, yes = 1;
	run_job("mx-sgd", 2, mx_rank, &no, 25);
	run_job("mx-mom", 2, mx_rank, &yes, 25);
}

/* A broadcast replaces an f16/bf16 key's weight: the f32 master copy the
 * optimizer updates too, so the next round starts from the broadcast value. */
struct bcast_arg {
	kv_dtype t;
	size_t count;
};

static uint16_t bits16(kv_dtype t, double v)
{
	return t == KV_FLOAT16 ? f16_bits(v) : bf16_bits(v);
}

static double value16(kv_dtype t, uint16_t h)
{
	return t == KV_FLOAT16 ? f16_value(h) : bf16_value(h);
}

static int bcast_master_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const struct bcast_arg *a = arg;
	kv_store *kv = open_rank(20000);
	uint16_t *v = malloc(a->count * 2), *g = malloc(a->count * 2);
	/* sgd lr=1 over n ranks each pushing 0.25: the weight moves by -0.25 n */
	const double step = -0.25 * n, want[3] = { step, 10, 10 + step };

	CHECK(kv && v && g, "open");
	for (size_t i = 0; i < a->count; i++) {
		v[i] = bits16(a->t, 0);
		g[i] = bits16(a->t, 0.25);
	}
	CHECK_RC(kv_init(kv, "w", v, a->count, a->t), KV_OK);
	CHECK_RC(kv_set_optimizer(kv, "sgd lr=1"), KV_OK);
	for (int step_no = 0; step_no < 3; step_no++) {
		if (step_no == 1) {
			for (size_t i = 0; i < a->count; i++)
				v[i] = bits16(a->t, rank == 0 ? 10 : -77);
			CHECK_RC(kv_broadcast(kv, "w", v, v, a->count, a->t, 0), KV_OK);
		} else {
			CHECK_RC(kv_pushpull(kv, "w", g, v, a->count, a->t, 0), KV_OK);
		}
		for (size_t i = 0; i < a->count; i++)
			CHECK(value16(a->t, v[i]) == want[step_no],
			      "step %d, element %zu: %g, want %g", step_no, i,
			      value16(a->t, v[i]), want[step_no]);
	}
	free(v);
	free(g);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, broadcast_replaces_the_master_copy, .timeout = 60)
{
	/* small keys (direct until the optimizer moves them) and a multi-part one */
	struct bcast_arg cases[] = { { KV_FLOAT16, 16 }, { KV_BFLOAT16, 16 },
				     { KV_FLOAT16, 700000 }, { KV_BFLOAT16, 700000 } };
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		run_job("bcast-master", 2, bcast_master_rank, &cases[i], 25);
}

/* ---------------------------------------------------------------- push, then pull */

static const struct keyspec pp_key = { "pp", 500, KV_FLOAT32 };

static int push_pull_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct optp p;
	struct key K;
	kv_store *kv = open_rank(20000);

	CHECK(kv, "open");
	parse_spec(SPEC_MOM, &p);
	CHECK(!key_setup(&K, &pp_key, 77), "malloc");
	if (key_init(kv, &K, rank))
		return 1;
	CHECK_RC(kv_set_optimizer(kv, SPEC_MOM), KV_OK);
	for (int round = 1; round <= 4; round++) {
		key_fill_grad(&K, rank, round);
		CHECK_RC(kv_push(kv, "pp", K.grad, K.ks->count, KV_FLOAT32, 0), KV_OK);
		memset(K.out, 0, K.ks->count * 4);
		CHECK_RC(kv_pull(kv, "pp", K.out, K.ks->count, KV_FLOAT32, 0), KV_OK);
		key_ref_round(&K, &p, n, round);
		if (key_check(&K, K.out, "push then pull", round))
			return 1;
		/* a second pull changes nothing */
		if (key_pull_same(kv, &K, "second pull"))
			return 1;
	}
	key_free(&K);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, push_then_pull, .timeout = 30) { run_job("pushpull", 2, push_pull_rank, NULL, 25); }

/* ---------------------------------------------------------------- spec grammar */

static int spec_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const char *good[] = {
		"sgd",
		"sgd lr=0",
		"sgd lr=1e-3 momentum=0 nesterov=0 wd=0 rescale_grad=2 clip_gradient=-1",
		"sgd lr=0.1 momentum=0.9 nesterov=1 wd=1e-4 rescale_grad=0.5 clip_gradient=5",
		"adam lr=0.001 beta1=0 beta2=0.999 epsilon=1e-8 wd=0 rescale_grad=1 clip_gradient=1",
		"adamw lr=.5 beta1=0.9 beta2=0.5 epsilon=2 wd=0.1",
	};
	static const struct {
		const char *spec, *word;
	} bad[] = {
		{ "rmsprop lr=0.1", "rmsprop" },
		{ "sgd foo=1", "foo" },
		{ "adam lr=0.1 bogus=2", "bogus" },
		{ "sgd lr=0.1 lr=0.2", "lr" }, /* a repeated parameter: its name */
		{ "adam beta1=0.9 beta1=0.9", "beta1" },
		{ "sgd lr", "lr" },
		{ "sgd lr=", "lr=" },
		{ "sgd =1", "=1" },
		{ "sgd lr=nan", "lr=nan" },
		{ "sgd lr=inf", "lr=inf" },
		{ "sgd wd=-inf", "wd=-inf" },
		{ "sgd lr=1e999", "lr=1e999" },
		{ "sgd lr=abc", "lr=abc" },
		{ "sgd lr=0.1x", "lr=0.1x" },
		{ "sgd lr=-0.1", "lr=-0.1" },
		{ "sgd wd=-1e-4", "wd=-1e-4" },
		{ "sgd momentum=1", "momentum=1" },
		{ "sgd momentum=-0.5", "momentum=-0.5" },
		{ "sgd nesterov=2", "nesterov=2" },
		{ "sgd nesterov=0.5", "nesterov=0.5" },
		{ "adam beta1=1", "beta1=1" },
		{ "adam beta2=1.5", "beta2=1.5" },
		{ "adamw beta1=-0.1", "beta1=-0.1" },
		{ "adam epsilon=0", "epsilon=0" },
		{ "adamw epsilon=-1e-8", "epsilon=-1e-8" },
		{ "adam rescale_grad=nan", "rescale_grad=nan" },
		{ "sgd clip_gradient=inf", "clip_gradient=inf" },
		{ "sgd beta1=0.9", "beta1" },
		{ "adam momentum=0.9", "momentum" },
		{ "adamw nesterov=1", "nesterov" },
		{ "", NULL },
		{ "lr=0.1", "lr=0.1" },
	};
	kv_store *kv = open_rank(20000);
	float v[8] = { 0 }, g[8];
	int rc;

	CHECK(kv, "open");
	CHECK_RC(kv_is_capable(kv, "optimizer"), 1);
	CHECK_RC(kv_init(kv, "w", v, 8, KV_FLOAT32), KV_OK);
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		rc = kv_set_optimizer(kv, good[i]);
		CHECK(rc == KV_OK, "valid spec \"%s\": %d (%s): %s", good[i], rc, kv_strerror(rc),
		      kv_last_error(kv));
	}
	CHECK_RC(kv_set_optimizer(kv, "sgd lr=1"), KV_OK);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		const char *e;

		rc = kv_set_optimizer(kv, bad[i].spec);
		e = kv_last_error(kv);
		CHECK(rc == KV_ERR_INVALID, "spec \"%s\": %d (%s), want KV_ERR_INVALID (%s)",
		      bad[i].spec, rc, kv_strerror(rc), e ? e : "(no message)");
		CHECK(!bad[i].word || (e && strstr(e, bad[i].word)),
		      "spec \"%s\": kv_last_error \"%s\" does not name \"%s\"", bad[i].spec,
		      e ? e : "(null)", bad[i].word);
	}
	/* none of them replaced "sgd lr=1": one rank, gradient 1, from 0 */
	for (int i = 0; i < 8; i++)
		g[i] = 1;
	CHECK_RC(kv_pushpull(kv, "w", g, v, 8, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 8; i++)
		CHECK(v[i] == -1.0f, "after the rejected specs: %g, want -1 (\"sgd lr=1\")",
		      (double)v[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, spec_grammar_and_errors, .timeout = 30) { run_job("spec", 1, spec_rank, NULL, 25); }

/* ---------------------------------------------------------------- collective */

static int coll_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	float v[16] = { 0 }, g[16];
	double t0, dt;
	int rc;

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "w", v, 16, KV_FLOAT32), KV_OK);
	/* returns once every rank has called it */
	if (rank == 1)
		usleep(400000);
	t0 = now_s();
	CHECK_RC(kv_set_optimizer(kv, "sgd lr=0.5"), KV_OK);
	dt = now_s() - t0;
	if (rank != 1)
		CHECK(dt > 0.25, "kv_set_optimizer returned after %.3f s, before rank 1 called it",
		      dt);
	/* a rank with another spec gets KV_ERR_MISMATCH, then joins with the right one */
	if (rank == 2) {
		usleep(300000); /* the others called first */
		rc = kv_set_optimizer(kv, "sgd lr=0.3");
		CHECK(rc == KV_ERR_MISMATCH, "other lr: %d (%s), want KV_ERR_MISMATCH: %s", rc,
		      kv_strerror(rc), kv_last_error(kv));
		rc = kv_set_optimizer(kv, "adam lr=0.25");
		CHECK(rc == KV_ERR_MISMATCH, "other optimizer: %d (%s), want KV_ERR_MISMATCH: %s",
		      rc, kv_strerror(rc), kv_last_error(kv));
	}
	rc = kv_set_optimizer(kv, "sgd lr=0.25");
	CHECK(rc == KV_OK, "kv_set_optimizer(\"sgd lr=0.25\"): %d (%s): %s", rc, kv_strerror(rc),
	      kv_last_error(kv));
	for (int i = 0; i < 16; i++)
		g[i] = 1;
	CHECK_RC(kv_pushpull(kv, "w", g, v, 16, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 16; i++)
		CHECK(v[i] == -0.75f, "weight %g, want -0.75 (sgd lr=0.25, 3 ranks, gradient 1)",
		      (double)v[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, set_optimizer_is_collective_and_mismatch, .timeout = 30)
{
	run_job("coll", 3, coll_rank, NULL, 25);
}

/* a rank that left before the call: kv_set_optimizer fails with KV_ERR_PEER
 * at once (it cannot complete), not at the timeout */
static int coll_left_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	float v[16] = { 0 };
	double t0, dt;
	int rc;

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "w", v, 16, KV_FLOAT32), KV_OK);
	if (rank == 1) {
		CHECK_RC(kv_close(kv), KV_OK);
		return 0;
	}
	usleep(400000); /* rank 1 has left */
	t0 = now_s();
	rc = kv_set_optimizer(kv, "sgd lr=0.5");
	dt = now_s() - t0;
	CHECK(rc == KV_ERR_PEER, "set_optimizer with a rank gone: %d (%s), want KV_ERR_PEER: %s",
	      rc, kv_strerror(rc), kv_last_error(kv));
	CHECK(dt < 2.0, "it took %.2f s", dt);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, set_optimizer_after_a_rank_left_is_peer, .timeout = 30)
{
	run_job("coll-left", 2, coll_left_rank, NULL, 25);
}

/* ---------------------------------------------------------------- set again */

static const struct keyspec reset_key = { "r", 200, KV_FLOAT32 };

static int reset_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	static const struct {
		const char *spec;
		int fresh; /* another optimizer: fresh states */
	} steps[] = {
		{ "sgd lr=0.1 momentum=0.9 wd=0.01", 1 },
		{ "sgd lr=0.05 momentum=0.9 wd=0.01", 0 }, /* same optimizer: momentum goes on */
		{ "adam lr=0.01 beta1=0.9 beta2=0.99 epsilon=1e-3", 1 },
		{ "adam lr=0.02 beta1=0.9 beta2=0.99 epsilon=1e-3", 0 }, /* states and t go on */
		{ "sgd lr=0.1 momentum=0.9 wd=0.01", 1 },                /* fresh momentum */
	};
	struct optp p;
	struct key K;
	kv_store *kv = open_rank(20000);
	int round = 0;

	CHECK(kv, "open");
	CHECK(!key_setup(&K, &reset_key, 55), "malloc");
	if (key_init(kv, &K, rank))
		return 1;
	for (size_t s = 0; s < sizeof(steps) / sizeof(steps[0]); s++) {
		CHECK_RC(kv_set_optimizer(kv, steps[s].spec), KV_OK);
		parse_spec(steps[s].spec, &p);
		if (steps[s].fresh)
			key_reset_states(&K);
		for (int r = 0; r < 2; r++) {
			round++;
			if (key_round(kv, &K, &p, rank, n, round, 1)) {
				fprintf(stderr, "rank %d: (after kv_set_optimizer(\"%s\"), %s)\n", rank,
					steps[s].spec,
					steps[s].fresh ? "expecting fresh states"
						       : "expecting the states kept");
				return 1;
			}
		}
	}
	key_free(&K);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, set_again_keeps_states_other_optimizer_starts_fresh, .timeout = 30)
{
	run_job("reset", 2, reset_rank, NULL, 25);
}

/* ---------------------------------------------------------------- checkpoint round trip */

static const struct keyspec ck_keys[] = {
	{ "small", 300, KV_FLOAT32 },
	{ "large", 300000, KV_FLOAT32 },
	{ "half", 101, KV_FLOAT16 },
};
#define NCKEYS (sizeof(ck_keys) / sizeof(ck_keys[0]))

struct ckarg {
	const char *spec;
	int dump;
	int barrier; /* 1: an out-of-band barrier around save and load, rank 1 loads */
	char path[128];
	struct shared *sh;
};

static int roundtrip_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct ckarg *a = arg;
	struct optp p;
	struct key K[NCKEYS];
	void *rec[NCKEYS][5];
	kv_store *kv = open_rank(30000);
	int rc, loader = a->barrier ? 1 : 0;

	CHECK(kv, "open");
	parse_spec(a->spec, &p);
	for (size_t j = 0; j < NCKEYS; j++) {
		CHECK(!key_setup(&K[j], &ck_keys[j], 2000 + j), "malloc");
		if (key_init(kv, &K[j], rank))
			return 1;
	}
	CHECK_RC(kv_set_optimizer(kv, a->spec), KV_OK);
	for (int round = 1; round <= 5; round++)
		for (size_t j = 0; j < NCKEYS; j++)
			if (key_round(kv, &K[j], &p, rank, n, round, 1))
				return 1;
	if (a->barrier)
		pthread_barrier_wait(&a->sh->bar);
	if (rank == 0) {
		rc = kv_save_optimizer_states(kv, a->path, a->dump);
		CHECK(rc == KV_OK, "save(%s, %d): %d (%s): %s", a->path, a->dump, rc,
		      kv_strerror(rc), kv_last_error(kv));
	}
	if (a->barrier)
		pthread_barrier_wait(&a->sh->bar);
	for (int round = 6; round <= 10; round++)
		for (size_t j = 0; j < NCKEYS; j++) {
			size_t bytes = K[j].ks->count * dsize(K[j].ks->t);
			if (key_round(kv, &K[j], &p, rank, n, round, 1))
				return 1;
			rec[j][round - 6] = malloc(bytes);
			CHECK(rec[j][round - 6], "malloc");
			memcpy(rec[j][round - 6], K[j].out, bytes);
		}
	if (a->barrier)
		pthread_barrier_wait(&a->sh->bar);
	if (rank == loader) {
		rc = kv_load_optimizer_states(kv, a->path);
		CHECK(rc == KV_OK, "rank %d load(%s): %d (%s): %s", rank, a->path, rc,
		      kv_strerror(rc), kv_last_error(kv));
	}
	if (a->barrier)
		pthread_barrier_wait(&a->sh->bar);
	for (int round = 6; round <= 10; round++)
		for (size_t j = 0; j < NCKEYS; j++) {
			size_t sz = dsize(K[j].ks->t);
			if (key_round(kv, &K[j], &p, rank, n, round, 0))
				return 1;
			for (size_t i = 0; i < K[j].ks->count; i++)
				CHECK(!memcmp((char *)K[j].out + i * sz,
					      (char *)rec[j][round - 6] + i * sz, sz),
				      "after load, round %d again: key %s (%s) elem %zu is %.9g, "
				      "the first time %.9g",
				      round, K[j].ks->name, dname(K[j].ks->t), i,
				      get_val(K[j].out, K[j].ks->t, i),
				      get_val(rec[j][round - 6], K[j].ks->t, i));
			free(rec[j][round - 6]);
		}
	for (size_t j = 0; j < NCKEYS; j++)
		key_free(&K[j]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

static void roundtrip(const char *job, const char *spec, int dump, int barrier)
{
	char dir[64] = "/tmp/kvopt.XXXXXX";
	struct ckarg a = { .spec = spec, .dump = dump, .barrier = barrier };

	cr_assert(mkdtemp(dir), "mkdtemp");
	snprintf(a.path, sizeof(a.path), "%s/state.ckpt", dir);
	a.sh = shared_new(2);
	run_job(job, 2, roundtrip_rank, &a, 40);
	shared_free(a.sh);
	rm_dir(dir);
}

Test(optimizer, checkpoint_roundtrip_dump1, .timeout = 60)
{
	roundtrip("ck-d1", SPEC_ADAM, 1, 1);
}
Test(optimizer, checkpoint_roundtrip_dump0, .timeout = 60)
{
	roundtrip("ck-d0", SPEC_ADAM, 0, 0);
}
Test(optimizer, checkpoint_roundtrip_momentum_dump0, .timeout = 60)
{
	roundtrip("ck-m0", SPEC_NAG, 0, 1);
}
/* plain SGD keeps no state, but its f16/bf16 keys an f32 master copy */
Test(optimizer, checkpoint_roundtrip_plain_sgd, .timeout = 60)
{
	roundtrip("ck-sgd", SPEC_SGD, 1, 1);
}

/* ---------------------------------------------------------------- checkpoint errors */

enum { E_TRUNC, E_FLIP, E_OTHER, E_NOTCKPT, E_MISSING, E_SAVEDIR };

static const struct keyspec err_keys[] = {
	{ "alpha", 300, KV_FLOAT32 },
	{ "beta", 1000, KV_FLOAT32 },
};
static const struct keyspec other_keys1[] = {
	{ "alpha", 300, KV_FLOAT32 },
	{ "gamma", 1000, KV_FLOAT32 },
};
static const struct keyspec other_keys2[] = {
	{ "alpha", 300, KV_FLOAT32 },
	{ "beta", 100, KV_FLOAT32 },
};

struct errarg {
	int which;
	char dir[64];
	struct shared *sh;
	const struct keyspec *okeys; /* the other job's keys (2), and its file */
	const char *ofile;
};

static int copy_file(const char *from, const char *to, off_t len, off_t flip)
{
	int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	char buf[65536];
	off_t done = 0;
	ssize_t r;

	if (in < 0 || out < 0)
		return -1;
	while ((len < 0 || done < len) && (r = read(in, buf, sizeof(buf))) > 0) {
		if (len >= 0 && done + r > len)
			r = (ssize_t)(len - done);
		if (flip >= done && flip < done + r)
			buf[flip - done] ^= 0x10;
		if (write(out, buf, (size_t)r) != r)
			return -1;
		done += r;
	}
	close(in);
	close(out);
	return 0;
}

static int count_entries(const char *dir, char *names, size_t len)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	names[0] = 0;
	if (!d)
		return -1;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		n++;
		snprintf(names + strlen(names), len - strlen(names), " %s", e->d_name);
	}
	closedir(d);
	return n;
}

/* rank 0, between rounds: the case under test; every call must fail harmlessly */
static int err_action(kv_store *kv, struct errarg *a)
{
	char good[128], bad[192];
	struct stat st;
	const char *e;
	int rc;

	snprintf(good, sizeof(good), "%s/good.ckpt", a->dir);
	snprintf(bad, sizeof(bad), "%s/bad.ckpt", a->dir);
	rc = kv_save_optimizer_states(kv, good, 1);
	CHECK(rc == KV_OK, "save(%s): %d (%s): %s", good, rc, kv_strerror(rc), kv_last_error(kv));
	CHECK(stat(good, &st) == 0 && st.st_size > 0, "no file %s after the save", good);
	switch (a->which) {
	case E_TRUNC:
		CHECK(!copy_file(good, bad, st.st_size / 2, -1), "copy");
		rc = kv_load_optimizer_states(kv, bad);
		e = kv_last_error(kv);
		CHECK(rc == KV_ERR_INVALID, "load of a truncated file: %d (%s), want KV_ERR_INVALID: %s",
		      rc, kv_strerror(rc), e);
		CHECK(mentions(e, "trunc", "size", "short", "length"),
		      "load of a truncated file: \"%s\" says nothing of truncation or size", e);
		/* cut right after the first bytes, too */
		CHECK(!copy_file(good, bad, 16, -1), "copy");
		rc = kv_load_optimizer_states(kv, bad);
		CHECK(rc == KV_ERR_INVALID, "load of a 16-byte file: %d (%s): %s", rc,
		      kv_strerror(rc), kv_last_error(kv));
		break;
	case E_FLIP:
		CHECK(!copy_file(good, bad, -1, st.st_size / 2), "copy");
		rc = kv_load_optimizer_states(kv, bad);
		e = kv_last_error(kv);
		CHECK(rc < 0, "load of a file with a flipped byte: %d, want an error", rc);
		CHECK(mentions(e, "checksum", "crc", NULL, NULL),
		      "load of a file with a flipped byte: %d (%s) \"%s\" says nothing of the "
		      "checksum", rc, kv_strerror(rc), e);
		break;
	case E_OTHER:
		rc = kv_load_optimizer_states(kv, a->ofile);
		e = kv_last_error(kv);
		CHECK(rc == KV_ERR_MISMATCH,
		      "load of another job's file (keys alpha, %s[%zu]): %d (%s), want "
		      "KV_ERR_MISMATCH: %s", a->okeys[1].name, a->okeys[1].count, rc,
		      kv_strerror(rc), e);
		if (!strcmp(a->okeys[1].name, "gamma"))
			CHECK(mentions(e, "gamma", "beta", NULL, NULL),
			      "load of another job's file: \"%s\" names neither gamma (only in the "
			      "file) nor beta (only in the job)", e);
		else
			CHECK(mentions(e, "beta", NULL, NULL, NULL),
			      "load of another job's file: \"%s\" does not name beta (1000 "
			      "elements here, 100 in the file)", e);
		break;
	case E_NOTCKPT: {
		int fd;
		if (copy_file("/etc/hostname", bad, -1, -1)) {
			fd = open(bad, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			CHECK(fd >= 0 && write(fd, "localhost\n", 10) == 10, "write");
			close(fd);
		}
		rc = kv_load_optimizer_states(kv, bad);
		CHECK(rc < 0, "load of a text file: %d, want an error", rc);
		CHECK(kv_last_error(kv) && *kv_last_error(kv), "no message");
		/* an empty file */
		fd = open(bad, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		CHECK(fd >= 0, "create");
		close(fd);
		rc = kv_load_optimizer_states(kv, bad);
		CHECK(rc < 0, "load of an empty file: %d, want an error", rc);
		/* the checkpoint file itself is a directory */
		rc = kv_load_optimizer_states(kv, a->dir);
		CHECK(rc == KV_ERR_IO, "load of a directory: %d (%s), want KV_ERR_IO", rc,
		      kv_strerror(rc));
		break;
	}
	case E_MISSING:
		snprintf(bad, sizeof(bad), "%s/no-such-file.ckpt", a->dir);
		rc = kv_load_optimizer_states(kv, bad);
		CHECK(rc == KV_ERR_IO, "load of a missing file: %d (%s), want KV_ERR_IO: %s", rc,
		      kv_strerror(rc), kv_last_error(kv));
		break;
	case E_SAVEDIR: {
		char names[1024];
		int nent;

		snprintf(bad, sizeof(bad), "%s/no-such-dir/x.ckpt", a->dir);
		rc = kv_save_optimizer_states(kv, bad, 1);
		CHECK(rc < 0, "save into a missing directory: %d, want an error", rc);
		CHECK(kv_last_error(kv) && *kv_last_error(kv), "no message");
		/* after good saves (one new, one over the old): only the target */
		nent = count_entries(a->dir, names, sizeof(names));
		CHECK(nent == 1, "after a save the directory holds:%s (want only good.ckpt)", names);
		/* the temp file of a saver that died is removed by the next save of
		 * the same name; a live saver's is not */
		char stale[256], live[256];
		pid_t dead = fork();
		if (dead == 0)
			_exit(0);
		CHECK(dead > 0 && waitpid(dead, NULL, 0) == dead, "fork");
		snprintf(stale, sizeof(stale), "%s/.good.ckpt.kvd-%d-7.tmp", a->dir, (int)dead);
		snprintf(live, sizeof(live), "%s/.good.ckpt.kvd-%d-999.tmp", a->dir, (int)getpid());
		CHECK(close(open(stale, O_WRONLY | O_CREAT, 0644)) == 0, "create %s", stale);
		CHECK(close(open(live, O_WRONLY | O_CREAT, 0644)) == 0, "create %s", live);
		rc = kv_save_optimizer_states(kv, good, 0);
		CHECK(rc == KV_OK, "save again: %d (%s): %s", rc, kv_strerror(rc), kv_last_error(kv));
		CHECK(access(stale, F_OK) != 0, "the dead saver's temp file is still there");
		CHECK(access(live, F_OK) == 0, "a live saver's temp file was removed");
		unlink(live);
		nent = count_entries(a->dir, names, sizeof(names));
		CHECK(nent == 1, "after a second save the directory holds:%s (want only good.ckpt)",
		      names);
		/* and the good file still loads (the state is the same) */
		rc = kv_load_optimizer_states(kv, good);
		CHECK(rc == KV_OK, "load of the good file: %d (%s): %s", rc, kv_strerror(rc),
		      kv_last_error(kv));
		break;
	}
	}
	return 0;
}

static int errcase_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct errarg *a = arg;
	struct optp p;
	struct key K[2];
	kv_store *kv = open_rank(20000);

	CHECK(kv, "open");
	parse_spec(SPEC_ADAM, &p);
	for (int j = 0; j < 2; j++) {
		CHECK(!key_setup(&K[j], &err_keys[j], 3000 + j), "malloc");
		if (key_init(kv, &K[j], rank))
			return 1;
	}
	CHECK_RC(kv_set_optimizer(kv, SPEC_ADAM), KV_OK);
	for (int round = 1; round <= 3; round++)
		for (int j = 0; j < 2; j++)
			if (key_round(kv, &K[j], &p, rank, n, round, 1))
				return 1;
	pthread_barrier_wait(&a->sh->bar);
	if (rank == 0 && err_action(kv, a))
		return 1;
	pthread_barrier_wait(&a->sh->bar);
	/* the state is untouched: the same values, and the next rounds go on
	 * from them (weights, Adam's moments and step) */
	for (int j = 0; j < 2; j++)
		if (key_pull_same(kv, &K[j], "after the failed call"))
			return 1;
	for (int round = 4; round <= 5; round++)
		for (int j = 0; j < 2; j++)
			if (key_round(kv, &K[j], &p, rank, n, round, 1))
				return 1;
	for (int j = 0; j < 2; j++)
		key_free(&K[j]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

/* another job: keys okeys, one round, saved to ofile */
static int other_job_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct errarg *a = arg;
	struct optp p;
	struct key K[2];
	kv_store *kv = open_rank(20000);
	int rc;

	CHECK(kv, "open");
	parse_spec(SPEC_ADAM, &p);
	for (int j = 0; j < 2; j++) {
		CHECK(!key_setup(&K[j], &a->okeys[j], 4000 + j), "malloc");
		if (key_init(kv, &K[j], rank))
			return 1;
	}
	CHECK_RC(kv_set_optimizer(kv, SPEC_ADAM), KV_OK);
	for (int j = 0; j < 2; j++)
		if (key_round(kv, &K[j], &p, rank, n, 1, 0))
			return 1;
	rc = kv_save_optimizer_states(kv, a->ofile, 1);
	CHECK(rc == KV_OK, "save(%s): %d (%s): %s", a->ofile, rc, kv_strerror(rc),
	      kv_last_error(kv));
	for (int j = 0; j < 2; j++)
		key_free(&K[j]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

static void errcase(int which)
{
	struct errarg a = { .which = which };
	struct kvd_proc k;
	char why[256], ofile[128];
	int rc = 0;

	snprintf(a.dir, sizeof(a.dir), "/tmp/kvopt.XXXXXX");
	cr_assert(mkdtemp(a.dir), "mkdtemp");
	a.sh = shared_new(2);
	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	if (which == E_OTHER) {
		/* two files of other jobs, in another directory */
		char odir[64] = "/tmp/kvopt.XXXXXX";
		struct errarg o = { 0 };
		cr_assert(mkdtemp(odir), "mkdtemp");
		for (int f = 0; f < 2 && rc == 0; f++) {
			snprintf(ofile, sizeof(ofile), "%s/other%d.ckpt", odir, f);
			o.okeys = f ? other_keys2 : other_keys1;
			o.ofile = ofile;
			rc = run_ranks(&k, f ? "other-b" : "other-a", 1, other_job_rank, &o, 20, why,
				       sizeof(why));
			if (rc == 0) {
				a.okeys = o.okeys;
				a.ofile = ofile;
				rc = run_ranks(&k, f ? "errs-b" : "errs-a", 2, errcase_rank, &a, 25,
					       why, sizeof(why));
			}
		}
		rm_dir(odir);
	} else {
		rc = run_ranks(&k, "errs", 2, errcase_rank, &a, 25, why, sizeof(why));
	}
	if (rc)
		dump_log(&k);
	kvd_stop(&k);
	shared_free(a.sh);
	rm_dir(a.dir);
	cr_assert_eq(rc, 0, "%s", why);
}

Test(optimizer, load_truncated_file, .timeout = 30) { errcase(E_TRUNC); }
Test(optimizer, load_flipped_byte, .timeout = 30) { errcase(E_FLIP); }
Test(optimizer, load_other_jobs_file, .timeout = 40) { errcase(E_OTHER); }
Test(optimizer, load_not_a_checkpoint, .timeout = 30) { errcase(E_NOTCKPT); }
Test(optimizer, load_missing_file, .timeout = 30) { errcase(E_MISSING); }
Test(optimizer, save_missing_dir_and_no_temp_files, .timeout = 30) { errcase(E_SAVEDIR); }

/* ---------------------------------------------------------------- kill -9 during a save */

#define KILL_COUNT (8u << 20) /* 8M f32: 32 MiB of weights, 32 MiB of momentum */
#define KILL_SPEC  "sgd lr=0.1 momentum=0.9"
#define KILL_ITERS 20
#define KILL_BUDGET_S 25.0

struct killarg {
	char path[128];
	struct shared *sh;
	int pipe_w;
};

static pid_t fork_rank(const struct kvd_proc *k, const char *job, rank_fn fn, void *arg)
{
	pid_t p;

	fflush(NULL);
	p = fork();
	if (p == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL); /* no stray rank when the test dies */
		setenv("KVD_SOCKET", k->sock, 1);
		setenv("KVD_JOB", job, 1);
		setenv("KVD_RANK", "0", 1);
		setenv("KVD_NUM_WORKERS", "1", 1);
		_exit(fn(0, 1, k, arg));
	}
	return p;
}

static int wait_pid(pid_t pid, double deadline, int *st)
{
	while (now_s() < deadline) {
		pid_t r = waitpid(pid, st, WNOHANG);
		if (r == pid)
			return 0;
		if (r < 0 && errno != EINTR)
			return -1;
		usleep(2000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, st, 0);
	return -1;
}

static int kill_saver(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct killarg *a = arg;
	kv_store *kv = open_rank(20000);
	float *w = malloc((size_t)KILL_COUNT * 4), *g = malloc((size_t)KILL_COUNT * 4);
	int rc;

	CHECK(kv && w && g, "open/malloc");
	for (size_t i = 0; i < KILL_COUNT; i++) {
		w[i] = (float)(i % 1000) * 0.001f;
		g[i] = (float)(i % 7) - 3.0f;
	}
	CHECK_RC(kv_init(kv, "big", w, KILL_COUNT, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_set_optimizer(kv, KILL_SPEC), KV_OK);
	CHECK_RC(kv_pushpull(kv, "big", g, w, KILL_COUNT, KV_FLOAT32, 0), KV_OK);
	a->sh->save_s = now_s();
	rc = kv_save_optimizer_states(kv, a->path, 1);
	a->sh->save_s = now_s() - a->sh->save_s;
	CHECK(rc == KV_OK, "first save: %d (%s): %s", rc, kv_strerror(rc), kv_last_error(kv));
	a->sh->h1 = fnv64(w, (size_t)KILL_COUNT * 4);
	CHECK_RC(kv_pushpull(kv, "big", g, w, KILL_COUNT, KV_FLOAT32, 0), KV_OK);
	a->sh->h2 = fnv64(w, (size_t)KILL_COUNT * 4);
	CHECK(a->sh->h1 != a->sh->h2, "the second round changed nothing");
	CHECK(write(a->pipe_w, "s", 1) == 1, "pipe");
	rc = kv_save_optimizer_states(kv, a->path, 1); /* kvd is killed meanwhile */
	a->sh->saved2_rc = rc;
	a->sh->saved2_done = 1;
	for (;;)
		pause(); /* the test kills us */
}

static int kill_verifier(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct killarg *a = arg;
	kv_store *kv = open_rank(20000);
	float *w = calloc(KILL_COUNT, 4);
	uint64_t h;
	int rc;

	CHECK(kv && w, "open/malloc");
	CHECK_RC(kv_init(kv, "big", w, KILL_COUNT, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_set_optimizer(kv, KILL_SPEC), KV_OK);
	rc = kv_load_optimizer_states(kv, a->path);
	CHECK(rc == KV_OK, "load of %s after kvd was killed during a save: %d (%s): %s", a->path,
	      rc, kv_strerror(rc), kv_last_error(kv));
	CHECK_RC(kv_pull(kv, "big", w, KILL_COUNT, KV_FLOAT32, 0), KV_OK);
	h = fnv64(w, (size_t)KILL_COUNT * 4);
	CHECK(h == a->sh->h1 || h == a->sh->h2,
	      "the weights loaded are neither those of the first save nor of the second");
	a->sh->which = h == a->sh->h1 ? 1 : 2;
	free(w);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(optimizer, kill9_during_save_never_tears_the_file, .timeout = 60)
{
	char dir[64] = "/tmp/kvopt.XXXXXX";
	struct killarg a;
	unsigned seed = 20240611;
	int iters = 0, old = 0, neu = 0, interrupted = 0, leftovers = 0;
	double t0 = now_s(), save_ms;

	cr_assert(mkdtemp(dir), "mkdtemp");
	snprintf(a.path, sizeof(a.path), "%s/state.ckpt", dir);
	a.sh = shared_new(1);
	while (iters < KILL_ITERS && now_s() - t0 < KILL_BUDGET_S) {
		struct kvd_proc k;
		int fds[2], st = 0, delay_us = (int)(rand_r(&seed) % 20001);
		unsigned r2 = (unsigned)rand_r(&seed);
		struct pollfd pf;
		char c;
		pid_t saver, ver;

		a.sh->saved2_done = 0;
		a.sh->which = 0;
		cr_assert_eq(pipe(fds), 0);
		a.pipe_w = fds[1];
		cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
		saver = fork_rank(&k, "kill-save", kill_saver, &a);
		close(fds[1]);
		pf = (struct pollfd){ .fd = fds[0], .events = POLLIN };
		if (poll(&pf, 1, 20000) != 1 || read(fds[0], &c, 1) != 1) {
			kill(saver, SIGKILL);
			waitpid(saver, &st, 0);
			dump_log(&k);
			kvd_stop(&k);
			close(fds[0]);
			rm_dir(dir);
			cr_assert_fail("iteration %d: the saving rank failed before the second save "
				       "(status 0x%x)", iters, st);
		}
		close(fds[0]);
		/* every other iteration, a delay spread over the whole save (as long
		 * as the first one took, and a bit more), so that some kills land in
		 * the fsync and rename, and some after the save */
		if (iters % 2)
			delay_us = (int)(r2 % (unsigned)(1 + a.sh->save_s * 1.3e6));
		usleep((useconds_t)delay_us);
		kill(k.pid, SIGKILL);
		waitpid(k.pid, NULL, 0);
		k.pid = 0;
		kill(saver, SIGKILL);
		waitpid(saver, NULL, 0);
		if (!a.sh->saved2_done || a.sh->saved2_rc != KV_OK)
			interrupted++;
		kvd_stop(&k); /* only cleans up: kvd is gone */

		/* a fresh kvd and job with the same key: the file loads */
		cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
		ver = fork_rank(&k, "kill-verify", kill_verifier, &a);
		if (wait_pid(ver, now_s() + 20, &st) || !WIFEXITED(st) || WEXITSTATUS(st)) {
			dump_log(&k);
			kvd_stop(&k);
			rm_dir(dir);
			cr_assert_fail("iteration %d (kill after %d us): the file at the target path "
				       "did not load (status 0x%x)", iters, delay_us, st);
		}
		kvd_stop(&k);
		if (a.sh->which == 1)
			old++;
		else
			neu++;
		{ /* temp files a killed save left behind do not count; clear them */
			char names[4096];
			if (count_entries(dir, names, sizeof(names)) > 1) {
				leftovers++;
				DIR *d = opendir(dir);
				struct dirent *e;
				while (d && (e = readdir(d))) {
					char p[512];
					if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
					    !strcmp(e->d_name, "state.ckpt"))
						continue;
					snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
					unlink(p);
				}
				if (d)
					closedir(d);
			}
		}
		iters++;
	}
	save_ms = a.sh->save_s * 1e3;
	shared_free(a.sh);
	rm_dir(dir);
	if (getenv("KVTEST_VERBOSE"))
		fprintf(stderr, "kill9: %d iterations in %.1f s: old file %d, new file %d, save "
			"interrupted %d, temp files left %d (a save took %.0f ms)\n", iters,
			now_s() - t0, old, neu, interrupted, leftovers, save_ms);
	cr_assert(iters >= 3, "only %d iterations in %.0f s", iters, KILL_BUDGET_S);
}
