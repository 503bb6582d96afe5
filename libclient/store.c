/* SPDX-License-Identifier: MIT */
/*
 * store.c - the public API: options, the backend registry, argument checks,
 * and dispatch to the built-in local store or a registered custom store.
 *
 * Every public call checks its arguments first (a NULL store, a key name of
 * 0 or more than 255 bytes, a zero count, an unknown dtype: KV_ERR_INVALID),
 * and refuses a store used by a forked child (the rings are not mapped
 * there).  Custom stores (struct kv_backend) are called synchronously; their
 * async ops complete before kv_pushpull_async returns.
 */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "client.h"
#include "../kernels/gpu.h"
#include "../kernels/reduce.h"
#include "../shm/layout.h"
#include "../shm/msg.h"

enum builtin { B_CUSTOM, B_LOCAL, B_DEVICE, B_NCCL };

struct done_ticket {
	kv_ticket t;
	int status;
};

struct kv_store {
	enum builtin kind;
	struct kv_backend b; /* custom stores */
	void *state;
	struct local *local;
	char type[64];
	int rank, num_workers;
	pid_t pid;
	char err[KV_ERRLEN];
	/* custom stores' async results, kept until kv_wait */
	pthread_mutex_t tlock;
	struct done_ticket *tickets;
	size_t ntickets, captickets;
	kv_ticket next_ticket;
};

static __thread char create_err[KV_ERRLEN]; /* kv_last_error(NULL): the last kv_create */

