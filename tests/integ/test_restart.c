/* SPDX-License-Identifier: MIT */
/*
 * test_restart.c - kvd killed with SIGKILL in the middle of training and
 * started again: the ranks get it back on their own and every round counts
 * exactly once (README "Restarting kvd").
 *
 * The data.  Keys: "d" (100 i64) is summed by the ranks' direct rounds, "e"
 * (400,000 f32, 1.6 MB: two parts) by kvd's engine, "z" the same on a
 * buffer from kv_alloc (zero-copy), and "b" (1000 f32) is a broadcast.  Step s
 * is one op on every key in that order.  Rank r's contribution to step s,
 * element i, is
 *	f(r, s, i) = (r == 0 ? s * W : 0) + ((i*31 + r*17 + s*7 + key*5) & 127),
 * an exact integer in f32 as in i64 (W = 512, s < 32768), so the sum of
 * step s is known exactly and names s (floor(v / W)).  kv_init stores step 0.
 *
 * A rank whose op fails with KV_ERR_DAEMON (kvd went away while the op was in
 * flight) repeats the same call with the same contribution; the result must be
 * that of the step, never the sum of a step applied twice or skipped.  The
 * driver kills kvd (SIGKILL) at chosen steps, waits a little and starts a new
 * kvd on the same socket; the ranks reconnect by themselves.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "../../shm/layout.h"
#include "../../shm/msg.h"
#include "../../shm/seg.h"
#include "../../kernels/reduce.h"

#define R_KEYS 4
#define R_W 512
#define R_MAXR 4

struct rkey {
	const char *name;
	kv_dtype t;
	size_t count;
	int zero_copy;
	int bcast;
};

static const struct rkey rkeys[R_KEYS] = {
	{ "d", KV_INT64, 100, 0, 0 },
	{ "e", KV_FLOAT32, 400000, 0, 0 },
	{ "z", KV_FLOAT32, 400000, 1, 0 },
	{ "b", KV_FLOAT32, 1000, 0, 1 },
};

struct rshared {
	int steps;                  /* steps to run */
	volatile int step[R_MAXR];  /* steps each rank completed */
	volatile int daemon_errs[R_MAXR];
	volatile int inited; /* noinit_rank: rank 0 made the key */
};

static int64_t term(int k, int r, int64_t s, size_t i)
{
	return (r == 0 ? s * R_W : 0) + (int64_t)((i * 31 + (size_t)r * 17 + (size_t)s * 7 +
						    (size_t)k * 5) &
						   127);
}

/* What key k holds after step s (0: kv_init's value) with n ranks. */
static int64_t want(int k, int n, int64_t s, size_t i)
{
	int64_t v = 0;

	if (rkeys[k].bcast)
		return term(k, 0, s, i);
	for (int r = 0; r < n; r++)
		v += term(k, r, s, i);
	return v;
}

static void fill(int k, int r, int n, int64_t s, void *b, int sum)
{
	for (size_t i = 0; i < rkeys[k].count; i++) {
		int64_t v = sum ? want(k, n, s, i) : term(k, r, s, i);
		if (rkeys[k].t == KV_INT64)
			((int64_t *)b)[i] = v;
		else
			((float *)b)[i] = (float)v;
	}
}

static int check(int k, int n, int64_t s, const void *b, const char *what)
{
	for (size_t i = 0; i < rkeys[k].count; i++) {
		int64_t got = rkeys[k].t == KV_INT64 ? ((const int64_t *)b)[i]
						      : (int64_t)((const float *)b)[i];
		CHECK(got == want(k, n, s, i),
		      "%s of key '%s' step %lld element %zu: %lld, want %lld (the sum of step "
		      "%lld)",
		      what, rkeys[k].name, (long long)s, i, (long long)got,
		      (long long)want(k, n, s, i), (long long)(got / R_W));
	}
	return 0;
}

/* A rank's buffers for every key (the zero-copy key's from kv_alloc), and
 * kv_init of each with step 0's sum. */
static int init_keys(kv_store *kv, int rank, int n, void **in, void **out)
{
	for (int k = 0; k < R_KEYS; k++) {
		size_t bytes = rkeys[k].count * kv_dtype_size(rkeys[k].t);
		in[k] = malloc(bytes);
		out[k] = rkeys[k].zero_copy ? kv_alloc(kv, bytes) : malloc(bytes);
		CHECK(in[k] && out[k], "out of memory");
		fill(k, rank, n, 0, in[k], 1);
		CHECK_RC(kv_init(kv, rkeys[k].name, in[k], rkeys[k].count, rkeys[k].t), KV_OK);
	}
	return 0;
}

static int restart_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	struct rshared *sh = arg;
	kv_store *kv = open_rank(20000);
	void *in[R_KEYS], *out[R_KEYS];

	(void)kp;
	CHECK(kv, "open");
	if (init_keys(kv, rank, n, in, out))
		return 1;
	for (int s = 1; s <= sh->steps; s++) {
		for (int k = 0; k < R_KEYS; k++) {
			int rc, tries = 0;

			fill(k, rank, n, s, in[k], 0);
			for (;;) {
				if (rkeys[k].zero_copy)
					memcpy(out[k], in[k],
					       rkeys[k].count * kv_dtype_size(rkeys[k].t));
				if (rkeys[k].bcast)
					rc = kv_broadcast(kv, rkeys[k].name, in[k], out[k],
							  rkeys[k].count, rkeys[k].t, 0);
				else
					rc = kv_pushpull(kv, rkeys[k].name,
							 rkeys[k].zero_copy ? out[k] : in[k], out[k],
							 rkeys[k].count, rkeys[k].t, 0);
				if (rc != KV_ERR_DAEMON)
					break;
				/* kvd went away mid-op: the same call again, once it is back */
				sh->daemon_errs[rank]++;
				CHECK(++tries < 20, "step %d key '%s': KV_ERR_DAEMON %d times: %s", s,
				      rkeys[k].name, tries, kv_last_error(kv));
			}
			CHECK(rc == KV_OK, "step %d key '%s': %d (%s): %s", s, rkeys[k].name, rc,
			      kv_strerror(rc), kv_last_error(kv));
			if (check(k, n, s, out[k], "the result"))
				return 1;
		}
		sh->step[rank] = s;
	}
	/* what the job holds at the end, pulled */
	for (int k = 0; k < R_KEYS; k++) {
		CHECK_RC(kv_pull(kv, rkeys[k].name, out[k], rkeys[k].count, rkeys[k].t, 0), KV_OK);
		if (check(k, n, sh->steps, out[k], "the final value"))
			return 1;
	}
	kv_close(kv);
	return 0;
}

