"""Custom stores written in Python, registered with libkv's C registry.

:func:`register` mirrors MXNet's ``KVStoreBase.register``: the class is
registered under a name (its own name in lower case unless given), and then
``kvd.create(name)`` -- or C code calling ``kv_create(name, ...)`` in this
process -- creates an instance and routes the ops to its methods through a
``struct kv_backend`` of ctypes callbacks.

The methods a class may define (every one optional; a missing one makes
that call ``KV_ERR_UNSUPPORTED``)::

    __init__(self, options: kvd.Options)   # or __init__(self) without arguments
    rank, num_workers                       # int attributes, properties or methods
    init(self, key, value)
    push(self, key, value, priority)
    pull(self, key, out, priority)
    pushpull(self, key, value, out, priority)
    broadcast(self, key, value, out, priority)
    set_optimizer(self, spec)
    is_capable(self, capability) -> bool
    save_optimizer_states(self, path, dump_optimizer)
    load_optimizer_states(self, path)
    close(self)                             # kv_close (struct kv_backend's destroy)

``key`` is a ``str``; arrays are NumPy arrays over the caller's memory
(inputs read-only), valid only during the call: copy what must be kept.
``pushpull`` gets one array, or a list when the caller passed several
(``value``: the local buffers, ``out``: the outputs; ``out`` may alias
``value``); ``broadcast`` gets ``value=None`` on ranks other than 0 and
``out`` as one array. Raising reports a failure: a :class:`kvd.KVError`
gives its own code, ``NotImplementedError`` ``KV_ERR_UNSUPPORTED``,
``KeyError`` ``KV_ERR_NOKEY``, ``MemoryError`` ``KV_ERR_NOMEM``,
``TimeoutError`` ``KV_ERR_TIMEOUT``, ``PermissionError`` ``KV_ERR_PERM``,
another ``OSError`` ``KV_ERR_IO``, anything else ``KV_ERR_INVALID``; the
caller's :class:`kvd.KVError` then chains the original exception.
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import itertools
import threading
import traceback
from typing import Any, Callable, Dict, List, Optional, TypeVar

import numpy as np

from . import _dtypes
from . import _lib as L
from .errors import (KV_ERR_INVALID, KV_ERR_IO, KV_ERR_NOKEY, KV_ERR_NOMEM, KV_ERR_PERM,
                     KV_ERR_TIMEOUT, KV_ERR_UNSUPPORTED, KV_OK, KVError, KVInvalidError)
from .store import _callback_exc

__all__ = ["register", "Options"]

T = TypeVar("T", bound=type)


@dataclasses.dataclass(frozen=True)
class Options:
    """``struct kv_options`` as the caller of ``kv_create`` gave it.

    None means "from the environment" (``KVD_*``): a custom store resolves
    those itself if it cares.
    """

    socket: Optional[str] = None
    job: Optional[str] = None
    rank: Optional[int] = None
    num_workers: Optional[int] = None
    device: Optional[int] = None
    timeout_ms: Optional[int] = None

    @classmethod
    def _from_c(cls, p: Any) -> "Options":
        if not p:
            return cls()
        o = p.contents
        return cls(
            socket=o.socket.decode(errors="surrogateescape") if o.socket else None,
            job=o.job.decode(errors="surrogateescape") if o.job else None,
            rank=o.rank if o.rank >= 0 else None,
            num_workers=o.num_workers if o.num_workers > 0 else None,
            device=o.device if o.device >= 0 else None,
            timeout_ms=o.timeout_ms if o.timeout_ms > 0 else None,
        )


def _code_of(e: BaseException) -> int:
    if isinstance(e, KVError):
        return e.code if e.code < 0 else KV_ERR_INVALID
    if isinstance(e, NotImplementedError):
        return KV_ERR_UNSUPPORTED
    if isinstance(e, KeyError):
        return KV_ERR_NOKEY
    if isinstance(e, MemoryError):
        return KV_ERR_NOMEM
    if isinstance(e, TimeoutError):
        return KV_ERR_TIMEOUT
    if isinstance(e, PermissionError):
        return KV_ERR_PERM
    if isinstance(e, OSError):
        return KV_ERR_IO
    return KV_ERR_INVALID


def _array(ptr: Optional[int], count: int, t: int, readonly: bool) -> Optional[np.ndarray]:
    if not ptr:
        return None
    dt = _dtypes.to_numpy(t)  # KeyError (bfloat16 without ml_dtypes): KV_ERR_NOKEY...
    nbytes = count * dt.itemsize
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    a = np.frombuffer(buf, dtype=dt, count=count)  # type: ignore[call-overload]
    if readonly:
        a.flags.writeable = False
    return a


def _dtype_ok(t: int) -> bool:
    try:
        _dtypes.to_numpy(t)
        return True
    except KeyError:
        return False


def _attr_int(obj: Any, name: str, default: int) -> int:
    v = getattr(obj, name, default)
    if callable(v):
        v = v()
    return int(v)


class _Registration:
    """A registered class, its callbacks (kept alive here) and its instances."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls = cls
        self.name = name
        self.name_b = name.encode()
        self.instances: Dict[int, Any] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.struct = L.KvBackend()
        self.struct.name = self.name_b
        self.callbacks: List[Any] = []

        def has(m: str) -> bool:
            return callable(getattr(cls, m, None))

        def put(field: str, ctype: Any, fn: Callable[..., Any]) -> None:
            cb = ctype(fn)
            self.callbacks.append(cb)
            setattr(self.struct, field, cb)

        put("create", L.CreateFn, self._create)
        put("destroy", L.DestroyFn, self._destroy)
        put("rank", L.IntFn, lambda s: self._int(s, "rank", 0))
        put("num_workers", L.IntFn, lambda s: self._int(s, "num_workers", 1))
        if has("init"):
            put("init", L.InitFn, self._init)
        if has("push"):
            put("push", L.PushFn, self._push)
        if has("pull"):
            put("pull", L.PullFn, self._pull)
        if has("pushpull"):
            put("pushpull", L.PushPullFn, self._pushpull)
        if has("broadcast"):
            put("broadcast", L.BroadcastFn, self._broadcast)
        if has("set_optimizer"):
            put("set_optimizer", L.StrFn,
                lambda s, spec: self._run(s, "set_optimizer", spec.decode()))
        if has("is_capable"):
            put("is_capable", L.StrFn, self._is_capable)
        if has("save_optimizer_states"):
            put("save_optimizer_states", L.SaveFn,
                lambda s, p, d: self._run(s, "save_optimizer_states",
                                          p.decode(errors="surrogateescape"), bool(d)))
        if has("load_optimizer_states"):
            put("load_optimizer_states", L.StrFn,
                lambda s, p: self._run(s, "load_optimizer_states",
                                       p.decode(errors="surrogateescape")))

    # ------------------------------------------------------------ plumbing
    def _inst(self, state: Optional[int]) -> Any:
        with self.lock:
            return self.instances[state or 0]

    @staticmethod
    def _fail(e: BaseException) -> int:
        _callback_exc.exc = e
        return _code_of(e)

    def _run(self, state: Optional[int], method: str, *args: Any) -> int:
        try:
            getattr(self._inst(state), method)(*args)
            return KV_OK
        except BaseException as e:  # noqa: BLE001 - never let one cross into C
            return self._fail(e)

    def _int(self, state: Optional[int], name: str, default: int) -> int:
        try:
            return _attr_int(self._inst(state), name, default)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            return default

    def _construct(self, opts: Options) -> Any:
        cls = self.cls
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            return cls()
        params = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        if params or "options" in sig.parameters:
            return cls(opts)
        return cls()

    # ------------------------------------------------------------ callbacks
    def _create(self, o: Any, state: Any) -> int:
        try:
            inst = self._construct(Options._from_c(o))
            with self.lock:
                i = next(self.ids)
                self.instances[i] = inst
            state[0] = i
            return KV_OK
        except BaseException as e:  # noqa: BLE001
            return self._fail(e)

    def _destroy(self, state: Optional[int]) -> None:
        try:
            with self.lock:
                inst = self.instances.pop(state or 0, None)
            close = getattr(inst, "close", None)
            if callable(close):
                close()
        except BaseException:  # noqa: BLE001 - destroy cannot report
            traceback.print_exc()

    def _init(self, s: Optional[int], key: bytes, value: Optional[int], count: int,
              t: int) -> int:
        if not _dtype_ok(t):
            return KV_ERR_UNSUPPORTED
        return self._run(s, "init", key.decode(errors="surrogateescape"),
                         _array(value, count, t, True))

    def _push(self, s: Optional[int], key: bytes, value: int, count: int, t: int,
              priority: int) -> int:
        if not _dtype_ok(t):
            return KV_ERR_UNSUPPORTED
        return self._run(s, "push", key.decode(errors="surrogateescape"),
                         _array(value, count, t, True), priority)

    def _pull(self, s: Optional[int], key: bytes, out: int, count: int, t: int,
              priority: int) -> int:
        if not _dtype_ok(t):
            return KV_ERR_UNSUPPORTED
        return self._run(s, "pull", key.decode(errors="surrogateescape"),
                         _array(out, count, t, False), priority)

    def _pushpull(self, s: Optional[int], key: bytes, values: Any, nvalues: int, outs: Any,
                  nouts: int, count: int, t: int, priority: int) -> int:
        if not _dtype_ok(t):
            return KV_ERR_UNSUPPORTED
        vptrs = [values[i] for i in range(nvalues)]
        optrs = [outs[i] for i in range(nouts)] if outs and nouts > 0 else vptrs
        # an input that is also an output is passed writable, as the same array
        made: Dict[int, np.ndarray] = {}

        def arr(p: int, ro: bool) -> np.ndarray:
            if p in made:
                return made[p]
            a = _array(p, count, t, ro and p not in optrs)
            made[p] = a  # type: ignore[assignment]
            return a  # type: ignore[return-value]

        va = [arr(p, True) for p in vptrs]
        oa = [arr(p, False) for p in optrs]
        return self._run(s, "pushpull", key.decode(errors="surrogateescape"),
                         va[0] if len(va) == 1 else va, oa[0] if len(oa) == 1 else oa,
                         priority)

    def _broadcast(self, s: Optional[int], key: bytes, value: Optional[int], outs: Any,
                   nouts: int, count: int, t: int, priority: int) -> int:
        if not _dtype_ok(t):
            return KV_ERR_UNSUPPORTED
        optrs = [outs[i] for i in range(nouts)]
        oa = [_array(p, count, t, False) for p in optrs]
        va = None
        if value:
            va = oa[optrs.index(value)] if value in optrs else _array(value, count, t, True)
        return self._run(s, "broadcast", key.decode(errors="surrogateescape"), va,
                         oa[0] if len(oa) == 1 else oa, priority)

    def _is_capable(self, s: Optional[int], cap: bytes) -> int:
        try:
            return 1 if self._inst(s).is_capable(cap.decode()) else 0
        except BaseException:  # noqa: BLE001 - "not capable"
            return 0


