/* SPDX-License-Identifier: MIT */
/*
 * main.c - kvd: command line, configuration, the listening socket, and the
 * start and stop of the engine and the control loop.
 *
 * The listening socket is either handed over by systemd (socket activation,
 * kvd.socket: then systemd owns the path and kvd never unlinks it) or bound
 * here (then kvd removes it at exit).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "kvd.h"
#include "../kernels/gpu.h"

static const char usage[] =
	"Usage: kvd [OPTION]...\n"
	"Run the kvd gradient aggregation daemon in the foreground.\n"
	"\n"
	"  -s, --socket PATH        listen on PATH (default " KVD_DEFAULT_SOCKET ")\n"
	"  -c, --config FILE        read options from FILE: one 'option = value' per line,\n"
	"                           named as the long options below; '#' starts a comment\n"
	"  -t, --threads N          reduce worker threads (default: online CPUs)\n"
	"      --max-job-bytes SIZE shared memory one job may hold (K, M, G suffixes;\n"
	"                           default 0: no limit)\n"
	"      --max-uid-bytes SIZE shared memory all jobs of one uid may hold (default 0:\n"
	"                           no limit)\n"
	"      --max-keys N         keys per job (default 1048576)\n"
	"      --max-ranks N        ranks per job (default 1024)\n"
	"      --max-clients N      connected ranks in all (default 4096)\n"
	"      --part-size SIZE     rounds are split into parts of SIZE bytes (default 1M)\n"
	"      --inline-size SIZE   parts up to SIZE are summed on the engine thread\n"
	"                           (default 64K)\n"
	"      --direct-max SIZE    keys up to SIZE get direct rounds, summed by the ranks\n"
	"                           in shared memory without a hop through kvd\n"
	"                           (default 1M; 0: every round goes through kvd)\n"
	"      --pinned-limit SIZE  with a GPU: page-lock at most SIZE of shared memory\n"
	"                           for DMA, node-wide (default: half the RAM; 0: none)\n"
	"      --allow-group GID    members of GID may join other users' jobs\n"
	"      --hello-timeout S    close a connection that says nothing for S seconds\n"
	"                           before its hello (default 10)\n"
	"  -h, --help               show this help and exit\n"
	"  -V, --version            show the version and exit\n"
	"\n"
	"Under systemd, kvd takes its listening socket from socket activation\n"
	"($LISTEN_PID, $LISTEN_FDS: one SOCK_SEQPACKET socket; --socket is then ignored)\n"
	"and reports READY=1, STATUS=, STOPPING=1 and WATCHDOG=1 to $NOTIFY_SOCKET.\n"
	"\n"
	"Exit status: 0 after a clean stop (SIGTERM, SIGINT), 1 on a start-up error,\n"
	"2 on a bad command line.\n";

enum {
	OPT_MAX_JOB_BYTES = 256,
	OPT_MAX_KEYS,
	OPT_MAX_UID_BYTES,
	OPT_MAX_RANKS,
	OPT_MAX_CLIENTS,
	OPT_PART_SIZE,
	OPT_INLINE_SIZE,
	OPT_ALLOW_GROUP,
	OPT_HELLO_TIMEOUT,
	OPT_DIRECT_MAX,
	OPT_PINNED_LIMIT,
};

static const struct option long_opts[] = {
	{ "socket", required_argument, NULL, 's' },
	{ "config", required_argument, NULL, 'c' },
	{ "threads", required_argument, NULL, 't' },
	{ "max-job-bytes", required_argument, NULL, OPT_MAX_JOB_BYTES },
	{ "max-keys", required_argument, NULL, OPT_MAX_KEYS },
	{ "max-uid-bytes", required_argument, NULL, OPT_MAX_UID_BYTES },
	{ "max-ranks", required_argument, NULL, OPT_MAX_RANKS },
	{ "max-clients", required_argument, NULL, OPT_MAX_CLIENTS },
	{ "part-size", required_argument, NULL, OPT_PART_SIZE },
	{ "inline-size", required_argument, NULL, OPT_INLINE_SIZE },
	{ "allow-group", required_argument, NULL, OPT_ALLOW_GROUP },
	{ "hello-timeout", required_argument, NULL, OPT_HELLO_TIMEOUT },
	{ "direct-max", required_argument, NULL, OPT_DIRECT_MAX },
	{ "pinned-limit", required_argument, NULL, OPT_PINNED_LIMIT },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

static char *socket_path_buf;

static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	uint64_t mul = 1;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-')
		return -1;
	switch (*end) {
	case 'k': case 'K': mul = 1ull << 10; end++; break;
	case 'm': case 'M': mul = 1ull << 20; end++; break;
	case 'g': case 'G': mul = 1ull << 30; end++; break;
	case 't': case 'T': mul = 1ull << 40; end++; break;
	default: break;
	}
	if (*end == 'i' || *end == 'B')
		end += *end == 'i' && end[1] == 'B' ? 2 : 1;
	if (*end || (v && mul > UINT64_MAX / v))
		return -1;
	*out = v * mul;
	return 0;
}

static int parse_uint(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-' || v > max)
		return -1;
	*out = v;
	return 0;
}

static int apply(struct kvd_config *c, int opt, const char *arg, const char *name)
{
	uint64_t v;
	const char *want = "";

	switch (opt) {
	case 's':
		free(socket_path_buf);
		socket_path_buf = strdup(arg);
		c->socket_path = socket_path_buf;
		if (strlen(arg) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
			fprintf(stderr, "kvd: socket path too long: %s\n", arg);
			return -1;
		}
		return 0;
	case 't':
		want = "a number of threads, 0 to 256";
		if (parse_uint(arg, 256, &v))
			goto bad;
		c->threads = (int)v;
		return 0;
	case OPT_MAX_JOB_BYTES:
		want = "a size such as 512M or 4G, 0 for no limit";
		if (parse_size(arg, &v))
			goto bad;
		c->max_job_bytes = v;
		return 0;
	case OPT_MAX_UID_BYTES:
		want = "a size such as 512M or 4G, 0 for no limit";
		if (parse_size(arg, &v))
			goto bad;
		c->max_uid_bytes = v;
		return 0;
	case OPT_MAX_KEYS:
		want = "1 to 4194304";
		if (parse_uint(arg, KEY_DIR * KEY_BLOCK, &v) || v == 0)
			goto bad;
		c->max_keys = (uint32_t)v;
		return 0;
	case OPT_MAX_RANKS:
		want = "1 to 1024";
		if (parse_uint(arg, KV_MAX_RANKS, &v) || v == 0)
			goto bad;
		c->max_ranks = (uint32_t)v;
		return 0;
	case OPT_MAX_CLIENTS:
		want = "1 to 1048576";
		if (parse_uint(arg, 1u << 20, &v) || v == 0)
			goto bad;
		c->max_clients = (uint32_t)v;
		return 0;
	case OPT_PART_SIZE:
		want = "a multiple of 64 bytes from 4K to 256M";
		if (parse_size(arg, &v) || v < 4096 || v > (256u << 20) || v % 64)
			goto bad;
		c->part_bytes = (uint32_t)v;
		return 0;
	case OPT_INLINE_SIZE:
		want = "a size from 0 to 256M";
		if (parse_size(arg, &v) || v > (256u << 20))
			goto bad;
		c->inline_bytes = (uint32_t)v;
		return 0;
	case OPT_PINNED_LIMIT:
		want = "a size such as 8G, 0 for no limit";
		if (parse_size(arg, &v))
			goto bad;
		c->pinned_limit = v;
		return 0;
	case OPT_DIRECT_MAX:
		want = "a size from 0 (no direct rounds) to 256M";
		if (parse_size(arg, &v) || v > (256u << 20))
			goto bad;
		c->direct_max = v;
		return 0;
	case OPT_ALLOW_GROUP:
		want = "a numeric group id";
		if (parse_uint(arg, UINT32_MAX - 1, &v))
			goto bad;
		c->allow_gid = (long)v;
		return 0;
	case OPT_HELLO_TIMEOUT:
		want = "seconds, 1 to 3600";
		if (parse_uint(arg, 3600, &v) || v == 0)
			goto bad;
		c->hello_timeout_s = (uint32_t)v;
		return 0;
	}
	return -1;
bad:
	fprintf(stderr, "kvd: invalid value for --%s: '%s' (want %s)\n", name, arg, want);
	return -1;
}

static int read_config(struct kvd_config *c, const char *path)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	int lineno = 0;

	if (!f) {
		fprintf(stderr, "kvd: cannot read %s: %s\n", path, strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		char *p = line, *eq, *name, *val, *e;
		const struct option *o;

		lineno++;
		if ((e = strchr(p, '#')))
			*e = '\0';
		while (*p == ' ' || *p == '\t')
			p++;
		for (e = p + strlen(p); e > p && (e[-1] == '\n' || e[-1] == ' ' || e[-1] == '\t');)
			*--e = '\0';
		if (!*p)
			continue;
		eq = strchr(p, '=');
		if (!eq) {
			fprintf(stderr, "kvd: %s:%d: expected 'option = value'\n", path, lineno);
			goto out_bad;
		}
		*eq = '\0';
		name = p;
		for (e = eq; e > name && (e[-1] == ' ' || e[-1] == '\t');)
			*--e = '\0';
		val = eq + 1;
		while (*val == ' ' || *val == '\t')
			val++;
		for (o = long_opts; o->name; o++)
			if (strcmp(o->name, name) == 0 && o->has_arg == required_argument &&
			    o->val != 'c')
				break;
		if (!o->name) {
			fprintf(stderr, "kvd: %s:%d: unknown option '%s'\n", path, lineno, name);
			goto out_bad;
		}
		if (apply(c, o->val, val, o->name)) {
			fprintf(stderr, "kvd: (%s, line %d)\n", path, lineno);
			goto out_bad;
		}
	}
	fclose(f);
	return 0;
out_bad:
	fclose(f);
	return -1;
}

/* mkdir -p of the directory part of path */
static int make_parent(const char *path)
{
	char buf[PATH_MAX];
	char *slash;

	snprintf(buf, sizeof(buf), "%s", path);
	slash = strrchr(buf, '/');
	if (!slash || slash == buf)
		return 0;
	*slash = '\0';
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) < 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(buf, 0755) < 0 && errno != EEXIST)
		return -1;
	return 0;
}