struct job_run {
	const struct kvd_proc *k;
	const char *job;
	int n;
	void *sh; /* what the ranks share */
	rank_fn fn; /* NULL: restart_rank */
	int rc;
	char why[256];
};

static void *run_job(void *arg)
{
	struct job_run *jr = arg;

	jr->rc = run_ranks(jr->k, jr->job, jr->n, jr->fn ? jr->fn : restart_rank, jr->sh, 120,
			   jr->why,
			   sizeof(jr->why));
	return NULL;
}

static double mono_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int min_step(const struct rshared *sh, int n)
{
	int m = sh->steps;

	for (int r = 0; r < n; r++)
		m = sh->step[r] < m ? sh->step[r] : m;
	return m;
}

/*
 * n ranks run steps; kvd is killed and restarted when the slowest rank has
 * completed each of the steps in at[] (after a pause of delay_us).  With
 * kill_round, the first kvd kills itself instead, right after it published
 * that many engine rounds and before it told any rank (at[0] then is the step
 * by which the ranks must have noticed).
 */
static void restart_run_fn(rank_fn fn, int n, int steps, const int *at, int nat, int delay_us,
			   int kill_round, bool clean)
{
	struct rshared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvd_proc k;
	struct job_run jr = { .k = &k, .job = "restart", .n = n, .fn = fn };
	pthread_t th;
	int errs = 0, restarts = 0;
	double back[64] = { 0 }, back_max = 0;

	cr_assert(sh != MAP_FAILED && nat <= 64);
	memset(sh, 0, sizeof(*sh));
	sh->steps = steps;
	jr.sh = sh;
	if (kill_round) {
		char v[32];
		snprintf(v, sizeof(v), "%d", kill_round);
		setenv("KVD_FAULT_KILL_AFTER_ROUND", v, 1);
	}
	cr_assert_eq(kvd_start(&k, NULL), 0);
	unsetenv("KVD_FAULT_KILL_AFTER_ROUND");
	cr_assert_eq(pthread_create(&th, NULL, run_job, &jr), 0);
	if (kill_round) {
		/* kvd dies by itself; the ranks wait for one to come back */
		for (int w = 0; kill(k.pid, 0) == 0 && waitpid(k.pid, NULL, WNOHANG) == 0 &&
				w < 60000; w++)
			usleep(500);
		k.pid = 0;
		usleep((useconds_t)delay_us);
		cr_assert_eq(kvd_restart(&k, NULL), 0, "kvd started again");
		nat = 0;
		restarts = 1;
	}
	for (int i = 0; i < nat; i++) {
		int cur;
		double t0;
		for (int w = 0; min_step(sh, n) < at[i] && w < 60000; w++)
			usleep(500);
		/* delay_us < 0: a random pause of up to -delay_us */
		usleep((useconds_t)(delay_us >= 0 ? delay_us : rand() % -delay_us));
		cur = min_step(sh, n);
		if (clean)
			cr_assert_eq(kvd_restart_clean(&k, NULL), 0, "kvd stopped cleanly, started");
		else
			cr_assert_eq(kvd_restart(&k, NULL), 0, "kvd started again");
		/* how long from a kvd listening again to the job a step further */
		t0 = mono_s();
		for (int w = 0; min_step(sh, n) <= cur && cur < steps && w < 60000; w++)
			usleep(200);
		back[i] = mono_s() - t0;
		restarts++;
	}
	pthread_join(th, NULL);
	for (int r = 0; r < n; r++)
		errs += sh->daemon_errs[r];
	kvd_stop(&k);
	cr_assert_eq(jr.rc, 0, "%s", jr.why);
	for (int i = 0; i < nat; i++)
		back_max = back[i] > back_max ? back[i] : back_max;
	cr_log_info("restart: %d ranks, %d restarts, %d ops repeated after KV_ERR_DAEMON; the "
		    "job a step further at most %.1f ms after kvd listened again",
		    n, restarts, errs, back_max * 1e3);
	munmap(sh, sizeof(*sh));
}

static void restart_run(int n, int steps, const int *at, int nat, int delay_us, int kill_round,
			bool clean)
{
	restart_run_fn(NULL, n, steps, at, nat, delay_us, kill_round, clean);
}

/*
 * The same steps with every op async: a step puts one op on each key in
 * flight, then waits for them in order; a rank repeats the ops that failed
 * with KV_ERR_DAEMON, in the same order, as async ops again.
 */
