/* SPDX-License-Identifier: MIT */
/*
 * test_hostile.c - hostile and broken clients beside a healthy job, and who
 * may see and touch whose job.
 *
 * Each test starts a private kvd (every round through its engine: with
 * direct rounds the healthy job would never meet the hostile client inside
 * kvd), measures a healthy job of 2 ranks doing checked pushpulls alone,
 * then again while a forked attacker talks to kvd at the lowest level: a raw
 * SOCK_SEQPACKET connection, messages made with kv_msg_encode or by hand,
 * the ring segment from WELCOME mapped with seg_map, and the rings driven by
 * writing the shared memory of shm/layout.h directly.  Each test asserts
 *  - what the attacker's own socket sees where the contract fixes it (an
 *    ERROR reply, EOF, an error completion);
 *  - that the healthy job stays correct (every element checked) and is not
 *    starved: under attack it keeps at least 10% of its rate alone (the
 *    lower of a run before and one after the attack, so that load from
 *    elsewhere on the machine does not count against kvd).  The
 *    bound is loose on purpose: on a 2-core machine the attacker's own CPU
 *    use takes a share from the healthy ranks and from kvd's engine, and
 *    half-second windows are noisy; starvation (a stalled engine, a control
 *    loop blocked on one client) shows as a rate near zero or a timeout;
 *  - that kvd stays up: a new client is served afterwards, and kvd exits 0
 *    on SIGTERM (kvd_stop() asserts it).
 * The attacker reports through a shared page; it exits non-zero with a
 * sentence in why when kvd did not behave as the contract says.
 *
 * The attacks: random bytes over the rings; an impossible SQ tail; an
 * impossible CQ head (and a scribbled CQ tail); entries naming what does
 * not exist; a flood of entries; completions never reaped; ops that wait
 * for a peer, then a disconnect; unaligned and overlapping buffers; every
 * kind of malformed, truncated or oversized message; floods of messages;
 * silent connections; descriptors passed with messages; connections beyond
 * kvd's descriptor limit.  And identity: another uid may neither join nor
 * see nor drop root's job, and is handed no segment.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "../../shm/layout.h"
#include "../../shm/msg.h"
#include "../../shm/ring.h"
#include "../../shm/seg.h"

#define WINDOW_S  0.5	/* each healthy measurement runs this long */
#define MIN_SHARE 0.10	/* of the baseline rate, under attack */
#define H_COUNT	  1024	/* healthy key: 1023 checked elements and a stop flag */
#define NOBODY	  65534 /* uid and gid of the other user */

static const char *const engine_args[] = {"--direct-max", "0", NULL};

struct shared {
	volatile int stop;    /* parent -> attacker: end the attack */
	volatile int started; /* attacker -> parent: the attack is under way */
	volatile int step;    /* identity: the two users' processes take turns */
	double window;	      /* healthy ranks: seconds to run */
	long iters;	      /* healthy rank 0: rounds in its window */
	double secs;	      /* and how long that took */
	long attacks;	      /* attacker: rounds of its attack */
	long evicted;	      /* attacker: connections kvd closed on it */
	long ops;	      /* attacker: submissions (or messages) kvd answered */
	char note[256];	      /* attacker: a line for the log */
	char why[768];	      /* attacker: what kvd did wrong */
};

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int fail(struct shared *sh, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct shared *sh, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(sh->why, sizeof(sh->why), fmt, ap);
	va_end(ap);
	return 1;
}

/* ------------------------------------------------------------------ the healthy job */

/*
 * Both ranks pushpull "w" until rank 0's window is over; rank 0 then sets
 * the last element of its contribution, and both ranks see the sum and stop
 * after the same round.  Element i of rank r is (r+1)*(i%251) + it%1000, so
 * the sum is 3*(i%251) + 2*(it%1000), exact in f32.
 */
static int healthy_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	struct shared *sh = arg;
	static float v[H_COUNT], out[H_COUNT];
	kv_store *kv = open_rank(10000);
	double t0;
	long it;

	CHECK(kv != NULL, "kv_create failed");
	CHECK(n == 2, "the healthy job has 2 ranks");
	CHECK_RC(kv_init(kv, "w", v, H_COUNT, KV_FLOAT32), KV_OK);
	t0 = now_s();
	for (it = 0;; it++) {
		for (int i = 0; i < H_COUNT - 1; i++)
			v[i] = (float)((rank + 1) * (i % 251) + it % 1000);
		v[H_COUNT - 1] = rank == 0 && now_s() - t0 >= sh->window ? 1.0f : 0.0f;
		CHECK_RC(kv_pushpull(kv, "w", v, out, H_COUNT, KV_FLOAT32, 0), KV_OK);
		for (int i = 0; i < H_COUNT - 1; i++) {
			float want = (float)(3 * (i % 251) + 2 * (it % 1000));
			CHECK(out[i] == want, "round %ld element %d: %g, want %g", it, i,
			      (double)out[i], (double)want);
		}
		CHECK(out[H_COUNT - 1] == 0.0f || out[H_COUNT - 1] == 1.0f,
		      "round %ld: stop flag %g", it, (double)out[H_COUNT - 1]);
		if (out[H_COUNT - 1] != 0.0f)
			break;
	}
	if (rank == 0) {
		sh->iters = it + 1;
		sh->secs = now_s() - t0;
	}
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

/* Rounds per second of a healthy job named job, or -1 (why says why). */
static double healthy(const struct kvd_proc *k, struct shared *sh, const char *job, char *why,
		      size_t len)
{
	sh->iters = 0;
	sh->secs = 0;
	sh->window = WINDOW_S;
	if (run_ranks(k, job, 2, healthy_rank, sh, 25, why, len))
		return -1;
	if (sh->secs <= 0) {
		snprintf(why, len, "rank 0 reported no window");
		return -1;
	}
	return (double)sh->iters / sh->secs;
}

/* After the attack: a new client of a new job is served, with a right answer. */
static int after_rank(int rank, int n, const struct kvd_proc *k, void *arg)
{
	float v[8], out[8];
	kv_store *kv = open_rank(5000);

	CHECK(kv != NULL, "kvd did not take a new client after the attack");
	for (int i = 0; i < 8; i++)
		v[i] = (float)i + 0.5f;
	CHECK_RC(kv_init(kv, "a", v, 8, KV_FLOAT32), KV_OK);
	CHECK_RC(kv_pushpull(kv, "a", v, out, 8, KV_FLOAT32, 0), KV_OK);
	for (int i = 0; i < 8; i++)
		CHECK(out[i] == v[i], "element %d: %g, want %g", i, (double)out[i], (double)v[i]);
	CHECK_RC(kv_close(kv), KV_OK);
	return 0;
}

static void log_tail(const struct kvd_proc *k)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "echo '--- kvd log ---' >&2; tail -n 30 %s >&2", k->log);
	if (system(cmd) != 0)
		fprintf(stderr, "(no kvd log)\n");
}

typedef int (*attack_fn)(const struct kvd_proc *k, struct shared *sh);

/* The kvd of the test in progress: a failed assertion leaves it to cleanup(). */
static struct kvd_proc *live, live_kvd;

static void cleanup(void)
{
	if (!live)
		return;
	if (live->pid > 0) {
		kill(live->pid, SIGKILL);
		waitpid(live->pid, NULL, 0);
	}
	unlink(live->sock);
	unlink(live->log);
	rmdir(live->dir);
	live = NULL;
}

/* Wait for pid until deadline (monotonic seconds); SIGKILL it past that. */
static int reap_by(pid_t pid, double deadline, int *st)
{
	while (now_s() < deadline) {
		if (waitpid(pid, st, WNOHANG) == pid)
			return 0;
		usleep(5000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, st, 0);
	return -1;
}

static void run_attack(const char *name, attack_fn fn, const char *const *kvd_args,
		       void (*setup)(struct kvd_proc *k))
{
	struct kvd_proc k;
	struct shared *sh =
		mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	char why_base[256] = "", why_att[256] = "", why_after[256] = "";
	double base, under, base2 = -1;
	int st = 0, attacker_ok, kvd_alive, after_ok, late;
	pid_t pid;

	cr_assert_neq(sh, MAP_FAILED);
	memset(sh, 0, sizeof(*sh));
	cr_assert_eq(kvd_start(&k, kvd_args), 0, "kvd did not start");
	live_kvd = k; /* the test's stack is gone when cleanup() runs after a failure */
	live = &live_kvd;
	if (setup)
		setup(&k);
	base = healthy(&k, sh, "healthy-base", why_base, sizeof(why_base));
	if (base < 0)
		log_tail(&k);
	cr_assert_gt(base, 0, "%s: the healthy job failed before any attack: %s", name, why_base);

	fflush(NULL);
	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		_exit(fn(&k, sh));
	}
	for (double t = now_s() + 5; !sh->started && now_s() < t;) {
		if (waitpid(pid, &st, WNOHANG) == pid) {
			pid = 0;
			break;
		}
		usleep(1000);
	}
	under = healthy(&k, sh, "healthy-attack", why_att, sizeof(why_att));
	sh->stop = 1;
	late = pid > 0 ? reap_by(pid, now_s() + 15, &st) : 0;
	attacker_ok = !late && WIFEXITED(st) && WEXITSTATUS(st) == 0;
	kvd_alive = waitpid(k.pid, NULL, WNOHANG) == 0;
	if (!kvd_alive)
		k.pid = live_kvd.pid = 0; /* reaped: nothing left to stop */
	after_ok = kvd_alive && run_ranks(&k, "after-attack", 1, after_rank, NULL, 15, why_after,
					  sizeof(why_after)) == 0;
	/* the baseline again: the machine's own load may have changed meanwhile */
	if (after_ok)
		base2 = healthy(&k, sh, "healthy-after", why_after, sizeof(why_after));
	if (base2 > 0 && base2 < base)
		base = base2;
	cr_log_info("hostile/%s: healthy %.0f rounds/s alone (the lower of before and after), "
		    "%.0f under attack (%.0f%%); attacker: %ld rounds, %ld answered, %ld "
		    "disconnected%s%s",
		    name, base, under, base > 0 ? 100 * under / base : 0, sh->attacks, sh->ops,
		    sh->evicted, sh->note[0] ? "; " : "", sh->note);
	if (!attacker_ok || under < 0 || !kvd_alive || !after_ok || under < MIN_SHARE * base)
		log_tail(&k);
	cr_assert(kvd_alive, "%s: kvd died during the attack", name);
	cr_assert(!late,
		  "%s: the attacker did not finish within 15 s of being told to stop "
		  "(kvd left it hanging?)",
		  name);
	cr_assert(attacker_ok, "%s: %s", name,
		  sh->why[0] ? sh->why : "the attacker died (signal or crash)");
	cr_assert_geq(under, 0, "%s: the healthy job failed under attack: %s", name, why_att);
	cr_assert(after_ok, "%s: kvd did not serve a new client after the attack: %s", name,
		  why_after);
	cr_assert_gt(base2, 0, "%s: the healthy job failed after the attack: %s", name, why_after);
	cr_assert_geq(under, MIN_SHARE * base,
		      "%s: the healthy job was starved: %.0f rounds/s under attack, %.0f alone",
		      name, under, base);
	cr_assert_eq(kvd_stop(&k), 0, "%s: kvd did not exit 0 on SIGTERM", name);
	live = NULL;
	munmap(sh, sizeof(*sh));
}

/* ------------------------------------------------------------------ a raw client */

struct raw {
	int sock, doorbell;
	uint8_t *ring;
	size_t ring_size;
	struct kv_ring_ctl *sqc, *cqc;
	struct kv_sqe *sqes;
	struct kv_cqe *cqes;
	uint32_t sq_entries, cq_entries;
	struct ring sq, cq;
	uint32_t seq;
	int nseg;
	uint8_t *seg[8];
	uint64_t seg_size[8];
	uint32_t seg_id[8];
	struct kv_board *board;
};

