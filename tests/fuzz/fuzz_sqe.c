/* SPDX-License-Identifier: MIT */
/*
 * fuzz_sqe.c - libFuzzer target for kvd's handling of submission entries.
 *
 * The daemon's engine (daemon/engine.c) is compiled into this file, so the
 * entries go through exactly the code kvd runs: they are written into a
 * real client's submission ring (the ring segment client_create() makes),
 * taken with poll_client() (ring_pop's private copy, then take(): op, key,
 * dtype, count, part, every buffer resolved inside the client's segments),
 * and ready rounds are run with run_ready() on this thread (no workers).
 * Nothing in daemon/ is changed for it.
 *
 * The world, made once: a job of two ranks with keys of every dtype (one of
 * them direct, which the engine must refuse), two clients whose arena
 * segments are malloc'd to their exact sizes (so ASan sees one byte past a
 * segment; kvd's real segments are memfds rounded up to pages).
 *
 * The input is a sequence of 64-byte entries; entry i goes to rank i % 2.
 * Each one's user_data is replaced by a tag unique to it (a CANCEL's by the
 * tag of an earlier entry it names), so completions can be matched.  The
 * oracle is written from the contract (shm/layout.h, the design's round semantics), not from
 * engine.c:
 *  - an invalid entry (op outside 1..6, unknown key, dtype or count not the
 *    key's, part >= nparts, a direct key, a buffer outside the client's
 *    segments, a missing buffer the op needs) completes at once, exactly
 *    once, with a status its faults allow;
 *  - a valid one never fails with KV_ERR_INVALID, and any status it gets
 *    is one the contract names for it;
 *  - at the end of the input every pending op is failed (as when the job
 *    breaks), and then every entry but CANCEL has exactly one completion,
 *    nothing is left pending, and no client was evicted.
 * And, as always, no crash and no sanitizer report; and no kernel call that
 * refuses its arguments (see kernel_checked below).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/optim.h"
#include "../../kernels/reduce.h"

/*
 * kvd refuses misaligned and partly overlapping buffers when it takes an
 * entry, so a kernel should never refuse its arguments; if one did, the
 * round would fail with KV_ERR_INVALID on every rank.  Every call goes
 * through this check, which treats a refusal as a bug (the engine's
 * validation missed something).  The headers above are included first, so that their prototypes
 * are not rewritten; the calls in engine.c are.
 */
static int kernel_checked(int rc, const char *call)
{
	static int off = -1; /* FUZZ_SQE_KERNEL_CHECK=0: count refusals, go on */
	static unsigned long refused;

	if (off < 0)
		off = getenv("FUZZ_SQE_KERNEL_CHECK") &&
		      !strcmp(getenv("FUZZ_SQE_KERNEL_CHECK"), "0");
	if (rc && !off) {
		fprintf(stderr,
			"fuzz_sqe: %s refused its arguments (%d): the engine's checks let "
			"through a round the kernels cannot run (it fails with "
			"KV_ERR_INVALID on every rank)\n",
			call, rc);
		abort();
	}
	if (rc) {
		refused++;
		if ((refused & (refused - 1)) == 0) /* at powers of two */
			fprintf(stderr,
				"fuzz_sqe: kernel calls refused so far: %lu (not checked)\n",
				refused);
	}
	return rc;
}
#define reduce_sum(...)	  kernel_checked(reduce_sum(__VA_ARGS__), "reduce_sum")
#define reduce_copy(...)  kernel_checked(reduce_copy(__VA_ARGS__), "reduce_copy")
#define optim_update(...) kernel_checked(optim_update(__VA_ARGS__), "optim_update")

#include "../../daemon/engine.c"

#define FCHECK(cond, ...)                                                                    \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			fprintf(stderr, "fuzz_sqe: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                        \
			fprintf(stderr, "\n");                                               \
			abort();                                                             \
		}                                                                            \
	} while (0)

#define MAX_RECORDS 512
#define NSEGS	    3

static const uint64_t seg_sizes[NSEGS] = {4096, 8192, 100};

/* what the oracle knows about each key: its own copy, from the KEY reply's fields */
struct fkey {
	uint32_t id, nparts, part_elems;
	uint64_t count;
	kv_dtype dtype;
	bool direct;
};

static struct kvd D;
static struct engine *E;
static struct job *J;
static struct client *C[2];
static struct ring SQ[2], CQ[2]; /* the clients' side of their rings */
static struct fkey K[8];
static uint32_t NK;
static uint64_t iter;

/* engine.c calls these in ctl.c; here nobody is to be evicted */
void ctl_evict(struct kvd *d, struct client *c)
{
	FCHECK(0, "client of rank %d evicted: %s", c->rank, c->evict_why);
}

