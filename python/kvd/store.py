"""The store object: a Pythonic layer over ``kv_store *`` and its ops."""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _dtypes
from ._lib import KvOptions, c_ticket, lib
from .errors import KV_ERR_INVALID, KV_ERR_NOMEM, KVError, KVInvalidError, KVNoMemError, error_class

__all__ = ["Store", "AsyncHandle", "create", "strerror", "dtype_size", "CAPABILITIES"]

#: The capability names ``kv_is_capable`` knows (any other is KV_ERR_INVALID).
CAPABILITIES = ("optimizer", "gradient_compression", "sparse", "async", "device", "priority",
                "zero_copy")

Key = Union[str, int, bytes]
Keys = Union[Key, List[Key], Tuple[Key, ...]]
ArrayOrList = Union[np.ndarray, List[np.ndarray], Tuple[np.ndarray, ...]]

# A Python exception raised inside a custom store's callback (kvd.register),
# kept per thread so the failing call can chain it (raise ... from exc).
_callback_exc = threading.local()


def _take_callback_exc() -> Optional[BaseException]:
    e = getattr(_callback_exc, "exc", None)
    if e is not None:
        _callback_exc.exc = None
    return e


def strerror(code: int) -> str:
    """``kv_strerror``: the name of a ``KV_ERR_*`` code as a phrase."""
    return lib().kv_strerror(int(code)).decode()


def dtype_size(dtype: Any) -> int:
    """``kv_dtype_size``: bytes per element of a supported NumPy dtype.

    Raises
    ------
    KVInvalidError
        For a dtype libkv does not know (or bfloat16 without ``ml_dtypes``).
    """
    t = _dtypes.to_kv(dtype)
    if t is None:
        raise KVInvalidError(f"dtype {dtype!r} is not supported by kvd", KV_ERR_INVALID)
    return int(lib().kv_dtype_size(t))


def _raise(rc: int, ptr: Optional[int]) -> None:
    msg = lib().kv_last_error(ptr)
    text = msg.decode(errors="replace") if msg else ""
    if not text:
        text = strerror(rc)
    cause = _take_callback_exc()
    if cause is not None:
        text = f"{text} ({type(cause).__name__}: {cause})"
    raise error_class(rc)(text, rc) from cause


def _key(key: Key) -> bytes:
    if isinstance(key, bool):
        raise KVInvalidError(f"a key is a str or an int, not {key!r}", KV_ERR_INVALID)
    if isinstance(key, int):
        b = str(key).encode()
    elif isinstance(key, str):
        b = key.encode("utf-8")
    elif isinstance(key, bytes):
        b = key
    else:
        raise KVInvalidError(f"a key is a str or an int, not {type(key).__name__}",
                             KV_ERR_INVALID)
    if b"\0" in b:
        raise KVInvalidError("a key may not contain NUL", KV_ERR_INVALID)
    return b


def _is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _buf(a: Any, what: str, write: bool) -> Tuple[int, int, int]:
    """(data pointer, element count, kv_dtype) of an array, checked; never copies."""
    if not isinstance(a, np.ndarray):
        raise KVInvalidError(
            f"{what} must be a numpy.ndarray (got {type(a).__name__}); kvd passes the "
            "array's own buffer and never copies", KV_ERR_INVALID)
    if not a.flags.c_contiguous:
        raise KVInvalidError(
            f"{what} is not C-contiguous (np.ascontiguousarray makes a copy that is)",
            KV_ERR_INVALID)
    if write and not a.flags.writeable:
        raise KVInvalidError(f"{what} is read-only", KV_ERR_INVALID)
    t = _dtypes.to_kv(a.dtype)
    if t is None:
        hint = ("; bfloat16 needs the ml_dtypes package" if a.dtype.name == "bfloat16"
                or (a.dtype.kind == "V" and a.dtype.itemsize == 2) else "")
        raise KVInvalidError(
            f"{what} has dtype {a.dtype}, which kvd does not support (float32, float64, "
            f"float16, bfloat16, int32, int64){hint}", KV_ERR_INVALID)
    return a.ctypes.data, a.size, t


