"""The binding in one process: every kv.h function, dtypes, errors, lifetimes."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest

import kvd
from conftest import ROOT, Kvd

ALL_CODES = {
    kvd.KV_ERR_INVALID: kvd.KVInvalidError, kvd.KV_ERR_NOKEY: kvd.KVNoKeyError,
    kvd.KV_ERR_MISMATCH: kvd.KVMismatchError, kvd.KV_ERR_UNSUPPORTED: kvd.KVUnsupportedError,
    kvd.KV_ERR_PEER: kvd.KVPeerError, kvd.KV_ERR_DAEMON: kvd.KVDaemonError,
    kvd.KV_ERR_NOMEM: kvd.KVNoMemError, kvd.KV_ERR_PERM: kvd.KVPermError,
    kvd.KV_ERR_TIMEOUT: kvd.KVTimeoutError, kvd.KV_ERR_IO: kvd.KVIOError,
    kvd.KV_ERR_PROTO: kvd.KVProtoError, kvd.KV_ERR_EXISTS: kvd.KVExistsError,
}


def dtypes():
    out = [np.float32, np.float64, np.float16, np.int32, np.int64]
    if kvd.bfloat16 is not None:
        out.append(kvd.bfloat16)
    return out


# ---------------------------------------------------------------- a recording store

calls: list = []


@kvd.register
class Recorder:
    """Records what reaches it (pointers included); pushpull sums, broadcast copies."""

    def __init__(self, options):
        self.options = options
        self.closed = False
        self.optimizer = None
        calls.append(("create", options))

    @property
    def rank(self):
        return 0

    def num_workers(self):
        return 1

    def init(self, key, value):
        calls.append(("init", key, value.ctypes.data, value.dtype, value.size,
                      value.flags.writeable))

    def push(self, key, value, priority):
        calls.append(("push", key, value.ctypes.data, priority))

    def pull(self, key, out, priority):
        out[...] = 42
        calls.append(("pull", key, out.ctypes.data, priority))

    def pushpull(self, key, value, out, priority):
        vals = value if isinstance(value, list) else [value]
        outs = out if isinstance(out, list) else [out]
        calls.append(("pushpull", key, [v.ctypes.data for v in vals],
                      [o.ctypes.data for o in outs], priority))
        if key == "boom":
            raise ZeroDivisionError("boom")
        if key.startswith("code"):
            raise kvd.error_class(int(key[4:]))("from the store", int(key[4:]))
        s = sum(v.astype(np.float64) for v in vals)
        for o in outs:
            o[...] = s

    def broadcast(self, key, value, out, priority):
        calls.append(("broadcast", key, None if value is None else value.ctypes.data,
                      out.ctypes.data, priority))
        out[...] = value

    def set_optimizer(self, spec):
        self.optimizer = spec
        calls.append(("set_optimizer", spec))

    def is_capable(self, capability):
        return capability in ("optimizer", "zero_copy")

    def save_optimizer_states(self, path, dump_optimizer):
        calls.append(("save", path, dump_optimizer))
        if path.endswith("/missing/x"):
            raise FileNotFoundError(path)

    def load_optimizer_states(self, path):
        calls.append(("load", path))
        raise NotImplementedError

    def close(self):
        calls.append(("close",))


@pytest.fixture
def rec():
    calls.clear()
    with kvd.create("recorder", job="j1", rank=0, num_workers=1, timeout_ms=500) as kv:
        yield kv


# ---------------------------------------------------------------- library, module


def test_library_found_in_tree():
    assert kvd.library_path() == str(ROOT / "build" / "lib" / "libkv.so") or \
        os.environ.get("KVD_LIBRARY")
    assert kvd.__version__ == "0.1.0"


def test_kvd_library_env_is_honoured(tmp_path):
    code = ("import kvd\ntry:\n    kvd.create('teststore')\n"
            "except OSError as e:\n    print('OSError', e)")
    env = dict(os.environ, KVD_LIBRARY=str(tmp_path / "nope.so"),
               PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "OSError" in r.stdout and "KVD_LIBRARY" in r.stdout, r.stdout + r.stderr


def test_strerror_and_dtype_size():
    assert kvd.strerror(0) == "success"
    for code in ALL_CODES:
        assert kvd.strerror(code) and kvd.strerror(code) != "unknown error"
    assert kvd.strerror(-99) == "unknown error"
    sizes = {np.float32: 4, np.float64: 8, np.float16: 2, np.int32: 4, np.int64: 8}
    for dt, n in sizes.items():
        assert kvd.dtype_size(dt) == n
    if kvd.bfloat16 is not None:
        assert kvd.dtype_size(kvd.bfloat16) == 2
    with pytest.raises(kvd.KVInvalidError):
        kvd.dtype_size(np.uint8)


def test_error_classes():
    for code, cls in ALL_CODES.items():
        assert kvd.error_class(code) is cls and cls.code == code
        assert issubclass(cls, kvd.KVError)
        assert cls.__name__.startswith("KV") and cls.__name__.endswith("Error")
    assert issubclass(kvd.KVInvalidError, ValueError)
    assert issubclass(kvd.KVUnsupportedError, NotImplementedError)
    import pickle

    e = pickle.loads(pickle.dumps(kvd.KVPeerError("gone", kvd.KV_ERR_PEER)))
    assert type(e) is kvd.KVPeerError and e.code == kvd.KV_ERR_PEER and str(e) == "gone"


# ---------------------------------------------------------------- teststore (built in)


@pytest.mark.parametrize("dt", dtypes(), ids=lambda d: np.dtype(d).name)
def test_teststore_every_dtype(dt):
    with kvd.create("teststore") as kv:
        assert (kv.type, kv.rank, kv.num_workers) == ("teststore", 0, 1)
        a = np.arange(12).reshape(3, 4).astype(dt)
        b = np.ones((3, 4), dt)
        kv.pushpull("k", [a, b])  # both get a + b
        want = (np.arange(12).reshape(3, 4) + 1).astype(np.float64)
        assert np.array_equal(a.astype(np.float64), want)
        assert np.array_equal(b.astype(np.float64), want)
        out = np.zeros(12, dt)
        kv.broadcast("k", a, out)
        assert np.array_equal(out.astype(np.float64), want.ravel())
        h = kv.pushpull_async("k", a, out)
        assert h.wait() is out
        kv.wait_all()


def test_f16_sums_in_f32_and_rounds_once():
    with kvd.create("teststore") as kv:
        a = np.full(4, 2048.0, np.float16)
        b = np.ones(4, np.float16)
        c = np.ones(4, np.float16)
        out = np.zeros(4, np.float16)
        kv.pushpull("h", [a, b, c], out)  # 2048+1+1 = 2050 exactly; f16 would give 2048
        assert out.tolist() == [2050.0] * 4


def test_closed_store_and_context_manager():
    kv = kvd.create("teststore")
    with kv as k2:
        assert k2 is kv and not kv.closed
    assert kv.closed and "closed" in repr(kv)
    kv.close()  # twice is fine
    with pytest.raises(kvd.KVInvalidError, match="closed"):
        kv.pushpull("k", np.ones(3))
    assert kv.last_error == ""


# ---------------------------------------------------------------- every call, zero copy


def test_every_call_reaches_the_store_without_copies(rec):
    kv = rec
    assert calls[0][0] == "create"
    opts = calls[0][1]
    assert (opts.job, opts.rank, opts.num_workers, opts.timeout_ms) == ("j1", 0, 1, 500)
    assert opts.socket is None and opts.device is None
    assert (kv.type, kv.rank, kv.num_workers) == ("recorder", 0, 1)

    a = np.arange(10, dtype=np.float32)
    kv.init("a", a)
    assert calls[-1] == ("init", "a", a.ctypes.data, np.dtype(np.float32), 10, False)
    kv.init(7, a)  # int keys are their decimal string
    assert calls[-1][1] == "7"
    kv.push("a", a, priority=3)
    assert calls[-1] == ("push", "a", a.ctypes.data, 3)
    o = np.zeros((2, 5), np.float32)
    assert kv.pull("a", o, priority=-1) is o
    assert calls[-1] == ("pull", "a", o.ctypes.data, -1) and (o == 42).all()

    assert kv.pushpull("a", a) is a  # in place
    assert calls[-1] == ("pushpull", "a", [a.ctypes.data], [a.ctypes.data], 0)
    kv.pushpull("a", a, o, priority=2)
    assert calls[-1] == ("pushpull", "a", [a.ctypes.data], [o.ctypes.data], 2)
    b = np.ones(10, np.float32)
    outs = [np.zeros(10, np.float32), np.zeros(10, np.float32)]
    kv.pushpull("a", [a, b], outs)  # kv_pushpullv
    assert calls[-1] == ("pushpull", "a", [a.ctypes.data, b.ctypes.data],
                         [x.ctypes.data for x in outs], 0)
    assert (outs[1] == a + 1).all()

    kv.broadcast("a", a, o)
    assert calls[-1] == ("broadcast", "a", a.ctypes.data, o.ctypes.data, 0)
    assert (o.ravel() == a).all()

    h = kv.pushpull_async("a", a, o, priority=5)
    assert calls[-1] == ("pushpull", "a", [a.ctypes.data], [o.ctypes.data], 5)
    assert h.wait() is o
    kv.wait_all()

    kv.set_optimizer("sgd lr=0.1", momentum=0.9, nesterov=True)
    assert calls[-1] == ("set_optimizer", "sgd lr=0.1 momentum=0.9 nesterov=1")
    assert kv.is_capable("optimizer") is True and kv.is_capable("sparse") is False
    kv.save_optimizer_states("/tmp/x.states", dump_optimizer=True)
    assert calls[-1] == ("save", "/tmp/x.states", True)
    with pytest.raises(kvd.KVUnsupportedError):
        kv.load_optimizer_states("/tmp/x.states")
    with pytest.raises(kvd.KVIOError) as ei:
        kv.save_optimizer_states("/nonexistent/missing/x")
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    with pytest.raises(kvd.KVUnsupportedError):
        kv.set_stream(None)
    kv.close()
    assert calls[-1] == ("close",)


def test_every_code_maps_to_its_exception(rec):
    for code, cls in ALL_CODES.items():
        with pytest.raises(cls) as ei:
            rec.pushpull(f"code{code}", np.ones(2))
        assert ei.value.code == code and type(ei.value) is cls
        assert "pushpull on store 'recorder'" in str(ei.value)
        assert isinstance(ei.value.__cause__, kvd.KVError)


def test_python_exception_in_a_store_is_chained(rec):
    with pytest.raises(kvd.KVInvalidError) as ei:
        rec.pushpull("boom", np.ones(2))
    assert isinstance(ei.value.__cause__, ZeroDivisionError)
    assert "ZeroDivisionError: boom" in str(ei.value)
    assert "pushpull" in rec.last_error


def test_argument_errors(rec):
    kv = rec
    with pytest.raises(kvd.KVInvalidError, match="C-contiguous"):
        kv.pushpull("a", np.ones((4, 4))[:, ::2])
    with pytest.raises(kvd.KVInvalidError, match="numpy.ndarray"):
        kv.pushpull("a", [1.0, 2.0])  # a list of floats is not a list of arrays
    with pytest.raises(kvd.KVInvalidError, match="does not support"):
        kv.pushpull("a", np.ones(3, np.uint8))
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(kvd.KVInvalidError, match="read-only"):
        kv.pushpull("a", ro)
    kv.pushpull("a", ro, np.zeros(3))  # a read-only input is fine
    with pytest.raises(kvd.KVInvalidError, match="same size"):
        kv.pushpull("a", np.ones(3), np.zeros(4))
    with pytest.raises(kvd.KVInvalidError, match="same size and dtype"):
        kv.pushpull("a", [np.ones(3), np.ones(3, np.float32)])
    with pytest.raises(kvd.KVInvalidError, match="key"):
        kv.pushpull(1.5, np.ones(3))  # type: ignore[arg-type]
    with pytest.raises(kvd.KVInvalidError, match="NUL"):
        kv.pushpull("a\0b", np.ones(3))
    with pytest.raises(kvd.KVInvalidError, match="key names"):
        kv.pushpull("x" * 256, np.ones(3))  # libkv's own check
    with pytest.raises(kvd.KVInvalidError, match="count"):
        kv.pushpull("a", np.ones(0))
    with pytest.raises(kvd.KVInvalidError, match="unknown capability"):
        kv.is_capable("flying")
    with pytest.raises(kvd.KVInvalidError, match="2 values"):
        kv.pushpull(["a", "b"], [np.ones(3)])


def test_create_errors(tmp_path):
    with pytest.raises(kvd.KVInvalidError, match="no store type named"):
        kvd.create("no-such-type")
    with pytest.raises(kvd.KVInvalidError, match="job name"):
        kvd.create("local", job="bad name!")
    with pytest.raises(kvd.KVInvalidError, match="rank"):
        kvd.create("local", rank=3, num_workers=2)
    with pytest.raises(kvd.KVInvalidError):
        kvd.create("local", rank=-1)
    with pytest.raises(kvd.KVDaemonError):
        kvd.create("local", socket=str(tmp_path / "none.sock"), job="j", timeout_ms=200)
    try:  # no GPU here, or not implemented yet: KV_ERR_UNSUPPORTED
        kvd.create("device").close()
    except kvd.KVUnsupportedError:
        pass


# ---------------------------------------------------------------- register


def test_register_forms_and_replacement(capfd):
    @kvd.register(name="MiXed")
    class A:
        def pushpull(self, key, value, out, priority):
            out[...] = 1

    assert kvd.registered()["mixed"] is A
    with kvd.create("mixed") as kv:
        assert kv.type == "MiXed"
        x = np.zeros(3)
        kv.pushpull("k", x)
        assert x.tolist() == [1, 1, 1]
        with pytest.raises(kvd.KVUnsupportedError):  # no broadcast method
            kv.broadcast("k", x)
        assert kv.is_capable("optimizer") is False  # no is_capable method: 0
        assert kv.rank == 0 and kv.num_workers == 1
        with pytest.raises(kvd.KVUnsupportedError):
            kv.set_optimizer("sgd lr=1")

    class B:
        def __init__(self):  # no options argument: called without
            pass

        def pushpull(self, key, value, out, priority):
            out[...] = 2

    assert kvd.register(B, name="mixed") is B
    assert "replaces" in capfd.readouterr().err
    with kvd.create("MIXED") as kv:
        x = np.zeros(3)
        kv.pushpull("k", x)
        assert x.tolist() == [2, 2, 2]

    with pytest.raises(kvd.KVInvalidError):
        kvd.register(B, name="")

    class Failing:
        def __init__(self, options):
            raise RuntimeError("no")

    kvd.register(Failing)
    with pytest.raises(kvd.KVInvalidError, match="could not be created") as ei:
        kvd.create("failing")
    assert isinstance(ei.value.__cause__, RuntimeError)


def test_register_reaches_c_callers():
    """C code calling kv_create / kv_pushpullv reaches the Python store."""
    lib = ctypes.CDLL(kvd.library_path())
    st = ctypes.c_void_p()
    calls.clear()
    assert lib.kv_create(b"Recorder", None, ctypes.byref(st)) == 0
    assert calls[0][1] == kvd.Options()  # NULL options: every field from the environment
    a = np.ones(5, np.float64)
    b = np.full(5, 2.0)
    vals = (ctypes.c_void_p * 2)(a.ctypes.data, b.ctypes.data)
    lib.kv_pushpullv.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t,
                                 ctypes.c_int, ctypes.c_int]
    assert lib.kv_pushpullv(st, b"k", vals, 2, None, 0, 5, 1, 0) == 0
    assert a.tolist() == b.tolist() == [3.0] * 5
    lib.kv_close(st)
    assert calls[-1] == ("close",)


# ---------------------------------------------------------------- async lifetimes


def test_async_handle_keeps_arrays_alive():
    with kvd.create("teststore") as kv:
        a = np.ones(1000)
        ref = weakref.ref(a)
        h = kv.pushpull_async("k", a)
        del a
        gc.collect()
        assert ref() is not None  # held by the handle until it is waited for
        assert h.wait()[0] == 1.0
        assert h.done and "done" in repr(h)
        del h
        gc.collect()
        assert ref() is None

        b = np.ones(10)
        rb = weakref.ref(b)
        kv.pushpull_async("k2", b)  # the handle dropped at once: the store keeps it
        del b
        gc.collect()
        assert rb() is not None
        kv.wait_all()
        gc.collect()
        assert rb() is None


def test_async_wait_error_is_reported_again(rec):
    h = rec.pushpull_async(f"code{kvd.KV_ERR_PEER}", np.ones(3))
    for _ in range(2):
        with pytest.raises(kvd.KVPeerError):
            h.wait()
    h2 = rec.pushpull_async(f"code{kvd.KV_ERR_TIMEOUT}", np.ones(3))
    with pytest.raises(kvd.KVTimeoutError):
        rec.wait_all()
    with pytest.raises(kvd.KVTimeoutError):
        h2.wait()


def test_close_drops_unwaited_handles():
    kv = kvd.create("teststore")
    h = kv.pushpull_async("k", np.ones(3))
    kv.close()
    with pytest.raises(kvd.KVInvalidError, match="closed before"):
        h.wait()


# ---------------------------------------------------------------- the local store, 1 rank


def test_local_single_rank_every_call(kvd_daemon, job, tmp_path):
    with kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1,
                    timeout_ms=10000) as kv:
        assert (kv.type, kv.rank, kv.num_workers) == ("local", 0, 1)
        assert kv.is_capable("async") and kv.is_capable("zero_copy")
        assert kv.is_capable("priority")
        assert isinstance(kv.is_capable("optimizer"), bool)
        for dt in dtypes():
            a = np.arange(100).astype(dt)
            key = f"d-{np.dtype(dt).name}"
            kv.init(key, a)
            kv.pushpull(key, a)
            assert np.array_equal(a.astype(np.float64), np.arange(100))
        with pytest.raises(kvd.KVNoKeyError):
            kv.pushpull("never", np.ones(3))
        with pytest.raises(kvd.KVMismatchError):
            kv.pushpull("d-float32", np.ones(100))
        with pytest.raises(kvd.KVExistsError):
            kv.init("d-float32", np.ones(100, np.float32))
        with pytest.raises(kvd.KVUnsupportedError):
            kv.set_stream(None)
        m = kv.alloc(100, np.float32)
        m[:] = 3
        kv.pushpull("d-float32", m)
        assert m[0] == 3
        hs = [kv.pushpull_async("d-float32", np.full(100, i, np.float32)) for i in range(5)]
        assert [h.wait()[0] for h in hs] == [0, 1, 2, 3, 4]
        del m
        # last: an optimizer in the store applies to every key of the job
        if not kv.is_capable("optimizer"):  # passed through as the store says
            with pytest.raises(kvd.KVUnsupportedError):
                kv.set_optimizer("sgd lr=0.1")
            with pytest.raises(kvd.KVUnsupportedError):
                kv.save_optimizer_states("/tmp/never")
            with pytest.raises(kvd.KVUnsupportedError):
                kv.load_optimizer_states("/tmp/never")
        else:
            with pytest.raises(kvd.KVInvalidError, match="rmsprop"):
                kv.set_optimizer("rmsprop lr=0.1")
            with pytest.raises(kvd.KVInvalidError, match="lr=-1"):
                kv.set_optimizer("sgd", lr=-1)
            kv.set_optimizer("sgd", lr=0.5)
            w = np.ones(8, np.float32)
            kv.broadcast("opt-w", w)
            g = np.ones(8, np.float32)
            kv.pushpull("opt-w", g)  # the store applies sgd: w - 0.5 * g
            assert g.tolist() == [0.5] * 8
            path = os.path.join(tmp_path, "opt.states")
            kv.save_optimizer_states(path, dump_optimizer=True)
            kv.load_optimizer_states(path)
            with pytest.raises(kvd.KVIOError):
                kv.load_optimizer_states(os.path.join(tmp_path, "missing"))


def test_timeout_when_a_rank_never_comes(kvd_daemon, job):
    with kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=2,
                    timeout_ms=300) as kv:
        with pytest.raises(kvd.KVTimeoutError):
            kv.init("t", np.ones(4))


def test_rank_taken_is_exists(kvd_daemon, job):
    with kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=2):
        with pytest.raises(kvd.KVExistsError):
            kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=2)


def test_nomem_over_the_job_limit(job):
    d = Kvd("--max-job-bytes", "4M")
    try:
        with kvd.create("local", socket=d.sock, job=job, rank=0, num_workers=1,
                        timeout_ms=5000) as kv:
            with pytest.raises(kvd.KVNoMemError):
                kv.alloc(16 << 20, np.float32)
            # sizes whose sentence holds "0 bytes" (16814080 bytes ...) too
            for n in (4203520, 10 << 20, 5 << 20):
                with pytest.raises(kvd.KVNoMemError):
                    kv.alloc(n, np.float32)
            with pytest.raises(kvd.KVNoMemError, match="1 TiB"):
                kv.alloc(1 << 40, np.float32)
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_users_job_is_perm(kvd_daemon, job):
    os.chmod(os.path.dirname(kvd_daemon.sock), 0o755)
    os.chmod(kvd_daemon.sock, 0o777)
    with kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=2,
                    timeout_ms=5000):
        code = (
            "import os, kvd\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            f"    kvd.create('local', socket={kvd_daemon.sock!r}, job={job!r}, rank=1,"
            " num_workers=2, timeout_ms=2000)\n"
            "except kvd.KVError as e:\n"
            "    print(type(e).__name__, e.code)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=30)
    if "KVDaemonError" in r.stdout:
        pytest.skip("the other user cannot reach the socket here")
    assert r.stdout.split() == ["KVPermError", str(kvd.KV_ERR_PERM)], r.stdout + r.stderr


# ---------------------------------------------------------------- alloc lifetimes


def test_alloc_arrays_outlive_close_safely(kvd_daemon, job):
    kv = kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1)
    a = kv.alloc((4, 8), np.float64)
    assert a.shape == (4, 8) and a.dtype == np.float64 and a.flags.writeable
    a[:] = 1
    v = a[1:3]
    with pytest.warns(ResourceWarning, match="alive"):
        kv.close()
    assert kv.closed
    with pytest.raises(kvd.KVInvalidError, match="closed"):
        kv.pushpull("k", np.ones(3))
    # the mapping is still there: the arrays stay usable
    v[:] = 2
    assert a.sum() == 2 * 16 + 16
    # the rank is still taken while the arrays live...
    with pytest.raises(kvd.KVExistsError):
        kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1)
    del a
    gc.collect()
    assert kv._h.ptr is not None  # the view keeps the block
    del v
    gc.collect()
    assert kv._h.ptr is None  # kv_close ran: the job is left
    with kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1) as k2:
        b = k2.alloc(3, np.int32)
        del b  # freed at once (kv_free), the store stays open
        gc.collect()
        assert k2._h.live_allocs == 0 and not k2.closed


def test_store_dropped_without_close(kvd_daemon, job):
    kv = kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1)
    h = kv._h
    del kv
    gc.collect()
    assert h.ptr is None  # closed by its finalizer
    with kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1):
        pass


def test_forked_child_cannot_use_the_store(kvd_daemon, job):
    kv = kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1)
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:
        try:
            kv.pushpull("k", np.ones(3))
            msg = b"no error"
        except kvd.KVInvalidError as e:
            msg = b"KVInvalidError " + str(e).encode()
        except BaseException as e:  # noqa: BLE001
            msg = repr(e).encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    out = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    assert out.startswith("KVInvalidError") and "forked" in out, out
    a = np.ones(3)
    kv.init("k", a)
    kv.pushpull("k", a)  # the parent's store still works
    kv.close()


# ---------------------------------------------------------------- packaging


def test_pip_install_of_python_folder(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    import shutil

    target = tmp_path / "site"
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(ROOT / "python", src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target),
                        str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "kvd" / "py.typed").exists()
    code = ("import kvd, numpy as np\n"
            "print(kvd.__file__)\n"
            "kv = kvd.create('teststore'); a = np.ones(3); kv.pushpull('k', [a, a]); "
            "print(a.tolist())\n")
    env = dict(os.environ, PYTHONPATH=str(target),
               KVD_LIBRARY=str(ROOT / "build" / "lib" / "libkv.so"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1] == "[2.0, 2.0, 2.0]"
    # installed, without $KVD_LIBRARY and no libkv installed: a clear error
    env.pop("KVD_LIBRARY")
    env["LD_LIBRARY_PATH"] = ""
    r = subprocess.run([sys.executable, "-c", "import kvd; kvd.create('teststore')"],
                       env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    if r.returncode != 0:
        assert "libkv.so not found" in r.stderr and "KVD_LIBRARY" in r.stderr


def test_without_ml_dtypes_bfloat16_is_unsupported():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import numpy as np, kvd\n"
            "assert kvd.bfloat16 is None\n"
            "assert all(d.name != 'bfloat16' for d in kvd.supported_dtypes())\n"
            "kv = kvd.create('teststore')\n"
            "try:\n"
            "    kv.pushpull('k', np.zeros(4, np.dtype('V2')))\n"
            "except kvd.KVInvalidError as e:\n"
            "    print('refused:', e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "ml_dtypes" in r.stdout
