/* SPDX-License-Identifier: MIT */
/*
 * test_msg.c - the control-message codec: every message round-trips, and
 * every malformed input is rejected with its own reason.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "../../include/kv.h"
#include "../../shm/msg.h"

static uint8_t buf[KV_MSG_MAX + 64];

static size_t enc(const struct kv_msg *m)
{
	size_t n = kv_msg_encode(m, buf, sizeof(buf));
	cr_assert_gt(n, 0, "encode type %u", m->type);
	return n;
}

static void dec_ok(size_t n, struct kv_msg *out)
{
	const char *why = NULL;
	int rc = kv_msg_decode(buf, n, out, &why);
	cr_assert_eq(rc, 0, "decode: %s (%s)", kv_msg_strerror(rc), why ? why : "");
}

static void dec_fails(size_t n, int want, const char *what)
{
	struct kv_msg m;
	const char *why = NULL;
	int rc = kv_msg_decode(buf, n, &m, &why);
	cr_assert_eq(rc, want, "%s: got %d (%s), want %d", what, rc, why ? why : "-", want);
	cr_assert_not_null(why, "%s: a reason is named", what);
}

Test(msg, hello_round_trip)
{
	struct kv_msg m = { .type = KV_MSG_HELLO, .seq = 77 }, d;

	m.u.hello.rank = 3;
	m.u.hello.num_workers = 4;
	m.u.hello.device = -1;
	m.u.hello.flags = 9;
	strcpy(m.u.hello.job, "train-01.a_b");
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.type, KV_MSG_HELLO);
	cr_assert_eq(d.seq, 77);
	cr_assert_eq(d.u.hello.rank, 3);
	cr_assert_eq(d.u.hello.num_workers, 4);
	cr_assert_eq(d.u.hello.device, -1);
	cr_assert_eq(d.u.hello.flags, 9);
	cr_assert_str_eq(d.u.hello.job, "train-01.a_b");
}

Test(msg, welcome_round_trip)
{
	struct kv_msg m = { .type = KV_MSG_WELCOME, .seq = 1 }, d;

	m.u.welcome.client_id = 12;
	m.u.welcome.seg_size = 1 << 20;
	m.u.welcome.sq_entries = 256;
	m.u.welcome.cq_entries = 512;
	m.u.welcome.part_bytes = 1 << 20;
	m.u.welcome.max_segs = 64;
	strcpy(m.u.welcome.version, "0.1.0");
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.welcome.client_id, 12);
	cr_assert_eq(d.u.welcome.seg_size, 1 << 20);
	cr_assert_eq(d.u.welcome.sq_entries, 256);
	cr_assert_eq(d.u.welcome.cq_entries, 512);
	cr_assert_eq(d.u.welcome.part_bytes, 1 << 20);
	cr_assert_eq(d.u.welcome.max_segs, 64);
	cr_assert_str_eq(d.u.welcome.version, "0.1.0");
}

Test(msg, text_messages_round_trip)
{
	static const char sentence[] = "rank 5 is out of range for a job of 4 workers";
	struct kv_msg m = { .type = KV_MSG_ERROR, .seq = 5 }, d;
	size_t n;

	m.u.error.code = KV_ERR_INVALID;
	m.u.error.text = sentence;
	m.u.error.len = sizeof(sentence) - 1;
	n = enc(&m);
	dec_ok(n, &d);
	cr_assert_eq(d.u.error.code, KV_ERR_INVALID);
	cr_assert_eq(d.u.error.len, strlen(sentence));
	cr_assert_eq(memcmp(d.u.error.text, sentence, d.u.error.len), 0);

	m.type = KV_MSG_STATUS;
	m.u.status.flags = KV_STATUSF_MORE;
	m.u.status.text = "{\"jobs\": []}";
	m.u.status.len = 12;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.status.flags, KV_STATUSF_MORE);
	cr_assert_eq(memcmp(d.u.status.text, "{\"jobs\": []}", 12), 0);

	m.type = KV_MSG_OPTIMIZER;
	m.u.optimizer.spec = "sgd lr=0.1";
	m.u.optimizer.len = 10;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.optimizer.len, 10);
	cr_assert_eq(memcmp(d.u.optimizer.spec, "sgd lr=0.1", 10), 0);

	m.type = KV_MSG_SAVE;
	m.u.file.flags = 1;
	m.u.file.path = "ckpt.kvs";
	m.u.file.len = 8;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.file.flags, 1);
	cr_assert_eq(memcmp(d.u.file.path, "ckpt.kvs", 8), 0);
}

Test(msg, segment_and_key_round_trip)
{
	struct kv_msg m = { .type = KV_MSG_SEG_ALLOC }, d;

	m.u.seg_alloc.bytes = 123456789;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.seg_alloc.bytes, 123456789);

	m.type = KV_MSG_SEG;
	m.u.seg.seg_id = 7;
	m.u.seg.size = 1 << 22;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.seg.seg_id, 7);
	cr_assert_eq(d.u.seg.size, 1 << 22);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_SEG_FREE;
	m.u.seg_free.seg_id = 9;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.seg_free.seg_id, 9);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_KEY_OPEN;
	m.u.key_open.count = 1000;
	m.u.key_open.dtype = KV_BFLOAT16;
	m.u.key_open.mode = KV_KEY_CREATE;
	memcpy(m.u.key_open.name, "layer/3 weight \xe2\x9c\x93", 18);
	m.u.key_open.name_len = 18;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.key_open.count, 1000);
	cr_assert_eq(d.u.key_open.dtype, KV_BFLOAT16);
	cr_assert_eq(d.u.key_open.mode, KV_KEY_CREATE);
	cr_assert_eq(d.u.key_open.name_len, 18);
	cr_assert_eq(memcmp(d.u.key_open.name, "layer/3 weight \xe2\x9c\x93", 18), 0);

	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_KEY;
	m.u.key.key_id = 42;
	m.u.key.count = 1000;
	m.u.key.part_elems = 256;
	m.u.key.nparts = 4;
	m.u.key.dtype = KV_INT64;
	m.u.key.flags = KV_KEYF_VALUE;
	m.u.key.rounds = 4000000000u;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.key.key_id, 42);
	cr_assert_eq(d.u.key.nparts, 4);
	cr_assert_eq(d.u.key.part_elems, 256);
	cr_assert_eq(d.u.key.dtype, KV_INT64);
	cr_assert_eq(d.u.key.flags, KV_KEYF_VALUE);
	cr_assert_eq(d.u.key.rounds, 4000000000u);
	/* a direct key has no engine rounds to tell */
	m.u.key.flags = KV_KEYF_DIRECT;
	m.u.key.dsize = 4096;
	dec_fails(enc(&m), KV_MSG_EFIELD, "rounds of a direct key");
}

