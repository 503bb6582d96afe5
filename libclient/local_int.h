/* SPDX-License-Identifier: MIT */
/*
 * local_int.h - the local store's private objects, shared by local.c (the
 * engine path, keys, waiting) and direct.c (direct rounds).
 */
#ifndef KV_LOCAL_INT_H
#define KV_LOCAL_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "client.h"
#include "../shm/arena.h"
#include "../shm/layout.h"
#include "../shm/ring.h"

#define WAIT_SPIN 4000    /* spins on the completion ring before sleeping */
#define SPIN_MAX_BYTES (256u << 10) /* larger ops sleep at once */
#define WAIT_SLICE_MS 100 /* sleep this long at most between liveness checks */
#define CANCEL_GRACE_MS 2000
#define ARENA_GROW_MIN (16u << 20)
#define RECONNECT_MS 60000 /* a store without timeout_ms waits this long for kvd to be back */

struct lop;

struct lkey {
	char *name;
	uint32_t len, id, nparts, part_elems;
	uint64_t count;
	kv_dtype dtype;
	/* direct keys (dk != NULL): the shared block and this rank's progress */
	struct kv_dkey *dk;
	uint8_t *inited;   /* one byte per rank */
	uint32_t *arrived_at; /* per rank: the round it last arrived at */
	uint8_t *kinds;       /* per rank: the kind it arrived with in the open round */
	uint8_t *slots;    /* slot r at slots + r * stride */
	uint8_t *results;  /* result i at results + i * stride */
	uint64_t stride;
	uint32_t rounds0;  /* engine keys: kvd's bound of the rounds done when opened */
	bool opened_direct; /* kvd answered with a direct block */
	bool used_direct;  /* this process ran direct ops on it: if kvd takes it over,
			    * its engine rounds start at 0 (each needs this rank) */
	uint32_t target;   /* the round this rank arrived at last */
	uint32_t arrived_in; /* l->restarts when it arrived */
	struct lop *last;  /* that op, until it is finished */
	/* engine keys: per part, the rounds it completed as the last completion
	 * said (ROUND_UNKNOWN before any) and this rank's round ops in flight; a
	 * part's round op names round pdone + pflight + 1 (kv_sqe out.tag), so a
	 * call repeated after kvd restarted is recognised */
	uint64_t *pdone;
	uint32_t *pflight;
};

struct lop {
	uint32_t gen; /* part of user_data; bumped at each use of the slot */
	bool used, done, abandoned, async;
	uint8_t op;
	uint32_t nparts, completed;
	uint32_t part_elems;
	size_t esize;
	uint64_t count;
	int status;
	uint8_t *stage;    /* arena block owned by the op, or NULL */
	uint8_t *out_base; /* where kvd writes results */
	uint8_t **outs;    /* caller buffers that also receive the result */
	int nout;
	uint32_t next_free;
	uint32_t slot;      /* its index: user_data's low half */
	bool dev_out;       /* some out is device memory: copy-outs run on the store's stream */
	struct lkey *key;   /* direct ops: the key, and the round to wait for */
	struct lkey *rkey;  /* engine ops: the key */
	bool round;         /* a round op (push, pushpull, broadcast) */
	uint64_t *prounds;  /* round ops: the round each part completed */
	uint32_t target;
	uint32_t epoch;     /* direct: the board epoch it arrived under */
	bool arrived;       /* direct: arrived, not finished yet */
};

struct lseg {
	int fd;
	void *base;
	size_t size;
};

/* A segment of the job kvd asked this rank to keep (HOLD): never mapped,
 * handed back to a kvd that restarted (README "Restarting kvd"). */
struct lheld {
	uint32_t kind, id; /* enum kv_hold_kind, its index */
	int fd;
};

struct local {
	struct kv_board *board; /* the job's board: state of the job */
	struct lseg *dsegs;     /* direct segments, by kvd's id */
	uint32_t ndsegs;
	pthread_mutex_t lock;
	struct kv_resolved o;
	int sock, doorbell;
	uint8_t *ring;
	size_t ring_size;
	struct ring sq, cq;
	uint32_t part_bytes, max_segs;
	struct arena arena;
	struct lseg *segs;
	uint32_t nsegs;
	struct lkey **keys; /* open addressing by name */
	uint32_t nkeys, capkeys;
	struct lop **opblk; /* blocks of OP_BLOCK ops; an op never moves */
	uint32_t nops, free_op;
	uint32_t seq;
	void *stream;   /* cudaStream_t for GPU tensors (kv_set_stream); NULL: legacy */
	bool gpu;       /* a GPU is usable: segments are pinned, device pointers work */
	bool crowded;   /* the job has more ranks than this process has CPUs */
	uint64_t daemon_seen_ns; /* direct ops: when the socket was last looked at */
	struct lheld *held;
	uint32_t nheld, capheld;
	struct lseg *old_rings; /* rings of kvds gone, mapped until the store ends */
	uint32_t nold_rings;
	bool dead;
	bool lost;       /* dead because kvd went away: it may come back (restart) */
	int64_t lost_ms; /* when */
	bool reconnecting;
	uint32_t restarts; /* kvds that took this store back */
	int dead_code;
	char dead_why[256];
	char *errbuf; /* where the op in progress reports (the store's buffer) */
};

#define NO_OP UINT32_MAX
#define DAEMON_LOOK_NS 20000000ull /* an op looks at kvd's socket at most every 20 ms */
#define ROUND_UNKNOWN UINT64_MAX

/* Copy n bytes; dev: dst or src is device memory (then on the store's stream, waited). */
int buf_copy(struct local *l, void *dst, const void *src, size_t n, bool dev);
bool is_dev(struct local *l, const void *p);

int fail(char *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Before an op: KV_OK, or the store is dead (a kvd that went away is asked
 * to take the job back first, for up to timeout_ms). */
int local_alive(struct local *l, char *err);
int64_t now_ms(void);
uint64_t now_ns(void);
void check_daemon(struct local *l);
void mark_dead(struct local *l, int code, const char *why);
uint64_t op_ud(struct local *l, struct lop *op);

/* direct.c */
int direct_map(struct local *l, struct lkey *k, uint32_t dseg, uint64_t doff, uint64_t dsize,
	       int fd, char *err);
int direct_op(struct local *l, uint8_t opc, struct lkey *k, struct lop *op,
	      const void *const *srcs, int nsrc, char *err);
int direct_finish(struct local *l, struct lop *op, char *err);
void direct_unmap(struct local *l);
/* An optimizer was set: kvd serves the key now (its cached entry switches). */
bool direct_moved(struct lkey *k);

#endif
