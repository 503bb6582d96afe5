/* SPDX-License-Identifier: MIT */
/*
 * job.c - jobs, their keys, and the bytes they hold.
 *
 * A job is named by its creator and belongs to the creator's uid.  Its keys
 * are found by name in a private hash map (control thread only) and by id in
 * a two-level directory that the engine reads without locks: a key is fully
 * built before its pointer is stored and nkeys is store-released.  Key values
 * live in sealed memfd segments allocated through an arena, so they can be
 * counted against the job's limit like every other shared byte.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd.h"
#include "../shm/futex.h"
#include "../shm/seg.h"

#define VALUE_SEG_MIN (8u << 20)
#define PART_MAX (8u << 20)

struct keymap {
	uint32_t *slots; /* key id + 1; 0 empty */
	uint32_t cap, n;
};

static uint64_t name_hash(const char *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= (uint8_t)s[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static struct key *keymap_find(struct job *j, const char *name, size_t len)
{
	struct keymap *m = j->names;

	if (!m->cap)
		return NULL;
	for (uint32_t i = (uint32_t)name_hash(name, len) & (m->cap - 1);;
	     i = (i + 1) & (m->cap - 1)) {
		struct key *k;

		if (!m->slots[i])
			return NULL;
		k = j->dir[(m->slots[i] - 1) / KEY_BLOCK][(m->slots[i] - 1) % KEY_BLOCK];
		if (k->name_len == len && memcmp(k->name, name, len) == 0)
			return k;
	}
}

static int keymap_put(struct job *j, struct key *k)
{
	struct keymap *m = j->names;

	if ((m->n + 1) * 2 > m->cap) {
		uint32_t cap = m->cap ? m->cap * 2 : 64, *s = calloc(cap, sizeof(*s));

		if (!s)
			return -ENOMEM;
		for (uint32_t i = 0; i < m->cap; i++) {
			if (!m->slots[i])
				continue;
			struct key *o = j->dir[(m->slots[i] - 1) / KEY_BLOCK]
					      [(m->slots[i] - 1) % KEY_BLOCK];
			uint32_t h = (uint32_t)name_hash(o->name, o->name_len) & (cap - 1);
			while (s[h])
				h = (h + 1) & (cap - 1);
			s[h] = m->slots[i];
		}
		free(m->slots);
		m->slots = s;
		m->cap = cap;
	}
	uint32_t h = (uint32_t)name_hash(k->name, k->name_len) & (m->cap - 1);
	while (m->slots[h])
		h = (h + 1) & (m->cap - 1);
	m->slots[h] = k->id + 1;
	m->n++;
	return 0;
}

/* The running total of a uid's shared bytes (kvd.uid_lock held); NULL when out of memory. */
static uint64_t *uid_total(struct kvd *d, uid_t uid)
{
	for (uint32_t i = 0; i < d->nuids; i++)
		if (d->uids[i].uid == uid)
			return &d->uids[i].bytes;
	struct uid_bytes *n = realloc(d->uids, (d->nuids + 1) * sizeof(*n));
	if (!n)
		return NULL;
	d->uids = n;
	d->uids[d->nuids] = (struct uid_bytes){ uid, 0 };
	return &d->uids[d->nuids++].bytes;
}

/*
 * Count bytes of shared memory against the job and its owner's uid, or say
 * which limit they would cross.  The control thread charges; the engine
 * uncharges when it frees; the per-uid totals take a small lock of their own
 * (never taken on the data path).
 */
int job_charge(struct kvd *d, struct job *j, uint64_t bytes, char *why, size_t whylen)
{
	uint64_t now = __atomic_load_n(&j->bytes, __ATOMIC_RELAXED), *u;

	if (d->cfg.max_job_bytes && now + bytes > d->cfg.max_job_bytes) {
		snprintf(why, whylen,
			 "job '%s' would hold %llu bytes of shared memory, over its limit of "
			 "%llu (--max-job-bytes)",
			 j->name, (unsigned long long)(now + bytes),
			 (unsigned long long)d->cfg.max_job_bytes);
		return KV_ERR_NOMEM;
	}
	pthread_mutex_lock(&d->uid_lock);
	u = uid_total(d, j->uid);
	if (!u || (d->cfg.max_uid_bytes && *u + bytes > d->cfg.max_uid_bytes)) {
		if (u)
			snprintf(why, whylen,
				 "uid %u would hold %llu bytes of shared memory, over its limit of "
				 "%llu (--max-uid-bytes)",
				 (unsigned)j->uid, (unsigned long long)(*u + bytes),
				 (unsigned long long)d->cfg.max_uid_bytes);
		else
			snprintf(why, whylen, "out of memory");
		pthread_mutex_unlock(&d->uid_lock);
		return KV_ERR_NOMEM;
	}
	*u += bytes;
	pthread_mutex_unlock(&d->uid_lock);
	__atomic_add_fetch(&j->bytes, bytes, __ATOMIC_RELAXED);
	__atomic_add_fetch(&d->shared_bytes, bytes, __ATOMIC_RELAXED);
	return 0;
}

void job_uncharge(struct kvd *d, struct job *j, uint64_t bytes)
{
	uint64_t *u;

	pthread_mutex_lock(&d->uid_lock);
	u = uid_total(d, j->uid);
	if (u)
		*u -= bytes < *u ? bytes : *u;
	pthread_mutex_unlock(&d->uid_lock);
	__atomic_sub_fetch(&j->bytes, bytes, __ATOMIC_RELAXED);
	__atomic_sub_fetch(&d->shared_bytes, bytes, __ATOMIC_RELAXED);
}

struct grow_ctx {
	struct kvd *d;
	struct job *j;
	char *why;
	size_t whylen;
	struct seginfo **segs; /* the job's value or direct segments */
	uint32_t *n, *cap;
	const char *name;
};

/* arena callback: a new segment for the job's values or direct keys */
static int job_grow(void *ctx, size_t min, struct arena_seg *s)
{
	struct grow_ctx *g = ctx;
	struct job *j = g->j;
	uint64_t size = min < VALUE_SEG_MIN ? VALUE_SEG_MIN : (min + 4095) & ~(uint64_t)4095;
	uint64_t have = 0;
	void *base;
	int fd, err;

	/* segments grow with the job (a quarter of what it has), so a large
	 * model takes tens of them, not thousands: every rank holds each one's
	 * descriptor */
	for (uint32_t i = 0; i < *g->n; i++)
		have += (*g->segs)[i].size;
	if (have / 4 > size)
		size = (have / 4 + 4095) & ~(uint64_t)4095;

	if (*g->n == *g->cap) {
		uint32_t cap = *g->cap ? *g->cap * 2 : 8;
		struct seginfo *n = realloc(*g->segs, cap * sizeof(*n));
		if (!n)
			return ENOMEM;
		*g->segs = n;
		*g->cap = cap;
	}
	if (job_charge(g->d, j, size, g->why, g->whylen))
		return ENOMEM;
	fd = seg_create(g->name, size);
	if (fd < 0) {
		snprintf(g->why, g->whylen, "cannot create a %llu-byte segment for keys: %s",
			 (unsigned long long)size, strerror(-fd));
		job_uncharge(g->d, j, size);
		return ENOMEM;
	}
	err = seg_map(fd, size, 0, &base);
	if (err) {
		snprintf(g->why, g->whylen, "cannot map a key segment: %s", strerror(-err));
		close(fd);
		job_uncharge(g->d, j, size);
		return ENOMEM;
	}
	(*g->segs)[*g->n] = (struct seginfo){ fd, base, size };
	pin_segment(base, size);
	s->id = (*g->n)++;
	s->base = base;
	s->size = size;
	return 0;
}

static void *job_alloc(struct kvd *d, struct job *j, bool direct, size_t bytes, char *why,
		       size_t whylen)
{
	struct grow_ctx g = { .d = d, .j = j, .why = why, .whylen = whylen };
	struct arena *a = direct ? &j->direct : &j->values;
	void *p;

	if (direct) {
		g.segs = &j->direct_segs;
		g.n = &j->ndirect_segs;
		g.cap = &j->cap_direct_segs;
		g.name = "kvd-direct";
	} else {
		g.segs = &j->value_segs;
		g.n = &j->nvalue_segs;
		g.cap = &j->cap_value_segs;
		g.name = "kvd-values";
	}
	a->ctx = &g;
	p = arena_alloc(a, bytes);
	a->ctx = NULL;
	return p;
}

/* An engine key's value block: every part at version 0, no value yet. */
static int key_value_alloc(struct kvd *d, struct job *j, struct key *k, char *why, size_t whylen)
{
	uint64_t bytes = k->count * k->esize;
	uint8_t *blk = job_alloc(d, j, false, kv_vblock_size(k->nparts, bytes), why, whylen);

	if (!blk)
		return -1;
	k->vparts = (struct kv_vpart *)blk;
	memset(k->vparts, 0, k->nparts * sizeof(struct kv_vpart));
	k->vcopy[0] = blk + kv_vblock_copy_off(k->nparts, bytes, 0);
	k->vcopy[1] = blk + kv_vblock_copy_off(k->nparts, bytes, 1);
	return 0;
}

void part_publish(struct key *k, uint32_t part)
{
	struct part *p = &k->parts[part];
	struct kv_vpart *v = &k->vparts[part];
	uint64_t ver = p->ver + 1;

	p->spare_rounds = p->live_rounds;
	p->live_rounds = p->rounds_done;
	/* atomic stores: the control thread reads rounds for key replies */
	__atomic_store_n(&v->rec[ver & 1].rounds, p->rounds_done, __ATOMIC_RELAXED);
	__atomic_store_n(&v->rec[ver & 1].opt_t, p->opt_t, __ATOMIC_RELAXED);
	__atomic_store_n(&v->rec[ver & 1].has_value, (uint32_t)p->has_value, __ATOMIC_RELAXED);
	__atomic_store_n(&v->rec[ver & 1].opt_fresh, p->has_states ? p->opt_fresh : 0,
			 __ATOMIC_RELAXED);
	/* the copy and record written before become the part's state */
	__atomic_store_n(&v->ver, ver, __ATOMIC_RELEASE);
	p->ver = ver;
}

/* Chunk c of the job's manifest, made when missing (chunk 0 with the job;
 * later ones are charged to it).  0, or a KV_ERR_* with why. */
static int man_chunk(struct kvd *d, struct job *j, uint32_t c, char *why, size_t whylen)
{
	uint64_t size = kv_man_size(c);
	struct kv_man_hdr *h;
	void *base;
	int fd, err;

	if (c < j->nman)
		return 0;
	if (c >= KV_MAN_CHUNKS || c != j->nman) {
		snprintf(why, whylen, "the job's manifest is full");
		return KV_ERR_NOMEM;
	}
	if (c && (err = job_charge(d, j, size, why, whylen)))
		return err;
	fd = seg_create("kvd-manifest", size);
	if (fd < 0 || (err = seg_map(fd, size, 0, &base))) {
		snprintf(why, whylen, "cannot make a %llu-byte manifest segment: %s",
			 (unsigned long long)size, strerror(fd < 0 ? -fd : -err));
		if (fd >= 0)
			close(fd);
		if (c)
			job_uncharge(d, j, size);
		return KV_ERR_NOMEM;
	}
	h = base;
	h->magic = KV_MAN_MAGIC;
	h->abi = KV_SHM_ABI;
	h->num_workers = (uint32_t)j->num_workers;
	h->chunk = c;
	if (c == 0)
		snprintf(h->job, sizeof(h->job), "%s", j->name);
	j->man[c] = (struct seginfo){ fd, base, size };
	j->nman = c + 1;
	return 0;
}

static struct kv_mkey *man_rec(struct job *j, uint32_t id)
{
	uint32_t c = 0;

	while (kv_man_first(c + 1) <= id)
		c++;
	return (struct kv_mkey *)(j->man[c].base + KV_MAN_HDR) + (id - kv_man_first(c));
}

/* Where the value block of engine key k lies, into its manifest record. */
static void man_value(struct job *j, struct key *k, struct kv_mkey *r)
{
	uint32_t seg = 0;
	uint64_t off = 0;

	arena_locate(&j->values, k->vparts, 1, &seg, &off);
	r->vseg = seg;
	r->voff = off;
}

/* Room in the manifest for key id: its chunk, made if needed. */
static int man_room(struct kvd *d, struct job *j, uint32_t id, char *why, size_t whylen)
{
	uint32_t c = 0;

	while (kv_man_first(c + 1) <= id)
		c++;
	return man_chunk(d, j, c, why, whylen);
}

/* The record of a key just made (job_man_publish publishes it). */
static void man_key(struct job *j, struct key *k)
{
	struct kv_mkey *r = man_rec(j, k->id);

	memset(r, 0, sizeof(*r));
	r->count = k->count;
	r->nparts = k->nparts;
	r->part_elems = k->part_elems;
	r->dtype = (uint8_t)k->dtype;
	r->name_len = (uint16_t)k->name_len;
	memcpy(r->name, k->name, k->name_len);
	if (k->dkey) {
		r->flags = KV_MKEY_DIRECT;
		r->dseg = k->dseg;
		r->doff = k->doff;
	} else {
		r->flags = KV_MKEY_VALUE;
		man_value(j, k, r);
	}
}

uint64_t key_rounds_bound(const struct key *k)
{
	uint64_t m = 0;

	for (uint32_t p = 0; k->vparts && p < k->nparts; p++)
		for (int c = 0; c < 2; c++) {
			uint64_t r = __atomic_load_n(&k->vparts[p].rec[c].rounds, __ATOMIC_RELAXED);
			m = r > m ? r : m;
		}
	return m;
}

void job_man_publish(struct job *j, const struct key *k)
{
	__atomic_store_n(&job_man(j)->nkeys, k->id + 1, __ATOMIC_RELEASE);
}

void job_man_opt(struct job *j, const struct opt_cfg *opt)
{
	struct kv_man_hdr *h = job_man(j);
	uint64_t ver = h->opt_ver + 1;
	struct kv_man_opt *o = &h->opt[ver & 1];

	o->len = opt ? (uint32_t)strlen(opt->spec) : 0;
	o->fresh = opt ? opt->fresh : 0;
	memset(o->spec, 0, sizeof(o->spec));
	if (opt)
		memcpy(o->spec, opt->spec, o->len);
	__atomic_store_n(&h->opt_ver, ver, __ATOMIC_RELEASE);
}

/* A state block of na arrays for key k at blk (an arena block, or adopted). */
static struct sblock *sblock_at(struct key *k, uint8_t *blk, uint32_t na)
{
	struct sblock *sb = calloc(1, sizeof(*sb));

	if (!sb)
		return NULL;
	sb->narrays = na;
	sb->master = k->dtype != KV_FLOAT32;
	sb->copy[0] = (float *)blk;
	sb->copy[1] = (float *)blk + (size_t)na * k->count;
	return sb;
}

/*
 * The optimizer state block engine key k needs for opt, made unless it has
 * one of that shape (the old one stays until the job ends: the engine may
 * be reading it).  0, or KV_ERR_NOMEM with why.
 */
static int key_states(struct kvd *d, struct job *j, struct key *k, const struct opt_cfg *opt,
		      char *why, size_t whylen)
{
	uint32_t na = opt_arrays(k, opt);
	struct kv_mkey *r = man_rec(j, k->id);
	struct sblock *sb;
	uint8_t *blk;
	uint32_t seg = 0;
	uint64_t off = 0;

	if (!k->vparts || !opt_dtype(k->dtype) || !na || (k->sblk && k->sblk->narrays == na))
		return 0;
	blk = job_alloc(d, j, false, 2 * (size_t)na * k->count * sizeof(float), why, whylen);
	if (!blk || !(sb = sblock_at(k, blk, na))) {
		if (blk)
			arena_free(&j->values, blk);
		if (!why[0])
			snprintf(why, whylen, "no room for the optimizer states of key '%s'",
				 k->name);
		return KV_ERR_NOMEM;
	}
	sb->older = k->sblk;
	arena_locate(&j->values, blk, 1, &seg, &off);
	r->sseg = seg;
	r->soff = off;
	__atomic_store_n(&r->sarrays, na | (sb->master ? KV_MKEY_MASTER : 0), __ATOMIC_RELEASE);
	/* publishes the block to the engine; pairs with the load-acquire in part_opt_state */
	__atomic_store_n(&k->sblk, sb, __ATOMIC_RELEASE);
	return 0;
}

void job_board_set(struct job *j, enum kv_board_state st)
{
	uint32_t n = __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE);

	__atomic_store_n(&j->board->state, (uint32_t)st, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&j->board->epoch, 1, __ATOMIC_SEQ_CST);
	futex_wake(&j->board->epoch, INT32_MAX);
	/* ranks asleep in a direct round or init re-check the board when woken */
	for (uint32_t i = 0; i < n; i++) {
		struct key *k = job_key(j, i);
		if (k->dkey) {
			futex_wake(&k->dkey->done, INT32_MAX);
			futex_wake(&k->dkey->has_value, INT32_MAX);
		}
	}
}

void job_board_present(struct job *j, int rank, bool present)
{
	uint8_t *p = (uint8_t *)j->board + KV_BOARD_PRESENT_OFF;

	__atomic_store_n(&p[rank], present ? 1 : 0, __ATOMIC_SEQ_CST);
}

void job_direct_forget(struct job *j, int rank)
{
	uint32_t n = __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE);

	for (uint32_t i = 0; i < n; i++) {
		struct key *k = job_key(j, i);
		uint8_t *inited;

		if (!k->dkey)
			continue;
		inited = (uint8_t *)k->dkey + kv_dkey_inited_off();
		__atomic_store_n(&inited[rank], 0, __ATOMIC_RELAXED);
		/* a lock the dead rank held: nobody else will ever release it */
		uint32_t held = (uint32_t)rank + 1;
		__atomic_compare_exchange_n(&k->dkey->lock, &held, 0, false, __ATOMIC_RELEASE,
					    __ATOMIC_RELAXED);
	}
}

