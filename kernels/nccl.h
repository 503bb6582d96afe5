/* SPDX-License-Identifier: MIT */
/*
 * nccl.h - NCCL, loaded with dlopen when present (see nccl.c).
 */
#ifndef KV_KERNELS_NCCL_H
#define KV_KERNELS_NCCL_H

/* NCCL's version code (e.g. 22703), or 0 when libnccl.so.2 is absent or unusable. */
int nccl_version(void);
/* "NCCL 2.27.3", or "no NCCL (...)". */
const char *nccl_status(void);
/* A symbol of the loaded library, or NULL. */
void *nccl_symbol(const char *name);

#endif
