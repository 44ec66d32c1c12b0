"""The GPU check: one command, a few minutes, for a machine with an NVIDIA GPU.

    pip install -e '.[dev,gpu]' && dvc repro normalise
    python benchmarks/gpu_check.py

1. runs the GPU tests (tests/test_backends.py: CuPy against NumPy, same seed,
   one epoch, rtol 1e-4; tests/test_fused_gpu.py:
   the fused kernels against NumPy in the cases of tests/test_compiled.py);
2. prints seconds per epoch on NumPy (1 BLAS thread, as the pipeline trains by
   default, and all cores), on backend numba (the compiled CPU loops for softmax
   regression, one core; the MLP is the NumPy code there), on CuPy's array-API
   code (a few dozen small kernels per step) and on the fused CuPy path
   (pipeline.core.fused_gpu: one launch per epoch; softmax regression only), for
   softmax regression at batch 1 (lr 0.01), 16, 128, 1024 and full batch and the
   MLP 784-256-10 at batch 128, 1024 and full batch (lr 0.1): median of 3 epochs,
   so the first CuPy epoch, which compiles kernels, does not count. At batch 1
   NumPy and CuPy's array-API code take seconds per epoch: they run the first
   SUBSET images and are scaled to the training set (marked "~").
   The ratios: the GPU's fastest column against the fastest CPU column
   ("gpu/cpu", above 1: the GPU is faster), and the fused path against CuPy's
   array-API code ("fused x").
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
MODELS = {"softmax": [], "mlp 256": [256]}
SUBSET = 5000  # images of the batch-1 runs of NumPy and CuPy's array-API code


def seconds_per_epoch(path, be, hidden, batch, data, epochs=3, subset=None):
    """(median seconds per epoch scaled to the training set, val accuracy after the last epoch)
    of `path`: "fit" (trainer.fit as the pipeline runs it), "array-api" (the array-API epoch on
    `be`, whatever fit would choose) or "fused" (pipeline.core.fused_gpu)."""
    from pipeline.core import fused_gpu, model, trainer
    from pipeline.core.hparams import Hyperparams
    from pipeline.core.optim import learning_rate

    (X, y), val = data["train"], data["val"]
    train = (X[:subset], y[:subset])
    rng = np.random.default_rng(0)
    layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, [784, *hidden, 10])]
    hp = Hyperparams(lr=0.01 if batch == 1 else 0.1, epochs=epochs, batch_size=batch)
    times, accuracy = [], None
    if path == "fit":
        history = trainer.fit(be, hp, rng, layers, train, val, 10, progress=False,
                              on_epoch=lambda epoch, row: times.append(row["time/epoch_seconds"]))
        accuracy = history[-1]["val/accuracy"]
    else:
        if path == "fused":
            epoch = fused_gpu.epochs(hp, layers, train, val, 10)
        else:
            epoch = trainer._array_api_epochs(be, hp, layers, train, val, 10, True)
        for number in range(1, epochs + 1):
            started = time.perf_counter()
            figures = [float(value) for value in epoch(rng.permutation(len(train[1])), learning_rate(hp, number))]
            times.append(time.perf_counter() - started)  # float() waited for the GPU: one sync per epoch
            accuracy = figures[3]
    return statistics.median(times) * len(y) / len(train[1]), accuracy


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help works
    tests = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_backends.py"), str(ROOT / "tests" / "test_fused_gpu.py")],
                           cwd=ROOT)
    import cupy

    from pipeline.core import backend
    from pipeline.data.splits import load_split

    data = {split: load_split(ROOT / "data" / "processed", split) for split in ("train", "val")}
    numpy_be, numba_be, cupy_be = backend.select("numpy"), backend.select("numba"), backend.select("cupy")
    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    cores = os.cpu_count()
    print(f"\nGPU {gpu}, CuPy {cupy.__version__}; CPU {platform.processor() or platform.machine()} "
          f"with {cores} cores, NumPy {np.__version__}")
    print("seconds per epoch (median of 3), validation accuracy after 3 epochs in brackets; "
          f"~: {SUBSET} images, scaled")
    columns = ("numpy 1 thread", f"numpy {cores} threads", "numba", "cupy", "cupy fused")
    print(f"{'model':<9}{'batch':>7}" + "".join(f"{c:>20}" for c in columns) + f"{'gpu/cpu':>9}{'fused x':>9}")
    n = len(data["train"][1])
    for name, hidden in MODELS.items():
        for batch in ((1, 16, 128, 1024, n) if not hidden else (128, 1024, n)):
            subset = SUBSET if batch == 1 else None
            with threadpool_limits(limits=1):
                one = seconds_per_epoch("fit", numpy_be, hidden, batch, data, subset=subset)
                compiled = seconds_per_epoch("fit", numba_be, hidden, batch, data)
            every = seconds_per_epoch("fit", numpy_be, hidden, batch, data, subset=subset)
            dev = seconds_per_epoch("array-api", cupy_be, hidden, batch, data, subset=subset)
            fused = None if hidden else seconds_per_epoch("fused", cupy_be, hidden, batch, data)
            cells = []
            for figure, scaled in ((one, subset), (every, subset), (compiled, None), (dev, subset), (fused, None)):
                cells.append(f"{'-':>20}" if figure is None else
                             f"{'~' if scaled else ' '}{figure[0]:9.4f} ({figure[1]:.4f})".rjust(20))
            cpu = min(one[0], every[0], compiled[0])
            best_gpu = min(dev[0], fused[0]) if fused else dev[0]
            ratio = f"{dev[0] / fused[0]:8.1f}x" if fused else f"{'-':>9}"
            print(f"{name:<9}{batch:>7}{''.join(cells)}{cpu / best_gpu:8.2f}x{ratio}")
    print("gpu/cpu: the faster GPU column against the fastest CPU column; fused x: cupy / cupy fused")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
