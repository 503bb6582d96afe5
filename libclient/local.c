/* SPDX-License-Identifier: MIT */
/*
 * local.c - the built-in "local" store: one rank of a job served by kvd.
 *
 * kv_create connects to kvd's socket, says hello, and maps the ring segment
 * kvd hands back.  An op on a key is cut into parts (kvd says how large);
 * each part is one submission: the client copies the part's input into a
 * staging block of its arena (or not at all, when the caller's buffer was
 * made by kv_alloc), pushes the submission, and goes on with the next part
 * while kvd sums the previous one.  Completions come back per part; the
 * result of a part is copied out as soon as its completion is reaped.
 *
 * Waiting: spin on the completion ring briefly, then sleep on its tail word
 * (futex) in slices, checking between slices that kvd is still there and
 * whether the op's deadline (timeout_ms) passed; a timed-out op is
 * cancelled.  One mutex guards the store; it is dropped while sleeping.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "local_int.h"
#include "../kernels/gpu.h"
#include "../kernels/reduce.h"
#include "../shm/arena.h"
#include "../shm/futex.h"
#include "../shm/layout.h"
#include "../shm/msg.h"
#include "../shm/ring.h"
#include "../shm/seg.h"


int fail(char *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (err) {
		va_start(ap, fmt);
		vsnprintf(err, KV_ERRLEN, fmt, ap);
		va_end(ap);
	}
	return code;
}

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ socket */

void mark_dead(struct local *l, int code, const char *why)
{
	if (l->dead)
		return;
	l->dead = true;
	l->dead_code = code;
	/* a joined store whose kvd died or stopped: a restarted kvd takes it back */
	l->lost = l->ring && code == KV_ERR_DAEMON;
	l->lost_ms = now_ms();
	snprintf(l->dead_why, sizeof(l->dead_why), "%s", why);
}

/* A message kvd sent on its own (not a reply): it says the store is over. */
/* Keep a segment kvd handed over, unless one of that kind and id is kept already. */
static void hold(struct local *l, uint32_t kind, uint32_t id, int fd)
{
	for (uint32_t i = 0; i < l->nheld; i++)
		if (l->held[i].kind == kind && l->held[i].id == id) {
			close(fd);
			return;
		}
	if (l->nheld == l->capheld) {
		uint32_t cap = l->capheld ? l->capheld * 2 : 16;
		struct lheld *n = realloc(l->held, cap * sizeof(*n));
		if (!n) {
			close(fd); /* only a restart of kvd would miss it */
			return;
		}
		l->held = n;
		l->capheld = cap;
	}
	l->held[l->nheld++] = (struct lheld){ kind, id, fd };
}

