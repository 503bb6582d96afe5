/* SPDX-License-Identifier: MIT */
/*
 * engine.c - the data plane: submission rings in, rounds, completions out.
 *
 * One engine thread owns every round.  It copies each submission out of a
 * client's ring, validates the copy (op, key, dtype, count, part, and that
 * every buffer lies inside a segment of that client), and files it:
 *  - push, pushpull, broadcast: in the key part's FIFO for that rank; when
 *    every rank's FIFO has a head, the part's round is ready and goes to a
 *    max-heap by priority;
 *  - pull: served at once, or parked until this rank's earlier pushes on the
 *    part are done;
 *  - init: rank 0 stores its value; other ranks wait for it.
 * A ready round small enough is summed on the engine thread; larger ones go
 * to the reduce workers, which only do arithmetic on a task (a private list
 * of pointers) and hand it back.  While a round is on a worker its part is
 * busy: its FIFO heads stay put and nothing else touches its value.
 *
 * Completions that do not fit a client's completion ring wait on a private
 * overflow list (as io_uring's do) and move in as the client reaps, so
 * submissions are always taken and ranks that issue keys in different
 * orders never deadlock on ring space.  A client that lets the list grow
 * past OVERFLOW_MAX, or whose ring words are impossible, is evicted; it can
 * only ever harm its own job.
 *
 * Sleeping: after a short spin with nothing to do, the engine sets the
 * sleeping flag in every client's submission ring and its own, re-checks
 * everything, and blocks in read() on the doorbell eventfd, which clients,
 * workers and the control thread write only when they see the flag.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvd.h"
#include "../kernels/optim.h"
#include "../kernels/reduce.h"
#include "../shm/futex.h"

#define SPIN_NS 50000u /* keep polling this long after the last work */
#define POLL_BUDGET 64 /* submissions taken from one client per pass */
#define OVERFLOW_MAX (1u << 20) /* completions kept for a client that does not reap */
#define OVERFLOW_POLL_MS 2 /* sleep at most this long while completions overflow */
#define MAX_PENDING (1u << 16)  /* contributions a client may have outstanding; then its
				 * submissions wait in its ring (back-pressure) */

struct overflow {
	struct overflow *next;
	struct kv_cqe cqe;
};

enum { KIND_SUM = 1, KIND_BCAST = 2 };
enum where { W_NONE, W_QUEUE, W_PULL, W_INITW, W_HELD };

struct event {
	struct event *next;
	enum ev_type type;
	struct client *c;
	struct job *j;
	struct ckpt_req *req;
};

struct task {
	struct task *next;
	struct job *job;
	struct key *key;
	uint32_t part;
	int kind;
	kv_dtype dtype;
	size_t n;
	int nin, nout;
	struct client **refs; /* clients whose memory the task touches (nin of them) */
	uint8_t **ptrs;       /* nin inputs, then nout outputs (outs[0]: the part's spare
			       * copy, or with an optimizer the summed gradient) */
	/* optimizer rounds: outs[0] is the gradient scratch; then the update */
	struct opt_params opt;
	uint64_t t;
	float *weight, *s0, *s1; /* weight: the value (f32 keys) or the master copy */
	uint8_t *value;          /* the part's spare copy: the value the round publishes */
	const uint8_t *live;     /* f32 optimizer rounds: the weight the update starts from */
	float *st_from[3], *st_to[3]; /* the part's state arrays, live to spare copy */
	uint32_t nst;
	uint8_t *scratch;        /* malloc'd, freed with the task */
	int status;              /* what the kernels said */
};

struct engine {
	struct kvd *d;
	pthread_t thread;
	int doorbell;
	uint32_t sleeping; /* [atomic] */

	pthread_mutex_t qlock; /* events and done */
	struct event *ev_head, *ev_tail;
	struct task *done;
	uint32_t pending_events; /* [atomic] a hint for the sleep check */

	pthread_mutex_t plock; /* the workers' queue */
	pthread_cond_t pcond;
	struct task *todo_head, *todo_tail;
	bool stop_workers;
	pthread_t *workers;
	int nworkers;

	/* engine thread only */
	struct client *clients;
	struct ready_heap ready;
	bool shutting_down;
	bool exit_now;
	int tasks_out;
	/* fault injection for the restart tests ($KVD_FAULT_KILL_AFTER_ROUND):
	 * kvd kills itself once it has published this many rounds, when it has
	 * told rank 0 of the last one and no other rank, the worst moment for
	 * exactly-once; 0: never */
	uint64_t kill_after, published;
};

/* ------------------------------------------------------------------ helpers */

static struct contrib *contrib_new(struct client *c, const struct kv_sqe *s)
{
	struct contrib *x = calloc(1, sizeof(*x));

	if (!x)
		return NULL;
	x->c = c;
	x->sqe = *s;
	x->t0_ns = kvd_now_ns();
	c->npending++;
	/* the client's pending list, for CANCEL and for leaving */
	x->cnext = c->pending;
	if (c->pending)
		c->pending->cprev = x;
	c->pending = x;
	return x;
}

static void contrib_unlink(struct contrib *x)
{
	struct client *c = x->c;

	c->npending--;
	if (x->cprev)
		x->cprev->cnext = x->cnext;
	else
		c->pending = x->cnext;
	if (x->cnext)
		x->cnext->cprev = x->cprev;
	x->cnext = x->cprev = NULL;
}

static void evict(struct kvd *d, struct client *c, const char *why)
{
	if (c->broken)
		return;
	c->broken = true;
	snprintf(c->evict_why, sizeof(c->evict_why), "%s", why);
	ctl_evict(d, c);
}

/* Post the completion of one submission (x may be NULL for a bare sqe). */
static void post(struct engine *e, struct client *c, const struct kv_sqe *s, int status,
		 uint64_t round)
{
	if (c->left || c->broken)
		return;
	struct kv_cqe q = {
		.user_data = s->user_data, .status = status, .part = s->part, .round = round
	};
	int rc = c->overflow ? -EAGAIN : ring_push(&c->cq, &q);

	if (rc == -EAGAIN) {
		/* the client is slow to reap: keep it here, like io_uring's CQ overflow */
		struct overflow *o = malloc(sizeof(*o));
		if (!o || c->noverflow >= OVERFLOW_MAX) {
			free(o);
			evict(e->d, c, "too many completions left unreaped");
			return;
		}
		o->cqe = q;
		o->next = NULL;
		if (c->overflow_tail)
			c->overflow_tail->next = o;
		else
			c->overflow = o;
		c->overflow_tail = o;
		c->noverflow++;
		return;
	}
	if (rc) {
		evict(e->d, c, "completion ring indices are corrupt");
		return;
	}
	if (ring_consumer_sleeping(&c->cq))
		ring_wake(&c->cq);
}

