"""NumPy dtypes <-> ``kv_dtype``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["KV_FLOAT32", "KV_FLOAT64", "KV_FLOAT16", "KV_BFLOAT16", "KV_INT32", "KV_INT64",
           "bfloat16", "to_kv", "to_numpy", "supported_dtypes"]

KV_FLOAT32, KV_FLOAT64, KV_FLOAT16, KV_BFLOAT16, KV_INT32, KV_INT64 = range(6)

#: NumPy's bfloat16 from ``ml_dtypes`` when it is installed, else None
#: (``kvd`` then cannot pass bfloat16 arrays; every other dtype works).
bfloat16: Optional[Any]
try:  # pragma: no cover - depends on the environment
    import ml_dtypes as _ml_dtypes

    bfloat16 = np.dtype(_ml_dtypes.bfloat16)
except Exception:  # noqa: BLE001 - any import problem means "not available"
    bfloat16 = None

_TO_KV: Dict[np.dtype, int] = {
    np.dtype(np.float32): KV_FLOAT32,
    np.dtype(np.float64): KV_FLOAT64,
    np.dtype(np.float16): KV_FLOAT16,
    np.dtype(np.int32): KV_INT32,
    np.dtype(np.int64): KV_INT64,
}
if bfloat16 is not None:
    _TO_KV[bfloat16] = KV_BFLOAT16

_TO_NP: Dict[int, np.dtype] = {v: k for k, v in _TO_KV.items()}


def supported_dtypes() -> List[np.dtype]:
    """The NumPy dtypes this binding can pass to libkv."""
    return list(_TO_KV)


def to_kv(dt: Any) -> Optional[int]:
    """The ``kv_dtype`` of a NumPy dtype (native byte order), or None."""
    try:
        d = np.dtype(dt)
    except TypeError:
        return None
    if not d.isnative:
        return None
    return _TO_KV.get(d)


def to_numpy(t: int) -> np.dtype:
    """The NumPy dtype of a ``kv_dtype`` value.

    Raises
    ------
    KeyError
        For ``KV_BFLOAT16`` without ``ml_dtypes``, or an unknown value.
    """
    return _TO_NP[t]
