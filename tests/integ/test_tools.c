/* SPDX-License-Identifier: MIT */
/*
 * test_tools.c - kvrun and kvctl as a user runs them: environment of the
 * ranks, the private kvd, exit statuses, signal forwarding, status output.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

/* Run a shell command line; returns its exit status (128+N for signal N). */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	st = system(cmd);
	if (st == -1)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char *slurp(const char *path)
{
	static char buf[65536];
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f)
		return NULL;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

Test(kvrun, sets_the_environment_of_each_rank, .timeout = 30)
{
	char kvrun[512], out[] = "/tmp/kvrun-env.XXXXXX";
	struct kvd_proc k;
	int fd = mkstemp(out);

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	bin_path("kvrun", kvrun, sizeof(kvrun));
	cr_assert_eq(sh("%s -n 3 --socket %s --job envjob -- sh -c "
			"'echo \"$KVD_RANK $KVD_NUM_WORKERS $KVD_JOB $KVD_SOCKET\" >> %s'",
			kvrun, k.sock, out),
		     0);
	char *text = slurp(out);
	cr_assert_not_null(text);
	for (int r = 0; r < 3; r++) {
		char want[256];
		snprintf(want, sizeof(want), "%d 3 envjob %s\n", r, k.sock);
		cr_assert_not_null(strstr(text, want), "rank %d's line missing from:\n%s", r, text);
	}
	unlink(out);
	kvd_stop(&k);
}

Test(kvrun, starts_a_private_kvd_and_stops_it, .timeout = 60)
{
	char kvrun[512], demo[512], dir[] = "/tmp/kvrun-priv.XXXXXX", sock[128];
	const char *bindir = getenv("KVD_BIN_DIR");

	cr_assert_not_null(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/private.sock", dir);
	bin_path("kvrun", kvrun, sizeof(kvrun));
	snprintf(demo, sizeof(demo), "%s/../examples/train_linreg", bindir ? bindir : "build/bin");
	/* nothing answers on sock: kvrun starts kvd there, the job trains, kvd stops */
	cr_assert_eq(sh("%s -q -n 2 --socket %s -- %s --epochs 3 > /dev/null", kvrun, sock, demo),
		     0);
	struct stat st;
	cr_assert_neq(stat(sock, &st), 0, "the private kvd removed its socket when it stopped");
	/* with no --socket and no $KVD_SOCKET kvd, it picks a temporary socket */
	cr_assert_eq(sh("KVD_SOCKET=%s/none.sock %s -q -n 2 -- %s --epochs 2 > /dev/null", dir,
			kvrun, demo),
		     0);
	rmdir(dir);
}

Test(kvrun, a_failing_rank_stops_the_others, .timeout = 60)
{
	char kvrun[512];
	struct kvd_proc k;
	struct timespec t0, t1;

	cr_assert_eq(kvd_start(&k, NULL), 0);
	bin_path("kvrun", kvrun, sizeof(kvrun));
	clock_gettime(CLOCK_MONOTONIC, &t0);
	/* rank 1 exits 7 at once; the others would sleep for a minute */
	int rc = sh("%s -q -n 3 --socket %s --grace-ms 500 -- sh -c "
		    "'if [ $KVD_RANK = 1 ]; then exit 7; fi; exec sleep 60' 2>/dev/null",
		    kvrun, k.sock);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	cr_assert_eq(rc, 7, "kvrun exits with the failed rank's status (got %d)", rc);
	cr_assert_lt(t1.tv_sec - t0.tv_sec, 10, "the sleeping ranks were stopped");
	/* a rank killed by a signal: 128 + the signal */
	rc = sh("%s -q -n 2 --socket %s -- sh -c "
		"'if [ $KVD_RANK = 0 ]; then kill -9 $$; fi; exec sleep 60' 2>/dev/null",
		kvrun, k.sock);
	cr_assert_eq(rc, 128 + 9, "got %d", rc);
	/* all good: 0 */
	cr_assert_eq(sh("%s -q -n 4 --socket %s -- true", kvrun, k.sock), 0);
	kvd_stop(&k);
}

Test(kvrun, forwards_sigterm_to_the_ranks, .timeout = 30)
{
	char kvrun[512], marker[] = "/tmp/kvrun-sig.XXXXXX";
	struct kvd_proc k;
	pid_t pid;
	int st, fd = mkstemp(marker);

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	bin_path("kvrun", kvrun, sizeof(kvrun));
	pid = fork();
	if (pid == 0) {
		char cmd[600];
		snprintf(cmd, sizeof(cmd),
			 "trap 'echo got-term-$KVD_RANK >> %s; exit 0' TERM; "
			 "echo up-$KVD_RANK >> %s; while :; do sleep 0.05; done",
			 marker, marker);
		execl(kvrun, kvrun, "-q", "-n", "2", "--socket", k.sock, "--", "sh", "-c", cmd,
		      (char *)NULL);
		_exit(127);
	}
	/* wait until both ranks are up, then signal kvrun alone */
	for (int i = 0; i < 200; i++) {
		char *t = slurp(marker);
		if (t && strstr(t, "up-0") && strstr(t, "up-1"))
			break;
		usleep(20000);
	}
	kill(pid, SIGTERM);
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	char *t = slurp(marker);
	cr_assert(t && strstr(t, "got-term-0") && strstr(t, "got-term-1"),
		  "both ranks saw SIGTERM:\n%s", t ? t : "");
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 128 + SIGTERM,
		  "kvrun reports the signal (status %d)", WEXITSTATUS(st));
	unlink(marker);
	kvd_stop(&k);
}

