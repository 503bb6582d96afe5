/* SPDX-License-Identifier: MIT */
/*
 * harness.c - start a private kvd, fork ranks, collect their fate.
 */
#include "harness.h"

#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *bin_path(const char *name, char *buf, size_t len)
{
	const char *dir = getenv("KVD_BIN_DIR");

	snprintf(buf, len, "%s/%s", dir && *dir ? dir : "build/bin", name);
	return buf;
}

static int can_connect(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), ok;

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	if (fd >= 0)
		close(fd);
	return ok;
}

/* Start kvd on k's socket; its output goes to k's log (appended: a restart). */
static int kvd_spawn(struct kvd_proc *k, const char *const *args, int log_flags)
{
	char bin[512];
	const char *argv[32];
	int n = 0;

	bin_path("kvd", bin, sizeof(bin));
	argv[n++] = bin;
	argv[n++] = "--socket";
	argv[n++] = k->sock;
	for (int i = 0; args && args[i] && n < 30; i++)
		argv[n++] = args[i];
	/* $KVTEST_KVD_ARGS: more kvd options for every test (make check uses it to
	 * run the suites once more with every round through kvd's engine) */
	static char extra[512];
	const char *env = getenv("KVTEST_KVD_ARGS");
	if (env) {
		snprintf(extra, sizeof(extra), "%s", env);
		for (char *save = NULL, *t = strtok_r(extra, " ", &save); t && n < 30;
		     t = strtok_r(NULL, " ", &save))
			argv[n++] = t;
	}
	argv[n] = NULL;
	k->pid = fork();
	if (k->pid < 0)
		return -1;
	if (k->pid == 0) {
		int fd = open(k->log, O_WRONLY | O_CREAT | log_flags, 0644);

		prctl(PR_SET_PDEATHSIG, SIGKILL); /* no stray kvd when a test dies */
		if (fd >= 0) {
			dup2(fd, 2);
			dup2(fd, 1);
		}
		execv(bin, (char *const *)argv);
		fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
		_exit(127);
	}
	for (int i = 0; i < 500; i++) {
		int st;
		if (can_connect(k->sock))
			return 0;
		if (waitpid(k->pid, &st, WNOHANG) == k->pid) {
			k->pid = 0;
			return -1;
		}
		usleep(10000);
	}
	kill(k->pid, SIGKILL);
	waitpid(k->pid, NULL, 0);
	k->pid = 0;
	return -1;
}

int kvd_start(struct kvd_proc *k, const char *const *args)
{
	memset(k, 0, sizeof(*k));
	snprintf(k->dir, sizeof(k->dir), "/tmp/kvtest.XXXXXX");
	if (!mkdtemp(k->dir))
		return -1;
	snprintf(k->sock, sizeof(k->sock), "%s/kvd.sock", k->dir);
	snprintf(k->log, sizeof(k->log), "%s/kvd.log", k->dir);
	return kvd_spawn(k, args, O_TRUNC);
}

void kvd_crash(struct kvd_proc *k)
{
	if (k->pid > 0) {
		kill(k->pid, SIGKILL);
		waitpid(k->pid, NULL, 0);
	}
	k->pid = 0;
}

int kvd_restart(struct kvd_proc *k, const char *const *args)
{
	kvd_crash(k);
	return kvd_spawn(k, args, O_APPEND);
}

int kvd_restart_clean(struct kvd_proc *k, const char *const *args)
{
	int st = -1;

	if (k->pid > 0) {
		kill(k->pid, SIGTERM);
		if (waitpid(k->pid, &st, 0) != k->pid || !WIFEXITED(st) || WEXITSTATUS(st)) {
			k->pid = 0;
			return -1;
		}
	}
	k->pid = 0;
	return kvd_spawn(k, args, O_APPEND);
}

