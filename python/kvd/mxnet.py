"""kvd as an MXNet KVStore: ``mx.kv.create('kvd')``, ``gluon.Trainer(..., kvstore='kvd')``.

Importing this module registers :class:`KVD` with MXNet (``KVStoreBase.register``)
under the name ``kvd``. Start one process per worker with kvrun::

    build/bin/kvrun -n 4 python train.py

and in ``train.py``::

    import mxnet as mx, kvd.mxnet
    trainer = mx.gluon.Trainer(net.collect_params(), "sgd", {...}, kvstore="kvd")

Each :class:`KVD` opens one libkv store (``kvd.create``) with the job, rank
and size from the ``KVD_*`` environment (``$KVD_STORE_TYPE`` picks the store
type, ``local`` by default). The N-th KVD made in a process (N = 0, 1, ...)
joins the job ``$KVD_JOB`` for N = 0 and ``$KVD_JOB.N`` after that, so two
Trainers keep their keys apart and a store that is closed is never rejoined:
every rank must create its KVD stores in the same order (as identical
trainer scripts do).

Data: a CPU NDArray's own memory is handed to libkv (``MXNDArrayGetData``
after ``wait_to_read`` for inputs, ``MXNDArrayWaitToWrite`` for outputs):
nothing is copied in Python. Arrays on other devices (GPU) go through a host
copy: ``asnumpy()`` in, a copy back out -- until kvd takes device memory.

``update_on_kvstore``: :meth:`KVD.is_capable` answers ``'optimizer'`` from the
C store. When the store cannot apply the optimizer (``local`` today), MXNet's
Trainer applies it locally after ``pushpull``; when it can, the Trainer hands
its optimizer to :meth:`KVD.set_optimizer`, which translates SGD (momentum),
NAG, Adam and AdamW into kvd's spec (and sends it again when the learning
rate or ``rescale_grad`` changes); any other optimizer raises
:class:`kvd.KVUnsupportedError`.

MXNet 1.x creates no KVStore at all for a kvstore *name* when a process has
one device and the name lacks ``dist``; importing this module therefore
teaches ``mxnet.model._create_kvstore`` (as used by ``gluon.Trainer`` and
``Module``) that ``'kvd'`` always means a :class:`KVD`, whatever the
number of local devices. Passing an instance (``kvstore=mx.kv.create('kvd')``)
works without that.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import weakref
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

import mxnet as mx
from mxnet.base import _LIB, check_call
from mxnet.kvstore import KVStoreBase

from . import _dtypes
from .errors import KV_ERR_INVALID, KV_ERR_UNSUPPORTED, KVInvalidError, KVUnsupportedError
from .store import Store, create

__all__ = ["KVD", "optimizer_spec", "open_stores", "broadcast_parameters"]

_CPU_TYPES = ("cpu", "cpu_pinned", "cpu_shared")
_count = itertools.count()
_count_lock = threading.Lock()
_last: Optional["weakref.ReferenceType[KVD]"] = None
_open: "weakref.WeakSet[KVD]" = weakref.WeakSet()


def open_stores() -> List["KVD"]:
    """The :class:`KVD` objects of this process that are still open."""
    return [k for k in list(_open) if not k._store.closed]


def _job_name(n: int) -> str:
    base = os.environ.get("KVD_JOB") or "default"
    if n == 0:
        return base
    suffix = f".{n}"
    return base[: 128 - len(suffix)] + suffix


# ---------------------------------------------------------------- NDArray <-> NumPy


def _np_dtype(nd: Any) -> np.dtype:
    dt = np.dtype(nd.dtype)
    if dt.names == ("bfloat16",):  # MXNet's bfloat16 marker dtype
        if _dtypes.bfloat16 is None:
            raise KVUnsupportedError("bfloat16 NDArrays need the ml_dtypes package",
                                     KV_ERR_UNSUPPORTED)
        return _dtypes.bfloat16
    return dt


class _View:
    """A NumPy array over an NDArray's memory (CPU), or a host copy (other devices)."""

    __slots__ = ("nd", "arr", "copy")

    def __init__(self, nd: Any, write: bool, read: bool = True) -> None:
        if not isinstance(nd, mx.nd.NDArray):
            raise KVInvalidError(f"expected an NDArray, got {type(nd).__name__}",
                                 KV_ERR_INVALID)
        if getattr(nd, "stype", "default") != "default":
            raise KVUnsupportedError(f"kvd handles dense NDArrays only, not {nd.stype}",
                                     KV_ERR_UNSUPPORTED)
        self.nd = nd
        dt = _np_dtype(nd)
        if nd.context.device_type in _CPU_TYPES:
            if write:
                check_call(_LIB.MXNDArrayWaitToWrite(nd.handle))
            else:
                nd.wait_to_read()
            p = ctypes.c_void_p()
            check_call(_LIB.MXNDArrayGetData(nd.handle, ctypes.byref(p)))
            n = int(np.prod(nd.shape, dtype=np.int64))
            if not p.value or n == 0:
                raise KVInvalidError("empty NDArray", KV_ERR_INVALID)
            self.arr = np.frombuffer((ctypes.c_char * (n * dt.itemsize)).from_address(p.value),
                                     dtype=dt, count=n)  # type: ignore[call-overload]
            self.copy = False
        else:
            # device memory: a host copy (unavoidable until kvd takes device pointers)
            if read:
                host = nd.asnumpy()
                if host.dtype != dt:
                    host = host.view(dt)
                self.arr = np.ascontiguousarray(host).reshape(-1)
            else:
                self.arr = np.empty(int(np.prod(nd.shape, dtype=np.int64)), dtype=dt)
            self.copy = True

    def write_back(self) -> None:
        if self.copy:
            self.nd[:] = mx.nd.array(self.arr.reshape(self.nd.shape), ctx=mx.cpu(),
                                     dtype=self.nd.dtype)


