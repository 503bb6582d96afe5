/* SPDX-License-Identifier: MIT */
/*
 * test_seg.c - sealed memfd segments and passing them between processes.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../shm/seg.h"

Test(seg, create_map_seal)
{
	size_t size = 3 << 20;
	int fd = seg_create("t", size);
	void *p;
	int seals;

	cr_assert_geq(fd, 0, "%s", strerror(-fd));
	cr_assert_eq(seg_size(fd), (ssize_t)size);
	seals = fcntl(fd, F_GET_SEALS);
	cr_assert_eq(seals & SEG_SEALS_REQUIRED, SEG_SEALS_REQUIRED, "seals 0x%x", seals);
	cr_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC, "close-on-exec");
	cr_assert_eq(seg_map(fd, size, 0, &p), 0);
	cr_assert_eq((uintptr_t)p % 64, 0, "64-byte aligned");
	memset(p, 0xab, size);
	cr_assert_eq(((unsigned char *)p)[size - 1], 0xab);

	/* nobody can change its size or remove the seals */
	cr_assert_eq(ftruncate(fd, 4096), -1, "shrink refused");
	cr_assert_eq(errno, EPERM);
	cr_assert_eq(ftruncate(fd, (off_t)size * 2), -1, "grow refused");
	cr_assert_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1, "seals are sealed");
	cr_assert_eq(seg_size(fd), (ssize_t)size);
	seg_unmap(p, size);
	close(fd);
}

Test(seg, refuses_unsealed_or_short)
{
	int fd = memfd_create("plain", MFD_CLOEXEC);
	void *p;
	int sfd;

	cr_assert_geq(fd, 0);
	cr_assert_eq(ftruncate(fd, 8192), 0);
	cr_assert_eq(seg_map(fd, 8192, 0, &p), -EPERM, "an unsealed memfd is refused");
	close(fd);

	sfd = seg_create("short", 4096);
	cr_assert_geq(sfd, 0);
	cr_assert_eq(seg_map(sfd, 8192, 0, &p), -EINVAL, "mapping past the end is refused");
	cr_assert_eq(seg_create("zero", 0), -EINVAL);
	close(sfd);
}

Test(seg, ring_pages_not_inherited)
{
	int fd = seg_create("ring", 4096);
	void *p;
	pid_t pid;
	int status;

	cr_assert_geq(fd, 0);
	cr_assert_eq(seg_map(fd, 4096, SEG_MAP_RING, &p), 0);
	pid = fork();
	if (pid == 0) {
		/* MADV_DONTFORK: the child has no mapping there */
		unsigned char v;
		_exit(mincore(p, 4096, &v) == 0 ? 1 : 0);
	}
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child still had the ring");
	seg_unmap(p, 4096);
	close(fd);
}

Test(seg, fd_passing_shows_same_bytes)
{
	int sv[2];
	pid_t pid;
	int status;
	size_t size = 1 << 20;

	cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) { /* receiver: map, check the pattern, answer with a checksum */
		char buf[64];
		int fds[SEG_MAX_FDS], n;
		ssize_t len;
		void *p;
		uint64_t sum = 0;

		close(sv[0]);
		len = seg_recv(sv[1], buf, sizeof(buf), fds, SEG_MAX_FDS, &n);
		if (len != 5 || n != 1 || memcmp(buf, "hello", 5))
			_exit(2);
		if (seg_map(fds[0], size, 0, &p))
			_exit(3);
		for (size_t i = 0; i < size; i += 4096)
			sum += ((unsigned char *)p)[i];
		((unsigned char *)p)[1] = 0x5a; /* the parent must see this */
		if (seg_send(sv[1], &sum, sizeof(sum), NULL, 0))
			_exit(4);
		/* a shrink through the passed fd is refused too */
		_exit(ftruncate(fds[0], 0) == 0 ? 5 : 0);
	}
	close(sv[1]);
	int fd = seg_create("pass", size);
	unsigned char *p;
	uint64_t want = 0, got = 0;
	int rfds[SEG_MAX_FDS], rn;

	cr_assert_geq(fd, 0);
	cr_assert_eq(seg_map(fd, size, 0, (void **)&p), 0);
	for (size_t i = 0; i < size; i += 4096) {
		p[i] = (unsigned char)(i / 4096 * 7 + 3);
		want += p[i];
	}
	cr_assert_eq(seg_send(sv[0], "hello", 5, &fd, 1), 0);
	cr_assert_eq(seg_recv(sv[0], &got, sizeof(got), rfds, SEG_MAX_FDS, &rn), (ssize_t)sizeof(got));
	cr_assert_eq(rn, 0);
	cr_assert_eq(got, want, "the receiver saw the same bytes");
	cr_assert_eq(p[1], 0x5a, "and we see its writes");
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d",
		  WEXITSTATUS(status));
	cr_assert_eq(seg_size(fd), (ssize_t)size, "still full size");
	seg_unmap(p, size);
	close(fd);
	close(sv[0]);
}

Test(seg, recv_rejects_truncation_and_closes_fds)
{
	int sv[2], fd = seg_create("x", 4096), fds[2] = { fd, fd }, got[1], n;
	char small[4];

	cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv), 0);
	cr_assert_eq(seg_send(sv[0], "0123456789", 10, NULL, 0), 0);
	cr_assert_eq(seg_recv(sv[1], small, sizeof(small), NULL, 0, &n), -EMSGSIZE);
	cr_assert_eq(seg_send(sv[0], "ab", 2, fds, 2), 0);
	cr_assert_eq(seg_recv(sv[1], small, sizeof(small), got, 1, &n), -EMSGSIZE,
		     "more fds than asked for");
	cr_assert_eq(n, 0);
	close(sv[0]);
	cr_assert_eq(seg_recv(sv[1], small, sizeof(small), got, 1, &n), 0, "EOF");
	close(sv[1]);
	close(fd);
}
