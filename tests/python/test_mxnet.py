"""kvd as an MXNet KVStore (mxnet==1.9.1): MXNet's custom-store checks with 1, 2
and 4 processes under kvrun, zero-copy NDArrays, optimizer translation, and
Gluon training across processes equal to one process on the same batches."""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed (tests/python/requirements.txt)")

import kvd  # noqa: E402
import kvd.mxnet  # noqa: E402
from conftest import HERE, kvrun  # noqa: E402


def _store_can_optimize(sock: str, job: str) -> bool:
    with kvd.create("local", socket=sock, job=job + "-probe", rank=0, num_workers=1) as kv:
        return kv.is_capable("optimizer")


# ---------------------------------------------------------------- MXNet's checks, N ranks


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mxnet_custom_store_checks(kvd_daemon, n):
    r = kvrun(n, [sys.executable, str(HERE / "mx_custom_checks.py")], sock=kvd_daemon.sock)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ok: {n} rank(s)" in r.stdout


def test_create_by_name_in_process():
    os.environ["KVD_STORE_TYPE"] = "teststore"  # in process: no kvd needed
    try:
        kv = mx.kv.create("kvd")
        assert isinstance(kv, kvd.mxnet.KVD) and kv.type == "kvd"
        assert kv.store.type == "teststore"
        assert kv.is_capable("optimizer") is False
        assert type(kv).is_capable("optimizer") is False
        out = mx.nd.empty((2, 3))
        kv.broadcast("w", mx.nd.ones((2, 3)), out)
        assert out.asnumpy().tolist() == [[1.0] * 3] * 2
        kv.close()
        assert kv.store.closed
    finally:
        del os.environ["KVD_STORE_TYPE"]


# ---------------------------------------------------------------- zero copy


rec_calls: list = []


@kvd.register(name="mxrecorder")
class MxRecorder:
    def pushpull(self, key, value, out, priority):
        vals = value if isinstance(value, list) else [value]
        outs = out if isinstance(out, list) else [out]
        rec_calls.append((key, [v.ctypes.data for v in vals], [o.ctypes.data for o in outs],
                          priority))
        s = sum(v.astype(np.float64) for v in vals)
        for o in outs:
            o[...] = s

    def broadcast(self, key, value, out, priority):
        rec_calls.append((key, value.ctypes.data, out.ctypes.data, priority))
        out[...] = value


def _ptr(nd):
    p = ctypes.c_void_p()
    from mxnet.base import _LIB

    _LIB.MXNDArrayGetData(nd.handle, ctypes.byref(p))
    return p.value


def test_ndarrays_are_not_copied():
    kv = kvd.mxnet.KVD(kvd.create("mxrecorder"), own=True)
    rec_calls.clear()
    a = mx.nd.ones((3, 5))
    b = mx.nd.ones((3, 5)) * 2
    o = mx.nd.zeros((3, 5))
    kv.pushpull(4, [a, b], out=o, priority=-4)
    assert rec_calls[-1] == ("4", [_ptr(a), _ptr(b)], [_ptr(o)], -4)
    assert (o.asnumpy() == 3).all()
    kv.pushpull("k", a)  # in place
    assert rec_calls[-1] == ("k", [_ptr(a)], [_ptr(a)], 0)
    w = mx.nd.arange(15).reshape((3, 5))
    kv.broadcast("w", w, out=o)
    assert rec_calls[-1] == ("w", _ptr(w), _ptr(o), 0)
    assert (o.asnumpy() == w.asnumpy()).all()
    kv.close()


# ---------------------------------------------------------------- optimizer translation


def test_optimizer_spec_translation():
    spec = kvd.mxnet.optimizer_spec
    sgd = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=1e-4, rescale_grad=0.03125,
                           clip_gradient=5.0)
    assert spec(sgd) == ("sgd lr=0.1 wd=0.0001 rescale_grad=0.03125 clip_gradient=5.0 "
                         "momentum=0.9")
    assert spec(mx.optimizer.SGD(learning_rate=0.5)) == \
        "sgd lr=0.5 wd=0.0 rescale_grad=1.0 momentum=0.0"
    assert spec(mx.optimizer.NAG(learning_rate=0.1, momentum=0.8)) == \
        "sgd lr=0.1 wd=0.0 rescale_grad=1.0 momentum=0.8 nesterov=1"
    adam = mx.optimizer.Adam(learning_rate=1e-3, beta1=0.8, beta2=0.99, epsilon=1e-7, wd=0.01)
    assert spec(adam) == ("adam lr=0.001 wd=0.01 rescale_grad=1.0 beta1=0.8 beta2=0.99 "
                          "epsilon=1e-07")

    class AdamW(mx.optimizer.Adam):  # as GluonNLP's: MXNet 1.9 has none
        pass

    assert spec(AdamW(learning_rate=1e-3)).startswith("adamw lr=0.001 ")
    sched = mx.optimizer.SGD(learning_rate=1.0,
                             lr_scheduler=mx.lr_scheduler.FactorScheduler(step=1, factor=0.5))
    sched.num_update = 3
    assert spec(sched).startswith("sgd lr=0.25 ")  # FactorScheduler: 2 halvings by step 3
    for bad in (mx.optimizer.RMSProp(), mx.optimizer.AdaGrad(), mx.optimizer.Nadam()):
        with pytest.raises(kvd.KVUnsupportedError, match="update_on_kvstore=False"):
            spec(bad)
    mult = mx.optimizer.SGD(learning_rate=0.1)
    mult.set_lr_mult({"w": 2.0})
    with pytest.raises(kvd.KVUnsupportedError, match="multiplier"):
        spec(mult)


