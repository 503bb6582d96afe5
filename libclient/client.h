/* SPDX-License-Identifier: MIT */
/*
 * client.h - libkv's internal interfaces: the store object and the built-in
 * local backend (the one that talks to kvd).
 */
#ifndef KV_CLIENT_H
#define KV_CLIENT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "kv.h"

#define KV_ERRLEN 512

/* Options with every "from the environment" default resolved. */
struct kv_resolved {
	char socket[108];
	char job[129];
	int rank;
	int num_workers;
	int device;
	int timeout_ms; /* 0: no limit */
};

struct local;

/* local.c: each returns KV_OK or a KV_ERR_* code with a sentence in err */
int local_create(const struct kv_resolved *o, struct local **out, char *err);
void local_destroy(struct local *l);
int local_op(struct local *l, uint8_t op, const char *key, const void *const *srcs, int nsrc,
	     void *const *outs, int nout, size_t count, kv_dtype t, int priority,
	     kv_ticket *ticket, char *err);
int local_wait(struct local *l, kv_ticket ticket, char *err);
int local_wait_all(struct local *l, char *err);
void *local_alloc(struct local *l, size_t bytes, char *err);
int local_free(struct local *l, void *p);
/* collective: returns once every rank set the same spec */
int local_set_optimizer(struct local *l, const char *spec, char *err);
int local_set_stream(struct local *l, void *stream);
int local_save(struct local *l, const char *path, int dump, char *err);
int local_load(struct local *l, const char *path, char *err);
int local_request_text(struct local *l, uint16_t type, uint32_t flags, const char *text,
		       size_t len, char *err);

#endif /* KV_CLIENT_H */