Test(msg, control_round_trip)
{
	struct kv_msg m = { .type = KV_MSG_STATUS_REQ }, d;

	m.u.status_req.what = KV_STATUS_METRICS;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.status_req.what, KV_STATUS_METRICS);

	m.type = KV_MSG_DROP;
	strcpy(m.u.drop.job, "victim");
	dec_ok(enc(&m), &d);
	cr_assert_str_eq(d.u.drop.job, "victim");
}

/* HOLD and ADOPT: a list of up to four (kind, id) pairs, one per fd. */
Test(msg, hold_and_adopt)
{
	struct kv_msg m = { .type = KV_MSG_HOLD }, d;
	size_t n;

	m.u.hold.n = 3;
	m.u.hold.kind[0] = KV_HOLD_MANIFEST;
	m.u.hold.kind[1] = KV_HOLD_VALUES;
	m.u.hold.id[1] = 7;
	m.u.hold.kind[2] = KV_HOLD_BOARD;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.u.hold.n, 3);
	cr_assert_eq(d.u.hold.kind[1], KV_HOLD_VALUES);
	cr_assert_eq(d.u.hold.id[1], 7);
	cr_assert_eq(d.u.hold.kind[3], 0);

	m.type = KV_MSG_ADOPT;
	m.u.hold.kind[2] = KV_HOLD_OWN;
	m.u.hold.id[2] = 65535;
	dec_ok(enc(&m), &d);
	cr_assert_eq(d.type, KV_MSG_ADOPT);
	cr_assert_eq(d.u.hold.kind[2], KV_HOLD_OWN);
	cr_assert_eq(d.u.hold.id[2], 65535);

	/* kvd never hands out a client's own segment */
	m.type = KV_MSG_HOLD;
	n = enc(&m);
	dec_fails(n, KV_MSG_EFIELD, "HOLD of an own segment");
	m.u.hold.kind[2] = KV_HOLD_BOARD;
	m.u.hold.id[2] = 65536;
	dec_fails(enc(&m), KV_MSG_EFIELD, "id past 65535");
	m.u.hold.id[2] = 0;
	m.u.hold.kind[2] = KV_HOLD_KIND_MAX;
	dec_fails(enc(&m), KV_MSG_EFIELD, "unknown kind");
	m.u.hold.kind[2] = KV_HOLD_BOARD;
	/* count 0 or 5, an entry past the count, reserved words: the wire says so */
	n = enc(&m);
	buf[16] = 0;
	dec_fails(n, KV_MSG_EFIELD, "count 0");
	buf[16] = 5;
	dec_fails(n, KV_MSG_EFIELD, "count 5");
	buf[16] = 2;
	dec_fails(n, KV_MSG_EFIELD, "an entry past the count");
	buf[16] = 3;
	buf[16 + 36] = 1;
	dec_fails(n, KV_MSG_EFIELD, "reserved");
	m.u.hold.n = 0;
	cr_assert_eq(kv_msg_encode(&m, buf, sizeof(buf)), 0, "nothing to hold");
}

