/* SPDX-License-Identifier: MIT */
/*
 * kvd.h - the daemon's objects and which thread owns each field.
 *
 * Two kinds of threads share these objects:
 *  - the control thread (ctl.c): the socket, hellos, keys, segments, status;
 *  - the engine thread (engine.c): the rings, rounds and completions, with a
 *    pool of reduce workers that only do arithmetic on tasks handed to them.
 * The control thread creates clients, jobs and keys and publishes them with
 * release stores; the engine reads them with acquire loads.  Membership
 * changes travel from control to engine as events (JOIN, LEAVE, DROP) on a
 * queue, in order.  Only the engine frees clients and jobs, and hands a
 * client back to the control thread (to close its socket) when it is done.
 * Fields are marked [ctl] (control thread; under kvd.lock where noted),
 * [eng] (engine thread), [const] (set before publication, then read-only),
 * or [atomic].
 */
#ifndef KVD_H
#define KVD_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "kv.h"
#include "../kernels/optim.h"
#include "../shm/arena.h"
#include "../shm/layout.h"
#include "../shm/msg.h"
#include "../shm/ring.h"

#define KVD_DEFAULT_SOCKET "/run/kvd/kvd.sock"
#define KEY_BLOCK 1024u /* key pointers per directory block */
#define KEY_DIR 4096u   /* directory blocks: up to 4M keys */
#define LAT_BUCKETS KV_LAT_BUCKETS /* op latency histogram: < 1us .. < 2^23us, then +Inf */

struct kvd_config {
	const char *socket_path;
	int threads;            /* reduce workers */
	uint64_t max_job_bytes; /* 0: no limit */
	uint64_t max_uid_bytes; /* 0: no limit */
	uint32_t max_keys;  /* per job */
	uint32_t max_ranks; /* per job */
	uint32_t max_clients;
	uint32_t part_bytes;   /* rounds are split into parts of this size */
	uint32_t inline_bytes; /* parts up to this size are summed by the engine itself */
	uint32_t sq_entries, cq_entries;
	uint32_t max_segs; /* arena segments per client */
	uint64_t direct_max; /* keys up to this many bytes get direct rounds; 0: none */
	uint64_t pinned_limit; /* node-wide bytes kvd page-locks for GPU DMA; 0: none */
	long allow_gid;    /* a group whose members may join others' jobs; -1: none */
	uint32_t hello_timeout_s; /* silence allowed before a connection's hello */
	int listen_fd;     /* from socket activation, or -1 */
};

struct seginfo {
	int fd;
	uint8_t *base;
	uint64_t size;
};

struct client {
	uint32_t id;       /* [const] */
	pid_t pid;         /* [const] from SO_PEERCRED */
	uid_t uid;         /* [const] */
	struct job *job;   /* [const] once joined */
	int rank;          /* [const] once joined */
	struct conn *conn; /* [ctl] */
	uint32_t held[KV_HOLD_KIND_MAX]; /* [ctl] the job's segments of each kind handed to it */

	int ring_fd; /* [const] the ring segment */
	uint8_t *ring_mem;
	uint64_t ring_size;
	uint32_t sq_entries, cq_entries;

	/* arena segments: [ctl] fills segs[n], then store-release nsegs; [eng] load-acquire */
	struct seginfo *segs;
	uint32_t max_segs;
	uint32_t nsegs;

	/* [eng] */
	struct ring sq, cq;
	struct overflow *overflow, *overflow_tail; /* completions waiting for CQ room */
	uint32_t noverflow;
	struct contrib *pending; /* every live contribution of this client (for CANCEL) */
	int refs;           /* tasks on workers that read or write this client's memory */
	bool left;          /* LEAVE processed */
	uint64_t failed_ud; /* an op whose part failed on a broken job: its later parts fail too */
	uint32_t npending;  /* [eng] contributions taken and not completed (capped) */
	bool broken;        /* ring corrupt: no longer served */
	struct client *next; /* engine's list of served clients */
	uint32_t evict;     /* [atomic] engine asks control to disconnect it */
	char evict_why[96]; /* [eng] written before evict is set */
};

/* An optimizer configuration: immutable once published; replaced ones are
 * kept (older) until the job ends, since the engine may still read them. */
struct opt_cfg {
	struct opt_params p;
	char name[8];
	char spec[KV_SPEC_MAX + 1];
	uint32_t fresh; /* states generation: a new optimizer name starts new states */
	struct opt_cfg *older;
};