/*
 * Move what overflowed into the completion ring as it frees up.  While some
 * is left, the ring's "full" flag asks the client to ring the doorbell once
 * it has reaped, so a sleeping engine comes back for the rest.
 */
static int flush_overflow(struct engine *e, struct client *c)
{
	int n = 0, rc = 0;

	for (;;) {
		while (c->overflow) {
			struct overflow *o = c->overflow;
			rc = ring_push(&c->cq, &o->cqe);
			if (rc)
				break;
			c->overflow = o->next;
			if (!c->overflow)
				c->overflow_tail = NULL;
			c->noverflow--;
			free(o);
			n++;
		}
		if (rc && rc != -EAGAIN) {
			evict(e->d, c, "completion ring indices are corrupt");
			break;
		}
		if (!c->overflow) {
			ring_set_full(&c->cq, false);
			break;
		}
		/* flag, then look again: the client may have reaped in between */
		ring_set_full(&c->cq, true);
		if (ring_space(&c->cq, 1) <= 0)
			break;
	}
	if (n && ring_consumer_sleeping(&c->cq))
		ring_wake(&c->cq);
	return n;
}

static void complete(struct engine *e, struct contrib *x, int status, uint64_t round)
{
	struct job *j = x->c->job;
	uint64_t dt = kvd_now_ns() - x->t0_ns;

	/* an op one of whose parts failed for a gone rank fails as a whole: its
	 * parts still to come are refused (do_round), so it is never half applied */
	if (status == KV_ERR_PEER)
		x->c->failed_ud = x->sqe.user_data;
	contrib_unlink(x);
	post(e, x->c, &x->sqe, status, round);
	__atomic_add_fetch(&j->ops, 1, __ATOMIC_RELAXED);
	__atomic_sub_fetch(&j->inflight, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&j->lat[kv_lat_bucket(dt)], 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&j->lat_count, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&j->lat_sum_ns, dt, __ATOMIC_RELAXED);
	free(x);
}

static size_t part_elems(const struct key *k, uint32_t part)
{
	uint64_t start = (uint64_t)part * k->part_elems;
	uint64_t left = k->count - start;

	return (size_t)(left < k->part_elems ? left : k->part_elems);
}

/* A location inside one of c's segments, or NULL (*bad set when it is not). */
static uint8_t *resolve(struct client *c, const struct kv_loc *l, size_t bytes, bool *bad)
{
	/* pairs with the store-release of nsegs in client_add_seg() */
	uint32_t n = __atomic_load_n(&c->nsegs, __ATOMIC_ACQUIRE);
	const struct seginfo *s;

	if (l->seg == KV_SEG_NONE)
		return NULL;
	if (l->seg >= n) {
		*bad = true;
		return NULL;
	}
	s = &c->segs[l->seg];
	if (l->off > s->size || bytes > s->size - l->off) {
		*bad = true;
		return NULL;
	}
	return s->base + l->off;
}

static int op_kind(uint8_t op)
{
	return op == KV_OP_BCAST ? KIND_BCAST : KIND_SUM;
}

/* ------------------------------------------------------------------ rounds */

/*
 * Part queues.  head[r], nready and stall_since are also read by the control
 * thread for `kvctl status` (stalled rounds) without a lock, so the engine,
 * their only writer, stores them with relaxed atomics.
 */
static void set_head(struct part *p, int r, struct contrib *x)
{
	__atomic_store_n(&p->head[r], x, __ATOMIC_RELAXED);
}

static void set_nready(struct part *p, uint32_t n)
{
	__atomic_store_n(&p->nready, n, __ATOMIC_RELAXED);
}

static void set_stall(struct part *p, uint64_t ns)
{
	__atomic_store_n(&p->stall_since, ns, __ATOMIC_RELAXED);
}

static void queue_append(struct part *p, int r, struct contrib *x)
{
	x->next = NULL;
	x->qprev = p->tail[r];
	x->queued = true;
	if (p->tail[r])
		p->tail[r]->next = x;
	else {
		set_head(p, r, x);
		set_nready(p, p->nready + 1);
	}
	p->tail[r] = x;
}

/* Remove x from rank r's queue wherever it is, in O(1). */
static void queue_remove(struct part *p, int r, struct contrib *x)
{
	if (!x->queued)
		return;
	if (x->qprev)
		x->qprev->next = x->next;
	else
		set_head(p, r, x->next);
	if (x->next)
		x->next->qprev = x->qprev;
	else
		p->tail[r] = x->qprev;
	if (!p->head[r])
		set_nready(p, p->nready - 1);
	x->next = x->qprev = NULL;
	x->queued = false;
}

static struct contrib *queue_pop(struct part *p, int r)
{
	struct contrib *x = p->head[r];

	queue_remove(p, r, x);
	return x;
}

static bool list_remove(struct contrib **list, struct contrib *x)
{
	for (struct contrib **pp = list; *pp; pp = &(*pp)->next) {
		if (*pp == x) {
			*pp = x->next;
			x->next = NULL;
			return true;
		}
	}
	return false;
}

/*
 * Every rank has a head: rank 0's op decides the round, and a rank whose op
 * disagrees fails alone (KV_ERR_MISMATCH).  True when every head is left.
 */
static bool heads_agree(struct engine *e, struct part *p, int n)
{
	int kind;

	if (p->nready != (uint32_t)n)
		return false;
	kind = op_kind(p->head[0]->sqe.op);
	for (int r = 1; r < n; r++) {
		while (p->head[r] && op_kind(p->head[r]->sqe.op) != kind) {
			struct contrib *x = queue_pop(p, r);
			p->submitted[r]--;
			complete(e, x, KV_ERR_MISMATCH, p->rounds_done);
		}
	}
	return p->nready == (uint32_t)n;
}

static void maybe_ready(struct engine *e, struct job *j, struct key *k, uint32_t part)
{
	struct part *p = &k->parts[part];
	int n = j->num_workers;
	int32_t prio;

	if (p->busy || p->queued || !heads_agree(e, p, n))
		return;
	prio = p->head[0]->sqe.priority;
	for (int r = 1; r < n; r++)
		if (p->head[r]->sqe.priority > prio)
			prio = p->head[r]->sqe.priority;
	if (ready_push(&e->ready, prio, j, k, part) == 0)
		p->queued = true;
}

