/* SPDX-License-Identifier: MIT */
/*
 * direct.c - direct rounds: the ranks of a job reduce small keys themselves,
 * in shared memory, without a hop through kvd.
 *
 * A direct key has a block in a segment every rank of the job maps (see
 * struct kv_dkey in shm/layout.h): one slot per rank and two result buffers.
 * A rank copies its contribution into its slot, then arrives under the
 * key's lock; the rank that arrives last sums the slots into the spare
 * result buffer and publishes the round by bumping `done` (a futex word),
 * waking sleepers.  Every rank then copies the result out.
 *
 * Invariants:
 *  - a rank arrives at round r+1 on a key only after it finished round r
 *    (waited and copied out), so a slot is never overwritten while a summer
 *    reads it, and the spare result buffer is never one somebody still reads;
 *  - result[done & 1] is the key's value; a summer writes only the other
 *    buffer, so a rank dying mid-sum leaves the last completed value intact;
 *  - kvd alone moves the board's state; every wait re-checks it, so a rank
 *    that leaves or dies fails the others' waits (KV_ERR_PEER), and a dead
 *    rank's lock and init flag are released by kvd;
 *  - arrivals carry the board epoch: a round left half-open by a rank that
 *    died is discarded by the first arrival after the job is whole again.
 * Nothing read from the shared block is trusted for geometry: offsets come
 * from this rank's own copy of num_workers and the key's size.
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

#include "local_int.h"
#include "../kernels/gpu.h"
#include "../kernels/reduce.h"
#include "../shm/futex.h"
#include "../shm/seg.h"

#define DIRECT_SPIN_NS 40000 /* spin this long for a round before sleeping */
#define LOCK_YIELD 256       /* spins on a held key lock before yielding the CPU */

int direct_map(struct local *l, struct lkey *k, uint32_t dseg, uint64_t doff, uint64_t dsize,
	       int fd, char *err)
{
	uint32_t n = (uint32_t)l->o.num_workers;
	uint64_t bytes = k->count * kv_dtype_size(k->dtype);
	uint8_t *base;

	if (dseg >= 65536 || doff > dsize || kv_dkey_size(n, bytes) > dsize - doff) {
		if (fd >= 0)
			close(fd);
		return fail(err, KV_ERR_PROTO, "kvd placed a direct key outside its segment");
	}
	if (dseg >= l->ndsegs) {
		struct lseg *ns = realloc(l->dsegs, (dseg + 1) * sizeof(*ns));
		if (!ns) {
			if (fd >= 0)
				close(fd);
			return fail(err, KV_ERR_NOMEM, "out of memory");
		}
		memset(ns + l->ndsegs, 0, (dseg + 1 - l->ndsegs) * sizeof(*ns));
		for (uint32_t i = l->ndsegs; i <= dseg; i++)
			ns[i].fd = -1;
		l->dsegs = ns;
		l->ndsegs = dseg + 1;
	}
	if (!l->dsegs[dseg].base) {
		void *p;
		int rc;

		if (fd < 0)
			return fail(err, KV_ERR_PROTO, "kvd sent a direct key without its segment");
		rc = seg_map(fd, dsize, 0, &p);
		if (rc) {
			close(fd);
			return fail(err, KV_ERR_PROTO, "cannot map a direct segment: %s",
				    strerror(-rc));
		}
		if (l->gpu)
			gpu_host_register(p, dsize); /* GPU tensors copy straight into slots */
		l->dsegs[dseg] = (struct lseg){ fd, p, dsize };
	} else {
		if (fd >= 0)
			close(fd);
		if (l->dsegs[dseg].size != dsize)
			return fail(err, KV_ERR_PROTO, "kvd changed a direct segment's size");
	}
	base = (uint8_t *)l->dsegs[dseg].base + doff;
	k->dk = (struct kv_dkey *)base;
	k->inited = base + kv_dkey_inited_off();
	k->arrived_at = (uint32_t *)(base + kv_dkey_arrived_off(n));
	k->kinds = base + kv_dkey_kinds_off(n);
	k->slots = base + kv_dkey_slot_off(n, bytes, 0);
	k->results = base + kv_dkey_result_off(n, bytes, 0);
	k->stride = kv_dkey_stride(bytes);
	/* a fresh store arrives after the rounds completed before it joined */
	k->target = __atomic_load_n(&k->dk->done, __ATOMIC_ACQUIRE);
	return 0;
}