static size_t valid_hello(void)
{
	struct kv_msg m = { .type = KV_MSG_HELLO };

	m.u.hello.rank = 0;
	m.u.hello.num_workers = 2;
	m.u.hello.device = -1;
	strcpy(m.u.hello.job, "job");
	return enc(&m);
}

Test(msg, rejects_bad_headers)
{
	size_t n = valid_hello();
	uint32_t v;

	dec_fails(0, KV_MSG_ESHORT, "empty");
	dec_fails(15, KV_MSG_ESHORT, "shorter than a header");
	dec_fails(n - 1, KV_MSG_ELENGTH, "truncated by one byte");

	buf[n] = 'x';
	dec_fails(n + 1, KV_MSG_ELENGTH, "one byte too many");

	buf[0] ^= 1;
	dec_fails(n, KV_MSG_EMAGIC, "wrong magic");
	buf[0] ^= 1;

	buf[4] = 2;
	dec_fails(n, KV_MSG_EVERSION, "wrong version");
	buf[4] = 1;

	buf[6] = 0;
	dec_fails(n, KV_MSG_ETYPE, "type 0");
	buf[6] = 200;
	dec_fails(n, KV_MSG_ETYPE, "type 200");
	buf[6] = KV_MSG_HELLO;

	v = KV_MSG_MAX + 1;
	memcpy(buf + 8, &v, 4);
	dec_fails(n, KV_MSG_ELENGTH, "length field lies");
	dec_fails(KV_MSG_MAX + 1, KV_MSG_ELENGTH, "oversized datagram");
}

Test(msg, rejects_bad_fields)
{
	size_t n;
	int32_t i;

	n = valid_hello();
	i = 2000;
	memcpy(buf + 16 + 4, &i, 4);
	dec_fails(n, KV_MSG_EFIELD, "num_workers 2000");

	n = valid_hello();
	i = -1;
	memcpy(buf + 16, &i, 4);
	dec_fails(n, KV_MSG_EFIELD, "rank -1");

	n = valid_hello();
	i = -2;
	memcpy(buf + 16 + 8, &i, 4);
	dec_fails(n, KV_MSG_EFIELD, "device -2");

	n = valid_hello();
	buf[n - 1] = '/';
	dec_fails(n, KV_MSG_EFIELD, "job name with a slash");

	n = valid_hello();
	buf[16 + 18] = 1; /* reserved */
	dec_fails(n, KV_MSG_EFIELD, "reserved byte set");

	/* a job name of 129 bytes is refused by both sides */
	struct kv_msg m = { .type = KV_MSG_HELLO };
	m.u.hello.num_workers = 1;
	memset(m.u.hello.job, 'a', KV_JOB_MAX);
	cr_assert_gt(kv_msg_encode(&m, buf, sizeof(buf)), 0, "128 bytes is fine");
	cr_assert(kv_job_name_valid(m.u.hello.job, 128));
	cr_assert_not(kv_job_name_valid(m.u.hello.job, 129));
	cr_assert_not(kv_job_name_valid("", 0));

	/* key open: dtype, mode, count, name */
	struct kv_msg k = { .type = KV_MSG_KEY_OPEN };
	k.u.key_open.count = 4;
	k.u.key_open.name_len = 1;
	k.u.key_open.name[0] = 'w';
	n = enc(&k);
	buf[16 + 8] = 6;
	dec_fails(n, KV_MSG_EFIELD, "dtype 6");
	n = enc(&k);
	buf[16 + 9] = 2;
	dec_fails(n, KV_MSG_EFIELD, "mode 2");
	n = enc(&k);
	memset(buf + 16, 0, 8);
	dec_fails(n, KV_MSG_EFIELD, "count 0");
	n = enc(&k);
	buf[n - 1] = '\0';
	dec_fails(n, KV_MSG_EFIELD, "NUL in a key name");
	k.u.key_open.name_len = KV_KEY_MAX + 1;
	cr_assert_eq(kv_msg_encode(&k, buf, sizeof(buf)), 0, "256-byte key refused");

	/* error code outside the API's range */
	struct kv_msg e = { .type = KV_MSG_ERROR };
	e.u.error.code = 1;
	n = enc(&e);
	dec_fails(n, KV_MSG_EFIELD, "positive error code");

	/* key geometry that does not add up */
	struct kv_msg g = { .type = KV_MSG_KEY };
	g.u.key.count = 10;
	g.u.key.part_elems = 4;
	g.u.key.nparts = 2;
	n = enc(&g);
	dec_fails(n, KV_MSG_EFIELD, "10 elements in 2 parts of 4");

	/* welcome with a ring size that is not a power of two */
	struct kv_msg w = { .type = KV_MSG_WELCOME };
	w.u.welcome.sq_entries = 100;
	w.u.welcome.cq_entries = 128;
	w.u.welcome.part_bytes = 4096;
	w.u.welcome.max_segs = 1;
	n = enc(&w);
	dec_fails(n, KV_MSG_EFIELD, "100 ring entries");

	/* status request of an unknown kind */
	struct kv_msg s = { .type = KV_MSG_STATUS_REQ };
	s.u.status_req.what = KV_STATUS_MAX;
	n = enc(&s);
	dec_fails(n, KV_MSG_EFIELD, "unknown status kind");
}