static int raw_connect(const char *path)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Send one datagram with up to 16 fds; 0 or -errno. */
static int raw_send_fds(int fd, const void *buf, size_t len, const int *fds, int nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr a;
	} u;
	struct iovec iov = {(void *)buf, len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	ssize_t n;

	if (nfds > 0) {
		struct cmsghdr *c;

		memset(&u, 0, sizeof(u));
		mh.msg_control = u.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	do
		n = sendmsg(fd, &mh, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : 0;
}

static int raw_send(int fd, const void *buf, size_t len)
{
	return raw_send_fds(fd, buf, len, NULL, 0);
}

/*
 * Receive one datagram within timeout_ms: its length, 0 on EOF (a reset
 * counts as EOF: kvd closed with our bytes unread), -ETIMEDOUT or -errno.
 * Up to 8 descriptors that came with it go to fds (the rest are closed);
 * *nfds counts them all, *ctrunc tells whether some were cut off.
 */
static ssize_t raw_recv1(int fd, void *buf, size_t cap, int timeout_ms, int *fds, int *nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr a;
	} u;
	struct iovec iov = {buf, cap};
	struct msghdr mh = {.msg_iov = &iov,
			    .msg_iovlen = 1,
			    .msg_control = u.b,
			    .msg_controllen = sizeof(u.b)};
	struct pollfd p = {.fd = fd, .events = POLLIN};
	int rc, got = 0;
	ssize_t n;

	*nfds = 0;
	do
		rc = poll(&p, 1, timeout_ms);
	while (rc < 0 && errno == EINTR);
	if (rc == 0)
		return -ETIMEDOUT;
	if (rc < 0)
		return -errno;
	do
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == ECONNRESET ? 0 : -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
			int f;
			memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (fds && got < 8)
				fds[got++] = f;
			else
				close(f);
			(*nfds)++;
		}
	}
	if (mh.msg_flags & MSG_CTRUNC)
		(*nfds)++; /* some were cut off: counts as "fds came" */
	return n;
}

static void close_fds(const int *fds, int n)
{
	for (int i = 0; i < n && i < 8; i++)
		close(fds[i]);
}

/* raw_recv1, passing over the segments kvd hands a rank to keep (HOLD),
 * which these clients have no use for. */
static ssize_t raw_recv(int fd, void *buf, size_t cap, int timeout_ms, int *fds, int *nfds)
{
	for (;;) {
		ssize_t n = raw_recv1(fd, buf, cap, timeout_ms, fds, nfds);
		struct kv_msg_hdr h;

		if (n < (ssize_t)sizeof(h))
			return n;
		memcpy(&h, buf, sizeof(h));
		if (h.magic != KV_MSG_MAGIC || h.type != KV_MSG_HOLD)
			return n;
		if (fds)
			close_fds(fds, *nfds);
	}
}

/*
 * The answer to something kvd must refuse: any number of ERROR messages
 * (code < 0, no descriptors), then EOF, within timeout_ms.  Returns 0 with
 * *code the last error code (0 if none came), or 1 with sh->why set.
 */
static int expect_refused(struct shared *sh, int fd, const char *what, int timeout_ms, int *code)
{
	static uint8_t buf[KV_MSG_MAX];
	double deadline = now_s() + timeout_ms / 1000.0;

	*code = 0;
	for (;;) {
		int fds[8], nfds, left = (int)((deadline - now_s()) * 1000);
		struct kv_msg m;
		ssize_t n = raw_recv(fd, buf, sizeof(buf), left > 0 ? left : 0, fds, &nfds);

		close_fds(fds, nfds);
		if (n == 0)
			return 0;
		if (n == -ETIMEDOUT)
			return fail(sh,
				    "%s: kvd neither answered nor closed the connection within "
				    "%d ms",
				    what, timeout_ms);
		if (n < 0)
			return fail(sh, "%s: recv: %s", what, strerror((int)-n));
		if (kv_msg_decode(buf, (size_t)n, &m, NULL) || m.type != KV_MSG_ERROR)
			return fail(sh,
				    "%s: kvd answered with something other than ERROR "
				    "(%zd bytes, type %u)",
				    what, n, ((struct kv_msg_hdr *)buf)->type);
		if (m.u.error.code >= 0)
			return fail(sh, "%s: kvd answered ERROR with code %d, not a failure", what,
				    m.u.error.code);
		if (nfds)
			return fail(sh, "%s: kvd's ERROR carried %d descriptors", what, nfds);
		*code = m.u.error.code;
	}
}

/* 1 when kvd closed the connection (only ERROR messages before it), within timeout_ms. */
static int raw_gone(int fd, int timeout_ms)
{
	static uint8_t buf[KV_MSG_MAX];
	double deadline = now_s() + timeout_ms / 1000.0;

	for (;;) {
		int fds[8], nfds, left = (int)((deadline - now_s()) * 1000);
		ssize_t n = raw_recv(fd, buf, sizeof(buf), left > 0 ? left : 0, fds, &nfds);

		close_fds(fds, nfds);
		if (n == 0)
			return 1;
		if (n < 0)
			return 0;
	}
}

static void raw_close(struct raw *r)
{
	for (int i = 0; i < r->nseg; i++)
		seg_unmap(r->seg[i], r->seg_size[i]);
	if (r->ring)
		seg_unmap(r->ring, r->ring_size);
	if (r->board)
		seg_unmap(r->board, KV_BOARD_SIZE);
	if (r->doorbell >= 0)
		close(r->doorbell);
	if (r->sock >= 0)
		close(r->sock);
	memset(r, 0, sizeof(*r));
	r->sock = r->doorbell = -1;
}

/* Send m, receive the reply into *rep (text points into a static buffer). */
static int raw_request(struct shared *sh, struct raw *r, struct kv_msg *m, struct kv_msg *rep,
		       int *fds, int *nfds)
{
	static uint8_t buf[KV_MSG_MAX];
	size_t n;
	ssize_t got;
	const char *why = NULL;
	int rc;

	m->seq = ++r->seq;
	n = kv_msg_encode(m, buf, sizeof(buf));
	if (!n)
		return fail(sh, "cannot encode a message of type %u", m->type);
	rc = raw_send(r->sock, buf, n);
	if (rc)
		return fail(sh, "send type %u: %s", m->type, strerror(-rc));
	got = raw_recv(r->sock, buf, sizeof(buf), 5000, fds, nfds);
	if (got <= 0)
		return fail(sh, "no reply to type %u: %s", m->type,
			    got == 0 ? "kvd closed the connection" : strerror((int)-got));
	rc = kv_msg_decode(buf, (size_t)got, rep, &why);
	if (rc)
		return fail(sh, "kvd's reply does not decode: %s", why ? why : "?");
	if (rep->seq != m->seq)
		return fail(sh, "reply seq %u, want %u", rep->seq, m->seq);
	return 0;
}

/* Join job as rank of nw, map the ring segment, attach the rings. */
static int raw_open(struct shared *sh, struct raw *r, const struct kvd_proc *k, const char *job,
		    int rank, int nw)
{
	struct kv_msg m = {.type = KV_MSG_HELLO}, w;
	int fds[8], nfds = 0, rc;
	struct kv_seg_hdr *h;
	void *mem;

	memset(r, 0, sizeof(*r));
	r->doorbell = -1;
	r->sock = raw_connect(k->sock);
	if (r->sock < 0)
		return fail(sh, "connect %s: %s", k->sock, strerror(errno));
	m.u.hello.rank = rank;
	m.u.hello.num_workers = nw;
	m.u.hello.device = -1;
	snprintf(m.u.hello.job, sizeof(m.u.hello.job), "%s", job);
	if (raw_request(sh, r, &m, &w, fds, &nfds))
		goto out_close;
	if (w.type != KV_MSG_WELCOME || nfds != 3) {
		close_fds(fds, nfds);
		fail(sh, "hello to job %s: reply type %u with %d fds (%.*s)", job, w.type, nfds,
		     w.type == KV_MSG_ERROR ? (int)w.u.error.len : 0,
		     w.type == KV_MSG_ERROR ? w.u.error.text : "");
		goto out_close;
	}
	rc = seg_map(fds[0], w.u.welcome.seg_size, SEG_MAP_RING, &mem);
	close(fds[0]);
	r->doorbell = fds[1];
	if (rc) {
		close(fds[2]);
		fail(sh, "seg_map of the ring segment: %s", strerror(-rc));
		goto out_close;
	}
	r->ring = mem;
	r->ring_size = w.u.welcome.seg_size;
	rc = seg_map(fds[2], KV_BOARD_SIZE, SEG_MAP_RING, &mem);
	close(fds[2]);
	if (rc) {
		fail(sh, "seg_map of the job board: %s", strerror(-rc));
		goto out_close;
	}
	r->board = mem;
	r->sq_entries = w.u.welcome.sq_entries;
	r->cq_entries = w.u.welcome.cq_entries;
	h = (struct kv_seg_hdr *)r->ring;
	if (h->magic != KV_SHM_MAGIC || h->abi != KV_SHM_ABI || h->sq_entries != r->sq_entries ||
	    h->cq_entries != r->cq_entries || h->sq_off != KV_SQ_OFF ||
	    kv_ring_seg_size(r->sq_entries, r->cq_entries) > r->ring_size) {
		fail(sh, "the ring segment has an unexpected header");
		goto out_close;
	}
	r->sqc = (struct kv_ring_ctl *)(r->ring + KV_SQ_CTL_OFF);
	r->cqc = (struct kv_ring_ctl *)(r->ring + KV_CQ_CTL_OFF);
	r->sqes = (struct kv_sqe *)(r->ring + KV_SQ_OFF);
	r->cqes = (struct kv_cqe *)(r->ring + KV_SQ_OFF + r->sq_entries * sizeof(struct kv_sqe));
	ring_attach(&r->sq, r->sqc, r->sqes, r->sq_entries, sizeof(struct kv_sqe), true);
	ring_attach(&r->cq, r->cqc, r->cqes, r->cq_entries, sizeof(struct kv_cqe), false);
	return 0;

out_close:
	raw_close(r);
	return 1;
}

/* Open (create) a key; its id, or -1 with sh->why set. */
static long raw_key(struct shared *sh, struct raw *r, const char *name, uint64_t count, kv_dtype t,
		    uint32_t *nparts)
{
	struct kv_msg m = {.type = KV_MSG_KEY_OPEN}, rep;
	int fds[8], nfds = 0;

	m.u.key_open.count = count;
	m.u.key_open.dtype = (uint8_t)t;
	m.u.key_open.mode = KV_KEY_CREATE;
	m.u.key_open.name_len = (uint32_t)strlen(name);
	memcpy(m.u.key_open.name, name, m.u.key_open.name_len);
	if (raw_request(sh, r, &m, &rep, fds, &nfds))
		return -1;
	close_fds(fds, nfds);
	if (rep.type != KV_MSG_KEY) {
		fail(sh, "key '%s': reply type %u (%.*s)", name, rep.type,
		     rep.type == KV_MSG_ERROR ? (int)rep.u.error.len : 0,
		     rep.type == KV_MSG_ERROR ? rep.u.error.text : "");
		return -1;
	}
	if (rep.u.key.flags & KV_KEYF_DIRECT) {
		fail(sh, "key '%s' got direct rounds: kvd should run with --direct-max 0", name);
		return -1;
	}
	if (nparts)
		*nparts = rep.u.key.nparts;
	return rep.u.key.key_id;
}

/* Ask for an arena segment and map it; its index in r->seg, or -1. */
static int raw_seg(struct shared *sh, struct raw *r, uint64_t bytes)
{
	struct kv_msg m = {.type = KV_MSG_SEG_ALLOC}, rep;
	int fds[8], nfds = 0, rc, i = r->nseg;
	void *mem;

	m.u.seg_alloc.bytes = bytes;
	if (raw_request(sh, r, &m, &rep, fds, &nfds))
		return -1;
	if (rep.type != KV_MSG_SEG || nfds != 1) {
		close_fds(fds, nfds);
		fail(sh, "seg alloc: reply type %u with %d fds", rep.type, nfds);
		return -1;
	}
	rc = seg_map(fds[0], rep.u.seg.size, 0, &mem);
	close(fds[0]);
	if (rc) {
		fail(sh, "seg_map of an arena segment: %s", strerror(-rc));
		return -1;
	}
	r->seg[i] = mem;
	r->seg_size[i] = rep.u.seg.size;
	r->seg_id[i] = rep.u.seg.seg_id;
	r->nseg++;
	return i;
}

static void raw_ring_doorbell(struct raw *r)
{
	uint64_t one = 1;

	(void)!write(r->doorbell, &one, sizeof(one));
}

/* Submit as a well-behaved client does; 0, -ETIMEDOUT, or -EPROTO. */
static int raw_submit(struct raw *r, const struct kv_sqe *s, int timeout_ms)
{
	double deadline = now_s() + timeout_ms / 1000.0;
	int rc;

	while ((rc = ring_push(&r->sq, s)) == -EAGAIN) {
		raw_ring_doorbell(r);
		if (now_s() > deadline)
			return -ETIMEDOUT;
		sched_yield();
	}
	if (rc == 0 && ring_consumer_sleeping(&r->sq))
		raw_ring_doorbell(r);
	return rc;
}

/* The next completion within timeout_ms: 0, -ETIMEDOUT, -EPROTO. */
static int raw_reap(struct raw *r, struct kv_cqe *q, int timeout_ms)
{
	int rc = ring_wait(&r->cq, 2000, timeout_ms);

	return rc ? rc : ring_pop(&r->cq, q);
}

static uint64_t rnd(uint64_t *s)
{
	/* xorshift64* */
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545f4914f6cdd1dull;
}

