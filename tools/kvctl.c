/* SPDX-License-Identifier: MIT */
/*
 * kvctl - ask a running kvd what it is doing, and drop jobs.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "kv.h"
#include "../shm/msg.h"

static const char usage[] =
	"Usage: kvctl [--socket PATH] COMMAND [ARG]...\n"
	"Show what kvd is doing; drop jobs.\n"
	"\n"
	"Commands:\n"
	"  status [--json]      the daemon, each job and each rank (--json: one JSON object)\n"
	"  jobs                 one line per job\n"
	"  metrics              counters and the op latency histogram, Prometheus text format\n"
	"  drop JOB             fail JOB's ops (KV_ERR_PEER) and free it; its owner or root\n"
	"  watch [SECONDS]      print status every SECONDS (default 1) until interrupted\n"
	"\n"
	"Options:\n"
	"  -s, --socket PATH    kvd's socket (default $KVD_SOCKET, else /run/kvd/kvd.sock)\n"
	"  -h, --help           show this help and exit\n"
	"  -V, --version        show the version and exit\n"
	"\n"
	"Users other than root see and drop only their own jobs.\n"
	"\n"
	"Exit status: 0 success; 1 no kvd answering, or kvd failed the request;\n"
	"2 bad command line; 3 permission denied; 4 no such job.\n";

static int exit_for(int code)
{
	switch (code) {
	case KV_ERR_PERM:
		return 3;
	case KV_ERR_NOKEY:
		return 4;
	default:
		return 1;
	}
}

static int show(const char *sock, uint32_t what)
{
	int code;
	const char *msg;
	char *text = tool_request(sock, KV_MSG_STATUS_REQ, what, NULL, &code, &msg);

	if (!text) {
		fprintf(stderr, "kvctl: %s\n", msg ? msg : kv_strerror(code));
		return exit_for(code);
	}
	fputs(text, stdout);
	free(text);
	return 0;
}

static volatile sig_atomic_t stop;

static void on_int(int sig)
{
	stop = 1;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *sock = tool_default_socket(), *cmd;
	int opt, json = 0;

	while ((opt = getopt_long(argc, argv, "s:hV", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			sock = optarg;
			break;
		case 'j':
			json = 1;
			break;
		case 'h':
			fputs(usage, stdout);
			return 0;
		case 'V':
			printf("kvctl %s\n", KV_VERSION);
			return 0;
		default:
			fprintf(stderr, "Try 'kvctl --help'.\n");
			return 2;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "kvctl: no command\nTry 'kvctl --help'.\n");
		return 2;
	}
	cmd = argv[optind++];
	if (json && strcmp(cmd, "status")) {
		fprintf(stderr, "kvctl: --json goes with status only\n");
		return 2;
	}
	if (!strcmp(cmd, "status")) {
		for (; optind < argc; optind++) {
			if (!strcmp(argv[optind], "--json"))
				json = 1;
			else {
				fprintf(stderr, "kvctl: status: unknown argument '%s'\n",
					argv[optind]);
				return 2;
			}
		}
		return show(sock, json ? KV_STATUS_JSON : KV_STATUS_TEXT);
	}
	if (!strcmp(cmd, "jobs") || !strcmp(cmd, "metrics")) {
		if (optind < argc) {
			fprintf(stderr, "kvctl: %s takes no arguments\n", cmd);
			return 2;
		}
		return show(sock, !strcmp(cmd, "jobs") ? KV_STATUS_JOBS : KV_STATUS_METRICS);
	}
	if (!strcmp(cmd, "drop")) {
		int code;
		const char *msg;
		char *text;

		if (optind + 1 != argc) {
			fprintf(stderr, "kvctl: drop takes one job name\n");
			return 2;
		}
		if (!kv_job_name_valid(argv[optind], strlen(argv[optind]))) {
			fprintf(stderr, "kvctl: '%s' is not a valid job name\n", argv[optind]);
			return 2;
		}
		text = tool_request(sock, KV_MSG_DROP, 0, argv[optind], &code, &msg);
		if (!text) {
			fprintf(stderr, "kvctl: %s\n", msg ? msg : kv_strerror(code));
			return exit_for(code);
		}
		printf("%s\n", text);
		free(text);
		return 0;
	}
	if (!strcmp(cmd, "watch")) {
		double secs = 1;
		if (optind < argc) {
			char *end;
			secs = strtod(argv[optind], &end);
			/* written this way round, NaN fails too */
			if (end == argv[optind] || *end || !(secs >= 0.1 && secs <= 86400)) {
				fprintf(stderr,
					"kvctl: watch: bad interval '%s' (seconds, 0.1 to 86400)\n",
					argv[optind]);
				return 2;
			}
			if (optind + 1 < argc) {
				fprintf(stderr, "kvctl: watch takes one interval\n");
				return 2;
			}
		}
		signal(SIGINT, on_int);
		signal(SIGTERM, on_int);
		while (!stop) {
			int rc;
			if (isatty(1))
				fputs("\033[H\033[2J", stdout);
			rc = show(sock, KV_STATUS_TEXT);
			fflush(stdout);
			if (rc)
				return rc;
			struct timespec ts = { .tv_sec = (time_t)secs,
					       .tv_nsec = (long)((secs - (double)(time_t)secs) * 1e9) };
			while (!stop && nanosleep(&ts, &ts) < 0)
				;
		}
		return 0;
	}
	fprintf(stderr, "kvctl: unknown command '%s'\nTry 'kvctl --help'.\n", cmd);
	return 2;
}