/* The arithmetic of one round; any number of inputs and outputs. */
static int round_exec(int kind, kv_dtype t, uint8_t *const *ins, int nin, uint8_t *const *outs,
		       int nout, size_t n)
{
	void *const *o = (void *const *)outs;
	const void *const *in = (const void *const *)ins;
	int first, rc = 0;

	if (kind == KIND_BCAST) {
		for (int i = 0; i < nout && !rc; i += REDUCE_MAX_INPUTS) {
			int m = nout - i < REDUCE_MAX_INPUTS ? nout - i : REDUCE_MAX_INPUTS;
			rc = reduce_copy(REDUCE_CPU, NULL, t, o + i, m, ins[0], n);
		}
		return rc;
	}
	if (nin <= REDUCE_MAX_INPUTS && nout <= REDUCE_MAX_INPUTS)
		return reduce_sum(REDUCE_CPU, NULL, t, o, nout, in, nin, n);
	/* many ranks: accumulate into outs[0] (the part's spare copy, which aliases no
	 * input), then copy it to the other outputs */
	first = nin < REDUCE_MAX_INPUTS ? nin : REDUCE_MAX_INPUTS;
	rc = reduce_sum(REDUCE_CPU, NULL, t, o, 1, in, first, n);
	for (int i = first; i < nin && !rc; i += REDUCE_MAX_INPUTS - 1) {
		const void *batch[REDUCE_MAX_INPUTS];
		int m = nin - i < REDUCE_MAX_INPUTS - 1 ? nin - i : REDUCE_MAX_INPUTS - 1;
		batch[0] = outs[0];
		for (int b = 0; b < m; b++)
			batch[b + 1] = ins[i + b];
		rc = reduce_sum(REDUCE_CPU, NULL, t, o, 1, batch, m + 1, n);
	}
	for (int i = 1; i < nout && !rc; i += REDUCE_MAX_INPUTS) {
		int m = nout - i < REDUCE_MAX_INPUTS ? nout - i : REDUCE_MAX_INPUTS;
		rc = reduce_copy(REDUCE_CPU, NULL, t, o + i, m, outs[0], n);
	}
	return rc;
}

static void serve_pulls(struct engine *e, struct key *k, uint32_t part)
{
	struct part *p = &k->parts[part];
	struct contrib **pp = &p->pulls;
	size_t bytes = part_elems(k, part) * k->esize;

	while (*pp) {
		struct contrib *x = *pp;
		if (x->target > p->rounds_done) {
			pp = &x->next;
			continue;
		}
		*pp = x->next;
		x->next = NULL;
		memcpy(x->out, part_live(k, part), bytes);
		complete(e, x, KV_OK, p->rounds_done);
	}
}

static void mark_valued(struct key *k, struct part *p)
{
	if (p->has_value)
		return;
	p->has_value = true;
	if (++k->parts_valued == k->nparts)
		/* lets KEY_FIND succeed; pairs with the load-acquire in job_key_open() */
		__atomic_store_n(&k->has_value, 1, __ATOMIC_RELEASE);
}

/* After the arithmetic: advance the part and complete every rank's head.
 * A round whose arithmetic was refused (status) fails on every rank and
 * leaves the part as it was. */
static void round_done(struct engine *e, struct job *j, struct key *k, uint32_t part, int status)
{
	struct part *p = &k->parts[part];
	size_t bytes = part_elems(k, part) * k->esize;

	if (status) {
		kvd_log("job %s: a round of key '%s' failed: the kernels refused its buffers",
			j->name, k->name);
		for (int r = 0; r < j->num_workers; r++) {
			p->submitted[r]--;
			complete(e, queue_pop(p, r), KV_ERR_INVALID, p->rounds_done);
		}
		set_stall(p, p->nready ? kvd_now_ns() : 0);
		maybe_ready(e, j, k, part);
		return;
	}

	p->rounds_done++;
	mark_valued(k, p);
	part_publish(k, part);
	if (part == 0)
		__atomic_add_fetch(&j->rounds, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&j->bytes_reduced, bytes, __ATOMIC_RELAXED);
	for (int r = 0; r < j->num_workers; r++) {
		complete(e, queue_pop(p, r), KV_OK, p->rounds_done);
		if (r == 0 && e->kill_after && ++e->published == e->kill_after)
			raise(SIGKILL);
	}
	set_stall(p, p->nready ? kvd_now_ns() : 0);
	serve_pulls(e, k, part);
	maybe_ready(e, j, k, part);
}

static void task_free(struct task *t)
{
	free(t->scratch);
	free(t);
}

static struct task *task_new(struct job *j, struct key *k, uint32_t part, int nin, int nout)
{
	struct task *t = calloc(1, sizeof(*t) + (size_t)nin * sizeof(struct client *) +
					    (size_t)(nin + nout) * sizeof(uint8_t *));
	if (!t)
		return NULL;
	t->refs = (struct client **)(t + 1);
	t->ptrs = (uint8_t **)(t->refs + nin);
	t->job = j;
	t->key = k;
	t->part = part;
	t->nin = nin;
	t->nout = nout;
	t->dtype = k->dtype;
	t->n = part_elems(k, part);
	return t;
}

uint32_t opt_arrays(const struct key *k, const struct opt_cfg *opt)
{
	return (k->dtype != KV_FLOAT32) + (uint32_t)optim_nstates(&opt->p);
}

/*
 * The part's optimizer state for opt, made or reset (another optimizer) as
 * needed, in the live copy of the key's state block: the part's record says
 * which optimizer its states are for only once the round publishes, so a kvd
 * that dies meanwhile leaves them as they were.  sb is the key's state
 * block as the round saw it; -ENOMEM when the control thread could make no
 * block for opt.
 */
static int part_opt_state(struct key *k, uint32_t part, const struct opt_cfg *opt,
			  const struct sblock *sb)
{
	struct part *p = &k->parts[part];
	uint32_t na = opt_arrays(k, opt);
	size_t n = part_elems(k, part);

	if (na && (!sb || sb->narrays != na))
		return -ENOMEM;
	/* states for this optimizer, in this block (a new shape got a new one) */
	if (p->has_states && p->opt_fresh == opt->fresh && p->states_in == sb)
		return 0;
	for (uint32_t i = 0; i < na; i++) {
		float *a = part_state(k, sb, part, p->ver, i);
		if (i == 0 && sb->master)
			reduce_to_f32(a, part_live(k, part), k->dtype, n);
		else
			memset(a, 0, n * sizeof(float));
	}
	p->has_states = true;
	p->states_in = sb;
	p->opt_fresh = opt->fresh;
	p->opt_t = 0;
	return 0;
}

/* Collect the round's buffers: ins are every head's input (or rank 0's for a
 * broadcast); outs[0] is the value, then each head's output. */
static struct task *round_task(struct job *j, struct key *k, uint32_t part)
{
	struct part *p = &k->parts[part];
	/* one look at the state block for the whole round; pairs with the
	 * store-release in the control thread's key_states */
	const struct sblock *sb = __atomic_load_n(&k->sblk, __ATOMIC_ACQUIRE);
	int n = j->num_workers, kind = op_kind(p->head[0]->sqe.op);
	int nin = kind == KIND_BCAST ? 1 : n, nout = 1;
	struct task *t;

