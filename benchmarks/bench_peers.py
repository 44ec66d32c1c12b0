"""Seconds per epoch: our training paths against JAX and PyTorch, one core each.

    pip install -e '.[bench]'      # torch==2.13.0 (CPU) and jax[cpu]==0.10.2
    dvc repro normalise            # the real MNIST in data/processed/
    taskset -c 0 python benchmarks/bench_peers.py [--rounds 3] [--epochs 3]

One run, the same data (55,000 training images, 5,000 validation), model, batch
size, learning rate and epochs for every contender, all on one thread: the
script limits NumPy's BLAS (threadpoolctl), PyTorch (set_num_threads) and XLA
(--xla_cpu_multi_thread_eigen=false, intra_op_parallelism_threads=1) to one
thread, and `taskset -c 0` pins the whole process to one core. An epoch is:
shuffle, one SGD step per minibatch, and the validation loss and accuracy.

    ours, numpy plain   pipeline.core.trainer.fit, backend numpy, backend.fast=false
    ours, numpy codes   the same with backend.fast=true (8-bit pixel codes from batch 16 up)
    ours, numba         backend numba: softmax regression in compiled loops
                        (pipeline.core.compiled); the MLP runs the NumPy code there
    jax                 jax.jit of a whole epoch (lax.scan over the batches, each gathered
                        in shuffled order in its step, then the last partial batch and
                        validation); its compile time is printed apart, not in the epochs
    pytorch             a plain torch loop (nn.Linear, F.cross_entropy, optim.SGD)

The contenders take turns for --rounds rounds, --epochs epochs each; a figure
is the median over all its epochs, so a slow spell of a shared machine lands on
all of them. Per-sample SGD (batch 1) in PyTorch and our plain NumPy costs
seconds per epoch: those two run --subset images and are scaled to the training
set (marked "~"). The floor is the arithmetic: forward and weight gradient
(plus the MLP's backward through its output layer), 2 flops a multiply-add, at
--peak GFLOP/s on one core (150: AVX-512 at about 2.3 GHz, DESIGN.md section 6).
Numba's first compile and its load from the cache (__pycache__ beside
compiled.py) are timed in two fresh processes sharing an empty cache folder.
"""

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CASES = [  # name, hidden layers, batch, lr, momentum
    ("softmax batch 1", [], 1, 0.01, 0.0),
    ("softmax batch 128", [], 128, 0.2, 0.0),
    ("mlp 784-256-10 batch 128", [256], 128, 0.05, 0.9),
]


def flops_per_epoch(hidden, n):
    sizes = [784, *hidden, 10]
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))  # forward; the weight gradient is as many
    back = sum(a * b for a, b in zip(sizes[1:-1], sizes[2:]))  # delta back through the layers above the first
    return 2 * n * (2 * macs + back)


def ours(backend_name, fast, hidden, batch, lr, momentum, data, epochs, subset=None):
    from pipeline.core import backend, model
    from pipeline.core.hparams import Hyperparams
    from pipeline.core.trainer import fit

    (X, y), val = data["train"], data["val"]
    train = (X[:subset], y[:subset])
    hp = Hyperparams(lr=lr, epochs=epochs, batch_size=batch, momentum=momentum)
    rng = np.random.default_rng(0)
    layers = model.init_params(rng, [784, *hidden, 10])
    times = []
    history = fit(backend.select(backend_name), hp, rng, layers, train, val, 10, fast=fast, progress=False,
                  on_epoch=lambda epoch, row: times.append(row["time/epoch_seconds"]))
    scale = len(y) / len(train[1])
    return [t * scale for t in times], history[-1]["val/accuracy"]


