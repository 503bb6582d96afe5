/* SPDX-License-Identifier: MIT */
/*
 * gpu.c - the CUDA availability probe and plain C helpers for device memory.
 *
 * The probe runs once per process (pthread_once) and never creates a CUDA
 * context: cudaDriverGetVersion says whether libcuda could be loaded at all
 * (0 when it could not), cudaGetDeviceCount whether it sees devices.  Neither
 * prints anything.  Errors the runtime records on the way are cleared, so a
 * caller's own cudaGetLastError() is not disturbed by ours.
 */
#include "gpu.h"

#ifdef KV_HAVE_CUDA

#include <pthread.h>
#include <stdio.h>

#include <cuda_runtime_api.h>

static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static int probe_count;
static char probe_status[256];

static void probe(void)
{
	int drv = 0, rt = 0, n = 0, usable = 0;
	cudaError_t e;

	if (cudaDriverGetVersion(&drv) != cudaSuccess || drv == 0) {
		snprintf(probe_status, sizeof(probe_status), "no GPU (CUDA driver not found)");
		goto out;
	}
	e = cudaGetDeviceCount(&n);
	if (e == cudaErrorInsufficientDriver) {
		cudaRuntimeGetVersion(&rt);
		snprintf(probe_status, sizeof(probe_status),
			 "no GPU (CUDA driver %d.%d is older than the runtime %d.%d)", drv / 1000,
			 drv % 1000 / 10, rt / 1000, rt % 1000 / 10);
		goto out;
	}
	if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0)) {
		snprintf(probe_status, sizeof(probe_status), "no GPU (no CUDA device)");
		goto out;
	}
	if (e != cudaSuccess) {
		snprintf(probe_status, sizeof(probe_status), "no GPU (%s)", cudaGetErrorString(e));
		goto out;
	}
	for (int d = 0; d < n; d++) {
		int mode = cudaComputeModeDefault;
		if (cudaDeviceGetAttribute(&mode, cudaDevAttrComputeMode, d) == cudaSuccess &&
		    mode != cudaComputeModeProhibited)
			usable++;
	}
	if (usable == 0) {
		snprintf(probe_status, sizeof(probe_status),
			 "no GPU (%d CUDA device%s, all in prohibited compute mode)", n,
			 n == 1 ? "" : "s");
		goto out;
	}
	struct cudaDeviceProp prop;
	const char *name = "unknown";
	if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
		prop.name[sizeof(prop.name) - 1] = '\0';
		name = prop.name;
	}
	snprintf(probe_status, sizeof(probe_status), "%d GPU%s: %.120s%s (driver %d.%d)", usable,
		 usable == 1 ? "" : "s", name, usable > 1 ? ", ..." : "", drv / 1000,
		 drv % 1000 / 10);
	probe_count = usable;
out:
	cudaGetLastError();
}

int gpu_count(void)
{
	pthread_once(&probe_once, probe);
	return probe_count;
}

const char *gpu_status(void)
{
	pthread_once(&probe_once, probe);
	return probe_status;
}

int gpu_error_code(int cuda_error)
{
	switch ((enum cudaError)cuda_error) {
	case cudaSuccess:
		return 0;
	case cudaErrorInvalidValue:
	case cudaErrorInvalidDevice:
	case cudaErrorInvalidDevicePointer:
	case cudaErrorInvalidResourceHandle:
		return KV_ERR_INVALID;
	case cudaErrorMemoryAllocation:
		return KV_ERR_NOMEM;
	case cudaErrorNoDevice:
	case cudaErrorInsufficientDriver:
	case cudaErrorDevicesUnavailable:
	case cudaErrorNoKernelImageForDevice:
	case cudaErrorUnsupportedPtxVersion:
	case cudaErrorCompatNotSupportedOnDevice:
		return KV_ERR_UNSUPPORTED;
	default:
		return KV_ERR_IO;
	}
}

/* Make device current for one call; *prev is what to restore. */
static int dev_enter(int device, int *prev)
{
	cudaError_t e = cudaGetDevice(prev);

	if (e == cudaSuccess && *prev != device)
		e = cudaSetDevice(device);
	if (e != cudaSuccess) {
		cudaGetLastError();
		return gpu_error_code(e);
	}
	return 0;
}

static int dev_leave(int device, int prev, cudaError_t e)
{
	if (prev != device)
		cudaSetDevice(prev);
	if (e != cudaSuccess)
		cudaGetLastError();
	return gpu_error_code(e);
}

