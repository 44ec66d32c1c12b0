"""The GPU check: one command, a few minutes, for a machine with an NVIDIA GPU.

    pip install -e '.[dev,gpu]' && dvc repro normalise
    python benchmarks/gpu_check.py

1. runs the GPU tests (CuPy against NumPy: same seed, one epoch, rtol 1e-4);
2. prints seconds per epoch of softmax regression on NumPy and CuPy at batch
   128, batch 1024 and full batch (median of 3 epochs; the first CuPy epoch,
   which compiles kernels, is excluded by the median).
"""

import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_epoch(be, batch, data, epochs=3):
    from pipeline import model
    from pipeline.train import fit

    rng = np.random.default_rng(0)
    layers = [(be.to_device(W), be.to_device(b)) for W, b in model.init_params(rng, [784, 10])]
    hp = SimpleNamespace(lr=0.2, epochs=epochs, batch_size=batch, momentum=0.0, nesterov=False,
                         weight_decay=0.0, schedule="constant", step_epochs=1, gamma=1.0)
    times = []
    fit(be, hp, rng, layers, data["train"], data["val"], 10,
        on_epoch=lambda epoch, row: times.append(row["time/epoch_seconds"]))
    return statistics.median(times)


def main():
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q",
                            str(ROOT / "tests" / "test_backends.py")], cwd=ROOT)
    from pipeline import backend
    from pipeline.normalise import load_split

    data = {split: load_split(ROOT / "data" / "processed", split) for split in ("train", "val")}
    backends = {"numpy": backend.select("numpy"), "cupy": backend.select("cupy")}
    n = len(data["train"][1])
    print(f"{'batch':>8}{'numpy s/epoch':>15}{'cupy s/epoch':>14}{'speed-up':>10}")
    for batch in (128, 1024, n):
        cpu, gpu = (seconds_per_epoch(be, batch, data) for be in backends.values())
        print(f"{batch:>8}{cpu:15.3f}{gpu:14.3f}{cpu / gpu:10.1f}")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