def test_set_optimizer_passes_through_the_local_store(kvd_daemon, job):
    store = kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1)
    kv = kvd.mxnet.KVD(store, own=True)
    if kv.is_capable("optimizer"):
        kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.1))
    else:
        with pytest.raises(kvd.KVUnsupportedError):
            kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.1))
        with pytest.raises(kvd.KVUnsupportedError):
            kv.save_optimizer_states("/tmp/never.states")
    with pytest.raises(kvd.KVUnsupportedError):
        kv.set_optimizer(mx.optimizer.RMSProp())
    with pytest.raises(kvd.KVUnsupportedError):
        kv.set_gradient_compression({"type": "2bit"})
    kv.close()


# a store that applies the optimizer itself (from kvd's spec), to check the
# update_on_kvstore=True plumbing of kvd.mxnet before kvd's own store can
specs_seen: list = []


@kvd.register(name="specsgd")
class SpecSGD:
    def __init__(self):
        self.weights, self.moms, self.spec = {}, {}, None

    def is_capable(self, capability):
        return capability == "optimizer"

    def set_optimizer(self, spec):
        words = spec.split()
        assert words[0] == "sgd", spec
        self.spec = {k: float(v) for k, v in (w.split("=") for w in words[1:])}
        specs_seen.append(spec)

    def broadcast(self, key, value, out, priority):
        self.weights[key] = np.array(value, dtype=np.float32)
        out[...] = value

    def pushpull(self, key, value, out, priority):
        vals = value if isinstance(value, list) else [value]
        outs = out if isinstance(out, list) else [out]
        g = sum(v.astype(np.float32) for v in vals)
        s = self.spec
        w = self.weights[key]
        m = self.moms.setdefault(key, np.zeros_like(w))
        # MXNet's sgd_mom_update
        m[...] = s["momentum"] * m - s["lr"] * s["wd"] * w - \
            s["lr"] * (s["rescale_grad"] * g).astype(np.float32)
        w += m
        for o in outs:
            o[...] = w


def _train(kvstore, update_on_kvstore, steps=8, batch=16):
    from mxnet import autograd, gluon

    rng = np.random.default_rng(5)
    x = rng.normal(size=(steps * batch, 6)).astype(np.float32)
    y = x[:, :3].argmax(axis=1).astype(np.float32)
    net = gluon.nn.Dense(3, in_units=6)
    net.initialize()
    wr = np.random.default_rng(9)
    for name in sorted(net.collect_params()):
        p = net.collect_params()[name]
        p.set_data(mx.nd.array(wr.normal(0, 0.3, size=p.shape).astype(np.float32)))
    kw = {} if update_on_kvstore is None else {"update_on_kvstore": update_on_kvstore}
    tr = gluon.Trainer(net.collect_params(), "sgd",
                       {"learning_rate": 0.2, "momentum": 0.9, "wd": 1e-3},
                       kvstore=kvstore, **kw)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for s in range(steps):
        b = batch if s % 2 == 0 else batch // 2  # the batch size (rescale_grad) changes
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[s * batch:s * batch + b])),
                           mx.nd.array(y[s * batch:s * batch + b]))
        loss.backward()
        tr.step(b)
    params = net.collect_params()
    return [params[n].data().asnumpy() for n in sorted(params)], tr


def test_update_on_kvstore_true_plumbing_with_a_capable_store():
    specs_seen.clear()
    ref, _ = _train(None, None)
    kv = kvd.mxnet.KVD(kvd.create("specsgd"), own=True)
    got, tr = _train(kv, True)
    assert tr._update_on_kvstore is True
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the spec followed rescale_grad from step to step (batch 16, then 8)
    assert any("rescale_grad=0.0625" in s for s in specs_seen)
    assert any("rescale_grad=0.125" in s for s in specs_seen)
    assert all("momentum=0.9" in s and "wd=0.001" in s for s in specs_seen)
    # and a store that cannot: the Trainer applies the optimizer itself
    kv2 = kvd.mxnet.KVD(kvd.create("teststore"), own=True)
    got2, tr2 = _train(kv2, None)
    assert tr2._update_on_kvstore is False
    for a, b in zip(ref, got2):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="update_on_kvstore=False"):
        _train(kvd.mxnet.KVD(kvd.create("teststore"), own=True), True)