static void dump_log(const struct kvd_proc *k)
{
	char line[1024];
	FILE *f = fopen(k->log, "r");

	if (!f)
		return;
	fprintf(stderr, "---- kvd log (%s) ----\n", k->log);
	while (fgets(line, sizeof(line), f))
		fputs(line, stderr);
	fprintf(stderr, "---- end of kvd log ----\n");
	fclose(f);
}

int kvd_stop(struct kvd_proc *k)
{
	int st = 0, rc = -1;

	if (k->pid > 0) {
		kill(k->pid, SIGTERM);
		for (int i = 0; i < 1000; i++) {
			if (waitpid(k->pid, &st, WNOHANG) == k->pid) {
				rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
				break;
			}
			usleep(10000);
		}
		if (rc < 0) {
			kill(k->pid, SIGKILL);
			waitpid(k->pid, NULL, 0);
		}
		k->pid = 0;
		/* kvd must stop cleanly on SIGTERM: a sanitizer report, a leak or a
		 * crash shows here (a test that SIGKILLed kvd itself is exempt) */
		if (rc != 0 && rc != 128 + SIGKILL) {
			dump_log(k);
			cr_assert_fail("kvd exited with status %d after SIGTERM", rc);
		}
	}
	unlink(k->sock);
	unlink(k->log);
	rmdir(k->dir);
	return rc;
}

kv_store *open_rank(int timeout_ms)
{
	struct kv_options o;
	kv_store *kv = NULL;
	int rc;

	kv_options_default(&o);
	o.timeout_ms = timeout_ms;
	rc = kv_create("local", &o, &kv);
	if (rc) {
		fprintf(stderr, "rank %s: kv_create: %s: %s\n", getenv("KVD_RANK"), kv_strerror(rc),
			kv_last_error(NULL));
		return NULL;
	}
	return kv;
}

int run_ranks(const struct kvd_proc *k, const char *job, int n, rank_fn fn, void *arg,
	      int timeout_s, char *why, size_t whylen)
{
	pid_t pids[1024];
	int left = n, failed = 0;
	struct timespec t0, t;

	fflush(NULL);
	for (int r = 0; r < n; r++) {
		pids[r] = fork();
		if (pids[r] < 0) {
			snprintf(why, whylen, "fork: %s", strerror(errno));
			for (int i = 0; i < r; i++)
				kill(pids[i], SIGKILL);
			return -1;
		}
		if (pids[r] == 0) {
			char buf[16];

			prctl(PR_SET_PDEATHSIG, SIGKILL); /* no stray rank when a test dies */
			setenv("KVD_SOCKET", k->sock, 1);
			setenv("KVD_JOB", job, 1);
			snprintf(buf, sizeof(buf), "%d", r);
			setenv("KVD_RANK", buf, 1);
			snprintf(buf, sizeof(buf), "%d", n);
			setenv("KVD_NUM_WORKERS", buf, 1);
			_exit(fn(r, n, k, arg));
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (left > 0) {
		int st, reaped = 0;

		/* wait for our ranks only: kvd is a child of this process too */
		for (int r = 0; r < n; r++) {
			if (pids[r] <= 0 || waitpid(pids[r], &st, WNOHANG) != pids[r])
				continue;
			pids[r] = 0;
			left--;
			reaped = 1;
			if (failed || (WIFEXITED(st) && WEXITSTATUS(st) == 0))
				continue;
			failed = 1;
			if (WIFEXITED(st))
				snprintf(why, whylen, "rank %d exited with %d", r, WEXITSTATUS(st));
			else
				snprintf(why, whylen, "rank %d killed by signal %d", r, WTERMSIG(st));
		}
		if (reaped)
			continue;
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > timeout_s) {
			if (!failed)
				snprintf(why, whylen, "ranks still running after %d s", timeout_s);
			failed = 1;
			for (int r = 0; r < n; r++)
				if (pids[r] > 0)
					kill(pids[r], SIGKILL);
		}
		usleep(2000);
	}
	return failed ? -1 : 0;
}
