/* SPDX-License-Identifier: MIT */
/*
 * test_ring.c - the SPSC ring: single-process properties, corruption
 * detection, and a two-process stress run through a memfd shared by fork.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../shm/futex.h"
#include "../../shm/layout.h"
#include "../../shm/ring.h"
#include "../../shm/seg.h"

struct entry {
	uint64_t seq;
	uint64_t check;
};

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	return x;
}

struct shared_ring {
	struct kv_ring_ctl ctl;
	struct entry e[];
};

static struct shared_ring *ring_mem(uint32_t n, size_t *bytes)
{
	*bytes = sizeof(struct shared_ring) + n * sizeof(struct entry);
	struct shared_ring *s = aligned_alloc(64, (*bytes + 63) & ~(size_t)63);
	cr_assert_not_null(s);
	memset(s, 0, *bytes);
	return s;
}

Test(ring, empty_then_full)
{
	size_t bytes;
	struct shared_ring *s = ring_mem(8, &bytes);
	struct ring p, c;
	struct entry e = { 0 }, out;

	ring_attach(&p, &s->ctl, s->e, 8, sizeof(struct entry), true);
	ring_attach(&c, &s->ctl, s->e, 8, sizeof(struct entry), false);
	cr_assert_eq(ring_pop(&c, &out), -EAGAIN, "a new ring is empty");
	cr_assert_eq(ring_ready(&c), 0);
	for (uint64_t i = 0; i < 8; i++) {
		e.seq = i;
		cr_assert_eq(ring_push(&p, &e), 0, "push %llu of 8", (unsigned long long)i);
	}
	e.seq = 99;
	cr_assert_eq(ring_push(&p, &e), -EAGAIN, "the ninth push finds it full");
	cr_assert_eq(ring_ready(&c), 8);
	for (uint64_t i = 0; i < 8; i++) {
		cr_assert_eq(ring_pop(&c, &out), 0);
		cr_assert_eq(out.seq, i, "FIFO order");
	}
	cr_assert_eq(ring_pop(&c, &out), -EAGAIN);
	free(s);
}

Test(ring, wraps_at_2_32)
{
	size_t bytes;
	struct shared_ring *s = ring_mem(4, &bytes);
	struct ring p, c;
	struct entry e, out;
	uint64_t next_out = 0;

	ring_ctl_reset(&s->ctl, 0xfffffff0u);
	ring_attach(&p, &s->ctl, s->e, 4, sizeof(struct entry), true);
	ring_attach(&c, &s->ctl, s->e, 4, sizeof(struct entry), false);
	for (uint64_t i = 0; i < 100; i++) {
		e.seq = i;
		e.check = mix(i);
		cr_assert_eq(ring_push(&p, &e), 0);
		if (i % 3 == 2) { /* let it fill up now and then */
			while (ring_pop(&c, &out) == 0) {
				cr_assert_eq(out.seq, next_out);
				cr_assert_eq(out.check, mix(next_out));
				next_out++;
			}
		}
	}
	while (ring_pop(&c, &out) == 0) {
		cr_assert_eq(out.seq, next_out);
		next_out++;
	}
	cr_assert_eq(next_out, 100, "every entry came out once");
	cr_assert(s->ctl.tail < 0xfffffff0u, "the counters wrapped (tail=%u)", s->ctl.tail);
	free(s);
}

Test(ring, corrupt_counters_are_detected)
{
	size_t bytes;
	struct shared_ring *s = ring_mem(8, &bytes);
	struct ring p, c;
	struct entry e = { 0 }, out;

	ring_attach(&p, &s->ctl, s->e, 8, sizeof(struct entry), true);
	ring_attach(&c, &s->ctl, s->e, 8, sizeof(struct entry), false);
	cr_assert_eq(ring_push(&p, &e), 0);

	/* a producer's tail jumping past a full ring */
	s->ctl.tail = 1000;
	cr_assert_eq(ring_pop(&c, &out), -EPROTO);
	/* a tail going backwards looks like 2^32 - 1 entries */
	s->ctl.tail = (uint32_t)-1;
	cr_assert_eq(ring_ready(&c), -EPROTO);

	/* a consumer's head running past the tail */
	for (int i = 0; i < 7; i++)
		cr_assert_eq(ring_push(&p, &e), 0);
	s->ctl.head = 12345;
	cr_assert_eq(ring_push(&p, &e), -EPROTO);
	free(s);
}

Test(ring, sleeping_flag_and_timeout)
{
	size_t bytes;
	struct shared_ring *s = ring_mem(4, &bytes);
	struct ring p, c;
	struct entry e = { .seq = 7 };

	ring_attach(&p, &s->ctl, s->e, 4, sizeof(struct entry), true);
	ring_attach(&c, &s->ctl, s->e, 4, sizeof(struct entry), false);
	cr_assert_eq(ring_wait(&c, 10, 20), -ETIMEDOUT, "nothing arrives: times out");
	cr_assert_eq(s->ctl.sleeping, 0, "awake again after the wait");
	cr_assert_not(ring_consumer_sleeping(&p));
	ring_set_sleeping(&c, true);
	cr_assert(ring_consumer_sleeping(&p), "the producer sees the flag");
	ring_set_sleeping(&c, false);
	cr_assert_eq(ring_push(&p, &e), 0);
	cr_assert_eq(ring_wait(&c, 0, 0), 0, "ready without waiting");
	free(s);
}

