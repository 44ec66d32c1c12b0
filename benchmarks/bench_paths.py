"""The speed paths against the plain lecture path, in turns in one process.

    python benchmarks/bench_paths.py [--rounds 3] [--epochs 3]

Softmax regression on the real MNIST (dvc repro normalise first), one BLAS
thread: seconds per epoch (median over the epochs of a round) with
backend.fast on (8-bit pixel codes, pipeline.core.codes) and off, their paired
ratio per round, and the plain per-sample SGD (batch 1) on a 10,000-image
subset, scaled to the 55,000 training images.
"""

import argparse
import os
import statistics

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.core import backend, model, trainer
from pipeline.core.hparams import Hyperparams
from pipeline.data.splits import load_split


def seconds_per_epoch(data, batch, epochs, fast, subset=None):
    (tx, ty), val = data
    hp = Hyperparams(lr=0.2 if batch > 1 else 0.01, epochs=epochs, batch_size=batch)
    rng = np.random.default_rng(0)
    layers, times = model.init_params(rng, [784, 10]), []
    trainer.fit(backend.select("numpy"), hp, rng, layers, (tx[:subset], ty[:subset]), val, 10, fast=fast,
                on_epoch=lambda epoch, row: times.append(row["time/epoch_seconds"]))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--processed", default="data/processed")
    args = parser.parse_args()
    data = (load_split(args.processed, "train"), load_split(args.processed, "val"))
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with threadpool_limits(1):
        ratios = []
        for i in range(args.rounds):
            fast, plain = (seconds_per_epoch(data, 128, args.epochs, f) for f in (True, False))
            ratios.append(fast / plain)
            print(f"round {i + 1}: batch 128  codes {fast:.4f} s  plain {plain:.4f} s  ratio {fast / plain:.2f}")
        print(f"median ratio codes/plain at batch 128: {statistics.median(ratios):.2f}")
        subset = 10_000
        per_sample = seconds_per_epoch(data, 1, 1, True, subset) * len(data[0][1]) / subset
        print(f"batch 1 (plain path), scaled from {subset} images: {per_sample:.2f} s per epoch")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
