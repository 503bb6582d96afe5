/* SPDX-License-Identifier: MIT */
/*
 * kvbench - measure kvd: ranks doing pushpull (or broadcast, push, pull) on
 * keys of given sizes, every result checked, timings in the form of
 * nccl-tests.
 *
 * kvbench forks its own ranks (and starts a private kvd when none answers).
 * The ranks share an anonymous mapping for a barrier and the timings: before
 * each timed step every rank refills its buffers and meets the others at the
 * barrier, so a step's time is the op's alone and the step's time is the
 * slowest rank's.  Results are checked after each step, outside the timing.
 *
 * A step issues one op on each of --keys keys; with --async D the ops are
 * pushpull_async with at most D in flight, and with one key --async D issues
 * D rounds on it (D buffers).  algbw = bytes of all the step's ops / step
 * time; busbw = algbw * 2(n-1)/n, as nccl-tests counts an allreduce.
 */
#include <errno.h>
#include <getopt.h>
#include <linux/futex.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "kv.h"
#include "../kernels/reduce.h"

static const char usage[] =
	"Usage: kvbench [OPTION]...\n"
	"Measure kvd with ranks of its own; every result is checked.\n"
	"\n"
	"  -n, --ranks N          ranks (default 2)\n"
	"      --op OP            pushpull (default), broadcast, push or pull\n"
	"      --sizes LIST       bytes per key, comma-separated, K/M/G suffixes\n"
	"                         (default 4K,64K,1M,16M,64M,256M)\n"
	"      --dtype T          f32 (default), f16, bf16 or f64\n"
	"      --iters N          timed steps per size (default 20)\n"
	"      --warmup N         untimed steps first (default 5)\n"
	"      --zero-copy        buffers from kv_alloc (nothing copied in the client)\n"
	"      --async D          pushpull_async with up to D ops in flight\n"
	"      --keys K           K keys per step, one op each (default 1)\n"
	"      --json             one JSON object instead of the table\n"
	"  -s, --socket PATH      kvd's socket (default $KVD_SOCKET, else /run/kvd/kvd.sock;\n"
	"                         a private kvd is started when none answers)\n"
	"      --kvd-arg ARG      pass ARG to a private kvd (repeatable)\n"
	"  -h, --help             show this help and exit\n"
	"\n"
	"Columns: size (bytes per key), count (elements per key), type, p50 and p99 of\n"
	"the step time in microseconds, algbw = bytes of the step's ops / time,\n"
	"busbw = algbw * 2(n-1)/n, algbw itself with one rank (GB/s = 1e9 bytes/s).\n"
	"Exit status: 0 when every result was right, 1 on a wrong result or a failed\n"
	"op, 2 on a bad command line.\n";

enum op { OP_PUSHPULL, OP_BCAST, OP_PUSH, OP_PULL };
static const char *const op_names[] = { "pushpull", "broadcast", "push", "pull" };

struct cfg {
	int n, iters, warmup, async, keys, json, zero_copy;
	enum op op;
	kv_dtype dtype;
	const char *dname;
	size_t sizes[32];
	int nsizes;
	const char *sock;
	char job[64];
};

struct shared {
	uint32_t count, gen; /* barrier */
	uint32_t failed;
	uint32_t progress;
	char why[256];
	double t[]; /* [size][rank][iter] step times in seconds */
};

static struct cfg C;
static struct shared *S;