void *gpu_alloc(int device, size_t bytes)
{
	void *p = NULL;
	int prev;

	if (dev_enter(device, &prev))
		return NULL;
	if (dev_leave(device, prev, cudaMalloc(&p, bytes ? bytes : 1)))
		return NULL;
	return p;
}

void gpu_free(int device, void *p)
{
	int prev;

	if (p && dev_enter(device, &prev) == 0)
		dev_leave(device, prev, cudaFree(p));
}

static int copy(int device, void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind)
{
	int prev, rc = dev_enter(device, &prev);

	if (rc)
		return rc;
	return dev_leave(device, prev, cudaMemcpy(dst, src, bytes, kind));
}

int gpu_memcpy_h2d(int device, void *dst, const void *src, size_t bytes)
{
	return copy(device, dst, src, bytes, cudaMemcpyHostToDevice);
}

int gpu_memcpy_d2h(int device, void *dst, const void *src, size_t bytes)
{
	return copy(device, dst, src, bytes, cudaMemcpyDeviceToHost);
}

int gpu_memset(int device, void *dst, int byte, size_t bytes)
{
	int prev, rc = dev_enter(device, &prev);

	if (rc)
		return rc;
	return dev_leave(device, prev, cudaMemset(dst, byte, bytes));
}

int gpu_sync(int device)
{
	int prev, rc = dev_enter(device, &prev);

	if (rc)
		return rc;
	return dev_leave(device, prev, cudaDeviceSynchronize());
}

int gpu_pointer_device(const void *p)
{
	struct cudaPointerAttributes a;

	if (!p || gpu_count() == 0)
		return -1;
	if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
		cudaGetLastError(); /* a plain host pointer on old runtimes: not an error of ours */
		return -1;
	}
	return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged ? a.device : -1;
}

int gpu_copy_async(void *dst, const void *src, size_t bytes, void *stream)
{
	if (gpu_count() == 0)
		return KV_ERR_UNSUPPORTED;
	return gpu_error_code(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault,
					      (cudaStream_t)stream));
}

int gpu_stream_sync(void *stream)
{
	if (gpu_count() == 0)
		return KV_ERR_UNSUPPORTED;
	return gpu_error_code(cudaStreamSynchronize((cudaStream_t)stream));
}

int gpu_copy(void *dst, const void *src, size_t bytes, void *stream)
{
	int rc = gpu_copy_async(dst, src, bytes, stream);

	return rc ? rc : gpu_stream_sync(stream);
}

int gpu_host_register(void *p, size_t bytes)
{
	cudaError_t e;

	if (gpu_count() == 0)
		return KV_ERR_UNSUPPORTED;
	e = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
	if (e != cudaSuccess)
		cudaGetLastError();
	return gpu_error_code(e);
}

void gpu_host_unregister(void *p)
{
	if (gpu_count() > 0 && cudaHostUnregister(p) != cudaSuccess)
		cudaGetLastError();
}

int gpu_info(int dev, char *name, size_t len, size_t *mem_bytes)
{
	struct cudaDeviceProp prop;

	if (dev < 0 || dev >= gpu_count())
		return KV_ERR_INVALID;
	if (cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
		cudaGetLastError();
		return KV_ERR_IO;
	}
	prop.name[sizeof(prop.name) - 1] = '\0';
	snprintf(name, len, "%s", prop.name);
	*mem_bytes = prop.totalGlobalMem;
	return 0;
}

#else /* !KV_HAVE_CUDA */

int gpu_count(void)
{
	return 0;
}

const char *gpu_status(void)
{
	return "no GPU (built without CUDA)";
}

int gpu_error_code(int cuda_error)
{
	return cuda_error ? KV_ERR_UNSUPPORTED : 0;
}

void *gpu_alloc(int device, size_t bytes)
{
	return NULL;
}

void gpu_free(int device, void *p)
{
}

int gpu_memcpy_h2d(int device, void *dst, const void *src, size_t bytes)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_memcpy_d2h(int device, void *dst, const void *src, size_t bytes)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_memset(int device, void *dst, int byte, size_t bytes)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_sync(int device)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_pointer_device(const void *p)
{
	return -1;
}

int gpu_copy(void *dst, const void *src, size_t bytes, void *stream)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_copy_async(void *dst, const void *src, size_t bytes, void *stream)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_stream_sync(void *stream)
{
	return KV_ERR_UNSUPPORTED;
}

int gpu_host_register(void *p, size_t bytes)
{
	return KV_ERR_UNSUPPORTED;
}

void gpu_host_unregister(void *p)
{
}

int gpu_info(int dev, char *name, size_t len, size_t *mem_bytes)
{
	return KV_ERR_UNSUPPORTED;
}

#endif /* KV_HAVE_CUDA */
