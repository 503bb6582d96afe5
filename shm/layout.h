/* SPDX-License-Identifier: MIT */
/*
 * layout.h - the shared-memory ABI between kvd and libkv.
 *
 * Everything here is read by two processes that do not trust each other, so
 * the structures are plain fixed-width fields with explicit padding, offsets
 * instead of pointers, and a _Static_assert on every size and offset.  A
 * change to any of them bumps KV_SHM_ABI.
 *
 * A client's ring segment (one memfd, made and sealed by the daemon) holds:
 *
 *   0      struct kv_seg_hdr       magic, ABI, geometry (written once by kvd)
 *   256    struct kv_ring_ctl      submission ring control (client produces)
 *   448    struct kv_ring_ctl      completion ring control (kvd produces)
 *   1024   sq_entries x kv_sqe     submission entries
 *   ...    cq_entries x kv_cqe     completion entries
 *
 * Data (inputs and outputs of ops) lives in arena segments, named by a
 * segment id that kvd hands out with the fd, and an offset into it.  Each
 * party keeps its own copy of every index and size and never re-reads them
 * from shared memory, so a scribbled header can hurt only its own client.
 */
#ifndef KV_SHM_LAYOUT_H
#define KV_SHM_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#define KV_SHM_MAGIC 0x3a64766bu /* "kvd:" in little-endian bytes */
#define KV_SHM_ABI 9u
#define KV_CACHELINE 64

/* One SPSC ring's control words, each on its own cache line. */
struct kv_ring_ctl {
	uint32_t tail; /* producer: store-release; consumer: load-acquire */
	uint8_t pad0[KV_CACHELINE - 4];
	uint32_t head; /* consumer: store-release; producer: load-acquire */
	uint8_t pad1[KV_CACHELINE - 4];
	uint32_t sleeping; /* consumer threads asleep (or about to be); producer reads */
	uint32_t full;     /* producer holds entries that did not fit: consumer, wake it */
	uint8_t pad2[KV_CACHELINE - 8];
};
_Static_assert(sizeof(struct kv_ring_ctl) == 3 * KV_CACHELINE, "ring ctl size");
_Static_assert(offsetof(struct kv_ring_ctl, tail) == 0, "tail offset");
_Static_assert(offsetof(struct kv_ring_ctl, head) == KV_CACHELINE, "head offset");
_Static_assert(offsetof(struct kv_ring_ctl, sleeping) == 2 * KV_CACHELINE, "sleeping offset");
_Static_assert(offsetof(struct kv_ring_ctl, full) == 2 * KV_CACHELINE + 4, "full offset");

struct kv_seg_hdr {
	uint32_t magic;
	uint32_t abi;
	uint32_t hdr_size; /* sizeof(struct kv_seg_hdr) */
	uint32_t flags;
	uint64_t seg_size;
	uint32_t sq_entries; /* power of two */
	uint32_t cq_entries; /* power of two */
	uint32_t sqe_size;
	uint32_t cqe_size;
	uint32_t sq_ctl_off;
	uint32_t cq_ctl_off;
	uint32_t sq_off;
	uint32_t cq_off;
	uint8_t pad[256 - 56];
};
_Static_assert(sizeof(struct kv_seg_hdr) == 256, "seg hdr size");
_Static_assert(offsetof(struct kv_seg_hdr, seg_size) == 16, "seg_size offset");
_Static_assert(offsetof(struct kv_seg_hdr, sq_entries) == 24, "sq_entries offset");
_Static_assert(offsetof(struct kv_seg_hdr, cq_entries) == 28, "cq_entries offset");
_Static_assert(offsetof(struct kv_seg_hdr, sqe_size) == 32, "sqe_size offset");
_Static_assert(offsetof(struct kv_seg_hdr, cqe_size) == 36, "cqe_size offset");
_Static_assert(offsetof(struct kv_seg_hdr, sq_ctl_off) == 40, "sq_ctl_off offset");
_Static_assert(offsetof(struct kv_seg_hdr, cq_ctl_off) == 44, "cq_ctl_off offset");
_Static_assert(offsetof(struct kv_seg_hdr, sq_off) == 48, "sq_off offset");
_Static_assert(offsetof(struct kv_seg_hdr, cq_off) == 52, "cq_off offset");

