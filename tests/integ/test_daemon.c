/* SPDX-License-Identifier: MIT */
/*
 * test_daemon.c - kvd stopping cleanly under ranks, and one store shared by
 * several threads of a rank.
 */
#include <criterion/criterion.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

/* A store of job on kvd at sock, as rank of nw, waiting at most 5 s. */
static int create_in(const char *sock, const char *job, int rank, int nw, kv_store **kv)
{
	struct kv_options o;

	kv_options_default(&o);
	o.socket = sock;
	o.job = job;
	o.rank = rank;
	o.num_workers = nw;
	o.timeout_ms = 5000;
	return kv_create("local", &o, kv);
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* rank 0 waits in a round rank 1 never joins; rank 1 signals kvd to stop */
static int sigterm_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(10000);
	float v[64] = { 0 };

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "w", v, 64, KV_FLOAT32), KV_OK);
	if (rank == 1) {
		usleep(200000);
		kill(k->pid, SIGTERM);
		usleep(500000);
		return 0;
	}
	double t0 = now_s();
	int rc = kv_pushpull(kv, "w", v, NULL, 64, KV_FLOAT32, 0);
	CHECK(rc == KV_ERR_DAEMON, "pending pushpull returned %d (%s), want KV_ERR_DAEMON", rc,
	      kv_last_error(kv));
	CHECK(now_s() - t0 < 3, "it took %.1f s", now_s() - t0);
	CHECK(strlen(kv_last_error(kv)) > 0, "a sentence");
	rc = kv_pushpull(kv, "w", v, NULL, 64, KV_FLOAT32, 0);
	CHECK(rc == KV_ERR_DAEMON, "a later op: %d", rc);
	kv_close(kv);
	return 0;
}

Test(daemon, sigterm_fails_pending_ops_and_exits_0, .timeout = 30)
{
	struct kvd_proc k;
	char why[256];

	cr_assert_eq(kvd_start(&k, NULL), 0);
	int rc = run_ranks(&k, "term", 2, sigterm_rank, NULL, 20, why, sizeof(why));
	cr_assert_eq(rc, 0, "%s", why);
	/* kvd already exited on its own after SIGTERM: reap it and check how */
	kvd_stop(&k);
}

struct thr {
	kv_store *kv;
	int rank, n, t;
	int bad;
};

#define THREADS 4
#define ROUNDS 50
#define COUNT 3000

static void *thread_main(void *arg)
{
	struct thr *th = arg;
	char key[16];
	int32_t *v = malloc(COUNT * sizeof(int32_t));

	snprintf(key, sizeof(key), "t%d", th->t);
	for (int r = 0; r < ROUNDS && !th->bad; r++) {
		for (int i = 0; i < COUNT; i++)
			v[i] = (th->rank + 1) * 1000 + th->t * 100 + r + i;
		if (kv_pushpull(th->kv, key, v, NULL, COUNT, KV_INT32, 0) != KV_OK) {
			th->bad = 1;
			break;
		}
		for (int i = 0; i < COUNT; i++) {
			int64_t want = 0;
			for (int q = 0; q < th->n; q++)
				want += (q + 1) * 1000 + th->t * 100 + r + i;
			if (v[i] != (int32_t)want) {
				th->bad = 2;
				break;
			}
		}
	}
	free(v);
	return NULL;
}

static int threads_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	kv_store *kv = open_rank(20000);
	pthread_t tid[THREADS];
	struct thr th[THREADS];
	int32_t zero[COUNT] = { 0 };

	CHECK(kv, "open");
	for (int t = 0; t < THREADS; t++) {
		char key[16];
		snprintf(key, sizeof(key), "t%d", t);
		CHECK_RC(kv_init(kv, key, zero, COUNT, KV_INT32), KV_OK);
	}
	for (int t = 0; t < THREADS; t++) {
		th[t] = (struct thr){ kv, rank, n, t, 0 };
		pthread_create(&tid[t], NULL, thread_main, &th[t]);
	}
	for (int t = 0; t < THREADS; t++) {
		pthread_join(tid[t], NULL);
		CHECK(th[t].bad == 0, "thread %d: %s (%s)", t,
		      th[t].bad == 1 ? "an op failed" : "a wrong sum", kv_last_error(kv));
	}
	kv_close(kv);
	return 0;
}