static struct kv_sqe sqe_of(uint8_t op, uint32_t key, uint64_t count, uint64_t ud)
{
	struct kv_sqe s = {
		.op = op, .dtype = KV_FLOAT32, .key = key, .count = count, .user_data = ud};

	s.in.seg = s.out.seg = KV_SEG_NONE;
	return s;
}

/* ------------------------------------------------------------------ the rings */

/*
 * Random bytes over every SQ entry, the segment header and the control
 * words of both rings, in rounds, ringing the doorbell each time.  kvd may
 * evict the client (impossible indices) or take the garbage as submissions
 * and fail them; either way only this client is affected.
 */
static int attack_garbage(const struct kvd_proc *k, struct shared *sh)
{
	uint64_t s = 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid();
	char job[64];

	sh->started = 1;
	while (!sh->stop) {
		struct raw r;
		long id;

		snprintf(job, sizeof(job), "garbage-%ld", sh->attacks);
		if (raw_open(sh, &r, k, job, 0, 1))
			return 1;
		if ((id = raw_key(sh, &r, "g", 64, KV_FLOAT32, NULL)) < 0 ||
		    raw_seg(sh, &r, 4096) < 0)
			return 1;
		for (int round = 0; round < 16 && !sh->stop; round++) {
			uint32_t *words[] = {&r.sqc->tail, &r.sqc->head, &r.sqc->sleeping,
					     &r.cqc->tail, &r.cqc->head, &r.cqc->sleeping};
			uint8_t *bytes = (uint8_t *)r.sqes;

			for (size_t i = 0; i < r.sq_entries * sizeof(struct kv_sqe); i++)
				bytes[i] = (uint8_t)rnd(&s);
			/* some entries that name this client's key and segment, with random rest */
			for (uint32_t i = 0; i < r.sq_entries; i += 3) {
				r.sqes[i].key = (uint32_t)id;
				r.sqes[i].in.seg = r.seg_id[0];
				r.sqes[i].out.seg =
					(uint32_t)rnd(&s) % 3 ? r.seg_id[0] : KV_SEG_NONE;
				r.sqes[i].op = (uint8_t)(rnd(&s) % 8);
			}
			for (size_t i = 0; i < sizeof(struct kv_seg_hdr); i++)
				r.ring[i] = (uint8_t)rnd(&s);
			for (int i = 0; i < 6; i++) {
				uint64_t x = rnd(&s);
				/* a plausible value (near the other index) or any value */
				uint32_t near = __atomic_load_n(words[i ^ 1], __ATOMIC_RELAXED);
				uint32_t v = x & 1 ? near + (uint32_t)((x >> 8) % 600) - 40
						   : (uint32_t)(x >> 16);
				if ((x >> 40) % 3 == 0)
					continue;
				__atomic_store_n(words[i], v, __ATOMIC_SEQ_CST);
			}
			raw_ring_doorbell(&r);
			usleep(1000);
		}
		sh->evicted += raw_gone(r.sock, 50);
		raw_close(&r);
		sh->attacks++;
	}
	return 0;
}

Test(hostile, random_bytes_in_rings, .timeout = 40, .fini = cleanup)
{
	run_attack("random_bytes_in_rings", attack_garbage, engine_args, NULL);
}

/* A few well-formed NOP submissions (each fails with KV_ERR_INVALID), reaped. */
static int nops(struct shared *sh, struct raw *r, int n)
{
	for (int i = 0; i < n; i++) {
		struct kv_sqe s = sqe_of(KV_OP_NOP, 0, 1, 1000 + (uint64_t)i);
		struct kv_cqe q;
		int rc = raw_submit(r, &s, 3000);

		if (rc)
			return fail(sh, "submit: %s", strerror(-rc));
		rc = raw_reap(r, &q, 3000);
		if (rc)
			return fail(sh, "no completion for a NOP: %s", strerror(-rc));
		if (q.user_data != s.user_data || q.status != KV_ERR_INVALID)
			return fail(sh, "NOP: completion %llu status %d, want %llu status %d",
				    (unsigned long long)q.user_data, q.status,
				    (unsigned long long)s.user_data, KV_ERR_INVALID);
	}
	return 0;
}

/*
 * The SQ tail moved backwards, or past head + entries: an impossible ring.
 * ring.h makes the consumer see -EPROTO; kvd then evicts the client (its
 * socket sees EOF) and serves everyone else as before.
 */
static int attack_sq_tail(const struct kvd_proc *k, struct shared *sh)
{
	static const int64_t moves[] = {-1, -3, -1000, 257, 1000, 1 << 20, INT32_MAX, -INT32_MAX};
	char job[64];

	sh->started = 1;
	for (long i = 0; !sh->stop; i++) {
		struct raw r;
		int64_t mv = moves[i % (long)(sizeof(moves) / sizeof(moves[0]))];
		uint32_t head;

		snprintf(job, sizeof(job), "sqtail-%ld", i);
		if (raw_open(sh, &r, k, job, 0, 1) || nops(sh, &r, 3))
			return 1;
		head = __atomic_load_n(&r.sqc->head, __ATOMIC_ACQUIRE); /* kvd took 3 */
		if (head != 3)
			return fail(sh, "SQ head %u after 3 submissions taken", head);
		/* 257: one past a full ring of 256 (kvd's default) */
		if (mv == 257)
			mv = (int64_t)r.sq_entries + 1;
		__atomic_store_n(&r.sqc->tail, head + (uint32_t)mv, __ATOMIC_SEQ_CST);
		raw_ring_doorbell(&r);
		if (!raw_gone(r.sock, 3000))
			return fail(sh,
				    "SQ tail moved by %lld from head %u: kvd did not disconnect "
				    "the client within 3 s",
				    (long long)mv, head);
		sh->evicted++;
		raw_close(&r);
		sh->attacks++;
	}
	return 0;
}

Test(hostile, sq_tail_impossible, .timeout = 40, .fini = cleanup)
{
	run_attack("sq_tail_impossible", attack_sq_tail, engine_args, NULL);
}

/*
 * The CQ's head set where no consumer could have put it (far ahead of the
 * producer, or further behind than the ring holds), then enough submissions
 * that kvd must look at it (a ring's worth of completions): kvd evicts the
 * client.  And the CQ's tail (kvd's own word) scribbled: kvd keeps its own
 * copy and republishes it with its next completion.
 */
static int attack_cq(const struct kvd_proc *k, struct shared *sh)
{
	static const uint32_t heads[] = {0x80000000u, 0xffffff00u, 0x40000000u, 0xfffff000u};
	char job[64];

	sh->started = 1;
	for (long i = 0; !sh->stop; i++) {
		struct raw r;
		struct kv_cqe q;
		uint32_t bad = heads[i % 4];
		int rc;

		snprintf(job, sizeof(job), "cq-%ld", i);
		if (raw_open(sh, &r, k, job, 0, 1) || nops(sh, &r, 2))
			return 1;
		/* kvd's tail is 2: scribble it, then see kvd publish 3 with the next one */
		__atomic_store_n(&r.cqc->tail, 0xdeadbeefu, __ATOMIC_SEQ_CST);
		{
			struct kv_sqe s = sqe_of(KV_OP_NOP, 0, 1, 77);
			if ((rc = raw_submit(&r, &s, 3000)))
				return fail(sh, "submit: %s", strerror(-rc));
		}
		for (double t = now_s() + 3;
		     __atomic_load_n(&r.cqc->tail, __ATOMIC_ACQUIRE) != 3 && now_s() < t;)
			usleep(200);
		if (__atomic_load_n(&r.cqc->tail, __ATOMIC_ACQUIRE) != 3)
			return fail(sh, "after a scribbled CQ tail kvd published tail %u, want 3",
				    __atomic_load_n(&r.cqc->tail, __ATOMIC_ACQUIRE));
		if ((rc = raw_reap(&r, &q, 1000)) || q.user_data != 77 ||
		    q.status != KV_ERR_INVALID)
			return fail(sh,
				    "completion after a scribbled CQ tail: rc %d ud %llu status %d",
				    rc, (unsigned long long)q.user_data, q.status);
		/* now an impossible head, and more completions than the ring holds */
		__atomic_store_n(&r.cqc->head, bad, __ATOMIC_SEQ_CST);
		for (uint32_t n = 0; n < r.cq_entries + 16 && !raw_gone(r.sock, 0); n++) {
			struct kv_sqe s = sqe_of(KV_OP_NOP, 0, 1, n);
			if (raw_submit(&r, &s, 1000))
				break;
		}
		raw_ring_doorbell(&r);
		if (!raw_gone(r.sock, 3000))
			return fail(sh,
				    "CQ head %#x with kvd's tail near %u: kvd did not disconnect "
				    "the client within 3 s",
				    bad, r.cq_entries + 3);
		sh->evicted++;
		raw_close(&r);
		sh->attacks++;
	}
	return 0;
}

Test(hostile, cq_indices_impossible, .timeout = 40, .fini = cleanup)
{
	run_attack("cq_indices_impossible", attack_cq, engine_args, NULL);
}

/* ------------------------------------------------------------------ submissions */

#define BAD_MAX 64

struct bad_case {
	const char *what;
	struct kv_sqe s;
	int ok[3]; /* the statuses the contract allows (0 ends the list) */
};

/*
 * Entries that name a key, part, segment or range that does not exist (or
 * overflows), or an op or dtype outside the enums: each fails with an error
 * completion of its own, and the client stays connected and served.
 * Contract: layout.h (part < the key's nparts; data in a segment kvd handed
 * out), the design's contract (count or dtype not the key's: KV_ERR_MISMATCH; no such
 * key: KV_ERR_NOKEY; every index and offset bounds-checked).
 */
static int bad_cases(struct bad_case *c, uint32_t key, uint32_t seg, uint64_t size)
{
	struct kv_sqe good = sqe_of(KV_OP_PUSHPULL, key, 256, 0);
	int n = 0;

	good.in = (struct kv_loc){.seg = seg, .off = 0};
	good.out = (struct kv_loc){.seg = seg, .off = 2048};
#define BAD(desc, stmt, c1, c2)             \
	do {                                \
		struct kv_sqe *s = &c[n].s; \
		c[n].what = desc;           \
		*s = good;                  \
		stmt;                       \
		c[n].ok[0] = c1;            \
		c[n].ok[1] = c2;            \
		c[n].ok[2] = 0;             \
		n++;                        \
	} while (0)
	BAD("op 0 (NOP)", s->op = KV_OP_NOP, KV_ERR_INVALID, 0);
	BAD("op 7", s->op = KV_OP_MAX, KV_ERR_INVALID, 0);
	BAD("op 100", s->op = 100, KV_ERR_INVALID, 0);
	BAD("op 255", s->op = 255, KV_ERR_INVALID, 0);
	BAD("key id + 1", s->key = key + 1, KV_ERR_NOKEY, KV_ERR_INVALID);
	BAD("key id 1000000", s->key = 1000000, KV_ERR_NOKEY, KV_ERR_INVALID);
	BAD("key id 2^32-1", s->key = UINT32_MAX, KV_ERR_NOKEY, KV_ERR_INVALID);
	BAD("dtype f64 on an f32 key", s->dtype = KV_FLOAT64, KV_ERR_MISMATCH, 0);
	BAD("dtype 6", s->dtype = 6, KV_ERR_MISMATCH, KV_ERR_INVALID);
	BAD("dtype 255", s->dtype = 255, KV_ERR_MISMATCH, KV_ERR_INVALID);
	BAD("count - 1", s->count = 255, KV_ERR_MISMATCH, 0);
	BAD("count + 1", s->count = 257, KV_ERR_MISMATCH, 0);
	BAD("count 0", s->count = 0, KV_ERR_MISMATCH, KV_ERR_INVALID);
	BAD("count 2^64-1", s->count = UINT64_MAX, KV_ERR_MISMATCH, KV_ERR_INVALID);
	BAD("part 1 of 1", s->part = 1, KV_ERR_INVALID, 0);
	BAD("part 2^31", s->part = 1u << 31, KV_ERR_INVALID, 0);
	BAD("part 2^32-1", s->part = UINT32_MAX, KV_ERR_INVALID, 0);
	BAD("in: segment id + 1", s->in.seg = seg + 1, KV_ERR_INVALID, 0);
	BAD("in: segment id 255", s->in.seg = 255, KV_ERR_INVALID, 0);
	BAD("in: segment id 2^32-2", s->in.seg = UINT32_MAX - 1, KV_ERR_INVALID, 0);
	BAD("in: 1 byte past the end", s->in.off = size - 1023, KV_ERR_INVALID, 0);
	BAD("in: offset = size", s->in.off = size, KV_ERR_INVALID, 0);
	BAD("in: offset 2^40", s->in.off = 1ull << 40, KV_ERR_INVALID, 0);
	BAD("in: offset 2^63", s->in.off = 1ull << 63, KV_ERR_INVALID, 0);
	BAD("in: offset + length overflows", s->in.off = UINT64_MAX - 512, KV_ERR_INVALID, 0);
	BAD("in: offset 2^64-1", s->in.off = UINT64_MAX, KV_ERR_INVALID, 0);
	BAD("in: offset 2^64-1024", s->in.off = (uint64_t)0 - 1024, KV_ERR_INVALID, 0);
	BAD("out: segment id + 1", s->out.seg = seg + 1, KV_ERR_INVALID, 0);
	BAD("out: 1 byte past the end", s->out.off = size - 1023, KV_ERR_INVALID, 0);
	BAD("out: offset + length overflows", s->out.off = UINT64_MAX - 100, KV_ERR_INVALID, 0);
	BAD("push without input", (s->op = KV_OP_PUSH, s->in.seg = KV_SEG_NONE), KV_ERR_INVALID, 0);
	BAD("pushpull without input", s->in.seg = KV_SEG_NONE, KV_ERR_INVALID, 0);
	BAD("pull without output", (s->op = KV_OP_PULL, s->out.seg = KV_SEG_NONE), KV_ERR_INVALID,
	    0);
	BAD("pull: output offset overflows", (s->op = KV_OP_PULL, s->out.off = UINT64_MAX - 8),
	    KV_ERR_INVALID, 0);
	BAD("broadcast (rank 0) without input", (s->op = KV_OP_BCAST, s->in.seg = KV_SEG_NONE),
	    KV_ERR_INVALID, 0);
	/* and two that are right at the edge: they succeed */
	BAD("in and out end exactly at the segment's end",
	    (s->in.off = size - 1024, s->out.off = size - 1024), KV_OK, 0);
	BAD("pull into the last 1024 bytes", (s->op = KV_OP_PULL, s->out.off = size - 1024), KV_OK,
	    0);
#undef BAD
	return n;
}

