/* SPDX-License-Identifier: MIT */
/*
 * test_soak.c - the client-crash soak: ranks of a job sum several keys round
 * after round while this process SIGKILLs a random rank at random moments and
 * starts a replacement in its place.
 *
 * What it holds kvd to (the design's fault and round semantics, README "Reliability"):
 *  - survivors learn of a death quickly: each survivor's first op to end after
 *    a kill returns KV_ERR_PEER within 1 s of the kill (kill and return times
 *    are CLOCK_MONOTONIC stamps in a page shared by every process), no op that
 *    straddles a kill returns anything more than 1 s after it, and no op ever
 *    returns KV_ERR_TIMEOUT (every wait is bounded by timeout_ms);
 *  - a new process takes the dead rank back (kv_create with the same job, rank
 *    and num_workers; KV_ERR_EXISTS is retried for up to 3 s, while kvd has not
 *    yet noticed the death), its kv_init of existing keys changes nothing, and
 *    the job resumes where it stood: values are as of the last completed round;
 *  - every round is accounted for: every value returned or pulled is checked
 *    element by element against an independent formula, every rank keeps a
 *    ledger of the rounds it saw complete (one a kill cannot tear), and at the
 *    end each key has exactly as many rounds as the job ran steps.
 *
 * The data.  Keys: "s32" (100 f32) and "s64" (1000 i64) are summed by kvd's
 * direct rounds, "big" (400,000 f32, 1.6 MB: two parts) by its engine.  A step
 * s is one pushpull on every key in that order, and it is round s of each key.
 * Rank r's contribution to round j of key k, element e, is
 *	f(r, j, e) = (r == 0 ? j * W_k : 0) + ((e*31 + r*17 + j*7 + k*5) & 127),
 * so the round's sum is S(j)[e] = j * W_k + G(j, e) with 0 <= G < W_k (G sums
 * at most 4 terms below 128; W_k = 512 for f32, 2^36 for i64): every value is
 * an exactly representable integer, and the round number j can be read back
 * from any element of a key's stored value (floor(v / W_k)), with the
 * remainder as a check.  kv_init stores S(0).
 *
 * Round alignment.  Nothing about rounds is kept outside kvd: the stored value
 * of a key *is* its round counter.  A process (first start or replacement)
 * inits every key, then pulls every key and decodes c_k, the number of rounds
 * key k completed (the smallest round found in its elements: a multi-part key
 * whose round failed between parts may hold round c in some parts and c+1 in
 * others, which is counted as "torn" and allowed).  Because every rank runs
 * the keys in the same order and a round needs every rank, the c_k read
 * "s, ..., s, s-1, ..., s-1": the job is in step s at the first key with
 * c_k = s-1 (or at step s+1, key 0, when all are equal), and that is where the
 * process starts.  A rank whose op returns KV_ERR_PEER pauses 1-3 ms, pulls
 * the key again and decodes it: c_k == j-1 (the round did not complete) means
 * retry the same round with the same contribution; c_k == j means the round
 * completed although this rank was told it failed, which the contract does not
 * allow (counted as "PEER but completed" and fails the test at the end).  The
 * survivors are all blocked on the same key and round (it cannot complete
 * without the dead rank), so the replacement, starting from the values, joins
 * exactly that round.  Kills are one at a time: the next comes only once every
 * rank has synced and the job completed 1-3 more steps, then after a random
 * 0-20 ms; one kill in ten is followed, 0-15 ms after the restart, by a second
 * one of the fresh replacement (an "early" kill, left out of the wait figures).
 *
 * KVTEST_SOAK_KILLS sets the number of kills (default 50 in `make check`,
 * 1000 in `make soak`); they are shared among jobs of 2, 3 and 4 ranks in one
 * kvd.  A job in which a rank fails (a hang: an op timed out, exit status
 * SOAK_EXIT_HANG + key; a fresh process that cannot take its rank back:
 * SOAK_EXIT_REJOIN; any other CHECK: exit 1) is reported, its ranks are
 * killed, and a fresh job takes over the kills left, so that the figures cover
 * every kill; the test fails at the end if anything failed, at once on a wrong
 * value or a dead kvd.  KVTEST_SOAK_SEED replays the driver's random choices
 * (not the timing); KVTEST_SOAK_TRACE=1 prints every rank's resyncs live (a
 * failing rank prints its last ones anyway).
 *
 * Two schedules the soak hits only by chance are also run on purpose below:
 * a survivor descheduled (SIGSTOP) while its peer dies and is replaced, and
 * every rank of a job killed while kvd's workers sum one of its rounds.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define SOAK_MAXR 4
#define SOAK_NKEYS 3
#define SOAK_MAXROUNDS 32768 /* f32: 32767 * 512 + 511 < 2^24 */
#define SOAK_OP_TIMEOUT_MS 3000
/* a rank's exit status: CHECK failures exit 1; an op that timed out (a hang)
 * exits SOAK_EXIT_HANG + the key's index */
#define SOAK_EXIT_HANG 10
#define SOAK_EXIT_REJOIN 20 /* kv_create or kv_init of a fresh process failed */
#define SOAK_WAIT_LIMIT_NS 1000000000ull /* a survivor learns of a death within 1 s */
#define SOAK_PEER_LIMIT_NS 10000000000ull /* a rank retries a failed round this long */

struct soak_key {
	const char *name;
	kv_dtype t;
	size_t count;
	int64_t w; /* weight of the round number in every element */
};

static const struct soak_key keys[SOAK_NKEYS] = {
	{ "s32", KV_FLOAT32, 100, 512 },
	{ "s64", KV_INT64, 1000, (int64_t)1 << 36 },
	{ "big", KV_FLOAT32, 400000, 512 },
};

/* One kill, written by the driver before it publishes kill_gen. */
struct kill_rec {
	uint64_t t_ns; /* CLOCK_MONOTONIC just before kill() */
	int slot;
	int early;
	uint64_t wait_ns[SOAK_MAXR]; /* survivor's first KV_ERR_PEER after the kill, +1; 0 none */
	uint64_t rejoin_ns;          /* kill to the replacement's kv_create returning, +1 */
	int create_tries;
};

/* What one process saw of one key: the rounds it saw complete and the sum of
 * every element those rounds returned (wrapping). */
struct ledger_ent {
	int64_t first, last; /* rounds completed (0: none) */
	uint64_t total;
};

/*
 * One process of a rank slot (incarnation): its ledger.  The process may be
 * SIGKILLed at any instruction, so an entry is never updated in place: the
 * next entry is written into the spare copy and published by one aligned
 * store of ver[k] (the live copy is led[k][ver[k] & 1]).  A kill leaves the
 * ledger as of before or after the round, never half of it.
 */
struct inc_rec {
	int used;
	int slot;
	uint64_t ver[SOAK_NKEYS];
	struct ledger_ent led[SOAK_NKEYS][2];
};

static const struct ledger_ent *led_of(const struct inc_rec *r, int k)
{
	return &r->led[k][__atomic_load_n(&r->ver[k], __ATOMIC_ACQUIRE) & 1];
}

struct soak_shm {
	uint32_t kill_gen; /* kills so far; kills[kill_gen] is the last */
	int64_t stop_step; /* 0, or the last step to run */
	int64_t step_done[SOAK_MAXR];
	int synced_inc[SOAK_MAXR]; /* incarnation that resynced, +1 */
	int finished, final_ok;
	int verbose;   /* ranks print their trace when they fail */
	int no_record; /* the job is being torn down: PEERs now are not the kill's */
	uint64_t wrong, peer_completed, torn, peer_returns, peer_pulls;
	uint64_t ok_after_kill, ok_after_kill_max_ns, create_exists;
	uint8_t seen[SOAK_NKEYS][SOAK_MAXROUNDS]; /* ranks (bits) that got KV_OK for a round */
};

