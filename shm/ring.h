/* SPDX-License-Identifier: MIT */
/*
 * ring.h - single-producer single-consumer ring over shared memory.
 *
 * One producer, one consumer, each in its own process.  The head and tail are
 * free-running 32-bit counters (index = counter & mask), so they wrap at 2^32
 * without special cases.  The producer owns the tail and the consumer owns
 * the head: each side keeps its own counter in private memory and only
 * publishes it, so a peer that scribbles on the shared words cannot move our
 * position, only make us see a ring that is corrupt (-EPROTO).
 *
 * Entries have a fixed size; the consumer copies an entry into private
 * memory before it looks at any field (no double fetch).
 */
#ifndef KV_SHM_RING_H
#define KV_SHM_RING_H

#include <stdbool.h>
#include <stdint.h>

#include "layout.h"

struct ring {
	struct kv_ring_ctl *ctl;
	uint8_t *entries;
	uint32_t mask;   /* entries - 1 */
	uint32_t esize;  /* bytes per entry */
	uint32_t local;  /* producer: our tail; consumer: our head */
	uint32_t cached; /* producer: last head seen; consumer: last tail seen */
};

/*
 * Attach to a ring whose control words already hold their start value (zero
 * after creation).  n must be a power of two.  A producer takes its tail from
 * ctl, a consumer its head; nothing else is read from shared memory later.
 */
void ring_attach(struct ring *r, struct kv_ring_ctl *ctl, void *entries, uint32_t n,
		 uint32_t esize, bool producer);

/* Set both counters of a fresh ring to start (tests use this to cross 2^32). */
void ring_ctl_reset(struct kv_ring_ctl *ctl, uint32_t start);

/* Producer: 0, -EAGAIN when full, -EPROTO when the consumer's head is impossible. */
int ring_push(struct ring *r, const void *entry);

/*
 * Producer: free slots, refreshing the consumer's head only when the cached
 * one shows fewer than want; -EPROTO when the head is impossible.
 */
int ring_space(struct ring *r, uint32_t want);

/* Consumer: copies the next entry to out; 0, -EAGAIN when empty, -EPROTO when corrupt. */
int ring_pop(struct ring *r, void *out);

/* Consumer: entries ready to pop (0 when empty), or -EPROTO. */
int ring_ready(struct ring *r);

/* Producer, after ring_push: true when the consumer sleeps and needs a wake-up. */
bool ring_consumer_sleeping(struct ring *r);

/*
 * The "full" handshake, for a producer that keeps entries elsewhere when the
 * ring is full: it sets the flag and re-checks the space; a consumer that
 * popped entries reads the flag and wakes the producer.  Both sides' index
 * stores and these accesses are seq_cst, so one of them sees the other.
 */
void ring_set_full(struct ring *r, bool full); /* producer */
bool ring_full(struct ring *r);                /* consumer, after popping */

/* Producer: wake a consumer that sleeps in ring_wait (futex on the tail word). */
void ring_wake(struct ring *r);

/*
 * Consumer: wait until an entry may be ready, spinning up to spin iterations
 * and then sleeping on the tail word for at most timeout_ms (< 0: no
 * limit).  Returns 0 or -ETIMEDOUT; the pop that follows checks the ring.
 * It reads only the shared words, so one thread may wait while another
 * (holding the consumer's lock) pops.
 */
int ring_wait(struct ring *r, unsigned spin, int timeout_ms);

/*
 * Consumer: announce that a thread goes to sleep (true) or woke (false), for
 * waits done elsewhere.  The shared word counts sleepers; calls must pair.
 */
void ring_set_sleeping(struct ring *r, bool sleeping);

#endif /* KV_SHM_RING_H */