def _views(x: Any, write: bool, read: bool = True) -> List[_View]:
    if isinstance(x, (list, tuple)):
        seen: dict = {}
        out = []
        for nd in x:  # the same NDArray twice: one view (one wait, one copy)
            v = seen.get(id(nd))
            if v is None:
                v = seen[id(nd)] = _View(nd, write, read)
            out.append(v)
        return out
    return [_View(x, write, read)]


def _key(k: Any) -> Union[int, str]:
    if isinstance(k, bool) or not isinstance(k, (int, str, np.integer)):
        raise KVInvalidError(f"a key is an int or a str, not {type(k).__name__}",
                             KV_ERR_INVALID)
    return int(k) if isinstance(k, np.integer) else k


def _write_back(views: Sequence[_View]) -> None:
    done = set()
    for v in views:
        if id(v) not in done:
            v.write_back()
            done.add(id(v))


# ---------------------------------------------------------------- optimizer


def optimizer_spec(opt: Any, indices: Optional[Sequence[Any]] = None) -> str:
    """kvd's optimizer spec for an ``mx.optimizer.Optimizer``.

    SGD (also ccSGD) with its momentum, NAG as ``sgd ... nesterov=1``, Adam,
    and an optimizer class named ``AdamW`` (MXNet 1.9 has none built in;
    GluonNLP's, say) map to ``sgd`` / ``adam`` / ``adamw`` with ``lr``,
    ``wd``, ``rescale_grad``, ``clip_gradient`` (when set and positive),
    ``momentum``, ``beta1``, ``beta2``, ``epsilon``. The learning rate is the
    optimizer's current one (its ``lr_scheduler`` at ``num_update``).

    Raises
    ------
    KVUnsupportedError
        Another optimizer, or per-parameter ``lr_mult`` / ``wd_mult`` other
        than 1 (kvd's optimizer is one for the whole job).
    """
    name = type(opt).__name__.lower()
    opt_mod = mx.optimizer
    words: List[Tuple[str, Any]] = []
    kind = None
    if type(opt) in (opt_mod.SGD, getattr(opt_mod, "ccSGD", opt_mod.SGD)):
        kind = "sgd"
        words.append(("momentum", float(getattr(opt, "momentum", 0.0) or 0.0)))
    elif type(opt) is opt_mod.NAG:
        kind = "sgd"
        words.append(("momentum", float(getattr(opt, "momentum", 0.0) or 0.0)))
        words.append(("nesterov", 1))
    elif type(opt) is opt_mod.Adam or name == "adamw":
        kind = "adam" if type(opt) is opt_mod.Adam else "adamw"
        words += [("beta1", float(opt.beta1)), ("beta2", float(opt.beta2)),
                  ("epsilon", float(opt.epsilon))]
    if kind is None:
        raise KVUnsupportedError(
            f"kvd's store applies sgd (momentum), nag, adam and adamw; optimizer "
            f"'{name}' is not among them: set update_on_kvstore=False so that MXNet "
            "applies it after pushpull", KV_ERR_UNSUPPORTED)
    # per-parameter multipliers cannot be expressed: one optimizer per job
    for idx in (indices if indices is not None else list(opt.param_dict)):
        p = opt.param_dict.get(idx)
        lm = getattr(p, "lr_mult", None) if p is not None else opt.lr_mult.get(idx, 1.0)
        wm = getattr(p, "wd_mult", None) if p is not None else opt.wd_mult.get(idx, 1.0)
        if (lm is not None and lm != 1.0) or (wm is not None and wm != 1.0):
            raise KVUnsupportedError(
                f"parameter {idx} has lr_mult={lm}, wd_mult={wm}: kvd's store optimizer "
                "is one for the whole job; set update_on_kvstore=False", KV_ERR_UNSUPPORTED)
    for d in (opt.lr_mult, opt.wd_mult):
        for k, v in d.items():
            if v != 1.0:
                raise KVUnsupportedError(
                    f"{k}: a multiplier of {v} cannot be applied by kvd's store optimizer; "
                    "set update_on_kvstore=False", KV_ERR_UNSUPPORTED)
    head = [("lr", float(opt.learning_rate)), ("wd", float(opt.wd)),
            ("rescale_grad", float(opt.rescale_grad))]
    clip = getattr(opt, "clip_gradient", None)
    if clip is not None and float(clip) > 0:
        head.append(("clip_gradient", float(clip)))
    return " ".join([kind] + [f"{k}={_num(v)}" for k, v in head + words])