static int async_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	struct rshared *sh = arg;
	kv_store *kv = open_rank(20000);
	void *in[R_KEYS], *out[R_KEYS];
	kv_ticket t[R_KEYS];
	int rc[R_KEYS];

	(void)kp;
	CHECK(kv, "open");
	if (init_keys(kv, rank, n, in, out))
		return 1;
	for (int s = 1; s <= sh->steps; s++) {
		bool todo[R_KEYS];
		int left = 0, tries = 0;
		for (int k = 0; k < R_KEYS; k++) {
			fill(k, rank, n, s, in[k], 0);
			todo[k] = !rkeys[k].bcast; /* broadcasts have no async form */
			left += todo[k];
		}
		while (left) {
			CHECK(++tries < 20, "step %d: ops failing with KV_ERR_DAEMON %d times", s,
			      tries);
			for (int k = 0; k < R_KEYS; k++) {
				if (!todo[k])
					continue;
				if (rkeys[k].zero_copy)
					memcpy(out[k], in[k],
					       rkeys[k].count * kv_dtype_size(rkeys[k].t));
				rc[k] = kv_pushpull_async(kv, rkeys[k].name,
							  rkeys[k].zero_copy ? out[k] : in[k],
							  out[k], rkeys[k].count, rkeys[k].t, 0,
							  &t[k]);
				/* apart, so that a later submit may be the one to find
				 * kvd gone while earlier ops are still in flight */
				usleep(8000);
			}
			for (int k = 0; k < R_KEYS; k++) {
				if (!todo[k])
					continue;
				if (rc[k] == KV_OK)
					rc[k] = kv_wait(kv, t[k]);
				if (rc[k] == KV_ERR_DAEMON) {
					sh->daemon_errs[rank]++;
					continue;
				}
				CHECK(rc[k] == KV_OK, "step %d key '%s': %d (%s): %s", s,
				      rkeys[k].name, rc[k], kv_strerror(rc[k]), kv_last_error(kv));
				if (check(k, n, s, out[k], "the result"))
					return 1;
				todo[k] = false;
				left--;
			}
		}
		sh->step[rank] = s;
	}
	kv_close(kv);
	return 0;
}

/*
 * A rank whose first op on a key is a round (it never called kv_init; rank 0
 * made the key): its first op still names its round (kvd's key reply says
 * how many rounds were done), so when kvd dies after rank 0 alone heard of
 * that round, the repeat is recognised.
 */
static int noinit_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	struct rshared *sh = arg;
	kv_store *kv = open_rank(20000);
	const int k = 1; /* "e": the engine's, two parts */
	void *in = malloc(rkeys[k].count * 4), *out = malloc(rkeys[k].count * 4);

	(void)kp;
	CHECK(kv && in && out, "open");
	if (rank == 0) {
		fill(k, rank, n, 0, in, 1);
		CHECK_RC(kv_init(kv, rkeys[k].name, in, rkeys[k].count, rkeys[k].t), KV_OK);
		__atomic_store_n(&sh->inited, 1, __ATOMIC_SEQ_CST);
	}
	while (!__atomic_load_n(&sh->inited, __ATOMIC_SEQ_CST))
		usleep(1000);
	for (int s = 1; s <= sh->steps; s++) {
		int rc, tries = 0;
		fill(k, rank, n, s, in, 0);
		while ((rc = kv_pushpull(kv, rkeys[k].name, in, out, rkeys[k].count, rkeys[k].t,
					 0)) == KV_ERR_DAEMON) {
			sh->daemon_errs[rank]++;
			CHECK(++tries < 20, "step %d: KV_ERR_DAEMON %d times", s, tries);
		}
		CHECK(rc == KV_OK, "step %d: %d (%s): %s", s, rc, kv_strerror(rc),
		      kv_last_error(kv));
		if (check(k, n, s, out, "the result"))
			return 1;
		sh->step[rank] = s;
	}
	kv_close(kv);
	return 0;
}

Test(restart, a_first_op_without_init_is_recognised, .timeout = 120)
{
	/* engine rounds 1 and 2 are step 1's two parts: kvd dies after the
	 * second, told to rank 0 alone, whose op completed */
	restart_run_fn(noinit_rank, 2, 4, NULL, 0, 20000, 2, false);
}

/* Async ops in flight when kvd is killed (and once stopped cleanly). */
Test(restart, async_ops_survive_kills, .timeout = 120)
{
	int at[6];
	unsigned seed = (unsigned)time(NULL) ^ 0x5a5a;

	srand(seed);
	cr_log_info("restart: seed %u", seed);
	for (int i = 0; i < 6; i++)
		at[i] = 2 + 4 * i + rand() % 3;
	restart_run_fn(async_rank, 3, 30, at, 6, -2000, 0, false);
	restart_run_fn(async_rank, 2, 12, at, 2, 0, 0, true);
}

Test(restart, two_ranks_survive_kill_9_mid_step, .timeout = 120)
{
	static const int at[] = { 3, 9, 15 };

	/* no pause: the kill lands while the ranks are in the middle of a step */
	restart_run(2, 20, at, 3, 0, 0, false);
}

Test(restart, three_ranks_survive_kills_with_a_pause, .timeout = 120)
{
	static const int at[] = { 2, 6 };

	restart_run(3, 10, at, 2, 3000, 0, false);
}

/* Ten kills at random moments of a 40-step job (seed printed: srand). */
Test(restart, ten_kills_at_random_moments, .timeout = 120)
{
	int at[10];
	unsigned seed = (unsigned)time(NULL);

	srand(seed);
	cr_log_info("restart: seed %u", seed);
	for (int i = 0; i < 10; i++)
		at[i] = 2 + 3 * i + rand() % 3;
	restart_run(3, 40, at, 10, -3000, 0, false);
}

/* systemctl restart: kvd stops cleanly (SIGTERM) mid-step and comes back. */
Test(restart, survives_a_clean_restart, .timeout = 120)
{
	static const int at[] = { 4, 8 };

	restart_run(2, 12, at, 2, 0, 0, true);
}

/*
 * The worst moment: kvd dies after a round is summed and recorded, when it has
 * told rank 0 and no other rank.  kvd's engine runs 4 rounds a step (2 parts
 * of "e", then 2 of "z"; "d" and "b" are direct), so round 8 is the last part
 * of "z" in step 2: rank 0's op completed and it goes on, while the others'
 * op fails with KV_ERR_DAEMON and they repeat it.  The repeat must return
 * that round's result, and not be paired with rank 0's next contribution.
 * Round 10 is the same for "e" in step 3, round 7 the first part of "z"
 * (every rank's op fails; the parts done must not run twice).
 */
Test(restart, killed_when_one_rank_heard_of_a_round, .timeout = 120)
{
	restart_run(2, 6, NULL, 0, 20000, 8, false);
}

Test(restart, killed_when_one_of_three_heard_of_a_round, .timeout = 120)
{
	restart_run(3, 6, NULL, 0, 0, 10, false);
}

