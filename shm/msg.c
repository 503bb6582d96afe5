/* SPDX-License-Identifier: MIT */
/*
 * msg.c - encode and decode control messages.
 *
 * The wire bodies are the packed structs below (host byte order: both ends
 * run on one machine).  The decoder reads a body only through memcpy into a
 * local struct, checks that the datagram is exactly as long as its type and
 * its variable part say, and checks every field: reserved fields must be
 * zero, counts and names within their bounds, enums within their range.
 */
#include "msg.h"

#include <stdbool.h>
#include <string.h>

#include "../include/kv.h"

struct wire_hello {
	int32_t rank;
	int32_t num_workers;
	int32_t device;
	uint32_t flags;
	uint16_t job_len;
	uint16_t rsvd;
	uint32_t rsvd2;
};
_Static_assert(sizeof(struct wire_hello) == 24, "hello size");

struct wire_welcome {
	uint32_t client_id;
	uint32_t flags;
	uint64_t seg_size;
	uint32_t sq_entries;
	uint32_t cq_entries;
	uint32_t part_bytes;
	uint32_t max_segs;
	char version[KV_VERSION_LEN];
};
_Static_assert(sizeof(struct wire_welcome) == 48, "welcome size");

struct wire_text { /* ERROR, STATUS, OPTIMIZER, SAVE, LOAD */
	int32_t code;   /* ERROR: status; STATUS: flags; SAVE/LOAD: flags; else 0 */
	uint32_t len;
};
_Static_assert(sizeof(struct wire_text) == 8, "text size");

struct wire_seg {
	uint32_t seg_id;
	uint32_t rsvd;
	uint64_t size;
};
_Static_assert(sizeof(struct wire_seg) == 16, "seg size");

struct wire_hold {
	uint32_t n;
	uint32_t kind[KV_HOLD_MAX];
	uint32_t id[KV_HOLD_MAX];
	uint32_t rsvd[3];
};
_Static_assert(sizeof(struct wire_hold) == 48, "hold size");

struct wire_key_open {
	uint64_t count;
	uint8_t dtype;
	uint8_t mode;
	uint16_t name_len;
	uint32_t rsvd;
};
_Static_assert(sizeof(struct wire_key_open) == 16, "key open size");

struct wire_key {
	uint32_t key_id;
	uint32_t nparts;
	uint64_t count;
	uint32_t part_elems;
	uint8_t dtype;
	uint8_t flags;
	uint16_t rsvd;
	uint32_t dseg;
	uint32_t rounds;
	uint64_t doff;
	uint64_t dsize;
};
_Static_assert(sizeof(struct wire_key) == 48, "key size");

struct wire_status_req {
	uint32_t what;
	uint32_t flags;
};
_Static_assert(sizeof(struct wire_status_req) == 8, "status req size");

struct wire_drop {
	uint16_t job_len;
	uint16_t rsvd;
	uint32_t rsvd2;
};
_Static_assert(sizeof(struct wire_drop) == 8, "drop size");

#define HDR sizeof(struct kv_msg_hdr)
#define TEXT_MAX (KV_MSG_MAX - HDR - sizeof(struct wire_text))

int kv_job_name_valid(const char *name, size_t len)
{
	if (len < 1 || len > KV_JOB_MAX)
		return 0;
	for (size_t i = 0; i < len; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '-'))
			return 0;
	}
	return 1;
}

static int key_name_valid(const char *name, size_t len)
{
	return len >= 1 && len <= KV_KEY_MAX && memchr(name, '\0', len) == NULL;
}

/* NUL-terminated, and zero after the NUL (so it re-encodes to the same bytes) */
static int version_valid(const char *v)
{
	const char *nul = memchr(v, '\0', KV_VERSION_LEN);

	if (!nul)
		return 0;
	for (const char *c = nul; c < v + KV_VERSION_LEN; c++)
		if (*c)
			return 0;
	return 1;
}

static int fail(const char **why, const char *what, int err)
{
	if (why)
		*why = what;
	return err;
}

