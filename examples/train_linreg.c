/* SPDX-License-Identifier: MIT */
/*
 * train_linreg - data-parallel training of a linear model through kvd.
 *
 * Run it under kvrun (kvrun -n 4 build/examples/train_linreg): each rank
 * generates its own shard of one synthetic regression problem, computes the
 * gradient of the mean squared error on its shard, and sums the gradients
 * of all ranks with kv_pushpull.  Rank 0's random initial weights reach
 * every rank with kv_broadcast.  Rank 0 prints the loss of each epoch; at
 * the end every rank checks that it holds exactly rank 0's weights.
 *
 * With --update-on-store the optimizer runs in kvd instead: the weights are
 * a key, kv_set_optimizer("sgd lr=...") is set once, and each epoch's
 * kv_pushpull of the gradient returns the updated weights.  (The loss then
 * travels as an f64 key: kvd's optimizers update f32, f16 and bf16 keys.)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv.h"

struct rng {
	uint64_t s;
};

static double uniform(struct rng *r) /* [0, 1) */
{
	r->s = r->s * 6364136223846793005ull + 1442695040888963407ull;
	return (double)(r->s >> 11) * (1.0 / 9007199254740992.0);
}

static double gauss(struct rng *r)
{
	double u = uniform(r) + 1e-12, v = uniform(r);
	return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

static int die(kv_store *kv, const char *what, int rc)
{
	fprintf(stderr, "train_linreg: %s: %s (%s)\n", what, kv_strerror(rc), kv_last_error(kv));
	return 1;
}

int main(int argc, char **argv)
{
	int dim = 64, per_rank = 2000, epochs = 20, on_store = 0;
	double lr = 0.1;
	kv_store *kv;
	int rc;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--dim") && i + 1 < argc)
			dim = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--samples") && i + 1 < argc)
			per_rank = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--epochs") && i + 1 < argc)
			epochs = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--lr") && i + 1 < argc)
			lr = atof(argv[++i]);
		else if (!strcmp(argv[i], "--update-on-store"))
			on_store = 1;
		else {
			fprintf(stderr,
				"Usage: train_linreg [--dim D] [--samples N] [--epochs E] [--lr LR]\n"
				"                    [--update-on-store]\n"
				"Run under kvrun: kvrun -n 4 train_linreg\n");
			return strcmp(argv[i], "--help") ? 2 : 0;
		}
	}
	if (dim < 1 || per_rank < 1 || epochs < 1) {
		fprintf(stderr, "train_linreg: dim, samples and epochs must be positive\n");
		return 2;
	}
	rc = kv_create("local", NULL, &kv);
	if (rc)
		return die(NULL, "kv_create", rc);
	int rank = kv_rank(kv), n = kv_num_workers(kv);

	/* the problem: y = x . w_true + noise; each rank draws its own rows */
	struct rng truth = { 42 }, data = { 1000 + (uint64_t)rank }, init = { 7 };
	float *w_true = malloc(sizeof(float) * (size_t)dim);
	float *x = malloc(sizeof(float) * (size_t)dim * (size_t)per_rank);
	float *y = malloc(sizeof(float) * (size_t)per_rank);
	float *w = malloc(sizeof(float) * (size_t)dim);
	float *grad = malloc(sizeof(float) * (size_t)(dim + 1)); /* last slot: the loss */
	float *check = malloc(sizeof(float) * (size_t)dim);

	for (int j = 0; j < dim; j++)
		w_true[j] = (float)gauss(&truth);
	for (int i = 0; i < per_rank; i++) {
		double dot = 0;
		for (int j = 0; j < dim; j++) {
			x[(size_t)i * dim + j] = (float)gauss(&data);
			dot += x[(size_t)i * dim + j] * w_true[j];
		}
		y[i] = (float)(dot + 0.1 * gauss(&data));
	}
	/* rank 0 draws the initial weights; everyone gets them by broadcast */
	for (int j = 0; j < dim; j++)
		w[j] = rank == 0 ? (float)gauss(&init) : 0.0f;
	rc = kv_broadcast(kv, "weights", w, NULL, (size_t)dim, KV_FLOAT32, 0);
	if (rc)
		return die(kv, "broadcast", rc);
	memset(grad, 0, sizeof(float) * (size_t)(dim + 1));
	rc = kv_init(kv, "grad", grad, (size_t)dim + 1, KV_FLOAT32);
	if (rc)
		return die(kv, "init", rc);

	double total = (double)per_rank * n, first = 0, last = 0;
	if (on_store) {
		char spec[128];
		double zero = 0;

		/* the weights become the store's: w -= lr * (sum of gradients) / total */
		rc = kv_init(kv, "w", w, (size_t)dim, KV_FLOAT32);
		if (!rc)
			rc = kv_init(kv, "loss", &zero, 1, KV_FLOAT64);
		if (rc)
			return die(kv, "init", rc);
		snprintf(spec, sizeof(spec), "sgd lr=%g rescale_grad=%.17g", lr, 1.0 / total);
		rc = kv_set_optimizer(kv, spec);
		if (rc)
			return die(kv, "set_optimizer", rc);
	}
	for (int e = 0; e < epochs; e++) {
		memset(grad, 0, sizeof(float) * (size_t)(dim + 1));
		for (int i = 0; i < per_rank; i++) {
			const float *xi = x + (size_t)i * dim;
			double err = -y[i];
			for (int j = 0; j < dim; j++)
				err += xi[j] * w[j];
			for (int j = 0; j < dim; j++)
				grad[j] += (float)(2 * err * xi[j]);
			grad[dim] += (float)(err * err);
		}
		if (on_store) {
			/* kvd sums the gradients and applies SGD: back come the weights */
			double loss = grad[dim];
			rc = kv_pushpull(kv, "w", grad, w, (size_t)dim, KV_FLOAT32, 0);
			if (!rc)
				rc = kv_pushpull(kv, "loss", &loss, NULL, 1, KV_FLOAT64, 0);
			if (rc)
				return die(kv, "pushpull", rc);
			last = loss / total;
		} else {
			/* the sum of every rank's gradient (and loss) */
			rc = kv_pushpull(kv, "grad", grad, NULL, (size_t)dim + 1, KV_FLOAT32, 0);
			if (rc)
				return die(kv, "pushpull", rc);
			for (int j = 0; j < dim; j++)
				w[j] -= (float)(lr * grad[j] / total);
			last = grad[dim] / total;
		}
		if (e == 0)
			first = last;
		if (rank == 0)
			printf("epoch %3d  loss %.6f\n", e + 1, last);
	}

	/* every rank must hold rank 0's weights, bit for bit */
	rc = kv_broadcast(kv, "final", w, check, (size_t)dim, KV_FLOAT32, 0);
	if (rc)
		return die(kv, "broadcast", rc);
	int same = memcmp(check, w, sizeof(float) * (size_t)dim) == 0;
	if (!same)
		fprintf(stderr, "train_linreg: rank %d: weights differ from rank 0's\n", rank);
	if (rank == 0) {
		double dist = 0;
		for (int j = 0; j < dim; j++)
			dist += (w[j] - w_true[j]) * (double)(w[j] - w_true[j]);
		printf("%d ranks x %d samples: loss %.4f -> %.4f, |w - w_true| = %.4f\n", n,
		       per_rank, first, last, sqrt(dist));
	}
	kv_close(kv);
	free(w_true);
	free(x);
	free(y);
	free(w);
	free(grad);
	free(check);
	if (!same)
		return 1;
	if (rank == 0)
		printf("every rank holds identical weights\n");
	return last < first ? 0 : 1;
}