Test(restart, killed_after_the_first_part_of_a_round, .timeout = 120)
{
	restart_run(2, 6, NULL, 0, 0, 7, false);
}

/* ------------------------------------------------------------------ forged state */

/*
 * A rank hands back what it kept, and kvd trusts none of it: segments of
 * another size or unsealed, a manifest of another job, records that point
 * outside their segments or at each other.  Each attempt is refused with a
 * sentence, nothing is left behind, and a healthy job runs afterwards.
 */
struct forged {
	int board, man, vals; /* sealed segments the "rank" hands back (-1: none) */
	int unsealed;         /* an unsealed memfd in place of the manifest */
};

static int raw_connect(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	cr_assert(fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	return fd;
}

static void raw_send(int fd, const struct kv_msg *m, const int *fds, int nfds)
{
	uint8_t buf[KV_MSG_MAX];
	size_t n = kv_msg_encode(m, buf, sizeof(buf));

	cr_assert_gt(n, 0);
	cr_assert_eq(seg_send(fd, buf, n, fds, nfds), 0);
}

/* The reply to a resuming hello: an ERROR (code and sentence) then EOF. */
static void expect_refusal(int fd, int code, const char *words, const char *what)
{
	uint8_t buf[KV_MSG_MAX];
	int fds[SEG_MAX_FDS], nfds;
	struct kv_msg m;
	ssize_t n;

	for (;;) {
		n = seg_recv(fd, buf, sizeof(buf), fds, SEG_MAX_FDS, &nfds);
		cr_assert_gt(n, 0, "%s: kvd answered nothing", what);
		cr_assert_eq(kv_msg_decode(buf, (size_t)n, &m, NULL), 0, "%s", what);
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		if (m.type != KV_MSG_HOLD)
			break;
	}
	cr_assert_eq(m.type, KV_MSG_ERROR, "%s: answered with type %u", what, m.type);
	cr_assert_eq(m.u.error.code, code, "%s: code %d (%.*s)", what, m.u.error.code,
		     (int)m.u.error.len, m.u.error.text);
	cr_assert(memmem(m.u.error.text, m.u.error.len, words, strlen(words)),
		  "%s: the sentence says '%s': %.*s", what, words, (int)m.u.error.len,
		  m.u.error.text);
	/* kvd hangs up (a reset when it left some of our messages unread) */
	n = seg_recv(fd, buf, sizeof(buf), fds, SEG_MAX_FDS, &nfds);
	cr_assert(n == 0 || n == -ECONNRESET, "%s: kvd hangs up (%zd)", what, n);
	close(fd);
}

static int sealed(size_t size, void **map)
{
	int fd = seg_create("test-forged", size);

	cr_assert_geq(fd, 0);
	cr_assert_eq(seg_map(fd, size, 0, map), 0);
	return fd;
}

/* A board and manifest that name job "forged" of 2 ranks, and a value segment. */
static void forge(struct forged *f, uint32_t nkeys, struct kv_mkey **rec)
{
	struct kv_board *b;
	struct kv_man_hdr *h;
	void *v;

	f->board = sealed(KV_BOARD_SIZE, (void **)&b);
	b->magic = KV_SHM_MAGIC;
	b->abi = KV_SHM_ABI;
	b->num_workers = 2;
	f->man = sealed(kv_man_size(0), (void **)&h);
	h->magic = KV_MAN_MAGIC;
	h->abi = KV_SHM_ABI;
	h->num_workers = 2;
	strcpy(h->job, "forged");
	h->nkeys = nkeys;
	*rec = (struct kv_mkey *)((uint8_t *)h + KV_MAN_HDR);
	f->vals = sealed(8u << 20, &v);
	f->unsealed = -1;
}

static void unforge(struct forged *f)
{
	close(f->board);
	close(f->man);
	close(f->vals);
}

static void resume_with(const struct kvd_proc *k, const struct forged *f, int code,
			const char *words, const char *what)
{
	struct kv_msg m = { .type = KV_MSG_ADOPT };
	int fds[3], n = 0, s = raw_connect(k->sock);

	if (f->board >= 0) {
		m.u.hold.kind[n] = KV_HOLD_BOARD;
		fds[n++] = f->board;
	}
	if (f->man >= 0 || f->unsealed >= 0) {
		m.u.hold.kind[n] = KV_HOLD_MANIFEST;
		fds[n++] = f->unsealed >= 0 ? f->unsealed : f->man;
	}
	if (f->vals >= 0) {
		m.u.hold.kind[n] = KV_HOLD_VALUES;
		fds[n++] = f->vals;
	}
	m.u.hold.n = (uint32_t)n;
	if (n)
		raw_send(s, &m, fds, n);
	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_HELLO;
	m.u.hello.num_workers = 2;
	m.u.hello.device = -1;
	m.u.hello.flags = KV_HELLO_RESUME;
	strcpy(m.u.hello.job, "forged");
	raw_send(s, &m, NULL, 0);
	expect_refusal(s, code, words, what);
}

static int healthy_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	kv_store *kv = open_rank(10000);
	float v[64];

	(void)kp;
	(void)arg;
	CHECK(kv, "open");
	for (int i = 0; i < 64; i++)
		v[i] = (float)(rank + i);
	CHECK_RC(kv_init(kv, "w", v, 64, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "w", v, v, 64, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 64; i++)
		CHECK(v[i] == (float)(2 * i + n - 1), "element %d: %g", i, v[i]);
	kv_close(kv);
	return 0;
}

Test(restart, forged_segments_are_refused, .timeout = 60)
{
	struct kvd_proc k;
	struct forged f = { -1, -1, -1, -1 };
	struct kv_mkey *rec;
	char why[256];
	void *p;

	cr_assert_eq(kvd_start(&k, NULL), 0);
	resume_with(&k, &f, KV_ERR_DAEMON, "no rank held the job's board", "nothing handed back");

	forge(&f, 0, &rec);
	close(f.man);
	f.man = sealed(kv_man_size(0), &p); /* a manifest of zeros */
	resume_with(&k, &f, KV_ERR_DAEMON, "not those of job 'forged'", "a blank manifest");
	unforge(&f);

	forge(&f, 0, &rec);
	f.unsealed = memfd_create("test-unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	cr_assert_eq(fallocate(f.unsealed, 0, 0, (off_t)kv_man_size(0)), 0);
	resume_with(&k, &f, KV_ERR_DAEMON, "cannot map the manifest", "an unsealed manifest");
	close(f.unsealed);
	/* sealed, but sparse: claims memory nobody has */
	f.unsealed = memfd_create("test-sparse", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	cr_assert_eq(ftruncate(f.unsealed, (off_t)kv_man_size(0)), 0);
	cr_assert_eq(fcntl(f.unsealed, F_ADD_SEALS, SEG_SEALS_REQUIRED), 0);
	resume_with(&k, &f, KV_ERR_DAEMON, "not one kvd made", "a sparse manifest");
	close(f.unsealed);
	f.unsealed = -1;
	unforge(&f);

	forge(&f, 2000000000u, &rec);
	resume_with(&k, &f, KV_ERR_DAEMON, "over --max-keys", "two billion keys");
	unforge(&f);

	forge(&f, 1, &rec);
	rec[0].count = 100;
	rec[0].dtype = 99;
	resume_with(&k, &f, KV_ERR_DAEMON, "record of key 0 is corrupt", "an unknown dtype");
	unforge(&f);

	forge(&f, 1, &rec);
	rec[0].count = 1u << 20; /* a part an element: a million parts */
	rec[0].dtype = KV_FLOAT32;
	rec[0].nparts = 1u << 20;
	rec[0].part_elems = 1;
	rec[0].flags = KV_MKEY_VALUE;
	rec[0].name_len = 1;
	rec[0].name[0] = 'm';
	resume_with(&k, &f, KV_ERR_DAEMON, "record of key 0 is corrupt", "parts of 4 bytes");
	unforge(&f);

	forge(&f, 2, &rec);
	for (int i = 0; i < 2; i++) {
		rec[i].count = 1000;
		rec[i].dtype = KV_FLOAT32;
		rec[i].nparts = 1;
		rec[i].part_elems = 1000;
		rec[i].flags = KV_MKEY_VALUE;
		rec[i].name_len = 1;
		rec[i].name[0] = (char)('a' + i);
		rec[i].voff = 4096; /* both keys on the same bytes */
	}
	resume_with(&k, &f, KV_ERR_DAEMON, "on another key", "two keys on one block");
	rec[1].voff = (8u << 20) - 64; /* past the segment's end */
	resume_with(&k, &f, KV_ERR_DAEMON, "outside the job's segments", "a key past the end");
	rec[1].voff = 64 * 1024;
	rec[1].name[0] = 'a';
	resume_with(&k, &f, KV_ERR_DAEMON, "names key 'a' twice", "a name twice");
	unforge(&f);

	/* nothing of those attempts stayed; a real job runs */
	cr_assert_eq(run_ranks(&k, "healthy", 2, healthy_rank, NULL, 30, why, sizeof(why)), 0,
		     "%s", why);
	kvd_stop(&k);
}

/* ------------------------------------------------------------------ nothing left */

#define MAX_INO 64

/*
 * kvd segments seen through /proc: with pid > 0, record the inodes of those
 * that process holds into ino[] (returns how many); with pid 0, count the
 * descriptors of any process that name one of the n inodes in ino[].
 */
static int kvd_segments(pid_t pid, ino_t *ino, int n)
{
	DIR *proc = opendir("/proc");
	struct dirent *p;
	int found = 0;

	cr_assert(proc);
	while ((p = readdir(proc))) {
		char path[300], link[300];
		DIR *fds;
		struct dirent *f;

		if (p->d_name[0] < '0' || p->d_name[0] > '9' || (pid && atoi(p->d_name) != pid))
			continue;
		snprintf(path, sizeof(path), "/proc/%s/fd", p->d_name);
		if (!(fds = opendir(path)))
			continue;
		while ((f = readdir(fds))) {
			char fp[600];
			struct stat st;
			ssize_t len;
			snprintf(fp, sizeof(fp), "%s/%s", path, f->d_name);
			len = readlink(fp, link, sizeof(link) - 1);
			if (len <= 0 || stat(fp, &st))
				continue;
			link[len] = '\0';
			if (!strstr(link, "memfd:kvd-"))
				continue;
			if (pid && found < MAX_INO)
				ino[found++] = st.st_ino;
			for (int i = 0; !pid && i < n; i++)
				found += st.st_ino == ino[i];
		}
		closedir(fds);
	}
	closedir(proc);
	return found;
}

/* Every rank of a job dies while kvd is down: the new kvd has nothing of it,
 * and no process holds any of its memory. */
Test(restart, job_whose_ranks_all_died_leaves_nothing, .timeout = 60)
{
	volatile int *ready = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
				   -1, 0);
	struct kvd_proc k;
	pid_t pid[2];
	char kvctl[512], cmd[1200];
	FILE *out;
	ino_t ino[MAX_INO];
	int nino;

	cr_assert(ready != MAP_FAILED);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	for (int r = 0; r < 2; r++) {
		pid[r] = fork();
		if (pid[r] == 0) {
			char rank[4] = { (char)('0' + r), 0 };
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			float *v = calloc(400000, sizeof(float));
			kv_store *kv;
			setenv("KVD_SOCKET", k.sock, 1);
			setenv("KVD_JOB", "doomed", 1);
			setenv("KVD_RANK", rank, 1);
			setenv("KVD_NUM_WORKERS", "2", 1);
			kv = open_rank(10000);
			if (!v || !kv || kv_init(kv, "small", v, 10, KV_FLOAT32) ||
			    kv_init(kv, "big", v, 400000, KV_FLOAT32) ||
			    kv_pushpull(kv, "big", v, v, 400000, KV_FLOAT32, 0))
				_exit(1);
			__atomic_add_fetch(ready, 1, __ATOMIC_SEQ_CST);
			pause();
			_exit(0);
		}
	}
	for (int w = 0; *ready < 2 && w < 20000; w++)
		usleep(500);
	cr_assert_eq(*ready, 2, "both ranks made their keys");
	/* the board, the manifest, a value segment ("big", 1.6 MB, is the
	 * engine's), a direct one unless kvd runs every key on its engine, and
	 * its own arena */
	nino = kvd_segments(pid[1], ino, 0);
	cr_assert_geq(nino, 4, "rank 1 holds the job's segments (%d)", nino);
	kvd_crash(&k);
	cr_assert_geq(kvd_segments(0, ino, nino), nino, "with kvd dead, the ranks still hold them");
	for (int r = 0; r < 2; r++) {
		kill(pid[r], SIGKILL);
		waitpid(pid[r], NULL, 0);
	}
	cr_assert_eq(kvd_segments(0, ino, nino), 0, "nobody holds any segment of the job");
	cr_assert_eq(kvd_restart(&k, NULL), 0);
	snprintf(cmd, sizeof(cmd), "%s --socket %s status --json", bin_path("kvctl", kvctl,
									   sizeof(kvctl)),
		 k.sock);
	out = popen(cmd, "r");
	cr_assert(out);
	{
		char buf[8192];
		size_t n = fread(buf, 1, sizeof(buf) - 1, out);
		buf[n] = '\0';
		cr_assert(strstr(buf, "\"jobs\": []") || strstr(buf, "\"jobs\":[]"),
			  "kvd has no job: %s", buf);
	}
	pclose(out);
	kvd_stop(&k);
	munmap((void *)ready, 4096);
}

/* ------------------------------------------------------------------ optimizer states */

/*
 * With an optimizer in the store, a round that is applied twice or skipped,
 * or a state (momentum, Adam's moments, an f16 key's f32 master copy, Adam's
 * step count) that is lost, changes every value after it.  So the same job
 * runs twice, once undisturbed and once with kvd killed (by the fault hook
 * right after a round is recorded and rank 0 alone was told, then by SIGKILL
 * mid-step), and every step's result must be the same to the bit.
 */
#define O_STEPS 12
#define O_KEYS 3

static const struct rkey okeys[O_KEYS] = {
	{ "wf", KV_FLOAT32, 400000, 0, 0 }, /* the engine's from the start */
	{ "wh", KV_FLOAT16, 300000, 0, 0 }, /* direct until the optimizer moves it */
	{ "wb", KV_BFLOAT16, 600000, 0, 0 },
};

struct oshared {
	volatile int step[R_MAXR];
	uint64_t hash[2][O_STEPS + 1][O_KEYS]; /* [run][step][key]: FNV-1a of rank 0's result */
	int run;
};

static uint64_t fnv(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

/* Rank r's gradient for step s: small, different per element, rank and step. */
static void grad(int k, int r, int s, void *b)
{
	for (size_t i = 0; i < okeys[k].count; i++) {
		float g = (float)((int)((i * 13 + (size_t)r * 7 + (size_t)s * 3) % 17) - 8) / 64.0f;
		if (okeys[k].t == KV_FLOAT32)
			((float *)b)[i] = g;
		else
			((uint16_t *)b)[i] = okeys[k].t == KV_FLOAT16 ? float_to_half(g) : float_to_bf16(g);
	}
}

static int opt_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	struct oshared *sh = arg;
	kv_store *kv = open_rank(20000);
	void *g[O_KEYS], *w[O_KEYS];

	(void)kp;
	(void)n;
	CHECK(kv, "open");
	for (int k = 0; k < O_KEYS; k++) {
		size_t bytes = okeys[k].count * kv_dtype_size(okeys[k].t);
		g[k] = malloc(bytes);
		w[k] = malloc(bytes);
		CHECK(g[k] && w[k], "out of memory");
		grad(k, 99, 0, w[k]); /* the initial weights */
		CHECK_RC(kv_init(kv, okeys[k].name, w[k], okeys[k].count, okeys[k].t), KV_OK);
	}
	CHECK_RC(kv_set_optimizer(kv, "adam lr=0.01 wd=0.001"), KV_OK);
	for (int s = 1; s <= O_STEPS; s++) {
		for (int k = 0; k < O_KEYS; k++) {
			int rc, tries = 0;
			grad(k, rank, s, g[k]);
			while ((rc = kv_pushpull(kv, okeys[k].name, g[k], w[k], okeys[k].count,
						 okeys[k].t, 0)) == KV_ERR_DAEMON)
				CHECK(++tries < 20, "step %d key '%s': KV_ERR_DAEMON %d times: %s", s,
				      okeys[k].name, tries, kv_last_error(kv));
			CHECK(rc == KV_OK, "step %d key '%s': %d (%s): %s", s, okeys[k].name, rc,
			      kv_strerror(rc), kv_last_error(kv));
			if (rank == 0)
				sh->hash[sh->run][s][k] =
					fnv(w[k], okeys[k].count * kv_dtype_size(okeys[k].t));
		}
		sh->step[rank] = s;
	}
	kv_close(kv);
	return 0;
}

static void *run_opt_job(void *arg)
{
	struct job_run *jr = arg;

	jr->rc = run_ranks(jr->k, jr->job, jr->n, opt_rank, jr->sh, 120, jr->why,
			   sizeof(jr->why));
	return NULL;
}

Test(restart, optimizer_states_survive_to_the_bit, .timeout = 180)
{
	struct oshared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvd_proc k;
	struct job_run jr = { .k = &k, .job = "adam", .n = 2, .sh = sh };
	char why[256];
	pthread_t th;

	cr_assert(sh != MAP_FAILED);
	memset(sh, 0, sizeof(*sh));
	/* run 0: undisturbed */
	cr_assert_eq(kvd_start(&k, NULL), 0);
	cr_assert_eq(run_ranks(&k, "adam", 2, opt_rank, sh, 120, why, sizeof(why)), 0, "%s", why);
	kvd_stop(&k);

	/* run 1: kvd dies after round 9 (3 engine keys of 2 parts: step 2), rank 0 told
	 * alone; then SIGKILL once the ranks are past step 6 */
	sh->run = 1;
	memset((void *)sh->step, 0, sizeof(sh->step));
	setenv("KVD_FAULT_KILL_AFTER_ROUND", "9", 1);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	unsetenv("KVD_FAULT_KILL_AFTER_ROUND");
	cr_assert_eq(pthread_create(&th, NULL, run_opt_job, &jr), 0);
	for (int w = 0; waitpid(k.pid, NULL, WNOHANG) == 0 && w < 60000; w++)
		usleep(500);
	k.pid = 0;
	cr_assert_eq(kvd_restart(&k, NULL), 0);
	for (int w = 0; (sh->step[0] < 6 || sh->step[1] < 6) && w < 60000; w++)
		usleep(500);
	cr_assert_eq(kvd_restart(&k, NULL), 0);
	pthread_join(th, NULL);
	kvd_stop(&k);
	cr_assert_eq(jr.rc, 0, "%s", jr.why);
	for (int s = 1; s <= O_STEPS; s++)
		for (int kk = 0; kk < O_KEYS; kk++)
			cr_assert_eq(sh->hash[1][s][kk], sh->hash[0][s][kk],
				     "step %d key '%s': the weights differ from the undisturbed run",
				     s, okeys[kk].name);
	munmap(sh, sizeof(*sh));
}

/* A kvd that does not come back: the call fails with KV_ERR_DAEMON once
 * timeout_ms has passed since the loss, saying so, and the store stays dead. */
static int abandoned_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	volatile int *flag = arg;
	kv_store *kv = open_rank(400);
	float *v = calloc(400000, sizeof(float)); /* the engine's: a direct round needs no kvd */
	struct timespec t0, t1;
	double dt;
	int rc;

	(void)kp;
	(void)n;
	CHECK(kv && v, "open");
	CHECK_RC(kv_init(kv, "v", v, 400000, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "v", v, v, 400000, KV_FLOAT32, 0), KV_OK);
	__atomic_add_fetch(flag, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(flag, __ATOMIC_SEQ_CST) < 100) /* kvd is killed */
		usleep(1000);
	/* the first call finds kvd gone at its start (then it waits for a kvd)
	 * or only once it waits (it was in flight: then the next call waits);
	 * either way one of them tries to reach a kvd for timeout_ms */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = kv_pushpull(kv, "v", v, v, 400000, KV_FLOAT32, 0);
	CHECK(rc == KV_ERR_DAEMON, "rank %d: %d (%s): %s", rank, rc, kv_strerror(rc),
	      kv_last_error(kv));
	rc = kv_pushpull(kv, "v", v, v, 400000, KV_FLOAT32, 0);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	dt = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
	CHECK(rc == KV_ERR_DAEMON, "rank %d: %d (%s): %s", rank, rc, kv_strerror(rc),
	      kv_last_error(kv));
	CHECK(strstr(kv_last_error(kv), "did not take this job back"), "the sentence: %s",
	      kv_last_error(kv));
	CHECK(dt < 3.0, "gave up after %.2f s, timeout_ms 400", dt);
	CHECK(dt > 0.3, "gave up after %.3f s without trying", dt);
	CHECK_RC(kv_pull(kv, "v", v, 400000, KV_FLOAT32, 0), KV_ERR_DAEMON);
	kv_close(kv);
	free(v);
	return 0;
}

struct abandon {
	const struct kvd_proc *k;
	volatile int *flag;
	int rc;
	char why[256];
};

static void *abandon_job(void *arg)
{
	struct abandon *a = arg;

	a->rc = run_ranks(a->k, "abandoned", 2, abandoned_rank, (void *)a->flag, 30, a->why,
			  sizeof(a->why));
	return NULL;
}

Test(restart, gives_up_when_kvd_does_not_come_back, .timeout = 60)
{
	volatile int *flag = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
				  -1, 0);
	struct kvd_proc k;
	struct abandon a = { .k = &k, .flag = flag };
	pthread_t th;

	cr_assert(flag != MAP_FAILED);
	*flag = 0;
	cr_assert_eq(kvd_start(&k, NULL), 0);
	cr_assert_eq(pthread_create(&th, NULL, abandon_job, &a), 0);
	for (int w = 0; *flag < 2 && w < 20000; w++)
		usleep(500);
	kvd_crash(&k);
	__atomic_store_n(flag, 100, __ATOMIC_SEQ_CST);
	pthread_join(th, NULL);
	cr_assert_eq(a.rc, 0, "%s", a.why);
	kvd_stop(&k);
	munmap((void *)flag, 4096);
}