static int set_err(kv_store *kv, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int set_err(kv_store *kv, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(kv ? kv->err : create_err, KV_ERRLEN, fmt, ap);
	va_end(ap);
	return code;
}

const char *kv_strerror(int code)
{
	switch (code) {
	case KV_OK:
		return "success";
	case KV_ERR_INVALID:
		return "invalid argument";
	case KV_ERR_NOKEY:
		return "no such key";
	case KV_ERR_MISMATCH:
		return "count, dtype or op does not match the key";
	case KV_ERR_UNSUPPORTED:
		return "not supported by this store";
	case KV_ERR_PEER:
		return "another rank of the job left or died";
	case KV_ERR_DAEMON:
		return "kvd is not running or stopped";
	case KV_ERR_NOMEM:
		return "out of memory or over a limit";
	case KV_ERR_PERM:
		return "permission denied";
	case KV_ERR_TIMEOUT:
		return "timed out";
	case KV_ERR_IO:
		return "input/output error";
	case KV_ERR_PROTO:
		return "protocol error";
	case KV_ERR_EXISTS:
		return "already exists";
	default:
		return "unknown error";
	}
}

const char *kv_last_error(const kv_store *kv)
{
	return kv ? kv->err : create_err;
}

/* ------------------------------------------------------------------ registry */

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct kv_backend *reg;
static size_t nreg;

static int teststore_create(const struct kv_options *o, void **state);
static void teststore_destroy(void *state);
static int teststore_pushpull(void *state, const char *key, const void *const *values,
			      int nvalues, void *const *outs, int nouts, size_t count, kv_dtype t,
			      int priority);
static int teststore_broadcast(void *state, const char *key, const void *value,
			       void *const *outs, int nouts, size_t count, kv_dtype t,
			       int priority);
static int teststore_is_capable(void *state, const char *capability);

static const struct kv_backend teststore = {
	.name = "teststore",
	.create = teststore_create,
	.destroy = teststore_destroy,
	.pushpull = teststore_pushpull,
	.broadcast = teststore_broadcast,
	.is_capable = teststore_is_capable,
};

static struct kv_backend *reg_find(const char *name)
{
	for (size_t i = 0; i < nreg; i++)
		if (strcasecmp(reg[i].name, name) == 0)
			return &reg[i];
	return NULL;
}

static int reg_add(const struct kv_backend *b, bool quiet)
{
	struct kv_backend *have = reg_find(b->name);
	char *name = strdup(b->name);

	if (!name)
		return KV_ERR_NOMEM;
	if (have) {
		if (!quiet)
			fprintf(stderr, "libkv: warning: kv_register replaces the store type '%s'\n",
				b->name);
		free((char *)have->name);
		*have = *b;
		have->name = name;
		return 1;
	}
	struct kv_backend *n = realloc(reg, (nreg + 1) * sizeof(*n));
	if (!n) {
		free(name);
		return KV_ERR_NOMEM;
	}
	reg = n;
	reg[nreg] = *b;
	reg[nreg].name = name;
	nreg++;
	return 0;
}

static void reg_builtins(void)
{
	static bool done;

	if (!done) {
		done = true;
		reg_add(&teststore, true);
	}
}

int kv_register(const struct kv_backend *b)
{
	int rc;

	if (!b || !b->name || !b->name[0] || strlen(b->name) >= sizeof(((kv_store *)0)->type))
		return set_err(NULL, KV_ERR_INVALID, "kv_register: a backend needs a name");
	pthread_mutex_lock(&reg_lock);
	reg_builtins();
	rc = reg_add(b, false);
	/* a custom store of a built-in's name shadows the built-in */
	pthread_mutex_unlock(&reg_lock);
	if (rc < 0)
		return set_err(NULL, rc, "kv_register: out of memory");
	return rc;
}

/* ------------------------------------------------------------------ options */

void kv_options_default(struct kv_options *o)
{
	if (!o)
		return;
	o->socket = NULL;
	o->job = NULL;
	o->rank = -1;
	o->num_workers = 0;
	o->device = -1;
	o->timeout_ms = 0;
}

static int env_int(const char *name, int dflt, int *out)
{
	const char *v = getenv(name);
	char *end;
	long x;

	if (!v || !*v) {
		*out = dflt;
		return 0;
	}
	errno = 0;
	x = strtol(v, &end, 10);
	while (*end && isspace((unsigned char)*end))
		end++;
	if (errno || end == v || *end || x < INT_MIN || x > INT_MAX)
		return set_err(NULL, KV_ERR_INVALID, "$%s is not an integer: '%s'", name, v);
	*out = (int)x;
	return 0;
}

static int resolve(const struct kv_options *in, struct kv_resolved *o)
{
	struct kv_options d;
	const char *s;

	if (!in) {
		kv_options_default(&d);
		in = &d;
	}
	s = in->socket ? in->socket : getenv("KVD_SOCKET");
	if (!s || !*s)
		s = "/run/kvd/kvd.sock";
	if (strlen(s) >= sizeof(o->socket))
		return set_err(NULL, KV_ERR_INVALID, "socket path too long: %s", s);
	snprintf(o->socket, sizeof(o->socket), "%s", s);
	s = in->job ? in->job : getenv("KVD_JOB");
	if (!s || (!in->job && !*s))
		s = "default";
	if (!kv_job_name_valid(s, strlen(s)))
		return set_err(NULL, KV_ERR_INVALID,
			       "job name '%.140s' must be 1-128 letters, digits, '.', '_' or '-'", s);
	snprintf(o->job, sizeof(o->job), "%s", s);
	if (in->rank >= 0)
		o->rank = in->rank;
	else if (in->rank == -1) {
		if (env_int("KVD_RANK", 0, &o->rank))
			return KV_ERR_INVALID;
	} else
		return set_err(NULL, KV_ERR_INVALID, "rank %d is negative", in->rank);
	if (in->num_workers > 0)
		o->num_workers = in->num_workers;
	else if (in->num_workers == 0) {
		if (env_int("KVD_NUM_WORKERS", 1, &o->num_workers))
			return KV_ERR_INVALID;
	} else
		return set_err(NULL, KV_ERR_INVALID, "num_workers %d is negative",
			       in->num_workers);
	if (o->num_workers < 1 || o->num_workers > KV_MAX_RANKS)
		return set_err(NULL, KV_ERR_INVALID, "num_workers %d is outside 1..%d",
			       o->num_workers, KV_MAX_RANKS);
	if (o->rank < 0 || o->rank >= o->num_workers)
		return set_err(NULL, KV_ERR_INVALID, "rank %d is outside 0..%d", o->rank,
			       o->num_workers - 1);
	if (in->device >= 0)
		o->device = in->device;
	else if (env_int("KVD_DEVICE", -1, &o->device))
		return KV_ERR_INVALID;
	if (o->device < 0) {
		int n = gpu_count();
		o->device = n > 0 ? o->rank % n : -1;
	}
	if (in->timeout_ms > 0)
		o->timeout_ms = in->timeout_ms;
	else if (in->timeout_ms == 0) {
		if (env_int("KVD_TIMEOUT_MS", 0, &o->timeout_ms))
			return KV_ERR_INVALID;
		if (o->timeout_ms < 0)
			return set_err(NULL, KV_ERR_INVALID, "$KVD_TIMEOUT_MS is negative");
	} else
		return set_err(NULL, KV_ERR_INVALID, "timeout_ms %d is negative", in->timeout_ms);
	return 0;
}

/* ------------------------------------------------------------------ create */

int kv_create(const char *type, const struct kv_options *o, kv_store **out)
{
	struct kv_resolved r;
	struct kv_backend *b = NULL;
	enum builtin kind;
	kv_store *kv;
	int rc;

	create_err[0] = '\0';
	if (!out)
		return set_err(NULL, KV_ERR_INVALID, "kv_create: out is NULL");
	*out = NULL;
	if (!type)
		type = "local";
	pthread_mutex_lock(&reg_lock);
	reg_builtins();
	b = reg_find(type);
	struct kv_backend copy = b ? *b : (struct kv_backend){ 0 };
	pthread_mutex_unlock(&reg_lock);
	if (b)
		kind = B_CUSTOM;
	else if (strcasecmp(type, "local") == 0)
		kind = B_LOCAL;
	else if (strcasecmp(type, "device") == 0)
		kind = B_DEVICE;
	else if (strcasecmp(type, "nccl") == 0)
		kind = B_NCCL;
	else
		return set_err(NULL, KV_ERR_INVALID, "no store type named '%s' is registered", type);

	rc = resolve(o, &r);
	if (rc)
		return rc;
	if (kind == B_DEVICE || kind == B_NCCL) {
		if (gpu_count() == 0)
			return set_err(NULL, KV_ERR_UNSUPPORTED, "store type '%s' needs a GPU: %s",
				       type, gpu_status());
		return set_err(NULL, KV_ERR_UNSUPPORTED,
			       "store type '%s' is not implemented by this libkv yet", type);
	}
	kv = calloc(1, sizeof(*kv));
	if (!kv)
		return set_err(NULL, KV_ERR_NOMEM, "out of memory");
	kv->kind = kind;
	kv->pid = getpid();
	kv->rank = r.rank;
	kv->num_workers = r.num_workers;
	pthread_mutex_init(&kv->tlock, NULL);
	kv->next_ticket = 1;
	if (kind == B_LOCAL) {
		snprintf(kv->type, sizeof(kv->type), "local");
		rc = local_create(&r, &kv->local, create_err);
	} else {
		snprintf(kv->type, sizeof(kv->type), "%s", copy.name);
		kv->b = copy;
		kv->b.name = kv->type;
		rc = copy.create ? copy.create(o, &kv->state) : KV_ERR_UNSUPPORTED;
		if (rc)
			set_err(NULL, rc, "store type '%s' could not be created: %s", type,
				kv_strerror(rc));
		else {
			if (copy.rank)
				kv->rank = copy.rank(kv->state);
			if (copy.num_workers)
				kv->num_workers = copy.num_workers(kv->state);
		}
	}
	if (rc) {
		pthread_mutex_destroy(&kv->tlock);
		free(kv);
		return rc;
	}
	*out = kv;
	return KV_OK;
}

int kv_close(kv_store *kv)
{
	if (!kv)
		return set_err(NULL, KV_ERR_INVALID, "kv_close: store is NULL");
	if (kv->kind == B_LOCAL)
		local_destroy(kv->local);
	else if (kv->b.destroy)
		kv->b.destroy(kv->state);
	free(kv->tickets);
	pthread_mutex_destroy(&kv->tlock);
	free(kv);
	return KV_OK;
}

const char *kv_type(const kv_store *kv)
{
	return kv ? kv->type : NULL;
}

int kv_rank(const kv_store *kv)
{
	return kv ? kv->rank : KV_ERR_INVALID;
}

int kv_num_workers(const kv_store *kv)
{
	return kv ? kv->num_workers : KV_ERR_INVALID;
}

/* ------------------------------------------------------------------ ops */

static int check_store(kv_store *kv)
{
	if (!kv)
		return set_err(NULL, KV_ERR_INVALID, "store is NULL");
	if (getpid() != kv->pid)
		return set_err(kv, KV_ERR_INVALID,
			       "this store was opened by pid %d; a forked child cannot use it",
			       (int)kv->pid);
	return 0;
}

static int check_args(kv_store *kv, const char *key, size_t count, kv_dtype t)
{
	size_t len;
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (!key)
		return set_err(kv, KV_ERR_INVALID, "key is NULL");
	len = strnlen(key, KV_KEY_MAX + 1);
	if (len == 0 || len > KV_KEY_MAX)
		return set_err(kv, KV_ERR_INVALID, "key names are 1 to %u bytes", KV_KEY_MAX);
	if (!kv_dtype_size(t))
		return set_err(kv, KV_ERR_INVALID, "unknown dtype %d", (int)t);
	if (count == 0 || count > (1ull << 40) / kv_dtype_size(t))
		return set_err(kv, KV_ERR_INVALID, "count %zu is 0 or too large", count);
	return 0;
}

static int unsupported(kv_store *kv, const char *what)
{
	return set_err(kv, KV_ERR_UNSUPPORTED, "store type '%s' does not support %s", kv->type,
		       what);
}

static int custom_rc(kv_store *kv, int rc, const char *what)
{
	if (rc)
		set_err(kv, rc, "%s on store '%s': %s", what, kv->type, kv_strerror(rc));
	return rc;
}

int kv_init(kv_store *kv, const char *key, const void *value, size_t count, kv_dtype t)
{
	int rc = check_args(kv, key, count, t);

	if (rc)
		return rc;
	if (!value && kv->rank == 0)
		return set_err(kv, KV_ERR_INVALID, "init: value is NULL on rank 0");
	if (kv->kind == B_LOCAL)
		return local_op(kv->local, KV_OP_INIT, key, &value, 1, NULL, 0, count, t, 0, NULL,
				kv->err);
	if (!kv->b.init)
		return unsupported(kv, "init");
	return custom_rc(kv, kv->b.init(kv->state, key, value, count, t), "init");
}

int kv_push(kv_store *kv, const char *key, const void *value, size_t count, kv_dtype t,
	    int priority)
{
	int rc = check_args(kv, key, count, t);

	if (rc)
		return rc;
	if (!value)
		return set_err(kv, KV_ERR_INVALID, "push: value is NULL");
	if (kv->kind == B_LOCAL)
		return local_op(kv->local, KV_OP_PUSH, key, &value, 1, NULL, 0, count, t, priority,
				NULL, kv->err);
	if (!kv->b.push)
		return unsupported(kv, "push");
	return custom_rc(kv, kv->b.push(kv->state, key, value, count, t, priority), "push");
}

int kv_pull(kv_store *kv, const char *key, void *out, size_t count, kv_dtype t, int priority)
{
	int rc = check_args(kv, key, count, t);

	if (rc)
		return rc;
	if (!out)
		return set_err(kv, KV_ERR_INVALID, "pull: out is NULL");
	if (kv->kind == B_LOCAL)
		return local_op(kv->local, KV_OP_PULL, key, NULL, 0, &out, 1, count, t, priority,
				NULL, kv->err);
	if (!kv->b.pull)
		return unsupported(kv, "pull");
	return custom_rc(kv, kv->b.pull(kv->state, key, out, count, t, priority), "pull");
}

static int pushpull_v(kv_store *kv, const char *key, const void *const *values, int nvalues,
		      void *const *outs, int nouts, size_t count, kv_dtype t, int priority,
		      kv_ticket *ticket)
{
	int rc = check_args(kv, key, count, t);

	if (rc)
		return rc;
	if (!values || nvalues < 1 || nvalues > REDUCE_MAX_INPUTS)
		return set_err(kv, KV_ERR_INVALID, "pushpull needs 1 to %d values",
			       REDUCE_MAX_INPUTS);
	for (int i = 0; i < nvalues; i++)
		if (!values[i])
			return set_err(kv, KV_ERR_INVALID, "pushpull: value %d is NULL", i);
	if (nouts < 0)
		return set_err(kv, KV_ERR_INVALID, "pushpull: nouts is negative");
	if (!outs && nouts > 0)
		return set_err(kv, KV_ERR_INVALID, "pushpull: outs is NULL but nouts is %d", nouts);
	if (nouts == 0) { /* results go back to the values */
		outs = (void *const *)values;
		nouts = nvalues;
	}
	for (int i = 0; i < nouts; i++)
		if (!outs[i])
			return set_err(kv, KV_ERR_INVALID, "pushpull: out %d is NULL", i);
	if (kv->kind == B_LOCAL)
		return local_op(kv->local, KV_OP_PUSHPULL, key, values, nvalues, outs, nouts, count,
				t, priority, ticket, kv->err);
	if (!kv->b.pushpull)
		return unsupported(kv, "pushpull");
	return custom_rc(kv,
			 kv->b.pushpull(kv->state, key, values, nvalues, outs, nouts, count, t,
					priority),
			 "pushpull");
}

int kv_pushpull(kv_store *kv, const char *key, const void *value, void *out, size_t count,
		kv_dtype t, int priority)
{
	void *o = out ? out : (void *)value;

	return pushpull_v(kv, key, &value, 1, &o, 1, count, t, priority, NULL);
}

int kv_pushpullv(kv_store *kv, const char *key, const void *const *values, int nvalues,
		 void *const *outs, int nouts, size_t count, kv_dtype t, int priority)
{
	return pushpull_v(kv, key, values, nvalues, outs, nouts, count, t, priority, NULL);
}

int kv_broadcast(kv_store *kv, const char *key, const void *value, void *out, size_t count,
		 kv_dtype t, int priority)
{
	int rc = check_args(kv, key, count, t);
	void *o = out ? out : (void *)value;

	if (rc)
		return rc;
	if (kv->rank == 0 && !value)
		return set_err(kv, KV_ERR_INVALID, "broadcast: value is NULL on rank 0");
	if (!o)
		return set_err(kv, KV_ERR_INVALID, "broadcast: out is NULL");
	if (kv->kind == B_LOCAL)
		return local_op(kv->local, KV_OP_BCAST, key, &value, 1, &o, 1, count, t, priority,
				NULL, kv->err);
	if (!kv->b.broadcast)
		return unsupported(kv, "broadcast");
	return custom_rc(kv, kv->b.broadcast(kv->state, key, value, &o, 1, count, t, priority),
			 "broadcast");
}

int kv_pushpull_async(kv_store *kv, const char *key, const void *value, void *out,
		      size_t count, kv_dtype t, int priority, kv_ticket *ticket)
{
	void *o = out ? out : (void *)value;
	int rc;

	if (!ticket)
		return set_err(kv, KV_ERR_INVALID, "pushpull_async: ticket is NULL");
	*ticket = 0;
	if (kv && kv->kind == B_LOCAL)
		return pushpull_v(kv, key, &value, 1, &o, 1, count, t, priority, ticket);
	/* a custom store runs it now; kv_wait reports the status */
	rc = pushpull_v(kv, key, &value, 1, &o, 1, count, t, priority, NULL);
	if (!kv || rc == KV_ERR_INVALID)
		return rc;
	pthread_mutex_lock(&kv->tlock);
	if (kv->ntickets == kv->captickets) {
		size_t cap = kv->captickets ? kv->captickets * 2 : 16;
		struct done_ticket *n = realloc(kv->tickets, cap * sizeof(*n));
		if (!n) {
			pthread_mutex_unlock(&kv->tlock);
			return set_err(kv, KV_ERR_NOMEM, "out of memory");
		}
		kv->tickets = n;
		kv->captickets = cap;
	}
	*ticket = kv->next_ticket++;
	kv->tickets[kv->ntickets++] = (struct done_ticket){ *ticket, rc };
	pthread_mutex_unlock(&kv->tlock);
	return KV_OK;
}

int kv_wait(kv_store *kv, kv_ticket ticket)
{
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (kv->kind == B_LOCAL)
		return local_wait(kv->local, ticket, kv->err);
	pthread_mutex_lock(&kv->tlock);
	for (size_t i = 0; i < kv->ntickets; i++) {
		if (kv->tickets[i].t != ticket)
			continue;
		rc = kv->tickets[i].status;
		kv->tickets[i] = kv->tickets[--kv->ntickets];
		pthread_mutex_unlock(&kv->tlock);
		return rc;
	}
	pthread_mutex_unlock(&kv->tlock);
	return set_err(kv, KV_ERR_INVALID, "no op in flight has ticket %llu",
		       (unsigned long long)ticket);
}

int kv_wait_all(kv_store *kv)
{
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (kv->kind == B_LOCAL)
		return local_wait_all(kv->local, kv->err);
	pthread_mutex_lock(&kv->tlock);
	for (size_t i = 0; i < kv->ntickets; i++)
		if (kv->tickets[i].status && !rc)
			rc = kv->tickets[i].status;
	kv->ntickets = 0;
	pthread_mutex_unlock(&kv->tlock);
	return rc;
}

void *kv_alloc(kv_store *kv, size_t bytes)
{
	void *p;

	if (check_store(kv))
		return NULL;
	if (bytes == 0) {
		set_err(kv, KV_ERR_INVALID, "kv_alloc: 0 bytes");
		return NULL;
	}
	if (kv->kind == B_LOCAL)
		return local_alloc(kv->local, bytes, kv->err);
	p = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
	if (!p)
		set_err(kv, KV_ERR_NOMEM, "kv_alloc: out of memory");
	return p;
}

void kv_free(kv_store *kv, void *p)
{
	if (!kv || !p)
		return;
	if (kv->kind == B_LOCAL) {
		if (local_free(kv->local, p))
			set_err(kv, KV_ERR_INVALID, "kv_free: %p was not allocated by kv_alloc", p);
		return;
	}
	free(p);
}

int kv_set_stream(kv_store *kv, void *cuda_stream)
{
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (gpu_count() == 0)
		return set_err(kv, KV_ERR_UNSUPPORTED, "kv_set_stream: %s", gpu_status());
	if (kv->kind == B_LOCAL)
		return local_set_stream(kv->local, cuda_stream);
	return set_err(kv, KV_ERR_UNSUPPORTED, "kv_set_stream: store '%s' takes no stream",
		       kv->type);
}

/* ------------------------------------------------------------------ optimizer */

int kv_set_optimizer(kv_store *kv, const char *spec)
{
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (!spec || !*spec || strlen(spec) > KV_SPEC_MAX)
		return set_err(kv, KV_ERR_INVALID, "optimizer spec is empty or too long");
	if (kv->kind == B_LOCAL)
		return local_set_optimizer(kv->local, spec, kv->err);
	if (!kv->b.set_optimizer)
		return unsupported(kv, "set_optimizer");
	return custom_rc(kv, kv->b.set_optimizer(kv->state, spec), "set_optimizer");
}

static const char *const capabilities[] = { "optimizer", "gradient_compression", "sparse",
					    "async",     "device",		     "priority",
					    "zero_copy" };

int kv_is_capable(const kv_store *kv, const char *capability)
{
	size_t i, n = sizeof(capabilities) / sizeof(capabilities[0]);

	if (!kv || !capability)
		return KV_ERR_INVALID;
	for (i = 0; i < n; i++)
		if (strcmp(capability, capabilities[i]) == 0)
			break;
	if (i == n)
		return KV_ERR_INVALID;
	if (kv->kind == B_LOCAL)
		return !strcmp(capability, "async") || !strcmp(capability, "priority") ||
		       !strcmp(capability, "zero_copy") || !strcmp(capability, "optimizer") ||
		       (!strcmp(capability, "device") && gpu_count() > 0);
	if (!kv->b.is_capable)
		return 0;
	return kv->b.is_capable(kv->state, capability) > 0;
}

int kv_save_optimizer_states(kv_store *kv, const char *path, int dump_optimizer)
{
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (!path || !*path)
		return set_err(kv, KV_ERR_INVALID, "save_optimizer_states: path is empty");
	if (kv->kind == B_LOCAL)
		return local_save(kv->local, path, dump_optimizer, kv->err);
	if (!kv->b.save_optimizer_states)
		return unsupported(kv, "save_optimizer_states");
	return custom_rc(kv, kv->b.save_optimizer_states(kv->state, path, dump_optimizer),
			 "save_optimizer_states");
}

int kv_load_optimizer_states(kv_store *kv, const char *path)
{
	int rc = check_store(kv);

	if (rc)
		return rc;
	if (!path || !*path)
		return set_err(kv, KV_ERR_INVALID, "load_optimizer_states: path is empty");
	if (kv->kind == B_LOCAL)
		return local_load(kv->local, path, kv->err);
	if (!kv->b.load_optimizer_states)
		return unsupported(kv, "load_optimizer_states");
	return custom_rc(kv, kv->b.load_optimizer_states(kv->state, path),
			 "load_optimizer_states");
}

/* ------------------------------------------------------------------ teststore */

/*
 * teststore: in process, one worker, no state.  broadcast copies the value to
 * every output; pushpull sums the local buffers into every output.
 */
static int teststore_create(const struct kv_options *o, void **state)
{
	*state = NULL;
	return KV_OK;
}

static void teststore_destroy(void *state)
{
}

static int teststore_pushpull(void *state, const char *key, const void *const *values,
			      int nvalues, void *const *outs, int nouts, size_t count, kv_dtype t,
			      int priority)
{
	void *tmp;
	size_t bytes = count * kv_dtype_size(t);
	int rc;

	if (nouts < 1 || nouts > REDUCE_MAX_INPUTS)
		return KV_ERR_INVALID;
	/* sum into a private buffer first: outputs may alias the values */
	tmp = malloc(bytes);
	if (!tmp)
		return KV_ERR_NOMEM;
	rc = reduce_sum(REDUCE_CPU, NULL, t, &tmp, 1, values, nvalues, count);
	if (!rc)
		rc = reduce_copy(REDUCE_CPU, NULL, t, outs, nouts, tmp, count);
	free(tmp);
	return rc;
}

static int teststore_broadcast(void *state, const char *key, const void *value,
			       void *const *outs, int nouts, size_t count, kv_dtype t,
			       int priority)
{
	size_t bytes = count * kv_dtype_size(t);

	for (int i = 0; i < nouts; i++)
		if (outs[i] != value)
			memmove(outs[i], value, bytes);
	return KV_OK;
}

static int teststore_is_capable(void *state, const char *capability)
{
	return 0;
}
