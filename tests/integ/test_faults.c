/* SPDX-License-Identifier: MIT */
/*
 * test_faults.c - faults and waiting, end to end: a rank killed mid-round
 * (the others get KV_ERR_PEER, quickly), the daemon killed under a waiting
 * rank (KV_ERR_DAEMON, no hang), an op issued before every rank joined (it
 * waits, then succeeds), timeout_ms (KV_ERR_TIMEOUT after about that long),
 * and a child forked after kv_create using its parent's store (refused,
 * without harm to the parent).
 *
 * A killed rank is a failure to run_ranks(), so the kill tests fork their
 * own ranks with the same environment run_ranks() gives.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void dump_log(const struct kvd_proc *k)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "echo '--- kvd log ---' >&2; tail -n 40 %s >&2", k->log);
	if (system(cmd) != 0)
		fprintf(stderr, "(no log)\n");
}

static void run_job(const char *job, int n, rank_fn fn, void *arg, int timeout_s)
{
	struct kvd_proc k;
	char why[256];
	int rc;

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	rc = run_ranks(&k, job, n, fn, arg, timeout_s, why, sizeof(why));
	if (rc)
		dump_log(&k);
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

/* Fork rank r of n running fn, with run_ranks()'s environment. */
static pid_t fork_rank(const struct kvd_proc *k, const char *job, int r, int n, rank_fn fn,
		       void *arg)
{
	pid_t p;

	fflush(NULL);
	p = fork();
	if (p == 0) {
		char buf[16];
		setenv("KVD_SOCKET", k->sock, 1);
		setenv("KVD_JOB", job, 1);
		snprintf(buf, sizeof(buf), "%d", r);
		setenv("KVD_RANK", buf, 1);
		snprintf(buf, sizeof(buf), "%d", n);
		setenv("KVD_NUM_WORKERS", buf, 1);
		_exit(fn(r, n, k, arg));
	}
	return p;
}

/* Wait for pid until deadline (monotonic seconds); SIGKILL it past that. 0: reaped. */
static int wait_until(pid_t pid, double deadline, int *status)
{
	while (now_s() < deadline) {
		pid_t p = waitpid(pid, status, WNOHANG);
		if (p == pid)
			return 0;
		if (p < 0 && errno != EINTR)
			return -1;
		usleep(2000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, status, 0);
	return -1;
}

/* ---------------------------------------------------------------- rank killed */

static int killed_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	float v[64];
	double t0, dt;
	int rc;

	CHECK(kv, "open");
	for (int i = 0; i < 64; i++)
		v[i] = (float)i;
	CHECK_RC(kv_init(kv, "w", v, 64, KV_FLOAT32), KV_OK);
	if (rank == n - 1) {
		usleep(200000); /* let the others enter the round */
		kill(getpid(), SIGKILL);
		for (;;)
			pause();
	}
	t0 = now_s();
	rc = kv_pushpull(kv, "w", v, NULL, 64, KV_FLOAT32, 0);
	dt = now_s() - t0;
	CHECK(rc == KV_ERR_PEER, "pushpull with a dead peer: %d (%s), want KV_ERR_PEER", rc,
	      kv_strerror(rc));
	CHECK(dt < 2.0, "survivor waited %.2f s for KV_ERR_PEER", dt);
	CHECK(kv_last_error(kv) && *kv_last_error(kv), "no detail after KV_ERR_PEER");
	/* later collective ops fail the same way, at once */
	t0 = now_s();
	rc = kv_pushpull(kv, "w", v, NULL, 64, KV_FLOAT32, 0);
	dt = now_s() - t0;
	CHECK(rc == KV_ERR_PEER, "later pushpull: %d (%s), want KV_ERR_PEER", rc, kv_strerror(rc));
	CHECK(dt < 2.0, "later pushpull took %.2f s", dt);
	kv_close(kv);
	return 0;
}