static bool log_has(const struct kvd_proc *k, const char *words)
{
	char line[1024];
	FILE *f = fopen(k->log, "r");
	bool found = false;

	while (f && !found && fgets(line, sizeof(line), f))
		found = strstr(line, words) != NULL;
	if (f)
		fclose(f);
	return found;
}

/* Segments handed back ahead of a hello are held by kvd: all connections
 * together may hold a quarter of its descriptors, so a client that sends
 * ADOPT after ADOPT and never says hello cannot starve kvd of them. */
Test(restart, segments_ahead_of_a_hello_are_bounded, .timeout = 60)
{
	struct rlimit old, low = { 512, 512 };
	struct kvd_proc k;
	struct kv_msg m = { .type = KV_MSG_ADOPT };
	void *p;
	int seg = sealed(4096, &p), fds[4] = { seg, seg, seg, seg }, rfds[SEG_MAX_FDS], a, b, nr;
	uint8_t buf[KV_MSG_MAX];
	char why[256];
	ssize_t n;

	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
	low.rlim_max = old.rlim_max;
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
	cr_assert_eq(kvd_start(&k, NULL), 0); /* 512 descriptors: 128 for ADOPT */
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
	m.u.hold.n = 4;
	for (int i = 0; i < 4; i++) {
		m.u.hold.kind[i] = KV_HOLD_VALUES;
		m.u.hold.id[i] = (uint32_t)i;
	}
	/* 32 messages fit; the 33rd would make 132: kvd says why and hangs up
	 * (the sentence may be lost to the reset of our unread messages: the
	 * log has it) */
	a = raw_connect(k.sock);
	for (int i = 0; i < 40; i++)
		raw_send(a, &m, fds, 4);
	while ((n = seg_recv(a, buf, sizeof(buf), rfds, SEG_MAX_FDS, &nr)) > 0)
		for (int i = 0; i < nr; i++)
			close(rfds[i]);
	close(a);
	cr_assert(log_has(&k, "too many segments handed back"), "kvd refused the 33rd");
	/* what a held was given back: another connection may hand back as much,
	 * and kvd reads its hello (refused: no board among them) */
	b = raw_connect(k.sock);
	for (int i = 0; i < 32; i++)
		raw_send(b, &m, fds, 4);
	memset(&m, 0, sizeof(m));
	m.type = KV_MSG_HELLO;
	m.u.hello.num_workers = 2;
	m.u.hello.device = -1;
	m.u.hello.flags = KV_HELLO_RESUME;
	strcpy(m.u.hello.job, "forged");
	raw_send(b, &m, NULL, 0);
	expect_refusal(b, KV_ERR_DAEMON, "no rank held the job's board", "within the bound");
	cr_assert_eq(run_ranks(&k, "healthy", 2, healthy_rank, NULL, 30, why, sizeof(why)), 0,
		     "%s", why);
	kvd_stop(&k);
	close(seg);
}