static int attack_bad_sqes(const struct kvd_proc *k, struct shared *sh)
{
	static struct bad_case c[BAD_MAX];
	struct raw r;
	long key;
	int seg, n, rc;
	float *mem;

	sh->started = 1;
	if (raw_open(sh, &r, k, "badsqe", 0, 1))
		return 1;
	if ((key = raw_key(sh, &r, "k", 256, KV_FLOAT32, NULL)) < 0 ||
	    (seg = raw_seg(sh, &r, 4096)) < 0)
		return 1;
	mem = (float *)r.seg[seg];
	for (int i = 0; i < 256; i++)
		mem[i] = (float)i;
	{
		struct kv_sqe s = sqe_of(KV_OP_INIT, (uint32_t)key, 256, 1);
		struct kv_cqe q;

		s.in = (struct kv_loc){.seg = r.seg_id[seg], .off = 0};
		if ((rc = raw_submit(&r, &s, 3000)) || (rc = raw_reap(&r, &q, 3000)))
			return fail(sh, "init: %s", strerror(-rc));
		if (q.status != KV_OK)
			return fail(sh, "init: status %d", q.status);
	}
	n = bad_cases(c, (uint32_t)key, r.seg_id[seg], r.seg_size[seg]);
	while (!sh->stop) {
		for (int i = 0; i < n; i++) {
			const struct kv_sqe *s = &c[i].s;
			bool in_ok = s->in.seg == r.seg_id[seg] && s->in.off <= 4096 - 1024;
			bool out_ok = s->out.seg == r.seg_id[seg] && s->out.off <= 4096 - 1024;
			struct kv_cqe q;

			/* -1 everywhere, this rank's value (e) where the input is */
			for (int e = 0; e < 1024; e++)
				mem[e] = -1.0f;
			for (int e = 0; in_ok && e < 256; e++)
				mem[s->in.off / 4 + (uint64_t)e] = (float)e;
			c[i].s.user_data = ((uint64_t)sh->attacks << 16) | (uint64_t)i;
			if ((rc = raw_submit(&r, s, 3000)))
				return fail(sh, "%s: submit: %s", c[i].what, strerror(-rc));
			if ((rc = raw_reap(&r, &q, 3000)))
				return fail(sh, "%s: no completion within 3 s (%s)%s", c[i].what,
					    strerror(-rc),
					    raw_gone(r.sock, 0) ? "; kvd disconnected the client"
								: "");
			if (q.user_data != s->user_data)
				return fail(sh, "%s: completion for %llx, want %llx", c[i].what,
					    (unsigned long long)q.user_data,
					    (unsigned long long)s->user_data);
			if (q.status != c[i].ok[0] && (!c[i].ok[1] || q.status != c[i].ok[1]))
				return fail(sh, "%s: status %d (%s), want %d (%s)", c[i].what,
					    q.status, kv_strerror(q.status), c[i].ok[0],
					    kv_strerror(c[i].ok[0]));
			/* one rank: a round's sum, and the key's value, is this rank's value */
			for (int e = 0; q.status == KV_OK && out_ok && e < 256; e++)
				if (mem[s->out.off / 4 + (uint64_t)e] != (float)e)
					return fail(sh, "%s: element %d is %g, want %d", c[i].what,
						    e, (double)mem[s->out.off / 4 + (uint64_t)e],
						    e);
			sh->ops++;
		}
		if (raw_gone(r.sock, 0))
			return fail(sh,
				    "kvd disconnected a client whose bad submissions it failed");
		sh->attacks++;
	}
	raw_close(&r);
	return 0;
}

Test(hostile, out_of_range_submissions, .timeout = 40, .fini = cleanup)
{
	run_attack("out_of_range_submissions", attack_bad_sqes, engine_args, NULL);
}

/*
 * A flood: as many submissions as the ring takes, a quarter of each kind
 * (invalid op, unknown key, valid pushpull, count mismatch), reaped as they
 * come; every one gets exactly one completion with the right status.
 */
static int attack_flood(const struct kvd_proc *k, struct shared *sh)
{
	static const int want[4] = {KV_ERR_INVALID, KV_ERR_NOKEY, KV_OK, KV_ERR_MISMATCH};
	long sent[4] = {0}, got[4] = {0}, total_sent = 0, total_got = 0;
	struct raw r;
	long key;
	int seg, rc;
	double deadline = now_s() + 5;

	if (raw_open(sh, &r, k, "sqeflood", 0, 1))
		return 1;
	if ((key = raw_key(sh, &r, "f", 16, KV_FLOAT32, NULL)) < 0 ||
	    (seg = raw_seg(sh, &r, 4096)) < 0)
		return 1;
	{
		struct kv_sqe s = sqe_of(KV_OP_INIT, (uint32_t)key, 16, 1);
		struct kv_cqe q;

		s.in = (struct kv_loc){.seg = r.seg_id[seg], .off = 0};
		if ((rc = raw_submit(&r, &s, 3000)) || (rc = raw_reap(&r, &q, 3000)) || q.status)
			return fail(sh, "init: rc %d status %d", rc, q.status);
	}
	sh->started = 1;
	while (!sh->stop || total_got < total_sent) {
		struct kv_cqe q;

		if (!sh->stop) {
			for (int b = 0; b < 64; b++) {
				int kind = (int)(total_sent & 3);
				struct kv_sqe s =
					sqe_of(KV_OP_PUSHPULL, (uint32_t)key, 16,
					       ((uint64_t)kind << 56) | (uint64_t)total_sent);

				s.in = (struct kv_loc){.seg = r.seg_id[seg], .off = 0};
				s.out = (struct kv_loc){.seg = r.seg_id[seg], .off = 1024};
				if (kind == 0)
					s.op = KV_OP_NOP;
				else if (kind == 1)
					s.key = 4000000;
				else if (kind == 3)
					s.count = 17;
				rc = ring_push(&r.sq, &s);
				if (rc == -EAGAIN)
					break;
				if (rc)
					return fail(sh, "SQ: %s", strerror(-rc));
				sent[kind]++;
				total_sent++;
			}
			raw_ring_doorbell(&r);
			deadline = now_s() + 5;
		}
		while ((rc = ring_pop(&r.cq, &q)) == 0) {
			int kind = (int)(q.user_data >> 56);

			if (kind > 3 || q.status != want[kind])
				return fail(sh, "completion %llx: status %d, want %d",
					    (unsigned long long)q.user_data, q.status,
					    kind > 3 ? 0 : want[kind]);
			got[kind]++;
			total_got++;
		}
		if (rc != -EAGAIN)
			return fail(sh, "CQ: %s", strerror(-rc));
		if (sh->stop && total_got < total_sent) {
			if (now_s() > deadline)
				return fail(sh, "%ld of %ld completions after 5 s", total_got,
					    total_sent);
			raw_ring_doorbell(&r);
			usleep(100);
		}
		sched_yield();
	}
	for (int i = 0; i < 4; i++)
		if (sent[i] != got[i])
			return fail(sh, "kind %d: %ld submitted, %ld completed", i, sent[i],
				    got[i]);
	if (total_sent < 5000)
		return fail(sh, "only %ld submissions taken in the window", total_sent);
	sh->ops = total_got;
	sh->attacks = 1;
	raw_close(&r);
	return 0;
}

Test(hostile, submission_flood, .timeout = 40, .fini = cleanup)
{
	run_attack("submission_flood", attack_flood, engine_args, NULL);
}

/*
 * A client that keeps submitting and never advances its CQ head.  kvd never
 * writes past the unreaped completions (tail - head <= entries, always), it
 * keeps what does not fit (engine.c: a private overflow list, as io_uring's),
 * and everyone else is served meanwhile.  When the client reaps at last it
 * gets every completion, in order, as a client does (no extra doorbell).
 */
#define NOREAP_MAX 60000

static int attack_noreap(const struct kvd_proc *k, struct shared *sh)
{
	struct raw r;
	long sent = 0, got = 0;
	double t0, stuck_at = 0;
	int rc;

	if (raw_open(sh, &r, k, "noreap", 0, 1))
		return 1;
	sh->started = 1;
	while (!sh->stop) {
		uint32_t tail = __atomic_load_n(&r.cqc->tail, __ATOMIC_ACQUIRE);
		uint32_t head = __atomic_load_n(&r.cqc->head, __ATOMIC_RELAXED);

		if (tail - head > r.cq_entries)
			return fail(sh, "kvd wrote past unreaped completions: CQ tail %u, head %u",
				    tail, head);
		for (int b = 0; b < 64 && sent < NOREAP_MAX; b++) {
			struct kv_sqe s = sqe_of(KV_OP_NOP, 0, 1, (uint64_t)sent + 1);

			rc = ring_push(&r.sq, &s);
			if (rc == -EAGAIN)
				break;
			if (rc)
				return fail(sh, "SQ: %s", strerror(-rc));
			sent++;
		}
		raw_ring_doorbell(&r);
		if (raw_gone(r.sock, 0))
			return fail(sh,
				    "kvd disconnected the client after %ld unreaped completions",
				    sent);
		usleep(sent < NOREAP_MAX ? 50 : 2000);
	}
	/*
	 * Reap now, as libkv does: pop, and sleep on the CQ when it is empty.
	 * First a pause, as a client busy elsewhere makes: kvd has nothing to do
	 * but wait for CQ room meanwhile (and may sleep).
	 */
	usleep(50000);
	t0 = now_s();
	while (got < sent && now_s() - t0 < 6) {
		struct kv_cqe q;

		rc = raw_reap(&r, &q, 100);
		if (rc == -ETIMEDOUT) {
			if (!stuck_at) {
				stuck_at = now_s();
				snprintf(sh->note, sizeof(sh->note),
					 "reaping stalled at %ld of %ld completions", got, sent);
			} else if (now_s() - stuck_at > 1) {
				break; /* a client that waits on its CQ, as libkv does, hangs here
					*/
			}
			continue;
		}
		if (rc)
			return fail(sh, "CQ: %s", strerror(-rc));
		if (q.user_data != (uint64_t)got + 1 || q.status != KV_ERR_INVALID)
			return fail(sh, "completion %ld: user_data %llu status %d", got + 1,
				    (unsigned long long)q.user_data, q.status);
		got++;
		stuck_at = 0;
	}
	sh->ops = got;
	sh->attacks = 1;
	if (got < sent) {
		/* diagnosis: does a doorbell write (nothing to submit) bring the rest? */
		long before = got;
		struct kv_cqe q;

		raw_ring_doorbell(&r);
		while (raw_reap(&r, &q, 200) == 0)
			got++;
		return fail(sh,
			    "%s: no completion for 1 s while %ld more were due (kvd keeps "
			    "them on its overflow list and sleeps; a doorbell write with nothing "
			    "submitted then brought %ld more): a client waiting on its CQ, as "
			    "libkv does, hangs",
			    sh->note, sent - before, got - before);
	}
	raw_close(&r);
	return 0;
}

