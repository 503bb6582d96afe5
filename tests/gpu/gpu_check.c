/* SPDX-License-Identifier: MIT */
/*
 * gpu_check - the CUDA kernels on a real GPU, against the CPU kernels (which
 * the unit tests check against plain double-precision loops):
 *   - reduce_sum on the GPU, every dtype, N = 2, 4, 8 inputs, 1 and 2
 *     outputs and in place, sizes from 1 element to 256 MiB, pointers offset
 *     by an odd number of elements: bit-identical to the CPU;
 *   - optim_update on the GPU: SGD, momentum, Nesterov bit-identical to the
 *     CPU, Adam and AdamW within 1e-6 relative;
 *   - bandwidth of the reduce (bytes read + written) against cudaMemcpy
 *     device to device, and pinned against pageable host copies.
 * Plain C with no test framework: it runs from the GPU bundle (make
 * gpu-bundle) on a machine that has only the CUDA driver.  Exit 0 when all
 * pass, 1 on a failure, 77 (skipped) without a GPU.
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kv.h"
#include "../../kernels/gpu.h"
#include "../../kernels/optim.h"
#include "../../kernels/reduce.h"

static int failures, checks;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void fill(void *buf, kv_dtype t, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		float v = (float)((int)(next() % 2001) - 1000) / 64.0f;
		switch (t) {
		case KV_FLOAT32: ((float *)buf)[i] = v; break;
		case KV_FLOAT64: ((double *)buf)[i] = (double)v / 3.0; break;
		case KV_FLOAT16: ((uint16_t *)buf)[i] = float_to_half(v); break;
		case KV_BFLOAT16: ((uint16_t *)buf)[i] = float_to_bf16(v); break;
		case KV_INT32: ((int32_t *)buf)[i] = (int32_t)next(); break;
		case KV_INT64: ((int64_t *)buf)[i] = (int64_t)next(); break;
		}
	}
}

static const char *dname(kv_dtype t)
{
	static const char *const n[] = { "f32", "f64", "f16", "bf16", "i32", "i64" };
	return n[t];
}

#define CHECK(cond, ...)                                                                     \
	do {                                                                                 \
		checks++;                                                                    \
		if (!(cond)) {                                                               \
			failures++;                                                          \
			printf("FAIL ");                                                     \
			printf(__VA_ARGS__);                                                 \
			printf("\n");                                                        \
		}                                                                            \
	} while (0)

/* One reduce on the GPU against the CPU: nin inputs, nout outputs (or in place). */
static void reduce_case(kv_dtype t, int nin, int nout, bool in_place, size_t n, size_t skew)
{
	size_t es = kv_dtype_size(t), bytes = (n + skew) * es;
	void *h_in[8], *h_out, *d_in[8], *d_out[2];
	const void *ci[8], *gi[8];
	void *co[2], *go[2];

	for (int i = 0; i < nin; i++) {
		h_in[i] = malloc(bytes);
		fill(h_in[i], t, n + skew);
		d_in[i] = gpu_alloc(0, bytes);
		gpu_memcpy_h2d(0, d_in[i], h_in[i], bytes);
		ci[i] = (uint8_t *)h_in[i] + skew * es;
		gi[i] = (uint8_t *)d_in[i] + skew * es;
	}
	h_out = malloc(bytes * 2);
	for (int o = 0; o < nout; o++) {
		d_out[o] = in_place && o == 0 ? d_in[0] : gpu_alloc(0, bytes);
		go[o] = (uint8_t *)d_out[o] + skew * es;
	}
	/* CPU reference into private buffers */
	void *ref = malloc(bytes);
	co[0] = ref;
	int rc = reduce_sum(REDUCE_CPU, NULL, t, co, 1, ci, nin, n);
	int grc = reduce_sum(0, NULL, t, go, nout, gi, nin, n);
	int src = gpu_sync(0);
	CHECK(rc == 0 && grc == 0 && src == 0, "reduce %s nin=%d nout=%d n=%zu: rc %d/%d/%d",
	      dname(t), nin, nout, n, rc, grc, src);
	for (int o = 0; o < nout && !grc; o++) {
		gpu_memcpy_d2h(0, h_out, d_out[o], bytes);
		CHECK(memcmp((uint8_t *)h_out + skew * es, ref, n * es) == 0,
		      "reduce %s nin=%d nout=%d%s n=%zu skew=%zu: output %d differs from the CPU",
		      dname(t), nin, nout, in_place ? " in place" : "", n, skew, o);
	}
	for (int i = 0; i < nin; i++) {
		gpu_free(0, d_in[i]);
		free(h_in[i]);
	}
	for (int o = 0; o < nout; o++)
		if (!(in_place && o == 0))
			gpu_free(0, d_out[o]);
	free(h_out);
	free(ref);
}