struct part {
	uint64_t rounds_done;     /* [eng] */
	uint64_t ver;             /* [eng] publishes of the value: copy ver & 1 is live */
	uint64_t live_rounds, spare_rounds; /* [eng] rounds_done as of each copy's publish
					     * (a repeated op of either round gets it) */
	/* [eng] optimizer state, made at the part's first update, in the key's
	 * state block (struct sblock) */
	bool has_states;
	const struct sblock *states_in; /* the block they are in */
	uint64_t opt_t;  /* updates applied (Adam's step count) */
	uint32_t opt_fresh; /* the states' generation (0: none) */
	struct contrib **head;    /* [eng; relaxed atomic stores] per rank FIFO of contributions */
	struct contrib **tail;
	uint64_t *submitted; /* [eng] per rank: rounds this rank has contributed to */
	uint8_t *inited;     /* [eng] per rank: init seen */
	uint32_t nready;     /* [eng, relaxed atomic] ranks with a non-empty queue */
	bool busy;           /* [eng] a round is on a worker */
	bool queued;         /* [eng] in the ready heap */
	bool has_value;      /* [eng] */
	struct contrib *pulls;        /* [eng] pulls waiting for rounds */
	struct contrib *init_waiters; /* [eng] inits waiting for rank 0 */
	uint64_t stall_since;         /* [eng, relaxed atomic] ns when the open round began */
};

/*
 * An engine key's optimizer states, in a block of the job's value segments
 * made by the control thread when the optimizer is set (or the key made
 * after): two copies like the value's, a part's states in copy ver & 1 live
 * with its value.  A copy holds narrays arrays of the key's count floats: the
 * f32 master weights of an f16/bf16 key first, then the optimizer's states
 * (momentum, or Adam's mean and variance).
 */
struct sblock {
	uint32_t narrays;
	bool master;
	float *copy[2];
	struct sblock *older; /* replaced blocks, kept until the job ends */
};

struct key {
	uint32_t id;       /* [const] */
	uint32_t name_len; /* [const] */
	char *name;        /* [const] NUL-terminated copy */
	uint64_t count;    /* [const] */
	kv_dtype dtype;    /* [const] */
	uint32_t esize, nparts, part_elems; /* [const] */
	/* engine keys: the value block (shm/layout.h), else NULL; [const] pointers,
	 * bytes written by the engine and workers */
	struct kv_vpart *vparts;
	uint8_t *vcopy[2];
	struct kv_dkey *dkey; /* [const] direct keys: the block in a direct segment, else NULL */
	uint32_t dseg;        /* [const] which direct segment */
	uint64_t doff;        /* [const] and where in it */
	uint32_t has_value;  /* [atomic] every part holds a value */
	uint32_t moved;      /* [atomic] a direct key now served by the engine (optimizer set) */
	uint32_t parts_valued; /* [eng] */
	struct sblock *sblk; /* [ctl] publishes (release), [eng] reads (acquire); NULL: none */
	struct part *parts;  /* [const] pointer; contents [eng] */
};

struct job {
	char name[KV_JOB_MAX + 1]; /* [const] */
	uid_t uid;                 /* [const] */
	int num_workers;           /* [const] */
	double created;            /* [const] */
	struct job *next;          /* [ctl, kvd.lock] list of live jobs */

	/* membership as the control thread sees it [ctl, kvd.lock] */
	struct client **ranks;
	int present;
	bool formed;   /* every rank has been present at once */
	bool detached; /* removed from the list (last rank left, or dropped) */

	/* keys: [ctl] creates, publishes dir[] blocks and nkeys with release */
	struct key **dir[KEY_DIR];
	uint32_t nkeys;
	struct keymap *names; /* [ctl] name -> id */
	struct arena values;  /* [ctl] allocates; freed with the job */
	struct seginfo *value_segs;
	uint32_t nvalue_segs, cap_value_segs;
	struct arena direct;  /* [ctl] direct key blocks, in segments every rank maps */
	struct seginfo *direct_segs;
	uint32_t ndirect_segs, cap_direct_segs;
	struct seginfo man[KV_MAN_CHUNKS]; /* [ctl] the manifest's chunks (shm/layout.h) */
	uint32_t nman;                     /* [ctl] chunks made */
	int board_fd;            /* [const] the job board every rank maps */
	struct kv_board *board;  /* [const] pointer; state written by the engine only */
	uint64_t bytes; /* [atomic] shared bytes held by the job (values and its clients) */

