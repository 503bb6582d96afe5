/* SPDX-License-Identifier: MIT */
/*
 * test_errors.c - what the contract says must fail, and how: duplicate init,
 * count/dtype mismatch (on the offending rank only, the round staying open),
 * keys nobody initialised, unknown and unavailable store types, no daemon,
 * bad job names, and hellos the daemon must refuse.  Every failure must
 * leave a sentence in kv_last_error().
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

static void run_job(const char *job, int n, rank_fn fn, void *arg, int timeout_s)
{
	struct kvd_proc k;
	char why[256];
	int rc;

	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	rc = run_ranks(&k, job, n, fn, arg, timeout_s, why, sizeof(why));
	if (rc) {
		char cmd[256];
		snprintf(cmd, sizeof(cmd), "echo '--- kvd log ---' >&2; tail -n 40 %s >&2", k.log);
		if (system(cmd) != 0)
			fprintf(stderr, "(no log)\n");
	}
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int has_detail(const char *s)
{
	return s && strlen(s) > 0;
}

/* ---------------------------------------------------------------- duplicate init */

static int dup_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	float v[8], out[8];

	CHECK(kv, "open");
	for (int i = 0; i < 8; i++)
		v[i] = rank == 0 ? 3.0f : 9.0f;
	CHECK_RC(kv_init(kv, "w", v, 8, KV_FLOAT32), KV_OK);
	if (rank == 1)
		usleep(100000);
	for (int i = 0; i < 8; i++)
		v[i] = 42;
	CHECK_RC(kv_init(kv, "w", v, 8, KV_FLOAT32), KV_ERR_EXISTS);
	CHECK(has_detail(kv_last_error(kv)), "kv_last_error empty after EXISTS");
	/*
	 * A second init with another count is refused too.  Both EXISTS (second
	 * init) and MISMATCH (count differs from the key's) fit the contract.
	 */
	{
		int rc = kv_init(kv, "w", v, 4, KV_FLOAT32);
		CHECK(rc == KV_ERR_EXISTS || rc == KV_ERR_MISMATCH,
		      "second init with another count: %d (%s)", rc, kv_strerror(rc));
	}
	/* the stored value is still rank 0's first one */
	CHECK_RC(kv_pull(kv, "w", out, 8, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 8; i++)
		CHECK(out[i] == 3.0f, "elem %d: got %g, want 3 (the first init)", i,
		      (double)out[i]);
	/* and the key works */
	for (int i = 0; i < 8; i++)
		v[i] = (float)(rank + 1);
	CHECK_RC(kv_pushpull(kv, "w", v, NULL, 8, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 8; i++)
		CHECK(v[i] == (float)(n * (n + 1) / 2), "pushpull elem %d: %g", i, (double)v[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(errors, duplicate_init_exists, .timeout = 30) { run_job("dup", 2, dup_rank, NULL, 25); }

/* ---------------------------------------------------------------- mismatch */

static int mismatch_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	int what = *(int *)arg; /* 0: count, 1: dtype, 2: both, one after the other */
	kv_store *kv = open_rank(20000);
	float v[9] = { 0 };
	double d[8] = { 0 };

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "m", v, 8, KV_FLOAT32), KV_OK);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < 9; i++)
			v[i] = (float)((rank + 1) * 10 + i + round);
		if (rank == n - 1) {
			/* the others are already waiting in the round when this rank errs */
			usleep(200000);
			if (what == 0 || what == 2) {
				CHECK_RC(kv_pushpull(kv, "m", v, NULL, 7, KV_FLOAT32, 0),
					 KV_ERR_MISMATCH);
				CHECK(has_detail(kv_last_error(kv)), "no detail after MISMATCH");
				CHECK_RC(kv_pushpull(kv, "m", v, NULL, 9, KV_FLOAT32, 0),
					 KV_ERR_MISMATCH);
				CHECK_RC(kv_pull(kv, "m", v, 7, KV_FLOAT32, 0), KV_ERR_MISMATCH);
			}
			if (what == 1 || what == 2) {
				CHECK_RC(kv_pushpull(kv, "m", d, NULL, 8, KV_FLOAT64, 0),
					 KV_ERR_MISMATCH);
				CHECK(has_detail(kv_last_error(kv)), "no detail after MISMATCH");
				CHECK_RC(kv_pushpull(kv, "m", v, NULL, 4, KV_INT64, 0),
					 KV_ERR_MISMATCH);
			}
			/* the failed calls touched nothing */
			for (int i = 0; i < 8; i++)
				CHECK(v[i] == (float)((rank + 1) * 10 + i + round),
				      "failed op wrote into value");
		}
		CHECK_RC(kv_pushpull(kv, "m", v, NULL, 8, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 8; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (r + 1) * 10 + i + round;
			CHECK(v[i] == want, "round %d elem %d: got %g, want %g", round, i,
			      (double)v[i], want);
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(errors, mismatch_count_then_retry, .timeout = 30)
{
	int what = 0;
	run_job("mm-count", 3, mismatch_rank, &what, 25);
}

Test(errors, mismatch_dtype_then_retry, .timeout = 30)
{
	int what = 1;
	run_job("mm-dtype", 3, mismatch_rank, &what, 25);
}

Test(errors, mismatch_both_then_retry, .timeout = 30)
{
	int what = 2;
	run_job("mm-both", 2, mismatch_rank, &what, 25);
}

/*
 * Rank 0's op decides a round: the last rank calls broadcast where the
 * others call pushpull.  It alone gets KV_ERR_MISMATCH; the round stays
 * open, and its pushpull completes it with the right sum.  late: the others
 * are waiting when it errs (refused at its arrival); early: it arrives
 * first and rank 0's arrival refuses it while it waits.
 */
static int op_mismatch_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	int early = *(int *)arg;
	kv_store *kv = open_rank(20000);
	float v[8] = { 0 }, out[8];

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "op", v, 8, KV_FLOAT32), KV_OK);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < 8; i++)
			v[i] = (float)((rank + 1) * 10 + i + round);
		if (rank == n - 1) {
			if (!early)
				usleep(200000);
			memset(out, 0, sizeof(out));
			CHECK_RC(kv_broadcast(kv, "op", v, out, 8, KV_FLOAT32, 0), KV_ERR_MISMATCH);
			CHECK(strstr(kv_last_error(kv), "rank 0"), "the detail names rank 0: %s",
			      kv_last_error(kv));
			for (int i = 0; i < 8; i++)
				CHECK(out[i] == 0, "the refused broadcast wrote its output");
		} else if (early) {
			usleep(200000); /* the last rank waits in its broadcast by now */
		}
		CHECK_RC(kv_pushpull(kv, "op", v, out, 8, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < 8; i++) {
			double want = 0;
			for (int r = 0; r < n; r++)
				want += (r + 1) * 10 + i + round;
			CHECK(out[i] == want, "round %d elem %d: got %g, want %g", round, i,
			      (double)out[i], want);
		}
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(errors, op_mismatch_rank0_decides_late, .timeout = 30)
{
	int early = 0;
	run_job("opmm-late", 2, op_mismatch_rank, &early, 25);
	run_job("opmm-late3", 3, op_mismatch_rank, &early, 25);
}

Test(errors, op_mismatch_rank0_decides_early, .timeout = 30)
{
	int early = 1;
	run_job("opmm-early", 2, op_mismatch_rank, &early, 25);
	run_job("opmm-early3", 3, op_mismatch_rank, &early, 25);
}

/*
 * Rank 0's init or broadcast fixes a key's count and dtype, even when
 * another rank gets there first with a wrong count: that rank waits for
 * rank 0, then gets KV_ERR_MISMATCH alone, and its corrected call works.
 */
static int first_rank1_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	size_t count = *(size_t *)arg, i;
	kv_store *kv = open_rank(20000);
	float *v = malloc(count * sizeof(float)), *out = malloc(count * sizeof(float));

	CHECK(kv && v && out, "open");
	for (i = 0; i < count; i++)
		v[i] = rank == 0 ? (float)(i % 1000) : -1.0f;
	if (rank == 0) {
		usleep(200000); /* the other ranks are waiting by now */
		CHECK_RC(kv_init(kv, "ic", v, count, KV_FLOAT32), KV_OK);
		CHECK_RC(kv_broadcast(kv, "bc", v, out, count, KV_FLOAT32, 0), KV_OK);
	} else {
		CHECK_RC(kv_init(kv, "ic", v, count / 2, KV_FLOAT32), KV_ERR_MISMATCH);
		CHECK(strstr(kv_last_error(kv), "holds"), "the detail says what the key holds: %s",
		      kv_last_error(kv));
		CHECK_RC(kv_init(kv, "ic", v, count, KV_FLOAT32), KV_OK);
		CHECK_RC(kv_broadcast(kv, "bc", NULL, out, count / 2, KV_FLOAT32, 0),
			 KV_ERR_MISMATCH);
		CHECK_RC(kv_broadcast(kv, "bc", NULL, out, count, KV_FLOAT32, 0), KV_OK);
	}
	for (i = 0; i < count; i++)
		CHECK(out[i] == (float)(i % 1000), "broadcast elem %zu: %g", i, (double)out[i]);
	CHECK_RC(kv_pull(kv, "ic", out, count, KV_FLOAT32, 0), KV_OK);
	for (i = 0; i < count; i++)
		CHECK(out[i] == (float)(i % 1000), "init elem %zu: %g", i, (double)out[i]);
	free(v);
	free(out);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(errors, rank0_fixes_a_key_made_first_elsewhere, .timeout = 40)
{
	size_t small = 8, big = 400000;
	run_job("first1-small", 2, first_rank1_rank, &small, 25);
	run_job("first1-big", 3, first_rank1_rank, &big, 25);
}

/* ---------------------------------------------------------------- no key */

static int nokey_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(5000);
	float v[4] = { 1, 2, 3, 4 }, out[4] = { -1, -1, -1, -1 };

	CHECK(kv, "open");
	CHECK_RC(kv_pushpull(kv, "nobody", v, out, 4, KV_FLOAT32, 0), KV_ERR_NOKEY);
	CHECK(has_detail(kv_last_error(kv)), "no detail after NOKEY");
	CHECK_RC(kv_pull(kv, "nobody", out, 4, KV_FLOAT32, 0), KV_ERR_NOKEY);
	CHECK_RC(kv_push(kv, "nobody", v, 4, KV_FLOAT32, 0), KV_ERR_NOKEY);
	CHECK(out[0] == -1 && out[3] == -1, "failed op wrote into out");
	/* a key this job did init works, and "nobody" still does not exist */
	CHECK_RC(kv_init(kv, "somebody", v, 4, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "somebody", v, out, 4, KV_FLOAT32, 0), KV_OK);
	CHECK(out[2] == 3.0f * n, "somebody: %g", (double)out[2]);
	CHECK_RC(kv_pull(kv, "nobody", out, 4, KV_FLOAT32, 0), KV_ERR_NOKEY);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(errors, nokey, .timeout = 30) { run_job("nokey", 2, nokey_rank, NULL, 25); }

/* ---------------------------------------------------------------- kv_create */

static void opts_for(struct kv_options *o, const char *sock, const char *job, int rank, int nw)
{
	kv_options_default(o);
	o->socket = sock;
	o->job = job;
	o->rank = rank;
	o->num_workers = nw;
	o->timeout_ms = 10000;
}

Test(errors, create_unknown_type, .timeout = 10)
{
	kv_store *kv = NULL;

	cr_assert_eq(kv_create("no-such-store", NULL, &kv), KV_ERR_INVALID);
	cr_assert(has_detail(kv_last_error(NULL)), "kv_last_error(NULL) empty");
	cr_assert_eq(kv_create("", NULL, &kv), KV_ERR_INVALID);
	cr_assert_eq(kv_create("local2", NULL, &kv), KV_ERR_INVALID);
}

static void create_unsupported(const char *type)
{
	struct kvd_proc k;
	struct kv_options o;
	kv_store *kv = NULL;
	int rc;

	if (access("/dev/nvidiactl", F_OK) == 0)
		cr_skip_test("this machine has a GPU");
	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	opts_for(&o, k.sock, "gpuless", 0, 1);
	rc = kv_create(type, &o, &kv);
	kvd_stop(&k);
	cr_assert_eq(rc, KV_ERR_UNSUPPORTED, "kv_create(\"%s\") = %d (%s)", type, rc,
		     kv_strerror(rc));
	cr_assert(has_detail(kv_last_error(NULL)), "kv_last_error(NULL) empty");
}

Test(errors, create_device_unsupported, .timeout = 20) { create_unsupported("device"); }
Test(errors, create_nccl_unsupported, .timeout = 20) { create_unsupported("nccl"); }

Test(errors, create_no_daemon, .timeout = 20)
{
	char dir[] = "/tmp/kvtest-nod.XXXXXX", path[108];
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct kv_options o;
	kv_store *kv = NULL;
	double t0, dt;
	int rc, fd;

	unsetenv("KVD_TIMEOUT_MS");
	cr_assert(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/kvd.sock", dir);

	/* no file at all */
	kv_options_default(&o);
	o.socket = path;
	o.job = "nod";
	o.rank = 0;
	o.num_workers = 1;
	t0 = now_s();
	rc = kv_create("local", &o, &kv);
	dt = now_s() - t0;
	cr_expect_eq(rc, KV_ERR_DAEMON, "no socket file: %d (%s)", rc, kv_strerror(rc));
	cr_expect_lt(dt, 2.0, "no socket file: took %.2f s", dt);
	cr_expect(has_detail(kv_last_error(NULL)), "kv_last_error(NULL) empty");

	/* a stale socket file that nobody listens on (a dead daemon's) */
	fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	cr_assert(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	close(fd);
	t0 = now_s();
	rc = kv_create("local", &o, &kv);
	dt = now_s() - t0;
	unlink(path);
	rmdir(dir);
	cr_expect_eq(rc, KV_ERR_DAEMON, "stale socket: %d (%s)", rc, kv_strerror(rc));
	cr_expect_lt(dt, 2.0, "stale socket: took %.2f s", dt);
}

Test(errors, invalid_job_names, .timeout = 30)
{
	struct kvd_proc k;
	struct kv_options o;
	kv_store *kv = NULL;
	char long129[130], long128[129];
	const char *bad[] = { "a/b", "", long129, "a b", "caf\xc3\xa9", "job\n", "a:b", "..\x01" };
	int rc[sizeof(bad) / sizeof(bad[0])], detail[sizeof(bad) / sizeof(bad[0])], ok;
	const size_t nbad = sizeof(bad) / sizeof(bad[0]);

	memset(long129, 'j', 129);
	long129[129] = 0;
	for (int i = 0; i < 128; i++)
		long128[i] = "aZ09._-"[i % 7];
	long128[128] = 0;
	cr_assert_eq(kvd_start(&k, NULL), 0, "kvd did not start");
	for (size_t i = 0; i < nbad; i++) {
		opts_for(&o, k.sock, bad[i], 0, 1);
		rc[i] = kv_create("local", &o, &kv);
		detail[i] = has_detail(kv_last_error(NULL));
		if (rc[i] == KV_OK)
			kv_close(kv);
	}
	/* 128 bytes of the allowed characters is a fine name */
	opts_for(&o, k.sock, long128, 0, 1);
	ok = kv_create("local", &o, &kv);
	if (ok == KV_OK) {
		float v[2] = { 1, 2 };
		ok = kv_init(kv, "x", v, 2, KV_FLOAT32);
		if (ok == KV_OK)
			ok = kv_pushpull(kv, "x", v, NULL, 2, KV_FLOAT32, 0);
		kv_close(kv);
	}
	kvd_stop(&k);
	for (size_t i = 0; i < nbad; i++) {
		cr_expect_eq(rc[i], KV_ERR_INVALID, "job name #%zu (\"%.20s\", %zu bytes): %d (%s)",
			     i, bad[i], strlen(bad[i]), rc[i], kv_strerror(rc[i]));
		cr_expect(detail[i], "job name #%zu: kv_last_error(NULL) empty", i);
	}
	cr_expect_eq(ok, KV_OK, "128-byte job name: %d (%s)", ok, kv_strerror(ok));
}

/* ---------------------------------------------------------------- refused hellos */

static int refused(const char *sock, const char *job, int rank, int nw, const char *what)
{
	struct kv_options o;
	kv_store *kv = NULL;
	int rc;

	opts_for(&o, sock, job, rank, nw);
	rc = kv_create("local", &o, &kv);
	CHECK(rc != KV_OK, "%s: hello (rank %d of %d) was accepted", what, rank, nw);
	CHECK(rc < 0, "%s: kv_create returned %d, not a KV_ERR_* code", what, rc);
	CHECK(has_detail(kv_last_error(NULL)), "%s: kv_last_error(NULL) empty", what);
	return 0;
}

static int hello_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const char *job = getenv("KVD_JOB");
	kv_store *kv;
	float v[5];

	if (rank == 1)
		usleep(500000); /* rank 0 tries the bad hellos before rank 1 joins */
	kv = open_rank(20000);
	CHECK(kv, "open");
	if (rank == 0) {
		if (refused(k->sock, job, 1, n + 1, "other num_workers") ||
		    refused(k->sock, job, n, n, "rank == num_workers") ||
		    refused(k->sock, job, 7, n, "rank out of range") ||
		    refused(k->sock, job, -2, n, "negative rank") ||
		    refused(k->sock, job, 0, n, "rank taken"))
			return 1;
	}
	/* the job is intact: both real ranks sum */
	for (int i = 0; i < 5; i++)
		v[i] = (float)(rank * 5 + i);
	CHECK_RC(kv_init(kv, "h", v, 5, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "h", v, NULL, 5, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 5; i++)
		CHECK(v[i] == (float)(5 + 2 * i), "elem %d: %g", i, (double)v[i]);
	CHECK(kv_rank(kv) == rank && kv_num_workers(kv) == n, "rank %d/%d", kv_rank(kv),
	      kv_num_workers(kv));
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

Test(errors, hello_refused, .timeout = 30) { run_job("hello", 2, hello_rank, NULL, 25); }