	for (int r = 0; r < n; r++)
		nout += p->head[r]->out != NULL;
	t = task_new(j, k, part, nin, nout);
	if (!t)
		return NULL;
	t->kind = kind;
	for (int i = 0; i < nin; i++) {
		t->ptrs[i] = p->head[i]->in;
		t->refs[i] = p->head[i]->c;
	}
	t->ptrs[nin] = part_spare(k, part);
	t->value = part_spare(k, part);
	if (kind == KIND_SUM && opt_dtype(k->dtype)) {
		/* pairs with the store-release in the control thread's set_optimizer */
		const struct opt_cfg *opt = __atomic_load_n(&j->opt, __ATOMIC_ACQUIRE);

		if (opt && part_opt_state(k, part, opt, sb) == 0 &&
		    (t->scratch = malloc(t->n * k->esize))) {
			t->opt = opt->p;
			t->t = ++p->opt_t;
			t->ptrs[nin] = t->scratch;
		} else if (opt) {
			kvd_log("no room for the optimizer state of key '%s'", k->name);
		}
	}
	if (p->has_states) {
		/* the states move to the spare copy with the value (the update, or
		 * a broadcast's new master copy, then works on them there) */
		for (uint32_t i = 0; sb && i < sb->narrays; i++) {
			t->st_from[t->nst] = part_state(k, sb, part, p->ver, i);
			t->st_to[t->nst++] = part_state(k, sb, part, p->ver + 1, i);
		}
		if (sb && sb->master)
			t->weight = t->st_to[0]; /* a broadcast replaces it too */
		if (t->opt.kind) {
			uint32_t s = sb && sb->master ? 1 : 0;
			if (!t->weight) {
				t->weight = (float *)t->value;
				t->live = part_live(k, part);
			}
			t->s0 = sb && s < sb->narrays ? t->st_to[s] : NULL;
			t->s1 = sb && s + 1 < sb->narrays ? t->st_to[s + 1] : NULL;
		}
	}
	for (int r = 0, o = nin + 1; r < n; r++) {
		uint8_t *out = p->head[r]->out;
		if (!out)
			continue;
		/* a broadcast's output that is rank 0's input needs no copy */
		if (kind == KIND_BCAST && out == t->ptrs[0]) {
			t->nout--;
			continue;
		}
		t->ptrs[o++] = out;
	}
	return t;
}

#define UPDATE_CHUNK 8192 /* elements: a chunk's arrays stay in cache from copy to update */

static int task_run(struct task *t)
{
	uint8_t **outs = t->ptrs + t->nin;
	size_t es = kv_dtype_size(t->dtype);
	int rc;

	if (!t->opt.kind) {
		for (uint32_t i = 0; i < t->nst; i++)
			memcpy(t->st_to[i], t->st_from[i], t->n * sizeof(float));
		rc = round_exec(t->kind, t->dtype, t->ptrs, t->nin, outs, t->nout, t->n);
		if (!rc && t->kind == KIND_BCAST && t->weight)
			reduce_to_f32(t->weight, t->value, t->dtype, t->n);
		return rc;
	}
	/* sum the gradient, update the weight (and its stored copy), hand it out.
	 * The update works on the spare copy (an f32 key's weight is its value):
	 * chunk by chunk, the live weight and states are copied across, then
	 * updated while still in cache */
	rc = round_exec(KIND_SUM, t->dtype, t->ptrs, t->nin, outs, 1, t->n);
	for (size_t off = 0; off < t->n && !rc; off += UPDATE_CHUNK) {
		size_t m = t->n - off < UPDATE_CHUNK ? t->n - off : UPDATE_CHUNK;
		for (uint32_t i = 0; i < t->nst; i++)
			memcpy(t->st_to[i] + off, t->st_from[i] + off, m * sizeof(float));
		if (t->live)
			memcpy(t->value + off * es, t->live + off * es, m * sizeof(float));
		rc = optim_update(REDUCE_CPU, NULL, &t->opt, t->t, t->weight + off,
				  t->scratch + off * es, t->dtype, t->s0 ? t->s0 + off : NULL,
				  t->s1 ? t->s1 + off : NULL,
				  t->dtype == KV_FLOAT32 ? NULL : t->value + off * es, t->dtype, m);
	}
	for (int i = 1; i < t->nout && !rc; i += REDUCE_MAX_INPUTS) {
		int m = t->nout - i < REDUCE_MAX_INPUTS ? t->nout - i : REDUCE_MAX_INPUTS;
		rc = reduce_copy(REDUCE_CPU, NULL, t->dtype, (void *const *)(outs + i), m,
				 t->value, t->n);
	}
	return rc;
}


static int run_ready(struct engine *e)
{
	int work = 0;

	while (e->ready.n) {
		struct ready r = ready_pop(&e->ready);
		struct part *p = &r.key->parts[r.part];
		struct task *t;

		p->queued = false;
		/* the heads may have changed since it was queued (a cancel, a
		   rank that left, then new submissions): check them again */
		if (p->busy || !heads_agree(e, p, r.job->num_workers))
			continue;
		work++;
		t = round_task(r.job, r.key, r.part);
		if (!t) {
			kvd_log("out of memory for a round of key '%s'", r.key->name);
			maybe_ready(e, r.job, r.key, r.part);
			break;
		}
		if (e->nworkers == 0 || t->n * r.key->esize <= e->d->cfg.inline_bytes) {
			int st = task_run(t);
			task_free(t);
			round_done(e, r.job, r.key, r.part, st);
			continue;
		}
		p->busy = true;
		r.job->busy++;
		e->tasks_out++;
		for (int i = 0; i < t->nin; i++)
			t->refs[i]->refs++;
		pthread_mutex_lock(&e->plock);
		if (e->todo_tail)
			e->todo_tail->next = t;
		else
			e->todo_head = t;
		e->todo_tail = t;
		pthread_cond_signal(&e->pcond);
		pthread_mutex_unlock(&e->plock);
	}
	return work;
}

static void *worker_main(void *arg)
{
	struct engine *e = arg;

	for (;;) {
		struct task *t;

		pthread_mutex_lock(&e->plock);
		while (!e->todo_head && !e->stop_workers)
			pthread_cond_wait(&e->pcond, &e->plock);
		if (!e->todo_head) {
			pthread_mutex_unlock(&e->plock);
			return NULL;
		}
		t = e->todo_head;
		e->todo_head = t->next;
		if (!e->todo_head)
			e->todo_tail = NULL;
		pthread_mutex_unlock(&e->plock);

		t->status = task_run(t);

		pthread_mutex_lock(&e->qlock);
		t->next = e->done;
		e->done = t;
		pthread_mutex_unlock(&e->qlock);
		/* qlock orders this against engine_sleep(): if the engine checked the
		 * done list before we pushed, its sleeping=1 is visible to us now */
		if (__atomic_load_n(&e->sleeping, __ATOMIC_RELAXED)) {
			uint64_t one = 1;
			(void)!write(e->doorbell, &one, sizeof(one));
		}
	}
}