	/* [eng] */
	struct opt_cfg *opt; /* [ctl] publishes (release), [eng] reads (acquire); NULL: sums only */
	/* [ctl] the collective kv_set_optimizer in progress */
	struct opt_cfg *opt_pending;
	struct opt_vote *opt_votes; /* one per rank that called it, with its request */
	int nopt_votes;

	struct client **eng_ranks;
	int eng_present;
	bool complete_once;  /* every rank has been present at once */
	bool left_once;      /* [engine] a rank has left since complete_once */
	uint32_t leave_epoch; /* [engine] the board epoch set when a rank last left */
	bool dropped;
	bool gone;           /* the last rank left: free once busy == 0 */
	int busy;            /* tasks on workers */
	struct contrib *held; /* init/pull ops held until the job is first complete */
	struct ckpt_req *ckpt; /* checkpoints waiting for the job's workers to be idle */

	/* [ctl, kvd.lock] rates for kvctl, over the time since the last sample */
	double rate_t;        /* when the sample was taken (0: none yet) */
	uint64_t rate_rounds, rate_bytes;
	double rounds_per_s, bytes_per_s;

	/* statistics [atomic]: written by the engine, read by the control thread */
	uint64_t rounds, bytes_reduced, ops, inflight, peak_inflight;
	uint64_t lat_count, lat_sum_ns;
	uint64_t lat[LAT_BUCKETS + 1];
};

struct contrib {
	struct contrib *next;          /* part queue, held list, pulls or init waiters */
	struct contrib *qprev;         /* part queue: the entry before (O(1) removal) */
	bool queued;                   /* in a part queue */
	struct contrib *cnext, *cprev; /* the client's pending list */
	struct client *c;
	struct key *key;
	struct kv_sqe sqe; /* validated private copy */
	uint8_t *in, *out;
	uint64_t target; /* pull: rounds that must be done first */
	uint64_t t0_ns;  /* when the engine took it */
};

/* heap.c - ready rounds, highest priority first, then first come first served */
struct ready {
	int32_t prio;
	uint64_t seq;
	struct job *job;
	struct key *key;
	uint32_t part;
};
struct ready_heap {
	struct ready *v;
	size_t n, cap;
	uint64_t seq;
};
int ready_push(struct ready_heap *h, int32_t prio, struct job *j, struct key *k, uint32_t part);
struct ready ready_pop(struct ready_heap *h); /* h->n > 0 */
void ready_purge(struct ready_heap *h, const struct job *j); /* drop j's entries */

struct task; /* engine.c */
struct engine;
struct ctl;

struct kvd {
	struct kvd_config cfg;
	double start; /* monotonic seconds */
	pthread_mutex_t lock; /* job list and membership */
	struct job *jobs;
	uint32_t next_client_id;
	uint32_t nclients; /* [atomic] */
	uint64_t shared_bytes; /* [atomic] */
	uint64_t pinned_bytes; /* [atomic] */
	pthread_mutex_t uid_lock; /* shared bytes per uid, for --max-uid-bytes */
	struct uid_bytes {
		uid_t uid;
		uint64_t bytes;
	} *uids;
	uint32_t nuids;
	struct engine *eng;
	struct ctl *ctl;
	int gpus;
};

/* log.c */
void kvd_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
double kvd_now(void); /* monotonic seconds */
uint64_t kvd_now_ns(void);

/* job.c - jobs, keys and accounting (control thread unless noted) */
struct job *job_find(struct kvd *d, const char *name); /* under kvd.lock */
/* A segment a rank kept for its job (HOLD), handed back after a restart (ADOPT). */
struct kv_adopt {
	uint32_t kind, id; /* enum kv_hold_kind, its index */
	int fd;
};
/*
 * Take back a job that a kvd before this one served, from the segments a
 * rank kept: its board, manifest, value and direct segments.  Every record
 * is checked against the segments (a rank is only as trusted as its job).
 * The fds in a stay the caller's.  NULL with why.
 */
struct job *job_adopt(struct kvd *d, const char *name, uid_t uid, int num_workers,
		      const struct kv_adopt *a, uint32_t n, char *why, size_t whylen);
/* NULL with why when out of memory or descriptors */
struct job *job_create(struct kvd *d, const char *name, uid_t uid, int num_workers, char *why,
		       size_t whylen);