/* A message kvd sent on its own, with the fds that came along (taken). */
static void unsolicited(struct local *l, const struct kv_msg *m, int *fds, int nfds)
{
	char why[256];

	if (m->type == KV_MSG_HOLD && (uint32_t)nfds == m->u.hold.n) {
		for (int i = 0; i < nfds; i++)
			hold(l, m->u.hold.kind[i], m->u.hold.id[i], fds[i]);
		return;
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	if (m->type == KV_MSG_ERROR) {
		snprintf(why, sizeof(why), "%.*s", (int)m->u.error.len, m->u.error.text);
		mark_dead(l, m->u.error.code ? m->u.error.code : KV_ERR_DAEMON, why);
	}
}

/* Read one message; 0, or a KV_ERR_* (kvd gone, or garbage from it). */
static int recv_one(struct local *l, uint8_t *buf, struct kv_msg *m, int *fds, int *nfds,
		    int timeout_ms)
{
	struct pollfd p = { .fd = l->sock, .events = POLLIN };
	const char *why;
	ssize_t n;
	int rc;

	do
		rc = poll(&p, 1, timeout_ms);
	while (rc < 0 && errno == EINTR);
	if (rc == 0)
		return KV_ERR_TIMEOUT;
	n = seg_recv(l->sock, buf, KV_MSG_MAX, fds, SEG_MAX_FDS, nfds);
	if (n == -EMSGSIZE) {
		/* the descriptors that came along were cut off: this process has
		 * run out of them; kvd is fine, and coming back would not help */
		mark_dead(l, KV_ERR_NOMEM,
			  "a message from kvd lost its descriptors: this process is out of "
			  "file descriptors (raise RLIMIT_NOFILE, ulimit -n)");
		return KV_ERR_NOMEM;
	}
	if (n <= 0) {
		mark_dead(l, KV_ERR_DAEMON, n == 0 ? "kvd closed the connection"
						   : "lost the connection to kvd");
		return KV_ERR_DAEMON;
	}
	rc = kv_msg_decode(buf, (size_t)n, m, &why);
	if (rc) {
		for (int i = 0; i < *nfds; i++)
			close(fds[i]);
		*nfds = 0;
		mark_dead(l, KV_ERR_PROTO, "kvd sent a malformed message");
		return KV_ERR_PROTO;
	}
	return 0;
}

static int request_fd(struct local *l, struct kv_msg *m, struct kv_msg *reply, uint8_t *rbuf,
		      int sendfd, int *fd, char *err);

/* Send m and wait for its reply; an ERROR reply becomes its code with its text in err. */
static int request(struct local *l, struct kv_msg *m, struct kv_msg *reply, uint8_t *rbuf,
		   int *fd, char *err)
{
	return request_fd(l, m, reply, rbuf, -1, fd, err);
}

/* The same, passing sendfd (>= 0) along with the request. */
static int request_fd(struct local *l, struct kv_msg *m, struct kv_msg *reply, uint8_t *rbuf,
		      int sendfd, int *fd, char *err)
{
	uint8_t buf[KV_MSG_MAX];
	size_t n;
	int fds[SEG_MAX_FDS], nfds, rc;
	int64_t deadline = l->o.timeout_ms > 0 ? now_ms() + l->o.timeout_ms : 0;

	rc = local_alive(l, err);
	if (rc)
		return rc;
	m->seq = ++l->seq;
	n = kv_msg_encode(m, buf, sizeof(buf));
	if (!n)
		return fail(err, KV_ERR_INVALID, "request does not fit a message");
	rc = seg_send(l->sock, buf, n, sendfd >= 0 ? &sendfd : NULL, sendfd >= 0 ? 1 : 0);
	if (rc) {
		mark_dead(l, KV_ERR_DAEMON, "lost the connection to kvd");
		return fail(err, KV_ERR_DAEMON, "cannot send to kvd: %s", strerror(-rc));
	}
	for (;;) {
		int slice = WAIT_SLICE_MS * 10;
		if (deadline) {
			int64_t left = deadline - now_ms();
			if (left <= 0)
				return fail(err, KV_ERR_TIMEOUT, "kvd did not answer within %d ms",
					    l->o.timeout_ms);
			slice = left < slice ? (int)left : slice;
		}
		rc = recv_one(l, rbuf, reply, fds, &nfds, slice);
		if (rc == KV_ERR_TIMEOUT)
			continue;
		if (rc)
			return fail(err, rc, "%s", l->dead_why);
		if (reply->seq != m->seq) {
			unsolicited(l, reply, fds, nfds);
			if (l->dead)
				return fail(err, l->dead_code, "%s", l->dead_why);
			continue;
		}
		break;
	}
	if (fd)
		*fd = nfds > 0 ? fds[0] : -1;
	for (int i = fd ? 1 : 0; i < nfds; i++)
		close(fds[i]);
	if (reply->type == KV_MSG_ERROR) {
		if (fd && *fd >= 0) {
			close(*fd);
			*fd = -1;
		}
		if (reply->u.error.code)
			return fail(err, reply->u.error.code, "%.*s", (int)reply->u.error.len,
				    reply->u.error.text);
	}
	return 0;
}

/* Between waits: is kvd still there?  Reads what it sent on its own. */
void check_daemon(struct local *l)
{
	struct pollfd p = { .fd = l->sock, .events = POLLIN };
	uint8_t buf[KV_MSG_MAX];
	struct kv_msg m;
	int fds[SEG_MAX_FDS], nfds;

	while (!l->dead && poll(&p, 1, 0) > 0) {
		if (recv_one(l, buf, &m, fds, &nfds, 0))
			return;
		unsolicited(l, &m, fds, nfds);
	}
}

int local_request_text(struct local *l, uint16_t type, uint32_t flags, const char *text,
		       size_t len, char *err)
{
	struct kv_msg m = { .type = type }, r;
	uint8_t rbuf[KV_MSG_MAX];
	int rc;

	if (type == KV_MSG_OPTIMIZER) {
		m.u.optimizer.spec = text;
		m.u.optimizer.len = (uint32_t)len;
	} else {
		m.u.file.flags = flags;
		m.u.file.path = text;
		m.u.file.len = (uint32_t)len;
	}
	pthread_mutex_lock(&l->lock);
	rc = request(l, &m, &r, rbuf, NULL, err);
	pthread_mutex_unlock(&l->lock);
	return rc;
}

/* ------------------------------------------------------------------ GPU tensors */

bool is_dev(struct local *l, const void *p)
{
	return l->gpu && gpu_pointer_device(p) >= 0;
}

int buf_copy(struct local *l, void *dst, const void *src, size_t n, bool dev)
{
	if (!dev) {
		memmove(dst, src, n);
		return 0;
	}
	return gpu_copy(dst, src, n, l->stream);
}

int local_set_stream(struct local *l, void *stream)
{
	pthread_mutex_lock(&l->lock);
	l->stream = stream;
	pthread_mutex_unlock(&l->lock);
	return KV_OK;
}

/* ------------------------------------------------------------------ arena */

static int arena_grow(void *ctx, size_t min, struct arena_seg *s)
{
	struct local *l = ctx;
	struct kv_msg m = { .type = KV_MSG_SEG_ALLOC }, r;
	uint8_t rbuf[KV_MSG_MAX];
	size_t size = min < ARENA_GROW_MIN ? ARENA_GROW_MIN : (min + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
	int fd = -1, rc;
	void *base;

	if (l->nsegs >= l->max_segs) {
		fail(l->errbuf, KV_ERR_NOMEM, "this store already maps %u segments, kvd's limit",
		     l->nsegs);
		return ENOMEM;
	}
	m.u.seg_alloc.bytes = size;
	rc = request(l, &m, &r, rbuf, &fd, l->errbuf);
	if (rc)
		return ENOMEM;
	if (r.type != KV_MSG_SEG || fd < 0 || r.u.seg.size < size) {
		if (fd >= 0)
			close(fd);
		fail(l->errbuf, KV_ERR_PROTO, "kvd answered a segment request wrongly");
		return EPROTO;
	}
	rc = seg_map(fd, r.u.seg.size, 0, &base);
	if (rc) {
		close(fd);
		fail(l->errbuf, KV_ERR_NOMEM, "cannot map a segment from kvd: %s", strerror(-rc));
		return ENOMEM;
	}
	if (l->gpu)
		gpu_host_register(base, r.u.seg.size); /* DMA straight into staging; best effort */
	l->segs[l->nsegs++] = (struct lseg){ fd, base, r.u.seg.size };
	s->id = r.u.seg.seg_id;
	s->base = base;
	s->size = r.u.seg.size;
	return 0;
}

void *local_alloc(struct local *l, size_t bytes, char *err)
{
	void *p;

	pthread_mutex_lock(&l->lock);
	l->errbuf = err;
	if (err)
		err[0] = '\0';
	/* the segment request's limit (msg.c): a clear sentence rather than kvd's refusal */
	p = bytes < (1ull << 40) ? arena_alloc(&l->arena, bytes) : NULL;
	if (!p && err && !err[0] && bytes >= (1ull << 40))
		fail(err, KV_ERR_NOMEM, "kv_alloc: %zu bytes is more than one shared segment "
		     "may hold (1 TiB)", bytes);
	else if (!p && err && !err[0])
		fail(err, KV_ERR_NOMEM, "cannot allocate %zu bytes of shared memory", bytes);
	l->errbuf = NULL;
	pthread_mutex_unlock(&l->lock);
	return p;
}

int local_free(struct local *l, void *p)
{
	int rc;

	pthread_mutex_lock(&l->lock);
	rc = arena_free(&l->arena, p);
	pthread_mutex_unlock(&l->lock);
	return rc;
}

/* ------------------------------------------------------------------ keys */

static uint32_t key_hash(const char *s, size_t n)
{
	uint32_t h = 2166136261u;
	for (size_t i = 0; i < n; i++) {
		h ^= (uint8_t)s[i];
		h *= 16777619u;
	}
	return h;
}

static struct lkey *key_cached(struct local *l, const char *name, size_t len)
{
	if (!l->capkeys)
		return NULL;
	for (uint32_t i = key_hash(name, len) & (l->capkeys - 1);; i = (i + 1) & (l->capkeys - 1)) {
		struct lkey *k = l->keys[i];
		if (!k)
			return NULL;
		if (k->len == len && memcmp(k->name, name, len) == 0)
			return k;
	}
}

static int key_cache(struct local *l, struct lkey *k)
{
	if ((l->nkeys + 1) * 2 > l->capkeys) {
		uint32_t cap = l->capkeys ? l->capkeys * 2 : 64;
		struct lkey **n = calloc(cap, sizeof(*n));
		if (!n)
			return -ENOMEM;
		for (uint32_t i = 0; i < l->capkeys; i++) {
			struct lkey *o = l->keys[i];
			if (!o)
				continue;
			uint32_t h = key_hash(o->name, o->len) & (cap - 1);
			while (n[h])
				h = (h + 1) & (cap - 1);
			n[h] = o;
		}
		free(l->keys);
		l->keys = n;
		l->capkeys = cap;
	}
	uint32_t h = key_hash(k->name, k->len) & (l->capkeys - 1);
	while (l->keys[h])
		h = (h + 1) & (l->capkeys - 1);
	l->keys[h] = k;
	l->nkeys++;
	return 0;
}

static const char *dtype_name(kv_dtype t)
{
	static const char *const names[] = { "float32", "float64", "float16",
					     "bfloat16", "int32", "int64" };
	return (unsigned)t < 6 ? names[t] : "?";
}

static int key_get(struct local *l, const char *name, size_t count, kv_dtype t, uint8_t mode,
		   struct lkey **out, char *err)
{
	size_t len = strlen(name);
	struct lkey *k;
	struct kv_msg m = { .type = KV_MSG_KEY_OPEN }, r;
	uint8_t rbuf[KV_MSG_MAX];
	int rc, fd = -1;
	int64_t deadline = l->o.timeout_ms > 0 ? now_ms() + l->o.timeout_ms : 0;
	long pause_us = 50;

again:
	k = key_cached(l, name, len);
	if (k) {
		if (k->count != count || k->dtype != t)
			return fail(err, KV_ERR_MISMATCH,
				    "key '%s' holds %llu %s elements; this call has %zu %s", name,
				    (unsigned long long)k->count, dtype_name(k->dtype), count,
				    dtype_name(t));
		*out = k;
		return 0;
	}
	m.u.key_open.count = count;
	m.u.key_open.dtype = (uint8_t)t;
	m.u.key_open.mode = mode;
	m.u.key_open.name_len = (uint32_t)len;
	memcpy(m.u.key_open.name, name, len);
	rc = request(l, &m, &r, rbuf, &fd, err);
	if (rc == KV_ERR_NOKEY && mode == KV_KEY_CREATE && l->o.rank != 0) {
		/* only rank 0 creates a key (its count and dtype are the key's):
		 * wait for its init or broadcast, without holding the store */
		if (deadline && now_ms() >= deadline)
			return fail(err, KV_ERR_TIMEOUT,
				    "rank 0 did not create key '%s' within %d ms (does it "
				    "init or broadcast it?)",
				    name, l->o.timeout_ms);
		pthread_mutex_unlock(&l->lock);
		usleep((useconds_t)pause_us);
		pthread_mutex_lock(&l->lock);
		pause_us = pause_us < 20000 ? pause_us * 2 : 20000;
		if (l->dead)
			return fail(err, l->dead_code, "%s", l->dead_why);
		err[0] = '\0';
		goto again;
	}
	if (rc)
		return rc;
	if (r.type != KV_MSG_KEY || r.u.key.count != count || r.u.key.dtype != t ||
	    (uint64_t)r.u.key.part_elems * kv_dtype_size(t) > l->part_bytes ||
	    !(r.u.key.flags & KV_KEYF_DIRECT) != (fd < 0)) {
		if (fd >= 0)
			close(fd);
		return fail(err, KV_ERR_PROTO, "kvd answered a key request wrongly");
	}
	k = calloc(1, sizeof(*k));
	if (!k || !(k->name = malloc(len + 1))) {
		free(k);
		return fail(err, KV_ERR_NOMEM, "out of memory");
	}
	memcpy(k->name, name, len + 1);
	k->len = (uint32_t)len;
	k->id = r.u.key.key_id;
	k->nparts = r.u.key.nparts;
	k->part_elems = r.u.key.part_elems;
	k->count = count;
	k->dtype = t;
	k->rounds0 = r.u.key.rounds;
	k->opened_direct = fd >= 0;
	if (fd >= 0) {
		rc = direct_map(l, k, r.u.key.dseg, r.u.key.doff, r.u.key.dsize, fd, err);
		if (rc) {
			free(k->name);
			free(k);
			return rc;
		}
	}
	if (key_cache(l, k)) {
		free(k->name);
		free(k);
		return fail(err, KV_ERR_NOMEM, "out of memory");
	}
	*out = k;
	return 0;
}

/* ------------------------------------------------------------------ ops */

/*
 * Op slots live in blocks that never move: an op is referenced across
 * unlocked waits and from its key (k->last) while other threads allocate.
 */
#define OP_BLOCK 64

static struct lop *op_at(struct local *l, uint32_t slot)
{
	return &l->opblk[slot / OP_BLOCK][slot % OP_BLOCK];
}

static struct lop *op_alloc(struct local *l, uint32_t *slot)
{
	if (l->free_op == NO_OP) {
		uint32_t nb = l->nops / OP_BLOCK;
		struct lop **blk = realloc(l->opblk, (nb + 1) * sizeof(*blk));
		if (!blk)
			return NULL;
		l->opblk = blk;
		blk[nb] = calloc(OP_BLOCK, sizeof(struct lop));
		if (!blk[nb])
			return NULL;
		for (uint32_t i = 0; i < OP_BLOCK; i++) {
			blk[nb][i].slot = l->nops + i;
			blk[nb][i].next_free = i + 1 < OP_BLOCK ? l->nops + i + 1 : NO_OP;
		}
		l->free_op = l->nops;
		l->nops += OP_BLOCK;
	}
	*slot = l->free_op;
	struct lop *op = op_at(l, *slot);
	l->free_op = op->next_free;
	uint32_t gen = op->gen + 1 ? op->gen + 1 : 1;
	memset(op, 0, sizeof(*op));
	op->gen = gen;
	op->slot = *slot;
	op->used = true;
	return op;
}

static void op_release(struct local *l, struct lop *op)
{
	uint32_t slot = op->slot;

	if (op->key && op->key->last == op)
		op->key->last = NULL;
	if (op->stage)
		arena_free(&l->arena, op->stage);
	free(op->outs);
	op->stage = NULL;
	op->outs = NULL;
	free(op->prounds);
	op->prounds = NULL;
	op->rkey = NULL;
	op->round = false;
	op->used = false;
	op->next_free = l->free_op;
	l->free_op = slot;
}

uint64_t op_ud(struct local *l, struct lop *op)
{
	return ((uint64_t)op->gen << 32) | op->slot;
}

static void op_finish(struct local *l, struct lop *op)
{
	op->done = true;
	if (op->dev_out && gpu_stream_sync(l->stream) && !op->status)
		op->status = KV_ERR_IO; /* the copies to the GPU failed */
	/* a round op leaves its parts' flight here, and moves on the parts
	 * that completed, all at once (so a later op's tags stay right); but
	 * when kvd went away, not even those: the same call repeated then
	 * names the same rounds, and kvd recognises the ones done */
	for (uint32_t p = 0; op->round && p < op->nparts; p++) {
		struct lkey *k = op->rkey;
		if (k->pflight[p])
			k->pflight[p]--;
		if (op->prounds[p] && op->status != KV_ERR_DAEMON &&
		    (k->pdone[p] == ROUND_UNKNOWN || op->prounds[p] > k->pdone[p]))
			k->pdone[p] = op->prounds[p];
	}
	if (op->stage) {
		arena_free(&l->arena, op->stage);
		op->stage = NULL;
	}
	if (op->abandoned)
		op_release(l, op);
}

static void copy_out(struct local *l, struct lop *op, uint32_t part)
{
	size_t off = (size_t)part * op->part_elems * op->esize;
	uint64_t left = op->count - (uint64_t)part * op->part_elems;
	size_t len = (size_t)(left < op->part_elems ? left : op->part_elems) * op->esize;

	for (int i = 0; i < op->nout; i++) {
		if (op->dev_out && is_dev(l, op->outs[i]))
			/* to the GPU on the store's stream; waited for before the op ends */
			gpu_copy_async(op->outs[i] + off, op->out_base + off, len, l->stream);
		else
			memcpy(op->outs[i] + off, op->out_base + off, len);
	}
}

/* Reap every completion; returns how many, or a KV_ERR_* when the ring is corrupt. */
static int reap(struct local *l)
{
	struct kv_cqe q;
	int n = 0, rc;

	while ((rc = ring_pop(&l->cq, &q)) == 0) {
		uint32_t slot = (uint32_t)q.user_data, gen = (uint32_t)(q.user_data >> 32);
		struct lop *op;

		n++;
		op = slot < l->nops ? op_at(l, slot) : NULL;
		if (!op || !op->used || op->gen != gen || q.part >= op->nparts || op->done)
			continue; /* not ours: ignore it */
		op->completed++;
		if (op->rkey && op->round) {
			if (!q.status)
				op->prounds[q.part] = q.round;
		} else if (op->rkey && !q.status) {
			/* an init or pull says how many rounds the part completed */
			struct lkey *k = op->rkey;
			if (k->pdone[q.part] == ROUND_UNKNOWN || q.round > k->pdone[q.part])
				k->pdone[q.part] = q.round;
		}
		if (q.status && !op->status)
			op->status = q.status;
		if (!q.status && op->nout && !op->abandoned)
			copy_out(l, op, q.part);
		if (op->completed == op->nparts)
			op_finish(l, op);
	}
	if (rc != -EAGAIN) {
		mark_dead(l, KV_ERR_PROTO, "the completion ring from kvd is corrupt");
		return KV_ERR_PROTO;
	}
	if (n && ring_full(&l->cq)) {
		/* kvd holds completions that did not fit: it may sleep; wake it */
		uint64_t one = 1;
		(void)!write(l->doorbell, &one, sizeof(one));
	}
	return n;
}

static void doorbell(struct local *l)
{
	if (ring_consumer_sleeping(&l->sq)) {
		uint64_t one = 1;
		(void)!write(l->doorbell, &one, sizeof(one));
	}
}

static int submit(struct local *l, const struct kv_sqe *s, char *err)
{
	int rc;

	while ((rc = ring_push(&l->sq, s)) == -EAGAIN) {
		/* the ring is full: make sure kvd is awake, reap, let it catch up */
		uint64_t one = 1;
		(void)!write(l->doorbell, &one, sizeof(one));
		if (reap(l) < 0 || l->dead)
			return fail(err, l->dead_code, "%s", l->dead_why);
		check_daemon(l);
		if (l->dead)
			return fail(err, l->dead_code, "%s", l->dead_why);
		pthread_mutex_unlock(&l->lock);
		sched_yield();
		pthread_mutex_lock(&l->lock);
	}
	if (rc) {
		mark_dead(l, KV_ERR_PROTO, "the submission ring to kvd is corrupt");
		return fail(err, KV_ERR_PROTO, "%s", l->dead_why);
	}
	doorbell(l);
	return 0;
}

/* Fail every engine op in flight: kvd is gone.  A direct op that arrived is
 * left to its wait, which finishes the round or takes the arrival back. */
static void fail_all(struct local *l)
{
	for (uint32_t i = 0; i < l->nops; i++) {
		struct lop *op = op_at(l, i);
		if (!op->used || op->done || op->key)
			continue;
		if (!op->status)
			op->status = l->dead_code;
		op->stage = NULL; /* its segment may still be read by a dying kvd: leave it */
		op_finish(l, op);
	}
}

static int wait_op(struct local *l, struct lop *op, char *err)
{
	int64_t deadline = l->o.timeout_ms > 0 ? now_ms() + l->o.timeout_ms : 0;
	bool cancelled = false;

	if (op->key) {
		int rc = direct_finish(l, op, err);
		if (rc && op->status == rc && !err[0])
			fail(err, rc, "%s", kv_strerror(rc));
		return rc;
	}

	while (!op->done) {
		int rc = reap(l), slice = WAIT_SLICE_MS;

		if (rc < 0 || l->dead) {
			fail_all(l);
			break;
		}
		if (rc > 0)
			continue;
		if (deadline) {
			int64_t left = deadline - now_ms();
			if (left <= 0) {
				if (cancelled) {
					/* kvd never answered the cancel: give the op up */
					op->abandoned = true;
					return fail(err, KV_ERR_TIMEOUT,
						    "the op did not complete within %d ms",
						    l->o.timeout_ms);
				}
				struct kv_sqe s = { .op = KV_OP_CANCEL, .user_data = op_ud(l, op) };
				if (submit(l, &s, err))
					break;
				cancelled = true;
				deadline = now_ms() + CANCEL_GRACE_MS;
				continue;
			}
			slice = left < slice ? (int)left : slice;
		}
		pthread_mutex_unlock(&l->lock);
		/* spin only for small ops: a large one leaves the CPU to kvd's workers */
		rc = ring_wait(&l->cq, op->count * op->esize <= SPIN_MAX_BYTES ? WAIT_SPIN : 0,
			       slice);
		pthread_mutex_lock(&l->lock);
		if (rc == -ETIMEDOUT)
			check_daemon(l);
	}
	if (op->status == KV_ERR_TIMEOUT)
		return fail(err, KV_ERR_TIMEOUT,
			    "no round completed within %d ms (are all ranks of job '%s' running "
			    "this op?)",
			    l->o.timeout_ms, l->o.job);
	switch (op->status) {
	case KV_OK:
		return KV_OK;
	case KV_ERR_PEER:
		if (l->dead)
			return fail(err, KV_ERR_PEER, "%s", l->dead_why);
		return fail(err, KV_ERR_PEER,
			    "a rank of job '%s' left or died while this op needed it", l->o.job);
	case KV_ERR_DAEMON:
		return fail(err, KV_ERR_DAEMON, "kvd stopped before the op completed (%s)",
			    l->dead ? l->dead_why : "it is shutting down");
	case KV_ERR_MISMATCH:
		return fail(err, KV_ERR_MISMATCH,
			    "rank 0 ran another kind of op on this key in this round");
	case KV_ERR_EXISTS:
		return fail(err, KV_ERR_EXISTS, "this rank already initialised the key");
	case KV_ERR_NOKEY:
		return fail(err, KV_ERR_NOKEY, "the key holds no value yet");
	default:
		return fail(err, op->status, "kvd failed the op: %s", kv_strerror(op->status));
	}
}

static bool locate(struct local *l, const void *p, size_t bytes, struct kv_loc *loc)
{
	uint32_t id;
	uint64_t off;

	if (!p || arena_locate(&l->arena, p, bytes, &id, &off))
		return false;
	loc->seg = id;
	loc->off = off;
	return true;
}

/* dst = the sum of part [off, off + elems) of nsrc buffers, some on GPUs. */
static int sum_from_devices(struct local *l, kv_dtype t, void *dst, const void *const *srcs,
			    int nsrc, size_t off, size_t elems)
{
	size_t len = elems * kv_dtype_size(t);
	const void *ps[REDUCE_MAX_INPUTS];
	uint8_t *tmp = malloc(len * (size_t)nsrc);
	int rc = 0;

	if (!tmp)
		return KV_ERR_NOMEM;
	for (int i = 0; i < nsrc && !rc; i++) {
		rc = buf_copy(l, tmp + (size_t)i * len, (const uint8_t *)srcs[i] + off, len,
			      is_dev(l, srcs[i]));
		ps[i] = tmp + (size_t)i * len;
	}
	if (!rc)
		rc = reduce_sum(REDUCE_CPU, NULL, t, &dst, 1, ps, nsrc, elems);
	free(tmp);
	return rc;
}

int local_op(struct local *l, uint8_t opc, const char *key, const void *const *srcs, int nsrc,
	     void *const *outs, int nout, size_t count, kv_dtype t, int priority,
	     kv_ticket *ticket, char *err)
{
	bool need_in = opc == KV_OP_PUSH || opc == KV_OP_PUSHPULL ||
		       ((opc == KV_OP_INIT || opc == KV_OP_BCAST) && l->o.rank == 0);
	bool need_out = opc == KV_OP_PULL || opc == KV_OP_PUSHPULL || opc == KV_OP_BCAST;
	uint8_t mode = opc == KV_OP_INIT || opc == KV_OP_BCAST ? KV_KEY_CREATE : KV_KEY_FIND;
	size_t esize = kv_dtype_size(t), bytes = count * esize;
	struct kv_loc in_loc = { .seg = KV_SEG_NONE }, out_loc = { .seg = KV_SEG_NONE };
	uint8_t *in_base = NULL;
	struct lkey *k;
	struct lop *op;
	uint32_t slot;
	bool zc_in, zc_out;
	int rc;

	if (need_in && nsrc > REDUCE_MAX_INPUTS)
		return fail(err, KV_ERR_INVALID, "at most %d local buffers per op",
			    REDUCE_MAX_INPUTS);
	pthread_mutex_lock(&l->lock);
	l->errbuf = err;
	err[0] = '\0';
	/* a kvd that went away since the last look: get it back before the op
	 * goes into a ring nobody reads (a direct op may never wait, so this is
	 * also how a one-rank job notices) */
	if (!l->dead && now_ns() - l->daemon_seen_ns > DAEMON_LOOK_NS) {
		l->daemon_seen_ns = now_ns();
		check_daemon(l);
	}
	rc = local_alive(l, err);
	if (rc)
		goto out_unlock;
	rc = key_get(l, key, count, t, mode, &k, err);
	if (rc)
		goto out_unlock;
	op = op_alloc(l, &slot);
	if (!op) {
		rc = fail(err, KV_ERR_NOMEM, "out of memory");
		goto out_unlock;
	}
	op->op = opc;
	op->nparts = k->nparts;
	op->part_elems = k->part_elems;
	op->esize = esize;
	op->count = count;
	op->async = ticket != NULL;

	if (k->dk && k->last == NULL)
		direct_moved(k);
	if (k->dk) {
		/* direct rounds: the ranks reduce the key themselves */
		if (need_out) {
			op->outs = calloc((size_t)nout, sizeof(*op->outs));
			if (!op->outs) {
				op_release(l, op);
				rc = fail(err, KV_ERR_NOMEM, "out of memory");
				goto out_unlock;
			}
			for (int i = 0; i < nout; i++)
				op->outs[op->nout++] = outs[i];
		}
		rc = direct_op(l, opc, k, op, need_in ? srcs : NULL, nsrc, err);
		if (ticket && rc == KV_OK && op->arrived) {
			*ticket = op_ud(l, op);
			goto out_unlock;
		}
		if (ticket && rc == KV_OK) { /* finished already: wait reports it */
			op->done = true;
			*ticket = op_ud(l, op);
			goto out_unlock;
		}
		op_release(l, op);
		goto out_unlock;
	}

	if (!k->pdone) {
		k->pdone = malloc(k->nparts * sizeof(*k->pdone));
		k->pflight = calloc(k->nparts, sizeof(*k->pflight));
		if (!k->pdone || !k->pflight) {
			free(k->pdone);
			k->pdone = NULL;
			op_release(l, op);
			rc = fail(err, KV_ERR_NOMEM, "out of memory");
			goto out_unlock;
		}
		for (uint32_t p = 0; p < k->nparts; p++)
			/* a key kvd took over from this process's direct rounds has
			 * run none of its own yet (every one needs this rank); an
			 * engine key, as many as kvd said when it was opened (at
			 * most: a bound errs on the safe side); else unknown */
			k->pdone[p] = k->used_direct	    ? 0
				      : !k->opened_direct ? k->rounds0
							  : ROUND_UNKNOWN;
	}
	op->rkey = k;
	op->round = opc == KV_OP_PUSH || opc == KV_OP_PUSHPULL || opc == KV_OP_BCAST;
	if (op->round && !(op->prounds = calloc(k->nparts, sizeof(*op->prounds)))) {
		op_release(l, op);
		rc = fail(err, KV_ERR_NOMEM, "out of memory");
		goto out_unlock;
	}

	/* GPU tensors: staged through this store's (pinned) segments */
	bool dev_in = false;
	for (int i = 0; need_in && l->gpu && i < nsrc; i++)
		dev_in |= is_dev(l, srcs[i]);
	for (int i = 0; need_out && l->gpu && i < nout; i++)
		op->dev_out |= is_dev(l, outs[i]);

	/* where the input comes from and the result goes: the caller's own
	 * shared buffers when it made them with kv_alloc, else a staging block */
	zc_in = need_in && nsrc == 1 && !dev_in && locate(l, srcs[0], bytes, &in_loc);
	zc_out = need_out && !op->dev_out && locate(l, outs[0], bytes, &out_loc);
	if (zc_in)
		in_base = (uint8_t *)srcs[0];
	if (zc_out)
		op->out_base = outs[0];
	if ((need_in && !zc_in) || (need_out && !zc_out)) {
		if (need_in && !zc_in && zc_out && opc != KV_OP_PULL) {
			/* copy the input into the output buffer; kvd sums in place there */
			in_base = op->out_base;
			in_loc = out_loc;
		} else {
			op->stage = arena_alloc(&l->arena, bytes);
			if (!op->stage) {
				if (!err[0])
					fail(err, KV_ERR_NOMEM,
					     "no shared memory for a %zu-byte staging buffer", bytes);
				/* growing the arena asks kvd: it may have gone meanwhile */
				rc = l->dead ? l->dead_code : KV_ERR_NOMEM;
				op_release(l, op);
				goto out_unlock;
			}
			struct kv_loc sl = { .seg = KV_SEG_NONE };
			locate(l, op->stage, bytes, &sl);
			if (need_in && !zc_in) {
				in_base = op->stage;
				in_loc = sl;
			}
			if (need_out && !zc_out) {
				op->out_base = op->stage;
				out_loc = sl;
			}
		}
	}
	if (need_out) {
		op->outs = calloc((size_t)nout, sizeof(*op->outs));
		if (!op->outs) {
			op_release(l, op);
			rc = fail(err, KV_ERR_NOMEM, "out of memory");
			goto out_unlock;
		}
		for (int i = 0; i < nout; i++)
			if (outs[i] != op->out_base)
				op->outs[op->nout++] = outs[i];
	}

	/* every part carries the epoch the op began in (kv_sqe) */
	in_loc.tag = __atomic_load_n(&l->board->epoch, __ATOMIC_SEQ_CST);
	for (uint32_t p = 0; p < k->nparts; p++) {
		size_t off = (size_t)p * k->part_elems * esize;
		uint64_t left = count - (uint64_t)p * k->part_elems;
		size_t elems = (size_t)(left < k->part_elems ? left : k->part_elems);
		struct kv_sqe s = {
			.op = opc,
			.dtype = (uint8_t)t,
			.priority = priority,
			.key = k->id,
			.part = p,
			.user_data = op_ud(l, op),
			.count = count,
			.in = in_loc,
			.out = out_loc,
		};

		if (need_in && in_base != srcs[0]) {
			if (nsrc == 1) {
				rc = buf_copy(l, in_base + off, (const uint8_t *)srcs[0] + off,
					      elems * esize, dev_in);
				if (rc) {
					fail(err, rc, "copy from the GPU failed");
					goto out_part;
				}
			} else if (dev_in) {
				/* several GPU buffers: bring each part over, sum on the host */
				rc = sum_from_devices(l, t, in_base + off, srcs, nsrc, off, elems);
				if (rc) {
					fail(err, rc, "copy from the GPU failed");
					goto out_part;
				}
			} else {
				const void *ps[REDUCE_MAX_INPUTS];
				void *dst = in_base + off;
				for (int i = 0; i < nsrc; i++)
					ps[i] = (const uint8_t *)srcs[i] + off;
				reduce_sum(REDUCE_CPU, NULL, t, &dst, 1, ps, nsrc, elems);
			}
		}
		if (s.in.seg != KV_SEG_NONE)
			s.in.off += off;
		if (s.out.seg != KV_SEG_NONE)
			s.out.off += off;
		if (opc == KV_OP_INIT)
			s.out.seg = KV_SEG_NONE, s.out.off = 0;
		if (op->round && k->pdone[p] != ROUND_UNKNOWN) /* the round it is for */
			s.out.tag = (uint32_t)(k->pdone[p] + k->pflight[p] + 1);
		rc = submit(l, &s, err);
		if (!rc && op->round)
			k->pflight[p]++;
		if (rc) {
out_part:
			/* parts already submitted will come back; the op is given up */
			op->nparts = p;
			op->abandoned = true;
			if (op->completed == op->nparts)
				op_finish(l, op);
			goto out_unlock;
		}
		if (k->nparts > 1)
			reap(l); /* copy finished parts out while later ones are summed */
	}
	if (ticket) {
		*ticket = op_ud(l, op);
		rc = KV_OK;
		goto out_unlock;
	}
	rc = wait_op(l, op, err);
	if (!op->abandoned)
		op_release(l, op);
out_unlock:
	l->errbuf = NULL;
	pthread_mutex_unlock(&l->lock);
	return rc;
}

int local_wait(struct local *l, kv_ticket ticket, char *err)
{
	uint32_t slot = (uint32_t)ticket, gen = (uint32_t)(ticket >> 32);
	struct lop *op;
	int rc;

	pthread_mutex_lock(&l->lock);
	op = slot < l->nops ? op_at(l, slot) : NULL;
	if (!op || !op->used || op->gen != gen || !op->async || op->abandoned) {
		pthread_mutex_unlock(&l->lock);
		return fail(err, KV_ERR_INVALID, "no op in flight has ticket %llu",
			    (unsigned long long)ticket);
	}
	rc = wait_op(l, op, err);
	if (!op->abandoned)
		op_release(l, op);
	pthread_mutex_unlock(&l->lock);
	return rc;
}

int local_wait_all(struct local *l, char *err)
{
	int first = KV_OK;
	char one[KV_ERRLEN];

	pthread_mutex_lock(&l->lock);
	for (uint32_t i = 0; i < l->nops; i++) {
		struct lop *op = op_at(l, i);
		int rc;

		if (!op->used || !op->async || op->abandoned)
			continue;
		rc = wait_op(l, op, one);
		if (!op->abandoned)
			op_release(l, op);
		if (rc && first == KV_OK) {
			first = rc;
			snprintf(err, KV_ERRLEN, "%s", one);
		}
	}
	pthread_mutex_unlock(&l->lock);
	return first;
}

/* ------------------------------------------------------------------ create */

static int connect_kvd(const char *path, char *err)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return fail(err, KV_ERR_DAEMON, "socket: %s", strerror(errno));
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		if (e == EACCES || e == EPERM)
			return fail(err, KV_ERR_PERM,
				    "permission denied on kvd's socket %s (or its directory): "
				    "this user may not connect",
				    path);
		return fail(err, KV_ERR_DAEMON, "no kvd answering on %s: %s", path, strerror(e));
	}
	return fd;
}

