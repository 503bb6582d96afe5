/* SPDX-License-Identifier: MIT */
/*
 * test_service.c - kvd as a systemd service, without systemd as PID 1: the
 * unit files pass `systemd-analyze verify`, sysusers.d and tmpfiles.d make
 * the user and /run/kvd, kvd takes an activated socket (from
 * systemd-socket-activate, and from this test by hand) and speaks the
 * sd_notify protocol to a datagram socket the test reads (READY=1 only when
 * a request is answered, STATUS= on joins and leaves, WATCHDOG=1, STOPPING=1),
 * and `make install` gives a kv.pc that links programs, shared and static.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "../../shm/msg.h"

/* ------------------------------------------------------------------ helpers */

/* Run a shell command line; its exit status (128+N for signal N). */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[8192];
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
		return "";
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

static int have(const char *prog)
{
	return sh("command -v %s >/dev/null 2>&1", prog) == 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The absolute path of a built program. */
static const char *abs_bin(const char *name, char *buf, size_t len)
{
	char rel[PATH_MAX];

	bin_path(name, rel, sizeof(rel));
	if (!realpath(rel, buf))
		snprintf(buf, len, "%s", rel);
	return buf;
}

/* What sd_notify datagrams kvd sent, as the service manager would read them. */
struct notify_rx {
	int fd;
	char addr[108]; /* NOTIFY_SOCKET value */
	char log[16384]; /* every datagram so far but pings, for failure messages */
	size_t loglen;
	int watchdogs;
};

/* Bind a datagram socket at path, or in the abstract namespace when path is NULL. */
static void notify_listen(struct notify_rx *n, const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	socklen_t alen;

	memset(n, 0, sizeof(*n));
	n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(n->fd, 0);
	if (path) {
		snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
		snprintf(n->addr, sizeof(n->addr), "%s", path);
		alen = sizeof(a);
	} else {
		snprintf(n->addr, sizeof(n->addr), "@kvtest-notify-%d-%ld", (int)getpid(),
			 (long)time(NULL));
		memcpy(a.sun_path + 1, n->addr + 1, strlen(n->addr) - 1);
		alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(n->addr));
	}
	cr_assert_eq(bind(n->fd, (struct sockaddr *)&a, alen), 0, "bind %s: %s", n->addr,
		     strerror(errno));
}

/*
 * Read datagrams until one has a line starting with want (copied to got), or
 * timeout_s passes; returns 1 when found.  WATCHDOG=1 lines are counted.
 */
static int notify_wait(struct notify_rx *n, const char *want, double timeout_s, char *got,
		       size_t gotlen)
{
	double end = now_s() + timeout_s;

	for (;;) {
		char buf[4097];
		struct pollfd p = { .fd = n->fd, .events = POLLIN };
		double left = end - now_s();
		ssize_t r;
		int found = 0;

		if (left <= 0 || poll(&p, 1, (int)(left * 1000) + 1) <= 0)
			return 0;
		r = recv(n->fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);
		if (r <= 0)
			continue;
		buf[r] = '\0';
		/* pings are only counted, so that failure messages stay readable */
		if (strcmp(buf, "WATCHDOG=1") && n->loglen + (size_t)r + 4 < sizeof(n->log)) {
			memcpy(n->log + n->loglen, buf, (size_t)r);
			n->loglen += (size_t)r;
			memcpy(n->log + n->loglen, " | ", 4);
			n->loglen += 3;
		}
		for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
			if (!strcmp(line, "WATCHDOG=1"))
				n->watchdogs++;
			if (!found && want && !strncmp(line, want, strlen(want))) {
				found = 1;
				if (got)
					snprintf(got, gotlen, "%s", line);
			}
		}
		if (found)
			return 1;
	}
}

/* One STATUS_REQ on an open connection, answered within timeout_ms? */
static int request_status(int fd, int timeout_ms)
{
	struct kv_msg m = { .type = KV_MSG_STATUS_REQ, .seq = 7 };
	struct pollfd p = { .fd = fd, .events = POLLIN };
	uint8_t buf[KV_MSG_MAX];
	struct kv_msg r;
	const char *why;
	size_t n;
	ssize_t got;

	m.u.status_req.what = KV_STATUS_TEXT;
	n = kv_msg_encode(&m, buf, sizeof(buf));
	if (!n || send(fd, buf, n, MSG_NOSIGNAL) != (ssize_t)n)
		return 0;
	if (poll(&p, 1, timeout_ms) <= 0)
		return 0;
	got = recv(fd, buf, sizeof(buf), 0);
	return got > 0 && kv_msg_decode(buf, (size_t)got, &r, &why) == 0 &&
	       r.type == KV_MSG_STATUS && r.seq == 7;
}