static void client_release(struct engine *e, struct client *c);
static void job_maybe_free(struct engine *e, struct job *j);
static void run_ckpts(struct engine *e, struct job *j);

static int drain_done(struct engine *e)
{
	struct task *t;
	int n = 0;

	pthread_mutex_lock(&e->qlock);
	t = e->done;
	e->done = NULL;
	pthread_mutex_unlock(&e->qlock);
	while (t) {
		struct task *next = t->next;
		struct job *j = t->job;
		struct part *p = &t->key->parts[t->part];

		p->busy = false;
		j->busy--;
		e->tasks_out--;
		round_done(e, j, t->key, t->part, t->status);
		for (int i = 0; i < t->nin; i++) {
			struct client *c = t->refs[i];
			if (--c->refs == 0 && c->left)
				client_release(e, c);
		}
		task_free(t);
		run_ckpts(e, j);
		job_maybe_free(e, j);
		t = next;
		n++;
	}
	return n;
}

/* ------------------------------------------------------------------ ops */

static bool job_broken(const struct job *j)
{
	return j->dropped || (j->complete_once && j->eng_present < j->num_workers);
}

static int broken_status(const struct engine *e, const struct job *j)
{
	return e->shutting_down ? KV_ERR_DAEMON : KV_ERR_PEER;
}

static void do_pull(struct engine *e, struct contrib *x)
{
	struct key *k = x->key;
	struct part *p = &k->parts[x->sqe.part];

	if (!p->has_value) {
		complete(e, x, KV_ERR_NOKEY, p->rounds_done);
		return;
	}
	x->target = p->submitted[x->c->rank];
	if (x->target <= p->rounds_done && !p->busy) {
		memcpy(x->out, part_live(k, x->sqe.part), part_elems(k, x->sqe.part) * k->esize);
		complete(e, x, KV_OK, p->rounds_done);
		return;
	}
	x->next = p->pulls;
	p->pulls = x;
}

static void init_finish(struct engine *e, struct contrib *x)
{
	struct key *k = x->key;

	if (x->out)
		memcpy(x->out, part_live(k, x->sqe.part), part_elems(k, x->sqe.part) * k->esize);
	complete(e, x, KV_OK, k->parts[x->sqe.part].rounds_done);
}

static void do_init(struct engine *e, struct contrib *x)
{
	struct key *k = x->key;
	uint32_t part = x->sqe.part;
	struct part *p = &k->parts[part];
	int r = x->c->rank;

	if (p->inited[r]) {
		complete(e, x, KV_ERR_EXISTS, p->rounds_done);
		return;
	}
	p->inited[r] = 1;
	/* a value stored already (by rank 0, a broadcast, or before this rank
	 * was restarted) stays: the call returns it */
	if (p->has_value) {
		init_finish(e, x);
		return;
	}
	if (r != 0) {
		if (job_broken(x->c->job) && !x->c->job->eng_ranks[0]) {
			p->inited[r] = 0;
			complete(e, x, KV_ERR_PEER, p->rounds_done);
			return;
		}
		x->next = p->init_waiters;
		p->init_waiters = x;
		return;
	}
	memcpy(part_spare(k, part), x->in, part_elems(k, part) * k->esize);
	mark_valued(k, p);
	part_publish(k, part);
	init_finish(e, x);
	while (p->init_waiters) {
		struct contrib *w = p->init_waiters;
		p->init_waiters = w->next;
		w->next = NULL;
		init_finish(e, w);
	}
}

/*
 * A round op names the round it contributes to (out.tag, README "Restarting
 * kvd"): a call repeated after kvd restarted names a round that may have
 * completed already.  Then it is not applied again: it completes with that
 * round's result (the live copy, or the spare one for the round before), or
 * fails with KV_ERR_DAEMON when that is gone too.  True when x was answered.
 */
static bool done_before(struct engine *e, struct contrib *x)
{
	struct key *k = x->key;
	struct part *p = &k->parts[x->sqe.part];
	uint32_t want = x->sqe.out.tag;
	const uint8_t *v;

	if (!want || (int32_t)(want - (uint32_t)p->rounds_done) > 0 || p->busy)
		return false;
	if (want == (uint32_t)p->live_rounds)
		v = part_live(k, x->sqe.part);
	else if (want == (uint32_t)p->spare_rounds)
		v = part_spare(k, x->sqe.part);
	else
		v = NULL;
	if (!v) {
		complete(e, x, KV_ERR_DAEMON, p->rounds_done);
		return true;
	}
	if (x->out)
		memcpy(x->out, v, part_elems(k, x->sqe.part) * k->esize);
	complete(e, x, KV_OK, want);
	return true;
}

static void do_round(struct engine *e, struct contrib *x)
{
	struct job *j = x->c->job;
	struct key *k = x->key;
	struct part *p = &k->parts[x->sqe.part];
	int r = x->c->rank;

	/* an op that began before a rank left (by the epoch libkv read then)
	 * fails whole: its later parts must not meet a replacement's in a round
	 * while its earlier ones were summed with the rank that left */
	bool stale = j->left_once && (int32_t)(x->sqe.in.tag - j->leave_epoch) < 0;

	if (done_before(e, x))
		return;
	if (job_broken(j) || e->shutting_down || stale || x->sqe.user_data == x->c->failed_ud) {
		/* the op's other parts fail too, even once the job is whole again */
		complete(e, x, e->shutting_down ? KV_ERR_DAEMON : KV_ERR_PEER, p->rounds_done);
		return;
	}
	if (!p->nready)
		set_stall(p, kvd_now_ns());
	queue_append(p, r, x);
	p->submitted[r]++;
	maybe_ready(e, j, k, x->sqe.part);
}

static void dispatch(struct engine *e, struct contrib *x)
{
	switch (x->sqe.op) {
	case KV_OP_INIT:
		do_init(e, x);
		break;
	case KV_OP_PULL:
		do_pull(e, x);
		break;
	default:
		do_round(e, x);
		break;
	}
}