Test(daemon, one_store_shared_by_threads, .timeout = 60)
{
	struct kvd_proc k;
	char why[256];

	cr_assert_eq(kvd_start(&k, NULL), 0);
	int rc = run_ranks(&k, "threads", 2, threads_rank, NULL, 50, why, sizeof(why));
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
}

/* --max-uid-bytes counts every job of a uid together */
static int uid_limit_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const char *job = getenv("KVD_JOB");
	size_t count = (16u << 20) / 4;
	float *v = calloc(count, sizeof(float));
	kv_store *kv = open_rank(10000);

	CHECK(kv && v, "open");
	if (strcmp(job, "uid-a") == 0) {
		CHECK_RC(kv_init(kv, "a1", v, count, KV_FLOAT32), KV_OK);
		usleep(600000); /* job b runs meanwhile */
	} else {
		usleep(200000);
		CHECK_RC(kv_init(kv, "b1", v, count, KV_FLOAT32), KV_OK);
		int rc = kv_init(kv, "b2", v, count, KV_FLOAT32);
		CHECK(rc == KV_ERR_NOMEM, "third 16 MiB key of the uid: %d, want KV_ERR_NOMEM", rc);
		CHECK(strstr(kv_last_error(kv), "--max-uid-bytes"), "the limit is named: %s",
		      kv_last_error(kv));
		/* a small key still fits */
		CHECK_RC(kv_init(kv, "b3", v, 1000, KV_FLOAT32), KV_OK);
	}
	kv_close(kv);
	free(v);
	return 0;
}

Test(daemon, max_uid_bytes_counts_all_jobs_of_a_uid, .timeout = 60)
{
	/* job a: a 16 MiB key's value block (two copies: 32 MiB and its part
	 * records) + 16 MiB of staging; job b the same, 96 MiB in all; a third
	 * 16 MiB key would make 128; a small key's 8 MiB direct segment makes 104 */
	static const char *const args[] = { "--max-uid-bytes", "110M", NULL };
	struct kvd_proc k;
	char why[256];
	pid_t p;
	int st;

	cr_assert_eq(kvd_start(&k, args), 0);
	p = fork();
	if (p == 0)
		_exit(run_ranks(&k, "uid-a", 1, uid_limit_rank, NULL, 30, why, sizeof(why)) ? 1 : 0);
	int rc = run_ranks(&k, "uid-b", 1, uid_limit_rank, NULL, 30, why, sizeof(why));
	waitpid(p, &st, 0);
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "job a failed");
}

/*
 * A healthy 2-rank job that keeps running rounds while the test exhausts
 * kvd's fds.  Rank 0 alone reads the stop flag and sends it in the last
 * element, so both ranks stop after the same round.
 */
static int steady_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	volatile uint32_t *stop = arg;
	kv_store *kv = open_rank(10000);
	int32_t v[64];
	int rounds = 0, done = 0;

	CHECK(kv, "open");
	memset(v, 0, sizeof(v));
	CHECK_RC(kv_init(kv, "steady", v, 64, KV_INT32), KV_OK);
	while (!done) {
		for (int i = 0; i < 63; i++)
			v[i] = rank + i + rounds;
		v[63] = rank == 0 && rounds >= 20 && __atomic_load_n(stop, __ATOMIC_SEQ_CST);
		CHECK_RC(kv_pushpull(kv, "steady", v, NULL, 64, KV_INT32, 0), KV_OK);
		for (int i = 0; i < 63; i++)
			CHECK(v[i] == 2 * (i + rounds) + 1, "round %d: %d", rounds, v[i]);
		CHECK(v[63] == 0 || v[63] == 1, "round %d: stop flag %d", rounds, v[63]);
		done = v[63];
		rounds++;
		usleep(2000);
	}
	kv_close(kv);
	return 0;
}

