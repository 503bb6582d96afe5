"""Exceptions: one :class:`KVError` subclass per ``KV_ERR_*`` code of ``kv.h``."""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "KV_OK", "KV_ERR_INVALID", "KV_ERR_NOKEY", "KV_ERR_MISMATCH", "KV_ERR_UNSUPPORTED",
    "KV_ERR_PEER", "KV_ERR_DAEMON", "KV_ERR_NOMEM", "KV_ERR_PERM", "KV_ERR_TIMEOUT",
    "KV_ERR_IO", "KV_ERR_PROTO", "KV_ERR_EXISTS",
    "KVError", "KVInvalidError", "KVNoKeyError", "KVMismatchError", "KVUnsupportedError",
    "KVPeerError", "KVDaemonError", "KVNoMemError", "KVPermError", "KVTimeoutError",
    "KVIOError", "KVProtoError", "KVExistsError", "error_class",
]

KV_OK = 0
KV_ERR_INVALID = -1
KV_ERR_NOKEY = -2
KV_ERR_MISMATCH = -3
KV_ERR_UNSUPPORTED = -4
KV_ERR_PEER = -5
KV_ERR_DAEMON = -6
KV_ERR_NOMEM = -7
KV_ERR_PERM = -8
KV_ERR_TIMEOUT = -9
KV_ERR_IO = -10
KV_ERR_PROTO = -11
KV_ERR_EXISTS = -12


class KVError(RuntimeError):
    """A libkv call failed.

    Attributes
    ----------
    code : int
        The negative ``KV_ERR_*`` code the call returned.
    message : str
        ``kv_last_error``'s sentence about the failure (or the binding's own,
        for an argument refused before reaching libkv).
    """

    code: int = 0

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __reduce__(self):  # picklable across multiprocessing
        return (_rebuild, (self.code, self.message))


def _rebuild(code: int, message: str) -> "KVError":
    return error_class(code)(message, code)


class KVInvalidError(KVError, ValueError):
    """``KV_ERR_INVALID``: a bad argument (also a ``ValueError``)."""

    code = KV_ERR_INVALID


class KVNoKeyError(KVError):
    """``KV_ERR_NOKEY``: the key was never initialised."""

    code = KV_ERR_NOKEY


class KVMismatchError(KVError):
    """``KV_ERR_MISMATCH``: count, dtype or op differ from the key's / rank 0's."""

    code = KV_ERR_MISMATCH


class KVUnsupportedError(KVError, NotImplementedError):
    """``KV_ERR_UNSUPPORTED``: not available in this store (also ``NotImplementedError``)."""

    code = KV_ERR_UNSUPPORTED


class KVPeerError(KVError):
    """``KV_ERR_PEER``: another rank left or died while the op needed it."""

    code = KV_ERR_PEER


class KVDaemonError(KVError):
    """``KV_ERR_DAEMON``: kvd is not running, or stopped."""

    code = KV_ERR_DAEMON


class KVNoMemError(KVError):
    """``KV_ERR_NOMEM``: out of memory or over a limit."""

    code = KV_ERR_NOMEM


class KVPermError(KVError):
    """``KV_ERR_PERM``: the job belongs to another user."""

    code = KV_ERR_PERM


class KVTimeoutError(KVError):
    """``KV_ERR_TIMEOUT``: the op did not complete within ``timeout_ms``."""

    code = KV_ERR_TIMEOUT


class KVIOError(KVError):
    """``KV_ERR_IO``: an input/output error (checkpoint files)."""

    code = KV_ERR_IO


class KVProtoError(KVError):
    """``KV_ERR_PROTO``: kvd and libkv disagree."""

    code = KV_ERR_PROTO


class KVExistsError(KVError):
    """``KV_ERR_EXISTS``: a second init of a key by one rank, or a rank already taken."""

    code = KV_ERR_EXISTS


_BY_CODE: Dict[int, Type[KVError]] = {
    c.code: c
    for c in (
        KVInvalidError, KVNoKeyError, KVMismatchError, KVUnsupportedError, KVPeerError,
        KVDaemonError, KVNoMemError, KVPermError, KVTimeoutError, KVIOError, KVProtoError,
        KVExistsError,
    )
}


def error_class(code: int) -> Type[KVError]:
    """The exception class for a ``KV_ERR_*`` code (:class:`KVError` for an unknown one)."""
    return _BY_CODE.get(code, KVError)