static int connect_to(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		fd = -1;
	}
	return fd;
}

/* SIGTERM and reap; kvd's exit status, or -1 after a SIGKILL. */
static int stop_pid(pid_t pid)
{
	int st;

	kill(pid, SIGTERM);
	for (int i = 0; i < 1000; i++) {
		if (waitpid(pid, &st, WNOHANG) == pid)
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		usleep(10000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return -1;
}

static void rm_rf(const char *dir)
{
	if (dir[0] == '/' && strncmp(dir, "/tmp/", 5) == 0)
		sh("rm -rf '%s'", dir);
}

/* ------------------------------------------------------------------ the units */

/* Copy systemd/NAME into dir, with ExecStart pointing at the built kvd. */
static void stage_unit(const char *dir, const char *name)
{
	char kvd[PATH_MAX];

	abs_bin("kvd", kvd, sizeof(kvd));
	cr_assert_eq(sh("sed 's|^ExecStart=/usr/sbin/kvd|ExecStart=%s|' systemd/%s > %s/%s", kvd,
			name, dir, name),
		     0, "systemd/%s missing (the test runs from the repository root)", name);
}

Test(service, units_pass_systemd_analyze_verify, .timeout = 60)
{
	char dir[] = "/tmp/kvtest-units.XXXXXX", out[PATH_MAX];
	const char *text;
	int rc;

	if (!have("systemd-analyze"))
		cr_skip_test("systemd-analyze is not installed (Debian package: systemd)");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(out, sizeof(out), "%s/verify.out", dir);

	/* does verify work at all here (no PID 1 systemd)?  A trivial unit says. */
	sh("printf '[Service]\\nType=oneshot\\nExecStart=/bin/true\\n' > %s/kvtest-probe.service",
	   dir);
	if (sh("systemd-analyze verify --man=no %s/kvtest-probe.service > %s 2>&1", dir, out)) {
		text = slurp(out);
		rm_rf(dir);
		cr_skip_test("systemd-analyze verify cannot run in this environment: %s", text);
	}

	stage_unit(dir, "kvd.service");
	stage_unit(dir, "kvd.socket");
	rc = sh("cd %s && systemd-analyze verify --man=no kvd.service kvd.socket > %s 2>&1", dir,
		out);
	text = slurp(out);
	/* every complaint names the unit: unknown keys, bad values, missing binaries */
	cr_expect_eq(rc, 0, "systemd-analyze verify exited %d:\n%s", rc, text);
	cr_expect(!strstr(text, "kvd.service") && !strstr(text, "kvd.socket"),
		  "systemd-analyze verify complained:\n%s", text);

	/* and a broken copy is caught, so the check above is not vacuous */
	sh("sed -i 's/^Type=notify/Type=notifyy/' %s/kvd.service", dir);
	sh("cd %s && systemd-analyze verify --man=no kvd.service > %s 2>&1", dir, out);
	cr_expect(strstr(slurp(out), "notifyy") != NULL,
		  "a bad Type= went unnoticed by systemd-analyze verify:\n%s", slurp(out));

	/* the security review, when this systemd has --offline (252 and later) */
	stage_unit(dir, "kvd.service");
	if (sh("cd %s && systemd-analyze security --offline=yes --threshold=20 kvd.service"
	       " > %s 2>&1",
	       dir, out) == 0 || strstr(slurp(out), "Overall exposure")) {
		text = strstr(slurp(out), "Overall exposure level for kvd.service: ");
		cr_assert_not_null(text, "no exposure figure in:\n%s", slurp(out));
		double exposure = strtod(text + strlen("Overall exposure level for kvd.service: "),
					 NULL);
		cr_log_info("systemd-analyze security kvd.service: exposure %.1f", exposure);
		/* 1.1 when written; hardening that slipped would show here */
		cr_expect_leq(exposure, 1.5, "exposure %.1f:\n%s", exposure, slurp(out));
	}
	rm_rf(dir);
}

Test(service, sysusers_and_tmpfiles_make_the_user_and_run_dir, .timeout = 30)
{
	char root[] = "/tmp/kvtest-root.XXXXXX", path[PATH_MAX], out[PATH_MAX], line[512];
	struct stat st;
	FILE *f;
	long uid = -1, gid = -1;
	int rc;

	if (!have("systemd-sysusers") || !have("systemd-tmpfiles"))
		cr_skip_test("systemd-sysusers or systemd-tmpfiles missing (package: systemd)");
	cr_assert_not_null(mkdtemp(root));
	snprintf(path, sizeof(path), "%s/etc", root);
	cr_assert_eq(mkdir(path, 0755), 0);
	/* with --root, a relative configuration path would be looked up under it */
	snprintf(out, sizeof(out), "%s/out", root);
	rc = sh("systemd-sysusers --root=%s \"$PWD/systemd/kvd.sysusers\" > %s 2>&1", root, out);
	cr_assert_eq(rc, 0, "systemd-sysusers: %s", slurp(out));
	snprintf(path, sizeof(path), "%s/etc/passwd", root);
	f = fopen(path, "r");
	cr_assert_not_null(f, "sysusers wrote no %s", path);
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "kvd:", 4))
			sscanf(line, "kvd:x:%ld:%ld:", &uid, &gid);
	fclose(f);
	cr_assert_gt(uid, 0, "no system user kvd in %s", path);
	cr_assert_lt(uid, 1000, "kvd is not a system user (uid %ld)", uid);

	rc = sh("systemd-tmpfiles --create --root=%s \"$PWD/systemd/kvd.tmpfiles\" > %s 2>&1",
		root, out);
	cr_assert_eq(rc, 0, "systemd-tmpfiles: %s", slurp(out));
	snprintf(path, sizeof(path), "%s/run/kvd", root);
	cr_assert_eq(stat(path, &st), 0, "tmpfiles made no %s", path);
	cr_expect(S_ISDIR(st.st_mode));
	cr_expect_eq(st.st_mode & 07777, 0750, "mode %o", st.st_mode & 07777);
	cr_expect_eq((long)st.st_uid, uid);
	cr_expect_eq((long)st.st_gid, gid);
	rm_rf(root);
}

