/* SPDX-License-Identifier: MIT */
/*
 * optim_cuda.cu - the CUDA kernels behind optim_update() for device
 * pointers: the formulas of optim.h, one launch per call on the caller's
 * stream, no wait.
 *
 * The arguments travel by value in the kernel's parameter block (struct
 * opt_args, __grid_constant__): no device allocation, no copy ahead of the
 * launch.  Each thread owns whole elements in a grid-stride loop: it loads
 * the gradient (widened to f32), the weight and the states of element i,
 * updates them in registers and stores them back, and the rounded copy when
 * there is one.  One kernel per rule and gradient dtype; the output dtype
 * is a uniform branch.
 *
 * Bit for bit the CPU's (optim.c): every f32 operation is an intrinsic that
 * rounds to nearest even and is never fused or reordered (__fmul_rn,
 * __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn; nvcc would otherwise turn
 * a*b+c into an FMA), in the order optim.h writes; the per-call constants
 * come computed from the host (struct optim_coef); clipping is the same two
 * compare-and-selects; f16 widens and rounds with the hardware conversions
 * (to nearest even), bf16 with the same bit arithmetic as reduce.c.  Only
 * the payload of a NaN stored to f16 may differ from the CPU's.
 * Denormals are kept (the project builds without -ftz, as the CPU keeps
 * MXCSR at its default).
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "gpu.h"
#include "optim.h"
#include "optim_cuda.h"

namespace
{

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;
constexpr int kNoOut = -1;

struct opt_args {
	optim_coef c;
	float *w;
	const void *g;
	float *s0, *s1;
	void *out;
	int ot; /* kv_dtype of out, or kNoOut */
	size_t n;
};

struct g_f32 {
	typedef float S;
	static __device__ __forceinline__ float widen(S x)
	{
		return x;
	}
};

struct g_f16 {
	typedef unsigned short S;
	static __device__ __forceinline__ float widen(S x)
	{
		return __half2float(__ushort_as_half(x));
	}
};

struct g_bf16 {
	typedef unsigned short S;
	static __device__ __forceinline__ float widen(S x)
	{
		return __uint_as_float((unsigned)x << 16);
	}
};

/* reduce.c's bf16_narrow: to nearest even, overflow to inf, NaN kept and quiet. */
__device__ __forceinline__ unsigned short bf16_narrow(float f)
{
	const unsigned x = __float_as_uint(f);
	if ((x & 0x7fffffffu) > 0x7f800000u)
		return (unsigned short)((x >> 16) | 0x40u);
	return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* min(max(x, lo), hi) as compare-and-select, as optim.c does: a NaN x stays NaN. */
__device__ __forceinline__ float clip1(float x, float lo, float hi)
{
	x = x < lo ? lo : x;
	return x > hi ? hi : x;
}

template <int RULE, class G>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ opt_args a)
{
	const optim_coef &c = a.c;
	const float lo = -c.clip, hi = c.clip;
	const size_t stride = (size_t)gridDim.x * blockDim.x;

	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += stride) {
		const float g = G::widen(static_cast<const typename G::S *>(a.g)[i]);
		const float w0 = a.w[i];
		float w;

		if constexpr (RULE == RULE_SGD) {
			const float x = clip1(__fmul_rn(c.rescale, g), lo, hi);
			w = __fsub_rn(__fmul_rn(c.decay, w0), __fmul_rn(c.lr, x));
		} else if constexpr (RULE == RULE_SGD_MOM) {
			const float x = __fadd_rn(clip1(__fmul_rn(c.rescale, g), lo, hi),
						  __fmul_rn(c.wd, w0));
			const float s =
				__fsub_rn(__fmul_rn(c.momentum, a.s0[i]), __fmul_rn(c.lr, x));
			a.s0[i] = s;
			w = __fadd_rn(w0, s);
		} else if constexpr (RULE == RULE_NAG) {
			const float x = __fadd_rn(clip1(__fmul_rn(c.rescale, g), lo, hi),
						  __fmul_rn(c.wd, w0));
			const float m = __fmul_rn(c.momentum, a.s0[i]);
			const float s = __fsub_rn(m, __fmul_rn(c.lr, x));
			a.s0[i] = s;
			w = __fadd_rn(__fsub_rn(w0, m), __fmul_rn(__fadd_rn(c.momentum, 1.0f), s));
		} else { /* RULE_ADAM, RULE_ADAMW */
			float x;
			if constexpr (RULE == RULE_ADAM)
				x = clip1(__fadd_rn(__fmul_rn(c.rescale, g), __fmul_rn(c.wd, w0)),
					  lo, hi);
			else
				x = clip1(__fmul_rn(c.rescale, g), lo, hi);
			const float m =
				__fadd_rn(__fmul_rn(c.beta1, a.s0[i]), __fmul_rn(c.one_m_beta1, x));
			const float v = __fadd_rn(__fmul_rn(c.beta2, a.s1[i]),
						  __fmul_rn(__fmul_rn(c.one_m_beta2, x), x));
			a.s0[i] = m;
			a.s1[i] = v;
			const float d = __fdiv_rn(__fmul_rn(c.lr_t, m),
						  __fadd_rn(__fsqrt_rn(v), c.epsilon));
			w = __fsub_rn(w0, d);
			if constexpr (RULE == RULE_ADAMW)
				w = __fsub_rn(w, __fmul_rn(c.lr_wd, w0));
		}
		a.w[i] = w;
		switch (a.ot) {
		case KV_FLOAT32:
			static_cast<float *>(a.out)[i] = w;
			break;
		case KV_FLOAT16:
			static_cast<unsigned short *>(a.out)[i] =
				__half_as_ushort(__float2half_rn(w));
			break;
		case KV_BFLOAT16:
			static_cast<unsigned short *>(a.out)[i] = bf16_narrow(w);
			break;
		default: /* kNoOut */
			break;
		}
	}
}