struct job *job_find(struct kvd *d, const char *name)
{
	for (struct job *j = d->jobs; j; j = j->next)
		if (strcmp(j->name, name) == 0)
			return j;
	return NULL;
}

/* A job with no shared memory yet: board_fd -1, no manifest (job_free copes). */
static struct job *job_new(const char *name, uid_t uid, int num_workers, char *why,
			   size_t whylen)
{
	struct job *j = calloc(1, sizeof(*j));

	snprintf(why, whylen, "out of memory creating job '%s'", name);
	if (!j)
		return NULL;
	j->board_fd = -1;
	j->names = calloc(1, sizeof(*j->names));
	j->ranks = calloc((size_t)num_workers, sizeof(*j->ranks));
	j->eng_ranks = calloc((size_t)num_workers, sizeof(*j->eng_ranks));
	if (!j->names || !j->ranks || !j->eng_ranks) {
		free(j->names);
		free(j->ranks);
		free(j->eng_ranks);
		free(j);
		return NULL;
	}
	snprintf(j->name, sizeof(j->name), "%s", name);
	j->uid = uid;
	j->num_workers = num_workers;
	j->created = kvd_now();
	arena_init(&j->values, job_grow, NULL);
	arena_init(&j->direct, job_grow, NULL);
	return j;
}