void ctl_ckpt_done(struct kvd *d, struct ckpt_req *req)
{
	FCHECK(0, "no checkpoint was asked for");
}

static void add_key(const char *name, uint64_t count, kv_dtype t)
{
	struct kv_msg m = {.type = KV_MSG_KEY_OPEN};
	char why[256];
	struct key *k;
	bool created;
	int rc;

	m.u.key_open.count = count;
	m.u.key_open.dtype = (uint8_t)t;
	m.u.key_open.mode = KV_KEY_CREATE;
	m.u.key_open.name_len = (uint32_t)strlen(name);
	memcpy(m.u.key_open.name, name, m.u.key_open.name_len);
	rc = job_key_open(&D, J, &m, 0, &k, &created, why, sizeof(why));
	FCHECK(rc == 0 && created, "key %s: %s", name, why);
	K[NK] = (struct fkey){.id = k->id,
			      .nparts = k->nparts,
			      .part_elems = k->part_elems,
			      .count = k->count,
			      .dtype = k->dtype,
			      .direct = k->dkey != NULL};
	FCHECK(K[NK].id == NK, "key ids are 0, 1, ...");
	NK++;
}

static void setup(void)
{
	char why[256];

	D.cfg.threads = 0;
	D.cfg.max_keys = 64;
	D.cfg.max_ranks = 8;
	D.cfg.max_clients = 8;
	D.cfg.part_bytes = 4096;
	D.cfg.inline_bytes = 1u << 20;
	D.cfg.sq_entries = 8;
	D.cfg.cq_entries = 8; /* small: completions overflow (and come back) often */
	D.cfg.max_segs = 4;
	D.cfg.direct_max = 64;
	D.cfg.allow_gid = -1;
	D.cfg.listen_fd = -1;
	pthread_mutex_init(&D.lock, NULL);
	E = calloc(1, sizeof(*E));
	FCHECK(E, "calloc");
	E->d = &D;
	E->doorbell = -1;
	pthread_mutex_init(&E->qlock, NULL);
	pthread_mutex_init(&E->plock, NULL);
	pthread_cond_init(&E->pcond, NULL);
	D.eng = E;
	J = job_create(&D, "fuzz", 0, 2, why, sizeof(why));
	FCHECK(J, "job_create");
	add_key("f32", 100, KV_FLOAT32);
	add_key("i64-2parts", 1000, KV_INT64);
	add_key("f16-2parts", 3000, KV_FLOAT16);
	add_key("bf16", 33, KV_BFLOAT16);
	add_key("f64", 17, KV_FLOAT64);
	add_key("i32-5parts", 5000, KV_INT32);
	add_key("direct", 4, KV_FLOAT32);
	FCHECK(K[1].nparts == 2 && K[2].nparts == 2 && K[5].nparts == 5 && K[6].direct,
	       "key geometry: %u %u %u %d", K[1].nparts, K[2].nparts, K[5].nparts, K[6].direct);
	for (int r = 0; r < 2; r++) {
		struct client *c = client_create(&D, 0, 1000 + r, why, sizeof(why));
		struct kv_seg_hdr *h;

		FCHECK(c, "client_create: %s", why);
		c->job = J;
		c->rank = r;
		J->ranks[r] = c;
		J->present++;
		for (int i = 0; i < NSEGS; i++) {
			c->segs[i] = (struct seginfo){.fd = -1, .size = seg_sizes[i]};
			c->segs[i].base = malloc(seg_sizes[i]);
			FCHECK(c->segs[i].base, "malloc");
			memset(c->segs[i].base, 0, seg_sizes[i]);
		}
		__atomic_store_n(&c->nsegs, NSEGS, __ATOMIC_RELEASE);
		h = (struct kv_seg_hdr *)c->ring_mem;
		ring_attach(&SQ[r], (struct kv_ring_ctl *)(c->ring_mem + KV_SQ_CTL_OFF),
			    c->ring_mem + h->sq_off, h->sq_entries, sizeof(struct kv_sqe), true);
		ring_attach(&CQ[r], (struct kv_ring_ctl *)(c->ring_mem + KV_CQ_CTL_OFF),
			    c->ring_mem + h->cq_off, h->cq_entries, sizeof(struct kv_cqe), false);
		C[r] = c;
		on_join(E, c);
	}
	FCHECK(J->complete_once, "both ranks joined");
}

/* ------------------------------------------------------------------ the oracle */

enum { A_INVALID = 1, A_NOKEY = 2, A_MISMATCH = 4 };