/* Close this store's side of a connection to kvd: socket, ring, doorbell.
 * The ring stays mapped until the store is destroyed: another thread may
 * still be waiting on it, unlocked. */
static void disconnect(struct local *l)
{
	if (l->sock >= 0)
		close(l->sock);
	l->sock = -1;
	if (l->doorbell >= 0)
		close(l->doorbell);
	l->doorbell = -1;
	if (l->ring) {
		struct lseg *o = realloc(l->old_rings, (l->nold_rings + 1) * sizeof(*o));
		if (o) {
			l->old_rings = o;
			o[l->nold_rings++] = (struct lseg){ -1, l->ring, l->ring_size };
		} else {
			seg_unmap(l->ring, l->ring_size); /* nobody waits on a dead ring long */
		}
	}
	l->ring = NULL;
}

/*
 * Say hello on l->sock (flags: KV_HELLO_RESUME after a restart) and take
 * the welcome: the ring and doorbell, and the board (mapped the first time;
 * the same segment afterwards).  0, or a KV_ERR_* with err.
 */
static int hello(struct local *l, uint32_t flags, char *err)
{
	const struct kv_resolved *o = &l->o;
	struct kv_msg m = { .type = KV_MSG_HELLO, .seq = ++l->seq }, r;
	uint8_t buf[KV_MSG_MAX];
	int fds[SEG_MAX_FDS], nfds = 0, rc;
	struct kv_seg_hdr *h;
	void *mem;
	size_t n;

	m.u.hello.rank = o->rank;
	m.u.hello.num_workers = o->num_workers;
	m.u.hello.device = o->device;
	m.u.hello.flags = flags;
	snprintf(m.u.hello.job, sizeof(m.u.hello.job), "%s", o->job);
	n = kv_msg_encode(&m, buf, sizeof(buf));
	if (!n || seg_send(l->sock, buf, n, NULL, 0))
		return fail(err, KV_ERR_DAEMON, "cannot send hello to kvd on %s", o->socket);
	rc = recv_one(l, buf, &r, fds, &nfds, o->timeout_ms > 0 ? o->timeout_ms : -1);
	if (rc)
		return fail(err, rc, rc == KV_ERR_TIMEOUT ? "kvd did not answer hello" : "%s",
			    l->dead_why);
	if (r.type == KV_MSG_ERROR) {
		rc = fail(err, r.u.error.code ? r.u.error.code : KV_ERR_PROTO, "kvd refused: %.*s",
			  (int)r.u.error.len, r.u.error.text);
		goto out_fds;
	}
	if (r.type != KV_MSG_WELCOME || nfds != 3) {
		rc = fail(err, KV_ERR_PROTO, "kvd answered hello with message type %u", r.type);
		goto out_fds;
	}
	rc = seg_map(fds[0], r.u.welcome.seg_size, SEG_MAP_RING, &mem);
	if (rc) {
		rc = fail(err, KV_ERR_PROTO, "cannot map the ring segment: %s", strerror(-rc));
		goto out_fds;
	}
	close(fds[0]);
	l->ring = mem;
	l->ring_size = r.u.welcome.seg_size;
	l->doorbell = fds[1];
	if (!l->board) {
		rc = seg_map(fds[2], KV_BOARD_SIZE, SEG_MAP_RING, &mem);
		if (rc) {
			close(fds[2]);
			return fail(err, KV_ERR_PROTO, "cannot map the job board: %s", strerror(-rc));
		}
		l->board = mem;
	}
	close(fds[2]);
	if (l->board->magic != KV_SHM_MAGIC || l->board->abi != KV_SHM_ABI ||
	    l->board->num_workers != (uint32_t)o->num_workers)
		return fail(err, KV_ERR_PROTO, "kvd's job board has an unknown layout");
	h = mem = l->ring;
	if (h->magic != KV_SHM_MAGIC || h->abi != KV_SHM_ABI ||
	    h->sq_entries != r.u.welcome.sq_entries || h->cq_entries != r.u.welcome.cq_entries ||
	    h->sqe_size != sizeof(struct kv_sqe) || h->cqe_size != sizeof(struct kv_cqe) ||
	    h->sq_ctl_off != KV_SQ_CTL_OFF || h->cq_ctl_off != KV_CQ_CTL_OFF ||
	    h->sq_off != KV_SQ_OFF ||
	    h->cq_off != KV_SQ_OFF + h->sq_entries * sizeof(struct kv_sqe) ||
	    kv_ring_seg_size(h->sq_entries, h->cq_entries) > l->ring_size)
		return fail(err, KV_ERR_PROTO, "kvd's ring segment has an unknown layout (ABI %u)",
			    h->abi);
	ring_attach(&l->sq, (struct kv_ring_ctl *)(l->ring + KV_SQ_CTL_OFF), l->ring + h->sq_off,
		    h->sq_entries, sizeof(struct kv_sqe), true);
	ring_attach(&l->cq, (struct kv_ring_ctl *)(l->ring + KV_CQ_CTL_OFF), l->ring + h->cq_off,
		    h->cq_entries, sizeof(struct kv_cqe), false);
	l->part_bytes = r.u.welcome.part_bytes;
	if (!l->segs) {
		l->max_segs = r.u.welcome.max_segs;
		l->segs = calloc(l->max_segs, sizeof(*l->segs));
		if (!l->segs)
			return fail(err, KV_ERR_NOMEM, "out of memory");
	} else if (r.u.welcome.max_segs < l->nsegs) {
		return fail(err, KV_ERR_DAEMON, "kvd now allows fewer segments than this store holds");
	}
	return KV_OK;

out_fds:
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	return rc;
}