Test(faults, rank_killed_mid_round, .timeout = 20)
{
	struct kvd_proc k;
	const int n = 3;
	pid_t pids[3];
	int st[3], late[3];
	double deadline;

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	for (int r = 0; r < n; r++)
		pids[r] = fork_rank(&k, "killed", r, n, killed_rank, NULL);
	deadline = now_s() + 10;
	for (int r = 0; r < n; r++)
		late[r] = pids[r] > 0 ? wait_until(pids[r], deadline, &st[r]) : -1;
	if (late[0] || late[1] || !WIFEXITED(st[0]) || WEXITSTATUS(st[0]) ||
	    !WIFEXITED(st[1]) || WEXITSTATUS(st[1]))
		dump_log(&k);
	kvd_stop(&k);
	for (int r = 0; r < n - 1; r++) {
		cr_expect_eq(late[r], 0, "survivor rank %d still running after 10 s", r);
		cr_expect(WIFEXITED(st[r]) && WEXITSTATUS(st[r]) == 0, "survivor rank %d failed",
			  r);
	}
	cr_expect(WIFSIGNALED(st[n - 1]) && WTERMSIG(st[n - 1]) == SIGKILL,
		  "the killed rank did not die of SIGKILL");
}

/* ---------------------------------------------------------------- daemon killed */

struct dk_arg {
	int ready[2]; /* rank 0 writes a byte just before its pushpull */
	int dead[2];  /* the test writes a byte once kvd is dead */
};

#define DK_BIG (1u << 20) /* elements: the engine path, staged through the arena */

static int daemon_killed_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct dk_arg *a = arg;
	struct kv_options o;
	kv_store *kv = NULL;
	float v[16] = { 0 }, *big = calloc(DK_BIG, sizeof(float));
	double t0, dt;
	int rc;

	CHECK(big, "malloc");
	kv_options_default(&o);
	o.timeout_ms = 2000; /* bounds libkv's reconnect attempts */
	CHECK_RC(kv_create("local", &o, &kv), KV_OK);
	CHECK_RC(kv_init(kv, "w", v, 16, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_init(kv, "big", big, DK_BIG, KV_FLOAT32), KV_OK);
	if (rank != 0) {
		struct pollfd p = { .fd = a->dead[0], .events = POLLIN };
		char c;
		/* never joins rank 0's round; once kvd is dead, a first op that
		 * needs more shared memory (asked of kvd) reports the dead kvd */
		CHECK(poll(&p, 1, 15000) == 1 && read(a->dead[0], &c, 1) == 1, "kvd never died");
		rc = kv_pushpull(kv, "big", big, NULL, DK_BIG, KV_FLOAT32, 0);
		CHECK(rc == KV_ERR_DAEMON, "a big pushpull after kvd died: %d (%s: %s), want "
		      "KV_ERR_DAEMON", rc, kv_strerror(rc), kv_last_error(kv));
		kv_close(kv);
		free(big);
		return 0;
	}
	CHECK(write(a->ready[1], "x", 1) == 1, "write");
	t0 = now_s();
	rc = kv_pushpull(kv, "w", v, NULL, 16, KV_FLOAT32, 0);
	dt = now_s() - t0;
	CHECK(rc == KV_ERR_DAEMON, "pushpull while kvd dies: %d (%s), want KV_ERR_DAEMON", rc,
	      kv_strerror(rc));
	CHECK(dt < 5.0, "pushpull took %.2f s to report the dead daemon", dt);
	CHECK(kv_last_error(kv) && *kv_last_error(kv), "no detail after KV_ERR_DAEMON");
	kv_close(kv);
	free(big);
	return 0;
}