Test(hostile, completions_never_reaped, .timeout = 40, .fini = cleanup)
{
	run_attack("completions_never_reaped", attack_noreap, engine_args, NULL);
}

/*
 * Two raw ranks of one job; rank 0 hands kvd buffers the kernels cannot take
 * as they are: an input at an offset that is not a multiple of the element
 * size, a broadcast whose output partly overlaps its input.  Nothing in the
 * ABI forbids either (a kv_loc is any byte offset inside a segment), so kvd
 * may refuse the entry (an error completion) or compute the round; what it
 * must not do is complete the round with KV_OK while rank 1's output (and
 * the key's value) were never written.
 */
/*
 * One round of two raw ranks.  When kvd refuses rank 0's entry alone
 * (KV_ERR_INVALID), the round stays open for a correct call, as with a
 * count or dtype mismatch: rank 0 then sends fix0, and rank 1's op must
 * complete with the round that one makes.
 */
static int round2(struct shared *sh, struct raw *r, const struct kv_sqe *s0,
		  const struct kv_sqe *s1, const struct kv_sqe *fix0, int *st0, int *st1)
{
	struct kv_cqe q;
	int rc;

	if ((rc = raw_submit(&r[0], s0, 3000)) || (rc = raw_submit(&r[1], s1, 3000)))
		return fail(sh, "submit: %s", strerror(-rc));
	if ((rc = raw_reap(&r[0], &q, 3000)))
		return fail(sh, "rank 0: no completion: %s", strerror(-rc));
	*st0 = q.status;
	if (q.status == KV_ERR_INVALID && fix0) {
		if ((rc = raw_submit(&r[0], fix0, 3000)))
			return fail(sh, "submit: %s", strerror(-rc));
		if ((rc = raw_reap(&r[0], &q, 3000)))
			return fail(sh, "rank 0's corrected entry: no completion: %s",
				    strerror(-rc));
		if (q.status != KV_OK)
			return fail(sh, "rank 0's corrected entry failed: %d", q.status);
	}
	if ((rc = raw_reap(&r[1], &q, 3000)))
		return fail(sh, "rank 1: no completion: %s", strerror(-rc));
	*st1 = q.status;
	return 0;
}

static int attack_misaligned(const struct kvd_proc *k, struct shared *sh)
{
	struct raw r[2];
	long key = -1;
	int seg[2], st0, st1;
	char job[64];
	float *m1, want[64];

	sh->started = 1;
	for (long round = 0; !sh->stop; round++) {
		snprintf(job, sizeof(job), "misaligned-%ld", round);
		for (int i = 0; i < 2; i++) {
			if (raw_open(sh, &r[i], k, job, i, 2))
				return 1;
			if ((key = raw_key(sh, &r[i], "m", 64, KV_FLOAT32, NULL)) < 0 ||
			    (seg[i] = raw_seg(sh, &r[i], 4096)) < 0)
				return 1;
		}
		m1 = (float *)r[1].seg[seg[1]];
		/* an input 2 bytes into rank 0's segment; rank 1's is aligned */
		{
			struct kv_sqe s0 = sqe_of(KV_OP_PUSHPULL, (uint32_t)key, 64, 1);
			struct kv_sqe s1 = sqe_of(KV_OP_PUSHPULL, (uint32_t)key, 64, 2);
			float v0[64];

			for (int i = 0; i < 64; i++) {
				v0[i] = 100.0f + (float)i;
				m1[i] = (float)(i + 1);
				m1[256 + i] = -7.0f;
				want[i] = v0[i] + m1[i];
			}
			struct kv_sqe fix = sqe_of(KV_OP_PUSHPULL, (uint32_t)key, 64, 5);

			memcpy(r[0].seg[seg[0]] + 2, v0, sizeof(v0));
			memcpy(r[0].seg[seg[0]] + 2048, v0, sizeof(v0));
			s0.in = (struct kv_loc){.seg = r[0].seg_id[seg[0]], .off = 2};
			fix.in = (struct kv_loc){.seg = r[0].seg_id[seg[0]], .off = 2048};
			s1.in = (struct kv_loc){.seg = r[1].seg_id[seg[1]], .off = 0};
			s1.out = (struct kv_loc){.seg = r[1].seg_id[seg[1]], .off = 1024};
			if (round2(sh, r, &s0, &s1, &fix, &st0, &st1))
				return 1;
			for (int i = 0; st1 == KV_OK && i < 64; i++)
				if (m1[256 + i] != want[i])
					return fail(
						sh,
						"rank 0's input at byte offset 2 (f32): both "
						"ranks got KV_OK (rank 0: %d) but rank 1's element "
						"%d is %g, want %g: the round was never computed",
						st0, i, (double)m1[256 + i], (double)want[i]);
		}
		/* a broadcast whose output starts 4 bytes into its own input */
		{
			struct kv_sqe s0 = sqe_of(KV_OP_BCAST, (uint32_t)key, 64, 3);
			struct kv_sqe s1 = sqe_of(KV_OP_BCAST, (uint32_t)key, 64, 4);
			float *m0 = (float *)r[0].seg[seg[0]];

			for (int i = 0; i < 64; i++) {
				m0[i] = want[i] = 1000.0f + (float)i;
				m1[256 + i] = -7.0f;
			}
			struct kv_sqe fix = sqe_of(KV_OP_BCAST, (uint32_t)key, 64, 6);

			s0.in = (struct kv_loc){.seg = r[0].seg_id[seg[0]], .off = 0};
			s0.out = (struct kv_loc){.seg = r[0].seg_id[seg[0]], .off = 4};
			fix.in = s0.in;
			fix.out = (struct kv_loc){.seg = r[0].seg_id[seg[0]], .off = 3072};
			s1.out = (struct kv_loc){.seg = r[1].seg_id[seg[1]], .off = 1024};
			if (round2(sh, r, &s0, &s1, &fix, &st0, &st1))
				return 1;
			for (int i = 0; st1 == KV_OK && i < 64; i++)
				if (m1[256 + i] != want[i])
					return fail(
						sh,
						"broadcast whose output overlaps its input by "
						"all but 4 bytes: both ranks got KV_OK (rank 0: "
						"%d) but rank 1's element %d is %g, want %g",
						st0, i, (double)m1[256 + i], (double)want[i]);
		}
		sh->ops += 4;
		sh->attacks++;
		raw_close(&r[0]);
		raw_close(&r[1]);
	}
	return 0;
}

Test(hostile, unaligned_and_overlapping_buffers, .timeout = 40, .fini = cleanup)
{
	run_attack("unaligned_and_overlapping_buffers", attack_misaligned, engine_args, NULL);
}

/*
 * An op whose parts straddle a death.  Both ranks sum part 0 of an op; rank 1
 * dies and a replacement joins; rank 0 then submits the op's other parts.
 * Those must fail (KV_ERR_PEER), all of them: were they taken, they would
 * meet the replacement's parts 1.. in rounds while part 0 was summed with the
 * dead rank, and the replacement's part 0 would wait for a partner that has
 * moved on (the soak saw this under TSan's timing).  libkv cannot place parts
 * on either side of a death on demand, so the ring is driven by hand.  Then a
 * fresh op of each rank completes, and every element is checked.
 */
static int reap_status(struct shared *sh, struct raw *r, const char *who, uint64_t ud,
		       int *status)
{
	struct kv_cqe q;
	int rc = raw_reap(r, &q, 5000);

	if (rc)
		return fail(sh, "%s: no completion: %s", who, strerror(-rc));
	if (q.user_data != ud)
		return fail(sh, "%s: completion of op %llu, want op %llu", who,
			    (unsigned long long)q.user_data, (unsigned long long)ud);
	*status = q.status;
	return 0;
}

static int wait_board(struct shared *sh, struct raw *r, uint32_t state)
{
	for (int i = 0; i < 500; i++) {
		if (__atomic_load_n(&r->board->state, __ATOMIC_SEQ_CST) == state)
			return 0;
		usleep(10000);
	}
	return fail(sh, "the job board never reached state %u (it is %u)", state,
		    r->board->state);
}

static int straddle(const struct kvd_proc *k, struct shared *sh)
{
	enum { N = 1 << 20 }; /* f32: 4 MiB, several parts */
	struct raw r[2];
	uint32_t nparts = 0;
	long key;
	int seg[2], st;
	float *v[2];

	for (int i = 0; i < 2; i++)
		if (raw_open(sh, &r[i], k, "straddle", i, 2) ||
		    (key = raw_key(sh, &r[i], "big", N, KV_FLOAT32, &nparts)) < 0 ||
		    (seg[i] = raw_seg(sh, &r[i], (uint64_t)N * 4)) < 0)
			return 1;
	if (nparts < 2)
		return fail(sh, "a %d-element key has %u part(s); the test needs 2 or more", N,
			    nparts);
	uint64_t pelems = (N + nparts - 1) / nparts;
	/* sqe for part p of op ud on rank i: in place in the rank's segment */
#define PART(i, p, ud, ep)                                                                    \
	({                                                                                     \
		struct kv_sqe s_ = sqe_of(KV_OP_PUSHPULL, (uint32_t)key, N, (ud));             \
		s_.part = (p);                                                                 \
		s_.in = (struct kv_loc){.seg = r[i].seg_id[seg[i]],                            \
					.tag = (ep),                                           \
					.off = (uint64_t)(p) * pelems * 4};                    \
		s_.out = s_.in;                                                                \
		s_.out.tag = 0;                                                                \
		s_;                                                                            \
	})
	for (int i = 0; i < 2; i++) {
		v[i] = (float *)r[i].seg[seg[i]];
		for (int e = 0; e < N; e++)
			v[i][e] = (float)((i + 1) * (e % 1000));
	}
	/* op 10, part 0 on both ranks: a round that completes */
	uint32_t e0 = __atomic_load_n(&r[0].board->epoch, __ATOMIC_SEQ_CST);
	struct kv_sqe s = PART(0, 0, 10, e0);
	if (raw_submit(&r[0], &s, 3000))
		return fail(sh, "rank 0: cannot submit");
	s = PART(1, 0, 10, e0);
	if (raw_submit(&r[1], &s, 3000))
		return fail(sh, "rank 1: cannot submit");
	if (reap_status(sh, &r[0], "rank 0, op 10 part 0", 10, &st))
		return 1;
	if (st != KV_OK)
		return fail(sh, "rank 0, op 10 part 0: status %d, want KV_OK", st);
	if (reap_status(sh, &r[1], "rank 1, op 10 part 0", 10, &st))
		return 1;
	/* rank 1 dies; a replacement joins */
	raw_close(&r[1]);
	if (wait_board(sh, &r[0], KV_BOARD_BROKEN))
		return 1;
	for (int tries = 0;; tries++) {
		if (!raw_open(sh, &r[1], k, "straddle", 1, 2))
			break;
		if (tries == 100)
			return 1;
		usleep(20000);
	}
	if ((key = raw_key(sh, &r[1], "big", N, KV_FLOAT32, NULL)) < 0 ||
	    (seg[1] = raw_seg(sh, &r[1], (uint64_t)N * 4)) < 0 ||
	    wait_board(sh, &r[0], KV_BOARD_OK))
		return 1;
	v[1] = (float *)r[1].seg[seg[1]];
	for (int e = 0; e < N; e++)
		v[1][e] = (float)(2 * (e % 1000));
	uint32_t e1 = __atomic_load_n(&r[1].board->epoch, __ATOMIC_SEQ_CST);
	/* the replacement's op 20, every part; then rank 0's rest of op 10 */
	for (uint32_t p = 0; p < nparts; p++) {
		s = PART(1, p, 20, e1);
		if (raw_submit(&r[1], &s, 3000))
			return fail(sh, "replacement: cannot submit");
	}
	for (uint32_t p = 1; p < nparts; p++) {
		s = PART(0, p, 10, e0);
		if (raw_submit(&r[0], &s, 3000))
			return fail(sh, "rank 0: cannot submit");
	}
	for (uint32_t p = 1; p < nparts; p++) {
		if (reap_status(sh, &r[0], "rank 0, op 10 after the death", 10, &st))
			return 1;
		if (st != KV_ERR_PEER)
			return fail(sh,
				    "rank 0's op 10 began before rank 1 died, and its part "
				    "%u, submitted after a replacement joined, completed with "
				    "%d, want KV_ERR_PEER (%d): it was summed with the "
				    "replacement's op while part 0 was summed with the dead rank",
				    p, st, KV_ERR_PEER);
	}
	/* rank 0 starts over: op 30 with the new epoch meets the replacement's op 20 */
	for (int e = 0; e < N; e++)
		v[0][e] = (float)(e % 1000);
	for (uint32_t p = 0; p < nparts; p++) {
		s = PART(0, p, 30, e1);
		if (raw_submit(&r[0], &s, 3000))
			return fail(sh, "rank 0: cannot submit");
	}
	for (uint32_t p = 0; p < nparts; p++) {
		if (reap_status(sh, &r[0], "rank 0, op 30", 30, &st))
			return 1;
		if (st != KV_OK)
			return fail(sh, "rank 0, op 30 part: status %d, want KV_OK", st);
		if (reap_status(sh, &r[1], "replacement, op 20", 20, &st))
			return 1;
		if (st != KV_OK)
			return fail(sh, "replacement, op 20 part: status %d, want KV_OK", st);
	}
	for (int i = 0; i < 2; i++)
		for (int e = 0; e < N; e++)
			if (v[i][e] != (float)(3 * (e % 1000)))
				return fail(sh, "rank %d element %d is %g after the retry, want %g",
					    i, e, (double)v[i][e], (double)(3 * (e % 1000)));
#undef PART
	raw_close(&r[0]);
	raw_close(&r[1]);
	return 0;
}

