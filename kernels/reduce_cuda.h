/* SPDX-License-Identifier: MIT */
/*
 * reduce_cuda.h - the CUDA side of reduce.h, defined in reduce_cuda.cu and
 * called only by reduce.c, which has already checked the arguments (counts,
 * dtype, NULLs, alignment, overlap).  Same meaning as reduce_sum() and
 * reduce_copy(): device pointers, launched on stream, no wait.  n == 0
 * launches nothing but still reports an unusable device.
 */
#ifndef KV_KERNELS_REDUCE_CUDA_H
#define KV_KERNELS_REDUCE_CUDA_H

#include <stddef.h>

#include "kv.h"

#ifdef __cplusplus
extern "C" {
#endif

int reduce_sum_cuda(int device, void *stream, kv_dtype t, void *const *outs, int nout,
		    const void *const *ins, int nin, size_t n);
int reduce_copy_cuda(int device, void *stream, kv_dtype t, void *const *outs, int nout,
		     const void *in, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* KV_KERNELS_REDUCE_CUDA_H */