#define KV_SQ_CTL_OFF 256u
#define KV_CQ_CTL_OFF (KV_SQ_CTL_OFF + (uint32_t)sizeof(struct kv_ring_ctl))
#define KV_SQ_OFF 1024u
_Static_assert(KV_CQ_CTL_OFF + sizeof(struct kv_ring_ctl) <= KV_SQ_OFF, "ring ctl fits");
_Static_assert(KV_SQ_CTL_OFF % KV_CACHELINE == 0 && KV_CQ_CTL_OFF % KV_CACHELINE == 0,
	       "ring ctl aligned");

/* Where an op's data lives: a segment id handed out by kvd and a byte offset. */
#define KV_SEG_NONE 0xffffffffu
struct kv_loc {
	uint32_t seg;
	uint32_t tag; /* in.tag: the board epoch the op began in (below); out.tag of a
		       * push, pushpull or broadcast: the round of the part it is for,
		       * 0 when unknown.  A round that completed already is not run
		       * again: the part completes with that round's result if kvd
		       * still has it (the last two), else KV_ERR_DAEMON */
	uint64_t off;
};
_Static_assert(sizeof(struct kv_loc) == 16, "loc size");
_Static_assert(offsetof(struct kv_loc, off) == 8, "loc off offset");

enum kv_op {
	KV_OP_NOP = 0,
	KV_OP_INIT = 1,     /* in: rank 0's value; out: optional copy of the stored value */
	KV_OP_PUSH = 2,     /* in: contribution */
	KV_OP_PULL = 3,     /* out: the value after this rank's earlier pushes */
	KV_OP_PUSHPULL = 4, /* in: contribution; out: the round's result */
	KV_OP_BCAST = 5,    /* in: rank 0's value (others: none); out: the value */
	KV_OP_CANCEL = 6,   /* user_data: the op to cancel; no completion of its own */
	KV_OP_MAX = 7,
};

/*
 * A submission: one part of one op on one key.  Written by the client.
 * in.tag carries the job board's epoch read when the op began: a part of an
 * op that began before a rank left is refused (KV_ERR_PEER), so an op whose
 * parts straddle a death cannot finish some parts with the old ranks and the
 * rest in rounds with a replacement (see engine.c, do_round).
 */
struct kv_sqe {
	uint8_t op;       /* enum kv_op */
	uint8_t dtype;    /* kv_dtype */
	uint16_t flags;
	int32_t priority; /* higher first among ready rounds */
	uint32_t key;     /* key id from KV_MSG_KEY */
	uint32_t part;    /* part index, < the key's nparts */
	uint64_t user_data;
	uint64_t count; /* element count of the whole key: checked against the key */
	struct kv_loc in;
	struct kv_loc out;
};
_Static_assert(sizeof(struct kv_sqe) == 64, "sqe size");
_Static_assert(offsetof(struct kv_sqe, priority) == 4, "sqe priority offset");
_Static_assert(offsetof(struct kv_sqe, key) == 8, "sqe key offset");
_Static_assert(offsetof(struct kv_sqe, part) == 12, "sqe part offset");
_Static_assert(offsetof(struct kv_sqe, user_data) == 16, "sqe user_data offset");
_Static_assert(offsetof(struct kv_sqe, count) == 24, "sqe count offset");
_Static_assert(offsetof(struct kv_sqe, in) == 32, "sqe in offset");
_Static_assert(offsetof(struct kv_sqe, out) == 48, "sqe out offset");

/* A completion: the status of one part.  Written by kvd. */
struct kv_cqe {
	uint64_t user_data;
	int32_t status; /* KV_OK or a KV_ERR_* code */
	uint32_t part;
	uint64_t round; /* rounds completed on this part, this one included */
	uint64_t rsvd;
};
_Static_assert(sizeof(struct kv_cqe) == 32, "cqe size");
_Static_assert(offsetof(struct kv_cqe, status) == 8, "cqe status offset");
_Static_assert(offsetof(struct kv_cqe, part) == 12, "cqe part offset");
_Static_assert(offsetof(struct kv_cqe, round) == 16, "cqe round offset");

