/* SPDX-License-Identifier: MIT */
/*
 * reduce.h - the arithmetic of kvd: elementwise sums of N buffers, one
 * interface for the CPU and for CUDA.
 *
 * reduce_sum() adds nin input buffers of n elements of dtype t and writes the
 * sum to each of nout outputs.  Any output may be the same buffer as any
 * input (in place); outputs do not partially overlap inputs otherwise.
 * Integer sums wrap as C unsigned arithmetic does; f32 and f64 add in their
 * own precision, left to right over the inputs; f16 and bf16 are widened to
 * f32, summed in f32, and rounded once (to nearest, ties to even) on store.
 *
 * The CPU versions are vectorised loops for the host; the CUDA versions
 * (reduce_cuda.cu, compiled when nvcc exists) take device pointers and a
 * stream.  Callers choose with the device argument: REDUCE_CPU or a CUDA
 * device ordinal.
 */
#ifndef KV_KERNELS_REDUCE_H
#define KV_KERNELS_REDUCE_H

#include <stddef.h>
#include <stdint.h>

#include "kv.h"

#ifdef __cplusplus
extern "C" {
#endif

#define REDUCE_CPU	  (-1)
#define REDUCE_MAX_INPUTS 16

/*
 * Sum: outs[j][i] = ins[0][i] + ... + ins[nin-1][i] for every j < nout.
 * 1 <= nin <= REDUCE_MAX_INPUTS, 1 <= nout <= REDUCE_MAX_INPUTS.
 * device REDUCE_CPU runs on the calling thread; a device ordinal launches on
 * stream (a cudaStream_t, NULL for the legacy stream) and returns without
 * waiting.  Returns 0, KV_ERR_INVALID for bad arguments, KV_ERR_UNSUPPORTED
 * for a device when CUDA is absent.
 * Bad arguments: nin or nout out of range, an unknown dtype, a device below
 * REDUCE_CPU, and, when n > 0, a NULL array or pointer, a pointer not
 * aligned to its element size, n * element size past the address space, or
 * an output that partially overlaps an input.  n == 0 does nothing.
 * Which NaN comes out of a sum of several NaNs is not specified.
 */
int reduce_sum(int device, void *stream, kv_dtype t, void *const *outs, int nout,
	       const void *const *ins, int nin, size_t n);

/* Copy n elements of t from in to each output (a broadcast); same rules. */
int reduce_copy(int device, void *stream, kv_dtype t, void *const *outs, int nout, const void *in,
		size_t n);

/* Half-precision conversions used by the CPU kernels and the tests. */
float half_to_float(uint16_t h);
uint16_t float_to_half(float f); /* round to nearest even; overflow to inf; NaN kept */
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f); /* round to nearest even; NaN kept */

/*
 * n elements between f32 and t (KV_FLOAT32, KV_FLOAT16 or KV_BFLOAT16 only;
 * no other checks) on the host, vectorised like the sums and with the same
 * bits as half_to_float/float_to_half/bf16_to_float/float_to_bf16.  For the
 * optimizer (optim.c): the buffers do not overlap.
 */
void reduce_to_f32(float *dst, const void *src, kv_dtype t, size_t n);
void reduce_from_f32(void *dst, kv_dtype t, const float *src, size_t n);

/*
 * CPU variants.  reduce_sum() picks the widest the CPU and the OS support
 * (decided once, on first use); tests and benchmarks may cap it to run the
 * narrower ones.  Every variant gives bit-identical results.
 */
enum { REDUCE_ISA_PORTABLE = 0, REDUCE_ISA_AVX2 = 1, REDUCE_ISA_AVX512 = 2 };
int reduce_cpu_isa(void);		    /* the level in use now */
int reduce_cpu_isa_limit(int max_level);    /* use at most max_level; returns the level in use */
const char *reduce_cpu_isa_name(int level); /* "portable", "avx2+f16c", "avx512f" */

#ifdef __cplusplus
}
#endif

#endif /* KV_KERNELS_REDUCE_H */