bool direct_moved(struct lkey *k)
{
	if (!k->dk || !__atomic_load_n(&k->dk->moved, __ATOMIC_ACQUIRE))
		return false;
	k->dk = NULL; /* kvd serves it now: the engine path, same key id */
	return true;
}

void direct_unmap(struct local *l)
{
	for (uint32_t i = 0; i < l->ndsegs; i++) {
		if (l->dsegs[i].base && l->gpu)
			gpu_host_unregister(l->dsegs[i].base);
		if (l->dsegs[i].base)
			seg_unmap(l->dsegs[i].base, l->dsegs[i].size);
		if (l->dsegs[i].fd >= 0)
			close(l->dsegs[i].fd);
	}
	free(l->dsegs);
	l->dsegs = NULL;
	l->ndsegs = 0;
}

/*
 * KV_OK while the job can run rounds (or, broken_ok, has run them: a rank
 * left); waits (bounded) while ranks are still joining.
 */
static int board_wait(struct local *l, int64_t deadline, bool broken_ok, char *err)
{
	for (;;) {
		uint32_t epoch = __atomic_load_n(&l->board->epoch, __ATOMIC_SEQ_CST);
		uint32_t st = __atomic_load_n(&l->board->state, __ATOMIC_SEQ_CST);
		int slice = 100;

		switch (st) {
		case KV_BOARD_OK:
			return KV_OK;
		case KV_BOARD_BROKEN:
			if (broken_ok)
				return KV_OK;
			return fail(err, KV_ERR_PEER,
				    "a rank of job '%s' left or died while this op needed it",
				    l->o.job);
		case KV_BOARD_DROPPED:
			mark_dead(l, KV_ERR_PEER, "the job was dropped by an operator");
			return fail(err, KV_ERR_PEER, "job '%s' was dropped", l->o.job);
		case KV_BOARD_DOWN:
			mark_dead(l, KV_ERR_DAEMON, "kvd is stopping");
			return fail(err, KV_ERR_DAEMON, "kvd stopped before the op completed");
		case KV_BOARD_JOINING:
			break;
		default:
			return fail(err, KV_ERR_PROTO, "the job board is corrupt (state %u)", st);
		}
		/* not every rank has joined yet: ops wait (bounded by timeout_ms) */
		check_daemon(l);
		if (l->dead)
			return fail(err, l->dead_code, "%s", l->dead_why);
		if (deadline) {
			int64_t left = deadline - now_ms();
			if (left <= 0)
				return fail(err, KV_ERR_TIMEOUT,
					    "not every rank of job '%s' joined within %d ms",
					    l->o.job, l->o.timeout_ms);
			slice = left < slice ? (int)left : slice;
		}
		pthread_mutex_unlock(&l->lock);
		futex_wait(&l->board->epoch, epoch, slice);
		pthread_mutex_lock(&l->lock);
	}
}

static int board_ok(struct local *l, int64_t deadline, char *err)
{
	return board_wait(l, deadline, false, err);
}

/*
 * Take a key's lock.  It is held only for a few instructions, but its holder
 * may be descheduled (yield to it) or dead (kvd frees a dead rank's lock), so
 * only a stopped kvd, a dropped job or the deadline end the wait.
 */
