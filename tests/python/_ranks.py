"""Rank bodies for the multi-process tests: fn(rank, n, sock, job, *args) -> result.

They run in spawned processes (see conftest.run_ranks) and return plain data
the test checks, or raise (the test then fails with the rank's traceback).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

import kvd


def _open(rank, n, sock, job, **kw):
    return kvd.create("local", socket=sock, job=job, rank=rank, num_workers=n,
                      timeout_ms=kw.pop("timeout_ms", 30000), **kw)


def _dtypes():
    out = [np.float32, np.float64, np.float16, np.int32, np.int64]
    if kvd.bfloat16 is not None:
        out.append(kvd.bfloat16)
    return out


def pushpull_dtypes(rank, n, sock, job):
    """Every dtype: a sum over ranks, in place and into an out."""
    res = {}
    with _open(rank, n, sock, job) as kv:
        assert (kv.rank, kv.num_workers, kv.type) == (rank, n, "local")
        for dt in _dtypes():
            name = np.dtype(dt).name
            a = (np.arange(1000) % 7 + rank + 1).astype(dt)
            ptr = a.ctypes.data
            kv.init(f"pp-{name}", a)
            kv.pushpull(f"pp-{name}", a)
            assert a.ctypes.data == ptr and a.dtype == np.dtype(dt)
            out = np.zeros((10, 100), dt)
            kv.pushpull(f"pp-{name}", (np.ones(1000) * (rank + 1)).astype(dt), out)
            res[name] = (a.astype(np.float64).tolist(), out.astype(np.float64).ravel().tolist())
        # integer sums wrap as C unsigned arithmetic does
        big = np.full(4, 2**31 - 1 - rank, np.int32)
        kv.init("wrap32", big)
        kv.pushpull("wrap32", big)
        res["wrap32"] = big.tolist()
        big64 = np.full(4, 2**63 - 1 - rank, np.int64)
        kv.init("wrap64", big64)
        kv.pushpull("wrap64", big64)
        res["wrap64"] = big64.tolist()
    return res


def broadcast_init_pull(rank, n, sock, job):
    with _open(rank, n, sock, job) as kv:
        # broadcast: rank 0's value, others may pass value=None
        out = np.zeros(64, np.float64)
        kv.broadcast("b", np.arange(64, dtype=np.float64) if rank == 0 else None, out)
        b1 = out.tolist()
        # in place, and several outputs
        v = np.full(64, rank + 10.0)
        kv.broadcast("b", v)
        outs = [np.zeros(64), np.zeros(64), np.zeros(64)]
        kv.broadcast("b", np.full(64, 7.0 + rank), outs)
        # init: rank 0's value is stored, the others' content not read
        w = np.full(16, 100.0 + rank, np.float32)
        kv.init("w", w)
        got = np.zeros(16, np.float32)
        kv.pull("w", got)
        try:
            kv.init("w", w)
            exists = None
        except kvd.KVExistsError as e:
            exists = (type(e).__name__, e.code)
        # push then pull: the pull sees this rank's push applied (a round's sum)
        kv.push("w", np.full(16, rank + 1.0, np.float32))
        pulled = [np.zeros(16, np.float32), np.zeros(16, np.float32)]
        kv.pull("w", pulled)
        # push of several local arrays: summed first
        kv.push("w", [np.ones(16, np.float32), np.full(16, 2.0, np.float32)])
        p2 = kv.pull("w", np.zeros(16, np.float32))
        # lists of keys
        kv.broadcast(["k1", 2], [np.full(3, 1.0 + rank), np.full(5, 2.0 + rank)],
                     [np.zeros(3), np.zeros(5)])
        l1, l2 = np.ones(3), np.ones(5)
        kv.pushpull(["k1", 2], [l1, l2])
        return {"b1": b1, "v": v.tolist(), "outs": [o.tolist() for o in outs],
                "init": got.tolist(), "exists": exists,
                "pulled": [p.tolist() for p in pulled], "p2": p2.tolist(),
                "lists": (l1.tolist(), l2.tolist())}


def pushpullv(rank, n, sock, job):
    with _open(rank, n, sock, job) as kv:
        vals = [np.full(5000, rank + 1 + i, np.float32) for i in range(3)]
        kv.init("v", vals[0])
        outs = [np.zeros(5000, np.float32), np.zeros((50, 100), np.float32)]
        kv.pushpull("v", vals, outs)
        r1 = [o.ravel()[:3].tolist() for o in outs]
        kv.pushpull("v", vals)  # in place: every value gets the sum
        r2 = [v[:3].tolist() for v in vals]
        same = np.full(10, 1.0 + rank)  # one array listed twice
        kv.init("same", same)
        kv.pushpull("same", [same, same])
        return {"outs": r1, "inplace": r2, "same": same[:2].tolist()}


def async_ops(rank, n, sock, job):
    with _open(rank, n, sock, job) as kv:
        keys = [f"a{i}" for i in range(6)]
        arrays = {k: np.full(20000, float(i + rank), np.float32) for i, k in enumerate(keys)}
        for k in keys:
            kv.init(k, arrays[k])
        order = keys if rank % 2 == 0 else keys[::-1]  # ranks issue keys in other orders
        handles = {k: kv.pushpull_async(k, arrays[k]) for k in order}
        ptrs = {k: arrays[k].ctypes.data for k in keys}
        res1 = {}
        for k in keys[:3]:
            out = handles[k].wait()
            assert out is arrays[k] and out.ctypes.data == ptrs[k]
            res1[k] = float(out[0])
            assert handles[k].wait() is out  # a second wait returns the same
        kv.wait_all()  # the rest
        assert all(h.done for h in handles.values())
        res2 = {k: float(arrays[k][-1]) for k in keys[3:]}
        # a list of keys, into outs; the handle outlives the caller's names
        outs = [np.zeros(20000, np.float32) for _ in keys[:2]]
        h = kv.pushpull_async(keys[:2], [np.ones(20000, np.float32)] * 2, outs)
        del outs
        got = h.wait()
        return {"first": res1, "rest": res2, "list": [float(g[0]) for g in got]}


def alloc_zero_copy(rank, n, sock, job):
    with _open(rank, n, sock, job) as kv:
        a = kv.alloc((256, 1024), np.float32)  # 1 MiB: more than one part
        assert isinstance(a, np.ndarray) and a.shape == (256, 1024) and a.flags.c_contiguous
        a[:] = rank + 1
        ptr = a.ctypes.data
        kv.init("z", a)
        kv.pushpull("z", a)
        assert a.ctypes.data == ptr
        o = kv.alloc(256 * 1024, np.float32)
        kv.pushpull("z", np.ones((256, 1024), np.float32), o)
        i64 = kv.alloc(3, np.int64)
        i64[:] = 5
        kv.init("i", i64)
        h = kv.pushpull_async("i", i64)
        h.wait()
        res = (float(a[0, 0]), float(a[-1, -1]), float(o[0]), float(o[-1]), i64.tolist())
        view = a[3]  # a view keeps the block alive
        del a
        view[:] = 1.0
        del view, o, i64
        return res


def mismatch(rank, n, sock, job):
    with _open(rank, n, sock, job) as kv:
        kv.init("m", np.zeros(10, np.float32))
        err = None
        if rank == 1:
            try:
                kv.pushpull("m", np.ones(11, np.float32))
            except kvd.KVMismatchError as e:
                err = (e.code, str(e))
            try:
                kv.pushpull("m", np.ones(10, np.float64))
            except kvd.KVMismatchError as e:
                err = err + (e.code,)
        a = np.ones(10, np.float32)
        kv.pushpull("m", a)  # the round stayed open for the correct call
        return {"err": err, "sum": float(a[0])}


def peer_death(rank, n, sock, job):
    kv = _open(rank, n, sock, job, timeout_ms=20000)
    a = np.ones(100000, np.float32)
    kv.init("p", a)
    kv.pushpull("p", a)  # one complete round first
    if rank == n - 1:
        time.sleep(0.3)  # the others are in the round now
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.time()
    try:
        kv.pushpull("p", a)
        return ("no error", time.time() - t0)
    except kvd.KVError as e:
        later = None
        try:  # later collective ops fail at once too
            kv.pushpull("p", a)
        except kvd.KVError as e2:
            later = type(e2).__name__
        return (type(e).__name__, e.code, str(e), time.time() - t0, later)
    finally:
        kv.close()


def peer_death_async(rank, n, sock, job):
    kv = _open(rank, n, sock, job, timeout_ms=20000)
    a = np.ones(1000, np.float32)
    kv.init("q", a)
    if rank == 1:
        time.sleep(0.3)
        os._exit(3)  # a rank that dies without closing
    h = kv.pushpull_async("q", a)
    try:
        h.wait()
        return "no error"
    except kvd.KVPeerError as e:
        return ("KVPeerError", e.code)
    finally:
        kv.close()


def custom_store_in_child(rank, n, sock, job):
    """A Python store registered in a rank and reached through kv_create."""
    import ctypes

    @kvd.register(name=f"child{rank}")
    class Summer:
        def __init__(self, options):
            self.options = options

        rank = 0
        num_workers = 1

        def pushpull(self, key, value, out, priority):
            vals = value if isinstance(value, list) else [value]
            outs = out if isinstance(out, list) else [out]
            s = sum(v.astype(np.float64) for v in vals)
            for o in outs:
                o[...] = s * 10

    with kvd.create(f"CHILD{rank}", job=job) as kv:
        a = np.ones(4, np.float32)
        kv.pushpull("x", a)
        # and through the C API directly
        lib = ctypes.CDLL(kvd.library_path())
        st = ctypes.c_void_p()
        assert lib.kv_create(f"child{rank}".encode(), None, ctypes.byref(st)) == 0
        lib.kv_type.restype = ctypes.c_char_p
        typ = lib.kv_type(st)
        lib.kv_close(st)
        return (a.tolist(), kv.type, typ.decode())


def threads(rank, n, sock, job):
    """Rank 0 blocks in a pushpull on one thread while another thread's op must
    complete first: only works when calls release the GIL."""
    import threading

    with _open(rank, n, sock, job) as kv:
        x, y = np.ones(1000, np.float32), np.ones(1000, np.float32)
        kv.init("x", x)
        kv.init("y", y)
        if rank == 0:
            done = []
            t = threading.Thread(target=lambda: done.append(kv.pushpull("x", x)))
            t.start()
            time.sleep(0.2)  # thread t now waits in kv_pushpull for rank 1's x
            kv.pushpull("y", y)  # rank 1 sends y before x
            t.join(20)
            assert done, "the pushpull on x never returned"
        else:
            time.sleep(0.1)
            kv.pushpull("y", y)
            kv.pushpull("x", x)
        return (float(x[0]), float(y[0]))


def list_orders(rank, n, sock, job):
    """A blocking pushpull of a list of keys, listed in other orders by other
    ranks (big keys, through kvd's engine, and small ones, direct)."""
    with _open(rank, n, sock, job, timeout_ms=20000) as kv:
        keys = [f"o{i}" for i in range(6)]
        sizes = [300000 if i % 2 else 16 for i in range(6)]
        for k, s in zip(keys, sizes):
            kv.init(k, np.zeros(s, np.float32))
        order = list(range(6)) if rank % 2 == 0 else list(range(6))[::-1]
        vals = [np.full(sizes[i], float(i + 10 * rank), np.float32) for i in order]
        got = kv.pushpull([keys[i] for i in order], vals)
        return {keys[i]: float(g[-1]) for i, g in zip(order, got)}
