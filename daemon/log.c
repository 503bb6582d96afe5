/* SPDX-License-Identifier: MIT */
/*
 * log.c - one line per event to stderr (the journal adds the time), and the
 * monotonic clock the daemon measures with.
 */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "kvd.h"

void kvd_log(const char *fmt, ...)
{
	char line[1024] = "kvd: ";
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line + 5, sizeof(line) - 6, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	n += 5;
	if ((size_t)n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* one write per line, so lines from several threads never interleave */
	fwrite(line, 1, (size_t)n, stderr);
}

double kvd_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t kvd_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
