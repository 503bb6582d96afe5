/* SPDX-License-Identifier: MIT */
/*
 * mkcorpus.c - writes the seed corpora of the fuzz targets (make fuzz-corpus):
 *   DIR/msg/  one valid message of every type (kv_msg_encode), and a few
 *             variants (longest names and texts, empty texts)
 *   DIR/sqe/  sequences of valid ring entries for fuzz_sqe's world (see the
 *             key table there): entry i comes from rank i % 2
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../../include/kv.h"
#include "../../shm/layout.h"
#include "../../shm/msg.h"

static const char *dir;

static void put(const char *sub, const char *name, const void *buf, size_t len)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, sub);
	mkdir(path, 0755);
	snprintf(path, sizeof(path), "%s/%s/%s", dir, sub, name);
	f = fopen(path, "wb");
	if (!f || fwrite(buf, 1, len, f) != len || fclose(f)) {
		perror(path);
		exit(1);
	}
}

static void msg(const char *name, const struct kv_msg *m)
{
	static unsigned char buf[KV_MSG_MAX];
	size_t n = kv_msg_encode(m, buf, sizeof(buf));

	if (!n) {
		fprintf(stderr, "mkcorpus: cannot encode %s\n", name);
		exit(1);
	}
	put("msg", name, buf, n);
}

static void msgs(void)
{
	static char big[KV_PATH_MAX];
	struct kv_msg m;

	memset(big, 'p', sizeof(big));
	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_HELLO;
	m.seq = 1;
	m.u.hello.rank = 1;
	m.u.hello.num_workers = 4;
	m.u.hello.device = -1;
	strcpy(m.u.hello.job, "train-1.a_b");
	msg("hello", &m);
	memset(m.u.hello.job, 'j', KV_JOB_MAX);
	m.u.hello.rank = KV_MAX_RANKS - 1;
	m.u.hello.num_workers = KV_MAX_RANKS;
	msg("hello-longest-job", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_WELCOME;
	m.seq = 1;
	m.u.welcome.client_id = 3;
	m.u.welcome.seg_size = kv_ring_seg_size(256, 512);
	m.u.welcome.sq_entries = 256;
	m.u.welcome.cq_entries = 512;
	m.u.welcome.part_bytes = 8u << 20;
	m.u.welcome.max_segs = 256;
	strcpy(m.u.welcome.version, KV_VERSION);
	msg("welcome", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_ERROR;
	m.seq = 2;
	m.u.error.code = KV_ERR_PERM;
	m.u.error.text = "job 'x' belongs to uid 0; uid 65534 may not join it";
	m.u.error.len = (uint32_t)strlen(m.u.error.text);
	msg("error", &m);
	m.u.error.code = KV_OK;
	m.u.error.text = "";
	m.u.error.len = 0;
	msg("error-ok-empty", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_SEG_ALLOC;
	m.seq = 4;
	m.u.seg_alloc.bytes = 16u << 20;
	msg("seg-alloc", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_SEG;
	m.seq = 4;
	m.u.seg.seg_id = 2;
	m.u.seg.size = 16u << 20;
	msg("seg", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_SEG_FREE;
	m.seq = 5;
	m.u.seg_free.seg_id = 2;
	msg("seg-free", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_KEY_OPEN;
	m.seq = 6;
	m.u.key_open.count = 1000;
	m.u.key_open.dtype = KV_BFLOAT16;
	m.u.key_open.mode = KV_KEY_CREATE;
	strcpy(m.u.key_open.name, "layer1.weight");
	m.u.key_open.name_len = (uint32_t)strlen(m.u.key_open.name);
	msg("key-open", &m);
	memset(m.u.key_open.name, 0xff, KV_KEY_MAX);
	m.u.key_open.name_len = KV_KEY_MAX;
	m.u.key_open.mode = KV_KEY_FIND;
	msg("key-open-longest-name", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_KEY;
	m.seq = 6;
	m.u.key.key_id = 7;
	m.u.key.count = 1000;
	m.u.key.part_elems = 300;
	m.u.key.nparts = 4;
	m.u.key.dtype = KV_FLOAT32;
	m.u.key.flags = KV_KEYF_CREATED;
	msg("key", &m);
	m.u.key.flags = KV_KEYF_DIRECT | KV_KEYF_VALUE;
	m.u.key.dseg = 1;
	m.u.key.doff = 128;
	m.u.key.dsize = 8u << 20;
	msg("key-direct", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_STATUS_REQ;
	m.seq = 9;
	m.u.status_req.what = KV_STATUS_JSON;
	msg("status-req", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_STATUS;
	m.seq = 9;
	m.u.status.flags = KV_STATUSF_MORE;
	m.u.status.text = "{\"version\": \"0.1.0\", \"jobs\": []}";
	m.u.status.len = (uint32_t)strlen(m.u.status.text);
	msg("status", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_DROP;
	m.seq = 10;
	strcpy(m.u.drop.job, "train");
	msg("drop", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_OPTIMIZER;
	m.seq = 11;
	m.u.optimizer.spec = "adam lr=0.001 beta1=0.9 beta2=0.999 epsilon=1e-8 wd=0";
	m.u.optimizer.len = (uint32_t)strlen(m.u.optimizer.spec);
	msg("optimizer", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_SAVE;
	m.seq = 12;
	m.u.file.flags = 1;
	m.u.file.path = "states.kvd";
	m.u.file.len = (uint32_t)strlen(m.u.file.path);
	msg("save", &m);
	m.u.file.path = big;
	m.u.file.len = KV_PATH_MAX;
	msg("save-longest-path", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_LOAD;
	m.seq = 13;
	m.u.file.path = "";
	m.u.file.len = 0;
	msg("load", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_HOLD;
	m.u.hold.n = 4;
	m.u.hold.kind[0] = KV_HOLD_MANIFEST;
	m.u.hold.kind[1] = KV_HOLD_VALUES;
	m.u.hold.id[1] = 3;
	m.u.hold.kind[2] = KV_HOLD_DIRECT;
	m.u.hold.kind[3] = KV_HOLD_BOARD;
	msg("hold", &m);
	m.type = KV_MSG_ADOPT;
	m.u.hold.n = 2;
	m.u.hold.kind[1] = KV_HOLD_OWN;
	m.u.hold.id[1] = 65535;
	m.u.hold.kind[2] = m.u.hold.kind[3] = 0;
	msg("adopt", &m);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_HELLO;
	m.seq = 14;
	m.u.hello.num_workers = 4;
	m.u.hello.rank = 3;
	m.u.hello.device = -1;
	m.u.hello.flags = KV_HELLO_RESUME;
	strcpy(m.u.hello.job, "resumed");
	msg("hello-resume", &m);
}

/* ------------------------------------------------------------------ sqe */