/*
 * A connect can succeed with nobody behind it: after kill -9 the kernel
 * tears a dead kvd's io_uring down asynchronously, and its pending accept
 * keeps the old socket accepting for a moment.  So ask a question and wait
 * for the answer.
 */
static bool answers(int fd)
{
	struct kv_msg m = { .type = KV_MSG_STATUS_REQ, .seq = 1 };
	struct pollfd p = { .fd = fd, .events = POLLIN };
	uint8_t buf[KV_MSG_MAX];
	size_t n;

	m.u.status_req.what = KV_STATUS_JOBS;
	n = kv_msg_encode(&m, buf, sizeof(buf));
	if (send(fd, buf, n, MSG_NOSIGNAL) != (ssize_t)n)
		return false;
	if (poll(&p, 1, 1000) <= 0)
		return false;
	return recv(fd, buf, sizeof(buf), 0) > 0;
}

static int listen_on(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, probe;

	if (strlen(path) >= sizeof(a.sun_path)) {
		fprintf(stderr, "kvd: the socket path %s is longer than %zu bytes\n", path,
			sizeof(a.sun_path) - 1);
		return -1;
	}
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	if (make_parent(path) < 0) {
		fprintf(stderr, "kvd: cannot create the directory of %s: %s\n", path,
			strerror(errno));
		return -1;
	}
	/* another kvd answering there? then refuse; a dead socket file is removed */
	probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof(a)) == 0 &&
	    answers(probe)) {
		close(probe);
		fprintf(stderr, "kvd: another kvd already answers on %s\n", path);
		return -1;
	}
	if (probe >= 0)
		close(probe);
	/* only a socket is ever removed: a path naming anything else is a mistake */
	if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
		fprintf(stderr, "kvd: %s exists and is not a socket; refusing to replace it\n",
			path);
		return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		fprintf(stderr, "kvd: cannot remove the stale socket %s: %s\n", path,
			strerror(errno));
		return -1;
	}
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    chmod(path, 0666) < 0 || listen(fd, 512) < 0) {
		fprintf(stderr, "kvd: cannot listen on %s: %s\n", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/*
 * Socket activation, as sd_listen_fds(3) without libsystemd: systemd passes
 * the listening socket as fd 3 and names this process in $LISTEN_PID and the
 * count in $LISTEN_FDS.  Returns the fd (its path in path), -1 when kvd was
 * not activated, -2 on an error (printed).  The variables are unset either
 * way, so nothing kvd starts mistakes them for its own.
 */
static int activated_socket(char *path, size_t len)
{
	const char *pid_env = getenv("LISTEN_PID"), *fds_env = getenv("LISTEN_FDS");
	struct sockaddr_un a = { 0 };
	socklen_t alen = sizeof(a), olen;
	int fd = 3, type = 0, domain = 0, listening = 0, rc = -1;
	uint64_t pid, nfds;

	if (!pid_env || !fds_env)
		goto out;
	if (parse_uint(pid_env, UINT32_MAX, &pid) || pid != (uint64_t)getpid())
		goto out; /* meant for another process (our parent, say) */
	if (parse_uint(fds_env, INT32_MAX - 3, &nfds)) {
		fprintf(stderr, "kvd: socket activation: bad LISTEN_FDS='%s'\n", fds_env);
		rc = -2;
		goto out;
	}
	if (nfds == 0)
		goto out;
	rc = -2;
	if (nfds != 1) {
		fprintf(stderr,
			"kvd: socket activation: %llu sockets passed; kvd listens on exactly one "
			"(one ListenSequentialPacket= in kvd.socket)\n",
			(unsigned long long)nfds);
		goto out;
	}
	olen = sizeof(int);
	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &olen) < 0) {
		fprintf(stderr, "kvd: socket activation: fd 3 is not a socket: %s\n",
			strerror(errno));
		goto out;
	}
	olen = sizeof(int);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &olen) < 0)
		type = -1;
	olen = sizeof(int);
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &olen) < 0)
		listening = 0;
	if (domain != AF_UNIX || type != SOCK_SEQPACKET || !listening) {
		fprintf(stderr,
			"kvd: socket activation: fd 3 must be a listening AF_UNIX SOCK_SEQPACKET "
			"socket (ListenSequentialPacket=); it is domain %d type %d%s\n",
			domain, type, listening ? "" : ", not listening");
		goto out;
	}
	if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
		fprintf(stderr, "kvd: socket activation: fcntl: %s\n", strerror(errno));
		goto out;
	}
	if (getsockname(fd, (struct sockaddr *)&a, &alen) == 0 &&
	    alen > offsetof(struct sockaddr_un, sun_path) && a.sun_path[0])
		snprintf(path, len, "%.*s", (int)(alen - offsetof(struct sockaddr_un, sun_path)),
			 a.sun_path);
	else
		snprintf(path, len, "(socket-activated fd 3)");
	rc = fd;