Test(kvrun, usage_errors, .timeout = 30)
{
	char kvrun[512];

	bin_path("kvrun", kvrun, sizeof(kvrun));
	cr_assert_eq(sh("%s -- true 2>/dev/null", kvrun), 2, "-n is required");
	cr_assert_eq(sh("%s -n 0 -- true 2>/dev/null", kvrun), 2);
	cr_assert_eq(sh("%s -n 2 2>/dev/null", kvrun), 2, "a command is required");
	cr_assert_eq(sh("%s --help > /dev/null", kvrun), 0);
	cr_assert_eq(sh("%s -n 1 --job 'bad name' -- true 2>/dev/null", kvrun), 2,
		     "an invalid job name is a bad command line");
	cr_assert_eq(sh("%s -n 1 --kvd-log /nonexistent/dir/log -- true 2>/dev/null", kvrun), 1,
		     "a log file that cannot be opened is an error");
}

Test(kvctl, status_json_and_metrics, .timeout = 60)
{
	char kvrun[512], kvctl[512], demo[512], out[] = "/tmp/kvctl-out.XXXXXX";
	const char *bindir = getenv("KVD_BIN_DIR");
	struct kvd_proc k;
	int fd = mkstemp(out);

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	bin_path("kvrun", kvrun, sizeof(kvrun));
	bin_path("kvctl", kvctl, sizeof(kvctl));
	snprintf(demo, sizeof(demo), "%s/../examples/train_linreg", bindir ? bindir : "build/bin");
	cr_assert_eq(sh("%s -q -n 2 --socket %s -- %s --epochs 2 > /dev/null", kvrun, k.sock,
			demo),
		     0);
	cr_assert_eq(sh("%s --socket %s status --json > %s", kvctl, k.sock, out), 0);
	cr_assert_eq(sh("python3 -m json.tool %s > /dev/null", out), 0, "status --json parses");
	cr_assert_eq(sh("%s --socket %s metrics > %s", kvctl, k.sock, out), 0);
	char *m = slurp(out);
	cr_assert_not_null(strstr(m, "# TYPE kvd_uptime_seconds gauge"));
	cr_assert_eq(sh("%s --socket %s status > /dev/null", kvctl, k.sock), 0);
	cr_assert_eq(sh("%s --socket %s jobs > /dev/null", kvctl, k.sock), 0);
	cr_assert_eq(sh("%s --socket %s drop nosuchjob 2>/dev/null", kvctl, k.sock), 4,
		     "an unknown job exits 4");
	cr_assert_eq(sh("%s --socket %s/none status 2>%s", kvctl, k.dir, out), 1);
	cr_assert_not_null(strstr(slurp(out), "no kvd answering on"), "%s", slurp(out));
	cr_assert_eq(sh("%s --socket %s bogus 2>/dev/null", kvctl, k.sock), 2);
	/* intervals that are not a number of seconds in range are refused */
	static const char *const bad_watch[] = { "0", "inf", "nan", "1e400", "4295000", "x", "" };
	for (size_t i = 0; i < sizeof(bad_watch) / sizeof(bad_watch[0]); i++)
		cr_assert_eq(sh("%s --socket %s watch '%s' 2>/dev/null", kvctl, k.sock,
				bad_watch[i]),
			     2, "watch '%s'", bad_watch[i]);
	cr_assert_eq(sh("%s --socket %s metrics --json 2>/dev/null", kvctl, k.sock), 2,
		     "--json goes with status only");
	cr_assert_eq(sh("%s --socket %s --json jobs 2>/dev/null", kvctl, k.sock), 2);
	unlink(out);
	kvd_stop(&k);
}

