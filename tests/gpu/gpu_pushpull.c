/* SPDX-License-Identifier: MIT */
/*
 * gpu_pushpull - ranks on one GPU sum device tensors through kvd's `local`
 * store: kv_pushpull on cudaMalloc'd buffers (libkv copies them through its
 * pinned staging, part by part, while kvd sums), every result checked, the
 * step time and busbw printed by rank 0.  Run under kvrun:
 *
 *   kvrun -n 2 gpu_pushpull [SIZES]
 *
 * Exit 0 when every result is right, 1 otherwise, 77 without a GPU.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kv.h"
#include "../../kernels/gpu.h"

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	static const size_t sizes[] = { 4u << 10, 64u << 10, 1u << 20, 16u << 20, 64u << 20,
					256u << 20 };
	kv_store *kv;
	int rc, bad = 0;

	if (gpu_count() == 0) {
		printf("gpu_pushpull: skipped: %s\n", gpu_status());
		return 77;
	}
	rc = kv_create("local", NULL, &kv);
	if (rc) {
		fprintf(stderr, "gpu_pushpull: %s\n", kv_last_error(NULL));
		return 1;
	}
	int rank = kv_rank(kv), n = kv_num_workers(kv);
	if (rank == 0)
		printf("gpu_pushpull: %d ranks on one GPU, local store, device tensors; "
		       "is_capable(device) = %d\n",
		       n, kv_is_capable(kv, "device"));
	for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
		size_t count = sizes[si] / 4, bytes = count * 4;
		float *h = malloc(bytes), *d = gpu_alloc(0, bytes);
		char key[32];
		double t[10];
		int iters = 10;

		if (!h || !d) {
			fprintf(stderr, "rank %d: cannot allocate %zu bytes\n", rank, bytes);
			return 1;
		}
		snprintf(key, sizeof(key), "g%zu", bytes);
		memset(h, 0, bytes);
		gpu_memcpy_h2d(0, d, h, bytes);
		rc = kv_init(kv, key, d, count, KV_FLOAT32); /* from device memory too */
		if (rc) {
			fprintf(stderr, "rank %d: init: %s\n", rank, kv_last_error(kv));
			return 1;
		}
		for (int it = -2; it < iters; it++) {
			for (size_t i = 0; i < count; i++)
				h[i] = (float)((rank + 1) + (int)((i + (size_t)(it + 2)) % 7));
			gpu_memcpy_h2d(0, d, h, bytes);
			double t0 = now();
			rc = kv_pushpull(kv, key, d, NULL, count, KV_FLOAT32, 0);
			double dt = now() - t0;
			if (rc) {
				fprintf(stderr, "rank %d: pushpull: %s\n", rank, kv_last_error(kv));
				return 1;
			}
			if (it >= 0)
				t[it] = dt;
			gpu_memcpy_d2h(0, h, d, bytes);
			for (size_t i = 0; i < count; i++) {
				double want = 0;
				for (int r = 0; r < n; r++)
					want += (r + 1) + (int)((i + (size_t)(it + 2)) % 7);
				if (h[i] != (float)want) {
					if (bad++ < 5)
						fprintf(stderr,
							"rank %d: %zu bytes, element %zu: %g, want %g\n",
							rank, bytes, i, h[i], want);
					break;
				}
			}
		}
		qsort(t, (size_t)iters, sizeof(double), cmp);
		if (rank == 0)
			printf("  %8zu bytes: p50 %9.1f us  busbw %7.2f GB/s\n", bytes, t[iters / 2] * 1e6,
			       (double)bytes / t[iters / 2] / 1e9 * 2.0 * (n - 1) / n);
		gpu_free(0, d);
		free(h);
	}
	kv_close(kv);
	if (rank == 0)
		printf("gpu_pushpull: %s\n", bad ? "WRONG RESULTS" : "all results correct");
	return bad ? 1 : 0;
}
