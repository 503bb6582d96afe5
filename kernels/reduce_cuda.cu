/* SPDX-License-Identifier: MIT */
/*
 * reduce_cuda.cu - the CUDA kernels behind reduce_sum() and reduce_copy().
 *
 * One launch per call, on the caller's stream, no wait.  The input and output
 * pointers travel by value in the kernel's parameter block (struct
 * red_args, __grid_constant__), so a call needs no device allocation and no
 * copy ahead of the launch.
 *
 * Each thread owns whole elements: it loads element i of every input, adds
 * left to right in the accumulation type (f32 for f16 and bf16, unsigned
 * for the integers), rounds once and stores element i to every output.  As
 * no thread touches another's elements, an output that is also an input is
 * safe.  The loops over inputs and outputs are unrolled to a compile-time
 * bound (inputs: 1, 2, 4, 8 or 16; outputs: 1 or 16, picked per call) with a
 * predicate each, so all loads are issued before the first add and the
 * common nin == 2, nout == 1 kernel needs few registers (full occupancy).
 * f16 converts with the hardware (round to nearest even); bf16 with the
 * same bit arithmetic as reduce.c, so CPU and GPU agree bit for bit; a NaN
 * stays a NaN, its payload may differ for f16.  nin == 1 copies raw bits.
 *
 * When every pointer has the same offset within 16 bytes (the usual case:
 * cudaMalloc'd buffers, or all shifted alike) the body moves 16-byte vectors
 * and a few scalar elements before and after it (head and tail); otherwise
 * every element goes scalar.  Both run in the same grid-stride kernel.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>
#include <string.h>

#include "gpu.h"
#include "reduce.h"
#include "reduce_cuda.h"

namespace
{

constexpr int kThreads = 256;
constexpr int kMax = REDUCE_MAX_INPUTS;
constexpr int kBlocksPerSm = 8;

struct red_args {
	const void *in[kMax];
	void *out[kMax];
	int nin, nout;
	size_t n;    /* elements */
	size_t head; /* scalar elements before the first 16-byte vector */
	size_t nvec; /* 16-byte vectors after them */
};

/* S: what memory holds; A: what the sum is kept in. */
struct tr_f32 {
	typedef float S;
	typedef float A;
	static __device__ __forceinline__ A widen(S x)
	{
		return x;
	}
	static __device__ __forceinline__ S narrow(A x)
	{
		return x;
	}
	static __device__ __forceinline__ A add(A x, A y)
	{
		return __fadd_rn(x, y);
	}
};

struct tr_f64 {
	typedef double S;
	typedef double A;
	static __device__ __forceinline__ A widen(S x)
	{
		return x;
	}
	static __device__ __forceinline__ S narrow(A x)
	{
		return x;
	}
	static __device__ __forceinline__ A add(A x, A y)
	{
		return __dadd_rn(x, y);
	}
};

struct tr_f16 {
	typedef unsigned short S;
	typedef float A;
	static __device__ __forceinline__ A widen(S x)
	{
		return __half2float(__ushort_as_half(x));
	}
	static __device__ __forceinline__ S narrow(A x)
	{
		return __half_as_ushort(__float2half_rn(x));
	}
	static __device__ __forceinline__ A add(A x, A y)
	{
		return __fadd_rn(x, y);
	}
};

/* bf16 by the same bit arithmetic as the CPU's (reduce.c: bf16_narrow), so
 * both give the same bits, NaN payloads and subnormals included. */
struct tr_bf16 {
	typedef unsigned short S;
	typedef float A;
	static __device__ __forceinline__ A widen(S x)
	{
		return __uint_as_float((unsigned)x << 16);
	}
	static __device__ __forceinline__ S narrow(A f)
	{
		const unsigned x = __float_as_uint(f);
		if ((x & 0x7fffffffu) > 0x7f800000u)
			return (S)((x >> 16) | 0x40u); /* NaN: kept, quiet */
		return (S)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
	}
	static __device__ __forceinline__ A add(A x, A y)
	{
		return __fadd_rn(x, y);
	}
};

/* Integers wrap as unsigned; also the raw copy (nin == 1) of any type. */
template <typename U> struct tr_uint {
	typedef U S;
	typedef U A;
	static __device__ __forceinline__ A widen(S x)
	{
		return x;
	}
	static __device__ __forceinline__ S narrow(A x)
	{
		return x;
	}
	static __device__ __forceinline__ A add(A x, A y)
	{
		return x + y;
	}
};

