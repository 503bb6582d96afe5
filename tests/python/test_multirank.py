"""The binding against a real kvd: several ranks in spawned processes."""

from __future__ import annotations

import numpy as np
import pytest

import _ranks
import kvd


@pytest.mark.parametrize("n", [2, 3])
def test_pushpull_every_dtype(ranks, n):
    res = ranks(_ranks.pushpull_dtypes, n)
    base = np.arange(1000) % 7
    for name in res[0]:
        if name.startswith("wrap"):
            continue
        want = n * base + sum(range(1, n + 1))
        for r in res:
            a, out = r[name]
            assert a == want.astype(np.float64).tolist(), name
            assert out == [float(sum(range(1, n + 1)))] * 1000, name
    assert {"float32", "float64", "float16", "int32", "int64"} <= set(res[0])
    if kvd.bfloat16 is not None:
        assert "bfloat16" in res[0]
    wrap32 = sum(np.uint32(2**31 - 1 - r) for r in range(n)) & 0xFFFFFFFF
    assert res[0]["wrap32"] == [int(np.array(wrap32, np.uint32).view(np.int32))] * 4
    wrap64 = sum(2**63 - 1 - r for r in range(n)) % 2**64
    assert res[1]["wrap64"] == [int(np.array(wrap64, np.uint64).view(np.int64))] * 4


def test_broadcast_init_push_pull(ranks):
    res = ranks(_ranks.broadcast_init_pull, 2)
    for r in res:
        assert r["b1"] == list(map(float, range(64)))
        assert r["v"] == [10.0] * 64
        assert r["outs"] == [[7.0] * 64] * 3
        assert r["init"] == [100.0] * 16
        assert r["exists"] == ("KVExistsError", kvd.KV_ERR_EXISTS)
        assert r["pulled"] == [[3.0] * 16] * 2
        assert r["p2"] == [6.0] * 16
        assert r["lists"] == ([2.0] * 3, [2.0] * 5)


def test_pushpullv_local_buffers(ranks):
    res = ranks(_ranks.pushpullv, 2)
    # rank r contributes (r+1) + (r+2) + (r+3); two ranks: 6 + 9 = 15
    for r in res:
        assert r["outs"] == [[15.0] * 3, [15.0] * 3]
        assert r["inplace"] == [[15.0] * 3] * 3
        assert r["same"] == [2.0 * (1 + 2)] * 2


def test_async_handles(ranks):
    res = ranks(_ranks.async_ops, 2)
    for r in res:
        assert r["first"] == {"a0": 1.0, "a1": 3.0, "a2": 5.0}
        assert r["rest"] == {"a3": 7.0, "a4": 9.0, "a5": 11.0}
        assert r["list"] == [2.0, 2.0]


def test_alloc_zero_copy(ranks):
    res = ranks(_ranks.alloc_zero_copy, 2)
    for r in res:
        assert r == (3.0, 3.0, 2.0, 2.0, [10, 10, 10])


def test_mismatch_fails_that_rank_alone(ranks):
    res = ranks(_ranks.mismatch, 2)
    assert res[0]["err"] is None and res[0]["sum"] == 2.0
    code, msg, code2 = res[1]["err"]
    assert code == code2 == kvd.KV_ERR_MISMATCH and "11" in msg
    assert res[1]["sum"] == 2.0


@pytest.mark.parametrize("n", [2, 3])
def test_rank_killed_mid_round_raises_peer_error(kvd_daemon, job, n):
    import multiprocessing as mp
    import queue

    from conftest import _rank_main

    # the killed rank sends nothing back: collect the survivors by hand
    ctx = mp.get_context("spawn")
    q = ctx.Queue()

    procs = [ctx.Process(target=_rank_main,
                         args=(_ranks.peer_death, r, n, kvd_daemon.sock, job, (), q))
             for r in range(n)]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < n - 1:
            try:
                rank, ok, res = q.get(timeout=40)
            except queue.Empty:
                raise AssertionError(f"survivors did not report: {got}")
            assert ok, res
            got[rank] = res
    finally:
        for p in procs:
            p.join(10)
    assert procs[-1].exitcode == -9
    for r in range(n - 1):
        name, code, msg, secs, later = got[r]
        assert (name, code) == ("KVPeerError", kvd.KV_ERR_PEER), got[r]
        assert secs < 10, f"KV_ERR_PEER took {secs:.1f}s"
        assert later == "KVPeerError"


def test_rank_exit_fails_async_op(kvd_daemon, job):
    import multiprocessing as mp

    from conftest import _rank_main

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main,
                         args=(_ranks.peer_death_async, r, 2, kvd_daemon.sock, job, (), q))
             for r in range(2)]
    for p in procs:
        p.start()
    rank, ok, res = q.get(timeout=40)
    for p in procs:
        p.join(10)
    assert ok and rank == 0, res
    assert res == ("KVPeerError", kvd.KV_ERR_PEER)
    assert procs[1].exitcode == 3


def test_custom_store_in_a_rank(ranks):
    res = ranks(_ranks.custom_store_in_child, 2)
    for r, (vals, typ, ctyp) in enumerate(res):
        assert vals == [10.0] * 4
        assert typ == ctyp == f"child{r}"


def test_calls_release_the_gil(ranks):
    assert ranks(_ranks.threads, 2) == [(2.0, 2.0), (2.0, 2.0)]


@pytest.mark.parametrize("n", [2, 3])
def test_list_pushpull_in_other_orders(ranks, n):
    res = ranks(_ranks.list_orders, n)
    for r in res:
        assert r == {f"o{i}": float(n * i + 10 * sum(range(n))) for i in range(6)}