/* Cancel every queued part of the op user_data of client c (not one in a busy round). */
static void do_cancel(struct engine *e, struct client *c, uint64_t user_data)
{
	struct contrib *x = c->pending, *next;

	for (; x; x = next) {
		struct part *p;

		next = x->cnext;
		if (x->sqe.user_data != user_data)
			continue;
		p = x->key ? &x->key->parts[x->sqe.part] : NULL;
		switch (x->sqe.op) {
		case KV_OP_INIT:
			if (list_remove(&p->init_waiters, x))
				p->inited[c->rank] = 0;
			else
				list_remove(&c->job->held, x);
			break;
		case KV_OP_PULL:
			if (!list_remove(&p->pulls, x))
				list_remove(&c->job->held, x);
			break;
		default:
			if (p->busy && p->head[c->rank] == x)
				continue; /* being summed: it completes normally */
			queue_remove(p, c->rank, x);
			p->submitted[c->rank]--;
			if (p->queued && p->nready != (uint32_t)c->job->num_workers)
				p->queued = false;
			break;
		}
		complete(e, x, KV_ERR_TIMEOUT, p ? p->rounds_done : 0);
	}
}

static void take(struct engine *e, struct client *c, const struct kv_sqe *s)
{
	struct job *j = c->job;
	struct key *k;
	struct contrib *x;
	size_t bytes;
	uint8_t *in, *out;
	bool bad = false, need_in, need_out;

	if (s->op == KV_OP_CANCEL) {
		do_cancel(e, c, s->user_data);
		return;
	}
	__atomic_add_fetch(&j->inflight, 1, __ATOMIC_RELAXED);
	{
		uint64_t now = __atomic_load_n(&j->inflight, __ATOMIC_RELAXED);
		if (now > __atomic_load_n(&j->peak_inflight, __ATOMIC_RELAXED))
			__atomic_store_n(&j->peak_inflight, now, __ATOMIC_RELAXED);
	}
	x = contrib_new(c, s);
	if (!x) {
		__atomic_sub_fetch(&j->inflight, 1, __ATOMIC_RELAXED);
		post(e, c, s, KV_ERR_NOMEM, 0);
		return;
	}
	if (s->op == KV_OP_NOP || s->op >= KV_OP_MAX) {
		complete(e, x, KV_ERR_INVALID, 0);
		return;
	}
	k = job_key(j, s->key);
	if (!k) {
		complete(e, x, KV_ERR_NOKEY, 0);
		return;
	}
	if (s->dtype != k->dtype || s->count != k->count) {
		complete(e, x, KV_ERR_MISMATCH, 0);
		return;
	}
	if (s->part >= k->nparts || key_direct(k)) { /* direct keys never come through here */
		complete(e, x, KV_ERR_INVALID, 0);
		return;
	}
	x->key = k;
	bytes = part_elems(k, s->part) * k->esize;
	in = resolve(c, &s->in, bytes, &bad);
	out = resolve(c, &s->out, bytes, &bad);
	switch (s->op) {
	case KV_OP_INIT:
		need_in = c->rank == 0;
		need_out = false;
		break;
	case KV_OP_PUSH:
		need_in = true;
		need_out = false;
		break;
	case KV_OP_PULL:
		need_in = false;
		need_out = true;
		break;
	case KV_OP_BCAST:
		need_in = c->rank == 0;
		need_out = false;
		break;
	default: /* PUSHPULL */
		need_in = true;
		need_out = false;
		break;
	}
	/* the kernels need element-aligned buffers, and an output either is the
	 * input (in place) or does not touch it */
	if (in && (uintptr_t)in % k->esize)
		bad = true;
	if (out && (uintptr_t)out % k->esize)
		bad = true;
	if (in && out && in != out && in < out + bytes && out < in + bytes)
		bad = true;
	if (bad || (need_in && !in) || (need_out && !out)) {
		complete(e, x, KV_ERR_INVALID, 0);
		return;
	}
	x->in = in;
	x->out = out;
	if (s->op == KV_OP_BCAST && c->rank != 0)
		x->in = NULL;
	if (!j->complete_once && (s->op == KV_OP_INIT || s->op == KV_OP_PULL)) {
		/* ops start once every rank has joined */
		x->next = NULL;
		struct contrib **pp = &j->held;
		while (*pp)
			pp = &(*pp)->next;
		*pp = x;
		return;
	}
	if (e->shutting_down || j->dropped) {
		complete(e, x, broken_status(e, j), 0);
		return;
	}
	dispatch(e, x);
}

static int poll_client(struct engine *e, struct client *c)
{
	int n = 0;

	if (c->overflow)
		n += flush_overflow(e, c);
	while (n < POLL_BUDGET && !c->broken && c->npending < MAX_PENDING) {
		struct kv_sqe s;
		int rc = ring_pop(&c->sq, &s);

		if (rc == -EAGAIN)
			break;
		if (rc) {
			evict(e->d, c, "submission ring indices are corrupt");
			break;
		}
		take(e, c, &s);
		n++;
	}
	return n;
}

/* ------------------------------------------------------------------ membership */

static void fail_list(struct engine *e, struct contrib **list, int status)
{
	while (*list) {
		struct contrib *x = *list;
		*list = x->next;
		x->next = NULL;
		complete(e, x, status, 0);
	}
}

/*
 * A rank left, the job was dropped, or the daemon is stopping: fail every
 * op that waits for other ranks.  Busy rounds finish; the values stay as of
 * the last completed round.  gone_rank < 0: nobody left (drop, shutdown).
 */
static void job_fail_pending(struct engine *e, struct job *j, int gone_rank, int status)
{
	int n = j->num_workers;

	for (uint32_t id = 0, nk = job_nkeys(j); id < nk; id++) {
		struct key *k = job_key(j, id);
		for (uint32_t pi = 0; pi < k->nparts; pi++) {
			struct part *p = &k->parts[pi];
			for (int r = 0; r < n; r++) {
				struct contrib *x = p->head[r];
				if (x && p->busy) /* the head is in the round on a worker */
					x = x->next;
				while (x) {
					struct contrib *next = x->next;
					queue_remove(p, r, x);
					complete(e, x, status, p->rounds_done);
					x = next;
				}
				p->submitted[r] = p->rounds_done + (p->busy ? 1 : 0);
			}
			p->queued = false;
			set_stall(p, 0);
			/* pulls that wait for a round that will not come */
			for (struct contrib **pp = &p->pulls; *pp;) {
				struct contrib *x = *pp;
				if (x->target > p->rounds_done + (p->busy ? 1 : 0)) {
					*pp = x->next;
					x->next = NULL;
					complete(e, x, status, p->rounds_done);
				} else {
					pp = &x->next;
				}
			}
			if (gone_rank <= 0) {
				for (struct contrib *w = p->init_waiters; w; w = w->next)
					p->inited[w->c->rank] = 0;
				fail_list(e, &p->init_waiters, status);
			}
		}
	}
}

