/* SPDX-License-Identifier: MIT */
/*
 * msg.h - the control-message codec of the kvd socket.
 *
 * Every message on the SOCK_SEQPACKET socket is one datagram: a 16-byte
 * header (magic, protocol version, type, total length, sequence) and a body
 * whose layout the type fixes.  kv_msg_decode() checks the header, the exact
 * length, and every field before anything else looks at the message, and
 * names what was wrong; kv_msg_encode() builds a message from a struct.
 * Variable parts (names, text) follow the fixed body and are bounded.
 */
#ifndef KV_SHM_MSG_H
#define KV_SHM_MSG_H

#include <stddef.h>
#include <stdint.h>

#define KV_MSG_MAGIC 0x4d44564bu /* "KVDM" in little-endian bytes */
#define KV_MSG_VERSION 1u
#define KV_MSG_MAX 65536u /* largest datagram either side sends or accepts */
#define KV_JOB_MAX 128u
#define KV_KEY_MAX 255u
#define KV_SPEC_MAX 1024u /* optimizer spec */
#define KV_PATH_MAX 4096u
#define KV_MAX_RANKS 1024
#define KV_VERSION_LEN 16u

struct kv_msg_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t len; /* whole message, header included */
	uint32_t seq; /* chosen by the requester, echoed in the reply */
};
_Static_assert(sizeof(struct kv_msg_hdr) == 16, "msg hdr size");

enum kv_msg_type {
	KV_MSG_HELLO = 1,      /* client -> kvd: join a job */
	KV_MSG_WELCOME = 2,    /* kvd -> client, fds: ring segment, doorbell */
	KV_MSG_ERROR = 3,      /* kvd -> peer: a status code and a sentence (0: done) */
	KV_MSG_SEG_ALLOC = 4,  /* client -> kvd: an arena segment of at least bytes */
	KV_MSG_SEG = 5,        /* kvd -> client, fd: the segment */
	KV_MSG_SEG_FREE = 6,   /* client -> kvd: give a segment back */
	KV_MSG_KEY_OPEN = 7,   /* client -> kvd: find (or create) a key */
	KV_MSG_KEY = 8,        /* kvd -> client: the key's id and geometry */
	KV_MSG_STATUS_REQ = 9, /* kvctl -> kvd */
	KV_MSG_STATUS = 10,    /* kvd -> kvctl: a piece of text */
	KV_MSG_DROP = 11,      /* kvctl -> kvd: drop a job */
	KV_MSG_OPTIMIZER = 12, /* client -> kvd: set the job's optimizer */
	KV_MSG_SAVE = 13,      /* client -> kvd, fd: directory; save optimizer states */
	KV_MSG_LOAD = 14,      /* client -> kvd, fd: the file; load optimizer states */
	KV_MSG_HOLD = 15,      /* kvd -> client, fds: segments of the job to keep */
	KV_MSG_ADOPT = 16,     /* client -> kvd before a resuming hello, fds: what it kept */
	KV_MSG_TYPE_MAX = 17,
};

enum kv_hello_flags {
	/* kvd restarted: take the job back from the segments sent before
	 * (ADOPT) if it has no such job, then join it as usual */
	KV_HELLO_RESUME = 1 << 0,
};

/* What a held segment is (HOLD, ADOPT); id: its index among its kind. */
enum kv_hold_kind {
	KV_HOLD_MANIFEST = 1, /* a chunk of the job's manifest; id: the chunk */
	KV_HOLD_VALUES = 2,   /* a value segment of the job */
	KV_HOLD_DIRECT = 3,   /* a direct segment of the job */
	KV_HOLD_BOARD = 4,    /* the job board; id 0 */
	KV_HOLD_OWN = 5,      /* ADOPT only: the client's own arena segment */
	KV_HOLD_KIND_MAX = 6,
};
#define KV_HOLD_MAX 4 /* segments per message (SEG_MAX_FDS) */

enum kv_key_mode {
	KV_KEY_FIND = 0,   /* the key must exist and hold a value */
	KV_KEY_CREATE = 1, /* create it if absent (init, broadcast) */
};