/*
 * The round tags must never mistake a new contribution for one already
 * counted: several async pushpulls in flight on one key of many parts, the
 * ranks arriving at different times, each op's result that of its own step.
 */
#define P_COUNT (4u << 20) /* 4M i64: 32 MiB, 8 parts */
#define P_DEPTH 3

static int pipelined_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	kv_store *kv = open_rank(20000);
	int64_t *in[P_DEPTH], *out[P_DEPTH];
	kv_ticket t[P_DEPTH];

	(void)kp;
	(void)arg;
	CHECK(kv, "open");
	for (int d = 0; d < P_DEPTH; d++) {
		in[d] = malloc(P_COUNT * sizeof(int64_t));
		out[d] = malloc(P_COUNT * sizeof(int64_t));
		CHECK(in[d] && out[d], "out of memory");
	}
	memset(in[0], 0, P_COUNT * sizeof(int64_t));
	CHECK_RC(kv_init(kv, "p", in[0], P_COUNT, KV_INT64), KV_OK);
	for (int s = 0; s < 4; s++) {
		for (int d = 0; d < P_DEPTH; d++) {
			for (size_t i = 0; i < P_COUNT; i++)
				in[d][i] = (int64_t)(i % 1000) + rank * 1000000 + (s * P_DEPTH + d);
			if (rank == 0)
				usleep(3000); /* rank 0 comes last, op after op */
			CHECK_RC(kv_pushpull_async(kv, "p", in[d], out[d], P_COUNT, KV_INT64, 0,
						   &t[d]),
				 KV_OK);
		}
		for (int d = 0; d < P_DEPTH; d++) {
			CHECK_RC(kv_wait(kv, t[d]), KV_OK);
			for (size_t i = 0; i < P_COUNT; i += 4099) {
				int64_t want = 0;
				for (int r = 0; r < n; r++)
					want += (int64_t)(i % 1000) + r * 1000000 + (s * P_DEPTH + d);
				CHECK(out[d][i] == want, "step %d op %d element %zu: %lld, want %lld",
				      s, d, i, (long long)out[d][i], (long long)want);
			}
		}
	}
	kv_close(kv);
	return 0;
}

