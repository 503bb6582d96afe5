/* SPDX-License-Identifier: MIT */
/*
 * roofline - what this machine's memory allows, for the comparisons of
 * `make bench`.
 *
 * For each size S and rank count N it times, with 1 thread and with T
 * threads (each thread a contiguous stripe):
 *   inplace: N buffers of S bytes in one address space, each replaced by the
 *            elementwise sum of all N (every byte read once and written
 *            once: 2*N*S bytes moved) - the physical limit of an allreduce;
 *   sum:     the sum of N buffers into one more (N*S read, S written);
 *   copy:    memcpy of S bytes (S read, S written).
 * Small sizes stay in cache, so their limit is the cache's, as it is for an
 * allreduce of that size. It prints the step time (median of the runs) and the bandwidth of the
 * bytes moved; for `inplace` also the busbw an allreduce reaching that limit
 * would report (S / time * 2(N-1)/N).
 *
 *   roofline [--ranks N] [--sizes 16M,...] [--threads T] [--iters I] [--json]
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAXN 16

enum kind { K_INPLACE, K_SUM, K_COPY };
static const char *const kind_names[] = { "inplace", "sum", "copy" };

struct job {
	enum kind kind;
	float *buf[MAXN + 1];
	int n;
	size_t lo, hi;
	pthread_barrier_t *start, *end;
	int iters, reps;
	double *times;
};

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

#define BLOCK 2048 /* floats per block: every loop below is a simple vector loop */

static void work(const struct job *j)
{
	float *const *b = j->buf;
	float acc[BLOCK] __attribute__((aligned(64)));

	if (j->kind == K_COPY) {
		memcpy(b[1] + j->lo, b[0] + j->lo, (j->hi - j->lo) * sizeof(float));
		return;
	}
	for (size_t lo = j->lo; lo < j->hi; lo += BLOCK) {
		size_t m = j->hi - lo < BLOCK ? j->hi - lo : BLOCK;
		const float *x = b[0] + lo, *y = b[1 % j->n] + lo;

		if (j->n == 1) {
			for (size_t i = 0; i < m; i++)
				acc[i] = x[i];
		} else {
			for (size_t i = 0; i < m; i++)
				acc[i] = x[i] + y[i];
		}
		for (int k = 2; k < j->n; k++) {
			const float *z = b[k] + lo;
			for (size_t i = 0; i < m; i++)
				acc[i] += z[i];
		}
		if (j->kind == K_SUM) {
			memcpy(b[j->n] + lo, acc, m * sizeof(float));
			continue;
		}
		for (int k = 0; k < j->n; k++)
			memcpy(b[k] + lo, acc, m * sizeof(float));
	}
}