static int key_lock(struct local *l, struct kv_dkey *dk, int64_t deadline, char *err)
{
	uint32_t me = (uint32_t)l->o.rank + 1;

	for (unsigned i = 1;; i++) {
		uint32_t free_ = 0, st;

		if (__atomic_compare_exchange_n(&dk->lock, &free_, me, false, __ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			return KV_OK;
		cpu_relax();
		if (i % LOCK_YIELD)
			continue;
		st = __atomic_load_n(&l->board->state, __ATOMIC_ACQUIRE);
		if (st == KV_BOARD_DROPPED || st == KV_BOARD_DOWN)
			return board_ok(l, deadline, err);
		if (i % (LOCK_YIELD * 64) == 0) {
			check_daemon(l);
			/* a holder is a rank: with kvd gone (it frees a dead rank's
			 * lock) give it a second, which no live holder needs */
			if (l->dead && (!l->lost || now_ms() - l->lost_ms > 1000))
				return fail(err, l->dead_code, "%s", l->dead_why);
		}
		if (deadline && now_ms() >= deadline)
			return fail(err, KV_ERR_TIMEOUT, "a key stayed locked for %d ms",
				    l->o.timeout_ms);
		sched_yield();
	}
}

static void key_unlock(struct kv_dkey *dk)
{
	__atomic_store_n(&dk->lock, 0, __ATOMIC_RELEASE);
}

static uint8_t *slot(struct lkey *k, uint32_t r)
{
	return k->slots + (size_t)r * k->stride;
}

static uint8_t *result(struct lkey *k, uint32_t round)
{
	return k->results + (size_t)(round & 1) * k->stride;
}

/*
 * The last arrival sums round done+1 into the spare buffer and publishes it.
 * kind was read under the lock with the arrivals; nobody else touches the
 * open round until done moves.
 */
static void summer(struct local *l, struct lkey *k, uint32_t done, uint32_t kind)
{
	struct kv_dkey *dk = k->dk;
	uint32_t n = (uint32_t)l->o.num_workers;
	size_t bytes = k->count * kv_dtype_size(k->dtype);
	void *dst = result(k, done + 1);
	int status = KV_OK;

	if (kind == KV_DK_SUM) {
		const void *ins[REDUCE_MAX_INPUTS];
		uint32_t first = n < REDUCE_MAX_INPUTS ? n : REDUCE_MAX_INPUTS;

		for (uint32_t r = 0; r < first; r++)
			ins[r] = slot(k, r);
		reduce_sum(REDUCE_CPU, NULL, k->dtype, &dst, 1, ins, (int)first, k->count);
		for (uint32_t r = first; r < n; r += REDUCE_MAX_INPUTS - 1) {
			uint32_t m = n - r < REDUCE_MAX_INPUTS - 1 ? n - r : REDUCE_MAX_INPUTS - 1;
			ins[0] = dst;
			for (uint32_t i = 0; i < m; i++)
				ins[i + 1] = slot(k, r + i);
			reduce_sum(REDUCE_CPU, NULL, k->dtype, &dst, 1, ins, (int)m + 1, k->count);
		}
	} else if (kind == KV_DK_BCAST) {
		memcpy(dst, slot(k, 0), bytes);
	} else {
		/* ranks disagreed on the op: the round fails, the value stays */
		memcpy(dst, result(k, done), bytes);
		status = KV_ERR_MISMATCH;
	}
	dk->status = status;
	dk->arrived = 0;
	dk->kind = KV_DK_NONE;
	dk->summer = 0;
	memset(k->kinds, KV_DK_NONE, n);
	if (status == KV_OK) {
		struct kv_board_lat *lat =
			(struct kv_board_lat *)((uint8_t *)l->board + KV_BOARD_LAT_OFF);
		uint64_t dt = now_ns() - __atomic_load_n(&dk->since_ns, __ATOMIC_RELAXED);

		__atomic_add_fetch(&l->board->rounds, 1, __ATOMIC_RELAXED);
		__atomic_add_fetch(&l->board->bytes, bytes, __ATOMIC_RELAXED);
		__atomic_add_fetch(&lat->bucket[kv_lat_bucket(dt)], 1, __ATOMIC_RELAXED);
		__atomic_add_fetch(&lat->sum_ns, dt, __ATOMIC_RELAXED);
		__atomic_add_fetch(&lat->count, 1, __ATOMIC_RELAXED);
		if (!__atomic_load_n(&dk->has_value, __ATOMIC_RELAXED))
			__atomic_store_n(&dk->has_value, 1, __ATOMIC_RELEASE);
	}
	/* publishes the result and status above; seq_cst for the waiters handshake */
	__atomic_store_n(&dk->done, done + 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&dk->waiters, __ATOMIC_SEQ_CST))
		futex_wake(&dk->done, INT32_MAX);
}

static bool reached(uint32_t done, uint32_t target)
{
	return (int32_t)(done - target) >= 0;
}

static bool rank_present(struct local *l, uint32_t r)
{
	const uint8_t *p = (const uint8_t *)l->board + KV_BOARD_PRESENT_OFF;

	return r < (uint32_t)l->o.num_workers && __atomic_load_n(&p[r], __ATOMIC_SEQ_CST) != 0;
}

#define ROUND_RUNNING 1 /* round_fate: every rank arrived and the summer is alive */

static const char *kind_name(uint32_t kind)
{
	return kind == KV_DK_BCAST ? "broadcast" : "a sum (push or pushpull)";
}

/* Did rank 0 refuse this rank's arrival (its op differs from rank 0's)? */
static bool ejected(struct local *l, struct lkey *k)
{
	return __atomic_load_n(&k->kinds[l->o.rank], __ATOMIC_ACQUIRE) == KV_DK_MISMATCH;
}

/* This rank's arrival at round target was refused: forget it, report it. */
static int fail_mismatch(struct local *l, struct lkey *k, uint32_t target, char *err)
{
	__atomic_store_n(&k->kinds[l->o.rank], KV_DK_NONE, __ATOMIC_RELAXED);
	k->target = target - 1;
	return fail(err, KV_ERR_MISMATCH,
		    "rank 0 runs another op on key '%s' in this round; the round stays open "
		    "for the same op as rank 0's",
		    k->name);
}

/*
 * The job changed (a rank left, or left and was replaced) while this rank
 * waited in round target, which it arrived at under epoch: decide, under
 * the key's lock, what became of the round.  Completed: KV_OK.  Every rank
 * arrived and the rank summing it is alive: ROUND_RUNNING (keep waiting).
 * Otherwise the round cannot complete: this rank's arrival is taken back
 * (so an op reported failed was never applied) and the error is returned.
 */
static int round_fate(struct local *l, struct lkey *k, uint32_t target, uint32_t epoch,
		      int fail_code, char *err)
{
	struct kv_dkey *dk = k->dk;
	uint32_t n = (uint32_t)l->o.num_workers;
	int rc = key_lock(l, dk, 0, err);

	if (rc)
		return rc;
	if (reached(__atomic_load_n(&dk->done, __ATOMIC_ACQUIRE), target)) {
		key_unlock(dk);
		return KV_OK;
	}
	if (ejected(l, k)) { /* its arrival was taken back already */
		key_unlock(dk);
		return fail_mismatch(l, k, target, err);
	}
	if (dk->epoch == epoch && dk->arrived == n) {
		uint32_t s = dk->summer;
		key_unlock(dk);
		if (s && rank_present(l, s - 1))
			return ROUND_RUNNING;
		return fail(err, KV_ERR_PEER, "the rank summing this round of key '%s' died",
			    k->name);
	}
	if (dk->epoch == epoch && dk->arrived > 0) {
		dk->arrived--;
		if (dk->arrived == 0)
			dk->kind = KV_DK_NONE;
		k->kinds[l->o.rank] = KV_DK_NONE;
	}
	key_unlock(dk);
	k->target = target - 1;
	return fail_code;
}

/*
 * Wait for round target.  When the job changes, or the deadline passes, the
 * round's fate decides (round_fate): a retry after a failure then joins a
 * clean round.
 */
static int wait_round(struct local *l, struct lkey *k, uint32_t target, uint32_t epoch,
		      int64_t deadline, char *err)
{
	struct kv_dkey *dk = k->dk;
	uint64_t spin_until = now_ns() + DIRECT_SPIN_NS;

	for (;;) {
		uint32_t done = __atomic_load_n(&dk->done, __ATOMIC_SEQ_CST), st;
		int rc, slice = 100;

		if (reached(done, target))
			return KV_OK;
		if (ejected(l, k)) {
			/* rank 0 refused this arrival: confirm under the lock */
			rc = key_lock(l, dk, 0, err);
			if (rc)
				return rc;
			if (ejected(l, k)) {
				key_unlock(dk);
				return fail_mismatch(l, k, target, err);
			}
			key_unlock(dk); /* a newer epoch voided every arrival: see below */
		}
		/* spin on the round alone; the board is looked at when the spin ends */
		if (now_ns() < spin_until) {
			if (l->crowded)
				sched_yield();
			else
				cpu_relax();
			continue;
		}
		st = __atomic_load_n(&l->board->state, __ATOMIC_SEQ_CST);
		if (st != KV_BOARD_OK ||
		    __atomic_load_n(&l->board->epoch, __ATOMIC_SEQ_CST) != epoch) {
			int code = board_ok(l, 0, err);
			if (!code && l->restarts != k->arrived_in)
				/* the job changed because kvd restarted (this store
				 * came back meanwhile, for another op), not a rank */
				code = fail(err, KV_ERR_DAEMON,
					    "kvd restarted while this op waited; call it again");
			else if (!code)
				code = fail(err, KV_ERR_PEER,
					    "a rank of job '%s' left or died while this op needed it",
					    l->o.job);
			rc = round_fate(l, k, target, epoch, code, err);
			if (rc != ROUND_RUNNING)
				return rc;
		}
		if (deadline) {
			int64_t left = deadline - now_ms();
			if (left <= 0) {
				rc = round_fate(l, k, target, epoch,
						fail(err, KV_ERR_TIMEOUT,
						     "no round completed within %d ms (are all ranks "
						     "of job '%s' running this op?)",
						     l->o.timeout_ms, l->o.job),
						err);
				if (rc != ROUND_RUNNING)
					return rc;
				left = 100; /* the round is being summed: it ends soon */
			}
			slice = left < slice ? (int)left : slice;
		}
		/* sleep: count ourselves in, then re-check (pairs with summer()) */
		__atomic_add_fetch(&dk->waiters, 1, __ATOMIC_SEQ_CST);
		done = __atomic_load_n(&dk->done, __ATOMIC_SEQ_CST);
		if (!reached(done, target)) {
			pthread_mutex_unlock(&l->lock);
			rc = futex_wait(&dk->done, done, slice);
			pthread_mutex_lock(&l->lock);
			if (rc == -ETIMEDOUT)
				check_daemon(l);
		}
		__atomic_sub_fetch(&dk->waiters, 1, __ATOMIC_SEQ_CST);
		if (l->dead && l->lost) {
			/* kvd went away: the ranks can finish a round that every rank
			 * arrived at; otherwise take the arrival back, so the call,
			 * repeated once kvd is back, joins the same round */
			rc = round_fate(l, k, target, epoch,
					fail(err, l->dead_code, "%s", l->dead_why), err);
			if (rc != ROUND_RUNNING)
				return rc;
		} else if (l->dead) {
			return fail(err, l->dead_code, "%s", l->dead_why);
		}
	}
}

/* Finish an op that arrived: wait for its round and copy the result out. */
int direct_finish(struct local *l, struct lop *op, char *err)
{
	struct lkey *k = op->key;
	int64_t deadline = l->o.timeout_ms > 0 ? now_ms() + l->o.timeout_ms : 0;
	int rc;

	if (!op->arrived)
		return op->status;
	rc = wait_round(l, k, op->target, op->epoch, deadline, err);
	if (rc == KV_OK) {
		rc = k->dk->status; /* stable: the next round needs this rank */
		if (rc == KV_ERR_MISMATCH)
			fail(err, rc, "the ranks ran different ops on key '%s' in one round",
			     k->name);
		else if (rc == KV_OK)
			for (int i = 0; i < op->nout && rc == KV_OK; i++)
				rc = buf_copy(l, op->outs[i], result(k, op->target),
					      k->count * op->esize, is_dev(l, op->outs[i]));
	}
	op->arrived = false;
	op->status = rc;
	op->done = true;
	if (k->last == op)
		k->last = NULL;
	return rc;
}

/* Wait while ranks are still joining; OK once the job was whole (even if a rank left since). */
static int board_joined(struct local *l, int64_t deadline, char *err)
{
	/* one read of the state decides: OK may turn BROKEN at any moment */
	return board_wait(l, deadline, true, err);
}

static bool rank0_present(struct local *l)
{
	const uint8_t *p = (const uint8_t *)l->board + KV_BOARD_PRESENT_OFF;

	return __atomic_load_n(&p[0], __ATOMIC_SEQ_CST) != 0;
}

/*
 * init is not a round: rank 0 stores its value, the others wait for it; it
 * needs no rank but rank 0, so it works while another rank is away.
 */
static int init_op(struct local *l, struct lkey *k, const void *value, int64_t deadline,
		   char *err)
{
	struct kv_dkey *dk = k->dk;
	uint32_t r = (uint32_t)l->o.rank;
	int rc;

	rc = board_joined(l, deadline, err);
	if (rc)
		return rc;
	rc = key_lock(l, dk, deadline, err);
	if (rc)
		return rc;
	if (k->inited[r]) {
		key_unlock(dk);
		return fail(err, KV_ERR_EXISTS, "this rank already initialised key '%s'", k->name);
	}
	k->inited[r] = 1;
	if (__atomic_load_n(&dk->has_value, __ATOMIC_ACQUIRE)) {
		/* a value is stored already (rank 0, a broadcast, or before a restart) */
		key_unlock(dk);
		return KV_OK;
	}
	if (r == 0) {
		uint32_t done = __atomic_load_n(&dk->done, __ATOMIC_ACQUIRE);
		rc = buf_copy(l, result(k, done), value, k->count * kv_dtype_size(k->dtype),
			      is_dev(l, value));
		if (rc) {
			k->inited[r] = 0;
			key_unlock(dk);
			return fail(err, rc, "cannot read the init value (GPU copy failed?)");
		}
		__atomic_store_n(&dk->has_value, 1, __ATOMIC_SEQ_CST);
		key_unlock(dk);
		futex_wake(&dk->has_value, INT32_MAX);
		return KV_OK;
	}
	key_unlock(dk);
	/* the other ranks' init returns once rank 0's value is stored */
	for (;;) {
		if (__atomic_load_n(&dk->has_value, __ATOMIC_SEQ_CST))
			return KV_OK;
		rc = board_joined(l, deadline, err);
		if (!rc && !rank0_present(l))
			rc = fail(err, KV_ERR_PEER, "rank 0 of job '%s' left before it initialised "
				  "key '%s'", l->o.job, k->name);
		if (!rc && deadline && now_ms() >= deadline)
			rc = fail(err, KV_ERR_TIMEOUT,
				  "rank 0 did not initialise key '%s' within %d ms", k->name,
				  l->o.timeout_ms);
		if (rc) {
			if (key_lock(l, dk, 0, NULL) == KV_OK) {
				k->inited[r] = 0; /* so a retry is not a second init */
				key_unlock(dk);
			}
			return rc;
		}
		pthread_mutex_unlock(&l->lock);
		futex_wait(&dk->has_value, 0, 100);
		pthread_mutex_lock(&l->lock);
		check_daemon(l);
		if (l->dead)
			return fail(err, l->dead_code, "%s", l->dead_why);
	}
}

int direct_op(struct local *l, uint8_t opc, struct lkey *k, struct lop *op,
	      const void *const *srcs, int nsrc, char *err)
{
	struct kv_dkey *dk = k->dk;
	uint32_t r = (uint32_t)l->o.rank, n = (uint32_t)l->o.num_workers, kind, done;
	int64_t deadline = l->o.timeout_ms > 0 ? now_ms() + l->o.timeout_ms : 0;
	size_t bytes = k->count * kv_dtype_size(k->dtype);
	bool last;
	int rc;

	/* this rank's previous op on the key finishes first (see the invariants) */
	if (k->last) {
		struct lop *prev = k->last;
		char discard[KV_ERRLEN];
		rc = direct_finish(l, prev, prev->async ? discard : err);
		if (rc && !prev->async)
			return rc;
	}
	op->key = k;
	op->esize = kv_dtype_size(k->dtype);
	k->used_direct = true;
	if (opc == KV_OP_INIT)
		return init_op(l, k, srcs ? srcs[0] : NULL, deadline, err);
	if (opc == KV_OP_PULL) {
		if (!__atomic_load_n(&dk->has_value, __ATOMIC_ACQUIRE))
			return fail(err, KV_ERR_NOKEY, "key '%s' holds no value yet", k->name);
		/* no round can complete without this rank: the value is stable */
		done = __atomic_load_n(&dk->done, __ATOMIC_ACQUIRE);
		for (int i = 0; i < op->nout; i++) {
			rc = buf_copy(l, op->outs[i], result(k, done), bytes, is_dev(l, op->outs[i]));
			if (rc)
				return fail(err, rc, "cannot write the result (GPU copy failed?)");
		}
		return KV_OK;
	}

	kind = opc == KV_OP_BCAST ? KV_DK_BCAST : KV_DK_SUM;
	if (kind == KV_DK_SUM || r == 0) {
		bool dev = false;
		for (int i = 0; i < nsrc; i++)
			dev |= is_dev(l, srcs[i]);
		if (nsrc == 1) {
			rc = buf_copy(l, slot(k, r), srcs[0], bytes, dev);
		} else if (!dev) {
			void *dst = slot(k, r);
			rc = reduce_sum(REDUCE_CPU, NULL, k->dtype, &dst, 1, srcs, nsrc, k->count);
		} else {
			/* several buffers, some on GPUs: each to the slot's neighbour, sum */
			uint8_t *tmp = malloc(bytes * (size_t)nsrc);
			const void *ps[REDUCE_MAX_INPUTS];
			void *dst = slot(k, r);
			rc = tmp ? 0 : KV_ERR_NOMEM;
			for (int i = 0; i < nsrc && !rc; i++) {
				rc = buf_copy(l, tmp + (size_t)i * bytes, srcs[i], bytes,
					      is_dev(l, srcs[i]));
				ps[i] = tmp + (size_t)i * bytes;
			}
			if (!rc)
				rc = reduce_sum(REDUCE_CPU, NULL, k->dtype, &dst, 1, ps, nsrc,
						k->count);
			free(tmp);
		}
		if (rc)
			return fail(err, rc, "cannot read the op's input (GPU copy failed?)");
	}
	rc = board_ok(l, deadline, err);
	if (rc)
		return rc;
	rc = key_lock(l, dk, deadline, err);
	if (rc)
		return rc;
	if (__atomic_load_n(&l->board->state, __ATOMIC_ACQUIRE) != KV_BOARD_OK) {
		/* the job changed between the check and the lock: report how */
		key_unlock(dk);
		rc = board_ok(l, deadline, err);
		return rc ? rc : fail(err, KV_ERR_PEER, "a rank of job '%s' left", l->o.job);
	}
	if (dk->epoch != __atomic_load_n(&l->board->epoch, __ATOMIC_ACQUIRE)) {
		/* arrivals from before a rank left are void */
		dk->arrived = 0;
		dk->kind = KV_DK_NONE;
		memset(k->kinds, KV_DK_NONE, n);
		dk->epoch = __atomic_load_n(&l->board->epoch, __ATOMIC_ACQUIRE);
	}
	done = __atomic_load_n(&dk->done, __ATOMIC_ACQUIRE);
	/* rank 0's op decides the round (see kv_dkey_kinds_off) */
	if (r != 0 && k->kinds[0] != KV_DK_NONE && k->kinds[0] != kind) {
		uint32_t k0 = k->kinds[0];
		key_unlock(dk);
		return fail(err, KV_ERR_MISMATCH,
			    "rank 0 runs %s on key '%s' in this round, this rank %s; the round "
			    "stays open for the same op as rank 0's",
			    kind_name(k0), k->name, kind_name(kind));
	}
	if (r == 0 && dk->arrived) {
		bool refused = false;
		for (uint32_t q = 1; q < n; q++)
			if (k->kinds[q] != KV_DK_NONE && k->kinds[q] != KV_DK_MISMATCH &&
			    k->kinds[q] != kind) { /* MISMATCH: refused already */
				__atomic_store_n(&k->kinds[q], KV_DK_MISMATCH, __ATOMIC_RELEASE);
				__atomic_store_n(&k->arrived_at[q], done, __ATOMIC_RELAXED);
				dk->arrived--;
				refused = true;
			}
		if (refused && __atomic_load_n(&dk->waiters, __ATOMIC_SEQ_CST))
			futex_wake(&dk->done, INT32_MAX); /* they look at their kinds[] */
	}
	if (dk->arrived == 0 || r == 0) {
		if (dk->arrived == 0)
			__atomic_store_n(&dk->since_ns, now_ns(), __ATOMIC_RELAXED); /* kvctl */
		dk->kind = kind;
	}
	k->kinds[r] = (uint8_t)kind;
	__atomic_store_n(&k->arrived_at[r], done + 1, __ATOMIC_RELAXED); /* for kvctl */
	last = ++dk->arrived == n;
	kind = dk->kind;
	if (last)
		dk->summer = r + 1;
	op->epoch = dk->epoch;
	key_unlock(dk);

	op->target = done + 1;
	op->arrived = true;
	k->target = op->target;
	k->arrived_in = l->restarts;
	k->last = op;
	if (last)
		summer(l, k, done, kind);
	if (op->async)
		return KV_OK;
	return direct_finish(l, op, err);
}