Test(hostile, op_straddling_a_death, .timeout = 40, .fini = cleanup)
{
	struct kvd_proc k;
	static struct shared sh;

	cr_assert_eq(kvd_start(&k, engine_args), 0, "kvd did not start");
	live_kvd = k;
	live = &live_kvd;
	if (straddle(&k, &sh)) {
		log_tail(&k);
		cr_assert_fail("op_straddling_a_death: %s", sh.why);
	}
	cr_assert_eq(kvd_stop(&k), 0, "kvd did not exit 0 on SIGTERM");
	live = NULL;
}

/* ------------------------------------------------------------------ control messages */

struct wire_hello { /* shm/msg.c's body of HELLO, as the wire has it */
	int32_t rank, num_workers, device;
	uint32_t flags;
	uint16_t job_len, rsvd;
	uint32_t rsvd2;
};

/* A hello built by hand: the header, the body, then job_len bytes of name. */
static size_t hello_bytes(uint8_t *buf, const char *job, size_t jl, int rank, int nw)
{
	struct kv_msg_hdr h = {
		.magic = KV_MSG_MAGIC, .version = KV_MSG_VERSION, .type = KV_MSG_HELLO, .seq = 7};
	struct wire_hello w = {
		.rank = rank, .num_workers = nw, .device = -1, .job_len = (uint16_t)jl};
	size_t n = sizeof(h) + sizeof(w) + jl;

	h.len = (uint32_t)n;
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), &w, sizeof(w));
	memcpy(buf + sizeof(h) + sizeof(w), job, jl);
	return n;
}

static struct kv_msg_hdr *hdr_of(uint8_t *buf)
{
	return (struct kv_msg_hdr *)buf;
}

static struct wire_hello *hello_of(uint8_t *buf)
{
	return (struct wire_hello *)(buf + sizeof(struct kv_msg_hdr));
}

/* One connection, one datagram, then the refusal (need_error: an ERROR must come first). */
static int refused(const struct kvd_proc *k, struct shared *sh, const char *what, const void *buf,
		   size_t len, int need_error)
{
	int fd = raw_connect(k->sock), code, rc;

	if (fd < 0)
		return fail(sh, "%s: connect: %s", what, strerror(errno));
	rc = raw_send(fd, buf, len);
	if (rc == -EMSGSIZE) { /* larger than this socket sends at all: nothing to test */
		close(fd);
		return 0;
	}
	if (rc && rc != -EPIPE && rc != -ECONNRESET) {
		close(fd);
		return fail(sh, "%s: send: %s", what, strerror(-rc));
	}
	rc = expect_refused(sh, fd, what, 3000, &code);
	close(fd);
	if (rc)
		return 1;
	if (need_error && !code)
		return fail(sh, "%s: kvd closed the connection without an ERROR reply", what);
	sh->ops++;
	return 0;
}

/*
 * Malformed and truncated control messages, each on a fresh connection:
 * kvd answers ERROR (where the contract says: an unknown type or version)
 * and closes that connection, nothing else.
 */
static int bad_messages(const struct kvd_proc *k, struct shared *sh)
{
	static uint8_t buf[200000], msg[KV_MSG_MAX];
	const char *job = "hostile-job";
	size_t L = hello_bytes(msg, job, strlen(job), 0, 1), n;
	char what[128];

	/* every prefix of a valid hello (0 bytes: an empty datagram) */
	for (size_t i = 0; i < L; i++) {
		snprintf(what, sizeof(what), "the first %zu of %zu bytes of a hello", i, L);
		if (refused(k, sh, what, msg, i, 0))
			return 1;
	}
#define MUTATE(desc, need, stmt)                              \
	do {                                                  \
		n = hello_bytes(buf, job, strlen(job), 0, 1); \
		stmt;                                         \
		if (refused(k, sh, desc, buf, n, need))       \
			return 1;                             \
	} while (0)
	MUTATE("wrong magic", 0, hdr_of(buf)->magic ^= 1);
	MUTATE("magic of the shared-memory layout", 0, hdr_of(buf)->magic = KV_SHM_MAGIC);
	MUTATE("protocol version 0", 1, hdr_of(buf)->version = 0);
	MUTATE("protocol version 2", 1, hdr_of(buf)->version = 2);
	MUTATE("protocol version 65535", 1, hdr_of(buf)->version = 0xffff);
	MUTATE("type 0", 1, hdr_of(buf)->type = 0);
	MUTATE("type 15 (one past the last)", 1, hdr_of(buf)->type = KV_MSG_TYPE_MAX);
	MUTATE("type 65535", 1, hdr_of(buf)->type = 0xffff);
	MUTATE("length field + 1", 0, hdr_of(buf)->len += 1);
	MUTATE("length field - 1", 0, hdr_of(buf)->len -= 1);
	MUTATE("length field 0", 0, hdr_of(buf)->len = 0);
	MUTATE("length field 16 (a bare header)", 0, hdr_of(buf)->len = 16);
	MUTATE("length field 2^32-1", 0, hdr_of(buf)->len = UINT32_MAX);
	MUTATE("length field 65536", 0, hdr_of(buf)->len = KV_MSG_MAX);
	MUTATE("job length + 1", 0, hello_of(buf)->job_len += 1);
	MUTATE("job length - 1 (the datagram is longer)", 0, hello_of(buf)->job_len -= 1);
	MUTATE("job length 0 with a name after it", 0, hello_of(buf)->job_len = 0);
	MUTATE("job length 65535", 0, hello_of(buf)->job_len = 0xffff);
	MUTATE("reserved field set", 0, hello_of(buf)->rsvd = 1);
	MUTATE("second reserved field set", 0, hello_of(buf)->rsvd2 = 0x80000000u);
	MUTATE("num_workers 0", 0, hello_of(buf)->num_workers = 0);
	MUTATE("num_workers -1", 0, hello_of(buf)->num_workers = -1);
	MUTATE("num_workers 1025", 0, hello_of(buf)->num_workers = KV_MAX_RANKS + 1);
	MUTATE("num_workers 2^31-1", 0, hello_of(buf)->num_workers = INT32_MAX);
	MUTATE("rank -1", 0, hello_of(buf)->rank = -1);
	MUTATE("rank = num_workers", 0, hello_of(buf)->rank = 1);
	MUTATE("rank 1024 of 2", 0, (hello_of(buf)->rank = 1024, hello_of(buf)->num_workers = 2));
	MUTATE("rank 2^31-1", 0, hello_of(buf)->rank = INT32_MAX);
	MUTATE("device -2", 0, hello_of(buf)->device = -2);
	MUTATE("job name with '/'", 0, n = hello_bytes(buf, "a/b", 3, 0, 1));
	MUTATE("job name '..'", 0, n = hello_bytes(buf, "..-/x", 5, 0, 1));
	MUTATE("job name '/'", 0, n = hello_bytes(buf, "/", 1, 0, 1));
	MUTATE("job name with a space", 0, n = hello_bytes(buf, "a b", 3, 0, 1));
	MUTATE("job name with a NUL", 0, n = hello_bytes(buf, "ab\0cd", 5, 0, 1));
	MUTATE("job name with a newline", 0, n = hello_bytes(buf, "ab\ncd", 5, 0, 1));
	MUTATE("job name with a byte >= 0x80", 0, n = hello_bytes(buf, "ab\xc3\xa9", 4, 0, 1));
	MUTATE("empty job name", 0, n = hello_bytes(buf, "", 0, 0, 1));
	{
		char big[200];
		memset(big, 'a', sizeof(big));
		MUTATE("job name of 129 bytes", 0, n = hello_bytes(buf, big, KV_JOB_MAX + 1, 0, 1));
		MUTATE("job name of 200 bytes", 0, n = hello_bytes(buf, big, 200, 0, 1));
	}
#undef MUTATE
	/* the messages only kvd sends, and requests that need a hello first */
	{
		struct kv_msg m = {.type = KV_MSG_KEY_OPEN, .seq = 3};
		static const struct {
			uint16_t type;
			const char *what;
		} before[] = {
			{KV_MSG_KEY_OPEN, "KEY_OPEN before hello"},
			{KV_MSG_SEG_ALLOC, "SEG_ALLOC before hello"},
			{KV_MSG_SEG_FREE, "SEG_FREE before hello"},
			{KV_MSG_OPTIMIZER, "OPTIMIZER before hello"},
			{KV_MSG_SAVE, "SAVE before hello"},
			{KV_MSG_LOAD, "LOAD before hello"},
			{KV_MSG_WELCOME, "WELCOME from a client"},
			{KV_MSG_ERROR, "ERROR from a client"},
			{KV_MSG_SEG, "SEG from a client"},
			{KV_MSG_KEY, "KEY from a client"},
			{KV_MSG_STATUS, "STATUS from a client"},
		};
		for (size_t i = 0; i < sizeof(before) / sizeof(before[0]); i++) {
			memset(&m, 0, sizeof(m));
			m.type = before[i].type;
			m.seq = 3;
			switch (m.type) {
			case KV_MSG_KEY_OPEN:
				m.u.key_open.count = 4;
				m.u.key_open.mode = KV_KEY_CREATE;
				m.u.key_open.name_len = 1;
				m.u.key_open.name[0] = 'k';
				break;
			case KV_MSG_SEG_ALLOC:
				m.u.seg_alloc.bytes = 4096;
				break;
			case KV_MSG_OPTIMIZER:
				m.u.optimizer.spec = "sgd lr=0.1";
				m.u.optimizer.len = 10;
				break;
			case KV_MSG_SAVE:
			case KV_MSG_LOAD:
				m.u.file.path = "x";
				m.u.file.len = 1;
				break;
			case KV_MSG_WELCOME:
				m.u.welcome.sq_entries = m.u.welcome.cq_entries = 8;
				m.u.welcome.part_bytes = 64;
				m.u.welcome.max_segs = 1;
				break;
			case KV_MSG_ERROR:
				m.u.error.code = KV_ERR_INVALID;
				m.u.error.text = "no";
				m.u.error.len = 2;
				break;
			case KV_MSG_SEG:
				m.u.seg.size = 4096;
				break;
			case KV_MSG_KEY:
				m.u.key.count = m.u.key.nparts = m.u.key.part_elems = 1;
				break;
			case KV_MSG_STATUS:
				m.u.status.text = "x";
				m.u.status.len = 1;
				break;
			}
			n = kv_msg_encode(&m, buf, sizeof(buf));
			if (!n)
				return fail(sh, "cannot encode %s", before[i].what);
			if (refused(k, sh, before[i].what, buf, n, 0))
				return 1;
		}
	}
	/* larger than the 8 KiB kvd reads: a hello's header with junk after it */
	{
		static const size_t sizes[] = {8193,	   8192 + 16,	   16384,
					       KV_MSG_MAX, KV_MSG_MAX + 1, 150000};
		for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			n = hello_bytes(buf, job, strlen(job), 0, 1);
			memset(buf + n, 'x', sizes[i] - n);
			hdr_of(buf)->len = (uint32_t)sizes[i];
			snprintf(what, sizeof(what), "a %zu-byte message", sizes[i]);
			if (refused(k, sh, what, buf, sizes[i], 0))
				return 1;
		}
	}
	return 0;
}

/* A valid hello, then a second one on the same connection: refused, connection closed. */
static int second_hello(const struct kvd_proc *k, struct shared *sh, long i)
{
	static uint8_t buf[KV_MSG_MAX];
	char job[64];
	struct raw r;
	int code, rc;
	size_t n;

	snprintf(job, sizeof(job), "twice-%ld", i);
	if (raw_open(sh, &r, k, job, 0, 1))
		return 1;
	n = hello_bytes(buf, job, strlen(job), 0, 1);
	if ((rc = raw_send(r.sock, buf, n)))
		return fail(sh, "second hello: send: %s", strerror(-rc));
	rc = expect_refused(sh, r.sock, "a second hello", 3000, &code);
	raw_close(&r);
	return rc;
}

