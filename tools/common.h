/* SPDX-License-Identifier: MIT */
/*
 * common.h - what the command-line tools share: finding or starting a kvd,
 * and asking it for text over the control socket.
 */
#ifndef KV_TOOLS_COMMON_H
#define KV_TOOLS_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* $KVD_SOCKET, else the default path */
const char *tool_default_socket(void);

/* 1 when a kvd answers on path */
int tool_kvd_answers(const char *path);

/*
 * Start a private kvd listening on path (its directory is created) with
 * extra arguments, its log going to the file log (NULL: /dev/null); waits
 * until it answers.  Returns its pid, or -1 with a
 * message on stderr.  The kvd binary is looked up next to the running
 * program first, then on PATH.
 */
pid_t tool_start_kvd(const char *path, const char *const *extra, const char *prog,
		     const char *log);

/* SIGTERM, then SIGKILL after grace_ms; returns its exit status or -1. */
int tool_stop_kvd(pid_t pid, int grace_ms);

/*
 * Connect to kvd and send one control request; the reply text (STATUS
 * messages concatenated) is returned in a malloc'd buffer (NUL-terminated),
 * or NULL with *code set to the KV_ERR_* of an ERROR reply and *msg to its
 * sentence (static buffer).  *code is KV_ERR_DAEMON when nothing answers.
 */
char *tool_request(const char *path, uint16_t type, uint32_t what, const char *job, int *code,
		   const char **msg);

#endif