Test(kvbench, usage_errors_name_the_option, .timeout = 30)
{
	char kvbench[512], out[] = "/tmp/kvbench-err.XXXXXX";
	int fd = mkstemp(out);
	static const struct {
		const char *args, *want;
	} cases[] = {
		{ "-n 0", "bad value '0' for --ranks" },
		{ "--op foo", "bad value 'foo' for --op" },
		{ "--iters -1", "bad value '-1' for --iters" },
		{ "--async 0 --sizes 4K", "bad value '0' for --async" },
		{ "--sizes ''", "bad size ''" },
		{ "--sizes 4K,,8K", "bad size ''" },
		{ "--sizes 4Q", "bad size '4Q'" },
		{ "extra", "unexpected argument 'extra'" },
	};

	cr_assert_geq(fd, 0);
	close(fd);
	bin_path("kvbench", kvbench, sizeof(kvbench));
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cr_assert_eq(sh("%s %s 2>%s", kvbench, cases[i].args, out), 2, "%s",
			     cases[i].args);
		cr_assert_not_null(strstr(slurp(out), cases[i].want), "kvbench %s: %s",
				   cases[i].args, slurp(out));
	}
	unlink(out);
}

Test(kvd, refuses_a_second_daemon_and_removes_a_stale_socket, .timeout = 30)
{
	char kvd[512];
	struct kvd_proc k;

	cr_assert_eq(kvd_start(&k, NULL), 0);
	bin_path("kvd", kvd, sizeof(kvd));
	cr_assert_eq(sh("%s --socket %s 2>/dev/null", kvd, k.sock), 1,
		     "a second kvd on a live socket refuses to start");
	kvd_stop(&k);
	/* a socket file nobody listens on is stale: a new kvd takes its place,
	 * also right after kill -9 (when the dead kvd's io_uring may still hold
	 * the old socket open for a moment) */
	struct kvd_proc k2;
	cr_assert_eq(kvd_start(&k2, NULL), 0);
	kill(k2.pid, SIGKILL);
	waitpid(k2.pid, NULL, 0);
	struct stat st;
	cr_assert_eq(stat(k2.sock, &st), 0, "the killed kvd left its socket file");
	pid_t p = fork();
	if (p == 0) {
		int fd = open("/dev/null", O_WRONLY);
		dup2(fd, 2);
		execl(kvd, kvd, "--socket", k2.sock, (char *)NULL);
		_exit(127);
	}
	int ok = 0;
	for (int i = 0; i < 200 && !ok; i++) {
		usleep(10000);
		ok = sh("%s/../bin/kvctl --socket %s status > /dev/null 2>&1",
			getenv("KVD_BIN_DIR") ? getenv("KVD_BIN_DIR") : "build/bin", k2.sock) == 0;
	}
	kill(p, SIGTERM);
	waitpid(p, NULL, 0);
	k2.pid = 0;
	cr_assert(ok, "kvd started over a stale socket file");
	/* anything else at the path is not kvd's to remove */
	char file[600], lnk[600];
	snprintf(file, sizeof(file), "%s/precious", k2.dir);
	snprintf(lnk, sizeof(lnk), "%s/link", k2.dir);
	cr_assert_eq(sh("echo precious > %s && ln -s %s %s", file, file, lnk), 0);
	cr_assert_eq(sh("%s --socket %s 2>/dev/null", kvd, file), 1, "a regular file is refused");
	cr_assert_eq(sh("%s --socket %s 2>/dev/null", kvd, lnk), 1, "a symbolic link is refused");
	cr_assert_eq(sh("grep -qx precious %s && test -L %s", file, lnk), 0,
		     "the file and the link are untouched");
	unlink(lnk);
	unlink(file);
	kvd_stop(&k2);
	cr_assert_eq(sh("%s --bogus 2>/dev/null", kvd), 2);
	cr_assert_eq(sh("%s --help > /dev/null", kvd), 0);
}

