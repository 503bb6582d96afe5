/* SPDX-License-Identifier: MIT */
/*
 * stats.c - the daemon's status as text, JSON and Prometheus metrics.
 *
 * Served over the control socket (kvctl asks, kvd answers) rather than from
 * a shared stats page: the numbers come from counters the engine bumps with
 * relaxed atomics, so rendering takes no lock that the data path takes, and
 * the socket already tells kvd who is asking (SO_PEERCRED), which decides
 * what they may see: root sees every job, anyone else only their own.
 * Membership (ranks and pids) is read under kvd.lock, which the engine never
 * takes.
 */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd.h"
#include "../kernels/gpu.h"
#include "../kernels/nccl.h"
#ifdef KV_HAVE_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

struct sb {
	char *p;
	size_t n, cap;
	bool oom;
};

__attribute__((format(printf, 2, 3))) static void sb_printf(struct sb *b, const char *fmt, ...)
{
	va_list ap;
	int k;

	for (;;) {
		size_t room = b->cap - b->n;
		va_start(ap, fmt);
		k = vsnprintf(b->p ? b->p + b->n : NULL, room, fmt, ap);
		va_end(ap);
		if (k < 0)
			return;
		if ((size_t)k < room) {
			b->n += (size_t)k;
			return;
		}
		size_t cap = (b->cap + (size_t)k + 1) * 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			b->oom = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 (RFC 3629). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	size_t len;
	uint32_t cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		len = 2, cp = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		len = 3, cp = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		len = 4, cp = s[0] & 0x07;
	else
		return 0;
	if (len > n)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return len;
}

/* A JSON string: quotes, backslashes and control bytes escaped; a byte that
 * is not part of well-formed UTF-8 (key names are any bytes) is written as
 * the code point of the same number, so the output is always valid JSON. */
static void sb_json_str(struct sb *b, const char *s, size_t n)
{
	const unsigned char *u = (const unsigned char *)s;

	sb_printf(b, "\"");
	for (size_t i = 0; i < n;) {
		unsigned char c = u[i];
		size_t len = utf8_seq(u + i, n - i);

		if (c == '"' || c == '\\')
			sb_printf(b, "\\%c", c);
		else if (c < 0x20 || c == 0x7f || len == 0)
			sb_printf(b, "\\u%04x", c);
		else
			sb_printf(b, "%.*s", (int)len, s + i);
		i += len ? len : 1;
	}
	sb_printf(b, "\"");
}

static uint64_t ld(const uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* rounds and bytes: the engine's, plus the direct rounds the ranks ran themselves */
static uint64_t job_rounds(const struct job *j)
{
	return ld(&j->rounds) + ld(&j->board->rounds);
}

static uint64_t job_bytes_reduced(const struct job *j)
{
	return ld(&j->bytes_reduced) + ld(&j->board->bytes);
}

/*
 * Rounds and bytes per second over the interval since the last sample; a
 * sample is taken when a status request finds the last one a second old or
 * more (so `kvctl watch` sees the last second, a lone request the time since
 * the previous one, and the first one the time since the job began).
 */
static void job_rates(struct job *j, double now)
{
	uint64_t rounds = job_rounds(j), bytes = job_bytes_reduced(j);
	/* no sample yet: from the job's start (nothing was reduced before it) */
	double dt = now - (j->rate_t ? j->rate_t : j->created);

	if (j->rate_t && dt < 1.0)
		return;
	j->rounds_per_s = dt > 0 ? (double)(rounds - j->rate_rounds) / dt : 0;
	j->bytes_per_s = dt > 0 ? (double)(bytes - j->rate_bytes) / dt : 0;
	j->rate_t = now; /* the first request is a sample too */
	j->rate_rounds = rounds;
	j->rate_bytes = bytes;
}

static uint64_t job_ops(const struct job *j)
{
	return ld(&j->ops);
}

/* The direct rounds' histogram, kept by the ranks on the job board. */
static const struct kv_board_lat *board_lat(const struct job *j)
{
	return (const struct kv_board_lat *)((const uint8_t *)j->board + KV_BOARD_LAT_OFF);
}

/* Bucket b of the job's latency histogram: the engine's ops and the direct rounds. */
static uint64_t lat_bucket_n(const struct job *j, int b)
{
	return ld(&j->lat[b]) + ld(&board_lat(j)->bucket[b]);
}

static uint64_t lat_sum_ns(const struct job *j)
{
	return ld(&j->lat_sum_ns) + ld(&board_lat(j)->sum_ns);
}

/* The q-quantile of a job's latency histogram in microseconds (0 if empty). */
static double lat_quantile(const struct job *j, double q)
{
	uint64_t total = 0, cum = 0, want;

	for (int b = 0; b <= LAT_BUCKETS; b++)
		total += lat_bucket_n(j, b);
	if (!total)
		return 0;
	want = (uint64_t)ceil(q * (double)total);
	if (want == 0 || want > total) /* the ranks write the board: guard every sum */
		want = total;
	for (int b = 0; b <= LAT_BUCKETS; b++) {
		uint64_t in = lat_bucket_n(j, b);
		if (in && cum + in >= want) {
			double lo = b == 0 ? 0 : ldexp(1, b - 1), hi = ldexp(1, b);
			/* linear inside the bucket [2^(b-1), 2^b) us */
			return lo + (hi - lo) * (double)(want - cum) / (double)in;
		}
		cum += in;
	}
	return ldexp(1, LAT_BUCKETS);
}

static void heap_stats(uint64_t *allocated, uint64_t *resident)
{
	*allocated = *resident = 0;
#ifdef KV_HAVE_JEMALLOC
	uint64_t epoch = 1;
	size_t sz = sizeof(epoch), v, vs = sizeof(v);

	mallctl("epoch", &epoch, &sz, &epoch, sz); /* refresh the cached statistics */
	if (mallctl("stats.allocated", &v, &vs, NULL, 0) == 0)
		*allocated = v;
	vs = sizeof(v);
	if (mallctl("stats.resident", &v, &vs, NULL, 0) == 0)
		*resident = v;
#endif
}

/*
 * Stalled rounds: a round some ranks contributed to and others not, open for
 * at least a second.  Engine keys: the part queues (the engine stores heads,
 * nready and the start time with relaxed atomics); direct keys: the shared
 * block (arrivals, the round each rank arrived at, the first arrival's time).
 * Racy by nature and harmless: a snapshot, no lock the data path takes.
 */
#define STALL_NS 1000000000ull

struct stalled {
	const char *key;
	uint32_t len;
	double secs;
	uint8_t *missing; /* per rank */
};

static bool key_stalled(struct job *j, struct key *k, uint64_t now, struct stalled *st)
{
	uint32_t n = (uint32_t)j->num_workers;
	bool any = false;

	memset(st->missing, 0, n);
	st->secs = 0;
	if (key_direct(k)) {
		struct kv_dkey *dk = k->dkey;
		uint32_t arrived = __atomic_load_n(&dk->arrived, __ATOMIC_RELAXED);
		uint32_t done = __atomic_load_n(&dk->done, __ATOMIC_RELAXED);
		uint64_t since = __atomic_load_n(&dk->since_ns, __ATOMIC_RELAXED);
		uint32_t *at = (uint32_t *)((uint8_t *)dk + kv_dkey_arrived_off(n));

		if (arrived == 0 || arrived >= n || !since || now < since + STALL_NS)
			return false;
		/* arrivals from before a rank left are void (reset at the next one) */
		if (__atomic_load_n(&dk->epoch, __ATOMIC_RELAXED) !=
		    __atomic_load_n(&j->board->epoch, __ATOMIC_RELAXED))
			return false;
		for (uint32_t r = 0; r < n; r++)
			st->missing[r] = __atomic_load_n(&at[r], __ATOMIC_RELAXED) != done + 1;
		st->secs = (double)(now - since) * 1e-9;
		any = true;
	} else {
		for (uint32_t pi = 0; pi < k->nparts; pi++) {
			struct part *p = &k->parts[pi];
			uint32_t ready = __atomic_load_n(&p->nready, __ATOMIC_RELAXED);
			uint64_t since = __atomic_load_n(&p->stall_since, __ATOMIC_RELAXED);

			if (ready == 0 || ready >= n || !since || now < since + STALL_NS)
				continue;
			for (uint32_t r = 0; r < n; r++)
				if (!__atomic_load_n(&p->head[r], __ATOMIC_RELAXED))
					st->missing[r] = 1;
			if ((double)(now - since) * 1e-9 > st->secs)
				st->secs = (double)(now - since) * 1e-9;
			any = true;
		}
	}
	st->key = k->name;
	st->len = k->name_len;
	return any;
}

static int job_stalled_count(struct job *j)
{
	uint8_t missing[KV_MAX_RANKS];
	struct stalled st = { .missing = missing };
	uint64_t now = kvd_now_ns();
	int count = 0;

	for (uint32_t i = 0, n = job_nkeys(j); i < n; i++)
		count += key_stalled(j, job_key(j, i), now, &st);
	return count;
}

static bool visible(const struct job *j, uid_t viewer)
{
	return viewer == 0 || j->uid == viewer;
}

static void render_json(struct kvd *d, struct sb *b, uid_t viewer)
{
	uint64_t alloc, res;
	bool first = true;

	heap_stats(&alloc, &res);
	sb_printf(b, "{\"version\": \"%s\", \"uptime_s\": %.1f, \"engine_threads\": %d, \"jobs\": [",
		  KV_VERSION, kvd_now() - d->start, d->cfg.threads);
	for (struct job *j = d->jobs; j; j = j->next) {
		if (!visible(j, viewer))
			continue;
		job_rates(j, kvd_now());
		sb_printf(b, "%s{\"name\": ", first ? "" : ", ");
		first = false;
		sb_json_str(b, j->name, strlen(j->name));
		sb_printf(b, ", \"uid\": %u, \"num_workers\": %d, \"ranks\": [", (unsigned)j->uid,
			  j->num_workers);
		for (int r = 0, f = 1; r < j->num_workers; r++) {
			if (!j->ranks[r])
				continue;
			sb_printf(b, "%s{\"rank\": %d, \"pid\": %d}", f ? "" : ", ", r,
				  (int)j->ranks[r]->pid);
			f = 0;
		}
		sb_printf(b,
			  "], \"keys\": %u, \"rounds\": %llu, \"bytes_reduced\": %llu, "
			  "\"bytes\": %llu, \"ops\": %llu, \"inflight\": %llu, "
			  "\"peak_inflight\": %llu, \"rounds_per_s\": %.1f, \"bytes_per_s\": %.0f, "
			  "\"latency_us\": {\"p50\": %.1f, \"p99\": %.1f}, \"stalled\": [",
			  __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE),
			  (unsigned long long)job_rounds(j),
			  (unsigned long long)job_bytes_reduced(j),
			  (unsigned long long)ld(&j->bytes), (unsigned long long)ld(&j->ops),
			  (unsigned long long)ld(&j->inflight),
			  (unsigned long long)ld(&j->peak_inflight), j->rounds_per_s,
			  j->bytes_per_s, lat_quantile(j, 0.5), lat_quantile(j, 0.99));
		{
			uint8_t missing[KV_MAX_RANKS];
			struct stalled st = { .missing = missing };
			uint64_t now = kvd_now_ns();
			bool f = true;

			for (uint32_t i = 0, n = job_nkeys(j); i < n; i++) {
				if (!key_stalled(j, job_key(j, i), now, &st))
					continue;
				sb_printf(b, "%s{\"key\": ", f ? "" : ", ");
				sb_json_str(b, st.key, st.len);
				sb_printf(b, ", \"waiting_for\": [");
				for (int r = 0, g = 1; r < j->num_workers; r++)
					if (missing[r]) {
						sb_printf(b, "%s%d", g ? "" : ", ", r);
						g = 0;
					}
				sb_printf(b, "], \"seconds\": %.1f}", st.secs);
				f = false;
			}
			sb_printf(b, "]}");
		}
	}
	sb_printf(b,
		  "], \"memory\": {\"shared_bytes\": %llu, \"pinned_bytes\": %llu, "
		  "\"heap_allocated\": %llu, \"heap_resident\": %llu}, \"gpus\": [",
		  (unsigned long long)ld(&d->shared_bytes), (unsigned long long)ld(&d->pinned_bytes),
		  (unsigned long long)alloc, (unsigned long long)res);
	for (int g = 0; g < d->gpus; g++) {
		char name[128];
		size_t mem = 0;
		if (gpu_info(g, name, sizeof(name), &mem))
			snprintf(name, sizeof(name), "?");
		sb_printf(b, "%s{\"index\": %d, \"name\": ", g ? ", " : "", g);
		sb_json_str(b, name, strlen(name));
		sb_printf(b, ", \"memory_bytes\": %zu}", mem);
	}
	sb_printf(b, "], \"gpu_status\": ");
	sb_json_str(b, gpu_status(), strlen(gpu_status()));
	sb_printf(b, ", \"nccl\": ");
	sb_json_str(b, nccl_status(), strlen(nccl_status()));
	sb_printf(b, "}\n");
}

static void render_text(struct kvd *d, struct sb *b, uid_t viewer, bool jobs_only)
{
	int njobs = 0;

	for (struct job *j = d->jobs; j; j = j->next)
		njobs += visible(j, viewer);
	if (!jobs_only)
		sb_printf(b,
			  "kvd %s  up %.0fs  %d engine threads  %d jobs  %llu shared bytes "
			  "(%llu pinned)  %s\n",
			  KV_VERSION, kvd_now() - d->start, d->cfg.threads, njobs,
			  (unsigned long long)ld(&d->shared_bytes),
			  (unsigned long long)ld(&d->pinned_bytes), gpu_status());
	sb_printf(b, "%-24s %6s %7s %6s %10s %14s %9s %8s %9s %9s\n", "JOB", "UID", "RANKS",
		  "KEYS", "ROUNDS", "BYTES_REDUCED", "ROUNDS/S", "MB/S", "P50_US", "P99_US");
	for (struct job *j = d->jobs; j; j = j->next) {
		if (!visible(j, viewer))
			continue;
		job_rates(j, kvd_now());
		sb_printf(b, "%-24s %6u %3d/%-3d %6u %10llu %14llu %9.1f %8.1f %9.1f %9.1f\n",
			  j->name, (unsigned)j->uid, j->present, j->num_workers,
			  __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE),
			  (unsigned long long)job_rounds(j),
			  (unsigned long long)job_bytes_reduced(j), j->rounds_per_s,
			  j->bytes_per_s / 1e6, lat_quantile(j, 0.5), lat_quantile(j, 0.99));
		if (jobs_only)
			continue;
		for (int r = 0; r < j->num_workers; r++) {
			if (j->ranks[r])
				sb_printf(b, "  rank %-4d pid %d\n", r, (int)j->ranks[r]->pid);
			else
				sb_printf(b, "  rank %-4d (absent)\n", r);
		}
		{
			uint8_t missing[KV_MAX_RANKS];
			struct stalled st = { .missing = missing };
			uint64_t now = kvd_now_ns();

			for (uint32_t i = 0, n = job_nkeys(j); i < n; i++) {
				if (!key_stalled(j, job_key(j, i), now, &st))
					continue;
				sb_printf(b, "  !! STALLED key '");
				for (uint32_t c = 0; c < st.len; c++)
					sb_printf(b, "%c", isprint((unsigned char)st.key[c]) ? st.key[c] : '?');
				int nmiss = 0;
				sb_printf(b, "' for %.1f s, waiting for rank", st.secs);
				for (int r = 0; r < j->num_workers; r++)
					if (missing[r]) {
						sb_printf(b, " %d", r);
						nmiss++;
					}
				/* every rank queued an op, and they cannot run together */
				sb_printf(b, "%s\n", nmiss ? "" : "s' ops that disagree (a cancel or a "
								  "mismatch in flight?)");
			}
		}
	}
}

