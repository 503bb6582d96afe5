"""Train a small Gluon MLP on fixed global batches and save the final weights.

    kvrun -n 2 python gluon_equiv.py --out w.npz --kvstore kvd        # ranks share batches
    python gluon_equiv.py --out ref.npz --kvstore none                 # one process, whole batches

Each rank of a kvd run takes its slice of every global batch; rank 0 saves.
Ranks start from different weights (the Trainer's broadcast must fix that).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon

import kvd.mxnet  # noqa: F401


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kvstore", default="kvd", help="kvd, kvd-object or none")
    ap.add_argument("--update-on-kvstore", default="none", choices=["none", "0", "1"])
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--wd", type=float, default=1e-3)
    ap.add_argument("--lr-drop-at", type=int, default=0,
                    help="from this step on, the learning rate is a fifth (0: never)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    rank = int(os.environ.get("KVD_RANK", "0")) if args.kvstore != "none" else 0
    size = int(os.environ.get("KVD_NUM_WORKERS", "1")) if args.kvstore != "none" else 1
    local = args.batch // size

    rng = np.random.default_rng(123)
    x = rng.normal(size=(args.steps * args.batch, 10)).astype(np.float32)
    y = (x[:, :4].argmax(axis=1)).astype(np.float32)

    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(16, activation="relu", in_units=10), gluon.nn.Dense(4, in_units=16))
    net.initialize()
    init_rng = np.random.default_rng(1000 + rank)  # different on every rank
    for name in sorted(net.collect_params()):
        p = net.collect_params()[name]
        p.set_data(mx.nd.array(init_rng.normal(0, 0.3, size=p.shape).astype(np.float32)))

    opt_params = {"learning_rate": 0.1, "wd": args.wd}
    if args.optimizer in ("sgd", "nag"):
        opt_params["momentum"] = 0.9
    if args.optimizer == "adam":
        opt_params["learning_rate"] = 0.01
    kw = {}
    if args.update_on_kvstore != "none":
        kw["update_on_kvstore"] = args.update_on_kvstore == "1"
    kvstore = {"kvd": "kvd", "kvd-object": None, "none": None}[args.kvstore]
    if args.kvstore == "kvd-object":
        kvstore = mx.kv.create("kvd")
    trainer = gluon.Trainer(net.collect_params(), args.optimizer, opt_params,
                            kvstore=kvstore, **kw)
    if args.kvstore != "none":
        kvd.mxnet.broadcast_parameters(trainer)  # rank 0's weights before the first batch
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for s in range(args.steps):
        if args.lr_drop_at and s == args.lr_drop_at:
            trainer.set_learning_rate(trainer.learning_rate / 5)
        lo = s * args.batch + rank * local
        data = mx.nd.array(x[lo:lo + local])
        label = mx.nd.array(y[lo:lo + local])
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        trainer.step(args.batch)
    if args.kvstore != "none":
        assert trainer._kvstore is not None, "the Trainer made no kvstore"
        assert trainer._kvstore.type == "kvd"
        assert trainer._kvstore.num_workers == size
    if rank == 0:
        params = net.collect_params()
        # names differ between processes only by their prefix counters: key by order
        w = {f"p{i}": params[n].data().asnumpy() for i, n in enumerate(sorted(params))}
        np.savez(args.out, update_on_kvstore=np.array(bool(trainer._update_on_kvstore)), **w)
        print(f"saved {args.out}: update_on_kvstore={trainer._update_on_kvstore}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
