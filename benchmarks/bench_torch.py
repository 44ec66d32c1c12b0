"""Seconds per epoch: this project's NumPy trainer against PyTorch CPU, and the floor.

    pip install -e '.[bench]'      # torch==2.13.0, CPU build
    dvc repro normalise            # the real MNIST in data/processed/
    python benchmarks/bench_torch.py [--epochs 3] [--rounds 3] [--threads 1]

Same data (55,000 training images, 5,000 validation), same model, same batch
size and epochs, same BLAS thread count, measured in one run. Our figure is a
whole `fit` epoch (shuffle, SGD steps, training and validation metrics) plus
logging it to a throwaway MLflow SQLite store as the train stage does, in
batches (pipeline.tracking.epoch_log): every write to the store, the last one included,
is shared out over the run's epochs. The work done once per run before the
first epoch (device copies, pixel codes) is printed apart as "setup".
PyTorch's loop shuffles, steps and validates every epoch. The floor is one
pass of the same matrix products over the whole training set as a few large
calls: no training loop can touch the data for less. The contenders take turns for --rounds rounds and each figure
is the median over all their epochs, so a slow spell of a shared machine
lands on all of them rather than on whichever ran during it.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
CASES = {"softmax": [], "mlp 784-256-10": [256]}


def hyperparameters(hidden, epochs, batch=128):
    from pipeline.core.hparams import Hyperparams

    momentum = 0.9 if hidden else 0.0
    lr = 0.05 if hidden else (0.2 if batch > 1 else 0.01)
    return Hyperparams(lr=lr, epochs=epochs, batch_size=batch, momentum=momentum,
                       nesterov=False, weight_decay=0.0, schedule="constant", step_epochs=1, gamma=1.0)


def ours(hidden, data, epochs, batch=128):
    import mlflow

    from pipeline.core import backend, model
    from pipeline.core.trainer import fit
    from pipeline.tracking.epoch_log import EpochLog

    be = backend.select("numpy")
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
        with mlflow.start_run():
            rng = np.random.default_rng(0)
            layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, [784, *hidden, 10])]
            epoch_times, logging = [], 0.0
            started = time.perf_counter()
            with EpochLog() as log_epoch:  # as the train stage logs

                def log_and_time(epoch, row):
                    nonlocal logging
                    epoch_times.append(row["time/epoch_seconds"])
                    logged = time.perf_counter()
                    log_epoch(epoch, row)
                    logging += time.perf_counter() - logged

                history = fit(be, hyperparameters(hidden, epochs, batch), rng, layers, data["train"], data["val"],
                              10, on_epoch=log_and_time)
                closing = time.perf_counter()
            logging += time.perf_counter() - closing  # the last batch of metrics
            setup = time.perf_counter() - started - sum(epoch_times) - logging  # once per run: codes, copies
    # Every write to the store, the last one included, shared out over the run's epochs.
    return [t + logging / len(epoch_times) for t in epoch_times], setup, history[-1]["val/accuracy"]


def pytorch(hidden, data, epochs):
    import torch

    torch.manual_seed(0)
    sizes = [784, *hidden, 10]
    modules = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        modules += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*modules[:-1])
    hp = hyperparameters(hidden, epochs)
    opt = torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum)
    X, y = torch.from_numpy(data["train"][0]), torch.from_numpy(data["train"][1].astype(np.int64))
    X_val, y_val = torch.from_numpy(data["val"][0]), torch.from_numpy(data["val"][1].astype(np.int64))
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(X))
        for start in range(0, len(X), hp.batch_size):
            rows = order[start:start + hp.batch_size]
            loss = torch.nn.functional.cross_entropy(net(X[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (net(X_val).argmax(1) == y_val).float().mean().item()
        times.append(time.perf_counter() - started)
    return times, accuracy


def floor(hidden, data, repeats=3):
    """One forward and one backward pass of the same products over all of X, in large calls."""
    X = data["train"][0]
    rng = np.random.default_rng(0)
    sizes = [784, *hidden, 10]
    Ws = [rng.normal(0, 0.01, (o, i)).astype(np.float32) for i, o in zip(sizes[:-1], sizes[1:])]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        acts = [X]
        for W in Ws:
            acts.append(acts[-1] @ W.T)
        delta = acts[-1]
        for i in range(len(Ws) - 1, -1, -1):
            delta.T @ acts[i]  # weight gradient
            if i:
                delta = delta @ Ws[i]
        times.append(time.perf_counter() - started)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ours, PyTorch and the floor, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads for every contender")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from pipeline.data.splits import load_split

    import torch

    torch.set_num_threads(args.threads)
    processed = ROOT / "data" / "processed"
    data = {split: load_split(processed, split) for split in ("train", "val")}
    print(f"threads {args.threads}, {args.rounds} rounds of {args.epochs} epochs, batch 128, load average before: "
          f"{os.getloadavg()[0]:.2f}; figures are medians of seconds per epoch over all rounds; setup: ours, "
          "seconds once per run before the first epoch")
    header = (f"{'case':<16}{'ours':>8}{'pytorch':>9}{'ratio':>7}{'floor':>8}{'ours/floor':>11}{'setup':>7}"
              "  val acc (ours, torch)")
    print(header)
    with threadpool_limits(limits=args.threads):
        for name, hidden in CASES.items():
            ours_t, torch_t, floor_t, setups = [], [], [], []
            for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every contender
                times, setup, ours_acc = ours(hidden, data, args.epochs)
                ours_t += times
                setups.append(setup)
                times, torch_acc = pytorch(hidden, data, args.epochs)
                torch_t += times
                floor_t += floor(hidden, data)
            o, t, f = (statistics.median(x) for x in (ours_t, torch_t, floor_t))
            print(f"{name:<16}{o:8.3f}{t:9.3f}{o / t:7.2f}{f:8.3f}{o / f:11.2f}{statistics.median(setups):7.2f}"
                  f"  {ours_acc:.4f}, {torch_acc:.4f}")
        per_sample, setup, _ = ours([], data, 1, batch=1)
    print(f"softmax, batch 1 (the lecture's per-sample SGD), ours: {per_sample[0]:.2f} s for one epoch "
          f"(+ {setup:.2f} s setup)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
