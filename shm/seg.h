/* SPDX-License-Identifier: MIT */
/*
 * seg.h - shared-memory segments: sealed memfds, their mappings, and passing
 * their descriptors over a SOCK_SEQPACKET socket.
 *
 * A segment is created by kvd only: memfd_create, fallocate to its full size
 * (so a full tmpfs fails here and never later as SIGBUS), then sealed so no
 * party can shrink or grow it.  Both sides map it MAP_SHARED.
 */
#ifndef KV_SHM_SEG_H
#define KV_SHM_SEG_H

#include <stddef.h>
#include <sys/types.h>

#define SEG_SEALS_REQUIRED (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
#define SEG_HUGE_MIN (2u << 20) /* segments this large get MADV_HUGEPAGE */

enum seg_map_flags {
	SEG_MAP_RING = 1 << 0, /* ring pages: MADV_DONTFORK */
	SEG_MAP_RDONLY = 1 << 1,
};

/* Create a sealed segment of size bytes; returns its fd or -errno (-ENOSPC: tmpfs full). */
int seg_create(const char *name, size_t size);

/*
 * Map fd, which must be a segment of at least size bytes carrying the required
 * seals (checked: an fd from a peer is not trusted).  Returns 0 and *addr, or
 * -errno (-EPERM when the seals are missing, -EINVAL when it is too small).
 */
int seg_map(int fd, size_t size, unsigned flags, void **addr);
void seg_unmap(void *addr, size_t size);

/* The size of a segment fd, or -errno. */
ssize_t seg_size(int fd);

/*
 * Send one message with up to SEG_MAX_FDS descriptors; returns 0 or -errno.
 * Never raises SIGPIPE; retries EINTR.
 */
#define SEG_MAX_FDS 4
int seg_send(int sock, const void *buf, size_t len, const int *fds, int nfds);

/*
 * Receive one message of at most cap bytes and its descriptors (opened
 * close-on-exec).  Returns the message length, 0 on EOF, or -errno:
 * -EMSGSIZE for a truncated message or more descriptors than maxfds (any
 * that arrived are closed).  *nfds is set to the number received.
 */
ssize_t seg_recv(int sock, void *buf, size_t cap, int *fds, int maxfds, int *nfds);

#endif /* KV_SHM_SEG_H */