def _same(ref: Tuple[int, int, int], other: Tuple[int, int, int], what: str) -> None:
    if ref[1] != other[1] or ref[2] != other[2]:
        raise KVInvalidError(
            f"{what}: every array of one key must have the same size and dtype "
            f"({ref[1]} x {_dtypes.to_numpy(ref[2])} vs {other[1]} x "
            f"{_dtypes.to_numpy(other[2])})", KV_ERR_INVALID)


def _ptrs(ps: Sequence[int]) -> "ctypes.Array[ctypes.c_void_p]":
    return (ctypes.c_void_p * len(ps))(*ps)


def _as_list(x: ArrayOrList) -> List[np.ndarray]:
    return list(x) if _is_list(x) else [x]  # type: ignore[list-item]


class _Handle:
    """The ``kv_store *`` and the state that must outlive a :class:`Store` object.

    Arrays made by :meth:`Store.alloc` and async ops in flight hold this
    (not the Store), so the mapping and the C store stay valid until the last
    of them is gone, whatever happens to the Store object.
    """

    def __init__(self, ptr: int) -> None:
        self.ptr: Optional[int] = ptr
        self.pid = os.getpid()
        # re-entrant: a garbage collection inside a locked region may free an
        # alloc() block, whose finalizer takes this lock again in this thread
        self.lock = threading.RLock()
        self.closing = False
        self.busy = 0
        self.live_allocs = 0
        self.pending: Dict[int, "AsyncHandle"] = {}

    # every call runs between enter() and leave()
    def enter(self) -> int:
        with self.lock:
            if self.closing or self.ptr is None:
                raise KVInvalidError("the store is closed", KV_ERR_INVALID)
            self.busy += 1
            ptr = self.ptr
        _callback_exc.exc = None
        return ptr

    def leave(self) -> None:
        with self.lock:
            self.busy -= 1
            ready = self._ready_to_close()
        if ready:
            self._kv_close()

    def _ready_to_close(self) -> bool:
        # with self.lock held
        return self.closing and self.ptr is not None and self.busy == 0 and \
            self.live_allocs == 0

    def close(self) -> bool:
        """Start closing; returns True when libkv's kv_close ran now."""
        with self.lock:
            if self.closing:
                return self.ptr is None
            self.closing = True
            ready = self._ready_to_close()
            deferred_allocs = self.live_allocs
            deferred_busy = self.busy
        if ready:
            self._kv_close()
            return True
        if deferred_allocs:
            warnings.warn(
                f"kvd: store closed while {deferred_allocs} array(s) from Store.alloc() are "
                "alive; it leaves its job (kv_close) once the last of them is garbage "
                "collected", ResourceWarning, stacklevel=3)
        elif deferred_busy:
            warnings.warn(
                f"kvd: store closed while {deferred_busy} call(s) on it are running in other "
                "threads; kv_close runs when they return", ResourceWarning, stacklevel=3)
        return False

    def _kv_close(self) -> None:
        with self.lock:
            ptr, self.ptr = self.ptr, None
            pending = list(self.pending.values())
            self.pending.clear()
        if ptr is None:
            return
        if os.getpid() == self.pid:  # a forked child leaves the parent's store alone
            lib().kv_close(ptr)
        for h in pending:
            h._abandon(KVInvalidError(
                "the store was closed before this async op was waited for", KV_ERR_INVALID))

    def free_block(self, p: int) -> None:
        with self.lock:
            if self.ptr is not None and os.getpid() == self.pid:
                lib().kv_free(self.ptr, p)
            self.live_allocs -= 1
            ready = self._ready_to_close()
        if ready:
            self._kv_close()