def jax_epochs(hidden, batch, lr, momentum, data, epochs):
    """(seconds of each epoch, compile seconds, val accuracy): one jitted function per epoch."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    (X, y), (X_val, y_val) = data["train"], data["val"]
    n = len(y)
    steps, rest = divmod(n, batch)
    X, y, X_val, y_val = (jnp.asarray(a) for a in (X, y.astype(np.int32), X_val, y_val.astype(np.int32)))
    rng = np.random.default_rng(0)
    sizes = [784, *hidden, 10]
    params = [(jnp.asarray(rng.normal(0, 0.01 if i == len(sizes) - 2 else (2 / a) ** 0.5, (b, a)), jnp.float32),
               jnp.zeros(b, jnp.float32)) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    velocity = jax.tree.map(jnp.zeros_like, params)

    def logits(params, x):
        for W, b in params[:-1]:
            x = jax.nn.relu(x @ W.T + b)
        W, b = params[-1]
        return x @ W.T + b

    def loss(params, x, labels):
        z = logits(params, x)
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, labels[:, None], axis=1)[:, 0]), z

    def step(state, xy):
        params, velocity = state
        (value, z), grads = jax.value_and_grad(loss, has_aux=True)(params, *xy)
        if momentum:
            velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
            grads = velocity
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return (params, velocity), (value * len(xy[1]), jnp.sum(jnp.argmax(z, axis=1) == xy[1]))

    def gathered_step(state, rows):  # each batch gathered in its step: 2.6x faster than one gather an epoch
        return step(state, (X[rows], y[rows]))

    @jax.jit
    def epoch(params, velocity, order):
        batches = order[:steps * batch].reshape(steps, batch)
        state, (losses, hits) = lax.scan(gathered_step, (params, velocity), batches)
        train_loss, train_hits = jnp.sum(losses), jnp.sum(hits)
        if rest:
            state, (last_loss, last_hits) = gathered_step(state, order[steps * batch:])
            train_loss, train_hits = train_loss + last_loss, train_hits + last_hits
        val_loss, z = loss(state[0], X_val, y_val)
        return state, train_loss / n, train_hits / n, val_loss, jnp.mean(jnp.argmax(z, axis=1) == y_val)

    orders = [jnp.asarray(rng.permutation(n).astype(np.int32)) for _ in range(epochs)]
    started = time.perf_counter()
    compiled = epoch.lower(params, velocity, orders[0]).compile()
    compile_seconds = time.perf_counter() - started
    times = []
    for order in orders:
        started = time.perf_counter()
        (params, velocity), *metrics = compiled(params, velocity, order)
        accuracy = float(metrics[-1])  # waits for the epoch
        times.append(time.perf_counter() - started)
    return times, compile_seconds, accuracy


def pytorch_epochs(hidden, batch, lr, momentum, data, epochs, subset=None):
    import torch

    torch.manual_seed(0)
    sizes = [784, *hidden, 10]
    modules = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        modules += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*modules[:-1])
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    X, y = torch.from_numpy(data["train"][0][:subset]), torch.from_numpy(data["train"][1][:subset].astype(np.int64))
    X_val, y_val = torch.from_numpy(data["val"][0]), torch.from_numpy(data["val"][1].astype(np.int64))
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(X))
        for start in range(0, len(X), batch):
            rows = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(net(X[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (net(X_val).argmax(1) == y_val).float().mean().item()
        times.append((time.perf_counter() - started) * len(data["train"][1]) / len(X))
    return times, accuracy


NUMBA_PROBE = """
import time
started = time.perf_counter()
import numpy as np
from pipeline.core import compiled, model
imported = time.perf_counter()
rng = np.random.default_rng(0)
codes = rng.integers(0, 256, (64, 784)).astype(np.uint8)
images, labels = compiled.Images(codes), rng.integers(0, 10, 64)
((W, b),) = model.init_params(rng, [784, 10])
for batch, momentum in ((1, 0.0), (16, 0.9)):
    weights = compiled.Model(W, b, momentum)
    compiled.train_epoch(weights, images, labels, rng.permutation(64), batch, 0.1, momentum, False, 0.0)
    compiled.evaluate(weights, images, labels)