int local_create(const struct kv_resolved *o, struct local **out, char *err)
{
	struct local *l = calloc(1, sizeof(*l));
	int rc;

	if (!l)
		return fail(err, KV_ERR_NOMEM, "out of memory");
	pthread_mutex_init(&l->lock, NULL);
	l->o = *o;
	l->doorbell = -1;
	l->free_op = NO_OP;
	{
		/* more ranks than CPUs to run on: a spinning waiter yields, since the
		   rank it waits for may need this CPU */
		cpu_set_t cpus;
		l->crowded = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 &&
			     o->num_workers > CPU_COUNT(&cpus);
	}
	l->sock = connect_kvd(o->socket, err);
	if (l->sock < 0) {
		rc = l->sock;
		free(l);
		return rc;
	}
	rc = hello(l, 0, err);
	if (rc) {
		local_destroy(l);
		return rc;
	}
	arena_init(&l->arena, arena_grow, l);
	l->gpu = gpu_count() > 0;
	*out = l;
	return KV_OK;
}

/* The last messages of a connection that ended: segments kvd handed over
 * just before it went away come along. */
static void drain(struct local *l)
{
	struct pollfd p = { .fd = l->sock, .events = POLLIN };
	uint8_t buf[KV_MSG_MAX];
	struct kv_msg m;
	int fds[SEG_MAX_FDS], nfds;
	ssize_t n;

	while (poll(&p, 1, 0) > 0 &&
	       (n = seg_recv(l->sock, buf, sizeof(buf), fds, SEG_MAX_FDS, &nfds)) > 0) {
		if (kv_msg_decode(buf, (size_t)n, &m, NULL) == 0)
			unsolicited(l, &m, fds, nfds);
		else
			for (int i = 0; i < nfds; i++)
				close(fds[i]);
	}
}