Test(faults, daemon_killed_while_waiting, .timeout = 30)
{
	struct kvd_proc k;
	struct dk_arg a;
	struct pollfd pfd;
	pid_t p0, p1;
	int st0 = 0, st1 = 0, late0, late1, got;
	char c;

	cr_assert_eq(pipe(a.ready), 0);
	cr_assert_eq(pipe(a.dead), 0);
	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	p0 = fork_rank(&k, "dkill", 0, 2, daemon_killed_rank, &a);
	p1 = fork_rank(&k, "dkill", 1, 2, daemon_killed_rank, &a);
	pfd.fd = a.ready[0];
	pfd.events = POLLIN;
	got = poll(&pfd, 1, 10000) == 1 && read(a.ready[0], &c, 1) == 1;
	if (got) {
		usleep(200000); /* rank 0 is waiting in its pushpull */
		kill(k.pid, SIGKILL);
		waitpid(k.pid, NULL, 0);
		k.pid = 0;
		cr_expect_eq(write(a.dead[1], "x", 1), 1);
	}
	late0 = wait_until(p0, now_s() + 10, &st0);
	late1 = wait_until(p1, now_s() + 10, &st1);
	kvd_stop(&k);
	close(a.ready[0]);
	close(a.ready[1]);
	close(a.dead[0]);
	close(a.dead[1]);
	cr_assert(got, "rank 0 never reached its pushpull");
	cr_assert_eq(late0, 0, "rank 0 hung after kvd was killed");
	cr_assert(WIFEXITED(st0) && WEXITSTATUS(st0) == 0, "rank 0 failed");
	cr_assert_eq(late1, 0, "rank 1 hung after kvd was killed");
	cr_assert(WIFEXITED(st1) && WEXITSTATUS(st1) == 0, "rank 1 failed");
}

/* A one-rank job's small-key ops never wait on anyone: they still notice a
 * dead kvd (within a fraction of a second) instead of going on without it,
 * then wait for a kvd to take the job back for timeout_ms, and give up. */
static int lone_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	int *ready = arg;
	kv_store *kv = open_rank(1000);
	float v[16] = { 0 };
	double t0 = 0, last_ok = 0;
	int rc = KV_OK;
	long ops = 0;

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "w", v, 16, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "w", v, NULL, 16, KV_FLOAT32, 0), KV_OK);
	__atomic_store_n(ready, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(ready, __ATOMIC_SEQ_CST) != 2)
		usleep(1000); /* the test kills kvd */
	t0 = now_s();
	while (rc == KV_OK && now_s() - t0 < 5) {
		rc = kv_pushpull(kv, "w", v, NULL, 16, KV_FLOAT32, 0);
		if (rc == KV_OK)
			last_ok = now_s() - t0;
		ops++;
	}
	CHECK(rc == KV_ERR_DAEMON, "after kvd died: %d (%s), want KV_ERR_DAEMON", rc,
	      kv_strerror(rc));
	CHECK(last_ok < 0.5, "went on without kvd for %.3f s (%ld ops)", last_ok, ops);
	CHECK(now_s() - t0 < 3, "gave up after %.3f s (timeout_ms 1000)", now_s() - t0);
	kv_close(kv);
	return 0;
}

Test(faults, lone_rank_notices_a_dead_daemon, .timeout = 30)
{
	struct kvd_proc k;
	int *ready = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int st = 0, late = 0;
	pid_t p;

	cr_assert_neq(ready, MAP_FAILED);
	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	p = fork_rank(&k, "lone", 0, 1, lone_rank, ready);
	for (int i = 0; i < 1000 && !__atomic_load_n(ready, __ATOMIC_SEQ_CST); i++)
		usleep(10000);
	kill(k.pid, SIGKILL);
	waitpid(k.pid, NULL, 0);
	k.pid = 0;
	__atomic_store_n(ready, 2, __ATOMIC_SEQ_CST);
	late = wait_until(p, now_s() + 10, &st);
	kvd_stop(&k);
	munmap(ready, 4096);
	cr_assert_eq(late, 0, "the rank hung");
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the rank failed");
}

/* ---------------------------------------------------------------- late join */

