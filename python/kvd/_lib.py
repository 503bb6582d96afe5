"""Finding and loading ``libkv.so``, and the ctypes prototypes of ``include/kv.h``.

The library is looked up, in order:

1. ``$KVD_LIBRARY`` (a path to the shared object), if set;
2. ``build/lib/libkv.so`` of the source checkout this package lies in
   (``python/kvd`` -> ``../../build/lib``), so the package works straight
   from the tree after ``make``;
3. ``ctypes.util.find_library("kv")`` (the ld.so cache, ``LD_LIBRARY_PATH``);
4. the standard install paths (``/usr/local/lib``, ``/usr/lib``, the
   multiarch folders).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pathlib
import threading
from typing import List, Optional

__all__ = ["lib", "library_path", "KvOptions", "KvBackend", "find_library"]

# ---------------------------------------------------------------- C types


class KvOptions(ctypes.Structure):
    """``struct kv_options``."""

    _fields_ = [
        ("socket", ctypes.c_char_p),
        ("job", ctypes.c_char_p),
        ("rank", ctypes.c_int),
        ("num_workers", ctypes.c_int),
        ("device", ctypes.c_int),
        ("timeout_ms", ctypes.c_int),
    ]


c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_size_t = ctypes.c_size_t
c_dtype = ctypes.c_int  # kv_dtype is an enum: int-sized on the SysV ABI
c_ticket = ctypes.c_uint64
PtrArray = ctypes.POINTER(ctypes.c_void_p)
OptionsPtr = ctypes.POINTER(KvOptions)

# struct kv_backend's members
CreateFn = ctypes.CFUNCTYPE(c_int, OptionsPtr, ctypes.POINTER(c_void_p))
DestroyFn = ctypes.CFUNCTYPE(None, c_void_p)
IntFn = ctypes.CFUNCTYPE(c_int, c_void_p)
InitFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, c_void_p, c_size_t, c_dtype)
PushFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, c_void_p, c_size_t, c_dtype, c_int)
PullFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, c_void_p, c_size_t, c_dtype, c_int)
PushPullFn = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_char_p, PtrArray, c_int, PtrArray, c_int, c_size_t, c_dtype, c_int
)
BroadcastFn = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_char_p, c_void_p, PtrArray, c_int, c_size_t, c_dtype, c_int
)
StrFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p)
SaveFn = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, c_int)


class KvBackend(ctypes.Structure):
    """``struct kv_backend``; a NULL member makes that call KV_ERR_UNSUPPORTED."""

    _fields_ = [
        ("name", c_char_p),
        ("create", CreateFn),
        ("destroy", DestroyFn),
        ("rank", IntFn),
        ("num_workers", IntFn),
        ("init", InitFn),
        ("push", PushFn),
        ("pull", PullFn),
        ("pushpull", PushPullFn),
        ("broadcast", BroadcastFn),
        ("set_optimizer", StrFn),
        ("is_capable", StrFn),
        ("save_optimizer_states", SaveFn),
        ("load_optimizer_states", StrFn),
    ]


# ---------------------------------------------------------------- finding it


def _candidates() -> List[str]:
    out: List[str] = []
    env = os.environ.get("KVD_LIBRARY")
    if env:
        out.append(env)
    here = pathlib.Path(__file__).resolve().parent
    tree = here.parent.parent / "build" / "lib" / "libkv.so"
    out.append(str(tree))
    found = ctypes.util.find_library("kv")
    if found:
        out.append(found)
    for d in (
        "/usr/local/lib",
        "/usr/local/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ):
        for name in ("libkv.so.0", "libkv.so"):
            out.append(os.path.join(d, name))
    return out


def find_library() -> str:
    """Return the path of the ``libkv.so`` this package would load.

    Raises
    ------
    OSError
        When ``$KVD_LIBRARY`` names a missing file, or no candidate exists.
    """
    env = os.environ.get("KVD_LIBRARY")
    if env:
        if not os.path.exists(env):
            raise OSError(f"$KVD_LIBRARY is {env!r}, which does not exist")
        return env
    for c in _candidates():
        if os.path.isabs(c):
            if os.path.exists(c):
                return c
        else:  # a bare soname from find_library: the loader finds it
            return c
    raise OSError(
        "libkv.so not found: build it with `make` (build/lib/libkv.so in a source "
        "checkout), install it (make install), or set $KVD_LIBRARY to its path"
    )


# ---------------------------------------------------------------- loading

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
library_path: Optional[str] = None


def _prototype(l: ctypes.CDLL) -> None:
    def fn(name: str, restype, *argtypes) -> None:
        f = getattr(l, name)
        f.restype = restype
        f.argtypes = list(argtypes)

    S = c_void_p  # kv_store *
    fn("kv_options_default", None, OptionsPtr)
    fn("kv_create", c_int, c_char_p, OptionsPtr, ctypes.POINTER(c_void_p))
    fn("kv_close", c_int, S)
    fn("kv_type", c_char_p, S)
    fn("kv_rank", c_int, S)
    fn("kv_num_workers", c_int, S)
    fn("kv_strerror", c_char_p, c_int)
    fn("kv_last_error", c_char_p, S)
    fn("kv_init", c_int, S, c_char_p, c_void_p, c_size_t, c_dtype)
    fn("kv_push", c_int, S, c_char_p, c_void_p, c_size_t, c_dtype, c_int)
    fn("kv_pull", c_int, S, c_char_p, c_void_p, c_size_t, c_dtype, c_int)
    fn("kv_pushpull", c_int, S, c_char_p, c_void_p, c_void_p, c_size_t, c_dtype, c_int)
    fn("kv_pushpullv", c_int, S, c_char_p, PtrArray, c_int, PtrArray, c_int, c_size_t,
       c_dtype, c_int)
    fn("kv_broadcast", c_int, S, c_char_p, c_void_p, c_void_p, c_size_t, c_dtype, c_int)
    fn("kv_pushpull_async", c_int, S, c_char_p, c_void_p, c_void_p, c_size_t, c_dtype, c_int,
       ctypes.POINTER(c_ticket))
    fn("kv_wait", c_int, S, c_ticket)
    fn("kv_wait_all", c_int, S)
    fn("kv_alloc", c_void_p, S, c_size_t)
    fn("kv_free", None, S, c_void_p)
    fn("kv_set_stream", c_int, S, c_void_p)
    fn("kv_set_optimizer", c_int, S, c_char_p)
    fn("kv_is_capable", c_int, S, c_char_p)
    fn("kv_save_optimizer_states", c_int, S, c_char_p, c_int)
    fn("kv_load_optimizer_states", c_int, S, c_char_p)
    fn("kv_register", c_int, ctypes.POINTER(KvBackend))
    fn("kv_dtype_size", c_size_t, c_dtype)


def lib() -> ctypes.CDLL:
    """Load ``libkv.so`` once (see the module docstring for where it is looked up)."""
    global _lib, library_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = find_library()
            l = ctypes.CDLL(path)
            _prototype(l)
            library_path = path
            _lib = l
    return _lib