static struct soak_shm *sh;
static struct kill_rec *kills; /* [0 .. max_gen] */
static struct inc_rec *incs;   /* [0 .. max_inc) */
static size_t shm_bytes;
static uint32_t max_gen;
static int max_inc;

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t rnd(uint64_t *s) /* splitmix64 */
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void sleep_us(uint64_t us)
{
	struct timespec t = { (time_t)(us / 1000000), (long)(us % 1000000) * 1000 };

	while (nanosleep(&t, &t) < 0 && errno == EINTR)
		;
}

/* ---------------------------------------------------------------- the data */

static int64_t g_term(int k, int r, int64_t j, size_t e)
{
	return (int64_t)(((uint64_t)e * 31 + (uint64_t)r * 17 + (uint64_t)j * 7 + (uint64_t)k * 5) &
			 127);
}

static int64_t contrib(int k, int r, int64_t j, size_t e)
{
	return (r == 0 ? j * keys[k].w : 0) + g_term(k, r, j, e);
}

/* S(j)[e]: the sum of round j over n ranks, computed independently of kvd */
static int64_t sum_want(int k, int n, int64_t j, size_t e)
{
	int64_t s = j * keys[k].w;

	for (int r = 0; r < n; r++)
		s += g_term(k, r, j, e);
	return s;
}

static int64_t elem_get(int k, const void *b, size_t e)
{
	if (keys[k].t == KV_INT64)
		return ((const int64_t *)b)[e];
	float f = ((const float *)b)[e];
	int64_t v = (int64_t)f;
	return (float)v == f ? v : INT64_MIN; /* not an integer: never a valid value */
}

static void elem_set(int k, void *b, size_t e, int64_t v)
{
	if (keys[k].t == KV_INT64)
		((int64_t *)b)[e] = v;
	else
		((float *)b)[e] = (float)v;
}

static void fill_contrib(int k, int r, int64_t j, void *b)
{
	for (size_t e = 0; e < keys[k].count; e++)
		elem_set(k, b, e, contrib(k, r, j, e));
}

static void fill_sum(int k, int n, int64_t j, void *b)
{
	for (size_t e = 0; e < keys[k].count; e++)
		elem_set(k, b, e, sum_want(k, n, j, e));
}

/* ---------------------------------------------------------------- a rank */

/* What a rank did lately (printed when it fails; as it happens with KVTEST_SOAK_TRACE=1). */
#define TRACE_LINES 32
static char trace_ring[TRACE_LINES][160];
static unsigned trace_n;
static int trace_live;

__attribute__((format(printf, 1, 2))) static void trace(const char *fmt, ...)
{
	char *l = trace_ring[trace_n++ % TRACE_LINES];
	struct timespec t;
	va_list ap;
	int o;

	clock_gettime(CLOCK_MONOTONIC, &t);
	o = snprintf(l, sizeof(trace_ring[0]), "%ld.%06ld rank %s: ", (long)t.tv_sec % 1000,
		     t.tv_nsec / 1000, getenv("KVD_RANK"));
	va_start(ap, fmt);
	vsnprintf(l + o, sizeof(trace_ring[0]) - (size_t)o, fmt, ap);
	va_end(ap);
	if (trace_live)
		fprintf(stderr, "  trace %s\n", l);
}

static void trace_dump(void)
{
	unsigned first = trace_n > TRACE_LINES ? trace_n - TRACE_LINES : 0;

	for (unsigned i = first; i < trace_n; i++)
		fprintf(stderr, "  trace %s\n", trace_ring[i % TRACE_LINES]);
}

struct rk {
	int slot, n, inc;
	uint32_t last_gen; /* kills before this one are accounted for */
	kv_store *kv;
	void *in[SOAK_NKEYS], *out[SOAK_NKEYS];
	uint64_t rng;
	struct inc_rec *rec;
};

static void atomic_max_u64(uint64_t *p, uint64_t v)
{
	uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);

	while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_RELAXED,
						       __ATOMIC_RELAXED))
		;
}

/*
 * After each op: if a kill happened that this rank survived and has not yet
 * seen, a KV_ERR_PEER is the moment it learned of it (the wait sample); an op
 * that began before the kill and still succeeded is noted with how long after
 * the kill it returned.
 */
static void note_op(struct rk *x, int rc, uint64_t t0, uint64_t t1)
{
	uint32_t g = __atomic_load_n(&sh->kill_gen, __ATOMIC_ACQUIRE), u = g;
	struct kill_rec *kr;

	if (__atomic_load_n(&sh->no_record, __ATOMIC_ACQUIRE))
		return;
	if (rc == KV_ERR_PEER)
		__atomic_add_fetch(&sh->peer_returns, 1, __ATOMIC_RELAXED);
	/* the latest kill that this rank survived (early kills only follow one) */
	while (u > x->last_gen && kills[u].early)
		u--;
	if (u > x->last_gen && kills[u].slot != x->slot && t1 >= kills[u].t_ns) {
		kr = &kills[u];
		if (rc == KV_ERR_PEER) {
			kr->wait_ns[x->slot] = t1 - kr->t_ns + 1;
		} else if (rc == KV_OK && t0 < kr->t_ns) {
			__atomic_add_fetch(&sh->ok_after_kill, 1, __ATOMIC_RELAXED);
			atomic_max_u64(&sh->ok_after_kill_max_ns, t1 - kr->t_ns);
		}
	}
	if (rc == KV_ERR_PEER)
		x->last_gen = g;
}

/* Check a returned sum of round j; on a wrong element say which and fail. */
static int check_round(struct rk *x, int k, int64_t j, const void *got, const char *what)
{
	for (size_t e = 0; e < keys[k].count; e++) {
		int64_t v = elem_get(k, got, e), want = sum_want(k, x->n, j, e);
		if (v != want) {
			__atomic_add_fetch(&sh->wrong, 1, __ATOMIC_RELAXED);
			fprintf(stderr,
				"rank %d (process %d): WRONG VALUE: %s of key '%s' round %lld, "
				"element %zu: got %lld, want %lld\n",
				x->slot, x->inc, what, keys[k].name, (long long)j, e, (long long)v,
				(long long)want);
			return 1;
		}
	}
	return 0;
}

/* Decode a pulled value: the rounds its elements hold (*lo, *hi), every element checked. */
static int decode(struct rk *x, int k, const void *v, int64_t *lo, int64_t *hi)
{
	*lo = INT64_MAX;
	*hi = -1;
	for (size_t e = 0; e < keys[k].count; e++) {
		int64_t a = elem_get(k, v, e), j = a >= 0 ? a / keys[k].w : -1;
		if (j < 0 || j >= SOAK_MAXROUNDS || a != sum_want(k, x->n, j, e)) {
			__atomic_add_fetch(&sh->wrong, 1, __ATOMIC_RELAXED);
			fprintf(stderr,
				"rank %d (process %d): WRONG VALUE: pulled key '%s' element %zu is "
				"%lld, which is no round's sum\n",
				x->slot, x->inc, keys[k].name, e, (long long)a);
			return 1;
		}
		*lo = j < *lo ? j : *lo;
		*hi = j > *hi ? j : *hi;
	}
	if (*hi - *lo > 1) {
		__atomic_add_fetch(&sh->wrong, 1, __ATOMIC_RELAXED);
		fprintf(stderr,
			"rank %d: WRONG VALUE: key '%s' holds rounds %lld to %lld at once\n",
			x->slot, keys[k].name, (long long)*lo, (long long)*hi);
		return 1;
	}
	if (*hi != *lo) {
		__atomic_add_fetch(&sh->torn, 1, __ATOMIC_RELAXED);
		trace("key '%s' is torn: it holds rounds %lld and %lld", keys[k].name,
		      (long long)*lo, (long long)*hi);
	}
	return 0;
}