/* Size of a ring segment with the given (power-of-two) entry counts. */
static inline uint64_t kv_ring_seg_size(uint32_t sq_entries, uint32_t cq_entries)
{
	uint64_t end = KV_SQ_OFF + (uint64_t)sq_entries * sizeof(struct kv_sqe) +
		       (uint64_t)cq_entries * sizeof(struct kv_cqe);
	return (end + 4095) & ~(uint64_t)4095;
}

/*
 * Direct rounds.  Keys up to kvd's --direct-max bytes are reduced by the
 * ranks themselves, in a job's shared "direct" segments, without a hop
 * through kvd: each rank copies its contribution into its slot, then
 * arrives (under the key's lock); the last to arrive sums the slots into
 * the spare result buffer and publishes the round by bumping `done`.
 * Results are double-buffered (result[done & 1] is the value), so a rank
 * that dies mid-sum leaves the last completed value intact.  kvd owns the
 * job board: it moves `state` as ranks join and leave, and resets what a
 * dead rank left behind (its lock, its init flag).
 *
 * A direct key's block, at an offset kvd hands out, 64-byte aligned:
 *   struct kv_dkey | inited[num_workers] | arrived_at[num_workers] (u32) |
 *   kinds[num_workers] | slot[0..n-1] | result[0..1]
 *   (each section 64-byte aligned)
 * each slot and result kv_dkey_stride(bytes) apart.  Both sides compute the
 * geometry from their own copy of num_workers and the key's size.
 */
enum kv_board_state {
	KV_BOARD_JOINING = 0, /* not every rank has joined yet: ops wait */
	KV_BOARD_OK = 1,
	KV_BOARD_BROKEN = 2,  /* a rank left: collective ops fail with KV_ERR_PEER */
	KV_BOARD_DROPPED = 3, /* the job was dropped (kvctl drop) */
	KV_BOARD_DOWN = 4,    /* kvd is stopping */
};

struct kv_board {
	uint32_t magic;
	uint32_t abi;
	uint32_t num_workers;
	uint32_t state; /* enum kv_board_state; written by kvd only */
	uint32_t epoch; /* futex word: bumped by kvd at every state change */
	uint32_t pad0;
	uint64_t rounds; /* direct rounds completed (statistics, bumped by summers) */
	uint64_t bytes;  /* bytes of their results */
	uint8_t pad[KV_CACHELINE - 40];
};
_Static_assert(sizeof(struct kv_board) == KV_CACHELINE, "board size");
_Static_assert(offsetof(struct kv_board, state) == 12, "board state offset");
_Static_assert(offsetof(struct kv_board, epoch) == 16, "board epoch offset");
_Static_assert(offsetof(struct kv_board, rounds) == 24, "board rounds offset");

/* The board segment: the header, then one byte per rank, 1 while it is joined,
 * then the latency histogram of direct rounds. */
#define KV_BOARD_SIZE 4096u
#define KV_BOARD_PRESENT_OFF KV_CACHELINE
_Static_assert(KV_BOARD_PRESENT_OFF + 1024 <= KV_BOARD_SIZE, "board fits 1024 ranks");

/*
 * Round latency histograms (the engine's per job, and this one for direct
 * rounds): bucket b counts samples under 2^b microseconds, the last one
 * those above all.  A direct round's summer adds one sample per round, from
 * the first rank's arrival to the published result.  Statistics only: kvd
 * reads it for kvctl and trusts nothing in it.
 */
#define KV_LAT_BUCKETS 24
struct kv_board_lat {
	uint64_t count;
	uint64_t sum_ns;
	uint64_t bucket[KV_LAT_BUCKETS + 1];
};
#define KV_BOARD_LAT_OFF 2048u
_Static_assert(KV_BOARD_PRESENT_OFF + 1024 <= KV_BOARD_LAT_OFF, "latency after presence");
_Static_assert(KV_BOARD_LAT_OFF + sizeof(struct kv_board_lat) <= KV_BOARD_SIZE, "latency fits");

static inline unsigned kv_lat_bucket(uint64_t ns)
{
	uint64_t us = ns / 1000;
	unsigned b = 0;

	while (b < KV_LAT_BUCKETS && us >= (1ull << b))
		b++;
	return b;
}

enum kv_dkind { KV_DK_NONE = 0, KV_DK_SUM = 1, KV_DK_BCAST = 2, KV_DK_MISMATCH = 3 };

