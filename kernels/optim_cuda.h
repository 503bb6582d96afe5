/* SPDX-License-Identifier: MIT */
/*
 * optim_cuda.h - what optim.c hands the CUDA kernels (optim_cuda.cu): the
 * update rule resolved from struct opt_params, and every per-call constant
 * already computed on the host in f32 (lr_t from double), so that the CPU
 * and the GPU multiply by the very same numbers.  optim.c has checked the
 * arguments (kind, dtypes, NULLs, alignment, overlap); n == 0 launches
 * nothing but still reports an unusable device.
 */
#ifndef KV_KERNELS_OPTIM_CUDA_H
#define KV_KERNELS_OPTIM_CUDA_H

#include <stddef.h>

#include "kv.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One formula of optim.h each; OPT_SGD splits on momentum. */
enum optim_rule { RULE_SGD, RULE_SGD_MOM, RULE_NAG, RULE_ADAM, RULE_ADAMW, RULE_COUNT };

struct optim_coef {
	int rule;	/* enum optim_rule */
	float lr, wd;	/* as given */
	float rescale;	/* rescale_grad */
	float clip;	/* clip_gradient; +inf when off (clipping to +-inf is the identity) */
	float momentum; /* SGD with momentum, NAG */
	float beta1, beta2, epsilon;
	float one_m_beta1; /* 1 - beta1, in f32 */
	float one_m_beta2; /* 1 - beta2, in f32 */
	float lr_t;	   /* Adam, AdamW: lr * sqrt(1 - beta2^t) / (1 - beta1^t), double -> f32 */
	float decay;	   /* SGD without momentum: 1 - lr * wd, in f32 */
	float lr_wd;	   /* AdamW: lr * wd, in f32 */
};

/* Device pointers; out NULL: no rounded copy (ot is then ignored). */
int optim_update_cuda(int device, void *stream, const struct optim_coef *c, float *weight,
		      const void *grad, kv_dtype gt, float *s0, float *s1, void *out, kv_dtype ot,
		      size_t n);

#ifdef __cplusplus
}
#endif

#endif /* KV_KERNELS_OPTIM_CUDA_H */
