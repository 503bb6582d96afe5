/* SPDX-License-Identifier: MIT */
/*
 * ctl.c - the control thread: one io_uring loop over the listening socket,
 * every client's socket, a signalfd, and an eventfd the engine pokes.
 *
 * The loop keeps one multishot accept armed on the listening socket and one
 * recvmsg armed on each connection.  A completed recvmsg is decoded and
 * answered at once; replies go out with MSG_DONTWAIT, so a client that does
 * not read its socket is disconnected instead of stalling the loop.  A
 * connection is torn down only when its recvmsg completes with EOF or an
 * error (after an eviction, kvd shuts the socket down to get there), so no
 * io_uring operation ever points at a freed connection.
 *
 * Under systemd (notify.c) the loop also tells the manager READY=1 once its
 * accept is armed, a STATUS= line when ranks join or leave (at most one a
 * second; a change inside that second arms an io_uring timeout that sends
 * the state as it is then), STOPPING=1 on SIGTERM/SIGINT, and WATCHDOG=1 on
 * every tick of a timerfd read through the ring at half the watchdog
 * period: a loop that hangs stops pinging, and systemd restarts kvd.
 */
#include <errno.h>
#include <poll.h>
#include <fcntl.h>
#include <liburing.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "kvd.h"
#include "../shm/seg.h"

#define CONN_BUF 8192 /* the largest message a client sends is smaller */
#define RING_DEPTH 256
#define CMSG_BUF 64
#define ADOPT_MAX 4096 /* segments a resuming rank may hand back */

enum tag {
	T_CONN = 0,
	T_ACCEPT = 1,
	T_SIGNAL = 2,
	T_EVICT = 3, /* the engine's eventfd: evictions, finished checkpoints */
	T_WATCHDOG = 4,
	T_STATUS = 5,
	T_CKPT = 6, /* a checkpoint's write, fsync or read */
	T_LISTEN = 7, /* out of descriptors: wait for a connection without taking one */
};

#define CKPT_CHUNK (1u << 30)        /* bytes per io_uring read or write */
#define CKPT_MAX ((size_t)64 << 30) /* the largest checkpoint kvd loads */

#define STATUS_MIN_INTERVAL 1.0 /* seconds between two STATUS= notifications */

struct conn {
	struct conn *next, *prev;
	int fd;
	uid_t uid;
	gid_t gid;
	bool allowed; /* in --allow-group (primary or supplementary group) */
	pid_t pid;
	struct client *cl; /* after a hello */
	bool said_hello;
	bool evicted; /* told so and shut down */
	struct kv_adopt *adopt; /* segments handed back before a resuming hello */
	uint32_t nadopt, capadopt;
	struct msghdr mh;
	struct iovec iov;
	union {
		char buf[CMSG_BUF]; /* >= CMSG_SPACE(sizeof(int) * SEG_MAX_FDS) */
		size_t align;       /* as struct cmsghdr, whose flexible array clang minds */
	} cmsg;
	uint8_t buf[CONN_BUF];
};

struct ctl {
	struct kvd *d;
	struct io_uring ring;
	int sigfd, evfd;
	struct conn *conns;
	struct signalfd_siginfo si;
	uint64_t evval;
	bool stop;

	/* sd_notify */
	int wdfd;                           /* watchdog timerfd, or -1 */
	uint64_t wdval;                     /* its expiration count */
	struct __kernel_timespec status_ts; /* read by the kernel at submit */
	bool status_armed;                  /* a T_STATUS timeout is pending */
	double status_last;                 /* when the last STATUS= went out */

	int spare_fd;      /* held for refuse_no_fds() */
	uint32_t adopt_fds, adopt_max; /* segments held for resuming hellos, and the bound */
	struct __kernel_timespec listen_retry; /* arm_listen_poll() without a spare */
	struct __kernel_timespec quiet_limit;  /* a connection's silence before its hello */
	uint64_t refused;  /* connections refused for want of descriptors */

	/* checkpoints: the engine hands finished ones back on ckpt_done */
	pthread_mutex_t ckpt_lock;
	struct ckpt_req *ckpt_done;
	struct ckpt_req *ckpt_out; /* every outstanding request (conn close unhooks) */
};

static void *tagged(void *p, enum tag t)
{
	return (void *)((uintptr_t)p | (uintptr_t)t);
}

static struct io_uring_sqe *get_sqe(struct ctl *x)
{
	struct io_uring_sqe *s = io_uring_get_sqe(&x->ring);

	if (!s) {
		io_uring_submit(&x->ring);
		s = io_uring_get_sqe(&x->ring);
	}
	return s;
}