static void barrier(void)
{
	uint32_t gen = __atomic_load_n(&S->gen, __ATOMIC_ACQUIRE);

	if (__atomic_add_fetch(&S->count, 1, __ATOMIC_ACQ_REL) == (uint32_t)C.n) {
		__atomic_store_n(&S->count, 0, __ATOMIC_RELAXED);
		__atomic_add_fetch(&S->gen, 1, __ATOMIC_RELEASE);
		syscall(SYS_futex, &S->gen, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
		return;
	}
	for (int spin = 0; __atomic_load_n(&S->gen, __ATOMIC_ACQUIRE) == gen; spin++) {
		if (__atomic_load_n(&S->failed, __ATOMIC_RELAXED))
			_exit(1);
		if (spin > 2000) {
			struct timespec ts = { 0, 50 * 1000000L };
			syscall(SYS_futex, &S->gen, FUTEX_WAIT, gen, &ts, NULL, 0);
		}
	}
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int parse_size(const char *s, size_t *out)
{
	char *end;
	double v = strtod(s, &end);
	size_t mul = 1;

	if (end == s || v <= 0)
		return -1;
	switch (*end) {
	case 'k': case 'K': mul = 1u << 10; end++; break;
	case 'm': case 'M': mul = 1u << 20; end++; break;
	case 'g': case 'G': mul = 1u << 30; end++; break;
	default: break;
	}
	if (*end == 'i')
		end++;
	if (*end == 'B')
		end++;
	if (*end)
		return -1;
	*out = (size_t)(v * (double)mul);
	return *out ? 0 : -1;
}

/* The value rank r contributes at element i of step s: small integers, exact in every dtype. */
static double val(int r, size_t i, int s)
{
	return (double)((r + 1) + (int)((i + (size_t)s) % 7));
}

static void put(void *buf, size_t i, double v)
{
	switch (C.dtype) {
	case KV_FLOAT32: ((float *)buf)[i] = (float)v; break;
	case KV_FLOAT64: ((double *)buf)[i] = v; break;
	case KV_FLOAT16: ((uint16_t *)buf)[i] = float_to_half((float)v); break;
	case KV_BFLOAT16: ((uint16_t *)buf)[i] = float_to_bf16((float)v); break;
	default: break;
	}
}

static double get(const void *buf, size_t i)
{
	switch (C.dtype) {
	case KV_FLOAT32: return ((const float *)buf)[i];
	case KV_FLOAT64: return ((const double *)buf)[i];
	case KV_FLOAT16: return half_to_float(((const uint16_t *)buf)[i]);
	case KV_BFLOAT16: return bf16_to_float(((const uint16_t *)buf)[i]);
	default: return NAN;
	}
}

/* Fill rank r's contribution for step s (one pattern per element period). */
static void fill(void *buf, size_t count, int r, int s)
{
	for (size_t i = 0; i < count; i++)
		put(buf, i, val(r, i, s));
}

static double expect(size_t i, int s)
{
	double sum = 0;

	switch (C.op) {
	case OP_BCAST:
	case OP_PULL:
		return val(0, i, s);
	default:
		for (int r = 0; r < C.n; r++)
			sum += val(r, i, s);
		return sum;
	}
}

static int fail(int rank, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int rank, const char *fmt, ...)
{
	va_list ap;
	char msg[200];

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (__atomic_exchange_n(&S->failed, 1, __ATOMIC_ACQ_REL) == 0)
		snprintf(S->why, sizeof(S->why), "rank %d: %s", rank, msg);
	return 1;
}

static int check(int rank, const void *buf, size_t count, int s, const char *key)
{
	for (size_t i = 0; i < count; i++) {
		double want = expect(i, s), got = get(buf, i);
		if (got != want)
			return fail(rank, "key %s step %d element %zu: %g, want %g", key, s, i, got,
				    want);
	}
	return 0;
}

static int rank_main(int rank)
{
	struct kv_options o;
	kv_store *kv;
	size_t esize = kv_dtype_size(C.dtype);
	int nbuf = C.keys > 1 ? C.keys : (C.async > 1 ? C.async : 1);
	int rc;

	kv_options_default(&o);
	o.socket = C.sock;
	o.job = C.job;
	o.rank = rank;
	o.num_workers = C.n;
	o.timeout_ms = 120000;
	rc = kv_create("local", &o, &kv);
	if (rc)
		return fail(rank, "kv_create: %s", kv_last_error(NULL));

	for (int z = 0; z < C.nsizes; z++) {
		size_t count = C.sizes[z] / esize ? C.sizes[z] / esize : 1;
		size_t bytes = count * esize;
		void **bufs = calloc((size_t)nbuf, sizeof(void *));
		kv_ticket *tickets = calloc((size_t)nbuf, sizeof(kv_ticket));
		char (*keys)[32] = calloc((size_t)nbuf, 32);
		double *times = S->t + ((size_t)z * (size_t)C.n + (size_t)rank) * (size_t)C.iters;

		for (int b = 0; b < nbuf; b++) {
			bufs[b] = C.zero_copy ? kv_alloc(kv, bytes) : aligned_alloc(64, (bytes + 63) & ~(size_t)63);
			if (!bufs[b])
				return fail(rank, "cannot allocate %zu bytes: %s", bytes,
					    kv_last_error(kv));
			snprintf(keys[b], 32, "bench-%zu-%d", bytes, C.keys > 1 ? b : 0);
		}
		/* the keys: pull reads a value set once; the others start at zero */
		for (int k = 0; k < (C.keys > 1 ? C.keys : 1); k++) {
			if (C.op == OP_PULL)
				fill(bufs[0], count, 0, 0);
			else
				memset(bufs[0], 0, bytes);
			rc = kv_init(kv, keys[k], bufs[0], count, C.dtype);
			if (rc)
				return fail(rank, "init %s: %s", keys[k], kv_last_error(kv));
		}
		for (int s = 0; s < C.warmup + C.iters; s++) {
			int step = C.op == OP_PULL ? 0 : s;
			for (int b = 0; b < nbuf; b++)
				fill(bufs[b], count, rank, step);
			barrier();
			double t0 = now();
			if (C.async > 0) {
				int inflight = 0, next = 0;
				for (int b = 0; b < nbuf; b++) {
					if (inflight == C.async) {
						rc = kv_wait(kv, tickets[next]);
						next++;
						inflight--;
						if (rc)
							break;
					}
					rc = kv_pushpull_async(kv, keys[b], bufs[b], NULL, count,
							       C.dtype, 0, &tickets[b]);
					if (rc)
						break;
					inflight++;
				}
				for (; !rc && next < nbuf; next++)
					rc = kv_wait(kv, tickets[next]);
			} else {
				for (int b = 0; b < nbuf && !rc; b++) {
					switch (C.op) {
					case OP_PUSHPULL:
						rc = kv_pushpull(kv, keys[b], bufs[b], NULL, count,
								 C.dtype, 0);
						break;
					case OP_BCAST:
						rc = kv_broadcast(kv, keys[b], bufs[b], NULL, count,
								  C.dtype, 0);
						break;
					case OP_PUSH:
						rc = kv_push(kv, keys[b], bufs[b], count, C.dtype,
							     0);
						break;
					case OP_PULL:
						rc = kv_pull(kv, keys[b], bufs[b], count, C.dtype,
							     0);
						break;
					}
				}
			}
			double t1 = now();
			if (rc)
				return fail(rank, "%s: %s", op_names[C.op], kv_last_error(kv));
			if (s >= C.warmup)
				times[s - C.warmup] = t1 - t0;
			if (C.op == OP_PUSH) {
				/* nothing comes back: the pushes of step s are the value now */
				rc = kv_pull(kv, keys[0], bufs[0], count, C.dtype, 0);
				if (rc)
					return fail(rank, "pull: %s", kv_last_error(kv));
			}
			for (int b = 0; b < (C.op == OP_PUSH ? 1 : nbuf); b++)
				if (check(rank, bufs[b], count, step, keys[b]))
					return 1;
			if (rank == 0)
				__atomic_store_n(&S->progress, (uint32_t)s + 1, __ATOMIC_RELAXED);
		}
		for (int b = 0; b < nbuf; b++) {
			if (C.zero_copy)
				kv_free(kv, bufs[b]);
			else
				free(bufs[b]);
		}
		free(bufs);
		free(tickets);
		free(keys);
		barrier();
	}
	kv_close(kv);
	return 0;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double quantile(double *v, int n, double q)
{
	int i = (int)ceil(q * n) - 1;

	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return v[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

static void human(char *buf, size_t len, size_t bytes)
{
	if (bytes >= (1u << 30) && bytes % (1u << 30) == 0)
		snprintf(buf, len, "%zuG", bytes >> 30);
	else if (bytes >= (1u << 20) && bytes % (1u << 20) == 0)
		snprintf(buf, len, "%zuM", bytes >> 20);
	else if (bytes >= (1u << 10) && bytes % (1u << 10) == 0)
		snprintf(buf, len, "%zuK", bytes >> 10);
	else
		snprintf(buf, len, "%zu", bytes);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "ranks", required_argument, NULL, 'n' },
		{ "op", required_argument, NULL, 'o' },
		{ "sizes", required_argument, NULL, 'S' },
		{ "dtype", required_argument, NULL, 'd' },
		{ "iters", required_argument, NULL, 'i' },
		{ "warmup", required_argument, NULL, 'w' },
		{ "zero-copy", no_argument, NULL, 'z' },
		{ "async", required_argument, NULL, 'a' },
		{ "keys", required_argument, NULL, 'k' },
		{ "json", no_argument, NULL, 'j' },
		{ "socket", required_argument, NULL, 's' },
		{ "kvd-arg", required_argument, NULL, 'K' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *sizes = "4K,64K,1M,16M,64M,256M", *kvd_args[16] = { 0 };
	char tmpdir[64] = "", sockbuf[128];
	int opt, nkvd_args = 0, status = 0;
	pid_t kvd = -1, *pids;
	size_t shbytes;

	C.n = 2;
	C.iters = 20;
	C.warmup = 5;
	C.keys = 1;
	C.dtype = KV_FLOAT32;
	C.dname = "f32";
	while ((opt = getopt_long(argc, argv, "n:s:h", opts, NULL)) != -1) {
		char *end;
		switch (opt) {
		case 'n':
			C.n = (int)strtol(optarg, &end, 10);
			if (*end || C.n < 1 || C.n > 64)
				goto bad;
			break;
		case 'o':
			for (C.op = 0; C.op < 4 && strcmp(op_names[C.op], optarg); C.op++)
				;
			if (C.op == 4)
				goto bad;
			break;
		case 'S':
			sizes = optarg;
			break;
		case 'd':
			if (!strcmp(optarg, "f32"))
				C.dtype = KV_FLOAT32;
			else if (!strcmp(optarg, "f16"))
				C.dtype = KV_FLOAT16;
			else if (!strcmp(optarg, "bf16"))
				C.dtype = KV_BFLOAT16;
			else if (!strcmp(optarg, "f64"))
				C.dtype = KV_FLOAT64;
			else
				goto bad;
			C.dname = optarg;
			break;
		case 'i':
			C.iters = (int)strtol(optarg, &end, 10);
			if (*end || C.iters < 1 || C.iters > 100000)
				goto bad;
			break;
		case 'w':
			C.warmup = (int)strtol(optarg, &end, 10);
			if (*end || C.warmup < 0)
				goto bad;
			break;
		case 'z':
			C.zero_copy = 1;
			break;
		case 'a':
			C.async = (int)strtol(optarg, &end, 10);
			if (*end || C.async < 1 || C.async > 100000)
				goto bad;
			break;
		case 'k':
			C.keys = (int)strtol(optarg, &end, 10);
			if (*end || C.keys < 1 || C.keys > 100000)
				goto bad;
			break;
		case 'j':
			C.json = 1;
			break;
		case 's':
			C.sock = optarg;
			break;
		case 'K':
			if (nkvd_args < 15)
				kvd_args[nkvd_args++] = optarg;
			break;
		case 'h':
			fputs(usage, stdout);
			return 0;
		default:
			goto usage_err;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "kvbench: unexpected argument '%s'\n", argv[optind]);
		goto usage_err;
	}
	if (C.async && C.op != OP_PUSHPULL) {
		fprintf(stderr, "kvbench: --async works with --op pushpull only\n");
		return 2;
	}
	{
		char *list = strdup(sizes), *rest = list, *t;
		while (list && (t = strsep(&rest, ","))) {
			if (C.nsizes == 32 || !*t || parse_size(t, &C.sizes[C.nsizes])) {
				fprintf(stderr, "kvbench: bad size '%s' in --sizes '%s'%s\n", t, sizes,
					C.nsizes == 32 ? " (at most 32 sizes)" : "");
				free(list);
				return 2;
			}
			C.nsizes++;
		}
		free(list);
	}
	if (!C.sock)
		C.sock = tool_default_socket();
	snprintf(C.job, sizeof(C.job), "kvbench-%d", (int)getpid());
	if (!tool_kvd_answers(C.sock)) {
		snprintf(tmpdir, sizeof(tmpdir), "/tmp/kvbench.XXXXXX");
		if (!mkdtemp(tmpdir)) {
			perror("kvbench: mkdtemp");
			return 1;
		}
		snprintf(sockbuf, sizeof(sockbuf), "%s/kvd.sock", tmpdir);
		C.sock = sockbuf;
		kvd = tool_start_kvd(C.sock, kvd_args, "kvbench", NULL);
		if (kvd < 0)
			return 1;
	}

	shbytes = sizeof(struct shared) +
		  sizeof(double) * (size_t)C.nsizes * (size_t)C.n * (size_t)C.iters;
	S = mmap(NULL, shbytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (S == MAP_FAILED) {
		perror("kvbench: mmap");
		return 1;
	}
	pids = calloc((size_t)C.n, sizeof(pid_t));
	fflush(NULL);
	for (int r = 0; r < C.n; r++) {
		pids[r] = fork();
		if (pids[r] == 0)
			_exit(rank_main(r));
	}
	/* progress on stderr while the ranks run */
	{
		int left = C.n, tty = isatty(2);
		double t0 = now(), last = t0;
		while (left > 0) {
			int st;
			pid_t p = waitpid(-1, &st, WNOHANG);
			if (p > 0) {
				for (int r = 0; r < C.n; r++)
					if (pids[r] == p) {
						pids[r] = 0;
						left--;
						if (!WIFEXITED(st) || WEXITSTATUS(st))
							status = 1;
					}
				if (status) {
					__atomic_store_n(&S->failed, 1, __ATOMIC_RELAXED);
					for (int r = 0; r < C.n; r++)
						if (pids[r] > 0)
							kill(pids[r], SIGKILL);
				}
				continue;
			}
			usleep(20000);
			if (now() - last > (tty ? 0.5 : 5) && now() - t0 > 2) {
				last = now();
				fprintf(stderr, "kvbench: %.0f s, step %u of %d%s", now() - t0,
					__atomic_load_n(&S->progress, __ATOMIC_RELAXED),
					C.warmup + C.iters, tty ? "    \r" : "\n");
			}
		}
		if (tty && now() - t0 > 2)
			fprintf(stderr, "%60s\r", "");
	}
	if (kvd > 0) {
		tool_stop_kvd(kvd, 10000);
		unlink(C.sock);
		rmdir(tmpdir);
	}
	if (status || S->failed) {
		fprintf(stderr, "kvbench: %s\n", S->why[0] ? S->why : "a rank failed");
		return 1;
	}

	int ops = C.keys > 1 ? C.keys : (C.async > 1 ? C.async : 1);
	if (C.json)
		printf("{\"tool\": \"kvbench\", \"ranks\": %d, \"op\": \"%s\", \"dtype\": \"%s\", "
		       "\"iters\": %d, \"warmup\": %d, \"zero_copy\": %s, \"async\": %d, "
		       "\"keys\": %d, \"rows\": [",
		       C.n, op_names[C.op], C.dname, C.iters, C.warmup,
		       C.zero_copy ? "true" : "false", C.async, C.keys);
	else
		printf("# kvbench: %d ranks, op %s, dtype %s, %d iters (+%d warmup), %s, "
		       "%d key%s, async %d\n"
		       "#%11s %12s %5s %10s %10s %12s %12s\n",
		       C.n, op_names[C.op], C.dname, C.iters, C.warmup,
		       C.zero_copy ? "zero-copy" : "copying", C.keys, C.keys > 1 ? "s" : "",
		       C.async, "size", "count", "type", "p50(us)", "p99(us)", "algbw(GB/s)",
		       "busbw(GB/s)");
	double *step = malloc(sizeof(double) * (size_t)C.iters);
	for (int z = 0; z < C.nsizes; z++) {
		size_t esize = kv_dtype_size(C.dtype);
		size_t count = C.sizes[z] / esize ? C.sizes[z] / esize : 1;
		double p50, p99, alg, bus;
		char h[32];

		for (int it = 0; it < C.iters; it++) {
			step[it] = 0;
			for (int r = 0; r < C.n; r++) {
				double t = S->t[((size_t)z * (size_t)C.n + (size_t)r) * (size_t)C.iters +
						(size_t)it];
				if (t > step[it])
					step[it] = t;
			}
		}
		p99 = quantile(step, C.iters, 0.99);
		p50 = quantile(step, C.iters, 0.50);
		alg = (double)(count * esize) * ops / p50 / 1e9;
		bus = alg * (C.n > 1 ? 2.0 * (C.n - 1) / C.n : 1.0);
		human(h, sizeof(h), count * esize);
		if (C.json)
			printf("%s{\"size\": %zu, \"count\": %zu, \"type\": \"%s\", \"p50_us\": %.2f, "
			       "\"p99_us\": %.2f, \"algbw_gbs\": %.4f, \"busbw_gbs\": %.4f}",
			       z ? ", " : "", count * esize, count, C.dname, p50 * 1e6, p99 * 1e6,
			       alg, bus);
		else
			printf(" %11s %12zu %5s %10.1f %10.1f %12.3f %12.3f\n", h, count, C.dname,
			       p50 * 1e6, p99 * 1e6, alg, bus);
	}
	if (C.json)
		printf("]}\n");
	free(step);
	return 0;

bad:
	for (const struct option *o = opts; o->name; o++)
		if (o->val == opt) {
			fprintf(stderr, "kvbench: bad value '%s' for --%s\n", optarg, o->name);
			goto usage_err;
		}
	fprintf(stderr, "kvbench: bad value '%s'\n", optarg);
usage_err:
	fprintf(stderr, "Try 'kvbench --help'.\n");
	return 2;
}
