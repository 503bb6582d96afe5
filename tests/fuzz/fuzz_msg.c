/* SPDX-License-Identifier: MIT */
/*
 * fuzz_msg.c - libFuzzer target for the control-message codec (shm/msg.c).
 *
 * The input is one datagram as kvd's socket would deliver it.  For every
 * input kv_msg_decode() must return 0 or one of the kv_msg_err codes, with a
 * reason for a failure, and read nothing outside the input (the buffer is
 * exactly the input's size, so ASan sees a read one byte past it).  For an
 * accepted input the codec must be canonical: kv_msg_encode() of the decoded
 * message gives back the same bytes, and an output buffer one byte too
 * small makes it return 0 without writing past the end.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../shm/msg.h"

#define CHECK(cond, ...)                                                                     \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			fprintf(stderr, "fuzz_msg: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                                        \
			fprintf(stderr, "\n");                                               \
			abort();                                                             \
		}                                                                            \
	} while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kv_msg m, again;
	const char *why = (const char *)1; /* decode must overwrite it */
	uint8_t *in = malloc(size ? size : 1), *out, *small;
	size_t n;
	int rc;

	if (!in)
		return 0;
	memcpy(in, data, size); /* a heap copy of exactly size bytes: ASan guards its end */
	rc = kv_msg_decode(in, size, &m, &why);
	if (rc) {
		CHECK(rc >= KV_MSG_EFIELD && rc <= KV_MSG_ESHORT, "decode returned %d", rc);
		CHECK(why != NULL && why != (const char *)1 && why[0], "no reason for %d", rc);
		CHECK(strcmp(kv_msg_strerror(rc), "unknown decode error") != 0, "code %d", rc);
		free(in);
		return 0;
	}
	CHECK(why == NULL, "accepted, but why = '%s'", why);
	CHECK(size >= sizeof(struct kv_msg_hdr) && size <= KV_MSG_MAX, "accepted %zu bytes", size);
	CHECK(m.type > 0 && m.type < KV_MSG_TYPE_MAX, "type %u", m.type);

	/* canonical: the same bytes again, into a buffer of exactly that size */
	out = malloc(size);
	CHECK(out != NULL, "malloc");
	n = kv_msg_encode(&m, out, size);
	CHECK(n == size, "type %u: %zu bytes decoded, %zu encoded", m.type, size, n);
	CHECK(memcmp(out, in, size) == 0, "type %u: re-encoding differs", m.type);

	/* and the re-encoded message decodes to the same fields */
	rc = kv_msg_decode(out, n, &again, &why);
	CHECK(rc == 0, "re-encoded message rejected: %s", why ? why : "?");
	CHECK(again.type == m.type && again.seq == m.seq, "type/seq changed");

	/* one byte too small: 0, and nothing written past the buffer (ASan) */
	small = malloc(size - 1 ? size - 1 : 1);
	CHECK(small != NULL, "malloc");
	n = kv_msg_encode(&m, small, size - 1);
	CHECK(n == 0, "type %u: encode into %zu bytes returned %zu", m.type, size - 1, n);
	free(small);
	free(out);
	free(in);
	return 0;
}