/* The fixed body size of each type; variable parts follow it. */
static size_t body_size(uint16_t type)
{
	switch (type) {
	case KV_MSG_HELLO:
		return sizeof(struct wire_hello);
	case KV_MSG_WELCOME:
		return sizeof(struct wire_welcome);
	case KV_MSG_ERROR:
	case KV_MSG_STATUS:
	case KV_MSG_OPTIMIZER:
	case KV_MSG_SAVE:
	case KV_MSG_LOAD:
		return sizeof(struct wire_text);
	case KV_MSG_SEG_ALLOC:
		return sizeof(uint64_t);
	case KV_MSG_SEG:
	case KV_MSG_SEG_FREE:
		return sizeof(struct wire_seg);
	case KV_MSG_KEY_OPEN:
		return sizeof(struct wire_key_open);
	case KV_MSG_KEY:
		return sizeof(struct wire_key);
	case KV_MSG_STATUS_REQ:
		return sizeof(struct wire_status_req);
	case KV_MSG_DROP:
		return sizeof(struct wire_drop);
	case KV_MSG_HOLD:
	case KV_MSG_ADOPT:
		return sizeof(struct wire_hold);
	default:
		return 0;
	}
}

static int decode_text(const uint8_t *body, size_t rest, struct kv_msg *m, const char **why)
{
	struct wire_text w;
	const char *text = (const char *)body + sizeof(w);

	memcpy(&w, body, sizeof(w));
	if (w.len != rest - sizeof(w))
		return fail(why, "text length", KV_MSG_ELENGTH);
	switch (m->type) {
	case KV_MSG_ERROR:
		if (w.code > 0 || w.code < KV_ERR_EXISTS)
			return fail(why, "error: code", KV_MSG_EFIELD);
		m->u.error.code = w.code;
		m->u.error.len = w.len;
		m->u.error.text = text;
		return 0;
	case KV_MSG_STATUS:
		if ((uint32_t)w.code & ~(uint32_t)KV_STATUSF_MORE)
			return fail(why, "status: flags", KV_MSG_EFIELD);
		m->u.status.flags = (uint32_t)w.code;
		m->u.status.len = w.len;
		m->u.status.text = text;
		return 0;
	case KV_MSG_OPTIMIZER:
		if (w.code != 0)
			return fail(why, "optimizer: reserved", KV_MSG_EFIELD);
		if (w.len < 1 || w.len > KV_SPEC_MAX || memchr(text, '\0', w.len))
			return fail(why, "optimizer: spec", KV_MSG_EFIELD);
		m->u.optimizer.len = w.len;
		m->u.optimizer.spec = text;
		return 0;
	default: /* SAVE, LOAD */
		if ((uint32_t)w.code > 1)
			return fail(why, "file: flags", KV_MSG_EFIELD);
		if (w.len > KV_PATH_MAX || memchr(text, '\0', w.len))
			return fail(why, "file: path", KV_MSG_EFIELD);
		m->u.file.flags = (uint32_t)w.code;
		m->u.file.len = w.len;
		m->u.file.path = text;
		return 0;
	}
}