/* Pull key k (retrying KV_ERR_PEER for a while) and decode the rounds it completed. */
static int pull_rounds(struct rk *x, int k, int64_t *c)
{
	uint64_t t_end = now_ns() + SOAK_PEER_LIMIT_NS, t0, t1;
	int64_t lo, hi;
	int rc;

	for (;;) {
		t0 = now_ns();
		rc = kv_pull(x->kv, keys[k].name, x->out[k], keys[k].count, keys[k].t, 0);
		t1 = now_ns();
		note_op(x, rc, t0, t1);
		if (rc == KV_ERR_TIMEOUT) {
			fprintf(stderr, "rank %d (process %d): HANG: kv_pull('%s') timed out: %s\n",
				x->slot, x->inc, keys[k].name, kv_last_error(x->kv));
			return SOAK_EXIT_HANG + k;
		}
		if (rc != KV_ERR_PEER)
			break;
		__atomic_add_fetch(&sh->peer_pulls, 1, __ATOMIC_RELAXED);
		CHECK(t1 < t_end, "kv_pull of '%s' still KV_ERR_PEER after %llu s", keys[k].name,
		      SOAK_PEER_LIMIT_NS / 1000000000ull);
		sleep_us(1000 + rnd(&x->rng) % 2000);
	}
	CHECK(rc == KV_OK, "kv_pull('%s'): %d (%s): %s", keys[k].name, rc, kv_strerror(rc),
	      kv_last_error(x->kv));
	if (decode(x, k, x->out[k], &lo, &hi))
		return 1;
	*c = lo;
	return 0;
}

/* This rank saw round j of key k complete, with out[k] its result. */
static void ledger(struct rk *x, int k, int64_t j)
{
	const void *b = x->out[k];
	const struct ledger_ent *cur = led_of(x->rec, k);
	uint64_t t = 0, v = x->rec->ver[k] + 1;
	struct ledger_ent *next = &x->rec->led[k][v & 1];

	for (size_t e = 0; e < keys[k].count; e++)
		t += (uint64_t)elem_get(k, b, e);
	next->total = cur->total + t;
	next->first = cur->first ? cur->first : j;
	next->last = j;
	__atomic_store_n(&x->rec->ver[k], v, __ATOMIC_RELEASE);
	__atomic_or_fetch(&sh->seen[k][j], (uint8_t)(1u << x->slot), __ATOMIC_RELAXED);
}

/* An op that timed out: say when it began, against the last kill. */
static int report_hang(struct rk *x, int k, int64_t j, uint64_t t0, uint64_t t1)
{
	uint32_t g = __atomic_load_n(&sh->kill_gen, __ATOMIC_ACQUIRE);
	uint64_t kt = kills[g].t_ns;

	fprintf(stderr,
		"rank %d (process %d): HANG: pushpull('%s') round %lld timed out after %.3f s "
		"(began %.1f ms %s the last kill, of rank %d): %s\n",
		x->slot, x->inc, keys[k].name, (long long)j, (double)(t1 - t0) / 1e9,
		(double)(t0 > kt ? t0 - kt : kt - t0) / 1e6, t0 > kt ? "after" : "before",
		g ? kills[g].slot : -1, kv_last_error(x->kv));
	return SOAK_EXIT_HANG + k;
}

/* Round j of key k: contribute until it completes; a KV_ERR_PEER is retried. */
static int do_round(struct rk *x, int k, int64_t j)
{
	uint64_t t_first_peer = 0, t0, t1;
	int64_t c;
	int rc, prc;

	CHECK(j > 0 && j < SOAK_MAXROUNDS, "round %lld out of range", (long long)j);
	CHECK(!led_of(x->rec, k)->last || led_of(x->rec, k)->last == j - 1,
	      "key '%s': round %lld after round %lld", keys[k].name, (long long)j,
	      (long long)led_of(x->rec, k)->last);
	fill_contrib(k, x->slot, j, x->in[k]);
	for (;;) {
		t0 = now_ns();
		rc = kv_pushpull(x->kv, keys[k].name, x->in[k], x->out[k], keys[k].count,
				 keys[k].t, 0);
		t1 = now_ns();
		note_op(x, rc, t0, t1);
		if (rc == KV_OK) {
			if (check_round(x, k, j, x->out[k], "pushpull result"))
				return 1;
			ledger(x, k, j);
			return 0;
		}
		trace("pushpull('%s') round %lld: %s after %.3f ms", keys[k].name, (long long)j,
		      kv_strerror(rc), (double)(t1 - t0) / 1e6);
		if (rc == KV_ERR_TIMEOUT)
			return report_hang(x, k, j, t0, t1);
		CHECK(rc == KV_ERR_PEER, "pushpull('%s') round %lld: %d (%s): %s (op took %.3f s)",
		      keys[k].name, (long long)j, rc, kv_strerror(rc), kv_last_error(x->kv),
		      (double)(t1 - t0) / 1e9);
		if (!t_first_peer)
			t_first_peer = t1;
		CHECK(t1 - t_first_peer < SOAK_PEER_LIMIT_NS,
		      "round %lld of '%s' still failing with KV_ERR_PEER after %llu s: no "
		      "replacement joined",
		      (long long)j, keys[k].name, SOAK_PEER_LIMIT_NS / 1000000000ull);
		sleep_us(1000 + rnd(&x->rng) % 2000);
		/* resync: the stored value says whether round j completed */
		if ((prc = pull_rounds(x, k, &c)))
			return prc;
		trace("resync: '%s' holds round %lld", keys[k].name, (long long)c);
		if (c == j) {
			/* told KV_ERR_PEER, yet the round completed: the contract says the
			 * op fails only when its round does not complete */
			__atomic_add_fetch(&sh->peer_completed, 1, __ATOMIC_RELAXED);
			fprintf(stderr,
				"rank %d (process %d): key '%s' round %lld: pushpull returned "
				"KV_ERR_PEER but the round completed (the key holds round %lld)\n",
				x->slot, x->inc, keys[k].name, (long long)j, (long long)c);
			if (check_round(x, k, j, x->out[k], "stored value"))
				return 1;
			ledger(x, k, j);
			return 0;
		}
		CHECK(c == j - 1, "key '%s': after a failed round %lld the key holds round %lld",
		      keys[k].name, (long long)j, (long long)c);
	}
}

static int open_retry(struct rk *x, uint32_t gen)
{
	struct kv_options o;
	uint64_t t_end = now_ns() + 3000000000ull;
	int rc, tries = 0;

	kv_options_default(&o);
	o.timeout_ms = SOAK_OP_TIMEOUT_MS;
	for (;;) {
		tries++;
		rc = kv_create("local", &o, &x->kv);
		if (rc != KV_ERR_EXISTS || now_ns() > t_end)
			break;
		__atomic_add_fetch(&sh->create_exists, 1, __ATOMIC_RELAXED);
		sleep_us(1000);
	}
	if (rc != KV_OK) {
		fprintf(stderr,
			"rank %d (process %d): REJOIN: kv_create (after %d tries): %d (%s): %s\n",
			x->slot, x->inc, tries, rc, kv_strerror(rc), kv_last_error(NULL));
		return SOAK_EXIT_REJOIN;
	}
	if (gen) {
		kills[gen].rejoin_ns = now_ns() - kills[gen].t_ns + 1;
		kills[gen].create_tries = tries;
	}
	return 0;
}

