/* SPDX-License-Identifier: MIT */
/*
 * ring.c - the SPSC ring shared by kvd and a client.
 *
 * Ordering, as io_uring documents it for its SQ and CQ:
 *  - the producer writes an entry, then store-releases the tail; the consumer
 *    load-acquires the tail, then reads the entries below it;
 *  - the consumer copies an entry out, then store-releases the head; the
 *    producer load-acquires the head before it reuses the slots below it.
 * Sleeping is the Dekker pattern: the consumer bumps the sleeping count then
 * loads the tail; the producer stores the tail then loads the sleeping count.
 * All four are sequentially consistent (on x86 the stores are locked
 * instructions, i.e. the full fence the pattern needs), so at least one side
 * sees the other's store and no wake-up is lost.
 */
#include "ring.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "futex.h"

void ring_attach(struct ring *r, struct kv_ring_ctl *ctl, void *entries, uint32_t n,
		 uint32_t esize, bool producer)
{
	r->ctl = ctl;
	r->entries = entries;
	r->mask = n - 1;
	r->esize = esize;
	if (producer) {
		r->local = __atomic_load_n(&ctl->tail, __ATOMIC_ACQUIRE);
		r->cached = r->local;
	} else {
		r->local = __atomic_load_n(&ctl->head, __ATOMIC_ACQUIRE);
		r->cached = r->local;
	}
}

void ring_ctl_reset(struct kv_ring_ctl *ctl, uint32_t start)
{
	__atomic_store_n(&ctl->head, start, __ATOMIC_RELAXED);
	__atomic_store_n(&ctl->sleeping, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&ctl->tail, start, __ATOMIC_RELEASE);
}

int ring_push(struct ring *r, const void *entry)
{
	uint32_t used = r->local - r->cached;

	if (used > r->mask) {
		/* pairs with the consumer's store-release of head in ring_pop */
		r->cached = __atomic_load_n(&r->ctl->head, __ATOMIC_ACQUIRE);
		used = r->local - r->cached;
		if (used > r->mask + 1)
			return -EPROTO; /* head ran past our tail */
		if (used == r->mask + 1)
			return -EAGAIN;
	}
	memcpy(r->entries + (size_t)(r->local & r->mask) * r->esize, entry, r->esize);
	r->local++;
	/* publishes the entry written above (pairs with the consumer's load of
	 * tail); seq_cst as the producer's half of the sleeping handshake */
	__atomic_store_n(&r->ctl->tail, r->local, __ATOMIC_SEQ_CST);
	return 0;
}

int ring_space(struct ring *r, uint32_t want)
{
	uint32_t used = r->local - r->cached;

	if (used <= r->mask + 1 && r->mask + 1 - used >= want)
		return (int)(r->mask + 1 - used);
	/* pairs with the consumer's store of head in ring_pop (seq_cst: the
	 * producer's half of the "full" handshake) */
	r->cached = __atomic_load_n(&r->ctl->head, __ATOMIC_SEQ_CST);
	used = r->local - r->cached;
	if (used > r->mask + 1)
		return -EPROTO;
	return (int)(r->mask + 1 - used);
}

int ring_ready(struct ring *r)
{
	uint32_t avail = r->cached - r->local;

	if (avail == 0) {
		/* pairs with the producer's store of tail in ring_push; seq_cst as the
		 * consumer's half of the sleeping handshake (a plain load on x86) */
		r->cached = __atomic_load_n(&r->ctl->tail, __ATOMIC_SEQ_CST);
		avail = r->cached - r->local;
	}
	if (avail > r->mask + 1)
		return -EPROTO; /* tail went backwards or past a full ring */
	return (int)avail;
}

int ring_pop(struct ring *r, void *out)
{
	int avail = ring_ready(r);

	if (avail <= 0)
		return avail == 0 ? -EAGAIN : avail;
	memcpy(out, r->entries + (size_t)(r->local & r->mask) * r->esize, r->esize);
	r->local++;
	/* the slot is copied out: hand it back (pairs with the producer's load of
	 * head); seq_cst as the consumer's half of the "full" handshake */
	__atomic_store_n(&r->ctl->head, r->local, __ATOMIC_SEQ_CST);
	return 0;
}

bool ring_consumer_sleeping(struct ring *r)
{
	/* after our seq_cst store of tail (see the file comment) */
	return __atomic_load_n(&r->ctl->sleeping, __ATOMIC_SEQ_CST) != 0;
}

void ring_set_full(struct ring *r, bool full)
{
	__atomic_store_n(&r->ctl->full, full ? 1u : 0u, __ATOMIC_SEQ_CST);
}

bool ring_full(struct ring *r)
{
	return __atomic_load_n(&r->ctl->full, __ATOMIC_SEQ_CST) != 0;
}

void ring_wake(struct ring *r)
{
	futex_wake(&r->ctl->tail, INT32_MAX);
}

void ring_set_sleeping(struct ring *r, bool sleeping)
{
	/* a count, not a flag: several threads of one process may wait at once;
	 * seq_cst: ordered before our next load of tail (see the file comment) */
	__atomic_add_fetch(&r->ctl->sleeping, sleeping ? 1u : (uint32_t)-1, __ATOMIC_SEQ_CST);
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Whether entries are published and not yet handed back, from the shared
 * words alone: ring_wait runs without the consumer's lock while another
 * thread of the same process may be popping, so it must not touch the
 * private indices (ring_ready would store a stale tail into r->cached under
 * that thread's feet, and its next pop would see the ring run backwards).
 * The two loads are not one snapshot (both words may move between them), so
 * this says only "maybe ready": the pop, under the lock, checks the ring.
 */
static int ring_peek(const struct ring *r)
{
	uint32_t head = __atomic_load_n(&r->ctl->head, __ATOMIC_SEQ_CST);
	uint32_t tail = __atomic_load_n(&r->ctl->tail, __ATOMIC_SEQ_CST);

	return tail != head;
}

int ring_wait(struct ring *r, unsigned spin, int timeout_ms)
{
	int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : 0;
	int n;

	for (unsigned i = 0; i < spin; i++) {
		n = ring_peek(r);
		if (n != 0)
			return n < 0 ? n : 0;
		cpu_relax();
	}
	for (;;) {
		uint32_t seen;
		int left = -1;

		ring_set_sleeping(r, true);
		seen = __atomic_load_n(&r->ctl->tail, __ATOMIC_SEQ_CST);
		n = ring_peek(r);
		if (n != 0) {
			ring_set_sleeping(r, false);
			return n < 0 ? n : 0;
		}
		if (timeout_ms >= 0) {
			int64_t rest = deadline - now_ms();
			if (rest <= 0) {
				ring_set_sleeping(r, false);
				return -ETIMEDOUT;
			}
			left = (int)rest;
		}
		futex_wait(&r->ctl->tail, seen, left);
		ring_set_sleeping(r, false);
	}
}