struct job *job_create(struct kvd *d, const char *name, uid_t uid, int num_workers, char *why,
		       size_t whylen)
{
	struct job *j = job_new(name, uid, num_workers, why, whylen);
	int fd;

	if (!j)
		return NULL;
	fd = seg_create("kvd-board", KV_BOARD_SIZE);
	if (fd < 0) {
		snprintf(why, whylen, "cannot make job '%s' a board: %s", name, strerror(-fd));
		goto out_free;
	}
	j->board_fd = fd;
	if (seg_map(fd, KV_BOARD_SIZE, 0, (void **)&j->board))
		goto out_free;
	j->board->magic = KV_SHM_MAGIC;
	j->board->abi = KV_SHM_ABI;
	j->board->num_workers = (uint32_t)num_workers;
	j->board->state = KV_BOARD_JOINING;
	if (man_chunk(d, j, 0, why, whylen))
		goto out_free;
	return j;

out_free:
	job_free(d, j);
	return NULL;
}

static void key_free(struct key *k, int num_workers)
{
	if (!k)
		return;
	for (struct sblock *sb = k->sblk, *older; sb; sb = older) {
		older = sb->older;
		free(sb);
	}
	for (uint32_t p = 0; p < k->nparts; p++) {
		free(k->parts[p].head);
		free(k->parts[p].tail);
		free(k->parts[p].submitted);
		free(k->parts[p].inited);
	}
	free(k->parts);
	free(k->name);
	free(k);
}