static size_t esize(kv_dtype t)
{
	static const size_t s[] = {4, 8, 2, 2, 4, 8};
	return (unsigned)t < 6 ? s[t] : 0;
}

/* Is loc (when given) inside one of the client's segments, for bytes bytes? */
static bool loc_ok(const struct kv_loc *l, uint64_t bytes)
{
	if (l->seg == KV_SEG_NONE)
		return true;
	if (l->seg >= NSEGS)
		return false;
	return l->off <= seg_sizes[l->seg] && bytes <= seg_sizes[l->seg] - l->off;
}

/* The faults of s from rank r, as a set of A_* (0: a valid entry). */
static int faults(const struct kv_sqe *s, int r)
{
	const struct fkey *k;
	int f = 0;
	uint64_t bytes, elems;
	bool need_in, need_out;

	if (s->op == KV_OP_NOP || s->op >= KV_OP_MAX)
		f |= A_INVALID;
	if (s->key >= NK)
		return f | A_NOKEY;
	k = &K[s->key];
	if (s->dtype != k->dtype || s->count != k->count)
		f |= A_MISMATCH;
	if (k->direct)
		f |= A_INVALID;
	if (s->part >= k->nparts)
		return f | A_INVALID;
	elems = k->count - (uint64_t)s->part * k->part_elems;
	if (elems > k->part_elems)
		elems = k->part_elems;
	bytes = elems * esize(k->dtype);
	if (!loc_ok(&s->in, bytes) || !loc_ok(&s->out, bytes))
		f |= A_INVALID;
	/* buffers are element-aligned, and an output is the input or apart from it */
	if ((s->in.seg != KV_SEG_NONE && s->in.off % esize(k->dtype)) ||
	    (s->out.seg != KV_SEG_NONE && s->out.off % esize(k->dtype)))
		f |= A_INVALID;
	if (s->in.seg != KV_SEG_NONE && s->in.seg == s->out.seg && s->in.off != s->out.off &&
	    s->in.off < s->out.off + bytes && s->out.off < s->in.off + bytes)
		f |= A_INVALID;
	need_in = s->op == KV_OP_PUSH || s->op == KV_OP_PUSHPULL ||
		  ((s->op == KV_OP_INIT || s->op == KV_OP_BCAST) && r == 0);
	need_out = s->op == KV_OP_PULL;
	if ((need_in && s->in.seg == KV_SEG_NONE) || (need_out && s->out.seg == KV_SEG_NONE))
		f |= A_INVALID;
	return f;
}

static bool status_in(int status, int f)
{
	return (status == KV_ERR_INVALID && (f & A_INVALID)) ||
	       (status == KV_ERR_NOKEY && (f & A_NOKEY)) ||
	       (status == KV_ERR_MISMATCH && (f & A_MISMATCH));
}

/* What a valid entry may complete with (the design's round semantics, README "Semantics"). */
static bool valid_status(int status, uint8_t op, int rank, uint32_t round)
{
	bool round_op = op == KV_OP_PUSH || op == KV_OP_PUSHPULL || op == KV_OP_BCAST;

	switch (status) {
	case KV_OK:
	case KV_ERR_TIMEOUT: /* cancelled */
	case KV_ERR_PEER:    /* failed at the end of the input, as when a rank leaves */
		return true;
	case KV_ERR_DAEMON: /* names a completed round whose result is gone (out.tag) */
		return round_op && round;
	case KV_ERR_NOKEY: /* a pull of a part that holds no value yet */
		return op == KV_OP_PULL;
	case KV_ERR_EXISTS: /* a rank's second init */
		return op == KV_OP_INIT;
	case KV_ERR_MISMATCH: /* this rank's op is not the kind rank 0 runs in the round */
		return rank != 0 && (op == KV_OP_PUSH || op == KV_OP_PUSHPULL || op == KV_OP_BCAST);
	default:
		return false;
	}
}

/* ------------------------------------------------------------------ one input */

struct rec {
	uint8_t op;
	int rank, faults, seen, status;
	uint32_t round; /* out.tag: the round a round op says it is for (0: any) */
};

static struct rec R[MAX_RECORDS];
static int NR;

static uint64_t tag(int i)
{
	return (iter << 16) | (uint64_t)i;
}

