/* SPDX-License-Identifier: MIT */
/*
 * common.c - kvd discovery, private kvd start/stop, control requests.
 */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kv.h"
#include "../shm/msg.h"
#include "../shm/seg.h"

const char *tool_default_socket(void)
{
	const char *s = getenv("KVD_SOCKET");

	return s && *s ? s : "/run/kvd/kvd.sock";
}

static int connect_to(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(a.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

int tool_kvd_answers(const char *path)
{
	int code;
	const char *msg;
	/* a real question: a connect alone can succeed on a dead kvd's socket
	 * while the kernel is still tearing its io_uring down */
	char *text = tool_request(path, KV_MSG_STATUS_REQ, KV_STATUS_JOBS, NULL, &code, &msg);

	free(text);
	return text != NULL || code == KV_ERR_PERM;
}

/* The kvd next to this program (build/bin/kvd beside build/bin/kvrun), else "kvd". */
static void find_kvd(char *buf, size_t len)
{
	char self[PATH_MAX - 8];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);

	if (n > 0) {
		self[n] = '\0';
		char *slash = strrchr(self, '/');
		if (slash) {
			*slash = '\0';
			if ((size_t)snprintf(buf, len, "%s/kvd", self) >= len)
				goto out_path;
			if (access(buf, X_OK) == 0)
				return;
		}
	}
out_path:
	snprintf(buf, len, "kvd");
}

pid_t tool_start_kvd(const char *path, const char *const *extra, const char *prog,
		     const char *log)
{
	char bin[PATH_MAX + 8];
	const char *argv[40];
	int n = 0;
	pid_t pid;

	find_kvd(bin, sizeof(bin));
	argv[n++] = bin;
	argv[n++] = "--socket";
	argv[n++] = path;
	for (int i = 0; extra && extra[i] && n < 38; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	pid = fork();
	if (pid < 0) {
		fprintf(stderr, "%s: fork: %s\n", prog, strerror(errno));
		return -1;
	}
	if (pid == 0) {
		/* the private kvd keeps its own signals: ^C reaches it through us */
		int fd = open(log ? log : "/dev/null", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
			      0644);
		setpgid(0, 0);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execvp(bin, (char *const *)argv);
		fprintf(stderr, "%s: cannot run %s: %s\n", prog, bin, strerror(errno));
		_exit(127);
	}
	for (int i = 0; i < 1000; i++) {
		int st;
		if (tool_kvd_answers(path))
			return pid;
		if (waitpid(pid, &st, WNOHANG) == pid) {
			fprintf(stderr, "%s: the private kvd exited at start (status %d)\n", prog,
				WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
			return -1;
		}
		usleep(5000);
	}
	fprintf(stderr, "%s: the private kvd did not answer on %s within 5 s\n", prog, path);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return -1;
}

int tool_stop_kvd(pid_t pid, int grace_ms)
{
	int st;

	if (pid <= 0)
		return -1;
	kill(pid, SIGTERM);
	for (int waited = 0; waited < grace_ms; waited += 5) {
		if (waitpid(pid, &st, WNOHANG) == pid)
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		usleep(5000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, &st, 0);
	return -1;
}

char *tool_request(const char *path, uint16_t type, uint32_t what, const char *job, int *code,
		   const char **msg)
{
	static char sentence[600];
	uint8_t buf[KV_MSG_MAX];
	struct kv_msg m = { .type = type, .seq = 1 }, r;
	char *text = NULL;
	size_t len = 0, n;
	int fd = connect_to(path), fds[SEG_MAX_FDS], nfds;

	*code = 0;
	*msg = NULL;
	if (fd < 0 && (errno == EACCES || errno == EPERM)) {
		*code = KV_ERR_PERM;
		snprintf(sentence, sizeof(sentence),
			 "permission denied on kvd's socket %s (or its directory)", path);
		*msg = sentence;
		return NULL;
	}
	if (fd < 0) {
		*code = KV_ERR_DAEMON;
		snprintf(sentence, sizeof(sentence), "no kvd answering on %s", path);
		*msg = sentence;
		return NULL;
	}
	if (type == KV_MSG_DROP)
		snprintf(m.u.drop.job, sizeof(m.u.drop.job), "%s", job);
	else
		m.u.status_req.what = what;
	n = kv_msg_encode(&m, buf, sizeof(buf));
	if (!n || seg_send(fd, buf, n, NULL, 0)) {
		*code = n ? KV_ERR_DAEMON : KV_ERR_INVALID;
		snprintf(sentence, sizeof(sentence), n ? "cannot send to kvd on %s" : "bad request",
			 path);
		goto out_fail;
	}
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t got = -1;
		const char *why;

		if (poll(&p, 1, 10000) > 0)
			got = seg_recv(fd, buf, sizeof(buf), fds, SEG_MAX_FDS, &nfds);
		else
			nfds = 0;

		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		if (got <= 0 || kv_msg_decode(buf, (size_t)got, &r, &why)) {
			*code = KV_ERR_DAEMON;
			snprintf(sentence, sizeof(sentence),
				 "kvd on %s closed the connection or did not answer", path);
			goto out_fail;
		}
		if (r.type == KV_MSG_ERROR) {
			*code = r.u.error.code;
			snprintf(sentence, sizeof(sentence), "%.*s", (int)r.u.error.len,
				 r.u.error.text);
			*msg = sentence;
			close(fd);
			free(text);
			if (r.u.error.code)
				return NULL;
			return strdup(sentence);
		}
		if (r.type != KV_MSG_STATUS)
			continue;
		char *t = realloc(text, len + r.u.status.len + 1);
		if (!t) {
			*code = KV_ERR_NOMEM;
			snprintf(sentence, sizeof(sentence), "out of memory");
			goto out_fail;
		}
		text = t;
		memcpy(text + len, r.u.status.text, r.u.status.len);
		len += r.u.status.len;
		text[len] = '\0';
		if (!(r.u.status.flags & KV_STATUSF_MORE))
			break;
	}
	close(fd);
	return text ? text : strdup("");

out_fail:
	*msg = sentence;
	close(fd);
	free(text);
	return NULL;
}