struct kv_dkey {
	uint32_t done;      /* futex word: rounds completed */
	uint32_t arrived;   /* arrivals in the open round */
	uint32_t lock;      /* 0 free, else holder's rank + 1 */
	uint32_t epoch;     /* board epoch the open round's arrivals belong to */
	uint32_t kind;      /* enum kv_dkind of the open round */
	int32_t status;     /* of the last completed round: KV_OK or a KV_ERR_* */
	uint32_t waiters;   /* threads asleep on done */
	uint32_t has_value; /* futex word: 1 once the key holds a value */
	uint32_t moved;     /* kvd serves the key's rounds from now on (an optimizer was set) */
	uint32_t summer;    /* rank + 1 of the rank summing the open round, 0 when none */
	uint64_t since_ns;  /* CLOCK_MONOTONIC of the open round's first arrival (statistics) */
	uint8_t pad[KV_CACHELINE - 48];
};
_Static_assert(sizeof(struct kv_dkey) == KV_CACHELINE, "dkey size");
_Static_assert(offsetof(struct kv_dkey, moved) == 32, "dkey moved offset");
_Static_assert(offsetof(struct kv_dkey, summer) == 36, "dkey summer offset");
_Static_assert(offsetof(struct kv_dkey, since_ns) == 40, "dkey since_ns offset");
_Static_assert(offsetof(struct kv_dkey, status) == 20, "dkey status offset");
_Static_assert(offsetof(struct kv_dkey, has_value) == 28, "dkey has_value offset");

static inline uint64_t kv_dkey_stride(uint64_t bytes)
{
	return (bytes + KV_CACHELINE - 1) & ~(uint64_t)(KV_CACHELINE - 1);
}

static inline uint64_t kv_dkey_inited_off(void)
{
	return sizeof(struct kv_dkey);
}

/* after inited[]: arrived_at[num_workers], the round each rank last arrived at */
static inline uint64_t kv_dkey_arrived_off(uint32_t num_workers)
{
	return sizeof(struct kv_dkey) + kv_dkey_stride(num_workers);
}

/*
 * after arrived_at[]: kinds[num_workers] (u8), the enum kv_dkind each rank
 * arrived with in the open round (KV_DK_NONE: not arrived).  Rank 0's op
 * decides a round: a rank whose op differs is refused alone, at its arrival
 * when rank 0 came first, else when rank 0 arrives, which marks it
 * KV_DK_MISMATCH and takes its arrival back; the round stays open.
 */
static inline uint64_t kv_dkey_kinds_off(uint32_t num_workers)
{
	return kv_dkey_arrived_off(num_workers) + kv_dkey_stride(4ull * num_workers);
}

static inline uint64_t kv_dkey_slot_off(uint32_t num_workers, uint64_t bytes, uint32_t i)
{
	return kv_dkey_kinds_off(num_workers) + kv_dkey_stride(num_workers) +
	       (uint64_t)i * kv_dkey_stride(bytes);
}

/* result r (0 or 1) follows the num_workers slots */
static inline uint64_t kv_dkey_result_off(uint32_t num_workers, uint64_t bytes, uint32_t r)
{
	return kv_dkey_slot_off(num_workers, bytes, num_workers + r);
}

static inline uint64_t kv_dkey_size(uint32_t num_workers, uint64_t bytes)
{
	return kv_dkey_slot_off(num_workers, bytes, num_workers + 2);
}

/*
 * An engine key's value block, in the job's value segments (kvd's alone:
 * ranks are handed the segments' fds to keep, never to map):
 *   struct kv_vpart[nparts] | copy 0 | copy 1   (each section 64-byte aligned)
 * Part p of copy c starts p * part_elems * esize bytes into copy c.  Each
 * part has two copies of its value, two records of how far it got, and a
 * version word: copy and record ver & 1 are the part as of its last
 * completed round.  A round (or an init, a broadcast, a load) writes the
 * spare copy and record, then stores ver + 1 with release, so whatever
 * instant kvd dies at, every part holds one whole round, never a mix.
 */
struct kv_vrec {
	uint64_t rounds; /* rounds completed on the part */
	uint64_t opt_t;  /* optimizer updates applied to it */
	uint32_t has_value;
	uint32_t opt_fresh; /* the optimizer states' generation */
};
_Static_assert(sizeof(struct kv_vrec) == 24, "vrec size");

