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
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

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

static int restart_rank(int rank, int n, const struct kvd_proc *kp, void *arg)
{
	struct rshared *sh = arg;
	kv_store *kv = open_rank(20000);
	void *in[R_KEYS], *out[R_KEYS];

	(void)kp;
	CHECK(kv, "open");
	for (int k = 0; k < R_KEYS; k++) {
		size_t bytes = rkeys[k].count * kv_dtype_size(rkeys[k].t);
		in[k] = malloc(bytes);
		out[k] = rkeys[k].zero_copy ? kv_alloc(kv, bytes) : malloc(bytes);
		CHECK(in[k] && out[k], "out of memory");
		fill(k, rank, n, 0, in[k], 1);
		CHECK_RC(kv_init(kv, rkeys[k].name, in[k], rkeys[k].count, rkeys[k].t), KV_OK);
	}
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
	struct rshared *sh;
	int rc;
	char why[256];
};

static void *run_job(void *arg)
{
	struct job_run *jr = arg;

	jr->rc = run_ranks(jr->k, jr->job, jr->n, restart_rank, jr->sh, 120, jr->why,
			   sizeof(jr->why));
	return NULL;
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
static void restart_run(int n, int steps, const int *at, int nat, int delay_us, int kill_round)
{
	struct rshared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvd_proc k;
	struct job_run jr = { .k = &k, .job = "restart", .n = n };
	pthread_t th;
	int errs = 0;

	cr_assert(sh != MAP_FAILED);
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
	}
	for (int i = 0; i < nat; i++) {
		for (int w = 0; min_step(sh, n) < at[i] && w < 60000; w++)
			usleep(500);
		usleep((useconds_t)delay_us);
		cr_assert_eq(kvd_restart(&k, NULL), 0, "kvd started again");
	}
	pthread_join(th, NULL);
	for (int r = 0; r < n; r++)
		errs += sh->daemon_errs[r];
	kvd_stop(&k);
	cr_assert_eq(jr.rc, 0, "%s", jr.why);
	cr_log_info("restart: %d ranks, %d restarts, %d ops repeated after KV_ERR_DAEMON", n,
		    nat, errs);
	munmap(sh, sizeof(*sh));
}

Test(restart, two_ranks_survive_kill_9_mid_step, .timeout = 120)
{
	static const int at[] = { 3, 9, 15 };

	/* no pause: the kill lands while the ranks are in the middle of a step */
	restart_run(2, 20, at, 3, 0, 0);
}

Test(restart, three_ranks_survive_kills_with_a_pause, .timeout = 120)
{
	static const int at[] = { 2, 6 };

	restart_run(3, 10, at, 2, 3000, 0);
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
	restart_run(2, 6, NULL, 0, 20000, 8);
}

Test(restart, killed_when_one_of_three_heard_of_a_round, .timeout = 120)
{
	restart_run(3, 6, NULL, 0, 0, 10);
}

Test(restart, killed_after_the_first_part_of_a_round, .timeout = 120)
{
	restart_run(2, 6, NULL, 0, 0, 7);
}