template <class Tr, int MAXIN, int MAXOUT>
__device__ __forceinline__ void sum_one(const red_args &a, size_t i)
{
	typedef typename Tr::S S;
	S v[MAXIN];

#pragma unroll
	for (int k = 0; k < MAXIN; k++)
		if (k < a.nin)
			v[k] = static_cast<const S *>(a.in[k])[i];
	typename Tr::A s = Tr::widen(v[0]);
#pragma unroll
	for (int k = 1; k < MAXIN; k++)
		if (k < a.nin)
			s = Tr::add(s, Tr::widen(v[k]));
	const S r = Tr::narrow(s);
#pragma unroll
	for (int k = 0; k < MAXOUT; k++)
		if (k < a.nout)
			static_cast<S *>(a.out[k])[i] = r;
}

template <class Tr, int MAXIN, int MAXOUT>
__device__ __forceinline__ void sum_vec(const red_args &a, size_t j)
{
	typedef typename Tr::S S;
	constexpr int E = 16 / sizeof(S);
	uint4 v[MAXIN];

#pragma unroll
	for (int k = 0; k < MAXIN; k++)
		if (k < a.nin)
			v[k] = reinterpret_cast<const uint4 *>(static_cast<const S *>(a.in[k]) +
							       a.head)[j];
	typename Tr::A s[E];
	S e[E];
	memcpy(e, &v[0], sizeof(e));
#pragma unroll
	for (int q = 0; q < E; q++)
		s[q] = Tr::widen(e[q]);
#pragma unroll
	for (int k = 1; k < MAXIN; k++) {
		if (k < a.nin) {
			memcpy(e, &v[k], sizeof(e));
#pragma unroll
			for (int q = 0; q < E; q++)
				s[q] = Tr::add(s[q], Tr::widen(e[q]));
		}
	}
#pragma unroll
	for (int q = 0; q < E; q++)
		e[q] = Tr::narrow(s[q]);
	uint4 r;
	memcpy(&r, e, sizeof(r));
#pragma unroll
	for (int k = 0; k < MAXOUT; k++)
		if (k < a.nout)
			reinterpret_cast<uint4 *>(static_cast<S *>(a.out[k]) + a.head)[j] = r;
}

template <class Tr, int MAXIN, int MAXOUT>
__global__ void __launch_bounds__(kThreads) sum_kernel(const __grid_constant__ red_args a)
{
	constexpr size_t E = 16 / sizeof(typename Tr::S);
	const size_t stride = (size_t)gridDim.x * blockDim.x;
	const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	const size_t body_end = a.head + a.nvec * E;
	const size_t nscalar = a.head + (a.n - body_end);

	for (size_t j = tid; j < a.nvec; j += stride)
		sum_vec<Tr, MAXIN, MAXOUT>(a, j);
	for (size_t s = tid; s < nscalar; s += stride)
		sum_one<Tr, MAXIN, MAXOUT>(a, s < a.head ? s : body_end + (s - a.head));
}

/* Vectors only when all pointers sit at the same offset within 16 bytes;
 * head elements bring them to a 16-byte boundary together. */
