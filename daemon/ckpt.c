/* SPDX-License-Identifier: MIT */
/*
 * ckpt.c - the job's state as a file: every key's value and its optimizer
 * state, versioned and checksummed.
 *
 * Layout (little-endian, every section padded to 8 bytes):
 *   struct ckpt_hdr                     magic "KVDCKPT\0", version, counts
 *   spec[spec_len]                      the optimizer spec, when dumped
 *   per key: struct ckpt_key, name, value (count * esize bytes),
 *            opt_t[nparts], then per part its state arrays (f32): the
 *            master copy when has_master, then nstates arrays
 *   uint64 checksum                     FNV-1a 64 of every byte before it
 *
 * The engine thread makes and restores snapshots, at a moment when none of
 * the job's rounds is on a worker; the control thread moves the bytes
 * (io_uring) and checks the header and the checksum before the engine sees
 * a loaded file.  Restore checks every key, count, dtype and state shape
 * against the job before it writes anything.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd.h"

#define CKPT_MAGIC "KVDCKPT"
#define CKPT_VERSION 2u /* 2: NAG keeps lr inside its momentum state (MXNet's form) */

struct ckpt_hdr {
	char magic[8];
	uint32_t version;
	uint32_t flags; /* CKPT_F_SPEC */
	uint32_t num_workers;
	uint32_t nkeys;
	uint32_t spec_len;
	uint32_t rsvd;
	uint64_t body; /* bytes after the header, before the checksum */
	uint8_t pad[24];
};
_Static_assert(sizeof(struct ckpt_hdr) == 64, "ckpt hdr size");

#define CKPT_F_SPEC 1u

struct ckpt_key {
	uint16_t name_len;
	uint8_t dtype;
	uint8_t nstates;    /* state arrays per part (after the master copy) */
	uint32_t nparts;
	uint64_t count;
	uint32_t has_master; /* 1: a master copy precedes the states */
	uint32_t part_elems;
};
_Static_assert(sizeof(struct ckpt_key) == 24, "ckpt key size");