void job_free(struct kvd *d, struct job *j)
{
	for (uint32_t i = 0; i < j->nkeys; i++)
		key_free(j->dir[i / KEY_BLOCK][i % KEY_BLOCK], j->num_workers);
	for (uint32_t b = 0; b < KEY_DIR && j->dir[b]; b++)
		free(j->dir[b]);
	for (uint32_t i = 0; i < j->nvalue_segs; i++) {
		pin_release(j->value_segs[i].base);
		seg_unmap(j->value_segs[i].base, j->value_segs[i].size);
		close(j->value_segs[i].fd);
		job_uncharge(d, j, j->value_segs[i].size);
	}
	free(j->value_segs);
	arena_fini(&j->values);
	for (uint32_t i = 0; i < j->ndirect_segs; i++) {
		pin_release(j->direct_segs[i].base);
		seg_unmap(j->direct_segs[i].base, j->direct_segs[i].size);
		close(j->direct_segs[i].fd);
		job_uncharge(d, j, j->direct_segs[i].size);
	}
	free(j->direct_segs);
	arena_fini(&j->direct);
	for (struct opt_cfg *o = j->opt, *older; o; o = older) {
		older = o->older;
		free(o);
	}
	free(j->opt_pending);
	free(j->opt_votes);
	seg_unmap(j->board, KV_BOARD_SIZE);
	if (j->board_fd >= 0)
		close(j->board_fd);
	for (uint32_t c = 0; c < j->nman; c++) {
		seg_unmap(j->man[c].base, j->man[c].size);
		close(j->man[c].fd);
		if (c)
			job_uncharge(d, j, j->man[c].size);
	}
	if (j->names)
		free(j->names->slots);
	free(j->names);
	free(j->ranks);
	free(j->eng_ranks);
	free(j);
}

static const char *dtype_name(kv_dtype t)
{
	static const char *const names[] = { "float32", "float64", "float16",
					     "bfloat16", "int32", "int64" };
	return (unsigned)t < 6 ? names[t] : "?";
}

/*
 * A key's part size: --part-size, or larger for large keys (about eight
 * parts each, up to PART_MAX): enough parts for copies to overlap sums,
 * few enough that handing parts around costs little.
 */