/* ------------------------------------------------------------------ activation + notify */

Test(service, systemd_socket_activate_and_notify, .timeout = 60)
{
	char dir[] = "/tmp/kvtest-sa.XXXXXX", sock[128], npath[128], log[128];
	char kvd[PATH_MAX], kvctl[PATH_MAX], out[128], got[256];
	struct notify_rx n;
	struct stat st;
	pid_t pid;
	int fd, rc;

	if (!have("systemd-socket-activate"))
		cr_skip_test("systemd-socket-activate is not installed (Debian package: systemd)");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/kvd.sock", dir);
	snprintf(npath, sizeof(npath), "%s/notify", dir);
	snprintf(log, sizeof(log), "%s/kvd.log", dir);
	snprintf(out, sizeof(out), "%s/kvctl.out", dir);
	abs_bin("kvd", kvd, sizeof(kvd));
	abs_bin("kvctl", kvctl, sizeof(kvctl));
	notify_listen(&n, npath);

	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		char e1[160], e2[64];
		int lfd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		if (lfd >= 0) {
			dup2(lfd, 1);
			dup2(lfd, 2);
		}
		/* systemd-socket-activate passes only the variables named with -E */
		snprintf(e1, sizeof(e1), "NOTIFY_SOCKET=%s", n.addr);
		snprintf(e2, sizeof(e2), "WATCHDOG_USEC=200000");
		execlp("systemd-socket-activate", "systemd-socket-activate", "--seqpacket", "-l",
		       sock, "-E", e1, "-E", e2, kvd, (char *)NULL);
		_exit(127);
	}
	/* it binds, then execs kvd (same pid, so LISTEN_PID fits) on the first connect */
	fd = -1;
	for (int i = 0; i < 500 && fd < 0; i++) {
		fd = connect_to(sock);
		if (fd < 0)
			usleep(10000);
	}
	cr_assert_geq(fd, 0, "systemd-socket-activate never listened on %s:\n%s", sock, slurp(log));

	cr_assert(notify_wait(&n, "READY=1", 15, NULL, 0), "no READY=1; got: %s\nkvd log:\n%s",
		  n.log, slurp(log));
	/* ready means serving: the connection that woke kvd, and a new one at once */
	cr_expect(request_status(fd, 5000), "the activating connection got no answer");
	close(fd);
	rc = sh("%s --socket %s status > %s 2>&1", kvctl, sock, out);
	cr_expect_eq(rc, 0, "kvctl status right after READY=1 exited %d:\n%s", rc, slurp(out));
	cr_expect(strstr(slurp(out), "kvd ") != NULL, "kvctl status printed:\n%s", slurp(out));
	cr_expect(strstr(n.log, "STATUS=0 jobs, 0 ranks") != NULL, "READY without STATUS: %s",
		  n.log);

	/* a rank joins and leaves: STATUS= follows (at most a second late) */
	kv_store *kv = NULL;
	struct kv_options o;
	kv_options_default(&o);
	o.socket = sock;
	o.job = "svcjob";
	o.rank = 0;
	o.num_workers = 1;
	o.timeout_ms = 10000;
	cr_assert_eq(kv_create("local", &o, &kv), KV_OK, "%s", kv_last_error(NULL));
	cr_expect(notify_wait(&n, "STATUS=1 job, 1 rank", 5, got, sizeof(got)),
		  "no STATUS= after a join; got: %s", n.log);
	kv_close(kv);
	cr_expect(notify_wait(&n, "STATUS=0 jobs, 0 ranks", 5, got, sizeof(got)),
		  "no STATUS= after a leave; got: %s", n.log);

	/* WatchdogSec=0.2s: a ping every 0.1 s */
	notify_wait(&n, NULL, 1.0, NULL, 0);
	cr_expect_geq(n.watchdogs, 3, "%d WATCHDOG=1 in over a second: %s", n.watchdogs, n.log);

	kill(pid, SIGTERM);
	cr_expect(notify_wait(&n, "STOPPING=1", 10, NULL, 0), "no STOPPING=1; got: %s", n.log);
	rc = stop_pid(pid);
	cr_expect_eq(rc, 0, "kvd exited %d:\n%s", rc, slurp(log));
	cr_expect(strstr(slurp(log), "(socket-activated)") != NULL, "kvd log:\n%s", slurp(log));
	/* the path belongs to whoever made the socket, not to kvd */
	cr_expect_eq(stat(sock, &st), 0, "kvd removed the activated socket %s", sock);
	close(n.fd);
	rm_rf(dir);
}