static void *thread_main(void *arg)
{
	struct job *j = arg;

	for (int it = 0; it < j->iters; it++) {
		pthread_barrier_wait(j->start);
		for (int r = 0; r < j->reps; r++)
			work(j);
		pthread_barrier_wait(j->end);
	}
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/*
 * Median step time of kind over iters runs with nthreads threads. A timed
 * run repeats the step until it moves about 32 MiB, so that for small sizes
 * the barrier hand-off (microseconds) does not pass for memory time.
 */
static double run(enum kind kind, float **bufs, int n, size_t count, int nthreads, int iters)
{
	size_t step_bytes = 2 * (size_t)n * count * sizeof(float);
	int reps = step_bytes >= (32u << 20) ? 1 : (int)((32u << 20) / step_bytes);

	pthread_t tid[64];
	struct job jobs[64];
	pthread_barrier_t start, end;
	double *t = malloc(sizeof(double) * (size_t)iters), med;

	pthread_barrier_init(&start, NULL, (unsigned)nthreads + 1);
	pthread_barrier_init(&end, NULL, (unsigned)nthreads + 1);
	for (int i = 0; i < nthreads; i++) {
		size_t chunk = (count / (size_t)nthreads + 15) & ~(size_t)15;
		jobs[i] = (struct job){ .kind = kind, .n = n, .iters = iters, .reps = reps };
		memcpy(jobs[i].buf, bufs, sizeof(jobs[i].buf));
		jobs[i].lo = chunk * (size_t)i < count ? chunk * (size_t)i : count;
		jobs[i].hi = chunk * (size_t)(i + 1) < count ? chunk * (size_t)(i + 1) : count;
		jobs[i].start = &start;
		jobs[i].end = &end;
		pthread_create(&tid[i], NULL, thread_main, &jobs[i]);
	}
	for (int it = 0; it < iters; it++) {
		pthread_barrier_wait(&start);
		double t0 = now();
		pthread_barrier_wait(&end);
		t[it] = (now() - t0) / reps;
	}
	for (int i = 0; i < nthreads; i++)
		pthread_join(tid[i], NULL);
	pthread_barrier_destroy(&start);
	pthread_barrier_destroy(&end);
	qsort(t, (size_t)iters, sizeof(*t), cmp);
	med = t[iters / 2];
	free(t);
	return med;
}

static int parse_size(const char *s, size_t *out)
{
	char *end;
	double v = strtod(s, &end);
	size_t mul = 1;

	if (end == s || v <= 0)
		return -1;
	if (*end == 'K' || *end == 'k')
		mul = 1u << 10, end++;
	else if (*end == 'M' || *end == 'm')
		mul = 1u << 20, end++;
	else if (*end == 'G' || *end == 'g')
		mul = 1u << 30, end++;
	if (*end)
		return -1;
	*out = (size_t)(v * (double)mul);
	return 0;
}

int main(int argc, char **argv)
{
	const char *sizes = "4K,64K,1M,16M,64M,256M";
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int n = 2, threads = ncpu > 0 ? (int)(ncpu < 64 ? ncpu : 64) : 1, iters = 10, json = 0;
	int first = 1;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--ranks") && i + 1 < argc)
			n = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--sizes") && i + 1 < argc)
			sizes = argv[++i];
		else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
			threads = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
			iters = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--json"))
			json = 1;
		else {
			fprintf(stderr, "usage: roofline [--ranks N] [--sizes L] [--threads T] "
					"[--iters I] [--json]\n");
			return 2;
		}
	}
	if (n < 1 || n > MAXN || threads < 1 || iters < 1) {
		fprintf(stderr, "roofline: ranks 1..%d, threads and iters >= 1\n", MAXN);
		return 2;
	}
	if (json)
		printf("{\"tool\": \"roofline\", \"ranks\": %d, \"threads\": %d, \"rows\": [", n,
		       threads);
	else
		printf("# roofline: %d buffers, 1 and %d threads, median of %d\n"
		       "#%11s %8s %7s %10s %12s %12s\n",
		       n, threads, iters, "size", "kind", "threads", "time(us)", "mem(GB/s)",
		       "busbw(GB/s)");
	char *list = strdup(sizes), *save = NULL;
	for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		size_t bytes, count;
		float *bufs[MAXN + 1];

		if (parse_size(tok, &bytes)) {
			fprintf(stderr, "roofline: bad size %s\n", tok);
			return 2;
		}
		count = bytes / sizeof(float) ? bytes / sizeof(float) : 1;
		for (int k = 0; k <= n; k++) {
			bufs[k] = aligned_alloc(64, (count * sizeof(float) + 63) & ~(size_t)63);
			for (size_t i = 0; i < count; i++)
				bufs[k][i] = (float)(k + 1);
		}
		/* small sizes run many more times, so the median means something */
		int it = bytes < (1u << 20) ? iters * 50 : iters;
		for (enum kind kind = K_INPLACE; kind <= K_COPY; kind++) {
			for (int t = 1; t <= threads; t = t == threads ? threads + 1 : threads) {
				double sec = run(kind, bufs, kind == K_COPY ? 1 : n, count, t, it);
				double moved = kind == K_INPLACE ? 2.0 * n * (double)bytes
					       : kind == K_SUM	 ? (n + 1.0) * (double)bytes
								 : 2.0 * (double)bytes;
				double bus = kind == K_INPLACE
						     ? (double)bytes / sec / 1e9 *
							       (n > 1 ? 2.0 * (n - 1) / n : 1.0)
						     : 0;
				if (json)
					printf("%s{\"size\": %zu, \"kind\": \"%s\", \"threads\": %d, "
					       "\"time_us\": %.3f, \"mem_gbs\": %.3f, \"busbw_gbs\": %.3f}",
					       first ? "" : ", ", count * sizeof(float), kind_names[kind],
					       t, sec * 1e6, moved / sec / 1e9, bus);
				else
					printf(" %11zu %8s %7d %10.1f %12.2f %12.2f\n",
					       count * sizeof(float), kind_names[kind], t, sec * 1e6,
					       moved / sec / 1e9, bus);
				first = 0;
			}
		}
		for (int k = 0; k <= n; k++)
			free(bufs[k]);
	}
	if (json)
		printf("]}\n");
	free(list);
	return 0;
}