/* rank 0 waits in two rounds (a direct key and an engine key); rank 1 looks
 * at kvctl status before it joins them */
static int stalled_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	const char *out = arg;
	kv_store *kv = open_rank(20000);
	size_t big = 400000;
	float *a = calloc(big, sizeof(float)), *b = calloc(big, sizeof(float));
	kv_ticket t1, t2;

	CHECK(kv && a && b, "open");
	CHECK_RC(kv_init(kv, "small\xff", a, 100, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_init(kv, "big", b, big, KV_FLOAT32), KV_OK);
	if (rank == 1) {
		char cmd[1024], kvctl[512];
		usleep(1700000);
		bin_path("kvctl", kvctl, sizeof(kvctl));
		snprintf(cmd, sizeof(cmd), "%s --socket %s status --json > %s 2>&1", kvctl,
			 k->sock, out);
		CHECK(system(cmd) == 0, "kvctl status --json");
		snprintf(cmd, sizeof(cmd), "%s --socket %s status > %s.txt 2>&1", kvctl, k->sock,
			 out);
		CHECK(system(cmd) == 0, "kvctl status");
	}
	CHECK_RC(kv_pushpull_async(kv, "small\xff", a, NULL, 100, KV_FLOAT32, 0, &t1), KV_OK);
	CHECK_RC(kv_pushpull_async(kv, "big", b, NULL, big, KV_FLOAT32, 0, &t2), KV_OK);
	CHECK_RC(kv_wait(kv, t1), KV_OK);
	CHECK_RC(kv_wait(kv, t2), KV_OK);
	kv_close(kv);
	free(a);
	free(b);
	return 0;
}

Test(kvctl, stalled_rounds_name_the_missing_rank, .timeout = 60)
{
	struct kvd_proc k;
	char why[256], out[] = "/tmp/kvctl-stall.XXXXXX", txt[64];
	int fd = mkstemp(out);

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	int rc = run_ranks(&k, "stall", 2, stalled_rank, out, 30, why, sizeof(why));
	kvd_stop(&k);
	cr_assert_eq(rc, 0, "%s", why);
	/* a real JSON parser reads it (strictly UTF-8: the key name is not, its
	 * byte 0xff comes as U+00FF); both keys wait for rank 1 */
	cr_assert_eq(sh("python3 -c 'import json,sys; "
			"s=json.loads(open(\"%s\", \"rb\").read().decode(\"utf-8\")); "
			"st={x[\"key\"]: x for x in s[\"jobs\"][0][\"stalled\"]}; "
			"assert set(st) == {\"small\\u00ff\", \"big\"}, st; "
			"assert all(x[\"waiting_for\"] == [1] and x[\"seconds\"] >= 1 "
			"for x in st.values()), st'",
			out),
		     0, "%s", slurp(out));
	snprintf(txt, sizeof(txt), "%s.txt", out);
	cr_assert_not_null(strstr(slurp(txt), "STALLED key 'big'"), "%s", slurp(txt));
	unlink(out);
	unlink(txt);
}

Test(kvrun, demo_trains_with_the_optimizer_in_the_store, .timeout = 60)
{
	char kvrun[512], demo[512], out[] = "/tmp/kvrun-demo.XXXXXX";
	const char *bindir = getenv("KVD_BIN_DIR");
	int fd = mkstemp(out);

	cr_assert_geq(fd, 0);
	close(fd);
	bin_path("kvrun", kvrun, sizeof(kvrun));
	snprintf(demo, sizeof(demo), "%s/../examples/train_linreg", bindir ? bindir : "build/bin");
	/* exit 0 means: the loss went down and every rank holds rank 0's weights */
	cr_assert_eq(sh("%s -q -n 3 -- %s --update-on-store --epochs 10 > %s", kvrun, demo, out),
		     0, "%s", slurp(out));
	cr_assert_not_null(strstr(slurp(out), "every rank holds identical weights"));
	unlink(out);
}

