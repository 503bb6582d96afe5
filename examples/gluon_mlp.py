#!/usr/bin/env python3
"""Train an MLP with Gluon across processes, gradients summed by kvd.

    make                                   # builds build/lib/libkv.so, kvd, kvrun
    build/bin/kvrun -n 4 python examples/gluon_mlp.py

Every rank makes the same generated classification set (a fixed seed) and
trains on its own slice of each global batch; ``gluon.Trainer(...,
kvstore='kvd')`` broadcasts rank 0's initial weights and sums the gradients
of all ranks on each step, so the ranks move in lockstep and train the model
a single process would train on the whole batches. Rank 0 prints the loss
and accuracy. Needs mxnet (1.9.1, with numpy<1.24) and the kvd package
(``pip install ./python``, or run from the source tree as above).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import kvd.mxnet  # noqa: E402,F401  registers mx.kv.create('kvd')


def make_data(n: int, features: int, classes: int, seed: int):
    """A separable-ish set: Gaussian blobs around random class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 0.5, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(0.0, 1.0, size=(n, features))
    return x.astype(np.float32), y.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--kvstore", default="kvd")
    args = ap.parse_args()

    x, y = make_data(args.samples, args.features, args.classes, seed=42)
    split = int(0.8 * len(x))
    xtr, ytr, xte, yte = x[:split], y[:split], x[split:], y[split:]

    mx.random.seed(int(os.environ.get("KVD_RANK", "0")))  # ranks start apart...
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(args.hidden, activation="relu"),
            gluon.nn.Dense(args.hidden, activation="relu"),
            gluon.nn.Dense(args.classes))
    net.initialize(mx.init.Xavier())
    net(mx.nd.array(xtr[:1]))  # materialise the parameters
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": args.lr, "momentum": 0.9},
                            kvstore=args.kvstore)
    if args.kvstore == "kvd":
        # ...and every rank takes rank 0's weights before the first batch (else
        # the Trainer would broadcast them in its first step, after the first
        # gradients were computed from each rank's own weights)
        kvd.mxnet.broadcast_parameters(trainer)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    rank, size = 0, 1
    if args.kvstore == "kvd":  # what kvrun gave this process (libkv reads the same)
        rank = int(os.environ.get("KVD_RANK", "0"))
        size = int(os.environ.get("KVD_NUM_WORKERS", "1"))
    if args.batch % size:
        print(f"--batch {args.batch} is not a multiple of {size} ranks", file=sys.stderr)
        return 2
    local = args.batch // size

    def accuracy(xs, ys) -> float:
        pred = net(mx.nd.array(xs)).argmax(axis=1).asnumpy()
        return float((pred == ys).mean())

    t0 = time.time()
    order_rng = np.random.default_rng(7)  # the same shuffle on every rank
    for epoch in range(args.epochs):
        order = order_rng.permutation(len(xtr))
        total, count = 0.0, 0
        for b in range(len(xtr) // args.batch):
            idx = order[b * args.batch + rank * local: b * args.batch + (rank + 1) * local]
            data, label = mx.nd.array(xtr[idx]), mx.nd.array(ytr[idx])
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(args.batch)  # gradients summed over ranks: the global batch
            total += float(loss.sum().asscalar())
            count += local
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {total / count:.4f}, "
                  f"train accuracy {accuracy(xtr, ytr):.3f}, "
                  f"test accuracy {accuracy(xte, yte):.3f}", flush=True)
    if rank == 0:
        print(f"{size} rank(s), {args.epochs} epochs in {time.time() - t0:.1f} s; "
              f"final test accuracy {accuracy(xte, yte):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