/*
 * Socket activation by hand, as systemd does it: the listening socket as fd
 * 3, LISTEN_PID=kvd's pid, LISTEN_FDS=1, NOTIFY_SOCKET in the abstract
 * namespace.  fd3 is the socket to pass (-1: none); env adds variables.
 */
static pid_t spawn_activated(int fd3, const char *log, const char *const *env,
			     const char *const *args)
{
	char kvd[PATH_MAX];
	const char *argv[16];
	int n = 0;
	pid_t pid;

	abs_bin("kvd", kvd, sizeof(kvd));
	argv[n++] = kvd;
	for (int i = 0; args && args[i] && n < 15; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	pid = fork();
	if (pid != 0)
		return pid;
	int lfd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	char buf[32];

	if (lfd >= 0) {
		dup2(lfd, 1);
		dup2(lfd, 2);
	}
	if (fd3 >= 0) {
		if (fd3 != 3)
			dup2(fd3, 3); /* dup2 leaves FD_CLOEXEC off */
		else
			fcntl(3, F_SETFD, 0);
		snprintf(buf, sizeof(buf), "%d", (int)getpid()); /* exec keeps the pid */
		setenv("LISTEN_PID", buf, 1);
		setenv("LISTEN_FDS", "1", 1);
	}
	for (int i = 0; env && env[i]; i++)
		putenv((char *)env[i]);
	execv(kvd, (char *const *)argv);
	_exit(127);
}

static int listen_seqpacket(const char *path, int type)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	cr_assert_geq(fd, 0);
	cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0, "bind %s: %s", path,
		     strerror(errno));
	cr_assert_eq(listen(fd, 64), 0);
	return fd;
}