struct kv_vpart {
	uint64_t ver;
	struct kv_vrec rec[2];
	uint8_t pad[KV_CACHELINE - 8 - 2 * sizeof(struct kv_vrec)];
};
_Static_assert(sizeof(struct kv_vpart) == KV_CACHELINE, "vpart size");

static inline uint64_t kv_vblock_copy_off(uint32_t nparts, uint64_t bytes, unsigned c)
{
	return (uint64_t)nparts * sizeof(struct kv_vpart) + c * kv_dkey_stride(bytes);
}

static inline uint64_t kv_vblock_size(uint32_t nparts, uint64_t bytes)
{
	return kv_vblock_copy_off(nparts, bytes, 2);
}

/*
 * The job manifest: what a kvd needs to take a job back after a restart.
 * kvd's control thread alone writes it; every rank holds (never maps) its
 * segments, so it lives exactly as long as some rank of the job does.
 * Chunk c is a segment of KV_MAN_HDR bytes then room for KV_MAN_KEYS0 << c
 * key records, those of key ids kv_man_first(c) onwards; chunk 0's header
 * describes the job.  A key's record is written once, before the key is
 * handed out, and published by chunk 0's nkeys (release); a direct key that
 * an optimizer moves to the engine gets its value block recorded, then
 * KV_MKEY_VALUE; a key's optimizer state block (two copies like the value's,
 * each of (sarrays & 0xff) arrays of count f32) is recorded when the
 * optimizer is set.  The optimizer spec is double-buffered like a part.
 */
#define KV_MAN_MAGIC 0x4e4d564bu /* "KVMN" */
#define KV_MAN_HDR 4096u
#define KV_MAN_KEYS0 256u
#define KV_MAN_CHUNKS 16u /* KV_MAN_KEYS0 * (2^16 - 1) keys: more than kvd allows */
#define KV_MAN_JOB 136u   /* a job name and its NUL, padded */
#define KV_MAN_SPEC 1032u /* an optimizer spec and its NUL, padded */

struct kv_man_opt {
	uint32_t len;   /* 0: no optimizer */
	uint32_t fresh; /* the states' generation */
	char spec[KV_MAN_SPEC];
};

struct kv_man_hdr {
	uint32_t magic;
	uint32_t abi;
	uint32_t num_workers;
	uint32_t chunk; /* this chunk's index */
	uint32_t nkeys; /* chunk 0: records published */
	uint32_t pad0;
	uint64_t opt_ver; /* chunk 0: opt[opt_ver & 1] is the job's optimizer */
	char job[KV_MAN_JOB];
	struct kv_man_opt opt[2];
};
_Static_assert(sizeof(struct kv_man_hdr) <= KV_MAN_HDR, "manifest header size");

enum kv_mkey_flags {
	KV_MKEY_DIRECT = 1 << 0, /* dseg/doff: the key's block in a direct segment */
	KV_MKEY_VALUE = 1 << 1,  /* vseg/voff: its value block in a value segment */
};

struct kv_mkey {
	uint64_t count;
	uint64_t doff, voff;
	uint32_t dseg, vseg;
	uint32_t nparts, part_elems;
	uint32_t flags; /* enum kv_mkey_flags */
	uint16_t name_len;
	uint8_t dtype, pad0;
	char name[256];
	uint64_t soff;    /* the optimizer state block in value segment sseg */
	uint32_t sseg;
	uint32_t sarrays; /* published last: arrays per copy | KV_MKEY_MASTER; 0: none */
};
#define KV_MKEY_MASTER (1u << 8) /* the state block's array 0 is the f32 master copy */
_Static_assert(sizeof(struct kv_mkey) == 320, "mkey size");

static inline uint32_t kv_man_first(uint32_t chunk)
{
	return KV_MAN_KEYS0 * ((1u << chunk) - 1u);
}

static inline uint64_t kv_man_size(uint32_t chunk)
{
	return KV_MAN_HDR + (uint64_t)(KV_MAN_KEYS0 << chunk) * sizeof(struct kv_mkey);
}

#endif /* KV_SHM_LAYOUT_H */