int kv_msg_decode(const void *buf, size_t len, struct kv_msg *m, const char **why)
{
	const uint8_t *p = buf;
	const uint8_t *body = p + HDR;
	struct kv_msg_hdr h;
	size_t fixed, rest;

	if (why)
		*why = NULL;
	if (!buf || len < HDR)
		return fail(why, "header", KV_MSG_ESHORT);
	memcpy(&h, p, HDR);
	if (h.magic != KV_MSG_MAGIC)
		return fail(why, "magic", KV_MSG_EMAGIC);
	if (h.version != KV_MSG_VERSION)
		return fail(why, "version", KV_MSG_EVERSION);
	fixed = body_size(h.type);
	if (fixed == 0)
		return fail(why, "type", KV_MSG_ETYPE);
	if (h.len != len || len > KV_MSG_MAX || len < HDR + fixed)
		return fail(why, "length", KV_MSG_ELENGTH);
	rest = len - HDR;
	memset(m, 0, sizeof(*m));
	m->type = h.type;
	m->seq = h.seq;

	switch (h.type) {
	case KV_MSG_HELLO: {
		struct wire_hello w;

		memcpy(&w, body, sizeof(w));
		if (w.job_len != rest - sizeof(w))
			return fail(why, "hello: job length", KV_MSG_ELENGTH);
		if (w.rsvd || w.rsvd2)
			return fail(why, "hello: reserved", KV_MSG_EFIELD);
		if (w.num_workers < 1 || w.num_workers > KV_MAX_RANKS)
			return fail(why, "hello: num_workers", KV_MSG_EFIELD);
		if (w.rank < 0 || w.rank >= KV_MAX_RANKS)
			return fail(why, "hello: rank", KV_MSG_EFIELD);
		if (w.device < -1)
			return fail(why, "hello: device", KV_MSG_EFIELD);
		if (!kv_job_name_valid((const char *)body + sizeof(w), w.job_len))
			return fail(why, "hello: job name", KV_MSG_EFIELD);
		m->u.hello.rank = w.rank;
		m->u.hello.num_workers = w.num_workers;
		m->u.hello.device = w.device;
		m->u.hello.flags = w.flags;
		memcpy(m->u.hello.job, body + sizeof(w), w.job_len);
		return 0;
	}
	case KV_MSG_WELCOME: {
		struct wire_welcome w;

		memcpy(&w, body, sizeof(w));
		if (rest != sizeof(w))
			return fail(why, "welcome: length", KV_MSG_ELENGTH);
		if (!w.sq_entries || (w.sq_entries & (w.sq_entries - 1)) || !w.cq_entries ||
		    (w.cq_entries & (w.cq_entries - 1)))
			return fail(why, "welcome: ring entries", KV_MSG_EFIELD);
		if (w.part_bytes < 64 || w.part_bytes % 64 || w.max_segs == 0)
			return fail(why, "welcome: geometry", KV_MSG_EFIELD);
		if (!version_valid(w.version))
			return fail(why, "welcome: version", KV_MSG_EFIELD);
		m->u.welcome.client_id = w.client_id;
		m->u.welcome.flags = w.flags;
		m->u.welcome.seg_size = w.seg_size;
		m->u.welcome.sq_entries = w.sq_entries;
		m->u.welcome.cq_entries = w.cq_entries;
		m->u.welcome.part_bytes = w.part_bytes;
		m->u.welcome.max_segs = w.max_segs;
		memcpy(m->u.welcome.version, w.version, sizeof(w.version));
		return 0;
	}
	case KV_MSG_ERROR:
	case KV_MSG_STATUS:
	case KV_MSG_OPTIMIZER:
	case KV_MSG_SAVE:
	case KV_MSG_LOAD:
		return decode_text(body, rest, m, why);
	case KV_MSG_SEG_ALLOC:
		if (rest != sizeof(uint64_t))
			return fail(why, "seg alloc: length", KV_MSG_ELENGTH);
		memcpy(&m->u.seg_alloc.bytes, body, sizeof(uint64_t));
		if (m->u.seg_alloc.bytes == 0 || m->u.seg_alloc.bytes > (1ull << 40))
			return fail(why, "seg alloc: bytes", KV_MSG_EFIELD);
		return 0;
	case KV_MSG_HOLD:
	case KV_MSG_ADOPT: {
		struct wire_hold w;

		memcpy(&w, body, sizeof(w));
		if (rest != sizeof(w))
			return fail(why, "hold: length", KV_MSG_ELENGTH);
		if (w.rsvd[0] || w.rsvd[1] || w.rsvd[2])
			return fail(why, "hold: reserved", KV_MSG_EFIELD);
		if (w.n < 1 || w.n > KV_HOLD_MAX)
			return fail(why, "hold: count", KV_MSG_EFIELD);
		for (uint32_t i = 0; i < KV_HOLD_MAX; i++) {
			bool used = i < w.n;
			if (used ? w.kind[i] < KV_HOLD_MANIFEST || w.kind[i] >= KV_HOLD_KIND_MAX ||
					   (h.type == KV_MSG_HOLD && w.kind[i] == KV_HOLD_OWN)
				 : w.kind[i] || w.id[i])
				return fail(why, "hold: kind", KV_MSG_EFIELD);
			if (used && w.id[i] >= 65536)
				return fail(why, "hold: id", KV_MSG_EFIELD);
		}
		m->u.hold.n = w.n;
		memcpy(m->u.hold.kind, w.kind, sizeof(w.kind));
		memcpy(m->u.hold.id, w.id, sizeof(w.id));
		return 0;
	}
	case KV_MSG_SEG:
	case KV_MSG_SEG_FREE: {
		struct wire_seg w;

		memcpy(&w, body, sizeof(w));
		if (rest != sizeof(w))
			return fail(why, "seg: length", KV_MSG_ELENGTH);
		if (w.rsvd)
			return fail(why, "seg: reserved", KV_MSG_EFIELD);
		if (h.type == KV_MSG_SEG_FREE) {
			if (w.size)
				return fail(why, "seg free: size", KV_MSG_EFIELD);
			m->u.seg_free.seg_id = w.seg_id;
		} else {
			if (w.size == 0)
				return fail(why, "seg: size", KV_MSG_EFIELD);
			m->u.seg.seg_id = w.seg_id;
			m->u.seg.size = w.size;
		}
		return 0;
	}
	case KV_MSG_KEY_OPEN: {
		struct wire_key_open w;

		memcpy(&w, body, sizeof(w));
		if (w.name_len != rest - sizeof(w))
			return fail(why, "key open: name length", KV_MSG_ELENGTH);
		if (w.rsvd)
			return fail(why, "key open: reserved", KV_MSG_EFIELD);
		if (w.dtype > KV_INT64)
			return fail(why, "key open: dtype", KV_MSG_EFIELD);
		if (w.mode > KV_KEY_CREATE)
			return fail(why, "key open: mode", KV_MSG_EFIELD);
		if (w.count == 0 || w.count > (1ull << 40))
			return fail(why, "key open: count", KV_MSG_EFIELD);
		if (!key_name_valid((const char *)body + sizeof(w), w.name_len))
			return fail(why, "key open: name", KV_MSG_EFIELD);
		m->u.key_open.count = w.count;
		m->u.key_open.dtype = w.dtype;
		m->u.key_open.mode = w.mode;
		m->u.key_open.name_len = w.name_len;
		memcpy(m->u.key_open.name, body + sizeof(w), w.name_len);
		return 0;
	}
	case KV_MSG_KEY: {
		struct wire_key w;

		memcpy(&w, body, sizeof(w));
		if (rest != sizeof(w))
			return fail(why, "key: length", KV_MSG_ELENGTH);
		if (w.rsvd || w.dtype > KV_INT64 ||
		    (w.flags & ~(uint8_t)(KV_KEYF_CREATED | KV_KEYF_VALUE | KV_KEYF_DIRECT)) ||
		    ((w.flags & KV_KEYF_DIRECT) && w.rounds))
			return fail(why, "key: field", KV_MSG_EFIELD);
		if (!(w.flags & KV_KEYF_DIRECT) ? (w.dseg || w.doff || w.dsize)
						 : (w.doff % 64 || w.dsize < 64 || w.doff > w.dsize - 64))
			return fail(why, "key: direct block", KV_MSG_EFIELD);
		if (w.count == 0 || w.part_elems == 0 || w.nparts == 0 ||
		    (uint64_t)w.nparts != (w.count + w.part_elems - 1) / w.part_elems)
			return fail(why, "key: geometry", KV_MSG_EFIELD);
		m->u.key.key_id = w.key_id;
		m->u.key.nparts = w.nparts;
		m->u.key.count = w.count;
		m->u.key.part_elems = w.part_elems;
		m->u.key.dtype = w.dtype;
		m->u.key.flags = w.flags;
		m->u.key.dseg = w.dseg;
		m->u.key.doff = w.doff;
		m->u.key.dsize = w.dsize;
		m->u.key.rounds = w.rounds;
		return 0;
	}
	case KV_MSG_STATUS_REQ: {
		struct wire_status_req w;

		memcpy(&w, body, sizeof(w));
		if (rest != sizeof(w))
			return fail(why, "status request: length", KV_MSG_ELENGTH);
		if (w.what >= KV_STATUS_MAX)
			return fail(why, "status request: what", KV_MSG_EFIELD);
		m->u.status_req.what = w.what;
		m->u.status_req.flags = w.flags;
		return 0;
	}
	case KV_MSG_DROP: {
		struct wire_drop w;

		memcpy(&w, body, sizeof(w));
		if (w.job_len != rest - sizeof(w))
			return fail(why, "drop: job length", KV_MSG_ELENGTH);
		if (w.rsvd || w.rsvd2)
			return fail(why, "drop: reserved", KV_MSG_EFIELD);
		if (!kv_job_name_valid((const char *)body + sizeof(w), w.job_len))
			return fail(why, "drop: job name", KV_MSG_EFIELD);
		memcpy(m->u.drop.job, body + sizeof(w), w.job_len);
		return 0;
	}
	}
	return fail(why, "type", KV_MSG_ETYPE);
}