Test(msg, text_length_must_match)
{
	struct kv_msg m = { .type = KV_MSG_ERROR };
	size_t n;
	uint32_t len;

	m.u.error.code = KV_ERR_PEER;
	m.u.error.text = "abc";
	m.u.error.len = 3;
	n = enc(&m);
	len = 4;
	memcpy(buf + 16 + 4, &len, 4);
	dec_fails(n, KV_MSG_ELENGTH, "text length one too long");
	len = 2;
	memcpy(buf + 16 + 4, &len, 4);
	dec_fails(n, KV_MSG_ELENGTH, "text length one too short");
}

/* Every prefix of every valid message is rejected. */
Test(msg, every_truncation_rejected)
{
	struct kv_msg m = { .type = KV_MSG_KEY_OPEN };
	struct kv_msg d;
	size_t n;

	m.u.key_open.count = 1;
	m.u.key_open.name_len = 5;
	memcpy(m.u.key_open.name, "bias0", 5);
	n = enc(&m);
	for (size_t k = 0; k < n; k++)
		cr_assert_neq(kv_msg_decode(buf, k, &d, NULL), 0, "prefix of %zu bytes", k);
}

/*
 * Random bytes, and valid messages with random bytes flipped: the decoder
 * never crashes (the sanitizer builds catch any out-of-bounds read) and
 * whatever it accepts re-encodes to the same bytes.
 */
Test(msg, random_inputs, .timeout = 120)
{
	static uint8_t again[KV_MSG_MAX];
	unsigned seed = 12345;
	long accepted = 0;

	for (int iter = 0; iter < 200000; iter++) {
		size_t n;
		struct kv_msg d;

		if (iter % 2) {
			n = (size_t)rand_r(&seed) % 512;
			for (size_t i = 0; i < n; i++)
				buf[i] = (uint8_t)rand_r(&seed);
			if (n >= 16 && iter % 4 == 1) { /* often a plausible header */
				struct kv_msg_hdr h = { KV_MSG_MAGIC, KV_MSG_VERSION,
							(uint16_t)(1 + rand_r(&seed) % 15),
							(uint32_t)n, 0 };
				memcpy(buf, &h, sizeof(h));
			}
		} else {
			n = valid_hello();
			for (int f = 0; f < 1 + rand_r(&seed) % 3; f++)
				buf[(size_t)rand_r(&seed) % n] ^= (uint8_t)(1 + rand_r(&seed) % 255);
		}
		if (kv_msg_decode(buf, n, &d, NULL) == 0) {
			size_t m = kv_msg_encode(&d, again, sizeof(again));
			accepted++;
			cr_assert_eq(m, n, "accepted input re-encodes to its length");
			cr_assert_eq(memcmp(again, buf, n), 0, "and to its bytes");
		}
	}
	cr_log_info("random inputs: %ld of 200000 accepted (all re-encoded identically)",
		    accepted);
}