class _SharedBlock:
    """The owner of one kv_alloc block: NumPy arrays over it keep it as their base."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __init__(self, ptr: int, shape: Tuple[int, ...], dtype: np.dtype) -> None:
        self.__array_interface__ = {
            "shape": shape,
            "typestr": dtype.str,
            "descr": dtype.descr,
            "data": (ptr, False),
            "version": 3,
        }


class AsyncHandle:
    """An op in flight from :meth:`Store.pushpull_async`.

    The handle (through its store) keeps the arrays of the op alive until the
    op is waited for, by :meth:`wait` or :meth:`Store.wait_all`; dropping the
    handle early does not free them.
    """

    def __init__(self, h: _Handle, tickets: List[int], arrays: List[np.ndarray],
                 result: ArrayOrList) -> None:
        self._h = h
        self._tickets = tickets
        self._arrays: Optional[List[np.ndarray]] = arrays
        self._result = result
        self._lock = threading.Lock()
        self._done = False
        self._error: Optional[BaseException] = None

    @property
    def done(self) -> bool:
        """True once the op was waited for (by :meth:`wait` or ``wait_all``)."""
        return self._done

    def wait(self) -> ArrayOrList:
        """Wait for the op (``kv_wait``) and return its output array(s).

        Raises
        ------
        KVError
            The op's failure (e.g. :class:`KVPeerError`); raised again by a
            later call to ``wait`` on the same handle.
        """
        with self._lock:
            if not self._done:
                err: Optional[BaseException] = None
                for t in self._tickets:
                    try:
                        ptr = self._h.enter()
                    except KVError as e:
                        err = err or e
                        break
                    try:
                        rc = lib().kv_wait(ptr, t)
                        if rc < 0 and err is None:
                            try:
                                _raise(rc, ptr)
                            except KVError as e:
                                err = e
                    finally:
                        self._h.leave()
                self._finish(err)
            if self._error is not None:
                raise self._error
            return self._result

    def _finish(self, err: Optional[BaseException]) -> None:
        self._done = True
        self._error = err
        self._arrays = None
        with self._h.lock:
            self._h.pending.pop(id(self), None)

    def _abandon(self, err: BaseException) -> None:
        # called by wait_all / close: the C side no longer knows the tickets
        with self._lock:
            if not self._done:
                self._done = True
                self._error = err
                self._arrays = None

    def __repr__(self) -> str:
        return f"<kvd.AsyncHandle {'done' if self._done else 'in flight'}>"


class Store:
    """An open kvd store: one rank of a job (``kv_store *``).

    Made by :func:`kvd.create`. A context manager: ``with kvd.create() as kv:``
    closes it on exit. Methods take NumPy arrays (C-contiguous, of dtype
    float32, float64, float16, int32, int64, or bfloat16 from ``ml_dtypes``)
    and hand their buffers to libkv: nothing is copied in Python, except
    where a method's docstring says so. Keys are ``str`` or ``int``
    (``7`` is the key ``"7"``); a list of keys takes a list of values, one
    per key. A store may be used from several threads.
    """

    def __init__(self, ptr: int) -> None:
        self._h = _Handle(ptr)
        l = lib()
        self._type = (l.kv_type(ptr) or b"").decode()
        self._rank = int(l.kv_rank(ptr))
        self._num_workers = int(l.kv_num_workers(ptr))
        self._finalizer = weakref.finalize(self, self._h.close)

    # ------------------------------------------------------------ properties
    @property
    def type(self) -> str:
        """The store's type (``kv_type``): ``"local"``, ``"teststore"``, a custom name."""
        return self._type

    @property
    def rank(self) -> int:
        """This process's rank in the job (``kv_rank``)."""
        return self._rank

    @property
    def num_workers(self) -> int:
        """The number of ranks in the job (``kv_num_workers``)."""
        return self._num_workers

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (even when kv_close is deferred)."""
        return self._h.closing

    @property
    def last_error(self) -> str:
        """``kv_last_error``: a sentence about the last failure on this store."""
        with self._h.lock:
            ptr = self._h.ptr
            if ptr is None:
                return ""
            return (lib().kv_last_error(ptr) or b"").decode(errors="replace")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<kvd.Store type={self._type!r} rank={self._rank} "
                f"num_workers={self._num_workers} {state}>")

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Leave the job (``kv_close``); later calls raise :class:`KVInvalidError`.

        Closing twice is harmless. Async ops not yet waited for are dropped
        (their handles raise on ``wait``). When arrays from :meth:`alloc` are
        still alive, the shared memory they lie in must stay mapped: the store
        stops taking calls at once, but ``kv_close`` (leaving the job and
        unmapping) runs only when the last such array is garbage collected,
        and a ``ResourceWarning`` says so. The same holds for calls still
        running in other threads.
        """
        self._finalizer.detach()
        self._h.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ helpers
    def _call(self, fn_name: str, *args: Any) -> int:
        h = self._h
        ptr = h.enter()
        try:
            rc = getattr(lib(), fn_name)(ptr, *args)
            if rc < 0:
                _raise(rc, ptr)
            return rc
        finally:
            h.leave()

    def _per_key(self, method: Any, key: Sequence[Key], value: Any, out: Any,
                 priority: int, outname: str = "out") -> Any:
        if not _is_list(value) or len(value) != len(key):
            raise KVInvalidError(
                f"a list of {len(key)} keys needs a list of {len(key)} values",
                KV_ERR_INVALID)
        if out is not None and (not _is_list(out) or len(out) != len(key)):
            raise KVInvalidError(
                f"a list of {len(key)} keys needs a list of {len(key)} outputs",
                KV_ERR_INVALID)
        res = []
        for i, k in enumerate(key):
            res.append(method(k, value[i], None if out is None else out[i], priority))
        return res

    # ------------------------------------------------------------ ops
    def init(self, key: Keys, value: ArrayOrList) -> None:
        """Collective ``kv_init``: every rank inits each key once; rank 0's value is stored.

        Parameters
        ----------
        key : str, int, or list of them
            The key (a list: one value per key).
        value : numpy.ndarray
            Gives the key's size and dtype on every rank; only rank 0's content
            is read. A list for one key: its first array is used.

        Raises
        ------
        KVExistsError
            This rank already initialised the key.
        """
        if isinstance(key, (list, tuple)):
            if not _is_list(value) or len(value) != len(key):  # type: ignore[arg-type]
                raise KVInvalidError(
                    f"a list of {len(key)} keys needs a list of {len(key)} values",
                    KV_ERR_INVALID)
            for k, v in zip(key, value):  # type: ignore[arg-type]
                self.init(k, v)
            return
        v = _as_list(value)[0]
        p, n, t = _buf(v, "value", write=False)
        self._call("kv_init", _key(key), p, n, t)  # type: ignore[arg-type]

    def push(self, key: Keys, value: ArrayOrList,
             priority: int = 0) -> None:
        """``kv_push``: contribute ``value`` to the key's next round.

        Parameters
        ----------
        key : str, int, or list of them
        value : numpy.ndarray or list of numpy.ndarray
            Several arrays (local devices) for one key are summed in NumPy
            first, into a temporary array (kv.h has no multi-buffer push;
            :meth:`pushpull` does that in libkv without a copy).
        priority : int
            Ready rounds run highest priority first.
        """
        if isinstance(key, (list, tuple)):
            self._per_key(lambda k, v, o, pr: self.push(k, v, pr), key, value, None, priority)
            return
        vals = _as_list(value)
        if not vals:
            raise KVInvalidError("push: no value", KV_ERR_INVALID)
        p, n, t = _buf(vals[0], "value", write=False)
        keep = vals[0]
        if len(vals) > 1:
            for i, v in enumerate(vals[1:], 1):
                _same((p, n, t), _buf(v, f"value[{i}]", write=False), "push")
            acc_dt = np.float32 if vals[0].dtype.itemsize == 2 and \
                vals[0].dtype.kind != "i" else vals[0].dtype
            acc = np.array(vals[0], dtype=acc_dt, copy=True)
            for v in vals[1:]:
                acc += v.reshape(acc.shape).astype(acc_dt, copy=False)
            keep = np.ascontiguousarray(acc.astype(vals[0].dtype, copy=False))
            p = keep.ctypes.data
        self._call("kv_push", _key(key), p, n, t, int(priority))
        del keep

    def pull(self, key: Keys, out: ArrayOrList,
             priority: int = 0) -> ArrayOrList:
        """``kv_pull``: the key's value, once this rank's earlier pushes are applied.

        Parameters
        ----------
        out : numpy.ndarray or list of numpy.ndarray
            Receives the value (each array of a list, one ``kv_pull`` each).

        Returns
        -------
        The ``out`` argument.
        """
        if isinstance(key, (list, tuple)):
            return self._per_key(lambda k, v, o, pr: self.pull(k, v, pr), key, out, None,
                                 priority)
        k = _key(key)
        for i, o in enumerate(_as_list(out)):
            p, n, t = _buf(o, f"out[{i}]" if _is_list(out) else "out", write=True)
            self._call("kv_pull", k, p, n, t, int(priority))
        return out

    def pushpull(self, key: Keys, value: ArrayOrList,
                 out: Optional[ArrayOrList] = None, priority: int = 0) -> ArrayOrList:
        """Contribute ``value`` and receive the sum over all ranks (``kv_pushpull``).

        Parameters
        ----------
        key : str, int, or list of them
            A list of keys takes lists of values (and outs), one per key.
        value : numpy.ndarray or list of numpy.ndarray
            Several arrays (local devices): their sum joins the round
            (``kv_pushpullv``, at most 16).
        out : numpy.ndarray or list of numpy.ndarray, optional
            Receives the result; None: written back to ``value`` (every array
            of the list). ``out`` may be ``value``.
        priority : int

        Returns
        -------
        ``out``, or ``value`` when ``out`` is None.
        """
        if isinstance(key, (list, tuple)):
            if (_is_list(value) and len(value) == len(key)
                    and not any(_is_list(v) for v in value)
                    and (out is None or (_is_list(out) and len(out) == len(key)
                                         and not any(_is_list(o) for o in out)))):
                # one array per key: all in flight at once, so ranks may list
                # the keys in different orders (as with the C async calls)
                return self.pushpull_async(key, value, out, priority).wait()
            return self._per_key(self.pushpull, key, value, out, priority)
        k = _key(key)
        vals = _as_list(value)
        if not vals:
            raise KVInvalidError("pushpull: no value", KV_ERR_INVALID)
        vb = [_buf(v, f"value[{i}]" if _is_list(value) else "value", write=out is None)
              for i, v in enumerate(vals)]
        outs = vals if out is None else _as_list(out)
        ob = vb if out is None else [_buf(o, f"out[{i}]" if _is_list(out) else "out",
                                          write=True) for i, o in enumerate(outs)]
        for b in vb[1:] + ob:
            _same(vb[0], b, "pushpull")
        n, t = vb[0][1], vb[0][2]
        if len(vb) == 1 and len(ob) == 1:
            self._call("kv_pushpull", k, vb[0][0], ob[0][0], n, t, int(priority))
        else:
            vp = _ptrs([b[0] for b in vb])
            op = _ptrs([b[0] for b in ob])
            self._call("kv_pushpullv", k, vp, len(vb), op, len(ob), n, t, int(priority))
        return value if out is None else out

    def broadcast(self, key: Keys, value: Optional[ArrayOrList],
                  out: Optional[ArrayOrList] = None, priority: int = 0) -> ArrayOrList:
        """Hand rank 0's ``value`` to every rank and store it (``kv_broadcast``).

        The key is created if needed; an existing key of the same size and
        dtype takes the new value.

        Parameters
        ----------
        value : numpy.ndarray or None
            Read on rank 0 only; other ranks may pass None when ``out`` is given.
            A list for one key: its first array is used.
        out : numpy.ndarray or list of numpy.ndarray, optional
            Receives the value on every rank; None: written to ``value``.
            For a list, libkv fills the first array and the others are copied
            from it with ``numpy.copyto`` (kv.h's broadcast has one output).

        Returns
        -------
        ``out``, or ``value`` when ``out`` is None.
        """
        if isinstance(key, (list, tuple)):
            if value is None:
                value = [None] * len(key)  # type: ignore[list-item]
            return self._per_key(self.broadcast, key, value, out, priority)
        k = _key(key)
        v = _as_list(value)[0] if value is not None else None
        if out is None:
            if v is None:
                raise KVInvalidError("broadcast needs a value or an out", KV_ERR_INVALID)
            outs = [v]
        else:
            outs = _as_list(out)
        if not outs:
            raise KVInvalidError("broadcast: no out", KV_ERR_INVALID)
        ob = _buf(outs[0], "out", write=True)
        vp = None
        if v is not None:
            vb = _buf(v, "value", write=False)
            _same(ob, vb, "broadcast")
            vp = vb[0]
        for i, o in enumerate(outs[1:], 1):
            _same(ob, _buf(o, f"out[{i}]", write=True), "broadcast")
        self._call("kv_broadcast", k, vp, ob[0], ob[1], ob[2], int(priority))
        for o in outs[1:]:
            if o.ctypes.data != ob[0]:
                np.copyto(o, outs[0].reshape(o.shape))
        return value if out is None else out  # type: ignore[return-value]

    def pushpull_async(self, key: Keys, value: ArrayOrList,
                       out: Optional[ArrayOrList] = None, priority: int = 0) -> AsyncHandle:
        """Start a pushpull and return at once (``kv_pushpull_async``).

        Parameters
        ----------
        key : str, int, or list of them
        value : numpy.ndarray (a list of them, one per key, for a list of keys)
        out : like ``value``, optional (None: the result goes to ``value``)

        Returns
        -------
        AsyncHandle
            ``handle.wait()`` waits and returns ``out`` (or ``value``). The
            arrays stay referenced, and must not be touched, until then.
        """
        keys: List[Key] = list(key) if isinstance(key, (list, tuple)) else [key]
        vals: List[Any] = list(value) if _is_list(key) else [value]  # type: ignore[arg-type]
        outs: List[Any] = ((list(out) if _is_list(key) else [out])  # type: ignore[arg-type]
                           if out is not None else [None] * len(keys))
        if len(vals) != len(keys) or len(outs) != len(keys):
            raise KVInvalidError(
                f"a list of {len(keys)} keys needs as many values and outs", KV_ERR_INVALID)
        prepared = []
        arrays: List[np.ndarray] = []
        for k, v, o in zip(keys, vals, outs):
            vb = _buf(v, "value", write=o is None)
            ob = vb if o is None else _buf(o, "out", write=True)
            _same(vb, ob, "pushpull_async")
            prepared.append((_key(k), vb, ob))
            arrays.append(v)
            if o is not None:
                arrays.append(o)
        h = self._h
        tickets: List[int] = []
        handle = AsyncHandle(h, tickets, arrays, value if out is None else out)
        ptr = h.enter()
        try:
            with h.lock:
                h.pending[id(handle)] = handle
            l = lib()
            for kb, vb, ob in prepared:
                tk = c_ticket(0)
                rc = l.kv_pushpull_async(ptr, kb, vb[0], ob[0], vb[1], vb[2], int(priority),
                                         ctypes.byref(tk))
                if rc < 0:
                    # wait for those already started, then report this failure
                    for t in tickets:
                        l.kv_wait(ptr, t)
                    with h.lock:
                        h.pending.pop(id(handle), None)
                    _raise(rc, ptr)
                tickets.append(int(tk.value))
        finally:
            h.leave()
        return handle

    def wait_all(self) -> None:
        """``kv_wait_all``: wait for every async op of this store.

        Every :class:`AsyncHandle` of the store is then done; should one op
        have failed, this raises the first failure, and so does each handle's
        ``wait()`` (libkv does not say which op it was).
        """
        h = self._h
        ptr = h.enter()
        err: Optional[KVError] = None
        try:
            with h.lock:
                pending = list(h.pending.values())
            rc = lib().kv_wait_all(ptr)
            if rc < 0:
                try:
                    _raise(rc, ptr)
                except KVError as e:
                    err = e
            for a in pending:
                with a._lock:
                    if not a._done:
                        a._finish(err)
        finally:
            h.leave()
        if err is not None:
            raise err

    # ------------------------------------------------------------ memory
    def alloc(self, shape: Union[int, Sequence[int]], dtype: Any = np.float32) -> np.ndarray:
        """A NumPy array in the store's shared memory (``kv_alloc``): zero-copy ops.

        An op whose array comes from here moves no bytes in this process. The
        content starts undefined, as with ``numpy.empty``.

        Lifetime: the block is given back (``kv_free``) when the array and
        every view of it are garbage collected. The array keeps the store's
        mapping alive: :meth:`close` on a store with such arrays alive stops
        the store at once but defers ``kv_close`` (leaving the job, unmapping)
        until the last of them is gone, so an array never points at unmapped
        memory.

        Raises
        ------
        KVNoMemError
            No shared memory left (or over a limit).
        """
        dt = np.dtype(dtype)
        if _dtypes.to_kv(dt) is None:
            raise KVInvalidError(f"dtype {dt} is not supported by kvd", KV_ERR_INVALID)
        shp = (int(shape),) if isinstance(shape, (int, np.integer)) else \
            tuple(int(s) for s in shape)
        if any(s < 0 for s in shp):
            raise KVInvalidError(f"negative dimension in {shp}", KV_ERR_INVALID)
        nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
        h = self._h
        ptr = h.enter()
        try:
            p = lib().kv_alloc(ptr, max(nbytes, 1))
            if not p:
                # kv_alloc returns NULL without a code: the sentence tells which
                msg = (lib().kv_last_error(ptr) or b"").decode(errors="replace")
                # the two sentences of KV_ERR_INVALID (libclient/store.c)
                if msg == "kv_alloc: 0 bytes" or "a forked child cannot use it" in msg:
                    raise KVInvalidError(msg, KV_ERR_INVALID)
                raise KVNoMemError(msg or "kv_alloc failed", KV_ERR_NOMEM)
            with h.lock:
                h.live_allocs += 1
        finally:
            h.leave()
        block = _SharedBlock(p, shp, dt)
        fin = weakref.finalize(block, h.free_block, p)
        fin.atexit = False  # at exit the process is going away: leave the mapping be
        return np.asarray(block)

    def set_stream(self, cuda_stream: Optional[int]) -> None:
        """``kv_set_stream``: order ops on device memory after a CUDA stream (a handle)."""
        self._call("kv_set_stream", ctypes.c_void_p(cuda_stream or None))

    # ------------------------------------------------------------ optimizer
    def set_optimizer(self, spec: str, **params: float) -> None:
        """``kv_set_optimizer``: let the store apply an optimizer on pushpull.

        Parameters
        ----------
        spec : str
            ``"sgd lr=0.1 momentum=0.9 wd=1e-4"``: a name, then ``param=value``
            words (see the README's optimizer section). Keyword arguments are
            appended as more words:
            ``set_optimizer("adam", lr=1e-3, beta1=0.9)``.

        Raises
        ------
        KVUnsupportedError
            The store has no optimizer (``is_capable("optimizer")`` is False).
        KVInvalidError
            A bad spec; the message names the offending word.
        """
        words = [spec.strip()] + [f"{k}={_num(v)}" for k, v in params.items()]
        self._call("kv_set_optimizer", " ".join(words).encode())

    def is_capable(self, capability: str) -> bool:
        """``kv_is_capable``: whether the store supports ``capability``.

        Parameters
        ----------
        capability : str
            One of :data:`CAPABILITIES`.

        Raises
        ------
        KVInvalidError
            For any other name.
        """
        h = self._h
        ptr = h.enter()
        try:
            rc = lib().kv_is_capable(ptr, str(capability).encode())
        finally:
            h.leave()
        if rc < 0:
            raise KVInvalidError(
                f"unknown capability {capability!r} (known: {', '.join(CAPABILITIES)})", rc)
        return bool(rc)

    def save_optimizer_states(self, path: Union[str, "os.PathLike[str]"],
                              dump_optimizer: bool = False) -> None:
        """``kv_save_optimizer_states``: write the job's optimizer state to ``path``."""
        self._call("kv_save_optimizer_states", os.fsencode(path), int(bool(dump_optimizer)))

    def load_optimizer_states(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """``kv_load_optimizer_states``: read the job's optimizer state from ``path``."""
        self._call("kv_load_optimizer_states", os.fsencode(path))


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def create(type: str = "local", socket: Optional[Union[str, "os.PathLike[str]"]] = None,
           job: Optional[str] = None, rank: Optional[int] = None,
           num_workers: Optional[int] = None, device: Optional[int] = None,
           timeout_ms: Optional[int] = None) -> Store:
    """Open a store (``kv_create``): join a job as one rank.

    Parameters
    ----------
    type : str
        ``"local"`` (kvd), ``"teststore"`` (in process), or a type registered
        with :func:`kvd.register` (or from C with ``kv_register``).
    socket, job, rank, num_workers, device, timeout_ms
        ``struct kv_options``; None takes the environment (``KVD_SOCKET``,
        ``KVD_JOB``, ``KVD_RANK``, ``KVD_NUM_WORKERS``, ``KVD_DEVICE``,
        ``KVD_TIMEOUT_MS``, which ``kvrun`` sets), else libkv's default.
        ``timeout_ms`` bounds every wait (None or 0: the environment, else no
        limit).

    Returns
    -------
    Store
        Once kvd has accepted this rank into its job.

    Raises
    ------
    KVDaemonError
        No kvd answers on the socket.
    KVInvalidError
        An unknown type, a bad job name, a rank outside ``0..num_workers-1``.
    KVExistsError
        The rank is taken.
    """
    l = lib()
    o = KvOptions()
    l.kv_options_default(ctypes.byref(o))
    if socket is not None:
        o.socket = os.fsencode(socket)
    if job is not None:
        o.job = str(job).encode()
    if rank is not None:
        if rank < 0:
            raise KVInvalidError(f"rank {rank} is negative", KV_ERR_INVALID)
        o.rank = int(rank)
    if num_workers is not None:
        if num_workers < 1:
            raise KVInvalidError(f"num_workers {num_workers} is not positive", KV_ERR_INVALID)
        o.num_workers = int(num_workers)
    if device is not None:
        if device < 0:
            raise KVInvalidError(f"device {device} is negative", KV_ERR_INVALID)
        o.device = int(device)
    if timeout_ms is not None:
        if timeout_ms < 0:
            raise KVInvalidError(f"timeout_ms {timeout_ms} is negative", KV_ERR_INVALID)
        o.timeout_ms = int(timeout_ms)
    out = ctypes.c_void_p()
    _callback_exc.exc = None
    rc = l.kv_create(str(type).encode(), ctypes.byref(o), ctypes.byref(out))
    if rc < 0:
        _raise(rc, None)
    if not out.value:
        raise KVError("kv_create returned no store", KV_ERR_INVALID)
    return Store(out.value)