static uint32_t key_part_bytes(struct kvd *d, uint64_t bytes)
{
	uint64_t p = bytes / 8;

	p = (p + 4095) & ~(uint64_t)4095;
	if (p < d->cfg.part_bytes)
		p = d->cfg.part_bytes;
	if (p > PART_MAX)
		p = PART_MAX > d->cfg.part_bytes ? PART_MAX : d->cfg.part_bytes;
	return (uint32_t)p;
}

static struct key *key_alloc(struct job *j, const char *name, uint32_t len, uint64_t count,
			     kv_dtype t, uint32_t part_bytes)
{
	struct key *k = calloc(1, sizeof(*k));
	int n = j->num_workers;

	if (!k)
		return NULL;
	k->name = malloc(len + 1u);
	if (!k->name)
		goto out_free;
	memcpy(k->name, name, len);
	k->name[len] = '\0';
	k->name_len = len;
	k->count = count;
	k->dtype = t;
	k->esize = (uint32_t)kv_dtype_size(k->dtype);
	k->part_elems = part_bytes / k->esize;
	k->nparts = (uint32_t)((k->count + k->part_elems - 1) / k->part_elems);
	k->parts = calloc(k->nparts, sizeof(*k->parts));
	if (!k->parts)
		goto out_free;
	for (uint32_t p = 0; p < k->nparts; p++) {
		struct part *pt = &k->parts[p];
		pt->head = calloc((size_t)n, sizeof(*pt->head));
		pt->tail = calloc((size_t)n, sizeof(*pt->tail));
		pt->submitted = calloc((size_t)n, sizeof(*pt->submitted));
		pt->inited = calloc((size_t)n, 1);
		if (!pt->head || !pt->tail || !pt->submitted || !pt->inited)
			goto out_free;
	}
	return k;

out_free:
	key_free(k, n);
	return NULL;
}

int job_key_open(struct kvd *d, struct job *j, const struct kv_msg *m, int rank,
		 struct key **out, bool *created, char *why, size_t whylen)
{
	const char *name = m->u.key_open.name;
	uint32_t len = m->u.key_open.name_len;
	struct key *k = keymap_find(j, name, len);
	uint64_t bytes;
	int rc;

	*created = false;
	if (k) {
		if (k->count != m->u.key_open.count || k->dtype != m->u.key_open.dtype) {
			snprintf(why, whylen,
				 "key '%s' holds %llu %s elements; this call has %llu %s",
				 k->name, (unsigned long long)k->count, dtype_name(k->dtype),
				 (unsigned long long)m->u.key_open.count,
				 dtype_name((kv_dtype)m->u.key_open.dtype));
			return KV_ERR_MISMATCH;
		}
		if (m->u.key_open.mode == KV_KEY_FIND && !key_has_value(k)) {
			snprintf(why, whylen, "key '%s' has not been initialised yet", k->name);
			return KV_ERR_NOKEY;
		}
		*out = k;
		return 0;
	}
	if (m->u.key_open.mode == KV_KEY_FIND) {
		snprintf(why, whylen, "key '%.*s' was never initialised", (int)len, name);
		return KV_ERR_NOKEY;
	}
	if (rank != 0) {
		snprintf(why, whylen, "key '%.*s' does not exist yet: rank 0's init or broadcast "
			 "creates it", (int)len, name);
		return KV_ERR_NOKEY;
	}
	if (j->nkeys >= d->cfg.max_keys || j->nkeys >= KEY_DIR * KEY_BLOCK) {
		snprintf(why, whylen, "job '%s' already has %u keys, its limit (--max-keys)",
			 j->name, j->nkeys);
		return KV_ERR_NOMEM;
	}
	if ((rc = man_room(d, j, j->nkeys, why, whylen)))
		return rc;
	bytes = m->u.key_open.count * kv_dtype_size((kv_dtype)m->u.key_open.dtype);
	k = key_alloc(j, name, len, m->u.key_open.count, (kv_dtype)m->u.key_open.dtype,
		      key_part_bytes(d, bytes));
	if (!k) {
		snprintf(why, whylen, "out of memory creating key '%.*s'", (int)len, name);
		return KV_ERR_NOMEM;
	}
	why[0] = '\0';
	if (bytes <= d->cfg.direct_max && !j->opt) {
		/* direct rounds when there is room; the engine path otherwise */
		uint64_t size = kv_dkey_size((uint32_t)j->num_workers, bytes);
		void *blk = job_alloc(d, j, true, size, why, whylen);
		if (blk) {
			struct arena_seg *sg = NULL;
			for (uint32_t i = 0; i < j->direct.nsegs; i++)
				if ((uint8_t *)blk >= j->direct.segs[i].base &&
				    (uint8_t *)blk < j->direct.segs[i].base + j->direct.segs[i].size)
					sg = &j->direct.segs[i];
			k->dkey = blk;
			k->dseg = sg->id;
			k->doff = (uint64_t)((uint8_t *)blk - sg->base);
			memset(blk, 0, size);
		}
		why[0] = '\0';
	}
	if (!k->dkey)
		key_value_alloc(d, j, k, why, whylen);
	if (!k->vparts && !k->dkey) {
		if (!why[0])
			snprintf(why, whylen, "no room for the %llu bytes of key '%s'",
				 (unsigned long long)bytes, k->name);
		key_free(k, j->num_workers);
		return KV_ERR_NOMEM;
	}
	k->id = j->nkeys;
	if (!j->dir[k->id / KEY_BLOCK]) {
		j->dir[k->id / KEY_BLOCK] = calloc(KEY_BLOCK, sizeof(struct key *));
		if (!j->dir[k->id / KEY_BLOCK])
			goto out_nomem;
	}
	if (keymap_put(j, k))
		goto out_nomem;
	j->dir[k->id / KEY_BLOCK][k->id % KEY_BLOCK] = k;
	man_key(j, k);
	if (j->opt && key_states(d, j, k, j->opt, why, whylen))
		kvd_log("job %s: %s (its updates will fail)", j->name, why);
	/* publishes the key built above to the engine; pairs with job_key() */
	__atomic_store_n(&j->nkeys, k->id + 1, __ATOMIC_RELEASE);
	*created = true;
	*out = k;
	return 0;

out_nomem:
	if (k->dkey)
		arena_free(&j->direct, k->dkey);
	else
		arena_free(&j->values, k->vparts);
	key_free(k, j->num_workers);
	snprintf(why, whylen, "out of memory creating key '%.*s'", (int)len, name);
	return KV_ERR_NOMEM;
}

