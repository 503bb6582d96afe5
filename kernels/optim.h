/* SPDX-License-Identifier: MIT */
/*
 * optim.h - optimizer updates applied where gradients are summed, following
 * MXNet 1.9's update formulas, one interface for the CPU and CUDA.
 *
 * Per element i, with g = the summed gradient (widened to f32), w = the f32
 * master weight, and clip(x) = min(max(x, -clip_gradient), clip_gradient)
 * when clip_gradient >= 0 (else no clipping):
 *
 *   OPT_SGD, momentum == 0 (s0 unused):
 *       g = clip(rescale_grad * g)
 *       w = (1 - lr * wd) * w - lr * g
 *   OPT_SGD, momentum > 0 (s0: momentum):
 *       g = clip(rescale_grad * g) + wd * w
 *       s0 = momentum * s0 - lr * g
 *       w = w + s0
 *   OPT_NAG (Nesterov; s0: momentum, lr inside it as in MXNet's nag_mom_update,
 *   so a learning-rate schedule acts as it does there):
 *       g = clip(rescale_grad * g) + wd * w
 *       m = momentum * s0
 *       s0 = m - lr * g
 *       w = w - m + (momentum + 1) * s0
 *   OPT_ADAM (s0: mean, s1: variance; t: this key's update count, from 1):
 *       lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
 *       g = clip(rescale_grad * g + wd * w)
 *       s0 = beta1 * s0 + (1 - beta1) * g
 *       s1 = beta2 * s1 + (1 - beta2) * g * g
 *       w = w - lr_t * s0 / (sqrt(s1) + epsilon)
 *   OPT_ADAMW (decoupled weight decay; same states and lr_t):
 *       g = clip(rescale_grad * g)
 *       s0 = beta1 * s0 + (1 - beta1) * g
 *       s1 = beta2 * s1 + (1 - beta2) * g * g
 *       w = w - lr_t * s0 / (sqrt(s1) + epsilon) - lr * wd * w
 *
 * Arithmetic is in f32 in exactly the order written (lr_t is computed once
 * per call in double and rounded to f32), so the CPU and CUDA versions agree
 * bit for bit for SGD and NAG, and to within 1e-6 relative for Adam/AdamW
 * (sqrt and division may round differently).
 */
#ifndef KV_KERNELS_OPTIM_H
#define KV_KERNELS_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "kv.h"

#ifdef __cplusplus
extern "C" {
#endif

enum opt_kind { OPT_NONE = 0, OPT_SGD = 1, OPT_NAG = 2, OPT_ADAM = 3, OPT_ADAMW = 4 };

struct opt_params {
	int kind; /* enum opt_kind */
	float lr, wd, rescale_grad, clip_gradient; /* clip_gradient < 0: no clipping */
	float momentum;                             /* SGD, NAG */
	float beta1, beta2, epsilon;                /* Adam, AdamW */
};

/* How many f32 state arrays the kind keeps per element (0, 1 or 2). */
int optim_nstates(const struct opt_params *p);

/*
 * One update of n elements at step t (>= 1).  weight: f32 master weights,
 * updated in place.  grad: the summed gradient, n elements of dtype gt
 * (f32, f16 or bf16).  s0, s1: the f32 states optim_nstates() asks for
 * (NULL otherwise).  out: when not NULL, also receives the new weights
 * rounded to dtype ot (f32, f16 or bf16; to nearest even) - the value an
 * f16/bf16 key stores.  device REDUCE_CPU (-1) runs here; a CUDA device
 * ordinal launches on stream (pointers are device pointers) and returns
 * without waiting.  Returns 0, KV_ERR_INVALID, or KV_ERR_UNSUPPORTED.
 */
int optim_update(int device, void *stream, const struct opt_params *p, uint64_t t,
		 float *weight, const void *grad, kv_dtype gt, float *s0, float *s1, void *out,
		 kv_dtype ot, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* KV_KERNELS_OPTIM_H */
