/* SPDX-License-Identifier: MIT */
/*
 * dtype.c - element sizes of the API's dtypes, shared by kvd and libkv.
 */
#include "kv.h"

size_t kv_dtype_size(kv_dtype t)
{
	switch (t) {
	case KV_FLOAT32:
	case KV_INT32:
		return 4;
	case KV_FLOAT64:
	case KV_INT64:
		return 8;
	case KV_FLOAT16:
	case KV_BFLOAT16:
		return 2;
	}
	return 0;
}