int job_set_optimizer(struct kvd *d, struct job *j, struct opt_cfg *opt, char *why,
		      size_t whylen)
{
	struct opt_cfg *cur = j->opt;
	uint32_t n = j->nkeys;

	/*
	 * The optimizer runs in kvd: direct keys move to the engine.  Every rank
	 * is inside kv_set_optimizer (it is collective), so no direct round is
	 * open; the engine has never touched these keys, so their engine-side
	 * fields are set here and published by the release store of moved.
	 */
	for (uint32_t i = 0; i < n; i++) {
		struct key *k = job_key(j, i);
		uint64_t bytes = k->count * k->esize;
		uint32_t done;
		bool has;

		if (!k->dkey || k->moved)
			continue;
		if (key_value_alloc(d, j, k, why, whylen)) {
			if (!why[0])
				snprintf(why, whylen, "no room for the value of key '%s'", k->name);
			return KV_ERR_NOMEM;
		}
		has = __atomic_load_n(&k->dkey->has_value, __ATOMIC_ACQUIRE) != 0;
		done = __atomic_load_n(&k->dkey->done, __ATOMIC_ACQUIRE);
		/* every part's spare copy is copy 1: the direct result goes there */
		if (has)
			memcpy(k->vcopy[1],
			       (uint8_t *)k->dkey + kv_dkey_result_off((uint32_t)j->num_workers, bytes,
								       done & 1),
			       bytes);
		for (uint32_t p = 0; p < k->nparts; p++) {
			k->parts[p].has_value = has;
			part_publish(k, p);
		}
		man_value(j, k, man_rec(j, k->id));
		__atomic_or_fetch(&man_rec(j, k->id)->flags, KV_MKEY_VALUE, __ATOMIC_RELEASE);
		k->parts_valued = has ? k->nparts : 0;
		__atomic_store_n(&k->has_value, has ? 1 : 0, __ATOMIC_RELAXED);
		__atomic_store_n(&k->dkey->moved, 1, __ATOMIC_SEQ_CST);
		/* publishes the fields above to the engine; pairs with key_direct() */
		__atomic_store_n(&k->moved, 1, __ATOMIC_RELEASE);
	}
	opt->fresh = cur && strcmp(cur->name, opt->name) == 0 ? cur->fresh : (cur ? cur->fresh + 1 : 1);
	for (uint32_t i = 0; i < n; i++) {
		int rc = key_states(d, j, job_key(j, i), opt, why, whylen);
		if (rc)
			return rc;
	}
	opt->older = cur;
	job_man_opt(j, opt);
	/* pairs with the load-acquire in the engine's round_task() */
	__atomic_store_n(&j->opt, opt, __ATOMIC_RELEASE);
	kvd_log("job %s: optimizer '%s'%s", j->name, opt->spec,
		cur && opt->fresh == cur->fresh ? " (states kept)" : "");
	return 0;
}

/* ------------------------------------------------------------------ restart */

/* The held segment of a kind and id, or NULL. */
static const struct kv_adopt *adopted(const struct kv_adopt *a, uint32_t n, uint32_t kind,
				      uint32_t id)
{
	for (uint32_t i = 0; i < n; i++)
		if (a[i].kind == kind && a[i].id == id)
			return &a[i];
	return NULL;
}

/* Map a held segment (a copy of its fd; seals and size checked) into *s. */
static int adopt_map(const struct kv_adopt *h, uint64_t want, struct seginfo *s, char *why,
		     size_t whylen, const char *what)
{
	ssize_t size = h ? seg_size(h->fd) : -EBADF;
	struct stat st;
	int fd, err;

	if (!h) {
		snprintf(why, whylen, "no rank held the job's %s", what);
		return -1;
	}
	if (size < 0 || (want && (uint64_t)size != want) || size == 0) {
		snprintf(why, whylen, "the %s a rank held has the wrong size", what);
		return -1;
	}
	/* kvd allocates its segments whole (fallocate): a sparse one is not kvd's,
	 * and would let a record claim memory nobody has */
	if (fstat(h->fd, &st) || (uint64_t)st.st_blocks * 512 < (uint64_t)size) {
		snprintf(why, whylen, "the %s a rank held is not one kvd made (not allocated)",
			 what);
		return -1;
	}
	fd = fcntl(h->fd, F_DUPFD_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(why, whylen, "cannot keep the %s: %s", what, strerror(errno));
		return -1;
	}
	err = seg_map(fd, (size_t)size, 0, (void **)&s->base);
	if (err) {
		snprintf(why, whylen, "cannot map the %s a rank held: %s", what, strerror(-err));
		close(fd);
		return -1;
	}
	s->fd = fd;
	s->size = (uint64_t)size;
	return 0;
}