def _num(v: Any) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


# ---------------------------------------------------------------- the store


class _HybridCapable:
    """``is_capable`` on an instance asks its store; on the class (MXNet's tests
    call ``type(kv).is_capable(...)``) it asks the KVD made last in this process."""

    def __get__(self, obj: Optional["KVD"], cls: type) -> Any:
        if obj is not None:
            return obj._is_capable

        def on_class(capability: str) -> bool:
            last = _last() if _last is not None else None
            if last is None or last._store.closed:
                raise KVInvalidError(
                    "KVD.is_capable on the class needs a KVD store open in this process "
                    "(mx.kv.create('kvd'))", KV_ERR_INVALID)
            return last._is_capable(capability)

        return on_class


@KVStoreBase.register
class KVD(KVStoreBase):
    """MXNet KVStore over kvd (registered as ``kvd``).

    Parameters
    ----------
    store : kvd.Store, optional
        Use this store instead of opening one (then it is not closed by
        :meth:`close` unless ``own=True``).
    """

    def __init__(self, store: Optional[Store] = None, own: bool = False) -> None:
        global _last
        if store is None:
            with _count_lock:
                n = next(_count)
            store = create(os.environ.get("KVD_STORE_TYPE") or "local", job=_job_name(n))
            own = True
        self._store = store
        self._own = own
        self._optimizer: Any = None
        self._spec: Optional[str] = None
        self._updater: Any = None
        _last = weakref.ref(self)
        _open.add(self)

    # ------------------------------------------------------------ properties
    @property
    def store(self) -> Store:
        """The :class:`kvd.Store` under this KVStore."""
        return self._store

    @property
    def type(self) -> str:
        """``'kvd'`` (the C store's own type is ``self.store.type``)."""
        return "kvd"

    @property
    def rank(self) -> int:
        return self._store.rank

    @property
    def num_workers(self) -> int:
        return self._store.num_workers

    def close(self) -> None:
        """Close the store (leave its job); also done when the KVD is garbage collected."""
        if self._own:
            self._store.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------ ops
    def init(self, key: Any, value: Any) -> None:
        """Collective init; rank 0's value is stored (a list of keys: one value each)."""
        if isinstance(key, (list, tuple)):
            for k, v in zip(key, value):
                self.init(k, v)
            return
        v = _views(value, write=False)[0]
        self._store.init(_key(key), v.arr)

    def broadcast(self, key: Any, value: Any, out: Any, priority: int = 0) -> None:
        """Rank 0's ``value`` to ``out`` (an NDArray or a list) on every rank; stored."""
        if isinstance(key, (list, tuple)):
            if not isinstance(value, (list, tuple)) or len(value) != len(key) or \
                    not isinstance(out, (list, tuple)) or len(out) != len(key):
                raise KVInvalidError("a list of keys needs a value and an out per key",
                                     KV_ERR_INVALID)
            for k, v, o in zip(key, value, out):
                self.broadcast(k, v, o, priority)
            return
        vals = value if isinstance(value, (list, tuple)) else [value]
        outs = _views(out, write=True, read=False)
        vv = None
        if self._store.rank == 0:
            # the value may be one of the outs (Trainer: broadcast(i, d[0], d))
            match = [o for o in outs if o.nd is vals[0]]
            vv = match[0] if match else _View(vals[0], write=False)
            if match and vv.copy:
                vv.arr[...] = vals[0].asnumpy().reshape(-1).view(vv.arr.dtype)
        self._store.broadcast(_key(key), None if vv is None else vv.arr,
                              [o.arr for o in outs], priority)
        _write_back(outs)

    def pushpull(self, key: Any, value: Any, out: Any = None, priority: int = 0) -> None:
        """Sum ``value`` (an NDArray or a list: local devices) over all ranks into ``out``.

        ``out`` None: the sum is written to every array of ``value``. With an
        optimizer set on the store, ``value`` are gradients and ``out`` the
        weights after the store applied the optimizer. A list of keys takes a
        value (and an out) per key; as in MXNet, every key's push reads its
        values as they were before the first key's result is written, so
        where an NDArray written for one key is read for a later one, the
        later key's inputs are copied first (in NumPy; only then).
        """
        if not isinstance(key, (list, tuple)):
            self._pushpull_one(key, value, out, priority, None)
            return
        if not isinstance(value, (list, tuple)) or len(value) != len(key):
            raise KVInvalidError("a list of keys needs a value per key", KV_ERR_INVALID)
        if out is not None and (not isinstance(out, (list, tuple)) or len(out) != len(key)):
            raise KVInvalidError("a list of keys needs an out per key", KV_ERR_INVALID)
        written: set = set()
        snaps: List[Optional[List[np.ndarray]]] = []
        for i in range(len(key)):
            vals = value[i] if isinstance(value[i], (list, tuple)) else [value[i]]
            outs = vals if out is None else \
                (out[i] if isinstance(out[i], (list, tuple)) else [out[i]])
            if any(id(v) in written for v in vals):
                snaps.append([np.array(v.arr) for v in _views(vals, write=False)])
            else:
                snaps.append(None)
            written |= {id(o) for o in outs}
        for i, k in enumerate(key):
            self._pushpull_one(k, value[i], None if out is None else out[i], priority,
                               snaps[i])

    def _pushpull_one(self, key: Any, value: Any, out: Any, priority: int,
                      snap: Optional[List[np.ndarray]]) -> None:
        self._sync_optimizer(key)
        if out is None:
            vals = _views(value, write=True, read=snap is None)
            if snap is not None:
                self._store.pushpull(_key(key), snap, [v.arr for v in vals], priority)
            else:
                self._store.pushpull(_key(key), [v.arr for v in vals], None, priority)
            _write_back(vals)
            return
        outs = _views(out, write=True, read=False)
        if snap is not None:
            self._store.pushpull(_key(key), snap, [o.arr for o in outs], priority)
        else:
            vals = _views(value, write=False)
            if any(v.copy for v in vals):  # host copies: an out that is a value shares it
                by_nd = {id(v.nd): v for v in vals}
                outs = [by_nd.get(id(o.nd), o) for o in outs]
            self._store.pushpull(_key(key), [v.arr for v in vals], [o.arr for o in outs],
                                 priority)
        _write_back(outs)

    def push(self, key: Any, value: Any, priority: int = 0) -> None:
        """Contribute ``value`` (several arrays are summed first, in NumPy)."""
        if isinstance(key, (list, tuple)):
            for k, v in zip(key, value):
                self.push(k, v, priority)
            return
        self._sync_optimizer(key)
        vals = _views(value, write=False)
        self._store.push(_key(key), [v.arr for v in vals], priority)

    def pull(self, key: Any, out: Any = None, priority: int = 0,
             ignore_sparse: bool = True) -> None:
        """The key's value into ``out`` (an NDArray or a list)."""
        if isinstance(key, (list, tuple)):
            for k, o in zip(key, out):
                self.pull(k, o, priority, ignore_sparse)
            return
        outs = _views(out, write=True, read=False)
        self._store.pull(_key(key), [o.arr for o in outs], priority)
        _write_back(outs)

    # ------------------------------------------------------------ optimizer
    is_capable = _HybridCapable()

    def _is_capable(self, capability: str) -> bool:
        return self._store.is_capable(str(capability).lower())

    def set_optimizer(self, optimizer: Any) -> None:
        """Let the store apply ``optimizer`` (an ``mx.optimizer.Optimizer``) on pushpull.

        Raises
        ------
        KVUnsupportedError
            The store cannot apply an optimizer (``is_capable('optimizer')`` is
            False), or kvd has no such optimizer (see :func:`optimizer_spec`).
        """
        spec = optimizer_spec(optimizer)
        self._store.set_optimizer(spec)
        self._optimizer = optimizer
        self._spec = spec
        self._updater = mx.optimizer.get_updater(optimizer)

    def _sync_optimizer(self, key: Any) -> None:
        opt = self._optimizer
        if opt is None:
            return
        if isinstance(key, (int, np.integer)):
            opt._update_count(int(key))  # lr schedules and Adam's step follow MXNet's count
        spec = optimizer_spec(opt, indices=[])
        if spec != self._spec:
            self._store.set_optimizer(spec)  # same optimizer: kvd keeps per-key states
            self._spec = spec

    def save_optimizer_states(self, fname: str, dump_optimizer: bool = False) -> None:
        """Write the store's optimizer state (``kv_save_optimizer_states``)."""
        self._store.save_optimizer_states(fname, dump_optimizer)

    def load_optimizer_states(self, fname: str) -> None:
        """Read the store's optimizer state (``kv_load_optimizer_states``)."""
        self._store.load_optimizer_states(fname)

    def set_gradient_compression(self, compression_params: Any) -> None:
        """Not supported by kvd."""
        raise KVUnsupportedError("kvd does not compress gradients", KV_ERR_UNSUPPORTED)