void plan(red_args &a, size_t es)
{
	const uintptr_t mis = (uintptr_t)a.in[0] & 15;
	bool same = true;

	for (int k = 0; k < a.nin; k++)
		same = same && ((uintptr_t)a.in[k] & 15) == mis;
	for (int k = 0; k < a.nout; k++)
		same = same && ((uintptr_t)a.out[k] & 15) == mis;
	if (!same) {
		a.head = a.n;
		a.nvec = 0;
		return;
	}
	size_t head = ((16 - mis) & 15) / es;
	if (head > a.n)
		head = a.n;
	a.head = head;
	a.nvec = (a.n - head) / (16 / es);
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

/* The register arrays and the hoisted pointers are sized for the call:
 * few inputs and one output, few registers, many threads in flight. */
template <class Tr, int MAXIN> void launch_in(const red_args &a, unsigned blocks, cudaStream_t st)
{
	if (a.nout == 1)
		sum_kernel<Tr, MAXIN, 1><<<blocks, kThreads, 0, st>>>(a);
	else
		sum_kernel<Tr, MAXIN, kMax><<<blocks, kThreads, 0, st>>>(a);
}

/* Plans the vector body; returns the grid: enough blocks for the work, at
 * most what the device keeps resident (the kernel strides over the rest). */
unsigned grid_for(red_args &a, size_t es, int device)
{
	plan(a, es);
	const size_t work = a.nvec + a.head + (a.n - a.head - a.nvec * (16 / es));
	size_t blocks = (work + kThreads - 1) / kThreads;
	const size_t cap = (size_t)sm_count(device) * kBlocksPerSm;
	if (blocks > cap)
		blocks = cap;
	return blocks ? (unsigned)blocks : 1;
}

template <class Tr> cudaError_t launch(red_args &a, int device, cudaStream_t st)
{
	const unsigned blocks = grid_for(a, sizeof(typename Tr::S), device);

	if (a.nin <= 2)
		launch_in<Tr, 2>(a, (unsigned)blocks, st);
	else if (a.nin <= 4)
		launch_in<Tr, 4>(a, (unsigned)blocks, st);
	else if (a.nin <= 8)
		launch_in<Tr, 8>(a, (unsigned)blocks, st);
	else
		launch_in<Tr, kMax>(a, (unsigned)blocks, st);
	return cudaGetLastError();
}

/* nin == 1: the bits move as they are (a NaN payload too), whatever the dtype. */
template <class Tr> cudaError_t launch_raw(red_args &a, int device, cudaStream_t st)
{
	launch_in<Tr, 1>(a, grid_for(a, sizeof(typename Tr::S), device), st);
	return cudaGetLastError();
}

cudaError_t launch_copy(red_args &a, size_t es, int device, cudaStream_t st)
{
	switch (es) {
	case 2:
		return launch_raw<tr_uint<unsigned short>>(a, device, st);
	case 4:
		return launch_raw<tr_uint<unsigned int>>(a, device, st);
	default:
		return launch_raw<tr_uint<unsigned long long>>(a, device, st);
	}
}

size_t dtype_size(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT16:
	case KV_BFLOAT16:
		return 2;
	case KV_FLOAT32:
	case KV_INT32:
		return 4;
	default:
		return 8;
	}
}

/* Runs fn with device current, then restores the caller's current device. */
template <class F> int on_device(int device, size_t n, F fn)
{
	int prev = -1;
	cudaError_t e = cudaGetDevice(&prev);

	if (e == cudaSuccess && prev != device)
		e = cudaSetDevice(device);
	if (e == cudaSuccess && n > 0)
		e = fn();
	if (prev >= 0 && prev != device)
		cudaSetDevice(prev);
	if (e != cudaSuccess)
		cudaGetLastError(); /* don't leave our error for the caller's next check */
	return gpu_error_code(e);
}

} /* namespace */

extern "C" int reduce_sum_cuda(int device, void *stream, kv_dtype t, void *const *outs, int nout,
			       const void *const *ins, int nin, size_t n)
{
	red_args a = {};

	for (int k = 0; k < nin; k++)
		a.in[k] = ins[k];
	for (int k = 0; k < nout; k++)
		a.out[k] = outs[k];
	a.nin = nin;
	a.nout = nout;
	a.n = n;
	cudaStream_t st = static_cast<cudaStream_t>(stream);
	return on_device(device, n, [&]() -> cudaError_t {
		if (nin == 1)
			return launch_copy(a, dtype_size(t), device, st);
		switch (t) {
		case KV_FLOAT32:
			return launch<tr_f32>(a, device, st);
		case KV_FLOAT64:
			return launch<tr_f64>(a, device, st);
		case KV_FLOAT16:
			return launch<tr_f16>(a, device, st);
		case KV_BFLOAT16:
			return launch<tr_bf16>(a, device, st);
		case KV_INT32:
			return launch<tr_uint<unsigned int>>(a, device, st);
		case KV_INT64:
			return launch<tr_uint<unsigned long long>>(a, device, st);
		}
		return cudaErrorInvalidValue;
	});
}

extern "C" int reduce_copy_cuda(int device, void *stream, kv_dtype t, void *const *outs, int nout,
				const void *in, size_t n)
{
	const void *ins[1] = {in};

	return reduce_sum_cuda(device, stream, t, outs, nout, ins, 1, n);
}