/* fuzz_sqe's keys: id, dtype, count (nparts): see setup() there */
enum { K_F32, K_I64, K_F16, K_BF16, K_F64, K_I32, K_DIRECT };
static const struct {
	kv_dtype t;
	uint64_t count;
} keys[] = {
	{KV_FLOAT32, 100}, {KV_INT64, 1000}, {KV_FLOAT16, 3000}, {KV_BFLOAT16, 33},
	{KV_FLOAT64, 17},  {KV_INT32, 5000}, {KV_FLOAT32, 4},
};

static struct kv_sqe seq[64];
static int nseq;

static void e(uint8_t op, int key, uint32_t part, uint32_t in_seg, uint64_t in_off,
	      uint32_t out_seg, uint64_t out_off)
{
	struct kv_sqe *s = &seq[nseq++];

	memset(s, 0, sizeof(*s));
	s->op = op;
	s->dtype = (uint8_t)keys[key].t;
	s->key = (uint32_t)key;
	s->count = keys[key].count;
	s->part = part;
	s->user_data = (uint64_t)nseq;
	s->in = (struct kv_loc){.seg = in_seg, .off = in_off};
	s->out = (struct kv_loc){.seg = out_seg, .off = out_off};
}

static void sqes(const char *name)
{
	put("sqe", name, seq, (size_t)nseq * sizeof(seq[0]));
	nseq = 0;
}

#define NONE KV_SEG_NONE