static int rank_main(int slot, int n, int inc, uint32_t gen, uint64_t seed)
{
	struct rk x = { .slot = slot, .n = n, .inc = inc, .last_gen = gen, .rng = seed };
	int64_t c[SOAK_NKEYS], s, floor_step = INT64_MAX;
	int i, rc;

	x.rec = &incs[inc];
	x.rec->slot = slot;
	x.rec->used = 1;
	for (int k = 0; k < SOAK_NKEYS; k++) {
		size_t bytes = keys[k].count * kv_dtype_size(keys[k].t);
		x.in[k] = malloc(bytes);
		x.out[k] = malloc(bytes);
		CHECK(x.in[k] && x.out[k], "out of memory");
	}
	/* the others completed at least these steps: no key may hold fewer rounds */
	for (int r = 0; r < n; r++)
		if (r != slot) {
			int64_t d = __atomic_load_n(&sh->step_done[r], __ATOMIC_ACQUIRE);
			floor_step = d < floor_step ? d : floor_step;
		}
	if ((rc = open_retry(&x, gen)))
		return rc;
	for (int k = 0; k < SOAK_NKEYS; k++) {
		fill_sum(k, n, 0, x.in[k]);
		rc = kv_init(x.kv, keys[k].name, x.in[k], keys[k].count, keys[k].t);
		if (rc != KV_OK) {
			fprintf(stderr,
				"rank %d (process %d): REJOIN: kv_init('%s') by a fresh "
				"process: %d (%s): %s\n",
				slot, inc, keys[k].name, rc, kv_strerror(rc), kv_last_error(x.kv));
			return SOAK_EXIT_REJOIN;
		}
	}
	for (int k = 0; k < SOAK_NKEYS; k++) {
		if ((rc = pull_rounds(&x, k, &c[k])))
			return rc;
		CHECK(c[k] >= floor_step,
		      "key '%s' holds round %lld after kv_init, but the job completed step %lld "
		      "(did kv_init overwrite it?)",
		      keys[k].name, (long long)c[k], (long long)floor_step);
	}
	/* where the job stands: c reads s..s, s-1..s-1 along the key order */
	s = c[0];
	for (i = 1; i < SOAK_NKEYS && c[i] == s; i++)
		;
	for (int k = i; k < SOAK_NKEYS; k++)
		CHECK(c[k] == s - 1, "keys out of step: '%s' at %lld, '%s' at %lld", keys[0].name,
		      (long long)s, keys[k].name, (long long)c[k]);
	if (i == SOAK_NKEYS) {
		s++;
		i = 0;
	}
	trace("process %d (kill %u) starts at step %lld key '%s' (keys hold %lld %lld %lld)", inc,
	      gen, (long long)s, keys[i].name, (long long)c[0], (long long)c[1], (long long)c[2]);
	__atomic_store_n(&sh->synced_inc[slot], inc + 1, __ATOMIC_RELEASE);
	for (;; s++, i = 0) {
		int64_t stop = __atomic_load_n(&sh->stop_step, __ATOMIC_ACQUIRE);
		if (i == 0 && stop && s > stop)
			break;
		for (; i < SOAK_NKEYS; i++)
			if ((rc = do_round(&x, i, s)))
				return rc;
		__atomic_store_n(&sh->step_done[slot], s, __ATOMIC_RELEASE);
	}
	/* the end: every key holds the last step's sum */
	s--;
	for (int k = 0; k < SOAK_NKEYS; k++) {
		CHECK_RC(kv_pull(x.kv, keys[k].name, x.out[k], keys[k].count, keys[k].t, 0),
			 KV_OK);
		if (check_round(&x, k, s, x.out[k], "final pull"))
			return 1;
	}
	__atomic_add_fetch(&sh->final_ok, 1, __ATOMIC_RELEASE);
	/* leave together, so that no rank's final pull meets a job that lost a rank */
	__atomic_add_fetch(&sh->finished, 1, __ATOMIC_RELEASE);
	for (uint64_t t_end = now_ns() + 20000000000ull;
	     __atomic_load_n(&sh->finished, __ATOMIC_ACQUIRE) < n; sleep_us(500))
		CHECK(now_ns() < t_end, "the other ranks did not finish");
	CHECK_RC(kv_close(x.kv), KV_OK);
	return 0;
}

/* ---------------------------------------------------------------- the driver */

struct soak_stats {
	int kills, early, restarts, jobs;
	uint64_t rounds, steps, wrong, peer_completed, torn, exists_retries;
	uint64_t ok_after_kill, ok_after_kill_max_ns;
	uint64_t *waits; /* ns */
	int nwaits, missing;
	uint64_t max_rejoin_ns;
	int max_create_tries;
	int failures, hangs[SOAK_NKEYS], rejoin_failures, other_failures;
};

struct phase {
	const struct kvd_proc *k;
	char job[64];
	int n;
	pid_t pid[SOAK_MAXR];
	int inc_of[SOAK_MAXR];
	int ninc;
	int fail_code; /* exit status of the rank that failed, or -1 */
	uint64_t rng, seed;
};

static pid_t spawn(struct phase *p, int slot, uint32_t gen)
{
	int inc = p->ninc++;
	uint64_t seed = p->seed ^ ((uint64_t)(inc + 1) * 0x9e3779b97f4a7c15ull);
	pid_t pid;

	if (inc >= max_inc)
		return -1;
	fflush(NULL);
	pid = fork();
	if (pid == 0) {
		char buf[16];
		int rc;

		prctl(PR_SET_PDEATHSIG, SIGKILL); /* no stray rank when the test dies */
		setenv("KVD_SOCKET", p->k->sock, 1);
		setenv("KVD_JOB", p->job, 1);
		snprintf(buf, sizeof(buf), "%d", slot);
		setenv("KVD_RANK", buf, 1);
		snprintf(buf, sizeof(buf), "%d", p->n);
		setenv("KVD_NUM_WORKERS", buf, 1);
		rc = rank_main(slot, p->n, inc, gen, seed);
		if (rc) /* the others' KV_ERR_PEER from now on is this exit, not a kill */
			__atomic_store_n(&sh->no_record, 1, __ATOMIC_RELEASE);
		if (rc && sh->verbose) {
			fprintf(stderr, "rank %d (process %d) failed; its last steps:\n", slot,
				inc);
			trace_dump();
		}
		_exit(rc);
	}
	if (pid > 0) {
		p->pid[slot] = pid;
		p->inc_of[slot] = inc;
	}
	return pid;
}