Test(restart, pipelined_async_rounds_on_a_multipart_key, .timeout = 120)
{
	static const char *const args[] = { "--direct-max", "0", "--threads", "1", NULL };
	struct kvd_proc k;
	char why[256];

	cr_assert_eq(kvd_start(&k, args), 0);
	cr_assert_eq(run_ranks(&k, "pipelined", 2, pipelined_rank, NULL, 100, why, sizeof(why)),
		     0, "%s", why);
	kvd_stop(&k);
}

/* An optimizer of the same name that keeps more arrays (SGD, then SGD with
 * momentum) gets a new state block: an f16 key's states start afresh from
 * its value there, never from the new block's empty bytes. */
static int reshape_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	kv_store *kv = open_rank(10000);
	uint16_t w[1000], g[1000];

	(void)rank;
	(void)n;
	(void)kp;
	(void)arg;
	CHECK(kv, "open");
	for (int i = 0; i < 1000; i++) {
		w[i] = float_to_half(1.0f);
		g[i] = float_to_half(1.0f);
	}
	CHECK_RC(kv_init(kv, "h", w, 1000, KV_FLOAT16), KV_OK);
	CHECK_RC(kv_set_optimizer(kv, "sgd lr=0.1"), KV_OK);
	CHECK_RC(kv_pushpull(kv, "h", g, w, 1000, KV_FLOAT16, 0), KV_OK);
	CHECK(fabsf(half_to_float(w[0]) - 0.9f) < 2e-3f, "after sgd: %g", half_to_float(w[0]));
	CHECK_RC(kv_set_optimizer(kv, "sgd lr=0.1 momentum=0.9"), KV_OK);
	CHECK_RC(kv_pushpull(kv, "h", g, w, 1000, KV_FLOAT16, 0), KV_OK);
	for (int i = 0; i < 1000; i++)
		CHECK(fabsf(half_to_float(w[i]) - 0.8f) < 2e-3f, "element %d after momentum: %g",
		      i, half_to_float(w[i]));
	kv_close(kv);
	return 0;
}

Test(restart, optimizer_reshaped_keeps_the_weights, .timeout = 60)
{
	struct kvd_proc k;
	char why[256];

	cr_assert_eq(kvd_start(&k, NULL), 0);
	cr_assert_eq(run_ranks(&k, "reshape", 1, reshape_rank, NULL, 30, why, sizeof(why)), 0,
		     "%s", why);
	kvd_stop(&k);
}