/* Take every completion the clients can see; returns how many. */
static int drain(void)
{
	int n = 0;

	for (int r = 0; r < 2; r++) {
		struct kv_cqe q;
		int rc;

		while ((rc = ring_pop(&CQ[r], &q)) == 0) {
			int i = (int)(q.user_data & 0xffff);

			FCHECK(q.user_data >> 16 == iter && i < NR && R[i].rank == r,
			       "rank %d got a completion for user_data %llx, which no entry of "
			       "this input (%d entries) of that rank has",
			       r, (unsigned long long)q.user_data, NR);
			FCHECK(R[i].op != KV_OP_CANCEL, "entry %d (a CANCEL) got a completion", i);
			R[i].seen++;
			R[i].status = q.status;
			FCHECK(R[i].seen == 1, "entry %d (op %u) completed twice (%d, then %d)", i,
			       R[i].op, R[i].status, q.status);
			n++;
		}
		FCHECK(rc == -EAGAIN, "CQ of rank %d: %d", r, rc);
	}
	return n;
}

/* Let the engine move overflowed completions in, until nothing moves. */
static void settle(void)
{
	for (int pass = 0; pass < 100000; pass++) {
		int moved = 0;

		for (int r = 0; r < 2; r++)
			moved += poll_client(E, C[r]);
		moved += run_ready(E);
		moved += drain();
		if (!moved && !C[0]->overflow && !C[1]->overflow)
			return;
	}
	FCHECK(0, "completions never settle");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!E)
		setup();
	iter++;
	NR = (int)(size / sizeof(struct kv_sqe));
	if (NR > MAX_RECORDS)
		NR = MAX_RECORDS;
	for (int i = 0; i < NR; i++) {
		struct kv_sqe s;
		int r = i & 1, rc;

		memcpy(&s, data + (size_t)i * sizeof(s), sizeof(s));
		if (s.op == KV_OP_CANCEL)
			s.user_data = tag((int)(s.user_data % (uint64_t)(i + 1)));
		else
			s.user_data = tag(i);
		R[i] = (struct rec){ .op = s.op,
				     .rank = r,
				     .faults = s.op == KV_OP_CANCEL ? 0 : faults(&s, r),
				     .round = s.out.tag };
		rc = ring_push(&SQ[r], &s);
		FCHECK(rc == 0, "SQ of rank %d: %d", r, rc);
		FCHECK(poll_client(E, C[r]) >= 1, "entry %d not taken", i);
		settle();
		if (R[i].faults) {
			FCHECK(R[i].seen == 1,
			       "entry %d (op %u key %u dtype %u count %llu part %u, faults %#x) "
			       "did "
			       "not complete at once",
			       i, s.op, s.key, s.dtype, (unsigned long long)s.count, s.part,
			       R[i].faults);
			FCHECK(!R[i].seen || status_in(R[i].status, R[i].faults),
			       "entry %d (op %u key %u dtype %u count %llu part %u in %u+%llu out "
			       "%u+%llu, faults %#x) completed with %d",
			       i, s.op, s.key, s.dtype, (unsigned long long)s.count, s.part,
			       s.in.seg, (unsigned long long)s.in.off, s.out.seg,
			       (unsigned long long)s.out.off, R[i].faults, R[i].status);
		}
	}
	settle();
	/* the end of the input: fail what waits for the other rank, then count */
	job_fail_pending(E, J, -1, KV_ERR_PEER);
	fail_list(E, &J->held, KV_ERR_PEER);
	settle();
	for (int i = 0; i < NR; i++) {
		if (getenv("FUZZ_SQE_VERBOSE")) /* replaying one input: what became of each entry */
			fprintf(stderr, "entry %d: rank %d op %u faults %#x: %s %d\n", i, R[i].rank,
				R[i].op, R[i].faults, R[i].seen ? "status" : "no completion",
				R[i].status);
		if (R[i].op == KV_OP_CANCEL)
			continue;
		FCHECK(R[i].seen == 1, "entry %d (op %u, faults %#x) completed %d times", i,
		       R[i].op, R[i].faults, R[i].seen);
		if (R[i].faults)
			FCHECK(status_in(R[i].status, R[i].faults),
			       "entry %d (op %u, faults %#x) completed with %d", i, R[i].op,
			       R[i].faults, R[i].status);
		else
			FCHECK(valid_status(R[i].status, R[i].op, R[i].rank, R[i].round),
			       "valid entry %d (op %u, rank %d) completed with %d", i, R[i].op,
			       R[i].rank, R[i].status);
	}
	for (int r = 0; r < 2; r++) {
		FCHECK(C[r]->pending == NULL, "rank %d still has ops pending", r);
		FCHECK(!C[r]->broken, "rank %d broken", r);
	}
	FCHECK(J->held == NULL && E->ready.n == 0 && E->tasks_out == 0, "engine state left over");
	FCHECK(J->inflight == 0, "%llu ops in flight after all completed",
	       (unsigned long long)J->inflight);
	return 0;
}
