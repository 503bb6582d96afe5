/* SPDX-License-Identifier: MIT */
/*
 * futex.h - wait and wake on a 32-bit word in shared memory.
 *
 * The words live in memfd segments mapped by several processes, so these use
 * the shared futex operations (never FUTEX_PRIVATE_FLAG).
 */
#ifndef KV_SHM_FUTEX_H
#define KV_SHM_FUTEX_H

#include <stdint.h>

/*
 * Sleep while *addr == expected, at most timeout_ms (< 0: no limit).
 * Returns 0 when woken, when the word already differed, or on a signal (the
 * caller re-checks its condition either way); -ETIMEDOUT on timeout.
 */
int futex_wait(uint32_t *addr, uint32_t expected, int timeout_ms);

/* Wake up to n sleepers on addr; returns how many woke or -errno. */
int futex_wake(uint32_t *addr, int n);

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

#endif /* KV_SHM_FUTEX_H */
