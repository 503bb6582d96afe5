/* SPDX-License-Identifier: MIT */
/*
 * notify.c - the sd_notify protocol (sd_notify(3), sd_watchdog_enabled(3))
 * in a few lines, without linking libsystemd.
 *
 * systemd hands a Type=notify service the address of a datagram socket in
 * $NOTIFY_SOCKET (a path, or an abstract name when it starts with '@') and,
 * with WatchdogSec=, the watchdog period in $WATCHDOG_USEC (and the pid
 * meant in $WATCHDOG_PID).  Each state change is one datagram of
 * newline-separated VAR=value assignments: READY=1, STATUS=..., STOPPING=1,
 * WATCHDOG=1.  notify_init() reads and unsets those variables once, in
 * main() before any thread starts; after that the state here is read-only
 * and notify_send() may be called from any thread (one sendto() per
 * message, which the kernel keeps whole).  Without $NOTIFY_SOCKET every
 * call is a no-op, so kvd behaves the same outside systemd.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "kvd.h"

static int notify_fd = -1;
static struct sockaddr_un notify_addr;
static socklen_t notify_len;
static uint64_t watchdog_usec;
static uint32_t notify_failed; /* [atomic] a failure was already logged */

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!s || !*s || *s == '-')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

int notify_init(void)
{
	const char *path = getenv("NOTIFY_SOCKET");
	const char *usec = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
	uint64_t v, p;
	size_t n;
	int err = 0;

	/* the watchdog is for this process only: not for a child that inherits it */
	if (parse_u64(usec, &v) == 0 && v > 0 &&
	    (!pid || (parse_u64(pid, &p) == 0 && p == (uint64_t)getpid())))
		watchdog_usec = v;
	else if (usec)
		kvd_log("ignoring WATCHDOG_USEC=%s%s%s", usec, pid ? " WATCHDOG_PID=" : "",
			pid ? pid : "");
	if (!path)
		goto out;
	n = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || n < 2 || n >= sizeof(notify_addr.sun_path)) {
		kvd_log("ignoring NOTIFY_SOCKET=%s: not a socket path or abstract name", path);
		err = -EINVAL;
		goto out;
	}
	notify_addr.sun_family = AF_UNIX;
	memcpy(notify_addr.sun_path, path, n);
	if (path[0] == '@') {
		/* abstract namespace: a leading NUL, and the length counts no trailing NUL */
		notify_addr.sun_path[0] = '\0';
		notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
	} else {
		notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
	}
	notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (notify_fd < 0) {
		err = -errno;
		kvd_log("cannot create the notify socket: %s", strerror(errno));
	}
out:
	/* as sd_notify(unset_environment=1): nothing kvd starts inherits them */
	unsetenv("NOTIFY_SOCKET");
	unsetenv("WATCHDOG_USEC");
	unsetenv("WATCHDOG_PID");
	return err;
}

bool notify_enabled(void)
{
	return notify_fd >= 0;
}

uint64_t notify_watchdog_usec(void)
{
	return notify_fd >= 0 ? watchdog_usec : 0;
}

int notify_send(const char *text)
{
	size_t n = strlen(text);
	ssize_t w;

	if (notify_fd < 0)
		return 0;
	do
		w = sendto(notify_fd, text, n, MSG_NOSIGNAL | MSG_DONTWAIT,
			   (const struct sockaddr *)&notify_addr, notify_len);
	while (w < 0 && errno == EINTR);
	if (w == (ssize_t)n)
		return 0;
	/* once: a manager that went away must not fill the journal */
	if (!__atomic_exchange_n(&notify_failed, 1, __ATOMIC_RELAXED))
		kvd_log("cannot notify the service manager: %s",
			w < 0 ? strerror(errno) : "short write");
	return w < 0 ? -errno : -EIO;
}

int notify_sendf(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	if (notify_fd < 0)
		return 0;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return -EINVAL;
	return notify_send(buf); /* a STATUS= longer than buf is cut, never split */
}

void notify_close(void)
{
	if (notify_fd >= 0)
		close(notify_fd);
	notify_fd = -1;
}
