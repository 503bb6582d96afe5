/* SPDX-License-Identifier: MIT */
/*
 * mpi_allreduce - the peer kvbench is compared with: MPI_Allreduce, in place,
 * sum, f32, timed the way kvbench times a step (refill, barrier, op; the
 * step's time is the slowest rank's), results checked.
 *
 *   mpirun -n 2 bench/mpi_allreduce [--sizes 4K,...] [--iters N] [--warmup N] [--json]
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double quantile(double *v, int n, double q)
{
	int i = (int)ceil(q * n) - 1;
	qsort(v, (size_t)n, sizeof(*v), cmp);
	return v[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

int main(int argc, char **argv)
{
	const char *sizes = "4K,64K,1M,16M,64M,256M";
	int iters = 20, warmup = 5, json = 0, rank, n, bad = 0;

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &n);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--sizes") && i + 1 < argc)
			sizes = argv[++i];
		else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
			iters = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--warmup") && i + 1 < argc)
			warmup = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--json"))
			json = 1;
		else {
			if (rank == 0)
				fprintf(stderr, "usage: mpi_allreduce [--sizes L] [--iters N] "
						"[--warmup N] [--json]\n");
			MPI_Finalize();
			return 2;
		}
	}
	if (rank == 0) {
		if (json)
			printf("{\"tool\": \"mpi_allreduce\", \"ranks\": %d, \"rows\": [", n);
		else
			printf("# MPI_Allreduce in place, sum, f32, %d ranks, %d iters (+%d warmup)\n"
			       "#%11s %12s %10s %10s %12s %12s\n",
			       n, iters, warmup, "size", "count", "p50(us)", "p99(us)",
			       "algbw(GB/s)", "busbw(GB/s)");
	}
	char *list = strdup(sizes), *save = NULL;
	int first = 1;
	double *t = malloc(sizeof(double) * (size_t)iters);
	for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		size_t bytes = 0, count;
		if (parse_size(tok, &bytes)) {
			if (rank == 0)
				fprintf(stderr, "bad size %s\n", tok);
			MPI_Abort(MPI_COMM_WORLD, 2);
		}
		count = bytes / 4 ? bytes / 4 : 1;
		float *buf = aligned_alloc(64, (count * 4 + 63) & ~(size_t)63);
		for (int s = 0; s < warmup + iters; s++) {
			for (size_t i = 0; i < count; i++)
				buf[i] = (float)((rank + 1) + (int)((i + (size_t)s) % 7));
			MPI_Barrier(MPI_COMM_WORLD);
			double t0 = MPI_Wtime();
			MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM,
				      MPI_COMM_WORLD);
			double dt = MPI_Wtime() - t0, worst;
			MPI_Reduce(&dt, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
			if (s >= warmup && rank == 0)
				t[s - warmup] = worst;
			for (size_t i = 0; i < count && !bad; i++) {
				double want = 0;
				for (int r = 0; r < n; r++)
					want += (r + 1) + (int)((i + (size_t)s) % 7);
				if (buf[i] != (float)want) {
					fprintf(stderr, "rank %d: element %zu is %g, want %g\n", rank,
						i, buf[i], want);
					bad = 1;
				}
			}
		}
		if (rank == 0) {
			double p99 = quantile(t, iters, 0.99), p50 = quantile(t, iters, 0.5);
			double alg = (double)(count * 4) / p50 / 1e9;
			double bus = alg * (n > 1 ? 2.0 * (n - 1) / n : 1.0);
			if (json)
				printf("%s{\"size\": %zu, \"count\": %zu, \"type\": \"f32\", "
				       "\"p50_us\": %.2f, \"p99_us\": %.2f, \"algbw_gbs\": %.4f, "
				       "\"busbw_gbs\": %.4f}",
				       first ? "" : ", ", count * 4, count, p50 * 1e6, p99 * 1e6, alg,
				       bus);
			else
				printf(" %11zu %12zu %10.1f %10.1f %12.3f %12.3f\n", count * 4, count,
				       p50 * 1e6, p99 * 1e6, alg, bus);
			first = 0;
		}
		free(buf);
	}
	if (rank == 0 && json)
		printf("]}\n");
	free(list);
	free(t);
	MPI_Finalize();
	return bad;
}