static void metric_head(struct sb *b, const char *name, const char *type, const char *help)
{
	sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void render_metrics(struct kvd *d, struct sb *b, uid_t viewer)
{
	static const struct {
		const char *name, *help;
		uint64_t (*get)(const struct job *j);
	} counters[] = {
		{ "kvd_rounds_total", "Completed rounds, all keys.", job_rounds },
		{ "kvd_bytes_reduced_total", "Bytes of results produced by rounds.",
		  job_bytes_reduced },
		{ "kvd_ops_total", "Completed op parts that went through the engine.", job_ops },
	};
	uint64_t alloc, res;

	heap_stats(&alloc, &res);
	metric_head(b, "kvd_uptime_seconds", "gauge", "Seconds since kvd started.");
	sb_printf(b, "kvd_uptime_seconds %.3f\n", kvd_now() - d->start);
	metric_head(b, "kvd_shared_bytes", "gauge", "Bytes of shared memory held.");
	sb_printf(b, "kvd_shared_bytes %llu\n", (unsigned long long)ld(&d->shared_bytes));
	metric_head(b, "kvd_pinned_bytes", "gauge", "Bytes of shared memory page-locked for GPUs.");
	sb_printf(b, "kvd_pinned_bytes %llu\n", (unsigned long long)ld(&d->pinned_bytes));
	metric_head(b, "kvd_heap_allocated_bytes", "gauge", "Heap bytes allocated (jemalloc).");
	sb_printf(b, "kvd_heap_allocated_bytes %llu\n", (unsigned long long)alloc);
	metric_head(b, "kvd_heap_resident_bytes", "gauge", "Heap bytes resident (jemalloc).");
	sb_printf(b, "kvd_heap_resident_bytes %llu\n", (unsigned long long)res);
	metric_head(b, "kvd_job_ranks", "gauge", "Ranks joined, per job.");
	for (struct job *j = d->jobs; j; j = j->next)
		if (visible(j, viewer))
			sb_printf(b, "kvd_job_ranks{job=\"%s\"} %d\n", j->name, j->present);
	metric_head(b, "kvd_job_stalled_rounds", "gauge",
		    "Rounds open for a second or more, waiting for some rank, per job.");
	for (struct job *j = d->jobs; j; j = j->next)
		if (visible(j, viewer))
			sb_printf(b, "kvd_job_stalled_rounds{job=\"%s\"} %d\n", j->name,
				  job_stalled_count(j));
	metric_head(b, "kvd_job_keys", "gauge", "Keys, per job.");
	for (struct job *j = d->jobs; j; j = j->next)
		if (visible(j, viewer))
			sb_printf(b, "kvd_job_keys{job=\"%s\"} %u\n", j->name,
				  __atomic_load_n(&j->nkeys, __ATOMIC_ACQUIRE));
	for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++) {
		metric_head(b, counters[i].name, "counter", counters[i].help);
		for (struct job *j = d->jobs; j; j = j->next)
			if (visible(j, viewer))
				sb_printf(b, "%s{job=\"%s\"} %llu\n", counters[i].name, j->name,
					  (unsigned long long)counters[i].get(j));
	}
	metric_head(b, "kvd_op_latency_seconds", "histogram",
		    "Engine rounds: time from kvd taking an op part to its completion; "
		    "direct rounds: from the first rank's arrival to the result.");
	for (struct job *j = d->jobs; j; j = j->next) {
		uint64_t cum = 0;
		if (!visible(j, viewer))
			continue;
		for (int k = 0; k < LAT_BUCKETS; k++) {
			cum += lat_bucket_n(j, k);
			sb_printf(b, "kvd_op_latency_seconds_bucket{job=\"%s\",le=\"%g\"} %llu\n",
				  j->name, ldexp(1, k) * 1e-6, (unsigned long long)cum);
		}
		cum += lat_bucket_n(j, LAT_BUCKETS);
		sb_printf(b, "kvd_op_latency_seconds_bucket{job=\"%s\",le=\"+Inf\"} %llu\n",
			  j->name, (unsigned long long)cum);
		sb_printf(b, "kvd_op_latency_seconds_sum{job=\"%s\"} %.9f\n", j->name,
			  (double)lat_sum_ns(j) * 1e-9);
		sb_printf(b, "kvd_op_latency_seconds_count{job=\"%s\"} %llu\n", j->name,
			  (unsigned long long)cum);
	}
}

char *stats_render(struct kvd *d, uint32_t what, uid_t viewer, size_t *len)
{
	struct sb b = { 0 };

	pthread_mutex_lock(&d->lock);
	switch (what) {
	case KV_STATUS_JSON:
		render_json(d, &b, viewer);
		break;
	case KV_STATUS_METRICS:
		render_metrics(d, &b, viewer);
		break;
	case KV_STATUS_JOBS:
		render_text(d, &b, viewer, true);
		break;
	default:
		render_text(d, &b, viewer, false);
		break;
	}
	pthread_mutex_unlock(&d->lock);
	if (b.oom) {
		free(b.p);
		return NULL;
	}
	*len = b.n;
	return b.p;
}
