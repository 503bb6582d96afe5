/* SPDX-License-Identifier: MIT */
/*
 * client.c - a connected rank's shared memory: its ring segment and the
 * arena segments it asks for.
 *
 * kvd makes every segment itself (sealed memfds), maps it, and keeps its own
 * copy of the geometry.  The ring segment's header is written once here and
 * never read back.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvd.h"
#include "../shm/seg.h"

struct client *client_create(struct kvd *d, uid_t uid, pid_t pid, char *why, size_t whylen)
{
	struct client *c = calloc(1, sizeof(*c));
	struct kv_seg_hdr *h;
	void *mem;
	int err;

	if (!c) {
		snprintf(why, whylen, "out of memory");
		return NULL;
	}
	c->uid = uid;
	c->pid = pid;
	c->rank = -1;
	c->ring_fd = -1;
	c->sq_entries = d->cfg.sq_entries;
	c->cq_entries = d->cfg.cq_entries;
	c->ring_size = kv_ring_seg_size(c->sq_entries, c->cq_entries);
	c->max_segs = d->cfg.max_segs;
	c->segs = calloc(c->max_segs, sizeof(*c->segs));
	if (!c->segs) {
		snprintf(why, whylen, "out of memory");
		goto out_free;
	}
	c->ring_fd = seg_create("kvd-ring", c->ring_size);
	if (c->ring_fd < 0) {
		snprintf(why, whylen, "cannot create a ring segment: %s", strerror(-c->ring_fd));
		goto out_free;
	}
	err = seg_map(c->ring_fd, c->ring_size, SEG_MAP_RING, &mem);
	if (err) {
		snprintf(why, whylen, "cannot map a ring segment: %s", strerror(-err));
		goto out_close;
	}
	c->ring_mem = mem;
	h = mem;
	h->magic = KV_SHM_MAGIC;
	h->abi = KV_SHM_ABI;
	h->hdr_size = sizeof(*h);
	h->seg_size = c->ring_size;
	h->sq_entries = c->sq_entries;
	h->cq_entries = c->cq_entries;
	h->sqe_size = sizeof(struct kv_sqe);
	h->cqe_size = sizeof(struct kv_cqe);
	h->sq_ctl_off = KV_SQ_CTL_OFF;
	h->cq_ctl_off = KV_CQ_CTL_OFF;
	h->sq_off = KV_SQ_OFF;
	h->cq_off = KV_SQ_OFF + c->sq_entries * (uint32_t)sizeof(struct kv_sqe);
	ring_attach(&c->sq, (struct kv_ring_ctl *)(c->ring_mem + KV_SQ_CTL_OFF),
		    c->ring_mem + h->sq_off, c->sq_entries, sizeof(struct kv_sqe), false);
	ring_attach(&c->cq, (struct kv_ring_ctl *)(c->ring_mem + KV_CQ_CTL_OFF),
		    c->ring_mem + h->cq_off, c->cq_entries, sizeof(struct kv_cqe), true);
	c->id = __atomic_add_fetch(&d->next_client_id, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&d->shared_bytes, c->ring_size, __ATOMIC_RELAXED);
	return c;

out_close:
	close(c->ring_fd);
out_free:
	free(c->segs);
	free(c);
	return NULL;
}

int client_add_seg(struct kvd *d, struct client *c, uint64_t bytes, uint32_t *id, char *why,
		   size_t whylen)
{
	uint64_t size = (bytes + 4095) & ~(uint64_t)4095;
	uint32_t n = c->nsegs; /* only this thread stores nsegs */
	void *base;
	int fd, err;

	if (n >= c->max_segs) {
		snprintf(why, whylen, "this client already holds %u segments, the limit", n);
		return KV_ERR_NOMEM;
	}
	err = job_charge(d, c->job, size, why, whylen);
	if (err)
		return err;
	fd = seg_create("kvd-arena", size);
	if (fd < 0) {
		snprintf(why, whylen, "cannot create a %llu-byte segment: %s",
			 (unsigned long long)size, strerror(-fd));
		job_uncharge(d, c->job, size);
		return KV_ERR_NOMEM;
	}
	err = seg_map(fd, size, 0, &base);
	if (err) {
		snprintf(why, whylen, "cannot map a segment: %s", strerror(-err));
		close(fd);
		job_uncharge(d, c->job, size);
		return KV_ERR_NOMEM;
	}
	c->segs[n] = (struct seginfo){ fd, base, size };
	pin_segment(base, size);
	/* publishes segs[n] to the engine; pairs with the load-acquire in resolve() */
	__atomic_store_n(&c->nsegs, n + 1, __ATOMIC_RELEASE);
	*id = n;
	return 0;
}

int client_adopt_seg(struct kvd *d, struct client *c, int fd, char *why, size_t whylen)
{
	uint32_t n = c->nsegs;
	ssize_t size = seg_size(fd);
	void *base;
	int err;

	if (n >= c->max_segs) {
		snprintf(why, whylen, "the rank hands back more than %u segments, the limit", n);
		return KV_ERR_NOMEM;
	}
	if (size <= 0) {
		snprintf(why, whylen, "a segment the rank handed back is not one");
		return KV_ERR_INVALID;
	}
	err = job_charge(d, c->job, (uint64_t)size, why, whylen);
	if (err)
		return err;
	fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	err = fd < 0 ? -errno : seg_map(fd, (size_t)size, 0, &base);
	if (err) {
		snprintf(why, whylen, "cannot map a segment the rank handed back: %s",
			 strerror(-err));
		if (fd >= 0)
			close(fd);
		job_uncharge(d, c->job, (uint64_t)size);
		return KV_ERR_INVALID;
	}
	c->segs[n] = (struct seginfo){ fd, base, (uint64_t)size };
	pin_segment(base, (uint64_t)size);
	/* publishes segs[n] to the engine; pairs with the load-acquire in resolve() */
	__atomic_store_n(&c->nsegs, n + 1, __ATOMIC_RELEASE);
	return 0;
}

void client_free(struct kvd *d, struct client *c)
{
	uint32_t n = __atomic_load_n(&c->nsegs, __ATOMIC_ACQUIRE);

	for (uint32_t i = 0; i < n; i++) {
		pin_release(c->segs[i].base);
		seg_unmap(c->segs[i].base, c->segs[i].size);
		close(c->segs[i].fd);
		if (c->job)
			job_uncharge(d, c->job, c->segs[i].size);
	}
	seg_unmap(c->ring_mem, c->ring_size);
	if (c->ring_fd >= 0)
		close(c->ring_fd);
	__atomic_sub_fetch(&d->shared_bytes, c->ring_size, __ATOMIC_RELAXED);
	free(c->segs);
	free(c);
}