/* Hand kvd back what this rank kept (ADOPT): the job's segments, then its own. */
static int adopt(struct local *l, char *err)
{
	struct kv_msg m = { .type = KV_MSG_ADOPT };
	uint8_t buf[KV_MSG_MAX];
	int fds[KV_HOLD_MAX];
	uint32_t total = l->nheld + l->nsegs;

	for (uint32_t i = 0; i < total;) {
		uint32_t k;
		size_t n;
		for (k = 0; k < KV_HOLD_MAX && i < total; k++, i++) {
			if (i < l->nheld) {
				m.u.hold.kind[k] = l->held[i].kind;
				m.u.hold.id[k] = l->held[i].id;
				fds[k] = l->held[i].fd;
			} else {
				m.u.hold.kind[k] = KV_HOLD_OWN;
				m.u.hold.id[k] = i - l->nheld;
				fds[k] = l->segs[i - l->nheld].fd;
			}
		}
		m.u.hold.n = k;
		for (; k < KV_HOLD_MAX; k++)
			m.u.hold.kind[k] = m.u.hold.id[k] = 0;
		n = kv_msg_encode(&m, buf, sizeof(buf));
		if (!n || seg_send(l->sock, buf, n, fds, (int)m.u.hold.n))
			return fail(err, KV_ERR_DAEMON, "cannot hand the job's segments to kvd");
	}
	return KV_OK;
}