static size_t put(uint8_t *buf, size_t cap, const struct kv_msg *m, const void *body,
		  size_t blen, const void *tail, size_t tlen)
{
	struct kv_msg_hdr h = {
		.magic = KV_MSG_MAGIC,
		.version = KV_MSG_VERSION,
		.type = m->type,
		.seq = m->seq,
	};
	size_t len = HDR + blen + tlen;

	if (len > cap || len > KV_MSG_MAX)
		return 0;
	h.len = (uint32_t)len;
	memcpy(buf, &h, HDR);
	memcpy(buf + HDR, body, blen);
	if (tlen)
		memcpy(buf + HDR + blen, tail, tlen);
	return len;
}

static size_t put_text(uint8_t *buf, size_t cap, const struct kv_msg *m, int32_t code,
		       const char *text, size_t len)
{
	struct wire_text w = { .code = code, .len = (uint32_t)len };

	if (len > TEXT_MAX)
		return 0;
	return put(buf, cap, m, &w, sizeof(w), text, len);
}

size_t kv_msg_encode(const struct kv_msg *m, void *out, size_t cap)
{
	uint8_t *buf = out;

	switch (m->type) {
	case KV_MSG_HELLO: {
		size_t jl = strnlen(m->u.hello.job, KV_JOB_MAX + 1);
		struct wire_hello w = {
			.rank = m->u.hello.rank,
			.num_workers = m->u.hello.num_workers,
			.device = m->u.hello.device,
			.flags = m->u.hello.flags,
			.job_len = (uint16_t)jl,
		};

		if (!kv_job_name_valid(m->u.hello.job, jl))
			return 0;
		return put(buf, cap, m, &w, sizeof(w), m->u.hello.job, jl);
	}
	case KV_MSG_WELCOME: {
		struct wire_welcome w = {
			.client_id = m->u.welcome.client_id,
			.flags = m->u.welcome.flags,
			.seg_size = m->u.welcome.seg_size,
			.sq_entries = m->u.welcome.sq_entries,
			.cq_entries = m->u.welcome.cq_entries,
			.part_bytes = m->u.welcome.part_bytes,
			.max_segs = m->u.welcome.max_segs,
		};

		memcpy(w.version, m->u.welcome.version,
		       strnlen(m->u.welcome.version, KV_VERSION_LEN - 1));
		return put(buf, cap, m, &w, sizeof(w), NULL, 0);
	}
	case KV_MSG_ERROR:
		return put_text(buf, cap, m, m->u.error.code, m->u.error.text, m->u.error.len);
	case KV_MSG_STATUS:
		return put_text(buf, cap, m, (int32_t)m->u.status.flags, m->u.status.text,
				m->u.status.len);
	case KV_MSG_OPTIMIZER:
		return put_text(buf, cap, m, 0, m->u.optimizer.spec, m->u.optimizer.len);
	case KV_MSG_SAVE:
	case KV_MSG_LOAD:
		return put_text(buf, cap, m, (int32_t)m->u.file.flags, m->u.file.path,
				m->u.file.len);
	case KV_MSG_SEG_ALLOC:
		return put(buf, cap, m, &m->u.seg_alloc.bytes, sizeof(uint64_t), NULL, 0);
	case KV_MSG_HOLD:
	case KV_MSG_ADOPT: {
		struct wire_hold w = { .n = m->u.hold.n };

		if (w.n < 1 || w.n > KV_HOLD_MAX)
			return 0;
		memcpy(w.kind, m->u.hold.kind, w.n * sizeof(w.kind[0]));
		memcpy(w.id, m->u.hold.id, w.n * sizeof(w.id[0]));
		return put(buf, cap, m, &w, sizeof(w), NULL, 0);
	}
	case KV_MSG_SEG: {
		struct wire_seg w = { .seg_id = m->u.seg.seg_id, .size = m->u.seg.size };

		return put(buf, cap, m, &w, sizeof(w), NULL, 0);
	}
	case KV_MSG_SEG_FREE: {
		struct wire_seg w = { .seg_id = m->u.seg_free.seg_id };

		return put(buf, cap, m, &w, sizeof(w), NULL, 0);
	}
	case KV_MSG_KEY_OPEN: {
		size_t nl = m->u.key_open.name_len;
		struct wire_key_open w = {
			.count = m->u.key_open.count,
			.dtype = m->u.key_open.dtype,
			.mode = m->u.key_open.mode,
			.name_len = (uint16_t)nl,
		};

		if (!key_name_valid(m->u.key_open.name, nl))
			return 0;
		return put(buf, cap, m, &w, sizeof(w), m->u.key_open.name, nl);
	}
	case KV_MSG_KEY: {
		struct wire_key w = {
			.key_id = m->u.key.key_id,
			.nparts = m->u.key.nparts,
			.count = m->u.key.count,
			.part_elems = m->u.key.part_elems,
			.dtype = m->u.key.dtype,
			.flags = m->u.key.flags,
			.dseg = m->u.key.dseg,
			.doff = m->u.key.doff,
			.dsize = m->u.key.dsize,
			.rounds = m->u.key.rounds,
		};

		return put(buf, cap, m, &w, sizeof(w), NULL, 0);
	}
	case KV_MSG_STATUS_REQ: {
		struct wire_status_req w = { .what = m->u.status_req.what,
					     .flags = m->u.status_req.flags };

		return put(buf, cap, m, &w, sizeof(w), NULL, 0);
	}
	case KV_MSG_DROP: {
		size_t jl = strnlen(m->u.drop.job, KV_JOB_MAX + 1);
		struct wire_drop w = { .job_len = (uint16_t)jl };

		if (!kv_job_name_valid(m->u.drop.job, jl))
			return 0;
		return put(buf, cap, m, &w, sizeof(w), m->u.drop.job, jl);
	}
	}
	return 0;
}

const char *kv_msg_strerror(int err)
{
	switch (err) {
	case 0:
		return "no error";
	case KV_MSG_ESHORT:
		return "message shorter than its header";
	case KV_MSG_EMAGIC:
		return "bad message magic";
	case KV_MSG_EVERSION:
		return "unsupported protocol version";
	case KV_MSG_ETYPE:
		return "unknown message type";
	case KV_MSG_ELENGTH:
		return "message length does not match its contents";
	case KV_MSG_EFIELD:
		return "message field out of range";
	default:
		return "unknown decode error";
	}
}