static int attack_messages(const struct kvd_proc *k, struct shared *sh)
{
	sh->started = 1;
	while (!sh->stop) {
		if (bad_messages(k, sh) || second_hello(k, sh, sh->attacks))
			return 1;
		sh->attacks++;
	}
	return 0;
}

Test(hostile, malformed_messages, .timeout = 40, .fini = cleanup)
{
	run_attack("malformed_messages", attack_messages, engine_args, NULL);
}

/*
 * Floods of control messages: STATUS requests sent without reading the
 * replies (kvd must answer or drop this connection, never block on it),
 * thousands of KEY_OPENs read in lockstep, and more segments than a client
 * may hold (the rest are KV_ERR_NOMEM, the connection stays).
 */
static int flood_status(const struct kvd_proc *k, struct shared *sh)
{
	static uint8_t buf[KV_MSG_MAX];
	struct kv_msg m = {.type = KV_MSG_STATUS_REQ};
	int fd = raw_connect(k->sock), fds[8], nfds;
	long sent = 0, replies = 0;
	size_t n;
	ssize_t got;

	if (fd < 0)
		return fail(sh, "connect: %s", strerror(errno));
	m.u.status_req.what = KV_STATUS_JSON;
	n = kv_msg_encode(&m, buf, sizeof(buf));
	for (; sent < 20000 && !sh->stop; sent++) {
		ssize_t w;
		do
			w = send(fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
		while (w < 0 && errno == EINTR);
		if (w < 0 && errno == EAGAIN) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			if (poll(&p, 1, 3000) != 1)
				return fail(sh, "kvd stopped reading a flooding connection "
						"(its socket stayed full for 3 s)");
			sent--;
			continue;
		}
		if (w < 0)
			break; /* disconnected: allowed */
	}
	/* what comes back: replies, then perhaps EOF; never nothing for long */
	for (;;) {
		struct kv_msg r;
		got = raw_recv(fd, buf, sizeof(buf), 3000, fds, &nfds);
		close_fds(fds, nfds);
		if (got == 0) {
			sh->evicted++;
			break;
		}
		if (got < 0)
			return fail(sh, "after %ld status requests and %ld replies: %s", sent,
				    replies, strerror((int)-got));
		if (kv_msg_decode(buf, (size_t)got, &r, NULL) ||
		    (r.type != KV_MSG_STATUS && r.type != KV_MSG_ERROR))
			return fail(sh, "a flood's reply does not decode as STATUS");
		if (r.type == KV_MSG_STATUS && !(r.u.status.flags & KV_STATUSF_MORE))
			replies++;
		if (replies == sent)
			break;
	}
	sh->ops += replies;
	close(fd);
	return 0;
}

static int flood_keys(const struct kvd_proc *k, struct shared *sh, long round)
{
	char job[64], name[32];
	struct raw r;
	int fds[8], nfds;

	snprintf(job, sizeof(job), "mflood-%ld", round);
	if (raw_open(sh, &r, k, job, 0, 1))
		return 1;
	for (int i = 0; i < 3000 && !sh->stop; i++) {
		struct kv_msg m = {.type = KV_MSG_KEY_OPEN}, rep;

		snprintf(name, sizeof(name), "key-%d", i);
		m.u.key_open.count = 1 + (uint64_t)(i % 7);
		m.u.key_open.dtype = KV_INT32;
		m.u.key_open.mode = i % 3 ? KV_KEY_CREATE : KV_KEY_FIND;
		m.u.key_open.name_len = (uint32_t)strlen(name);
		memcpy(m.u.key_open.name, name, m.u.key_open.name_len);
		if (raw_request(sh, &r, &m, &rep, fds, &nfds))
			return 1;
		close_fds(fds, nfds);
		if (m.u.key_open.mode == KV_KEY_FIND
			    ? rep.type != KV_MSG_ERROR || rep.u.error.code != KV_ERR_NOKEY
			    : rep.type != KV_MSG_KEY)
			return fail(sh, "KEY_OPEN %s (%s): reply type %u", name,
				    m.u.key_open.mode == KV_KEY_FIND ? "find" : "create", rep.type);
		sh->ops++;
	}
	/* more segments than a client may hold: KV_ERR_NOMEM past the limit */
	for (int i = 0, nomem = 0; i < 300 && !sh->stop; i++) {
		struct kv_msg m = {.type = KV_MSG_SEG_ALLOC}, rep;

		m.u.seg_alloc.bytes = 4096;
		if (raw_request(sh, &r, &m, &rep, fds, &nfds))
			return 1;
		close_fds(fds, nfds);
		if (rep.type == KV_MSG_ERROR && rep.u.error.code == KV_ERR_NOMEM) {
			if (++nomem > 1 && i < 2)
				return fail(sh, "SEG_ALLOC: NOMEM on the first segments");
		} else if (rep.type != KV_MSG_SEG || nfds != 1) {
			return fail(sh, "SEG_ALLOC %d: reply type %u with %d fds", i, rep.type,
				    nfds);
		}
		sh->ops++;
	}
	if (raw_gone(r.sock, 0))
		return fail(sh, "kvd disconnected a client that only asked too much");
	raw_close(&r);
	return 0;
}

static int attack_msg_flood(const struct kvd_proc *k, struct shared *sh)
{
	sh->started = 1;
	while (!sh->stop) {
		if (flood_status(k, sh) || flood_keys(k, sh, sh->attacks))
			return 1;
		sh->attacks++;
	}
	return 0;
}

Test(hostile, message_flood, .timeout = 40, .fini = cleanup)
{
	run_attack("message_flood", attack_msg_flood, engine_args, NULL);
}

/*
 * Clients that connect and send nothing, or say hello and then nothing: kvd
 * never waits for them.  While they sit there, new connections are answered
 * at once.
 */
static int attack_silent(const struct kvd_proc *k, struct shared *sh)
{
	static uint8_t buf[KV_MSG_MAX];
	int fds[72], n = 0, rfds[8], nfds;
	struct kv_msg m = {.type = KV_MSG_STATUS_REQ}, rep;
	struct raw hello_only;
	size_t len;

	for (; n < 64; n++)
		if ((fds[n] = raw_connect(k->sock)) < 0)
			return fail(sh, "connect %d: %s", n, strerror(errno));
	if (raw_open(sh, &hello_only, k, "silent", 0, 2))
		return 1;
	sh->started = 1;
	m.u.status_req.what = KV_STATUS_TEXT;
	len = kv_msg_encode(&m, buf, sizeof(buf));
	while (!sh->stop) {
		int fd = raw_connect(k->sock);
		double t0 = now_s();
		ssize_t got;

		if (fd < 0)
			return fail(sh, "connect beside %d silent clients: %s", n, strerror(errno));
		if (raw_send(fd, buf, len))
			return fail(sh, "send: %s", strerror(errno));
		got = raw_recv(fd, buf + len, sizeof(buf) - len, 2000, rfds, &nfds);
		close_fds(rfds, nfds);
		if (got <= 0 || kv_msg_decode(buf + len, (size_t)got, &rep, NULL) ||
		    rep.type != KV_MSG_STATUS)
			return fail(sh,
				    "a status request beside %d silent clients: no answer "
				    "within 2 s",
				    n);
		close(fd);
		sh->ops++;
		sh->attacks++;
		if (now_s() - t0 > 1.0)
			snprintf(sh->note, sizeof(sh->note), "a status answer took %.2f s",
				 now_s() - t0);
		usleep(5000);
	}
	for (int i = 0; i < n; i++) {
		if (raw_gone(fds[i], 0))
			sh->evicted++;
		close(fds[i]);
	}
	raw_close(&hello_only);
	return 0;
}

Test(hostile, silent_clients, .timeout = 40, .fini = cleanup)
{
	run_attack("silent_clients", attack_silent, engine_args, NULL);
}

/* ------------------------------------------------------------------ descriptors */