out:
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	return rc;
}

int main(int argc, char **argv)
{
	static struct kvd d;
	struct kvd_config *c = &d.cfg;
	static char activated_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 32];
	sigset_t mask;
	bool activated;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int opt, err;

	c->socket_path = KVD_DEFAULT_SOCKET;
	c->threads = ncpu > 0 ? (int)ncpu : 1;
	c->max_keys = 1u << 20;
	c->max_ranks = KV_MAX_RANKS;
	c->max_clients = 4096;
	c->part_bytes = 1u << 20;
	c->inline_bytes = 64u << 10;
	c->direct_max = 1u << 20;
	{
		long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
		c->pinned_limit = pages > 0 && psize > 0 ? (uint64_t)pages * (uint64_t)psize / 2 : 0;
	}
	c->sq_entries = 256;
	c->cq_entries = 512;
	c->max_segs = 256;
	c->allow_gid = -1;
	c->hello_timeout_s = 10;
	c->listen_fd = -1;

	/* the config file first, so the command line overrides it */
	for (int i = 1; i < argc; i++) {
		const char *path = NULL;
		if ((!strcmp(argv[i], "-c") || !strcmp(argv[i], "--config")) && i + 1 < argc)
			path = argv[i + 1];
		else if (!strncmp(argv[i], "--config=", 9))
			path = argv[i] + 9;
		if (path && read_config(c, path))
			return 2;
	}
	while ((opt = getopt_long(argc, argv, "s:c:t:hV", long_opts, NULL)) != -1) {
		const char *name = "?";
		for (const struct option *o = long_opts; o->name; o++)
			if (o->val == opt)
				name = o->name;
		switch (opt) {
		case 'h':
			fputs(usage, stdout);
			return 0;
		case 'V':
			printf("kvd %s\n", KV_VERSION);
			return 0;
		case 'c':
			break;
		case '?':
			fprintf(stderr, "Try 'kvd --help'.\n");
			return 2;
		default:
			if (apply(c, opt, optarg, name))
				return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "kvd: unexpected argument '%s'\nTry 'kvd --help'.\n", argv[optind]);
		return 2;
	}

	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	pthread_sigmask(SIG_BLOCK, &mask, NULL); /* threads inherit it; the signalfd reads them */

	notify_init(); /* before any thread: it unsets variables */
	c->listen_fd = activated_socket(activated_path, sizeof(activated_path));
	if (c->listen_fd == -2)
		return 1;
	activated = c->listen_fd >= 0;
	if (activated) {
		if (socket_path_buf && strcmp(socket_path_buf, activated_path))
			kvd_log("--socket %s ignored: systemd passed a socket listening on %s",
				socket_path_buf, activated_path);
		c->socket_path = activated_path;
	} else {
		c->listen_fd = listen_on(c->socket_path);
		if (c->listen_fd < 0)
			return 1;
	}
	pthread_mutex_init(&d.lock, NULL);
	pthread_mutex_init(&d.uid_lock, NULL);
	d.start = kvd_now();
	err = engine_start(&d);
	if (err) {
		fprintf(stderr, "kvd: cannot start the engine: %s\n", strerror(-err));
		if (!activated)
			unlink(c->socket_path);
		return 1;
	}
	d.gpus = gpu_count();
	if (pin_start(&d))
		kvd_log("cannot start the pinning thread: segments stay pageable");
	kvd_log("kvd %s listening on %s%s (%d reduce threads, parts of %u bytes; %s)", KV_VERSION,
		c->socket_path, activated ? " (socket-activated)" : "", c->threads, c->part_bytes,
		gpu_status());
	err = ctl_run(&d);
	pin_stop_all();
	if (!activated) /* an activated socket's path belongs to systemd */
		unlink(c->socket_path);
	close(c->listen_fd);
	kvd_log("stopped");
	notify_close();
	free(d.uids);
	free(socket_path_buf);
	return err ? 1 : 0;
}