enum kv_key_flags {
	KV_KEYF_CREATED = 1 << 0, /* this request created the key */
	KV_KEYF_VALUE = 1 << 1,   /* the key holds a value */
	KV_KEYF_DIRECT = 1 << 2,  /* direct rounds: fd of its segment attached */
};

enum kv_status_what {
	KV_STATUS_TEXT = 0,
	KV_STATUS_JSON = 1,
	KV_STATUS_METRICS = 2,
	KV_STATUS_JOBS = 3,
	KV_STATUS_MAX = 4,
};

enum kv_status_flags {
	KV_STATUSF_MORE = 1 << 0, /* another STATUS message follows */
};

/* Decoding failures: each a distinct reason. */
enum kv_msg_err {
	KV_MSG_ESHORT = -1,   /* shorter than a header */
	KV_MSG_EMAGIC = -2,   /* wrong magic */
	KV_MSG_EVERSION = -3, /* protocol version we do not speak */
	KV_MSG_ETYPE = -4,    /* unknown type */
	KV_MSG_ELENGTH = -5,  /* length field disagrees with the datagram or the type */
	KV_MSG_EFIELD = -6,   /* a body field out of range */
};

/*
 * A decoded message.  Names are copied and NUL-terminated; longer text
 * (error sentences, status, paths) points into the buffer that was decoded
 * and is not terminated: it is valid while that buffer is.
 */
struct kv_msg {
	uint16_t type;
	uint32_t seq;
	union {
		struct {
			int32_t rank;
			int32_t num_workers;
			int32_t device;
			uint32_t flags;
			char job[KV_JOB_MAX + 1];
		} hello;
		struct {
			uint32_t client_id;
			uint32_t flags;
			uint64_t seg_size;
			uint32_t sq_entries;
			uint32_t cq_entries;
			uint32_t part_bytes;
			uint32_t max_segs;
			char version[KV_VERSION_LEN + 1];
		} welcome;
		struct {
			int32_t code;
			uint32_t len;
			const char *text;
		} error;
		struct {
			uint64_t bytes;
		} seg_alloc;
		struct {
			uint32_t seg_id;
			uint64_t size;
		} seg;
		struct {
			uint32_t seg_id;
		} seg_free;
		struct {
			uint64_t count;
			uint8_t dtype;
			uint8_t mode;
			char name[KV_KEY_MAX + 1];
			uint32_t name_len;
		} key_open;
		struct {
			uint32_t key_id;
			uint32_t nparts;
			uint64_t count;
			uint32_t part_elems;
			uint8_t dtype;
			uint8_t flags;
			uint32_t dseg;  /* direct keys: kvd's id of the segment */
			uint64_t doff;  /* and the offset of the key's block in it */
			uint64_t dsize; /* the segment's size */
			uint32_t rounds; /* engine keys: the most rounds a part completed
					  * (low 32 bits; a bound for round tags); 0 direct */
		} key;
		struct {
			uint32_t what;
			uint32_t flags;
		} status_req;
		struct {
			uint32_t flags;
			uint32_t len;
			const char *text;
		} status;
		struct {
			char job[KV_JOB_MAX + 1];
		} drop;
		struct {
			uint32_t len;
			const char *spec;
		} optimizer;
		struct {
			uint32_t n; /* 1..KV_HOLD_MAX, one fd each, in order */
			uint32_t kind[KV_HOLD_MAX];
			uint32_t id[KV_HOLD_MAX];
		} hold; /* HOLD and ADOPT */
		struct {
			uint32_t flags; /* save: 1 = dump the optimizer spec too */
			uint32_t len;
			const char *path; /* save: file name inside the passed directory */
		} file;
	} u;
};

/* 1 when name is a valid job name: 1-128 bytes of [A-Za-z0-9._-]. */
int kv_job_name_valid(const char *name, size_t len);

/*
 * Decode buf[0..len).  Returns 0, or a kv_msg_err with *why (if not NULL) set
 * to a phrase naming the bad part ("hello: job name", ...).
 */
int kv_msg_decode(const void *buf, size_t len, struct kv_msg *m, const char **why);

/* Encode m into buf; returns the message length, or 0 when it does not fit or m is invalid. */
size_t kv_msg_encode(const struct kv_msg *m, void *buf, size_t cap);

const char *kv_msg_strerror(int err);

#endif /* KV_SHM_MSG_H */
