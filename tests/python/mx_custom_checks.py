"""MXNet's custom-KVStore checks (tests/python/unittest/test_kvstore_custom.py of
MXNet 1.9) through ``mx.kv.create('kvd')``, for one rank of a kvrun job.

Every rank runs the same checks; values are scaled by the number of ranks
(a pushpull sums over the ranks as well as over the local arrays). Exits
non-zero (an AssertionError) on the first failure; prints "ok" on rank 0.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import mxnet as mx

import kvd
import kvd.mxnet

shape = (4, 4)
keys = [5, 7, 11]
str_keys = ["b", "c", "d"]
NW = int(os.environ.get("KVD_NUM_WORKERS", "1"))
RANK = int(os.environ.get("KVD_RANK", "0"))


def check_diff_to_scalar(A, x):
    assert np.sum(np.abs((A - x).asnumpy())) == 0, (A, x)


def init_kv():
    return mx.kv.create("kvd")


def test_broadcast_single_kv_pair():
    def check_single_kv_pair(kv, key):
        ones = mx.nd.ones(shape)
        out = mx.nd.empty(shape)
        kv.broadcast(key, ones * (RANK + 1), out)  # rank 0's value wins
        check_diff_to_scalar(out, 1)
        out_list = [mx.nd.empty(shape)] * 3
        key_list = key + key
        kv.broadcast(key_list, ones, out_list)
        for o in out_list:
            check_diff_to_scalar(o, 1)
        distinct = [mx.nd.empty(shape) for _ in range(3)]
        kv.broadcast(key_list, ones * (RANK + 5), distinct)
        for o in distinct:
            check_diff_to_scalar(o, 5)

    check_single_kv_pair(init_kv(), 3)
    check_single_kv_pair(init_kv(), "a")


def test_broadcast_list_kv_pair():
    def check_list_kv_pair(kv, key):
        ones = [mx.nd.ones(shape)] * len(key)
        out = [mx.nd.empty(shape)] * len(key)
        kv.broadcast(key, ones, out)
        for o in out:
            check_diff_to_scalar(o, 1)
        out_list = [[mx.nd.empty(shape)] * 2 for _ in range(len(key))]
        key_list = [k + k for k in key]
        kv.broadcast(key_list, ones, out_list)
        for o in out_list:
            for oo in o:
                check_diff_to_scalar(oo, 1)

    check_list_kv_pair(init_kv(), keys)
    check_list_kv_pair(init_kv(), str_keys)


def _aggregator(kv, key, key_list=None, inplace=True):
    kv.broadcast(key, mx.nd.zeros(shape), out=mx.nd.empty(shape))
    num_devs = 4
    devs = [mx.Context("cpu", i) for i in range(num_devs)]
    vals = [mx.nd.ones(shape, d) for d in devs]
    outs = [mx.nd.empty(shape, d) for d in devs]
    kv.pushpull(key, vals, out=outs)
    for out in outs:
        check_diff_to_scalar(out, num_devs * NW)
    if inplace:
        kv.pushpull(key, vals)
        for val in vals:
            check_diff_to_scalar(val, num_devs * NW)
    if key_list is None:
        return
    num_keys = len(key_list)
    kv.broadcast(key_list, [mx.nd.zeros(shape)] * num_keys,
                 out=[mx.nd.empty(shape)] * num_keys)
    vals = [[mx.nd.ones(shape, d) * 2.0 for d in devs]] * num_keys
    outs = [[mx.nd.empty(shape, d) for d in devs]] * num_keys
    kv.pushpull(key_list, vals, out=outs)
    for out in outs:
        for o in out:
            check_diff_to_scalar(o, num_devs * 2.0 * NW)
    if inplace:
        # the same list for every key, in place (as MXNet's test has it): as in
        # MXNet, every key's push reads the values from before the first pull
        kv.pushpull(key_list, vals)
        for val in vals:
            for v in val:
                check_diff_to_scalar(v, num_devs * 2.0 * NW)


def test_pushpull_single_kv_pair():
    _aggregator(init_kv(), 3, keys)
    _aggregator(init_kv(), "a", str_keys)


def test_pushpull_list_kv_pair():
    _aggregator(init_kv(), 3, keys, inplace=False)
    _aggregator(init_kv(), "a", str_keys, inplace=False)


def test_custom_store():
    kv = mx.kv.create("kvd")
    out = mx.nd.empty((1,))
    kv.broadcast(1, mx.nd.ones((1,)), out=out)
    check_diff_to_scalar(out, 1)
    capable = kv.store.is_capable("optimizer")
    assert type(kv).is_capable("optimizer") == capable
    assert kv.is_capable("optimizer") == capable
    assert kv.is_capable("OPTIMIZER") == capable
    kv.broadcast(1, mx.nd.ones((1,)), out=out)
    check_diff_to_scalar(out, 1)
    arr_list = [mx.nd.empty((1,))] * 2
    kv.pushpull(1, [mx.nd.ones((1,))] * 2, out=arr_list)
    for arr in arr_list:
        check_diff_to_scalar(arr, 2 * NW)
    kv.pushpull(1, arr_list)
    for arr in arr_list:
        check_diff_to_scalar(arr, (2 * NW * 2) * NW)
    try:
        kv.is_capable("flying")
        raise AssertionError("an unknown capability was accepted")
    except ValueError:
        pass


def test_get_type_rank_size():
    kv = mx.kv.create("kvd")
    assert kv.type == "kvd"
    assert isinstance(kv, kvd.mxnet.KVD) and isinstance(kv, mx.kv.KVStoreBase)
    assert (kv.rank, kv.num_workers) == (RANK, NW)
    assert kv.store.type == "local"


def test_init_push_pull_dtypes():
    kv = mx.kv.create("kvd")
    for dt in ("float32", "float64", "float16", "int32", "int64"):
        key = f"dt-{dt}"
        kv.init(key, mx.nd.ones(shape, dtype=dt) * (RANK + 3))
        out = mx.nd.zeros(shape, dtype=dt)
        kv.pull(key, out=out)
        check_diff_to_scalar(out, 3)
        v = mx.nd.ones(shape, dtype=dt)
        kv.pushpull(key, v)
        assert v.dtype == np.dtype(dt)
        check_diff_to_scalar(v, NW)
        kv.push(key, [mx.nd.ones(shape, dtype=dt)] * 2)
        kv.pull(key, out=[out, out])
        check_diff_to_scalar(out, 2 * NW)


def test_lazy_ops_and_slices():
    """Inputs still being computed by MXNet's engine, outputs still read by it."""
    kv = mx.kv.create("kvd")
    big = (256, 1024)
    kv.broadcast("big", mx.nd.zeros(big), out=mx.nd.empty(big))
    for i in range(3):
        x = mx.nd.ones(big)
        y = mx.nd.dot(x, mx.nd.ones((1024, 1024)) / 1024) * (i + 1)  # pending in the engine
        kv.pushpull("big", y)
        z = y * 2  # reads the result afterwards
        check_diff_to_scalar(z, 2 * (i + 1) * NW)
    whole = mx.nd.zeros((6, 4))
    kv.broadcast("row", mx.nd.zeros((2, 4)), out=mx.nd.empty((2, 4)))
    part = whole[2:4]  # a view into whole's memory
    kv.pushpull("row", mx.nd.ones((2, 4)), out=part)
    assert whole.asnumpy()[2:4].tolist() == [[float(NW)] * 4] * 2
    assert whole.asnumpy()[:2].sum() == 0 and whole.asnumpy()[4:].sum() == 0


def main() -> int:
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
    if RANK == 0:
        print(f"ok: {NW} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