static int count_fds(pid_t pid)
{
	char path[64];
	DIR *d;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	d = opendir(path);
	if (!d)
		return -1;
	for (struct dirent *e; (e = readdir(d));)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/*
 * Descriptors sent to kvd with messages that do not take one (hello, status,
 * malformed messages, oversized ones, more than a message may carry): kvd
 * closes every one.  Its descriptor count afterwards is what it was.
 */
static int attack_fds(const struct kvd_proc *k, struct shared *sh)
{
	static uint8_t buf[16384];
	int before, after = 0, junk[16];
	size_t n;

	for (int i = 0; i < 16; i++)
		if ((junk[i] = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
			return fail(sh, "open /dev/null: %s", strerror(errno));
	usleep(200000); /* the baseline job's clients are gone by now */
	before = count_fds(k->pid);
	if (before < 0)
		return fail(sh, "cannot count kvd's descriptors");
	sh->started = 1;
	while (!sh->stop) {
		for (int kind = 0; kind < 5; kind++) {
			int fd = raw_connect(k->sock), code;
			struct kv_msg m = {.type = KV_MSG_STATUS_REQ};
			int nf = kind == 4 ? 16 : 3;

			if (fd < 0)
				return fail(sh, "connect: %s", strerror(errno));
			switch (kind) {
			case 0: /* a status request: answered; its fds closed */
				n = kv_msg_encode(&m, buf, sizeof(buf));
				break;
			case 1: /* a hello to a job of two: welcomed; its fds closed */
				n = hello_bytes(buf, "fdjob", 5, (int)(sh->attacks & 1), 2);
				break;
			case 2: /* malformed */
				n = hello_bytes(buf, "a/b", 3, 0, 1);
				break;
			case 3: /* oversized */
				n = 9000;
				memset(buf, 'x', n);
				break;
			default: /* more fds than kvd's control buffer holds */
				n = kv_msg_encode(&m, buf, sizeof(buf));
				break;
			}
			if (raw_send_fds(fd, buf, n, junk, nf))
				return fail(sh, "send with fds: %s", strerror(errno));
			if (kind <= 1 || kind == 4) {
				int rfds[8], nfds;
				ssize_t got = raw_recv(fd, buf, sizeof(buf), 3000, rfds, &nfds);
				close_fds(rfds, nfds);
				if (got < 0)
					return fail(sh, "kind %d: no answer: %s", kind,
						    strerror((int)-got));
			} else if (expect_refused(sh, fd, "fds with a bad message", 3000, &code)) {
				return 1;
			}
			close(fd);
			sh->ops++;
		}
		sh->attacks++;
		usleep(1000);
	}
	/* connections close asynchronously in kvd: give them a moment */
	for (double t = now_s() + 3; now_s() < t; usleep(20000))
		if ((after = count_fds(k->pid)) <= before)
			break;
	for (int i = 0; i < 16; i++)
		close(junk[i]);
	snprintf(sh->note, sizeof(sh->note), "kvd held %d fds before, %d after", before, after);
	if (after > before)
		return fail(sh,
			    "kvd holds %d descriptors after %ld rounds of passed fds, %d before",
			    after, sh->attacks, before);
	return 0;
}

Test(hostile, passed_descriptors_closed, .timeout = 40, .fini = cleanup)
{
	run_attack("passed_descriptors_closed", attack_fds, engine_args, NULL);
}

/* ------------------------------------------------------------------ identity */

/* Run kvctl --socket SOCK a1 [a2] as this process's user; its exit status, stdout in out. */
static int kvctl(const struct kvd_proc *k, char *out, size_t cap, const char *a1, const char *a2)
{
	char bin[512];
	int p[2], st = 0;
	size_t have = 0;
	pid_t pid;

	bin_path("kvctl", bin, sizeof(bin));
	if (pipe(p) < 0)
		return -1;
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		int devnull = open("/dev/null", O_WRONLY);

		dup2(p[1], 1);
		if (devnull >= 0)
			dup2(devnull, 2);
		close(p[0]);
		execl(bin, bin, "--socket", k->sock, a1, a2, (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	for (;;) {
		ssize_t n = read(p[0], out + have, cap - 1 - have);
		if (n <= 0 || (have += (size_t)n) == cap - 1)
			break;
	}
	out[have] = '\0';
	close(p[0]);
	if (reap_by(pid, now_s() + 10, &st))
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* The other user's side, in a child that became uid/gid 65534. */
static int as_nobody(const struct kvd_proc *k, struct shared *sh)
{
	static uint8_t buf[KV_MSG_MAX];
	static char out[65536];
	union {
		char b[CMSG_SPACE(sizeof(int) * 8)];
		struct cmsghdr a;
	} u;
	struct kv_options o;
	kv_store *kv = NULL;
	struct kv_msg m;
	struct raw mine;
	int rc, fd, code;
	size_t n;

	if (setgroups(0, NULL) || setgid(NOBODY) || setuid(NOBODY) || getuid() != NOBODY)
		return fail(sh, "cannot become uid %d: %s", NOBODY, strerror(errno));

	/* libkv: joining root's job is refused with KV_ERR_PERM */
	kv_options_default(&o);
	o.socket = k->sock;
	o.job = "rootjob";
	o.rank = 1;
	o.num_workers = 2;
	o.timeout_ms = 3000;
	rc = kv_create("local", &o, &kv);
	if (rc != KV_ERR_PERM)
		return fail(sh,
			    "uid %d joining root's job: kv_create returned %d (%s), want "
			    "KV_ERR_PERM",
			    NOBODY, rc, kv_strerror(rc));

	/* raw: the refused hello's ERROR carries no descriptors; then EOF */
	if ((fd = raw_connect(k->sock)) < 0)
		return fail(sh,
			    "uid %d: connect: %s (is the socket 0666 in a searchable "
			    "directory?)",
			    NOBODY, strerror(errno));
	n = hello_bytes(buf, "rootjob", 7, 1, 2);
	if ((rc = raw_send(fd, buf, n)))
		return fail(sh, "send: %s", strerror(-rc));
	{
		struct iovec iov = {buf, sizeof(buf)};
		struct msghdr mh = {.msg_iov = &iov,
				    .msg_iovlen = 1,
				    .msg_control = u.b,
				    .msg_controllen = sizeof(u.b)};
		struct pollfd p = {.fd = fd, .events = POLLIN};
		ssize_t got;

		if (poll(&p, 1, 3000) != 1)
			return fail(sh, "uid %d's hello to root's job: no answer", NOBODY);
		got = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
		if (got <= 0 || kv_msg_decode(buf, (size_t)got, &m, NULL) ||
		    m.type != KV_MSG_ERROR || m.u.error.code != KV_ERR_PERM)
			return fail(sh,
				    "uid %d's hello to root's job: want ERROR KV_ERR_PERM "
				    "(got %zd bytes, type %u, code %d)",
				    NOBODY, got, got > 0 ? m.type : 0,
				    got > 0 ? m.u.error.code : 0);
		if (mh.msg_controllen != 0 || CMSG_FIRSTHDR(&mh) || (mh.msg_flags & MSG_CTRUNC))
			return fail(sh,
				    "the refusal of uid %d's hello carried ancillary data "
				    "(descriptors?): %zu bytes",
				    NOBODY, (size_t)mh.msg_controllen);
	}
	if (expect_refused(sh, fd, "after the refused hello", 3000, &code))
		return 1;
	close(fd);

	/* a job of its own is fine, and the only one it sees */
	if (raw_open(sh, &mine, k, "nobodyjob", 0, 2))
		return 1;
	rc = kvctl(k, out, sizeof(out), "status", "--json");
	if (rc != 0)
		return fail(sh, "kvctl status --json as uid %d: exit %d", NOBODY, rc);
	if (strstr(out, "rootjob") || strstr(out, "healthy") || strstr(out, "\"uid\": 0"))
		return fail(sh, "kvctl status --json as uid %d shows root's jobs:\n%s", NOBODY,
			    out);
	if (!strstr(out, "nobodyjob"))
		return fail(sh, "kvctl status --json as uid %d misses its own job:\n%s", NOBODY,
			    out);
	rc = kvctl(k, out, sizeof(out), "drop", "rootjob");
	if (rc != 3)
		return fail(sh,
			    "kvctl drop rootjob as uid %d: exit %d, want 3 (permission "
			    "denied)",
			    NOBODY, rc);
	/* root looks now, while this user's job exists */
	sh->step = 1;
	for (double t = now_s() + 10; sh->step != 2 && now_s() < t;)
		usleep(1000);
	raw_close(&mine);
	return 0;
}

static int attack_identity(const struct kvd_proc *k, struct shared *sh)
{
	static char out[65536];
	struct raw root;
	pid_t pid;
	int st = 0, rc;

	if (raw_open(sh, &root, k, "rootjob", 0, 2))
		return 1;
	sh->started = 1;
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		return fail(sh, "fork: %s", strerror(errno));
	if (pid == 0)
		_exit(as_nobody(k, sh));
	while (sh->step != 1 && waitpid(pid, &st, WNOHANG) == 0)
		usleep(1000);
	if (sh->step == 1) {
		/* root sees every job, its own and the other user's */
		rc = kvctl(k, out, sizeof(out), "status", "--json");
		sh->step = 2;
		if (rc != 0 || !strstr(out, "\"rootjob\"") || !strstr(out, "\"nobodyjob\"") ||
		    !strstr(out, "\"uid\": 0") || !strstr(out, "\"uid\": 65534")) {
			reap_by(pid, now_s() + 10, &st);
			return fail(sh, "kvctl status --json as root: exit %d, not every job:\n%s",
				    rc, out);
		}
		if (reap_by(pid, now_s() + 20, &st))
			return fail(sh, "the uid %d child hung", NOBODY);
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		return sh->why[0] ? 1
				  : fail(sh, "the uid %d child failed (status %#x)", NOBODY, st);
	if (raw_gone(root.sock, 0))
		return fail(sh, "root's rank was disconnected by the other user's attempts");
	sh->ops = 1;
	sh->attacks = 1;
	while (!sh->stop)
		usleep(2000);
	/* still root's and still there after the window */
	rc = kvctl(k, out, sizeof(out), "status", "--json");
	if (rc != 0 || !strstr(out, "\"rootjob\""))
		return fail(sh, "root's job vanished:\n%s", out);
	raw_close(&root);
	return 0;
}

/* The test kvd's socket is 0666; its directory (mkdtemp: 0700) must be searchable too. */
static void open_dir(struct kvd_proc *k)
{
	cr_assert_eq(chmod(k->dir, 0755), 0, "chmod %s: %s", k->dir, strerror(errno));
}

Test(hostile, other_uid_is_refused, .timeout = 40, .fini = cleanup)
{
	if (geteuid() != 0)
		cr_skip_test("needs root to become uid %d", NOBODY);
	run_attack("other_uid_is_refused", attack_identity, engine_args, open_dir);
}

/* ------------------------------------------------------------------ resources */

static long kvd_rss_kb(pid_t pid)
{
	char path[64], line[256];
	long kb = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	if (!(f = fopen(path, "r")))
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

/*
 * Valid submissions that cannot complete yet: rank 0 of a job of two whose
 * rank 1 never comes queues PENDING_OPS pushpulls, then disconnects, again
 * and again.  They are legitimate ops waiting for a peer, so kvd takes them;
 * when the client goes, kvd drops them (KV_ERR_PEER to nobody) and must go
 * on serving every other job at once: dropping a client's ops may cost
 * time linear in their number (a few milliseconds here; the bound, 0.25 s,
 * leaves room for a slow machine), not more.
 */
#define PENDING_OPS    30000
#define PENDING_ROUNDS 2

static int attack_pending(const struct kvd_proc *k, struct shared *sh)
{
	long rss0 = kvd_rss_kb(k->pid), rss1 = 0;
	double gap = 0;
	int rc;

	sh->started = 1;
	for (int round = 0; round < PENDING_ROUNDS && !sh->stop; round++) {
		struct raw r, probe;
		struct kv_cqe q;
		char job[64];
		long key, sent = 0;
		int seg;
		double t0;

		snprintf(job, sizeof(job), "pending-%d", round);
		if (raw_open(sh, &r, k, job, 0, 2))
			return 1;
		if ((key = raw_key(sh, &r, "p", 16, KV_FLOAT32, NULL)) < 0 ||
		    (seg = raw_seg(sh, &r, 4096)) < 0)
			return 1;
		while (sent < PENDING_OPS) {
			struct kv_sqe s = sqe_of(KV_OP_PUSHPULL, (uint32_t)key, 16, (uint64_t)sent);

			s.in = (struct kv_loc){.seg = r.seg_id[seg], .off = 0};
			if ((rc = raw_submit(&r, &s, 5000)))
				return fail(sh, "SQ: %s", strerror(-rc));
			sent++;
		}
		/* every one taken: the SQ is empty */
		for (t0 = now_s(); __atomic_load_n(&r.sqc->head, __ATOMIC_ACQUIRE) != r.sq.local;) {
			if (now_s() - t0 > 5)
				return fail(sh, "kvd did not take %ld submissions within 5 s",
					    sent);
			raw_ring_doorbell(&r);
			usleep(1000);
		}
		if (raw_gone(r.sock, 0))
			return fail(sh, "kvd disconnected a client whose ops wait for a peer");
		rss1 = kvd_rss_kb(k->pid);
		sh->ops += sent;
		/* go, and time how long until kvd serves anyone else */
		if (raw_open(sh, &probe, k, "probe", 0, 1))
			return 1;
		t0 = now_s();
		raw_close(&r);
		usleep(20000); /* kvd sees the EOF and hands the leave to its engine */
		{
			struct kv_sqe s = sqe_of(KV_OP_NOP, 0, 1, 5);
			if ((rc = raw_submit(&probe, &s, 30000)) ||
			    (rc = raw_reap(&probe, &q, 30000)))
				return fail(sh, "the probe: %s", strerror(-rc));
		}
		if (now_s() - t0 > gap)
			gap = now_s() - t0;
		raw_close(&probe);
		sh->attacks++;
	}
	snprintf(sh->note, sizeof(sh->note),
		 "kvd's RSS %ld -> %ld kB with %d ops pending (%.0f bytes an op); engine stalled "
		 "%.3f s after a disconnect",
		 rss0, rss1, PENDING_OPS, (double)(rss1 - rss0) * 1024 / PENDING_OPS, gap);
	if (gap > 0.25)
		return fail(sh,
			    "after a client with %d pending ops left, kvd served nobody for "
			    "%.2f s (dropping its ops costs more than linear time?)",
			    PENDING_OPS, gap);
	return 0;
}

Test(hostile, pending_submissions_dropped, .timeout = 60, .fini = cleanup)
{
	run_attack("pending_submissions_dropped", attack_pending, engine_args, NULL);
}

/*
 * Connections that are never closed, more than kvd has descriptors for:
 * kvd cannot accept more until some go (a limit, not a bug), but it must
 * not spin on the failing accept nor flood its log meanwhile ("an idle
 * daemon uses no CPU"), and it serves clients again once they are gone.
 * kvd runs with a soft RLIMIT_NOFILE of 64 here to get there quickly.
 */
static double kvd_cpu_s(pid_t pid)
{
	char path[64], buf[1024], *p;
	unsigned long ut = 0, st = 0;
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	if (!(f = fopen(path, "r")))
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');
	/* after "pid (comm)": state, then 10 fields, then utime and stime */
	if (!p ||
	    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
		return -1;
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static long file_size(const char *path)
{
	struct stat st;

	return stat(path, &st) ? -1 : (long)st.st_size;
}

Test(hostile, descriptors_exhausted, .timeout = 40, .fini = cleanup)
{
	struct rlimit old, low;
	struct kvd_proc k;
	int fds[200], n = 0;
	double cpu0, cpu1;
	long log0, log1;
	char why[256];
	int rc;

	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
	low = old;
	low.rlim_cur = 64;
	cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
	rc = kvd_start(&k, engine_args);
	setrlimit(RLIMIT_NOFILE, &old);
	cr_assert_eq(rc, 0, "kvd did not start");
	live_kvd = k;
	live = &live_kvd;
	cr_assert_eq(run_ranks(&k, "before", 1, after_rank, NULL, 15, why, sizeof(why)), 0,
		     "before: %s", why);
	for (; n < 200; n++)
		if ((fds[n] = raw_connect(k.sock)) < 0)
			break; /* the listen backlog is full too */
	usleep(200000);
	cpu0 = kvd_cpu_s(k.pid);
	log0 = file_size(k.log);
	usleep(1000000);
	cpu1 = kvd_cpu_s(k.pid);
	log1 = file_size(k.log);
	for (int i = 0; i < n; i++)
		close(fds[i]);
	usleep(300000);
	rc = run_ranks(&k, "after", 1, after_rank, NULL, 15, why, sizeof(why));
	cr_log_info("hostile/descriptors_exhausted: %d idle connections; kvd used %.2f s of CPU "
		    "in 1 s and wrote %ld bytes of log",
		    n, cpu1 - cpu0, log1 - log0);
	if (rc || cpu1 - cpu0 > 0.2 || log1 - log0 > 4096)
		log_tail(&k);
	cr_assert_eq(rc, 0, "kvd did not serve a client once the connections were gone: %s", why);
	cr_assert_leq(cpu1 - cpu0, 0.2,
		      "kvd used %.2f s of CPU in 1 s while out of descriptors with %d idle "
		      "connections (spinning on accept?)",
		      cpu1 - cpu0, n);
	cr_assert_leq(log1 - log0, 4096,
		      "kvd wrote %ld bytes of log in 1 s while out of descriptors", log1 - log0);
	cr_assert_eq(kvd_stop(&k), 0);
	live = NULL;
}
