/* SPDX-License-Identifier: MIT */
/*
 * idle_rank - a rank that joins, inits a key, and then idles for `make
 * bench`'s CPU check: rank 0 waits in a pushpull the others never join (a
 * rank waiting for a round), the others just hold their store open.
 *
 *   KVD_* set as by kvrun; idle_rank SECONDS
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "kv.h"

int main(int argc, char **argv)
{
	int secs = argc > 1 ? atoi(argv[1]) : 10;
	struct kv_options o;
	kv_store *kv;
	float v[1024] = { 0 };
	int rc;

	kv_options_default(&o);
	o.timeout_ms = secs * 1000;
	rc = kv_create("local", &o, &kv);
	if (rc) {
		fprintf(stderr, "idle_rank: %s\n", kv_last_error(NULL));
		return 1;
	}
	rc = kv_init(kv, "idle", v, 1024, KV_FLOAT32);
	if (rc) {
		fprintf(stderr, "idle_rank: init: %s\n", kv_last_error(kv));
		return 1;
	}
	if (kv_rank(kv) == 0)
		kv_pushpull(kv, "idle", v, NULL, 1024, KV_FLOAT32, 0); /* times out */
	else
		sleep((unsigned)secs);
	kv_close(kv);
	return 0;
}