Test(service, activated_by_hand_with_abstract_notify_socket, .timeout = 60)
{
	char dir[] = "/tmp/kvtest-act.XXXXXX", sock[128], log[128], out[128];
	char kvctl[PATH_MAX], ns[160], other[160];
	const char *env[4], *args[3];
	struct notify_rx n;
	struct stat st;
	pid_t pid;
	int lfd, rc;

	cr_assert_not_null(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/kvd.sock", dir);
	snprintf(log, sizeof(log), "%s/kvd.log", dir);
	snprintf(out, sizeof(out), "%s/kvctl.out", dir);
	snprintf(other, sizeof(other), "%s/not-this.sock", dir);
	abs_bin("kvctl", kvctl, sizeof(kvctl));
	notify_listen(&n, NULL);
	snprintf(ns, sizeof(ns), "NOTIFY_SOCKET=%s", n.addr);
	env[0] = ns;
	env[1] = "WATCHDOG_USEC=200000";
	env[2] = NULL;
	/* --socket names another path: the activated socket wins */
	args[0] = "--socket";
	args[1] = other;
	args[2] = NULL;
	lfd = listen_seqpacket(sock, SOCK_SEQPACKET);
	pid = spawn_activated(lfd, log, env, args);
	cr_assert_gt(pid, 0);

	cr_assert(notify_wait(&n, "READY=1", 15, NULL, 0), "no READY=1; got: %s\nkvd log:\n%s",
		  n.log, slurp(log));
	rc = sh("%s --socket %s status > %s 2>&1", kvctl, sock, out);
	cr_expect_eq(rc, 0, "kvctl status right after READY=1 exited %d:\n%s", rc, slurp(out));
	cr_expect(notify_wait(&n, "WATCHDOG=1", 2, NULL, 0), "no WATCHDOG=1: %s", n.log);
	cr_expect_neq(stat(other, &st), 0, "kvd bound --socket %s despite activation", other);

	kill(pid, SIGTERM);
	cr_expect(notify_wait(&n, "STOPPING=1", 10, NULL, 0), "no STOPPING=1; got: %s", n.log);
	rc = stop_pid(pid);
	cr_expect_eq(rc, 0, "kvd exited %d:\n%s", rc, slurp(log));
	cr_expect_eq(stat(sock, &st), 0, "kvd removed the activated socket %s", sock);
	/* kvd held a copy of the listening socket, and nobody else accepted on it */
	close(lfd);
	close(n.fd);
	rm_rf(dir);
}

Test(service, activation_refuses_a_stream_socket, .timeout = 30)
{
	char dir[] = "/tmp/kvtest-bad.XXXXXX", sock[128], log[128];
	pid_t pid;
	int lfd, rc;

	cr_assert_not_null(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/kvd.sock", dir);
	snprintf(log, sizeof(log), "%s/kvd.log", dir);
	lfd = listen_seqpacket(sock, SOCK_STREAM); /* ListenStream= by mistake */
	pid = spawn_activated(lfd, log, NULL, NULL);
	cr_assert_gt(pid, 0);
	close(lfd);
	for (int i = 0; i < 1000; i++) {
		int st;
		if (waitpid(pid, &st, WNOHANG) == pid) {
			rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
			cr_expect_eq(rc, 1, "kvd exited %d:\n%s", rc, slurp(log));
			cr_expect(strstr(slurp(log), "SOCK_SEQPACKET") != NULL, "kvd said:\n%s",
				  slurp(log));
			rm_rf(dir);
			return;
		}
		usleep(10000);
	}
	stop_pid(pid);
	rm_rf(dir);
	cr_assert_fail("kvd took a SOCK_STREAM socket and ran");
}

/*
 * Variables meant for another process: LISTEN_PID of our parent, say.  kvd
 * binds its own socket (and removes it at exit); WATCHDOG_PID of another
 * process means no pings.
 */
Test(service, variables_for_another_pid_are_ignored, .timeout = 60)
{
	char dir[] = "/tmp/kvtest-oth.XXXXXX", sock[128], log[128], ns[160];
	const char *env[6], *args[3];
	struct notify_rx n;
	struct stat st;
	pid_t pid;
	int fd, rc;

	cr_assert_not_null(mkdtemp(dir));
	snprintf(sock, sizeof(sock), "%s/kvd.sock", dir);
	snprintf(log, sizeof(log), "%s/kvd.log", dir);
	notify_listen(&n, NULL);
	snprintf(ns, sizeof(ns), "NOTIFY_SOCKET=%s", n.addr);
	env[0] = ns;
	env[1] = "WATCHDOG_USEC=200000";
	env[2] = "WATCHDOG_PID=1";
	env[3] = "LISTEN_PID=1";
	env[4] = "LISTEN_FDS=1";
	env[5] = NULL;
	args[0] = "--socket";
	args[1] = sock;
	args[2] = NULL;
	pid = spawn_activated(-1, log, env, args);
	cr_assert_gt(pid, 0);
	cr_assert(notify_wait(&n, "READY=1", 15, NULL, 0), "no READY=1; got: %s\nkvd log:\n%s",
		  n.log, slurp(log));
	fd = connect_to(sock);
	cr_expect_geq(fd, 0, "kvd did not bind its own socket %s", sock);
	cr_expect(fd >= 0 && request_status(fd, 5000), "no answer on kvd's own socket");
	if (fd >= 0)
		close(fd);
	notify_wait(&n, NULL, 0.5, NULL, 0);
	cr_expect_eq(n.watchdogs, 0, "WATCHDOG=1 sent for WATCHDOG_PID=1: %s", n.log);
	rc = stop_pid(pid);
	cr_expect_eq(rc, 0, "kvd exited %d:\n%s", rc, slurp(log));
	cr_expect_neq(stat(sock, &st), 0, "kvd left its own socket %s behind", sock);
	close(n.fd);
	rm_rf(dir);
}

/* ------------------------------------------------------------------ make install, kv.pc */

static const char link_prog[] =
	"#include <kv.h>\n"
	"#include <stdio.h>\n"
	"int main(void)\n"
	"{\n"
	"	kv_store *kv;\n"
	"	float w[3] = { 1.5f, -2.0f, 4.25f }, out[3] = { 0 };\n"
	"	int rc = kv_create(\"teststore\", NULL, &kv);\n"
	"	if (rc) { printf(\"kv_create: %s\\n\", kv_strerror(rc)); return 1; }\n"
	"	rc = kv_broadcast(kv, \"w\", w, out, 3, KV_FLOAT32, 0);\n"
	"	printf(\"%s %d %g %g %g\\n\", kv_type(kv), rc, out[0], out[1], out[2]);\n"
	"	kv_close(kv);\n"
	"	return rc || out[0] != 1.5f || out[1] != -2.0f || out[2] != 4.25f;\n"
	"}\n";

Test(service, make_install_then_link_with_pkg_config, .timeout = 120)
{
	char dir[] = "/tmp/kvtest-inst.XXXXXX", cwd[PATH_MAX], b[PATH_MAX], san[64] = "";
	char sanflags[96] = "", log[PATH_MAX + 32], src[PATH_MAX + 32];
	const char *build = getenv("KVD_BUILD"), *text;
	FILE *f;
	int rc;

	if (!have("pkg-config"))
		cr_skip_test("pkg-config is not installed");
	cr_assert_not_null(getcwd(cwd, sizeof(cwd)));
	cr_assert_eq(access("Makefile", R_OK), 0, "the test runs from the repository root");
	cr_assert_not_null(mkdtemp(dir));
	/* the build this test binary belongs to, relative when inside the tree */
	snprintf(b, sizeof(b), "%s", build && *build ? build : "build");
	if (!strncmp(b, cwd, strlen(cwd)) && b[strlen(cwd)] == '/')
		memmove(b, b + strlen(cwd) + 1, strlen(b + strlen(cwd) + 1) + 1);
	const char *s = strstr(b, "san-");
	if (s) { /* build/san-address-undefined: SAN=address,undefined */
		snprintf(san, sizeof(san), "%s", s + 4);
		for (char *p = san; *p; p++)
			if (*p == '-')
				*p = ',';
		snprintf(sanflags, sizeof(sanflags), "-fsanitize=%s", san);
	}
	snprintf(log, sizeof(log), "%s/make.log", dir);
	/* MAKEFLAGS of the make check around us would hand over its jobserver */
	rc = sh("env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s install B=%s SAN=%s "
		"DESTDIR=%s PREFIX=/usr > %s 2>&1",
		b, san, dir, log);
	cr_assert_eq(rc, 0, "make install failed (%d):\n%s", rc, slurp(log));

	/* what went where */
	static const char *const files[] = {
		"usr/sbin/kvd", "usr/bin/kvctl", "usr/bin/kvrun", "usr/lib/libkv.so.0.1.0",
		"usr/lib/libkv.a", "usr/include/kv.h", "usr/lib/pkgconfig/kv.pc",
		"usr/lib/systemd/system/kvd.service", "usr/lib/systemd/system/kvd.socket",
		"usr/lib/sysusers.d/kvd.conf", "usr/lib/tmpfiles.d/kvd.conf",
		"usr/share/doc/kvd/README.md",
	};
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		char p[PATH_MAX];
		snprintf(p, sizeof(p), "%s/%s", dir, files[i]);
		cr_expect_eq(access(p, R_OK), 0, "make install left no %s", files[i]);
	}
	cr_expect_eq(sh("test \"$(readlink %s/usr/lib/libkv.so.0)\" = libkv.so.0.1.0 && "
			"test \"$(readlink %s/usr/lib/libkv.so)\" = libkv.so.0",
			dir, dir),
		     0, "soname links wrong");
	cr_expect_eq(sh("readelf -d %s/usr/lib/libkv.so.0.1.0 | grep -q 'SONAME.*libkv.so.0]'",
			dir),
		     0, "libkv.so has no soname libkv.so.0");
	cr_expect_eq(sh("grep -qx 'ExecStart=/usr/sbin/kvd $KVD_OPTS' "
			"%s/usr/lib/systemd/system/kvd.service",
			dir),
		     0, "kvd.service's ExecStart does not name /usr/sbin/kvd");

	snprintf(src, sizeof(src), "%s/app.c", dir);
	f = fopen(src, "w");
	cr_assert_not_null(f);
	fputs(link_prog, f);
	fclose(f);

	/* shared: kv.pc from the staging tree, through PKG_CONFIG_SYSROOT_DIR */
	rc = sh("cd %s && flags=$(PKG_CONFIG_SYSROOT_DIR=%s PKG_CONFIG_LIBDIR=%s/usr/lib/pkgconfig "
		"PKG_CONFIG_PATH= pkg-config --cflags --libs kv) && echo \"cc $flags\" > %s && "
		"cc %s -o app-shared app.c $flags >> %s 2>&1 && "
		"LD_LIBRARY_PATH=%s/usr/lib ./app-shared >> %s 2>&1 && "
		"readelf -d app-shared | grep -q 'NEEDED.*libkv.so.0'",
		dir, dir, dir, log, sanflags, log, dir, log);
	text = slurp(log);
	cr_expect_eq(rc, 0, "shared link or run failed (%d):\n%s", rc, text);
	cr_expect(strstr(text, "teststore 0 1.5 -2 4.25") != NULL, "app printed:\n%s", text);

	/*
	 * static: --static adds Libs.private (the static CUDA runtime and what it
	 * needs).  The prefix is redefined rather than a sysroot given, which would
	 * also move the CUDA toolkit's -L into the staging tree; -Bstatic picks
	 * libkv.a over libkv.so next to it.
	 */
	rc = sh("cd %s && flags=$(PKG_CONFIG_LIBDIR=%s/usr/lib/pkgconfig PKG_CONFIG_PATH= "
		"pkg-config --define-variable=prefix=%s/usr --static --cflags --libs kv | "
		"sed 's/-lkv/-Wl,-Bstatic -lkv -Wl,-Bdynamic/') && echo \"cc $flags\" > %s && "
		"cc %s -o app-static app.c $flags >> %s 2>&1 && ./app-static >> %s 2>&1 && "
		"! readelf -d app-static | grep -q 'NEEDED.*libkv'",
		dir, dir, dir, log, sanflags, log, log);
	text = slurp(log);
	cr_expect_eq(rc, 0, "static link or run failed (%d):\n%s", rc, text);
	cr_expect(strstr(text, "teststore 0 1.5 -2 4.25") != NULL, "app printed:\n%s", text);

	/* uninstall takes back every file (directories stay, as usual) */
	rc = sh("env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s uninstall B=%s SAN=%s "
		"DESTDIR=%s PREFIX=/usr > %s 2>&1",
		b, san, dir, log);
	cr_expect_eq(rc, 0, "make uninstall failed (%d):\n%s", rc, slurp(log));
	rc = sh("find %s/usr -type f -o -type l > %s; test ! -s %s", dir, log, log);
	cr_expect_eq(rc, 0, "make uninstall left files behind:\n%s", slurp(log));
	rm_rf(dir);
}