static void arm_accept(struct ctl *x)
{
	struct io_uring_sqe *s = get_sqe(x);

	io_uring_prep_multishot_accept(s, x->d->cfg.listen_fd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data(s, tagged(NULL, T_ACCEPT));
}

/*
 * io_uring's accept takes a descriptor before it looks for a connection, so
 * with the table full it fails at once, connection or not: re-arming it then
 * would spin.  A poll needs no descriptor; accepting resumes when it fires.
 */
static void arm_listen_poll(struct ctl *x)
{
	struct io_uring_sqe *s = get_sqe(x);

	if (x->spare_fd < 0) {
		/* no spare to refuse with: the backlog stays, so a poll would fire
		   at once; look again in 100 ms */
		x->listen_retry = (struct __kernel_timespec){ .tv_nsec = 100000000 };
		io_uring_prep_timeout(s, &x->listen_retry, 0, 0);
	} else
		io_uring_prep_poll_add(s, x->d->cfg.listen_fd, POLLIN);
	io_uring_sqe_set_data(s, tagged(NULL, T_LISTEN));
}

static void arm_recv(struct ctl *x, struct conn *cn)
{
	struct io_uring_sqe *s;

	/* a recv linked to its timeout: both SQEs in one submission */
	if (!cn->said_hello && io_uring_sq_space_left(&x->ring) < 2)
		io_uring_submit(&x->ring);
	s = get_sqe(x);

	cn->iov.iov_base = cn->buf;
	cn->iov.iov_len = sizeof(cn->buf);
	memset(&cn->mh, 0, sizeof(cn->mh));
	cn->mh.msg_iov = &cn->iov;
	cn->mh.msg_iovlen = 1;
	cn->mh.msg_control = cn->cmsg.buf;
	cn->mh.msg_controllen = sizeof(cn->cmsg.buf);
	io_uring_prep_recvmsg(s, cn->fd, &cn->mh, MSG_CMSG_CLOEXEC);
	io_uring_sqe_set_data(s, tagged(cn, T_CONN));
	if (cn->said_hello)
		return;
	/*
	 * Before its hello a connection holds a descriptor and a slot without
	 * being anyone's rank: a recv that waits longer than --hello-timeout is
	 * cancelled (the link timeout), and the connection closed.
	 */
	io_uring_sqe_set_flags(s, IOSQE_IO_LINK);
	x->quiet_limit = (struct __kernel_timespec){ .tv_sec = x->d->cfg.hello_timeout_s };
	s = get_sqe(x);
	io_uring_prep_link_timeout(s, &x->quiet_limit, 0);
	io_uring_sqe_set_data(s, tagged(NULL, T_CONN)); /* its own completion is ignored */
}

static void arm_read(struct ctl *x, int fd, void *buf, unsigned len, enum tag t)
{
	struct io_uring_sqe *s = get_sqe(x);

	io_uring_prep_read(s, fd, buf, len, 0);
	io_uring_sqe_set_data(s, tagged(NULL, t));
}

/* ------------------------------------------------------------------ replies */

static int send_msg(struct conn *cn, const struct kv_msg *m, const int *fds, int nfds)
{
	uint8_t buf[KV_MSG_MAX];
	size_t n = kv_msg_encode(m, buf, sizeof(buf));
	ssize_t w;
	union {
		char b[CMSG_SPACE(sizeof(int) * SEG_MAX_FDS)];
		struct cmsghdr a;
	} u;
	struct iovec iov = { buf, n };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

	if (!n)
		return -EINVAL;
	if (nfds) {
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
		w = sendmsg(cn->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	if (w < 0)
		return -errno;
	return 0;
}

static int reply_error(struct conn *cn, uint32_t seq, int code, const char *text)
{
	struct kv_msg m = { .type = KV_MSG_ERROR, .seq = seq };

	m.u.error.code = code;
	m.u.error.text = text;
	m.u.error.len = (uint32_t)strlen(text);
	return send_msg(cn, &m, NULL, 0);
}

/* ------------------------------------------------------------------ sd_notify */

/* "2 jobs, 5 ranks": what `systemctl status kvd` shows under Status: */
static void status_text(struct ctl *x, char *buf, size_t len)
{
	struct kvd *d = x->d;
	unsigned jobs = 0, ranks = 0;

	pthread_mutex_lock(&d->lock);
	for (struct job *j = d->jobs; j; j = j->next) {
		jobs++;
		ranks += (unsigned)j->present;
	}
	pthread_mutex_unlock(&d->lock);
	snprintf(buf, len, "%u job%s, %u rank%s", jobs, jobs == 1 ? "" : "s", ranks,
		 ranks == 1 ? "" : "s");
}

static void status_send(struct ctl *x)
{
	char text[128];

	status_text(x, text, sizeof(text));
	notify_sendf("STATUS=%s", text);
	x->status_last = kvd_now();
}

/* A rank joined or left: tell systemd now, or at most a second from the last time. */
static void status_changed(struct ctl *x)
{
	double wait;
	struct io_uring_sqe *s;

	if (!notify_enabled() || x->status_armed || x->stop)
		return;
	wait = x->status_last + STATUS_MIN_INTERVAL - kvd_now();
	if (wait <= 0) {
		status_send(x);
		return;
	}
	x->status_ts.tv_sec = (long long)wait;
	x->status_ts.tv_nsec = (long long)((wait - (double)x->status_ts.tv_sec) * 1e9);
	s = get_sqe(x);
	io_uring_prep_timeout(s, &x->status_ts, 0, 0);
	io_uring_sqe_set_data(s, tagged(NULL, T_STATUS));
	x->status_armed = true;
}

/* WATCHDOG=1 at half of WatchdogSec, as sd_watchdog_enabled(3) advises */
static int watchdog_start(struct ctl *x)
{
	uint64_t half = notify_watchdog_usec() / 2;
	struct itimerspec it = { 0 };

	x->wdfd = -1;
	if (!half)
		return 0;
	x->wdfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
	if (x->wdfd < 0)
		return -errno;
	it.it_value.tv_sec = (time_t)(half / 1000000);
	it.it_value.tv_nsec = (long)(half % 1000000) * 1000;
	it.it_interval = it.it_value;
	if (timerfd_settime(x->wdfd, 0, &it, NULL) < 0)
		return -errno;
	arm_read(x, x->wdfd, &x->wdval, sizeof(x->wdval), T_WATCHDOG);
	kvd_log("watchdog: pinging systemd every %.3f s", (double)half * 1e-6);
	return 0;
}

/* ------------------------------------------------------------------ handlers */

/* The job's segments of a kind: how many, and the fd of the i-th. */
static uint32_t job_segs(const struct job *j, uint32_t kind, uint32_t i, int *fd)
{
	switch (kind) {
	case KV_HOLD_MANIFEST:
		*fd = i < j->nman ? j->man[i].fd : -1;
		return j->nman;
	case KV_HOLD_VALUES:
		*fd = i < j->nvalue_segs ? j->value_segs[i].fd : -1;
		return j->nvalue_segs;
	case KV_HOLD_DIRECT:
		*fd = i < j->ndirect_segs ? j->direct_segs[i].fd : -1;
		return j->ndirect_segs;
	default: /* KV_HOLD_BOARD */
		*fd = j->board_fd;
		return 1;
	}
}

/*
 * Hand a rank every segment of its job it does not hold yet (HOLD): the
 * ranks keep them, so a job outlives a kvd that dies (README "Restarting
 * kvd").  A send that fails (a rank not reading its socket) is tried again
 * at the next change.
 */
static void hold_client(struct job *j, struct client *c)
{
	struct kv_msg m = { .type = KV_MSG_HOLD };
	int fds[KV_HOLD_MAX];

	for (uint32_t kind = KV_HOLD_MANIFEST; kind <= KV_HOLD_BOARD; kind++) {
		int fd;
		uint32_t n = job_segs(j, kind, 0, &fd);

		while (c->held[kind] < n) {
			uint32_t first = c->held[kind], k;
			for (k = 0; k < KV_HOLD_MAX && first + k < n; k++) {
				m.u.hold.kind[k] = kind;
				m.u.hold.id[k] = first + k;
				job_segs(j, kind, first + k, &fds[k]);
			}
			m.u.hold.n = k;
			if (send_msg(c->conn, &m, fds, (int)k))
				return;
			c->held[kind] += k;
		}
	}
}

static void hold_sync(struct job *j)
{
	for (int r = 0; r < j->num_workers; r++)
		if (j->ranks[r] && j->ranks[r]->conn)
			hold_client(j, j->ranks[r]);
}

/* Descriptors kvd may hold for resuming hellos not said yet: a quarter of its own. */
static uint32_t adopt_budget(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur == RLIM_INFINITY)
		return 16384;
	return rl.rlim_cur / 4 > 64 ? (uint32_t)(rl.rlim_cur / 4) : 64;
}

static void adopt_drop(struct ctl *x, struct conn *cn)
{
	x->adopt_fds -= cn->nadopt;
	for (uint32_t i = 0; i < cn->nadopt; i++)
		close(cn->adopt[i].fd);
	free(cn->adopt);
	cn->adopt = NULL;
	cn->nadopt = cn->capadopt = 0;
}

/* ADOPT, before a resuming hello: keep the segments (the fds are taken). */
static int on_adopt(struct ctl *x, struct conn *cn, const struct kv_msg *m, const int *fds,
		    int nfds)
{
	const char *why = NULL;

	if ((uint32_t)nfds != m->u.hold.n)
		why = "an ADOPT message without one descriptor per segment";
	else if (cn->nadopt + (uint32_t)nfds > ADOPT_MAX)
		why = "more segments handed back than any job has";
	else if (x->adopt_fds + (uint32_t)nfds > x->adopt_max)
		/* descriptors held for hellos to come are bounded for all
		 * connections together: they must not starve kvd of descriptors */
		why = "kvd holds too many segments handed back for hellos not yet said; "
		      "try again";
	if (!why && cn->nadopt + (uint32_t)nfds > cn->capadopt) {
		uint32_t cap = cn->capadopt ? cn->capadopt * 2 : 64;
		struct kv_adopt *a = realloc(cn->adopt, cap * sizeof(*a));
		if (!a)
			why = "out of memory";
		else {
			cn->adopt = a;
			cn->capadopt = cap;
		}
	}
	if (why) {
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		kvd_log("pid=%d: %s; disconnecting", (int)cn->pid, why);
		reply_error(cn, m->seq, KV_ERR_PROTO, why);
		return -1;
	}
	for (int i = 0; i < nfds; i++)
		cn->adopt[cn->nadopt++] = (struct kv_adopt){ m->u.hold.kind[i], m->u.hold.id[i],
							     fds[i] };
	x->adopt_fds += (uint32_t)nfds;
	return 0;
}

/* Is the manifest this rank held the one job j has (the same segment)? */
static bool adopt_same_job(const struct job *j, const struct conn *cn)
{
	struct stat a, b;

	for (uint32_t i = 0; i < cn->nadopt; i++)
		if (cn->adopt[i].kind == KV_HOLD_MANIFEST && cn->adopt[i].id == 0)
			return fstat(cn->adopt[i].fd, &a) == 0 && fstat(j->man[0].fd, &b) == 0 &&
			       a.st_dev == b.st_dev && a.st_ino == b.st_ino;
	return false;
}

/* A resuming rank's own arena segments, under the ids it used (0..n-1). */
static int adopt_own(struct kvd *d, struct client *c, const struct conn *cn, char *why,
		     size_t whylen)
{
	for (uint32_t id = 0;; id++) {
		const struct kv_adopt *h = NULL;
		for (uint32_t i = 0; i < cn->nadopt && !h; i++)
			if (cn->adopt[i].kind == KV_HOLD_OWN && cn->adopt[i].id == id)
				h = &cn->adopt[i];
		if (!h)
			return 0;
		if (client_adopt_seg(d, c, h->fd, why, whylen))
			return -1;
	}
}

/* Returns 0 to keep the connection, < 0 to close it. */
static int on_hello(struct ctl *x, struct conn *cn, const struct kv_msg *m)
{
	struct kvd *d = x->d;
	const char *name = m->u.hello.job;
	int rank = m->u.hello.rank, nw = m->u.hello.num_workers;
	char why[256];
	struct client *c;
	struct job *j;
	bool created = false, resume = m->u.hello.flags & KV_HELLO_RESUME;
	int code = KV_ERR_INVALID;

	if (__atomic_load_n(&d->nclients, __ATOMIC_RELAXED) >= d->cfg.max_clients) {
		snprintf(why, sizeof(why), "kvd already serves %u clients, its limit",
			 d->cfg.max_clients);
		reply_error(cn, m->seq, KV_ERR_NOMEM, why);
		return -1;
	}
	if (nw > (int)d->cfg.max_ranks) {
		snprintf(why, sizeof(why), "a job of %d workers is over the limit of %u ranks",
			 nw, d->cfg.max_ranks);
		reply_error(cn, m->seq, KV_ERR_NOMEM, why);
		return -1;
	}
	c = client_create(d, cn->uid, cn->pid, why, sizeof(why));
	if (!c) {
		reply_error(cn, m->seq, KV_ERR_NOMEM, why);
		return -1;
	}
	pthread_mutex_lock(&d->lock);
	j = job_find(d, name);
	if (j && j->uid != cn->uid &&
	    !cn->allowed) {
		snprintf(why, sizeof(why),
			 "job '%s' belongs to another user; uid %u may not join it", name,
			 (unsigned)cn->uid);
		code = KV_ERR_PERM;
		goto out_refuse;
	}
	if (j && j->num_workers != nw) {
		snprintf(why, sizeof(why), "job '%s' has %d workers; this rank says %d", name,
			 j->num_workers, nw);
		goto out_refuse;
	}
	if (rank >= nw) {
		snprintf(why, sizeof(why), "rank %d is out of range for a job of %d workers",
			 rank, nw);
		goto out_refuse;
	}
	if (j && j->ranks[rank]) {
		snprintf(why, sizeof(why), "rank %d of job '%s' is taken by pid %d", rank, name,
			 (int)j->ranks[rank]->pid);
		code = KV_ERR_EXISTS;
		goto out_refuse;
	}
	if (j && resume && !adopt_same_job(j, cn)) {
		snprintf(why, sizeof(why),
			 "job '%s' that kvd serves is not the one this rank was part of", name);
		code = KV_ERR_EXISTS;
		goto out_refuse;
	}
	if (!j) {
		/* a resuming rank brings the job back from what it kept */
		j = resume ? job_adopt(d, name, cn->uid, nw, cn->adopt, cn->nadopt, why,
				       sizeof(why))
			   : job_create(d, name, cn->uid, nw, why, sizeof(why));
		if (!j) {
			code = resume ? KV_ERR_DAEMON : KV_ERR_NOMEM;
			goto out_refuse;
		}
		created = true;
	}
	c->job = j;
	if (resume && adopt_own(d, c, cn, why, sizeof(why))) {
		client_free(d, c); /* uncharges its segments from j */
		c = NULL;
		if (created)
			job_free(d, j);
		code = KV_ERR_DAEMON;
		goto out_refuse;
	}
	adopt_drop(x, cn);
	if (created) {
		j->next = d->jobs;
		d->jobs = j;
	}
	c->rank = rank;
	c->conn = cn;
	j->ranks[rank] = c;
	j->present++;
	if (j->present == j->num_workers)
		j->formed = true;
	__atomic_add_fetch(&j->bytes, c->ring_size, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&d->lock);
	__atomic_add_fetch(&d->nclients, 1, __ATOMIC_RELAXED);
	cn->cl = c;
	engine_post(d, EV_JOIN, c, NULL);
	status_changed(x);

	struct kv_msg w = { .type = KV_MSG_WELCOME, .seq = m->seq };
	int fds[3] = { c->ring_fd, engine_doorbell(d), j->board_fd };

	w.u.welcome.client_id = c->id;
	w.u.welcome.seg_size = c->ring_size;
	w.u.welcome.sq_entries = c->sq_entries;
	w.u.welcome.cq_entries = c->cq_entries;
	/* the largest part a key may have (see key_part_bytes) */
	w.u.welcome.part_bytes = d->cfg.part_bytes > (8u << 20) ? d->cfg.part_bytes : 8u << 20;
	w.u.welcome.max_segs = c->max_segs;
	snprintf(w.u.welcome.version, sizeof(w.u.welcome.version), "%s", KV_VERSION);
	kvd_log("join job=%s rank=%d/%d pid=%d uid=%u%s", name, rank, nw, (int)cn->pid,
		(unsigned)cn->uid,
		created ? (resume ? " (job taken back after a restart)" : " (new job)")
			: resume ? " (back after a restart)" : "");
	if (send_msg(cn, &w, fds, 3))
		return -1;
	hold_client(j, c);
	return 0;

out_refuse:
	pthread_mutex_unlock(&d->lock);
	if (c)
		client_free(d, c);
	kvd_log("refused pid=%d uid=%u: %s", (int)cn->pid, (unsigned)cn->uid, why);
	reply_error(cn, m->seq, code, why);
	return -1;
}

static int on_key_open(struct ctl *x, struct conn *cn, const struct kv_msg *m)
{
	struct client *c = cn->cl;
	char why[384];
	struct key *k;
	bool created;
	int rc = job_key_open(x->d, c->job, m, c->rank, &k, &created, why,
				  sizeof(why));
	struct kv_msg r = { .type = KV_MSG_KEY, .seq = m->seq };

	if (rc)
		return reply_error(cn, m->seq, rc, why) == -EAGAIN ? -1 : 0;
	if (created) {
		/* the ranks hold the key's memory before the manifest names it: a
		 * kvd killed in between leaves a record no rank lacks memory for */
		hold_sync(c->job);
		job_man_publish(c->job, k);
	}
	r.u.key.key_id = k->id;
	r.u.key.nparts = k->nparts;
	r.u.key.count = k->count;
	r.u.key.part_elems = k->part_elems;
	r.u.key.dtype = (uint8_t)k->dtype;
	if (!k->dkey) /* an engine key from the start: its round count for the tags */
		r.u.key.rounds = (uint32_t)key_rounds_bound(k);
	r.u.key.flags = (uint8_t)((created ? KV_KEYF_CREATED : 0) |
				  (key_has_value(k) ? KV_KEYF_VALUE : 0));
	if (k->dkey) {
		/* the segment goes along every time; a client that maps it already
		 * closes the copy */
		const struct seginfo *sg = &c->job->direct_segs[k->dseg];
		r.u.key.flags |= KV_KEYF_DIRECT;
		r.u.key.dseg = k->dseg;
		r.u.key.doff = k->doff;
		r.u.key.dsize = sg->size;
		return send_msg(cn, &r, &sg->fd, 1) ? -1 : 0;
	}
	return send_msg(cn, &r, NULL, 0) ? -1 : 0;
}

static int on_seg_alloc(struct ctl *x, struct conn *cn, const struct kv_msg *m)
{
	struct client *c = cn->cl;
	char why[256];
	uint32_t id;
	int rc = client_add_seg(x->d, c, m->u.seg_alloc.bytes, &id, why, sizeof(why));
	struct kv_msg r = { .type = KV_MSG_SEG, .seq = m->seq };

	if (rc)
		return reply_error(cn, m->seq, rc, why) == -EAGAIN ? -1 : 0;
	r.u.seg.seg_id = id;
	r.u.seg.size = c->segs[id].size;
	return send_msg(cn, &r, &c->segs[id].fd, 1) ? -1 : 0;
}

static int on_status(struct ctl *x, struct conn *cn, const struct kv_msg *m)
{
	size_t len = 0, off = 0, chunk = KV_MSG_MAX - 64;
	char *text = stats_render(x->d, m->u.status_req.what, cn->uid, &len);
	struct kv_msg r = { .type = KV_MSG_STATUS, .seq = m->seq };
	int rc = 0;

	if (!text)
		return reply_error(cn, m->seq, KV_ERR_NOMEM, "out of memory rendering status");
	do {
		size_t n = len - off < chunk ? len - off : chunk;
		r.u.status.text = text + off;
		r.u.status.len = (uint32_t)n;
		off += n;
		r.u.status.flags = off < len ? KV_STATUSF_MORE : 0;
		rc = send_msg(cn, &r, NULL, 0);
	} while (!rc && off < len);
	free(text);
	return rc ? -1 : 0;
}

static void conn_close(struct ctl *x, struct conn *cn);
static int on_ckpt(struct ctl *x, struct conn *cn, const struct kv_msg *m, int fd);

/* Answer every rank waiting in kv_set_optimizer of job j, and end the vote. */
static void opt_votes_reply(struct job *j, int code, const char *text)
{
	for (int i = 0; i < j->nopt_votes; i++)
		reply_error(j->opt_votes[i].cn, j->opt_votes[i].seq, code, text);
	j->nopt_votes = 0;
	free(j->opt_pending);
	j->opt_pending = NULL;
}

/*
 * kv_set_optimizer is collective: every rank sets the same spec, and the
 * calls return once the last rank's arrives (a rank setting another spec
 * meanwhile gets KV_ERR_MISMATCH; a rank leaving fails the vote with
 * KV_ERR_PEER).  Replies to the earlier ranks wait in opt_votes.
 */
static int on_optimizer(struct ctl *x, struct conn *cn, const struct kv_msg *m)
{
	struct client *c = cn->cl;
	struct job *j = c->job;
	struct opt_cfg *cfg = calloc(1, sizeof(*cfg));
	char why[1024];
	int rc;

	if (!cfg)
		return reply_error(cn, m->seq, KV_ERR_NOMEM, "out of memory");
	rc = opt_parse(m->u.optimizer.spec, m->u.optimizer.len, cfg, why, sizeof(why));
	if (rc) {
		free(cfg);
		return reply_error(cn, m->seq, rc, why);
	}
	pthread_mutex_lock(&x->d->lock);
	rc = j->formed && j->present < j->num_workers;
	pthread_mutex_unlock(&x->d->lock);
	if (rc) {
		/* a collective call cannot complete while a rank is away (as ops) */
		free(cfg);
		snprintf(why, sizeof(why),
			 "a rank of job '%s' left; kv_set_optimizer needs every rank (call it "
			 "again once the rank is back)",
			 j->name);
		return reply_error(cn, m->seq, KV_ERR_PEER, why);
	}
	if (j->opt_pending) {
		if (!opt_same(cfg, j->opt_pending)) {
			snprintf(why, sizeof(why),
				 "rank %d sets optimizer '%.200s' while other ranks of job '%s' set "
				 "'%.200s'",
				 c->rank, cfg->spec, j->name, j->opt_pending->spec);
			free(cfg);
			return reply_error(cn, m->seq, KV_ERR_MISMATCH, why);
		}
		free(cfg);
	} else {
		j->opt_pending = cfg;
	}
	for (int i = 0; i < j->nopt_votes; i++)
		if (j->opt_votes[i].rank == c->rank)
			return reply_error(cn, m->seq, KV_ERR_INVALID,
					   "this rank is already setting the optimizer");
	if (!j->opt_votes && !(j->opt_votes = calloc((size_t)j->num_workers,
						      sizeof(*j->opt_votes))))
		return reply_error(cn, m->seq, KV_ERR_NOMEM, "out of memory");
	j->opt_votes[j->nopt_votes++] = (struct opt_vote){ cn, m->seq, c->rank };
	if (j->nopt_votes < j->num_workers)
		return 0; /* the reply waits for the other ranks */
	why[0] = '\0';
	cfg = j->opt_pending;
	rc = job_set_optimizer(x->d, j, cfg, why, sizeof(why));
	if (rc == 0)
		j->opt_pending = NULL; /* now the job's; kept until the job ends */
	hold_sync(j); /* values of the keys the engine took over */
	opt_votes_reply(j, rc, rc ? why : "optimizer set");
	return 0;
}

static int on_drop(struct ctl *x, struct conn *cn, const struct kv_msg *m)
{
	struct kvd *d = x->d;
	struct job *j;
	char why[256];

	pthread_mutex_lock(&d->lock);
	j = job_find(d, m->u.drop.job);
	if (!j) {
		pthread_mutex_unlock(&d->lock);
		snprintf(why, sizeof(why), "no job named '%s'", m->u.drop.job);
		return reply_error(cn, m->seq, KV_ERR_NOKEY, why);
	}
	if (cn->uid != 0 && cn->uid != j->uid) {
		pthread_mutex_unlock(&d->lock);
		snprintf(why, sizeof(why),
			 "job '%s' belongs to another user; only its owner or root may drop it",
			 m->u.drop.job);
		return reply_error(cn, m->seq, KV_ERR_PERM, why);
	}
	/* detach it: its name is free again; its ranks are disconnected below */
	for (struct job **pp = &d->jobs; *pp; pp = &(*pp)->next)
		if (*pp == j) {
			*pp = j->next;
			break;
		}
	j->detached = true;
	engine_post(d, EV_DROP, NULL, j);
	snprintf(why, sizeof(why), "job '%s' was dropped by uid %u", j->name, (unsigned)cn->uid);
	for (int r = 0; r < j->num_workers; r++) {
		struct client *c = j->ranks[r];
		if (!c)
			continue;
		reply_error(c->conn, 0, KV_ERR_PEER, why);
		shutdown(c->conn->fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&d->lock);
	kvd_log("%s", why);
	return reply_error(cn, m->seq, KV_OK, why);
}

static void handle(struct ctl *x, struct conn *cn, size_t len, const int *fds, int nfds)
{
	struct kv_msg m = { 0 };
	const char *why = NULL;
	char text[256];
	int rc = kv_msg_decode(cn->buf, len, &m, &why);

	/* ADOPT carries its segments; SAVE and LOAD an fd (one); the rest none */
	if (!rc && m.type == KV_MSG_ADOPT && !cn->said_hello) {
		rc = on_adopt(x, cn, &m, fds, nfds);
		goto out;
	}
	for (int i = 1; i < nfds; i++)
		close(fds[i]);
	if (nfds > 1)
		nfds = 1;
	if (rc || (nfds && m.type != KV_MSG_SAVE && m.type != KV_MSG_LOAD)) {
		if (nfds)
			close(fds[0]);
		nfds = 0;
	}
	if (rc) {
		snprintf(text, sizeof(text), "malformed message: %s (%s)", kv_msg_strerror(rc),
			 why ? why : "?");
		kvd_log("pid=%d: %s; disconnecting", (int)cn->pid, text);
		reply_error(cn, m.seq, KV_ERR_PROTO, text);
		goto out_close;
	}
	switch (m.type) {
	case KV_MSG_HELLO:
		if (cn->said_hello)
			break;
		cn->said_hello = true;
		rc = on_hello(x, cn, &m);
		goto out;
	case KV_MSG_STATUS_REQ:
		rc = on_status(x, cn, &m);
		goto out;
	case KV_MSG_DROP:
		rc = on_drop(x, cn, &m);
		goto out;
	case KV_MSG_KEY_OPEN:
		if (!cn->cl)
			break;
		rc = on_key_open(x, cn, &m);
		goto out;
	case KV_MSG_SEG_ALLOC:
		if (!cn->cl)
			break;
		rc = on_seg_alloc(x, cn, &m);
		goto out;
	case KV_MSG_SEG_FREE:
		if (!cn->cl)
			break;
		/* segments live as long as the client (the engine may be reading them) */
		rc = reply_error(cn, m.seq, KV_OK, "segment kept until the client leaves");
		goto out;
	case KV_MSG_OPTIMIZER:
		if (!cn->cl)
			break;
		rc = on_optimizer(x, cn, &m);
		goto out;
	case KV_MSG_SAVE:
	case KV_MSG_LOAD:
		if (!cn->cl)
			break;
		rc = on_ckpt(x, cn, &m, nfds > 0 ? fds[0] : -1);
		nfds = 0; /* on_ckpt owns the fd */
		goto out;
	default:
		break;
	}
	snprintf(text, sizeof(text), "unexpected message type %u %s", m.type,
		 cn->said_hello ? "" : "before hello");
	kvd_log("pid=%d: %s; disconnecting", (int)cn->pid, text);
	reply_error(cn, m.seq, KV_ERR_PROTO, text);
	goto out_close;
out:
	if (rc >= 0) {
		arm_recv(x, cn);
		return;
	}
out_close:
	conn_close(x, cn);
}

/* ------------------------------------------------------------------ connections */

/*
 * Out of file descriptors: the connection waiting in the backlog would make
 * accept fail again at once, and its client would wait for an answer that
 * never comes.  So give up the spare descriptor kept for this moment, take
 * the connection, tell it why, close it, and take the spare back.
 */
static void refuse_no_fds(struct ctl *x, int err)
{
	static const char why[] = "kvd has run out of file descriptors (its RLIMIT_NOFILE); "
				  "try again when ranks have left";
	int fd;

	if (x->spare_fd >= 0) {
		close(x->spare_fd);
		x->spare_fd = -1;
	}
	while ((fd = accept4(x->d->cfg.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0) {
		struct kv_msg m = { .type = KV_MSG_ERROR };
		uint8_t buf[256];
		size_t n;

		m.u.error.code = KV_ERR_NOMEM;
		m.u.error.text = why;
		m.u.error.len = sizeof(why) - 1;
		n = kv_msg_encode(&m, buf, sizeof(buf));
		(void)!send(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
		close(fd);
		if (x->refused++ % 100 == 0)
			kvd_log("refused a connection: %s (%llu so far)", strerror(err),
				(unsigned long long)x->refused);
	}
	x->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/* Is the peer in group gid: its primary group, or one of its supplementary
 * groups as the kernel recorded them at connect (SO_PEERGROUPS)? */
static bool peer_in_group(int fd, gid_t primary, gid_t gid)
{
	gid_t small[64], *g = small;
	socklen_t len = sizeof(small);
	bool in = primary == gid;
	int rc;

	if (in)
		return true;
	rc = getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, g, &len);
	if (rc < 0 && errno == ERANGE && (g = malloc(len)))
		rc = getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, g, &len);
	for (size_t i = 0; rc == 0 && g && i < len / sizeof(gid_t); i++)
		in = g[i] == gid;
	if (g != small)
		free(g);
	return in;
}

static void on_accept(struct ctl *x, int fd)
{
	struct conn *cn = calloc(1, sizeof(*cn));
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (!cn || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		kvd_log("cannot take a connection: %s", cn ? strerror(errno) : "out of memory");
		free(cn);
		close(fd);
		return;
	}
	cn->fd = fd;
	cn->uid = cred.uid;
	cn->gid = cred.gid;
	cn->pid = cred.pid;
	cn->allowed = x->d->cfg.allow_gid >= 0 && peer_in_group(fd, cred.gid,
								 (gid_t)x->d->cfg.allow_gid);
	cn->next = x->conns;
	if (x->conns)
		x->conns->prev = cn;
	x->conns = cn;
	arm_recv(x, cn);
}

static void conn_close(struct ctl *x, struct conn *cn)
{
	struct kvd *d = x->d;
	struct client *c = cn->cl;

	for (struct ckpt_req *r = x->ckpt_out; r; r = r->cnext)
		if (r->cn == cn)
			r->cn = NULL; /* its reply has nobody to go to */
	if (c) {
		struct job *j = c->job;
		bool last;

		if (j->nopt_votes) {
			/* a rank left: the others' kv_set_optimizer cannot complete */
			for (int i = 0; i < j->nopt_votes; i++)
				if (j->opt_votes[i].cn == cn)
					j->opt_votes[i] = j->opt_votes[--j->nopt_votes];
			opt_votes_reply(j, KV_ERR_PEER,
					"a rank left the job while it was setting the optimizer");
		}
		pthread_mutex_lock(&d->lock);
		j->ranks[c->rank] = NULL;
		j->present--;
		last = j->present == 0;
		if (last && !j->detached) {
			for (struct job **pp = &d->jobs; *pp; pp = &(*pp)->next)
				if (*pp == j) {
					*pp = j->next;
					break;
				}
			j->detached = true;
		}
		pthread_mutex_unlock(&d->lock);
		/* now, before any new hello: a replacement of this rank must find its
		 * direct keys' init flags and locks free, and the board saying it left */
		job_board_present(j, c->rank, false);
		job_direct_forget(j, c->rank);
		__atomic_sub_fetch(&d->nclients, 1, __ATOMIC_RELAXED);
		if (__atomic_load_n(&c->evict, __ATOMIC_ACQUIRE))
			kvd_log("leave job=%s rank=%d pid=%d (evicted: %s)", j->name, c->rank,
				(int)c->pid, c->evict_why);
		else
			kvd_log("leave job=%s rank=%d pid=%d", j->name, c->rank, (int)c->pid);
		cn->cl = NULL;
		/* from here on the engine owns c */
		engine_post(d, EV_LEAVE, c, last ? j : NULL);
		status_changed(x);
	}
	adopt_drop(x, cn);
	if (cn->prev)
		cn->prev->next = cn->next;
	else
		x->conns = cn->next;
	if (cn->next)
		cn->next->prev = cn->prev;
	close(cn->fd);
	free(cn);
}

void ctl_evict(struct kvd *d, struct client *c)
{
	uint64_t one = 1;

	/* evict_why was written before; pairs with the load-acquire in on_evict() */
	__atomic_store_n(&c->evict, 1, __ATOMIC_RELEASE);
	(void)!write(d->ctl->evfd, &one, sizeof(one));
}

/* ------------------------------------------------------------------ checkpoints */

static void ckpt_finish(struct ctl *x, struct ckpt_req *r)
{
	if (r->cn) {
		char ok[128];

		if (r->status == 0)
			snprintf(ok, sizeof(ok), "%s %zu bytes", r->load ? "loaded" : "saved", r->len);
		reply_error(r->cn, r->seq, r->status, r->status ? r->why : ok);
	}
	if (r->status == 0)
		kvd_log("job %s: checkpoint %s (%zu bytes)", r->job->name,
			r->load ? "loaded" : "saved", r->len);
	else
		kvd_log("job %s: checkpoint %s failed: %s", r->job->name,
			r->load ? "load" : "save", r->why);
	if (r->cprev)
		r->cprev->cnext = r->cnext;
	else
		x->ckpt_out = r->cnext;
	if (r->cnext)
		r->cnext->cprev = r->cprev;
	close(r->fd);
	free(r->buf);
	free(r);
}

/* Write a save's bytes, then fsync, as one linked io_uring chain. */
static void ckpt_write(struct ctl *x, struct ckpt_req *r)
{
	size_t chunks = (r->len + CKPT_CHUNK - 1) / CKPT_CHUNK;

	if (io_uring_sq_space_left(&x->ring) < chunks + 1)
		io_uring_submit(&x->ring); /* a chain must go in one submission */
	for (size_t i = 0; i < chunks; i++) {
		struct io_uring_sqe *s = get_sqe(x);
		size_t off = i * CKPT_CHUNK, n = r->len - off < CKPT_CHUNK ? r->len - off : CKPT_CHUNK;

		io_uring_prep_write(s, r->fd, r->buf + off, (unsigned)n, off);
		s->flags |= IOSQE_IO_LINK; /* the fsync runs only after every write */
		io_uring_sqe_set_data(s, tagged(r, T_CKPT));
	}
	struct io_uring_sqe *s = get_sqe(x);
	io_uring_prep_fsync(s, r->fd, 0);
	io_uring_sqe_set_data(s, tagged(r, T_CKPT));
	r->inflight = (int)chunks + 1;
}

static void ckpt_read(struct ctl *x, struct ckpt_req *r)
{
	size_t chunks = (r->len + CKPT_CHUNK - 1) / CKPT_CHUNK;

	if (io_uring_sq_space_left(&x->ring) < chunks)
		io_uring_submit(&x->ring);
	for (size_t i = 0; i < chunks; i++) {
		struct io_uring_sqe *s = get_sqe(x);
		size_t off = i * CKPT_CHUNK, n = r->len - off < CKPT_CHUNK ? r->len - off : CKPT_CHUNK;

		io_uring_prep_read(s, r->fd, r->buf + off, (unsigned)n, off);
		if (i + 1 < chunks)
			s->flags |= IOSQE_IO_LINK;
		io_uring_sqe_set_data(s, tagged(r, T_CKPT));
	}
	r->inflight = (int)chunks;
}

static void on_ckpt_cqe(struct ctl *x, struct ckpt_req *r, int res)
{
	if (res < 0 && r->status == 0) {
		r->status = KV_ERR_IO;
		snprintf(r->why, sizeof(r->why), "checkpoint %s: %s", r->load ? "read" : "write",
			 strerror(-res));
	}
	if (--r->inflight > 0)
		return;
	if (r->load && r->status == 0) {
		/* the whole file is in: check it, then the engine restores it */
		r->status = ckpt_verify(r->buf, r->len, r->why, sizeof(r->why));
		if (r->status == 0) {
			engine_ckpt(x->d, r);
			return;
		}
	}
	ckpt_finish(x, r);
}

void ctl_ckpt_done(struct kvd *d, struct ckpt_req *req)
{
	struct ctl *x = d->ctl;
	uint64_t one = 1;

	pthread_mutex_lock(&x->ckpt_lock);
	req->next = x->ckpt_done;
	x->ckpt_done = req;
	pthread_mutex_unlock(&x->ckpt_lock);
	(void)!write(x->evfd, &one, sizeof(one));
}

static void ckpt_drain(struct ctl *x)
{
	struct ckpt_req *r;

	pthread_mutex_lock(&x->ckpt_lock);
	r = x->ckpt_done;
	x->ckpt_done = NULL;
	pthread_mutex_unlock(&x->ckpt_lock);
	while (r) {
		struct ckpt_req *next = r->next;
		if (r->status == 0 && !r->load)
			ckpt_write(x, r);
		else
			ckpt_finish(x, r);
		r = next;
	}
}

/*
 * SAVE and LOAD come with an fd the client opened with its own permissions:
 * kvd never opens a path.  Save: a temp file the client created, empty and
 * writable; kvd writes and fsyncs it, and the client renames it into place.
 * Load: the file, readable.
 */
static int on_ckpt(struct ctl *x, struct conn *cn, const struct kv_msg *m, int fd)
{
	struct ckpt_req *r;
	struct stat st;
	int acc = fd >= 0 ? fcntl(fd, F_GETFL) & O_ACCMODE : -1;
	bool load = m->type == KV_MSG_LOAD;
	const char *bad = NULL;

	if (fd < 0)
		bad = "the request carries no file";
	else if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		bad = "the file is not a regular file";
	else if (load && acc == O_WRONLY)
		bad = "the file is not open for reading";
	else if (!load && (acc == O_RDONLY || st.st_size != 0))
		bad = "the temp file must be empty and open for writing";
	else if (load && (size_t)st.st_size > CKPT_MAX)
		bad = "the file is larger than any checkpoint kvd loads";
	if (bad) {
		if (fd >= 0)
			close(fd);
		return reply_error(cn, m->seq, KV_ERR_INVALID, bad);
	}
	r = calloc(1, sizeof(*r));
	if (!r || (load && !(r->buf = malloc((size_t)st.st_size ? (size_t)st.st_size : 1)))) {
		free(r);
		close(fd);
		return reply_error(cn, m->seq, KV_ERR_NOMEM, "out of memory for the checkpoint");
	}
	r->job = cn->cl->job;
	r->cn = cn;
	r->seq = m->seq;
	r->fd = fd;
	r->load = load;
	r->dump_spec = !load && (m->u.file.flags & 1);
	r->cnext = x->ckpt_out;
	if (x->ckpt_out)
		x->ckpt_out->cprev = r;
	x->ckpt_out = r;
	if (load) {
		r->len = (size_t)st.st_size;
		if (r->len == 0) {
			r->status = ckpt_verify(r->buf, 0, r->why, sizeof(r->why));
			ckpt_finish(x, r);
			return 0;
		}
		ckpt_read(x, r);
	} else {
		engine_ckpt(x->d, r);
	}
	return 0;
}

static void on_evict(struct ctl *x)
{
	ckpt_drain(x);
	for (struct conn *cn = x->conns; cn; cn = cn->next)
		if (cn->cl && !cn->evicted && __atomic_load_n(&cn->cl->evict, __ATOMIC_ACQUIRE)) {
			char why[160];
			/* said first, so its libkv does not take this for kvd going away
			 * (and come back) */
			snprintf(why, sizeof(why), "kvd disconnected this rank: %s",
				 cn->cl->evict_why);
			reply_error(cn, 0, KV_ERR_PROTO, why);
			cn->evicted = true;
			shutdown(cn->fd, SHUT_RDWR); /* its recvmsg completes with EOF */
		}
}

static void on_signal(struct ctl *x)
{
	const char *name = strsignal((int)x->si.ssi_signo);

	kvd_log("%s: finishing rounds in flight, then stopping", name ? name : "signal");
	notify_send("STOPPING=1\nSTATUS=stopping: finishing rounds in flight");
	x->stop = true;
}

static void on_cqe(struct ctl *x, struct io_uring_cqe *cqe)
{
	uintptr_t ud = (uintptr_t)io_uring_cqe_get_data(cqe);
	enum tag t = (enum tag)(ud & 7);
	struct conn *cn = (struct conn *)(ud & ~(uintptr_t)7);

	switch (t) {
	case T_ACCEPT:
		if (cqe->res == -EMFILE || cqe->res == -ENFILE) {
			refuse_no_fds(x, -cqe->res);
			if (!(cqe->flags & IORING_CQE_F_MORE))
				arm_listen_poll(x);
			break;
		}
		if (cqe->res >= 0)
			on_accept(x, cqe->res);
		else if (cqe->res != -EINTR && cqe->res != -ECONNABORTED)
			kvd_log("accept: %s", strerror(-cqe->res));
		if (!(cqe->flags & IORING_CQE_F_MORE))
			arm_accept(x);
		break;
	case T_LISTEN:
		arm_accept(x); /* a connection waits (or the poll failed): try again */
		break;
	case T_SIGNAL:
		if (cqe->res == (int)sizeof(x->si))
			on_signal(x);
		arm_read(x, x->sigfd, &x->si, sizeof(x->si), T_SIGNAL);
		break;
	case T_CKPT:
		on_ckpt_cqe(x, (struct ckpt_req *)(ud & ~(uintptr_t)7), cqe->res);
		break;
	case T_EVICT:
		on_evict(x);
		arm_read(x, x->evfd, &x->evval, sizeof(x->evval), T_EVICT);
		break;
	case T_WATCHDOG:
		/* the loop turned since the last tick: it is alive */
		if (cqe->res == (int)sizeof(x->wdval))
			notify_send("WATCHDOG=1");
		if (cqe->res == (int)sizeof(x->wdval) || cqe->res == -EINTR || cqe->res == -EAGAIN)
			arm_read(x, x->wdfd, &x->wdval, sizeof(x->wdval), T_WATCHDOG);
		else /* no more pings: systemd will restart a kvd it cannot watch */
			kvd_log("watchdog timerfd: %s; pings stop",
				cqe->res < 0 ? strerror(-cqe->res) : "short read");
		break;
	case T_STATUS: /* -ETIME: the timeout expired */
		x->status_armed = false;
		if (!x->stop)
			status_send(x);
		break;
	case T_CONN: {
		int fds[SEG_MAX_FDS], nfds = 0;

		if (!cn) /* a link timeout's own completion (see arm_recv) */
			break;
		if (cqe->res == -ECANCELED)
			kvd_log("pid=%d uid=%u: nothing said within %d s of connecting; "
				"disconnecting",
				(int)cn->pid, (unsigned)cn->uid, (int)x->d->cfg.hello_timeout_s);

		if (cqe->res > 0) {
			for (struct cmsghdr *c = CMSG_FIRSTHDR(&cn->mh); c;
			     c = CMSG_NXTHDR(&cn->mh, c)) {
				if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
					continue;
				size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (size_t i = 0; i < k; i++) {
					int fd;
					memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					if (nfds < SEG_MAX_FDS)
						fds[nfds++] = fd;
					else
						close(fd);
				}
			}
		}
		if (cqe->res > 0 && !(cn->mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
			handle(x, cn, (size_t)cqe->res, fds, nfds);
		} else {
			for (int i = 0; i < nfds; i++)
				close(fds[i]);
			if (cqe->res > 0) {
				kvd_log("pid=%d sent an oversized message; disconnecting",
					(int)cn->pid);
				reply_error(cn, 0, KV_ERR_PROTO, "message too large");
			}
			conn_close(x, cn);
		}
		break;
	}
	}
}

int ctl_run(struct kvd *d)
{
	struct ctl *x = calloc(1, sizeof(*x));
	sigset_t mask;
	int err;

	if (!x)
		return -ENOMEM;
	x->d = d;
	pthread_mutex_init(&x->ckpt_lock, NULL);
	x->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	x->adopt_max = adopt_budget();
	/* non-blocking: refuse_no_fds() accepts until the backlog is empty */
	fcntl(d->cfg.listen_fd, F_SETFL, fcntl(d->cfg.listen_fd, F_GETFL) | O_NONBLOCK);
	d->ctl = x;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	x->sigfd = signalfd(-1, &mask, SFD_CLOEXEC);
	x->evfd = eventfd(0, EFD_CLOEXEC);
	if (x->sigfd < 0 || x->evfd < 0)
		return -errno;
	err = io_uring_queue_init(RING_DEPTH, &x->ring, 0);
	if (err) {
		kvd_log("io_uring_queue_init: %s", strerror(-err));
		return err;
	}
	arm_accept(x);
	arm_read(x, x->sigfd, &x->si, sizeof(x->si), T_SIGNAL);
	arm_read(x, x->evfd, &x->evval, sizeof(x->evval), T_EVICT);
	err = watchdog_start(x);
	if (err) {
		kvd_log("watchdog timerfd: %s", strerror(-err));
		return err;
	}
	/* the accept is in the kernel before systemd hears READY=1 (a connect made
	 * before it would wait in the listen backlog anyway) */
	err = io_uring_submit(&x->ring);
	if (err < 0) {
		kvd_log("io_uring_submit: %s", strerror(-err));
		return err;
	}
	if (notify_enabled()) {
		char text[128];

		status_text(x, text, sizeof(text));
		notify_sendf("READY=1\nSTATUS=%s", text);
		x->status_last = kvd_now();
		if (notify_watchdog_usec())
			notify_send("WATCHDOG=1");
	}

	while (!x->stop) {
		struct io_uring_cqe *cqe;
		unsigned head, n = 0;

		err = io_uring_submit_and_wait(&x->ring, 1);
		if (err < 0 && err != -EINTR && err != -EBUSY) {
			kvd_log("io_uring: %s", strerror(-err));
			break;
		}
		io_uring_for_each_cqe(&x->ring, head, cqe)
		{
			on_cqe(x, cqe);
			n++;
		}
		io_uring_cq_advance(&x->ring, n);
	}

	/* stop: the engine finishes the rounds in flight and fails the rest */
	engine_post(d, EV_SHUTDOWN, NULL, NULL);
	engine_stop(d);
	while (x->conns) {
		struct conn *cn = x->conns;
		x->conns = cn->next;
		close(cn->fd);
		free(cn);
	}
	engine_free_all(d);
	io_uring_queue_exit(&x->ring); /* cancels what is still in flight */
	if (x->spare_fd >= 0)
		close(x->spare_fd);
	pthread_mutex_lock(&x->ckpt_lock);
	x->ckpt_done = NULL; /* each is on ckpt_out too */
	pthread_mutex_unlock(&x->ckpt_lock);
	while (x->ckpt_out) {
		struct ckpt_req *r = x->ckpt_out;
		x->ckpt_out = r->cnext;
		close(r->fd);
		free(r->buf);
		free(r);
	}
	close(x->sigfd);
	close(x->evfd);
	if (x->wdfd >= 0)
		close(x->wdfd);
	free(x);
	d->ctl = NULL;
	return 0;
}