/*
 * kvd went away (died, or was stopped) and may come back: connect again,
 * with backoff (10 ms doubling to 250 ms) until timeout_ms (RECONNECT_MS when
 * the store has no timeout) has passed since the loss, hand back the job's segments and join as the same rank.  Keys,
 * their ids, direct segments, the board and this store's own segments all
 * stay as they are.  0, or the store stays dead with the reason.
 */
static int reconnect(struct local *l, char *err)
{
	int64_t deadline = l->lost_ms + (l->o.timeout_ms > 0 ? l->o.timeout_ms : RECONNECT_MS);
	long pause_ms = 10;
	int rc;

	drain(l);
	fail_all(l); /* what went into the old ring is lost with it */
	disconnect(l);
	for (;;) {
		err[0] = '\0';
		l->sock = connect_kvd(l->o.socket, err);
		if (l->sock >= 0) {
			l->dead = false;
			rc = adopt(l, err);
			if (!rc)
				rc = hello(l, KV_HELLO_RESUME, err);
			if (!rc) {
				l->restarts++;
				return KV_OK;
			}
			disconnect(l);
		} else {
			rc = l->sock;
		}
		/* a kvd that refused this job back will not change its mind */
		if (rc != KV_ERR_DAEMON || now_ms() >= deadline || strstr(err, "kvd refused")) {
			l->dead = true;
			l->lost = false;
			l->dead_code = rc == KV_ERR_TIMEOUT ? KV_ERR_DAEMON : rc;
			snprintf(l->dead_why, sizeof(l->dead_why),
				 "kvd went away and did not take this job back in time: %s", err);
			return fail(err, l->dead_code, "%s", l->dead_why);
		}
		pthread_mutex_unlock(&l->lock);
		usleep((useconds_t)pause_ms * 1000);
		pthread_mutex_lock(&l->lock);
		pause_ms = pause_ms < 125 ? pause_ms * 2 : 250;
	}
}

