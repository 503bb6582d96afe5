/* SPDX-License-Identifier: MIT */
/*
 * harness.h - integration tests: a private kvd on a temporary socket and N
 * forked ranks.
 *
 * Ranks run in child processes, where Criterion's assertions do not reach,
 * so rank code checks with CHECK(), which prints what failed and makes the
 * rank exit non-zero; run_ranks() reports which rank failed and how.
 */
#ifndef KV_TEST_HARNESS_H
#define KV_TEST_HARNESS_H

#include <stdio.h>
#include <sys/types.h>

#include "kv.h"

struct kvd_proc {
	pid_t pid;
	char dir[64];
	char sock[108];
	char log[128];
};

/* Start kvd with extra arguments (NULL-terminated list, may be NULL); 0 or -1. */
int kvd_start(struct kvd_proc *k, const char *const *args);
/* SIGKILL kvd (kill -9: it leaves everything as it is) and reap it. */
void kvd_crash(struct kvd_proc *k);
/* kvd_crash, then a new kvd on the same socket, its log appended; 0 or -1. */
int kvd_restart(struct kvd_proc *k, const char *const *args);
/* The same after a clean stop (SIGTERM, as systemctl restart does); -1 when
 * kvd did not exit 0. */
int kvd_restart_clean(struct kvd_proc *k, const char *const *args);
/* SIGTERM and wait; returns kvd's exit status (or -1 if it had to be killed). */
int kvd_stop(struct kvd_proc *k);
/* Path of a built program, from $KVD_BIN_DIR (set by make check) or build/bin. */
const char *bin_path(const char *name, char *buf, size_t len);

typedef int (*rank_fn)(int rank, int nranks, const struct kvd_proc *k, void *arg);

/*
 * Fork n ranks running fn; each gets KVD_SOCKET/KVD_JOB/KVD_RANK/
 * KVD_NUM_WORKERS in its environment.  Returns 0 when all exit 0 within
 * timeout_s; else describes the failure in why and returns -1 (the other
 * ranks are killed).
 */
int run_ranks(const struct kvd_proc *k, const char *job, int n, rank_fn fn, void *arg,
	      int timeout_s, char *why, size_t whylen);

/* Open a store for this rank from the environment, with a timeout. */
kv_store *open_rank(int timeout_ms);

#define CHECK(cond, ...)                                                                     \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			fprintf(stderr, "rank %s: %s:%d: CHECK(%s) failed: ",                \
				getenv("KVD_RANK") ? getenv("KVD_RANK") : "?", __FILE__,    \
				__LINE__, #cond);                                            \
			fprintf(stderr, __VA_ARGS__);                                        \
			fprintf(stderr, "\n");                                               \
			return 1;                                                            \
		}                                                                            \
	} while (0)

#define CHECK_RC(call, want)                                                                 \
	do {                                                                                 \
		int rc_ = (call);                                                            \
		CHECK(rc_ == (want), "%s returned %d (%s), want %d", #call, rc_,            \
		      kv_strerror(rc_), (want));                                             \
	} while (0)

#endif
