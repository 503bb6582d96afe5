/* SPDX-License-Identifier: MIT */
/*
 * seg.c - sealed memfd segments and SCM_RIGHTS passing.
 */
#include "seg.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

int seg_create(const char *name, size_t size)
{
	int fd, err;

	if (size == 0)
		return -EINVAL;
	fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	/* reserve every page now: a full tmpfs fails here, never as SIGBUS later */
	do
		err = fallocate(fd, 0, 0, (off_t)size);
	while (err < 0 && errno == EINTR);
	if (err < 0) {
		err = errno == EOPNOTSUPP ? ftruncate(fd, (off_t)size) : -1;
		if (err < 0)
			goto out_close;
	}
	if (fcntl(fd, F_ADD_SEALS, SEG_SEALS_REQUIRED) < 0)
		goto out_close;
	return fd;

out_close:
	err = -errno;
	close(fd);
	return err;
}

ssize_t seg_size(int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	return (ssize_t)st.st_size;
}

int seg_map(int fd, size_t size, unsigned flags, void **addr)
{
	int seals, prot = PROT_READ;
	ssize_t have;
	void *p;

	seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0)
		return -errno;
	if ((seals & SEG_SEALS_REQUIRED) != SEG_SEALS_REQUIRED)
		return -EPERM;
	have = seg_size(fd);
	if (have < 0)
		return (int)have;
	if (size == 0 || (size_t)have < size)
		return -EINVAL;
	if (!(flags & SEG_MAP_RDONLY))
		prot |= PROT_WRITE;
	p = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	/* page-aligned, so 64-byte aligned: the layout's cache-line offsets hold */
	if (size >= SEG_HUGE_MIN)
		(void)madvise(p, size, MADV_HUGEPAGE); /* advice only; fine if refused */
	if ((flags & SEG_MAP_RING) && madvise(p, size, MADV_DONTFORK) < 0) {
		int err = -errno;
		munmap(p, size);
		return err;
	}
	*addr = p;
	return 0;
}

void seg_unmap(void *addr, size_t size)
{
	if (addr)
		munmap(addr, size);
}

int seg_send(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * SEG_MAX_FDS)];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t n;

	if (nfds < 0 || nfds > SEG_MAX_FDS)
		return -EINVAL;
	if (nfds > 0) {
		struct cmsghdr *c;

		memset(&u, 0, sizeof(u));
		msg.msg_control = u.buf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EMSGSIZE;
}

static void close_fds(const int *fds, int n)
{
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

ssize_t seg_recv(int sock, void *buf, size_t cap, int *fds, int maxfds, int *nfds)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * SEG_MAX_FDS)];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = buf, .iov_len = cap };
	struct msghdr msg = { .msg_iov = &iov,
			      .msg_iovlen = 1,
			      .msg_control = u.buf,
			      .msg_controllen = sizeof(u.buf) };
	int got = 0, lost = 0;
	ssize_t n;

	*nfds = 0;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		size_t k;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (got < maxfds && fds)
				fds[got++] = fd;
			else {
				close(fd);
				lost++;
			}
		}
	}
	if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || lost) {
		close_fds(fds, got);
		return -EMSGSIZE;
	}
	*nfds = got;
	return n;
}