int sm_count(int device)
{
	static int cache[64]; /* 0: not asked yet; racing threads store the same value */
	int sms = device < 64 ? __atomic_load_n(&cache[device], __ATOMIC_RELAXED) : 0;

	if (sms == 0) {
		if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) !=
			    cudaSuccess ||
		    sms <= 0)
			sms = 1;
		if (device < 64)
			__atomic_store_n(&cache[device], sms, __ATOMIC_RELAXED);
	}
	return sms;
}

template <int RULE>
cudaError_t launch_rule(const opt_args &a, kv_dtype gt, unsigned blocks, cudaStream_t st)
{
	switch (gt) {
	case KV_FLOAT32:
		update_kernel<RULE, g_f32><<<blocks, kThreads, 0, st>>>(a);
		break;
	case KV_FLOAT16:
		update_kernel<RULE, g_f16><<<blocks, kThreads, 0, st>>>(a);
		break;
	case KV_BFLOAT16:
		update_kernel<RULE, g_bf16><<<blocks, kThreads, 0, st>>>(a);
		break;
	default:
		return cudaErrorInvalidValue;
	}
	return cudaGetLastError();
}

cudaError_t launch(const opt_args &a, kv_dtype gt, int device, cudaStream_t st)
{
	/* enough blocks for the work, at most what the device keeps resident */
	size_t blocks = (a.n + kThreads - 1) / kThreads;
	const size_t cap = (size_t)sm_count(device) * kBlocksPerSm;
	if (blocks > cap)
		blocks = cap;
	const unsigned b = blocks ? (unsigned)blocks : 1;

	switch (a.c.rule) {
	case RULE_SGD:
		return launch_rule<RULE_SGD>(a, gt, b, st);
	case RULE_SGD_MOM:
		return launch_rule<RULE_SGD_MOM>(a, gt, b, st);
	case RULE_NAG:
		return launch_rule<RULE_NAG>(a, gt, b, st);
	case RULE_ADAM:
		return launch_rule<RULE_ADAM>(a, gt, b, st);
	case RULE_ADAMW:
		return launch_rule<RULE_ADAMW>(a, gt, b, st);
	}
	return cudaErrorInvalidValue;
}

} /* namespace */

extern "C" int optim_update_cuda(int device, void *stream, const struct optim_coef *c,
				 float *weight, const void *grad, kv_dtype gt, float *s0, float *s1,
				 void *out, kv_dtype ot, size_t n)
{
	opt_args a = {};
	int prev = -1;

	a.c = *c;
	a.w = weight;
	a.g = grad;
	a.s0 = s0;
	a.s1 = s1;
	a.out = out;
	a.ot = out ? (int)ot : kNoOut;
	a.n = n;

	/* run with device current, then restore the caller's current device */
	cudaError_t e = cudaGetDevice(&prev);
	if (e == cudaSuccess && prev != device)
		e = cudaSetDevice(device);
	if (e == cudaSuccess && n > 0)
		e = launch(a, gt, device, static_cast<cudaStream_t>(stream));
	if (prev >= 0 && prev != device)
		cudaSetDevice(prev);
	if (e != cudaSuccess)
		cudaGetLastError(); /* don't leave our error for the caller's next check */
	return gpu_error_code(e);
}