static void describe_exit(struct phase *p, int r, int st, const char *when, char *why,
			  size_t whylen)
{
	if (WIFEXITED(st) && WEXITSTATUS(st) >= SOAK_EXIT_HANG &&
	    WEXITSTATUS(st) < SOAK_EXIT_HANG + SOAK_NKEYS)
		snprintf(why, whylen, "rank %d (process %d) hung%s: an op on key '%s' timed out", r,
			 p->inc_of[r], when, keys[WEXITSTATUS(st) - SOAK_EXIT_HANG].name);
	else if (WIFEXITED(st) && WEXITSTATUS(st) == SOAK_EXIT_REJOIN)
		snprintf(why, whylen, "rank %d (process %d) could not take its rank back%s", r,
			 p->inc_of[r], when);
	else if (WIFEXITED(st))
		snprintf(why, whylen, "rank %d (process %d) failed%s (exit %d)", r, p->inc_of[r],
			 when, WEXITSTATUS(st));
	else
		snprintf(why, whylen, "rank %d (process %d) died of signal %d%s", r, p->inc_of[r],
			 WTERMSIG(st), when);
	p->fail_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* Has a rank that nobody killed exited?  Describes it in why. */
static int rank_died(struct phase *p, char *why, size_t whylen)
{
	for (int r = 0; r < p->n; r++) {
		int st;
		if (p->pid[r] > 0 && waitpid(p->pid[r], &st, WNOHANG) == p->pid[r]) {
			p->pid[r] = 0;
			describe_exit(p, r, st, "", why, whylen);
			return 1;
		}
	}
	return 0;
}

static int64_t min_step(struct phase *p)
{
	int64_t m = INT64_MAX;

	for (int r = 0; r < p->n; r++) {
		int64_t d = __atomic_load_n(&sh->step_done[r], __ATOMIC_ACQUIRE);
		m = d < m ? d : m;
	}
	return m;
}

static int64_t max_step(struct phase *p)
{
	int64_t m = 0;

	for (int r = 0; r < p->n; r++) {
		int64_t d = __atomic_load_n(&sh->step_done[r], __ATOMIC_ACQUIRE);
		m = d > m ? d : m;
	}
	return m;
}

static int synced(struct phase *p, int r)
{
	return __atomic_load_n(&sh->synced_inc[r], __ATOMIC_ACQUIRE) == p->inc_of[r] + 1;
}

/* Wait until every rank's current process has synced and every rank completed step target. */
static int wait_steady(struct phase *p, int64_t target, char *why, size_t whylen)
{
	uint64_t t_end = now_ns() + 20000000000ull;

	for (;;) {
		int all = 1;
		for (int r = 0; r < p->n; r++)
			all &= synced(p, r);
		if (all && min_step(p) >= target)
			return 0;
		if (rank_died(p, why, whylen))
			return -1;
		if (now_ns() > t_end) {
			int o = snprintf(why, whylen, "no progress for 20 s (want step %lld):",
					 (long long)target);
			for (int r = 0; r < p->n && o > 0 && (size_t)o < whylen; r++)
				o += snprintf(why + o, whylen - (size_t)o,
					      " rank %d process %d synced %d step %lld;", r,
					      p->inc_of[r], synced(p, r),
					      (long long)sh->step_done[r]);
			return -1;
		}
		sleep_us(200);
	}
}

static int kill_rank(struct phase *p, int slot, int early, char *why, size_t whylen)
{
	uint32_t g = sh->kill_gen + 1;
	int st;

	if (g > max_gen) {
		snprintf(why, whylen, "too many kills for the shared page");
		return -1;
	}
	kills[g].slot = slot;
	kills[g].early = early;
	kills[g].t_ns = now_ns();
	__atomic_store_n(&sh->kill_gen, g, __ATOMIC_RELEASE);
	if (trace_live)
		fprintf(stderr, "  trace %ld.%06ld driver: kill %u: rank %d (process %d)%s\n",
			(long)(kills[g].t_ns / 1000000000ull % 1000),
			(long)(kills[g].t_ns % 1000000000ull / 1000), g, slot, p->inc_of[slot],
			early ? " early" : "");
	kill(p->pid[slot], SIGKILL);
	if (waitpid(p->pid[slot], &st, 0) != p->pid[slot]) {
		snprintf(why, whylen, "waitpid rank %d: %s", slot, strerror(errno));
		return -1;
	}
	p->pid[slot] = 0;
	if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL) {
		describe_exit(p, slot, st, " before its kill", why, whylen);
		return -1;
	}
	return 0;
}

static void kill_all(struct phase *p)
{
	__atomic_store_n(&sh->no_record, 1, __ATOMIC_RELEASE);
	for (int r = 0; r < p->n; r++)
		if (p->pid[r] > 0) {
			kill(p->pid[r], SIGKILL);
			waitpid(p->pid[r], NULL, 0);
			p->pid[r] = 0;
		}
}

/* The survivors' waits of one job's kills, and its counters. */
static int collect(struct phase *p, struct soak_stats *st, char *why, size_t whylen)
{
	int rc = 0;

	st->wrong += sh->wrong;
	st->peer_completed += sh->peer_completed;
	st->torn += sh->torn;
	st->exists_retries += sh->create_exists;
	st->ok_after_kill += sh->ok_after_kill;
	if (sh->ok_after_kill_max_ns > st->ok_after_kill_max_ns)
		st->ok_after_kill_max_ns = sh->ok_after_kill_max_ns;
	for (uint32_t g = 1; g <= sh->kill_gen; g++) {
		struct kill_rec *kr = &kills[g];
		if (kr->rejoin_ns && kr->rejoin_ns - 1 > st->max_rejoin_ns)
			st->max_rejoin_ns = kr->rejoin_ns - 1;
		if (kr->create_tries > st->max_create_tries)
			st->max_create_tries = kr->create_tries;
		if (kr->early)
			continue;
		for (int r = 0; r < p->n; r++) {
			uint64_t w = kr->wait_ns[r];
			if (r == kr->slot)
				continue;
			if (!w) {
				st->missing++;
				continue;
			}
			st->waits[st->nwaits++] = w - 1;
			if (w - 1 > SOAK_WAIT_LIMIT_NS && !rc) {
				snprintf(why, whylen,
					 "kill %u of rank %d: survivor rank %d waited %.1f ms for "
					 "KV_ERR_PEER (limit 1000 ms)",
					 g, kr->slot, r, (double)(w - 1) / 1e6);
				rc = -1;
			}
		}
	}
	return rc;
}

/* The whole ledger after a job that ran to its end: rounds, totals, final values. */
static int verify_job(struct phase *p, int64_t T, struct soak_stats *st, char *why,
		      size_t whylen)
{
	int n = p->n;

	if (sh->final_ok != n) {
		snprintf(why, whylen, "%d of %d ranks checked the final values", sh->final_ok, n);
		return -1;
	}
	for (int k = 0; k < SOAK_NKEYS; k++) {
		for (int64_t j = 1; j <= T + 2 && j < SOAK_MAXROUNDS; j++) {
			int bits = __builtin_popcount(sh->seen[k][j]);
			if (j <= T && bits < n - 1) {
				snprintf(why, whylen,
					 "key '%s' round %lld: only %d of %d ranks saw it complete "
					 "(mask %#x)",
					 keys[k].name, (long long)j, bits, n, sh->seen[k][j]);
				return -1;
			}
			if (j > T && bits) {
				snprintf(why, whylen,
					 "key '%s' round %lld seen beyond the last step %lld",
					 keys[k].name, (long long)j, (long long)T);
				return -1;
			}
		}
		st->rounds += (uint64_t)T;
	}
	st->steps += (uint64_t)T;
	/* each process's running total is the sum of the rounds it saw, by the formula:
	 * sum over e of S(j)[e] = count * j * W + sum over e of G(j, e), and G depends
	 * on j modulo 128 only */
	for (int k = 0; k < SOAK_NKEYS; k++) {
		uint64_t gsum[128];
		for (int jm = 0; jm < 128; jm++) {
			gsum[jm] = 0;
			for (size_t e = 0; e < keys[k].count; e++)
				gsum[jm] += (uint64_t)(sum_want(k, n, jm, e) - jm * keys[k].w);
		}
		for (int i = 0; i < p->ninc; i++) {
			const struct ledger_ent *r = led_of(&incs[i], k);
			uint64_t want = 0;
			if (!incs[i].used || !r->first)
				continue;
			for (int64_t j = r->first; j <= r->last; j++)
				want += (uint64_t)keys[k].count * (uint64_t)j *
						(uint64_t)keys[k].w +
					gsum[j % 128];
			if (want != r->total) {
				snprintf(why, whylen,
					 "process %d (rank %d): running total of '%s' over rounds "
					 "%lld-%lld is %llu, want %llu",
					 i, incs[i].slot, keys[k].name, (long long)r->first,
					 (long long)r->last, (unsigned long long)r->total,
					 (unsigned long long)want);
				return -1;
			}
		}
	}
	/* the processes that lived to the end saw the same last round */
	for (int k = 0; k < SOAK_NKEYS; k++)
		for (int r = 0; r < n; r++)
			if (led_of(&incs[p->inc_of[r]], k)->last != T) {
				snprintf(why, whylen,
					 "rank %d ended at round %lld of '%s', want %lld", r,
					 (long long)led_of(&incs[p->inc_of[r]], k)->last, keys[k].name,
					 (long long)T);
				return -1;
			}
	return 0;
}

