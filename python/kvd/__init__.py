"""kvd: Python bindings for libkv, the client of the kvd gradient aggregation daemon.

>>> import numpy as np, kvd
>>> with kvd.create("local") as kv:          # job, rank, size from KVD_* (kvrun sets them)
...     g = np.ones(1000, np.float32)
...     kv.init("g", g)
...     kv.pushpull("g", g)                   # g = sum over ranks, in place, no copy
...     h = kv.pushpull_async("g", g); h.wait()

Every function of ``include/kv.h`` has a Python form here (see README.md);
errors raise :class:`KVError` subclasses named after the ``KV_ERR_*`` codes.
``kvd.mxnet`` (imported on its own) makes kvd an MXNet KVStore named ``kvd``.
"""

from __future__ import annotations

from . import _dtypes
from ._lib import find_library
from .backend import Options, register, registered
from .errors import (KV_ERR_DAEMON, KV_ERR_EXISTS, KV_ERR_INVALID, KV_ERR_IO, KV_ERR_MISMATCH,
                     KV_ERR_NOKEY, KV_ERR_NOMEM, KV_ERR_PEER, KV_ERR_PERM, KV_ERR_PROTO,
                     KV_ERR_TIMEOUT, KV_ERR_UNSUPPORTED, KV_OK, KVDaemonError, KVError,
                     KVExistsError, KVInvalidError, KVIOError, KVMismatchError, KVNoKeyError,
                     KVNoMemError, KVPeerError, KVPermError, KVProtoError, KVTimeoutError,
                     KVUnsupportedError, error_class)
from .store import CAPABILITIES, AsyncHandle, Store, create, dtype_size, strerror

__version__ = "0.1.0"

#: NumPy's bfloat16 dtype (from ``ml_dtypes``), or None when that package is
#: missing: bfloat16 arrays are then unsupported in Python.
bfloat16 = _dtypes.bfloat16
supported_dtypes = _dtypes.supported_dtypes


def library_path() -> str:
    """The path of the ``libkv.so`` in use (loading it if needed)."""
    from . import _lib

    _lib.lib()
    return _lib.library_path or ""


__all__ = [
    "create", "register", "registered", "Store", "AsyncHandle", "Options", "strerror",
    "dtype_size", "library_path", "find_library", "bfloat16", "supported_dtypes",
    "CAPABILITIES", "error_class",
    "KVError", "KVInvalidError", "KVNoKeyError", "KVMismatchError", "KVUnsupportedError",
    "KVPeerError", "KVDaemonError", "KVNoMemError", "KVPermError", "KVTimeoutError",
    "KVIOError", "KVProtoError", "KVExistsError",
    "KV_OK", "KV_ERR_INVALID", "KV_ERR_NOKEY", "KV_ERR_MISMATCH", "KV_ERR_UNSUPPORTED",
    "KV_ERR_PEER", "KV_ERR_DAEMON", "KV_ERR_NOMEM", "KV_ERR_PERM", "KV_ERR_TIMEOUT",
    "KV_ERR_IO", "KV_ERR_PROTO", "KV_ERR_EXISTS", "__version__",
]