Test(daemon, fd_limit_refuses_new_clients_and_serves_the_rest, .timeout = 60)
{
	struct kvd_proc k;
	char kvd[512], why[256];
	uint32_t *stop = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	kv_store *extra[64] = { 0 };
	int nextra = 0, refused = 0, st;
	pid_t job;

	/* kvd with room for a few dozen descriptors */
	memset(&k, 0, sizeof(k));
	snprintf(k.dir, sizeof(k.dir), "/tmp/kvtest.XXXXXX");
	cr_assert_not_null(mkdtemp(k.dir));
	snprintf(k.sock, sizeof(k.sock), "%s/kvd.sock", k.dir);
	snprintf(k.log, sizeof(k.log), "%s/kvd.log", k.dir);
	bin_path("kvd", kvd, sizeof(kvd));
	k.pid = fork();
	if (k.pid == 0) {
		struct rlimit rl = { 48, 48 };
		int fd = open(k.log, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		prctl(PR_SET_PDEATHSIG, SIGKILL); /* no stray kvd when the test fails */
		dup2(fd, 2);
		setrlimit(RLIMIT_NOFILE, &rl);
		execl(kvd, kvd, "--socket", k.sock, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 300 && access(k.sock, F_OK); i++)
		usleep(10000);
	usleep(100000);
	job = fork();
	if (job == 0)
		_exit(run_ranks(&k, "steady", 2, steady_rank, stop, 40, why, sizeof(why)) ? 1 : 0);
	usleep(300000);
	/* more and more clients, each holding a few of kvd's descriptors */
	for (int i = 0; i < 64 && !refused; i++) {
		char name[32];
		struct timespec t0, t1;

		snprintf(name, sizeof(name), "filler-%d", i);
		clock_gettime(CLOCK_MONOTONIC, &t0);
		int rc = create_in(k.sock, name, 0, 1, &extra[nextra]);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (rc == KV_OK) {
			float x[16] = { 0 };
			/* a key: a segment, one more descriptor */
			rc = kv_init(extra[nextra], "k", x, 16, KV_FLOAT32);
			nextra++;
			if (rc == KV_OK)
				continue;
			cr_assert_eq(rc, KV_ERR_NOMEM, "init at the limit: %d (%s)", rc,
				     kv_last_error(extra[nextra - 1]));
			refused = 1;
			continue;
		}
		cr_assert_eq(rc, KV_ERR_NOMEM, "kv_create at the limit: %d (%s)", rc,
			     kv_last_error(NULL));
		cr_assert(strstr(kv_last_error(NULL), "descriptors") ||
			  strstr(kv_last_error(NULL), "Too many open files"),
			  "the sentence names the limit: %s", kv_last_error(NULL));
		cr_assert_lt(t1.tv_sec - t0.tv_sec, 3, "refused at once, not after a wait");
		refused = 1;
	}
	cr_assert(refused, "kvd never ran out with %d clients", nextra);
	/* the healthy job kept going; after the fillers leave, kvd serves new clients */
	for (int i = 0; i < nextra; i++)
		kv_close(extra[i]);
	__atomic_store_n(stop, 1, __ATOMIC_SEQ_CST);
	cr_assert_eq(waitpid(job, &st, 0), job);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the healthy job failed");
	usleep(200000);
	kv_store *late;
	cr_assert_eq(create_in(k.sock, "late", 0, 1, &late), KV_OK, "%s", kv_last_error(NULL));
	kv_close(late);
	munmap(stop, 4096);
	kvd_stop(&k);
}

/*
 * --allow-group GID: a member of GID may join another user's job, whether
 * GID is its primary group or a supplementary one (usermod -aG); a process
 * of the same uid outside the group is refused.  Children drop to uid 65534.
 */
#define ALLOW_GID 4242
#define NOBODY_ID 65534

static int join_as_nobody(const struct kvd_proc *k, const gid_t *groups, int ngroups,
			  gid_t gid)
{
	pid_t p = fork();
	int st;

	if (p == 0) {
		kv_store *kv = NULL;
		int rc;

		if (setgroups((size_t)ngroups, groups) || setgid(gid) || setuid(NOBODY_ID))
			_exit(100);
		/* the rank the previous child held is free once kvd saw it close */
		for (int i = 0; (rc = create_in(k->sock, "grpjob", 1, 2, &kv)) == KV_ERR_EXISTS &&
				i < 200;
		     i++)
			usleep(10000);
		if (kv)
			kv_close(kv);
		_exit(rc == KV_OK ? 0 : rc == KV_ERR_PERM ? 3 : 101);
	}
	if (p < 0 || waitpid(p, &st, 0) != p)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

Test(daemon, allow_group_counts_supplementary_groups, .timeout = 30)
{
	static const char *const args[] = { "--allow-group", "4242", NULL };
	const gid_t supp[] = { ALLOW_GID };
	struct kvd_proc k;
	kv_store *kv = NULL;

	if (geteuid() != 0)
		cr_skip_test("needs root to act as another user");
	cr_assert_eq(kvd_start(&k, args), 0);
	cr_assert_eq(chmod(k.dir, 0755), 0);
	cr_assert_eq(create_in(k.sock, "grpjob", 0, 2, &kv), KV_OK, "root's rank 0");
	int no_group = join_as_nobody(&k, NULL, 0, NOBODY_ID);
	int primary = join_as_nobody(&k, NULL, 0, ALLOW_GID);
	int supplementary = join_as_nobody(&k, supp, 1, NOBODY_ID);
	kv_close(kv);
	kvd_stop(&k);
	cr_assert_eq(no_group, 3, "outside the group: exit %d, want 3 (KV_ERR_PERM)", no_group);
	cr_assert_eq(primary, 0, "GID as the primary group: exit %d, want 0", primary);
	cr_assert_eq(supplementary, 0, "GID as a supplementary group: exit %d, want 0",
		     supplementary);
}

/* --hello-timeout: a connection that says nothing is closed after it; a rank
 * that joined is never timed out, however quiet. */
Test(daemon, silent_connection_is_closed_after_hello_timeout, .timeout = 30)
{
	static const char *const args[] = { "--hello-timeout", "1", NULL };
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct kvd_proc k;
	kv_store *kv = NULL;
	float v[4] = { 1, 2, 3, 4 };
	char c;
	int fd;

	cr_assert_eq(kvd_start(&k, args), 0);
	cr_assert_eq(create_in(k.sock, "quiet", 0, 1, &kv), KV_OK);
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", k.sock);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	cr_assert(fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	double t0 = now_s();
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int ready = poll(&p, 1, 5000);
	double dt = now_s() - t0;
	ssize_t got = ready == 1 ? recv(fd, &c, 1, MSG_DONTWAIT) : -1;
	close(fd);
	/* the joined rank, quiet just as long, still works */
	int rc1 = kv_init(kv, "w", v, 4, KV_FLOAT32);
	int rc2 = kv_pushpull(kv, "w", v, NULL, 4, KV_FLOAT32, 0);
	kv_close(kv);
	kvd_stop(&k);
	cr_assert(ready == 1 && got == 0, "the silent connection was not closed (poll %d, recv %zd)",
		  ready, got);
	cr_assert(dt > 0.8 && dt < 3.0, "closed after %.2f s, want about 1 s", dt);
	cr_assert_eq(rc1, KV_OK);
	cr_assert_eq(rc2, KV_OK);
	cr_assert(v[0] == 1 && v[3] == 4, "a one-rank sum is the value itself");
}