static void sqe_seeds(void)
{
	/* init by both ranks, then pushpull rounds */
	e(KV_OP_INIT, K_F32, 0, 0, 0, NONE, 0);
	e(KV_OP_INIT, K_F32, 0, NONE, 0, 1, 0);
	e(KV_OP_PUSHPULL, K_F32, 0, 0, 0, 0, 512);
	e(KV_OP_PUSHPULL, K_F32, 0, 1, 0, 1, 1024);
	e(KV_OP_PUSHPULL, K_F32, 0, 0, 1024, 0, 1024);
	e(KV_OP_PUSHPULL, K_F32, 0, 1, 4096, NONE, 0);
	sqes("init-pushpull-f32");

	/* a key of two parts: both parts, both ranks; the last part is short */
	e(KV_OP_INIT, K_I64, 0, 0, 0, NONE, 0);
	e(KV_OP_INIT, K_I64, 0, NONE, 0, NONE, 0);
	e(KV_OP_INIT, K_I64, 1, 0, 0, NONE, 0);
	e(KV_OP_INIT, K_I64, 1, NONE, 0, NONE, 0);
	e(KV_OP_PUSHPULL, K_I64, 0, 0, 0, 0, 0);
	e(KV_OP_PUSHPULL, K_I64, 1, 1, 0, 1, 4096);
	e(KV_OP_PUSHPULL, K_I64, 1, 0, 4096 - 3904, NONE, 0);
	e(KV_OP_PUSHPULL, K_I64, 0, 1, 4096, 1, 4096);
	sqes("two-parts-i64");

	/* broadcast from rank 0 (rank 1 gives no input), then pull */
	e(KV_OP_BCAST, K_F16, 0, 0, 0, 0, 0);
	e(KV_OP_BCAST, K_F16, 0, NONE, 0, 1, 0);
	e(KV_OP_BCAST, K_F16, 1, 1, 0, NONE, 0);
	e(KV_OP_BCAST, K_F16, 1, NONE, 0, 1, 4096);
	e(KV_OP_PULL, K_F16, 0, NONE, 0, 1, 2048);
	e(KV_OP_PULL, K_F16, 1, NONE, 0, 0, 0);
	sqes("bcast-pull-f16");

	/* push, push, then pull; a buffer ending exactly at a segment's end */
	e(KV_OP_INIT, K_BF16, 0, 2, 34, NONE, 0);
	e(KV_OP_INIT, K_BF16, 0, NONE, 0, 2, 34);
	e(KV_OP_PUSH, K_BF16, 0, 2, 0, NONE, 0);
	e(KV_OP_PUSH, K_BF16, 0, 2, 34, NONE, 0);
	e(KV_OP_PULL, K_BF16, 0, NONE, 0, 2, 34);
	e(KV_OP_PULL, K_BF16, 0, NONE, 0, 0, 4096 - 66);
	sqes("push-pull-bf16-edges");

	/* a round of one kind from rank 0 and another from rank 1; a cancel */
	e(KV_OP_PUSHPULL, K_F64, 0, 0, 0, 0, 0);
	e(KV_OP_BCAST, K_F64, 0, NONE, 0, 1, 0);
	e(KV_OP_PUSHPULL, K_I32, 3, 0, 0, NONE, 0);
	e(KV_OP_PUSHPULL, K_F64, 0, 1, 0, 1, 0);
	e(KV_OP_CANCEL, K_I32, 0, NONE, 0, NONE, 0);
	seq[nseq - 1].user_data = 2;
	e(KV_OP_PUSHPULL, K_I32, 4, 1, 0, 1, 0);
	sqes("mismatch-cancel");

	/* the direct key through the engine (refused), and the last part of i32 */
	e(KV_OP_PUSHPULL, K_DIRECT, 0, 0, 0, 0, 0);
	e(KV_OP_PUSHPULL, K_I32, 4, 1, 8192 - 3616, NONE, 0);
	sqes("direct-refused");

	/*
	 * Reproducers of a kvd bug fuzz_sqe found: the engine takes buffers the
	 * kernels refuse (reduce_sum/reduce_copy return KV_ERR_INVALID for a
	 * misaligned or partly overlapping buffer), ignores the refusal, and
	 * completes the round with KV_OK on every rank, nothing computed.
	 */
	e(KV_OP_PUSHPULL, K_F32, 0, 0, 1, 0, 1024); /* rank 0's input 1 byte into seg 0 */
	e(KV_OP_PUSHPULL, K_F32, 0, 1, 0, 1, 0);
	sqes("repro-unaligned-input");
	e(KV_OP_PUSHPULL, K_F32, 0, 0, 0, 0, 8); /* rank 0's output 8 bytes into its input */
	e(KV_OP_PUSHPULL, K_F32, 0, 1, 0, 1, 1024);
	sqes("repro-output-overlaps-input");
	e(KV_OP_BCAST, K_F32, 0, 0, 0, 0, 4); /* the same for a broadcast (reduce_copy) */
	e(KV_OP_BCAST, K_F32, 0, NONE, 0, 1, 0);
	sqes("repro-bcast-output-overlaps-input");
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: mkcorpus DIR\n");
		return 2;
	}
	dir = argv[1];
	mkdir(dir, 0755);
	msgs();
	sqe_seeds();
	return 0;
}