# ---------------------------------------------------------------- Gluon, 2 processes


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


_refs: dict = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(optimizer): the weights of one plain MXNet process on the whole batches."""
    import subprocess

    def get(optimizer="sgd", wd="0.001", lr_drop_at="0"):
        if (optimizer, wd, lr_drop_at) not in _refs:
            out = tmp_path_factory.mktemp("ref") / f"{optimizer}-{wd}-{lr_drop_at}.npz"
            env = dict(os.environ, OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1",
                       PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "python"),
                                                   str(HERE)]))
            r = subprocess.run([sys.executable, str(HERE / "gluon_equiv.py"), "--out",
                                str(out), "--kvstore", "none", "--optimizer", optimizer,
                                "--wd", wd, "--lr-drop-at", lr_drop_at],
                               env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            _refs[optimizer, wd, lr_drop_at] = _load(out)
        return _refs[optimizer, wd, lr_drop_at]

    return get


# NAG with wd=0: MXNet 1.9's nag_mom_update, applied in place (out=weight) as its
# optimizer does, reads the already updated weight for the momentum's wd term,
# which the clean formula (and kvd's, kernels/optim.h) does not.  lr_drop_at:
# a learning-rate schedule (NAG keeps lr inside its momentum, as MXNet does).
@pytest.mark.parametrize("update_on_kvstore,optimizer,wd,lr_drop_at",
                         [("0", "sgd", "0.001", "0"), ("1", "sgd", "0.001", "0"),
                          ("1", "nag", "0", "0"), ("1", "nag", "0", "5"),
                          ("1", "sgd", "0.001", "5"), ("1", "adam", "0.001", "5")])
def test_gluon_two_processes_equal_one(kvd_daemon, job, tmp_path, reference,
                                       update_on_kvstore, optimizer, wd, lr_drop_at):
    if update_on_kvstore == "1" and not _store_can_optimize(kvd_daemon.sock, job):
        pytest.skip("kvd's local store reports is_capable('optimizer') = 0 (no optimizer in "
                    "the store yet), so update_on_kvstore=True cannot run; this case runs "
                    "by itself once the store reports 1")
    out = tmp_path / "w.npz"
    r = kvrun(2, [sys.executable, str(HERE / "gluon_equiv.py"), "--out", str(out),
                  "--update-on-kvstore", update_on_kvstore, "--optimizer", optimizer,
                  "--wd", wd, "--lr-drop-at", lr_drop_at], sock=kvd_daemon.sock)
    assert r.returncode == 0, r.stdout + r.stderr
    got = _load(out)
    assert bool(got["update_on_kvstore"]) == (update_on_kvstore == "1")
    ref = reference(optimizer, wd, lr_drop_at)
    keys = [k for k in ref if k.startswith("p")]
    assert keys
    for k in keys:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5, err_msg=k)


def test_gluon_default_update_on_kvstore_and_instance(kvd_daemon, tmp_path, reference):
    """kvstore=mx.kv.create('kvd') (an instance), update_on_kvstore left to MXNet."""
    out = tmp_path / "w.npz"
    r = kvrun(2, [sys.executable, str(HERE / "gluon_equiv.py"), "--out", str(out),
                  "--kvstore", "kvd-object"], sock=kvd_daemon.sock)
    assert r.returncode == 0, r.stdout + r.stderr
    got = _load(out)
    with kvd.create("local", socket=kvd_daemon.sock, job="probe-default") as kv:
        assert bool(got["update_on_kvstore"]) == kv.is_capable("optimizer")
    ref = reference("sgd")
    for k in (k for k in ref if k.startswith("p")):
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5, err_msg=k)


def test_gluon_mlp_example(kvd_daemon):
    example = HERE.parents[1] / "examples" / "gluon_mlp.py"
    r = kvrun(4, [sys.executable, str(example), "--epochs", "2", "--samples", "2048"],
              sock=kvd_daemon.sock, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1: loss ")
    assert "4 rank(s)" in lines[-1]
    acc = float(lines[-1].rsplit(" ", 1)[1])
    assert acc > 0.5, r.stdout


def test_trainer_states_through_the_store(kvd_daemon, job, tmp_path):
    """Trainer.save_states / load_states with update_on_kvstore=True go to kvd."""
    if not _store_can_optimize(kvd_daemon.sock, job):
        pytest.skip("kvd's local store reports is_capable('optimizer') = 0")
    store = kvd.create("local", socket=kvd_daemon.sock, job=job, rank=0, num_workers=1)
    kv = kvd.mxnet.KVD(store, own=True)
    _, tr = _train(kv, True, steps=2)
    assert tr._update_on_kvstore is True
    path = str(tmp_path / "trainer.states")
    tr.save_states(path)
    assert os.path.getsize(path) > 0
    tr.load_states(path)
    assert tr.optimizer is tr._optimizer
    kv.close()