/*
 * One job of n ranks: *left kills (counted down as they happen), then a clean
 * stop and the ledger.  -1 with why when a rank failed or the ledger is wrong.
 */
static int run_job(const struct kvd_proc *k, const char *job, int n, int *left, uint64_t seed,
		   int verbose, struct soak_stats *st, char *why, size_t whylen)
{
	struct phase p = { .k = k, .n = n, .rng = seed, .seed = seed, .fail_code = -1 };
	int64_t T;

	memset(sh, 0, shm_bytes);
	sh->verbose = verbose;
	snprintf(p.job, sizeof(p.job), "%s", job);
	for (int r = 0; r < n; r++)
		if (spawn(&p, r, 0) <= 0)
			goto fork_fail;
	while (*left > 0) {
		int victim;

		if (wait_steady(&p, max_step(&p) + 1 + (int64_t)(rnd(&p.rng) % 3), why, whylen))
			goto fail;
		sleep_us(rnd(&p.rng) % 20000); /* a random moment */
		victim = (int)(rnd(&p.rng) % (uint64_t)n);
		if (kill_rank(&p, victim, 0, why, whylen))
			goto fail;
		(*left)--;
		st->kills++;
		if (rnd(&p.rng) % 2)
			sleep_us(rnd(&p.rng) % 5000);
		if (spawn(&p, victim, sh->kill_gen) <= 0)
			goto fork_fail;
		st->restarts++;
		if (*left > 0 && rnd(&p.rng) % 10 == 0) {
			/* kill the replacement while it joins and resyncs */
			sleep_us(rnd(&p.rng) % 15000);
			if (rank_died(&p, why, whylen) || kill_rank(&p, victim, 1, why, whylen))
				goto fail;
			(*left)--;
			st->kills++;
			st->early++;
			if (spawn(&p, victim, sh->kill_gen) <= 0)
				goto fork_fail;
			st->restarts++;
		}
	}
	if (wait_steady(&p, max_step(&p) + 1, why, whylen))
		goto fail;
	T = max_step(&p) + 3;
	__atomic_store_n(&sh->stop_step, T, __ATOMIC_RELEASE);
	for (uint64_t t_end = now_ns() + 30000000000ull;;) {
		int running = 0;
		for (int r = 0; r < n; r++) {
			int s;
			if (p.pid[r] <= 0 || waitpid(p.pid[r], &s, WNOHANG) != p.pid[r]) {
				running += p.pid[r] > 0;
				continue;
			}
			p.pid[r] = 0;
			if (!WIFEXITED(s) || WEXITSTATUS(s)) {
				describe_exit(&p, r, s, " at the end", why, whylen);
				goto fail;
			}
		}
		if (!running)
			break;
		if (now_ns() > t_end) {
			snprintf(why, whylen, "ranks still running 30 s after the stop");
			goto fail;
		}
		sleep_us(1000);
	}
	if (collect(&p, st, why, whylen))
		return -1;
	return verify_job(&p, T, st, why, whylen);
fork_fail:
	snprintf(why, whylen, "fork: %s", strerror(errno));
fail:
	kill_all(&p);
	{
		char ignore[256];
		collect(&p, st, ignore, sizeof(ignore));
	}
	/* the steps every rank completed count, though the job did not end cleanly */
	st->steps += (uint64_t)min_step(&p);
	st->rounds += (uint64_t)min_step(&p) * SOAK_NKEYS;
	if (p.fail_code >= SOAK_EXIT_HANG && p.fail_code < SOAK_EXIT_HANG + SOAK_NKEYS)
		st->hangs[p.fail_code - SOAK_EXIT_HANG]++;
	else if (p.fail_code == SOAK_EXIT_REJOIN)
		st->rejoin_failures++;
	else
		st->other_failures++;
	return -1;
}