/* Remove every contribution of c that is not in a busy round (c has left). */
static void client_drop_pending(struct engine *e, struct client *c)
{
	struct job *j = c->job;
	struct contrib *x = c->pending, *next;

	for (; x; x = next) {
		struct part *p = x->key ? &x->key->parts[x->sqe.part] : NULL;

		next = x->cnext;
		if (!p) {
			complete(e, x, KV_ERR_PEER, 0);
			continue;
		}
		switch (x->sqe.op) {
		case KV_OP_INIT:
			list_remove(&p->init_waiters, x);
			list_remove(&j->held, x);
			p->inited[c->rank] = 0;
			break;
		case KV_OP_PULL:
			list_remove(&p->pulls, x);
			list_remove(&j->held, x);
			break;
		default:
			if (p->busy && p->head[c->rank] == x)
				continue; /* completes (to nobody) when its round is done */
			queue_remove(p, c->rank, x);
			p->submitted[c->rank] = p->rounds_done + (p->busy ? 1 : 0);
			break;
		}
		complete(e, x, KV_ERR_PEER, p->rounds_done);
	}
}

static void overflow_free(struct client *c)
{
	while (c->overflow) {
		struct overflow *o = c->overflow;
		c->overflow = o->next;
		free(o);
	}
	c->overflow_tail = NULL;
	c->noverflow = 0;
}

/* Free a client that left once no task touches its memory.  The caller then
 * asks job_maybe_free() about its job, once (it may free the job). */
static void client_release(struct engine *e, struct client *c)
{
	overflow_free(c);
	client_free(e->d, c);
}

static void job_maybe_free(struct engine *e, struct job *j)
{
	if (!j->gone || j->busy || j->eng_present)
		return;
	for (struct client *c = e->clients; c; c = c->next)
		if (c->job == j)
			return;
	ready_purge(&e->ready, j);
	while (j->ckpt) {
		struct ckpt_req *r = j->ckpt;
		j->ckpt = r->next;
		r->status = KV_ERR_PEER;
		snprintf(r->why, sizeof(r->why), "the job ended");
		ctl_ckpt_done(e->d, r);
	}
	kvd_log("job '%s' ended", j->name);
	job_free(e->d, j);
}

/* Take or restore the snapshots the job waits for, once no round of it is on a worker. */
static void run_ckpts(struct engine *e, struct job *j)
{
	while (j->ckpt && j->busy == 0) {
		struct ckpt_req *r = j->ckpt;

		j->ckpt = r->next;
		r->next = NULL;
		if (r->load)
			r->status = ckpt_restore(j, r->buf, r->len, r->why, sizeof(r->why));
		else
			r->status = ckpt_snapshot(j, r->dump_spec, &r->buf, &r->len, r->why,
						  sizeof(r->why));
		ctl_ckpt_done(e->d, r);
	}
}

static void start_held(struct engine *e, struct job *j)
{
	struct contrib *x = j->held;

	j->held = NULL;
	while (x) {
		struct contrib *next = x->next;
		x->next = NULL;
		dispatch(e, x);
		x = next;
	}
}

static void on_join(struct engine *e, struct client *c)
{
	struct job *j = c->job;

	c->next = e->clients;
	e->clients = c;
	j->eng_ranks[c->rank] = c;
	j->eng_present++;
	job_board_present(j, c->rank, true);
	if (j->eng_present == j->num_workers && !j->dropped && !e->shutting_down)
		job_board_set(j, KV_BOARD_OK);
	if (j->eng_present == j->num_workers && !j->complete_once) {
		j->complete_once = true;
		start_held(e, j);
	}
	/* the new rank's part queues start empty; submitted counts restart at the part's rounds */
	for (uint32_t id = 0, nk = job_nkeys(j); id < nk; id++) {
		struct key *k = job_key(j, id);
		for (uint32_t pi = 0; pi < k->nparts; pi++) {
			struct part *p = &k->parts[pi];
			p->submitted[c->rank] = p->rounds_done + (p->busy ? 1 : 0);
		}
	}
}

