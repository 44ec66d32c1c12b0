"""The GPU check: one command, a few minutes, for a machine with an NVIDIA GPU.

    pip install -e '.[dev,gpu]' && dvc repro normalise
    python benchmarks/gpu_check.py

1. runs the backend tests, the GPU ones included (CuPy against NumPy: same
   seed, one epoch, rtol 1e-4; `auto` must pick CuPy there);
2. prints seconds per epoch on NumPy (1 BLAS thread, as the pipeline trains by
   default, and all cores), on backend numba (the compiled CPU loops for softmax
   regression, one core; the MLP is the NumPy code there) and on CuPy, for
   softmax regression and the MLP 784-256-10 at batch 128, batch 1024 and full
   batch: median of 3 epochs, so the first CuPy epoch, which compiles kernels,
   does not count. The speed-up is CuPy's against the fastest CPU column.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"softmax": [], "mlp 256": [256]}


def seconds_per_epoch(be, hidden, batch, data, epochs=3):
    from pipeline.core import model
    from pipeline.core.hparams import Hyperparams
    from pipeline.core.trainer import fit

    rng = np.random.default_rng(0)
    layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, [784, *hidden, 10])]
    hp = Hyperparams(lr=0.1, epochs=epochs, batch_size=batch, momentum=0.0, nesterov=False,
                     weight_decay=0.0, schedule="constant", step_epochs=1, gamma=1.0)
    times = []
    history = fit(be, hp, rng, layers, data["train"], data["val"], 10,
                  on_epoch=lambda epoch, row: times.append(row["time/epoch_seconds"]))
    return statistics.median(times), history[-1]["val/accuracy"]


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help works
    tests = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_backends.py")], cwd=ROOT)
    import cupy

    from pipeline.core import backend
    from pipeline.data.splits import load_split

    data = {split: load_split(ROOT / "data" / "processed", split) for split in ("train", "val")}
    numpy_be, numba_be, cupy_be = backend.select("numpy"), backend.select("numba"), backend.select("cupy")
    gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    cores = os.cpu_count()
    print(f"\nGPU {gpu}, CuPy {cupy.__version__}; CPU {platform.processor() or platform.machine()} "
          f"with {cores} cores, NumPy {np.__version__}")
    print("seconds per epoch (median of 3), validation accuracy after 3 epochs in brackets")
    print(f"{'model':<9}{'batch':>7}{'numpy 1 thread':>19}{f'numpy {cores} threads':>19}{'numba':>19}{'cupy':>19}"
          f"{'speed-up':>10}")
    n = len(data["train"][1])
    for name, hidden in MODELS.items():
        for batch in (128, 1024, n):
            with threadpool_limits(limits=1):
                one = seconds_per_epoch(numpy_be, hidden, batch, data)
                compiled = seconds_per_epoch(numba_be, hidden, batch, data)
            every = seconds_per_epoch(numpy_be, hidden, batch, data)
            dev = seconds_per_epoch(cupy_be, hidden, batch, data)
            cells = "".join(f"{s:10.3f} ({acc:.4f})" for s, acc in (one, every, compiled, dev))
            print(f"{name:<9}{batch:>7}{cells}{min(one[0], every[0], compiled[0]) / dev[0]:9.1f}x")
    print("speed-up: CuPy against the fastest CPU column")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