/*
 * Two jobs of 2 and 3 ranks run a known number of rounds, then wait on a
 * round that cannot complete while the test reads kvctl: the JSON holds both
 * jobs, their ranks (with pids), keys and rounds; the metrics pass a strict
 * format check; kvctl drop fails the waiting job's ops with KV_ERR_PEER.
 */
struct twojobs {
	int rounds;
	uint32_t *ready; /* shared: ranks done with their rounds */
};

static int twojobs_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct twojobs *t = arg;
	kv_store *kv = open_rank(30000);
	float v[8] = { 0 }, big[1] = { 0 };

	CHECK(kv, "open");
	CHECK_RC(kv_init(kv, "a", v, 8, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_init(kv, "b", v, 8, KV_FLOAT32), KV_OK);
	for (int r = 0; r < t->rounds; r++) {
		CHECK_RC(kv_pushpull(kv, "a", v, NULL, 8, KV_FLOAT32, 0), KV_OK);
		CHECK_RC(kv_pushpull(kv, "b", v, NULL, 8, KV_FLOAT32, 0), KV_OK);
	}
	__atomic_add_fetch(t->ready, 1, __ATOMIC_SEQ_CST);
	if (rank == 0) {
		/* waits until the test drops the job */
		CHECK_RC(kv_init(kv, "hold", big, 1, KV_FLOAT32), KV_OK);
		int rc = kv_pushpull(kv, "hold", big, NULL, 1, KV_FLOAT32, 0);
		if (n == 3)
			CHECK(rc == KV_ERR_PEER, "dropped job: pushpull returned %d, want PEER", rc);
	} else {
		CHECK_RC(kv_init(kv, "hold", big, 1, KV_FLOAT32), KV_OK);
		/* stay joined until the test is done looking */
		while (__atomic_load_n(t->ready, __ATOMIC_SEQ_CST) < 1000)
			usleep(10000);
	}
	kv_close(kv);
	return 0;
}

static pid_t fork_job(const struct kvd_proc *k, const char *job, int n, struct twojobs *t)
{
	pid_t p = fork();

	if (p == 0) {
		char why[256];
		_exit(run_ranks(k, job, n, twojobs_rank, t, 60, why, sizeof(why)) ? 1 : 0);
	}
	return p;
}