/* The last lines of kvd's log, to stderr. */
static void print_log_tail(const struct kvd_proc *k, int lines)
{
	FILE *f = fopen(k->log, "r");
	char *buf = NULL, *p;
	size_t cap = 0, len = 0, got;

	if (!f) {
		fprintf(stderr, "(no kvd log at %s)\n", k->log);
		return;
	}
	do {
		if (len + 65536 > cap) {
			char *nb = realloc(buf, cap = len + 65536 + cap);
			if (!nb)
				break;
			buf = nb;
		}
		got = fread(buf + len, 1, cap - len, f);
		len += got;
	} while (got > 0);
	fclose(f);
	if (!buf)
		return;
	p = buf + len;
	for (int seen = 0; p > buf; p--)
		if (p[-1] == '\n' && p != buf + len && ++seen > lines)
			break;
	fprintf(stderr, "---- kvd log (%s), last %d lines ----\n", k->log, lines);
	fwrite(p, 1, (size_t)(buf + len - p), stderr);
	fprintf(stderr, "---- end of kvd log ----\n");
	free(buf);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static double pct(const struct soak_stats *st, double q)
{
	return st->nwaits ? (double)st->waits[(size_t)((st->nwaits - 1) * q + 0.5)] / 1e6 : 0.0;
}

/*
 * The kills are shared among jobs of 2, 3 and 4 ranks.  A job in which a rank
 * fails (a hang, a CHECK) is recorded and ended, and a new job takes over the
 * kills left, so that one failure does not hide the others and the figures
 * cover every kill; any failure fails the test at the end.  A wrong value
 * stops the run at once.
 */
Test(soak, client_crash)
{
	const char *env = getenv("KVTEST_SOAK_KILLS"), *senv = getenv("KVTEST_SOAK_SEED");
	int nkills = env && *env ? atoi(env) : 50;
	uint64_t seed = senv && *senv ? strtoull(senv, NULL, 0) : now_ns() ^ (uint64_t)getpid();
	struct soak_stats st = { 0 };
	struct kvd_proc k;
	char why[512] = "", first_why[512] = "";
	uint64_t t0 = now_ns();
	int max_failures = nkills / 10 + 3, kvd_died = 0, kvd_status = 0;

	trace_live = getenv("KVTEST_SOAK_TRACE") && *getenv("KVTEST_SOAK_TRACE") == '1';
	cr_assert(nkills >= 3 && nkills <= 20000, "KVTEST_SOAK_KILLS=%d: want 3..20000", nkills);
	/* a backstop for the driver itself; every wait below has its own bound */
	alarm((unsigned)(300 + nkills * 2));
	max_gen = (uint32_t)nkills + 1;
	max_inc = 3 * SOAK_MAXR + nkills + 8;
	shm_bytes = sizeof(*sh) + (max_gen + 1) * sizeof(*kills) + (size_t)max_inc * sizeof(*incs);
	sh = mmap(NULL, shm_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	cr_assert(sh != MAP_FAILED, "mmap: %s", strerror(errno));
	kills = (struct kill_rec *)(sh + 1);
	incs = (struct inc_rec *)(kills + max_gen + 1);
	st.waits = calloc((size_t)nkills * SOAK_MAXR, sizeof(*st.waits));
	cr_assert(st.waits);

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	fprintf(stderr, "soak: %d kills, seed %#llx (KVTEST_SOAK_SEED replays the choices)\n",
		nkills, (unsigned long long)seed);
	for (int ph = 0; ph < 3 && !st.wrong && !kvd_died && st.failures < max_failures; ph++) {
		int n = 2 + ph, left = nkills / 3 + (ph < nkills % 3);

		while (left > 0 && !st.wrong && st.failures < max_failures) {
			char job[64];
			int rc;

			snprintf(job, sizeof(job), "soak-%d-%d", n, st.jobs++);
			rc = run_job(&k, job, n, &left, seed + (uint64_t)st.jobs * 7919,
				     st.failures < 3, &st, why, sizeof(why));
			if (!rc)
				continue;
			st.failures++;
			fprintf(stderr, "soak: FAILURE %d (job %s, %d kills so far): %s\n",
				st.failures, job, st.kills, why);
			if (st.failures == 1)
				snprintf(first_why, sizeof(first_why), "%s", why);
			if (waitpid(k.pid, &kvd_status, WNOHANG) == k.pid) {
				k.pid = 0;
				kvd_died = 1;
				fprintf(stderr, "soak: KVD DIED (%s %d) during job %s\n",
					WIFSIGNALED(kvd_status) ? "signal" : "exit status",
					WIFSIGNALED(kvd_status) ? WTERMSIG(kvd_status)
								: WEXITSTATUS(kvd_status),
					job);
				print_log_tail(&k, 150);
				break;
			}
			if (st.failures == 1)
				print_log_tail(&k, 60);
		}
	}
	if (st.nwaits)
		qsort(st.waits, (size_t)st.nwaits, sizeof(*st.waits), cmp_u64);
	fprintf(stderr,
		"soak: kills %d (%d of them early, of a replacement still joining), restarts %d, "
		"jobs %d, steps %llu, rounds completed %llu\n"
		"soak: survivor waits for KV_ERR_PEER: %d samples (%d survivors saw none), longest "
		"%.2f ms, p50 %.2f ms, p99 %.2f ms; ops pending at a kill that still succeeded "
		"%llu (latest %.1f ms after the kill)\n"
		"soak: rejoin: longest %.1f ms from kill to kv_create, kv_create KV_ERR_EXISTS "
		"retries %llu (most tries %d); torn multi-part keys seen %llu\n"
		"soak: wrong values %llu, PEER-but-completed %llu, hangs %d ('%s' %d, '%s' %d, "
		"'%s' %d), rejoin failures %d, other failures %d; %.1f s\n",
		st.kills, st.early, st.restarts, st.jobs, (unsigned long long)st.steps,
		(unsigned long long)st.rounds, st.nwaits, st.missing,
		st.nwaits ? (double)st.waits[st.nwaits - 1] / 1e6 : 0.0, pct(&st, 0.5),
		pct(&st, 0.99), (unsigned long long)st.ok_after_kill,
		(double)st.ok_after_kill_max_ns / 1e6, (double)st.max_rejoin_ns / 1e6,
		(unsigned long long)st.exists_retries, st.max_create_tries,
		(unsigned long long)st.torn, (unsigned long long)st.wrong,
		(unsigned long long)st.peer_completed,
		st.hangs[0] + st.hangs[1] + st.hangs[2], keys[0].name, st.hangs[0], keys[1].name,
		st.hangs[1], keys[2].name, st.hangs[2], st.rejoin_failures, st.other_failures,
		(double)(now_ns() - t0) / 1e9);
	kvd_stop(&k);
	alarm(0);
	free(st.waits);
	munmap(sh, shm_bytes);
	cr_expect(!kvd_died, "soak: kvd died (%s %d)",
		  WIFSIGNALED(kvd_status) ? "signal" : "exit status",
		  WIFSIGNALED(kvd_status) ? WTERMSIG(kvd_status) : WEXITSTATUS(kvd_status));
	cr_expect_eq(st.wrong, 0, "soak: %llu wrong values", (unsigned long long)st.wrong);
	cr_expect_eq(st.peer_completed, 0,
		     "soak: %llu time(s) a pushpull returned KV_ERR_PEER although its round "
		     "completed",
		     (unsigned long long)st.peer_completed);
	cr_expect(st.ok_after_kill_max_ns <= SOAK_WAIT_LIMIT_NS,
		  "soak: an op pending at a kill returned KV_OK %.1f ms after it (limit 1000 ms)",
		  (double)st.ok_after_kill_max_ns / 1e6);
	cr_assert_eq(st.failures, 0, "soak: %d of %d jobs failed; the first: %s", st.failures,
		     st.jobs, first_why);
}

/* ---------------------------------------------------------------- one replacement, slowly */

/*
 * The soak's rarest schedule, made certain: a survivor waits in a round; it is
 * descheduled (SIGSTOP, as a loaded machine may do) while its peer is killed
 * and a replacement joins and enters the same round; then it runs again
 * (SIGCONT).  The contract allows two endings, and no third: its op fails
 * with KV_ERR_PEER (then its retry completes the round with the
 * replacement), or it completes with the replacement's contribution; either
 * way within 1 s of running again.  Run for a direct key and for an engine key.
 */
struct stop_shm {
	int in_op[2];         /* a process is about to enter its pushpull */
	uint64_t t_cont;      /* CLOCK_MONOTONIC of the SIGCONT */
	int rc_first, rc_retry; /* the survivor's results */
	uint64_t t_first;     /* when the survivor's first op returned */
};

static int stop_rank(struct stop_shm *m, int rank, int replacement)
{
	struct kv_options o;
	kv_store *kv = NULL;
	float v[100], out[100];
	int rc;

	kv_options_default(&o);
	o.timeout_ms = 3000;
	for (int tries = 0; (rc = kv_create("local", &o, &kv)) == KV_ERR_EXISTS && tries < 300;
	     tries++)
		sleep_us(10000);
	CHECK(rc == KV_OK, "kv_create: %d (%s): %s", rc, kv_strerror(rc), kv_last_error(NULL));
	for (int i = 0; i < 100; i++)
		v[i] = 0;
	rc = kv_init(kv, "w", v, 100, KV_FLOAT32);
	CHECK(rc == KV_OK, "kv_init: %d (%s): %s", rc, kv_strerror(rc), kv_last_error(kv));
	for (int i = 0; i < 100; i++)
		v[i] = (float)((rank + 1) * 1000 + i);
	__atomic_store_n(&m->in_op[replacement ? 0 : rank], 1, __ATOMIC_RELEASE);
	if (rank == 0 && !replacement) {
		for (;;) /* the victim never contributes: it is killed */
			pause();
	}
	rc = kv_pushpull(kv, "w", v, out, 100, KV_FLOAT32, 0);
	if (rank == 1) {
		m->t_first = now_ns();
		m->rc_first = rc;
		if (rc == KV_ERR_PEER) {
			rc = kv_pushpull(kv, "w", v, out, 100, KV_FLOAT32, 0);
			m->rc_retry = rc;
		}
	}
	CHECK(rc == KV_OK, "rank %d%s: pushpull: %d (%s): %s", rank,
	      replacement ? " (replacement)" : "", rc, kv_strerror(rc), kv_last_error(kv));
	for (int i = 0; i < 100; i++)
		CHECK(out[i] == (float)(3000 + 2 * i), "elem %d: %g, want %d", i, (double)out[i],
		      3000 + 2 * i);
	kv_close(kv);
	return 0;
}

static pid_t stop_fork(const struct kvd_proc *k, struct stop_shm *m, int rank, int replacement)
{
	pid_t p;

	fflush(NULL);
	p = fork();
	if (p == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		setenv("KVD_SOCKET", k->sock, 1);
		setenv("KVD_JOB", "stopped", 1);
		setenv("KVD_RANK", rank ? "1" : "0", 1);
		setenv("KVD_NUM_WORKERS", "2", 1);
		_exit(stop_rank(m, rank, replacement));
	}
	return p;
}

static int stop_wait_flag(int *flag)
{
	for (uint64_t t_end = now_ns() + 10000000000ull; now_ns() < t_end; sleep_us(1000))
		if (__atomic_load_n(flag, __ATOMIC_ACQUIRE))
			return 0;
	return -1;
}

static void survivor_stopped(const char *const *kvd_args)
{
	struct stop_shm *m = mmap(NULL, sizeof(*m), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvd_proc k;
	pid_t victim, survivor, repl = -1;
	int st_s = -1, st_r = -1, ok;
	char why[256] = "";

	cr_assert(m != MAP_FAILED);
	memset(m, 0, sizeof(*m));
	m->rc_first = m->rc_retry = 1;
	cr_assert_eq(kvd_start(&k, kvd_args), 0, "kvd did not start");
	victim = stop_fork(&k, m, 0, 0);
	survivor = stop_fork(&k, m, 1, 0);
	ok = !stop_wait_flag(&m->in_op[0]) && !stop_wait_flag(&m->in_op[1]);
	if (!ok)
		snprintf(why, sizeof(why), "the ranks did not reach their ops");
	if (ok) {
		sleep_us(100000); /* the survivor waits in its round, asleep */
		kill(survivor, SIGSTOP);
		kill(victim, SIGKILL);
		waitpid(victim, NULL, 0);
		sleep_us(100000); /* kvd notices the death */
		m->in_op[0] = 0;
		repl = stop_fork(&k, m, 0, 1);
		ok = !stop_wait_flag(&m->in_op[0]);
		if (!ok)
			snprintf(why, sizeof(why), "the replacement did not reach its op");
		sleep_us(100000); /* the replacement waits in the same round */
		m->t_cont = now_ns();
		kill(survivor, SIGCONT);
	} else {
		kill(victim, SIGKILL);
		waitpid(victim, NULL, 0);
	}
	for (uint64_t t_end = now_ns() + 10000000000ull; now_ns() < t_end && (st_s < 0 || st_r < 0);
	     sleep_us(2000)) {
		int s;
		if (st_s < 0 && waitpid(survivor, &s, WNOHANG) == survivor)
			st_s = s;
		if (st_r < 0 && repl > 0 && waitpid(repl, &s, WNOHANG) == repl)
			st_r = s;
		if (repl <= 0)
			st_r = 0;
	}
	if (st_s < 0) {
		kill(survivor, SIGKILL);
		waitpid(survivor, NULL, 0);
	}
	if (st_r < 0 && repl > 0) {
		kill(repl, SIGKILL);
		waitpid(repl, NULL, 0);
	}
	if (ok && (st_s != 0 || st_r != 0))
		print_log_tail(&k, 20);
	kvd_stop(&k);
	cr_assert(ok, "%s", why);
	fprintf(stderr,
		"survivor_stopped%s: the survivor's pending pushpull returned %d (%s) %.1f ms "
		"after SIGCONT%s%s\n",
		kvd_args ? " (engine)" : " (direct)", m->rc_first,
		m->rc_first <= 0 ? kv_strerror(m->rc_first) : "no return",
		m->t_first ? (double)(m->t_first - m->t_cont) / 1e6 : -1.0,
		m->rc_first == KV_ERR_PEER ? ", its retry " : "",
		m->rc_first == KV_ERR_PEER ? kv_strerror(m->rc_retry) : "");
	cr_expect(m->rc_first == KV_OK || m->rc_first == KV_ERR_PEER,
		  "the survivor's pending pushpull returned %d (%s), want KV_ERR_PEER or KV_OK",
		  m->rc_first, m->rc_first <= 0 ? kv_strerror(m->rc_first) : "nothing");
	cr_expect(m->t_first && m->t_first - m->t_cont < SOAK_WAIT_LIMIT_NS,
		  "the survivor's pending pushpull returned %.1f ms after it ran again (limit 1000 "
		  "ms)",
		  m->t_first ? (double)(m->t_first - m->t_cont) / 1e6 : -1.0);
	cr_expect(st_s == 0, "the survivor failed (status %#x)", st_s);
	cr_expect(st_r == 0, "the replacement failed (status %#x)", st_r);
	munmap(m, sizeof(*m));
}

Test(soak, survivor_stopped_while_peer_replaced_direct, .timeout = 30)
{
	survivor_stopped(NULL);
}

Test(soak, survivor_stopped_while_peer_replaced_engine, .timeout = 30)
{
	static const char *const engine[] = { "--direct-max", "0", NULL };

	survivor_stopped(engine);
}

/* ---------------------------------------------------------------- a whole job killed */

/*
 * The soak's ending, made likely: every rank of a job is SIGKILLed while kvd's
 * reduce workers sum a round of it (large parts, so a round stays on a worker
 * for a while).  kvd must free the job once, and go on serving: a new job
 * sums correctly afterwards and kvd stops cleanly (kvd_stop checks status 0).
 */
#define WK_COUNT (8u << 20) /* 32 MiB of f32: 4 parts of 8 MiB */

static int whole_job_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(10000);
	float *v = malloc(WK_COUNT * sizeof(float));
	int *ready = arg;

	CHECK(kv && v, "open");
	memset(v, 0, WK_COUNT * sizeof(float));
	CHECK_RC(kv_init(kv, "g", v, WK_COUNT, KV_FLOAT32), KV_OK);
	__atomic_add_fetch(ready, 1, __ATOMIC_RELEASE);
	for (;;) /* killed in here */
		if (kv_pushpull(kv, "g", v, NULL, WK_COUNT, KV_FLOAT32, 0) != KV_OK)
			return 1;
}

static int after_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(10000);
	float v[64];

	CHECK(kv, "open");
	for (int i = 0; i < 64; i++)
		v[i] = (float)i;
	CHECK_RC(kv_init(kv, "w", v, 64, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "w", v, NULL, 64, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 64; i++)
		CHECK(v[i] == (float)(n * i), "elem %d: %g, want %d", i, (double)v[i], n * i);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(soak, whole_job_killed_mid_engine_round, .timeout = 60)
{
	static const char *const args[] = { "--part-size", "8388608", NULL };
	int *ready = mmap(NULL, sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			  -1, 0);
	struct kvd_proc k;
	char why[256] = "";
	int crashed = 0, st = 0, rc = 0;

	cr_assert(ready != MAP_FAILED);
	cr_assert_eq(kvd_start(&k, args), 0, "kvd did not start");
	for (int round = 0; round < 8 && !crashed && !rc; round++) {
		char job[32];
		pid_t p[2];

		*ready = 0;
		snprintf(job, sizeof(job), "whole-%d", round);
		fflush(NULL);
		for (int r = 0; r < 2; r++) {
			p[r] = fork();
			if (p[r] == 0) {
				prctl(PR_SET_PDEATHSIG, SIGKILL);
				setenv("KVD_SOCKET", k.sock, 1);
				setenv("KVD_JOB", job, 1);
				setenv("KVD_RANK", r ? "1" : "0", 1);
				setenv("KVD_NUM_WORKERS", "2", 1);
				_exit(whole_job_rank(r, 2, &k, ready));
			}
		}
		for (uint64_t t_end = now_ns() + 10000000000ull;
		     __atomic_load_n(ready, __ATOMIC_ACQUIRE) < 2 && now_ns() < t_end;)
			sleep_us(1000);
		sleep_us(20000 + (uint64_t)round * 7000); /* some rounds in */
		kill(p[0], SIGKILL);
		kill(p[1], SIGKILL);
		waitpid(p[0], NULL, 0);
		waitpid(p[1], NULL, 0);
		sleep_us(100000);
		if (waitpid(k.pid, &st, WNOHANG) == k.pid) {
			crashed = 1;
			k.pid = 0;
			break;
		}
		snprintf(job, sizeof(job), "after-%d", round);
		rc = run_ranks(&k, job, 2, after_rank, NULL, 20, why, sizeof(why));
		if (waitpid(k.pid, &st, WNOHANG) == k.pid) {
			crashed = 1;
			k.pid = 0;
		}
	}
	if (crashed) {
		print_log_tail(&k, 100);
		kvd_stop(&k);
		cr_assert_fail("kvd died (%s %d) after every rank of a job was killed mid-round",
			       WIFSIGNALED(st) ? "signal" : "exit status",
			       WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
	}
	if (rc)
		print_log_tail(&k, 30);
	kvd_stop(&k);
	munmap(ready, sizeof(int));
	cr_assert_eq(rc, 0, "a job after the killed one failed: %s", why);
}