static uint64_t fnv(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static size_t pad8(size_t n)
{
	return (n + 7) & ~(size_t)7;
}

static size_t part_n(const struct key *k, uint32_t p)
{
	uint64_t left = k->count - (uint64_t)p * k->part_elems;
	return (size_t)(left < k->part_elems ? left : k->part_elems);
}

static uint8_t *direct_value(struct job *j, struct key *k)
{
	uint32_t done = __atomic_load_n(&k->dkey->done, __ATOMIC_ACQUIRE);

	return (uint8_t *)k->dkey +
	       kv_dkey_result_off((uint32_t)j->num_workers, k->count * k->esize, done & 1);
}

/* The value of a key as it stands into dst: a direct key's result, or each
 * part's live copy. */
static void key_value_get(struct job *j, struct key *k, uint8_t *dst)
{
	if (key_direct(k)) {
		memcpy(dst, direct_value(j, k), k->count * k->esize);
		return;
	}
	for (uint32_t p = 0; p < k->nparts; p++)
		memcpy(dst + (size_t)p * k->part_elems * k->esize, part_live(k, p),
		       part_n(k, p) * k->esize);
}

/* val becomes the key's value: in a direct key's result, or in each part's
 * spare copy, published with the part's state. */
static void key_value_put(struct job *j, struct key *k, const uint8_t *val)
{
	if (key_direct(k)) {
		memcpy(direct_value(j, k), val, k->count * k->esize);
		__atomic_store_n(&k->dkey->has_value, 1, __ATOMIC_RELEASE);
		return;
	}
	for (uint32_t p = 0; p < k->nparts; p++) {
		memcpy(part_spare(k, p), val + (size_t)p * k->part_elems * k->esize,
		       part_n(k, p) * k->esize);
		k->parts[p].has_value = true;
		part_publish(k, p);
	}
	k->parts_valued = k->nparts;
	__atomic_store_n(&k->has_value, 1, __ATOMIC_RELEASE);
}

/* The part's state arrays, in file order; returns how many (master first). */
static int part_arrays(const struct key *k, uint32_t part, float **a)
{
	const struct part *p = &k->parts[part];
	const struct sblock *sb = __atomic_load_n(&k->sblk, __ATOMIC_ACQUIRE);
	int n = 0;

	for (uint32_t i = 0; p->has_states && sb && i < sb->narrays; i++)
		a[n++] = part_state(k, sb, part, p->ver, i);
	return n;
}

/* Does the part keep an f32 master copy (an f16/bf16 key that was updated)? */
static bool part_master(const struct key *k, uint32_t part)
{
	const struct sblock *sb = __atomic_load_n(&k->sblk, __ATOMIC_ACQUIRE);

	return k->parts[part].has_states && sb && sb->master;
}

int ckpt_snapshot(struct job *j, bool dump_spec, uint8_t **out, size_t *outlen, char *why,
		  size_t whylen)
{
	const struct opt_cfg *opt = __atomic_load_n(&j->opt, __ATOMIC_ACQUIRE);
	uint32_t nkeys = job_nkeys(j);
	size_t len = sizeof(struct ckpt_hdr), spec_len = dump_spec && opt ? strlen(opt->spec) : 0;
	uint8_t *buf, *w;

	len += pad8(spec_len);
	for (uint32_t i = 0; i < nkeys; i++) {
		struct key *k = job_key(j, i);
		len += sizeof(struct ckpt_key) + pad8(k->name_len) + pad8(k->count * k->esize) +
		       8 * (size_t)k->nparts;
		for (uint32_t p = 0; p < k->nparts; p++) {
			float *a[3];
			len += (size_t)part_arrays(k, p, a) * part_n(k, p) * sizeof(float);
		}
	}
	len += 8;
	buf = calloc(1, len);
	if (!buf) {
		snprintf(why, whylen, "out of memory for a %zu-byte checkpoint", len);
		return KV_ERR_NOMEM;
	}
	struct ckpt_hdr h = { .version = CKPT_VERSION,
			      .num_workers = (uint32_t)j->num_workers,
			      .nkeys = nkeys,
			      .spec_len = (uint32_t)spec_len,
			      .body = len - sizeof(h) - 8 };
	memcpy(h.magic, CKPT_MAGIC, 8);
	h.flags = spec_len ? CKPT_F_SPEC : 0;
	memcpy(buf, &h, sizeof(h));
	w = buf + sizeof(h);
	memcpy(w, opt ? opt->spec : "", spec_len);
	w += pad8(spec_len);
	for (uint32_t i = 0; i < nkeys; i++) {
		struct key *k = job_key(j, i);
		struct ckpt_key ck = { .name_len = (uint16_t)k->name_len,
				       .dtype = (uint8_t)k->dtype,
				       .nparts = k->nparts,
				       .count = k->count,
				       .part_elems = k->part_elems };
		float *a[3];
		int na = part_arrays(k, 0, a);

		ck.has_master = part_master(k, 0);
		ck.nstates = (uint8_t)(na - (int)ck.has_master);
		memcpy(w, &ck, sizeof(ck));
		w += sizeof(ck);
		memcpy(w, k->name, k->name_len);
		w += pad8(k->name_len);
		key_value_get(j, k, w);
		w += pad8(k->count * k->esize);
		for (uint32_t p = 0; p < k->nparts; p++) {
			memcpy(w, &k->parts[p].opt_t, 8);
			w += 8;
		}
		for (uint32_t p = 0; p < k->nparts; p++) {
			int np = part_arrays(k, p, a);
			if (np != na) { /* parts of a key have states alike, or none yet */
				free(buf);
				snprintf(why, whylen,
					 "key '%s' is between updates (its parts differ); save "
					 "between rounds",
					 k->name);
				return KV_ERR_INVALID;
			}
			for (int s = 0; s < np; s++) {
				memcpy(w, a[s], part_n(k, p) * sizeof(float));
				w += part_n(k, p) * sizeof(float);
			}
		}
	}
	uint64_t sum = fnv(buf, len - 8);
	memcpy(buf + len - 8, &sum, 8);
	*out = buf;
	*outlen = len;
	return 0;
}

int ckpt_verify(const uint8_t *buf, size_t len, char *why, size_t whylen)
{
	struct ckpt_hdr h;
	uint64_t sum;

	if (len < sizeof(h) + 8) {
		snprintf(why, whylen, "the file is %zu bytes: too short for a checkpoint", len);
		return KV_ERR_INVALID;
	}
	memcpy(&h, buf, sizeof(h));
	if (memcmp(h.magic, CKPT_MAGIC, 8) != 0) {
		snprintf(why, whylen, "the file is not a kvd checkpoint (bad magic)");
		return KV_ERR_INVALID;
	}
	if (h.version != CKPT_VERSION) {
		snprintf(why, whylen, "checkpoint version %u; this kvd reads version %u", h.version,
			 CKPT_VERSION);
		return KV_ERR_INVALID;
	}
	if (h.body != len - sizeof(h) - 8) {
		snprintf(why, whylen, "the file is %zu bytes; its header says %llu (truncated?)",
			 len, (unsigned long long)(h.body + sizeof(h) + 8));
		return KV_ERR_INVALID;
	}
	memcpy(&sum, buf + len - 8, 8);
	if (sum != fnv(buf, len - 8)) {
		snprintf(why, whylen, "the checkpoint's checksum does not match: the file is corrupt");
		return KV_ERR_INVALID;
	}
	return 0;
}

/* A bounds-checked reader over the verified file. */
struct rd {
	const uint8_t *p, *end;
};

static const void *take(struct rd *r, size_t n)
{
	const uint8_t *p = r->p;

	if ((size_t)(r->end - r->p) < n)
		return NULL;
	r->p += n;
	return p;
}

static const char *dname(uint8_t t)
{
	static const char *const n[] = { "float32", "float64", "float16",
					 "bfloat16", "int32", "int64" };
	return t < 6 ? n[t] : "?";
}

/*
 * Restore: a first pass checks everything against the job, a second writes.
 * Optimizer states are restored for the optimizer the job uses now; the
 * file's spec, when it holds one, must name the same optimizer.
 */
int ckpt_restore(struct job *j, const uint8_t *buf, size_t len, char *why, size_t whylen)
{
	const struct opt_cfg *opt = __atomic_load_n(&j->opt, __ATOMIC_ACQUIRE);
	struct ckpt_hdr h;
	struct rd r = { buf + sizeof(h), buf + len - 8 };
	uint32_t nkeys = job_nkeys(j);

	memcpy(&h, buf, sizeof(h));
	if (h.nkeys != nkeys) {
		snprintf(why, whylen, "the file holds %u keys; job '%s' has %u", h.nkeys, j->name,
			 nkeys);
		return KV_ERR_MISMATCH;
	}
	const char *spec = take(&r, pad8(h.spec_len));
	if (!spec)
		goto out_short;
	if (h.spec_len) {
		struct opt_cfg file;
		char pwhy[256];
		if (opt_parse(spec, h.spec_len, &file, pwhy, sizeof(pwhy))) {
			snprintf(why, whylen, "the file's optimizer spec is invalid: %s", pwhy);
			return KV_ERR_INVALID;
		}
		if (!opt || strcmp(file.name, opt->name) != 0) {
			snprintf(why, whylen,
				 "the file holds states of optimizer '%.*s'; the job uses %s%s%s",
				 (int)h.spec_len, spec, opt ? "'" : "none (set it first)",
				 opt ? opt->spec : "", opt ? "'" : "");
			return KV_ERR_MISMATCH;
		}
	}
	for (int pass = 0; pass < 2; pass++) {
		r.p = (const uint8_t *)spec + pad8(h.spec_len);
		for (uint32_t i = 0; i < nkeys; i++) {
			const struct ckpt_key *ckp = take(&r, sizeof(struct ckpt_key));
			struct ckpt_key ck;
			struct key *k = NULL;
			const char *name;
			const uint8_t *val, *ts;
			int nstates = opt ? optim_nstates(&opt->p) : 0;

			if (!ckp)
				goto out_short;
			memcpy(&ck, ckp, sizeof(ck));
			name = take(&r, pad8(ck.name_len));
			if (!name || ck.dtype > KV_INT64)
				goto out_short;
			for (uint32_t q = 0; q < nkeys; q++) {
				struct key *c = job_key(j, q);
				if (c->name_len == ck.name_len && !memcmp(c->name, name, ck.name_len))
					k = c;
			}
			if (!k) {
				snprintf(why, whylen, "key '%.*s' in the file is not a key of job '%s'",
					 (int)ck.name_len, name, j->name);
				return KV_ERR_MISMATCH;
			}
			if (k->count != ck.count || k->dtype != ck.dtype) {
				snprintf(why, whylen,
					 "key '%s': the file holds %llu %s elements, the job %llu %s",
					 k->name, (unsigned long long)ck.count, dname(ck.dtype),
					 (unsigned long long)k->count, dname((uint8_t)k->dtype));
				return KV_ERR_MISMATCH;
			}
			if (ck.nparts != k->nparts || ck.part_elems != k->part_elems) {
				snprintf(why, whylen,
					 "key '%s' is cut into parts differently (kvd --part-size "
					 "changed?)",
					 k->name);
				return KV_ERR_MISMATCH;
			}
			/* an f32 master copy belongs to f16/bf16 keys (any optimizer,
			 * plain SGD too); state arrays must be the job optimizer's */
			if (ck.has_master > 1 || (ck.has_master && k->dtype == KV_FLOAT32) ||
			    (ck.nstates && !ck.has_master && k->dtype != KV_FLOAT32)) {
				snprintf(why, whylen,
					 "key '%s': the file's master copy does not fit a %s key",
					 k->name, dname((uint8_t)k->dtype));
				return KV_ERR_INVALID;
			}
			if (ck.nstates && ck.nstates != nstates) {
				snprintf(why, whylen,
					 "key '%s': the file holds %u state arrays, the optimizer "
					 "needs %d",
					 k->name, ck.nstates, nstates);
				return KV_ERR_MISMATCH;
			}
			val = take(&r, pad8(k->count * k->esize));
			ts = take(&r, 8 * (size_t)k->nparts);
			if (!val || !ts)
				goto out_short;
			size_t arrays = (size_t)ck.nstates + ck.has_master;
			for (uint32_t p = 0; p < k->nparts; p++) {
				const uint8_t *a = take(&r, arrays * part_n(k, p) * sizeof(float));
				struct part *pt = &k->parts[p];
				if (!a)
					goto out_short;
				if (pass == 0)
					continue;
				/* pass 1: write */
				memcpy(&pt->opt_t, ts + 8 * p, 8);
				if (!arrays || (!ck.nstates && nstates)) {
					/* the file holds no state for this optimizer: the
					 * states start afresh from the loaded value */
					pt->has_states = false;
					pt->opt_fresh = 0;
					pt->opt_t = 0;
					continue;
				}
				/* into the spare copy: the value's publish makes them live */
				const struct sblock *sb = __atomic_load_n(&k->sblk, __ATOMIC_ACQUIRE);
				if (!opt || !sb || sb->narrays != arrays) {
					snprintf(why, whylen, "key '%s': %zu arrays in the file, %u here",
						 k->name, arrays, sb ? sb->narrays : 0);
					return KV_ERR_MISMATCH;
				}
				for (uint32_t s = 0; s < sb->narrays; s++)
					memcpy(part_state(k, sb, p, pt->ver + 1, s),
					       a + (size_t)s * part_n(k, p) * sizeof(float),
					       part_n(k, p) * sizeof(float));
				pt->has_states = true;
				pt->states_in = sb;
				pt->opt_fresh = opt->fresh;
			}
			if (pass == 1) {
				key_value_put(j, k, val);
			}
		}
		if (r.p != r.end) {
			snprintf(why, whylen, "the file has %zu bytes after its last key",
				 (size_t)(r.end - r.p));
			return KV_ERR_INVALID;
		}
	}
	return 0;

out_short:
	snprintf(why, whylen, "the file's contents do not add up (a section runs past its end)");
	return KV_ERR_INVALID;
}