static void optim_case(int kind, kv_dtype gt, size_t n)
{
	struct opt_params p = { .kind = kind, .lr = 0.05f, .wd = 1e-3f, .rescale_grad = 0.5f,
				.clip_gradient = 4.0f, .momentum = kind == OPT_SGD ? 0.9f : 0.8f,
				.beta1 = 0.9f, .beta2 = 0.999f, .epsilon = 1e-8f };
	size_t gb = n * kv_dtype_size(gt);
	float *w = malloc(n * 4), *s0 = calloc(n, 4), *s1 = calloc(n, 4), *gw = malloc(n * 4);
	void *g = malloc(gb);
	float *dw = gpu_alloc(0, n * 4), *ds0 = gpu_alloc(0, n * 4), *ds1 = gpu_alloc(0, n * 4);
	void *dg = gpu_alloc(0, gb);
	double worst = 0;
	bool exact = kind == OPT_SGD || kind == OPT_NAG;

	fill(w, KV_FLOAT32, n);
	gpu_memcpy_h2d(0, dw, w, n * 4);
	gpu_memset(0, ds0, 0, n * 4);
	gpu_memset(0, ds1, 0, n * 4);
	for (uint64_t step = 1; step <= 5; step++) {
		fill(g, gt, n);
		gpu_memcpy_h2d(0, dg, g, gb);
		optim_update(REDUCE_CPU, NULL, &p, step, w, g, gt, s0, s1, NULL, KV_FLOAT32, n);
		optim_update(0, NULL, &p, step, dw, dg, gt, ds0, ds1, NULL, KV_FLOAT32, n);
	}
	CHECK(gpu_sync(0) == 0, "optim kind %d: GPU fault", kind);
	gpu_memcpy_d2h(0, gw, dw, n * 4);
	for (size_t i = 0; i < n; i++) {
		double d = fabs((double)gw[i] - w[i]) / fmax(fabs(w[i]), 1e-7);
		if (d > worst)
			worst = d;
	}
	if (exact)
		CHECK(memcmp(gw, w, n * 4) == 0, "optim kind %d %s: GPU weights differ from the CPU",
		      kind, dname(gt));
	else
		CHECK(worst <= 1e-6, "optim kind %d %s: relative difference %.3g > 1e-6", kind,
		      dname(gt), worst);
	printf("optim kind %d grad %s n=%zu: max relative difference GPU/CPU %.3g%s\n", kind,
	       dname(gt), n, worst, exact ? " (bit-identical required)" : "");
	free(w);
	free(s0);
	free(s1);
	free(gw);
	free(g);
	gpu_free(0, dw);
	gpu_free(0, ds0);
	gpu_free(0, ds1);
	gpu_free(0, dg);
}