/*
 * Two processes, a million entries: the consumer checks sequence and payload
 * of each, and sleeps on the futex for long stretches (the producer pauses
 * every so often, so the sleeping path is taken many times).
 */
#define STRESS_N 1000000u
Test(ring, two_process_stress, .timeout = 120)
{
	const uint32_t n = 256;
	size_t bytes = sizeof(struct shared_ring) + n * sizeof(struct entry);
	int fd = seg_create("ring-stress", bytes);
	void *mem;
	struct shared_ring *s;
	pid_t pid;
	int status;

	cr_assert_geq(fd, 0, "seg_create: %s", strerror(-fd));
	cr_assert_eq(seg_map(fd, bytes, 0, &mem), 0);
	s = mem;
	*(volatile uint32_t *)&s->ctl.head = 0;

	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) { /* producer */
		struct ring p;
		struct entry e;

		prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a killed test */
		if (getppid() == 1)
			_exit(1);

		ring_attach(&p, &s->ctl, s->e, n, sizeof(struct entry), true);
		for (uint64_t i = 0; i < STRESS_N; i++) {
			e.seq = i;
			e.check = mix(i);
			while (ring_push(&p, &e) == -EAGAIN)
				cpu_relax();
			if (ring_consumer_sleeping(&p))
				ring_wake(&p);
			if (i % 50000 == 0)
				usleep(2000); /* let the consumer fall asleep */
		}
		_exit(0);
	}

	struct ring c;
	struct entry out;
	uint64_t got = 0, bad = 0, sleeps = 0;

	ring_attach(&c, &s->ctl, s->e, n, sizeof(struct entry), false);
	while (got < STRESS_N) {
		int rc = ring_pop(&c, &out);

		if (rc == -EAGAIN) {
			sleeps++;
			rc = ring_wait(&c, 64, 10000);
			cr_assert_eq(rc, 0, "wait: %d after %llu entries", rc,
				     (unsigned long long)got);
			continue;
		}
		cr_assert_eq(rc, 0);
		if (out.seq != got || out.check != mix(got))
			bad++;
		got++;
	}
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	cr_assert_eq(bad, 0, "%llu entries lost, duplicated or reordered", (unsigned long long)bad);
	cr_assert_eq(ring_ready(&c), 0, "nothing extra");
	cr_log_info("ring stress: %u entries, consumer waited %llu times", STRESS_N,
		    (unsigned long long)sleeps);
	seg_unmap(mem, bytes);
	close(fd);
}

/*
 * One consumer ring shared by the threads of a process (libkv's completion
 * ring): one thread pops under a lock while others wait without it.  A
 * waiter must never disturb the popper (it once stored a stale tail into
 * the ring's private copy, and the next pop saw the ring run backwards).
 */
#define MT_ENTRIES 2000000u

struct mt {
	struct ring p, c;
	pthread_mutex_t lock;
	uint64_t popped, bad;
	int done;
};

static void *mt_producer(void *arg)
{
	struct mt *m = arg;
	struct entry e = { 0 };

	for (uint64_t i = 0; i < MT_ENTRIES;) {
		e.seq = i;
		e.check = mix(i);
		if (ring_push(&m->p, &e) == 0)
			i++;
	}
	return NULL;
}

static void *mt_consumer(void *arg)
{
	struct mt *m = arg;
	struct entry out;

	while (!__atomic_load_n(&m->done, __ATOMIC_ACQUIRE)) {
		int rc;
		pthread_mutex_lock(&m->lock);
		while ((rc = ring_pop(&m->c, &out)) == 0) {
			if (out.seq != m->popped || out.check != mix(out.seq))
				__atomic_add_fetch(&m->bad, 1, __ATOMIC_RELAXED);
			m->popped++;
		}
		if (rc != -EAGAIN)
			__atomic_add_fetch(&m->bad, 1, __ATOMIC_RELAXED);
		if (m->popped == MT_ENTRIES)
			__atomic_store_n(&m->done, 1, __ATOMIC_RELEASE);
		pthread_mutex_unlock(&m->lock);
		/* the wait itself, without the lock, as libkv's waiters do */
		ring_wait(&m->c, 16, 1);
	}
	return NULL;
}

Test(ring, threads_wait_while_one_pops, .timeout = 60)
{
	size_t bytes;
	struct shared_ring *s = ring_mem(64, &bytes);
	struct mt m = { .lock = PTHREAD_MUTEX_INITIALIZER };
	pthread_t prod, cons[3];

	ring_attach(&m.p, &s->ctl, s->e, 64, sizeof(struct entry), true);
	ring_attach(&m.c, &s->ctl, s->e, 64, sizeof(struct entry), false);
	pthread_create(&prod, NULL, mt_producer, &m);
	for (int i = 0; i < 3; i++)
		pthread_create(&cons[i], NULL, mt_consumer, &m);
	pthread_join(prod, NULL);
	for (int i = 0; i < 3; i++)
		pthread_join(cons[i], NULL);
	cr_assert_eq(m.bad, 0, "%llu entries out of order, or the ring seen corrupt",
		     (unsigned long long)m.bad);
	cr_assert_eq(m.popped, MT_ENTRIES);
	free(s);
}
