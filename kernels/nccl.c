/* SPDX-License-Identifier: MIT */
/*
 * nccl.c - is NCCL there?  NCCL ships as a shared library only, so linking
 * it would stop every binary from starting on a machine without it; it is
 * loaded with dlopen at first use instead (as the static CUDA runtime loads
 * the driver).  The `nccl` store type will use the handle; for now kvd and
 * libkv report what they found.
 */
#include "nccl.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

static pthread_once_t once = PTHREAD_ONCE_INIT;
static void *lib;
static int version;
static char status[128];

static void probe(void)
{
	int (*get_version)(int *);

	lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		snprintf(status, sizeof(status), "no NCCL (libnccl.so.2 not found)");
		return;
	}
	*(void **)&get_version = dlsym(lib, "ncclGetVersion");
	if (!get_version || get_version(&version) != 0) {
		snprintf(status, sizeof(status), "no NCCL (ncclGetVersion failed)");
		version = 0;
		return;
	}
	/* NCCL >= 2.9 encodes major*10000 + minor*100 + patch */
	snprintf(status, sizeof(status), "NCCL %d.%d.%d", version / 10000, version / 100 % 100,
		 version % 100);
}

int nccl_version(void)
{
	pthread_once(&once, probe);
	return version;
}

const char *nccl_status(void)
{
	pthread_once(&once, probe);
	return status;
}

void *nccl_symbol(const char *name)
{
	pthread_once(&once, probe);
	return lib && version ? dlsym(lib, name) : NULL;
}