# ---------------------------------------------------------------- Trainer / Module


def broadcast_parameters(trainer: Any) -> None:
    """Give every rank rank 0's parameters now, before the first forward pass.

    ``gluon.Trainer`` creates its KVStore, and broadcasts rank 0's weights,
    only in its first ``step()``: after the first batch's gradients were
    computed with each rank's own initial weights. Ranks that initialise
    from one seed need nothing; otherwise call this once after the
    parameters are initialised (and their shapes known). Uses the Trainer's
    own (private) ``_init_kvstore`` / ``_init_params`` of MXNet 1.x.
    """
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()




def _patch_create_kvstore() -> None:
    import mxnet.model as model

    orig = model._create_kvstore  # type: ignore[attr-defined]
    if getattr(orig, "_kvd_patched", False):
        return

    def _create_kvstore(kvstore: Any, num_device: int, arg_params: Any) -> Any:
        if isinstance(kvstore, str) and kvstore.lower() == "kvd":
            kv = mx.kv.create("kvd")
            update = bool(int(os.getenv("MXNET_UPDATE_ON_KVSTORE", "1")))
            return kv, update and kv.is_capable(KVStoreBase.OPTIMIZER)
        return orig(kvstore, num_device, arg_params)

    _create_kvstore._kvd_patched = True  # type: ignore[attr-defined]
    model._create_kvstore = _create_kvstore  # type: ignore[attr-defined]
    for modname in ("mxnet.gluon.trainer", "mxnet.module.module"):
        try:
            m = __import__(modname, fromlist=["_create_kvstore"])
        except ImportError:  # pragma: no cover
            continue
        if getattr(m, "_create_kvstore", None) is orig:
            setattr(m, "_create_kvstore", _create_kvstore)


_patch_create_kvstore()