/* Before an op: a store whose kvd went away tries to get it back. */
int local_alive(struct local *l, char *err)
{
	int rc;

	/* one thread reconnects (it lets go of the lock while it waits) */
	while (l->reconnecting) {
		pthread_mutex_unlock(&l->lock);
		usleep(1000);
		pthread_mutex_lock(&l->lock);
	}
	if (!l->dead)
		return KV_OK;
	if (!l->lost)
		return fail(err, l->dead_code, "%s", l->dead_why);
	l->reconnecting = true;
	rc = reconnect(l, err);
	l->reconnecting = false;
	return rc;
}

void local_destroy(struct local *l)
{
	if (!l)
		return;
	if (l->sock >= 0)
		close(l->sock);
	if (l->doorbell >= 0)
		close(l->doorbell);
	if (l->ring)
		seg_unmap(l->ring, l->ring_size);
	for (uint32_t i = 0; i < l->nold_rings; i++)
		seg_unmap(l->old_rings[i].base, l->old_rings[i].size);
	free(l->old_rings);
	if (l->board)
		seg_unmap(l->board, KV_BOARD_SIZE);
	direct_unmap(l);
	for (uint32_t i = 0; i < l->nsegs; i++) {
		if (l->gpu)
			gpu_host_unregister(l->segs[i].base);
		seg_unmap(l->segs[i].base, l->segs[i].size);
		close(l->segs[i].fd);
	}
	free(l->segs);
	for (uint32_t i = 0; i < l->nheld; i++)
		close(l->held[i].fd);
	free(l->held);
	arena_fini(&l->arena);
	for (uint32_t i = 0; i < l->capkeys; i++) {
		if (l->keys[i]) {
			free(l->keys[i]->name);
			free(l->keys[i]->pdone);
			free(l->keys[i]->pflight);
			free(l->keys[i]);
		}
	}
	free(l->keys);
	for (uint32_t i = 0; i < l->nops; i++) {
		free(op_at(l, i)->outs);
		free(op_at(l, i)->prounds);
	}
	for (uint32_t b = 0; b < l->nops / OP_BLOCK; b++)
		free(l->opblk[b]);
	free(l->opblk);
	pthread_mutex_destroy(&l->lock);
	free(l);
}