static int late_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv;
	float v[10];

	if (rank == 1)
		usleep(300000);
	kv = open_rank(10000);
	CHECK(kv, "open");
	for (int i = 0; i < 10; i++)
		v[i] = rank == 0 ? (float)i : -1;
	CHECK_RC(kv_init(kv, "w", v, 10, KV_FLOAT32), KV_OK);
	for (int i = 0; i < 10; i++)
		v[i] = (float)((rank + 1) * i);
	CHECK_RC(kv_pushpull(kv, "w", v, NULL, 10, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 10; i++)
		CHECK(v[i] == (float)(3 * i), "elem %d: got %g, want %d", i, (double)v[i], 3 * i);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(faults, op_before_all_joined_waits, .timeout = 20)
{
	run_job("late", 2, late_rank, NULL, 15);
}

/* ---------------------------------------------------------------- timeout_ms */

struct to_arg {
	int ready[2]; /* rank 1 writes a byte once it has joined */
};

static int timeout_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct to_arg *a = arg;
	kv_store *kv;
	float v[8] = { 0 };
	double t0, dt;
	char c;
	int rc;

	if (rank == 1) {
		kv = open_rank(10000);
		CHECK(kv, "open");
		CHECK(write(a->ready[1], "x", 1) == 1, "write");
		CHECK_RC(kv_init(kv, "w", v, 8, KV_FLOAT32), KV_OK);
		sleep(2); /* alive, but never joins rank 0's pushpull */
		kv_close(kv);
		return 0;
	}
	/* join only once rank 1 is in, so that init is not what times out */
	CHECK(read(a->ready[0], &c, 1) == 1, "read");
	kv = open_rank(300);
	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "w", v, 8, KV_FLOAT32), KV_OK);
	t0 = now_s();
	rc = kv_pushpull(kv, "w", v, NULL, 8, KV_FLOAT32, 0);
	dt = now_s() - t0;
	CHECK(rc == KV_ERR_TIMEOUT, "pushpull nobody joins: %d (%s), want KV_ERR_TIMEOUT", rc,
	      kv_strerror(rc));
	CHECK(dt >= 0.25 && dt < 3.0, "timed out after %.3f s, want about 0.3 s", dt);
	CHECK(kv_last_error(kv) && *kv_last_error(kv), "no detail after KV_ERR_TIMEOUT");
	kv_close(kv);
	return 0;
}

Test(faults, timeout_ms, .timeout = 20)
{
	struct to_arg a;

	cr_assert_eq(pipe(a.ready), 0);
	run_job("tmo", 2, timeout_rank, &a, 15);
	close(a.ready[0]);
	close(a.ready[1]);
}

/* ---------------------------------------------------------------- fork safety */

static int forkchild_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(10000);
	float v[4] = { 1, 2, 3, 4 }, bad[4] = { 666, 666, 666, 666 }, out[4];
	int st;
	pid_t c;

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "w", v, 4, KV_FLOAT32), KV_OK);
	fflush(NULL);
	c = fork();
	CHECK(c >= 0, "fork");
	if (c == 0) {
		int rc1, rc2;
		alarm(5); /* a hang is a failure too */
		rc1 = kv_pushpull(kv, "w", bad, NULL, 4, KV_FLOAT32, 0);
		rc2 = kv_push(kv, "w", bad, 4, KV_FLOAT32, 0);
		if (rc1 == KV_OK || rc2 == KV_OK) {
			fprintf(stderr, "child: op on parent's store returned KV_OK (%d, %d)\n",
				rc1, rc2);
			_exit(1);
		}
		_exit(rc1 < 0 && rc2 < 0 ? 0 : 2);
	}
	CHECK(waitpid(c, &st, 0) == c, "waitpid");
	CHECK(WIFEXITED(st), "child died of signal %d", WIFSIGNALED(st) ? WTERMSIG(st) : 0);
	CHECK(WEXITSTATUS(st) == 0, "child exited %d", WEXITSTATUS(st));
	/* the parent's store and key are untouched: the stored value is still the init */
	CHECK_RC(kv_pull(kv, "w", out, 4, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 4; i++)
		CHECK(out[i] == (float)(i + 1), "stored elem %d is %g after the child's op", i,
		      (double)out[i]);
	for (int i = 0; i < 4; i++)
		v[i] = (float)(10 * i);
	CHECK_RC(kv_pushpull(kv, "w", v, NULL, 4, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 4; i++)
		CHECK(v[i] == (float)(10 * i), "parent's pushpull elem %d: %g", i, (double)v[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(faults, forked_child_refused, .timeout = 20) { run_job("forkc", 1, forkchild_rank, NULL, 15); }