/* Every held segment of a kind, ids 0..n-1 with none missing, into an arena. */
static int adopt_segs(struct kvd *d, struct job *j, const struct kv_adopt *a, uint32_t n,
		      uint32_t kind, char *why, size_t whylen)
{
	bool direct = kind == KV_HOLD_DIRECT;
	struct seginfo **segs = direct ? &j->direct_segs : &j->value_segs;
	uint32_t *cnt = direct ? &j->ndirect_segs : &j->nvalue_segs;
	uint32_t *cap = direct ? &j->cap_direct_segs : &j->cap_value_segs;
	uint32_t max = 0;

	for (uint32_t i = 0; i < n; i++)
		if (a[i].kind == kind && a[i].id + 1 > max)
			max = a[i].id + 1;
	if (!max)
		return 0;
	*segs = calloc(max, sizeof(**segs));
	if (!*segs) {
		snprintf(why, whylen, "out of memory");
		return -1;
	}
	*cap = max;
	for (uint32_t id = 0; id < max; id++) {
		struct seginfo sg;
		if (adopt_map(adopted(a, n, kind, id), 0, &sg, why, whylen,
			      direct ? "direct segment" : "value segment"))
			return -1;
		if (job_charge(d, j, sg.size, why, whylen)) {
			seg_unmap(sg.base, sg.size);
			close(sg.fd);
			return -1;
		}
		(*segs)[(*cnt)++] = sg;
		pin_segment(sg.base, sg.size);
		if (arena_add_seg(direct ? &j->direct : &j->values, id, sg.base, sg.size)) {
			snprintf(why, whylen, "out of memory");
			return -1;
		}
	}
	return 0;
}

/* An engine key's parts as its value block left them. */
static void adopt_parts(struct key *k)
{
	uint32_t valued = 0;

	for (uint32_t pi = 0; pi < k->nparts; pi++) {
		struct part *p = &k->parts[pi];
		uint64_t ver = __atomic_load_n(&k->vparts[pi].ver, __ATOMIC_ACQUIRE);
		struct kv_vrec r = k->vparts[pi].rec[ver & 1];

		p->ver = ver;
		p->rounds_done = p->live_rounds = r.rounds;
		p->spare_rounds = ver ? k->vparts[pi].rec[(ver + 1) & 1].rounds : 0;
		p->opt_t = r.opt_t;
		p->opt_fresh = r.opt_fresh;
		p->has_states = r.opt_fresh != 0;
		p->has_value = r.has_value != 0;
		valued += p->has_value;
	}
	k->parts_valued = valued;
	k->has_value = valued == k->nparts;
}

/*
 * An engine key's optimizer state block, if its record names one.  States
 * without a block that checks out (none recorded, a kvd killed before the
 * ranks got its segment, or garbage) start afresh at the next update.
 */
static void adopt_states(struct job *j, struct key *k, const struct kv_mkey *r)
{
	uint32_t na = r->sarrays & 0xff;
	bool master = r->sarrays & KV_MKEY_MASTER;
	void *blk = NULL;

	if (r->sarrays && na && na <= 3 && !(r->sarrays & ~(0xffu | KV_MKEY_MASTER)) &&
	    opt_dtype(k->dtype) && master == (k->dtype != KV_FLOAT32) &&
	    arena_reserve(&j->values, r->sseg, r->soff,
			  2 * (size_t)na * k->count * sizeof(float), &blk) == 0)
		k->sblk = sblock_at(k, blk, na);
	for (uint32_t p = 0; p < k->nparts; p++) {
		/* states the job's optimizer cannot use start afresh */
		if (!j->opt || opt_arrays(k, j->opt) != (k->sblk ? na : 0))
			k->parts[p].has_states = false;
		k->parts[p].states_in = k->sblk;
	}
}

/* Key id from its manifest record, checked against everything else known. */
static int adopt_key(struct kvd *d, struct job *j, uint32_t id, char *why, size_t whylen)
{
	struct kv_mkey r = *man_rec(j, id); /* one copy: the shared bytes may change */
	uint32_t nw = (uint32_t)j->num_workers, pmax = PART_MAX > d->cfg.part_bytes
							      ? PART_MAX : d->cfg.part_bytes;
	uint64_t bytes;
	size_t esize;
	struct key *k;
	void *dblk = NULL, *vblk = NULL;

	if (r.name_len < 1 || r.name_len > KV_KEY_MAX || memchr(r.name, '\0', r.name_len) ||
	    r.dtype > KV_INT64 || !r.count || r.count > ((uint64_t)1 << 40) || !r.part_elems ||
	    (uint64_t)r.part_elems * kv_dtype_size((kv_dtype)r.dtype) > pmax ||
	    r.nparts != (r.count + r.part_elems - 1) / r.part_elems ||
	    !(r.flags & (KV_MKEY_DIRECT | KV_MKEY_VALUE)) ||
	    (r.flags & ~(uint32_t)(KV_MKEY_DIRECT | KV_MKEY_VALUE))) {
		snprintf(why, whylen, "the manifest's record of key %u is corrupt", id);
		return -1;
	}
	if (keymap_find(j, r.name, r.name_len)) {
		snprintf(why, whylen, "the manifest names key '%.*s' twice", (int)r.name_len,
			 r.name);
		return -1;
	}
	/* parts are at least 4 KiB (kvd's smallest --part-size) unless the key
	 * has one: a record cannot make kvd keep millions of them */
	esize = kv_dtype_size((kv_dtype)r.dtype);
	if (r.nparts > 1 && ((uint64_t)r.part_elems * esize < 4096 ||
			     (uint64_t)r.part_elems * esize % 64)) {
		snprintf(why, whylen, "the manifest's record of key %u is corrupt", id);
		return -1;
	}
	bytes = r.count * esize;
	/* the blocks first: a record must point at memory the job really has */
	if (((r.flags & KV_MKEY_DIRECT) &&
	     arena_reserve(&j->direct, r.dseg, r.doff, kv_dkey_size(nw, bytes), &dblk)) ||
	    ((r.flags & KV_MKEY_VALUE) &&
	     arena_reserve(&j->values, r.vseg, r.voff, kv_vblock_size(r.nparts, bytes), &vblk))) {
		snprintf(why, whylen,
			 "key '%.*s' lies outside the job's segments or on another key",
			 (int)r.name_len, r.name);
		return -1;
	}
	k = key_alloc(j, r.name, r.name_len, r.count, (kv_dtype)r.dtype,
		      r.part_elems * (uint32_t)esize);
	if (!k) {
		snprintf(why, whylen, "out of memory");
		return -1;
	}
	k->id = id;
	if (r.flags & KV_MKEY_DIRECT) {
		k->dkey = dblk;
		k->dseg = r.dseg;
		k->doff = r.doff;
	}
	if (r.flags & KV_MKEY_VALUE) {
		void *blk = vblk;
		k->vparts = blk;
		k->vcopy[0] = (uint8_t *)blk + kv_vblock_copy_off(k->nparts, bytes, 0);
		k->vcopy[1] = (uint8_t *)blk + kv_vblock_copy_off(k->nparts, bytes, 1);
		k->moved = k->dkey != NULL;
		if (k->moved) /* a kvd killed while it moved the key finishes that */
			__atomic_store_n(&k->dkey->moved, 1, __ATOMIC_SEQ_CST);
		adopt_parts(k);
		adopt_states(j, k, &r);
	}
	if ((!j->dir[id / KEY_BLOCK] &&
	     !(j->dir[id / KEY_BLOCK] = calloc(KEY_BLOCK, sizeof(struct key *)))) ||
	    keymap_put(j, k)) {
		key_free(k, j->num_workers);
		snprintf(why, whylen, "out of memory");
		return -1;
	}
	j->dir[id / KEY_BLOCK][id % KEY_BLOCK] = k;
	j->nkeys = id + 1;
	return 0;
}

