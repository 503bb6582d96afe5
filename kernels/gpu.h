/* SPDX-License-Identifier: MIT */
/*
 * gpu.h - is there a usable CUDA device, and a few plain C helpers around
 * the CUDA runtime for code that must not include CUDA headers (tests,
 * tools).
 *
 * The binaries link the static CUDA runtime, which loads the driver with
 * dlopen at first use: on a machine without a driver or without a GPU these
 * calls answer "none" quietly.  Built without CUDA (KV_HAVE_CUDA undefined)
 * they answer "none" too, and the helpers return KV_ERR_UNSUPPORTED / NULL.
 * Every helper switches to the given device for the call and restores the
 * calling thread's current device afterwards.
 */
#ifndef KV_KERNELS_GPU_H
#define KV_KERNELS_GPU_H

#include <stddef.h>

#include "kv.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Usable CUDA devices (not in "prohibited" compute mode); 0 without driver or GPU.
 * Decided once per process. */
int gpu_count(void);
/* A sentence for logs and `kvctl status`: "no GPU (CUDA driver not found)",
 * "1 GPU: NVIDIA H100 80GB HBM3 (driver 13.0)", ... */
const char *gpu_status(void);

/* Device memory, for tests and tools.  NULL / KV_ERR_* on failure. */
void *gpu_alloc(int device, size_t bytes);
void gpu_free(int device, void *p);
int gpu_memcpy_h2d(int device, void *dst, const void *src, size_t bytes);
int gpu_memcpy_d2h(int device, void *dst, const void *src, size_t bytes);
int gpu_memset(int device, void *dst, int byte, size_t bytes);
/* Waits for all work on device; reports a kernel fault as KV_ERR_IO. */
int gpu_sync(int device);

/* A cudaError_t as a KV_ERR_* code (0 for cudaSuccess). */
int gpu_error_code(int cuda_error);

/*
 * For libkv's GPU tensors and kvd's pinning.  All answer "no" / fail with
 * KV_ERR_UNSUPPORTED quietly when there is no GPU (gpu_count() == 0).
 */
/* The device ordinal whose memory p is (device or managed memory), or -1 (host). */
int gpu_pointer_device(const void *p);
/* Copy bytes (either direction, UVA) on stream (a cudaStream_t, NULL: legacy), then wait. */
int gpu_copy(void *dst, const void *src, size_t bytes, void *stream);
/* The same without waiting; gpu_stream_sync() waits. */
int gpu_copy_async(void *dst, const void *src, size_t bytes, void *stream);
int gpu_stream_sync(void *stream);
/* Page-lock host memory for DMA (portable, mapped); 0 or KV_ERR_*. */
int gpu_host_register(void *p, size_t bytes);
void gpu_host_unregister(void *p);
/* Name and memory of device dev; 0 or KV_ERR_*. */
int gpu_info(int dev, char *name, size_t len, size_t *mem_bytes);

#ifdef __cplusplus
}
#endif

#endif /* KV_KERNELS_GPU_H */