int local_set_optimizer(struct local *l, const char *spec, char *err)
{
	struct kv_msg m = { .type = KV_MSG_OPTIMIZER }, r;
	uint8_t rbuf[KV_MSG_MAX];
	int rc = KV_OK;

	pthread_mutex_lock(&l->lock);
	/* direct rounds this rank started finish first: the keys may move to kvd */
	for (uint32_t i = 0; i < l->capkeys && rc == KV_OK; i++) {
		struct lkey *k = l->keys[i];
		if (k && k->last && !k->last->async)
			rc = direct_finish(l, k->last, err);
		else if (k && k->last)
			direct_finish(l, k->last, err); /* its kv_wait reports the status */
	}
	if (rc == KV_OK) {
		m.u.optimizer.spec = spec;
		m.u.optimizer.len = (uint32_t)strlen(spec);
		rc = request(l, &m, &r, rbuf, NULL, err);
	}
	pthread_mutex_unlock(&l->lock);
	return rc;
}

/*
 * Temp files of saves whose process died before the rename (killed while
 * kvd wrote): ".BASE.kvd-PID-N.tmp" whose PID no longer runs.  A PID reused
 * since only keeps a stale file a while longer.
 */
static void remove_dead_temps(int dirfd, const char *base)
{
	int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	size_t blen = strlen(base);
	struct dirent *e;

	if (!d) {
		if (fd >= 0)
			close(fd);
		return;
	}
	while ((e = readdir(d))) {
		const char *s = e->d_name;
		char *end;
		long pid;

		if (s[0] != '.' || strncmp(s + 1, base, blen) || strncmp(s + 1 + blen, ".kvd-", 5))
			continue;
		errno = 0;
		pid = strtol(s + 1 + blen + 5, &end, 10);
		if (errno || pid <= 0 || *end != '-' || strlen(end) < 5 ||
		    strcmp(end + strlen(end) - 4, ".tmp"))
			continue;
		if (kill((pid_t)pid, 0) < 0 && errno == ESRCH)
			unlinkat(dirfd, s, 0);
	}
	closedir(d);
}

/*
 * Checkpoints.  kvd never opens a path: paths resolve here, with this
 * process's permissions.  Save: create a temp file next to the target, hand
 * its fd to kvd, which writes and fsyncs it (one linked io_uring chain);
 * then rename it over the target and fsync the directory.  A crash at any
 * point leaves the old file or the new one, never a torn one.
 */
int local_save(struct local *l, const char *path, int dump, char *err)
{
	struct kv_msg m = { .type = KV_MSG_SAVE }, r;
	uint8_t rbuf[KV_MSG_MAX];
	static unsigned seq;
	char dir[4096], tmp[600];
	const char *base = strrchr(path, '/');
	int dirfd, fd, rc;

	if (base) {
		snprintf(dir, sizeof(dir), "%.*s", (int)(base - path), path);
		if (!dir[0])
			snprintf(dir, sizeof(dir), "/");
		base++;
	} else {
		snprintf(dir, sizeof(dir), ".");
		base = path;
	}
	if (!*base || strlen(base) > 255)
		return fail(err, KV_ERR_INVALID, "'%s' does not name a file", path);
	dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0)
		return fail(err, errno == EACCES ? KV_ERR_PERM : KV_ERR_IO,
			    "cannot open the directory '%s': %s", dir, strerror(errno));
	remove_dead_temps(dirfd, base);
	snprintf(tmp, sizeof(tmp), ".%s.kvd-%d-%u.tmp", base, (int)getpid(),
		 __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED));
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		rc = fail(err, errno == EACCES ? KV_ERR_PERM : KV_ERR_IO,
			  "cannot create a file in '%s': %s", dir, strerror(errno));
		close(dirfd);
		return rc;
	}
	m.u.file.flags = dump ? 1 : 0;
	m.u.file.path = base;
	m.u.file.len = (uint32_t)strlen(base);
	pthread_mutex_lock(&l->lock);
	rc = request_fd(l, &m, &r, rbuf, fd, NULL, err);
	pthread_mutex_unlock(&l->lock);
	close(fd);
	if (rc == KV_OK && renameat(dirfd, tmp, dirfd, base) < 0)
		rc = fail(err, KV_ERR_IO, "cannot rename the checkpoint to '%s': %s", path,
			  strerror(errno));
	if (rc == KV_OK && fsync(dirfd) < 0)
		rc = fail(err, KV_ERR_IO, "fsync of '%s': %s", dir, strerror(errno));
	if (rc != KV_OK)
		unlinkat(dirfd, tmp, 0);
	close(dirfd);
	return rc;
}

int local_load(struct local *l, const char *path, char *err)
{
	struct kv_msg m = { .type = KV_MSG_LOAD }, r;
	uint8_t rbuf[KV_MSG_MAX];
	int fd = open(path, O_RDONLY | O_CLOEXEC), rc;

	struct stat st;

	if (fd < 0)
		return fail(err, errno == EACCES ? KV_ERR_PERM : KV_ERR_IO, "cannot open '%s': %s",
			    path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return fail(err, KV_ERR_IO, "cannot load '%s': not a regular file", path);
	}
	m.u.file.path = "";
	pthread_mutex_lock(&l->lock);
	rc = request_fd(l, &m, &r, rbuf, fd, NULL, err);
	pthread_mutex_unlock(&l->lock);
	close(fd);
	return rc;
}
