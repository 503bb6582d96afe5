/* SPDX-License-Identifier: MIT */
/*
 * kvrun - start N ranks of a job, each with KVD_SOCKET, KVD_JOB, KVD_RANK and
 * KVD_NUM_WORKERS in its environment; start a private kvd when none answers.
 *
 * Each rank runs in its own process group, so kvrun alone receives a
 * terminal's ^C and forwards it (as it forwards SIGTERM and SIGHUP) to every
 * rank's group.  When a rank fails, the others are stopped (SIGTERM, then
 * SIGKILL after a grace period) and kvrun exits with the failed rank's
 * status.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "kv.h"
#include "../shm/msg.h"

static const char usage[] =
	"Usage: kvrun -n N [OPTION]... -- CMD [ARG]...\n"
	"Start N ranks of CMD as one kvd job.\n"
	"\n"
	"Each rank gets KVD_SOCKET, KVD_JOB, KVD_RANK (0..N-1) and KVD_NUM_WORKERS=N in its\n"
	"environment, which kv_create() reads.  When no kvd answers on the socket, kvrun\n"
	"starts a private kvd for the run and stops it afterwards.\n"
	"\n"
	"  -n, --ranks N          number of ranks (1..1024)\n"
	"  -s, --socket PATH      kvd's socket (default $KVD_SOCKET, else /run/kvd/kvd.sock;\n"
	"                         a private kvd listens on PATH if given, else in a\n"
	"                         temporary directory)\n"
	"  -j, --job NAME         job name (default $KVD_JOB, else kvrun-PID)\n"
	"      --device-per-rank  set KVD_DEVICE=RANK for each rank\n"
	"      --grace-ms MS      after a rank fails, wait MS before SIGKILL (default 5000)\n"
	"      --kvd-log FILE     append the private kvd's log to FILE (default: discarded)\n"
	"  -q, --quiet            no notes about the private kvd\n"
	"  -h, --help             show this help and exit\n"
	"  -V, --version          show the version and exit\n"
	"\n"
	"Exit status: 0 when every rank exits 0; else the status of the first rank that\n"
	"failed (128+N when it was killed by signal N); 128+N when kvrun itself got\n"
	"signal N and forwarded it, even if every rank then exited 0 (the run did not\n"
	"finish); 2 on a bad command line; 1 when kvrun itself failed (no kvd could be\n"
	"started, the --kvd-log file cannot be opened, fork failed).\n";

static pid_t *ranks;
static int nranks;

static void signal_ranks(int sig)
{
	for (int r = 0; r < nranks; r++)
		if (ranks[r] > 0)
			kill(-ranks[r], sig);
}

static int status_code(int st)
{
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "ranks", required_argument, NULL, 'n' },
		{ "socket", required_argument, NULL, 's' },
		{ "job", required_argument, NULL, 'j' },
		{ "device-per-rank", no_argument, NULL, 'D' },
		{ "grace-ms", required_argument, NULL, 'g' },
		{ "kvd-log", required_argument, NULL, 'L' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *sock = NULL, *job = NULL, *kvd_log = NULL;
	char jobbuf[64], tmpdir[64] = "", sockbuf[128];
	int opt, n = 0, device_per_rank = 0, grace_ms = 5000, quiet = 0;
	int first_fail = -1, exit_code = 0, left;
	pid_t kvd = -1;
	sigset_t mask, old;
	struct timespec kill_at = { 0 };

	while ((opt = getopt_long(argc, argv, "+n:s:j:qhV", opts, NULL)) != -1) {
		char *end;
		switch (opt) {
		case 'n':
			n = (int)strtol(optarg, &end, 10);
			if (*end || n < 1 || n > 1024) {
				fprintf(stderr, "kvrun: -n wants 1..1024, not '%s'\n", optarg);
				return 2;
			}
			break;
		case 's':
			sock = optarg;
			break;
		case 'j':
			job = optarg;
			break;
		case 'D':
			device_per_rank = 1;
			break;
		case 'g':
			grace_ms = (int)strtol(optarg, &end, 10);
			if (*end || grace_ms < 0) {
				fprintf(stderr, "kvrun: bad --grace-ms '%s'\n", optarg);
				return 2;
			}
			break;
		case 'q':
			quiet = 1;
			break;
		case 'L':
			kvd_log = optarg;
			break;
		case 'h':
			fputs(usage, stdout);
			return 0;
		case 'V':
			printf("kvrun %s\n", KV_VERSION);
			return 0;
		default:
			fprintf(stderr, "Try 'kvrun --help'.\n");
			return 2;
		}
	}
	if (n == 0 || optind >= argc) {
		fprintf(stderr, "kvrun: %s\nTry 'kvrun --help'.\n",
			n == 0 ? "the number of ranks (-n N) is required" : "no command to run");
		return 2;
	}
	if (!job) {
		job = getenv("KVD_JOB");
		if (!job || !*job) {
			snprintf(jobbuf, sizeof(jobbuf), "kvrun-%d", (int)getpid());
			job = jobbuf;
		}
	}
	if (!kv_job_name_valid(job, strlen(job))) {
		fprintf(stderr, "kvrun: '%s' is not a valid job name (1-%u bytes of A-Z a-z 0-9 . _ -)\n",
			job, KV_JOB_MAX);
		return 2;
	}
	if (kvd_log) {
		int fd = open(kvd_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (fd < 0) {
			fprintf(stderr, "kvrun: cannot open --kvd-log %s: %s\n", kvd_log,
				strerror(errno));
			return 1;
		}
		close(fd);
	}
	if (!sock)
		sock = tool_default_socket();

	/* signals arrive through sigtimedwait; children get the old mask back */
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGHUP);
	sigprocmask(SIG_BLOCK, &mask, &old);

	if (!tool_kvd_answers(sock)) {
		int explicit_sock = 0;
		for (int i = 1; i < optind; i++)
			if (!strcmp(argv[i], "-s") || !strncmp(argv[i], "--socket", 8))
				explicit_sock = 1;
		if (!explicit_sock) {
			snprintf(tmpdir, sizeof(tmpdir), "/tmp/kvrun.XXXXXX");
			if (!mkdtemp(tmpdir)) {
				fprintf(stderr, "kvrun: mkdtemp: %s\n", strerror(errno));
				return 1;
			}
			snprintf(sockbuf, sizeof(sockbuf), "%s/kvd.sock", tmpdir);
			sock = sockbuf;
		}
		kvd = tool_start_kvd(sock, NULL, "kvrun", kvd_log);
		if (kvd < 0) {
			if (tmpdir[0])
				rmdir(tmpdir);
			return 1;
		}
		if (!quiet)
			fprintf(stderr, "kvrun: no kvd answered; started a private one on %s\n",
				sock);
	}

	ranks = calloc((size_t)n, sizeof(*ranks));
	nranks = n;
	fflush(NULL);
	for (int r = 0; r < n; r++) {
		pid_t p = fork();
		if (p < 0) {
			fprintf(stderr, "kvrun: fork: %s\n", strerror(errno));
			signal_ranks(SIGKILL);
			exit_code = 1;
			n = r;
			break;
		}
		if (p == 0) {
			char buf[16];
			setpgid(0, 0);
			sigprocmask(SIG_SETMASK, &old, NULL);
			setenv("KVD_SOCKET", sock, 1);
			setenv("KVD_JOB", job, 1);
			snprintf(buf, sizeof(buf), "%d", r);
			setenv("KVD_RANK", buf, 1);
			if (device_per_rank)
				setenv("KVD_DEVICE", buf, 1);
			snprintf(buf, sizeof(buf), "%d", nranks);
			setenv("KVD_NUM_WORKERS", buf, 1);
			execvp(argv[optind], argv + optind);
			fprintf(stderr, "kvrun: cannot run %s: %s\n", argv[optind], strerror(errno));
			_exit(127);
		}
		setpgid(p, p); /* also here: no race with a signal before the child's setpgid */
		ranks[r] = p;
	}

	left = n;
	while (left > 0) {
		struct timespec tick = { 0, 100 * 1000000L }, now;
		siginfo_t si;
		int sig = sigtimedwait(&mask, &si, &tick), st;
		pid_t p;

		if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
			signal_ranks(sig);
			if (first_fail < 0 && !exit_code)
				exit_code = 128 + sig;
			clock_gettime(CLOCK_MONOTONIC, &kill_at);
			kill_at.tv_sec += grace_ms / 1000 + 1;
		}
		while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
			for (int r = 0; r < n; r++) {
				if (ranks[r] != p)
					continue;
				ranks[r] = 0;
				left--;
				if (status_code(st) != 0 && first_fail < 0) {
					first_fail = r;
					exit_code = status_code(st);
					fprintf(stderr,
						"kvrun: rank %d %s %d; stopping the other ranks\n", r,
						WIFEXITED(st) ? "exited with status" : "was killed by signal",
						WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
					signal_ranks(SIGTERM);
					clock_gettime(CLOCK_MONOTONIC, &kill_at);
					kill_at.tv_sec += grace_ms / 1000;
					kill_at.tv_nsec += (grace_ms % 1000) * 1000000L;
				}
			}
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (kill_at.tv_sec &&
		    (now.tv_sec > kill_at.tv_sec ||
		     (now.tv_sec == kill_at.tv_sec && now.tv_nsec >= kill_at.tv_nsec))) {
			signal_ranks(SIGKILL);
			kill_at.tv_sec = 0;
		}
	}
	if (kvd > 0)
		tool_stop_kvd(kvd, 10000);
	if (tmpdir[0]) {
		unlink(sockbuf);
		rmdir(tmpdir);
	}
	free(ranks);
	return exit_code;
}