print(imported - started, time.perf_counter() - imported)
"""


def numba_compile_and_cache_seconds():
    """(import seconds, first compile seconds, cached load seconds) in fresh processes."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT / "src"))
        runs = [subprocess.run([sys.executable, "-c", NUMBA_PROBE], env=env, capture_output=True, text=True,
                               check=True).stdout.split() for _ in range(2)]
    return float(runs[1][0]), float(runs[0][1]), float(runs[1][1])


def median_or_none(values):
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every contender, interleaved")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per contender and round")
    parser.add_argument("--subset", type=int, default=10_000,
                        help="images for per-sample SGD in PyTorch and plain NumPy, scaled to the training set")
    parser.add_argument("--peak", type=float, default=150.0, help="GFLOP/s of one core for the floor")
    parser.add_argument("--processed", default=str(ROOT / "data" / "processed"))
    args = parser.parse_args()

    import jax
    import torch

    from pipeline.data.splits import load_split

    torch.set_num_threads(1)
    data = {split: load_split(args.processed, split) for split in ("train", "val")}
    n = len(data["train"][1])
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; cores allowed: {sorted(os.sched_getaffinity(0))}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"numpy {np.__version__}, numba {__import__('numba').__version__}, jax {jax.__version__}, "
          f"torch {torch.__version__}; {args.rounds} rounds of {args.epochs} epochs; medians of seconds per epoch; "
          "~: scaled from a subset")
    numba_import, numba_compile, numba_cached = numba_compile_and_cache_seconds()
    print(f"numba: import {numba_import:.2f} s; first compile {numba_compile:.2f} s; "
          f"load from the cache {numba_cached:.2f} s (fresh processes)")
    header = (f"{'case':<26}{'np plain':>10}{'np codes':>10}{'numba':>9}{'jax':>9}{'torch':>9}"
              f"{'numba/jax':>10}{'numba/torch':>12}{'floor':>8}{'numba/floor':>12}{'jax compile':>12}")
    print(header)
    with threadpool_limits(limits=1):
        for name, hidden, batch, lr, momentum in CASES:
            times = {key: [] for key in ("plain", "codes", "numba", "jax", "torch")}
            accuracy, compiles = {}, []
            per_sample = batch == 1
            for _ in range(args.rounds):
                subset = args.subset if per_sample else None
                t, accuracy["plain"] = ours("numpy", False, hidden, batch, lr, momentum, data, args.epochs, subset)
                times["plain"] += t
                if not per_sample and not hidden:  # the codes apply to softmax regression from batch 16
                    t, accuracy["codes"] = ours("numpy", True, hidden, batch, lr, momentum, data, args.epochs)
                    times["codes"] += t
                t, accuracy["numba"] = ours("numba", True, hidden, batch, lr, momentum, data, args.epochs)
                times["numba"] += t
                t, seconds, accuracy["jax"] = jax_epochs(hidden, batch, lr, momentum, data, args.epochs)
                times["jax"] += t
                compiles.append(seconds)
                t, accuracy["torch"] = pytorch_epochs(hidden, batch, lr, momentum, data,
                                                      args.epochs if not per_sample else 1, subset)
                times["torch"] += t
            m = {key: median_or_none(value) for key, value in times.items()}
            floor = flops_per_epoch(hidden, n) / (args.peak * 1e9)

            def cell(key, width):
                if m[key] is None:
                    return f"{'-':>{width}}"
                mark = "~" if per_sample and key in ("plain", "torch") else ""
                return f"{mark + format(m[key], '.3f'):>{width}}"

            print(f"{name:<26}{cell('plain', 10)}{cell('codes', 10)}{cell('numba', 9)}{cell('jax', 9)}"
                  f"{cell('torch', 9)}{m['numba'] / m['jax']:10.3f}{m['numba'] / m['torch']:12.3f}{floor:8.3f}"
                  f"{m['numba'] / floor:12.2f}{statistics.median(compiles):11.2f}s")
            print(f"{'':<26}val accuracy after {args.epochs} epochs (torch: 1 at batch 1): "
                  + ", ".join(f"{key} {value:.4f}" for key, value in accuracy.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