_registry: Dict[str, _Registration] = {}
_all: List[_Registration] = []  # every registration ever: open stores may still use it
_reg_lock = threading.Lock()


def register(cls: Optional[T] = None, *, name: Optional[str] = None) -> Any:
    """Register a Python class as a kvd store type (``kv_register``).

    Usable as ``kvd.register(MyStore)``, as the decorator ``@kvd.register``,
    or as ``@kvd.register(name="mystore")``. The name defaults to the class's
    name in lower case, as with MXNet's ``KVStoreBase.register``; names match
    case-insensitively, and registering a name again replaces the earlier
    type (libkv prints a warning). See the module docstring for the methods.

    Returns
    -------
    The class, unchanged.

    Raises
    ------
    KVInvalidError
        An empty name or one of 64 bytes or more.
    """

    def do(c: T) -> T:
        if not isinstance(c, type):
            raise KVInvalidError(f"register() takes a class, not {c!r}", KV_ERR_INVALID)
        n = name if name is not None else c.__name__.lower()
        if not n or len(n.encode()) >= 64:
            raise KVInvalidError(f"a store type's name is 1 to 63 bytes: {n!r}",
                                 KV_ERR_INVALID)
        reg = _Registration(c, n)
        with _reg_lock:
            rc = L.lib().kv_register(ctypes.byref(reg.struct))
            if rc < 0:
                msg = (L.lib().kv_last_error(None) or b"").decode(errors="replace")
                from .errors import error_class
                raise error_class(rc)(msg or "kv_register failed", rc)
            _registry[n.lower()] = reg
            _all.append(reg)
        return c

    if cls is None:
        return do
    return do(cls)


def registered() -> Dict[str, type]:
    """The classes registered from Python in this process, by lower-case name."""
    with _reg_lock:
        return {k: r.cls for k, r in _registry.items()}