static void on_leave(struct engine *e, struct client *c, bool last)
{
	struct job *j = c->job;

	for (struct client **pp = &e->clients; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	c->next = NULL;
	client_drop_pending(e, c);
	c->left = true;
	/* a process that takes this rank back may init its keys again */
	for (uint32_t id = 0, nk = job_nkeys(j); id < nk; id++) {
		struct key *k = job_key(j, id);
		for (uint32_t pi = 0; pi < k->nparts; pi++)
			k->parts[pi].inited[c->rank] = 0;
	}
	j->eng_ranks[c->rank] = NULL;
	j->eng_present--;
	/* the board's presence byte and the rank's direct-key leftovers were
	 * cleared by the control thread already (before a replacement could join) */
	if (j->complete_once && !j->dropped && !e->shutting_down)
		job_board_set(j, KV_BOARD_BROKEN);
	if (j->complete_once) {
		j->left_once = true;
		j->leave_epoch = __atomic_load_n(&j->board->epoch, __ATOMIC_SEQ_CST);
	}
	if (j->complete_once)
		job_fail_pending(e, j, c->rank, KV_ERR_PEER);
	if (last)
		j->gone = true;
	if (c->refs == 0)
		client_release(e, c);
	job_maybe_free(e, j);
}

static int drain_events(struct engine *e)
{
	struct event *ev;
	int n = 0;

	pthread_mutex_lock(&e->qlock);
	ev = e->ev_head;
	e->ev_head = e->ev_tail = NULL;
	__atomic_store_n(&e->pending_events, 0, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&e->qlock);
	while (ev) {
		struct event *next = ev->next;

		switch (ev->type) {
		case EV_JOIN:
			on_join(e, ev->c);
			break;
		case EV_LEAVE:
			on_leave(e, ev->c, ev->j != NULL);
			break;
		case EV_CKPT:
			ev->req->next = NULL;
			{
				struct ckpt_req **pp = &ev->j->ckpt;
				while (*pp)
					pp = &(*pp)->next;
				*pp = ev->req;
			}
			run_ckpts(e, ev->j);
			break;
		case EV_DROP:
			ev->j->dropped = true;
			job_board_set(ev->j, KV_BOARD_DROPPED);
			job_fail_pending(e, ev->j, -1, KV_ERR_PEER);
			fail_list(e, &ev->j->held, KV_ERR_PEER);
			break;
		case EV_SHUTDOWN:
			e->shutting_down = true;
			for (struct client *c = e->clients; c; c = c->next) {
				if (c->job->board->state != KV_BOARD_DOWN)
					job_board_set(c->job, KV_BOARD_DOWN);
				if (c->job->held)
					fail_list(e, &c->job->held, KV_ERR_DAEMON);
				job_fail_pending(e, c->job, -1, KV_ERR_DAEMON);
			}
			break;
		}
		free(ev);
		ev = next;
		n++;
	}
	return n;
}

/* ------------------------------------------------------------------ the loop */

static bool engine_has_work(struct engine *e)
{
	if (__atomic_load_n(&e->pending_events, __ATOMIC_RELAXED))
		return true;
	pthread_mutex_lock(&e->qlock);
	bool done = e->done != NULL || e->ev_head != NULL;
	pthread_mutex_unlock(&e->qlock);
	if (done || e->ready.n)
		return true;
	for (struct client *c = e->clients; c; c = c->next) {
		if (c->broken)
			continue;
		if (c->npending < MAX_PENDING && ring_ready(&c->sq) != 0)
			return true;
		if (c->overflow && ring_space(&c->cq, 1) > 0)
			return true;
	}
	return false;
}

static void engine_sleep(struct engine *e)
{
	uint64_t v;

	/* queues: the worker or control thread that pushes after our check in
	 * engine_has_work() (under qlock) sees sleeping=1; rings: the seq_cst
	 * handshake of ring_set_sleeping() and the producer's tail store */
	__atomic_store_n(&e->sleeping, 1, __ATOMIC_RELAXED);
	for (struct client *c = e->clients; c; c = c->next)
		ring_set_sleeping(&c->sq, true);
	if (!engine_has_work(e)) {
		bool backlog = false;
		ssize_t n;

		for (struct client *c = e->clients; c; c = c->next)
			backlog |= c->overflow != NULL && !c->broken;
		if (backlog) {
			/* a client holds overflowed completions: it rings the doorbell
			 * when it reaps (the ring's "full" flag), but a client need not
			 * follow that protocol: look again every few milliseconds */
			struct pollfd p = { .fd = e->doorbell, .events = POLLIN };
			if (poll(&p, 1, OVERFLOW_POLL_MS) > 0)
				(void)!read(e->doorbell, &v, sizeof(v));
		} else {
			do
				n = read(e->doorbell, &v, sizeof(v));
			while (n < 0 && errno == EINTR);
		}
	}
	__atomic_store_n(&e->sleeping, 0, __ATOMIC_RELAXED);
	for (struct client *c = e->clients; c; c = c->next)
		ring_set_sleeping(&c->sq, false);
}

static void *engine_main(void *arg)
{
	struct engine *e = arg;
	uint64_t last_work = kvd_now_ns();
	unsigned spins = 0;

	while (!e->exit_now) {
		int work = drain_events(e);

		work += drain_done(e);
		for (struct client *c = e->clients; c; c = c->next)
			work += poll_client(e, c);
		work += run_ready(e);
		if (e->shutting_down && e->tasks_out == 0) {
			/* every round in flight is done; what is left fails */
			for (struct client *c = e->clients; c; c = c->next)
				job_fail_pending(e, c->job, -1, KV_ERR_DAEMON);
			break;
		}
		if (work) {
			spins = 0;
			last_work = 0;
			continue;
		}
		if ((++spins & 63) == 0 || !last_work) {
			uint64_t now = kvd_now_ns();
			if (!last_work)
				last_work = now;
			else if (now - last_work > SPIN_NS || e->tasks_out) {
				/* with rounds on the workers, leave them the CPU */
				engine_sleep(e);
				last_work = 0;
				spins = 0;
				continue;
			}
		}
		cpu_relax();
	}
	return NULL;
}

/* ------------------------------------------------------------------ api */

void engine_post(struct kvd *d, enum ev_type t, struct client *c, struct job *j)
{
	struct engine *e = d->eng;
	struct event *ev = calloc(1, sizeof(*ev));
	uint64_t one = 1;

	if (!ev) {
		kvd_log("out of memory posting an event; aborting");
		abort();
	}
	ev->type = t;
	ev->c = c;
	ev->j = j;
	pthread_mutex_lock(&e->qlock);
	if (e->ev_tail)
		e->ev_tail->next = ev;
	else
		e->ev_head = ev;
	e->ev_tail = ev;
	__atomic_store_n(&e->pending_events, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&e->qlock);
	(void)!write(e->doorbell, &one, sizeof(one));
}

void engine_ckpt(struct kvd *d, struct ckpt_req *req)
{
	struct engine *e = d->eng;
	struct event *ev = calloc(1, sizeof(*ev));
	uint64_t one = 1;

	if (!ev) {
		req->status = KV_ERR_NOMEM;
		snprintf(req->why, sizeof(req->why), "out of memory");
		ctl_ckpt_done(d, req);
		return;
	}
	ev->type = EV_CKPT;
	ev->j = req->job;
	ev->req = req;
	pthread_mutex_lock(&e->qlock);
	if (e->ev_tail)
		e->ev_tail->next = ev;
	else
		e->ev_head = ev;
	e->ev_tail = ev;
	__atomic_store_n(&e->pending_events, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&e->qlock);
	(void)!write(e->doorbell, &one, sizeof(one));
}

void engine_free_all(struct kvd *d)
{
	struct engine *e = d->eng;

	while (e->clients) {
		struct client *c = e->clients;
		struct job *j = c->job;

		e->clients = c->next;
		while (c->pending) {
			struct contrib *x = c->pending;
			contrib_unlink(x);
			free(x);
		}
		overflow_free(c);
		client_free(d, c);
		if (--j->eng_present == 0)
			job_free(d, j);
	}
	free(e->ready.v);
	close(e->doorbell);
	free(e->workers);
	free(e);
	d->eng = NULL;
}

int engine_doorbell(struct kvd *d)
{
	return d->eng->doorbell;
}

int engine_start(struct kvd *d)
{
	struct engine *e = calloc(1, sizeof(*e));
	int err;

	if (!e)
		return -ENOMEM;
	e->d = d;
	if (getenv("KVD_FAULT_KILL_AFTER_ROUND"))
		e->kill_after = strtoull(getenv("KVD_FAULT_KILL_AFTER_ROUND"), NULL, 10);
	e->doorbell = eventfd(0, EFD_CLOEXEC);
	if (e->doorbell < 0) {
		err = -errno;
		free(e);
		return err;
	}
	pthread_mutex_init(&e->qlock, NULL);
	pthread_mutex_init(&e->plock, NULL);
	pthread_cond_init(&e->pcond, NULL);
	d->eng = e;
	e->nworkers = d->cfg.threads;
	e->workers = calloc((size_t)(e->nworkers ? e->nworkers : 1), sizeof(pthread_t));
	for (int i = 0; i < e->nworkers; i++) {
		err = pthread_create(&e->workers[i], NULL, worker_main, e);
		if (err) {
			e->nworkers = i;
			return -err;
		}
	}
	err = pthread_create(&e->thread, NULL, engine_main, e);
	return -err;
}

void engine_stop(struct kvd *d)
{
	struct engine *e = d->eng;

	pthread_join(e->thread, NULL);
	pthread_mutex_lock(&e->plock);
	e->stop_workers = true;
	pthread_cond_broadcast(&e->pcond);
	pthread_mutex_unlock(&e->plock);
	for (int i = 0; i < e->nworkers; i++)
		pthread_join(e->workers[i], NULL);
}