static void bandwidth(size_t bytes)
{
	size_t n = bytes / 4;
	void *a = gpu_alloc(0, bytes), *b = gpu_alloc(0, bytes), *c = gpu_alloc(0, bytes);
	const void *ins[2] = { a, b };
	void *outs[1] = { a };
	int iters = bytes >= (1u << 30) ? 5 : 20;
	double t0, tred, tcpy;

	if (!a || !b || !c) {
		printf("bandwidth %zu MiB: not enough GPU memory\n", bytes >> 20);
		return;
	}
	gpu_memset(0, a, 0, bytes);
	gpu_memset(0, b, 0, bytes);
	reduce_sum(0, NULL, KV_FLOAT32, outs, 1, ins, 2, n);
	gpu_copy(c, a, bytes, NULL);
	gpu_sync(0);
	t0 = now();
	for (int i = 0; i < iters; i++)
		reduce_sum(0, NULL, KV_FLOAT32, outs, 1, ins, 2, n);
	gpu_sync(0);
	tred = (now() - t0) / iters;
	t0 = now();
	for (int i = 0; i < iters; i++)
		gpu_copy_async(c, a, bytes, NULL);
	gpu_sync(0);
	tcpy = (now() - t0) / iters;
	double red = 3.0 * (double)bytes / tred / 1e9, cpy = 2.0 * (double)bytes / tcpy / 1e9;
	printf("bandwidth %6zu MiB: reduce 2->1 in place %7.1f GB/s (read+written), "
	       "cudaMemcpy D2D %7.1f GB/s, ratio %.2f%s\n",
	       bytes >> 20, red, cpy, red / cpy,
	       bytes >= (64u << 20) ? (red / cpy >= 0.9 ? "  [>= 0.90: ok]" : "  [< 0.90]") : "");
	gpu_free(0, a);
	gpu_free(0, b);
	gpu_free(0, c);
}

static void host_copies(size_t bytes)
{
	void *dev = gpu_alloc(0, bytes), *pageable = malloc(bytes), *pinned = malloc(bytes);
	double t[4];

	memset(pageable, 1, bytes);
	memset(pinned, 1, bytes);
	int reg = gpu_host_register(pinned, bytes);
	for (int k = 0; k < 4; k++) {
		void *host = k < 2 ? pageable : pinned;
		gpu_copy(dev, host, bytes, NULL); /* warm */
		double t0 = now();
		for (int i = 0; i < 5; i++) {
			if (k % 2 == 0)
				gpu_copy(dev, host, bytes, NULL);
			else
				gpu_copy(host, dev, bytes, NULL);
		}
		t[k] = (now() - t0) / 5;
	}
	printf("host copies %zu MiB: pageable H2D %.1f GB/s, D2H %.1f GB/s; pinned%s H2D %.1f "
	       "GB/s, D2H %.1f GB/s\n",
	       bytes >> 20, bytes / t[0] / 1e9, bytes / t[1] / 1e9, reg ? " (register failed!)" : "",
	       bytes / t[2] / 1e9, bytes / t[3] / 1e9);
	if (!reg)
		gpu_host_unregister(pinned);
	gpu_free(0, dev);
	free(pageable);
	free(pinned);
}

int main(void)
{
	static const kv_dtype types[] = { KV_FLOAT32, KV_FLOAT64, KV_FLOAT16,
					  KV_BFLOAT16, KV_INT32, KV_INT64 };
	static const size_t sizes[] = { 1, 3, 1000, 4097, (1u << 20) + 3 };
	double t0 = now();

	if (gpu_count() == 0) {
		printf("gpu_check: skipped: %s\n", gpu_status());
		return 77;
	}
	printf("gpu_check: %s\n", gpu_status());
	for (size_t ti = 0; ti < 6; ti++)
		for (int nin = 2; nin <= 8; nin *= 2)
			for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
				reduce_case(types[ti], nin, 1, false, sizes[si], 0);
				reduce_case(types[ti], nin, 2, false, sizes[si], 1);
				reduce_case(types[ti], nin, 1, true, sizes[si], 3);
			}
	reduce_case(KV_FLOAT32, 2, 1, true, (256u << 20) / 4, 0);
	reduce_case(KV_BFLOAT16, 4, 1, false, (64u << 20) / 2, 1);
	printf("reduce: %d checks, %d failures (6 dtypes x N=2,4,8 x 5 sizes x 3 layouts, "
	       "plus 256 MiB f32 and 64 MiB bf16)\n",
	       checks, failures);
	for (int kind = OPT_SGD; kind <= OPT_ADAMW; kind++) {
		optim_case(kind, KV_FLOAT32, 100003);
		optim_case(kind, KV_FLOAT16, 4099);
	}
	bandwidth(16u << 20);
	bandwidth(64u << 20);
	bandwidth(256u << 20);
	bandwidth(1u << 30);
	host_copies(64u << 20);
	printf("gpu_check: %d checks, %d failures, %.1f s\n", checks, failures, now() - t0);
	return failures ? 1 : 0;
}