Test(kvctl, two_jobs_json_metrics_and_drop, .timeout = 90)
{
	char kvctl[512], out[] = "/tmp/kvctl-2j.XXXXXX";
	struct kvd_proc k;
	uint32_t *ready = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct twojobs t2 = { 7, ready }, t3 = { 5, ready };
	int fd = mkstemp(out), st2, st3;

	cr_assert_geq(fd, 0);
	close(fd);
	cr_assert_eq(kvd_start(&k, NULL), 0);
	bin_path("kvctl", kvctl, sizeof(kvctl));
	pid_t p2 = fork_job(&k, "job-two", 2, &t2), p3 = fork_job(&k, "job-three", 3, &t3);
	for (int i = 0; i < 1000 && __atomic_load_n(ready, __ATOMIC_SEQ_CST) < 5; i++)
		usleep(10000);
	cr_assert_eq(*ready, 5, "all 5 ranks ran their rounds");
	usleep(200000);
	cr_assert_eq(sh("%s --socket %s status --json > %s", kvctl, k.sock, out), 0);
	cr_assert_eq(sh("python3 - %s <<'PY'\n"
			"import json, sys\n"
			"s = json.load(open(sys.argv[1]))\n"
			"jobs = {j['name']: j for j in s['jobs']}\n"
			"assert set(jobs) == {'job-two', 'job-three'}, jobs.keys()\n"
			"for name, n, rounds in (('job-two', 2, 7), ('job-three', 3, 5)):\n"
			"    j = jobs[name]\n"
			"    assert j['num_workers'] == n and j['uid'] == 0, j\n"
			"    assert sorted(r['rank'] for r in j['ranks']) == list(range(n)), j\n"
			"    assert all(r['pid'] > 1 for r in j['ranks']), j\n"
			"    assert j['keys'] == 3, j\n"
			"    assert j['rounds'] == 2 * rounds, (name, j['rounds'])\n"
			"    assert j['bytes_reduced'] == 2 * rounds * 8 * 4, j\n"
			"    assert 0 < j['latency_us']['p50'] <= j['latency_us']['p99'], j\n"
			"    assert j['rounds_per_s'] > 0 and j['bytes_per_s'] > 0, j\n"
			"for key in ('version', 'uptime_s', 'memory', 'gpus'):\n"
			"    assert key in s, key\n"
			"PY",
			out),
		     0, "%s", slurp(out));
	/* metrics: the text exposition format, checked line by line */
	cr_assert_eq(sh("%s --socket %s metrics > %s", kvctl, k.sock, out), 0);
	cr_assert_eq(sh("python3 - %s <<'PY'\n"
			"import re, sys\n"
			"lines = open(sys.argv[1]).read().splitlines()\n"
			"types, seen = {}, set()\n"
			"name_re = r'[a-zA-Z_:][a-zA-Z0-9_:]*'\n"
			"sample = re.compile(r'^(' + name_re + r')(\\{(' + name_re + r'=\"[^\"]*\",?)*\\})? "
			"(-?[0-9.e+-]+|\\+Inf|NaN)$')\n"
			"for l in lines:\n"
			"    if l.startswith('# HELP '):\n"
			"        assert len(l.split(' ', 3)) == 4, l\n"
			"    elif l.startswith('# TYPE '):\n"
			"        _, _, n, t = l.split(' ')\n"
			"        assert t in ('counter', 'gauge', 'histogram'), l\n"
			"        assert n not in types, 'TYPE twice: ' + n\n"
			"        types[n] = t\n"
			"    else:\n"
			"        m = sample.match(l)\n"
			"        assert m, 'bad sample line: ' + l\n"
			"        base = re.sub('_(bucket|sum|count)$', '', m.group(1))\n"
			"        assert m.group(1) in types or base in types, 'no TYPE for ' + l\n"
			"        t = types.get(m.group(1), types.get(base))\n"
			"        if t == 'counter': assert m.group(1).endswith('_total'), l\n"
			"        seen.add(m.group(1))\n"
			"assert types.get('kvd_op_latency_seconds') == 'histogram'\n"
			"assert any('le=\"+Inf\"' in l for l in lines if l.startswith('kvd_op_latency_seconds_bucket'))\n"
			"assert {'kvd_op_latency_seconds_sum', 'kvd_op_latency_seconds_count', "
			"'kvd_rounds_total'} <= seen, seen\n"
			"r = [l for l in lines if l.startswith('kvd_rounds_total{job=\"job-three\"}')]\n"
			"assert r and r[0].endswith(' 10'), r\n"
			"c = [l for l in lines if l.startswith('kvd_op_latency_seconds_count{job=\"job-three\"}')]\n"
			"assert c and int(c[0].split()[1]) >= 10, c\n"
			"PY",
			out),
		     0, "%s", slurp(out));
	/* drop job-three: its waiting rank gets KV_ERR_PEER; job-two stays */
	cr_assert_eq(sh("%s --socket %s drop job-three > %s", kvctl, k.sock, out), 0, "%s",
		     slurp(out));
	cr_assert_eq(sh("%s --socket %s jobs > %s", kvctl, k.sock, out), 0);
	cr_assert_null(strstr(slurp(out), "job-three"), "%s", slurp(out));
	cr_assert_not_null(strstr(slurp(out), "job-two"), "%s", slurp(out));
	__atomic_store_n(ready, 1000, __ATOMIC_SEQ_CST);
	cr_assert_eq(waitpid(p3, &st3, 0), p3);
	cr_assert(WIFEXITED(st3) && WEXITSTATUS(st3) == 0, "job-three's ranks saw the drop");
	kvd_stop(&k); /* job-two's rank 0 waits on "hold": kvd's stop fails it */
	waitpid(p2, &st2, 0);
	unlink(out);
	munmap(ready, 4096);
}