void job_free(struct kvd *d, struct job *j); /* engine, when gone and idle */
static inline uint32_t job_nkeys(struct job *j)
{
	return __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE); /* pairs with job_key_open */
}
static inline struct key *job_key(struct job *j, uint32_t id)
{
	uint32_t n = __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE); /* pairs with job_key_create */
	if (id >= n)
		return NULL;
	return j->dir[id / KEY_BLOCK][id % KEY_BLOCK];
}
/* Does the key hold a value (for direct keys the ranks set it in shared memory)? */
static inline bool key_has_value(struct key *k)
{
	return k->dkey && !__atomic_load_n(&k->moved, __ATOMIC_ACQUIRE)
		       ? __atomic_load_n(&k->dkey->has_value, __ATOMIC_ACQUIRE) != 0
		       : __atomic_load_n(&k->has_value, __ATOMIC_ACQUIRE) != 0;
}
/* A direct key served by the engine from now on? */
static inline bool key_direct(struct key *k)
{
	return k->dkey && !__atomic_load_n(&k->moved, __ATOMIC_ACQUIRE);
}
_Static_assert(KV_MAN_JOB > KV_JOB_MAX && KV_MAN_SPEC > KV_SPEC_MAX && KV_KEY_MAX < 256,
	       "manifest fields hold names and specs");
_Static_assert((uint64_t)KV_MAN_KEYS0 * ((1u << KV_MAN_CHUNKS) - 1u) >= KEY_DIR * KEY_BLOCK,
	       "the manifest has room for every key");

/* The manifest's chunk 0 header, as kvd writes it. */
static inline struct kv_man_hdr *job_man(struct job *j)
{
	return (struct kv_man_hdr *)j->man[0].base;
}
/* A key made by job_key_open enters the manifest (once its ranks hold its
 * segments: control thread, after the HOLD messages). */
void job_man_publish(struct job *j, const struct key *k);
/* An upper bound of the rounds any part of engine key k completed (any
 * thread: read from the part records), for a rank's first round tags. */
uint64_t key_rounds_bound(const struct key *k);
/* The job's optimizer is now opt: record it in the manifest. */
void job_man_opt(struct job *j, const struct opt_cfg *opt);

/* State array i of the part in copy c of block sb, or NULL. */
static inline float *part_state(const struct key *k, const struct sblock *sb, uint32_t part,
				uint64_t c, uint32_t i)
{
	return sb && i < sb->narrays ? sb->copy[c & 1] + (size_t)i * k->count +
					       (size_t)part * k->part_elems
				     : NULL;
}

/* Part p of an engine key's value copy c (0 or 1; only its low bit counts). */
static inline uint8_t *part_copy(const struct key *k, uint32_t part, uint64_t c)
{
	return k->vcopy[c & 1] + (size_t)part * k->part_elems * k->esize;
}
/* The part's value as of its last published round, and the copy the next one writes. */
static inline uint8_t *part_live(const struct key *k, uint32_t part)
{
	return part_copy(k, part, k->parts[part].ver);
}
static inline uint8_t *part_spare(const struct key *k, uint32_t part)
{
	return part_copy(k, part, k->parts[part].ver + 1);
}
/* The spare copy of the part is written: record where the part stands with
 * it and make it the live one (one release store).  Engine thread, or the
 * control thread before the engine ever serves the key. */
void part_publish(struct key *k, uint32_t part);
/* Find or create; returns 0 or a KV_ERR_* with why filled. */
/* rank: the requester's; only rank 0 creates a key (its init or broadcast
 * fixes the count and dtype), another rank's create finds KV_ERR_NOKEY
 * until then and its libkv asks again. */
int job_key_open(struct kvd *d, struct job *j, const struct kv_msg *m, int rank,
		 struct key **out, bool *created, char *why, size_t whylen);
int job_charge(struct kvd *d, struct job *j, uint64_t bytes, char *why, size_t whylen);
void job_uncharge(struct kvd *d, struct job *j, uint64_t bytes);

/* The engine moves the board's state (and wakes every waiter of the job). */
void job_board_set(struct job *j, enum kv_board_state st);
/* Mark a rank present or gone on the board (before job_board_set). */
void job_board_present(struct job *j, int rank, bool present);
/* A rank left: undo what it held in direct keys (locks, init flags). */
void job_direct_forget(struct job *j, int rank);