/* The optimizer the manifest names. */
static int adopt_opt(struct job *j, char *why, size_t whylen)
{
	struct kv_man_hdr *h = job_man(j);
	uint64_t ver = __atomic_load_n(&h->opt_ver, __ATOMIC_ACQUIRE);
	struct kv_man_opt o = h->opt[ver & 1];
	struct opt_cfg *cfg;

	if (!o.len)
		return 0;
	cfg = calloc(1, sizeof(*cfg));
	if (!cfg || o.len > KV_SPEC_MAX ||
	    opt_parse(o.spec, o.len, cfg, why, whylen)) {
		if (cfg && !why[0])
			snprintf(why, whylen, "the manifest's optimizer is corrupt");
		else if (!cfg)
			snprintf(why, whylen, "out of memory");
		free(cfg);
		return -1;
	}
	cfg->fresh = o.fresh;
	j->opt = cfg;
	return 0;
}

struct job *job_adopt(struct kvd *d, const char *name, uid_t uid, int num_workers,
		      const struct kv_adopt *a, uint32_t n, char *why, size_t whylen)
{
	struct job *j = job_new(name, uid, num_workers, why, whylen);
	struct seginfo sg;
	struct kv_man_hdr h;
	uint32_t nkeys;

	if (!j)
		return NULL;
	why[0] = '\0';
	/* the board and the manifest's first chunk: is this the job named? */
	if (adopt_map(adopted(a, n, KV_HOLD_BOARD, 0), KV_BOARD_SIZE, &sg, why, whylen,
		      "board"))
		goto out_free;
	j->board_fd = sg.fd;
	j->board = (struct kv_board *)sg.base;
	if (adopt_map(adopted(a, n, KV_HOLD_MANIFEST, 0), kv_man_size(0), &j->man[0], why,
		      whylen, "manifest"))
		goto out_free;
	j->nman = 1;
	memcpy(&h, j->man[0].base, sizeof(h));
	if (h.magic != KV_MAN_MAGIC || h.abi != KV_SHM_ABI || h.chunk != 0 ||
	    h.num_workers != (uint32_t)num_workers || strncmp(h.job, name, sizeof(h.job)) ||
	    j->board->magic != KV_SHM_MAGIC || j->board->abi != KV_SHM_ABI ||
	    j->board->num_workers != (uint32_t)num_workers) {
		snprintf(why, whylen,
			 "the segments this rank held are not those of job '%s' of %d workers "
			 "(or of another version of kvd)",
			 name, num_workers);
		goto out_free;
	}
	nkeys = __atomic_load_n(&job_man(j)->nkeys, __ATOMIC_ACQUIRE);
	if (nkeys > d->cfg.max_keys || nkeys > KEY_DIR * KEY_BLOCK) {
		snprintf(why, whylen, "job '%s' has %u keys, over --max-keys", name, nkeys);
		goto out_free;
	}
	for (uint32_t c = 1; c < KV_MAN_CHUNKS && kv_man_first(c) < nkeys; c++) {
		if (job_charge(d, j, kv_man_size(c), why, whylen))
			goto out_free;
		if (adopt_map(adopted(a, n, KV_HOLD_MANIFEST, c), kv_man_size(c), &j->man[c], why,
			      whylen, "manifest")) {
			job_uncharge(d, j, kv_man_size(c));
			goto out_free;
		}
		j->nman = c + 1;
	}
	if (adopt_segs(d, j, a, n, KV_HOLD_VALUES, why, whylen) ||
	    adopt_segs(d, j, a, n, KV_HOLD_DIRECT, why, whylen))
		goto out_free;
	if (adopt_opt(j, why, whylen))
		goto out_free;
	for (uint32_t id = 0; id < nkeys; id++)
		if (adopt_key(d, j, id, why, whylen))
			goto out_free;
	/* nobody is present until the ranks join again */
	for (int r = 0; r < num_workers; r++)
		job_board_present(j, r, false);
	job_board_set(j, KV_BOARD_JOINING);
	return j;

out_free:
	job_free(d, j);
	return NULL;
}
