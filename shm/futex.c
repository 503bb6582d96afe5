/* SPDX-License-Identifier: MIT */
/*
 * futex.c - thin wrappers over futex(2) for words in shared segments.
 */
#include "futex.h"

#include <errno.h>
#include <linux/futex.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int futex_wait(uint32_t *addr, uint32_t expected, int timeout_ms)
{
	struct timespec ts, *tp = NULL;
	long rc;

	if (timeout_ms >= 0) {
		ts.tv_sec = timeout_ms / 1000;
		ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
		tp = &ts;
	}
	rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tp, NULL, 0);
	if (rc == 0)
		return 0;
	switch (errno) {
	case EAGAIN: /* the word had already changed */
	case EINTR:
		return 0;
	case ETIMEDOUT:
		return -ETIMEDOUT;
	default:
		return -errno;
	}
}

int futex_wake(uint32_t *addr, int n)
{
	long rc = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);

	return rc < 0 ? -errno : (int)rc;
}
