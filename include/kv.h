/* SPDX-License-Identifier: MIT */
/*
 * kv.h - the public API of libkv, the client library of kvd.
 *
 * A trainer process opens a store with kv_create(), then sums gradients with
 * the other ranks of its job (kv_pushpull), hands rank 0's value to everyone
 * (kv_broadcast), or pushes and pulls.  Every call returns KV_OK (0) or a
 * negative KV_ERR_* code; kv_last_error() gives a sentence about the last
 * failure on that store.  This header is the only one users include.
 */
#ifndef KV_H
#define KV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_VERSION "0.1.0"

typedef struct kv_store kv_store;
typedef uint64_t kv_ticket;
typedef enum { KV_FLOAT32, KV_FLOAT64, KV_FLOAT16, KV_BFLOAT16, KV_INT32, KV_INT64 } kv_dtype;
enum {
	KV_OK = 0,
	KV_ERR_INVALID = -1,
	KV_ERR_NOKEY = -2,
	KV_ERR_MISMATCH = -3,
	KV_ERR_UNSUPPORTED = -4,
	KV_ERR_PEER = -5,
	KV_ERR_DAEMON = -6,
	KV_ERR_NOMEM = -7,
	KV_ERR_PERM = -8,
	KV_ERR_TIMEOUT = -9,
	KV_ERR_IO = -10,
	KV_ERR_PROTO = -11,
	KV_ERR_EXISTS = -12,
};

struct kv_options {
	const char *socket; /* NULL: $KVD_SOCKET, else /run/kvd/kvd.sock */
	const char *job;    /* NULL: $KVD_JOB, else "default" */
	int rank;           /* -1: $KVD_RANK, else 0 */
	int num_workers;    /* 0: $KVD_NUM_WORKERS, else 1 */
	int device;         /* -1: $KVD_DEVICE, else rank modulo visible GPUs */
	int timeout_ms;     /* 0: $KVD_TIMEOUT_MS, else wait without limit */
};
void kv_options_default(struct kv_options *o); /* all fields to "from environment" */

/* o may be NULL; returns once the daemon has accepted this rank into its job */
int kv_create(const char *type, const struct kv_options *o, kv_store **out);
int kv_close(kv_store *kv);
const char *kv_type(const kv_store *kv);
int kv_rank(const kv_store *kv);
int kv_num_workers(const kv_store *kv);
const char *kv_strerror(int code);
const char *kv_last_error(const kv_store *kv); /* detail of the last failure */

int kv_init(kv_store *kv, const char *key, const void *value, size_t count, kv_dtype t);
int kv_push(kv_store *kv, const char *key, const void *value, size_t count, kv_dtype t,
	    int priority);
int kv_pull(kv_store *kv, const char *key, void *out, size_t count, kv_dtype t, int priority);
/* out == NULL: result written to value. value and out may be the same buffer. */
int kv_pushpull(kv_store *kv, const char *key, const void *value, void *out, size_t count,
		kv_dtype t, int priority);
/* several local buffers (devices) in one process: their sum joins the round */
int kv_pushpullv(kv_store *kv, const char *key, const void *const *values, int nvalues,
		 void *const *outs, int nouts, size_t count, kv_dtype t, int priority);
/* value is read on rank 0 only; out receives it on every rank */
int kv_broadcast(kv_store *kv, const char *key, const void *value, void *out, size_t count,
		 kv_dtype t, int priority);
int kv_pushpull_async(kv_store *kv, const char *key, const void *value, void *out, size_t count,
		      kv_dtype t, int priority, kv_ticket *ticket);
int kv_wait(kv_store *kv, kv_ticket ticket);
int kv_wait_all(kv_store *kv);
void *kv_alloc(kv_store *kv, size_t bytes); /* zero-copy buffer in shared memory */
void kv_free(kv_store *kv, void *p);
int kv_set_stream(kv_store *kv, void *cuda_stream); /* orders ops on device memory after this stream */

int kv_set_optimizer(kv_store *kv, const char *spec);
int kv_is_capable(const kv_store *kv, const char *capability); /* 1, 0, or KV_ERR_INVALID */
int kv_save_optimizer_states(kv_store *kv, const char *path, int dump_optimizer);
int kv_load_optimizer_states(kv_store *kv, const char *path);

struct kv_backend { /* a custom store; a NULL member means KV_ERR_UNSUPPORTED */
	const char *name; /* matched case-insensitively */
	int (*create)(const struct kv_options *o, void **state);
	void (*destroy)(void *state);
	int (*rank)(void *state);
	int (*num_workers)(void *state);
	int (*init)(void *state, const char *key, const void *value, size_t count, kv_dtype t);
	int (*push)(void *state, const char *key, const void *value, size_t count, kv_dtype t,
		    int priority);
	int (*pull)(void *state, const char *key, void *out, size_t count, kv_dtype t, int priority);
	int (*pushpull)(void *state, const char *key, const void *const *values, int nvalues,
			void *const *outs, int nouts, size_t count, kv_dtype t, int priority);
	int (*broadcast)(void *state, const char *key, const void *value, void *const *outs,
			 int nouts, size_t count, kv_dtype t, int priority);
	int (*set_optimizer)(void *state, const char *spec);
	int (*is_capable)(void *state, const char *capability);
	int (*save_optimizer_states)(void *state, const char *path, int dump_optimizer);
	int (*load_optimizer_states)(void *state, const char *path);
};
/* 0 registered; 1 replaced an earlier backend of that name (a warning is printed) */
int kv_register(const struct kv_backend *b);

/* Size in bytes of one element of t, or 0 for a value outside kv_dtype. */
size_t kv_dtype_size(kv_dtype t);

#ifdef __cplusplus
}
#endif
#endif /* KV_H */