/* client.c */
struct client *client_create(struct kvd *d, uid_t uid, pid_t pid, char *why, size_t whylen);
int client_add_seg(struct kvd *d, struct client *c, uint64_t bytes, uint32_t *id,
		   char *why, size_t whylen);
/* A resuming rank's arena segment, under the next id (a copy of fd is kept). */
int client_adopt_seg(struct kvd *d, struct client *c, int fd, char *why, size_t whylen);
void client_free(struct kvd *d, struct client *c);

/* engine.c */
enum ev_type { EV_JOIN, EV_LEAVE, EV_DROP, EV_SHUTDOWN, EV_CKPT };
int engine_start(struct kvd *d);
void engine_post(struct kvd *d, enum ev_type t, struct client *c, struct job *j);
void engine_stop(struct kvd *d); /* after EV_SHUTDOWN: joins the threads */
void engine_free_all(struct kvd *d); /* after engine_stop: frees clients and jobs */
int engine_doorbell(struct kvd *d);

/* ctl.c */
int ctl_run(struct kvd *d); /* the control loop; returns at shutdown */
void ctl_evict(struct kvd *d, struct client *c);    /* engine: disconnect c */

/* An optimizer vote: a rank's kv_set_optimizer waiting for the others. */
struct opt_vote {
	struct conn *cn;
	uint32_t seq;
	int rank;
};

/* job.c: make opt the job's optimizer (moving direct keys to the engine) */
int job_set_optimizer(struct kvd *d, struct job *j, struct opt_cfg *opt, char *why,
		      size_t whylen);

/* A checkpoint request: the control thread moves the bytes, the engine takes
 * or restores the snapshot when none of the job's rounds is on a worker. */
struct ckpt_req {
	struct ckpt_req *next;   /* [eng] job's waiting list; [ctl] done list */
	struct ckpt_req *cnext, *cprev; /* [ctl] outstanding requests */
	struct job *job;
	struct conn *cn; /* [ctl] NULL once the connection closed */
	uint32_t seq;
	int fd;          /* save: the temp file the client made; load: the file */
	bool load, dump_spec;
	uint8_t *buf;    /* save: the snapshot; load: the file's bytes */
	size_t len;
	int status;
	int inflight;    /* [ctl] io_uring ops outstanding */
	char why[512];
};

/* ckpt.c (the engine calls snapshot and restore; the control thread verify) */
int ckpt_snapshot(struct job *j, bool dump_spec, uint8_t **out, size_t *outlen, char *why,
		  size_t whylen);
int ckpt_verify(const uint8_t *buf, size_t len, char *why, size_t whylen);
int ckpt_restore(struct job *j, const uint8_t *buf, size_t len, char *why, size_t whylen);
/* Can an optimizer update keys of type t? */
static inline bool opt_dtype(kv_dtype t)
{
	return t == KV_FLOAT32 || t == KV_FLOAT16 || t == KV_BFLOAT16;
}
/* engine.c: the number of state arrays opt keeps for key k (master included) */
uint32_t opt_arrays(const struct key *k, const struct opt_cfg *opt);
void engine_ckpt(struct kvd *d, struct ckpt_req *req);
/* ctl.c: the engine is done with req (status and why set) */
void ctl_ckpt_done(struct kvd *d, struct ckpt_req *req);

/* opt.c */
int opt_parse(const char *spec, size_t len, struct opt_cfg *out, char *why, size_t whylen);
bool opt_same(const struct opt_cfg *a, const struct opt_cfg *b);

/* pin.c: page-lock segments for GPU DMA in the background (no-ops without a GPU) */
int pin_start(struct kvd *d);
void pin_stop_all(void);
void pin_segment(void *base, uint64_t size);
void pin_release(void *base); /* before the segment is unmapped */

/* stats.c */
char *stats_render(struct kvd *d, uint32_t what, uid_t viewer, size_t *len);

/* notify.c - the sd_notify protocol without libsystemd; no-ops outside systemd */
int notify_init(void); /* main(), before threads: reads and unsets $NOTIFY_SOCKET, $WATCHDOG_* */
bool notify_enabled(void);
uint64_t notify_watchdog_usec(void); /* 0: no watchdog for this process */
int notify_send(const char *text);   /* one datagram of "VAR=value" lines; any thread */
int notify_sendf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void notify_close(void);

#endif /* KVD_H */
